/* Function-preserving widening of the CellFinder trunk (Net2WiderNet, Chen et al.
 * 2016): a wider detector to fine-tune that starts out computing what the narrow one
 * computed, so that training continues from a trained model instead of from scratch.
 *
 * Every widened axis holds `factor` copies of the old one (channel n is old channel
 * n mod D, head h keeps its old dimensions, each repeated), and every weight that reads
 * a widened axis is divided by `factor`:
 *  - LayerNorm over the copies sees the same mean and variance;
 *  - q.k over a head `factor` times as wide is `factor` times larger while the softmax
 *    scale shrinks by sqrt(factor), so q (and the relative-position tables, which meet
 *    the unscaled q) are multiplied by 1/sqrt(factor);
 *  - the head count stays; each head gets wider.
 * Copies receive identical gradients and would never part, so the widened matrices get
 * noise of `noise` times their RMS, which changes the function only slightly. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "train.h"
#include "weights.h"

#define TRUNK "cellfinder.decode_head.backbone.body."
#define INPUT_PROJ "cellfinder.decode_head.input_proj.0.0.weight"

typedef struct {
    int D, hd, mlp, factor;
    float noise;
    cs_rng rng;
} widen_plan;

/* Old index of new index n on each kind of axis. */
enum { AX_KEEP, AX_CHAN, AX_HEAD, AX_MLP, AX_QKV, AX_HEAD_DIM };
static int64_t old_index(const widen_plan *p, int kind, int64_t n) {
    const int64_t K = p->factor, D = p->D, hd = p->hd;
    switch (kind) {
    case AX_CHAN: return n % D;
    case AX_HEAD: return (n / (K * hd)) * hd + (n % (K * hd)) % hd;
    case AX_MLP: return n % p->mlp;
    case AX_QKV: return (n / (K * D)) * D + old_index(p, AX_HEAD, n % (K * D)); /* q | k | v */
    case AX_HEAD_DIM: return n % hd;
    default: return n;
    }
}

typedef struct {
    int kind0, kind1; /* how axis 0 and axis `ax1` widen */
    int last_axis;    /* ax1 = the last axis (pos_embed) instead of axis 1 */
    int reads_ax1;    /* ax1 is a matrix's input axis: divide by the factor */
    int64_t q_rows;   /* rows [0, q_rows) of axis 0 times 1/sqrt(factor) */
    int jitter;       /* add noise (the matrices) */
} widen_rule;

/* Size an old axis of `kind` must have; 0 for AX_KEEP (any). */
static int64_t old_size(const widen_plan *p, int kind) {
    switch (kind) {
    case AX_CHAN: case AX_HEAD: return p->D;
    case AX_MLP: return p->mlp;
    case AX_QKV: return 3 * (int64_t)p->D;
    case AX_HEAD_DIM: return p->hd;
    default: return 0;
    }
}

static int widen_tensor(widen_plan *p, cs_weights *out, const cs_tensor_entry *e, widen_rule r) {
    /* the old axes must be what the plan reads from them (a hostile file could differ) */
    const int ax1 = e->ndim < 2 ? 0 : r.last_axis ? e->ndim - 1 : 1;
    if (e->ndim < 1 || (r.kind1 != AX_KEEP && e->ndim < 2) ||
        (r.kind0 != AX_KEEP && e->shape[0] != old_size(p, r.kind0)) ||
        (r.kind1 != AX_KEEP && e->shape[ax1] != old_size(p, r.kind1)))
        return cs_error(CELLSAM_ERR_MODEL, "cannot widen %s: its shape does not fit a trunk of width %d", e->name,
                        p->D);
    int64_t shape[CS_MAX_DIMS];
    memcpy(shape, e->shape, sizeof shape);
    if (r.kind0 != AX_KEEP) shape[0] *= p->factor;
    if (ax1 && r.kind1 != AX_KEEP) shape[ax1] *= p->factor;
    /* axis 0, the axes between, axis ax1, the axes after */
    int64_t mid = 1, inner = 1;
    for (int d = 1; d < ax1; d++) mid *= e->shape[d];
    for (int d = (ax1 ? ax1 : 0) + 1; d < e->ndim; d++) inner *= e->shape[d];
    const int64_t n0 = shape[0], n1 = ax1 ? shape[ax1] : 1, o1 = ax1 ? e->shape[ax1] : 1;
    const size_t count = (size_t)(n0 * mid * n1 * inner);
    float *dst = malloc(count * sizeof *dst), *old = malloc(e->nbytes / cs_dtype_size(e->dtype) * sizeof *old);
    if (!dst || !old) {
        free(dst);
        free(old);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory widening %s", e->name);
    }
    cs_tensor_to_f32(e, old);
    const float div = r.reads_ax1 ? 1.0f / (float)p->factor : 1.0f, qs = 1.0f / sqrtf((float)p->factor);
    size_t k = 0;
    double ss = 0;
    for (int64_t a = 0; a < n0; a++) {
        const int64_t oa = old_index(p, r.kind0, a);
        const float s = (a < r.q_rows ? qs : 1.0f) * div;
        for (int64_t m = 0; m < mid; m++)
            for (int64_t b = 0; b < n1; b++) {
                const int64_t ob = ax1 ? old_index(p, r.kind1, b) : 0;
                for (int64_t c = 0; c < inner; c++) {
                    float v = old[((oa * mid + m) * o1 + ob) * inner + c] * s;
                    ss += (double)v * v;
                    dst[k++] = v;
                }
            }
    }
    free(old);
    if (r.jitter && p->noise > 0) {
        const double sigma = p->noise * sqrt(ss / (double)count);
        for (size_t i = 0; i < count; i++) dst[i] += (float)(sigma * cs_rng_normal(&p->rng));
    }
    return cs_weights_add_owned(out, e->name, CS_DTYPE_F32, e->ndim, shape, dst, count * sizeof *dst);
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

int cs_widen_trunk(const cs_weights *in, int factor, float noise, uint64_t seed, cs_weights **out) {
    *out = NULL;
    if (factor < 2 || factor > 4) return cs_error(CELLSAM_ERR_INVALID, "widening factor %d (2 to 4)", factor);
    if (!(noise >= 0 && noise <= 1)) return cs_error(CELLSAM_ERR_INVALID, "widening noise %g (0 to 1)", (double)noise);
    widen_plan p = {0};
    p.factor = factor;
    p.noise = noise;
    cs_rng_seed(&p.rng, seed);
    int64_t D = cs_weights_dim(in, TRUNK, "patch_embed.proj.bias", 0);
    int64_t hd = cs_weights_dim(in, TRUNK, "blocks.0.attn.rel_pos_h", 1);
    int64_t mlp = cs_weights_dim(in, TRUNK, "blocks.0.mlp.lin1.weight", 0);
    if (D < 1 || hd < 1 || mlp < 1 || D % hd || D * factor > 2048 || mlp * factor > 65536 ||
        cs_weights_dim(in, NULL, INPUT_PROJ, 1) != D)
        return cs_error(CELLSAM_ERR_MODEL, "no CellFinder trunk to widen (need " TRUNK "* tensors with relative "
                                           "positions, and " INPUT_PROJ ")");
    p.D = (int)D, p.hd = (int)hd, p.mlp = (int)mlp;
    cs_weights *w = cs_weights_new("safetensors");
    if (!w) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    int rc = cs_weights_copy_meta(w, in);
    /* how each kind of tensor widens (rel_pos: q's scale on every row) */
    const widen_rule chan_vec = {AX_CHAN, AX_KEEP, 0, 0, 0, 0};
    const widen_rule input_proj = {AX_KEEP, AX_CHAN, 0, 1, 0, 0};
    const widen_rule pos_embed = {AX_KEEP, AX_CHAN, 1, 0, 0, 0};
    const widen_rule patch_w = {AX_CHAN, AX_KEEP, 0, 0, 0, 1};
    const widen_rule rel_pos = {AX_KEEP, AX_HEAD_DIM, 0, 0, INT64_MAX, 0};
    const widen_rule qkv_w = {AX_QKV, AX_CHAN, 0, 1, (int64_t)factor * D, 1};
    const widen_rule qkv_b = {AX_QKV, AX_KEEP, 0, 0, (int64_t)factor * D, 0};
    const widen_rule proj_w = {AX_CHAN, AX_HEAD, 0, 1, 0, 1};
    const widen_rule lin1_w = {AX_MLP, AX_CHAN, 0, 1, 0, 1};
    const widen_rule lin1_b = {AX_MLP, AX_KEEP, 0, 0, 0, 0};
    const widen_rule lin2_w = {AX_CHAN, AX_MLP, 0, 1, 0, 1};
    size_t tl = strlen(TRUNK);
    for (size_t i = 0; !rc && i < cs_weights_count(in); i++) {
        const cs_tensor_entry *e = cs_weights_at(in, i);
        const char *n = e->name;
        if (!strcmp(n, INPUT_PROJ)) {
            rc = widen_tensor(&p, w, e, input_proj);
            continue;
        }
        if (strncmp(n, TRUNK, tl)) {
            rc = cs_weights_add_view(w, n, e->dtype, e->ndim, e->shape, e->data, e->nbytes);
            continue;
        }
        const char *t = n + tl;
        if (!strcmp(t, "pos_embed")) rc = widen_tensor(&p, w, e, pos_embed);
        else if (!strcmp(t, "patch_embed.proj.weight")) rc = widen_tensor(&p, w, e, patch_w);
        else if (!strcmp(t, "patch_embed.proj.bias") || strstr(t, ".norm1.") || strstr(t, ".norm2.") ||
                 ends_with(t, "attn.proj.bias") || ends_with(t, "mlp.lin2.bias"))
            rc = widen_tensor(&p, w, e, chan_vec);
        else if (ends_with(t, "attn.rel_pos_h") || ends_with(t, "attn.rel_pos_w")) rc = widen_tensor(&p, w, e, rel_pos);
        else if (ends_with(t, "attn.qkv.weight")) rc = widen_tensor(&p, w, e, qkv_w);
        else if (ends_with(t, "attn.qkv.bias")) rc = widen_tensor(&p, w, e, qkv_b);
        else if (ends_with(t, "attn.proj.weight")) rc = widen_tensor(&p, w, e, proj_w);
        else if (ends_with(t, "mlp.lin1.weight")) rc = widen_tensor(&p, w, e, lin1_w);
        else if (ends_with(t, "mlp.lin1.bias")) rc = widen_tensor(&p, w, e, lin1_b);
        else if (ends_with(t, "mlp.lin2.weight")) rc = widen_tensor(&p, w, e, lin2_w);
        else rc = cs_error(CELLSAM_ERR_MODEL, "cannot widen the trunk tensor %s", n);
    }
    if (!rc) rc = cs_weights_finish(w);
    if (rc) {
        cs_weights_free(w);
        return rc;
    }
    *out = w;
    return CELLSAM_OK;
}
