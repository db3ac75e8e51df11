/* SAM mask decoder (spec §4.4): two-way transformer between prompt tokens and image
 * tokens, transposed-convolution upscaler, hypernetwork MLPs and the IoU head.
 * Image tokens are channel-last (4096 x P). With a shared dense prompt (no mask
 * input), layer 0's token-to-image keys and values are identical for every prompt,
 * so they are projected once per call and reused across the batch. Prompts run in
 * parallel, one per thread; the IoU head runs before the upscaler so that prompts
 * whose mask will be dropped skip it. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model.h"
#include "ops.h"

typedef struct {
    float *qp, *kp, *vp, *scores, *o, *tmp; /* attention scratch */
    float *cb;                              /* heads x tokens folded query biases */
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

/* The prompt tokens (nq, a handful) attending to the image tokens (nk = 4096), with the
 * key and value projections folded into the queries instead of applied to every image
 * token: scores_h = (q_h W_k,h) k_in^T (the bias term q_h . b_k,h is the same for every
 * key, so softmax ignores it), and because each row of attn sums to 1,
 * attn_h (v_in W_v,h^T + b_v,h) = (attn_h v_in) W_v,h^T + b_v,h. That costs
 * 4 x nq x heads x nk x P flops instead of 4 x nk x P x I: 4x fewer for SAM's decoder.
 * Rows r = h * nq + i of the folded matrices belong to head h, query i. */
static void attention_few_to_many(const cs_attn *a, int P, int heads, const float *q_in, int nq,
                                  const float *k_in, const float *v_in, int nk, float *out, attn_ws *ws,
                                  int n_threads) {
    const int I = a->internal, dh = I / heads, R = nq * heads;
    float *qf = ws->kp, *rv = ws->vp; /* R x P each; the per-key projections are not needed */
    cs_linear(q_in, nq, P, a->q_w, a->q_b, I, ws->qp, n_threads);
    for (int h = 0; h < heads; h++)
        cs_gemm(nq, P, dh, ws->qp + h * dh, I, a->k_w + (size_t)h * dh * P, P, 0, 0.0f, qf + (size_t)h * nq * P, P,
                n_threads);
    cs_gemm(R, nk, P, qf, P, k_in, P, 1, 0.0f, ws->scores, nk, n_threads);
    const float div = sqrtf((float)dh);
    for (int r = 0; r < R; r++) {
        float *row = ws->scores + (size_t)r * nk;
        for (int j = 0; j < nk; j++) row[j] /= div;
        cs_softmax_row(row, nk);
    }
    cs_gemm(R, P, nk, ws->scores, nk, v_in, P, 0, 0.0f, rv, P, n_threads);
    for (int h = 0; h < heads; h++) {
        cs_gemm(nq, dh, P, rv + (size_t)h * nq * P, P, a->v_w + (size_t)h * dh * P, P, 1, 0.0f, ws->o + h * dh, I,
                n_threads);
        for (int i = 0; i < nq; i++) cs_add(ws->o + (size_t)i * I + h * dh, a->v_b + h * dh, (size_t)dh);
    }
    cs_linear(ws->o, nq, I, a->o_w, a->o_b, P, out, n_threads);
}

/* The image tokens (nq = 4096) attending to the prompt tokens (nk, a handful), with the
 * query projection folded into the keys (unless the queries come pre-projected) and the
 * output projection folded into the values: scores_h = q_in (W_q,h^T k_h) + b_q,h . k_h,
 * out = sum_h attn_h (v_h W_o,h^T) + b_o. The two image-sized GEMMs then have
 * heads x nk columns instead of I. Columns c = h * nk + t belong to head h, token t. */
static void attention_many_to_few(const cs_attn *a, int P, int heads, const float *q_in, const float *qp_pre,
                                  int nq, const float *k_in, const float *v_in, int nk, float *out, attn_ws *ws,
                                  int n_threads) {
    const int I = a->internal, dh = I / heads, R = nk * heads;
    float *kp = ws->qp, *vp = ws->kp, *vf = ws->vp, *kf = ws->o; /* small: nk x I, nk x I, R x P, R x P */
    float *cb = ws->cb;
    cs_linear(k_in, nk, P, a->k_w, a->k_b, I, kp, n_threads);
    cs_linear(v_in, nk, P, a->v_w, a->v_b, I, vp, n_threads);
    for (int h = 0; h < heads; h++)
        cs_gemm(nk, P, dh, vp + h * dh, I, a->o_w + h * dh, I, 1, 0.0f, vf + (size_t)h * nk * P, P, n_threads);
    if (qp_pre) {
        for (int h = 0; h < heads; h++)
            cs_gemm(nq, nk, dh, qp_pre + h * dh, I, kp + h * dh, I, 1, 0.0f, ws->scores + h * nk, R, n_threads);
        for (int c = 0; c < R; c++) cb[c] = 0.0f;
    } else {
        for (int h = 0; h < heads; h++) {
            cs_gemm(nk, P, dh, kp + h * dh, I, a->q_w + (size_t)h * dh * P, P, 0, 0.0f, kf + (size_t)h * nk * P, P,
                    n_threads);
            for (int t = 0; t < nk; t++) {
                float s = 0.0f;
                for (int c = 0; c < dh; c++) s += a->q_b[h * dh + c] * kp[(size_t)t * I + h * dh + c];
                cb[h * nk + t] = s;
            }
        }
        cs_gemm(nq, R, P, q_in, P, kf, P, 1, 0.0f, ws->scores, R, n_threads);
    }
    const float div = sqrtf((float)dh);
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int j = 0; j < nq; j++) {
        float *row = ws->scores + (size_t)j * R;
        for (int c = 0; c < R; c++) row[c] = (row[c] + cb[c]) / div;
        cs_softmax_groups(row, heads, nk);
    }
    cs_gemm(nq, P, R, ws->scores, R, vf, P, 0, 0.0f, out, P, n_threads);
    for (int j = 0; j < nq; j++) cs_add(out + (size_t)j * P, a->o_b, (size_t)P);
}

static void add_into(float *dst, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = a[i] + b[i];
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

/* Per-thread scratch for one prompt at a time. */
typedef struct {
    float *keys, *kpe, *kout, *Q, *Q0, *qpe, *qout, *mlp_h, *z2, *lz;
    int *tok;            /* image tokens to upscale */
    unsigned char *done; /* tokens already upscaled */
    attn_ws aw;
} item_ws;

static void item_ws_free(item_ws *w) {
    free(w->keys);
    free(w->kpe);
    free(w->kout);
    free(w->Q);
    free(w->Q0);
    free(w->qpe);
    free(w->qout);
    free(w->mlp_h);
    free(w->z2);
    free(w->lz);
    free(w->tok);
    free(w->done);
    free(w->aw.qp);
    free(w->aw.kp);
    free(w->aw.vp);
    free(w->aw.o);
    free(w->aw.scores);
    free(w->aw.cb);
    memset(w, 0, sizeof *w);
}

static int item_ws_alloc(item_ws *w, const cs_mask_decoder *md, int T) {
    const size_t N = 4096, P = (size_t)md->dim;
    memset(w, 0, sizeof *w);
    w->keys = cs_alloc(N, P * sizeof(float));
    w->kpe = cs_alloc(N, P * sizeof(float));
    w->kout = cs_alloc(N, P * sizeof(float));
    w->Q = cs_alloc((size_t)T, P * sizeof(float));
    w->Q0 = cs_alloc((size_t)T, P * sizeof(float));
    w->qpe = cs_alloc((size_t)T, P * sizeof(float));
    w->qout = cs_alloc((size_t)T, P * sizeof(float));
    w->mlp_h = cs_alloc((size_t)T, (size_t)md->mlp * sizeof(float));
    w->z2 = cs_alloc(4 * N, P / 8 * 4 * sizeof(float));
    w->lz = cs_alloc(16 * N, (size_t)md->n_mask_tokens * sizeof(float));
    w->tok = cs_alloc(N, sizeof(int));
    w->done = cs_alloc(N, 1);
    w->aw.qp = cs_alloc(N, P * sizeof(float));
    w->aw.kp = cs_alloc(N, P * sizeof(float));
    w->aw.vp = cs_alloc(N, P * sizeof(float));
    w->aw.o = cs_alloc(N, P * sizeof(float));
    w->aw.scores = cs_alloc(N, (size_t)T * (size_t)md->heads * sizeof(float));
    w->aw.cb = cs_alloc((size_t)T, (size_t)md->heads * sizeof(float));
    if (!w->keys || !w->kpe || !w->kout || !w->Q || !w->Q0 || !w->qpe || !w->qout || !w->mlp_h || !w->z2 ||
        !w->lz || !w->tok || !w->done || !w->aw.qp || !w->aw.kp || !w->aw.vp || !w->aw.o || !w->aw.scores || !w->aw.cb) {
        item_ws_free(w);
        return CELLSAM_ERR_NOMEM;
    }
    return CELLSAM_OK;
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
    if (tok) { /* gather the tokens' rows; kpe is free once the final attention ran */
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
 * mask connected to its box is therefore complete; only parts cut off from it by a
 * ring of background are left out. The rest of the planes holds CS_LOGIT_NOT_COMPUTED. */
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

/* Decode prompt bi. Writes iou (all tokens) and, unless skipped, the selected masks. */
static void decode_one(const decode_shared *sh, int bi, item_ws *w, float *logits, float *iou, int nthr) {
    const cs_mask_decoder *md = sh->md;
    const int P = md->dim, G = 64, N = G * G, nm = md->n_mask_tokens, T = sh->T;
    const int P8 = P / 8;
    float *Q = w->Q, *Q0 = w->Q0, *qpe = w->qpe, *qout = w->qout, *keys = w->keys, *kpe = w->kpe;
    /* tokens: [iou token; mask tokens; sparse prompt tokens] */
    memcpy(Q0, md->iou_token, (size_t)P * sizeof(float));
    memcpy(Q0 + P, md->mask_tokens, (size_t)nm * P * sizeof(float));
    memcpy(Q0 + (size_t)(1 + nm) * P, sh->sparse + (size_t)bi * sh->n_tok * P, (size_t)sh->n_tok * P * sizeof(float));
    memcpy(Q, Q0, (size_t)T * P * sizeof(float));
    const float *kin = keys; /* the image tokens entering the current layer */
    if (sh->keys0) {
        kin = sh->keys0;
    } else {
        cs_transpose(sh->dense + (size_t)bi * sh->dense_stride, keys, P, N);
        cs_add(keys, sh->emb_t, (size_t)N * P);
    }
    for (int l = 0; l < md->depth; l++) {
        const cs_twoway_layer *L = &md->layers[l];
        /* self-attention; layer 0 replaces the queries (no residual, no PE) */
        if (l == 0) {
            attention(&L->self_attn, P, md->heads, Q, T, Q, Q, T, NULL, NULL, qout, &w->aw, 1);
            memcpy(Q, qout, (size_t)T * P * sizeof(float));
        } else {
            add_into(qpe, Q, Q0, (size_t)T * P);
            attention(&L->self_attn, P, md->heads, qpe, T, qpe, Q, T, NULL, NULL, qout, &w->aw, 1);
            cs_add(Q, qout, (size_t)T * P);
        }
        cs_layernorm(Q, Q, T, P, L->norm1_w, L->norm1_b, 1e-5f, 1);
        /* tokens attend to the image */
        add_into(qpe, Q, Q0, (size_t)T * P);
        /* layer 0 with a shared dense prompt: every projection of the image tokens is
         * shared, so their sum with the PE is not needed */
        const int shared = l == 0 && sh->kp0;
        if (shared) {
            attention(&L->t2i, P, md->heads, qpe, T, NULL, NULL, N, sh->kp0, sh->vp0, qout, &w->aw, nthr);
        } else {
            add_into(kpe, kin, sh->pe, (size_t)N * P);
            attention_few_to_many(&L->t2i, P, md->heads, qpe, T, kpe, kin, N, qout, &w->aw, nthr);
        }
        cs_add(Q, qout, (size_t)T * P);
        cs_layernorm(Q, Q, T, P, L->norm2_w, L->norm2_b, 1e-5f, 1);
        /* MLP (ReLU) */
        cs_linear(Q, T, P, L->mlp1_w, L->mlp1_b, md->mlp, w->mlp_h, 1);
        cs_relu(w->mlp_h, (size_t)T * md->mlp);
        cs_linear(w->mlp_h, T, md->mlp, L->mlp2_w, L->mlp2_b, P, qout, 1);
        cs_add(Q, qout, (size_t)T * P);
        cs_layernorm(Q, Q, T, P, L->norm3_w, L->norm3_b, 1e-5f, 1);
        /* image attends to the tokens */
        add_into(qpe, Q, Q0, (size_t)T * P);
        /* layer 0's image tokens are still the shared keys0: their query projection is shared too */
        attention_many_to_few(&L->i2t, P, md->heads, kpe, shared ? sh->qi0 : NULL, N, qpe, Q, T, w->kout, &w->aw,
                              nthr);
        add_into(keys, kin, w->kout, (size_t)N * P);
        cs_layernorm(keys, keys, N, P, L->norm4_w, L->norm4_b, 1e-5f, nthr);
        kin = keys;
    }
    /* final attention: only the IoU token and the requested mask tokens are read after
     * it, and each query row attends on its own, so only those rows are computed */
    const int m0 = sh->opt.mask_first, mc = sh->opt.mask_count;
    int rows[17], nr = 0;
    rows[nr++] = 0;
    for (int m = 0; m < mc; m++) rows[nr++] = 1 + m0 + m;
    for (int i = 0; i < nr; i++) add_into(qpe + (size_t)i * P, Q + (size_t)rows[i] * P, Q0 + (size_t)rows[i] * P, (size_t)P);
    add_into(kpe, keys, sh->pe, (size_t)N * P);
    attention_few_to_many(&md->final_attn, P, md->heads, qpe, nr, kpe, keys, N, qout, &w->aw, nthr);
    for (int i = 0; i < nr; i++) {
        float *q = Q + (size_t)rows[i] * P;
        cs_add(q, qout + (size_t)i * P, (size_t)P);
        cs_layernorm(q, q, 1, P, md->norm_final_w, md->norm_final_b, 1e-5f, 1);
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
        upscale_around_box(sh, w, keys, sh->opt.boxes + (size_t)4 * bi, hyper, planes, nthr);
    else
        upscale_tokens(sh, w, keys, NULL, N, hyper, planes, nthr);
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
    return o;
}

/* Buffers kept between decoder calls (one per context): the per-thread prompt
 * scratch, and the data every prompt of an image shares (channel-last embedding and
 * positional encoding, the layer-0 projections of embedding + dense prompt). An
 * interactive session decodes one prompt per call on the same image, so the shared
 * part is computed once per image instead of once per click. */
struct cs_decoder_ws {
    item_ws *items;
    int n_items, items_T;
    float *emb_t, *pe, *keys0, *kpe0, *kp0, *vp0, *qi0, *dense_copy, *up0p, *up3p;
    const float *emb_src, *pe_src; /* what emb_t and pe were transposed from */
    const cs_mask_decoder *up_md;  /* whose upscaler weights up0p/up3p hold */
    int emb_valid, layer0_valid;
};

cs_decoder_ws *cs_decoder_ws_new(void) { return calloc(1, sizeof(cs_decoder_ws)); }

static void ws_free_items(cs_decoder_ws *ws) {
    for (int t = 0; t < ws->n_items; t++) item_ws_free(&ws->items[t]);
    free(ws->items);
    ws->items = NULL;
    ws->n_items = 0;
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
    memset(ws, 0, sizeof *ws);
}

void cs_decoder_ws_free(cs_decoder_ws *ws) {
    cs_decoder_ws_release(ws);
    free(ws);
}

void cs_decoder_ws_invalidate(cs_decoder_ws *ws) {
    if (ws) ws->emb_valid = ws->layer0_valid = 0;
}

/* Per-thread prompt scratch for `outer` threads and T tokens. */
static int ws_items(cs_decoder_ws *ws, const cs_mask_decoder *md, int T, int outer) {
    if (ws->items && ws->n_items >= outer && ws->items_T == T) return CELLSAM_OK;
    ws_free_items(ws);
    ws->items = calloc((size_t)outer, sizeof *ws->items);
    if (!ws->items) return CELLSAM_ERR_NOMEM;
    for (; ws->n_items < outer; ws->n_items++) {
        int rc = item_ws_alloc(&ws->items[ws->n_items], md, T);
        if (rc) {
            ws_free_items(ws); /* the ones allocated so far */
            return rc;
        }
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
    /* the folded attentions keep heads x tokens rows in image-sized buffers */
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
    int rc = ws_items(ws, md, T, outer);
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
    item_ws *items = ws->items;
    if (outer > 1) {
#pragma omp parallel for num_threads(outer) schedule(dynamic, 1)
        for (int bi = 0; bi < n_batch; bi++) decode_one(&sh, bi, &items[omp_get_thread_num()], logits, iou, 1);
    } else {
        for (int bi = 0; bi < n_batch; bi++) decode_one(&sh, bi, &items[0], logits, iou, inner);
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
