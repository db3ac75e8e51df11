/* Primitive forward/backward operations for training (see train.h).
 *
 * GEMMs go to OpenBLAS with the transposes folded into the call, so no operand
 * is ever copied just to transpose it. Reductions (norm statistics, bias and
 * gamma/beta gradients, softmax row sums) accumulate in double. Functions here
 * are void (train.h), so invalid sizes make a call a no-op instead of an error,
 * and none of them needs an allocation that could fail (convT falls back to a
 * stack buffer). */
#include <cblas.h>
#include <immintrin.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ops.h"
#include "train.h"

/* ------------------------------------------------------------ threading */

/* Ops without an n_threads argument (norms, activations) use the count of the
 * last op on this thread that had one, so a caller's thread setting carries
 * over; before any such call, every processor. */
static _Thread_local int last_n_threads;

static int note_threads(int n_threads) {
    last_n_threads = n_threads < 1 ? 1 : n_threads;
    return last_n_threads;
}

/* Threads for `work` elements of cheap elementwise work: one below ~64K, where
 * the team start-up costs more than it saves. */
static int elem_threads(size_t work) {
    if (work < ((size_t)1 << 16)) return 1;
    int t = last_n_threads > 0 ? last_n_threads : omp_get_num_procs();
    return t < 1 ? 1 : t;
}

/* C[M,N] = alpha op(A) op(B) + beta C. As cs_gemm: OpenBLAS takes its thread
 * count from this thread's OpenMP setting, small products run on one thread. */
static void gemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc, int n_threads) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (int m = 0; m < M; m++) {
            float *c = C + (size_t)m * ldc;
            for (int n = 0; n < N; n++) c[n] = beta == 0.f ? 0.f : beta * c[n];
        }
        return;
    }
    const double flops = 2.0 * M * (double)N * K;
    omp_set_num_threads(flops < 4e6 || n_threads < 1 ? 1 : n_threads);
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M,
                N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* Gradient buffer of a parameter, NULL when there is none to fill: no parameter,
 * no gradient storage, or frozen (the optimiser never reads it, so skip the work). */
static float *grad_of(const cs_tparam *p) { return p && p->g && !p->frozen ? p->g : NULL; }
static const float *value_of(const cs_tparam *p) { return p ? p->w : NULL; }

/* g[n] += sum over m of A[m*lda + n], n < N; double sums per block of columns. */
static void add_col_sums(const float *A, int M, int N, int lda, float *g) {
    enum { BLK = 128 };
    const int nblk = (N + BLK - 1) / BLK;
    const int nt = nblk > 1 ? elem_threads((size_t)M * N) : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int b = 0; b < nblk; b++) {
        double acc[BLK];
        const int n0 = b * BLK, nn = N - n0 < BLK ? N - n0 : BLK;
        for (int j = 0; j < nn; j++) acc[j] = 0.0;
        for (int m = 0; m < M; m++) {
            const float *row = A + (size_t)m * lda + n0;
            for (int j = 0; j < nn; j++) acc[j] += row[j];
        }
        for (int j = 0; j < nn; j++) g[n0 + j] += (float)acc[j];
    }
}

/* g[m] += sum of row m of A (M rows of length N, contiguous). */
static void add_row_sums(const float *A, int M, size_t N, float *g) {
    const int nt = M > 1 ? elem_threads((size_t)M * N) : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int m = 0; m < M; m++) {
        const float *row = A + (size_t)m * N;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (size_t i = 0; i < N; i++) s += row[i];
        g[m] += (float)s;
    }
}

/* --------------------------------------------------------------- linear */

void cs_linear_fwd(const float *X, int M, int K, const cs_tparam *W, const cs_tparam *b, int N,
                   float *Y, int n_threads) {
    if (M <= 0 || K <= 0 || N <= 0 || !W) return;
    cs_linear(X, M, K, W->w, value_of(b), N, Y, note_threads(n_threads));
}

void cs_linear_bwd(const float *X, int M, int K, cs_tparam *W, cs_tparam *b, int N, const float *dY,
                   float *dX, int n_threads) {
    if (M <= 0 || K <= 0 || N <= 0 || !W) return;
    n_threads = note_threads(n_threads);
    if (dX) gemm(0, 0, M, K, N, 1.f, dY, N, W->w, K, 0.f, dX, K, n_threads);
    float *dW = grad_of(W);
    if (dW) gemm(1, 0, N, K, M, 1.f, dY, N, X, K, 1.f, dW, K, n_threads);
    float *db = grad_of(b);
    if (db) add_col_sums(dY, M, N, N, db);
}

/* ------------------------------------------------------------ layernorm */

void cs_layernorm_fwd(const float *in, float *out, int rows, int dim, const cs_tparam *gamma,
                      const cs_tparam *beta, float eps, float *mean, float *rstd) {
    if (rows <= 0 || dim <= 0) return;
    const float *g = value_of(gamma), *b = value_of(beta);
    const int nt = elem_threads((size_t)rows * dim);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int r = 0; r < rows; r++) {
        const float *x = in + (size_t)r * dim;
        float *y = out + (size_t)r * dim;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < dim; i++) s += x[i];
        const double mu = s / dim;
        double v = 0.0;
#pragma omp simd reduction(+ : v)
        for (int i = 0; i < dim; i++) v += ((double)x[i] - mu) * ((double)x[i] - mu);
        const float m = (float)mu, rs = (float)(1.0 / sqrt(v / dim + (double)eps));
        if (mean) mean[r] = m;
        if (rstd) rstd[r] = rs;
        for (int i = 0; i < dim; i++) {
            const float xh = (x[i] - m) * rs;
            y[i] = (g ? xh * g[i] : xh) + (b ? b[i] : 0.f);
        }
    }
}

void cs_layernorm_bwd(const float *in, const float *dout, int rows, int dim, cs_tparam *gamma,
                      cs_tparam *beta, const float *mean, const float *rstd, float *din) {
    if (rows <= 0 || dim <= 0 || !mean || !rstd) return;
    float *dg = grad_of(gamma), *db = grad_of(beta);
    const float *g = value_of(gamma);
    /* gamma/beta gradients first: din may overwrite dout. Column blocks keep
     * threads on disjoint parameter entries. */
    if (dg || db) {
        enum { BLK = 128 };
        const int nblk = (dim + BLK - 1) / BLK;
        const int nt = nblk > 1 ? elem_threads((size_t)rows * dim) : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
        for (int bk = 0; bk < nblk; bk++) {
            double ag[BLK], ab[BLK];
            const int i0 = bk * BLK, nn = dim - i0 < BLK ? dim - i0 : BLK;
            for (int j = 0; j < nn; j++) ag[j] = ab[j] = 0.0;
            for (int r = 0; r < rows; r++) {
                const float *x = in + (size_t)r * dim + i0, *dy = dout + (size_t)r * dim + i0;
                const float m = mean[r], rs = rstd[r];
                for (int j = 0; j < nn; j++) {
                    ag[j] += (double)dy[j] * ((x[j] - m) * rs);
                    ab[j] += dy[j];
                }
            }
            for (int j = 0; j < nn; j++) {
                if (dg) dg[i0 + j] += (float)ag[j];
                if (db) db[i0 + j] += (float)ab[j];
            }
        }
    }
    if (!din) return;
    const int nt = elem_threads((size_t)rows * dim);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int r = 0; r < rows; r++) {
        const float *x = in + (size_t)r * dim, *dy = dout + (size_t)r * dim;
        float *dx = din + (size_t)r * dim;
        const float m = mean[r], rs = rstd[r];
        double s1 = 0.0, s2 = 0.0; /* sums of dxhat and dxhat * xhat */
#pragma omp simd reduction(+ : s1, s2)
        for (int i = 0; i < dim; i++) {
            const double d = (double)dy[i] * (g ? g[i] : 1.f);
            s1 += d;
            s2 += d * ((x[i] - m) * rs);
        }
        const float a = (float)(s1 / dim), c = (float)(s2 / dim);
        for (int i = 0; i < dim; i++) {
            const float xh = (x[i] - m) * rs;
            dx[i] = rs * (dy[i] * (g ? g[i] : 1.f) - a - xh * c);
        }
    }
}

/* ------------------------------------------------------------ groupnorm */

static int groupnorm_sizes_ok(int C, int HW, int groups) {
    return C > 0 && HW > 0 && groups > 0 && C % groups == 0;
}

void cs_groupnorm_fwd(const float *in, float *out, int C, int HW, int groups, const cs_tparam *gamma,
                      const cs_tparam *beta, float eps, float *mean, float *rstd) {
    if (!groupnorm_sizes_ok(C, HW, groups)) return;
    const float *g = value_of(gamma), *b = value_of(beta);
    const int cpg = C / groups;
    const size_t n = (size_t)cpg * HW;
    const int nt = groups > 1 ? elem_threads((size_t)C * HW) : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int gr = 0; gr < groups; gr++) {
        const float *x = in + (size_t)gr * n;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (size_t i = 0; i < n; i++) s += x[i];
        const double mu = s / (double)n;
        double v = 0.0;
#pragma omp simd reduction(+ : v)
        for (size_t i = 0; i < n; i++) v += ((double)x[i] - mu) * ((double)x[i] - mu);
        const float m = (float)mu, rs = (float)(1.0 / sqrt(v / (double)n + (double)eps));
        if (mean) mean[gr] = m;
        if (rstd) rstd[gr] = rs;
        for (int cc = 0; cc < cpg; cc++) {
            const int c = gr * cpg + cc;
            const float gc = g ? g[c] : 1.f, bc = b ? b[c] : 0.f;
            const float *xc = in + (size_t)c * HW;
            float *yc = out + (size_t)c * HW;
            for (int p = 0; p < HW; p++) yc[p] = (xc[p] - m) * rs * gc + bc;
        }
    }
}

void cs_groupnorm_bwd(const float *in, const float *dout, int C, int HW, int groups,
                      cs_tparam *gamma, cs_tparam *beta, const float *mean, const float *rstd,
                      float *din) {
    if (!groupnorm_sizes_ok(C, HW, groups) || !mean || !rstd) return;
    float *dg = grad_of(gamma), *db = grad_of(beta);
    const float *g = value_of(gamma);
    const int cpg = C / groups;
    const double n = (double)cpg * HW;
    const int nt = groups > 1 ? elem_threads((size_t)C * HW) : 1;
    /* One group per iteration: its channels' gamma/beta entries belong to it alone. */
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int gr = 0; gr < groups; gr++) {
        const float m = mean[gr], rs = rstd[gr];
        double s1 = 0.0, s2 = 0.0; /* group sums of dxhat and dxhat * xhat */
        for (int cc = 0; cc < cpg; cc++) {
            const int c = gr * cpg + cc;
            const float *x = in + (size_t)c * HW, *dy = dout + (size_t)c * HW;
            double sd = 0.0, sdx = 0.0;
#pragma omp simd reduction(+ : sd, sdx)
            for (int p = 0; p < HW; p++) {
                sd += dy[p];
                sdx += (double)dy[p] * ((x[p] - m) * rs);
            }
            if (dg) dg[c] += (float)sdx;
            if (db) db[c] += (float)sd;
            const double gc = g ? g[c] : 1.0;
            s1 += gc * sd;
            s2 += gc * sdx;
        }
        if (!din) continue;
        const float a = (float)(s1 / n), b = (float)(s2 / n);
        for (int cc = 0; cc < cpg; cc++) {
            const int c = gr * cpg + cc;
            const float gc = g ? g[c] : 1.f;
            const float *x = in + (size_t)c * HW, *dy = dout + (size_t)c * HW;
            float *dx = din + (size_t)c * HW;
            for (int p = 0; p < HW; p++) dx[p] = rs * (dy[p] * gc - a - (x[p] - m) * rs * b);
        }
    }
}

/* ---------------------------------------------------------- activations */

void cs_gelu_fwd(const float *x, float *y, size_t n) {
    if (y != x) memcpy(y, x, n * sizeof(float));
    /* cs_gelu is the inference kernel: training sees the same numbers. */
    cs_gelu(y, n, elem_threads(n));
}

#if defined(__AVX2__) && defined(__FMA__)
/* exp(x) for x <= 0 on 8 lanes: x = n ln2 + r with |r| <= ln2/2 (ln2 split in a
 * high part exact in float and a low correction), e^r by its degree-7 Taylor
 * polynomial (truncation < 6e-9 relative), times 2^n built in the exponent bits.
 * Inputs below -87 are clamped (result ~1.6e-38, far below what it multiplies). */
static inline __m256 exp_neg8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606820309417e-6f), r);
    __m256 p = _mm256_set1_ps(1.f / 5040.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* GELU derivative Phi(x) + x phi(x) on 8 lanes. erf(z), z = x/sqrt2, by
 * Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7): 1 - t poly(t) exp(-z^2), and
 * exp(-z^2) = exp(-x^2/2) is also what phi needs, so one exp serves both. */
static inline __m256 gelu_grad8(__m256 x) {
    const __m256 sign_mask = _mm256_set1_ps(-0.0f);
    const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
    const __m256 az = _mm256_andnot_ps(sign_mask, z);
    const __m256 e = exp_neg8(_mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(-0.5f)));
    const __m256 t =
        _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(az, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.f)));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    __m256 erf = _mm256_fnmadd_ps(_mm256_mul_ps(p, t), e, _mm256_set1_ps(1.f));
    erf = _mm256_or_ps(erf, _mm256_and_ps(z, sign_mask)); /* erf is odd */
    const __m256 cdf = _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_add_ps(_mm256_set1_ps(1.f), erf));
    return _mm256_fmadd_ps(_mm256_mul_ps(x, e), _mm256_set1_ps(0.39894228040143268f), cdf);
}
#endif

static inline float gelu_grad(float v) {
    /* d/dx [x Phi(x)] = Phi(x) + x phi(x) */
    const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    return cdf + v * 0.39894228040143268f * expf(-0.5f * v * v);
}

void cs_gelu_bwd(const float *x, const float *dy, float *dx, size_t n) {
    const size_t chunk = 16384, nchunks = (n + chunk - 1) / chunk;
    const int nt = nchunks > 1 ? elem_threads(n) : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (size_t c = 0; c < nchunks; c++) {
        size_t i = c * chunk;
        const size_t end = i + chunk < n ? i + chunk : n;
#if defined(__AVX2__) && defined(__FMA__)
        for (; i + 8 <= end; i += 8)
            _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(dy + i), gelu_grad8(_mm256_loadu_ps(x + i))));
#endif
        for (; i < end; i++) dx[i] = dy[i] * gelu_grad(x[i]);
    }
}

void cs_relu_fwd(const float *x, float *y, size_t n) {
    const int nt = elem_threads(n);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (size_t i = 0; i < n; i++) y[i] = x[i] > 0.f ? x[i] : 0.f;
}

void cs_relu_bwd(const float *x, const float *dy, float *dx, size_t n) {
    const int nt = elem_threads(n);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (size_t i = 0; i < n; i++) dx[i] = x[i] > 0.f ? dy[i] : 0.f;
}

void cs_sigmoid_fwd(const float *x, float *y, size_t n) {
    const int nt = elem_threads(n);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (size_t i = 0; i < n; i++) y[i] = 1.0f / (1.0f + expf(-x[i]));
}

void cs_sigmoid_bwd_from_y(const float *y, const float *dy, float *dx, size_t n) {
    const int nt = elem_threads(n);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (size_t i = 0; i < n; i++) dx[i] = dy[i] * y[i] * (1.0f - y[i]);
}

/* -------------------------------------------------------------- softmax */

static void softmax_bwd_rows(const float *p, const float *dp, float *dx, int rows, int n, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int r = 0; r < rows; r++) {
        const float *pr = p + (size_t)r * n, *dpr = dp + (size_t)r * n;
        float *dxr = dx + (size_t)r * n;
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < n; i++) s += (double)pr[i] * dpr[i];
        const float sf = (float)s;
        for (int i = 0; i < n; i++) dxr[i] = pr[i] * (dpr[i] - sf);
    }
}

void cs_softmax_bwd(const float *p, const float *dp, float *dx, int rows, int n) {
    if (rows <= 0 || n <= 0) return;
    softmax_bwd_rows(p, dp, dx, rows, n, rows > 1 ? elem_threads((size_t)rows * n) : 1);
}

/* ------------------------------------------------------------ attention */

/* Row softmax work split over threads from this many logits on: a window head
 * (196 x 196) stays on one thread, where a team start costs more than it saves. */
#define ATTN_PAR_MIN ((size_t)1 << 17)

void cs_attn_head_fwd(const float *q, int ldq, const float *k, int ldk, const float *v, int ldv,
                      int nq, int nk, int dh, float scale, const float *bias, float *P, float *o,
                      int ldo, int n_threads) {
    if (nq <= 0 || nk <= 0 || dh <= 0) return;
    n_threads = note_threads(n_threads);
    if (bias) memcpy(P, bias, (size_t)nq * nk * sizeof(float));
    gemm(0, 1, nq, nk, dh, scale, q, ldq, k, ldk, bias ? 1.f : 0.f, P, nk, n_threads);
    const int nt = nq > 1 && (size_t)nq * nk >= ATTN_PAR_MIN ? n_threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int i = 0; i < nq; i++) cs_softmax_row(P + (size_t)i * nk, nk);
    gemm(0, 0, nq, dh, nk, 1.f, P, nk, v, ldv, 0.f, o, ldo, n_threads);
}

void cs_attn_head_bwd(const float *q, int ldq, const float *k, int ldk, const float *v, int ldv,
                      int nq, int nk, int dh, float scale, const float *P, const float *dout,
                      int lddo, float *dq, float *dk, float *dv, float *dbias, float *scratch,
                      int n_threads) {
    if (nq <= 0 || nk <= 0 || dh <= 0) return;
    n_threads = note_threads(n_threads);
    if (dv) gemm(1, 0, nk, dh, nq, 1.f, P, nk, dout, lddo, 0.f, dv, ldv, n_threads);
    if (!dq && !dk && !dbias) return;
    /* dP = dout v^T, then dS = P * (dP - rowsum(dP * P)) in place */
    gemm(0, 1, nq, nk, dh, 1.f, dout, lddo, v, ldv, 0.f, scratch, nk, n_threads);
    const int nt = nq > 1 && (size_t)nq * nk >= ATTN_PAR_MIN ? n_threads : 1;
    softmax_bwd_rows(P, scratch, scratch, nq, nk, nt);
    if (dbias) memcpy(dbias, scratch, (size_t)nq * nk * sizeof(float));
    if (dq) gemm(0, 0, nq, dh, nk, scale, scratch, nk, k, ldk, 0.f, dq, ldq, n_threads);
    if (dk) gemm(1, 0, nk, dh, nq, scale, scratch, nk, q, ldq, 0.f, dk, ldk, n_threads);
}

/* --------------------------------------------------------------- conv2d */

/* Output side H + 2 pad - ksize + 1; the col buffer (Cin k k x H W) must hold
 * Cin k k x OH OW, so pad <= (ksize-1)/2 is required. */
static int conv_sizes(int Cin, int H, int W, int Cout, int ksize, int pad, int *OH, int *OW) {
    if (Cin <= 0 || H <= 0 || W <= 0 || Cout <= 0 || ksize <= 0 || pad < 0 || 2 * pad > ksize - 1)
        return -1;
    *OH = H + 2 * pad - ksize + 1;
    *OW = W + 2 * pad - ksize + 1;
    if (*OH <= 0 || *OW <= 0) return -1;
    /* BLAS takes int dimensions */
    if ((size_t)H * W > INT_MAX || (size_t)Cin * ksize * ksize > INT_MAX) return -1;
    return 0;
}

/* col[(c,ky,kx), (oy,ox)] = in[c, oy+ky-pad, ox+kx-pad] (0 outside) */
static void im2col(const float *in, int Cin, int H, int W, int ks, int pad, int OH, int OW, float *col,
                   int n_threads) {
    const int rows = Cin * ks * ks;
    const size_t ohw = (size_t)OH * OW;
    const int nt = rows > 1 ? (rows * ohw >= ((size_t)1 << 16) ? n_threads : 1) : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int r = 0; r < rows; r++) {
        const int c = r / (ks * ks), ky = (r / ks) % ks, kx = r % ks;
        const float *src = in + (size_t)c * H * W;
        float *dst = col + (size_t)r * ohw;
        /* output columns whose source column is inside the image */
        const int x_lo = pad - kx > 0 ? pad - kx : 0;
        const int x_hi = W + pad - kx < OW ? W + pad - kx : OW;
        for (int oy = 0; oy < OH; oy++) {
            const int iy = oy + ky - pad;
            float *d = dst + (size_t)oy * OW;
            if (iy < 0 || iy >= H || x_hi <= x_lo) {
                memset(d, 0, (size_t)OW * sizeof(float));
                continue;
            }
            if (x_lo > 0) memset(d, 0, (size_t)x_lo * sizeof(float));
            memcpy(d + x_lo, src + (size_t)iy * W + (x_lo + kx - pad), (size_t)(x_hi - x_lo) * sizeof(float));
            if (x_hi < OW) memset(d + x_hi, 0, (size_t)(OW - x_hi) * sizeof(float));
        }
    }
}

/* din = adjoint of im2col applied to col (written). */
static void col2im(const float *col, int Cin, int H, int W, int ks, int pad, int OH, int OW, float *din,
                   int n_threads) {
    const size_t ohw = (size_t)OH * OW;
    const int nt = Cin > 1 && (size_t)Cin * ks * ks * ohw >= ((size_t)1 << 16) ? n_threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int c = 0; c < Cin; c++) {
        float *dst = din + (size_t)c * H * W;
        memset(dst, 0, (size_t)H * W * sizeof(float));
        for (int ky = 0; ky < ks; ky++)
            for (int kx = 0; kx < ks; kx++) {
                const float *src = col + ((size_t)(c * ks + ky) * ks + kx) * ohw;
                const int x_lo = pad - kx > 0 ? pad - kx : 0;
                const int x_hi = W + pad - kx < OW ? W + pad - kx : OW;
                for (int oy = 0; oy < OH; oy++) {
                    const int iy = oy + ky - pad;
                    if (iy < 0 || iy >= H) continue;
                    float *d = dst + (size_t)iy * W + (kx - pad);
                    const float *s = src + (size_t)oy * OW;
                    for (int ox = x_lo; ox < x_hi; ox++) d[ox] += s[ox];
                }
            }
    }
}

void cs_conv2d_fwd(const float *in, int Cin, int H, int W, const cs_tparam *weight,
                   const cs_tparam *bias, int Cout, int ksize, int pad, float *out, float *col,
                   int n_threads) {
    int OH, OW;
    if (!weight || conv_sizes(Cin, H, W, Cout, ksize, pad, &OH, &OW)) return;
    n_threads = note_threads(n_threads);
    const int ckk = Cin * ksize * ksize, ohw = OH * OW;
    const float *B = in; /* a 1x1 unpadded conv is a plain GEMM on the input */
    if (ksize != 1 || pad != 0) {
        im2col(in, Cin, H, W, ksize, pad, OH, OW, col, n_threads);
        B = col;
    }
    const float *b = value_of(bias);
    if (b)
        for (int co = 0; co < Cout; co++) {
            float *o = out + (size_t)co * ohw;
            for (int i = 0; i < ohw; i++) o[i] = b[co];
        }
    gemm(0, 0, Cout, ohw, ckk, 1.f, weight->w, ckk, B, ohw, b ? 1.f : 0.f, out, ohw, n_threads);
}

void cs_conv2d_bwd(const float *in, int Cin, int H, int W, cs_tparam *weight, cs_tparam *bias,
                   int Cout, int ksize, int pad, const float *dout, float *din, float *col,
                   int n_threads) {
    int OH, OW;
    if (!weight || conv_sizes(Cin, H, W, Cout, ksize, pad, &OH, &OW)) return;
    n_threads = note_threads(n_threads);
    const int ckk = Cin * ksize * ksize, ohw = OH * OW;
    const int direct = ksize == 1 && pad == 0;
    float *db = grad_of(bias);
    if (db) add_row_sums(dout, Cout, (size_t)ohw, db);
    float *dW = grad_of(weight);
    if (dW) {
        const float *B = in;
        if (!direct) {
            im2col(in, Cin, H, W, ksize, pad, OH, OW, col, n_threads);
            B = col;
        }
        gemm(0, 1, Cout, ckk, ohw, 1.f, dout, ohw, B, ohw, 1.f, dW, ckk, n_threads);
    }
    if (!din) return;
    if (direct) {
        gemm(1, 0, Cin, ohw, Cout, 1.f, weight->w, ckk, dout, ohw, 0.f, din, ohw, n_threads);
    } else {
        gemm(1, 0, ckk, ohw, Cout, 1.f, weight->w, ckk, dout, ohw, 0.f, col, ohw, n_threads);
        col2im(col, Cin, H, W, ksize, pad, OH, OW, din, n_threads);
    }
}

/* ------------------------------------------------------- convT 2x2 s2
 * Each input pixel maps to a 2x2 output patch per output channel: with the
 * weight as a Cin x (Cout 4) matrix, T = W^T X (X: Cin x pixels) is one GEMM,
 * then T's rows (co, dy, dx) scatter to out[co, 2y+dy, 2x+dx]. T is built in
 * blocks of at most CT_MBLK rows x CT_PIX pixels. */

enum { CT_MBLK = 256, CT_PIX = 1024, CT_STACK_PIX = 16 };

static int convT_sizes(int Cin, int H, int W, int Cout) {
    if (Cin <= 0 || H <= 0 || W <= 0 || Cout <= 0) return -1;
    if ((size_t)H * W > INT_MAX / 4 || (size_t)Cout > INT_MAX / 4) return -1;
    return 0;
}

/* Block buffer on the heap, or (allocation failed) a smaller one on the stack. */
static float *convT_buffer(float *stack_buf, int *pix) {
    float *heap = malloc((size_t)CT_MBLK * CT_PIX * sizeof(float));
    *pix = heap ? CT_PIX : CT_STACK_PIX;
    return heap ? heap : stack_buf;
}

void cs_convT2x2_fwd(const float *in, int Cin, int H, int W, const cs_tparam *weight,
                     const cs_tparam *bias, int Cout, float *out, int n_threads) {
    if (!weight || convT_sizes(Cin, H, W, Cout)) return;
    n_threads = note_threads(n_threads);
    const int M = Cout * 4, HW = H * W, OW = 2 * W;
    const size_t plane = (size_t)4 * HW;
    const float *b = value_of(bias);
    float stack_buf[CT_MBLK * CT_STACK_PIX];
    int pix;
    float *buf = convT_buffer(stack_buf, &pix);
    for (int p0 = 0; p0 < HW; p0 += pix) {
        const int np = HW - p0 < pix ? HW - p0 : pix;
        for (int m0 = 0; m0 < M; m0 += CT_MBLK) {
            const int nm = M - m0 < CT_MBLK ? M - m0 : CT_MBLK;
            gemm(1, 0, nm, np, Cin, 1.f, weight->w + m0, M, in + p0, HW, 0.f, buf, np, n_threads);
            const int nt = nm > 1 && (size_t)nm * np >= ((size_t)1 << 15) ? n_threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
            for (int mi = 0; mi < nm; mi++) {
                const int m = m0 + mi, co = m >> 2, dy = (m >> 1) & 1, dx = m & 1;
                const float bc = b ? b[co] : 0.f;
                const float *t = buf + (size_t)mi * np;
                float *o = out + (size_t)co * plane + (size_t)dy * OW + dx;
                for (int j = 0; j < np; j++) {
                    const int p = p0 + j, y = p / W, x = p - y * W;
                    o[(size_t)y * 2 * OW + 2 * x] = t[j] + bc;
                }
            }
        }
    }
    if (buf != stack_buf) free(buf);
}

void cs_convT2x2_bwd(const float *in, int Cin, int H, int W, cs_tparam *weight, cs_tparam *bias,
                     int Cout, const float *dout, float *din, int n_threads) {
    if (!weight || convT_sizes(Cin, H, W, Cout)) return;
    n_threads = note_threads(n_threads);
    const int M = Cout * 4, HW = H * W, OW = 2 * W;
    const size_t plane = (size_t)4 * HW;
    float *db = grad_of(bias), *dW = grad_of(weight);
    if (db) add_row_sums(dout, Cout, plane, db);
    if (!dW && !din) return;
    float stack_buf[CT_MBLK * CT_STACK_PIX];
    int pix;
    float *buf = convT_buffer(stack_buf, &pix);
    for (int p0 = 0; p0 < HW; p0 += pix) {
        const int np = HW - p0 < pix ? HW - p0 : pix;
        for (int m0 = 0; m0 < M; m0 += CT_MBLK) {
            const int nm = M - m0 < CT_MBLK ? M - m0 : CT_MBLK;
            /* gather D[(co,dy,dx), pixel] = dout[co, 2y+dy, 2x+dx] */
            const int nt = nm > 1 && (size_t)nm * np >= ((size_t)1 << 15) ? n_threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
            for (int mi = 0; mi < nm; mi++) {
                const int m = m0 + mi, co = m >> 2, dy = (m >> 1) & 1, dx = m & 1;
                float *t = buf + (size_t)mi * np;
                const float *g = dout + (size_t)co * plane + (size_t)dy * OW + dx;
                for (int j = 0; j < np; j++) {
                    const int p = p0 + j, y = p / W, x = p - y * W;
                    t[j] = g[(size_t)y * 2 * OW + 2 * x];
                }
            }
            /* din[:, pixels] = W D (summed over row blocks); dW[:, rows] += X D^T */
            if (din)
                gemm(0, 0, Cin, np, nm, 1.f, weight->w + m0, M, buf, np, m0 == 0 ? 0.f : 1.f, din + p0, HW,
                     n_threads);
            if (dW) gemm(0, 1, Cin, nm, np, 1.f, in + p0, HW, buf, np, 1.f, dW + m0, M, n_threads);
        }
    }
    if (buf != stack_buf) free(buf);
}

/* ------------------------------------------------------------- bilinear */

/* One source tap along an axis, as PyTorch's align_corners=False kernel (float
 * scale, clamped at 0 on the left and at the last sample on the right); the
 * same arithmetic as the mask upsampler in postprocess.c. */
typedef struct {
    int i0, i1;
    float l0, l1;
} lerp_tap;

static lerp_tap bilinear_tap(int n_in, int n_out, int i) {
    lerp_tap t;
    if (n_in == n_out) {
        t.i0 = t.i1 = i;
        t.l0 = 1.f;
        t.l1 = 0.f;
        return t;
    }
    const float scale = (float)n_in / (float)n_out;
    double src = (double)scale * ((double)i + 0.5) - 0.5;
    if (src < 0) src = 0;
    int i0 = (int)src;
    if (i0 > n_in - 1) i0 = n_in - 1;
    t.i0 = i0;
    t.i1 = i0 + (i0 < n_in - 1 ? 1 : 0);
    t.l1 = (float)(src - (double)i0);
    t.l0 = 1.f - t.l1;
    return t;
}

/* Column taps are computed per block of output columns (a row loop reuses them). */
enum { BL_XBLK = 256 };

void cs_bilinear_fwd(const float *in, int C, int H, int W, float *out, int OH, int OW) {
    if (C <= 0 || H <= 0 || W <= 0 || OH <= 0 || OW <= 0) return;
    const size_t rows = (size_t)C * OH;
    const int nt = elem_threads(rows * (size_t)OW);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (size_t r = 0; r < rows; r++) {
        const int c = (int)(r / (size_t)OH), oy = (int)(r % (size_t)OH);
        const lerp_tap ty = bilinear_tap(H, OH, oy);
        const float *r0 = in + ((size_t)c * H + ty.i0) * W, *r1 = in + ((size_t)c * H + ty.i1) * W;
        float *o = out + r * OW;
        lerp_tap xt[BL_XBLK];
        for (int x0 = 0; x0 < OW; x0 += BL_XBLK) {
            const int nx = OW - x0 < BL_XBLK ? OW - x0 : BL_XBLK;
            for (int j = 0; j < nx; j++) xt[j] = bilinear_tap(W, OW, x0 + j);
            for (int j = 0; j < nx; j++) {
                const lerp_tap tx = xt[j];
                o[x0 + j] = ty.l0 * (tx.l0 * r0[tx.i0] + tx.l1 * r0[tx.i1]) +
                            ty.l1 * (tx.l0 * r1[tx.i0] + tx.l1 * r1[tx.i1]);
            }
        }
    }
}

void cs_bilinear_bwd(const float *dout, int C, int H, int W, int OH, int OW, float *din) {
    if (C <= 0 || H <= 0 || W <= 0 || OH <= 0 || OW <= 0) return;
    const int nt = C > 1 ? elem_threads((size_t)C * OH * OW) : 1;
    /* one channel per iteration: scatter-adds never cross channels */
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int c = 0; c < C; c++) {
        float *d = din + (size_t)c * H * W;
        memset(d, 0, (size_t)H * W * sizeof(float));
        lerp_tap xt[BL_XBLK];
        for (int x0 = 0; x0 < OW; x0 += BL_XBLK) {
            const int nx = OW - x0 < BL_XBLK ? OW - x0 : BL_XBLK;
            for (int j = 0; j < nx; j++) xt[j] = bilinear_tap(W, OW, x0 + j);
            for (int oy = 0; oy < OH; oy++) {
                const lerp_tap ty = bilinear_tap(H, OH, oy);
                float *r0 = d + (size_t)ty.i0 * W, *r1 = d + (size_t)ty.i1 * W;
                const float *g = dout + ((size_t)c * OH + oy) * OW + x0;
                for (int j = 0; j < nx; j++) {
                    const lerp_tap tx = xt[j];
                    const float a = ty.l0 * g[j], b = ty.l1 * g[j];
                    r0[tx.i0] += tx.l0 * a;
                    r0[tx.i1] += tx.l1 * a;
                    r1[tx.i0] += tx.l0 * b;
                    r1[tx.i1] += tx.l1 * b;
                }
            }
        }
    }
}
