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

int cli_parse_precision(const char *cmd, const char *s) {
    if (!strcmp(s, "f32")) return CELLSAM_DTYPE_F32;
    if (!strcmp(s, "int8")) return CELLSAM_DTYPE_INT8;
    if (strcmp(s, "bf16")) {
        cli_error(cmd, "--precision must be f32, bf16 or int8, not '%s'", s);
        return -1;
    }
    if (!cellsam_has_native_bf16())
        fprintf(stderr, "cellsam %s: note: this CPU has no AVX512-BF16; --precision bf16 is emulated (same "
                        "results, slower than f32)\n", cmd);
    return CELLSAM_DTYPE_BF16;
}

/* The bundled default model: beside the executable (installed layouts), then the
 * source tree the CLI was built from. */
const char *cli_default_model(void) {
    const char *env = getenv("CELLSAM_MODEL");
    if (env && *env) return env;
    static char path[8192];
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = 0;
            const char *rel[] = {"/models/", "/../models/", "/../share/cellsam/"};
            for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
                int len = snprintf(path, sizeof path, "%s%s%s", exe, rel[i], CELLSAM_DEFAULT_MODEL_NAME);
                if (len < 0 || (size_t)len >= sizeof path) continue;
                if (access(path, R_OK) == 0) return path;
            }
        }
    }
    snprintf(path, sizeof path, "%s/%s", CELLSAM_MODEL_DIR, CELLSAM_DEFAULT_MODEL_NAME);
    if (access(path, R_OK) == 0) return path;
    return NULL;
}
