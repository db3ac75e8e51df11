/* bench_load [--repeat N] CKPT...
 *
 * For each checkpoint: cs_weights_open, then read every tensor (sum of all
 * values), reporting the time of both steps and the peak resident set. Each load
 * runs in a child process so that every peak RSS (getrusage ru_maxrss, which
 * counts the touched pages of the memory map) belongs to that load alone. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "weights.h"

static double tensor_sum(const cs_tensor_entry *e) {
    size_t n = e->nbytes / cs_dtype_size(e->dtype);
    const unsigned char *p = e->data;
    double s = 0;
    for (size_t i = 0; i < n; i++) {
        float v;
        if (e->dtype == CS_DTYPE_F32) {
            memcpy(&v, p + 4 * i, 4);
        } else {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            v = e->dtype == CS_DTYPE_F16 ? cs_f16_to_f32(h) : cs_bf16_to_f32(h);
        }
        s += v;
    }
    return s;
}

static int load_once(const char *path) {
    double t0 = cs_now_seconds();
    cs_weights *w;
    if (cs_weights_open(path, &w)) {
        fprintf(stderr, "bench_load: %s\n", cellsam_last_error());
        return 1;
    }
    double t1 = cs_now_seconds();
    double sum = 0;
    size_t bytes = 0;
    for (size_t i = 0; i < cs_weights_count(w); i++) {
        const cs_tensor_entry *e = cs_weights_at(w, i);
        sum += tensor_sum(e);
        bytes += e->nbytes;
    }
    double t2 = cs_now_seconds();
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("%-11s %5zu tensors %8.1f MB  open %8.2f ms  touch %8.1f ms  total %8.1f ms  "
           "peak RSS %7.1f MiB  sum %.6g  %s\n",
           cs_weights_format(w), cs_weights_count(w), bytes / 1e6, (t1 - t0) * 1e3, (t2 - t1) * 1e3,
           (t2 - t0) * 1e3, ru.ru_maxrss / 1024.0, sum, path);
    fflush(stdout);
    cs_weights_free(w);
    return 0;
}

int main(int argc, char **argv) {
    int repeat = 1, first = 1;
    if (argc > 2 && strcmp(argv[1], "--repeat") == 0) {
        repeat = atoi(argv[2]);
        first = 3;
    }
    if (first >= argc || repeat < 1) {
        fprintf(stderr, "usage: bench_load [--repeat N] CKPT...\n");
        return 2;
    }
    int failed = 0;
    for (int r = 0; r < repeat; r++)
        for (int a = first; a < argc; a++) {
            fflush(stdout);
            pid_t pid = fork();
            if (pid == 0) _exit(load_once(argv[a]));
            int status = 0;
            if (pid < 0) failed |= load_once(argv[a]); /* no fork: RSS accumulates */
            else if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
                failed = 1;
        }
    return failed;
}
