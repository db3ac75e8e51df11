/* Basic tensor operations (see ops.h). */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "common.h"
#include "ops.h"

void cs_gemm(int M, int N, int K, const float *A, int lda, const float *B, int ldb, int trans_b,
             float beta, float *C, int ldc, int n_threads) {
    if (M <= 0 || N <= 0) return;
    if (n_threads < 1) n_threads = 1;
    /* OpenBLAS (OpenMP build) takes its thread count from the calling thread's
     * OpenMP ICV, so setting it here makes n_threads a per-call, per-thread setting;
     * inside one of our own parallel regions OpenBLAS runs single-threaded. */
    double flops = 2.0 * M * (double)N * K;
    omp_set_num_threads(flops < 4e6 ? 1 : n_threads);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K, 1.0f, A, lda, B,
                ldb, beta, C, ldc);
}

void cs_linear(const float *X, int M, int K, const float *W, const float *bias, int N, float *Y,
               int n_threads) {
    if (bias) {
        for (int m = 0; m < M; m++) memcpy(Y + (size_t)m * N, bias, (size_t)N * sizeof(float));
        cs_gemm(M, N, K, X, K, W, K, 1, 1.0f, Y, N, n_threads);
    } else {
        cs_gemm(M, N, K, X, K, W, K, 1, 0.0f, Y, N, n_threads);
    }
}

void cs_layernorm(const float *in, float *out, int rows, int dim, const float *gamma,
                  const float *beta, float eps, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (rows > 256)
    for (int r = 0; r < rows; r++) {
        const float *x = in + (size_t)r * dim;
        float *y = out + (size_t)r * dim;
        float mean = 0.f;
        for (int i = 0; i < dim; i++) mean += x[i];
        mean /= (float)dim;
        float var = 0.f;
        for (int i = 0; i < dim; i++) {
            float d = x[i] - mean;
            var += d * d;
        }
        var /= (float)dim;
        float inv = 1.0f / sqrtf(var + eps);
        for (int i = 0; i < dim; i++) y[i] = (x[i] - mean) * inv * gamma[i] + beta[i];
    }
}

void cs_layernorm2d_chw(float *x, int C, int HW, const float *gamma, const float *beta, float eps) {
    for (int p = 0; p < HW; p++) {
        float mean = 0.f;
        for (int c = 0; c < C; c++) mean += x[(size_t)c * HW + p];
        mean /= (float)C;
        float var = 0.f;
        for (int c = 0; c < C; c++) {
            float d = x[(size_t)c * HW + p] - mean;
            var += d * d;
        }
        var /= (float)C;
        float inv = 1.0f / sqrtf(var + eps);
        for (int c = 0; c < C; c++) {
            float *v = &x[(size_t)c * HW + p];
            *v = (*v - mean) * inv * gamma[c] + beta[c];
        }
    }
}

void cs_gelu(float *x, size_t n, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

void cs_relu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = x[i] > 0.f ? x[i] : 0.f;
}

void cs_add(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

void cs_softmax_row(float *x, int n) {
    float m = x[0];
    for (int i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    float s = 0.f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    float inv = 1.0f / s;
    for (int i = 0; i < n; i++) x[i] *= inv;
}

float cs_sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

void cs_transpose(const float *in, float *out, int rows, int cols) {
    for (int r0 = 0; r0 < rows; r0 += 32)
        for (int c0 = 0; c0 < cols; c0 += 32)
            for (int r = r0; r < rows && r < r0 + 32; r++)
                for (int c = c0; c < cols && c < c0 + 32; c++)
                    out[(size_t)c * rows + r] = in[(size_t)r * cols + c];
}
