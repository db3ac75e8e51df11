/* 8-bit integer matrix products (gemm_int8.c): the weight quantisation and packed
 * layout, the portable kernel against sums computed here from independently
 * quantised inputs, the AVX2 and AVX512-VNNI kernels against the portable one
 * (bit-identical: the integer sums are exact), the extreme values that would
 * saturate VPMADDUBSW with 8-bit weights, the deviation from float32 within the
 * bound the quantisation steps allow, and the error paths. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "cpu.h"
#include "gemm_int8.h"
#include "testutil.h"
#include "weights.h"

static uint64_t g_seed = 88172645463325252ull;
static float frand(void) { /* xorshift, uniform in [-1, 1) */
    g_seed ^= g_seed << 13;
    g_seed ^= g_seed >> 7;
    g_seed ^= g_seed << 17;
    return (float)((g_seed >> 11) * (1.0 / 9007199254740992.0) * 2 - 1);
}

static float *random_matrix(int rows, int cols, float amp) {
    float *m = malloc((size_t)rows * cols * sizeof *m);
    assert_non_null(m);
    for (int i = 0; i < rows * cols; i++) m[i] = amp * frand();
    return m;
}

/* q of W[j][i] from the packed layout: panel j/16, quad i/4, column j%16, byte i%4. */
static int packed_q(const cs_int8_weights *p, int j, int i) {
    return p->data[(((size_t)(j / 16) * p->k_quads + i / 4) * 16 + j % 16) * 4 + i % 4];
}

static void test_pack(void **state) {
    (void)state;
    const int n = 37, k = 7;
    float *w = random_matrix(n, k, 3.0f);
    for (int i = 0; i < k; i++) w[5 * k + i] = 0; /* an all-zero column */
    cs_int8_weights p;
    assert_int_equal(cs_int8_weights_pack(&p, w, NULL, 0, n, k, 2), 0);
    assert_int_equal(p.n_panels, 3);
    assert_int_equal(p.k_quads, 2);
    for (int j = 0; j < 48; j++) {
        float mx = 0;
        for (int i = 0; j < n && i < k; i++) mx = fabsf(w[j * k + i]) > mx ? fabsf(w[j * k + i]) : mx;
        assert_float_equal(p.scale[j], mx / 63, 1e-7);
        int sum = 0, peak = 0;
        for (int i = 0; i < 8; i++) {
            const int q = packed_q(&p, j, i);
            if (j >= n || i >= k) {
                assert_int_equal(q, 0); /* padding */
                continue;
            }
            assert_true(q >= -63 && q <= 63);
            assert_int_equal(q, (int)lrintf(w[j * k + i] * (mx > 0 ? 63 / mx : 0)));
            peak = abs(q) > peak ? abs(q) : peak;
            sum += q;
        }
        assert_int_equal(p.colsum[j], sum);
        assert_int_equal(peak, j < n && j != 5 ? 63 : 0); /* the largest weight uses the full range */
    }
    cs_int8_weights_free(&p);
    free(w);
}

/* The product as the header defines it, from inputs quantised here. */
static void reference(const float *X, int M, int ldx, const cs_int8_weights *W, const float *bias, int accumulate,
                      double *Y, int ldy) {
    const int K = W->k;
    for (int m = 0; m < M; m++) {
        const float *x = X + (size_t)m * ldx;
        float mx = 0;
        for (int i = 0; i < K; i++) mx = fabsf(x[i]) > mx ? fabsf(x[i]) : mx;
        for (int j = 0; j < W->n; j++) {
            long long s = 0;
            for (int i = 0; i < K; i++) s += (long long)lrintf(x[i] * (127 / mx)) * packed_q(W, j, i);
            const double v = (double)(mx / 127) * W->scale[j] * (double)s + (bias ? bias[j] : 0);
            Y[(size_t)m * ldy + j] = (accumulate ? Y[(size_t)m * ldy + j] : 0) + v;
        }
    }
}

static void check_kernel(int kernel, int M, int N, int K, int accumulate, int threads) {
    const int ldx = K + 3, ldy = N + 5;
    float *X = random_matrix(M, ldx, 2.0f), *Wf = random_matrix(N, K, 0.5f), *bias = random_matrix(1, N, 1.0f);
    float *Y = random_matrix(M, ldy, 1.0f);
    double *R = malloc((size_t)M * ldy * sizeof *R);
    assert_non_null(R);
    for (int i = 0; i < M * ldy; i++) R[i] = Y[i];
    cs_int8_weights W;
    assert_int_equal(cs_int8_weights_pack(&W, Wf, NULL, 0, N, K, threads), 0);
    assert_int_equal(cs_int8_linear_with(kernel, X, M, ldx, &W, bias, accumulate, Y, ldy, threads), 0);
    reference(X, M, ldx, &W, bias, accumulate, R, ldy);
    double worst = 0;
    for (int m = 0; m < M; m++)
        for (int j = 0; j < ldy; j++) {
            const size_t i = (size_t)m * ldy + j;
            if (j >= N) { /* the padding between rows is untouched */
                assert_true(Y[i] == (float)R[i]);
                continue;
            }
            const double e = fabs(Y[i] - R[i]) / (fabs(R[i]) + 1e-3);
            worst = e > worst ? e : worst;
        }
    printf("  %s kernel, %d x %d x %d%s, %d thread(s): worst relative error against the exact sum %.2e\n",
           cs_int8_kernel_name(kernel), M, N, K, accumulate ? " (accumulate)" : "", threads, worst);
    assert_true(worst < 1e-5); /* only the final float scaling rounds */
    cs_int8_weights_free(&W);
    free(X);
    free(Wf);
    free(bias);
    free(Y);
    free(R);
}

/* Packing strided rows into a caller's buffer (attention keys) gives the layout,
 * scales and products of the allocating pack of the same rows; a non-finite row is
 * refused. */
static void test_pack_strided(void **state) {
    (void)state;
    const int n = 45, k = 64, ld = 3 * k, M = 19;
    float *src = random_matrix(n, ld, 2.0f), *dense = malloc((size_t)n * k * sizeof(float));
    float *X = random_matrix(M, k, 1.0f), row[64];
    float *y1 = malloc((size_t)M * n * sizeof(float)), *y2 = malloc((size_t)M * n * sizeof(float));
    for (int j = 0; j < n; j++) memcpy(dense + (size_t)j * k, src + (size_t)j * ld + k, (size_t)k * sizeof(float));
    cs_int8_weights a, b;
    assert_int_equal(cs_int8_weights_pack(&a, dense, NULL, 0, n, k, 1), CELLSAM_OK);
    const size_t bytes = cs_int8_packed_bytes(n, k);
    assert_true(bytes >= (size_t)a.n_panels * 16 * (a.k_quads * 4 + 8));
    float *buf = malloc(bytes);
    assert_int_equal(cs_int8_pack_strided(&b, buf, src + k, (size_t)ld, n, k, row), CELLSAM_OK);
    assert_int_equal(b.n_panels, a.n_panels);
    assert_memory_equal(b.data, a.data, (size_t)a.n_panels * 16 * a.k_quads * 4);
    assert_memory_equal(b.scale, a.scale, (size_t)a.n_panels * 16 * sizeof(float));
    assert_memory_equal(b.colsum, a.colsum, (size_t)a.n_panels * 16 * sizeof(int32_t));
    assert_int_equal(cs_int8_linear(X, M, k, &a, NULL, 0, y1, n, 1), CELLSAM_OK);
    assert_int_equal(cs_int8_linear(X, M, k, &b, NULL, 0, y2, n, 1), CELLSAM_OK);
    assert_memory_equal(y1, y2, (size_t)M * n * sizeof(float));
    src[(size_t)7 * ld + k + 3] = NAN;
    assert_int_equal(cs_int8_pack_strided(&b, buf, src + k, (size_t)ld, n, k, row), CELLSAM_ERR_INVALID);
    cs_int8_weights_free(&a);
    free(buf);
    free(src);
    free(dense);
    free(X);
    free(y1);
    free(y2);
}

static void test_portable_kernel(void **state) {
    (void)state;
    check_kernel(1, 37, 45, 70, 0, 1);
    check_kernel(1, 101, 33, 9, 1, 2);
}

/* The SIMD kernels give the portable kernel's floats bit for bit. */
static void same_as_portable(int kernel, int M, int N, int K, const float *X, const float *Wf) {
    cs_int8_weights W;
    assert_int_equal(cs_int8_weights_pack(&W, Wf, NULL, 0, N, K, 2), 0);
    float *a = calloc((size_t)M * N, sizeof *a), *b = calloc((size_t)M * N, sizeof *b);
    assert_true(a && b);
    assert_int_equal(cs_int8_linear_with(1, X, M, K, &W, NULL, 0, a, N, 2), 0);
    assert_int_equal(cs_int8_linear_with(kernel, X, M, K, &W, NULL, 0, b, N, 2), 0);
    assert_memory_equal(a, b, (size_t)M * N * sizeof *a);
    cs_int8_weights_free(&W);
    free(a);
    free(b);
}

static void test_simd_kernels(void **state) {
    (void)state;
    const int M = 250, N = 100, K = 301;
    float *X = random_matrix(M, K, 4.0f), *Wf = random_matrix(N, K, 0.1f);
    /* extremes: every activation at its row's maximum and every weight at its column's,
     * all one sign: each VPMADDUBSW pair reaches 2 x 255 x 63, the most it can hold */
    float *Xe = malloc((size_t)M * K * sizeof *Xe), *We = malloc((size_t)N * K * sizeof *We);
    assert_true(Xe && We);
    for (int i = 0; i < M * K; i++) Xe[i] = 1.0f;
    for (int i = 0; i < N * K; i++) We[i] = i / K % 2 ? 1.0f : -1.0f;
    for (int kernel = 2; kernel <= 3; kernel++) {
        if ((kernel == 2 && !cs_cpu_has_avx2()) || (kernel == 3 && !cs_cpu_has_avx512vnni())) {
            printf("  %s: not on this CPU\n", cs_int8_kernel_name(kernel));
            float y;
            assert_int_equal(cs_int8_linear_with(kernel, X, 1, K, NULL, NULL, 0, &y, 1, 1), CELLSAM_ERR_INVALID);
            continue;
        }
        check_kernel(kernel, 37, 45, 70, 1, 1);
        same_as_portable(kernel, M, N, K, X, Wf);
        same_as_portable(kernel, M, N, K, Xe, We);
        printf("  %s kernel: bit-identical to the portable one, random and extreme inputs\n",
               cs_int8_kernel_name(kernel));
    }
    /* the extreme product is exact: +-K * 1 * 1 */
    cs_int8_weights W;
    assert_int_equal(cs_int8_weights_pack(&W, We, NULL, 0, N, K, 1), 0);
    float *y = malloc((size_t)M * N * sizeof *y);
    assert_non_null(y);
    assert_int_equal(cs_int8_linear(Xe, M, K, &W, NULL, 0, y, N, 2), 0);
    for (int i = 0; i < M * N; i++) {
        const float want = (i % N) % 2 ? (float)K : (float)-K;
        assert_true(fabsf(y[i] - want) <= 1e-3f * K);
    }
    cs_int8_weights_free(&W);
    free(y);
    free(X);
    free(Wf);
    free(Xe);
    free(We);
}

/* Against float32: each term's error is bounded by the two rounding steps,
 * |x| dw / 2 + |w| dx / 2 + dx dw / 4, and the whole deviation is measured. */
static void test_deviation_from_f32(void **state) {
    (void)state;
    const int M = 64, N = 96, K = 768;
    float *X = random_matrix(M, K, 1.0f), *Wf = random_matrix(N, K, 0.05f);
    for (int m = 0; m < M; m++) X[(size_t)m * K + m] *= 8; /* an outlier channel per token */
    cs_int8_weights W;
    assert_int_equal(cs_int8_weights_pack(&W, Wf, NULL, 0, N, K, 1), 0);
    float *y = malloc((size_t)M * N * sizeof *y);
    assert_non_null(y);
    assert_int_equal(cs_int8_linear(X, M, K, &W, NULL, 0, y, N, 1), 0);
    double num = 0, den = 0, worst_ratio = 0;
    for (int m = 0; m < M; m++) {
        float mx = 0;
        for (int i = 0; i < K; i++) mx = fabsf(X[(size_t)m * K + i]) > mx ? fabsf(X[(size_t)m * K + i]) : mx;
        const double dx = mx / 127.0;
        for (int j = 0; j < N; j++) {
            const double dw = W.scale[j];
            double exact = 0, bound = 0;
            for (int i = 0; i < K; i++) {
                const double x = X[(size_t)m * K + i], w = Wf[(size_t)j * K + i];
                exact += x * w;
                bound += fabs(x) * dw / 2 + fabs(w) * dx / 2 + dx * dw / 4;
            }
            const double e = fabs(y[m * N + j] - exact);
            assert_true(e <= bound * (1 + 1e-4) + 1e-6);
            worst_ratio = e / bound > worst_ratio ? e / bound : worst_ratio;
            num += e * e;
            den += exact * exact;
        }
    }
    printf("  %d x %d x %d: relative rms deviation from float32 %.2e; worst error %.2f of its bound\n", M, N, K,
           sqrt(num / den), worst_ratio);
    assert_true(sqrt(num / den) < 0.03);
    cs_int8_weights_free(&W);
    free(X);
    free(Wf);
    free(y);
}

static void test_errors(void **state) {
    (void)state;
    cs_int8_weights W;
    float w[4] = {1, 2, NAN, 4};
    assert_int_equal(cs_int8_weights_pack(&W, w, NULL, 0, 2, 2, 1), CELLSAM_ERR_INVALID);
    assert_non_null(strstr(cellsam_last_error(), "not finite"));
    assert_null(W.data);
    assert_int_equal(cs_int8_weights_pack(&W, w, NULL, 0, 1, 1 << 17, 1), CELLSAM_ERR_LIMIT);
    assert_int_equal(cs_int8_weights_pack(&W, NULL, NULL, 0, 2, 2, 1), CELLSAM_ERR_INVALID);
    float y;
    assert_int_equal(cs_int8_linear_with(9, w, 1, 2, NULL, NULL, 0, &y, 1, 1), CELLSAM_ERR_INVALID);
    /* f16 storage packs as its float32 values do */
    const uint16_t h[4] = {0x3c00, 0xc000, 0x3800, 0x0000}; /* 1, -2, 0.5, 0 */
    const float f[4] = {1, -2, 0.5f, 0};
    cs_int8_weights a, b;
    assert_int_equal(cs_int8_weights_pack(&a, NULL, h, CS_DTYPE_F16, 2, 2, 1), 0);
    assert_int_equal(cs_int8_weights_pack(&b, f, NULL, 0, 2, 2, 1), 0);
    assert_memory_equal(a.data, b.data, 16 * 4);
    assert_memory_equal(a.scale, b.scale, 16 * sizeof(float));
    cs_int8_weights_free(&a);
    cs_int8_weights_free(&b);
}

int main(void) {
    printf("int8 kernel in use: %s\n", cs_int8_kernel_name(cs_int8_best_kernel()));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pack),           cmocka_unit_test(test_portable_kernel),
        cmocka_unit_test(test_simd_kernels),   cmocka_unit_test(test_deviation_from_f32),
        cmocka_unit_test(test_errors),         cmocka_unit_test(test_pack_strided),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
