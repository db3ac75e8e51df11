/* CellFinder head (spec §4.5): input projection, RCDA encoder, Anchor-DETR
 * decoder with learned anchor points, class/box heads, and PostProcess.
 *
 * Layout: the feature map is kept token-major (HW x C, token t = row*W + col), so
 * every projection is one GEMM against the PyTorch (out, in) weight. RCDA never
 * materialises the (heads, tokens, W, head_dim) tensor of the reference: each
 * (head, block of queries) task forms attn_col (blk x H) . V_head (H x W*hd) in a
 * per-thread buffer and contracts it with attn_row right away (rows first, then
 * columns, as the reference's H == W branch). The decoder self-attention likewise
 * works on blocks of query rows, never on a Q x Q matrix. */
#include <math.h>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cellfinder.h"
#include "common.h"
#include "gemm_bf16.h"
#include "ops.h"

#define CF_DMODEL 256         /* pos2posemb1d/2d hard-code 256 features */
#define CF_GRID 64            /* 1024 / 16 */
#define CF_GN_GROUPS 32
#define CF_LN_EPS 1e-5f
#define CF_MAX_LAYERS 64
#define CF_MAX_QUERIES 100000 /* official 3500 */
#define CF_MAX_FFN 65536
#define CF_MAX_BACKBONE 16384
#define CF_QBLOCK 128         /* query rows per attention task */

typedef struct {
    const float *in_w, *in_b;   /* (5C, C): rows q_row, q_col, k_row, k_col, v */
    const float *out_w, *out_b; /* (C, C) */
} rcda_weights;

typedef struct {
    const float *w1, *b1, *w2, *b2; /* linear1 (F, C), linear2 (C, F) */
    const float *norm_w, *norm_b;   /* ffn.norm2 */
} ffn_weights;

typedef struct {
    rcda_weights attn;
    const float *norm1_w, *norm1_b;
    ffn_weights ffn;
} enc_layer;

typedef struct {
    const float *sa_in_w, *sa_in_b, *sa_out_w, *sa_out_b; /* nn.MultiheadAttention (3C, C) */
    const float *norm2_w, *norm2_b;                       /* after self-attention */
    rcda_weights cross;
    const float *norm1_w, *norm1_b;                       /* after cross-attention */
    ffn_weights ffn;
    const float *cls_w, *cls_b;                           /* class_embed[l] (2, C) */
    const float *box_w[3], *box_b[3];                     /* bbox_embed[l]: C->C->C->4 */
} dec_layer;

struct cs_cellfinder {
    int E, C, heads, ffn, n_enc, n_dec, n_position, n_pattern, Q, n_classes, grid;
    const float *proj_w, *proj_b; /* Conv1x1 (C, E, 1, 1) */
    const float *gn_w, *gn_b;     /* GroupNorm(32, C) */
    const float *pattern;         /* (n_pattern, C) */
    const float *position;        /* (n_position, 2) anchors (x, y) */
    const float *pos1_w[2], *pos1_b[2]; /* adapt_pos1d.{0,2} */
    const float *pos2_w[2], *pos2_b[2]; /* adapt_pos2d.{0,2} */
    enc_layer *enc;
    dec_layer *dec;
    int compute_bf16; /* bfloat16 inputs for the products (opt-in, gemm_bf16.c) */
    /* with compute_bf16: every projection matrix packed, found by its float32 pointer */
    struct packed_linear {
        const float *w32;
        cs_bf16_weights p;
    } *packed;
    int n_packed;
};

/* ------------------------------------------------------------------ bind */

static const cs_tensor_entry *peek(const cs_binder *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static const cs_tensor_entry *peek(const cs_binder *b, const char *fmt, ...) {
    char name[400], full[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    snprintf(full, sizeof full, "%s%s", b->prefix ? b->prefix : "", name);
    return cs_weights_find(b->w, full);
}

static int count_layers(const cs_binder *b, const char *kind) {
    int n = 0;
    while (n < CF_MAX_LAYERS && peek(b, "transformer.%s.%d.norm1.weight", kind, n)) n++;
    return n;
}

static void bind_rcda(cs_binder *b, rcda_weights *a, int C, const char *base) {
    a->in_w = cs_bindf(b, CS_SHAPE(5 * C, C), "%s.in_proj_weight", base);
    a->in_b = cs_bindf(b, CS_SHAPE(5 * C), "%s.in_proj_bias", base);
    a->out_w = cs_bindf(b, CS_SHAPE(C, C), "%s.out_proj.weight", base);
    a->out_b = cs_bindf(b, CS_SHAPE(C), "%s.out_proj.bias", base);
}

static void bind_ffn(cs_binder *b, ffn_weights *f, int C, int F, const char *base) {
    f->w1 = cs_bindf(b, CS_SHAPE(F, C), "%s.ffn.linear1.weight", base);
    f->b1 = cs_bindf(b, CS_SHAPE(F), "%s.ffn.linear1.bias", base);
    f->w2 = cs_bindf(b, CS_SHAPE(C, F), "%s.ffn.linear2.weight", base);
    f->b2 = cs_bindf(b, CS_SHAPE(C), "%s.ffn.linear2.bias", base);
    f->norm_w = cs_bindf(b, CS_SHAPE(C), "%s.ffn.norm2.weight", base);
    f->norm_b = cs_bindf(b, CS_SHAPE(C), "%s.ffn.norm2.bias", base);
}

int cs_cellfinder_bind(struct cs_cellfinder **out, cs_binder *b, int backbone_dim, int n_heads) {
    if (!out || !b || !b->w) return cs_error(CELLSAM_ERR_INVALID, "cellfinder bind: NULL argument");
    *out = NULL;
    const int C = CF_DMODEL;
    if (backbone_dim < 1 || backbone_dim > CF_MAX_BACKBONE)
        return cs_error(CELLSAM_ERR_INVALID, "cellfinder: backbone width %d out of range", backbone_dim);
    if (n_heads < 1 || n_heads > C || C % n_heads)
        return cs_error(CELLSAM_ERR_INVALID, "cellfinder: %d heads do not divide d_model %d", n_heads, C);
    const int problems0 = b->n_problems;
    struct cs_cellfinder *cf = calloc(1, sizeof *cf);
    if (!cf) return cs_error(CELLSAM_ERR_NOMEM, "cellfinder: out of memory");
    cf->E = backbone_dim;
    cf->C = C;
    cf->heads = n_heads;
    cf->grid = CF_GRID;
    cf->n_classes = 2;
    cf->n_enc = count_layers(b, "encoder_layers");
    cf->n_dec = count_layers(b, "decoder_layers");
    /* an absent decoder is reported through the binder (layer 0 is bound anyway) */
    int n_dec_bind = cf->n_dec ? cf->n_dec : 1;

    const cs_tensor_entry *e = peek(b, "transformer.%s.0.ffn.linear1.weight",
                                    cf->n_enc ? "encoder_layers" : "decoder_layers");
    cf->ffn = e && e->ndim == 2 && e->shape[0] > 0 && e->shape[0] <= CF_MAX_FFN ? (int)e->shape[0] : 1024;
    e = peek(b, "transformer.position.weight");
    cf->n_position = e && e->ndim == 2 && e->shape[0] > 0 && e->shape[0] <= CF_MAX_QUERIES ? (int)e->shape[0] : 1;
    e = peek(b, "transformer.pattern.weight");
    cf->n_pattern = e && e->ndim == 2 && e->shape[0] > 0 && e->shape[0] <= 64 ? (int)e->shape[0] : 1;
    if ((long long)cf->n_position * cf->n_pattern > CF_MAX_QUERIES) {
        int npos = cf->n_position, npat = cf->n_pattern;
        free(cf);
        return cs_error(CELLSAM_ERR_LIMIT, "cellfinder: %d x %d queries exceed %d", npos, npat,
                        CF_MAX_QUERIES);
    }
    cf->Q = cf->n_position * cf->n_pattern;

    cf->proj_w = cs_bindf(b, CS_SHAPE(C, cf->E, 1, 1), "input_proj.0.0.weight");
    cf->proj_b = cs_bindf(b, CS_SHAPE(C), "input_proj.0.0.bias");
    cf->gn_w = cs_bindf(b, CS_SHAPE(C), "input_proj.0.1.weight");
    cf->gn_b = cs_bindf(b, CS_SHAPE(C), "input_proj.0.1.bias");
    cf->pattern = cs_bindf(b, CS_SHAPE(cf->n_pattern, C), "transformer.pattern.weight");
    cf->position = cs_bindf(b, CS_SHAPE(cf->n_position, 2), "transformer.position.weight");
    for (int i = 0; i < 2; i++) {
        cf->pos1_w[i] = cs_bindf(b, CS_SHAPE(C, C), "transformer.adapt_pos1d.%d.weight", 2 * i);
        cf->pos1_b[i] = cs_bindf(b, CS_SHAPE(C), "transformer.adapt_pos1d.%d.bias", 2 * i);
        cf->pos2_w[i] = cs_bindf(b, CS_SHAPE(C, C), "transformer.adapt_pos2d.%d.weight", 2 * i);
        cf->pos2_b[i] = cs_bindf(b, CS_SHAPE(C), "transformer.adapt_pos2d.%d.bias", 2 * i);
    }
    cf->enc = calloc(cf->n_enc ? (size_t)cf->n_enc : 1, sizeof *cf->enc);
    cf->dec = calloc((size_t)n_dec_bind, sizeof *cf->dec);
    if (!cf->enc || !cf->dec) {
        cs_cellfinder_free(cf);
        return cs_error(CELLSAM_ERR_NOMEM, "cellfinder: out of memory");
    }
    char base[128];
    for (int l = 0; l < cf->n_enc; l++) {
        enc_layer *L = &cf->enc[l];
        snprintf(base, sizeof base, "transformer.encoder_layers.%d", l);
        char sa[160];
        snprintf(sa, sizeof sa, "%s.self_attn", base);
        bind_rcda(b, &L->attn, C, sa);
        L->norm1_w = cs_bindf(b, CS_SHAPE(C), "%s.norm1.weight", base);
        L->norm1_b = cs_bindf(b, CS_SHAPE(C), "%s.norm1.bias", base);
        bind_ffn(b, &L->ffn, C, cf->ffn, base);
    }
    for (int l = 0; l < n_dec_bind; l++) {
        dec_layer *L = &cf->dec[l];
        snprintf(base, sizeof base, "transformer.decoder_layers.%d", l);
        L->sa_in_w = cs_bindf(b, CS_SHAPE(3 * C, C), "%s.self_attn.in_proj_weight", base);
        L->sa_in_b = cs_bindf(b, CS_SHAPE(3 * C), "%s.self_attn.in_proj_bias", base);
        L->sa_out_w = cs_bindf(b, CS_SHAPE(C, C), "%s.self_attn.out_proj.weight", base);
        L->sa_out_b = cs_bindf(b, CS_SHAPE(C), "%s.self_attn.out_proj.bias", base);
        L->norm2_w = cs_bindf(b, CS_SHAPE(C), "%s.norm2.weight", base);
        L->norm2_b = cs_bindf(b, CS_SHAPE(C), "%s.norm2.bias", base);
        char ca[160];
        snprintf(ca, sizeof ca, "%s.cross_attn", base);
        bind_rcda(b, &L->cross, C, ca);
        L->norm1_w = cs_bindf(b, CS_SHAPE(C), "%s.norm1.weight", base);
        L->norm1_b = cs_bindf(b, CS_SHAPE(C), "%s.norm1.bias", base);
        bind_ffn(b, &L->ffn, C, cf->ffn, base);
        /* class_embed / bbox_embed are one shared module, stored once per layer */
        L->cls_w = cs_bindf(b, CS_SHAPE(cf->n_classes, C), "transformer.class_embed.%d.weight", l);
        L->cls_b = cs_bindf(b, CS_SHAPE(cf->n_classes), "transformer.class_embed.%d.bias", l);
        for (int k = 0; k < 3; k++) {
            int o = k == 2 ? 4 : C;
            L->box_w[k] = cs_bindf(b, CS_SHAPE(o, C), "transformer.bbox_embed.%d.layers.%d.weight", l, k);
            L->box_b[k] = cs_bindf(b, CS_SHAPE(o), "transformer.bbox_embed.%d.layers.%d.bias", l, k);
        }
    }
    if (b->n_problems != problems0) {
        int n = b->n_problems - problems0;
        cs_cellfinder_free(cf);
        return cs_error(CELLSAM_ERR_MODEL, "CellFinder head: %d missing or mis-shaped tensor%s", n,
                        n == 1 ? "" : "s");
    }
    *out = cf;
    return CELLSAM_OK;
}

static void free_packed(struct cs_cellfinder *cf) {
    for (int i = 0; i < cf->n_packed; i++) cs_bf16_weights_free(&cf->packed[i].p);
    free(cf->packed);
    cf->packed = NULL;
    cf->n_packed = 0;
}

void cs_cellfinder_free(struct cs_cellfinder *cf) {
    if (!cf) return;
    free_packed(cf);
    free(cf->enc);
    free(cf->dec);
    free(cf);
}

static int pack_linear(struct cs_cellfinder *cf, const float *w, int n, int k) {
    struct packed_linear *e = &cf->packed[cf->n_packed];
    int rc = cs_bf16_weights_pack(&e->p, w, NULL, 0, n, k, 1);
    if (rc) return rc;
    e->w32 = w;
    cf->n_packed++;
    return CELLSAM_OK;
}

int cs_cellfinder_set_compute_bf16(struct cs_cellfinder *cf, int on) {
    if (!cf) return CELLSAM_OK;
    cf->compute_bf16 = on != 0;
    if (!on || cf->packed) return CELLSAM_OK;
    const int C = cf->C, F = cf->ffn;
    const int max = 4 + cf->n_enc * 8 + cf->n_dec * 14;
    cf->packed = calloc((size_t)max, sizeof *cf->packed);
    if (!cf->packed) return cs_error(CELLSAM_ERR_NOMEM, "cellfinder: out of memory packing bf16 weights");
    int rc = CELLSAM_OK;
    for (int i = 0; i < 2 && !rc; i++) {
        rc = pack_linear(cf, cf->pos1_w[i], C, C);
        if (!rc) rc = pack_linear(cf, cf->pos2_w[i], C, C);
    }
    for (int l = 0; l < cf->n_enc && !rc; l++) {
        const enc_layer *L = &cf->enc[l];
        for (int j = 0; j < 5 && !rc; j++) rc = pack_linear(cf, L->attn.in_w + (size_t)j * C * C, C, C);
        if (!rc) rc = pack_linear(cf, L->attn.out_w, C, C);
        if (!rc) rc = pack_linear(cf, L->ffn.w1, F, C);
        if (!rc) rc = pack_linear(cf, L->ffn.w2, C, F);
    }
    for (int l = 0; l < cf->n_dec && !rc; l++) {
        const dec_layer *L = &cf->dec[l];
        for (int j = 0; j < 3 && !rc; j++) rc = pack_linear(cf, L->sa_in_w + (size_t)j * C * C, C, C);
        if (!rc) rc = pack_linear(cf, L->sa_out_w, C, C);
        for (int j = 0; j < 5 && !rc; j++) rc = pack_linear(cf, L->cross.in_w + (size_t)j * C * C, C, C);
        if (!rc) rc = pack_linear(cf, L->cross.out_w, C, C);
        if (!rc) rc = pack_linear(cf, L->ffn.w1, F, C);
        if (!rc) rc = pack_linear(cf, L->ffn.w2, C, F);
        for (int j = 0; j < 2 && !rc; j++) rc = pack_linear(cf, L->box_w[j], C, C);
    }
    if (rc) {
        free_packed(cf);
        cf->compute_bf16 = 0;
    }
    return rc;
}

void cs_cellfinder_get_dims(const struct cs_cellfinder *cf, cs_cellfinder_dims *d) {
    memset(d, 0, sizeof *d);
    if (!cf) return;
    d->backbone_dim = cf->E;
    d->d_model = cf->C;
    d->n_heads = cf->heads;
    d->enc_layers = cf->n_enc;
    d->dec_layers = cf->n_dec;
    d->ffn_dim = cf->ffn;
    d->n_queries = cf->Q;
    d->n_classes = cf->n_classes;
    d->grid = cf->grid;
}

/* ----------------------------------------------------- positional codes */

/* pos2posemb1d: 256 interleaved features, float32 as the reference computes them:
 * v = p * float(2pi); dim_t[k] = 10000^(2*floor(k/2)/256); sin for even k, cos for odd. */
static void posemb1d(float p, float *out) {
    const float v = p * (float)(2.0 * M_PI);
    for (int k = 0; k < 256; k++) {
        float dim_t = powf(10000.0f, (float)(2 * (k / 2)) / 256.0f);
        float a = v / dim_t;
        out[k] = (k & 1) ? cosf(a) : sinf(a);
    }
}

/* pos2posemb2d: 128 features of y, then 128 of x (y block first). */
static void posemb2d(float px, float py, float *out) {
    const float vx = px * (float)(2.0 * M_PI), vy = py * (float)(2.0 * M_PI);
    for (int k = 0; k < 128; k++) {
        float dim_t = powf(10000.0f, (float)(2 * (k / 2)) / 128.0f);
        float ay = vy / dim_t, ax = vx / dim_t;
        out[k] = (k & 1) ? cosf(ay) : sinf(ay);
        out[128 + k] = (k & 1) ? cosf(ax) : sinf(ax);
    }
}

typedef struct cf_work cf_work;

/* Y = X W^T + b: through the packed bfloat16 copy of W when the head computes in
 * bfloat16 and has one (the small class and box outputs do not), else float32. */
static void head_linear(const cf_work *w, const float *X, int M, int K, const float *W, const float *bias, int N,
                        float *Y);

/* Two-layer MLP with ReLU (adapt_pos1d / adapt_pos2d): Y = W2 relu(W1 X + b1) + b2.
 * tmp holds rows x C floats. */
static void adapt_pos(const cf_work *cw, const float *const w[2], const float *const bias[2], const float *X,
                      int rows, int C, float *tmp, float *Y) {
    head_linear(cw, X, rows, C, w[0], bias[0], C, tmp);
    cs_relu(tmp, (size_t)rows * C);
    head_linear(cw, tmp, rows, C, w[1], bias[1], C, Y);
}

static float inverse_sigmoid(float x) {
    x = x < 0.f ? 0.f : x > 1.f ? 1.f : x;
    float x1 = x < 1e-5f ? 1e-5f : x;
    float x2 = 1.0f - x;
    x2 = x2 < 1e-5f ? 1e-5f : x2;
    return logf(x1 / x2);
}

/* ------------------------------------------------------------ attention */

/* Opt-in bfloat16 attention: per-head operands packed for cs_bf16_linear. */
typedef struct {
    uint16_t *buf;         /* heads x per_head values */
    size_t per_head;
    cs_bf16_weights *w;    /* 2 x heads views into buf */
} bf16_pack;

/* RCDA core for Nq queries over an H x W map, all rows `C` floats apart:
 * q_r, q_c (Nq, C) projected and scaled; k_r (W, C) = row-mean keys per column,
 * k_c (H, C) = column-mean keys per row; vpack (heads, H, W*hd) values per head.
 * out (Nq, C): heads concatenated head-major. scratch: nt * rcda_scratch() floats. */
static size_t rcda_scratch(int H, int W, int hd) {
    return (size_t)CF_QBLOCK * ((size_t)W + H + (size_t)W * hd);
}

static void rcda_attend(int Nq, int C, int heads, int H, int W, const float *q_r, const float *q_c,
                        const float *k_r, const float *k_c, const float *vpack, float *out,
                        float *scratch, bf16_pack *bp, int nt) {
    const int hd = C / heads;
    const int nblk = (Nq + CF_QBLOCK - 1) / CF_QBLOCK;
    const int tasks = nblk * heads;
    const size_t per = rcda_scratch(H, W, hd);
    const int WH = W * hd;
    if (bp) /* the (H x W*hd) values of each head, transposed, for T = a_c v */
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int h = 0; h < heads; h++)
            cs_bf16_pack_strided(&bp->w[h], bp->buf + (size_t)h * bp->per_head, vpack + (size_t)h * H * WH, 1,
                                 (size_t)WH, WH, H);
#pragma omp parallel num_threads(nt)
    {
        /* keep OpenBLAS on this thread also in a team of one (it follows
         * omp_get_max_threads() outside active parallel regions) */
        omp_set_num_threads(1);
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++) {
            const int h = task % heads, q0 = (task / heads) * CF_QBLOCK;
            const int nq = Nq - q0 < CF_QBLOCK ? Nq - q0 : CF_QBLOCK;
            float *ar = scratch + (size_t)omp_get_thread_num() * per;
            float *ac = ar + (size_t)CF_QBLOCK * W;
            float *T = ac + (size_t)CF_QBLOCK * H;
            /* attention over columns (row keys) and over rows (column keys) */
            cs_gemm(nq, W, hd, q_r + (size_t)q0 * C + h * hd, C, k_r + h * hd, C, 1, 0.f, ar, W, 1);
            cs_gemm(nq, H, hd, q_c + (size_t)q0 * C + h * hd, C, k_c + h * hd, C, 1, 0.f, ac, H, 1);
            for (int i = 0; i < nq; i++) {
                cs_softmax_row(ar + (size_t)i * W, W);
                cs_softmax_row(ac + (size_t)i * H, H);
            }
            /* inner sum over rows: T[q, j, :] = sum_i a_c[q, i] v[i, j, :] */
            if (bp) cs_bf16_linear(ac, nq, H, &bp->w[h], NULL, 0, T, WH, 1);
            else cs_gemm(nq, WH, H, ac, H, vpack + (size_t)h * H * WH, WH, 0, 0.f, T, WH, 1);
            /* then over columns: out[q, :] = sum_j a_r[q, j] T[q, j, :] */
            for (int i = 0; i < nq; i++) {
                float *o = out + (size_t)(q0 + i) * C + h * hd;
                const float *a = ar + (size_t)i * W;
                const float *t = T + (size_t)i * WH;
                for (int d = 0; d < hd; d++) o[d] = 0.f;
                for (int j = 0; j < W; j++) {
                    const float aj = a[j];
                    const float *tj = t + (size_t)j * hd;
                    for (int d = 0; d < hd; d++) o[d] += aj * tj[d];
                }
            }
        }
    }
}

/* Standard multi-head attention (decoder self-attention): q (already scaled), k, v
 * (N, C); out (N, C). scratch: nt * CF_QBLOCK * N floats. */
static void mha_attend(int N, int C, int heads, const float *q, const float *k, const float *v,
                       float *out, float *scratch, bf16_pack *bp, int nt) {
    const int hd = C / heads;
    const int nblk = (N + CF_QBLOCK - 1) / CF_QBLOCK;
    const int tasks = nblk * heads;
    const size_t per = (size_t)CF_QBLOCK * N;
    if (bp) /* keys (N x hd) and transposed values (hd x N) of each head */
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int h = 0; h < heads; h++) {
            uint16_t *kb = bp->buf + (size_t)h * bp->per_head;
            cs_bf16_pack_strided(&bp->w[h], kb, k + h * hd, (size_t)C, 1, N, hd);
            cs_bf16_pack_strided(&bp->w[heads + h], kb + cs_bf16_packed_count(N, hd), v + h * hd, 1, (size_t)C, hd,
                                 N);
        }
#pragma omp parallel num_threads(nt)
    {
        omp_set_num_threads(1); /* single-threaded BLAS inside, see rcda_attend */
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++) {
            const int h = task % heads, q0 = (task / heads) * CF_QBLOCK;
            const int nq = N - q0 < CF_QBLOCK ? N - q0 : CF_QBLOCK;
            float *s = scratch + (size_t)omp_get_thread_num() * per;
            if (bp) cs_bf16_linear(q + (size_t)q0 * C + h * hd, nq, C, &bp->w[h], NULL, 0, s, N, 1);
            else cs_gemm(nq, N, hd, q + (size_t)q0 * C + h * hd, C, k + h * hd, C, 1, 0.f, s, N, 1);
            for (int i = 0; i < nq; i++) cs_softmax_row(s + (size_t)i * N, N);
            if (bp) cs_bf16_linear(s, nq, N, &bp->w[heads + h], NULL, 0, out + (size_t)q0 * C + h * hd, C, 1);
            else cs_gemm(nq, hd, N, s, N, v + h * hd, C, 0, 0.f, out + (size_t)q0 * C + h * hd, C, 1);
        }
    }
}

/* ------------------------------------------------------------- forward */

struct cf_work {
    int HW, Q, C, F, heads, hd, H, W, nt;
    float *S;        /* (HW, C) feature map / encoder memory */
    float *Xr, *Xc;  /* (HW, C) S + row/col positional codes */
    float *A, *B;    /* (HW, C) projections / attention output */
    float *Vp;       /* (HW, C) values packed per head */
    float *hid;      /* (max(HW,Q), max(F,C)) FFN hidden */
    float *kr, *kc;  /* (W, C), (H, C) averaged keys */
    float *pos1;     /* (G, C) adapt_pos1d(pos2posemb1d((g+0.5)/G)) */
    float *tgt, *qpos, *qx, *qy; /* (Q, C) */
    float *qa, *qb, *qv, *qo;    /* (Q, C) */
    float *ref_is;   /* (Q, 2) inverse_sigmoid(anchors) */
    float *headbuf;  /* (Q, C) bbox MLP hidden */
    float *scratch;  /* attention scratch, nt slices */
    const struct cs_cellfinder *cf;
    bf16_pack pack;  /* bfloat16 attention operands (compute_bf16 only) */
    bf16_pack *bp;   /* &pack or NULL */
};

static void head_linear(const cf_work *w, const float *X, int M, int K, const float *W, const float *bias, int N,
                        float *Y) {
    const struct cs_cellfinder *cf = w->cf;
    for (int i = 0; cf->compute_bf16 && i < cf->n_packed; i++)
        if (cf->packed[i].w32 == W) {
            if (cs_bf16_linear(X, M, K, &cf->packed[i].p, bias, 0, Y, N, w->nt) == CELLSAM_OK) return;
            break; /* out of memory for its small buffers: float32 still works */
        }
    cs_linear(X, M, K, W, bias, N, Y, w->nt);
}

static void work_free(cf_work *w) {
    float **all[] = {&w->S,   &w->Xr,  &w->Xc,   &w->A,  &w->B,  &w->Vp, &w->hid, &w->kr,
                     &w->kc,  &w->pos1, &w->tgt, &w->qpos, &w->qx, &w->qy, &w->qa,  &w->qb,
                     &w->qv,  &w->qo,  &w->ref_is, &w->headbuf, &w->scratch};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        cs_free(*all[i]);
        *all[i] = NULL;
    }
    cs_free(w->pack.buf);
    free(w->pack.w);
    memset(&w->pack, 0, sizeof w->pack);
    w->bp = NULL;
}

static int work_alloc(cf_work *w, const struct cs_cellfinder *cf, int nt) {
    memset(w, 0, sizeof *w);
    w->cf = cf;
    w->H = w->W = cf->grid;
    w->HW = cf->grid * cf->grid;
    w->Q = cf->Q;
    w->C = cf->C;
    w->F = cf->ffn;
    w->heads = cf->heads;
    w->hd = cf->C / cf->heads;
    w->nt = nt;
    const size_t C = (size_t)w->C, HW = (size_t)w->HW, Q = (size_t)w->Q;
    const size_t rows = HW > Q ? HW : Q, hidw = (size_t)(w->F > w->C ? w->F : w->C);
    size_t hid_n, s1 = rcda_scratch(w->H, w->W, w->hd), s2 = (size_t)CF_QBLOCK * Q, scr_n;
    if (cs_mul_size(rows, hidw, &hid_n) || cs_mul_size(s1 > s2 ? s1 : s2, (size_t)nt, &scr_n))
        return cs_error(CELLSAM_ERR_LIMIT, "cellfinder: workspace size overflows");
    w->S = cs_alloc(HW, C * sizeof(float));
    w->Xr = cs_alloc(HW, C * sizeof(float));
    w->Xc = cs_alloc(HW, C * sizeof(float));
    w->A = cs_alloc(rows, C * sizeof(float));
    w->B = cs_alloc(rows, C * sizeof(float));
    w->Vp = cs_alloc(HW, C * sizeof(float));
    w->hid = cs_alloc(hid_n, sizeof(float));
    w->kr = cs_alloc((size_t)w->W, C * sizeof(float));
    w->kc = cs_alloc((size_t)w->H, C * sizeof(float));
    w->pos1 = cs_alloc((size_t)cf->grid, C * sizeof(float));
    w->tgt = cs_alloc(Q, C * sizeof(float));
    w->qpos = cs_alloc(Q, C * sizeof(float));
    w->qx = cs_alloc(Q, C * sizeof(float));
    w->qy = cs_alloc(Q, C * sizeof(float));
    w->qa = cs_alloc(Q, C * sizeof(float));
    w->qb = cs_alloc(Q, C * sizeof(float));
    w->qv = cs_alloc(Q, C * sizeof(float));
    w->qo = cs_alloc(Q, C * sizeof(float));
    w->ref_is = cs_alloc(Q, 2 * sizeof(float));
    w->headbuf = cs_alloc(Q, C * sizeof(float));
    w->scratch = cs_alloc(scr_n, sizeof(float));
    if (!w->S || !w->Xr || !w->Xc || !w->A || !w->B || !w->Vp || !w->hid || !w->kr || !w->kc ||
        !w->pos1 || !w->tgt || !w->qpos || !w->qx || !w->qy || !w->qa || !w->qb || !w->qv || !w->qo ||
        !w->ref_is || !w->headbuf || !w->scratch) {
        work_free(w);
        return cs_error(CELLSAM_ERR_NOMEM, "cellfinder: out of memory for the workspace");
    }
    if (cf->compute_bf16) {
        /* per head: the self-attention's keys and values, or RCDA's values */
        const size_t mha = cs_bf16_packed_count(w->Q, w->hd) + cs_bf16_packed_count(w->hd, w->Q);
        const size_t rcda = cs_bf16_packed_count(w->W * w->hd, w->H);
        w->pack.per_head = mha > rcda ? mha : rcda;
        w->pack.buf = cs_alloc((size_t)w->heads, w->pack.per_head * sizeof(uint16_t));
        w->pack.w = calloc((size_t)2 * w->heads, sizeof *w->pack.w);
        if (!w->pack.buf || !w->pack.w) {
            work_free(w);
            return cs_error(CELLSAM_ERR_NOMEM, "cellfinder: out of memory for the workspace");
        }
        w->bp = &w->pack;
    }
    return CELLSAM_OK;
}

/* Conv1x1 + GroupNorm(32) on the channel-first map; result token-major in w->S. */
static void input_proj(const struct cs_cellfinder *cf, cf_work *w, const float *feat, float *dbg) {
    const int C = w->C, HW = w->HW, E = cf->E;
    float *P = w->A; /* (C, HW) channel-first */
    for (int c = 0; c < C; c++) {
        float *row = P + (size_t)c * HW;
        for (int t = 0; t < HW; t++) row[t] = cf->proj_b[c];
    }
    cs_gemm(C, HW, E, cf->proj_w, E, feat, HW, 0, 1.0f, P, HW, w->nt);
    const int cpg = C / CF_GN_GROUPS;
#pragma omp parallel for num_threads(w->nt) schedule(static)
    for (int g = 0; g < CF_GN_GROUPS; g++) {
        float *x = P + (size_t)g * cpg * HW;
        const size_t n = (size_t)cpg * HW;
        double s = 0.0;
        for (size_t i = 0; i < n; i++) s += x[i];
        const double mean = s / (double)n;
        double v = 0.0;
        for (size_t i = 0; i < n; i++) {
            double d = x[i] - mean;
            v += d * d;
        }
        const float rstd = (float)(1.0 / sqrt(v / (double)n + (double)CF_LN_EPS));
        for (int c = g * cpg; c < (g + 1) * cpg; c++) {
            /* y = x * scale + shift with scale = rstd * gamma, as PyTorch's kernel */
            const float scale = rstd * cf->gn_w[c];
            const float shift = -scale * (float)mean + cf->gn_b[c];
            float *row = P + (size_t)c * HW;
            for (int t = 0; t < HW; t++) row[t] = row[t] * scale + shift;
        }
    }
    if (dbg) memcpy(dbg, P, (size_t)C * HW * sizeof(float));
    cs_transpose(P, w->S, C, HW);
}

/* Xr = S + pos1[col], Xc = S + pos1[row] */
static void add_map_pos(cf_work *w) {
    const int C = w->C, W = w->W, H = w->H;
#pragma omp parallel for num_threads(w->nt) schedule(static)
    for (int i = 0; i < H; i++)
        for (int j = 0; j < W; j++) {
            const size_t t = ((size_t)i * W + j) * C;
            const float *pr = w->pos1 + (size_t)j * C, *pc = w->pos1 + (size_t)i * C;
            for (int c = 0; c < C; c++) {
                w->Xr[t + c] = w->S[t + c] + pr[c];
                w->Xc[t + c] = w->S[t + c] + pc[c];
            }
        }
}

/* Key/value side of an RCDA layer from the map inputs (Xr, Xc, S):
 * k_r[j] = mean_i (W_kr Xr[i,j] + b), k_c[i] = mean_j (W_kc Xc[i,j] + b) (projection
 * first, then the mean), values packed per head as (H, W*hd). Uses w->B as temp. */
static void rcda_keys_values(const rcda_weights *a, cf_work *w) {
    const int C = w->C, H = w->H, W = w->W, HW = w->HW, hd = w->hd;
    float *T = w->B;
    head_linear(w, w->Xr, HW, C, a->in_w + (size_t)2 * C * C, a->in_b + 2 * C, C, T);
    for (int j = 0; j < W; j++)
        for (int c = 0; c < C; c++) {
            double s = 0.0;
            for (int i = 0; i < H; i++) s += T[((size_t)i * W + j) * C + c];
            w->kr[(size_t)j * C + c] = (float)(s / H);
        }
    head_linear(w, w->Xc, HW, C, a->in_w + (size_t)3 * C * C, a->in_b + 3 * C, C, T);
    for (int i = 0; i < H; i++)
        for (int c = 0; c < C; c++) {
            double s = 0.0;
            for (int j = 0; j < W; j++) s += T[((size_t)i * W + j) * C + c];
            w->kc[(size_t)i * C + c] = (float)(s / W);
        }
    head_linear(w, w->S, HW, C, a->in_w + (size_t)4 * C * C, a->in_b + 4 * C, C, T);
    /* Vp[h][i][j*hd + d] = v[(i*W + j), h*hd + d] */
    for (int h = 0; h < w->heads; h++)
        for (int i = 0; i < H; i++)
            for (int j = 0; j < W; j++)
                memcpy(w->Vp + ((size_t)h * H + i) * W * hd + (size_t)j * hd,
                       T + ((size_t)i * W + j) * C + (size_t)h * hd, (size_t)hd * sizeof(float));
}

static void scale_inplace(float *x, size_t n, float s) {
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

/* x = LayerNorm(x + y) */
static void add_norm(float *x, const float *y, int rows, int C, const float *g, const float *b, int nt) {
    cs_add(x, y, (size_t)rows * C);
    cs_layernorm(x, x, rows, C, g, b, CF_LN_EPS, nt);
}

/* x = LN(x + W2 relu(W1 x + b1) + b2) */
static void ffn_block(const cf_work *w, const ffn_weights *f, float *x, int rows, int C, int F, float *hid,
                      float *tmp) {
    head_linear(w, x, rows, C, f->w1, f->b1, F, hid);
    cs_relu(hid, (size_t)rows * F);
    head_linear(w, hid, rows, F, f->w2, f->b2, C, tmp);
    add_norm(x, tmp, rows, C, f->norm_w, f->norm_b, w->nt);
}

static void encoder_layer(const enc_layer *L, cf_work *w) {
    const int C = w->C, HW = w->HW;
    const float s = powf((float)w->hd, -0.5f);
    add_map_pos(w);
    rcda_keys_values(&L->attn, w);
    /* queries: q_row from Xr, q_col from Xc, scaled before the products */
    float *qr = w->A, *qc = w->B;
    head_linear(w, w->Xr, HW, C, L->attn.in_w, L->attn.in_b, C, qr);
    scale_inplace(qr, (size_t)HW * C, s);
    head_linear(w, w->Xc, HW, C, L->attn.in_w + (size_t)C * C, L->attn.in_b + C, C, qc);
    scale_inplace(qc, (size_t)HW * C, s);
    float *o = w->Xr; /* Xr/Xc are no longer needed */
    rcda_attend(HW, C, w->heads, w->H, w->W, qr, qc, w->kr, w->kc, w->Vp, o, w->scratch, w->bp, w->nt);
    head_linear(w, o, HW, C, L->attn.out_w, L->attn.out_b, C, w->A);
    add_norm(w->S, w->A, HW, C, L->norm1_w, L->norm1_b, w->nt);
    ffn_block(w, &L->ffn, w->S, HW, C, w->F, w->hid, w->A);
}

/* Class and box heads of decoder layer l on tgt. */
static void heads_out(const dec_layer *L, cf_work *w, float *logits, float *boxes) {
    const int Q = w->Q, C = w->C;
    head_linear(w, w->tgt, Q, C, L->cls_w, L->cls_b, 2, logits);
    head_linear(w, w->tgt, Q, C, L->box_w[0], L->box_b[0], C, w->headbuf);
    cs_relu(w->headbuf, (size_t)Q * C);
    head_linear(w, w->headbuf, Q, C, L->box_w[1], L->box_b[1], C, w->qo);
    cs_relu(w->qo, (size_t)Q * C);
    head_linear(w, w->qo, Q, C, L->box_w[2], L->box_b[2], 4, boxes);
    for (int q = 0; q < Q; q++) {
        float *b = boxes + (size_t)q * 4;
        b[0] += w->ref_is[2 * q];
        b[1] += w->ref_is[2 * q + 1];
        for (int k = 0; k < 4; k++) b[k] = cs_sigmoidf(b[k]);
    }
}

static void decoder_layer(const dec_layer *L, cf_work *w) {
    const int C = w->C, Q = w->Q;
    const size_t QC = (size_t)Q * C;
    /* a. self-attention: q = k = tgt + qpos, v = tgt; q / sqrt(hd) as nn.MultiheadAttention */
    for (size_t i = 0; i < QC; i++) w->qo[i] = w->tgt[i] + w->qpos[i];
    head_linear(w, w->qo, Q, C, L->sa_in_w, L->sa_in_b, C, w->qa);
    head_linear(w, w->qo, Q, C, L->sa_in_w + (size_t)C * C, L->sa_in_b + C, C, w->qb);
    head_linear(w, w->tgt, Q, C, L->sa_in_w + (size_t)2 * C * C, L->sa_in_b + 2 * C, C, w->qv);
    const float sq = sqrtf((float)w->hd);
    for (size_t i = 0; i < QC; i++) w->qa[i] /= sq;
    mha_attend(Q, C, w->heads, w->qa, w->qb, w->qv, w->qo, w->scratch, w->bp, w->nt);
    head_linear(w, w->qo, Q, C, L->sa_out_w, L->sa_out_b, C, w->qa);
    add_norm(w->tgt, w->qa, Q, C, L->norm2_w, L->norm2_b, w->nt);

    /* b. cross RCDA: Q_row = tgt + qx, Q_col = tgt + qy over the encoder memory */
    const float s = powf((float)w->hd, -0.5f);
    rcda_keys_values(&L->cross, w);
    for (size_t i = 0; i < QC; i++) w->qo[i] = w->tgt[i] + w->qx[i];
    head_linear(w, w->qo, Q, C, L->cross.in_w, L->cross.in_b, C, w->qa);
    scale_inplace(w->qa, QC, s);
    for (size_t i = 0; i < QC; i++) w->qo[i] = w->tgt[i] + w->qy[i];
    head_linear(w, w->qo, Q, C, L->cross.in_w + (size_t)C * C, L->cross.in_b + C, C, w->qb);
    scale_inplace(w->qb, QC, s);
    rcda_attend(Q, C, w->heads, w->H, w->W, w->qa, w->qb, w->kr, w->kc, w->Vp, w->qo, w->scratch, w->bp,
                w->nt);
    head_linear(w, w->qo, Q, C, L->cross.out_w, L->cross.out_b, C, w->qa);
    add_norm(w->tgt, w->qa, Q, C, L->norm1_w, L->norm1_b, w->nt);

    /* c. FFN */
    ffn_block(w, &L->ffn, w->tgt, Q, C, w->F, w->hid, w->qa);
}

/* Per-query constants shared by every decoder layer, and the initial targets. */
static void query_setup(const struct cs_cellfinder *cf, cf_work *w) {
    const int C = w->C, Q = w->Q;
    float *emb = w->qa, *tmp = w->qb;
    for (int q = 0; q < Q; q++) {
        const float *r = cf->position + 2 * (size_t)(q % cf->n_position);
        posemb2d(r[0], r[1], emb + (size_t)q * C);
        w->ref_is[2 * q] = inverse_sigmoid(r[0]);
        w->ref_is[2 * q + 1] = inverse_sigmoid(r[1]);
        memcpy(w->tgt + (size_t)q * C, cf->pattern + (size_t)(q / cf->n_position) * C,
               (size_t)C * sizeof(float));
    }
    adapt_pos(w, cf->pos2_w, cf->pos2_b, emb, Q, C, tmp, w->qpos);
    for (int q = 0; q < Q; q++) posemb1d(cf->position[2 * (size_t)(q % cf->n_position)], emb + (size_t)q * C);
    adapt_pos(w, cf->pos1_w, cf->pos1_b, emb, Q, C, tmp, w->qx);
    for (int q = 0; q < Q; q++)
        posemb1d(cf->position[2 * (size_t)(q % cf->n_position) + 1], emb + (size_t)q * C);
    adapt_pos(w, cf->pos1_w, cf->pos1_b, emb, Q, C, tmp, w->qy);
}

static int forward_impl(const struct cs_cellfinder *cf, const float *features_chw, float *logits,
                        float *boxes, float *aux_logits_all, float *aux_boxes_all,
                        const cs_cellfinder_debug *dbg, int nt) {
    cf_work w;
    int rc = work_alloc(&w, cf, nt);
    if (rc) return rc;
    const int C = w.C, G = cf->grid, Q = w.Q;

    input_proj(cf, &w, features_chw, dbg ? dbg->input_proj_chw : NULL);

    /* 1-D codes of the cell centres (j + 0.5)/G, shared by rows and columns (H == W) */
    for (int g = 0; g < G; g++) posemb1d(((float)(g + 1) - 0.5f) / (float)G, w.A + (size_t)g * C);
    adapt_pos(&w, cf->pos1_w, cf->pos1_b, w.A, G, C, w.B, w.pos1);

    for (int l = 0; l < cf->n_enc; l++) encoder_layer(&cf->enc[l], &w);
    if (dbg && dbg->memory_chw) cs_transpose(w.S, dbg->memory_chw, w.HW, C);

    query_setup(cf, &w);
    add_map_pos(&w); /* decoder keys: memory + positional codes, the same for every layer */
    for (int l = 0; l < cf->n_dec; l++) {
        decoder_layer(&cf->dec[l], &w);
        /* heads only where an output needs them; logits/boxes double as the
         * per-layer buffer and end up holding the last layer */
        if (l < cf->n_dec - 1 && !aux_logits_all && !aux_boxes_all) continue;
        heads_out(&cf->dec[l], &w, logits, boxes);
        if (aux_logits_all)
            memcpy(aux_logits_all + (size_t)l * Q * 2, logits, (size_t)Q * 2 * sizeof(float));
        if (aux_boxes_all)
            memcpy(aux_boxes_all + (size_t)l * Q * 4, boxes, (size_t)Q * 4 * sizeof(float));
    }
    work_free(&w);
    return CELLSAM_OK;
}

int cs_cellfinder_forward_debug(const struct cs_cellfinder *cf, const float *features_chw,
                                float *logits, float *boxes, float *aux_logits_all,
                                float *aux_boxes_all, const cs_cellfinder_debug *dbg, int n_threads) {
    if (!cf || !features_chw || !logits || !boxes)
        return cs_error(CELLSAM_ERR_INVALID, "cellfinder forward: NULL argument");
    if (cf->n_dec < 1) return cs_error(CELLSAM_ERR_MODEL, "cellfinder: no decoder layers");
    const int nt = n_threads < 1 ? 1 : n_threads;
    if (nt > 1) return forward_impl(cf, features_chw, logits, boxes, aux_logits_all, aux_boxes_all, dbg, nt);
    /* One thread asked for: OpenBLAS (OpenMP build) follows omp_get_max_threads()
     * outside active parallel regions, so cap that ICV inside a team of one; the
     * setting ends with the region and never reaches the caller. */
    int rc = CELLSAM_OK;
#pragma omp parallel num_threads(1)
    {
        omp_set_num_threads(1);
        rc = forward_impl(cf, features_chw, logits, boxes, aux_logits_all, aux_boxes_all, dbg, 1);
    }
    return rc;
}

int cs_cellfinder_forward(const struct cs_cellfinder *cf, const float *features_chw, float *logits,
                          float *boxes, float *aux_logits_all, float *aux_boxes_all, int n_threads) {
    return cs_cellfinder_forward_debug(cf, features_chw, logits, boxes, aux_logits_all, aux_boxes_all,
                                       NULL, n_threads);
}

/* --------------------------------------------------------- PostProcess */

typedef struct {
    float v;
    int i;
} score_idx;

/* Descending by value, NaN first (torch.topk treats NaN as largest), ties by index. */
static int cmp_desc(const void *pa, const void *pb) {
    const score_idx *a = pa, *b = pb;
    int na = isnan(a->v), nb = isnan(b->v);
    if (na != nb) return na ? -1 : 1;
    if (!na && a->v != b->v) return a->v > b->v ? -1 : 1;
    return (a->i > b->i) - (a->i < b->i);
}

int cs_cellfinder_postprocess(const float *logits, const float *boxes, int Q, float *scores_sorted,
                              int *query_index, float *boxes_xyxy_1024) {
    if (!logits || !boxes || !scores_sorted || !query_index || !boxes_xyxy_1024)
        return cs_error(CELLSAM_ERR_INVALID, "postprocess: NULL argument");
    if (Q < 1 || Q > CF_MAX_QUERIES)
        return cs_error(CELLSAM_ERR_INVALID, "postprocess: %d queries (1..%d)", Q, CF_MAX_QUERIES);
    const int n = 2 * Q;
    score_idx *s = malloc((size_t)n * sizeof *s);
    if (!s) return cs_error(CELLSAM_ERR_NOMEM, "postprocess: out of memory");
    for (int i = 0; i < n; i++) {
        s[i].v = cs_sigmoidf(logits[i]);
        s[i].i = i;
    }
    qsort(s, (size_t)n, sizeof *s, cmp_desc);
    for (int r = 0; r < Q; r++) {
        const int q = s[r].i / 2;
        scores_sorted[r] = s[r].v;
        query_index[r] = q;
        const float *b = boxes + (size_t)q * 4;
        const float cx = b[0], cy = b[1], hw = 0.5f * b[2], hh = 0.5f * b[3];
        float *o = boxes_xyxy_1024 + (size_t)r * 4;
        o[0] = (cx - hw) * 1024.0f;
        o[1] = (cy - hh) * 1024.0f;
        o[2] = (cx + hw) * 1024.0f;
        o[3] = (cy + hh) * 1024.0f;
    }
    free(s);
    return CELLSAM_OK;
}
