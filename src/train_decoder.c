/* Trainable SAM prompt encoder (box prompts) and mask decoder (train.h; spec §4.3,
 * §4.4). Same arithmetic as the inference path (prompt_encoder.c, mask_decoder.c),
 * plus what the backward needs.
 *
 * Layout. Tokens of all prompts are stacked (n*T rows, T = 1 + mask tokens + 2
 * box corners), so every token-side linear is one GEMM. Image tokens are
 * channel-last (N = grid^2 rows of P). Layer 0's keys (embedding + no-mask
 * embedding) are the same for every prompt: their token-to-image keys/values and
 * image-to-token queries are projected once and their gradients are summed over
 * the prompts. From layer 0's image-to-token update on, keys differ per prompt; that
 * work runs prompt by prompt, prompts spread over threads (each with private
 * gradient buffers for the image-side parameters, reduced at the end), or, with
 * few prompts, one prompt at a time with threaded primitives.
 *
 * Parameters live in a cs_tparams store under the official names and are kept as
 * indices, because other modules may add parameters later (which can move the
 * store's array); pointers are re-resolved at each call.
 *
 * Memory kept between a forward and its backward, per prompt, in floats (N = grid^2,
 * I = P/downsample, h heads, d depth, T tokens, m = mlp):
 *   image side: d*(N*P + 2N + 2*h*T*N + N*I)  LN4 inputs and statistics, t2i and i2t
 *                                              probabilities, i2t attention outputs
 *             + (d-1)*3*N*I                   t2i keys/values, i2t queries of layers >= 1
 *             + 2*N*I + h*T*N + N*P           final attention keys/values/probabilities,
 *                                              keys (forward) / key gradients (backward)
 *   token side: about T*(d*(12P + 5I + 2m + 6) + 4P + 2I + 2) + small head rows
 * Keys of layers >= 1 and the whole upscaler are recomputed in the backward instead
 * of being kept. Grid 64: P=256, d=2, h=8: 32.5 MB per prompt; P=64, h=2: 8.1 MB.
 * Each worker thread adds about 12.5*N*P floats (upscaler work, layer-0 sums), the
 * decoder about 6.5*N*P shared (I = P/2); cs_tdecoder_activation_bytes() reports
 * the total. */
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model.h"
#include "ops.h"
#include "train.h"

#define TD_MAX_PROMPTS 1024
#define TD_MAX_DIM 1024
#define TD_MAX_GRID 128
#define TD_MAX_DEPTH 16
#define TD_MAX_MASK_TOKENS 16
#define TD_LN_EPS 1e-5f   /* transformer LayerNorms */
#define TD_LN2D_EPS 1e-6f /* upscaler LayerNorm2d */

/* ------------------------------------------------------------ parameters */

typedef struct {
    cs_tparam *qw, *qb, *kw, *kb, *vw, *vb, *ow, *ob;
} tattn;

typedef struct {
    tattn sa, t2i, i2t;
    cs_tparam *nw[4], *nb[4];
    cs_tparam *l1w, *l1b, *l2w, *l2b;
} tlayer;

/* Image-side parameters touched inside per-prompt work, by index, so that worker
 * threads can substitute private gradient buffers. */
enum { IP_TK_W, IP_TK_B, IP_TV_W, IP_TV_B, IP_IQ_W, IP_IQ_B, IP_IO_W, IP_IO_B, IP_N4_W, IP_N4_B, IP_PER_LAYER };
enum { IPF_K_W, IPF_K_B, IPF_V_W, IPF_V_B, IPU_0W, IPU_0B, IPU_1W, IPU_1B, IPU_3W, IPU_3B, IP_TAIL };

typedef struct {
    cs_tparam **field; /* where the resolved pointer goes */
    size_t index;      /* position in the store */
} tbind;

/* ----------------------------------------------------------- activations */

typedef struct {
    const float *qin;                 /* layer input tokens (T0 or the previous q3) */
    float *sq, *sk, *sv, *sP, *so;    /* self-attention: R x P (x3), n h T T, R x P */
    float *ln1_in, *ln1_m, *ln1_r, *q1;
    float *tq, *tP, *to;              /* token-to-image: R x I, n h T N, R x I */
    float *tk, *tv;                   /* nN x I (layers >= 1) */
    float *ln2_in, *ln2_m, *ln2_r, *q2;
    float *mh, *ma;                   /* MLP hidden before / after ReLU: R x mlp */
    float *ln3_in, *ln3_m, *ln3_r, *q3;
    float *ik, *iv;                   /* image-to-token keys/values: R x I */
    float *iq;                        /* nN x I (layers >= 1) */
    float *iP, *io;                   /* n h N T, nN x I */
    float *ln4_in, *ln4_m, *ln4_r;    /* nN x P, nN */
} lacts;

typedef struct {
    float *T0;                              /* R x P: initial tokens (= query PE) */
    lacts *L;
    float *fq, *fk, *fv, *fP, *fo;          /* final attention: R x I, nN x I (x2), n h T N, R x I */
    float *lnf_in, *lnf_m, *lnf_r, *qf;
    float *K;                               /* nN x P: keys (forward), key gradients (backward) */
    float *hin, *h1, *a1, *h2, *a2, *hout;  /* hypernetwork of mask token 0 */
    float *iin, *j1, *b1, *j2, *b2, *iout;  /* IoU head */
    /* token-side work */
    float *xpe, *tmp;                       /* R x P */
    float *dT0, *dQ, *dX, *t1;              /* R x P */
    float *dA, *dq, *dk, *dv;               /* R x max(P, I) */
    float *dM;                              /* R x mlp */
    float *dn1, *dn2, *dhead;               /* n x max(P, H) */
    float *dh;                              /* n x P/8 */
} acts;

typedef struct {
    cs_tparam *sh;    /* private copies of the image-side parameters */
    cs_tparam **ip;   /* pointers to sh */
    float *mem;       /* everything below */
    float *gbuf;      /* their gradients */
    float *u[7];      /* upscaler: kc, a1t, a1n, g1 (P N each), a2, U, d2 (2 P N each) */
    float *kb, *kpe, *tmp, *d1, *d2; /* overlays of u[] for the transformer phases */
    float *scratch;   /* attention backward: T x N */
    float *mean, *rstd; /* 4N each */
    float *dk0, *dtk0, *dtv0, *diq0; /* layer-0 sums: N x P, N x I (x3) */
} worker;

struct cs_tdecoder {
    cs_tdecoder_config c;
    cs_tparams *ps;
    char prefix[128];
    int P, I, T, N, G, P4, P8, H, nm, heads, dhs, dhx;
    /* resolved parameters */
    cs_tparam *gauss, *pt[4], *nap, *nomask, *md[10];
    tlayer *L;
    tattn fin;
    cs_tparam *nfw, *nfb, *iou_tok, *mask_tok;
    cs_tparam *up0w, *up0b, *up1w, *up1b, *up3w, *up3b;
    cs_tparam *hw[TD_MAX_MASK_TOKENS][3], *hb[TD_MAX_MASK_TOKENS][3], *iw[3], *ib[3];
    tbind *binds;
    int n_binds, cap_binds;
    cs_tparam **ipr;  /* image-side parameters (real) */
    int n_ip;
    size_t ip_floats;
    /* shared image-side buffers */
    float *shared;
    float *pe, *gauss_seen, *K0, *kpe0, *tk0, *tv0, *iq0, *dK0, *dtmp;
    int pe_valid;
    /* activations */
    float *act_mem;
    size_t act_floats;
    int cap_n;
    acts A;
    worker *ws;
    int n_ws;
    /* current call */
    int n, outer, inner, have_train;
    float *logits;
    const float *dlogits;
};

/* --------------------------------------------------------------- helpers */

static void vadd(float *dst, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = a[i] + b[i];
}
static void vacc(float *dst, const float *a, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] += a[i];
}

/* Bump allocator over one float buffer; with base NULL it only counts. Sizes are
 * capped by the configuration limits, so size_t arithmetic cannot overflow. */
typedef struct {
    float *base;
    size_t used;
} arena;

static float *take(arena *a, size_t n) {
    n = (n + 15) & ~(size_t)15; /* 64-byte alignment of every buffer */
    float *p = a->base ? a->base + a->used : NULL;
    a->used += n;
    return p;
}

/* ---------------------------------------------------------- registration */

enum { INIT_KAIMING, INIT_ZERO, INIT_ONE, INIT_NORMAL };

typedef struct {
    cs_tdecoder *d;
    cs_rng *rng;
    int rc;
} reg_ctx;

static void reg(reg_ctx *r, cs_tparam **field, int init, int frozen, int ndim, const int64_t *shape,
                const char *fmt, ...) __attribute__((format(printf, 7, 8)));

static void reg(reg_ctx *r, cs_tparam **field, int init, int frozen, int ndim, const int64_t *shape,
                const char *fmt, ...) {
    if (r->rc) return;
    cs_tdecoder *d = r->d;
    char name[320];
    int len = snprintf(name, sizeof name, "%s", d->prefix);
    va_list ap;
    va_start(ap, fmt);
    int len2 = vsnprintf(name + len, sizeof name - (size_t)len, fmt, ap);
    va_end(ap);
    if (len2 < 0 || (size_t)len + (size_t)len2 >= sizeof name) {
        r->rc = cs_error(CELLSAM_ERR_INVALID, "parameter name too long under prefix %s", d->prefix);
        return;
    }
    cs_tparam *p = cs_tparams_find(d->ps, name);
    if (p) {
        int same = p->ndim == ndim;
        for (int i = 0; same && i < ndim; i++) same = p->shape[i] == shape[i];
        if (!same) {
            char want[96] = "";
            for (int i = 0; i < ndim; i++)
                snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", i ? "," : "",
                         (long long)shape[i]);
            r->rc = cs_error(CELLSAM_ERR_MODEL, "%s in the parameter store does not have shape (%s)", name, want);
            return;
        }
    } else {
        p = cs_tparams_add(d->ps, name, ndim, shape);
        if (!p) {
            r->rc = cs_error_prefix(CELLSAM_ERR_NOMEM, "registering %s", name);
            return;
        }
        switch (init) {
        case INIT_KAIMING: cs_init_kaiming_uniform(p, r->rng); break;
        case INIT_ONE: cs_init_const(p, 1.0f); break;
        case INIT_NORMAL:
            for (size_t i = 0; i < p->n; i++) p->w[i] = (float)cs_rng_normal(r->rng);
            break;
        default: cs_init_const(p, 0.0f); break;
        }
    }
    /* unused by box prompts or a fixed buffer in SAM: never trained here */
    if (frozen) p->frozen = 1;
    if (d->n_binds == d->cap_binds) {
        int cap = d->cap_binds ? 2 * d->cap_binds : 256;
        tbind *nb = realloc(d->binds, (size_t)cap * sizeof *nb);
        if (!nb) {
            r->rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory registering decoder parameters");
            return;
        }
        d->binds = nb;
        d->cap_binds = cap;
    }
    d->binds[d->n_binds].field = field;
    d->binds[d->n_binds].index = (size_t)(p - d->ps->items);
    d->n_binds++;
    *field = p;
}

#define SHP(...) (int)(sizeof((const int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (const int64_t[]){__VA_ARGS__}

static void reg_attn(reg_ctx *r, tattn *a, int64_t P, int64_t I, const char *name) {
    reg(r, &a->qw, INIT_KAIMING, 0, SHP(I, P), "mask_decoder.%s.q_proj.weight", name);
    reg(r, &a->qb, INIT_ZERO, 0, SHP(I), "mask_decoder.%s.q_proj.bias", name);
    reg(r, &a->kw, INIT_KAIMING, 0, SHP(I, P), "mask_decoder.%s.k_proj.weight", name);
    reg(r, &a->kb, INIT_ZERO, 0, SHP(I), "mask_decoder.%s.k_proj.bias", name);
    reg(r, &a->vw, INIT_KAIMING, 0, SHP(I, P), "mask_decoder.%s.v_proj.weight", name);
    reg(r, &a->vb, INIT_ZERO, 0, SHP(I), "mask_decoder.%s.v_proj.bias", name);
    reg(r, &a->ow, INIT_KAIMING, 0, SHP(P, I), "mask_decoder.%s.out_proj.weight", name);
    reg(r, &a->ob, INIT_ZERO, 0, SHP(P), "mask_decoder.%s.out_proj.bias", name);
}

static void resolve(cs_tdecoder *d) {
    for (int i = 0; i < d->n_binds; i++) *d->binds[i].field = &d->ps->items[d->binds[i].index];
    d->gauss->frozen = 1; /* a buffer in SAM, not a parameter: even a prefix unfreeze keeps it */
    for (int l = 0; l < d->c.depth; l++) {
        cs_tparam **ip = d->ipr + (size_t)l * IP_PER_LAYER;
        const tlayer *L = &d->L[l];
        ip[IP_TK_W] = L->t2i.kw;
        ip[IP_TK_B] = L->t2i.kb;
        ip[IP_TV_W] = L->t2i.vw;
        ip[IP_TV_B] = L->t2i.vb;
        ip[IP_IQ_W] = L->i2t.qw;
        ip[IP_IQ_B] = L->i2t.qb;
        ip[IP_IO_W] = L->i2t.ow;
        ip[IP_IO_B] = L->i2t.ob;
        ip[IP_N4_W] = L->nw[3];
        ip[IP_N4_B] = L->nb[3];
    }
    cs_tparam **t = d->ipr + (size_t)d->c.depth * IP_PER_LAYER;
    t[IPF_K_W] = d->fin.kw;
    t[IPF_K_B] = d->fin.kb;
    t[IPF_V_W] = d->fin.vw;
    t[IPF_V_B] = d->fin.vb;
    t[IPU_0W] = d->up0w;
    t[IPU_0B] = d->up0b;
    t[IPU_1W] = d->up1w;
    t[IPU_1B] = d->up1b;
    t[IPU_3W] = d->up3w;
    t[IPU_3B] = d->up3b;
}

static int check_config(const cs_tdecoder_config *c) {
    if (c->dim < 8 || c->dim > TD_MAX_DIM || c->dim % 8)
        return cs_error(CELLSAM_ERR_INVALID, "decoder: dim %d must be a multiple of 8 in 8..%d", c->dim, TD_MAX_DIM);
    if (c->depth < 1 || c->depth > TD_MAX_DEPTH)
        return cs_error(CELLSAM_ERR_INVALID, "decoder: depth %d outside 1..%d", c->depth, TD_MAX_DEPTH);
    if (c->heads < 1 || c->dim % c->heads)
        return cs_error(CELLSAM_ERR_INVALID, "decoder: %d heads do not divide dim %d", c->heads, c->dim);
    if (c->downsample < 1 || c->dim % c->downsample || (c->dim / c->downsample) % c->heads)
        return cs_error(CELLSAM_ERR_INVALID, "decoder: attention downsample %d does not fit dim %d with %d heads",
                        c->downsample, c->dim, c->heads);
    if (c->mlp < 1 || c->mlp > 65536)
        return cs_error(CELLSAM_ERR_INVALID, "decoder: mlp width %d outside 1..65536", c->mlp);
    if (c->n_mask_tokens < 1 || c->n_mask_tokens > TD_MAX_MASK_TOKENS)
        return cs_error(CELLSAM_ERR_INVALID, "decoder: %d mask tokens outside 1..%d", c->n_mask_tokens,
                        TD_MAX_MASK_TOKENS);
    if (c->iou_hidden < 1 || c->iou_hidden > 65536)
        return cs_error(CELLSAM_ERR_INVALID, "decoder: IoU head width %d outside 1..65536", c->iou_hidden);
    if (c->grid < 1 || c->grid > TD_MAX_GRID)
        return cs_error(CELLSAM_ERR_INVALID, "decoder: grid %d outside 1..%d", c->grid, TD_MAX_GRID);
    if (c->img_size < 1 || c->img_size > (1 << 20))
        return cs_error(CELLSAM_ERR_INVALID, "decoder: image size %d outside 1..%d", c->img_size, 1 << 20);
    if (c->mask_in_chans < 4 || c->mask_in_chans > 4096 || c->mask_in_chans % 4)
        return cs_error(CELLSAM_ERR_INVALID, "decoder: mask_in_chans %d must be a multiple of 4 in 4..4096",
                        c->mask_in_chans);
    return CELLSAM_OK;
}

int cs_tdecoder_create(cs_tparams *ps, const char *prefix, const cs_tdecoder_config *cfg, cs_rng *rng,
                       cs_tdecoder **out) {
    if (!out) return cs_error(CELLSAM_ERR_INVALID, "cs_tdecoder_create: NULL output");
    *out = NULL;
    if (!ps || !cfg) return cs_error(CELLSAM_ERR_INVALID, "cs_tdecoder_create: NULL argument");
    if (!prefix) prefix = "";
    int rc = check_config(cfg);
    if (rc) return rc;
    if (strlen(prefix) >= 128) return cs_error(CELLSAM_ERR_INVALID, "decoder: prefix too long");
    cs_rng local_rng;
    if (!rng) { /* only used for parameters the store does not hold yet */
        cs_rng_seed(&local_rng, 0x5a3dec0de5ULL);
        rng = &local_rng;
    }
    cs_tdecoder *d = calloc(1, sizeof *d);
    if (!d) return cs_error(CELLSAM_ERR_NOMEM, "out of memory for the decoder");
    d->c = *cfg;
    d->ps = ps;
    snprintf(d->prefix, sizeof d->prefix, "%s", prefix);
    const int P = cfg->dim;
    d->P = P;
    d->I = P / cfg->downsample;
    d->nm = cfg->n_mask_tokens;
    d->T = 1 + d->nm + 2;
    d->G = cfg->grid;
    d->N = cfg->grid * cfg->grid;
    d->P4 = P / 4;
    d->P8 = P / 8;
    d->H = cfg->iou_hidden;
    d->heads = cfg->heads;
    d->dhs = P / cfg->heads;
    d->dhx = d->I / cfg->heads;
    d->L = calloc((size_t)cfg->depth, sizeof *d->L);
    d->A.L = calloc((size_t)cfg->depth, sizeof *d->A.L);
    d->n_ip = cfg->depth * IP_PER_LAYER + IP_TAIL;
    d->ipr = calloc((size_t)d->n_ip, sizeof *d->ipr);
    if (!d->L || !d->A.L || !d->ipr) {
        cs_tdecoder_free(d);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory for the decoder");
    }

    reg_ctx r = {d, rng, 0};
    const int64_t p = P, I = d->I, c2 = cfg->mask_in_chans, c1 = c2 / 4;
    /* prompt encoder: the Fourier matrix is a fixed buffer in SAM (N(0,1) * scale 1);
     * point/not-a-point embeddings and the mask downscaler are unused by box prompts */
    reg(&r, &d->gauss, INIT_NORMAL, 1, SHP(2, p / 2), "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix");
    for (int i = 0; i < 4; i++)
        reg(&r, &d->pt[i], INIT_NORMAL, i < 2, SHP(1, p), "prompt_encoder.point_embeddings.%d.weight", i);
    reg(&r, &d->nap, INIT_NORMAL, 1, SHP(1, p), "prompt_encoder.not_a_point_embed.weight");
    cs_tparam **md = d->md;
    reg(&r, &md[0], INIT_KAIMING, 1, SHP(c1, 1, 2, 2), "prompt_encoder.mask_downscaling.0.weight");
    reg(&r, &md[1], INIT_ZERO, 1, SHP(c1), "prompt_encoder.mask_downscaling.0.bias");
    reg(&r, &md[2], INIT_ONE, 1, SHP(c1), "prompt_encoder.mask_downscaling.1.weight");
    reg(&r, &md[3], INIT_ZERO, 1, SHP(c1), "prompt_encoder.mask_downscaling.1.bias");
    reg(&r, &md[4], INIT_KAIMING, 1, SHP(c2, c1, 2, 2), "prompt_encoder.mask_downscaling.3.weight");
    reg(&r, &md[5], INIT_ZERO, 1, SHP(c2), "prompt_encoder.mask_downscaling.3.bias");
    reg(&r, &md[6], INIT_ONE, 1, SHP(c2), "prompt_encoder.mask_downscaling.4.weight");
    reg(&r, &md[7], INIT_ZERO, 1, SHP(c2), "prompt_encoder.mask_downscaling.4.bias");
    reg(&r, &md[8], INIT_KAIMING, 1, SHP(p, c2, 1, 1), "prompt_encoder.mask_downscaling.6.weight");
    reg(&r, &md[9], INIT_ZERO, 1, SHP(p), "prompt_encoder.mask_downscaling.6.bias");
    reg(&r, &d->nomask, INIT_NORMAL, 0, SHP(1, p), "prompt_encoder.no_mask_embed.weight");

    for (int l = 0; l < cfg->depth && !r.rc; l++) {
        tlayer *L = &d->L[l];
        char nm[96];
        snprintf(nm, sizeof nm, "transformer.layers.%d.self_attn", l);
        reg_attn(&r, &L->sa, p, p, nm);
        snprintf(nm, sizeof nm, "transformer.layers.%d.cross_attn_token_to_image", l);
        reg_attn(&r, &L->t2i, p, I, nm);
        snprintf(nm, sizeof nm, "transformer.layers.%d.cross_attn_image_to_token", l);
        reg_attn(&r, &L->i2t, p, I, nm);
        for (int k = 0; k < 4; k++) {
            reg(&r, &L->nw[k], INIT_ONE, 0, SHP(p), "mask_decoder.transformer.layers.%d.norm%d.weight", l, k + 1);
            reg(&r, &L->nb[k], INIT_ZERO, 0, SHP(p), "mask_decoder.transformer.layers.%d.norm%d.bias", l, k + 1);
        }
        reg(&r, &L->l1w, INIT_KAIMING, 0, SHP(cfg->mlp, p), "mask_decoder.transformer.layers.%d.mlp.lin1.weight", l);
        reg(&r, &L->l1b, INIT_ZERO, 0, SHP(cfg->mlp), "mask_decoder.transformer.layers.%d.mlp.lin1.bias", l);
        reg(&r, &L->l2w, INIT_KAIMING, 0, SHP(p, cfg->mlp), "mask_decoder.transformer.layers.%d.mlp.lin2.weight", l);
        reg(&r, &L->l2b, INIT_ZERO, 0, SHP(p), "mask_decoder.transformer.layers.%d.mlp.lin2.bias", l);
    }
    reg_attn(&r, &d->fin, p, I, "transformer.final_attn_token_to_image");
    reg(&r, &d->nfw, INIT_ONE, 0, SHP(p), "mask_decoder.transformer.norm_final_attn.weight");
    reg(&r, &d->nfb, INIT_ZERO, 0, SHP(p), "mask_decoder.transformer.norm_final_attn.bias");
    reg(&r, &d->iou_tok, INIT_NORMAL, 0, SHP(1, p), "mask_decoder.iou_token.weight");
    reg(&r, &d->mask_tok, INIT_NORMAL, 0, SHP(d->nm, p), "mask_decoder.mask_tokens.weight");
    reg(&r, &d->up0w, INIT_KAIMING, 0, SHP(p, p / 4, 2, 2), "mask_decoder.output_upscaling.0.weight");
    reg(&r, &d->up0b, INIT_ZERO, 0, SHP(p / 4), "mask_decoder.output_upscaling.0.bias");
    reg(&r, &d->up1w, INIT_ONE, 0, SHP(p / 4), "mask_decoder.output_upscaling.1.weight");
    reg(&r, &d->up1b, INIT_ZERO, 0, SHP(p / 4), "mask_decoder.output_upscaling.1.bias");
    reg(&r, &d->up3w, INIT_KAIMING, 0, SHP(p / 4, p / 8, 2, 2), "mask_decoder.output_upscaling.3.weight");
    reg(&r, &d->up3b, INIT_ZERO, 0, SHP(p / 8), "mask_decoder.output_upscaling.3.bias");
    for (int m = 0; m < d->nm; m++) {
        const int64_t outs[3] = {p, p, p / 8};
        for (int k = 0; k < 3; k++) {
            reg(&r, &d->hw[m][k], INIT_KAIMING, 0, SHP(outs[k], p),
                "mask_decoder.output_hypernetworks_mlps.%d.layers.%d.weight", m, k);
            reg(&r, &d->hb[m][k], INIT_ZERO, 0, SHP(outs[k]), "mask_decoder.output_hypernetworks_mlps.%d.layers.%d.bias",
                m, k);
        }
    }
    const int64_t iin[3] = {p, d->H, d->H}, iout[3] = {d->H, d->H, d->nm};
    for (int k = 0; k < 3; k++) {
        reg(&r, &d->iw[k], INIT_KAIMING, 0, SHP(iout[k], iin[k]), "mask_decoder.iou_prediction_head.layers.%d.weight", k);
        reg(&r, &d->ib[k], INIT_ZERO, 0, SHP(iout[k]), "mask_decoder.iou_prediction_head.layers.%d.bias", k);
    }
    if (r.rc) {
        cs_tdecoder_free(d);
        return r.rc;
    }
    resolve(d);
    d->ip_floats = 0;
    for (int i = 0; i < d->n_ip; i++) d->ip_floats += (d->ipr[i]->n + 15) & ~(size_t)15;

    /* shared image-side buffers: PE, its Gaussian matrix, layer-0 keys/projections,
     * and the layer-0 key gradient with a work buffer */
    const size_t NP = (size_t)d->N * P, NI = (size_t)d->N * d->I;
    arena a = {NULL, 0};
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            d->shared = cs_alloc(a.used, sizeof(float));
            if (!d->shared) {
                cs_tdecoder_free(d);
                return cs_error(CELLSAM_ERR_NOMEM, "out of memory for the decoder buffers");
            }
            a.base = d->shared;
            a.used = 0;
        }
        d->pe = take(&a, NP);
        d->gauss_seen = take(&a, (size_t)P);
        d->K0 = take(&a, NP);
        d->kpe0 = take(&a, NP);
        d->dK0 = take(&a, NP);
        d->dtmp = take(&a, NP);
        d->tk0 = take(&a, NI);
        d->tv0 = take(&a, NI);
        d->iq0 = take(&a, NI);
    }
    *out = d;
    return CELLSAM_OK;
}

static void workers_free(cs_tdecoder *d) {
    for (int t = 0; t < d->n_ws; t++) {
        cs_free(d->ws[t].mem);
        free(d->ws[t].sh);
        free(d->ws[t].ip);
    }
    free(d->ws);
    d->ws = NULL;
    d->n_ws = 0;
}

void cs_tdecoder_free(cs_tdecoder *d) {
    if (!d) return;
    workers_free(d);
    cs_free(d->act_mem);
    cs_free(d->shared);
    free(d->binds);
    free(d->ipr);
    free(d->L);
    free(d->A.L);
    free(d);
}

/* --------------------------------------------------------------- buffers */

static void layout_acts(const cs_tdecoder *d, int n, arena *a, acts *A) {
    const size_t P = (size_t)d->P, I = (size_t)d->I, T = (size_t)d->T, N = (size_t)d->N, h = (size_t)d->heads;
    const size_t R = (size_t)n * T, nN = (size_t)n * N, M = (size_t)d->c.mlp;
    size_t WPH = P > (size_t)d->H ? P : (size_t)d->H;
    const size_t WPI = P > I ? P : I;
    if (WPH < (size_t)d->nm) WPH = (size_t)d->nm;
    A->T0 = take(a, R * P);
    for (int l = 0; l < d->c.depth; l++) {
        lacts *L = &A->L[l];
        L->sq = take(a, R * P);
        L->sk = take(a, R * P);
        L->sv = take(a, R * P);
        L->sP = take(a, (size_t)n * h * T * T);
        L->so = take(a, R * P);
        L->ln1_in = take(a, R * P);
        L->ln1_m = take(a, R);
        L->ln1_r = take(a, R);
        L->q1 = take(a, R * P);
        L->tq = take(a, R * I);
        L->tP = take(a, (size_t)n * h * T * N);
        L->to = take(a, R * I);
        L->tk = l ? take(a, nN * I) : NULL;
        L->tv = l ? take(a, nN * I) : NULL;
        L->ln2_in = take(a, R * P);
        L->ln2_m = take(a, R);
        L->ln2_r = take(a, R);
        L->q2 = take(a, R * P);
        L->mh = take(a, R * M);
        L->ma = take(a, R * M);
        L->ln3_in = take(a, R * P);
        L->ln3_m = take(a, R);
        L->ln3_r = take(a, R);
        L->q3 = take(a, R * P);
        L->ik = take(a, R * I);
        L->iv = take(a, R * I);
        L->iq = l ? take(a, nN * I) : NULL;
        L->iP = take(a, (size_t)n * h * N * T);
        L->io = take(a, nN * I);
        L->ln4_in = take(a, nN * P);
        L->ln4_m = take(a, nN);
        L->ln4_r = take(a, nN);
    }
    A->fq = take(a, R * I);
    A->fk = take(a, nN * I);
    A->fv = take(a, nN * I);
    A->fP = take(a, (size_t)n * h * T * N);
    A->fo = take(a, R * I);
    A->lnf_in = take(a, R * P);
    A->lnf_m = take(a, R);
    A->lnf_r = take(a, R);
    A->qf = take(a, R * P);
    A->K = take(a, nN * P);
    A->hin = take(a, (size_t)n * P);
    A->h1 = take(a, (size_t)n * P);
    A->a1 = take(a, (size_t)n * P);
    A->h2 = take(a, (size_t)n * P);
    A->a2 = take(a, (size_t)n * P);
    A->hout = take(a, (size_t)n * d->P8);
    A->iin = take(a, (size_t)n * P);
    A->j1 = take(a, (size_t)n * d->H);
    A->b1 = take(a, (size_t)n * d->H);
    A->j2 = take(a, (size_t)n * d->H);
    A->b2 = take(a, (size_t)n * d->H);
    A->iout = take(a, (size_t)n * d->nm);
    A->xpe = take(a, R * P);
    A->tmp = take(a, R * P);
    A->dT0 = take(a, R * P);
    A->dQ = take(a, R * P);
    A->dX = take(a, R * P);
    A->t1 = take(a, R * P);
    A->dA = take(a, R * WPI);
    A->dq = take(a, R * WPI);
    A->dk = take(a, R * WPI);
    A->dv = take(a, R * WPI);
    A->dM = take(a, R * M);
    A->dn1 = take(a, (size_t)n * WPH);
    A->dn2 = take(a, (size_t)n * WPH);
    A->dhead = take(a, (size_t)n * WPH);
    A->dh = take(a, (size_t)n * d->P8);
}

static size_t acts_floats(const cs_tdecoder *d, int n) {
    arena a = {NULL, 0};
    acts A;
    lacts L[TD_MAX_DEPTH];
    A.L = L;
    layout_acts(d, n, &a, &A);
    return a.used;
}

static size_t worker_floats(const cs_tdecoder *d, worker *w) {
    const size_t P = (size_t)d->P, I = (size_t)d->I, N = (size_t)d->N;
    arena a = {w ? w->mem : NULL, 0};
    float *u[7];
    for (int i = 0; i < 7; i++) u[i] = take(&a, (i < 4 ? 1 : 2) * N * P);
    float *scratch = take(&a, (size_t)d->T * N);
    float *mean = take(&a, 4 * N), *rstd = take(&a, 4 * N);
    float *dk0 = take(&a, N * P), *dtk0 = take(&a, N * I), *dtv0 = take(&a, N * I), *diq0 = take(&a, N * I);
    float *gbuf = take(&a, d->ip_floats);
    if (w) {
        memcpy(w->u, u, sizeof u);
        /* the transformer phases never run together with the upscaler */
        w->kb = u[0];
        w->kpe = u[1];
        w->tmp = u[2];
        w->d1 = u[4];
        w->d2 = u[5];
        w->scratch = scratch;
        w->mean = mean;
        w->rstd = rstd;
        w->dk0 = dk0;
        w->dtk0 = dtk0;
        w->dtv0 = dtv0;
        w->diq0 = diq0;
        w->gbuf = gbuf;
    }
    return a.used;
}

size_t cs_tdecoder_activation_bytes(const cs_tdecoder *d, int n, int n_threads) {
    if (!d || n < 0) return 0;
    if (n_threads < 1) n_threads = 1;
    const int outer = (n_threads > 1 && 2 * n >= n_threads) ? (n_threads < n ? n_threads : n) : 1;
    const size_t NP = (size_t)d->N * d->P, NI = (size_t)d->N * d->I;
    size_t floats = acts_floats(d, n) + (size_t)outer * worker_floats(d, NULL) + 5 * NP + 3 * NI + (size_t)d->P;
    return floats * sizeof(float);
}

static int ensure_buffers(cs_tdecoder *d, int n, int n_workers) {
    if (n > d->cap_n) {
        size_t fl = acts_floats(d, n);
        float *mem = cs_alloc(fl, sizeof(float));
        if (!mem) return cs_error(CELLSAM_ERR_NOMEM, "out of memory for the decoder activations of %d prompts", n);
        cs_free(d->act_mem);
        d->act_mem = mem;
        d->act_floats = fl;
        d->cap_n = n;
    }
    arena a = {d->act_mem, 0};
    layout_acts(d, n, &a, &d->A);
    if (n_workers > d->n_ws) {
        workers_free(d);
        d->ws = calloc((size_t)n_workers, sizeof *d->ws);
        if (!d->ws) return cs_error(CELLSAM_ERR_NOMEM, "out of memory for decoder workers");
        d->n_ws = n_workers;
        const size_t wf = worker_floats(d, NULL);
        for (int t = 0; t < n_workers; t++) {
            worker *w = &d->ws[t];
            w->mem = cs_alloc(wf, sizeof(float));
            w->sh = calloc((size_t)d->n_ip, sizeof *w->sh);
            w->ip = calloc((size_t)d->n_ip, sizeof *w->ip);
            if (!w->mem || !w->sh || !w->ip) {
                workers_free(d);
                return cs_error(CELLSAM_ERR_NOMEM, "out of memory for decoder work buffers");
            }
            worker_floats(d, w);
        }
    }
    return CELLSAM_OK;
}

/* Point a worker's private parameter copies at the real values and zeroed gradients. */
static void worker_begin_grads(cs_tdecoder *d, worker *w) {
    size_t off = 0;
    for (int i = 0; i < d->n_ip; i++) {
        w->sh[i] = *d->ipr[i];
        w->sh[i].g = w->gbuf + off;
        w->ip[i] = &w->sh[i];
        off += (d->ipr[i]->n + 15) & ~(size_t)15;
    }
    memset(w->gbuf, 0, d->ip_floats * sizeof(float));
    const size_t NP = (size_t)d->N * d->P, NI = (size_t)d->N * d->I;
    memset(w->dk0, 0, NP * sizeof(float));
    memset(w->dtk0, 0, NI * sizeof(float));
    memset(w->dtv0, 0, NI * sizeof(float));
    memset(w->diq0, 0, NI * sizeof(float));
}

/* ------------------------------------------------------ per-prompt phases */

typedef enum {
    PH_T2I_FWD, PH_I2T_FWD, PH_FIN_FWD, PH_UP_FWD, PH_UP_BWD, PH_FIN_BWD, PH_I2T_BWD, PH_T2I_BWD
} phase;

/* Keys entering layer l (l >= 1) for prompt b: LN4 of layer l-1, recomputed. */
static void recompute_keys(const cs_tdecoder *d, cs_tparam *const *ip, int l, int b, worker *w) {
    const size_t NP = (size_t)d->N * d->P;
    const lacts *Lp = &d->A.L[l - 1];
    cs_tparam *const *lp = ip + (size_t)(l - 1) * IP_PER_LAYER;
    cs_layernorm_fwd(Lp->ln4_in + b * NP, w->kb, d->N, d->P, lp[IP_N4_W], lp[IP_N4_B], TD_LN_EPS, w->mean, w->rstd);
    vadd(w->kpe, w->kb, d->pe, NP);
}

/* Upscaler of prompt b from its final keys, the mask of hypernetwork output h; with
 * dlog, also its backward: dh (P/8) and the key gradient (N x P, channel-last). */
static void upscale(const cs_tdecoder *d, cs_tparam *const *ip, worker *w, const float *keys, const float *h,
                    float *logits, const float *dlog, float *dh, float *dkeys, int nt) {
    const int P = d->P, P4 = d->P4, P8 = d->P8, G = d->G, N = d->N;
    cs_tparam *const *t = ip + (size_t)d->c.depth * IP_PER_LAYER;
    float *kc = w->u[0], *a1t = w->u[1], *a1n = w->u[2], *g1 = w->u[3], *a2 = w->u[4], *U = w->u[5],
          *d2 = w->u[6];
    const size_t n1 = (size_t)4 * N * P4, n2 = (size_t)16 * N * P8;
    cs_transpose(keys, kc, N, P); /* P x N */
    cs_convT2x2_fwd(kc, P, G, G, t[IPU_0W], t[IPU_0B], P4, g1, nt);     /* P/4 x 2G x 2G (g1 as work) */
    cs_transpose(g1, a1t, P4, 4 * N);                                    /* channel-last for LayerNorm2d */
    cs_layernorm_fwd(a1t, a1n, 4 * N, P4, t[IPU_1W], t[IPU_1B], TD_LN2D_EPS, w->mean, w->rstd);
    cs_gelu_fwd(a1n, a2, n1);                                            /* a2 as work */
    cs_transpose(a2, g1, 4 * N, P4);                                     /* P/4 x 4N */
    cs_convT2x2_fwd(g1, P4, 2 * G, 2 * G, t[IPU_3W], t[IPU_3B], P8, a2, nt); /* P/8 x 4G x 4G */
    cs_gelu_fwd(a2, U, n2);
    if (logits) cs_gemm(1, 16 * N, P8, h, P8, U, 16 * N, 0, 0.0f, logits, 16 * N, nt);
    if (!dlog) return;
    cs_gemm(1, P8, 16 * N, dlog, 16 * N, U, 16 * N, 1, 0.0f, dh, P8, nt); /* dh = U dlog */
    for (int c = 0; c < P8; c++) {
        float *u = U + (size_t)c * 16 * N;
        const float hc = h[c];
        for (size_t i = 0; i < (size_t)16 * N; i++) u[i] = hc * dlog[i];
    }
    cs_gelu_bwd(a2, U, d2, n2);
    cs_convT2x2_bwd(g1, P4, 2 * G, 2 * G, t[IPU_3W], t[IPU_3B], P8, d2, a2, nt); /* d g1 -> a2 */
    cs_transpose(a2, g1, P4, 4 * N);                                          /* channel-last */
    cs_gelu_bwd(a1n, g1, U, n1);
    cs_layernorm_bwd(a1t, U, 4 * N, P4, t[IPU_1W], t[IPU_1B], w->mean, w->rstd, U);
    cs_transpose(U, a1n, 4 * N, P4); /* d a1: P/4 x 4N */
    cs_convT2x2_bwd(kc, P, G, G, t[IPU_0W], t[IPU_0B], P4, a1n, a2, nt); /* d kc: P x N */
    cs_transpose(a2, dkeys, P, N);
}

static void do_phase(cs_tdecoder *d, phase ph, int l, int b, worker *w, int nt, int grads) {
    const int P = d->P, I = d->I, T = d->T, N = d->N, hh = d->heads, dh = d->dhx;
    const size_t NP = (size_t)N * P, NI = (size_t)N * I, TI = (size_t)T * I;
    const float scale = (float)(1.0 / sqrt((double)dh));
    cs_tparam *const *ipa = grads ? w->ip : d->ipr;
    acts *A = &d->A;
    float *Kb = A->K + b * NP; /* keys (forward) or their gradient (backward) */
    switch (ph) {
    case PH_T2I_FWD: {
        lacts *L = &A->L[l];
        cs_tparam *const *ip = ipa + (size_t)l * IP_PER_LAYER;
        const float *kk = d->tk0, *vv = d->tv0;
        if (l > 0) {
            vadd(w->kpe, Kb, d->pe, NP);
            cs_linear_fwd(w->kpe, N, P, ip[IP_TK_W], ip[IP_TK_B], I, L->tk + b * NI, nt);
            cs_linear_fwd(Kb, N, P, ip[IP_TV_W], ip[IP_TV_B], I, L->tv + b * NI, nt);
            kk = L->tk + b * NI;
            vv = L->tv + b * NI;
        }
        for (int h = 0; h < hh; h++)
            cs_attn_head_fwd(L->tq + b * TI + h * dh, I, kk + h * dh, I, vv + h * dh, I, T, N, dh, scale, NULL,
                             L->tP + ((size_t)b * hh + h) * T * N, L->to + b * TI + h * dh, I, nt);
        break;
    }
    case PH_I2T_FWD: {
        lacts *L = &A->L[l];
        cs_tparam *const *ip = ipa + (size_t)l * IP_PER_LAYER;
        const float *kin = l == 0 ? d->K0 : Kb, *qq = d->iq0;
        if (l > 0) {
            vadd(w->kpe, Kb, d->pe, NP);
            cs_linear_fwd(w->kpe, N, P, ip[IP_IQ_W], ip[IP_IQ_B], I, L->iq + b * NI, nt);
            qq = L->iq + b * NI;
        }
        for (int h = 0; h < hh; h++)
            cs_attn_head_fwd(qq + h * dh, I, L->ik + b * TI + h * dh, I, L->iv + b * TI + h * dh, I, N, T, dh, scale,
                             NULL, L->iP + ((size_t)b * hh + h) * N * T, L->io + b * NI + h * dh, I, nt);
        cs_linear_fwd(L->io + b * NI, N, I, ip[IP_IO_W], ip[IP_IO_B], P, w->tmp, nt);
        float *x = L->ln4_in + b * NP;
        vadd(x, kin, w->tmp, NP);
        cs_layernorm_fwd(x, Kb, N, P, ip[IP_N4_W], ip[IP_N4_B], TD_LN_EPS, L->ln4_m + (size_t)b * N,
                         L->ln4_r + (size_t)b * N);
        break;
    }
    case PH_FIN_FWD: {
        cs_tparam *const *t = ipa + (size_t)d->c.depth * IP_PER_LAYER;
        vadd(w->kpe, Kb, d->pe, NP);
        cs_linear_fwd(w->kpe, N, P, t[IPF_K_W], t[IPF_K_B], I, A->fk + b * NI, nt);
        cs_linear_fwd(Kb, N, P, t[IPF_V_W], t[IPF_V_B], I, A->fv + b * NI, nt);
        for (int h = 0; h < hh; h++)
            cs_attn_head_fwd(A->fq + b * TI + h * dh, I, A->fk + b * NI + h * dh, I, A->fv + b * NI + h * dh, I, T, N,
                             dh, scale, NULL, A->fP + ((size_t)b * hh + h) * T * N, A->fo + b * TI + h * dh, I, nt);
        break;
    }
    case PH_UP_FWD:
        upscale(d, ipa, w, Kb, A->hout + (size_t)b * d->P8, d->logits + (size_t)b * 16 * N, NULL, NULL, NULL, nt);
        break;
    case PH_UP_BWD:
        /* Kb still holds the final keys; it is overwritten with their gradient */
        upscale(d, ipa, w, Kb, A->hout + (size_t)b * d->P8, NULL, d->dlogits + (size_t)b * 16 * N,
                A->dh + (size_t)b * d->P8, Kb, nt);
        break;
    case PH_FIN_BWD: {
        cs_tparam *const *t = ipa + (size_t)d->c.depth * IP_PER_LAYER;
        recompute_keys(d, ipa, d->c.depth, b, w);
        for (int h = 0; h < hh; h++)
            cs_attn_head_bwd(A->fq + b * TI + h * dh, I, A->fk + b * NI + h * dh, I, A->fv + b * NI + h * dh, I, T, N,
                             dh, scale, A->fP + ((size_t)b * hh + h) * T * N, A->dA + b * TI + h * dh, I,
                             A->dq + b * TI + h * dh, w->d1 + h * dh, w->d2 + h * dh, NULL, w->scratch, nt);
        cs_linear_bwd(w->kb, N, P, t[IPF_V_W], t[IPF_V_B], I, w->d2, w->tmp, nt);
        vacc(Kb, w->tmp, NP);
        cs_linear_bwd(w->kpe, N, P, t[IPF_K_W], t[IPF_K_B], I, w->d1, w->tmp, nt);
        vacc(Kb, w->tmp, NP);
        break;
    }
    case PH_I2T_BWD: {
        lacts *L = &A->L[l];
        cs_tparam *const *ip = ipa + (size_t)l * IP_PER_LAYER;
        cs_layernorm_bwd(L->ln4_in + b * NP, Kb, N, P, ip[IP_N4_W], ip[IP_N4_B], L->ln4_m + (size_t)b * N,
                         L->ln4_r + (size_t)b * N, Kb);
        cs_linear_bwd(L->io + b * NI, N, I, ip[IP_IO_W], ip[IP_IO_B], P, Kb, w->d1, nt);
        const float *qq = l == 0 ? d->iq0 : L->iq + b * NI;
        for (int h = 0; h < hh; h++)
            cs_attn_head_bwd(qq + h * dh, I, L->ik + b * TI + h * dh, I, L->iv + b * TI + h * dh, I, N, T, dh, scale,
                             L->iP + ((size_t)b * hh + h) * N * T, w->d1 + h * dh, I, w->d2 + h * dh,
                             A->dk + b * TI + h * dh, A->dv + b * TI + h * dh, NULL, w->scratch, nt);
        if (l > 0) {
            recompute_keys(d, ipa, l, b, w);
            cs_linear_bwd(w->kpe, N, P, ip[IP_IQ_W], ip[IP_IQ_B], I, w->d2, w->tmp, nt);
            vacc(Kb, w->tmp, NP);
        } else {
            vacc(w->diq0, w->d2, NI);
        }
        break;
    }
    case PH_T2I_BWD: {
        lacts *L = &A->L[l];
        cs_tparam *const *ip = ipa + (size_t)l * IP_PER_LAYER;
        const float *kk = l == 0 ? d->tk0 : L->tk + b * NI, *vv = l == 0 ? d->tv0 : L->tv + b * NI;
        for (int h = 0; h < hh; h++)
            cs_attn_head_bwd(L->tq + b * TI + h * dh, I, kk + h * dh, I, vv + h * dh, I, T, N, dh, scale,
                             L->tP + ((size_t)b * hh + h) * T * N, A->dA + b * TI + h * dh, I, A->dq + b * TI + h * dh,
                             w->d1 + h * dh, w->d2 + h * dh, NULL, w->scratch, nt);
        if (l > 0) {
            recompute_keys(d, ipa, l, b, w);
            cs_linear_bwd(w->kb, N, P, ip[IP_TV_W], ip[IP_TV_B], I, w->d2, w->tmp, nt);
            vacc(Kb, w->tmp, NP);
            cs_linear_bwd(w->kpe, N, P, ip[IP_TK_W], ip[IP_TK_B], I, w->d1, w->tmp, nt);
            vacc(Kb, w->tmp, NP);
        } else {
            vacc(w->dtk0, w->d1, NI);
            vacc(w->dtv0, w->d2, NI);
            vacc(w->dk0, Kb, NP);
        }
        break;
    }
    }
}

static void run_phase(cs_tdecoder *d, phase ph, int l, int grads) {
    const int n = d->n;
    if (d->outer > 1) {
#pragma omp parallel for num_threads(d->outer) schedule(dynamic, 1)
        for (int b = 0; b < n; b++) do_phase(d, ph, l, b, &d->ws[omp_get_thread_num()], 1, grads);
    } else {
        for (int b = 0; b < n; b++) do_phase(d, ph, l, b, &d->ws[0], d->inner, grads);
    }
}

/* ------------------------------------------------------ token-side pieces */

/* Self-attention of every prompt's tokens: q, k, v (R x P) -> o (R x P). */
static void self_attn_heads(const cs_tdecoder *d, const float *q, const float *k, const float *v, float *Pm,
                            float *o, int nt) {
    const int n = d->n, T = d->T, P = d->P, hh = d->heads, dh = d->dhs;
    const float scale = (float)(1.0 / sqrt((double)dh));
    const int nt2 = n * hh >= 8 ? nt : 1;
#pragma omp parallel for num_threads(nt2) schedule(static) if (nt2 > 1)
    for (int bh = 0; bh < n * hh; bh++) {
        const int b = bh / hh, h = bh % hh;
        const size_t off = (size_t)b * T * P + (size_t)h * dh;
        cs_attn_head_fwd(q + off, P, k + off, P, v + off, P, T, T, dh, scale, NULL, Pm + (size_t)bh * T * T, o + off,
                         P, 1);
    }
}

static void self_attn_heads_bwd(const cs_tdecoder *d, const float *q, const float *k, const float *v,
                                const float *Pm, const float *dout, float *dq, float *dk, float *dv, int nt) {
    const int n = d->n, T = d->T, P = d->P, hh = d->heads, dh = d->dhs;
    const float scale = (float)(1.0 / sqrt((double)dh));
    const int nt2 = n * hh >= 8 ? nt : 1;
#pragma omp parallel for num_threads(nt2) schedule(static) if (nt2 > 1)
    for (int bh = 0; bh < n * hh; bh++) {
        const int b = bh / hh, h = bh % hh;
        const size_t off = (size_t)b * T * P + (size_t)h * dh;
        float scratch[32 * 32]; /* T x T; T <= 3 + TD_MAX_MASK_TOKENS */
        cs_attn_head_bwd(q + off, P, k + off, P, v + off, P, T, T, dh, scale, Pm + (size_t)bh * T * T, dout + off, P,
                         dq + off, dk + off, dv + off, NULL, scratch, 1);
    }
}

/* Dense positional map of the grid, channel-last, refreshed when the Fourier
 * matrix changed (a store loaded after create). */
static void update_pe(cs_tdecoder *d) {
    const int P = d->P, G = d->G;
    if (d->pe_valid && !memcmp(d->gauss_seen, d->gauss->w, (size_t)P * sizeof(float))) return;
    cs_prompt_encoder pe;
    memset(&pe, 0, sizeof pe);
    pe.dim = P;
    pe.pe_gauss = d->gauss->w;
    for (int i = 0; i < G; i++)
        for (int j = 0; j < G; j++)
            cs_pe_encode(&pe, ((float)j + 0.5f) / (float)G, ((float)i + 0.5f) / (float)G,
                         d->pe + ((size_t)i * G + j) * P);
    memcpy(d->gauss_seen, d->gauss->w, (size_t)P * sizeof(float));
    d->pe_valid = 1;
}

/* ---------------------------------------------------------------- forward */

int cs_tdecoder_forward(cs_tdecoder *d, const float *image_emb_chw, const float *boxes_xyxy, int n,
                        float *logits, float *iou, int train, int n_threads) {
    if (!d) return cs_error(CELLSAM_ERR_INVALID, "cs_tdecoder_forward: NULL decoder");
    d->have_train = 0;
    if (n < 0 || n > TD_MAX_PROMPTS)
        return cs_error(CELLSAM_ERR_LIMIT, "decoder: %d prompts outside 0..%d", n, TD_MAX_PROMPTS);
    if (n == 0) {
        d->n = 0;
        d->have_train = train != 0;
        return CELLSAM_OK;
    }
    if (!image_emb_chw || !boxes_xyxy || !logits || !iou)
        return cs_error(CELLSAM_ERR_INVALID, "cs_tdecoder_forward: NULL argument");
    for (int i = 0; i < 4 * n; i++)
        if (!isfinite(boxes_xyxy[i]))
            return cs_error(CELLSAM_ERR_INVALID, "decoder: box %d has a non-finite coordinate", i / 4);
    if (n_threads < 1) n_threads = 1;
    resolve(d);
    const int outer = (n_threads > 1 && 2 * n >= n_threads) ? (n_threads < n ? n_threads : n) : 1;
    int rc = ensure_buffers(d, n, outer);
    if (rc) return rc;
    d->n = n;
    d->outer = outer;
    d->inner = outer > 1 ? 1 : n_threads;
    d->logits = logits;
    const int nt = n_threads;
    const int P = d->P, I = d->I, T = d->T, N = d->N, nm = d->nm, R = n * T, M = d->c.mlp;
    const size_t NP = (size_t)N * P, RP = (size_t)R * P;
    acts *A = &d->A;
    update_pe(d);

    /* shared layer-0 keys: embedding + no-mask embedding, and their projections */
    cs_transpose(image_emb_chw, d->K0, P, N);
    for (int i = 0; i < N; i++) vacc(d->K0 + (size_t)i * P, d->nomask->w, (size_t)P);
    vadd(d->kpe0, d->K0, d->pe, NP);
    cs_linear_fwd(d->kpe0, N, P, d->L[0].t2i.kw, d->L[0].t2i.kb, I, d->tk0, nt);
    cs_linear_fwd(d->K0, N, P, d->L[0].t2i.vw, d->L[0].t2i.vb, I, d->tv0, nt);
    cs_linear_fwd(d->kpe0, N, P, d->L[0].i2t.qw, d->L[0].i2t.qb, I, d->iq0, nt);

    /* tokens: [iou token; mask tokens; corner 1; corner 2] (spec §4.3) */
    cs_prompt_encoder pe;
    memset(&pe, 0, sizeof pe);
    pe.dim = P;
    pe.pe_gauss = d->gauss->w;
    const float img = (float)d->c.img_size;
    for (int b = 0; b < n; b++) {
        float *t0 = A->T0 + (size_t)b * T * P;
        memcpy(t0, d->iou_tok->w, (size_t)P * sizeof(float));
        memcpy(t0 + P, d->mask_tok->w, (size_t)nm * P * sizeof(float));
        for (int c = 0; c < 2; c++) {
            float *o = t0 + (size_t)(1 + nm + c) * P;
            const float *bx = boxes_xyxy + 4 * b + 2 * c;
            cs_pe_encode(&pe, (bx[0] + 0.5f) / img, (bx[1] + 0.5f) / img, o);
            vacc(o, d->pt[2 + c]->w, (size_t)P);
        }
    }

    for (int l = 0; l < d->c.depth; l++) {
        tlayer *W = &d->L[l];
        lacts *L = &A->L[l];
        L->qin = l == 0 ? A->T0 : A->L[l - 1].q3;
        /* self-attention; layer 0 replaces the tokens (no residual, no PE) */
        const float *x = L->qin;
        if (l > 0) {
            vadd(A->xpe, L->qin, A->T0, RP);
            x = A->xpe;
        }
        cs_linear_fwd(x, R, P, W->sa.qw, W->sa.qb, P, L->sq, nt);
        cs_linear_fwd(x, R, P, W->sa.kw, W->sa.kb, P, L->sk, nt);
        cs_linear_fwd(L->qin, R, P, W->sa.vw, W->sa.vb, P, L->sv, nt);
        self_attn_heads(d, L->sq, L->sk, L->sv, L->sP, L->so, nt);
        cs_linear_fwd(L->so, R, P, W->sa.ow, W->sa.ob, P, A->tmp, nt);
        if (l == 0) memcpy(L->ln1_in, A->tmp, RP * sizeof(float));
        else vadd(L->ln1_in, L->qin, A->tmp, RP);
        cs_layernorm_fwd(L->ln1_in, L->q1, R, P, W->nw[0], W->nb[0], TD_LN_EPS, L->ln1_m, L->ln1_r);
        /* tokens attend to the image */
        vadd(A->xpe, L->q1, A->T0, RP);
        cs_linear_fwd(A->xpe, R, P, W->t2i.qw, W->t2i.qb, I, L->tq, nt);
        run_phase(d, PH_T2I_FWD, l, 0);
        cs_linear_fwd(L->to, R, I, W->t2i.ow, W->t2i.ob, P, A->tmp, nt);
        vadd(L->ln2_in, L->q1, A->tmp, RP);
        cs_layernorm_fwd(L->ln2_in, L->q2, R, P, W->nw[1], W->nb[1], TD_LN_EPS, L->ln2_m, L->ln2_r);
        /* MLP (ReLU) */
        cs_linear_fwd(L->q2, R, P, W->l1w, W->l1b, M, L->mh, nt);
        cs_relu_fwd(L->mh, L->ma, (size_t)R * M);
        cs_linear_fwd(L->ma, R, M, W->l2w, W->l2b, P, A->tmp, nt);
        vadd(L->ln3_in, L->q2, A->tmp, RP);
        cs_layernorm_fwd(L->ln3_in, L->q3, R, P, W->nw[2], W->nb[2], TD_LN_EPS, L->ln3_m, L->ln3_r);
        /* image attends to the tokens */
        vadd(A->xpe, L->q3, A->T0, RP);
        cs_linear_fwd(A->xpe, R, P, W->i2t.kw, W->i2t.kb, I, L->ik, nt);
        cs_linear_fwd(L->q3, R, P, W->i2t.vw, W->i2t.vb, I, L->iv, nt);
        run_phase(d, PH_I2T_FWD, l, 0);
    }
    const float *qd = A->L[d->c.depth - 1].q3;
    vadd(A->xpe, qd, A->T0, RP);
    cs_linear_fwd(A->xpe, R, P, d->fin.qw, d->fin.qb, I, A->fq, nt);
    run_phase(d, PH_FIN_FWD, 0, 0);
    cs_linear_fwd(A->fo, R, I, d->fin.ow, d->fin.ob, P, A->tmp, nt);
    vadd(A->lnf_in, qd, A->tmp, RP);
    cs_layernorm_fwd(A->lnf_in, A->qf, R, P, d->nfw, d->nfb, TD_LN_EPS, A->lnf_m, A->lnf_r);

    /* heads: hypernetwork of mask token 0 and the IoU head */
    for (int b = 0; b < n; b++) {
        memcpy(A->iin + (size_t)b * P, A->qf + (size_t)b * T * P, (size_t)P * sizeof(float));
        memcpy(A->hin + (size_t)b * P, A->qf + ((size_t)b * T + 1) * P, (size_t)P * sizeof(float));
    }
    cs_linear_fwd(A->hin, n, P, d->hw[0][0], d->hb[0][0], P, A->h1, nt);
    cs_relu_fwd(A->h1, A->a1, (size_t)n * P);
    cs_linear_fwd(A->a1, n, P, d->hw[0][1], d->hb[0][1], P, A->h2, nt);
    cs_relu_fwd(A->h2, A->a2, (size_t)n * P);
    cs_linear_fwd(A->a2, n, P, d->hw[0][2], d->hb[0][2], d->P8, A->hout, nt);
    cs_linear_fwd(A->iin, n, P, d->iw[0], d->ib[0], d->H, A->j1, nt);
    cs_relu_fwd(A->j1, A->b1, (size_t)n * d->H);
    cs_linear_fwd(A->b1, n, d->H, d->iw[1], d->ib[1], d->H, A->j2, nt);
    cs_relu_fwd(A->j2, A->b2, (size_t)n * d->H);
    cs_linear_fwd(A->b2, n, d->H, d->iw[2], d->ib[2], nm, A->iout, nt);
    for (int b = 0; b < n; b++) iou[b] = A->iout[(size_t)b * nm];
    run_phase(d, PH_UP_FWD, 0, 0);
    d->logits = NULL;
    d->have_train = train != 0;
    return CELLSAM_OK;
}

/* --------------------------------------------------------------- backward */

/* Gradient of (x + T0) for x: dQ += g, dT0 += g. */
static void add_pe_grad(acts *A, const float *g, size_t n) {
    vacc(A->dQ, g, n);
    vacc(A->dT0, g, n);
}

int cs_tdecoder_backward(cs_tdecoder *d, const float *dlogits, const float *diou, float *dimage_emb_chw,
                         int n_threads) {
    if (!d) return cs_error(CELLSAM_ERR_INVALID, "cs_tdecoder_backward: NULL decoder");
    if (!d->have_train)
        return cs_error(CELLSAM_ERR_INVALID, "decoder backward without a preceding forward with train=1");
    d->have_train = 0; /* the key buffer is reused for gradients */
    const int n = d->n;
    const int P = d->P, I = d->I, T = d->T, N = d->N, nm = d->nm, R = n * T, M = d->c.mlp, H = d->H;
    const size_t NP = (size_t)N * P, RP = (size_t)R * P;
    if (n == 0) {
        if (dimage_emb_chw) memset(dimage_emb_chw, 0, NP * sizeof(float));
        return CELLSAM_OK;
    }
    if (n_threads < 1) n_threads = 1;
    const int nt = n_threads;
    resolve(d);
    acts *A = &d->A;
    for (int t = 0; t < d->outer; t++) worker_begin_grads(d, &d->ws[t]);
    memset(A->dT0, 0, RP * sizeof(float));

    /* upscaler and mask product (per prompt), then the hypernetwork */
    if (dlogits) {
        d->dlogits = dlogits;
        run_phase(d, PH_UP_BWD, 0, 1);
        d->dlogits = NULL;
    } else {
        memset(A->K, 0, (size_t)n * NP * sizeof(float));
        memset(A->dh, 0, (size_t)n * d->P8 * sizeof(float));
    }
    memset(A->dQ, 0, RP * sizeof(float));
    cs_linear_bwd(A->a2, n, P, d->hw[0][2], d->hb[0][2], d->P8, A->dh, A->dn1, nt);
    cs_relu_bwd(A->h2, A->dn1, A->dn1, (size_t)n * P);
    cs_linear_bwd(A->a1, n, P, d->hw[0][1], d->hb[0][1], P, A->dn1, A->dn2, nt);
    cs_relu_bwd(A->h1, A->dn2, A->dn2, (size_t)n * P);
    cs_linear_bwd(A->hin, n, P, d->hw[0][0], d->hb[0][0], P, A->dn2, A->dhead, nt);
    for (int b = 0; b < n; b++) vacc(A->dQ + ((size_t)b * T + 1) * P, A->dhead + (size_t)b * P, (size_t)P);
    /* IoU head: only output 0 is used */
    memset(A->dn2, 0, (size_t)n * nm * sizeof(float));
    if (diou)
        for (int b = 0; b < n; b++) A->dn2[(size_t)b * nm] = diou[b];
    cs_linear_bwd(A->b2, n, H, d->iw[2], d->ib[2], nm, A->dn2, A->dn1, nt);
    cs_relu_bwd(A->j2, A->dn1, A->dn1, (size_t)n * H);
    cs_linear_bwd(A->b1, n, H, d->iw[1], d->ib[1], H, A->dn1, A->dn2, nt);
    cs_relu_bwd(A->j1, A->dn2, A->dn2, (size_t)n * H);
    cs_linear_bwd(A->iin, n, P, d->iw[0], d->ib[0], H, A->dn2, A->dhead, nt);
    for (int b = 0; b < n; b++) vacc(A->dQ + (size_t)b * T * P, A->dhead + (size_t)b * P, (size_t)P);

    /* final attention: Q = LNf(Qd + A(Qd + T0, K + PE, K)) */
    const float *qd = A->L[d->c.depth - 1].q3;
    cs_layernorm_bwd(A->lnf_in, A->dQ, R, P, d->nfw, d->nfb, A->lnf_m, A->lnf_r, A->dX);
    memcpy(A->dQ, A->dX, RP * sizeof(float));
    cs_linear_bwd(A->fo, R, I, d->fin.ow, d->fin.ob, P, A->dX, A->dA, nt);
    run_phase(d, PH_FIN_BWD, 0, 1);
    vadd(A->xpe, qd, A->T0, RP);
    cs_linear_bwd(A->xpe, R, P, d->fin.qw, d->fin.qb, I, A->dq, A->t1, nt);
    add_pe_grad(A, A->t1, RP);

    for (int l = d->c.depth - 1; l >= 0; l--) {
        tlayer *W = &d->L[l];
        lacts *L = &A->L[l];
        /* image-to-token: K' = LN4(K + A(K + PE, q3 + T0, q3)); dQ holds d q3 */
        run_phase(d, PH_I2T_BWD, l, 1);
        vadd(A->xpe, L->q3, A->T0, RP);
        cs_linear_bwd(A->xpe, R, P, W->i2t.kw, W->i2t.kb, I, A->dk, A->t1, nt);
        add_pe_grad(A, A->t1, RP);
        cs_linear_bwd(L->q3, R, P, W->i2t.vw, W->i2t.vb, I, A->dv, A->t1, nt);
        vacc(A->dQ, A->t1, RP);
        /* MLP: q3 = LN3(q2 + MLP(q2)) */
        cs_layernorm_bwd(L->ln3_in, A->dQ, R, P, W->nw[2], W->nb[2], L->ln3_m, L->ln3_r, A->dQ);
        cs_linear_bwd(L->ma, R, M, W->l2w, W->l2b, P, A->dQ, A->dM, nt);
        cs_relu_bwd(L->mh, A->dM, A->dM, (size_t)R * M);
        cs_linear_bwd(L->q2, R, P, W->l1w, W->l1b, M, A->dM, A->t1, nt);
        vacc(A->dQ, A->t1, RP);
        /* token-to-image: q2 = LN2(q1 + A(q1 + T0, K + PE, K)) */
        cs_layernorm_bwd(L->ln2_in, A->dQ, R, P, W->nw[1], W->nb[1], L->ln2_m, L->ln2_r, A->dQ);
        cs_linear_bwd(L->to, R, I, W->t2i.ow, W->t2i.ob, P, A->dQ, A->dA, nt);
        run_phase(d, PH_T2I_BWD, l, 1);
        vadd(A->xpe, L->q1, A->T0, RP);
        cs_linear_bwd(A->xpe, R, P, W->t2i.qw, W->t2i.qb, I, A->dq, A->t1, nt);
        add_pe_grad(A, A->t1, RP);
        /* self-attention: q1 = LN1([qin +] A(qin [+ T0], qin [+ T0], qin)) */
        cs_layernorm_bwd(L->ln1_in, A->dQ, R, P, W->nw[0], W->nb[0], L->ln1_m, L->ln1_r, A->dX);
        cs_linear_bwd(L->so, R, P, W->sa.ow, W->sa.ob, P, A->dX, A->dA, nt);
        self_attn_heads_bwd(d, L->sq, L->sk, L->sv, L->sP, A->dA, A->dq, A->dk, A->dv, nt);
        if (l > 0) {
            memcpy(A->dQ, A->dX, RP * sizeof(float)); /* residual */
            vadd(A->xpe, L->qin, A->T0, RP);
            cs_linear_bwd(A->xpe, R, P, W->sa.qw, W->sa.qb, P, A->dq, A->t1, nt);
            add_pe_grad(A, A->t1, RP);
            cs_linear_bwd(A->xpe, R, P, W->sa.kw, W->sa.kb, P, A->dk, A->t1, nt);
            add_pe_grad(A, A->t1, RP);
            cs_linear_bwd(L->qin, R, P, W->sa.vw, W->sa.vb, P, A->dv, A->t1, nt);
            vacc(A->dQ, A->t1, RP);
        } else {
            /* layer 0's input tokens are T0 itself */
            cs_linear_bwd(A->T0, R, P, W->sa.qw, W->sa.qb, P, A->dq, A->t1, nt);
            vacc(A->dT0, A->t1, RP);
            cs_linear_bwd(A->T0, R, P, W->sa.kw, W->sa.kb, P, A->dk, A->t1, nt);
            vacc(A->dT0, A->t1, RP);
            cs_linear_bwd(A->T0, R, P, W->sa.vw, W->sa.vb, P, A->dv, A->t1, nt);
            vacc(A->dT0, A->t1, RP);
        }
    }

    /* reduce the workers: private image-side parameter gradients and layer-0 sums */
    worker *w0 = &d->ws[0];
    for (int i = 0; i < d->n_ip; i++) {
        cs_tparam *p = d->ipr[i];
        if (p->frozen || !p->g) continue;
        for (int t = 0; t < d->outer; t++) vacc(p->g, d->ws[t].sh[i].g, p->n);
    }
    const size_t NI = (size_t)N * I;
    for (int t = 1; t < d->outer; t++) {
        vacc(w0->dk0, d->ws[t].dk0, NP);
        vacc(w0->dtk0, d->ws[t].dtk0, NI);
        vacc(w0->dtv0, d->ws[t].dtv0, NI);
        vacc(w0->diq0, d->ws[t].diq0, NI);
    }
    /* shared layer-0 projections of K0 = emb + no_mask and K0 + PE */
    memcpy(d->dK0, w0->dk0, NP * sizeof(float));
    tlayer *W0 = &d->L[0];
    cs_linear_bwd(d->kpe0, N, P, W0->t2i.kw, W0->t2i.kb, I, w0->dtk0, d->dtmp, nt);
    vacc(d->dK0, d->dtmp, NP);
    cs_linear_bwd(d->K0, N, P, W0->t2i.vw, W0->t2i.vb, I, w0->dtv0, d->dtmp, nt);
    vacc(d->dK0, d->dtmp, NP);
    cs_linear_bwd(d->kpe0, N, P, W0->i2t.qw, W0->i2t.qb, I, w0->diq0, d->dtmp, nt);
    vacc(d->dK0, d->dtmp, NP);
    if (!d->nomask->frozen) {
        double *acc = calloc((size_t)P, sizeof(double));
        if (!acc) return cs_error(CELLSAM_ERR_NOMEM, "out of memory in the decoder backward");
        for (int i = 0; i < N; i++)
            for (int c = 0; c < P; c++) acc[c] += d->dK0[(size_t)i * P + c];
        for (int c = 0; c < P; c++) d->nomask->g[c] += (float)acc[c];
        free(acc);
    }
    if (dimage_emb_chw) cs_transpose(d->dK0, dimage_emb_chw, N, P);

    /* token parameters: iou token, mask tokens, box corner embeddings */
    for (int b = 0; b < n; b++) {
        const float *g = A->dT0 + (size_t)b * T * P;
        if (!d->iou_tok->frozen) vacc(d->iou_tok->g, g, (size_t)P);
        if (!d->mask_tok->frozen) vacc(d->mask_tok->g, g + P, (size_t)nm * P);
        for (int c = 0; c < 2; c++)
            if (!d->pt[2 + c]->frozen) vacc(d->pt[2 + c]->g, g + (size_t)(1 + nm + c) * P, (size_t)P);
    }
    return CELLSAM_OK;
}
