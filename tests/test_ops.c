/* Inference tensor ops (ops.c) against double-precision reference loops: the linear
 * layer on few rows (its own kernel, up to 16 rows) and on more (through the BLAS),
 * the triangular product the factored decoder uses for its Gram matrix, and the
 * vectorised exponential; and the all-or-none buffer sets (util.c) of the decoder. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ops.h"
#include "testutil.h"

static uint64_t rng_state = 0x2545f4914f6cdd1dULL;

static float *rand_buf(size_t n) { return tu_rand_buf(&rng_state, n, -1.0f, 1.0f); }

/* Largest |got - ref| / (1 + |ref|). */
static double max_rel_err(const float *got, const double *ref, size_t n) {
    double e = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)got[i] - ref[i]) / (1.0 + fabs(ref[i]));
        if (!(d <= e)) e = d;
    }
    return e;
}

/* Y = X W^T + b for row counts on both sides of the few-rows kernel's limit (16), inner
 * sizes with and without a remainder after 8, with and without bias; the GEMM flop
 * counter counts the few-rows kernel too. */
static void test_linear_rows(void **state) {
    (void)state;
    const int Ms[] = {1, 3, 7, 8, 9, 16, 17, 40}, Ks[] = {1, 7, 19, 256}, Ns[] = {1, 5, 64};
    for (size_t mi = 0; mi < sizeof Ms / sizeof *Ms; mi++)
        for (size_t ki = 0; ki < sizeof Ks / sizeof *Ks; ki++)
            for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++)
                for (int with_bias = 0; with_bias < 2; with_bias++) {
                    const int M = Ms[mi], K = Ks[ki], N = Ns[ni];
                    float *X = rand_buf((size_t)M * K), *W = rand_buf((size_t)N * K), *b = rand_buf((size_t)N);
                    float *Y = malloc((size_t)M * N * sizeof(float));
                    double *ref = malloc((size_t)M * N * sizeof(double));
                    assert_non_null(Y);
                    assert_non_null(ref);
                    for (int m = 0; m < M; m++)
                        for (int n = 0; n < N; n++) {
                            double s = with_bias ? b[n] : 0.0;
                            for (int k = 0; k < K; k++) s += (double)X[(size_t)m * K + k] * W[(size_t)n * K + k];
                            ref[(size_t)m * N + n] = s;
                        }
                    const uint64_t f0 = cs_gemm_flops();
                    cs_linear(X, M, K, W, with_bias ? b : NULL, N, Y, 2);
                    assert_true(cs_gemm_flops() - f0 == 2ull * (uint64_t)M * N * K);
                    const double e = max_rel_err(Y, ref, (size_t)M * N);
                    if (!(e <= 1e-5))
                        fail_msg("linear %d x %d x %d%s: relative error %g", M, K, N, with_bias ? " + bias" : "", e);
                    free(X), free(W), free(b), free(Y), free(ref);
                }
    printf("  cs_linear: %zu shapes, each within 1e-5 of the double loop\n",
           2 * (sizeof Ms / sizeof *Ms) * (sizeof Ks / sizeof *Ks) * (sizeof Ns / sizeof *Ns));
}

/* B = upper(A) B: the upper triangle with the diagonal, nothing from below it. */
static void test_trmm_upper(void **state) {
    (void)state;
    const int M = 37, N = 129;
    float *A = rand_buf((size_t)M * M), *B = rand_buf((size_t)M * N);
    double *ref = malloc((size_t)M * N * sizeof(double));
    assert_non_null(ref);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0;
            for (int k = i; k < M; k++) s += (double)A[(size_t)i * M + k] * B[(size_t)k * N + j];
            ref[(size_t)i * N + j] = s;
        }
    cs_trmm_upper(M, N, A, M, B, N);
    const double e = max_rel_err(B, ref, (size_t)M * N);
    printf("  cs_trmm_upper %d x %d: relative error %.2g\n", M, N, e);
    assert_true(e <= 1e-5);
    free(A), free(B), free(ref);
}

/* exp on [-87.3, 0] against libm in double: about 1 ulp. */
static void test_exp_nonpos(void **state) {
    (void)state;
    const size_t n = 100003; /* not a multiple of 8: the scalar tail runs too */
    float *x = malloc(n * sizeof(float));
    double *ref = malloc(n * sizeof(double));
    assert_non_null(x);
    assert_non_null(ref);
    for (size_t i = 0; i < n; i++) {
        x[i] = -87.0f * (float)i / (float)(n - 1);
        ref[i] = exp((double)x[i]);
    }
    cs_exp_nonpos(x, n);
    double e = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs(x[i] - ref[i]) / ref[i];
        if (!(d <= e)) e = d;
    }
    printf("  cs_exp_nonpos: max relative error %.2g\n", e);
    assert_true(e <= 4e-7);
    free(x), free(ref);
}

/* A buffer set is allocated all or none: when one allocation fails, none is left. */
static void test_alloc_floats(void **state) {
    (void)state;
    float *a = (float *)1, *b = (float *)1, *c = (float *)1;
    float **bufs[] = {&a, &b, &c};
    const size_t ok[] = {10, 20, 30}, too_big[] = {10, SIZE_MAX / 2, 30};
    assert_int_equal(cs_alloc_floats(bufs, too_big, 3), CELLSAM_ERR_NOMEM);
    assert_null(a);
    assert_null(b);
    assert_null(c);
    assert_int_equal(cs_alloc_floats(bufs, ok, 3), CELLSAM_OK);
    assert_non_null(a);
    assert_non_null(c);
    c[29] = a[9] = b[19] = 1.0f; /* the sizes asked for (ASan checks the bounds) */
    cs_free_floats(bufs, 3);
    assert_null(a);
    assert_null(b);
    assert_null(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_linear_rows),
        cmocka_unit_test(test_trmm_upper),
        cmocka_unit_test(test_exp_nonpos),
        cmocka_unit_test(test_alloc_floats),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
