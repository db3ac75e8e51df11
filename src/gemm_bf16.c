/* bfloat16 matrix products with float32 accumulation (opt-in precision).
 *
 * Why our own kernel: the BLAS offers no bfloat16 GEMM here, and VDPBF16PS
 * (AVX512-BF16: Zen 4 and later, Cooper Lake and later Xeons) does twice the
 * multiply-adds per instruction of a float32 FMA. Blocking, GotoBLAS style:
 *  - W is packed once at load (cs_bf16_weights): panels of 32 columns, k in pairs;
 *  - each thread takes MC rows of X at a time, rounds a KC-wide slice of them to
 *    bfloat16 into micro-panels of MR rows ([pair][row] words: one broadcast each);
 *  - the micro-kernel keeps an MR x 32 tile of float32 sums in 28 zmm registers
 *    and streams the weight panel (16 KB per KC slice, so it stays in L1 across the
 *    MC / MR micro-panels).
 * The portable kernel has the same blocking, rounding and summation order (odd
 * element of each pair first, as VDPBF16PS), so both give the same sums up to the
 * hardware's handling of subnormals.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "cpu.h"
#include "gemm_bf16.h"
#include "weights.h"

#define MR 14  /* rows per micro-tile: 14 x 2 accumulators + 2 weight registers */
#define NR 32  /* columns per panel: two zmm of 16 floats */
#define KCP 128 /* pairs per K slice: the weight slice is 128 x 128 B = 16 KB */
#define MC (MR * 8)

/* Selects instead of branches, so that the packing loops vectorise. */
static inline uint16_t round_bits(uint32_t u) {
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t zero = (u >> 16) & 0x8000u; /* zero and subnormals: signed zero */
    const uint32_t qnan = (u >> 16) | 0x40u;
    const uint32_t r = (u & 0x7f800000u) == 0 ? zero : rounded;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? qnan : r);
}

static inline uint16_t round_f32(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return round_bits(u);
}

uint16_t cs_bf16_round(float x) { return round_f32(x); }

static void round_row(const float *x, uint16_t *out, int n) {
    for (int i = 0; i < n; i++) out[i] = round_f32(x[i]);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

size_t cs_bf16_packed_count(int n, int k) {
    if (n <= 0 || k <= 0) return 0;
    return (size_t)((n + NR - 1) / NR) * NR * (size_t)((k + 1) / 2) * 2;
}

/* W = the transpose of a row-major source with row stride cs (attention's values):
 * source rows 2p and 2p+1 give pair p of every panel column. */
static void pack_transposed(cs_bf16_weights *w, const float *src, size_t cs) {
    const int n = w->n, k = w->k, kp = w->k_pairs;
    for (int j = 0; j < w->n_panels; j++) {
        uint16_t *panel = w->data + (size_t)j * kp * NR * 2;
        const int n0 = j * NR, nc = n - n0 < NR ? n - n0 : NR;
        for (int p = 0; p < kp; p++) {
            const float *r0 = src + (size_t)(2 * p) * cs + n0, *r1 = r0 + cs;
            uint16_t *o = panel + (size_t)p * NR * 2;
            const int second = 2 * p + 1 < k;
            for (int c = 0; c < nc; c++) {
                o[2 * c] = round_f32(r0[c]);
                o[2 * c + 1] = second ? round_f32(r1[c]) : 0;
            }
            for (int c = nc; c < NR; c++) o[2 * c] = o[2 * c + 1] = 0;
        }
    }
}

/* Panel j of W, whose rows are contiguous: row j*NR + c starts at src32 + (j*NR + c) * rs
 * (float32), or at src16 + (j*NR + c) * k (16-bit storage of dtype16). */
static void pack_panel(cs_bf16_weights *w, int j, const float *src32, size_t rs, const uint16_t *src16,
                       int dtype16) {
    const int n = w->n, k = w->k, kp = w->k_pairs;
    uint16_t *panel = w->data + (size_t)j * kp * NR * 2;
    uint16_t row16[2 * 256];
    for (int c = 0; c < NR; c++) {
        const int col = j * NR + c;
        for (int p0 = 0; p0 < kp; p0 += 256) {
            const int np2 = kp - p0 < 256 ? kp - p0 : 256;
            const int valid = col < n ? (k - 2 * p0 < 2 * np2 ? k - 2 * p0 : 2 * np2) : 0;
            if (valid > 0 && src32) {
                round_row(src32 + (size_t)col * rs + 2 * (size_t)p0, row16, valid);
            } else if (valid > 0) {
                const uint16_t *h = src16 + (size_t)col * k + 2 * (size_t)p0;
                for (int i = 0; i < valid; i++)
                    row16[i] = dtype16 == CS_DTYPE_BF16 ? h[i] : round_f32(cs_f16_to_f32(h[i]));
            }
            for (int i = valid > 0 ? valid : 0; i < 2 * np2; i++) row16[i] = 0;
            for (int p = 0; p < np2; p++) {
                uint16_t *o = panel + ((size_t)(p0 + p) * NR + c) * 2;
                o[0] = row16[2 * p];
                o[1] = row16[2 * p + 1];
            }
        }
    }
}

static void set_dims(cs_bf16_weights *w, int n, int k) {
    w->n = n;
    w->k = k;
    w->k_pairs = (k + 1) / 2;
    w->n_panels = (n + NR - 1) / NR;
}

int cs_bf16_weights_pack(cs_bf16_weights *w, const float *src32, const uint16_t *src16, int dtype16, int n,
                         int k, int n_threads) {
    memset(w, 0, sizeof *w);
    if (n <= 0 || k <= 0 || (!src32 && !src16)) return cs_error(CELLSAM_ERR_INVALID, "bf16 pack: empty matrix");
    if ((size_t)n * (size_t)k > ((size_t)1 << 31))
        return cs_error(CELLSAM_ERR_LIMIT, "bf16 pack: matrix %d x %d too large", n, k);
    w->data = cs_alloc(cs_bf16_packed_count(n, k), sizeof(uint16_t));
    if (!w->data) return cs_error(CELLSAM_ERR_NOMEM, "out of memory packing bf16 weights");
    set_dims(w, n, k);
#pragma omp parallel for num_threads(n_threads > 0 ? n_threads : 1) schedule(static) if (n_threads > 1)
    for (int j = 0; j < w->n_panels; j++) pack_panel(w, j, src32, (size_t)k, src16, dtype16);
    return CELLSAM_OK;
}

void cs_bf16_pack_strided(cs_bf16_weights *w, uint16_t *data, const float *src, size_t rs, size_t cs, int n,
                          int k) {
    set_dims(w, n, k);
    w->data = data;
    if (cs == 1) {
        for (int j = 0; j < w->n_panels; j++) pack_panel(w, j, src, rs, NULL, 0);
    } else if (rs == 1) {
        pack_transposed(w, src, cs);
    } else { /* a general stride: element by element */
        for (int j = 0; j < w->n_panels; j++)
            for (int c = 0; c < NR; c++)
                for (int i = 0; i < 2 * w->k_pairs; i++) {
                    const int col = j * NR + c;
                    w->data[(((size_t)j * w->k_pairs + i / 2) * NR + c) * 2 + (i & 1)] =
                        col < n && i < k ? round_f32(src[(size_t)col * rs + (size_t)i * cs]) : 0;
                }
    }
}

void cs_bf16_weights_free(cs_bf16_weights *w) {
    if (!w) return;
    cs_free(w->data);
    memset(w, 0, sizeof *w);
}

/* Round rows [m0, m0+mc) x pairs [p0, p0+kpl) of X into micro-panels of MR rows:
 * word (pair p, row r) of panel t at A[(t * kpl + p) * MR + r]; rows past mc are 0. */
static void pack_rows(const float *X, int ldx, int K, int m0, int mc, int p0, int kpl, uint32_t *A,
                      uint16_t *row16) {
    const int panels = (mc + MR - 1) / MR;
    for (int t = 0; t < panels; t++)
        for (int r = 0; r < MR; r++) {
            const int m = t * MR + r;
            uint32_t *dst = A + (size_t)t * kpl * MR + r;
            if (m >= mc) {
                for (int p = 0; p < kpl; p++) dst[(size_t)p * MR] = 0;
                continue;
            }
            const float *x = X + (size_t)(m0 + m) * ldx + 2 * p0;
            const int n = 2 * kpl, valid = K - 2 * p0 < n ? K - 2 * p0 : n;
            round_row(x, row16, valid);
            for (int i = valid; i < n; i++) row16[i] = 0;
            for (int p = 0; p < kpl; p++)
                dst[(size_t)p * MR] = (uint32_t)row16[2 * p] | (uint32_t)row16[2 * p + 1] << 16;
        }
}

/* Write an MR x NR tile of sums: rows < mr, columns < nr; C = acc (+ C) (+ bias). */
static inline void store_tile(const float *acc, float *C, int ldc, int mr, int nr, int load_c,
                              const float *bias) {
    for (int r = 0; r < mr; r++) {
        float *c = C + (size_t)r * ldc;
        for (int j = 0; j < nr; j++) {
            float v = acc[r * NR + j];
            if (load_c) v = v + c[j];
            if (bias) v = v + bias[j];
            c[j] = v;
        }
    }
}

static void kernel_portable(int kpl, const uint32_t *A, const uint16_t *B, float *C, int ldc, int mr, int nr,
                            int load_c, const float *bias) {
    float acc[MR * NR] = {0};
    for (int p = 0; p < kpl; p++) {
        const uint16_t *b = B + (size_t)p * NR * 2;
        for (int r = 0; r < MR; r++) {
            const uint32_t a = A[(size_t)p * MR + r];
            const float a0 = bf16_to_f32((uint16_t)(a & 0xffff)), a1 = bf16_to_f32((uint16_t)(a >> 16));
            for (int j = 0; j < NR; j++) {
                float s = acc[r * NR + j] + a1 * bf16_to_f32(b[2 * j + 1]);
                acc[r * NR + j] = s + a0 * bf16_to_f32(b[2 * j]);
            }
        }
    }
    store_tile(acc, C, ldc, mr, nr, load_c, bias);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX512BF16_KERNEL 1
#define TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

TARGET_BF16 static void kernel_avx512bf16(int kpl, const uint32_t *A, const uint16_t *B, float *C, int ldc,
                                          int mr, int nr, int load_c, const float *bias) {
    __m512 c0[MR], c1[MR];
#pragma GCC unroll 14
    for (int r = 0; r < MR; r++) c0[r] = c1[r] = _mm512_setzero_ps();
    for (int p = 0; p < kpl; p++) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + (size_t)p * NR * 2);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + (size_t)p * NR * 2 + 32);
        const uint32_t *a = A + (size_t)p * MR;
#pragma GCC unroll 14
        for (int r = 0; r < MR; r++) {
            const __m512bh ar = (__m512bh)_mm512_set1_epi32((int)a[r]);
            c0[r] = _mm512_dpbf16_ps(c0[r], ar, b0);
            c1[r] = _mm512_dpbf16_ps(c1[r], ar, b1);
        }
    }
    const __mmask16 m0 = nr >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nr) - 1);
    const __mmask16 m1 = nr >= 32 ? (__mmask16)0xffff : nr > 16 ? (__mmask16)((1u << (nr - 16)) - 1) : 0;
    const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 14
    for (int r = 0; r < MR; r++) {
        if (r >= mr) break;
        float *c = C + (size_t)r * ldc;
        __m512 v0 = c0[r], v1 = c1[r];
        if (load_c) {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, c));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, c + 16));
        }
        if (bias) {
            v0 = _mm512_add_ps(v0, bias0);
            v1 = _mm512_add_ps(v1, bias1);
        }
        _mm512_mask_storeu_ps(c, m0, v0);
        _mm512_mask_storeu_ps(c + 16, m1, v1);
    }
}
#endif

typedef void (*bf16_kernel)(int, const uint32_t *, const uint16_t *, float *, int, int, int, int, const float *);

/* Rows [ch * MC, ch * MC + MC) of the product, all columns. */
static void linear_chunk(bf16_kernel kernel, const float *X, int M, int ldx, const cs_bf16_weights *W,
                         const float *bias, int accumulate, float *Y, int ldy, int ch, uint32_t *A,
                         uint16_t *row16) {
    const int K = W->k, N = W->n, kp = W->k_pairs;
    const int m0 = ch * MC, mc = M - m0 < MC ? M - m0 : MC;
    const int panels = (mc + MR - 1) / MR;
    for (int p0 = 0; p0 < kp; p0 += KCP) {
        const int kpl = kp - p0 < KCP ? kp - p0 : KCP;
        pack_rows(X, ldx, K, m0, mc, p0, kpl, A, row16);
        const int first = p0 == 0;
        for (int j = 0; j < W->n_panels; j++) {
            const uint16_t *B = W->data + ((size_t)j * kp + p0) * NR * 2;
            const int n0 = j * NR, nr = N - n0 < NR ? N - n0 : NR;
            for (int t = 0; t < panels; t++) {
                const int mr = mc - t * MR < MR ? mc - t * MR : MR;
                kernel(kpl, A + (size_t)t * kpl * MR, B, Y + (size_t)(m0 + t * MR) * ldy + n0, ldy, mr, nr,
                       !first || accumulate, first && bias ? bias + n0 : NULL);
            }
        }
    }
}

static int linear_with(bf16_kernel kernel, const float *X, int M, int ldx, const cs_bf16_weights *W,
                       const float *bias, int accumulate, float *Y, int ldy, int n_threads) {
    if (M <= 0) return CELLSAM_OK;
    if (n_threads < 1) n_threads = 1;
    const int chunks = (M + MC - 1) / MC;
    const int nt = n_threads < chunks ? n_threads : chunks;
    /* per thread: one MC x KCP slice of X as micro-panels, and one row in bf16 */
    uint32_t *apack = cs_alloc((size_t)nt * MC, KCP * sizeof(uint32_t));
    uint16_t *rows = cs_alloc((size_t)nt, 2 * KCP * sizeof(uint16_t));
    if (!apack || !rows) {
        cs_free(apack);
        cs_free(rows);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory in a bf16 matrix product");
    }
    if (nt == 1) { /* no parallel region: attention calls this per head inside its own */
        for (int ch = 0; ch < chunks; ch++)
            linear_chunk(kernel, X, M, ldx, W, bias, accumulate, Y, ldy, ch, apack, rows);
    } else {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int ch = 0; ch < chunks; ch++) {
            const int tid = omp_get_thread_num();
            linear_chunk(kernel, X, M, ldx, W, bias, accumulate, Y, ldy, ch, apack + (size_t)tid * MC * KCP,
                         rows + (size_t)tid * 2 * KCP);
        }
    }
    cs_free(apack);
    cs_free(rows);
    return CELLSAM_OK;
}

int cs_bf16_linear_portable(const float *X, int M, int ldx, const cs_bf16_weights *W, const float *bias,
                            int accumulate, float *Y, int ldy, int n_threads) {
    return linear_with(kernel_portable, X, M, ldx, W, bias, accumulate, Y, ldy, n_threads);
}

int cs_bf16_linear(const float *X, int M, int ldx, const cs_bf16_weights *W, const float *bias, int accumulate,
                   float *Y, int ldy, int n_threads) {
#ifdef HAVE_AVX512BF16_KERNEL
    if (cs_cpu_has_avx512bf16())
        return linear_with(kernel_avx512bf16, X, M, ldx, W, bias, accumulate, Y, ldy, n_threads);
#endif
    return linear_with(kernel_portable, X, M, ldx, W, bias, accumulate, Y, ldy, n_threads);
}
