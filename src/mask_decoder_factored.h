/* Factored decoding of a batch of prompts (mask_decoder_factored.c), used by the mask
 * decoder (mask_decoder.c) for batches: a prompt's image tokens are kept as the shared
 * ones plus a low-rank correction, so that their products with the weights are mostly
 * shared by the image's prompts. Private to the library. */
#ifndef CELLSAM_MASK_DECODER_FACTORED_H
#define CELLSAM_MASK_DECODER_FACTORED_H

#include "model.h"

/* The prompt side of the folded attentions, which mask_decoder.c computes per prompt
 * (sized for T tokens, R = heads x T): token keys kp, values vp, queries qp and
 * attention output o (T x I); per head and token the values through the output
 * projection vf and the keys through the query projection kf (R x P), with the bias
 * terms cb; the queries through the key projection qf (R x P); rv scratch. */
typedef struct {
    float *kp, *vp, *qp, *o; /* T x I */
    float *kf, *vf, *cb;     /* R x P each, R */
    float *qf, *rv;          /* R x P each */
} cs_fold_ws;

#define FX_MAX_DEPTH 4
#define FX_MAX_TOKENS 32
#define FX_MAX_HEAD_DIM 128

struct cs_fx_shared {
    int depth, valid;
    float *gamma;                                /* (depth + 1) x P: Gamma_l */
    /* I x N, fx_block_layout: W_q (E Gamma_l)^T, W_q pe^T + b_q (layer 0: W_q (E + pe)^T
     * + b_q in q_img, no q_pe) */
    float *q_img[FX_MAX_DEPTH], *q_pe[FX_MAX_DEPTH];
    float *e_mean[FX_MAX_DEPTH], *e_sq[FX_MAX_DEPTH]; /* N: mean, centred squared norm of E Gamma_l */
    float *x_attn[FX_MAX_DEPTH][FX_MAX_DEPTH];   /* [l][l'], I x N (blocked): cross terms of layer l' vectors */
    float *x_const[FX_MAX_DEPTH];                /* (3l + 1) x N (plain): cross terms of the constants */
    /* step s (0: layer 0's token-to-image attention, whose keys are E + pe, so k_pe[0]
     * is NULL; depth: the final attention): W_k (E Gamma_s)^T and W_k pe^T (blocked),
     * E Gamma_s W_v^T (by head: heads x N x dh) */
    float *k_img[FX_MAX_DEPTH + 1], *k_pe[FX_MAX_DEPTH + 1], *v_img[FX_MAX_DEPTH + 1];
    float *w_eff;                                /* scratch: an effective weight matrix */
    float *plain;                                /* scratch: a product before fx_block_layout */
};

/* A prompt's factored state and scratch. */
typedef struct {
    float *U, *C, *Y, *S, *alpha, *mean, *cross, *quad, *cu, *G, *umean, *M, *UV, *AC, *vp, *gath;
    int m;
} cs_fx_item;

/* Whether the factored path takes this decoder with T prompt tokens. */
int cs_fx_supported(const cs_mask_decoder *md, int T);
/* The shared part (per image): allocate, free, and compute it for the image tokens E
 * (keys0, N x P), E + pe and pe; valid becomes 1 when done (0 on failure: decode
 * directly). */
struct cs_fx_shared *cs_fx_shared_new(const cs_mask_decoder *md);
void cs_fx_shared_free(struct cs_fx_shared *f);
void cs_fx_shared_compute(struct cs_fx_shared *f, const cs_mask_decoder *md, const float *E, const float *E_pe,
                          const float *pe, int n_threads);
/* A prompt's state and scratch for T tokens (x->U is NULL until allocated). */
int cs_fx_item_alloc(cs_fx_item *x, const cs_mask_decoder *md, int T);
void cs_fx_item_free(cs_fx_item *x);
/* Start a prompt: its tokens are keys0 (alpha = 1, no prompt vectors). */
void cs_fx_item_start(cs_fx_item *x);
/* Layer l's image-to-token attention and LayerNorm on the factored tokens (fw from
 * i2t_prepare: kp, vp, vf, and for l > 0 kf). */
void cs_fx_i2t(const struct cs_fx_shared *f, const cs_mask_decoder *md, int l, const cs_fold_ws *fw, int T,
               cs_fx_item *x);
/* Step s's token-to-image attention of nq query rows (fw from t2i_prepare: qp, qf);
 * writes out (nq x P). */
void cs_fx_t2i(const struct cs_fx_shared *f, const cs_mask_decoder *md, int s, cs_fold_ws *fw, int nq,
               cs_fx_item *x, float *out);
/* Rows tok[0..n) (all N when tok is NULL) of the factored tokens, made explicit (n x P). */
void cs_fx_rows(const struct cs_fx_shared *f, const cs_mask_decoder *md, const float *E, cs_fx_item *x,
                const int *tok, int n, float *rows);

#endif
