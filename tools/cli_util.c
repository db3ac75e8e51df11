#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <string.h>

#include "cellsam.h"
#include "cli.h"

void cli_error(const char *cmd, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "cellsam %s: error: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

int cli_parse_int(const char *s, int lo, int hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

int cli_parse_floats(const char *s, float *out, int n) {
    const char *p = s;
    for (int i = 0; i < n; i++) {
        char *end;
        errno = 0;
        float v = strtof(p, &end);
        if (errno || end == p || v != v) return -1;
        out[i] = v;
        p = end;
        if (i + 1 < n) {
            if (*p != ',') return -1;
            p++;
        }
    }
    return *p ? -1 : 0;
}

int cli_default_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 64 ? 64 : (int)n);
}

int cli_parse_weights(const char *s) {
    if (!strcmp(s, "f32")) return CELLSAM_DTYPE_F32;
    if (!strcmp(s, "f16")) return CELLSAM_DTYPE_F16;
    if (!strcmp(s, "bf16")) return CELLSAM_DTYPE_BF16;
    return -1;
}
