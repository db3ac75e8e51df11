/* Trainable SAM ViT image encoder (train.h; spec §4.2): patch embedding (im2col +
 * linear), absolute positions, pre-norm blocks with windowed or global attention and
 * decomposed relative positions, MLP, optional neck. Same numerics as the inference
 * encoder (image_encoder.c), plus the activations the backward needs.
 *
 * Tokens are channel-last (N x D). Parameters live in a cs_tparams store under the
 * official names and are addressed by index, because other modules may add
 * parameters to the same store later (which can move the items array).
 *
 * Activation memory held after a forward (floats; N = grid^2 tokens, T = tokens of
 * the zero-padded window grid, n = window^2, H heads, K = 3*patch^2, C = out_chans):
 *   shared:    N*K (patches) + (depth+1)*N*D (block inputs, trunk output)
 *              + N*mlp + T*D (work) + neck 4*N*C + 9*N*C (conv work) + 4*N
 *   per block: T*D*4 (windowed LN1 output, q/k/v) + N*D*3 (attention output, mid
 *              residual, LN2 output) + N*mlp (GELU input) + 4*N (LN statistics)
 *   train=1 only, attention probabilities: windowed blocks (T/n)*H*n*n floats,
 *              global blocks H*N*N floats (64 MiB per head at grid 64).
 * Example (dim 64, depth 4, heads 2, mlp 256, window 14, 1 global block, neck 64,
 * 1024 input): 82 MiB of token activations + 128 MiB of global attention
 * probabilities + 3 x 7.3 MiB windowed = 232 MiB; cs_tvit_activation_bytes()
 * reports it. The backward allocates its own work buffers (about N*(2D+mlp) +
 * T*5D + 2*N*C floats, plus per thread 2*Q*(n + 2S) + 4*n*hd floats with Q = 256
 * query rows) and frees them before returning. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ops.h"
#include "train.h"

/* Query rows per attention call: bounds the per-thread logits/bias scratch to
 * QBLOCK x n floats even for global attention (the kept probabilities are n x n). */
#define TVIT_QBLOCK 256
#define TVIT_MAX_DEPTH 64
#define TVIT_MAX_GRID 256
#define TVIT_MAX_DIM 8192
#define TVIT_LN_EPS 1e-6f


enum { INIT_TRUNC, INIT_ZERO, INIT_ONE };

typedef struct {
    int side;       /* window side S (= grid for global attention) */
    int nws;        /* windows per grid side */
    int nwin, n;    /* windows, tokens per window */
    size_t ntok;    /* tokens of the padded window grid = nwin * n */
    size_t norm1_w, norm1_b, rel_h, rel_w, qkv_w, qkv_b, proj_w, proj_b;
    size_t norm2_w, norm2_b, lin1_w, lin1_b, lin2_w, lin2_b;
    /* saved activations (the block input is xs[bi] of the module) */
    float *mean1, *rstd1;
    float *yw;      /* ntok x D: LN1 output in window order, padding rows zero */
    float *qkv;     /* ntok x 3D */
    float *P;       /* nwin*H x n x n attention probabilities (train=1 only) */
    float *attn;    /* N x D: attention output before proj, window padding cropped */
    float *x_mid;   /* N x D: residual after the attention branch */
    float *mean2, *rstd2;
    float *y2;      /* N x D: LN2 output */
    float *h1;      /* N x mlp: lin1 output (GELU input) */
} tvit_block;

struct cs_tvit {
    cs_tparams *ps;
    cs_tvit_config cfg;
    int G, D, H, hd, mlp, C, K;
    size_t N;
    size_t pos_embed, patch_w, patch_b;
    size_t neck0_w, neck1_w, neck1_b, neck2_w, neck3_w, neck3_b;
    tvit_block *blocks;
    /* saved activations */
    int have_buffers, have_P;
    int train_valid;   /* buffers hold a train=1 forward */
    float *col;        /* N x K patches */
    float **xs;        /* depth+1 buffers N x D: block inputs, then the trunk output */
    float *gbuf;       /* N x max(mlp, ...) work */
    float *work;       /* max(T*D, N*D) work: windowed attention output */
    float *z1, *z1n_chw, *z3;           /* neck: conv1x1 out, LN out (chw), conv3x3 out */
    float *nmean1, *nrstd1, *nmean3, *nrstd3;
    float *ncol;       /* C*9 x N conv scratch */
    float *nwork;      /* N x C work */
    size_t act_bytes;
};

/* ---------------------------------------------------------------- helpers */

static cs_tparam *P_(const cs_tvit *v, size_t idx) { return &v->ps->items[idx]; }

/* A 2-D view of a conv weight so the linear primitives see (out, in) matrices. */
static cs_tparam as_matrix(const cs_tparam *p, int64_t rows, int64_t cols) {
    cs_tparam m = *p;
    m.ndim = 2;
    m.shape[0] = rows;
    m.shape[1] = cols;
    m.shape[2] = m.shape[3] = 0;
    return m;
}

static int reg_param(cs_tparams *ps, const char *prefix, const char *name, int ndim, const int64_t *shape,
                     int init, cs_rng *rng, size_t *idx) {
    char full[320];
    int len = snprintf(full, sizeof full, "%s%s", prefix, name);
    if (len < 0 || (size_t)len >= sizeof full)
        return cs_error(CELLSAM_ERR_INVALID, "parameter name too long: %s%s", prefix, name);
    cs_tparam *p = cs_tparams_find(ps, full);
    if (p) {
        int same = p->ndim == ndim;
        for (int d = 0; same && d < ndim; d++) same = p->shape[d] == shape[d];
        if (!same) {
            char want[96] = "";
            for (int d = 0; d < ndim; d++)
                snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", d ? "," : "",
                         (long long)shape[d]);
            return cs_error(CELLSAM_ERR_MODEL, "%s in the parameter store does not have shape (%s)", full, want);
        }
    } else {
        p = cs_tparams_add(ps, full, ndim, shape);
        if (!p) return cs_error_prefix(CELLSAM_ERR_NOMEM, "registering %s", full);
        if (init == INIT_TRUNC) cs_init_trunc_normal(p, rng, 0.02f);
        else cs_init_const(p, init == INIT_ONE ? 1.0f : 0.0f);
    }
    *idx = (size_t)(p - ps->items);
    return CELLSAM_OK;
}

/* Window geometry of a block (SAM: window 0 or a global index = one grid-sized window). */
static void block_geometry(tvit_block *b, int G, int window, int global) {
    b->side = (global || window <= 0) ? G : window;
    b->nws = (G + b->side - 1) / b->side;
    b->nwin = b->nws * b->nws;
    b->n = b->side * b->side;
    b->ntok = (size_t)b->nwin * (size_t)b->n;
}

/* Row of token (y,x) in the zero-padded window layout (windows row-major, tokens
 * row-major inside a window). */
static size_t win_row(const tvit_block *b, int y, int x) {
    int S = b->side;
    return ((size_t)((y / S) * b->nws + x / S) * S + (size_t)(y % S)) * S + (size_t)(x % S);
}

static void win_partition(const tvit_block *b, int G, int D, const float *src, float *dst) {
    memset(dst, 0, b->ntok * (size_t)D * sizeof(float));
    for (int y = 0; y < G; y++)
        for (int x = 0; x < G; x++)
            memcpy(dst + win_row(b, y, x) * D, src + ((size_t)y * G + x) * D, (size_t)D * sizeof(float));
}

static void win_unpartition(const tvit_block *b, int G, int D, const float *src, float *dst) {
    for (int y = 0; y < G; y++)
        for (int x = 0; x < G; x++)
            memcpy(dst + ((size_t)y * G + x) * D, src + win_row(b, y, x) * D, (size_t)D * sizeof(float));
}

static void add_inplace(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

/* ------------------------------------------------------------------ create */

static int check_config(const cs_tvit_config *c) {
    if (c->img_size <= 0 || c->patch <= 0 || c->patch > 64 || c->img_size % c->patch)
        return cs_error(CELLSAM_ERR_INVALID, "ViT: image size %d is not a positive multiple of patch %d",
                        c->img_size, c->patch);
    int G = c->img_size / c->patch;
    if (G > TVIT_MAX_GRID) return cs_error(CELLSAM_ERR_LIMIT, "ViT: grid %d exceeds %d", G, TVIT_MAX_GRID);
    if (c->dim <= 0 || c->dim > TVIT_MAX_DIM || c->heads <= 0 || c->dim % c->heads)
        return cs_error(CELLSAM_ERR_INVALID, "ViT: dim %d must be a positive multiple of heads %d", c->dim,
                        c->heads);
    if (c->depth <= 0 || c->depth > TVIT_MAX_DEPTH)
        return cs_error(CELLSAM_ERR_INVALID, "ViT: depth %d outside 1..%d", c->depth, TVIT_MAX_DEPTH);
    if (c->mlp <= 0 || c->mlp > 8 * TVIT_MAX_DIM)
        return cs_error(CELLSAM_ERR_INVALID, "ViT: mlp width %d out of range", c->mlp);
    if (c->window < 0 || c->window > TVIT_MAX_GRID)
        return cs_error(CELLSAM_ERR_INVALID, "ViT: window %d out of range", c->window);
    if (c->n_global < 0 || c->n_global > 16)
        return cs_error(CELLSAM_ERR_INVALID, "ViT: %d global blocks (at most 16)", c->n_global);
    for (int i = 0; i < c->n_global; i++)
        if (c->global_idx[i] < 0 || c->global_idx[i] >= c->depth)
            return cs_error(CELLSAM_ERR_INVALID, "ViT: global block index %d outside 0..%d", c->global_idx[i],
                            c->depth - 1);
    if (c->out_chans < 0 || c->out_chans > TVIT_MAX_DIM)
        return cs_error(CELLSAM_ERR_INVALID, "ViT: out_chans %d out of range", c->out_chans);
    return CELLSAM_OK;
}

static int is_global(const cs_tvit_config *c, int bi) {
    for (int i = 0; i < c->n_global; i++)
        if (c->global_idx[i] == bi) return 1;
    return 0;
}

int cs_tvit_create(cs_tparams *ps, const char *prefix, const cs_tvit_config *cfg, cs_rng *rng,
                   cs_tvit **out) {
    if (!out) return cs_error(CELLSAM_ERR_INVALID, "cs_tvit_create: out is NULL");
    *out = NULL;
    if (!ps || !prefix || !cfg) return cs_error(CELLSAM_ERR_INVALID, "cs_tvit_create: NULL argument");
    int rc = check_config(cfg);
    if (rc) return rc;
    cs_rng local_rng;
    if (!rng) { /* only used when a parameter is new */
        cs_rng_seed(&local_rng, 0);
        rng = &local_rng;
    }
    cs_tvit *v = calloc(1, sizeof *v);
    if (!v) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    v->ps = ps;
    v->cfg = *cfg;
    v->G = cfg->img_size / cfg->patch;
    v->N = (size_t)v->G * v->G;
    v->D = cfg->dim;
    v->H = cfg->heads;
    v->hd = cfg->dim / cfg->heads;
    v->mlp = cfg->mlp;
    v->C = cfg->out_chans;
    v->K = 3 * cfg->patch * cfg->patch;
    v->blocks = calloc((size_t)cfg->depth, sizeof *v->blocks);
    if (!v->blocks) {
        free(v);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    const int64_t D = v->D, G = v->G, Pp = cfg->patch, M = v->mlp, C = v->C, hd = v->hd;
    rc = reg_param(ps, prefix, "pos_embed", 4, (const int64_t[]){1, G, G, D}, INIT_TRUNC, rng, &v->pos_embed);
    if (!rc)
        rc = reg_param(ps, prefix, "patch_embed.proj.weight", 4, (const int64_t[]){D, 3, Pp, Pp}, INIT_TRUNC, rng,
                       &v->patch_w);
    if (!rc) rc = reg_param(ps, prefix, "patch_embed.proj.bias", 1, &D, INIT_ZERO, rng, &v->patch_b);
    for (int bi = 0; bi < cfg->depth && !rc; bi++) {
        tvit_block *b = &v->blocks[bi];
        block_geometry(b, v->G, cfg->window, is_global(cfg, bi));
        const int64_t R = 2 * (int64_t)b->side - 1;
        char bp[400];
        snprintf(bp, sizeof bp, "%sblocks.%d.", prefix, bi);
        struct {
            const char *name;
            int ndim;
            int64_t shape[2];
            int init;
            size_t *idx;
        } spec[] = {
            {"norm1.weight", 1, {D, 0}, INIT_ONE, &b->norm1_w},
            {"norm1.bias", 1, {D, 0}, INIT_ZERO, &b->norm1_b},
            {"attn.rel_pos_h", 2, {R, hd}, INIT_ZERO, &b->rel_h},
            {"attn.rel_pos_w", 2, {R, hd}, INIT_ZERO, &b->rel_w},
            {"attn.qkv.weight", 2, {3 * D, D}, INIT_TRUNC, &b->qkv_w},
            {"attn.qkv.bias", 1, {3 * D, 0}, INIT_ZERO, &b->qkv_b},
            {"attn.proj.weight", 2, {D, D}, INIT_TRUNC, &b->proj_w},
            {"attn.proj.bias", 1, {D, 0}, INIT_ZERO, &b->proj_b},
            {"norm2.weight", 1, {D, 0}, INIT_ONE, &b->norm2_w},
            {"norm2.bias", 1, {D, 0}, INIT_ZERO, &b->norm2_b},
            {"mlp.lin1.weight", 2, {M, D}, INIT_TRUNC, &b->lin1_w},
            {"mlp.lin1.bias", 1, {M, 0}, INIT_ZERO, &b->lin1_b},
            {"mlp.lin2.weight", 2, {D, M}, INIT_TRUNC, &b->lin2_w},
            {"mlp.lin2.bias", 1, {D, 0}, INIT_ZERO, &b->lin2_b},
        };
        for (size_t s = 0; s < sizeof spec / sizeof spec[0] && !rc; s++)
            rc = reg_param(ps, bp, spec[s].name, spec[s].ndim, spec[s].shape, spec[s].init, rng, spec[s].idx);
    }
    if (!rc && C > 0) {
        rc = reg_param(ps, prefix, "neck.0.weight", 4, (const int64_t[]){C, D, 1, 1}, INIT_TRUNC, rng, &v->neck0_w);
        if (!rc) rc = reg_param(ps, prefix, "neck.1.weight", 1, &C, INIT_ONE, rng, &v->neck1_w);
        if (!rc) rc = reg_param(ps, prefix, "neck.1.bias", 1, &C, INIT_ZERO, rng, &v->neck1_b);
        if (!rc)
            rc = reg_param(ps, prefix, "neck.2.weight", 4, (const int64_t[]){C, C, 3, 3}, INIT_TRUNC, rng,
                           &v->neck2_w);
        if (!rc) rc = reg_param(ps, prefix, "neck.3.weight", 1, &C, INIT_ONE, rng, &v->neck3_w);
        if (!rc) rc = reg_param(ps, prefix, "neck.3.bias", 1, &C, INIT_ZERO, rng, &v->neck3_b);
    }
    if (rc) {
        cs_tvit_free(v);
        return rc;
    }
    *out = v;
    return CELLSAM_OK;
}

static void free_buffers(cs_tvit *v) {
    for (int bi = 0; bi < v->cfg.depth; bi++) {
        tvit_block *b = &v->blocks[bi];
        cs_free(b->mean1);
        cs_free(b->rstd1);
        cs_free(b->yw);
        cs_free(b->qkv);
        cs_free(b->P);
        cs_free(b->attn);
        cs_free(b->x_mid);
        cs_free(b->mean2);
        cs_free(b->rstd2);
        cs_free(b->y2);
        cs_free(b->h1);
        b->mean1 = b->rstd1 = b->yw = b->qkv = b->P = b->attn = b->x_mid = NULL;
        b->mean2 = b->rstd2 = b->y2 = b->h1 = NULL;
    }
    if (v->xs)
        for (int i = 0; i <= v->cfg.depth; i++) cs_free(v->xs[i]);
    free(v->xs);
    v->xs = NULL;
    cs_free(v->col);
    cs_free(v->gbuf);
    cs_free(v->work);
    cs_free(v->z1);
    cs_free(v->z1n_chw);
    cs_free(v->z3);
    cs_free(v->nmean1);
    cs_free(v->nrstd1);
    cs_free(v->nmean3);
    cs_free(v->nrstd3);
    cs_free(v->ncol);
    cs_free(v->nwork);
    v->col = v->gbuf = v->work = v->z1 = v->z1n_chw = v->z3 = NULL;
    v->nmean1 = v->nrstd1 = v->nmean3 = v->nrstd3 = v->ncol = v->nwork = NULL;
    v->have_buffers = v->have_P = v->train_valid = 0;
    v->act_bytes = 0;
}

void cs_tvit_free(cs_tvit *v) {
    if (!v) return;
    if (v->blocks) free_buffers(v);
    free(v->blocks);
    free(v);
}

size_t cs_tvit_activation_bytes(const cs_tvit *v) { return v ? v->act_bytes : 0; }

/* Allocate a float buffer of a*b elements (checked) and count it. */
static float *act_alloc(cs_tvit *v, size_t a, size_t b, int *fail) {
    size_t n;
    if (*fail || cs_mul_size(a, b, &n) != 0 || n == 0) {
        *fail = 1;
        return NULL;
    }
    float *p = cs_alloc(n, sizeof(float));
    if (!p) *fail = 1;
    else v->act_bytes += n * sizeof(float);
    return p;
}

static int ensure_buffers(cs_tvit *v, int with_P) {
    int fail = 0;
    const size_t N = v->N, D = (size_t)v->D, M = (size_t)v->mlp, C = (size_t)v->C;
    if (!v->have_buffers) {
        size_t tmax = N;
        for (int bi = 0; bi < v->cfg.depth; bi++)
            if (v->blocks[bi].ntok > tmax) tmax = v->blocks[bi].ntok;
        v->xs = calloc((size_t)v->cfg.depth + 1, sizeof *v->xs);
        if (!v->xs) fail = 1;
        v->col = act_alloc(v, N, (size_t)v->K, &fail);
        for (int i = 0; i <= v->cfg.depth && !fail; i++) v->xs[i] = act_alloc(v, N, D, &fail);
        v->gbuf = act_alloc(v, N, M, &fail);
        v->work = act_alloc(v, tmax, D, &fail);
        for (int bi = 0; bi < v->cfg.depth && !fail; bi++) {
            tvit_block *b = &v->blocks[bi];
            b->mean1 = act_alloc(v, N, 1, &fail);
            b->rstd1 = act_alloc(v, N, 1, &fail);
            b->yw = act_alloc(v, b->ntok, D, &fail);
            b->qkv = act_alloc(v, b->ntok, 3 * D, &fail);
            b->attn = act_alloc(v, N, D, &fail);
            b->x_mid = act_alloc(v, N, D, &fail);
            b->mean2 = act_alloc(v, N, 1, &fail);
            b->rstd2 = act_alloc(v, N, 1, &fail);
            b->y2 = act_alloc(v, N, D, &fail);
            b->h1 = act_alloc(v, N, M, &fail);
        }
        if (C > 0) {
            v->z1 = act_alloc(v, N, C, &fail);
            v->z1n_chw = act_alloc(v, N, C, &fail);
            v->z3 = act_alloc(v, N, C, &fail);
            v->nmean1 = act_alloc(v, N, 1, &fail);
            v->nrstd1 = act_alloc(v, N, 1, &fail);
            v->nmean3 = act_alloc(v, N, 1, &fail);
            v->nrstd3 = act_alloc(v, N, 1, &fail);
            v->ncol = act_alloc(v, N, 9 * C, &fail);
            v->nwork = act_alloc(v, N, C, &fail);
        }
        if (fail) {
            free_buffers(v);
            return cs_error(CELLSAM_ERR_NOMEM, "out of memory for ViT activations");
        }
        v->have_buffers = 1;
    }
    if (with_P && !v->have_P) {
        for (int bi = 0; bi < v->cfg.depth && !fail; bi++) {
            tvit_block *b = &v->blocks[bi];
            size_t heads_win, nn;
            if (cs_mul_size((size_t)b->nwin, (size_t)v->H, &heads_win) || cs_mul_size((size_t)b->n, (size_t)b->n, &nn)) {
                fail = 1;
                break;
            }
            b->P = act_alloc(v, heads_win, nn, &fail);
        }
        if (fail) {
            free_buffers(v);
            return cs_error(CELLSAM_ERR_NOMEM, "out of memory for ViT attention probabilities");
        }
        v->have_P = 1;
    }
    return CELLSAM_OK;
}

/* --------------------------------------------------------------- attention */

/* Per-thread scratch (floats) of one attention item, forward or backward. */
static size_t attn_ws_floats(const tvit_block *b, int hd) {
    size_t qb = b->n < TVIT_QBLOCK ? (size_t)b->n : TVIT_QBLOCK;
    size_t R = 2 * (size_t)b->side - 1, n = (size_t)b->n;
    return 2 * qb * R + 2 * qb * n + 4 * n * hd + 2 * R * hd;
}

/* One head of one window: logits = scale q k^T + q.Rh[qy-ky+S-1] + q.Rw[qx-kx+S-1]
 * (q unscaled in the relative terms, as SAM's add_decomposed_rel_pos), softmax,
 * o = P v. Query rows go in blocks; P_item (n x n) is kept when non-NULL. */
static void attn_item_fwd(const tvit_block *b, int D, int hd, const float *qkv_win, int h, const float *Rh,
                          const float *Rw, float *P_item, float *o_win, float *ws, int inner) {
    const int S = b->side, n = b->n, R = 2 * S - 1, ld = 3 * D;
    const float scale = 1.0f / sqrtf((float)hd);
    const float *k = qkv_win + D + h * hd, *vv = qkv_win + 2 * D + h * hd;
    for (int q0 = 0; q0 < n; q0 += TVIT_QBLOCK) {
        const int qb = n - q0 < TVIT_QBLOCK ? n - q0 : TVIT_QBLOCK;
        const float *q = qkv_win + (size_t)q0 * ld + h * hd;
        float *fh = ws, *fw = fh + (size_t)qb * R, *bias = fw + (size_t)qb * R, *ptmp = bias + (size_t)qb * n;
        /* per-offset dots q . R[j] for every table row, then gathered per key */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, qb, R, hd, 1.0f, q, ld, Rh, hd, 0.0f, fh, R);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, qb, R, hd, 1.0f, q, ld, Rw, hd, 0.0f, fw, R);
        for (int i = 0; i < qb; i++) {
            const int t = q0 + i, qy = t / S, qx = t % S;
            const float *hrow = fh + (size_t)i * R + qy + S - 1; /* hrow[-ky] */
            const float *wrow = fw + (size_t)i * R + qx + S - 1; /* wrow[-kx] */
            float *brow = bias + (size_t)i * n;
            for (int ky = 0; ky < S; ky++) {
                const float hv = hrow[-ky];
                float *bp = brow + (size_t)ky * S;
                for (int kx = 0; kx < S; kx++) bp[kx] = hv + wrow[-kx];
            }
        }
        float *P = P_item ? P_item + (size_t)q0 * n : ptmp;
        cs_attn_head_fwd(q, ld, k, ld, vv, ld, qb, n, hd, scale, bias, P, o_win + (size_t)q0 * D + h * hd, D,
                         inner);
    }
}

/* Backward of attn_item_fwd. dq is written into dqkv_win (q columns of head h);
 * dk, dv are accumulated over query blocks and written into dqkv_win; the
 * relative-position table gradients accumulate into dRh/dRw (R x hd). */
static void attn_item_bwd(const tvit_block *b, int D, int hd, const float *qkv_win, int h, const float *Rh,
                          const float *Rw, const float *P_item, const float *do_win, float *dqkv_win, float *dRh,
                          float *dRw, float *ws, int inner) {
    const int S = b->side, n = b->n, R = 2 * S - 1, ld = 3 * D;
    const float scale = 1.0f / sqrtf((float)hd);
    const int qbmax = n < TVIT_QBLOCK ? n : TVIT_QBLOCK;
    float *gh = ws, *gw = gh + (size_t)qbmax * R, *dbias = gw + (size_t)qbmax * R;
    float *scr = dbias + (size_t)qbmax * n;
    float *kc = scr + (size_t)qbmax * n, *vc = kc + (size_t)n * hd;
    float *dk = vc + (size_t)n * hd, *dv = dk + (size_t)n * hd;
    /* contiguous k, v so that the primitive's dk, dv (written with the input strides)
     * land in small buffers we can accumulate over query blocks */
    for (int j = 0; j < n; j++) {
        memcpy(kc + (size_t)j * hd, qkv_win + (size_t)j * ld + D + h * hd, (size_t)hd * sizeof(float));
        memcpy(vc + (size_t)j * hd, qkv_win + (size_t)j * ld + 2 * D + h * hd, (size_t)hd * sizeof(float));
        memset(dqkv_win + (size_t)j * ld + D + h * hd, 0, (size_t)hd * sizeof(float));
        memset(dqkv_win + (size_t)j * ld + 2 * D + h * hd, 0, (size_t)hd * sizeof(float));
    }
    for (int q0 = 0; q0 < n; q0 += TVIT_QBLOCK) {
        const int qb = n - q0 < TVIT_QBLOCK ? n - q0 : TVIT_QBLOCK;
        const float *q = qkv_win + (size_t)q0 * ld + h * hd;
        float *dq = dqkv_win + (size_t)q0 * ld + h * hd;
        cs_attn_head_bwd(q, ld, kc, hd, vc, hd, qb, n, hd, scale, P_item + (size_t)q0 * n,
                         do_win + (size_t)q0 * D + h * hd, D, dq, dk, dv, dbias, scr, inner);
        for (int j = 0; j < n; j++) {
            add_inplace(dqkv_win + (size_t)j * ld + D + h * hd, dk + (size_t)j * hd, (size_t)hd);
            add_inplace(dqkv_win + (size_t)j * ld + 2 * D + h * hd, dv + (size_t)j * hd, (size_t)hd);
        }
        /* dL/d(per-offset dot): sum the logit gradients that used each table row */
        memset(gh, 0, (size_t)qb * R * sizeof(float));
        memset(gw, 0, (size_t)qb * R * sizeof(float));
        for (int i = 0; i < qb; i++) {
            const int t = q0 + i, qy = t / S, qx = t % S;
            float *ghr = gh + (size_t)i * R + qy + S - 1;
            float *gwr = gw + (size_t)i * R + qx + S - 1;
            const float *drow = dbias + (size_t)i * n;
            for (int ky = 0; ky < S; ky++) {
                const float *dp = drow + (size_t)ky * S;
                float s = 0.f;
                for (int kx = 0; kx < S; kx++) {
                    s += dp[kx];
                    gwr[-kx] += dp[kx];
                }
                ghr[-ky] += s;
            }
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, qb, hd, R, 1.0f, gh, R, Rh, hd, 1.0f, dq, ld);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, qb, hd, R, 1.0f, gw, R, Rw, hd, 1.0f, dq, ld);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, R, hd, qb, 1.0f, gh, R, q, ld, 1.0f, dRh, hd);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, R, hd, qb, 1.0f, gw, R, q, ld, 1.0f, dRw, hd);
    }
}

/* Parallel split of a block's (window, head) items: across threads when there are
 * enough items, else one item at a time with the threads inside the primitives. */
static void split_threads(int items, int n_threads, int *outer, int *inner) {
    if (items >= n_threads) {
        *outer = n_threads;
        *inner = 1;
    } else {
        *outer = 1;
        *inner = n_threads;
    }
}

static int block_attention_fwd(cs_tvit *v, tvit_block *b, int train, int n_threads) {
    const int D = v->D, H = v->H, hd = v->hd;
    const int items = b->nwin * H;
    int outer, inner;
    split_threads(items, n_threads, &outer, &inner);
    const size_t wsn = attn_ws_floats(b, hd);
    float *ws = cs_alloc((size_t)outer, wsn * sizeof(float));
    if (!ws) return cs_error(CELLSAM_ERR_NOMEM, "out of memory in ViT attention");
    const float *Rh = P_(v, b->rel_h)->w, *Rw = P_(v, b->rel_w)->w;
    const size_t nn = (size_t)b->n * b->n;
    float *Ow = v->work;
#pragma omp parallel for num_threads(outer) schedule(dynamic, 1)
    for (int it = 0; it < items; it++) {
        const int w = it / H, h = it % H;
        const float *qkv_win = b->qkv + (size_t)w * b->n * 3 * D;
        float *P_item = train ? b->P + (size_t)it * nn : NULL;
        attn_item_fwd(b, D, hd, qkv_win, h, Rh, Rw, P_item, Ow + (size_t)w * b->n * D, ws + (size_t)omp_get_thread_num() * wsn,
                      inner);
    }
    cs_free(ws);
    win_unpartition(b, v->G, D, Ow, b->attn);
    return CELLSAM_OK;
}

/* dattn (N x D) -> dqkv (ntok x 3D), relative-position gradients into the store. */
static int block_attention_bwd(cs_tvit *v, tvit_block *b, const float *dattn, float *dOw, float *dqkv,
                               int n_threads) {
    const int D = v->D, H = v->H, hd = v->hd;
    const int items = b->nwin * H;
    const size_t R = 2 * (size_t)b->side - 1, tab = R * hd;
    int outer, inner;
    split_threads(items, n_threads, &outer, &inner);
    const size_t wsn = attn_ws_floats(b, hd);
    float *ws = cs_alloc((size_t)outer, wsn * sizeof(float));
    float *dtab = cs_calloc((size_t)outer, 2 * tab * sizeof(float)); /* per-thread dRh | dRw */
    if (!ws || !dtab) {
        cs_free(ws);
        cs_free(dtab);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory in ViT attention backward");
    }
    win_partition(b, v->G, D, dattn, dOw);
    cs_tparam *ph = P_(v, b->rel_h), *pw = P_(v, b->rel_w);
    const float *Rh = ph->w, *Rw = pw->w;
    const size_t nn = (size_t)b->n * b->n;
#pragma omp parallel for num_threads(outer) schedule(dynamic, 1)
    for (int it = 0; it < items; it++) {
        const int w = it / H, h = it % H, th = omp_get_thread_num();
        const size_t off = (size_t)w * b->n;
        attn_item_bwd(b, D, hd, b->qkv + off * 3 * D, h, Rh, Rw, b->P + (size_t)it * nn, dOw + off * D,
                      dqkv + off * 3 * D, dtab + (size_t)th * 2 * tab, dtab + (size_t)th * 2 * tab + tab,
                      ws + (size_t)th * wsn, inner);
    }
    for (int t = 0; t < outer; t++) {
        add_inplace(ph->g, dtab + (size_t)t * 2 * tab, tab);
        add_inplace(pw->g, dtab + (size_t)t * 2 * tab + tab, tab);
    }
    cs_free(ws);
    cs_free(dtab);
    return CELLSAM_OK;
}

/* ------------------------------------------------------------------ forward */

static int block_fwd(cs_tvit *v, int bi, int train, int n_threads) {
    tvit_block *b = &v->blocks[bi];
    const int D = v->D, M = v->mlp;
    const size_t N = v->N;
    const float *x0 = v->xs[bi];
    float *x2 = v->xs[bi + 1];
    /* LN1 into x2 (free until the MLP writes it), then the padded window layout */
    cs_layernorm_fwd(x0, x2, (int)N, D, P_(v, b->norm1_w), P_(v, b->norm1_b), TVIT_LN_EPS, b->mean1, b->rstd1);
    win_partition(b, v->G, D, x2, b->yw);
    cs_linear_fwd(b->yw, (int)b->ntok, D, P_(v, b->qkv_w), P_(v, b->qkv_b), 3 * D, b->qkv, n_threads);
    int rc = block_attention_fwd(v, b, train, n_threads);
    if (rc) return rc;
    cs_linear_fwd(b->attn, (int)N, D, P_(v, b->proj_w), P_(v, b->proj_b), D, b->x_mid, n_threads);
    add_inplace(b->x_mid, x0, N * D);
    cs_layernorm_fwd(b->x_mid, b->y2, (int)N, D, P_(v, b->norm2_w), P_(v, b->norm2_b), TVIT_LN_EPS, b->mean2,
                     b->rstd2);
    cs_linear_fwd(b->y2, (int)N, D, P_(v, b->lin1_w), P_(v, b->lin1_b), M, b->h1, n_threads);
    cs_gelu_fwd(b->h1, v->gbuf, N * M);
    cs_linear_fwd(v->gbuf, (int)N, M, P_(v, b->lin2_w), P_(v, b->lin2_b), D, x2, n_threads);
    add_inplace(x2, b->x_mid, N * D);
    return CELLSAM_OK;
}

int cs_tvit_forward(cs_tvit *v, const float *input_chw, float *out_chw, int train, int n_threads) {
    if (v) v->train_valid = 0; /* whatever happens below, the kept activations are stale */
    if (!v || !input_chw || !out_chw) return cs_error(CELLSAM_ERR_INVALID, "cs_tvit_forward: NULL argument");
    if (n_threads < 1) n_threads = 1;
    int rc = ensure_buffers(v, train);
    if (rc) return rc;
    const int G = v->G, Pp = v->cfg.patch, S = v->cfg.img_size, K = v->K, D = v->D;
    const size_t N = v->N;
    /* patches as rows, columns (c, ky, kx) as in the conv weight */
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int py = 0; py < G; py++)
        for (int px = 0; px < G; px++) {
            float *row = v->col + ((size_t)py * G + px) * K;
            for (int c = 0; c < 3; c++)
                for (int ky = 0; ky < Pp; ky++)
                    memcpy(row + (c * Pp + ky) * Pp,
                           input_chw + ((size_t)c * S + (size_t)py * Pp + ky) * S + (size_t)px * Pp,
                           (size_t)Pp * sizeof(float));
        }
    cs_tparam pw = as_matrix(P_(v, v->patch_w), D, K);
    cs_linear_fwd(v->col, (int)N, K, &pw, P_(v, v->patch_b), D, v->xs[0], n_threads);
    add_inplace(v->xs[0], P_(v, v->pos_embed)->w, N * D);
    for (int bi = 0; bi < v->cfg.depth; bi++) {
        rc = block_fwd(v, bi, train, n_threads);
        if (rc) return rc;
    }
    const float *xt = v->xs[v->cfg.depth];
    if (v->C == 0) {
        cs_transpose(xt, out_chw, (int)N, D);
    } else {
        const int C = v->C;
        cs_tparam n0 = as_matrix(P_(v, v->neck0_w), C, D);
        cs_linear_fwd(xt, (int)N, D, &n0, NULL, C, v->z1, n_threads);
        cs_layernorm_fwd(v->z1, v->nwork, (int)N, C, P_(v, v->neck1_w), P_(v, v->neck1_b), TVIT_LN_EPS, v->nmean1,
                         v->nrstd1);
        cs_transpose(v->nwork, v->z1n_chw, (int)N, C);
        cs_conv2d_fwd(v->z1n_chw, C, G, G, P_(v, v->neck2_w), NULL, C, 3, 1, v->nwork, v->ncol, n_threads);
        cs_transpose(v->nwork, v->z3, C, (int)N);
        cs_layernorm_fwd(v->z3, v->nwork, (int)N, C, P_(v, v->neck3_w), P_(v, v->neck3_b), TVIT_LN_EPS, v->nmean3,
                         v->nrstd3);
        cs_transpose(v->nwork, out_chw, (int)N, C);
    }
    v->train_valid = train ? 1 : 0;
    return CELLSAM_OK;
}

/* ----------------------------------------------------------------- backward */

typedef struct {
    float *dy, *dmlp, *dOw, *dqkv, *dyw;
} tvit_bwd_work;

/* dx: gradient w.r.t. the block output on entry, w.r.t. the block input on return. */
static int block_bwd(cs_tvit *v, int bi, float *dx, const tvit_bwd_work *wk, int n_threads) {
    tvit_block *b = &v->blocks[bi];
    const int D = v->D, M = v->mlp;
    const size_t N = v->N;
    /* MLP branch; the GELU output is recomputed instead of kept */
    cs_gelu_fwd(b->h1, v->gbuf, N * M);
    cs_linear_bwd(v->gbuf, (int)N, M, P_(v, b->lin2_w), P_(v, b->lin2_b), D, dx, wk->dmlp, n_threads);
    cs_gelu_bwd(b->h1, wk->dmlp, v->gbuf, N * M);
    cs_linear_bwd(b->y2, (int)N, D, P_(v, b->lin1_w), P_(v, b->lin1_b), M, v->gbuf, wk->dy, n_threads);
    cs_layernorm_bwd(b->x_mid, wk->dy, (int)N, D, P_(v, b->norm2_w), P_(v, b->norm2_b), b->mean2, b->rstd2, wk->dy);
    add_inplace(dx, wk->dy, N * D);
    /* attention branch */
    cs_linear_bwd(b->attn, (int)N, D, P_(v, b->proj_w), P_(v, b->proj_b), D, dx, wk->dy, n_threads);
    int rc = block_attention_bwd(v, b, wk->dy, wk->dOw, wk->dqkv, n_threads);
    if (rc) return rc;
    cs_linear_bwd(b->yw, (int)b->ntok, D, P_(v, b->qkv_w), P_(v, b->qkv_b), 3 * D, wk->dqkv, wk->dyw, n_threads);
    /* padded tokens are constants (zeros), so their gradient is dropped here */
    win_unpartition(b, v->G, D, wk->dyw, wk->dy);
    cs_layernorm_bwd(v->xs[bi], wk->dy, (int)N, D, P_(v, b->norm1_w), P_(v, b->norm1_b), b->mean1, b->rstd1,
                     wk->dy);
    add_inplace(dx, wk->dy, N * D);
    return CELLSAM_OK;
}

int cs_tvit_backward(cs_tvit *v, const float *dout_chw, int n_threads) {
    if (!v || !dout_chw) return cs_error(CELLSAM_ERR_INVALID, "cs_tvit_backward: NULL argument");
    if (!v->train_valid)
        return cs_error(CELLSAM_ERR_INVALID, "cs_tvit_backward needs a preceding cs_tvit_forward with train=1");
    if (n_threads < 1) n_threads = 1;
    const int G = v->G, D = v->D, C = v->C;
    const size_t N = v->N;
    size_t tmax = N;
    for (int bi = 0; bi < v->cfg.depth; bi++)
        if (v->blocks[bi].ntok > tmax) tmax = v->blocks[bi].ntok;
    tvit_bwd_work wk;
    float *dx = cs_alloc(N, (size_t)D * sizeof(float));
    wk.dy = cs_alloc(N, (size_t)D * sizeof(float));
    wk.dmlp = cs_alloc(N, (size_t)v->mlp * sizeof(float));
    wk.dOw = cs_alloc(tmax, (size_t)D * sizeof(float));
    wk.dqkv = cs_alloc(tmax, (size_t)3 * D * sizeof(float));
    wk.dyw = cs_alloc(tmax, (size_t)D * sizeof(float));
    float *dz = C ? cs_alloc(N, (size_t)C * sizeof(float)) : NULL;
    float *dchw = C ? cs_alloc(N, (size_t)C * sizeof(float)) : NULL;
    int rc = CELLSAM_OK;
    if (!dx || !wk.dy || !wk.dmlp || !wk.dOw || !wk.dqkv || !wk.dyw || (C && (!dz || !dchw))) {
        rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory in the ViT backward");
        goto done;
    }
    if (C == 0) {
        cs_transpose(dout_chw, dx, D, (int)N);
    } else {
        cs_transpose(dout_chw, dz, C, (int)N);
        cs_layernorm_bwd(v->z3, dz, (int)N, C, P_(v, v->neck3_w), P_(v, v->neck3_b), v->nmean3, v->nrstd3, dz);
        cs_transpose(dz, dchw, (int)N, C);
        cs_conv2d_bwd(v->z1n_chw, C, G, G, P_(v, v->neck2_w), NULL, C, 3, 1, dchw, v->nwork, v->ncol, n_threads);
        cs_transpose(v->nwork, dz, C, (int)N);
        cs_layernorm_bwd(v->z1, dz, (int)N, C, P_(v, v->neck1_w), P_(v, v->neck1_b), v->nmean1, v->nrstd1, dz);
        cs_tparam n0 = as_matrix(P_(v, v->neck0_w), C, D);
        cs_linear_bwd(v->xs[v->cfg.depth], (int)N, D, &n0, NULL, C, dz, dx, n_threads);
    }
    for (int bi = v->cfg.depth - 1; bi >= 0; bi--) {
        rc = block_bwd(v, bi, dx, &wk, n_threads);
        if (rc) goto done;
    }
    add_inplace(P_(v, v->pos_embed)->g, dx, N * D);
    {
        cs_tparam pw = as_matrix(P_(v, v->patch_w), D, v->K);
        cs_linear_bwd(v->col, (int)N, v->K, &pw, P_(v, v->patch_b), D, dx, NULL, n_threads);
    }
done:
    cs_free(dx);
    cs_free(wk.dy);
    cs_free(wk.dmlp);
    cs_free(wk.dOw);
    cs_free(wk.dqkv);
    cs_free(wk.dyw);
    cs_free(dz);
    cs_free(dchw);
    return rc;
}
