/* SAM mask decoder (spec §4.4): two-way transformer between prompt tokens and image
 * tokens, transposed-convolution upscaler, hypernetwork MLPs and the IoU head.
 * Image tokens are channel-last (4096 x P). With a shared dense prompt (no mask
 * input), layer 0's token-to-image keys and values are identical for every prompt,
 * so they are projected once per call and reused across the batch. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model.h"
#include "ops.h"

typedef struct {
    float *qp, *kp, *vp, *scores, *o, *tmp; /* attention scratch */
} attn_ws;

/* SAM Attention: out[nq, P] = out_proj(concat_h softmax(q_h k_h^T / sqrt(d)) v_h).
 * kp/vp may be given pre-projected (then k_in/v_in are ignored). */
static void attention(const cs_attn *a, int P, int heads, const float *q_in, int nq,
                      const float *k_in, const float *v_in, int nk, const float *kp_pre,
                      const float *vp_pre, float *out, attn_ws *ws, int n_threads) {
    const int I = a->internal, dh = I / heads;
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
        cs_gemm(nq, nk, dh, ws->qp + h * dh, I, kp + h * dh, I, 1, 0.0f, ws->scores, nk, n_threads);
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

int cs_mask_decoder_forward(const cs_mask_decoder *md, const float *image_emb, const float *dense_pe,
                            const float *dense, size_t dense_stride, const float *sparse,
                            int n_batch, int n_tok, float *logits, float *iou, int n_threads) {
    const int P = md->dim, G = 64, N = G * G, nm = md->n_mask_tokens;
    const int T = 1 + nm + n_tok;
    const int I_max = P; /* internal dims are <= P */
    const int P4 = P / 4, P8 = P / 8;
    if (P > 1024 || md->iou_hidden > 1024 || nm > 16)
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "mask decoder width %d is too large", P);
    int rc = CELLSAM_OK;
    float *keys = cs_alloc((size_t)N, (size_t)P * sizeof(float));
    float *pe = cs_alloc((size_t)N, (size_t)P * sizeof(float));
    float *kpe = cs_alloc((size_t)N, (size_t)P * sizeof(float));
    float *kout = cs_alloc((size_t)N, (size_t)P * sizeof(float));
    float *shared_kp = NULL, *shared_vp = NULL;
    float *Q = cs_alloc((size_t)T, (size_t)P * sizeof(float));
    float *Q0 = cs_alloc((size_t)T, (size_t)P * sizeof(float));
    float *qpe = cs_alloc((size_t)T, (size_t)P * sizeof(float));
    float *qout = cs_alloc((size_t)T, (size_t)P * sizeof(float));
    float *mlp_h = cs_alloc((size_t)T, (size_t)md->mlp * sizeof(float));
    float *up1 = cs_alloc((size_t)4 * N, (size_t)P4 * sizeof(float));   /* 128x128 x P/4 */
    float *up2 = cs_alloc((size_t)16 * N, (size_t)P8 * sizeof(float));  /* 256x256 x P/8 */
    float *emb_t = cs_alloc((size_t)N, (size_t)P * sizeof(float));
    attn_ws ws = {0};
    ws.qp = cs_alloc((size_t)N, (size_t)I_max * sizeof(float));
    ws.kp = cs_alloc((size_t)N, (size_t)I_max * sizeof(float));
    ws.vp = cs_alloc((size_t)N, (size_t)I_max * sizeof(float));
    ws.o = cs_alloc((size_t)N, (size_t)I_max * sizeof(float));
    ws.scores = cs_alloc((size_t)N, (size_t)T * sizeof(float));
    if (!keys || !pe || !kpe || !kout || !Q || !Q0 || !qpe || !qout || !mlp_h || !up1 || !up2 ||
        !emb_t || !ws.qp || !ws.kp || !ws.vp || !ws.o || !ws.scores) {
        rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory in the mask decoder");
        goto done;
    }
    cs_transpose(image_emb, emb_t, P, N);
    cs_transpose(dense_pe, pe, P, N);

    /* keys are identical across prompts when the dense prompt is shared */
    if (dense_stride == 0 && n_batch > 1) {
        const cs_attn *a = &md->layers[0].t2i;
        shared_kp = cs_alloc((size_t)N, (size_t)a->internal * sizeof(float));
        shared_vp = cs_alloc((size_t)N, (size_t)a->internal * sizeof(float));
        if (!shared_kp || !shared_vp) {
            rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory in the mask decoder");
            goto done;
        }
        cs_transpose(dense, keys, P, N);
        cs_add(keys, emb_t, (size_t)N * P);
        add_into(kpe, keys, pe, (size_t)N * P);
        cs_linear(kpe, N, P, a->k_w, a->k_b, a->internal, shared_kp, n_threads);
        cs_linear(keys, N, P, a->v_w, a->v_b, a->internal, shared_vp, n_threads);
    }

    for (int bi = 0; bi < n_batch; bi++) {
        /* tokens: [iou token; mask tokens; sparse prompt tokens] */
        memcpy(Q0, md->iou_token, (size_t)P * sizeof(float));
        memcpy(Q0 + P, md->mask_tokens, (size_t)nm * P * sizeof(float));
        memcpy(Q0 + (size_t)(1 + nm) * P, sparse + (size_t)bi * n_tok * P, (size_t)n_tok * P * sizeof(float));
        memcpy(Q, Q0, (size_t)T * P * sizeof(float));
        cs_transpose(dense + (size_t)bi * dense_stride, keys, P, N);
        cs_add(keys, emb_t, (size_t)N * P);

        for (int l = 0; l < md->depth; l++) {
            const cs_twoway_layer *L = &md->layers[l];
            /* self-attention; layer 0 replaces the queries (no residual, no PE) */
            if (l == 0) {
                attention(&L->self_attn, P, md->heads, Q, T, Q, Q, T, NULL, NULL, qout, &ws, 1);
                memcpy(Q, qout, (size_t)T * P * sizeof(float));
            } else {
                add_into(qpe, Q, Q0, (size_t)T * P);
                attention(&L->self_attn, P, md->heads, qpe, T, qpe, Q, T, NULL, NULL, qout, &ws, 1);
                cs_add(Q, qout, (size_t)T * P);
            }
            cs_layernorm(Q, Q, T, P, L->norm1_w, L->norm1_b, 1e-5f, 1);
            /* tokens attend to the image */
            add_into(qpe, Q, Q0, (size_t)T * P);
            add_into(kpe, keys, pe, (size_t)N * P);
            int shared = l == 0 && shared_kp;
            attention(&L->t2i, P, md->heads, qpe, T, kpe, keys, N, shared ? shared_kp : NULL,
                      shared ? shared_vp : NULL, qout, &ws, n_threads);
            cs_add(Q, qout, (size_t)T * P);
            cs_layernorm(Q, Q, T, P, L->norm2_w, L->norm2_b, 1e-5f, 1);
            /* MLP (ReLU) */
            cs_linear(Q, T, P, L->mlp1_w, L->mlp1_b, md->mlp, mlp_h, 1);
            cs_relu(mlp_h, (size_t)T * md->mlp);
            cs_linear(mlp_h, T, md->mlp, L->mlp2_w, L->mlp2_b, P, qout, 1);
            cs_add(Q, qout, (size_t)T * P);
            cs_layernorm(Q, Q, T, P, L->norm3_w, L->norm3_b, 1e-5f, 1);
            /* image attends to the tokens */
            add_into(qpe, Q, Q0, (size_t)T * P);
            attention(&L->i2t, P, md->heads, kpe, N, qpe, Q, T, NULL, NULL, kout, &ws, n_threads);
            cs_add(keys, kout, (size_t)N * P);
            cs_layernorm(keys, keys, N, P, L->norm4_w, L->norm4_b, 1e-5f, n_threads);
        }
        add_into(qpe, Q, Q0, (size_t)T * P);
        add_into(kpe, keys, pe, (size_t)N * P);
        attention(&md->final_attn, P, md->heads, qpe, T, kpe, keys, N, NULL, NULL, qout, &ws, n_threads);
        cs_add(Q, qout, (size_t)T * P);
        cs_layernorm(Q, Q, T, P, md->norm_final_w, md->norm_final_b, 1e-5f, 1);

        /* upscaler: ConvT 2x2/2 as a GEMM against the (in, out*4) weight, scattered
         * channel-last into the 2x larger grid, then LayerNorm2d + GELU */
        cs_gemm(N, P4 * 4, P, keys, P, md->up0_w, P4 * 4, 0, 0.0f, kout, P4 * 4, n_threads);
        for (int y = 0; y < G; y++)
            for (int x = 0; x < G; x++) {
                const float *z = kout + ((size_t)y * G + x) * P4 * 4;
                for (int a = 0; a < 2; a++)
                    for (int b2 = 0; b2 < 2; b2++) {
                        float *dst = up1 + ((size_t)(2 * y + a) * (2 * G) + 2 * x + b2) * P4;
                        for (int o = 0; o < P4; o++) dst[o] = z[o * 4 + a * 2 + b2] + md->up0_b[o];
                    }
            }
        cs_layernorm(up1, up1, 4 * N, P4, md->up1_w, md->up1_b, 1e-6f, n_threads);
        cs_gelu(up1, (size_t)4 * N * P4, n_threads);
        float *z2 = cs_alloc((size_t)4 * N, (size_t)P8 * 4 * sizeof(float));
        if (!z2) {
            rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory in the mask decoder");
            goto done;
        }
        cs_gemm(4 * N, P8 * 4, P4, up1, P4, md->up3_w, P8 * 4, 0, 0.0f, z2, P8 * 4, n_threads);
        const int G2 = 2 * G;
        for (int y = 0; y < G2; y++)
            for (int x = 0; x < G2; x++) {
                const float *z = z2 + ((size_t)y * G2 + x) * P8 * 4;
                for (int a = 0; a < 2; a++)
                    for (int b2 = 0; b2 < 2; b2++) {
                        float *dst = up2 + ((size_t)(2 * y + a) * (2 * G2) + 2 * x + b2) * P8;
                        for (int o = 0; o < P8; o++) dst[o] = z[o * 4 + a * 2 + b2] + md->up3_b[o];
                    }
            }
        free(z2);
        cs_gelu(up2, (size_t)16 * N * P8, n_threads);

        /* hypernetworks: one P/8 vector per mask token; masks = hyper . upscaled */
        float hyper[16 * 128];
        for (int m = 0; m < nm; m++)
            mlp3(Q + (size_t)(1 + m) * P, md->hyper_w[m], md->hyper_b[m], P, P, P8, hyper + m * P8);
        float *lg = logits + (size_t)bi * nm * 16 * N;
        cs_gemm(nm, 16 * N, P8, hyper, P8, up2, P8, 1, 0.0f, lg, 16 * N, n_threads);
        mlp3(Q, md->iou_w, md->iou_b, P, md->iou_hidden, nm, iou + (size_t)bi * nm);
    }
done:
    free(keys);
    free(pe);
    free(kpe);
    free(kout);
    free(shared_kp);
    free(shared_vp);
    free(Q);
    free(Q0);
    free(qpe);
    free(qout);
    free(mlp_h);
    free(up1);
    free(up2);
    free(emb_t);
    free(ws.qp);
    free(ws.kp);
    free(ws.vp);
    free(ws.o);
    free(ws.scores);
    return rc;
}
