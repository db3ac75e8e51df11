/* Model loading: detect the checkpoint layout, infer hyper-parameters from tensor
 * shapes, bind and shape-check every tensor, and the engine API (encode/decode). */
#include <jansson.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cellfinder.h"
#include "common.h"
#include "model.h"
#include "ops.h"

cellsam_model_params cellsam_model_default_params(void) {
    cellsam_model_params p;
    memset(&p, 0, sizeof p);
    p.weights_dtype = CELLSAM_DTYPE_F32;
    p.compute_dtype = CELLSAM_DTYPE_F32;
    p.load_detector = 1;
    return p;
}

cellsam_prompt cellsam_default_prompt(void) {
    cellsam_prompt p;
    memset(&p, 0, sizeof p);
    p.n_threads = 1;
    return p;
}

static int count_indexed(const cs_weights *w, const char *fmt_prefix, const char *suffix) {
    int n = 0;
    char name[512];
    for (;;) {
        snprintf(name, sizeof name, "%s%d%s", fmt_prefix, n, suffix);
        if (!cs_weights_find(w, name)) return n;
        n++;
        if (n > 1024) return n;
    }
}

typedef struct {
    int vit_heads, dec_heads, det_heads;
} hparams_override;

static int read_config(const char *path, hparams_override *ho) {
    json_error_t err;
    json_t *root = json_load_file(path, 0, &err);
    if (!root) return cs_error(CELLSAM_ERR_FORMAT, "config %s: %s (line %d)", path, err.text, err.line);
    int rc = CELLSAM_OK;
    struct {
        const char *section, *key;
        int *dst;
    } fields[] = {
        {"image_encoder", "num_heads", &ho->vit_heads},
        {"mask_decoder", "twoway_num_heads", &ho->dec_heads},
        {"detector", "nheads", &ho->det_heads},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        json_t *sec = json_object_get(root, fields[i].section);
        if (!sec) continue;
        json_t *v = json_object_get(sec, fields[i].key);
        if (!v) continue;
        if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 256) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "config %s: %s.%s must be a positive integer", path,
                          fields[i].section, fields[i].key);
            break;
        }
        *fields[i].dst = (int)json_integer_value(v);
    }
    json_decref(root);
    return rc;
}

/* Bind a ViT (trunk, plus neck when out_chans > 0) under the binder's prefix. */
static int bind_vit(cs_binder *b, const char *pfx, cs_vit *v, int heads, int with_neck, int weights16) {
    const cs_weights *w = b->w;
    char p[160];
    snprintf(p, sizeof p, "%s", pfx);
    memset(v, 0, sizeof *v);
    int64_t D = cs_weights_dim(w, p, "patch_embed.proj.weight", 0);
    int64_t patch = cs_weights_dim(w, p, "patch_embed.proj.weight", 2);
    int64_t grid = cs_weights_dim(w, p, "pos_embed", 1);
    char bp[200];
    snprintf(bp, sizeof bp, "%sblocks.", p);
    int depth = count_indexed(w, bp, ".norm1.weight");
    int64_t mlp = cs_weights_dim(w, p, "blocks.0.mlp.lin1.weight", 0);
    if (D <= 0 || patch <= 0 || grid <= 0 || depth <= 0 || mlp <= 0) {
        b->prefix = p;
        cs_bindf(b, CS_SHAPE(-1, 3, -1, -1), "patch_embed.proj.weight");
        cs_bindf(b, CS_SHAPE(1, -1, -1, -1), "pos_embed");
        cs_bindf(b, CS_SHAPE(-1), "blocks.0.norm1.weight");
        cs_bindf(b, CS_SHAPE(-1, -1), "blocks.0.mlp.lin1.weight");
        return CELLSAM_ERR_MODEL;
    }
    if (D > 8192 || patch > 64 || grid > 256 || depth > 256 || mlp > 65536 || heads < 1 || D % heads)
        return cs_error(CELLSAM_ERR_MODEL, "%simage encoder: implausible shape (dim %lld, %d heads)",
                        p, (long long)D, heads);
    v->dim = (int)D;
    v->patch = (int)patch;
    v->grid = (int)grid;
    v->img_size = (int)(grid * patch);
    v->depth = depth;
    v->heads = heads;
    v->mlp = (int)mlp;
    v->weights16 = weights16;
    v->blocks = calloc((size_t)depth, sizeof *v->blocks);
    if (!v->blocks) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    b->prefix = p;
    int64_t hd = D / heads;
    v->patch_w = cs_bindf(b, CS_SHAPE(D, 3, patch, patch), "patch_embed.proj.weight");
    v->patch_b = cs_bindf(b, CS_SHAPE(D), "patch_embed.proj.bias");
    v->pos_embed = cs_bindf(b, CS_SHAPE(1, grid, grid, D), "pos_embed");
    v->window = 0;
    for (int i = 0; i < depth; i++) {
        cs_vit_block *k = &v->blocks[i];
        char q[64];
        snprintf(q, sizeof q, "blocks.%d.", i);
        int64_t rel = cs_weights_dim(w, p, (snprintf(bp, sizeof bp, "%sattn.rel_pos_h", q), bp), 0);
        /* a table of 2*grid-1 rows means global attention; otherwise 2*window-1 */
        k->window = rel == 2 * grid - 1 ? 0 : (int)((rel + 1) / 2);
        if (k->window && !v->window) v->window = k->window;
        int64_t S = k->window ? k->window : grid;
        if (rel <= 0 || k->window < 0 || k->window > grid) S = -1;
        k->norm1_w = cs_bindf(b, CS_SHAPE(D), "%snorm1.weight", q);
        k->norm1_b = cs_bindf(b, CS_SHAPE(D), "%snorm1.bias", q);
        if (weights16) {
            k->qkv_w16 = cs_bind16f(b, (cs_dtype)weights16, CS_SHAPE(3 * D, D), "%sattn.qkv.weight", q);
            k->proj_w16 = cs_bind16f(b, (cs_dtype)weights16, CS_SHAPE(D, D), "%sattn.proj.weight", q);
            k->lin1_w16 = cs_bind16f(b, (cs_dtype)weights16, CS_SHAPE(mlp, D), "%smlp.lin1.weight", q);
            k->lin2_w16 = cs_bind16f(b, (cs_dtype)weights16, CS_SHAPE(D, mlp), "%smlp.lin2.weight", q);
        } else {
            k->qkv_w = cs_bindf(b, CS_SHAPE(3 * D, D), "%sattn.qkv.weight", q);
            k->proj_w = cs_bindf(b, CS_SHAPE(D, D), "%sattn.proj.weight", q);
            k->lin1_w = cs_bindf(b, CS_SHAPE(mlp, D), "%smlp.lin1.weight", q);
            k->lin2_w = cs_bindf(b, CS_SHAPE(D, mlp), "%smlp.lin2.weight", q);
        }
        k->qkv_b = cs_bindf(b, CS_SHAPE(3 * D), "%sattn.qkv.bias", q);
        k->proj_b = cs_bindf(b, CS_SHAPE(D), "%sattn.proj.bias", q);
        k->rel_h = cs_bindf(b, CS_SHAPE(S < 0 ? -1 : 2 * S - 1, hd), "%sattn.rel_pos_h", q);
        k->rel_w = cs_bindf(b, CS_SHAPE(S < 0 ? -1 : 2 * S - 1, hd), "%sattn.rel_pos_w", q);
        k->norm2_w = cs_bindf(b, CS_SHAPE(D), "%snorm2.weight", q);
        k->norm2_b = cs_bindf(b, CS_SHAPE(D), "%snorm2.bias", q);
        k->lin1_b = cs_bindf(b, CS_SHAPE(mlp), "%smlp.lin1.bias", q);
        k->lin2_b = cs_bindf(b, CS_SHAPE(D), "%smlp.lin2.bias", q);
    }
    if (with_neck) {
        int64_t C = cs_weights_dim(w, p, "neck.0.weight", 0);
        v->has_neck = 1;
        v->out_chans = (int)C;
        v->neck0_w = cs_bindf(b, CS_SHAPE(C > 0 ? C : -1, D, 1, 1), "neck.0.weight");
        v->neck1_w = cs_bindf(b, CS_SHAPE(C), "neck.1.weight");
        v->neck1_b = cs_bindf(b, CS_SHAPE(C), "neck.1.bias");
        v->neck2_w = cs_bindf(b, CS_SHAPE(C, C, 3, 3), "neck.2.weight");
        v->neck3_w = cs_bindf(b, CS_SHAPE(C), "neck.3.weight");
        v->neck3_b = cs_bindf(b, CS_SHAPE(C), "neck.3.bias");
    }
    return CELLSAM_OK;
}

static void bind_attn(cs_binder *b, cs_attn *a, const char *name, int64_t P) {
    char full[256];
    snprintf(full, sizeof full, "%s.q_proj.weight", name);
    int64_t I = cs_weights_dim(b->w, b->prefix, full, 0);
    a->internal = (int)(I > 0 ? I : 0);
    if (I <= 0) I = -1;
    a->q_w = cs_bindf(b, CS_SHAPE(I, P), "%s.q_proj.weight", name);
    a->q_b = cs_bindf(b, CS_SHAPE(I), "%s.q_proj.bias", name);
    a->k_w = cs_bindf(b, CS_SHAPE(I, P), "%s.k_proj.weight", name);
    a->k_b = cs_bindf(b, CS_SHAPE(I), "%s.k_proj.bias", name);
    a->v_w = cs_bindf(b, CS_SHAPE(I, P), "%s.v_proj.weight", name);
    a->v_b = cs_bindf(b, CS_SHAPE(I), "%s.v_proj.bias", name);
    a->o_w = cs_bindf(b, CS_SHAPE(P, I), "%s.out_proj.weight", name);
    a->o_b = cs_bindf(b, CS_SHAPE(P), "%s.out_proj.bias", name);
}

static int bind_prompt_decoder(cs_binder *b, const char *pfx, cellsam_model *m, int dec_heads) {
    char p[160];
    const cs_weights *w = b->w;
    snprintf(p, sizeof p, "%sprompt_encoder.", pfx);
    b->prefix = p;
    int64_t P = cs_weights_dim(w, p, "no_mask_embed.weight", 1);
    if (P <= 0 || P > 4096 || P % 8) {
        cs_bindf(b, CS_SHAPE(1, -1), "no_mask_embed.weight");
        return CELLSAM_ERR_MODEL;
    }
    cs_prompt_encoder *pe = &m->pe;
    pe->dim = (int)P;
    pe->img_size = m->sam_vit.img_size;
    pe->grid = m->sam_vit.grid;
    pe->pe_gauss = cs_bindf(b, CS_SHAPE(2, P / 2), "pe_layer.positional_encoding_gaussian_matrix");
    for (int i = 0; i < 4; i++) pe->point_emb[i] = cs_bindf(b, CS_SHAPE(1, P), "point_embeddings.%d.weight", i);
    pe->not_a_point = cs_bindf(b, CS_SHAPE(1, P), "not_a_point_embed.weight");
    pe->no_mask = cs_bindf(b, CS_SHAPE(1, P), "no_mask_embed.weight");
    int64_t c2 = cs_weights_dim(w, p, "mask_downscaling.3.weight", 0);
    int64_t c1 = c2 > 0 ? c2 / 4 : -1;
    pe->mask_in_chans = (int)(c2 > 0 ? c2 : 0);
    pe->md0_w = cs_bindf(b, CS_SHAPE(c1, 1, 2, 2), "mask_downscaling.0.weight");
    pe->md0_b = cs_bindf(b, CS_SHAPE(c1), "mask_downscaling.0.bias");
    pe->md1_w = cs_bindf(b, CS_SHAPE(c1), "mask_downscaling.1.weight");
    pe->md1_b = cs_bindf(b, CS_SHAPE(c1), "mask_downscaling.1.bias");
    pe->md3_w = cs_bindf(b, CS_SHAPE(c2, c1, 2, 2), "mask_downscaling.3.weight");
    pe->md3_b = cs_bindf(b, CS_SHAPE(c2), "mask_downscaling.3.bias");
    pe->md4_w = cs_bindf(b, CS_SHAPE(c2), "mask_downscaling.4.weight");
    pe->md4_b = cs_bindf(b, CS_SHAPE(c2), "mask_downscaling.4.bias");
    pe->md6_w = cs_bindf(b, CS_SHAPE(P, c2, 1, 1), "mask_downscaling.6.weight");
    pe->md6_b = cs_bindf(b, CS_SHAPE(P), "mask_downscaling.6.bias");

    snprintf(p, sizeof p, "%smask_decoder.", pfx);
    b->prefix = p;
    cs_mask_decoder *md = &m->md;
    md->dim = (int)P;
    md->heads = dec_heads;
    char lp[200];
    snprintf(lp, sizeof lp, "%stransformer.layers.", p);
    md->depth = count_indexed(w, lp, ".norm1.weight");
    int64_t mlp = cs_weights_dim(w, p, "transformer.layers.0.mlp.lin1.weight", 0);
    int64_t nm = cs_weights_dim(w, p, "mask_tokens.weight", 0);
    int64_t ih = cs_weights_dim(w, p, "iou_prediction_head.layers.0.weight", 0);
    if (md->depth < 1 || md->depth > 64 || mlp <= 0 || nm <= 0 || nm > 16 || ih <= 0 || ih > 1024 ||
        dec_heads < 1 || P % dec_heads) {
        cs_bindf(b, CS_SHAPE(-1, P), "transformer.layers.0.mlp.lin1.weight");
        cs_bindf(b, CS_SHAPE(-1, P), "mask_tokens.weight");
        cs_bindf(b, CS_SHAPE(-1, P), "iou_prediction_head.layers.0.weight");
        return CELLSAM_ERR_MODEL;
    }
    md->mlp = (int)mlp;
    md->n_mask_tokens = (int)nm;
    md->iou_hidden = (int)ih;
    md->layers = calloc((size_t)md->depth, sizeof *md->layers);
    if (!md->layers) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    for (int l = 0; l < md->depth; l++) {
        cs_twoway_layer *L = &md->layers[l];
        char q[160];
        snprintf(q, sizeof q, "transformer.layers.%d.self_attn", l);
        bind_attn(b, &L->self_attn, q, P);
        snprintf(q, sizeof q, "transformer.layers.%d.cross_attn_token_to_image", l);
        bind_attn(b, &L->t2i, q, P);
        snprintf(q, sizeof q, "transformer.layers.%d.cross_attn_image_to_token", l);
        bind_attn(b, &L->i2t, q, P);
        const float **norms[8] = {&L->norm1_w, &L->norm1_b, &L->norm2_w, &L->norm2_b,
                                  &L->norm3_w, &L->norm3_b, &L->norm4_w, &L->norm4_b};
        for (int k = 0; k < 8; k++)
            *norms[k] = cs_bindf(b, CS_SHAPE(P), "transformer.layers.%d.norm%d.%s", l, k / 2 + 1,
                                 k % 2 ? "bias" : "weight");
        L->mlp1_w = cs_bindf(b, CS_SHAPE(mlp, P), "transformer.layers.%d.mlp.lin1.weight", l);
        L->mlp1_b = cs_bindf(b, CS_SHAPE(mlp), "transformer.layers.%d.mlp.lin1.bias", l);
        L->mlp2_w = cs_bindf(b, CS_SHAPE(P, mlp), "transformer.layers.%d.mlp.lin2.weight", l);
        L->mlp2_b = cs_bindf(b, CS_SHAPE(P), "transformer.layers.%d.mlp.lin2.bias", l);
    }
    bind_attn(b, &md->final_attn, "transformer.final_attn_token_to_image", P);
    md->norm_final_w = cs_bindf(b, CS_SHAPE(P), "transformer.norm_final_attn.weight");
    md->norm_final_b = cs_bindf(b, CS_SHAPE(P), "transformer.norm_final_attn.bias");
    md->iou_token = cs_bindf(b, CS_SHAPE(1, P), "iou_token.weight");
    md->mask_tokens = cs_bindf(b, CS_SHAPE(nm, P), "mask_tokens.weight");
    md->up0_w = cs_bindf(b, CS_SHAPE(P, P / 4, 2, 2), "output_upscaling.0.weight");
    md->up0_b = cs_bindf(b, CS_SHAPE(P / 4), "output_upscaling.0.bias");
    md->up1_w = cs_bindf(b, CS_SHAPE(P / 4), "output_upscaling.1.weight");
    md->up1_b = cs_bindf(b, CS_SHAPE(P / 4), "output_upscaling.1.bias");
    md->up3_w = cs_bindf(b, CS_SHAPE(P / 4, P / 8, 2, 2), "output_upscaling.3.weight");
    md->up3_b = cs_bindf(b, CS_SHAPE(P / 8), "output_upscaling.3.bias");
    for (int m2 = 0; m2 < nm; m2++) {
        int64_t outs[3] = {P, P, P / 8};
        for (int k = 0; k < 3; k++) {
            md->hyper_w[m2][k] = cs_bindf(b, CS_SHAPE(outs[k], P), "output_hypernetworks_mlps.%d.layers.%d.weight", m2, k);
            md->hyper_b[m2][k] = cs_bindf(b, CS_SHAPE(outs[k]), "output_hypernetworks_mlps.%d.layers.%d.bias", m2, k);
        }
    }
    int64_t iou_in[3] = {P, ih, ih}, iou_out[3] = {ih, ih, nm};
    for (int k = 0; k < 3; k++) {
        md->iou_w[k] = cs_bindf(b, CS_SHAPE(iou_out[k], iou_in[k]), "iou_prediction_head.layers.%d.weight", k);
        md->iou_b[k] = cs_bindf(b, CS_SHAPE(iou_out[k]), "iou_prediction_head.layers.%d.bias", k);
    }
    return CELLSAM_OK;
}

static void vit_free_packed(cs_vit *v) {
    for (int i = 0; v->blocks && i < v->depth; i++) {
        cs_vit_block *k = &v->blocks[i];
        cs_bf16_weights_free(&k->qkv_bf16);
        cs_bf16_weights_free(&k->proj_bf16);
        cs_bf16_weights_free(&k->lin1_bf16);
        cs_bf16_weights_free(&k->lin2_bf16);
        cs_int8_weights_free(&k->qkv_i8);
        cs_int8_weights_free(&k->proj_i8);
        cs_int8_weights_free(&k->lin1_i8);
        cs_int8_weights_free(&k->lin2_i8);
    }
}

/* Opt-in bfloat16 or int8 compute: pack the four matrices of every block once. Their
 * float32 (or 16-bit) pages in the memory map are not read again, so they are handed
 * back: the model then holds a half (bf16) or a quarter (int8) of float32's bytes for
 * these matrices. */
static int vit_pack(cs_vit *v, const cs_weights *w, int compute_dtype, int n_threads) {
    const int D = v->dim, F = v->mlp;
    cs_worker_error failed = {0};
    /* one matrix per thread at a time: 4 x depth independent jobs */
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) if (n_threads > 1)
    for (int job = 0; job < 4 * v->depth; job++) {
        cs_vit_block *k = &v->blocks[job / 4];
        struct {
            cs_bf16_weights *bf16;
            cs_int8_weights *i8;
            const float *f32;
            const uint16_t *f16;
            int n, k;
        } mats[4] = {{&k->qkv_bf16, &k->qkv_i8, k->qkv_w, k->qkv_w16, 3 * D, D},
                     {&k->proj_bf16, &k->proj_i8, k->proj_w, k->proj_w16, D, D},
                     {&k->lin1_bf16, &k->lin1_i8, k->lin1_w, k->lin1_w16, F, D},
                     {&k->lin2_bf16, &k->lin2_i8, k->lin2_w, k->lin2_w16, D, F}};
        const int j = job % 4;
        int r = compute_dtype == CELLSAM_DTYPE_INT8
                    ? cs_int8_weights_pack(mats[j].i8, mats[j].f32, mats[j].f16, v->weights16, mats[j].n, mats[j].k, 1)
                    : cs_bf16_weights_pack(mats[j].bf16, mats[j].f32, mats[j].f16, v->weights16, mats[j].n,
                                           mats[j].k, 1);
        if (r) {
            cs_worker_error_keep(&failed, r);
            continue;
        }
        const size_t elems = (size_t)mats[j].n * (size_t)mats[j].k;
        if (mats[j].f32) cs_weights_drop_pages(w, mats[j].f32, elems * sizeof(float));
        else cs_weights_drop_pages(w, mats[j].f16, elems * sizeof(uint16_t));
    }
    if (failed.code) return cs_worker_error_raise(&failed);
    v->compute_bf16 = compute_dtype == CELLSAM_DTYPE_BF16;
    v->compute_int8 = compute_dtype == CELLSAM_DTYPE_INT8;
    return CELLSAM_OK;
}

void cellsam_model_free(cellsam_model *m) {
    if (!m) return;
    vit_free_packed(&m->sam_vit);
    vit_free_packed(&m->det_vit);
    free(m->sam_vit.blocks);
    free(m->det_vit.blocks);
    free(m->md.layers);
    cs_cellfinder_free(m->det);
    cs_binder_release(&m->binder);
    cs_weights_free(m->weights);
    free(m);
}

/* Integer metadata `key` in [lo, hi]: 1 and *out when present and valid, 0 when
 * absent, -1 (message set, naming `what`) when malformed. */
static int meta_int(const cs_weights *w, const char *path, const char *key, long lo, long hi, const char *what,
                    int *out) {
    const char *v = cs_weights_get_meta(w, key);
    if (!v) return 0;
    char *end;
    long x = strtol(v, &end, 10);
    if (*end || end == v || x < lo || x > hi) {
        cs_error(CELLSAM_ERR_MODEL, "%s: metadata %s=\"%s\" is not %s", path, key, v, what);
        return -1;
    }
    *out = (int)x;
    return 1;
}

const char *const cs_detector_targets[3] = {"hungarian", "anchor", "dense"};

int cellsam_model_load(const char *path, const cellsam_model_params *params, cellsam_model **out) {
    *out = NULL;
    cellsam_model_params dp = cellsam_model_default_params();
    if (!params) params = &dp;
    hparams_override ho = {0, 0, 0};
    if (params->config_path) {
        int rc = read_config(params->config_path, &ho);
        if (rc) return rc;
    }
    cellsam_model *m = calloc(1, sizeof *m);
    if (!m) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    int rc = cs_weights_open(path, &m->weights);
    if (rc) {
        free(m);
        return rc;
    }
    const cs_weights *w = m->weights;
    /* layout: CellSAM v1.2 (model_cp. = SAM used for masks), plain SAM, or legacy CellSAM (model.) */
    if (cs_weights_find(w, "model_cp.image_encoder.patch_embed.proj.weight")) strcpy(m->prefix, "model_cp.");
    else if (cs_weights_find(w, "image_encoder.patch_embed.proj.weight")) strcpy(m->prefix, "");
    else if (cs_weights_find(w, "model.image_encoder.patch_embed.proj.weight")) strcpy(m->prefix, "model.");
    else {
        cellsam_model_free(m);
        return cs_error(CELLSAM_ERR_MODEL,
                        "%s: not a CellSAM or SAM checkpoint (no model_cp.image_encoder.*, "
                        "image_encoder.* or model.image_encoder.* tensors)", path);
    }
    /* head counts saved by `cellsam train` (safetensors metadata); a config file wins */
    struct {
        const char *key;
        int *dst;
    } meta_heads[] = {{"cellsam.vit_heads", &ho.vit_heads},
                      {"cellsam.decoder_heads", &ho.dec_heads},
                      {"cellsam.detector_heads", &ho.det_heads}};
    for (size_t i = 0; i < sizeof meta_heads / sizeof meta_heads[0]; i++) {
        /* the message is set before the free: the value points into the model's weights */
        if (!*meta_heads[i].dst &&
            meta_int(w, path, meta_heads[i].key, 1, 256, "a head count", meta_heads[i].dst) < 0) {
            cellsam_model_free(m);
            return CELLSAM_ERR_MODEL;
        }
    }
    /* a detector trained one-to-many scores several boxes per cell: its trainer records
     * the box NMS it needs, which segmentation applies unless the caller chooses */
    const char *nms = cs_weights_get_meta(w, "cellsam.box_nms_iou");
    if (nms) {
        char *end;
        double v = strtod(nms, &end);
        if (*end || !(v >= 0 && v <= 1)) {
            int err = cs_error(CELLSAM_ERR_MODEL, "%s: metadata cellsam.box_nms_iou=\"%s\" is not an IoU in [0, 1]",
                               path, nms);
            cellsam_model_free(m);
            return err;
        }
        m->box_nms_iou = (float)v;
    }
    /* the image size up to which the model works best on the whole image (its trainer
     * measured it on held-out images), tiled above */
    if (meta_int(w, path, "cellsam.whole_image_max_side", 0, 65536, "a side length in [0, 65536]",
                 &m->whole_image_max_side) < 0) {
        cellsam_model_free(m);
        return CELLSAM_ERR_MODEL;
    }
    /* whether the model recommends sizing cells per image (its trainer found it better) */
    const char *dm = cs_weights_get_meta(w, "cellsam.diameter");
    if (dm && strcmp(dm, "auto") && strcmp(dm, "off")) {
        int err = cs_error(CELLSAM_ERR_MODEL, "%s: metadata cellsam.diameter=\"%s\" is not auto or off", path, dm);
        cellsam_model_free(m);
        return err;
    }
    m->auto_diameter = dm && !strcmp(dm, "auto");
    /* a record, not a recommendation: a value this version does not know is ignored, as the
     * trainer ignores it (it falls back to the box-NMS rule) */
    const char *dt = cs_weights_get_meta(w, "cellsam.detector_targets");
    for (int i = 0; dt && i < 3; i++)
        if (!strcmp(dt, cs_detector_targets[i])) m->info.detector_targets = cs_detector_targets[i];
    /* the cell diameter, in network-input pixels, that --diameter zooms cells to */
    m->cell_diameter = CELLSAM_DEFAULT_NET_CELL_DIAMETER;
    if (meta_int(w, path, "cellsam.cell_diameter", 4, 1024, "a diameter in [4, 1024] pixels", &m->cell_diameter) <
        0) {
        cellsam_model_free(m);
        return CELLSAM_ERR_MODEL;
    }
    cs_binder *b = &m->binder;
    b->w = w;
    char vp[64];
    snprintf(vp, sizeof vp, "%simage_encoder.", m->prefix);
    int64_t D = cs_weights_dim(w, vp, "patch_embed.proj.weight", 0);
    /* Without a config or metadata: the relative-position tables are one head wide, so
     * they give the head count exactly (SAM's ViTs); else SAM's 64-wide heads. */
    int64_t head_dim = cs_weights_dim(w, vp, "blocks.0.attn.rel_pos_h", 1);
    int vit_heads = ho.vit_heads                                       ? ho.vit_heads
                    : D > 0 && head_dim > 0 && D % head_dim == 0 && D / head_dim <= 256 ? (int)(D / head_dim)
                    : D > 0 && D % 64 == 0                              ? (int)(D / 64)
                                                                        : 1;
    int w16 = params->weights_dtype == CELLSAM_DTYPE_F16 ? CS_DTYPE_F16
              : params->weights_dtype == CELLSAM_DTYPE_BF16 ? CS_DTYPE_BF16 : 0;
    if (params->weights_dtype < 0 || params->weights_dtype > CELLSAM_DTYPE_BF16) {
        cellsam_model_free(m);
        return cs_error(CELLSAM_ERR_INVALID, "unknown weights dtype %d", params->weights_dtype);
    }
    if (params->compute_dtype != CELLSAM_DTYPE_F32 && params->compute_dtype != CELLSAM_DTYPE_BF16 &&
        params->compute_dtype != CELLSAM_DTYPE_INT8) {
        cellsam_model_free(m);
        return cs_error(CELLSAM_ERR_INVALID, "compute dtype %d: only f32, bf16 and int8 are supported",
                        params->compute_dtype);
    }
    rc = bind_vit(b, vp, &m->sam_vit, vit_heads, 1, w16);
    if (!rc) rc = bind_prompt_decoder(b, m->prefix, m, ho.dec_heads ? ho.dec_heads : 8);
    int det_present = cs_weights_find(w, "cellfinder.decode_head.backbone.body.patch_embed.proj.weight") != NULL;
    if (!rc && params->load_detector && det_present) {
        rc = bind_vit(b, "cellfinder.decode_head.backbone.body.", &m->det_vit, vit_heads, 0, w16);
        if (!rc) {
            b->prefix = "cellfinder.decode_head.";
            rc = cs_cellfinder_bind(&m->det, b, m->det_vit.dim, ho.det_heads ? ho.det_heads : 8);
        }
        m->has_detector = rc == CELLSAM_OK;
    }
    if (!rc && b->n_problems) rc = CELLSAM_ERR_MODEL;
    if (rc) {
        if (b->n_problems) {
            /* one line naming every problem (the first 20, then a count) */
            char list[900];
            size_t o = 0;
            int shown = 0;
            for (const char *p = b->problems; p && *p && shown < 20; shown++) {
                const char *nl = strchr(p, '\n');
                size_t len = nl ? (size_t)(nl - p) : strlen(p);
                int n = snprintf(list + o, sizeof list - o, "%s%.*s", shown ? "; " : "", (int)len, p);
                if (n < 0 || (size_t)n >= sizeof list - o) break;
                o += (size_t)n;
                p = nl ? nl + 1 : p + len;
            }
            rc = cs_error(CELLSAM_ERR_MODEL, "%s: %d tensor problem%s: %s%s", path, b->n_problems,
                          b->n_problems > 1 ? "s" : "", list, b->n_problems > shown ? "; ..." : "");
        } else {
            cs_error_prefix(rc, "%s", path);
        }
        cellsam_model_free(m);
        return rc;
    }
    if (params->load_detector && !det_present && params->load_detector == 2) {
        cellsam_model_free(m);
        return cs_error(CELLSAM_ERR_MODEL, "%s: no CellFinder (cellfinder.*) tensors", path);
    }
    if (params->compute_dtype != CELLSAM_DTYPE_F32) {
        const int nt = params->n_threads > 0 ? params->n_threads : omp_get_max_threads();
        rc = vit_pack(&m->sam_vit, w, params->compute_dtype, nt);
        if (!rc && m->has_detector) rc = vit_pack(&m->det_vit, w, params->compute_dtype, nt);
        /* the head has no int8 path: it stays float32 there */
        if (!rc && m->has_detector && params->compute_dtype == CELLSAM_DTYPE_BF16)
            rc = cs_cellfinder_set_compute_bf16(m->det, 1);
        if (rc) {
            cs_error_prefix(rc, "%s", path);
            cellsam_model_free(m);
            return rc;
        }
    }
    cellsam_model_info *in = &m->info;
    in->image_size = m->sam_vit.img_size;
    in->patch_size = m->sam_vit.patch;
    in->embed_dim = m->sam_vit.dim;
    in->depth = m->sam_vit.depth;
    in->num_heads = m->sam_vit.heads;
    in->window_size = m->sam_vit.window;
    in->mlp_dim = m->sam_vit.mlp;
    for (int i = 0; i < m->sam_vit.depth && in->n_global < 32; i++)
        if (!m->sam_vit.blocks[i].window) in->global_blocks[in->n_global++] = i;
    in->prompt_dim = m->pe.dim;
    in->decoder_depth = m->md.depth;
    in->decoder_heads = m->md.heads;
    in->decoder_mlp_dim = m->md.mlp;
    in->has_detector = m->has_detector;
    if (m->det) {
        cs_cellfinder_dims dd;
        cs_cellfinder_get_dims(m->det, &dd);
        in->det_queries = dd.n_queries;
        in->det_enc_layers = dd.enc_layers;
        in->det_dec_layers = dd.dec_layers;
        in->det_heads = dd.n_heads;
        in->det_trunk_dim = m->det_vit.dim;
        in->det_trunk_mlp_dim = m->det_vit.mlp;
    }
    in->box_nms_iou = m->box_nms_iou;
    in->whole_image_max_side = m->whole_image_max_side;
    in->cell_diameter = m->cell_diameter;
    in->auto_diameter = m->auto_diameter;
    in->prefix = m->prefix;
    in->format = cs_weights_format(w);
    if (m->sam_vit.img_size != 1024 || m->sam_vit.grid != 64) {
        rc = cs_error(CELLSAM_ERR_UNSUPPORTED, "%s: input size %d (grid %d); only 1024 (grid 64) is supported",
                      path, in->image_size, m->sam_vit.grid);
        cellsam_model_free(m);
        return rc;
    }
    *out = m;
    return CELLSAM_OK;
}

int cellsam_model_get_info(const cellsam_model *m, cellsam_model_info *info) {
    if (!m || !info) return cs_error(CELLSAM_ERR_INVALID, "null argument");
    *info = m->info;
    return CELLSAM_OK;
}

int cellsam_context_new(const cellsam_model *m, cellsam_context **out) {
    *out = NULL;
    if (!m) return cs_error(CELLSAM_ERR_INVALID, "null model");
    cellsam_context *c = calloc(1, sizeof *c);
    if (!c) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    c->model = m;
    size_t n = (size_t)m->pe.dim * m->pe.grid * m->pe.grid;
    c->embedding = cs_alloc(n, sizeof(float));
    c->dense_pe = cs_alloc(n, sizeof(float));
    c->dec_ws = cs_decoder_ws_new();
    if (!c->embedding || !c->dense_pe || !c->dec_ws) {
        cellsam_context_free(c);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    cs_prompt_dense_pe(&m->pe, c->dense_pe);
    *out = c;
    return CELLSAM_OK;
}

void cellsam_context_free(cellsam_context *c) {
    if (!c) return;
    free(c->embedding);
    free(c->dense_pe);
    cs_decoder_ws_free(c->dec_ws);
    free(c);
}

int cellsam_encode(cellsam_context *c, const float *input, int n_threads) {
    if (!c || !input) return cs_error(CELLSAM_ERR_INVALID, "null argument");
    cs_decoder_ws_invalidate(c->dec_ws);
    int rc = cs_vit_forward(&c->model->sam_vit, input, c->embedding, n_threads);
    c->has_embedding = rc == CELLSAM_OK;
    return rc;
}

int cellsam_get_embedding(const cellsam_context *c, const float **data, int *ch, int *h, int *w) {
    if (!c->has_embedding) return cs_error(CELLSAM_ERR_INVALID, "no embedding computed yet");
    *data = c->embedding;
    *ch = c->model->pe.dim;
    *h = *w = c->model->pe.grid;
    return CELLSAM_OK;
}

int cellsam_set_embedding(cellsam_context *c, const float *data, int ch, int h, int w) {
    const cellsam_model *m = c->model;
    if (ch != m->pe.dim || h != m->pe.grid || w != m->pe.grid)
        return cs_error(CELLSAM_ERR_INVALID, "embedding is %dx%dx%d, the model needs %dx%dx%d", ch, h, w,
                        m->pe.dim, m->pe.grid, m->pe.grid);
    memcpy(c->embedding, data, (size_t)ch * h * w * sizeof(float));
    cs_decoder_ws_invalidate(c->dec_ws);
    c->has_embedding = 1;
    return CELLSAM_OK;
}

#define CELLSAM_MAX_PROMPTS 100000
#define CELLSAM_MAX_POINTS 1000

int cellsam_decode(cellsam_context *c, const cellsam_prompt *pr, float **logits_out, float **iou_out,
                   int *n_batch_out, int *n_masks_out) {
    *logits_out = NULL;
    *iou_out = NULL;
    if (!c || !pr) return cs_error(CELLSAM_ERR_INVALID, "null argument");
    if (!c->has_embedding) return cs_error(CELLSAM_ERR_INVALID, "no image embedding: encode an image first");
    const cellsam_model *m = c->model;
    if (pr->n_boxes < 0 || pr->n_boxes > CELLSAM_MAX_PROMPTS || pr->n_points < 0 ||
        pr->n_points > CELLSAM_MAX_POINTS)
        return cs_error(CELLSAM_ERR_LIMIT, "too many prompts (%d boxes, %d points)", pr->n_boxes, pr->n_points);
    if (pr->n_boxes == 0 && pr->n_points == 0 && !pr->mask_input)
        return cs_error(CELLSAM_ERR_INVALID, "no prompt: give at least one box, point or mask");
    for (int i = 0; i < pr->n_points; i++)
        if (pr->points[i].label != 0 && pr->points[i].label != 1)
            return cs_error(CELLSAM_ERR_INVALID, "point %d has label %d (use 1 positive, 0 negative)", i,
                            pr->points[i].label);
    for (int i = 0; i < pr->n_boxes; i++) {
        const cellsam_box *bx = &pr->boxes[i];
        if (!(bx->x1 == bx->x1 && bx->y1 == bx->y1 && bx->x2 == bx->x2 && bx->y2 == bx->y2))
            return cs_error(CELLSAM_ERR_INVALID, "box %d has a NaN coordinate", i);
    }
    const int P = m->pe.dim, G = m->pe.grid, nm = m->md.n_mask_tokens;
    const int nb = pr->n_boxes > 0 ? pr->n_boxes : 1;
    const int ntok = pr->n_points + (pr->n_boxes > 0 ? 2 : (pr->n_points > 0 ? 1 : 0));
    int threads = pr->n_threads > 0 ? pr->n_threads : 1;
    float *sparse = cs_alloc((size_t)nb * (ntok > 0 ? ntok : 1), (size_t)P * sizeof(float));
    float *dense = cs_alloc((size_t)P * G, (size_t)G * sizeof(float));
    float *all_iou = cs_alloc((size_t)nb, (size_t)nm * sizeof(float));
    int rc = CELLSAM_OK;
    if (!sparse || !dense || !all_iou) {
        rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory for %d prompts", nb);
        goto fail;
    }
    for (int i = 0; i < nb; i++) {
        const float *box = NULL;
        float bx[4];
        if (pr->n_boxes > 0) {
            bx[0] = pr->boxes[i].x1;
            bx[1] = pr->boxes[i].y1;
            bx[2] = pr->boxes[i].x2;
            bx[3] = pr->boxes[i].y2;
            box = bx;
        }
        cs_prompt_sparse(&m->pe, box, pr->points, pr->n_points, sparse + (size_t)i * ntok * P);
    }
    rc = cs_prompt_dense(&m->pe, pr->mask_input, dense, threads);
    if (rc) goto fail;
    /* SAM returns token 0, or tokens 1.. for multimask: decode only those */
    int first = pr->multimask ? 1 : 0, count = pr->multimask ? nm - 1 : 1;
    size_t plane = (size_t)16 * G * G;
    float *lg = malloc((size_t)nb * count * plane * sizeof(float));
    float *io = malloc((size_t)nb * count * sizeof(float));
    if (!lg || !io) {
        free(lg);
        free(io);
        rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    cs_decoder_options dopt = cs_decoder_default_options(&m->md);
    dopt.mask_first = first;
    dopt.mask_count = count;
    rc = cs_mask_decoder_forward_ex(&m->md, c->embedding, c->dense_pe, dense, 0, sparse, nb, ntok, &dopt, lg,
                                    all_iou, c->dec_ws, threads);
    if (rc) {
        free(lg);
        free(io);
        goto fail;
    }
    for (int i = 0; i < nb; i++)
        for (int k = 0; k < count; k++) io[i * count + k] = all_iou[i * nm + first + k];
    *logits_out = lg;
    *iou_out = io;
    *n_batch_out = nb;
    *n_masks_out = count;
fail:
    free(sparse);
    free(dense);
    free(all_iou);
    return rc;
}
