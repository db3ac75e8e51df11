/* Basic tensor operations (see ops.h). */
#include <cblas.h>
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <string.h>

#include "common.h"
#include "ops.h"

static _Atomic uint64_t gemm_flops; /* relaxed: a statistic, read around a stage */

uint64_t cs_gemm_flops(void) { return atomic_load_explicit(&gemm_flops, memory_order_relaxed); }

void cs_gemm(int M, int N, int K, const float *A, int lda, const float *B, int ldb, int trans_b,
             float beta, float *C, int ldc, int n_threads) {
    if (M <= 0 || N <= 0) return;
    if (K > 0) atomic_fetch_add_explicit(&gemm_flops, 2ull * (uint64_t)M * (uint64_t)N * (uint64_t)K, memory_order_relaxed);
    if (n_threads < 1) n_threads = 1;
    /* OpenBLAS (OpenMP build) takes its thread count from the calling thread's
     * OpenMP ICV, so setting it here makes n_threads a per-call, per-thread setting;
     * inside one of our own parallel regions OpenBLAS runs single-threaded. */
    double flops = 2.0 * M * (double)N * K;
    omp_set_num_threads(flops < 4e6 ? 1 : n_threads);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K, 1.0f, A, lda, B,
                ldb, beta, C, ldc);
}

void cs_trmm_upper(int M, int N, const float *A, int lda, float *B, int ldb) {
    if (M <= 0 || N <= 0) return;
    atomic_fetch_add_explicit(&gemm_flops, (uint64_t)M * (uint64_t)M * (uint64_t)N, memory_order_relaxed);
    omp_set_num_threads(1);
    cblas_strmm(CblasRowMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, M, N, 1.0f, A, lda, B, ldb);
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

void cs_relu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = x[i] > 0.f ? x[i] : 0.f;
}

void cs_add(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

/* exp(x) for x <= 0 without branches, so the softmax loop vectorises (the decoder
 * self-attention evaluates Q*Q*heads*layers ~ 6e8 of them at full size). Cody-Waite
 * reduction by ln 2 and the Cephes expf polynomial: about 1 ulp, like the Sleef
 * expf_u10 of PyTorch's vectorised softmax. Arguments below -87.3 give ~1e-38. */
static inline float exp_nonpos(float x) {
    x = x > -87.3f ? x : -87.3f;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float z = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float p2;
    memcpy(&p2, &bits, sizeof p2);
    return y * p2;
}

#if defined(__AVX2__) && defined(__FMA__)
/* exp_nonpos on 8 lanes (same reduction and polynomial, fused multiply-adds). */
static inline __m256 exp_nonpos8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_floor_ps(
        _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    const __m256 z = _mm256_mul_ps(r, r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Y = X W^T (+ bias) for a few rows of X: each row of W is read once, straight from
 * the weights, against up to 8 rows of X. A BLAS call would first pack all of W, which
 * for the mask decoder's 7 prompt tokens costs more than the product. */
static void linear_few_rows(const float *X, int M, int K, const float *W, const float *bias, int N, float *Y) {
    atomic_fetch_add_explicit(&gemm_flops, 2ull * (uint64_t)M * (uint64_t)N * (uint64_t)K, memory_order_relaxed);
    for (int m0 = 0; m0 < M; m0 += 8) {
        const int mb = M - m0 < 8 ? M - m0 : 8;
        for (int n = 0; n < N; n++) {
            const float *w = W + (size_t)n * K;
            float acc[8];
            int k = 0;
#if defined(__AVX2__) && defined(__FMA__)
            __m256 c[8];
            for (int i = 0; i < 8; i++) c[i] = _mm256_setzero_ps();
            for (; k + 8 <= K; k += 8) {
                const __m256 wv = _mm256_loadu_ps(w + k);
                for (int i = 0; i < mb; i++)
                    c[i] = _mm256_fmadd_ps(_mm256_loadu_ps(X + (size_t)(m0 + i) * K + k), wv, c[i]);
            }
            for (int i = 0; i < mb; i++) acc[i] = hsum8(c[i]);
#else
            for (int i = 0; i < mb; i++) acc[i] = 0.0f;
#endif
            for (; k < K; k++)
                for (int i = 0; i < mb; i++) acc[i] += X[(size_t)(m0 + i) * K + k] * w[k];
            for (int i = 0; i < mb; i++) Y[(size_t)(m0 + i) * N + n] = acc[i] + (bias ? bias[n] : 0.0f);
        }
    }
}

void cs_linear(const float *X, int M, int K, const float *W, const float *bias, int N, float *Y,
               int n_threads) {
    if (M > 0 && M <= 16 && N > 0) {
        linear_few_rows(X, M, K, W, bias, N, Y);
        return;
    }
    if (bias) {
        for (int m = 0; m < M; m++) memcpy(Y + (size_t)m * N, bias, (size_t)N * sizeof(float));
        cs_gemm(M, N, K, X, K, W, K, 1, 1.0f, Y, N, n_threads);
    } else {
        cs_gemm(M, N, K, X, K, W, K, 1, 0.0f, Y, N, n_threads);
    }
}

/* exp(x - max(x)) in place over one row; returns the float32 sum (over 8 lanes). */
float cs_exp_row_sum(float *x, int n) {
    int i = 0;
    float m = x[0], s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    if (n >= 8) {
        __m256 vm = _mm256_loadu_ps(x);
        for (i = 8; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
        m = hmax8(vm);
    }
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    const __m256 vmax = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 e = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax));
        _mm256_storeu_ps(x + i, e);
        vs = _mm256_add_ps(vs, e);
    }
    s = hsum8(vs);
#else
    for (i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    i = 0;
#endif
    for (; i < n; i++) {
        x[i] = exp_nonpos(x[i] - m);
        s += x[i];
    }
    return s;
}

/* In-place softmax of one row: max-subtracted, float32 sums over 8 lanes. */
void cs_softmax_row(float *x, int n) {
    const float inv = 1.0f / cs_exp_row_sum(x, n);
    for (int k = 0; k < n; k++) x[k] *= inv;
}

void cs_exp_nonpos(float *x, size_t n) {
    size_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp_nonpos8(_mm256_loadu_ps(x + i)));
#endif
    for (; i < n; i++) x[i] = exp_nonpos(x[i]);
}

void cs_softmax_groups(float *x, int groups, int n) {
    const int len = groups * n;
    for (int g = 0; g < groups; g++) {
        float *r = x + (size_t)g * n, m = r[0];
        for (int i = 1; i < n; i++) m = r[i] > m ? r[i] : m;
        for (int i = 0; i < n; i++) r[i] -= m;
    }
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; i + 8 <= len; i += 8) _mm256_storeu_ps(x + i, exp_nonpos8(_mm256_loadu_ps(x + i)));
#endif
    for (; i < len; i++) x[i] = exp_nonpos(x[i]);
    for (int g = 0; g < groups; g++) {
        float *r = x + (size_t)g * n, s = 0.f;
        for (int k = 0; k < n; k++) s += r[k];
        const float inv = 1.0f / s;
        for (int k = 0; k < n; k++) r[k] *= inv;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* GELU on 8 lanes: erf by Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7 in exact
 * arithmetic, ~2e-7 in float32) with the vectorised exp above; the difference from
 * libm erff is below the float32 noise of the surrounding GEMMs. */
static inline __m256 gelu8(__m256 x) {
    const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
    const __m256 sign = _mm256_and_ps(z, _mm256_set1_ps(-0.0f));
    const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    p = _mm256_mul_ps(p, t);
    const __m256 e = exp_nonpos8(_mm256_mul_ps(_mm256_mul_ps(a, a), _mm256_set1_ps(-1.0f)));
    __m256 erf = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));
    erf = _mm256_or_ps(erf, sign);
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
}
#endif

void cs_gelu(float *x, size_t n, int n_threads) {
    const size_t chunk = 16384;
    const size_t nchunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(n_threads) schedule(static) if (nchunks > 4)
    for (size_t c = 0; c < nchunks; c++) {
        size_t i = c * chunk, end = i + chunk < n ? i + chunk : n;
#if defined(__AVX2__) && defined(__FMA__)
        for (; i + 8 <= end; i += 8) _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
#endif
        for (; i < end; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
    }
}

/* Sum of n floats in eight float32 lanes (then pairwise), as vectorised reductions do. */
static inline float sum_lanes(const float *x, int n, float shift, int squares) {
    int i = 0;
    float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    if (n >= 8) {
        __m256 acc = _mm256_setzero_ps();
        const __m256 sh = _mm256_set1_ps(shift);
        for (; i + 8 <= n; i += 8) {
            __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), sh);
            acc = squares ? _mm256_fmadd_ps(d, d, acc) : _mm256_add_ps(acc, d);
        }
        s = hsum8(acc);
    }
#endif
    for (; i < n; i++) {
        float d = x[i] - shift;
        s += squares ? d * d : d;
    }
    return s;
}

void cs_layernorm(const float *in, float *out, int rows, int dim, const float *gamma,
                  const float *beta, float eps, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (rows > 256)
    for (int r = 0; r < rows; r++) {
        const float *x = in + (size_t)r * dim;
        float *y = out + (size_t)r * dim;
        const float mean = sum_lanes(x, dim, 0.f, 0) / (float)dim;
        const float var = sum_lanes(x, dim, mean, 1) / (float)dim;
        const float inv = 1.0f / sqrtf(var + eps);
        for (int i = 0; i < dim; i++) y[i] = (x[i] - mean) * inv * gamma[i] + beta[i];
    }
}

float cs_sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

void cs_transpose(const float *in, float *out, int rows, int cols) {
    for (int r0 = 0; r0 < rows; r0 += 32)
        for (int c0 = 0; c0 < cols; c0 += 32)
            for (int r = r0; r < rows && r < r0 + 32; r++)
                for (int c = c0; c < cols && c < c0 + 32; c++)
                    out[(size_t)c * rows + r] = in[(size_t)r * cols + c];
}
