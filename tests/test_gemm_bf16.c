/* bfloat16 matrix products (gemm_bf16.c): the rounding, the packed layout, the
 * portable kernel against a double-precision sum of the same rounded inputs, the
 * AVX512-BF16 kernel against the portable one (where the CPU has it), and the
 * deviation from float32 within the bound that bfloat16 rounding allows. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "cpu.h"
#include "gemm_bf16.h"
#include "ops.h"
#include "testutil.h"

static float f32_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static double bf16_value(uint16_t h) { return (double)f32_of((uint32_t)h << 16); }

static void test_rounding(void **state) {
    (void)state;
    assert_int_equal(cs_bf16_round(1.0f), 0x3f80);
    assert_int_equal(cs_bf16_round(-2.0f), 0xc000);
    /* ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 */
    assert_int_equal(cs_bf16_round(1.0f + 1.0f / 256), 0x3f80);
    assert_int_equal(cs_bf16_round(1.0f + 3.0f / 256), 0x3f82);
    assert_int_equal(cs_bf16_round(f32_of(0x3f80c000u)), 0x3f81); /* above the tie: up */
    assert_int_equal(cs_bf16_round(f32_of(0x7f7fffffu)), 0x7f80);  /* FLT_MAX rounds to inf */
    assert_int_equal(cs_bf16_round(INFINITY), 0x7f80);
    assert_int_equal(cs_bf16_round(-INFINITY), 0xff80);
    assert_int_equal(cs_bf16_round(f32_of(0x00000001u)), 0x0000); /* subnormals flush */
    assert_int_equal(cs_bf16_round(f32_of(0x807fffffu)), 0x8000);
    uint16_t nan = cs_bf16_round(NAN);
    assert_true((nan & 0x7f80) == 0x7f80 && (nan & 0x7f) != 0);
    uint16_t snan = cs_bf16_round(f32_of(0x7f800001u)); /* payload only in the low bits */
    assert_true((snan & 0x7f80) == 0x7f80 && (snan & 0x7f) != 0);
    /* relative error of normal values is at most 2^-8 (8 significant bits) */
    for (int i = 0; i < 10000; i++) {
        float x = (float)(sin(i * 0.7) * pow(10.0, (i % 21) - 10));
        if (x == 0) continue;
        assert_true(fabs(bf16_value(cs_bf16_round(x)) - x) <= fabs(x) / 256 * (1 + 1e-6));
    }
}

/* W[j][i] sits at panel j/32, pair i/2, column j%32, half i&1; padding is zero. */
static void test_pack_layout(void **state) {
    (void)state;
    const int n = 37, k = 5;
    float w[37 * 5];
    for (int i = 0; i < n * k; i++) w[i] = (float)(i + 1);
    cs_bf16_weights p;
    assert_int_equal(cs_bf16_weights_pack(&p, w, NULL, 0, n, k, 2), 0);
    assert_int_equal(p.n_panels, 2);
    assert_int_equal(p.k_pairs, 3);
    for (int j = 0; j < 64; j++)
        for (int i = 0; i < 6; i++) {
            uint16_t got = p.data[(((size_t)(j / 32) * 3 + i / 2) * 32 + j % 32) * 2 + (i & 1)];
            uint16_t want = j < n && i < k ? cs_bf16_round(w[j * k + i]) : 0;
            assert_int_equal(got, want);
        }
    /* the same matrix from 16-bit storage packs identically */
    uint16_t h[37 * 5];
    for (int i = 0; i < n * k; i++) h[i] = cs_bf16_round(w[i]);
    cs_bf16_weights q;
    assert_int_equal(cs_bf16_weights_pack(&q, NULL, h, CELLSAM_DTYPE_BF16, n, k, 1), 0);
    assert_memory_equal(p.data, q.data, (size_t)2 * 3 * 64 * sizeof(uint16_t));
    cs_bf16_weights_free(&p);
    cs_bf16_weights_free(&q);
    assert_null(q.data);
    assert_int_not_equal(cs_bf16_weights_pack(&q, w, NULL, 0, 0, k, 1), 0);
}

/* Packing a strided view (attention's keys, and its values transposed) gives what
 * packing the explicit matrix gives. */
static void test_pack_strided(void **state) {
    (void)state;
    const int rows = 37, cols = 23, ld = 29; /* a rows x cols block inside rows x ld storage */
    float src[37 * 29];
    for (int i = 0; i < rows * ld; i++) src[i] = (float)sin(i * 1.7) * 3;
    float plain[37 * 23], trans[23 * 37], every2[37 * 12];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            plain[r * cols + c] = src[r * ld + c];
            trans[c * rows + r] = src[r * ld + c];
            if (c % 2 == 0) every2[r * 12 + c / 2] = src[r * ld + c];
        }
    const struct { int n, k; const float *explicit_w; size_t rs, cs; } v[3] = {
        {rows, cols, plain, (size_t)ld, 1},  /* W = the block */
        {cols, rows, trans, 1, (size_t)ld},  /* W = its transpose */
        {rows, 12, every2, (size_t)ld, 2}};  /* a general stride: every other column */
    for (int i = 0; i < 3; i++) {
        cs_bf16_weights a, b;
        assert_int_equal(cs_bf16_weights_pack(&a, v[i].explicit_w, NULL, 0, v[i].n, v[i].k, 1), 0);
        size_t count = cs_bf16_packed_count(v[i].n, v[i].k);
        uint16_t *buf = malloc(count * sizeof(uint16_t));
        memset(buf, 0xff, count * sizeof(uint16_t)); /* padding must be written, not left */
        cs_bf16_pack_strided(&b, buf, src, v[i].rs, v[i].cs, v[i].n, v[i].k);
        assert_int_equal(a.n_panels, b.n_panels);
        assert_int_equal(a.k_pairs, b.k_pairs);
        assert_memory_equal(a.data, b.data, count * sizeof(uint16_t));
        cs_bf16_weights_free(&a);
        free(buf);
    }
}

typedef int (*linear_fn)(const float *, int, int, const cs_bf16_weights *, const float *, int, float *, int,
                         int);

/* One shape: X (M x K, stride K + 3), W (N x K), Y (M x N, stride N + 5) starting
 * from Y0 when accumulating. Checks fn against the double sum of the rounded inputs
 * (float32 summation error only) and against float32 (bfloat16 rounding bound).
 * Returns the largest difference to `other` (computed with the other kernel) or 0. */
static double check_shape(linear_fn fn, int M, int N, int K, int accumulate, int with_bias, const float *other_y,
                          float **y_out) {
    const int ldx = K + 3, ldy = N + 5;
    float *X = malloc((size_t)M * ldx * sizeof(float)), *W = malloc((size_t)N * K * sizeof(float));
    float *bias = malloc((size_t)N * sizeof(float)), *Y = malloc((size_t)M * ldy * sizeof(float));
    for (int i = 0; i < M * ldx; i++) X[i] = (float)sin(i * 0.37 + K);
    for (int i = 0; i < N * K; i++) W[i] = (float)(cos(i * 0.71 + N) * 0.1);
    for (int j = 0; j < N; j++) bias[j] = (float)(j % 7) * 0.25f - 0.5f;
    for (int i = 0; i < M * ldy; i++) Y[i] = (float)((i % 13) - 6) * 0.5f;
    float *Y0 = malloc((size_t)M * ldy * sizeof(float));
    memcpy(Y0, Y, (size_t)M * ldy * sizeof(float));
    cs_bf16_weights P;
    assert_int_equal(cs_bf16_weights_pack(&P, W, NULL, 0, N, K, 2), 0);
    assert_int_equal(fn(X, M, ldx, &P, with_bias ? bias : NULL, accumulate, Y, ldy, 2), 0);
    /* float32 through the BLAS, for the deviation bound */
    float *F = malloc((size_t)M * N * sizeof(float));
    float *Xc = malloc((size_t)M * K * sizeof(float));
    for (int m = 0; m < M; m++) memcpy(Xc + (size_t)m * K, X + (size_t)m * ldx, (size_t)K * sizeof(float));
    cs_linear(Xc, M, K, W, with_bias ? bias : NULL, N, F, 1);
    double diff_other = 0;
    for (int m = 0; m < M; m++)
        for (int j = 0; j < N; j++) {
            double exact = 0, mag = 0, mag32 = 0;
            for (int i = 0; i < K; i++) {
                double x = bf16_value(cs_bf16_round(X[(size_t)m * ldx + i]));
                double w = bf16_value(cs_bf16_round(W[(size_t)j * K + i]));
                exact += x * w;
                mag += fabs(x * w);
                mag32 += fabs((double)X[(size_t)m * ldx + i] * W[(size_t)j * K + i]);
            }
            double base = (accumulate ? Y0[(size_t)m * ldy + j] : 0) + (with_bias ? bias[j] : 0);
            double got = Y[(size_t)m * ldy + j];
            /* float32 sums of K products plus two additions */
            double parts = mag + (accumulate ? fabs(Y0[(size_t)m * ldy + j]) : 0) + (with_bias ? fabs(bias[j]) : 0);
            double bound = (K + 2) * 6e-8 * parts + 1e-30;
            if (fabs(got - (exact + base)) > bound)
                fail_msg("M %d N %d K %d: y[%d][%d] = %.9g, exact sum of rounded inputs %.9g (bound %.3g)", M, N, K,
                         m, j, got, exact + base, bound);
            /* against float32: each product is off by at most about 2 * 2^-8 relative */
            double f32 = F[(size_t)m * N + j] + (accumulate ? Y0[(size_t)m * ldy + j] : 0);
            assert_true(fabs(got - f32) <= mag32 * 2.01 / 256 + bound + 1e-5 * fabs(f32));
            if (other_y) {
                double d = fabs(got - other_y[(size_t)m * ldy + j]);
                diff_other = d > diff_other ? d : diff_other;
            }
        }
    /* padding columns of Y are untouched */
    for (int m = 0; m < M; m++)
        for (int j = N; j < ldy; j++) assert_true(Y[(size_t)m * ldy + j] == Y0[(size_t)m * ldy + j]);
    cs_bf16_weights_free(&P);
    free(X);
    free(W);
    free(bias);
    free(Y0);
    free(F);
    free(Xc);
    if (y_out) *y_out = Y;
    else free(Y);
    return diff_other;
}

static const int shapes[][3] = {{1, 1, 1},    {13, 17, 3},  {15, 32, 2},   {29, 45, 71},
                                {113, 70, 300}, {14, 33, 257}, {200, 96, 64}, {3, 130, 515}};

static void test_portable_kernel(void **state) {
    (void)state;
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (int v = 0; v < 3; v++)
            check_shape(cs_bf16_linear_portable, shapes[s][0], shapes[s][1], shapes[s][2], v == 1, v != 0, NULL,
                        NULL);
}

/* The AVX512-BF16 kernel gives the portable kernel's sums: same rounding, same
 * order (measured bit-identical on AMD Zen 5; allowed 1 ulp-ish of slack). */
static void test_native_kernel(void **state) {
    (void)state;
    if (!cs_cpu_has_avx512bf16()) {
        printf("  this CPU has no AVX512-BF16: cs_bf16_linear runs the portable kernel (tested above)\n");
        skip();
    }
    double worst = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (int v = 0; v < 3; v++) {
            float *yp;
            check_shape(cs_bf16_linear_portable, shapes[s][0], shapes[s][1], shapes[s][2], v == 1, v != 0, NULL,
                        &yp);
            double d = check_shape(cs_bf16_linear, shapes[s][0], shapes[s][1], shapes[s][2], v == 1, v != 0, yp,
                                   NULL);
            worst = d > worst ? d : worst;
            free(yp);
        }
    printf("  AVX512-BF16 vs portable kernel: largest difference %.3g\n", worst);
    assert_true(worst <= 1e-5);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rounding),
        cmocka_unit_test(test_pack_layout),
        cmocka_unit_test(test_pack_strided),
        cmocka_unit_test(test_portable_kernel),
        cmocka_unit_test(test_native_kernel),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
