/* SAM mask decoder (spec §4.4): two-way transformer between prompt tokens and image
 * tokens, transposed-convolution upscaler, hypernetwork MLPs and the IoU head.
 * Image tokens are channel-last (4096 x P). With a shared dense prompt (no mask
 * input), layer 0's token-to-image keys and values are identical for every prompt,
 * so they are projected once per call and reused across the batch. Prompts run in
 * parallel, one per thread; the IoU head runs before the upscaler so that prompts
 * whose mask will be dropped skip it. */
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "mask_decoder_factored.h"
#include "model.h"
#include "ops.h"

typedef struct {
    float *qp, *kp, *vp, *scores, *o; /* attention scratch */
} attn_ws;

/* SAM Attention: out[nq, P] = out_proj(concat_h softmax(q_h k_h^T / sqrt(d)) v_h).
 * kp/vp may be given pre-projected (then k_in/v_in are ignored). */
static void attention(const cs_attn *a, int P, int heads, const float *q_in, int nq, const float *k_in,
                      const float *v_in, int nk, const float *kp_pre, const float *vp_pre, float *out,
                      attn_ws *ws, int n_threads) {
    const int I = a->internal, dh = I / heads;
    const float *qp = ws->qp;
    cs_linear(q_in, nq, P, a->q_w, a->q_b, I, ws->qp, n_threads);
    const float *kp = kp_pre, *vp = vp_pre;
    if (!kp) {
        cs_linear(k_in, nk, P, a->k_w, a->k_b, I, ws->kp, n_threads);
        kp = ws->kp;
    }
    if (!vp) {
        cs_linear(v_in, nk, P, a->v_w, a->v_b, I, ws->vp, n_threads);
        vp = ws->vp;
    }
    const float div = sqrtf((float)dh);
    for (int h = 0; h < heads; h++) {
        cs_gemm(nq, nk, dh, qp + h * dh, I, kp + h * dh, I, 1, 0.0f, ws->scores, nk, n_threads);
#pragma omp parallel for num_threads(n_threads) schedule(static) if (nq > 256)
        for (int i = 0; i < nq; i++) {
            float *row = ws->scores + (size_t)i * nk;
            for (int j = 0; j < nk; j++) row[j] /= div;
            cs_softmax_row(row, nk);
        }
        cs_gemm(nq, dh, nk, ws->scores, nk, vp + h * dh, I, 0, 0.0f, ws->o + h * dh, I, n_threads);
    }
    cs_linear(ws->o, nq, I, a->o_w, a->o_b, P, out, n_threads);
}

static void add_into(float *dst, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = a[i] + b[i];
}

/* ---- fused passes over the image tokens ----
 * After layer 0, every prompt has its own 4096 image tokens, and each remaining
 * attention between them and the prompt tokens is a thin product (4096 x 256 against
 * heads x tokens). Done one op at a time, each op streams the 4 MB token matrix
 * through memory again. Instead one pass over blocks of IMG_BLOCK tokens applies
 * layer l-1's image-to-token attention and LayerNorm to the block (row-local), then
 * feeds the updated block to layer l's token-to-image attention with an online
 * softmax (running max and sum per query row), all while the block is in cache.
 * Both attentions fold their projections into the token side:
 *   image-to-token: scores_h = q_in (W_q,h^T k_h) + b_q,h . k_h and
 *     out = sum_h attn_h (v_h W_o,h^T) + b_o, so the image-sized products have
 *     heads x tokens columns instead of the internal width;
 *   token-to-image: scores_h = (q_h W_k,h) k_in^T (q_h . b_k,h is the same for every
 *     key, and softmax ignores it) and, as each row of attn sums to 1,
 *     attn_h (v_in W_v,h^T + b_v,h) = (attn_h v_in) W_v,h^T + b_v,h.
 * Rows or columns r = h * n + t belong to head h, token t. */
#define IMG_BLOCK 256

/* Per-thread block scratch and online-softmax accumulators. */
typedef struct {
    float *kpe_in, *kpe, *sc, *out, *s; /* B x P, B x P, B x R, B x P, R2 x B */
    float *m, *l, *acc;                 /* R2, R2, R2 x P */
} block_ws;

/* Image-to-token attention folded from the prompt tokens. */
typedef struct {
    const cs_attn *a;
    const float *qp_pre; /* layer 0: the image tokens' query projections, shared (N x I) */
    const float *kf;     /* R x P folded keys; with qp_pre, the nk x I key projections */
    const float *vf;     /* R x P folded values */
    const float *cb;     /* R query-bias terms */
    const float *norm_w, *norm_b;
    int nk;
} i2t_fold;

/* Token-to-image attention folded from nq query rows. */
typedef struct {
    const float *qf; /* R2 x P */
    int nq, dh;
} t2i_fold;

static void i2t_prepare(const cs_attn *a, int P, int heads, const float *tok_pe, const float *tok, int nk,
                        const float *qp_pre, const float *norm_w, const float *norm_b, cs_fold_ws *f, i2t_fold *out) {
    const int I = a->internal, dh = I / heads, R = nk * heads;
    cs_linear(tok_pe, nk, P, a->k_w, a->k_b, I, f->kp, 1);
    cs_linear(tok, nk, P, a->v_w, a->v_b, I, f->vp, 1);
    for (int h = 0; h < heads; h++)
        cs_gemm(nk, P, dh, f->vp + h * dh, I, a->o_w + h * dh, I, 1, 0.0f, f->vf + (size_t)h * nk * P, P, 1);
    if (qp_pre) { /* the queries come projected: scores are per head against kp */
        for (int c = 0; c < R; c++) f->cb[c] = 0.0f;
    } else {
        for (int h = 0; h < heads; h++) {
            cs_gemm(nk, P, dh, f->kp + h * dh, I, a->q_w + (size_t)h * dh * P, P, 0, 0.0f, f->kf + (size_t)h * nk * P,
                    P, 1);
            for (int t = 0; t < nk; t++) {
                float sum = 0.0f;
                for (int c = 0; c < dh; c++) sum += a->q_b[h * dh + c] * f->kp[(size_t)t * I + h * dh + c];
                f->cb[h * nk + t] = sum;
            }
        }
    }
    out->a = a;
    out->qp_pre = qp_pre;
    out->kf = qp_pre ? f->kp : f->kf;
    out->vf = f->vf;
    out->cb = f->cb;
    out->norm_w = norm_w;
    out->norm_b = norm_b;
    out->nk = nk;
}

static void t2i_prepare(const cs_attn *a, int P, int heads, const float *q_in, int nq, cs_fold_ws *f, t2i_fold *out) {
    const int I = a->internal, dh = I / heads;
    cs_linear(q_in, nq, P, a->q_w, a->q_b, I, f->qp, 1);
    for (int h = 0; h < heads; h++)
        cs_gemm(nq, P, dh, f->qp + h * dh, I, a->k_w + (size_t)h * dh * P, P, 0, 0.0f, f->qf + (size_t)h * nq * P, P,
                1);
    out->qf = f->qf;
    out->nq = nq;
    out->dh = dh;
}

/* Image-to-token attention + residual + LayerNorm on B image tokens: out_keys =
 * LN(kin + attn(kin + pe)). out_keys may equal kin. */
static void i2t_block(const i2t_fold *f, int P, int heads, const float *kin, const float *pe, const float *qp_pre,
                      int B, float *out_keys, block_ws *bw) {
    const int I = f->a->internal, dh = I / heads, R = f->nk * heads;
    if (qp_pre) {
        for (int h = 0; h < heads; h++)
            cs_gemm(B, f->nk, dh, qp_pre + h * dh, I, f->kf + h * dh, I, 1, 0.0f, bw->sc + h * f->nk, R, 1);
    } else {
        add_into(bw->kpe_in, kin, pe, (size_t)B * P);
        cs_gemm(B, R, P, bw->kpe_in, P, f->kf, P, 1, 0.0f, bw->sc, R, 1);
    }
    const float div = sqrtf((float)dh);
    for (int j = 0; j < B; j++) {
        float *row = bw->sc + (size_t)j * R;
        for (int c = 0; c < R; c++) row[c] = (row[c] + f->cb[c]) / div;
        cs_softmax_groups(row, heads, f->nk);
    }
    cs_gemm(B, P, R, bw->sc, R, f->vf, P, 0, 0.0f, bw->out, P, 1);
    for (int j = 0; j < B; j++) {
        float *o = bw->out + (size_t)j * P, *k = out_keys + (size_t)j * P;
        const float *ki = kin + (size_t)j * P;
        for (int c = 0; c < P; c++) k[c] = ki[c] + (o[c] + f->a->o_b[c]);
    }
    cs_layernorm(out_keys, out_keys, B, P, f->norm_w, f->norm_b, 1e-5f, 1);
}

static void acc_reset(block_ws *bw, int R2, int P) {
    for (int r = 0; r < R2; r++) bw->m[r] = -INFINITY, bw->l[r] = 0.0f;
    memset(bw->acc, 0, (size_t)R2 * P * sizeof(float));
}

static void scale_row(float *x, float c, int n) {
    for (int i = 0; i < n; i++) x[i] *= c;
}

/* Token-to-image attention over B image tokens, into the online-softmax accumulators:
 * per query row, m = running max of the scores, l = sum of exp(score - m), acc = sum of
 * exp(score - m) * image token. */
static void t2i_block(const t2i_fold *f, int P, int heads, const float *keys, const float *pe, int B,
                      block_ws *bw) {
    const int R2 = f->nq * heads, dh = f->dh;
    add_into(bw->kpe, keys, pe, (size_t)B * P);
    cs_gemm(R2, B, P, f->qf, P, bw->kpe, P, 1, 0.0f, bw->s, B, 1);
    const float div = sqrtf((float)dh);
    for (int r = 0; r < R2; r++) {
        float *row = bw->s + (size_t)r * B, bm = -INFINITY;
        for (int j = 0; j < B; j++) {
            row[j] /= div;
            bm = row[j] > bm ? row[j] : bm;
        }
        const float sum = cs_exp_row_sum(row, B); /* row = exp(row - bm) */
        const float mn = bm > bw->m[r] ? bm : bw->m[r];
        const float c_old = expf(bw->m[r] - mn), c_new = expf(bm - mn);
        if (c_new != 1.0f) scale_row(row, c_new, B);
        if (c_old != 1.0f) scale_row(bw->acc + (size_t)r * P, c_old, P);
        bw->l[r] = bw->l[r] * c_old + sum * c_new;
        bw->m[r] = mn;
    }
    cs_gemm(R2, P, B, bw->s, B, keys, P, 0, 1.0f, bw->acc, P, 1);
}

/* Fold thread t's accumulators into thread 0's. */
static void acc_merge(block_ws *to, const block_ws *from, int R2, int P) {
    for (int r = 0; r < R2; r++) {
        if (from->m[r] == -INFINITY) continue;
        const float mn = from->m[r] > to->m[r] ? from->m[r] : to->m[r];
        const float c_to = expf(to->m[r] - mn), c_from = expf(from->m[r] - mn);
        float *a = to->acc + (size_t)r * P;
        const float *b = from->acc + (size_t)r * P;
        for (int c = 0; c < P; c++) a[c] = a[c] * c_to + b[c] * c_from;
        to->l[r] = to->l[r] * c_to + from->l[r] * c_from;
        to->m[r] = mn;
    }
}

/* The token-to-image attention's output rows (nq x P) from the accumulators. */
static void t2i_finish(const cs_attn *a, const t2i_fold *f, int P, int heads, const block_ws *bw, cs_fold_ws *fw,
                       float *out) {
    const int I = a->internal, dh = I / heads, nq = f->nq, R2 = nq * heads;
    for (int r = 0; r < R2; r++) {
        const float inv = 1.0f / bw->l[r];
        for (int c = 0; c < P; c++) fw->rv[(size_t)r * P + c] = bw->acc[(size_t)r * P + c] * inv;
    }
    for (int h = 0; h < heads; h++) {
        cs_gemm(nq, dh, P, fw->rv + (size_t)h * nq * P, P, a->v_w + (size_t)h * dh * P, P, 1, 0.0f, fw->o + h * dh, I,
                1);
        for (int i = 0; i < nq; i++) cs_add(fw->o + (size_t)i * I + h * dh, a->v_b + h * dh, (size_t)dh);
    }
    cs_linear(fw->o, nq, I, a->o_w, a->o_b, P, out, 1);
}

/* One pass over the image tokens, block by block: with `ia`, keys_out = LN(kin +
 * image-to-token attention) (kin may be keys_out); then the token-to-image attention
 * `ta` accumulates over the resulting tokens into bws[0]. With n_threads > 1 the
 * blocks are split between threads, each with its own accumulators, merged at the end. */
static void image_pass(const cs_mask_decoder *md, const float *pe, const i2t_fold *ia, const float *kin,
                       float *keys_out, const t2i_fold *ta, block_ws *bws, int n_threads) {
    const int P = md->dim, heads = md->heads, N = 4096, nblk = N / IMG_BLOCK, R2 = ta->nq * heads;
    int team = 1;
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        block_ws *bw = &bws[t];
        if (t == 0) team = nt;
        acc_reset(bw, R2, P);
        const int b0 = (int)((long long)nblk * t / nt), b1 = (int)((long long)nblk * (t + 1) / nt);
        for (int b = b0; b < b1; b++) {
            const size_t r0 = (size_t)b * IMG_BLOCK;
            const float *k = kin + r0 * P;
            if (ia) {
                i2t_block(ia, P, heads, k, pe + r0 * P, ia->qp_pre ? ia->qp_pre + r0 * ia->a->internal : NULL,
                          IMG_BLOCK, keys_out + r0 * P, bw);
                k = keys_out + r0 * P;
            }
            t2i_block(ta, P, heads, k, pe + r0 * P, IMG_BLOCK, bw);
        }
    }
    for (int t = 1; t < team; t++) acc_merge(&bws[0], &bws[t], R2, P);
}

static void mlp3(const float *x, const float *const w[3], const float *const b[3], int in, int hid,
                 int out_dim, float *out) {
    float h1[1024], h2[1024];
    for (int o = 0; o < hid; o++) {
        float s = b[0][o];
        for (int i = 0; i < in; i++) s += w[0][(size_t)o * in + i] * x[i];
        h1[o] = s > 0 ? s : 0;
    }
    for (int o = 0; o < hid; o++) {
        float s = b[1][o];
        for (int i = 0; i < hid; i++) s += w[1][(size_t)o * hid + i] * h1[i];
        h2[o] = s > 0 ? s : 0;
    }
    for (int o = 0; o < out_dim; o++) {
        float s = b[2][o];
        for (int i = 0; i < hid; i++) s += w[2][(size_t)o * hid + i] * h2[i];
        out[o] = s;
    }
}

/* Scratch for one prompt at a time: its image tokens (4096 x P), the upscaler's
 * buffers, and the small prompt-side matrices. */
typedef struct {
    float *keys, *kpe, *kout, *Q, *Q0, *qpe, *qout, *mlp_h, *z2, *lz;
    int *tok;            /* image tokens to upscale */
    unsigned char *done; /* tokens already upscaled */
    attn_ws aw;          /* self-attention, and layer 0's token-to-image attention */
    cs_fold_ws fw;          /* the folded attentions' prompt side */
    cs_fx_item fx;          /* factored decoding (batches), allocated on first use */
} item_ws;

/* Every buffer of an item, for allocation and release in one place. */
#define ITEM_BUFFERS(w)                                                                                     \
    float **bufs[] = {&(w)->keys,   &(w)->kpe,   &(w)->kout,  &(w)->Q,     &(w)->Q0,    &(w)->qpe,           \
                      &(w)->qout,   &(w)->mlp_h, &(w)->z2,    &(w)->lz,    &(w)->aw.qp, &(w)->aw.kp,         \
                      &(w)->aw.vp,  &(w)->aw.o,  &(w)->aw.scores, &(w)->fw.kp, &(w)->fw.vp, &(w)->fw.qp,     \
                      &(w)->fw.o,   &(w)->fw.kf, &(w)->fw.vf, &(w)->fw.cb, &(w)->fw.qf, &(w)->fw.rv}

static void item_ws_free(item_ws *w) {
    ITEM_BUFFERS(w);
    cs_free_floats(bufs, sizeof bufs / sizeof *bufs);
    free(w->tok);
    free(w->done);
    cs_fx_item_free(&w->fx);
    memset(w, 0, sizeof *w);
}

static int item_ws_alloc(item_ws *w, const cs_mask_decoder *md, int T) {
    const size_t N = 4096, P = (size_t)md->dim, R = (size_t)T * md->heads;
    memset(w, 0, sizeof *w);
    ITEM_BUFFERS(w);
    /* element counts, in the order of ITEM_BUFFERS (internal widths are at most P) */
    const size_t count[] = {N * P, N * P, N * P, T * P, T * P, T * P, T * P, T * (size_t)md->mlp,
                            4 * N * (P / 8 * 4), 16 * N * md->n_mask_tokens, T * P, T * P, T * P, T * P, T * N,
                            T * P, T * P, T * P, T * P, R * P, R * P, R, R * P, R * P};
    _Static_assert(sizeof count / sizeof *count == sizeof bufs / sizeof *bufs, "a count per item buffer");
    const int rc = cs_alloc_floats(bufs, count, sizeof bufs / sizeof *bufs);
    w->tok = cs_alloc(N, sizeof(int));
    w->done = cs_alloc(N, 1);
    if (rc || !w->tok || !w->done) {
        item_ws_free(w);
        return CELLSAM_ERR_NOMEM;
    }
    return CELLSAM_OK;
}

#define BLOCK_BUFFERS(b) float **bufs[] = {&(b)->kpe_in, &(b)->kpe, &(b)->sc, &(b)->out, &(b)->s, &(b)->m, &(b)->l, &(b)->acc}

static void block_ws_free(block_ws *b) {
    BLOCK_BUFFERS(b);
    cs_free_floats(bufs, sizeof bufs / sizeof *bufs);
}

static int block_ws_alloc(block_ws *b, const cs_mask_decoder *md, int T) {
    const size_t B = IMG_BLOCK, P = (size_t)md->dim, R = (size_t)T * md->heads;
    BLOCK_BUFFERS(b);
    const size_t count[] = {B * P, B * P, B * R, B * P, R * B, R, R, R * P};
    _Static_assert(sizeof count / sizeof *count == sizeof bufs / sizeof *bufs, "a count per block buffer");
    return cs_alloc_floats(bufs, count, sizeof bufs / sizeof *bufs);
}

/* Shared, read-only inputs of one decoder call. */
typedef struct {
    const cs_mask_decoder *md;
    const float *emb_t, *pe; /* channel-last (4096 x P) */
    const float *keys0;      /* emb + shared dense, channel-last; NULL when dense differs per prompt */
    const float *kp0, *vp0;  /* layer-0 token-to-image keys/values of keys0 (may be NULL) */
    const float *qi0;        /* layer-0 image-to-token queries of keys0 + PE (may be NULL) */
    const float *up0p, *up3p; /* upscaler weights by sub-position (convt_weight_by_position) */
    const float *dense;
    size_t dense_stride;
    const float *sparse;
    int n_tok, T;
    cs_decoder_options opt;
    const struct cs_fx_shared *fx; /* factored decoding of a batch, or NULL */
} decode_shared;

/* The upscaler (two ConvT 2x2/2) and the hypernetwork products for image tokens
 * tok[0..n) (all N in order when tok is NULL), written to the 256 x 256 logit planes.
 * Each output pixel depends on exactly one input token, so any subset of tokens can be
 * upscaled on its own with the same values. Rows stay in "z-order" (source token, then
 * sub-position) through both layers, with the weights' columns ordered (sub-position,
 * channel): the bias, LayerNorm2d and GELU then work on contiguous channel runs, and
 * only the final logits are placed on the grid. */
static void upscale_tokens(const decode_shared *sh, item_ws *w, const float *keys, const int *tok, int n,
                           const float *hyper, float *const *planes, int nthr) {
    const cs_mask_decoder *md = sh->md;
    const int P = md->dim, P4 = P / 4, P8 = P / 8, G = 64, S = 4 * G, mc = sh->opt.mask_count;
    const float *rows = keys;
    if (sh->fx) { /* the factored tokens' rows, made explicit */
        cs_fx_rows(sh->fx, md, sh->keys0, &w->fx, tok, n, w->kpe);
        rows = w->kpe;
    } else if (tok) { /* gather the tokens' rows; kpe is free once the final attention ran */
        for (int i = 0; i < n; i++) memcpy(w->kpe + (size_t)i * P, keys + (size_t)tok[i] * P, (size_t)P * sizeof(float));
        rows = w->kpe;
    }
    float *z1 = w->kout; /* n x 4*P4 = 4n rows of P4 */
    cs_gemm(n, 4 * P4, P, rows, P, sh->up0p, 4 * P4, 0, 0.0f, z1, 4 * P4, nthr);
    for (size_t r = 0; r < (size_t)4 * n; r++) cs_add(z1 + r * P4, md->up0_b, (size_t)P4);
    cs_layernorm(z1, z1, 4 * n, P4, md->up1_w, md->up1_b, 1e-6f, nthr);
    cs_gelu(z1, (size_t)4 * n * P4, nthr);
    float *z2 = w->z2; /* 4n x 4*P8 = 16n rows of P8 */
    cs_gemm(4 * n, 4 * P8, P4, z1, P4, sh->up3p, 4 * P8, 0, 0.0f, z2, 4 * P8, nthr);
    for (size_t r = 0; r < (size_t)16 * n; r++) cs_add(z2 + r * P8, md->up3_b, (size_t)P8);
    cs_gelu(z2, (size_t)16 * n * P8, nthr);
    cs_gemm(mc, 16 * n, P8, hyper, P8, z2, P8, 1, 0.0f, w->lz, 16 * n, nthr);
    /* z-order index ((i * 4 + a * 2 + b) * 4 + c * 2 + d) -> pixel (4y + 2a + c, 4x + 2b + d) */
    for (int m = 0; m < mc; m++) {
        const float *src = w->lz + (size_t)m * 16 * n;
        for (int i = 0; i < n; i++) {
            const int t = tok ? tok[i] : i, y = t / G, x = t % G;
            for (int ab = 0; ab < 4; ab++)
                for (int cd = 0; cd < 4; cd++) {
                    const int py = 4 * y + 2 * (ab >> 1) + (cd >> 1), px = 4 * x + 2 * (ab & 1) + (cd & 1);
                    planes[m][(size_t)py * S + px] = src[((size_t)i * 4 + ab) * 4 + cd];
                }
        }
    }
}

/* Is any logit of token rows [ty0,ty1) x columns [tx0,tx1) above `above` in a plane? */
static int tokens_reach(float *const *planes, int mc, int tx0, int ty0, int tx1, int ty1, float above) {
    const int S = 256;
    for (int m = 0; m < mc; m++)
        for (int py = 4 * ty0; py < 4 * ty1; py++)
            for (int px = 4 * tx0; px < 4 * tx1; px++)
                if (planes[m][(size_t)py * S + px] > above) return 1;
    return 0;
}

/* Upscale only a neighbourhood of the prompt's box (1024 frame): the box widened by a
 * quarter of its side (at least 2 tokens = 32 pixels) on every side. While a mask has
 * a logit above grow_above in the outermost token row or column of a side, that side
 * moves out by half the region's extent (at least 2 tokens), up to the grid's edge. A
 * mask connected to its box is therefore complete; parts cut off from it by background
 * are left out unless they lie in the region anyway. The rest of the planes holds
 * CS_LOGIT_NOT_COMPUTED. */
static void upscale_around_box(const decode_shared *sh, item_ws *w, const float *keys, const float box[4],
                               const float *hyper, float *const *planes, int nthr) {
    const int G = 64, mc = sh->opt.mask_count;
    for (int m = 0; m < mc; m++)
        for (size_t i = 0; i < (size_t)16 * G * G; i++) planes[m][i] = CS_LOGIT_NOT_COMPUTED;
    float bx[4];
    for (int k = 0; k < 4; k++) { /* NaN or out-of-frame coordinates are clamped to the frame */
        float v = box[k] / 16.0f;
        bx[k] = v >= 0.0f ? (v <= (float)G ? v : (float)G) : 0.0f;
    }
    int tx0 = (int)floorf(bx[0]), ty0 = (int)floorf(bx[1]), tx1 = (int)ceilf(bx[2]), ty1 = (int)ceilf(bx[3]);
    if (tx1 <= tx0) tx1 = tx0 + 1;
    if (ty1 <= ty0) ty1 = ty0 + 1;
    const int side = tx1 - tx0 > ty1 - ty0 ? tx1 - tx0 : ty1 - ty0;
    const int margin = side / 4 > 2 ? side / 4 : 2;
    tx0 -= margin, ty0 -= margin, tx1 += margin, ty1 += margin;
    memset(w->done, 0, (size_t)G * G);
    for (;;) {
        tx0 = tx0 < 0 ? 0 : tx0, ty0 = ty0 < 0 ? 0 : ty0;
        tx1 = tx1 > G ? G : tx1, ty1 = ty1 > G ? G : ty1;
        int n = 0;
        for (int ty = ty0; ty < ty1; ty++)
            for (int tx = tx0; tx < tx1; tx++)
                if (!w->done[ty * G + tx]) {
                    w->done[ty * G + tx] = 1;
                    w->tok[n++] = ty * G + tx;
                }
        if (!n) break;
        upscale_tokens(sh, w, keys, w->tok, n, hyper, planes, nthr);
        const float above = sh->opt.grow_above;
        const int gx = (tx1 - tx0) / 2 > 2 ? (tx1 - tx0) / 2 : 2, gy = (ty1 - ty0) / 2 > 2 ? (ty1 - ty0) / 2 : 2;
        const int left = tx0 > 0 && tokens_reach(planes, mc, tx0, ty0, tx0 + 1, ty1, above);
        const int right = tx1 < G && tokens_reach(planes, mc, tx1 - 1, ty0, tx1, ty1, above);
        const int top = ty0 > 0 && tokens_reach(planes, mc, tx0, ty0, tx1, ty0 + 1, above);
        const int bottom = ty1 < G && tokens_reach(planes, mc, tx0, ty1 - 1, tx1, ty1, above);
        if (!left && !right && !top && !bottom) break;
        tx0 -= left ? gx : 0, tx1 += right ? gx : 0;
        ty0 -= top ? gy : 0, ty1 += bottom ? gy : 0;
    }
}

/* Decode prompt bi with its scratch w; bws holds nthr threads' block scratch. Writes
 * iou (all tokens) and, unless skipped, the selected masks. */
static void decode_one(const decode_shared *sh, int bi, item_ws *w, block_ws *bws, float *logits, float *iou,
                       int nthr) {
    const cs_mask_decoder *md = sh->md;
    const int P = md->dim, G = 64, N = G * G, nm = md->n_mask_tokens, T = sh->T;
    const int P8 = P / 8;
    float *Q = w->Q, *Q0 = w->Q0, *qpe = w->qpe, *qout = w->qout, *keys = w->keys;
    /* tokens: [iou token; mask tokens; sparse prompt tokens] */
    memcpy(Q0, md->iou_token, (size_t)P * sizeof(float));
    memcpy(Q0 + P, md->mask_tokens, (size_t)nm * P * sizeof(float));
    memcpy(Q0 + (size_t)(1 + nm) * P, sh->sparse + (size_t)bi * sh->n_tok * P, (size_t)sh->n_tok * P * sizeof(float));
    memcpy(Q, Q0, (size_t)T * P * sizeof(float));
    const float *kin = keys; /* the image tokens entering the current layer */
    cs_fx_item *fx = sh->fx ? &w->fx : NULL;
    if (fx) cs_fx_item_start(fx);
    if (sh->keys0) {
        kin = sh->keys0;
    } else {
        cs_transpose(sh->dense + (size_t)bi * sh->dense_stride, keys, P, N);
        cs_add(keys, sh->emb_t, (size_t)N * P);
    }
    /* the final attention: only the IoU token and the requested mask tokens are read
     * after it, and each query row attends on its own, so only those rows are computed */
    const int m0 = sh->opt.mask_first, mc = sh->opt.mask_count, D = md->depth, heads = md->heads;
    int rows[17], nr = 0;
    rows[nr++] = 0;
    for (int m = 0; m < mc; m++) rows[nr++] = 1 + m0 + m;
    /* step l < D is two-way layer l; step D is the final attention. The image-to-token
     * half of layer l-1 runs inside step l's pass over the image tokens. */
    for (int l = 0; l <= D; l++) {
        const cs_twoway_layer *L = l < D ? &md->layers[l] : NULL, *Lp = l > 0 ? &md->layers[l - 1] : NULL;
        i2t_fold ia;
        if (Lp) { /* layer l-1's image-to-token keys and values: the tokens as they are now */
            add_into(qpe, Q, Q0, (size_t)T * P);
            /* layer 0's image tokens are still the shared keys0: their query projection is shared */
            i2t_prepare(&Lp->i2t, P, heads, qpe, Q, T, l == 1 ? sh->qi0 : NULL, Lp->norm4_w, Lp->norm4_b, &w->fw, &ia);
        }
        const cs_attn *cross;
        int nq;
        if (L) {
            /* self-attention; layer 0 replaces the queries (no residual, no PE) */
            if (l == 0) {
                attention(&L->self_attn, P, heads, Q, T, Q, Q, T, NULL, NULL, qout, &w->aw, 1);
                memcpy(Q, qout, (size_t)T * P * sizeof(float));
            } else {
                add_into(qpe, Q, Q0, (size_t)T * P);
                attention(&L->self_attn, P, heads, qpe, T, qpe, Q, T, NULL, NULL, qout, &w->aw, 1);
                cs_add(Q, qout, (size_t)T * P);
            }
            cs_layernorm(Q, Q, T, P, L->norm1_w, L->norm1_b, 1e-5f, 1);
            add_into(qpe, Q, Q0, (size_t)T * P);
            cross = &L->t2i;
            nq = T;
        } else {
            for (int i = 0; i < nr; i++)
                add_into(qpe + (size_t)i * P, Q + (size_t)rows[i] * P, Q0 + (size_t)rows[i] * P, (size_t)P);
            cross = &md->final_attn;
            nq = nr;
        }
        /* tokens attend to the image */
        if (fx) {
            if (Lp) cs_fx_i2t(sh->fx, md, l - 1, &w->fw, T, fx);
            t2i_fold ta;
            t2i_prepare(cross, P, heads, qpe, nq, &w->fw, &ta);
            cs_fx_t2i(sh->fx, md, l, &w->fw, nq, fx, qout);
        } else if (l == 0 && sh->kp0) {
            /* with a shared dense prompt, layer 0's image projections are shared */
            attention(cross, P, heads, qpe, T, NULL, NULL, N, sh->kp0, sh->vp0, qout, &w->aw, nthr);
        } else {
            t2i_fold ta;
            t2i_prepare(cross, P, heads, qpe, nq, &w->fw, &ta);
            image_pass(md, sh->pe, Lp ? &ia : NULL, kin, Lp ? keys : NULL, &ta, bws, nthr);
            if (Lp) kin = keys;
            t2i_finish(cross, &ta, P, heads, &bws[0], &w->fw, qout);
        }
        if (L) {
            cs_add(Q, qout, (size_t)T * P);
            cs_layernorm(Q, Q, T, P, L->norm2_w, L->norm2_b, 1e-5f, 1);
            /* MLP (ReLU) */
            cs_linear(Q, T, P, L->mlp1_w, L->mlp1_b, md->mlp, w->mlp_h, 1);
            cs_relu(w->mlp_h, (size_t)T * md->mlp);
            cs_linear(w->mlp_h, T, md->mlp, L->mlp2_w, L->mlp2_b, P, qout, 1);
            cs_add(Q, qout, (size_t)T * P);
            cs_layernorm(Q, Q, T, P, L->norm3_w, L->norm3_b, 1e-5f, 1);
        } else {
            for (int i = 0; i < nr; i++) {
                float *q = Q + (size_t)rows[i] * P;
                cs_add(q, qout + (size_t)i * P, (size_t)P);
                cs_layernorm(q, q, 1, P, md->norm_final_w, md->norm_final_b, 1e-5f, 1);
            }
        }
    }

    /* IoU first: a prompt whose mask will be dropped needs no upscaling */
    float *io = iou + (size_t)bi * nm;
    mlp3(Q, md->iou_w, md->iou_b, P, md->iou_hidden, nm, io);
    if (io[sh->opt.mask_first] < sh->opt.skip_below) return;

    float hyper[16 * 128];
    for (int m = 0; m < mc; m++)
        mlp3(Q + (size_t)(1 + m0 + m) * P, md->hyper_w[m0 + m], md->hyper_b[m0 + m], P, P, P8, hyper + m * P8);
    float *planes[16];
    for (int m = 0; m < mc; m++) planes[m] = logits + ((size_t)bi * mc + m) * 16 * N;
    if (sh->opt.boxes)
        upscale_around_box(sh, w, kin, sh->opt.boxes + (size_t)4 * bi, hyper, planes, nthr);
    else
        upscale_tokens(sh, w, kin, NULL, N, hyper, planes, nthr);
}

/* ConvT weight (in, out, 2, 2) with its columns reordered to (sub-position, out). */
static void convt_weight_by_position(const float *w, int in, int out, float *dst) {
    for (int i = 0; i < in; i++)
        for (int o = 0; o < out; o++)
            for (int k = 0; k < 4; k++) dst[(size_t)i * 4 * out + (size_t)k * out + o] = w[((size_t)i * out + o) * 4 + k];
}

cs_decoder_options cs_decoder_default_options(const cs_mask_decoder *md) {
    cs_decoder_options o;
    o.mask_first = 0;
    o.mask_count = md->n_mask_tokens;
    o.skip_below = -INFINITY;
    o.boxes = NULL;
    o.grow_above = 0.0f;
    o.factored_from = CS_DECODER_FACTORED_FROM;
    return o;
}

/* Buffers kept between decoder calls (one per context): the per-thread prompt
 * scratch, and the data every prompt of an image shares (channel-last embedding and
 * positional encoding, the layer-0 projections of embedding + dense prompt). An
 * interactive session decodes one prompt per call on the same image, so the shared
 * part is computed once per image instead of once per click. */
struct cs_decoder_ws {
    item_ws *items;   /* one per prompt decoded at once */
    block_ws *blocks; /* one per thread */
    int n_items, n_blocks, items_T;
    float *emb_t, *pe, *keys0, *kpe0, *kp0, *vp0, *qi0, *dense_copy, *up0p, *up3p;
    const float *emb_src, *pe_src; /* what emb_t and pe were transposed from */
    const cs_mask_decoder *up_md;  /* whose upscaler weights up0p/up3p hold */
    int emb_valid, layer0_valid;
    struct cs_fx_shared *fx;          /* factored decoding's shared part (valid with layer 0's) */
};

cs_decoder_ws *cs_decoder_ws_new(void) { return calloc(1, sizeof(cs_decoder_ws)); }

static void ws_free_items(cs_decoder_ws *ws) {
    for (int t = 0; t < ws->n_items; t++) item_ws_free(&ws->items[t]);
    for (int t = 0; t < ws->n_blocks; t++) block_ws_free(&ws->blocks[t]);
    free(ws->items);
    free(ws->blocks);
    ws->items = NULL;
    ws->blocks = NULL;
    ws->n_items = ws->n_blocks = 0;
}

void cs_decoder_ws_release(cs_decoder_ws *ws) {
    if (!ws) return;
    ws_free_items(ws);
    free(ws->emb_t);
    free(ws->pe);
    free(ws->keys0);
    free(ws->kpe0);
    free(ws->kp0);
    free(ws->vp0);
    free(ws->qi0);
    free(ws->dense_copy);
    free(ws->up0p);
    free(ws->up3p);
    cs_fx_shared_free(ws->fx);
    memset(ws, 0, sizeof *ws);
}

void cs_decoder_ws_free(cs_decoder_ws *ws) {
    cs_decoder_ws_release(ws);
    free(ws);
}

void cs_decoder_ws_invalidate(cs_decoder_ws *ws) {
    if (ws) ws->emb_valid = ws->layer0_valid = 0;
}

/* Prompt scratch for `outer` prompts at once and block scratch for `threads` threads,
 * for T tokens. */
static int ws_items(cs_decoder_ws *ws, const cs_mask_decoder *md, int T, int outer, int threads) {
    if (ws->items && ws->n_items >= outer && ws->n_blocks >= threads && ws->items_T == T) return CELLSAM_OK;
    ws_free_items(ws);
    ws->items = calloc((size_t)outer, sizeof *ws->items);
    ws->blocks = calloc((size_t)threads, sizeof *ws->blocks);
    if (!ws->items || !ws->blocks) {
        ws_free_items(ws);
        return CELLSAM_ERR_NOMEM;
    }
    int rc = CELLSAM_OK;
    for (; !rc && ws->n_items < outer; ws->n_items++) rc = item_ws_alloc(&ws->items[ws->n_items], md, T);
    for (; !rc && ws->n_blocks < threads; ws->n_blocks++) rc = block_ws_alloc(&ws->blocks[ws->n_blocks], md, T);
    if (rc) {
        ws_free_items(ws); /* the ones allocated so far */
        return rc;
    }
    ws->items_T = T;
    return CELLSAM_OK;
}

/* Channel-last embedding and PE; with a shared dense prompt, also the initial keys
 * and their layer-0 projections (token-to-image keys and values, image-to-token
 * queries), recomputed only when the embedding or the dense prompt changed. */
static int ws_shared(cs_decoder_ws *ws, const cs_mask_decoder *md, const float *image_emb, const float *dense_pe,
                     const float *dense, int shared_dense, int n_threads) {
    const int P = md->dim, N = 4096;
    const size_t NP = (size_t)N * P;
    if (!ws->emb_t) {
        const size_t ik = (size_t)md->layers[0].t2i.internal, iq = (size_t)md->layers[0].i2t.internal;
        ws->emb_t = cs_alloc(NP, sizeof(float));
        ws->pe = cs_alloc(NP, sizeof(float));
        ws->keys0 = cs_alloc(NP, sizeof(float));
        ws->kpe0 = cs_alloc(NP, sizeof(float));
        ws->dense_copy = cs_alloc(NP, sizeof(float));
        ws->kp0 = cs_alloc((size_t)N, ik * sizeof(float));
        ws->vp0 = cs_alloc((size_t)N, ik * sizeof(float));
        ws->qi0 = cs_alloc((size_t)N, iq * sizeof(float));
        ws->up0p = cs_alloc((size_t)P, (size_t)P * sizeof(float));
        ws->up3p = cs_alloc((size_t)P / 4, (size_t)P / 2 * sizeof(float));
        if (!ws->emb_t || !ws->pe || !ws->keys0 || !ws->kpe0 || !ws->dense_copy || !ws->kp0 || !ws->vp0 ||
            !ws->qi0 || !ws->up0p || !ws->up3p) {
            cs_decoder_ws_release(ws);
            return CELLSAM_ERR_NOMEM;
        }
    }
    if (ws->up_md != md) {
        convt_weight_by_position(md->up0_w, P, P / 4, ws->up0p);
        convt_weight_by_position(md->up3_w, P / 4, P / 8, ws->up3p);
        ws->up_md = md;
    }
    if (!ws->emb_valid || ws->emb_src != image_emb || ws->pe_src != dense_pe) {
        cs_transpose(image_emb, ws->emb_t, P, N);
        cs_transpose(dense_pe, ws->pe, P, N);
        ws->emb_src = image_emb;
        ws->pe_src = dense_pe;
        ws->emb_valid = 1;
        ws->layer0_valid = 0;
    }
    if (!shared_dense) return CELLSAM_OK;
    if (ws->layer0_valid && !memcmp(ws->dense_copy, dense, NP * sizeof(float))) return CELLSAM_OK;
    memcpy(ws->dense_copy, dense, NP * sizeof(float));
    if (ws->fx) ws->fx->valid = 0;
    const cs_attn *a = &md->layers[0].t2i, *b = &md->layers[0].i2t;
    cs_transpose(dense, ws->keys0, P, N);
    cs_add(ws->keys0, ws->emb_t, NP);
    add_into(ws->kpe0, ws->keys0, ws->pe, NP);
    cs_linear(ws->kpe0, N, P, a->k_w, a->k_b, a->internal, ws->kp0, n_threads);
    cs_linear(ws->keys0, N, P, a->v_w, a->v_b, a->internal, ws->vp0, n_threads);
    cs_linear(ws->kpe0, N, P, b->q_w, b->q_b, b->internal, ws->qi0, n_threads);
    ws->layer0_valid = 1;
    return CELLSAM_OK;
}

int cs_mask_decoder_forward_ex(const cs_mask_decoder *md, const float *image_emb, const float *dense_pe,
                               const float *dense, size_t dense_stride, const float *sparse, int n_batch,
                               int n_tok, const cs_decoder_options *opt, float *logits, float *iou,
                               cs_decoder_ws *ws, int n_threads) {
    const int P = md->dim, N = 4096, nm = md->n_mask_tokens;
    const int T = 1 + nm + n_tok;
    if (P > 1024 || md->iou_hidden > 1024 || nm > 16)
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "mask decoder width %d is too large", P);
    /* a bound on the prompt-side buffers (heads x tokens rows of P floats each) */
    if ((long long)T * md->heads > N)
        return cs_error(CELLSAM_ERR_LIMIT, "%d prompt tokens: the mask decoder takes at most %d", n_tok,
                        N / md->heads - 1 - nm);
    if (opt->mask_first < 0 || opt->mask_count < 1 || opt->mask_first + opt->mask_count > nm)
        return cs_error(CELLSAM_ERR_INVALID, "mask tokens %d..%d out of range", opt->mask_first,
                        opt->mask_first + opt->mask_count - 1);
    if (n_threads < 1) n_threads = 1;
    if (n_batch <= 0) return CELLSAM_OK;
    cs_decoder_ws local;
    memset(&local, 0, sizeof local);
    if (!ws) ws = &local;
    /* prompts in parallel (one thread each, single-threaded GEMMs) when there are
     * enough of them; otherwise one at a time with threaded GEMMs */
    const int outer = n_batch >= 2 && n_threads > 1 ? (n_threads < n_batch ? n_threads : n_batch) : 1;
    const int inner = outer > 1 ? 1 : n_threads;
    int rc = ws_items(ws, md, T, outer, outer > 1 ? outer : inner);
    if (!rc) rc = ws_shared(ws, md, image_emb, dense_pe, dense, dense_stride == 0, n_threads);
    if (rc) {
        cs_decoder_ws_release(ws);
        return cs_error(rc, "out of memory in the mask decoder");
    }
    decode_shared sh;
    memset(&sh, 0, sizeof sh);
    sh.md = md;
    sh.dense = dense;
    sh.dense_stride = dense_stride;
    sh.sparse = sparse;
    sh.n_tok = n_tok;
    sh.T = T;
    sh.opt = *opt;
    sh.emb_t = ws->emb_t;
    sh.pe = ws->pe;
    sh.up0p = ws->up0p;
    sh.up3p = ws->up3p;
    if (dense_stride == 0) {
        sh.keys0 = ws->keys0;
        sh.kp0 = ws->kp0;
        sh.vp0 = ws->vp0;
        sh.qi0 = ws->qi0;
    }
    /* a batch is decoded factored; so is a smaller call on an image whose factored data is
     * ready, unless it is one prompt that the direct path would split between threads */
    const int fx_ready = ws->fx && ws->fx->valid && opt->factored_from < INT_MAX && (outer > 1 || inner == 1);
    if (dense_stride == 0 && cs_fx_supported(md, T) && (n_batch >= opt->factored_from || fx_ready)) {
        if (!ws->fx) ws->fx = cs_fx_shared_new(md);
        for (int t = 0; ws->fx && t < outer; t++)
            if (!ws->items[t].fx.U && cs_fx_item_alloc(&ws->items[t].fx, md, T)) {
                cs_decoder_ws_release(ws);
                return cs_error(CELLSAM_ERR_NOMEM, "out of memory in the mask decoder");
            }
        if (ws->fx && !ws->fx->valid) cs_fx_shared_compute(ws->fx, md, ws->keys0, ws->kpe0, ws->pe, n_threads);
        if (ws->fx && ws->fx->valid) sh.fx = ws->fx;
    }
    item_ws *items = ws->items;
    if (outer > 1) {
#pragma omp parallel for num_threads(outer) schedule(dynamic, 1)
        for (int bi = 0; bi < n_batch; bi++) {
            const int t = omp_get_thread_num();
            decode_one(&sh, bi, &items[t], &ws->blocks[t], logits, iou, 1);
        }
    } else {
        for (int bi = 0; bi < n_batch; bi++) decode_one(&sh, bi, &items[0], ws->blocks, logits, iou, inner);
    }
    if (ws == &local) cs_decoder_ws_release(&local);
    return CELLSAM_OK;
}

int cs_mask_decoder_forward(const cs_mask_decoder *md, const float *image_emb, const float *dense_pe,
                            const float *dense, size_t dense_stride, const float *sparse, int n_batch,
                            int n_tok, float *logits, float *iou, int n_threads) {
    cs_decoder_options o = cs_decoder_default_options(md);
    return cs_mask_decoder_forward_ex(md, image_emb, dense_pe, dense, dense_stride, sparse, n_batch, n_tok, &o,
                                      logits, iou, NULL, n_threads);
}
