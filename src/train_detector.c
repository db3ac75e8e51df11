/* Trainable CellFinder head (spec §4.5): input projection (Conv1x1 + GroupNorm),
 * RCDA encoder, Anchor-DETR decoder with learned anchor points, shared class/box
 * heads on every decoder layer (aux outputs), and the backward pass of all of it.
 *
 * Layout and choices:
 *  - Maps are token-major (HW x C) as in cellfinder.c; d_model is 256 because the
 *    positional encodings hard-code 256 features.
 *  - RCDA keys are means over a map axis of a linear projection, so they are
 *    computed as the projection of the mean (linear, identical up to rounding):
 *    (W x C) GEMMs instead of (HW x C) ones, forward and backward.
 *  - RCDA keeps the attention maps (heads x N x (W+H) floats) but never the
 *    (N, W, head_dim) intermediate, which the backward recomputes per head.
 *  - The decoder self-attention recomputes its Q x Q probabilities per head in the
 *    backward instead of keeping heads x Q x Q per layer.
 *  - class_embed / bbox_embed are ONE module in Anchor-DETR stored under every
 *    decoder index: copy 0 is the parameter (used by every layer, receives every
 *    layer's gradient), copies 1..L-1 are frozen mirrors that
 *    cs_tdetector_sync_shared() (also run at every forward) refreshes so that a
 *    saved store is a valid checkpoint.
 *  - Anchors are not refined between layers (spec §4.5 step 6); gradients reach
 *    position.weight through the box offsets and the three positional MLP inputs. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ops.h"
#include "train.h"

#define TD_DMODEL 256
#define TD_GN_GROUPS 32
#define TD_EPS 1e-5f
#define TD_MAX_LAYERS 64
#define TD_MAX_QUERIES 100000
#define TD_MAX_FFN 65536
#define TD_MAX_BACKBONE 16384
#define TD_MAX_GRID 256
#define TD_MAX_CLASSES 1024
#define TD_MAX_PATTERNS 64
#define TD_QBLOCK 128 /* query rows per RCDA block */
#define TD_MAX_BUFS 4096 /* buffers of the largest configuration (64 + 64 layers) fit */
#define TD_MAX_BYTES ((size_t)48 << 30) /* activations + scratch */

typedef struct {
    size_t in_w, in_b, out_w, out_b; /* indices into the store */
} attn_idx;

typedef struct {
    size_t w1, b1, w2, b2, nw, nb;
} ffn_idx;

typedef struct {
    attn_idx attn;
    size_t n1w, n1b;
    ffn_idx ffn;
} enc_idx;

typedef struct {
    attn_idx sa, ca;
    size_t n1w, n1b, n2w, n2b;
    ffn_idx ffn;
    size_t cls_w, cls_b, box_w[3], box_b[3];
} dec_idx;

/* Activations of one encoder layer (input is S[l], output S[l+1]). */
typedef struct {
    float *qr, *qc;        /* (HW, C) scaled queries */
    float *mr, *mc;        /* (W, C), (H, C) key-projection inputs: axis means + pos */
    float *kr, *kc;        /* (W, C), (H, C) keys */
    float *vp;             /* (heads, H, W*hd) values packed per head */
    float *ar, *ac;        /* (heads, HW, W), (heads, HW, H) attention maps */
    float *o;              /* (HW, C) attention output before out_proj */
    float *y1, *s1, *m1, *r1; /* LN norm1 input / output / stats */
    float *hpre;           /* (HW, F) FFN hidden before ReLU */
    float *y2, *m2, *r2;   /* LN ffn.norm2 input / stats */
} enc_act;

/* Activations of one decoder layer (input T[l], output T[l+1]). */
typedef struct {
    float *sq, *sk, *sv, *so;   /* self-attention q, k, v (unscaled), output */
    float *ysa, *t1, *msa, *rsa;
    float *cqr, *cqc, *ckr, *ckc, *cvp, *car, *cac, *co;
    float *yca, *t2, *mca, *rca;
    float *hpre, *yff, *mff, *rff;
    float *hb0, *hb1, *box;     /* box MLP pre-activations, output boxes */
} dec_act;

struct cs_tdetector {
    cs_tparams *ps;
    int E, C, heads, hd, n_enc, n_dec, F, npos, npat, Q, ncls, G, HW;
    float dimt1[256], dimt2[128];
    /* parameters (indices: the store's items array may move when it grows) */
    size_t proj_w, proj_b, gn_w, gn_b, pattern, position, p1w[2], p1b[2], p2w[2], p2b[2];
    enc_idx *enc;
    dec_idx *dec;

    /* ---- buffers, allocated at the first forward ---- */
    float *bufs_list[TD_MAX_BUFS];
    int n_bufs;
    size_t act_bytes, scratch_bytes;
    int allocated, have_acts;
    int dry; /* sizing pass: count bytes, allocate nothing */

    float *feat;                 /* (E, HW) copy of the input */
    float *p0, *gn_m, *gn_r;     /* conv output (C, HW), GroupNorm stats */
    float *pe1map, *h1map, *pos1; /* (G, C) map positional codes */
    float **S;                   /* n_enc+1 maps (HW, C) */
    enc_act *ea;
    float *emb2d, *h2pre, *qpos, *embx, *hxpre, *qx, *emby, *hypre, *qy; /* (npos, C) */
    float *ref_is;               /* (npos, 2) */
    float *dmr, *dmc;            /* decoder key inputs: memory axis means + pos (G, C) */
    float **T;                   /* n_dec+1 targets (Q, C) */
    dec_act *da;

    /* scratch */
    float *xa, *xb, *xc, *xd, *xe, *xf; /* (rows, C), rows = max(HW, Q) */
    float *fa, *fb;              /* (rows, F) */
    float *attnP, *attnS;        /* (Q, Q) */
    float *gg[4];                /* (G, C) small gradient buffers */
    float *dpos1;                /* (G, C) */
    float *dqpos, *dqx, *dqy;    /* (Q, C) */
    float *dref;                 /* (npos, 2) */
    float *raw;                  /* (Q, 4) */
};

/* ------------------------------------------------------------ parameters */

enum { INIT_ZERO, INIT_ONE, INIT_XAVIER, INIT_NORMAL, INIT_CONST, INIT_GRID, INIT_BOX_BIAS };

static cs_tparam *par(const cs_tdetector *d, size_t idx) { return &d->ps->items[idx]; }
/* Gradient buffer of a parameter the backward fills by hand; NULL when frozen. */
static float *grad(const cs_tdetector *d, size_t idx) {
    cs_tparam *p = par(d, idx);
    return p->frozen ? NULL : p->g;
}

/* A view of rows [row0, row0+rows) of a 1-D or 2-D parameter, sharing w and g, so
 * the packed in_proj matrices feed the linear primitives slice by slice. */
static cs_tparam rows_view(const cs_tparam *p, int64_t row0, int64_t rows) {
    cs_tparam v = *p;
    const int64_t cols = p->ndim >= 2 ? p->shape[1] : 1;
    v.w = p->w + row0 * cols;
    v.g = p->g + row0 * cols;
    v.m = v.v = NULL;
    v.shape[0] = rows;
    v.n = (size_t)(rows * cols);
    return v;
}

static void init_grid(cs_tparam *p) {
    /* anchors on a regular grid: faster convergence than uniform noise */
    const int n = (int)p->shape[0];
    int cols = (int)ceil(sqrt((double)n));
    if (cols < 1) cols = 1;
    const int rows = (n + cols - 1) / cols;
    for (int i = 0; i < n; i++) {
        p->w[2 * i] = (float)(((i % cols) + 0.5) / cols);
        p->w[2 * i + 1] = (float)(((i / cols) + 0.5) / rows);
    }
}

static int reg(cs_tdetector *d, const char *prefix, cs_rng *rng, size_t *idx, int init, float arg,
               int ndim, int64_t s0, int64_t s1, int64_t s2, int64_t s3, const char *fmt, ...)
    __attribute__((format(printf, 12, 13)));
static int reg(cs_tdetector *d, const char *prefix, cs_rng *rng, size_t *idx, int init, float arg,
               int ndim, int64_t s0, int64_t s1, int64_t s2, int64_t s3, const char *fmt, ...) {
    char tail[256], name[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tail, sizeof tail, fmt, ap);
    va_end(ap);
    snprintf(name, sizeof name, "%s%s", prefix, tail);
    const int64_t shape[4] = {s0, s1, s2, s3};
    cs_tparam *p = cs_tparams_find(d->ps, name);
    if (p) {
        int same = p->ndim == ndim;
        for (int k = 0; same && k < ndim; k++) same = p->shape[k] == shape[k];
        if (!same)
            return cs_error(CELLSAM_ERR_MODEL, "detector: parameter %s is registered with another shape", name);
    } else {
        p = cs_tparams_add(d->ps, name, ndim, shape);
        if (!p) return cs_error_prefix(CELLSAM_ERR_NOMEM, "detector");
        switch (init) {
        case INIT_ONE: cs_init_const(p, 1.0f); break;
        case INIT_CONST: cs_init_const(p, arg); break;
        case INIT_XAVIER: cs_init_xavier_uniform(p, rng); break;
        case INIT_NORMAL:
            for (size_t i = 0; i < p->n; i++) p->w[i] = (float)(arg * cs_rng_normal(rng));
            break;
        case INIT_GRID: init_grid(p); break;
        case INIT_BOX_BIAS: /* Anchor-DETR: first boxes 0.12 x 0.12 (sigmoid(-2)) on their anchors */
            if (p->n == 4) p->w[2] = p->w[3] = -2.0f;
            break;
        default: break; /* the store zero-fills */
        }
    }
    *idx = (size_t)(p - d->ps->items);
    return CELLSAM_OK;
}

static void free_buffers(cs_tdetector *d);

void cs_tdetector_free(cs_tdetector *d) {
    if (!d) return;
    free_buffers(d);
    free(d->enc);
    free(d->dec);
    free(d);
}

int cs_tdetector_create(cs_tparams *ps, const char *prefix, const cs_tdetector_config *cfg, cs_rng *rng,
                        cs_tdetector **out) {
    if (!out) return cs_error(CELLSAM_ERR_INVALID, "detector create: NULL argument");
    *out = NULL;
    if (!ps || !cfg) return cs_error(CELLSAM_ERR_INVALID, "detector create: NULL argument");
    if (!prefix) prefix = "";
    if (strlen(prefix) > 200) return cs_error(CELLSAM_ERR_INVALID, "detector create: prefix too long");
    if (cfg->d_model != TD_DMODEL)
        return cs_error(CELLSAM_ERR_INVALID, "detector: d_model %d must be 256 (fixed by the positional codes)",
                        cfg->d_model);
    if (cfg->backbone_dim < 1 || cfg->backbone_dim > TD_MAX_BACKBONE)
        return cs_error(CELLSAM_ERR_INVALID, "detector: backbone width %d out of range", cfg->backbone_dim);
    if (cfg->heads < 1 || cfg->heads > TD_DMODEL || TD_DMODEL % cfg->heads)
        return cs_error(CELLSAM_ERR_INVALID, "detector: %d heads do not divide 256", cfg->heads);
    if (cfg->enc_layers < 0 || cfg->enc_layers > TD_MAX_LAYERS || cfg->dec_layers < 1 ||
        cfg->dec_layers > TD_MAX_LAYERS)
        return cs_error(CELLSAM_ERR_INVALID, "detector: %d encoder / %d decoder layers out of range",
                        cfg->enc_layers, cfg->dec_layers);
    if (cfg->ffn < 1 || cfg->ffn > TD_MAX_FFN)
        return cs_error(CELLSAM_ERR_INVALID, "detector: ffn width %d out of range", cfg->ffn);
    if (cfg->n_positions < 1 || cfg->n_patterns < 1 || cfg->n_patterns > TD_MAX_PATTERNS ||
        cfg->n_positions > TD_MAX_QUERIES || (long long)cfg->n_positions * cfg->n_patterns > TD_MAX_QUERIES)
        return cs_error(CELLSAM_ERR_INVALID, "detector: %d positions x %d patterns out of range",
                        cfg->n_positions, cfg->n_patterns);
    if (cfg->n_classes < 1 || cfg->n_classes > TD_MAX_CLASSES)
        return cs_error(CELLSAM_ERR_INVALID, "detector: %d classes out of range", cfg->n_classes);
    if (cfg->grid < 1 || cfg->grid > TD_MAX_GRID)
        return cs_error(CELLSAM_ERR_INVALID, "detector: grid %d out of range (1..%d)", cfg->grid, TD_MAX_GRID);

    cs_rng local;
    if (!rng) {
        cs_rng_seed(&local, 0x5eedULL);
        rng = &local;
    }
    cs_tdetector *d = calloc(1, sizeof *d);
    if (!d) return cs_error(CELLSAM_ERR_NOMEM, "detector: out of memory");
    d->ps = ps;
    d->E = cfg->backbone_dim;
    d->C = TD_DMODEL;
    d->heads = cfg->heads;
    d->hd = TD_DMODEL / cfg->heads;
    d->n_enc = cfg->enc_layers;
    d->n_dec = cfg->dec_layers;
    d->F = cfg->ffn;
    d->npos = cfg->n_positions;
    d->npat = cfg->n_patterns;
    d->Q = cfg->n_positions * cfg->n_patterns;
    d->ncls = cfg->n_classes;
    d->G = cfg->grid;
    d->HW = cfg->grid * cfg->grid;
    /* as pos2posemb1d/2d compute them, in float32 */
    for (int k = 0; k < 256; k++) d->dimt1[k] = powf(10000.0f, (float)(2 * (k / 2)) / 256.0f);
    for (int k = 0; k < 128; k++) d->dimt2[k] = powf(10000.0f, (float)(2 * (k / 2)) / 128.0f);
    d->enc = calloc(d->n_enc ? (size_t)d->n_enc : 1, sizeof *d->enc);
    d->dec = calloc((size_t)d->n_dec, sizeof *d->dec);
    if (!d->enc || !d->dec) {
        cs_tdetector_free(d);
        return cs_error(CELLSAM_ERR_NOMEM, "detector: out of memory");
    }
    const int64_t C = TD_DMODEL, E = d->E, F = d->F;
    int rc = CELLSAM_OK;
#define REG1(idx, init, arg, n0, ...) \
    if (rc == CELLSAM_OK) rc = reg(d, prefix, rng, &(idx), init, arg, 1, n0, 1, 1, 1, __VA_ARGS__)
#define REG2(idx, init, arg, n0, n1, ...) \
    if (rc == CELLSAM_OK) rc = reg(d, prefix, rng, &(idx), init, arg, 2, n0, n1, 1, 1, __VA_ARGS__)
    /* input_proj as Anchor-DETR: xavier conv with zero bias, GroupNorm identity affine */
    if (rc == CELLSAM_OK)
        rc = reg(d, prefix, rng, &d->proj_w, INIT_XAVIER, 0, 4, C, E, 1, 1, "%s", "input_proj.0.0.weight");
    REG1(d->proj_b, INIT_ZERO, 0, C, "%s", "input_proj.0.0.bias");
    REG1(d->gn_w, INIT_ONE, 0, C, "%s", "input_proj.0.1.weight");
    REG1(d->gn_b, INIT_ZERO, 0, C, "%s", "input_proj.0.1.bias");
    char base[160];
    for (int l = 0; l < d->n_enc && rc == CELLSAM_OK; l++) {
        enc_idx *L = &d->enc[l];
        snprintf(base, sizeof base, "transformer.encoder_layers.%d", l);
        REG2(L->attn.in_w, INIT_XAVIER, 0, 5 * C, C, "%s.self_attn.in_proj_weight", base);
        REG1(L->attn.in_b, INIT_ZERO, 0, 5 * C, "%s.self_attn.in_proj_bias", base);
        REG2(L->attn.out_w, INIT_XAVIER, 0, C, C, "%s.self_attn.out_proj.weight", base);
        REG1(L->attn.out_b, INIT_ZERO, 0, C, "%s.self_attn.out_proj.bias", base);
        REG1(L->n1w, INIT_ONE, 0, C, "%s.norm1.weight", base);
        REG1(L->n1b, INIT_ZERO, 0, C, "%s.norm1.bias", base);
        REG2(L->ffn.w1, INIT_XAVIER, 0, F, C, "%s.ffn.linear1.weight", base);
        REG1(L->ffn.b1, INIT_ZERO, 0, F, "%s.ffn.linear1.bias", base);
        REG2(L->ffn.w2, INIT_XAVIER, 0, C, F, "%s.ffn.linear2.weight", base);
        REG1(L->ffn.b2, INIT_ZERO, 0, C, "%s.ffn.linear2.bias", base);
        REG1(L->ffn.nw, INIT_ONE, 0, C, "%s.ffn.norm2.weight", base);
        REG1(L->ffn.nb, INIT_ZERO, 0, C, "%s.ffn.norm2.bias", base);
    }
    const float prior_bias = (float)-log((1.0 - 0.01) / 0.01);
    for (int l = 0; l < d->n_dec && rc == CELLSAM_OK; l++) {
        dec_idx *L = &d->dec[l];
        snprintf(base, sizeof base, "transformer.decoder_layers.%d", l);
        REG2(L->ca.in_w, INIT_XAVIER, 0, 5 * C, C, "%s.cross_attn.in_proj_weight", base);
        REG1(L->ca.in_b, INIT_ZERO, 0, 5 * C, "%s.cross_attn.in_proj_bias", base);
        REG2(L->ca.out_w, INIT_XAVIER, 0, C, C, "%s.cross_attn.out_proj.weight", base);
        REG1(L->ca.out_b, INIT_ZERO, 0, C, "%s.cross_attn.out_proj.bias", base);
        REG1(L->n1w, INIT_ONE, 0, C, "%s.norm1.weight", base);
        REG1(L->n1b, INIT_ZERO, 0, C, "%s.norm1.bias", base);
        REG2(L->sa.in_w, INIT_XAVIER, 0, 3 * C, C, "%s.self_attn.in_proj_weight", base);
        REG1(L->sa.in_b, INIT_ZERO, 0, 3 * C, "%s.self_attn.in_proj_bias", base);
        REG2(L->sa.out_w, INIT_XAVIER, 0, C, C, "%s.self_attn.out_proj.weight", base);
        REG1(L->sa.out_b, INIT_ZERO, 0, C, "%s.self_attn.out_proj.bias", base);
        REG1(L->n2w, INIT_ONE, 0, C, "%s.norm2.weight", base);
        REG1(L->n2b, INIT_ZERO, 0, C, "%s.norm2.bias", base);
        REG2(L->ffn.w1, INIT_XAVIER, 0, F, C, "%s.ffn.linear1.weight", base);
        REG1(L->ffn.b1, INIT_ZERO, 0, F, "%s.ffn.linear1.bias", base);
        REG2(L->ffn.w2, INIT_XAVIER, 0, C, F, "%s.ffn.linear2.weight", base);
        REG1(L->ffn.b2, INIT_ZERO, 0, C, "%s.ffn.linear2.bias", base);
        REG1(L->ffn.nw, INIT_ONE, 0, C, "%s.ffn.norm2.weight", base);
        REG1(L->ffn.nb, INIT_ZERO, 0, C, "%s.ffn.norm2.bias", base);
    }
    REG2(d->pattern, INIT_NORMAL, 1.0f, d->npat, C, "%s", "transformer.pattern.weight");
    REG2(d->position, INIT_GRID, 0, d->npos, 2, "%s", "transformer.position.weight");
    for (int i = 0; i < 2; i++) {
        REG2(d->p2w[i], INIT_XAVIER, 0, C, C, "transformer.adapt_pos2d.%d.weight", 2 * i);
        REG1(d->p2b[i], INIT_ZERO, 0, C, "transformer.adapt_pos2d.%d.bias", 2 * i);
        REG2(d->p1w[i], INIT_XAVIER, 0, C, C, "transformer.adapt_pos1d.%d.weight", 2 * i);
        REG1(d->p1b[i], INIT_ZERO, 0, C, "transformer.adapt_pos1d.%d.bias", 2 * i);
    }
    /* shared heads as Anchor-DETR: focal-loss prior on the class bias, zero last
     * box weight (the first boxes sit on their anchors) */
    for (int l = 0; l < d->n_dec && rc == CELLSAM_OK; l++) {
        dec_idx *L = &d->dec[l];
        REG2(L->cls_w, INIT_XAVIER, 0, d->ncls, C, "transformer.class_embed.%d.weight", l);
        REG1(L->cls_b, INIT_CONST, prior_bias, d->ncls, "transformer.class_embed.%d.bias", l);
        for (int k = 0; k < 3; k++) {
            const int64_t o = k == 2 ? 4 : C;
            REG2(L->box_w[k], k == 2 ? INIT_ZERO : INIT_XAVIER, 0, o, C, "transformer.bbox_embed.%d.layers.%d.weight",
                 l, k);
            REG1(L->box_b[k], k == 2 ? INIT_BOX_BIAS : INIT_ZERO, 0, o, "transformer.bbox_embed.%d.layers.%d.bias", l,
                 k);
        }
    }
#undef REG1
#undef REG2
    if (rc != CELLSAM_OK) {
        cs_tdetector_free(d);
        return rc;
    }
    for (int l = 1; l < d->n_dec; l++) {
        dec_idx *L = &d->dec[l];
        par(d, L->cls_w)->frozen = par(d, L->cls_b)->frozen = 1;
        for (int k = 0; k < 3; k++) par(d, L->box_w[k])->frozen = par(d, L->box_b[k])->frozen = 1;
    }
    cs_tdetector_sync_shared(d);
    *out = d;
    return CELLSAM_OK;
}

static void copy_param(cs_tparam *dst, const cs_tparam *src) {
    if (dst != src && dst->n == src->n) memcpy(dst->w, src->w, src->n * sizeof(float));
}

void cs_tdetector_sync_shared(cs_tdetector *d) {
    if (!d) return;
    const dec_idx *L0 = &d->dec[0];
    for (int l = 1; l < d->n_dec; l++) {
        const dec_idx *L = &d->dec[l];
        copy_param(par(d, L->cls_w), par(d, L0->cls_w));
        copy_param(par(d, L->cls_b), par(d, L0->cls_b));
        for (int k = 0; k < 3; k++) {
            copy_param(par(d, L->box_w[k]), par(d, L0->box_w[k]));
            copy_param(par(d, L->box_b[k]), par(d, L0->box_b[k]));
        }
    }
}

/* Position-aware initialisation of a fresh head (why: with Anchor-DETR's random
 * init every query's row/column attention starts uniform over the 64x64 map, so
 * every query reads the same global average and the class scores stay flat for
 * thousands of steps on CPU budgets). Here adapt_pos1d passes the 16 highest
 * frequencies of the sine embedding through (ReLU pairs), and every decoder
 * cross-attention head compares query and key positions on exactly those, so that
 * a query's attention starts as a bump about `width` feature cells wide around its
 * anchor: the query reads the features at its anchor from step 0. Self-attention
 * among queries starts as the identity (zero out_proj). All of it stays trainable. */
void cs_tdetector_init_local(cs_tdetector *d, float width) {
    const int C = TD_DMODEL, NP = 32; /* sin/cos of the 16 highest frequencies: dims 0..31 */
    const float alpha = 4.0f;          /* positional signal over the ~unit content */
    /* bump exp(-beta * 1/2 sum w_k^2 dx^2) with dx in units of the map side */
    double sum_w2 = 0;
    for (int k = 0; k < NP / 2; k++) {
        double w = 2.0 * M_PI / pow(10000.0, 2.0 * k / 256.0);
        sum_w2 += w * w;
    }
    const double sigma = (width > 0 ? width : 1.5) / d->G;
    const double beta = 1.0 / (sigma * sigma * sum_w2);
    const double s = 1.0 / sqrt((double)d->hd);
    const float cq = (float)(beta / (s * alpha * alpha));
    cs_tparam *w0 = par(d, d->p1w[0]), *b0 = par(d, d->p1b[0]), *w2 = par(d, d->p1w[1]), *b2 = par(d, d->p1b[1]);
    memset(w0->w, 0, (size_t)C * C * sizeof(float));
    memset(w2->w, 0, (size_t)C * C * sizeof(float));
    memset(b0->w, 0, (size_t)C * sizeof(float));
    memset(b2->w, 0, (size_t)C * sizeof(float));
    for (int k = 0; k < NP; k++) {
        w0->w[(size_t)k * C + k] = 1.0f;         /* relu(+e_k) */
        w0->w[(size_t)(NP + k) * C + k] = -1.0f; /* relu(-e_k) */
        w2->w[(size_t)k * C + k] = alpha;
        w2->w[(size_t)k * C + NP + k] = -alpha;
    }
    for (int l = 0; l < d->n_dec; l++) {
        dec_idx *L = &d->dec[l];
        float *in = par(d, L->ca.in_w)->w, *ib = par(d, L->ca.in_b)->w;
        /* rows [0:C) q_row, [C:2C) q_col, [2C:3C) k_row, [3C:4C) k_col; every head
         * reads input dims 0..NP-1 (zero elsewhere); head dims past NP stay zero */
        for (int blk = 0; blk < 4; blk++) {
            float *W = in + (size_t)blk * C * C;
            memset(W, 0, (size_t)C * C * sizeof(float));
            memset(ib + (size_t)blk * C, 0, (size_t)C * sizeof(float));
            const float g = blk < 2 ? cq : 1.0f;
            for (int h = 0; h < d->heads; h++)
                for (int k = 0; k < NP && k < d->hd; k++) W[(size_t)(h * d->hd + k) * C + k] = g;
        }
        memset(par(d, L->sa.out_w)->w, 0, (size_t)C * C * sizeof(float));
    }
    /* encoder RCDA starts as the identity too: with random projections and the
     * stronger positional inputs its attention would copy each feature to random
     * places before the decoder reads it */
    for (int l = 0; l < d->n_enc; l++) memset(par(d, d->enc[l].attn.out_w)->w, 0, (size_t)C * C * sizeof(float));
    cs_tdetector_sync_shared(d);
}

/* --------------------------------------------------------------- buffers */

static float *buf(cs_tdetector *d, size_t a, size_t b, int is_act) {
    size_t n, bytes;
    if (d->n_bufs >= TD_MAX_BUFS || cs_mul_size(a, b, &n) || n == 0 || cs_mul_size(n, sizeof(float), &bytes))
        return NULL;
    size_t *total = is_act ? &d->act_bytes : &d->scratch_bytes;
    if (cs_add_size(*total, bytes, total)) return NULL;
    if (d->dry) return (float *)d; /* any non-NULL value: the sizing pass never uses it */
    float *p = cs_alloc(n, sizeof(float));
    if (!p) return NULL;
    d->bufs_list[d->n_bufs++] = p;
    return p;
}

static void free_buffers(cs_tdetector *d) {
    for (int i = 0; i < d->n_bufs; i++) cs_free(d->bufs_list[i]);
    d->n_bufs = 0;
    free(d->S);
    free(d->T);
    free(d->ea);
    free(d->da);
    d->S = d->T = NULL;
    d->ea = NULL;
    d->da = NULL;
    d->allocated = d->have_acts = 0;
    d->act_bytes = d->scratch_bytes = 0;
}

static int plan_buffers(cs_tdetector *d);

/* Size every buffer first (a configuration too large for memory is an error, not
 * an overcommitted allocation that fails later), then allocate them. */
static int alloc_buffers(cs_tdetector *d) {
    if (d->allocated) return CELLSAM_OK;
    d->dry = 1;
    int rc = plan_buffers(d);
    d->dry = 0;
    const size_t act = d->act_bytes, scr = d->scratch_bytes;
    free_buffers(d);
    if (rc) return cs_error(CELLSAM_ERR_LIMIT, "detector: buffer sizes overflow (grid %d, %d queries)", d->G, d->Q);
    if (act > TD_MAX_BYTES || scr > TD_MAX_BYTES - act)
        return cs_error(CELLSAM_ERR_LIMIT, "detector: %.1f GiB of activations and scratch exceed the %.0f GiB limit",
                        ((double)act + (double)scr) / 1073741824.0,
                        (double)TD_MAX_BYTES / 1073741824.0);
    rc = plan_buffers(d);
    if (rc) {
        free_buffers(d);
        return cs_error(CELLSAM_ERR_NOMEM, "detector: out of memory for activations (grid %d, %d queries)", d->G,
                        d->Q);
    }
    d->allocated = 1;
    return CELLSAM_OK;
}

/* Every buffer (sizing or allocating, see buf); returns nonzero on failure. */
static int plan_buffers(cs_tdetector *d) {
    const size_t C = (size_t)d->C, HW = (size_t)d->HW, Q = (size_t)d->Q, F = (size_t)d->F, G = (size_t)d->G;
    const size_t E = (size_t)d->E, NP = (size_t)d->npos, nh = (size_t)d->heads;
    const size_t rows = HW > Q ? HW : Q;
    d->S = calloc((size_t)d->n_enc + 1, sizeof *d->S);
    d->T = calloc((size_t)d->n_dec + 1, sizeof *d->T);
    d->ea = calloc(d->n_enc ? (size_t)d->n_enc : 1, sizeof *d->ea);
    d->da = calloc((size_t)d->n_dec, sizeof *d->da);
    int ok = d->S && d->T && d->ea && d->da;
    size_t hw_nh = 0, q_nh = 0, qq = 0;
    ok = ok && !cs_mul_size(HW, nh, &hw_nh) && !cs_mul_size(Q, nh, &q_nh) && !cs_mul_size(Q, Q, &qq);
#define A(p, a, b) ok = ok && ((p) = buf(d, a, b, 1)) != NULL
#define S_(p, a, b) ok = ok && ((p) = buf(d, a, b, 0)) != NULL
    A(d->feat, E, HW);
    A(d->p0, C, HW);
    A(d->gn_m, TD_GN_GROUPS, 1);
    A(d->gn_r, TD_GN_GROUPS, 1);
    A(d->pe1map, G, C);
    A(d->h1map, G, C);
    A(d->pos1, G, C);
    for (int l = 0; ok && l <= d->n_enc; l++) A(d->S[l], HW, C);
    for (int l = 0; ok && l < d->n_enc; l++) {
        enc_act *a = &d->ea[l];
        A(a->qr, HW, C);
        A(a->qc, HW, C);
        A(a->mr, G, C);
        A(a->mc, G, C);
        A(a->kr, G, C);
        A(a->kc, G, C);
        A(a->vp, HW, C);
        A(a->ar, hw_nh, G);
        A(a->ac, hw_nh, G);
        A(a->o, HW, C);
        A(a->y1, HW, C);
        A(a->s1, HW, C);
        A(a->m1, HW, 1);
        A(a->r1, HW, 1);
        A(a->hpre, HW, F);
        A(a->y2, HW, C);
        A(a->m2, HW, 1);
        A(a->r2, HW, 1);
    }
    A(d->emb2d, NP, C);
    A(d->h2pre, NP, C);
    A(d->qpos, NP, C);
    A(d->embx, NP, C);
    A(d->hxpre, NP, C);
    A(d->qx, NP, C);
    A(d->emby, NP, C);
    A(d->hypre, NP, C);
    A(d->qy, NP, C);
    A(d->ref_is, NP, 2);
    A(d->dmr, G, C);
    A(d->dmc, G, C);
    for (int l = 0; ok && l <= d->n_dec; l++) A(d->T[l], Q, C);
    for (int l = 0; ok && l < d->n_dec; l++) {
        dec_act *a = &d->da[l];
        A(a->sq, Q, C);
        A(a->sk, Q, C);
        A(a->sv, Q, C);
        A(a->so, Q, C);
        A(a->ysa, Q, C);
        A(a->t1, Q, C);
        A(a->msa, Q, 1);
        A(a->rsa, Q, 1);
        A(a->cqr, Q, C);
        A(a->cqc, Q, C);
        A(a->ckr, G, C);
        A(a->ckc, G, C);
        A(a->cvp, HW, C);
        A(a->car, q_nh, G);
        A(a->cac, q_nh, G);
        A(a->co, Q, C);
        A(a->yca, Q, C);
        A(a->t2, Q, C);
        A(a->mca, Q, 1);
        A(a->rca, Q, 1);
        A(a->hpre, Q, F);
        A(a->yff, Q, C);
        A(a->mff, Q, 1);
        A(a->rff, Q, 1);
        A(a->hb0, Q, C);
        A(a->hb1, Q, C);
        A(a->box, Q, 4);
    }
    S_(d->xa, rows, C);
    S_(d->xb, rows, C);
    S_(d->xc, rows, C);
    S_(d->xd, rows, C);
    S_(d->xe, rows, C);
    S_(d->xf, rows, C);
    S_(d->fa, rows, F);
    S_(d->fb, rows, F);
    S_(d->attnP, qq, 1);
    S_(d->attnS, qq, 1);
    for (int i = 0; i < 4; i++) S_(d->gg[i], G, C);
    S_(d->dpos1, G, C);
    S_(d->dqpos, Q, C);
    S_(d->dqx, Q, C);
    S_(d->dqy, Q, C);
    S_(d->dref, NP, 2);
    S_(d->raw, Q, 4);
#undef A
#undef S_
    return ok ? 0 : -1;
}

size_t cs_tdetector_activation_bytes(const cs_tdetector *d, size_t *scratch_bytes) {
    if (scratch_bytes) *scratch_bytes = d ? d->scratch_bytes : 0;
    return d ? d->act_bytes : 0;
}

/* ------------------------------------------------------------ helpers */

/* Row-major SGEMM C = op(A) op(B) + beta C, single call into OpenBLAS with the
 * thread count set for this call (1 inside our own parallel regions). */
static void gemm(int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                 float beta, float *Cm, int ldc, int nt) {
    if (M <= 0 || N <= 0) return;
    const double flops = 2.0 * M * (double)N * K;
    omp_set_num_threads(flops < 4e6 ? 1 : nt);
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M, N, K, 1.0f, A,
                lda, B, ldb, beta, Cm, ldc);
}

static void add_into(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

static void scale_into(float *x, size_t n, float s) {
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

/* pos2posemb1d: 256 interleaved sin/cos features of p (float32 as the reference). */
static void posemb1d(const cs_tdetector *d, float p, float *out) {
    const float v = p * (float)(2.0 * M_PI);
    for (int k = 0; k < 256; k++) {
        const float a = v / d->dimt1[k];
        out[k] = (k & 1) ? cosf(a) : sinf(a);
    }
}

/* d/dp of sum_k dout[k] posemb1d(p)[k]. */
static double posemb1d_grad(const cs_tdetector *d, float p, const float *dout) {
    const float v = p * (float)(2.0 * M_PI);
    double g = 0.0;
    for (int k = 0; k < 256; k++) {
        const double a = (double)(v / d->dimt1[k]), da = 2.0 * M_PI / d->dimt1[k];
        g += dout[k] * ((k & 1) ? -sin(a) : cos(a)) * da;
    }
    return g;
}

/* pos2posemb2d: 128 features of y, then 128 of x. */
static void posemb2d(const cs_tdetector *d, float px, float py, float *out) {
    const float vx = px * (float)(2.0 * M_PI), vy = py * (float)(2.0 * M_PI);
    for (int k = 0; k < 128; k++) {
        const float ay = vy / d->dimt2[k], ax = vx / d->dimt2[k];
        out[k] = (k & 1) ? cosf(ay) : sinf(ay);
        out[128 + k] = (k & 1) ? cosf(ax) : sinf(ax);
    }
}

static void posemb2d_grad(const cs_tdetector *d, float px, float py, const float *dout, double *gx, double *gy) {
    const float vx = px * (float)(2.0 * M_PI), vy = py * (float)(2.0 * M_PI);
    double sx = 0.0, sy = 0.0;
    for (int k = 0; k < 128; k++) {
        const double da = 2.0 * M_PI / d->dimt2[k];
        const double ay = (double)(vy / d->dimt2[k]), ax = (double)(vx / d->dimt2[k]);
        sy += dout[k] * ((k & 1) ? -sin(ay) : cos(ay)) * da;
        sx += dout[128 + k] * ((k & 1) ? -sin(ax) : cos(ax)) * da;
    }
    *gx = sx;
    *gy = sy;
}

static float inverse_sigmoid(float x) {
    x = x < 0.f ? 0.f : x > 1.f ? 1.f : x;
    const float x1 = x < 1e-5f ? 1e-5f : x;
    float x2 = 1.0f - x;
    x2 = x2 < 1e-5f ? 1e-5f : x2;
    return logf(x1 / x2);
}

/* Derivative of inverse_sigmoid, zero where a clamp is active. */
static double inverse_sigmoid_grad(float x) {
    if (x < 0.f || x > 1.f) return 0.0;
    double g = 0.0;
    if (x >= 1e-5f) g += 1.0 / x;
    if (1.0f - x >= 1e-5f) g += 1.0 / (1.0 - x);
    return g;
}

/* Two-layer MLP with ReLU (adapt_pos1d / adapt_pos2d), keeping the hidden
 * pre-activation. tmp: rows x C. */
static void mlp2_fwd(const cs_tdetector *d, const size_t w[2], const size_t b[2], const float *X, int rows,
                     float *hpre, float *tmp, float *Y, int nt) {
    const int C = d->C;
    cs_linear_fwd(X, rows, C, par(d, w[0]), par(d, b[0]), C, hpre, nt);
    cs_relu_fwd(hpre, tmp, (size_t)rows * C);
    cs_linear_fwd(tmp, rows, C, par(d, w[1]), par(d, b[1]), C, Y, nt);
}

/* Backward of mlp2_fwd; dX may be NULL. tmp, dh: rows x C. */
static void mlp2_bwd(const cs_tdetector *d, const size_t w[2], const size_t b[2], const float *X, int rows,
                     const float *hpre, const float *dY, float *dX, float *tmp, float *dh, int nt) {
    const int C = d->C;
    cs_relu_fwd(hpre, tmp, (size_t)rows * C);
    cs_linear_bwd(tmp, rows, C, par(d, w[1]), par(d, b[1]), C, dY, dh, nt);
    cs_relu_bwd(hpre, dh, dh, (size_t)rows * C);
    cs_linear_bwd(X, rows, C, par(d, w[0]), par(d, b[0]), C, dh, dX, nt);
}

/* ------------------------------------------------------------------ RCDA */

/* Per-thread scratch of the RCDA kernels (floats). */
static size_t rcda_scratch_floats(const cs_tdetector *d) {
    return (size_t)TD_QBLOCK * ((size_t)d->G * d->hd + 2 * (size_t)d->G);
}

/* Pack token-major v (HW, C) per head as (heads, H, W*hd), and back. */
static void pack_heads(const cs_tdetector *d, const float *v, float *vp) {
    const int C = d->C, G = d->G, hd = d->hd;
    for (int h = 0; h < d->heads; h++)
        for (int i = 0; i < G; i++)
            for (int j = 0; j < G; j++)
                memcpy(vp + ((size_t)h * G + i) * G * hd + (size_t)j * hd, v + ((size_t)i * G + j) * C + (size_t)h * hd,
                       (size_t)hd * sizeof(float));
}

static void unpack_heads(const cs_tdetector *d, const float *vp, float *v) {
    const int C = d->C, G = d->G, hd = d->hd;
    for (int h = 0; h < d->heads; h++)
        for (int i = 0; i < G; i++)
            for (int j = 0; j < G; j++)
                memcpy(v + ((size_t)i * G + j) * C + (size_t)h * hd, vp + ((size_t)h * G + i) * G * hd + (size_t)j * hd,
                       (size_t)hd * sizeof(float));
}

/* N queries over the G x G map: qr, qc (N, C) projected and scaled; kr (W, C) row
 * keys (one per column), kc (H, C) column keys (one per row); vp packed values.
 * ar (heads, N, W) and ac (heads, N, H) keep the softmax maps; o (N, C). Inner sum
 * over rows first, as the reference's H == W branch. */
static void rcda_fwd(const cs_tdetector *d, int N, const float *qr, const float *qc, const float *kr,
                     const float *kc, const float *vp, float *ar, float *ac, float *o, float *scratch, int nt) {
    const int C = d->C, G = d->G, hd = d->hd, heads = d->heads, WH = G * hd;
    const int nblk = (N + TD_QBLOCK - 1) / TD_QBLOCK, tasks = nblk * heads;
    const size_t per = rcda_scratch_floats(d);
#pragma omp parallel num_threads(nt)
    {
        omp_set_num_threads(1);
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++) {
            const int h = task % heads, q0 = (task / heads) * TD_QBLOCK;
            const int nq = N - q0 < TD_QBLOCK ? N - q0 : TD_QBLOCK;
            float *T = scratch + (size_t)omp_get_thread_num() * per;
            float *a_r = ar + ((size_t)h * N + q0) * G, *a_c = ac + ((size_t)h * N + q0) * G;
            gemm(0, 1, nq, G, hd, qr + (size_t)q0 * C + h * hd, C, kr + h * hd, C, 0.f, a_r, G, 1);
            gemm(0, 1, nq, G, hd, qc + (size_t)q0 * C + h * hd, C, kc + h * hd, C, 0.f, a_c, G, 1);
            for (int i = 0; i < nq; i++) {
                cs_softmax_row(a_r + (size_t)i * G, G);
                cs_softmax_row(a_c + (size_t)i * G, G);
            }
            /* T[q, j, :] = sum_i a_c[q, i] v[i, j, :] */
            gemm(0, 0, nq, WH, G, a_c, G, vp + (size_t)h * G * WH, WH, 0.f, T, WH, 1);
            for (int i = 0; i < nq; i++) {
                float *out = o + (size_t)(q0 + i) * C + h * hd;
                const float *a = a_r + (size_t)i * G, *t = T + (size_t)i * WH;
                for (int k = 0; k < hd; k++) out[k] = 0.f;
                for (int j = 0; j < G; j++) {
                    const float aj = a[j];
                    const float *tj = t + (size_t)j * hd;
                    for (int k = 0; k < hd; k++) out[k] += aj * tj[k];
                }
            }
        }
    }
}

/* Backward of rcda_fwd from dout (N, C): dqr, dqc (N, C) w.r.t. the scaled queries
 * (written), dkr, dkc (G, C) and dvp (packed) written. One task per head, so every
 * output slice has a single writer. */
static void rcda_bwd(const cs_tdetector *d, int N, const float *qr, const float *qc, const float *kr,
                     const float *kc, const float *vp, const float *ar, const float *ac, const float *dout,
                     float *dqr, float *dqc, float *dkr, float *dkc, float *dvp, float *scratch, int nt) {
    const int C = d->C, G = d->G, hd = d->hd, heads = d->heads, WH = G * hd;
    const size_t per = rcda_scratch_floats(d);
    memset(dkr, 0, (size_t)G * C * sizeof(float));
    memset(dkc, 0, (size_t)G * C * sizeof(float));
#pragma omp parallel num_threads(nt)
    {
        omp_set_num_threads(1);
#pragma omp for schedule(dynamic, 1)
        for (int h = 0; h < heads; h++) {
            float *T = scratch + (size_t)omp_get_thread_num() * per;
            float *dar = T + (size_t)TD_QBLOCK * WH, *dac = dar + (size_t)TD_QBLOCK * G;
            const float *vph = vp + (size_t)h * G * WH;
            float *dvph = dvp + (size_t)h * G * WH;
            memset(dvph, 0, (size_t)G * WH * sizeof(float));
            for (int q0 = 0; q0 < N; q0 += TD_QBLOCK) {
                const int nq = N - q0 < TD_QBLOCK ? N - q0 : TD_QBLOCK;
                const float *a_r = ar + ((size_t)h * N + q0) * G, *a_c = ac + ((size_t)h * N + q0) * G;
                gemm(0, 0, nq, WH, G, a_c, G, vph, WH, 0.f, T, WH, 1);
                for (int i = 0; i < nq; i++) {
                    const float *g = dout + (size_t)(q0 + i) * C + h * hd;
                    const float *a = a_r + (size_t)i * G;
                    float *t = T + (size_t)i * WH;
                    for (int j = 0; j < G; j++) {
                        float *tj = t + (size_t)j * hd;
                        float s = 0.f;
                        for (int k = 0; k < hd; k++) s += g[k] * tj[k];
                        dar[(size_t)i * G + j] = s;
                        /* T becomes dT[q, j, :] = a_r[q, j] dout[q] */
                        for (int k = 0; k < hd; k++) tj[k] = a[j] * g[k];
                    }
                }
                /* dac = dT vp^T ; dvp += ac^T dT */
                gemm(0, 1, nq, G, WH, T, WH, vph, WH, 0.f, dac, G, 1);
                gemm(1, 0, G, WH, nq, a_c, G, T, WH, 1.f, dvph, WH, 1);
                /* softmax backward in place: ds = a * (da - sum(da * a)) */
                for (int i = 0; i < nq; i++) {
                    float *x = dar + (size_t)i * G, *y = dac + (size_t)i * G;
                    const float *pa = a_r + (size_t)i * G, *pc = a_c + (size_t)i * G;
                    double sr = 0.0, sc = 0.0;
                    for (int j = 0; j < G; j++) {
                        sr += (double)x[j] * pa[j];
                        sc += (double)y[j] * pc[j];
                    }
                    for (int j = 0; j < G; j++) {
                        x[j] = pa[j] * (x[j] - (float)sr);
                        y[j] = pc[j] * (y[j] - (float)sc);
                    }
                }
                gemm(0, 0, nq, hd, G, dar, G, kr + h * hd, C, 0.f, dqr + (size_t)q0 * C + h * hd, C, 1);
                gemm(0, 0, nq, hd, G, dac, G, kc + h * hd, C, 0.f, dqc + (size_t)q0 * C + h * hd, C, 1);
                gemm(1, 0, G, hd, nq, dar, G, qr + (size_t)q0 * C + h * hd, C, 1.f, dkr + h * hd, C, 1);
                gemm(1, 0, G, hd, nq, dac, G, qc + (size_t)q0 * C + h * hd, C, 1.f, dkc + h * hd, C, 1);
            }
        }
    }
}

/* Axis means of a (G, G, C) map plus the map positional codes: mr[j] = mean_i S[i,j]
 * + pos1[j] (inputs of the row keys), mc[i] = mean_j S[i,j] + pos1[i]. */
static void axis_means(const cs_tdetector *d, const float *S, float *mr, float *mc) {
    const int C = d->C, G = d->G;
    double acc[TD_DMODEL];
    for (int j = 0; j < G; j++) {
        for (int c = 0; c < C; c++) acc[c] = 0.0;
        for (int i = 0; i < G; i++) {
            const float *s = S + ((size_t)i * G + j) * C;
            for (int c = 0; c < C; c++) acc[c] += s[c];
        }
        for (int c = 0; c < C; c++) mr[(size_t)j * C + c] = (float)(acc[c] / G) + d->pos1[(size_t)j * C + c];
    }
    for (int i = 0; i < G; i++) {
        for (int c = 0; c < C; c++) acc[c] = 0.0;
        for (int j = 0; j < G; j++) {
            const float *s = S + ((size_t)i * G + j) * C;
            for (int c = 0; c < C; c++) acc[c] += s[c];
        }
        for (int c = 0; c < C; c++) mc[(size_t)i * C + c] = (float)(acc[c] / G) + d->pos1[(size_t)i * C + c];
    }
}

/* Spread key-input gradients back over the map: dS[i,j] += dmr[j]/H + dmc[i]/W,
 * dpos1 gets the un-averaged sums. */
static void axis_means_bwd(const cs_tdetector *d, const float *dmr, const float *dmc, float *dS, float *dpos1) {
    const int C = d->C, G = d->G;
    const float inv = 1.0f / (float)G;
    for (int i = 0; i < G; i++)
        for (int j = 0; j < G; j++) {
            float *g = dS + ((size_t)i * G + j) * C;
            const float *a = dmr + (size_t)j * C, *b = dmc + (size_t)i * C;
            for (int c = 0; c < C; c++) g[c] += (a[c] + b[c]) * inv;
        }
    add_into(dpos1, dmr, (size_t)G * C);
    add_into(dpos1, dmc, (size_t)G * C);
}

/* X = S + pos1[col] (row=0) or S + pos1[row] (row=1). */
static void add_map_pos(const cs_tdetector *d, const float *S, int by_row, float *X) {
    const int C = d->C, G = d->G;
    for (int i = 0; i < G; i++)
        for (int j = 0; j < G; j++) {
            const size_t t = ((size_t)i * G + j) * C;
            const float *p = d->pos1 + (size_t)(by_row ? i : j) * C;
            for (int c = 0; c < C; c++) X[t + c] = S[t + c] + p[c];
        }
}

/* dpos1[col or row] += dX summed over the other axis. */
static void map_pos_bwd(const cs_tdetector *d, const float *dX, int by_row, float *dpos1) {
    const int C = d->C, G = d->G;
    for (int i = 0; i < G; i++)
        for (int j = 0; j < G; j++) {
            const float *g = dX + ((size_t)i * G + j) * C;
            float *p = dpos1 + (size_t)(by_row ? i : j) * C;
            for (int c = 0; c < C; c++) p[c] += g[c];
        }
}

/* X[q] = t[q] + pos[q % npos] over Q queries. */
static void add_query_pos(const cs_tdetector *d, const float *t, const float *pos, float *X) {
    const int C = d->C;
    for (int q = 0; q < d->Q; q++) {
        const float *a = t + (size_t)q * C, *p = pos + (size_t)(q % d->npos) * C;
        float *x = X + (size_t)q * C;
        for (int c = 0; c < C; c++) x[c] = a[c] + p[c];
    }
}

/* ------------------------------------------------------------------ forward */

static void ffn_fwd(const cs_tdetector *d, const ffn_idx *f, const float *x, int rows, float *hpre, float *y,
                    float *out, float *m, float *r, int nt) {
    const int C = d->C, F = d->F;
    cs_linear_fwd(x, rows, C, par(d, f->w1), par(d, f->b1), F, hpre, nt);
    cs_relu_fwd(hpre, d->fa, (size_t)rows * F);
    cs_linear_fwd(d->fa, rows, F, par(d, f->w2), par(d, f->b2), C, y, nt);
    add_into(y, x, (size_t)rows * C);
    cs_layernorm_fwd(y, out, rows, C, par(d, f->nw), par(d, f->nb), TD_EPS, m, r);
}

static void encoder_fwd(cs_tdetector *d, int l, float *scratch, int nt) {
    const int C = d->C, HW = d->HW, G = d->G;
    const enc_idx *L = &d->enc[l];
    enc_act *a = &d->ea[l];
    const float *S = d->S[l];
    const float s = powf((float)d->hd, -0.5f);
    const cs_tparam *iw = par(d, L->attn.in_w), *ib = par(d, L->attn.in_b);
    cs_tparam w0 = rows_view(iw, 0, C), b0 = rows_view(ib, 0, C), w1 = rows_view(iw, C, C), b1 = rows_view(ib, C, C);
    cs_tparam w2 = rows_view(iw, 2 * C, C), b2 = rows_view(ib, 2 * C, C), w3 = rows_view(iw, 3 * C, C),
              b3 = rows_view(ib, 3 * C, C);
    cs_tparam w4 = rows_view(iw, 4 * C, C), b4 = rows_view(ib, 4 * C, C);
    add_map_pos(d, S, 0, d->xa);
    cs_linear_fwd(d->xa, HW, C, &w0, &b0, C, a->qr, nt);
    scale_into(a->qr, (size_t)HW * C, s);
    add_map_pos(d, S, 1, d->xa);
    cs_linear_fwd(d->xa, HW, C, &w1, &b1, C, a->qc, nt);
    scale_into(a->qc, (size_t)HW * C, s);
    axis_means(d, S, a->mr, a->mc);
    cs_linear_fwd(a->mr, G, C, &w2, &b2, C, a->kr, nt);
    cs_linear_fwd(a->mc, G, C, &w3, &b3, C, a->kc, nt);
    cs_linear_fwd(S, HW, C, &w4, &b4, C, d->xa, nt);
    pack_heads(d, d->xa, a->vp);
    rcda_fwd(d, HW, a->qr, a->qc, a->kr, a->kc, a->vp, a->ar, a->ac, a->o, scratch, nt);
    cs_linear_fwd(a->o, HW, C, par(d, L->attn.out_w), par(d, L->attn.out_b), C, a->y1, nt);
    add_into(a->y1, S, (size_t)HW * C);
    cs_layernorm_fwd(a->y1, a->s1, HW, C, par(d, L->n1w), par(d, L->n1b), TD_EPS, a->m1, a->r1);
    ffn_fwd(d, &L->ffn, a->s1, HW, a->hpre, a->y2, d->S[l + 1], a->m2, a->r2, nt);
}

static void decoder_fwd(cs_tdetector *d, int l, float *scratch, int nt) {
    const int C = d->C, Q = d->Q, HW = d->HW, G = d->G, hd = d->hd;
    const dec_idx *L = &d->dec[l];
    dec_act *a = &d->da[l];
    const float *t = d->T[l], *M = d->S[d->n_enc];
    const size_t QC = (size_t)Q * C;
    /* a. self-attention: q = k = t + qpos, v = t */
    {
        const cs_tparam *iw = par(d, L->sa.in_w), *ib = par(d, L->sa.in_b);
        cs_tparam w0 = rows_view(iw, 0, C), b0 = rows_view(ib, 0, C), w1 = rows_view(iw, C, C),
                  b1 = rows_view(ib, C, C), w2 = rows_view(iw, 2 * C, C), b2 = rows_view(ib, 2 * C, C);
        add_query_pos(d, t, d->qpos, d->xa);
        cs_linear_fwd(d->xa, Q, C, &w0, &b0, C, a->sq, nt);
        cs_linear_fwd(d->xa, Q, C, &w1, &b1, C, a->sk, nt);
        cs_linear_fwd(t, Q, C, &w2, &b2, C, a->sv, nt);
        const float scale = 1.0f / sqrtf((float)hd);
        for (int h = 0; h < d->heads; h++)
            cs_attn_head_fwd(a->sq + h * hd, C, a->sk + h * hd, C, a->sv + h * hd, C, Q, Q, hd, scale, NULL,
                             d->attnP, a->so + h * hd, C, nt);
        cs_linear_fwd(a->so, Q, C, par(d, L->sa.out_w), par(d, L->sa.out_b), C, a->ysa, nt);
        add_into(a->ysa, t, QC);
        cs_layernorm_fwd(a->ysa, a->t1, Q, C, par(d, L->n2w), par(d, L->n2b), TD_EPS, a->msa, a->rsa);
    }
    /* b. cross RCDA: rows t1 + qx, columns t1 + qy, over the encoder memory */
    {
        const float s = powf((float)hd, -0.5f);
        const cs_tparam *iw = par(d, L->ca.in_w), *ib = par(d, L->ca.in_b);
        cs_tparam w0 = rows_view(iw, 0, C), b0 = rows_view(ib, 0, C), w1 = rows_view(iw, C, C),
                  b1 = rows_view(ib, C, C);
        cs_tparam w2 = rows_view(iw, 2 * C, C), b2 = rows_view(ib, 2 * C, C), w3 = rows_view(iw, 3 * C, C),
                  b3 = rows_view(ib, 3 * C, C);
        cs_tparam w4 = rows_view(iw, 4 * C, C), b4 = rows_view(ib, 4 * C, C);
        add_query_pos(d, a->t1, d->qx, d->xa);
        cs_linear_fwd(d->xa, Q, C, &w0, &b0, C, a->cqr, nt);
        scale_into(a->cqr, QC, s);
        add_query_pos(d, a->t1, d->qy, d->xa);
        cs_linear_fwd(d->xa, Q, C, &w1, &b1, C, a->cqc, nt);
        scale_into(a->cqc, QC, s);
        cs_linear_fwd(d->dmr, G, C, &w2, &b2, C, a->ckr, nt);
        cs_linear_fwd(d->dmc, G, C, &w3, &b3, C, a->ckc, nt);
        cs_linear_fwd(M, HW, C, &w4, &b4, C, d->xa, nt);
        pack_heads(d, d->xa, a->cvp);
        rcda_fwd(d, Q, a->cqr, a->cqc, a->ckr, a->ckc, a->cvp, a->car, a->cac, a->co, scratch, nt);
        cs_linear_fwd(a->co, Q, C, par(d, L->ca.out_w), par(d, L->ca.out_b), C, a->yca, nt);
        add_into(a->yca, a->t1, QC);
        cs_layernorm_fwd(a->yca, a->t2, Q, C, par(d, L->n1w), par(d, L->n1b), TD_EPS, a->mca, a->rca);
    }
    /* c. FFN */
    ffn_fwd(d, &L->ffn, a->t2, Q, a->hpre, a->yff, d->T[l + 1], a->mff, a->rff, nt);
}

/* Shared heads (copy 0) on the output of decoder layer l. */
static void heads_fwd(cs_tdetector *d, int l, float *logits, float *boxes, int nt) {
    const int C = d->C, Q = d->Q;
    const dec_idx *H0 = &d->dec[0];
    dec_act *a = &d->da[l];
    const float *t = d->T[l + 1];
    cs_linear_fwd(t, Q, C, par(d, H0->cls_w), par(d, H0->cls_b), d->ncls, logits, nt);
    cs_linear_fwd(t, Q, C, par(d, H0->box_w[0]), par(d, H0->box_b[0]), C, a->hb0, nt);
    cs_relu_fwd(a->hb0, d->xa, (size_t)Q * C);
    cs_linear_fwd(d->xa, Q, C, par(d, H0->box_w[1]), par(d, H0->box_b[1]), C, a->hb1, nt);
    cs_relu_fwd(a->hb1, d->xa, (size_t)Q * C);
    cs_linear_fwd(d->xa, Q, C, par(d, H0->box_w[2]), par(d, H0->box_b[2]), 4, d->raw, nt);
    for (int q = 0; q < Q; q++) {
        const float *r = d->ref_is + 2 * (size_t)(q % d->npos);
        d->raw[4 * (size_t)q] += r[0];
        d->raw[4 * (size_t)q + 1] += r[1];
    }
    cs_sigmoid_fwd(d->raw, a->box, (size_t)Q * 4);
    memcpy(boxes, a->box, (size_t)Q * 4 * sizeof(float));
}

static int forward_impl(cs_tdetector *d, const float *feat, float *logits_all, float *boxes_all, int nt) {
    const int C = d->C, HW = d->HW, G = d->G, E = d->E, Q = d->Q, NP = d->npos;
    size_t scr_n;
    if (cs_mul_size(rcda_scratch_floats(d), (size_t)nt, &scr_n))
        return cs_error(CELLSAM_ERR_LIMIT, "detector: scratch size overflows");
    float *scratch = cs_alloc(scr_n, sizeof(float));
    if (!scratch) return cs_error(CELLSAM_ERR_NOMEM, "detector: out of memory for attention scratch");
    cs_tdetector_sync_shared(d);

    /* input projection: Conv1x1 + GroupNorm(32), then token-major */
    memcpy(d->feat, feat, (size_t)E * HW * sizeof(float));
    const float *pb = par(d, d->proj_b)->w;
    for (int c = 0; c < C; c++)
        for (int t = 0; t < HW; t++) d->p0[(size_t)c * HW + t] = pb[c];
    gemm(0, 0, C, HW, E, par(d, d->proj_w)->w, E, d->feat, HW, 1.f, d->p0, HW, nt);
    cs_groupnorm_fwd(d->p0, d->xb, C, HW, TD_GN_GROUPS, par(d, d->gn_w), par(d, d->gn_b), TD_EPS, d->gn_m, d->gn_r);
    cs_transpose(d->xb, d->S[0], C, HW);

    /* 1-D codes of the cell centres (g + 0.5)/G, shared by rows and columns */
    for (int g = 0; g < G; g++) posemb1d(d, ((float)(g + 1) - 0.5f) / (float)G, d->pe1map + (size_t)g * C);
    mlp2_fwd(d, d->p1w, d->p1b, d->pe1map, G, d->h1map, d->xa, d->pos1, nt);

    for (int l = 0; l < d->n_enc; l++) encoder_fwd(d, l, scratch, nt);

    /* per-anchor constants shared by every decoder layer */
    const float *pos = par(d, d->position)->w;
    for (int p = 0; p < NP; p++) {
        const float rx = pos[2 * p], ry = pos[2 * p + 1];
        posemb2d(d, rx, ry, d->emb2d + (size_t)p * C);
        posemb1d(d, rx, d->embx + (size_t)p * C);
        posemb1d(d, ry, d->emby + (size_t)p * C);
        d->ref_is[2 * p] = inverse_sigmoid(rx);
        d->ref_is[2 * p + 1] = inverse_sigmoid(ry);
    }
    mlp2_fwd(d, d->p2w, d->p2b, d->emb2d, NP, d->h2pre, d->xa, d->qpos, nt);
    mlp2_fwd(d, d->p1w, d->p1b, d->embx, NP, d->hxpre, d->xa, d->qx, nt);
    mlp2_fwd(d, d->p1w, d->p1b, d->emby, NP, d->hypre, d->xa, d->qy, nt);
    const float *pat = par(d, d->pattern)->w;
    for (int q = 0; q < Q; q++) memcpy(d->T[0] + (size_t)q * C, pat + (size_t)(q / NP) * C, (size_t)C * sizeof(float));
    axis_means(d, d->S[d->n_enc], d->dmr, d->dmc);

    for (int l = 0; l < d->n_dec; l++) {
        decoder_fwd(d, l, scratch, nt);
        heads_fwd(d, l, logits_all + (size_t)l * Q * d->ncls, boxes_all + (size_t)l * Q * 4, nt);
    }
    cs_free(scratch);
    return CELLSAM_OK;
}

int cs_tdetector_forward(cs_tdetector *d, const float *feat_chw, float *logits_all, float *boxes_all, int train,
                         int n_threads) {
    if (!d || !feat_chw || !logits_all || !boxes_all)
        return cs_error(CELLSAM_ERR_INVALID, "detector forward: NULL argument");
    const int nt = n_threads < 1 ? 1 : n_threads > 256 ? 256 : n_threads;
    d->have_acts = 0;
    int rc = alloc_buffers(d);
    if (rc) return rc;
    /* OpenBLAS follows the OpenMP ICV, which the GEMM helpers set per call: restore it */
    const int saved = omp_get_max_threads();
    rc = forward_impl(d, feat_chw, logits_all, boxes_all, nt);
    omp_set_num_threads(saved);
    d->have_acts = rc == CELLSAM_OK && train;
    return rc;
}

/* ------------------------------------------------------------------ backward */

/* Backward of out = LN(x + FFN(x)) from dout: dx (rows, C) written, the FFN
 * hidden recomputed from hpre; tmp is rows x C scratch. */
static void ffn_bwd(const cs_tdetector *d, const ffn_idx *f, const float *x, int rows, const float *hpre,
                    const float *y, const float *m, const float *r, const float *dout, float *dx, float *tmp,
                    int nt) {
    const int C = d->C, F = d->F;
    cs_layernorm_bwd(y, dout, rows, C, par(d, f->nw), par(d, f->nb), m, r, dx);
    cs_relu_fwd(hpre, d->fa, (size_t)rows * F);
    cs_linear_bwd(d->fa, rows, F, par(d, f->w2), par(d, f->b2), C, dx, d->fb, nt);
    cs_relu_bwd(hpre, d->fb, d->fb, (size_t)rows * F);
    cs_linear_bwd(x, rows, C, par(d, f->w1), par(d, f->b1), F, d->fb, tmp, nt);
    add_into(dx, tmp, (size_t)rows * C);
}

/* Heads backward for layer l: dt (Q, C) += gradient through class and box heads. */
static void heads_bwd(cs_tdetector *d, int l, const float *dlogits, const float *dboxes, float *dt, int nt) {
    const int C = d->C, Q = d->Q;
    const dec_idx *H0 = &d->dec[0];
    const dec_act *a = &d->da[l];
    const float *t = d->T[l + 1];
    if (dlogits) {
        cs_linear_bwd(t, Q, C, par(d, H0->cls_w), par(d, H0->cls_b), d->ncls, dlogits, d->xa, nt);
        add_into(dt, d->xa, (size_t)Q * C);
    }
    if (dboxes) {
        cs_sigmoid_bwd_from_y(a->box, dboxes, d->raw, (size_t)Q * 4);
        for (int q = 0; q < Q; q++) {
            float *r = d->dref + 2 * (size_t)(q % d->npos);
            r[0] += d->raw[4 * (size_t)q];
            r[1] += d->raw[4 * (size_t)q + 1];
        }
        cs_relu_fwd(a->hb1, d->xa, (size_t)Q * C);
        cs_linear_bwd(d->xa, Q, C, par(d, H0->box_w[2]), par(d, H0->box_b[2]), 4, d->raw, d->xb, nt);
        cs_relu_bwd(a->hb1, d->xb, d->xb, (size_t)Q * C);
        cs_relu_fwd(a->hb0, d->xa, (size_t)Q * C);
        cs_linear_bwd(d->xa, Q, C, par(d, H0->box_w[1]), par(d, H0->box_b[1]), C, d->xb, d->xc, nt);
        cs_relu_bwd(a->hb0, d->xc, d->xc, (size_t)Q * C);
        cs_linear_bwd(t, Q, C, par(d, H0->box_w[0]), par(d, H0->box_b[0]), C, d->xc, d->xa, nt);
        add_into(dt, d->xa, (size_t)Q * C);
    }
}

/* Decoder layer l backward: dt holds d(T[l+1]) on entry and d(T[l]) on exit.
 * Memory gradients go to dM (values) and gg[2]/gg[3] (key inputs, summed). */
static void decoder_bwd(cs_tdetector *d, int l, float *dt, float *dM, float *scratch, int nt) {
    const int C = d->C, Q = d->Q, HW = d->HW, G = d->G, hd = d->hd;
    const dec_idx *L = &d->dec[l];
    const dec_act *a = &d->da[l];
    const float *t = d->T[l], *M = d->S[d->n_enc];
    const size_t QC = (size_t)Q * C;
    float *dy = d->xb, *tmp = d->xc;
    /* c. FFN: dy = d(t2) */
    ffn_bwd(d, &L->ffn, a->t2, Q, a->hpre, a->yff, a->mff, a->rff, dt, dy, tmp, nt);
    /* b. cross RCDA */
    {
        const float s = powf((float)hd, -0.5f);
        cs_tparam *iw = par(d, L->ca.in_w), *ib = par(d, L->ca.in_b);
        cs_tparam w0 = rows_view(iw, 0, C), b0 = rows_view(ib, 0, C), w1 = rows_view(iw, C, C),
                  b1 = rows_view(ib, C, C);
        cs_tparam w2 = rows_view(iw, 2 * C, C), b2 = rows_view(ib, 2 * C, C), w3 = rows_view(iw, 3 * C, C),
                  b3 = rows_view(ib, 3 * C, C);
        cs_tparam w4 = rows_view(iw, 4 * C, C), b4 = rows_view(ib, 4 * C, C);
        float *dt1 = dt; /* d(t1) accumulates here */
        cs_layernorm_bwd(a->yca, dy, Q, C, par(d, L->n1w), par(d, L->n1b), a->mca, a->rca, dt1);
        float *dco = d->xb;
        cs_linear_bwd(a->co, Q, C, par(d, L->ca.out_w), par(d, L->ca.out_b), C, dt1, dco, nt);
        float *dqr = d->xc, *dqc = d->xd, *dvp = d->xe;
        rcda_bwd(d, Q, a->cqr, a->cqc, a->ckr, a->ckc, a->cvp, a->car, a->cac, dco, dqr, dqc, d->gg[0], d->gg[1],
                 dvp, scratch, nt);
        scale_into(dqr, QC, s);
        scale_into(dqc, QC, s);
        add_query_pos(d, a->t1, d->qx, d->xa);
        cs_linear_bwd(d->xa, Q, C, &w0, &b0, C, dqr, d->xb, nt);
        add_into(dt1, d->xb, QC);
        add_into(d->dqx, d->xb, QC);
        add_query_pos(d, a->t1, d->qy, d->xa);
        cs_linear_bwd(d->xa, Q, C, &w1, &b1, C, dqc, d->xb, nt);
        add_into(dt1, d->xb, QC);
        add_into(d->dqy, d->xb, QC);
        cs_linear_bwd(d->dmr, G, C, &w2, &b2, C, d->gg[0], d->xb, nt);
        add_into(d->gg[2], d->xb, (size_t)G * C);
        cs_linear_bwd(d->dmc, G, C, &w3, &b3, C, d->gg[1], d->xb, nt);
        add_into(d->gg[3], d->xb, (size_t)G * C);
        unpack_heads(d, dvp, d->xa);
        cs_linear_bwd(M, HW, C, &w4, &b4, C, d->xa, d->xb, nt);
        add_into(dM, d->xb, (size_t)HW * C);
    }
    /* a. self-attention */
    {
        cs_tparam *iw = par(d, L->sa.in_w), *ib = par(d, L->sa.in_b);
        cs_tparam w0 = rows_view(iw, 0, C), b0 = rows_view(ib, 0, C), w1 = rows_view(iw, C, C),
                  b1 = rows_view(ib, C, C), w2 = rows_view(iw, 2 * C, C), b2 = rows_view(ib, 2 * C, C);
        float *dt0 = d->xf;
        cs_layernorm_bwd(a->ysa, dt, Q, C, par(d, L->n2w), par(d, L->n2b), a->msa, a->rsa, dt0);
        float *dso = d->xb;
        cs_linear_bwd(a->so, Q, C, par(d, L->sa.out_w), par(d, L->sa.out_b), C, dt0, dso, nt);
        float *dq = d->xc, *dk = d->xd, *dv = d->xe;
        const float scale = 1.0f / sqrtf((float)hd);
        for (int h = 0; h < d->heads; h++) {
            /* recompute this head's probabilities instead of keeping heads x Q x Q */
            cs_attn_head_fwd(a->sq + h * hd, C, a->sk + h * hd, C, a->sv + h * hd, C, Q, Q, hd, scale, NULL,
                             d->attnP, d->xa + h * hd, C, nt);
            cs_attn_head_bwd(a->sq + h * hd, C, a->sk + h * hd, C, a->sv + h * hd, C, Q, Q, hd, scale, d->attnP,
                             dso + h * hd, C, dq + h * hd, dk + h * hd, dv + h * hd, NULL, d->attnS, nt);
        }
        add_query_pos(d, t, d->qpos, d->xa);
        cs_linear_bwd(d->xa, Q, C, &w0, &b0, C, dq, d->xb, nt);
        add_into(dt0, d->xb, QC);
        add_into(d->dqpos, d->xb, QC);
        cs_linear_bwd(d->xa, Q, C, &w1, &b1, C, dk, d->xb, nt);
        add_into(dt0, d->xb, QC);
        add_into(d->dqpos, d->xb, QC);
        cs_linear_bwd(t, Q, C, &w2, &b2, C, dv, d->xb, nt);
        add_into(dt0, d->xb, QC);
        memcpy(dt, dt0, QC * sizeof(float));
    }
}

/* Encoder layer l backward: dS holds d(S[l+1]) on entry and d(S[l]) on exit. */
static void encoder_bwd(cs_tdetector *d, int l, float *dS, float *scratch, int nt) {
    const int C = d->C, HW = d->HW, G = d->G;
    const enc_idx *L = &d->enc[l];
    const enc_act *a = &d->ea[l];
    const float *S = d->S[l];
    const size_t N = (size_t)HW * C;
    const float s = powf((float)d->hd, -0.5f);
    cs_tparam *iw = par(d, L->attn.in_w), *ib = par(d, L->attn.in_b);
    cs_tparam w0 = rows_view(iw, 0, C), b0 = rows_view(ib, 0, C), w1 = rows_view(iw, C, C), b1 = rows_view(ib, C, C);
    cs_tparam w2 = rows_view(iw, 2 * C, C), b2 = rows_view(ib, 2 * C, C), w3 = rows_view(iw, 3 * C, C),
              b3 = rows_view(ib, 3 * C, C);
    cs_tparam w4 = rows_view(iw, 4 * C, C), b4 = rows_view(ib, 4 * C, C);
    float *ds1 = d->xb;
    ffn_bwd(d, &L->ffn, a->s1, HW, a->hpre, a->y2, a->m2, a->r2, dS, ds1, d->xc, nt);
    cs_layernorm_bwd(a->y1, ds1, HW, C, par(d, L->n1w), par(d, L->n1b), a->m1, a->r1, dS); /* residual part */
    float *dout = d->xb;
    cs_linear_bwd(a->o, HW, C, par(d, L->attn.out_w), par(d, L->attn.out_b), C, dS, dout, nt);
    float *dqr = d->xc, *dqc = d->xd, *dvp = d->xe;
    rcda_bwd(d, HW, a->qr, a->qc, a->kr, a->kc, a->vp, a->ar, a->ac, dout, dqr, dqc, d->gg[0], d->gg[1], dvp, scratch,
             nt);
    scale_into(dqr, N, s);
    scale_into(dqc, N, s);
    add_map_pos(d, S, 0, d->xa);
    cs_linear_bwd(d->xa, HW, C, &w0, &b0, C, dqr, d->xb, nt);
    add_into(dS, d->xb, N);
    map_pos_bwd(d, d->xb, 0, d->dpos1);
    add_map_pos(d, S, 1, d->xa);
    cs_linear_bwd(d->xa, HW, C, &w1, &b1, C, dqc, d->xb, nt);
    add_into(dS, d->xb, N);
    map_pos_bwd(d, d->xb, 1, d->dpos1);
    cs_linear_bwd(a->mr, G, C, &w2, &b2, C, d->gg[0], d->gg[2], nt);
    cs_linear_bwd(a->mc, G, C, &w3, &b3, C, d->gg[1], d->gg[3], nt);
    axis_means_bwd(d, d->gg[2], d->gg[3], dS, d->dpos1);
    unpack_heads(d, dvp, d->xa);
    cs_linear_bwd(S, HW, C, &w4, &b4, C, d->xa, d->xb, nt);
    add_into(dS, d->xb, N);
}

static int backward_impl(cs_tdetector *d, const float *dlogits_all, const float *dboxes_all, float *dfeat, int nt) {
    const int C = d->C, HW = d->HW, G = d->G, E = d->E, Q = d->Q, NP = d->npos;
    size_t scr_n;
    if (cs_mul_size(rcda_scratch_floats(d), (size_t)nt, &scr_n))
        return cs_error(CELLSAM_ERR_LIMIT, "detector: scratch size overflows");
    float *scratch = cs_alloc(scr_n, sizeof(float));
    float *dM = cs_calloc((size_t)HW, (size_t)C * sizeof(float));
    float *dt = cs_calloc((size_t)Q, (size_t)C * sizeof(float));
    if (!scratch || !dM || !dt) {
        cs_free(scratch);
        cs_free(dM);
        cs_free(dt);
        return cs_error(CELLSAM_ERR_NOMEM, "detector: out of memory for the backward");
    }
    const size_t GC = (size_t)G * C, QC = (size_t)Q * C;
    memset(d->dpos1, 0, GC * sizeof(float));
    memset(d->gg[2], 0, GC * sizeof(float));
    memset(d->gg[3], 0, GC * sizeof(float));
    memset(d->dqpos, 0, QC * sizeof(float));
    memset(d->dqx, 0, QC * sizeof(float));
    memset(d->dqy, 0, QC * sizeof(float));
    memset(d->dref, 0, (size_t)NP * 2 * sizeof(float));

    for (int l = d->n_dec - 1; l >= 0; l--) {
        heads_bwd(d, l, dlogits_all ? dlogits_all + (size_t)l * Q * d->ncls : NULL,
                  dboxes_all ? dboxes_all + (size_t)l * Q * 4 : NULL, dt, nt);
        decoder_bwd(d, l, dt, dM, scratch, nt);
    }
    /* tgt0 = pattern[q / npos] */
    float *gp = grad(d, d->pattern);
    if (gp)
        for (int q = 0; q < Q; q++) add_into(gp + (size_t)(q / NP) * C, dt + (size_t)q * C, (size_t)C);

    /* anchor-side constants: reduce over patterns, then through the MLPs and codes */
    for (int q = NP; q < Q; q++) {
        add_into(d->dqpos + (size_t)(q % NP) * C, d->dqpos + (size_t)q * C, (size_t)C);
        add_into(d->dqx + (size_t)(q % NP) * C, d->dqx + (size_t)q * C, (size_t)C);
        add_into(d->dqy + (size_t)(q % NP) * C, d->dqy + (size_t)q * C, (size_t)C);
    }
    float *demb = d->xd;
    const float *pos = par(d, d->position)->w;
    float *gpos = grad(d, d->position);
    /* the MLP weights learn even when the anchors are frozen */
    mlp2_bwd(d, d->p2w, d->p2b, d->emb2d, NP, d->h2pre, d->dqpos, gpos ? demb : NULL, d->xa, d->xb, nt);
    for (int p = 0; gpos && p < NP; p++) {
        double gx, gy;
        posemb2d_grad(d, pos[2 * p], pos[2 * p + 1], demb + (size_t)p * C, &gx, &gy);
        gpos[2 * p] += (float)gx;
        gpos[2 * p + 1] += (float)gy;
    }
    mlp2_bwd(d, d->p1w, d->p1b, d->embx, NP, d->hxpre, d->dqx, gpos ? demb : NULL, d->xa, d->xb, nt);
    for (int p = 0; gpos && p < NP; p++) gpos[2 * p] += (float)posemb1d_grad(d, pos[2 * p], demb + (size_t)p * C);
    mlp2_bwd(d, d->p1w, d->p1b, d->emby, NP, d->hypre, d->dqy, gpos ? demb : NULL, d->xa, d->xb, nt);
    for (int p = 0; gpos && p < NP; p++)
        gpos[2 * p + 1] += (float)posemb1d_grad(d, pos[2 * p + 1], demb + (size_t)p * C);
    for (int p = 0; gpos && p < NP; p++) {
        gpos[2 * p] += (float)(d->dref[2 * p] * inverse_sigmoid_grad(pos[2 * p]));
        gpos[2 * p + 1] += (float)(d->dref[2 * p + 1] * inverse_sigmoid_grad(pos[2 * p + 1]));
    }

    /* decoder keys came from axis means of the memory */
    axis_means_bwd(d, d->gg[2], d->gg[3], dM, d->dpos1);
    for (int l = d->n_enc - 1; l >= 0; l--) encoder_bwd(d, l, dM, scratch, nt);
    /* map positional codes (their inputs are constants) */
    mlp2_bwd(d, d->p1w, d->p1b, d->pe1map, G, d->h1map, d->dpos1, NULL, d->xa, d->xb, nt);

    /* input projection: GroupNorm then the 1x1 convolution */
    float *dP = d->xa, *dP0 = d->xb;
    cs_transpose(dM, dP, HW, C);
    cs_groupnorm_bwd(d->p0, dP, C, HW, TD_GN_GROUPS, par(d, d->gn_w), par(d, d->gn_b), d->gn_m, d->gn_r, dP0);
    float *gw = grad(d, d->proj_w), *gb = grad(d, d->proj_b);
    if (gw) gemm(0, 1, C, E, HW, dP0, HW, d->feat, HW, 1.f, gw, E, nt);
    for (int c = 0; gb && c < C; c++) {
        double s = 0.0;
        const float *row = dP0 + (size_t)c * HW;
        for (int t = 0; t < HW; t++) s += row[t];
        gb[c] += (float)s;
    }
    if (dfeat) gemm(1, 0, E, HW, C, par(d, d->proj_w)->w, E, dP0, HW, 0.f, dfeat, HW, nt);
    cs_free(scratch);
    cs_free(dM);
    cs_free(dt);
    return CELLSAM_OK;
}

int cs_tdetector_backward(cs_tdetector *d, const float *dlogits_all, const float *dboxes_all, float *dfeat_chw,
                          int n_threads) {
    if (!d) return cs_error(CELLSAM_ERR_INVALID, "detector backward: NULL argument");
    if (!d->have_acts)
        return cs_error(CELLSAM_ERR_INVALID, "detector backward: no activations (run the forward with train=1 first)");
    const int nt = n_threads < 1 ? 1 : n_threads > 256 ? 256 : n_threads;
    const int saved = omp_get_max_threads();
    int rc = backward_impl(d, dlogits_all, dboxes_all, dfeat_chw, nt);
    omp_set_num_threads(saved);
    return rc;
}
