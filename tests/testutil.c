#define _XOPEN_SOURCE 700 /* nftw */
#include <ftw.h>
#include <math.h>
#include <sys/wait.h>
#include "cellsam.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

const char *tu_testdata(void) {
    const char *e = getenv("CELLSAM_TESTDATA");
    return e && *e ? e : CELLSAM_TESTDATA_DEFAULT;
}

const char *tu_datadir(void) {
    const char *e = getenv("CELLSAM_DATA");
    return e && *e ? e : CELLSAM_DATA_DEFAULT;
}

const char *tu_path(const char *fmt, ...) {
    static char bufs[8][1024];
    static int slot;
    char rel[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rel, sizeof rel, fmt, ap);
    va_end(ap);
    char *b = bufs[slot++ & 7];
    snprintf(b, 1024, "%s/%s", tu_testdata(), rel);
    return b;
}

void tu_load(cs_npy *out, const char *fmt, ...) {
    char rel[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rel, sizeof rel, fmt, ap);
    va_end(ap);
    const char *p = tu_path("%s", rel);
    if (cs_npy_load(p, out) != 0) fail_msg("cannot load reference %s", p);
}

float tu_urand(uint64_t *state, float lo, float hi) {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return lo + (hi - lo) * (float)((*state >> 40) * (1.0 / 16777216.0));
}

float *tu_rand_buf(uint64_t *state, size_t n, float lo, float hi) {
    float *p = malloc((n ? n : 1) * sizeof(float));
    assert_non_null(p);
    for (size_t i = 0; i < n; i++) p[i] = tu_urand(state, lo, hi);
    return p;
}

double tu_check_close(const char *what, const float *got, const float *ref, size_t n, double atol) {
    double maxerr = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]);
        if (isnan(got[i]) != isnan(ref[i])) d = INFINITY;
        if (!(d <= maxerr)) {
            maxerr = d;
            at = i;
        }
    }
    printf("  %-48s n=%-9zu max_abs_err=%.3g (tol %.1g)\n", what, n, maxerr, atol);
    if (!(maxerr <= atol))
        fail_msg("%s: max abs error %.6g at index %zu (got %.8g, want %.8g) exceeds %.3g", what,
                 maxerr, at, (double)got[at], (double)ref[at], atol);
    return maxerr;
}

double tu_check_npy(const char *what, const float *got, size_t n, const cs_npy *ref, double atol) {
    if (ref->count != n) fail_msg("%s: reference has %zu elements, result %zu", what, ref->count, n);
    float *r = cs_npy_to_f32(ref);
    assert_non_null(r);
    double e = tu_check_close(what, got, r, n, atol);
    free(r);
    return e;
}

const char *tu_cli(void) { return CELLSAM_CLI_PATH; }

static char tmp_dir[256];

static int remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)st;
    (void)type;
    (void)ftw;
    return remove(path) ? -1 : 0;
}

/* The scratch folder goes when the test program ends (CELLSAM_KEEP_TEST_TMP=1 keeps it
 * for a look at a failure). */
static void remove_tmpdir(void) {
    const char *keep = getenv("CELLSAM_KEEP_TEST_TMP");
    if (tmp_dir[0] && !(keep && *keep && strcmp(keep, "0")))
        nftw(tmp_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

const char *tu_tmpdir(void) {
    if (!tmp_dir[0]) {
        snprintf(tmp_dir, sizeof tmp_dir, "%s/cellsam-test-XXXXXX", getenv("TMPDIR") && *getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
        if (!mkdtemp(tmp_dir)) fail_msg("mkdtemp failed");
        atexit(remove_tmpdir);
    }
    return tmp_dir;
}

int tu_run(char *out, size_t cap, const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    strncat(cmd, " 2>&1", sizeof cmd - strlen(cmd) - 1);
    FILE *p = popen(cmd, "r");
    if (!p) fail_msg("popen failed: %s", cmd);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    if (!WIFEXITED(st)) fail_msg("command died from a signal: %s\n%s", cmd, out);
    return WEXITSTATUS(st);
}

int tu_load_reference_model(const char *ckpt_name, struct cellsam_model **model, struct cellsam_context **ctx) {
    cellsam_model_params p = cellsam_model_default_params();
    char cfg[1024];
    snprintf(cfg, sizeof cfg, "%s/config.json", tu_testdata());
    p.config_path = cfg;
    if (cellsam_model_load(tu_path("%s", ckpt_name), &p, model) != 0) {
        fprintf(stderr, "load failed: %s\n", cellsam_last_error());
        return -1;
    }
    return cellsam_context_new(*model, ctx) == 0 ? 0 : -1;
}

const char *tu_tmp(const char *fmt, ...) {
    static char bufs[8][1024];
    static int slot;
    char name[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    char *b = bufs[slot++ & 7];
    snprintf(b, sizeof bufs[0], "%s/%s", tu_tmpdir(), name);
    return b;
}
