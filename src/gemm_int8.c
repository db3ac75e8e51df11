/* 8-bit integer matrix products with exact 32-bit sums (opt-in precision).
 *
 * Why: on an AVX2-only CPU (the Zen 3 of baseline.md) float32 FMA does 16
 * multiply-adds per cycle per core, and the BLAS is already at 0.9 of that. The
 * integer route, VPMADDUBSW (u8 x s8 -> pairs summed to s16) then VPMADDWD by 1
 * (-> s32), does 32 per cycle on the same two pipes. AVX512-VNNI's VPDPBUSD does
 * the same four-term dot product in one instruction, on 16 columns at once.
 *
 * Quantisation, chosen so that no step can overflow or saturate:
 *  - weights: per output column, symmetric, 7 bits: |q| <= 63, scale = max|w| / 63;
 *  - activations: per row (token), symmetric, 8 bits: |qx| <= 127, stored as the
 *    unsigned byte qx + 128 (VPMADDUBSW and VPDPBUSD take one unsigned operand); the
 *    offset is removed at the end with each column's sum of q;
 *  - a VPMADDUBSW pair is at most 2 x 255 x 63 = 32130 < 32767, so it never
 *    saturates, and the s32 sums are exact (k <= 2^16 terms of at most 255 x 63).
 * The result is therefore the same integer on every kernel; only the final
 * float scaling rounds.
 *
 * Blocking: each thread takes MC rows of X, quantises them whole (a row's scale
 * needs its whole length) into micro-panels of MR rows ([quad][row] words: one
 * broadcast each), and runs every 16-column weight panel over them; the weight
 * panel (k/4 x 64 bytes, at most 48 KB) stays in L1/L2 across the micro-panels.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "cpu.h"
#include "gemm_int8.h"
#include "weights.h"

#define NR 16       /* columns per weight panel: 16 x 4 bytes = 64 bytes per quad */
#define MR_MAX 12   /* rows per micro-tile, the largest kernel's */
#define MC 96       /* rows per thread chunk: a multiple of every kernel's MR */
#define Q_W 63      /* weight levels: 7 bits, so that VPMADDUBSW pairs cannot saturate */
#define Q_X 127     /* activation levels */
#define X_OFFSET 128
#define MAX_K (1 << 16)
#define ROUND_MAGIC 12582912.0f /* 1.5 x 2^23: adding and subtracting it rounds |v| < 2^22 */

enum { K_BEST = 0, K_PORTABLE = 1, K_AVX2 = 2, K_VNNI = 3 };

/* ------------------------------------------------------------------ weights */

/* Quantise and lay out weight panel j; column c of W is row c of the source, whose rows
 * are `ld` values apart. */
static void pack_panel(cs_int8_weights *w, int j, const float *src32, const uint16_t *src16, int dtype16, size_t ld,
                       float *row) {
    const int n = w->n, k = w->k, kq = w->k_quads;
    int8_t *panel = w->data + (size_t)j * kq * NR * 4;
    for (int c = 0; c < NR; c++) {
        const int col = j * NR + c;
        float mx = 0;
        if (col < n) {
            for (int i = 0; i < k; i++) {
                const float v = src32 ? src32[(size_t)col * ld + i]
                                      : dtype16 == CS_DTYPE_BF16 ? cs_bf16_to_f32(src16[(size_t)col * ld + i])
                                                                 : cs_f16_to_f32(src16[(size_t)col * ld + i]);
                row[i] = v;
                const float a = fabsf(v);
                mx = a > mx ? a : mx;
                if (!isfinite(v)) mx = INFINITY; /* refused by the caller */
            }
        }
        const float inv = mx > 0 && isfinite(mx) ? Q_W / mx : 0;
        int32_t sum = 0;
        for (int i = 0; i < 4 * kq; i++) {
            int q = 0;
            if (col < n && i < k) {
                q = (int)lrintf(row[i] * inv);
                q = q > Q_W ? Q_W : q < -Q_W ? -Q_W : q;
            }
            panel[((size_t)(i / 4) * NR + c) * 4 + (i & 3)] = (int8_t)q;
            sum += q;
        }
        w->scale[(size_t)j * NR + c] = mx / Q_W;
        w->colsum[(size_t)j * NR + c] = sum;
    }
}

int cs_int8_weights_pack(cs_int8_weights *w, const float *src32, const uint16_t *src16, int dtype16, int n, int k,
                         int n_threads) {
    memset(w, 0, sizeof *w);
    if (n <= 0 || k <= 0 || (!src32 && !src16)) return cs_error(CELLSAM_ERR_INVALID, "int8 pack: empty matrix");
    if (k > MAX_K || (size_t)n * (size_t)k > ((size_t)1 << 31))
        return cs_error(CELLSAM_ERR_LIMIT, "int8 pack: matrix %d x %d too large", n, k);
    w->n = n;
    w->k = k;
    w->k_quads = (k + 3) / 4;
    w->n_panels = (n + NR - 1) / NR;
    const int nt = n_threads > 0 ? n_threads : 1;
    w->data = cs_alloc((size_t)w->n_panels * NR, (size_t)w->k_quads * 4);
    w->scale = cs_alloc((size_t)w->n_panels * NR, sizeof(float));
    w->colsum = cs_alloc((size_t)w->n_panels * NR, sizeof(int32_t));
    float *rows = cs_alloc((size_t)nt, (size_t)k * sizeof(float));
    if (!w->data || !w->scale || !w->colsum || !rows) {
        cs_free(rows);
        cs_int8_weights_free(w);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory packing int8 weights");
    }
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int j = 0; j < w->n_panels; j++)
        pack_panel(w, j, src32, src16, dtype16, (size_t)k, rows + (size_t)omp_get_thread_num() * k);
    cs_free(rows);
    for (int j = 0; j < w->n; j++)
        if (!isfinite(w->scale[j])) {
            cs_int8_weights_free(w);
            return cs_error(CELLSAM_ERR_INVALID, "int8 pack: column %d of a %d x %d matrix is not finite", j, n, k);
        }
    return CELLSAM_OK;
}

void cs_int8_weights_free(cs_int8_weights *w) {
    if (!w) return;
    cs_free(w->data);
    cs_free(w->scale);
    cs_free(w->colsum);
    memset(w, 0, sizeof *w);
}

size_t cs_int8_packed_bytes(int n, int k) {
    const size_t cols = (size_t)(n + NR - 1) / NR * NR, kq = (size_t)(k + 3) / 4;
    return cols * kq * 4 + cols * (sizeof(float) + sizeof(int32_t));
}

int cs_int8_pack_strided(cs_int8_weights *w, void *buf, const float *src, size_t ld, int n, int k, float *row) {
    memset(w, 0, sizeof *w);
    if (n <= 0 || k <= 0 || k > MAX_K) return cs_error(CELLSAM_ERR_INVALID, "int8 pack: %d x %d", n, k);
    w->n = n;
    w->k = k;
    w->k_quads = (k + 3) / 4;
    w->n_panels = (n + NR - 1) / NR;
    const size_t cols = (size_t)w->n_panels * NR;
    w->scale = buf; /* floats and int32s first: the buffer's alignment suits them */
    w->colsum = (int32_t *)(w->scale + cols);
    w->data = (int8_t *)(w->colsum + cols);
    for (int j = 0; j < w->n_panels; j++) pack_panel(w, j, src, NULL, 0, ld, row);
    for (int j = 0; j < n; j++)
        if (!isfinite(w->scale[j])) return cs_error(CELLSAM_ERR_INVALID, "int8 pack: row %d is not finite", j);
    return CELLSAM_OK;
}

/* ------------------------------------------------------------- activations */

/* Rows [m0, m0+mc) of X quantised into micro-panels of mr rows: word (quad p, row r)
 * of panel t at A[(t * kq + p) * mr + r], 4 offset bytes; rows past mc and k past K
 * are the offset (zero). sx[r] = the row's scale. */
static void pack_rows(const float *X, int ldx, int K, int kq, int m0, int mc, int mr, uint32_t *A, float *sx,
                      uint8_t *row8) {
    const int panels = (mc + mr - 1) / mr;
    for (int t = 0; t < panels; t++)
        for (int r = 0; r < mr; r++) {
            const int m = t * mr + r;
            uint32_t *dst = A + (size_t)t * kq * mr + r;
            memset(row8, X_OFFSET, (size_t)kq * 4);
            float mx = 0;
            if (m < mc) {
                const float *x = X + (size_t)(m0 + m) * ldx;
                for (int i = 0; i < K; i++) {
                    const float a = fabsf(x[i]);
                    mx = a > mx ? a : mx;
                }
                const float inv = mx > 0 && isfinite(mx) ? Q_X / mx : 0;
                for (int i = 0; i < K; i++) { /* vectorises: no libm call */
                    float v = x[i] * inv;
                    v = v < Q_X ? v : Q_X; /* a NaN becomes Q_X here */
                    v = v > -Q_X ? v : -Q_X;
                    v = (v + ROUND_MAGIC) - ROUND_MAGIC; /* to nearest even, as lrintf */
                    row8[i] = (uint8_t)(X_OFFSET + (int)v);
                }
                sx[m] = mx / Q_X;
            }
            for (int p = 0; p < kq; p++) {
                uint32_t word;
                memcpy(&word, row8 + 4 * p, 4);
                dst[(size_t)p * mr] = word;
            }
        }
}

/* C[r][j] = (load_c ? C : 0) + sx[r] sw[j] (acc[r][j] - 128 colsum[j]) + bias[j]. */
static inline void store_tile(const int32_t *acc, const float *sx, const float *sw, const int32_t *colsum, float *C,
                              int ldc, int mr, int nr, int load_c, const float *bias) {
    for (int r = 0; r < mr; r++) {
        float *c = C + (size_t)r * ldc;
        for (int j = 0; j < nr; j++) {
            float v = sx[r] * sw[j] * (float)(acc[r * NR + j] - X_OFFSET * colsum[j]);
            if (load_c) v += c[j];
            if (bias) v += bias[j];
            c[j] = v;
        }
    }
}

typedef void (*int8_kernel)(int kq, const uint32_t *A, const int8_t *B, int32_t *acc);

#define MR_PORTABLE 4
static void kernel_portable(int kq, const uint32_t *A, const int8_t *B, int32_t *acc) {
    memset(acc, 0, (size_t)MR_PORTABLE * NR * sizeof *acc);
    for (int p = 0; p < kq; p++) {
        const int8_t *b = B + (size_t)p * NR * 4;
        for (int r = 0; r < MR_PORTABLE; r++) {
            uint8_t a[4];
            memcpy(a, A + (size_t)p * MR_PORTABLE + r, 4);
            for (int j = 0; j < NR; j++)
                acc[r * NR + j] += a[0] * b[4 * j] + a[1] * b[4 * j + 1] + a[2] * b[4 * j + 2] + a[3] * b[4 * j + 3];
        }
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86_KERNELS 1
#define MR_AVX2 4 /* 8 accumulators + 2 weight registers + ones + broadcast + temporaries */
__attribute__((target("avx2"))) static void kernel_avx2(int kq, const uint32_t *A, const int8_t *B, int32_t *acc) {
    __m256i c0[MR_AVX2], c1[MR_AVX2];
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < MR_AVX2; r++) c0[r] = c1[r] = _mm256_setzero_si256();
    for (int p = 0; p < kq; p++) {
        const __m256i b0 = _mm256_loadu_si256((const __m256i *)(B + (size_t)p * NR * 4));
        const __m256i b1 = _mm256_loadu_si256((const __m256i *)(B + (size_t)p * NR * 4 + 32));
        const uint32_t *a = A + (size_t)p * MR_AVX2;
#pragma GCC unroll 4
        for (int r = 0; r < MR_AVX2; r++) {
            const __m256i ar = _mm256_set1_epi32((int)a[r]);
            c0[r] = _mm256_add_epi32(c0[r], _mm256_madd_epi16(_mm256_maddubs_epi16(ar, b0), ones));
            c1[r] = _mm256_add_epi32(c1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(ar, b1), ones));
        }
    }
    for (int r = 0; r < MR_AVX2; r++) {
        _mm256_storeu_si256((__m256i *)(acc + r * NR), c0[r]);
        _mm256_storeu_si256((__m256i *)(acc + r * NR + 8), c1[r]);
    }
}

#define MR_VNNI 12
__attribute__((target("avx512f,avx512vnni"))) static void kernel_vnni(int kq, const uint32_t *A, const int8_t *B,
                                                                      int32_t *acc) {
    __m512i c[MR_VNNI];
#pragma GCC unroll 12
    for (int r = 0; r < MR_VNNI; r++) c[r] = _mm512_setzero_si512();
    for (int p = 0; p < kq; p++) {
        const __m512i b = _mm512_loadu_si512(B + (size_t)p * NR * 4);
        const uint32_t *a = A + (size_t)p * MR_VNNI;
#pragma GCC unroll 12
        for (int r = 0; r < MR_VNNI; r++) c[r] = _mm512_dpbusd_epi32(c[r], _mm512_set1_epi32((int)a[r]), b);
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR_VNNI; r++) _mm512_storeu_si512(acc + r * NR, c[r]);
}
#endif

/* ---------------------------------------------------------------- products */

typedef struct {
    int8_kernel fn;
    int mr;
} kernel_choice;

static int choose(int which, kernel_choice *k) {
    if (which == K_BEST) which = cs_int8_best_kernel();
    switch (which) {
    case K_PORTABLE: *k = (kernel_choice){kernel_portable, MR_PORTABLE}; return CELLSAM_OK;
#ifdef HAVE_X86_KERNELS
    case K_AVX2:
        if (!cs_cpu_has_avx2()) break;
        *k = (kernel_choice){kernel_avx2, MR_AVX2};
        return CELLSAM_OK;
    case K_VNNI:
        if (!cs_cpu_has_avx512vnni()) break;
        *k = (kernel_choice){kernel_vnni, MR_VNNI};
        return CELLSAM_OK;
#endif
    default: break;
    }
    return cs_error(CELLSAM_ERR_INVALID, "int8 kernel %s is not available on this CPU", cs_int8_kernel_name(which));
}

static pthread_once_t best_once = PTHREAD_ONCE_INIT;
static int best_kernel = K_PORTABLE;

static void pick_best(void) {
#ifdef HAVE_X86_KERNELS
    if (cs_cpu_has_avx2()) best_kernel = K_AVX2;
    if (cs_cpu_has_avx512vnni()) best_kernel = K_VNNI;
    /* CELLSAM_INT8_KERNEL=avx2|portable holds a faster CPU to a slower kernel, as
     * OPENBLAS_CORETYPE does for the BLAS (benchmarks for the reference machine) */
    const char *e = getenv("CELLSAM_INT8_KERNEL");
    if (e && !strcmp(e, "portable")) best_kernel = K_PORTABLE;
    if (e && !strcmp(e, "avx2") && cs_cpu_has_avx2()) best_kernel = K_AVX2;
#endif
}

int cs_int8_best_kernel(void) {
    pthread_once(&best_once, pick_best);
    return best_kernel;
}

const char *cs_int8_kernel_name(int kernel) {
    switch (kernel) {
    case K_PORTABLE: return "portable";
    case K_AVX2: return "AVX2";
    case K_VNNI: return "AVX512-VNNI";
    default: return "unknown";
    }
}

/* Rows [ch * MC, ch * MC + MC) of the product, all columns. */
static void linear_chunk(const kernel_choice *kc, const float *X, int M, int ldx, const cs_int8_weights *W,
                         const float *bias, int accumulate, float *Y, int ldy, int ch, uint32_t *A, float *sx,
                         uint8_t *row8) {
    const int kq = W->k_quads, mr = kc->mr;
    const int m0 = ch * MC, mc = M - m0 < MC ? M - m0 : MC;
    const int panels = (mc + mr - 1) / mr;
    int32_t acc[MR_MAX * NR];
    pack_rows(X, ldx, W->k, kq, m0, mc, mr, A, sx, row8);
    for (int j = 0; j < W->n_panels; j++) {
        const int8_t *B = W->data + (size_t)j * kq * NR * 4;
        const int n0 = j * NR, nr = W->n - n0 < NR ? W->n - n0 : NR;
        for (int t = 0; t < panels; t++) {
            const int rows = mc - t * mr < mr ? mc - t * mr : mr;
            kc->fn(kq, A + (size_t)t * kq * mr, B, acc);
            store_tile(acc, sx + t * mr, W->scale + n0, W->colsum + n0, Y + (size_t)(m0 + t * mr) * ldy + n0, ldy,
                       rows, nr, accumulate, bias ? bias + n0 : NULL);
        }
    }
}

int cs_int8_linear_with(int kernel, const float *X, int M, int ldx, const cs_int8_weights *W, const float *bias,
                        int accumulate, float *Y, int ldy, int n_threads) {
    kernel_choice kc;
    int rc = choose(kernel, &kc);
    if (rc || M <= 0) return rc;
    if (n_threads < 1) n_threads = 1;
    const int chunks = (M + MC - 1) / MC;
    const int nt = n_threads < chunks ? n_threads : chunks;
    const size_t kbytes = (size_t)W->k_quads * 4;
    /* per thread: MC rows as micro-panels, their scales, and one row of bytes */
    uint32_t *apack = cs_alloc((size_t)nt * MC, kbytes);
    float *sx = cs_alloc((size_t)nt * MC, sizeof(float));
    uint8_t *rows = cs_alloc((size_t)nt, kbytes);
    if (!apack || !sx || !rows) {
        cs_free(apack);
        cs_free(sx);
        cs_free(rows);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory in an int8 matrix product");
    }
    if (nt == 1) {
        for (int ch = 0; ch < chunks; ch++)
            linear_chunk(&kc, X, M, ldx, W, bias, accumulate, Y, ldy, ch, apack, sx, rows);
    } else {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int ch = 0; ch < chunks; ch++) {
            const int tid = omp_get_thread_num();
            linear_chunk(&kc, X, M, ldx, W, bias, accumulate, Y, ldy, ch, apack + (size_t)tid * MC * W->k_quads,
                         sx + (size_t)tid * MC, rows + (size_t)tid * kbytes);
        }
    }
    cs_free(apack);
    cs_free(sx);
    cs_free(rows);
    return CELLSAM_OK;
}

int cs_int8_linear(const float *X, int M, int ldx, const cs_int8_weights *W, const float *bias, int accumulate,
                   float *Y, int ldy, int n_threads) {
    return cs_int8_linear_with(K_BEST, X, M, ldx, W, bias, accumulate, Y, ldy, n_threads);
}
