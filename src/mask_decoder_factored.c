/* Factored decoding of a batch of prompts (see mask_decoder_factored.h).
 * After layer 0 each prompt has its own image tokens, but they differ from the shared
 * keys0 = E only by terms of low rank. Layer l's image-to-token attention adds to
 * every token r a mix (its attention weights) of R = heads x tokens vectors that are
 * the same for all r, plus the output bias; LayerNorm then rescales each row and adds
 * two constant vectors. So the tokens entering step l are exactly
 *     keys_l[r] = alpha[r] (E[r] * Gamma_l) + sum_j C[j][r] U[j]
 * with Gamma_l the product of the LayerNorm gains so far, U a prompt's m vectors (per
 * layer so far: its R attention vectors, the output bias, the LayerNorm gain and bias,
 * each times the later gains) and C their per-token coefficients (m x 4096). Every
 * product of the tokens with a weight matrix W splits into a shared part, (E * Gamma_l)
 * W^T, computed once per image, and a part of rank m per prompt; the LayerNorm
 * statistics follow from a Gram matrix of U and shared cross terms. Per prompt this
 * trades products with all 4096 x 256 token values (0.73 GFLOP at SAM's size) for
 * products with the 4096 x m coefficients (0.26 GFLOP), at the price of 4.5 GFLOP per
 * image that its prompts share: worth it for a batch (from about 12 prompts), not for
 * one interactive click. In exact arithmetic the result is the same; in float32 it
 * differs by rounding (tests/test_sam.c bounds it). The shared matrices that meet
 * per-head prompt rows are stored by head (fx_block_layout, v_img heads x N x dh). */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "mask_decoder_factored.h"
#include "ops.h"

static const float *fx_attn_gain(const cs_mask_decoder *md, int l) { return md->layers[l].norm4_w; }

/* out = prod_{a <= x < b} gain_x (1 when a == b) */
static void fx_gain_product(const cs_mask_decoder *md, int a, int b, float *out) {
    for (int c = 0; c < md->dim; c++) out[c] = 1.0f;
    for (int x = a; x < b; x++)
        for (int c = 0; c < md->dim; c++) out[c] *= fx_attn_gain(md, x)[c];
}

static const cs_attn *fx_step_attn(const cs_mask_decoder *md, int s) {
    return s < md->depth ? &md->layers[s].t2i : &md->final_attn;
}

void cs_fx_shared_free(struct cs_fx_shared *f) {
    if (!f) return;
    free(f->gamma);
    free(f->w_eff);
    free(f->plain);
    for (int l = 0; l < FX_MAX_DEPTH; l++) {
        free(f->q_img[l]);
        free(f->q_pe[l]);
        free(f->e_mean[l]);
        free(f->e_sq[l]);
        free(f->x_const[l]);
        for (int k = 0; k < FX_MAX_DEPTH; k++) free(f->x_attn[l][k]);
    }
    for (int s = 0; s <= FX_MAX_DEPTH; s++) {
        free(f->k_img[s]);
        free(f->k_pe[s]);
        free(f->v_img[s]);
    }
    free(f);
}

struct cs_fx_shared *cs_fx_shared_new(const cs_mask_decoder *md) {
    const size_t N = 4096, P = (size_t)md->dim, D = (size_t)md->depth;
    struct cs_fx_shared *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->depth = md->depth;
    size_t wmax = 3 * D + 1;
    for (size_t s = 0; s <= D; s++) {
        const size_t I = (size_t)(s < D ? md->layers[s].i2t.internal : 0), J = (size_t)fx_step_attn(md, (int)s)->internal;
        wmax = I > wmax ? I : wmax;
        wmax = J > wmax ? J : wmax;
    }
    int ok = (f->gamma = cs_alloc(D + 1, P * sizeof(float))) && (f->w_eff = cs_alloc(wmax, P * sizeof(float))) &&
             (f->plain = cs_alloc(wmax, N * sizeof(float)));
    for (size_t l = 0; ok && l < D; l++) {
        const size_t I = (size_t)md->layers[l].i2t.internal;
        ok = (f->q_img[l] = cs_alloc(I, N * sizeof(float))) && (f->e_mean[l] = cs_alloc(N, sizeof(float))) &&
             (f->e_sq[l] = cs_alloc(N, sizeof(float))) && (f->x_const[l] = cs_alloc(3 * l + 1, N * sizeof(float))) &&
             (l == 0 || (f->q_pe[l] = cs_alloc(I, N * sizeof(float))));
        for (size_t k = 0; ok && k <= l; k++)
            ok = (f->x_attn[l][k] = cs_alloc((size_t)md->layers[k].i2t.internal, N * sizeof(float))) != NULL;
    }
    for (size_t s = 0; ok && s <= D; s++) { /* step 0's keys hold E + pe: no k_pe */
        const size_t I = (size_t)fx_step_attn(md, (int)s)->internal;
        ok = (f->k_img[s] = cs_alloc(I, N * sizeof(float))) && (!s || (f->k_pe[s] = cs_alloc(I, N * sizeof(float)))) &&
             (f->v_img[s] = cs_alloc(I, N * sizeof(float)));
    }
    if (!ok) {
        cs_fx_shared_free(f);
        return NULL;
    }
    return f;
}

/* Shared matrices read by head_product are stored by head, then by blocks of
 * FX_COLS image tokens, each block d-major (dh x FX_COLS, contiguous): the rows of a
 * plain internal x N layout lie 16 KB apart and alias in the L1 cache. */
#define FX_COLS 16
static void fx_block_layout(const float *src, int I, int heads, float *dst) {
    const int N = 4096, dh = I / heads;
    for (int h = 0; h < heads; h++)
        for (int r0 = 0; r0 < N; r0 += FX_COLS)
            for (int d = 0; d < dh; d++)
                memcpy(dst + (size_t)h * dh * N + (size_t)r0 * dh + (size_t)d * FX_COLS,
                       src + (size_t)(h * dh + d) * N + r0, FX_COLS * sizeof(float));
}

/* out[(h T + t) N + r] (+)= scale[r] sum_d B[t ldb + h dh + d] A[h, d, r]:
 * per head, T rows of B against that head's dh rows of a shared matrix (A in
 * fx_block_layout).
 * Blocks of 4 rows of B by 16 columns of A stay in registers, and each block of A
 * serves all rows of B while it is in cache: the shared matrices (2 MB each at SAM's
 * size) stream from the last-level cache once per prompt. T <= FX_MAX_TOKENS, dh <=
 * FX_MAX_HEAD_DIM. */
static void head_product(const float *A, const float *B, int ldb, int T, int heads, int dh, const float *scale,
                         int accumulate, float *out) {
    enum { N = 4096, TB = 4, RB = FX_COLS };
    static _Thread_local float bpad[FX_MAX_TOKENS * FX_MAX_HEAD_DIM];
    const int ng = (T + TB - 1) / TB;
    for (int h = 0; h < heads; h++) {
        /* B's rows of this head by groups of TB, d-major, zero-padded */
        for (int g = 0; g < ng; g++)
            for (int d = 0; d < dh; d++)
                for (int k = 0; k < TB; k++) {
                    const int t = g * TB + k;
                    bpad[(g * dh + d) * TB + k] = t < T ? B[(size_t)t * ldb + h * dh + d] : 0.0f;
                }
        const float *Ah = A + (size_t)h * dh * N;
        for (int r0 = 0; r0 < N; r0 += RB)
            for (int g = 0; g < ng; g++) {
                const float *Ab = Ah + (size_t)r0 * dh; /* this block of RB columns, d-major */
                const float *bp = bpad + (size_t)g * dh * TB;
                const int nt = T - g * TB < TB ? T - g * TB : TB;
                float acc[TB][RB];
#if defined(__AVX2__) && defined(__FMA__)
                __m256 c[TB][2];
                for (int k = 0; k < TB; k++) c[k][0] = c[k][1] = _mm256_setzero_ps();
                for (int d = 0; d < dh; d++) {
                    const float *a = Ab + (size_t)d * RB;
                    const __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
                    for (int k = 0; k < TB; k++) {
                        const __m256 b = _mm256_broadcast_ss(bp + d * TB + k);
                        c[k][0] = _mm256_fmadd_ps(b, a0, c[k][0]);
                        c[k][1] = _mm256_fmadd_ps(b, a1, c[k][1]);
                    }
                }
                for (int k = 0; k < TB; k++) {
                    _mm256_storeu_ps(acc[k], c[k][0]);
                    _mm256_storeu_ps(acc[k] + 8, c[k][1]);
                }
#else
                memset(acc, 0, sizeof acc);
                for (int d = 0; d < dh; d++)
                    for (int k = 0; k < TB; k++)
                        for (int i = 0; i < RB; i++) acc[k][i] += bp[d * TB + k] * Ab[(size_t)d * RB + i];
#endif
                for (int k = 0; k < nt; k++) {
                    float *o = out + (size_t)(h * T + g * TB + k) * N + r0;
                    for (int i = 0; i < RB; i++) {
                        const float v = scale ? acc[k][i] * scale[r0 + i] : acc[k][i];
                        o[i] = accumulate ? o[i] + v : v;
                    }
                }
            }
    }
}

/* o[i][h dh + d] = sum_r W[(h nq + i) N + r] V[h][r][d]: per head, nq rows of
 * attention weights against that head's N x dh block of V, 4 rows at a time with the
 * accumulators in registers (dh = 8 or 16), or plain loops otherwise. */
#if defined(__AVX2__) && defined(__FMA__)
static inline __attribute__((always_inline)) void head_reduce_block(const float *const w[4], const float *V, int nd,
                                                                    float acc[4][FX_MAX_HEAD_DIM]) {
    __m256 c[4][2];
    for (int k = 0; k < 4; k++) c[k][0] = c[k][1] = _mm256_setzero_ps();
    for (int r = 0; r < 4096; r++) {
        const float *v = V + (size_t)r * 8 * nd;
        const __m256 v0 = _mm256_loadu_ps(v), v1 = nd > 1 ? _mm256_loadu_ps(v + 8) : v0;
        for (int k = 0; k < 4; k++) {
            const __m256 b = _mm256_broadcast_ss(w[k] + r);
            c[k][0] = _mm256_fmadd_ps(b, v0, c[k][0]);
            if (nd > 1) c[k][1] = _mm256_fmadd_ps(b, v1, c[k][1]);
        }
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(acc[k], c[k][0]);
        if (nd > 1) _mm256_storeu_ps(acc[k] + 8, c[k][1]);
    }
}
#endif

static void head_reduce(const float *W, const float *V, int I, int nq, int heads, float *o) {
    enum { N = 4096 };
    const int dh = I / heads;
    float acc[4][FX_MAX_HEAD_DIM];
    for (int h = 0; h < heads; h++)
        for (int i0 = 0; i0 < nq; i0 += 4) {
            const int ni = nq - i0 < 4 ? nq - i0 : 4;
            const float *w[4];
            for (int k = 0; k < 4; k++) w[k] = W + (size_t)(h * nq + i0 + (k < ni ? k : 0)) * N;
            const float *Vh = V + (size_t)h * dh * N;
#if defined(__AVX2__) && defined(__FMA__)
            if (dh == 16)
                head_reduce_block(w, Vh, 2, acc);
            else if (dh == 8)
                head_reduce_block(w, Vh, 1, acc);
            else
#endif
            {
                memset(acc, 0, sizeof acc);
                for (int r = 0; r < N; r++)
                    for (int k = 0; k < 4; k++)
                        for (int d = 0; d < dh; d++) acc[k][d] += w[k][r] * Vh[(size_t)r * dh + d];
            }
            for (int k = 0; k < ni; k++) memcpy(o + (size_t)(i0 + k) * I + h * dh, acc[k], (size_t)dh * sizeof(float));
        }
}

/* out (rows x N) = w_eff E^T + bias (per row; may be NULL), in fx_block_layout by
 * `heads` (plain when 0). */
static void fx_product(struct cs_fx_shared *f, int rows, int P, const float *E, const float *bias, int heads,
                       float *out, int n_threads) {
    float *dst = heads ? f->plain : out;
    cs_gemm(rows, 4096, P, f->w_eff, P, E, P, 1, 0.0f, dst, 4096, n_threads);
    if (bias)
        for (int i = 0; i < rows; i++)
            for (int r = 0; r < 4096; r++) dst[(size_t)i * 4096 + r] += bias[i];
    if (heads) fx_block_layout(f->plain, rows, heads, out);
}

/* out = W E^T + bias with W's columns scaled by gain (W: rows x P, PyTorch layout; gain
 * and bias may be NULL), laid out as fx_product does. */
static void fx_project(struct cs_fx_shared *f, const float *W, int rows, int P, const float *gain, const float *E,
                       const float *bias, int heads, float *out, int n_threads) {
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < P; c++) f->w_eff[(size_t)i * P + c] = W[(size_t)i * P + c] * (gain ? gain[c] : 1.0f);
    fx_product(f, rows, P, E, bias, heads, out, n_threads);
}

/* The shared part of every factored product for the image tokens E (keys0) and pe
 * (both N x P). */
void cs_fx_shared_compute(struct cs_fx_shared *f, const cs_mask_decoder *md, const float *E, const float *E_pe,
                              const float *pe, int n_threads) {
    const int N = 4096, P = md->dim, D = md->depth, H = md->heads;
    float *g = malloc((size_t)2 * P * sizeof(float)), *g2 = g ? g + P : NULL;
    if (!g) return; /* valid stays 0: the direct path runs */
    for (int l = 0; l <= D; l++) fx_gain_product(md, 0, l, f->gamma + (size_t)l * P);
    for (int l = 0; l < D; l++) {
        const cs_attn *a = &md->layers[l].i2t;
        const float *gam = f->gamma + (size_t)l * P;
        const int I = a->internal;
        if (l == 0) {
            fx_project(f, a->q_w, I, P, NULL, E_pe, a->q_b, H, f->q_img[0], n_threads);
        } else {
            fx_project(f, a->q_w, I, P, gam, E, NULL, H, f->q_img[l], n_threads);
            fx_project(f, a->q_w, I, P, NULL, pe, a->q_b, H, f->q_pe[l], n_threads);
        }
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int r = 0; r < N; r++) {
            const float *e = E + (size_t)r * P;
            double s = 0.0, q = 0.0;
            for (int c = 0; c < P; c++) s += (double)e[c] * gam[c];
            const double mu = s / P;
            for (int c = 0; c < P; c++) {
                const double d = (double)e[c] * gam[c] - mu;
                q += d * d;
            }
            f->e_mean[l][r] = (float)mu;
            f->e_sq[l][r] = (float)q;
        }
        /* cross terms with layer k's attention vectors gain_{k..l} * (W_o v), centred:
         * w_eff[i][c] = (gain W_o - column mean)[c][i] * Gamma_l[c] */
        for (int k = 0; k <= l; k++) {
            const cs_attn *ak = &md->layers[k].i2t;
            const int Ik = ak->internal;
            fx_gain_product(md, k, l, g);
            for (int i = 0; i < Ik; i++) {
                double mu = 0.0;
                for (int c = 0; c < P; c++) mu += (double)g[c] * ak->o_w[(size_t)c * Ik + i];
                mu /= P;
                for (int c = 0; c < P; c++)
                    f->w_eff[(size_t)i * P + c] = ((float)((double)g[c] * ak->o_w[(size_t)c * Ik + i] - mu)) * gam[c];
            }
            fx_product(f, Ik, P, E, NULL, H, f->x_attn[l][k], n_threads);
        }
        /* cross terms with the constants, in the basis order: per earlier layer k the
         * output bias, LayerNorm gain and bias (times later gains), then this layer's bias */
        int nc = 0;
        for (int k = 0; k <= l; k++) {
            const int nk = k < l ? 3 : 1;
            for (int j = 0; j < nk; j++) {
                const float *v = j == 0 ? md->layers[k].i2t.o_b : j == 1 ? md->layers[k].norm4_w : md->layers[k].norm4_b;
                fx_gain_product(md, j == 0 ? k : k + 1, l, g2);
                double mu = 0.0;
                for (int c = 0; c < P; c++) mu += (double)v[c] * g2[c];
                mu /= P;
                for (int c = 0; c < P; c++) f->w_eff[(size_t)nc * P + c] = (float)((double)v[c] * g2[c] - mu) * gam[c];
                nc++;
            }
        }
        fx_product(f, nc, P, E, NULL, 0, f->x_const[l], n_threads);
    }
    for (int s = 0; s <= D; s++) {
        const cs_attn *a = fx_step_attn(md, s);
        const float *gam = f->gamma + (size_t)s * P;
        if (s == 0) {
            fx_project(f, a->k_w, a->internal, P, NULL, E_pe, NULL, H, f->k_img[0], n_threads);
        } else {
            fx_project(f, a->k_w, a->internal, P, gam, E, NULL, H, f->k_img[s], n_threads);
            fx_project(f, a->k_w, a->internal, P, NULL, pe, NULL, H, f->k_pe[s], n_threads);
        }
        /* v_img by head: N x dh per head, so that head_reduce streams it in order */
        const int I = a->internal, dh = I / H;
        for (int i = 0; i < I; i++)
            for (int c = 0; c < P; c++) f->w_eff[(size_t)i * P + c] = a->v_w[(size_t)i * P + c] * gam[c];
        cs_gemm(N, I, P, E, P, f->w_eff, P, 1, 0.0f, f->plain, I, n_threads);
        for (int h = 0; h < H; h++)
            for (int r = 0; r < N; r++)
                memcpy(f->v_img[s] + ((size_t)h * N + r) * dh, f->plain + (size_t)r * I + h * dh, (size_t)dh * sizeof(float));
    }
    free(g);
    f->valid = 1;
}

void cs_fx_item_start(cs_fx_item *x) {
    x->m = 0;
    for (int r = 0; r < 4096; r++) x->alpha[r] = 1.0f;
}

/* Rows of the factored basis at most: depth x (heads x tokens + 3). */
static int fx_max_basis(const cs_mask_decoder *md, int T) { return md->depth * (md->heads * T + 3); }

/* The factored path's limits: SAM's decoders (depth 2, head width 16, 7 tokens per
 * box prompt: 118 basis rows) are far inside them. */
int cs_fx_supported(const cs_mask_decoder *md, int T) {
    if (md->depth > FX_MAX_DEPTH || T > FX_MAX_TOKENS || fx_max_basis(md, T) > 512) return 0;
    for (int s = 0; s <= md->depth; s++) {
        const cs_attn *a[2] = {s < md->depth ? &md->layers[s].i2t : NULL, fx_step_attn(md, s)};
        for (int k = 0; k < 2; k++)
            if (a[k] && (a[k]->internal % md->heads || a[k]->internal / md->heads > FX_MAX_HEAD_DIM)) return 0;
    }
    return 1;
}

/* Every buffer of a prompt's state, for allocation and release in one place. */
#define FX_ITEM_BUFFERS(x)                                                                                  \
    float **bufs[] = {&(x)->U,  &(x)->C,     &(x)->Y, &(x)->S,  &(x)->alpha, &(x)->mean, &(x)->cross, &(x)->quad, \
                      &(x)->cu, &(x)->G,     &(x)->umean, &(x)->M, &(x)->UV, &(x)->AC, &(x)->vp, &(x)->gath}

void cs_fx_item_free(cs_fx_item *x) {
    FX_ITEM_BUFFERS(x);
    cs_free_floats(bufs, sizeof bufs / sizeof *bufs);
    x->m = 0;
}

int cs_fx_item_alloc(cs_fx_item *x, const cs_mask_decoder *md, int T) {
    const size_t N = 4096, P = (size_t)md->dim, m = (size_t)fx_max_basis(md, T), R = (size_t)T * md->heads;
    FX_ITEM_BUFFERS(x);
    const size_t count[] = {m * P, m * N, m * N, R * N, N, N, N, N, m * P,
                            m * m, m, R * m, m * P, R * m, (size_t)md->depth * T * P, N * m};
    _Static_assert(sizeof count / sizeof *count == sizeof bufs / sizeof *bufs, "a count per state buffer");
    x->m = 0;
    return cs_alloc_floats(bufs, count, sizeof bufs / sizeof *bufs);
}

/* Layer l's image-to-token attention and LayerNorm on the factored tokens. fw holds
 * the prompt side (i2t_prepare: token keys kp, values vp, attention vectors vf and,
 * for l > 0, the folded keys kf). */
void cs_fx_i2t(const struct cs_fx_shared *f, const cs_mask_decoder *md, int l, const cs_fold_ws *fw, int T, cs_fx_item *x) {
    const int N = 4096, P = md->dim, heads = md->heads, R = T * heads, m = x->m;
    const cs_attn *a = &md->layers[l].i2t;
    const int I = a->internal, dh = I / heads;
    float *p = x->C + (size_t)m * N; /* the new coefficients: attention weights, (h, t) x N */
    if (l == 0) {
        head_product(f->q_img[0], fw->kp, I, T, heads, dh, NULL, 0, p);
    } else {
        head_product(f->q_img[l], fw->kp, I, T, heads, dh, x->alpha, 0, p);
        head_product(f->q_pe[l], fw->kp, I, T, heads, dh, NULL, 1, p);
        cs_gemm(R, m, P, fw->kf, P, x->U, P, 1, 0.0f, x->M, m, 1);
        cs_gemm(R, N, m, x->M, m, x->C, N, 0, 1.0f, p, N, 1);
    }
    /* softmax over each head's tokens, for all image tokens at once */
    const float inv_div = 1.0f / sqrtf((float)dh);
    for (int h = 0; h < heads; h++) {
        float *ph = p + (size_t)h * T * N, *mx = x->mean, *sum = x->quad;
        for (int r = 0; r < N; r++) mx[r] = -INFINITY;
        for (int t = 0; t < T; t++)
            for (int r = 0; r < N; r++) {
                const float v = ph[(size_t)t * N + r] * inv_div;
                ph[(size_t)t * N + r] = v;
                mx[r] = v > mx[r] ? v : mx[r];
            }
        for (int t = 0; t < T; t++)
            for (int r = 0; r < N; r++) ph[(size_t)t * N + r] -= mx[r];
        cs_exp_nonpos(ph, (size_t)T * N);
        for (int r = 0; r < N; r++) sum[r] = 0.0f;
        for (int t = 0; t < T; t++)
            for (int r = 0; r < N; r++) sum[r] += ph[(size_t)t * N + r];
        for (int r = 0; r < N; r++) sum[r] = 1.0f / sum[r];
        for (int t = 0; t < T; t++)
            for (int r = 0; r < N; r++) ph[(size_t)t * N + r] *= sum[r];
    }
    /* the residual's new vectors: the R attention vectors and the output bias */
    memcpy(x->U + (size_t)m * P, fw->vf, (size_t)R * P * sizeof(float));
    memcpy(x->U + (size_t)(m + R) * P, a->o_b, (size_t)P * sizeof(float));
    float *ones = x->C + (size_t)(m + R) * N;
    for (int r = 0; r < N; r++) ones[r] = 1.0f;
    memcpy(x->vp + (size_t)l * T * P, fw->vp, (size_t)T * I * sizeof(float));
    const int mm = m + R + 1;
    /* LayerNorm statistics of x[r] = alpha E[r] Gamma_l + sum_j C[j][r] U[j]:
     * mean = alpha mean(E Gamma_l) + C . mean(U); centred squared norm = alpha^2 |c(E Gamma_l)|^2
     * + 2 alpha C . (E Gamma_l . c(U)) + C^T G C, G = Gram matrix of the centred U */
    for (int j = 0; j < mm; j++) {
        const float *u = x->U + (size_t)j * P;
        double s = 0.0;
        for (int c = 0; c < P; c++) s += u[c];
        x->umean[j] = (float)(s / P);
        for (int c = 0; c < P; c++) x->cu[(size_t)j * P + c] = u[c] - x->umean[j];
    }
    /* C^T G C = sum_j C_j (2 (G' C)_j - G_jj C_j), G' the upper triangle of the symmetric
     * G: half the products of G C */
    cs_gemm(mm, mm, P, x->cu, P, x->cu, P, 1, 0.0f, x->G, mm, 1);
    memcpy(x->Y, x->C, (size_t)mm * N * sizeof(float));
    cs_trmm_upper(mm, N, x->G, mm, x->Y, N);
    for (int r = 0; r < N; r++) x->quad[r] = x->cross[r] = 0.0f, x->mean[r] = 0.0f;
    for (int j = 0; j < mm; j++) {
        const float *c = x->C + (size_t)j * N, *y = x->Y + (size_t)j * N;
        const float um = x->umean[j], gjj = x->G[(size_t)j * mm + j];
        for (int r = 0; r < N; r++) {
            x->quad[r] += c[r] * (2.0f * y[r] - gjj * c[r]);
            x->mean[r] += c[r] * um;
        }
    }
    /* cross terms: attention vectors of layers k <= l, then the constants */
    int nc = 0;
    for (int k = 0; k <= l; k++) {
        const int Ik = md->layers[k].i2t.internal, base = k * (R + 3);
        head_product(f->x_attn[l][k], x->vp + (size_t)k * T * P, Ik, T, heads, Ik / heads, NULL, 0, x->S);
        for (int j = 0; j < R; j++) {
            const float *c = x->C + (size_t)(base + j) * N, *s = x->S + (size_t)j * N;
            for (int r = 0; r < N; r++) x->cross[r] += c[r] * s[r];
        }
        for (int j = 0; j < (k < l ? 3 : 1); j++, nc++) {
            const float *c = x->C + (size_t)(base + R + j) * N, *s = f->x_const[l] + (size_t)nc * N;
            for (int r = 0; r < N; r++) x->cross[r] += c[r] * s[r];
        }
    }
    const float *em = f->e_mean[l], *esq = f->e_sq[l];
    float *inv = x->quad; /* 1 / sigma, in place of the quadratic term */
    for (int r = 0; r < N; r++) {
        const float al = x->alpha[r];
        const float mean = al * em[r] + x->mean[r];
        float var = (al * al * esq[r] + 2.0f * al * x->cross[r] + x->quad[r]) / (float)P;
        var = var > 0.0f ? var : 0.0f;
        inv[r] = 1.0f / sqrtf(var + 1e-5f);
        x->mean[r] = mean;
    }
    /* keys = (x - mean) / sigma * gain + bias */
    const float *gain = md->layers[l].norm4_w, *bias = md->layers[l].norm4_b;
    for (int r = 0; r < N; r++) x->alpha[r] *= inv[r];
    for (int j = 0; j < mm; j++) {
        float *c = x->C + (size_t)j * N, *u = x->U + (size_t)j * P;
        for (int r = 0; r < N; r++) c[r] *= inv[r];
        for (int q = 0; q < P; q++) u[q] *= gain[q];
    }
    float *cg = x->C + (size_t)mm * N, *cb = cg + N;
    for (int r = 0; r < N; r++) cg[r] = -x->mean[r] * inv[r], cb[r] = 1.0f;
    memcpy(x->U + (size_t)mm * P, gain, (size_t)P * sizeof(float));
    memcpy(x->U + (size_t)(mm + 1) * P, bias, (size_t)P * sizeof(float));
    x->m = mm + 2;
}

/* Step s's token-to-image attention (layer s's, or the final one at s = depth) of nq
 * query rows (t2i_prepare's qp and qf in fw) on the factored tokens; writes out (nq x P). */
void cs_fx_t2i(const struct cs_fx_shared *f, const cs_mask_decoder *md, int s, cs_fold_ws *fw, int nq, cs_fx_item *x,
                   float *out) {
    const int N = 4096, P = md->dim, heads = md->heads, R2 = nq * heads, m = x->m;
    const cs_attn *a = fx_step_attn(md, s);
    const int I = a->internal, dh = I / heads;
    float *S = x->S;
    head_product(f->k_img[s], fw->qp, I, nq, heads, dh, x->alpha, 0, S);
    if (f->k_pe[s]) head_product(f->k_pe[s], fw->qp, I, nq, heads, dh, NULL, 1, S);
    cs_gemm(R2, m, P, fw->qf, P, x->U, P, 1, 0.0f, x->M, m, 1);
    cs_gemm(R2, N, m, x->M, m, x->C, N, 0, 1.0f, S, N, 1);
    const float inv_div = 1.0f / sqrtf((float)dh);
    for (int r = 0; r < R2; r++) {
        float *row = S + (size_t)r * N;
        for (int j = 0; j < N; j++) row[j] *= inv_div;
        cs_softmax_row(row, N);
    }
    /* sum_r A[r] keys[r] = (A alpha) E Gamma_s + (A C^T) U, each then through W_v */
    cs_gemm(R2, m, N, S, N, x->C, N, 1, 0.0f, x->AC, m, 1);
    for (int r = 0; r < R2; r++)
        for (int j = 0; j < N; j++) S[(size_t)r * N + j] *= x->alpha[j];
    cs_gemm(m, I, P, x->U, P, a->v_w, P, 1, 0.0f, x->UV, I, 1);
    head_reduce(S, f->v_img[s], I, nq, heads, fw->o);
    for (int h = 0; h < heads; h++) {
        cs_gemm(nq, dh, m, x->AC + (size_t)h * nq * m, m, x->UV + h * dh, I, 0, 1.0f, fw->o + h * dh, I, 1);
    }
    for (int i = 0; i < nq; i++) cs_add(fw->o + (size_t)i * I, a->v_b, (size_t)I);
    cs_linear(fw->o, nq, I, a->o_w, a->o_b, P, out, 1);
}

/* The tokens tok[0..n) (all N in order when tok is NULL) of the factored keys, as
 * rows (n x P). */
void cs_fx_rows(const struct cs_fx_shared *f, const cs_mask_decoder *md, const float *E, cs_fx_item *x,
                    const int *tok, int n, float *rows) {
    const int N = 4096, P = md->dim, m = x->m;
    const float *gam = f->gamma + (size_t)md->depth * P;
    for (int i = 0; i < n; i++) {
        const int r = tok ? tok[i] : i;
        for (int j = 0; j < m; j++) x->gath[(size_t)i * m + j] = x->C[(size_t)j * N + r];
    }
    cs_gemm(n, P, m, x->gath, m, x->U, P, 0, 0.0f, rows, P, 1);
    for (int i = 0; i < n; i++) {
        const int r = tok ? tok[i] : i;
        const float al = x->alpha[r], *e = E + (size_t)r * P;
        float *o = rows + (size_t)i * P;
        for (int c = 0; c < P; c++) o[c] += al * e[c] * gam[c];
    }
}

