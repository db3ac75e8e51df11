/* The training loop behind `cellsam train` and `cellsam finetune`: builds the
 * trainable modules (from an architecture or from a checkpoint's shapes), runs
 * SAM-style mask training on box prompts and Anchor-DETR set training on the
 * detector, AdamW with warm-up and cosine decay, checkpoints that resume, and a
 * validation F1 per epoch computed with the inference pipeline itself. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common.h"
#include "image_io.h"
#include "metrics.h"
#include "model.h"
#include "train.h"

#define GRID 64
#define IMG 1024
#define LOWRES (4 * GRID)

cellsam_train_params cellsam_train_default_params(void) {
    cellsam_train_params p;
    memset(&p, 0, sizeof p);
    p.val_fraction = 0.1f;
    p.max_val_images = 40;
    p.arch = "small";
    p.epochs = 10;
    p.images_per_step = 2;
    p.prompts_per_image = 16;
    p.box_jitter = 0.1f;
    p.lr = 4e-4f;
    p.weight_decay = 1e-4f;
    p.clip_norm = 1.0f;
    p.warmup_steps = 50;
    p.train_encoders = 1;
    p.train_decoder = 1;
    p.train_detector = 1;
    p.cache_embeddings = 1;
    p.augment = 1;
    p.anchor_matching = 2;
    p.n_threads = 1;
    p.seed = 1;
    p.save_optimizer_state = 1;
    return p;
}

cellsam_train_params cellsam_finetune_default_params(void) {
    cellsam_train_params p = cellsam_train_default_params();
    p.train_encoders = 0; /* frozen, features cached: only the decoder and the head train */
    p.epochs = 5;
    p.lr = 1e-4f;         /* a trained model: a quarter of the from-scratch rate, a short warm-up */
    p.warmup_steps = 10;
    p.anchor_matching = -1; /* the targets the starting model was trained with */
    return p;
}

typedef struct {
    cs_tvit_config sam_vit, det_vit;
    cs_tdecoder_config dec;
    cs_tdetector_config det;
    int vit_heads;
} arch_config;

static int arch_from_name(const cellsam_train_params *tp, arch_config *a) {
    memset(a, 0, sizeof *a);
    const char *name = tp->arch ? tp->arch : "small";
    cs_tvit_config *v = &a->sam_vit;
    v->img_size = IMG;
    v->patch = 16;
    v->window = 14;
    cs_tdecoder_config *d = &a->dec;
    d->n_mask_tokens = 4;
    d->downsample = 2;
    d->grid = GRID;
    d->img_size = IMG;
    d->mask_in_chans = 16;
    cs_tdetector_config *t = &a->det;
    t->d_model = 256;
    t->n_patterns = 1;
    t->n_classes = 2;
    t->grid = GRID;
    t->heads = 8;
    if (!strcmp(name, "tiny")) {
        v->dim = 32, v->depth = 2, v->heads = 1, v->mlp = 128, v->n_global = 1, v->global_idx[0] = 1;
        v->out_chans = 32;
        d->dim = 32, d->depth = 2, d->heads = 2, d->mlp = 64, d->iou_hidden = 32;
        t->enc_layers = 1, t->dec_layers = 2, t->ffn = 256, t->n_positions = 400;
    } else if (!strcmp(name, "small")) {
        v->dim = 64, v->depth = 4, v->heads = 2, v->mlp = 256, v->n_global = 1, v->global_idx[0] = 3;
        v->out_chans = 64;
        d->dim = 64, d->depth = 2, d->heads = 4, d->mlp = 256, d->iou_hidden = 64;
        t->enc_layers = 1, t->dec_layers = 3, t->ffn = 512, t->n_positions = 1024;
    } else if (!strcmp(name, "vit_b")) {
        v->dim = 768, v->depth = 12, v->heads = 12, v->mlp = 3072, v->n_global = 4;
        v->global_idx[0] = 2, v->global_idx[1] = 5, v->global_idx[2] = 8, v->global_idx[3] = 11;
        v->out_chans = 256;
        d->dim = 256, d->depth = 2, d->heads = 8, d->mlp = 2048, d->iou_hidden = 256;
        t->enc_layers = 6, t->dec_layers = 6, t->ffn = 1024, t->n_positions = 3500;
    } else {
        return cs_error(CELLSAM_ERR_INVALID, "unknown architecture \"%s\" (tiny, small or vit_b)", name);
    }
    if (tp->embed_dim > 0) v->dim = tp->embed_dim;
    if (tp->depth > 0) {
        v->depth = tp->depth;
        v->n_global = 1;
        v->global_idx[0] = tp->depth - 1;
    }
    if (tp->heads > 0) v->heads = tp->heads;
    if (tp->n_queries > 0) t->n_positions = tp->n_queries;
    if (v->dim < 8 || v->dim > 2048 || v->depth < 1 || v->depth > 32 || v->heads < 1 || v->dim % v->heads ||
        t->n_positions < 1 || t->n_positions > 10000)
        return cs_error(CELLSAM_ERR_INVALID, "implausible architecture (dim %d, depth %d, heads %d, queries %d)",
                        v->dim, v->depth, v->heads, t->n_positions);
    a->det_vit = *v;
    a->det_vit.out_chans = 0;
    t->backbone_dim = v->dim;
    a->vit_heads = v->heads;
    return CELLSAM_OK;
}

/* Architecture of an existing checkpoint (fine-tuning), from its tensor shapes and
 * the head counts the inference loader settles on. */
static int arch_from_checkpoint(const char *path, arch_config *a) {
    memset(a, 0, sizeof *a);
    cellsam_model *m = NULL;
    int rc = cellsam_model_load(path, NULL, &m);
    if (rc) return rc;
    cellsam_model_info info;
    cellsam_model_get_info(m, &info);
    int usable = info.prefix && !strcmp(info.prefix, "model_cp.") && info.has_detector;
    /* The CellFinder trunk has its own width, MLP and depth (a widened trunk, say), as
     * the loader bound them; its global blocks are those without a window. */
    cs_tvit_config trunk = {0};
    if (usable) {
        const cs_vit *dv = &m->det_vit;
        trunk.dim = dv->dim, trunk.mlp = dv->mlp, trunk.depth = dv->depth;
        for (int i = 0; i < dv->depth && trunk.n_global < 16; i++)
            if (!dv->blocks[i].window) trunk.global_idx[trunk.n_global++] = i;
    }
    cellsam_model_free(m); /* info's strings point into the model: compared above */
    if (!usable)
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "%s: fine-tuning needs a CellSAM checkpoint with model_cp.* and cellfinder.* tensors", path);
    cs_weights *w = NULL;
    rc = cs_weights_open(path, &w);
    if (rc) return rc;
    cs_tvit_config *v = &a->sam_vit;
    v->img_size = info.image_size;
    v->patch = info.patch_size;
    v->dim = info.embed_dim;
    v->depth = info.depth;
    v->heads = info.num_heads;
    v->mlp = info.mlp_dim;
    v->window = info.window_size;
    v->n_global = info.n_global < 16 ? info.n_global : 16;
    for (int i = 0; i < v->n_global; i++) v->global_idx[i] = info.global_blocks[i];
    v->out_chans = info.prompt_dim;
    a->det_vit = *v;
    a->det_vit.out_chans = 0;
    a->vit_heads = v->heads;
    a->det_vit.dim = trunk.dim;
    a->det_vit.mlp = trunk.mlp;
    a->det_vit.depth = trunk.depth;
    a->det_vit.n_global = trunk.n_global;
    memcpy(a->det_vit.global_idx, trunk.global_idx, sizeof trunk.global_idx);
    cs_tdecoder_config *d = &a->dec;
    d->dim = info.prompt_dim;
    d->depth = info.decoder_depth;
    d->heads = info.decoder_heads;
    d->mlp = info.decoder_mlp_dim;
    d->n_mask_tokens = (int)cs_weights_dim(w, NULL, "model_cp.mask_decoder.mask_tokens.weight", 0);
    d->iou_hidden = (int)cs_weights_dim(w, NULL, "model_cp.mask_decoder.iou_prediction_head.layers.0.weight", 0);
    d->downsample = (int)(d->dim / cs_weights_dim(w, NULL, "model_cp.mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight", 0));
    d->grid = info.image_size / info.patch_size;
    d->img_size = info.image_size;
    d->mask_in_chans = (int)cs_weights_dim(w, NULL, "model_cp.prompt_encoder.mask_downscaling.3.weight", 0);
    cs_tdetector_config *t = &a->det;
    const char *h = "cellfinder.decode_head.transformer.";
    char name[256];
    t->backbone_dim = a->det_vit.dim;
    t->d_model = 256;
    t->heads = info.det_heads;
    t->enc_layers = info.det_enc_layers;
    t->dec_layers = info.det_dec_layers;
    snprintf(name, sizeof name, "%sencoder_layers.0.ffn.linear1.weight", h);
    t->ffn = (int)cs_weights_dim(w, NULL, name, 0);
    if (t->ffn <= 0) {
        snprintf(name, sizeof name, "%sdecoder_layers.0.ffn.linear1.weight", h);
        t->ffn = (int)cs_weights_dim(w, NULL, name, 0);
    }
    snprintf(name, sizeof name, "%sposition.weight", h);
    t->n_positions = (int)cs_weights_dim(w, NULL, name, 0);
    snprintf(name, sizeof name, "%spattern.weight", h);
    t->n_patterns = (int)cs_weights_dim(w, NULL, name, 0);
    snprintf(name, sizeof name, "%sclass_embed.0.weight", h);
    t->n_classes = (int)cs_weights_dim(w, NULL, name, 0);
    t->grid = d->grid;
    cs_weights_free(w);
    if (d->n_mask_tokens < 1 || d->iou_hidden < 1 || d->downsample < 1 || d->mask_in_chans < 1 || t->ffn < 1 ||
        t->n_positions < 1 || t->n_patterns < 1 || t->n_classes < 1)
        return cs_error(CELLSAM_ERR_MODEL, "%s: cannot infer the architecture from its tensors", path);
    if (v->img_size != IMG || d->grid != GRID)
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "%s: input size %d (only %d is supported)", path, v->img_size, IMG);
    return CELLSAM_OK;
}

/* Global-norm clipping per branch. The SAM branch and the detector are driven by
 * separate losses; one global norm would let the detector's large, spiky gradients
 * rescale the mask branch's updates at random. Returns the norm before clipping. */
static float clip_group(cs_tparams *ps, const char *prefix, float max_norm) {
    size_t len = strlen(prefix);
    double ss = 0;
    for (size_t i = 0; i < ps->n; i++) {
        const cs_tparam *p = &ps->items[i];
        if (p->frozen || strncmp(p->name, prefix, len)) continue;
        for (size_t k = 0; k < p->n; k++) ss += (double)p->g[k] * p->g[k];
    }
    float norm = (float)sqrt(ss);
    if (max_norm > 0 && norm > max_norm && isfinite(norm)) {
        float c = max_norm / (norm + 1e-6f);
        for (size_t i = 0; i < ps->n; i++) {
            cs_tparam *p = &ps->items[i];
            if (p->frozen || strncmp(p->name, prefix, len)) continue;
            for (size_t k = 0; k < p->n; k++) p->g[k] *= c;
        }
    }
    return norm;
}

/* ------------------------------------------------------------ the trainer */

/* The recommendations a model carries in its metadata, saved with every checkpoint. */
/* HINT_TARGETS is not a recommendation but a record: the detector targets the model
 * last trained with, which `finetune --matching model` continues with. */
enum { HINT_BOX_NMS, HINT_WHOLE_MAX, HINT_CELL_DIAMETER, HINT_SIZING, HINT_TARGETS, N_HINTS };
static const char *const HINT_KEYS[N_HINTS] = {"cellsam.box_nms_iou", "cellsam.whole_image_max_side",
                                               "cellsam.cell_diameter", "cellsam.diameter",
                                               "cellsam.detector_targets"};

typedef struct {
    const cellsam_train_params *tp;
    int matching; /* tp->anchor_matching, with -1 resolved from the starting model */
    arch_config arch;
    cs_tparams ps;
    cs_tvit *sam_vit, *det_vit;
    cs_tdecoder *dec;
    cs_tdetector *det;
    cs_adamw opt;
    cs_dataset all, train, val;
    cs_rng rng;
    /* scratch */
    float *emb, *demb, *feat, *dfeat;
    float *logits, *dlogits, *iou, *diou, *target, *dice_grad;
    float *det_logits, *det_boxes, *det_dlogits, *det_dboxes, *gt_cxcywh;
    float *boxes;
    float *anchors; /* Q x 2 anchor points for static matching */
    /* frozen-encoder cache: per training image, features and the sample's targets */
    float **cache_emb, **cache_feat;
    cs_train_sample *cache_sample;
    int *cache_ok;
    double loss_mask, loss_iou, loss_det;
    int n_loss;
    /* frozen encoders run through the inference engine (no activation buffers):
     * the fine-tuning checkpoint, and the --detector-from one for the trunk */
    cellsam_model *frozen_model, *frozen_det_model;
    char hint[N_HINTS][32]; /* recommendations to save in the metadata (HINT_KEYS; "" = none) */
} trainer;

/* Box NMS recorded in models whose detector trained with one-to-many targets; chosen
 * on the held-out split of ../shared/train (models/README.md). */
#define DENSE_TARGETS_BOX_NMS "0.2"

/* Take hint h from a checkpoint's metadata; a value that does not fit is dropped, not
 * cut (a cut number would be another recommendation). */
static void take_hint(trainer *t, const cs_weights *w, int h) {
    const char *v = cs_weights_get_meta(w, HINT_KEYS[h]);
    snprintf(t->hint[h], sizeof t->hint[h], "%s", v && strlen(v) < sizeof t->hint[h] ? v : "");
}

static void tlog(const trainer *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tlog(const trainer *t, const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (t->tp->log) t->tp->log(line, t->tp->log_user);
    else fprintf(stderr, "%s\n", line);
}

static void trainer_free(trainer *t) {
    cs_tvit_free(t->sam_vit);
    cs_tvit_free(t->det_vit);
    cs_tdecoder_free(t->dec);
    cs_tdetector_free(t->det);
    cs_tparams_free(&t->ps);
    cellsam_model_free(t->frozen_model);
    cellsam_model_free(t->frozen_det_model);
    if (t->cache_ok) {
        for (int i = 0; i < t->train.n; i++) {
            cs_free(t->cache_emb[i]);
            cs_free(t->cache_feat[i]);
            if (t->cache_ok[i]) cs_train_sample_free(&t->cache_sample[i]);
        }
    }
    free(t->cache_emb);
    free(t->cache_feat);
    free(t->cache_sample);
    free(t->cache_ok);
    cs_dataset_free(&t->train);
    cs_dataset_free(&t->val);
    cs_dataset_free(&t->all);
    float *bufs[] = {t->emb, t->demb, t->feat, t->dfeat, t->logits, t->dlogits, t->iou, t->diou, t->target, t->dice_grad,
                     t->det_logits, t->det_boxes, t->det_dlogits, t->det_dboxes, t->gt_cxcywh, t->boxes, t->anchors};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) cs_free(bufs[i]);
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static char *state_path(const char *out) {
    size_t n = strlen(out) + 7;
    char *s = malloc(n);
    if (s) snprintf(s, n, "%s.state", out);
    return s;
}

static int trainer_save(trainer *t) {
    char heads[3][16];
    snprintf(heads[0], sizeof heads[0], "%d", t->arch.vit_heads);
    snprintf(heads[1], sizeof heads[1], "%d", t->arch.dec.heads);
    snprintf(heads[2], sizeof heads[2], "%d", t->arch.det.heads);
    /* one-to-many targets teach several boxes per cell: the model asks for box NMS */
    const char *meta[9 + 2 * N_HINTS] = {"cellsam.vit_heads", heads[0], "cellsam.decoder_heads", heads[1],
                                         "cellsam.detector_heads", heads[2], "cellsam.trained_by", "cellsam train"};
    int n_meta = 8;
    for (int h = 0; h < N_HINTS; h++)
        if (t->hint[h][0]) {
            meta[n_meta++] = HINT_KEYS[h];
            meta[n_meta++] = t->hint[h];
        }
    meta[n_meta] = NULL;
    int rc = cs_tparams_save(&t->ps, t->tp->out_path, CS_DTYPE_F32, meta);
    if (rc || !t->tp->save_optimizer_state) return rc;
    char *sp = state_path(t->tp->out_path);
    if (!sp) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    rc = cs_adamw_save(&t->opt, &t->ps, sp);
    free(sp);
    return rc;
}

/* Jittered box prompt around a ground-truth box: up to `frac` of its size per side,
 * at most 200 frac px (SAM's training noise at 0.1: 10 %, 20 px), so the decoder
 * copes with detector boxes. */
static void jitter_box(cs_rng *r, float frac, const float *in, float *out) {
    float w = in[2] - in[0], h = in[3] - in[1];
    for (int k = 0; k < 4; k++) {
        float side = (k % 2 == 0) ? w : h;
        float amp = fminf(frac * side, 200.0f * frac);
        out[k] = in[k] + (float)(cs_rng_uniform(r) * 2.0 - 1.0) * amp;
    }
    for (int k = 0; k < 4; k++) out[k] = fminf(fmaxf(out[k], 0.0f), (float)IMG);
    if (out[2] < out[0] + 1) out[2] = out[0] + 1;
    if (out[3] < out[1] + 1) out[3] = out[1] + 1;
}

/* Mask loss of SAM (20 focal + 1 dice, means over pixels and prompts) and the MSE
 * of the predicted IoU against the IoU of the thresholded mask. */
static int step_decoder(trainer *t, const cs_train_sample *s, const float *emb, float *demb, float scale) {
    int K = t->tp->prompts_per_image;
    if (s->n_cells == 0) return 0;
    if (K > s->n_cells) K = s->n_cells;
    /* a random subset of cells: partial Fisher-Yates on the ids */
    int *ids = malloc((size_t)s->n_cells * sizeof *ids);
    if (!ids) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    for (int i = 0; i < s->n_cells; i++) ids[i] = i + 1;
    for (int i = 0; i < K; i++) {
        int j = i + (int)(cs_rng_u64(&t->rng) % (uint64_t)(s->n_cells - i));
        int tmp = ids[i];
        ids[i] = ids[j];
        ids[j] = tmp;
    }
    for (int i = 0; i < K; i++) jitter_box(&t->rng, t->tp->box_jitter, s->boxes_xyxy + 4 * (ids[i] - 1), t->boxes + 4 * i);
    int rc = cs_tdecoder_forward(t->dec, emb, t->boxes, K, t->logits, t->iou, 1, t->tp->n_threads);
    if (rc) {
        free(ids);
        return rc;
    }
    const size_t npix = (size_t)LOWRES * LOWRES;
    double lm = 0, li = 0;
    for (int i = 0; i < K; i++) {
        float *lg = t->logits + (size_t)i * npix, *dl = t->dlogits + (size_t)i * npix;
        cs_train_sample_mask(s, ids[i], LOWRES, t->target);
        float fscale = 20.0f * scale / (float)(npix * (size_t)K), dscale = scale / (float)K;
        lm += 20.0 * cs_loss_sigmoid_focal(lg, t->target, npix, 0.25f, 2.0f, fscale, dl) / (double)npix;
        /* dice gradient is added to the focal one */
        lm += cs_loss_dice(lg, t->target, npix, dscale, t->dice_grad);
        for (size_t k = 0; k < npix; k++) dl[k] += t->dice_grad[k];
        size_t inter = 0, uni = 0;
        for (size_t k = 0; k < npix; k++) {
            int pm = lg[k] > 0.0f, gm = t->target[k] > 0.5f;
            inter += (size_t)(pm & gm);
            uni += (size_t)(pm | gm);
        }
        float actual = uni ? (float)inter / (float)uni : 0.0f;
        li += cs_loss_mse(&t->iou[i], &actual, 1, dscale, &t->diou[i]);
    }
    free(ids);
    t->loss_mask += lm / K;
    t->loss_iou += li / K;
    return cs_tdecoder_backward(t->dec, t->dlogits, t->diou, demb, t->tp->n_threads);
}

static int step_detector(trainer *t, const cs_train_sample *s, const float *feat, float *dfeat, float scale) {
    const cs_tdetector_config *c = &t->arch.det;
    int Q = c->n_positions * c->n_patterns, L = c->dec_layers, C = c->n_classes;
    int rc = cs_tdetector_forward(t->det, feat, t->det_logits, t->det_boxes, 1, t->tp->n_threads);
    if (rc) return rc;
    int G = s->n_cells;
    for (int g = 0; g < G; g++) {
        const float *b = s->boxes_xyxy + 4 * g;
        t->gt_cxcywh[4 * g + 0] = (b[0] + b[2]) * 0.5f / IMG;
        t->gt_cxcywh[4 * g + 1] = (b[1] + b[3]) * 0.5f / IMG;
        t->gt_cxcywh[4 * g + 2] = (b[2] - b[0]) / IMG;
        t->gt_cxcywh[4 * g + 3] = (b[3] - b[1]) / IMG;
    }
    cs_detr_loss_params lp = cs_detr_loss_default_params();
    lp.loss_class *= scale;
    lp.loss_bbox *= scale;
    lp.loss_giou *= scale;
    if (t->matching) {
        /* query q uses anchor q mod n_positions (patterns repeat the anchors) */
        const cs_tparam *pos = cs_tparams_find(&t->ps, "cellfinder.decode_head.transformer.position.weight");
        if (!pos) return cs_error(CELLSAM_ERR_MODEL, "detector has no anchor positions");
        for (int q = 0; q < Q; q++) {
            t->anchors[2 * q] = pos->w[2 * (q % c->n_positions)];
            t->anchors[2 * q + 1] = pos->w[2 * (q % c->n_positions) + 1];
        }
        lp.anchors = t->anchors;
        if (t->matching == 2) lp.dense_center = 0.5f;
    }
    double total = 0;
    for (int l = 0; l < L; l++) {
        cs_detr_loss_value v;
        rc = cs_detr_loss(t->det_logits + (size_t)l * Q * C, t->det_boxes + (size_t)l * Q * 4, Q, C, t->gt_cxcywh,
                          G, &lp, t->det_dlogits + (size_t)l * Q * C, t->det_dboxes + (size_t)l * Q * 4, NULL, &v);
        if (rc) return rc;
        total += v.total / scale;
    }
    t->loss_det += total / L;
    return cs_tdetector_backward(t->det, t->det_dlogits, t->det_dboxes, dfeat, t->tp->n_threads);
}


static int train_one_image(trainer *t, int index, float scale) {
    const cellsam_train_params *tp = t->tp;
    int frozen = !tp->train_encoders;
    cs_train_sample local, *s = &local;
    const float *emb = NULL, *feat = NULL;
    int rc;
    if (frozen && tp->cache_embeddings && t->cache_ok[index]) {
        s = &t->cache_sample[index];
        emb = t->cache_emb[index];
        feat = t->cache_feat[index];
    } else {
        cs_augment aug = tp->augment && !(frozen && tp->cache_embeddings) ? cs_augment_default() : cs_augment_none();
        aug.whole_image_max_side = tp->whole_image_max_side;
        aug.cell_diameter = (float)tp->cell_diameter;
        rc = cs_train_sample_load(&t->train, index, &aug, &t->rng, 4, &local);
        if (rc) return rc;
        if (tp->train_decoder) {
            rc = t->frozen_model ? cs_vit_forward(&t->frozen_model->sam_vit, s->sam_input, t->emb, tp->n_threads)
                                 : cs_tvit_forward(t->sam_vit, s->sam_input, t->emb, !frozen, tp->n_threads);
            emb = t->emb;
        }
        if (!rc && tp->train_detector) {
            const cellsam_model *trunk = t->frozen_det_model ? t->frozen_det_model : t->frozen_model;
            rc = trunk ? cs_vit_forward(&trunk->det_vit, s->det_input, t->feat, tp->n_threads)
                  : cs_tvit_forward(t->det_vit, s->det_input, t->feat, !frozen, tp->n_threads);
            feat = t->feat;
        }
        if (rc) {
            cs_train_sample_free(&local);
            return rc;
        }
        if (frozen && tp->cache_embeddings) {
            size_t ne = (size_t)t->arch.dec.dim * GRID * GRID, nf = (size_t)t->arch.det.backbone_dim * GRID * GRID;
            t->cache_emb[index] = emb ? cs_alloc(ne, sizeof(float)) : NULL;
            t->cache_feat[index] = feat ? cs_alloc(nf, sizeof(float)) : NULL;
            if ((emb && !t->cache_emb[index]) || (feat && !t->cache_feat[index])) {
                cs_train_sample_free(&local);
                return CELLSAM_ERR_NOMEM;
            }
            if (emb) memcpy(t->cache_emb[index], emb, ne * sizeof(float));
            if (feat) memcpy(t->cache_feat[index], feat, nf * sizeof(float));
            /* the network inputs are not needed again */
            cs_free(local.sam_input);
            cs_free(local.det_input);
            local.sam_input = local.det_input = NULL;
            t->cache_sample[index] = local;
            t->cache_ok[index] = 1;
            s = &t->cache_sample[index];
            emb = t->cache_emb[index];
            feat = t->cache_feat[index];
        }
    }
    rc = CELLSAM_OK;
    if (tp->train_decoder) {
        rc = step_decoder(t, s, emb, frozen ? NULL : t->demb, scale);
        if (!rc && !frozen && s->n_cells > 0) rc = cs_tvit_backward(t->sam_vit, t->demb, tp->n_threads);
    }
    if (!rc && tp->train_detector) {
        rc = step_detector(t, s, feat, frozen ? NULL : t->dfeat, scale);
        if (!rc && !frozen) rc = cs_tvit_backward(t->det_vit, t->dfeat, tp->n_threads);
    }
    if (s == &local) cs_train_sample_free(&local);
    t->n_loss++;
    return rc;
}

/* Mean F1@0.5 of the current weights on the validation images, through the
 * inference pipeline exactly as `cellsam segment` + `cellsam eval` run it. */
static int validate(trainer *t, double *mean_f1) {
    *mean_f1 = -1;
    if (t->val.n == 0) return CELLSAM_OK;
    cellsam_model *m = NULL;
    int rc = cellsam_model_load(t->tp->out_path, NULL, &m);
    if (rc) return rc;
    cellsam_context *ctx = NULL;
    rc = cellsam_context_new(m, &ctx);
    int n = t->val.n;
    if (t->tp->max_val_images > 0 && n > t->tp->max_val_images) n = t->tp->max_val_images;
    double sum = 0;
    int done = 0;
    for (int i = 0; i < n && !rc; i++) {
        cs_image img = {0};
        uint32_t *gt = NULL;
        rc = cs_image_read(t->val.img_paths[i], &img);
        if (!rc) rc = cs_read_label_image(t->val.mask_paths[i], img.width, img.height, &gt);
        float *hw3 = NULL;
        if (!rc) rc = cs_image_to_model_input(&img, 0, 0, img.channels > 3 ? CS_CHANNELS_GREY : CS_CHANNELS_OFFICIAL, &hw3);
        cellsam_result *res = NULL;
        if (!rc) {
            cellsam_segment_params sp = cellsam_segment_default_params();
            sp.n_threads = t->tp->n_threads;
            rc = cellsam_segment(ctx, hw3, img.width, img.height, 3, &sp, &res);
        }
        cs_match_stats st;
        if (!rc) rc = cs_evaluate_labels(gt, res->labels, (size_t)img.width * img.height, &st);
        if (!rc) {
            sum += st.f1;
            done++;
        }
        cellsam_result_free(res);
        free(hw3);
        free(gt);
        cs_image_free(&img);
    }
    cellsam_context_free(ctx);
    cellsam_model_free(m);
    if (!rc && done) *mean_f1 = sum / done;
    return rc;
}

static int alloc_scratch(trainer *t) {
    const arch_config *a = &t->arch;
    size_t ne = (size_t)a->dec.dim * GRID * GRID, nf = (size_t)a->det.backbone_dim * GRID * GRID;
    int K = t->tp->prompts_per_image;
    size_t nl = (size_t)K * LOWRES * LOWRES;
    size_t Q = (size_t)a->det.n_positions * a->det.n_patterns, L = (size_t)a->det.dec_layers;
    t->emb = cs_alloc(ne, sizeof(float));
    t->demb = cs_alloc(ne, sizeof(float));
    t->feat = cs_alloc(nf, sizeof(float));
    t->dfeat = cs_alloc(nf, sizeof(float));
    t->logits = cs_alloc(nl, sizeof(float));
    t->dlogits = cs_alloc(nl, sizeof(float));
    t->iou = cs_alloc((size_t)K, sizeof(float));
    t->diou = cs_alloc((size_t)K, sizeof(float));
    t->target = cs_alloc((size_t)LOWRES * LOWRES, sizeof(float));
    t->dice_grad = cs_alloc((size_t)LOWRES * LOWRES, sizeof(float));
    t->det_logits = cs_alloc(L * Q * (size_t)a->det.n_classes, sizeof(float));
    t->det_dlogits = cs_alloc(L * Q * (size_t)a->det.n_classes, sizeof(float));
    t->det_boxes = cs_alloc(L * Q * 4, sizeof(float));
    t->det_dboxes = cs_alloc(L * Q * 4, sizeof(float));
    t->gt_cxcywh = cs_alloc((size_t)IMG * IMG / 4 * 4, sizeof(float)); /* >= any cell count x 4 */
    t->boxes = cs_alloc((size_t)K * 4, sizeof(float));
    t->anchors = cs_alloc(Q * 2, sizeof(float));
    if (!t->emb || !t->demb || !t->feat || !t->dfeat || !t->logits || !t->dlogits || !t->iou || !t->diou ||
        !t->target || !t->dice_grad || !t->det_logits || !t->det_dlogits || !t->det_boxes || !t->det_dboxes || !t->gt_cxcywh ||
        !t->boxes || !t->anchors)
        return CELLSAM_ERR_NOMEM;
    if (!t->tp->train_encoders && t->tp->cache_embeddings) {
        size_t n = (size_t)(t->train.n > 0 ? t->train.n : 1);
        t->cache_emb = calloc(n, sizeof *t->cache_emb);
        t->cache_feat = calloc(n, sizeof *t->cache_feat);
        t->cache_sample = calloc(n, sizeof *t->cache_sample);
        t->cache_ok = calloc(n, sizeof *t->cache_ok);
        if (!t->cache_emb || !t->cache_feat || !t->cache_sample || !t->cache_ok)
            return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    return CELLSAM_OK;
}

int cellsam_train(const cellsam_train_params *tp, cellsam_train_report *report_out) {
    cellsam_train_report run; /* kept up to date for tp->progress, copied out at the end */
    memset(&run, 0, sizeof run);
    run.val_f1 = -1;
    cellsam_train_report *report = &run;
    if (report_out) *report_out = run;
    if (!tp || !tp->data_dir || !tp->out_path)
        return cs_error(CELLSAM_ERR_INVALID, "training needs a data folder and an output path");
    if (tp->prompts_per_image < 1 || tp->prompts_per_image > 256 || tp->images_per_step < 1 ||
        tp->images_per_step > 1024 || tp->epochs < 0 || tp->n_threads < 1 || !(tp->lr > 0) ||
        (!tp->train_decoder && !tp->train_detector) || !(tp->box_jitter >= 0 && tp->box_jitter <= 0.5f))
        return cs_error(CELLSAM_ERR_INVALID, "invalid training parameters");
    if (tp->anchor_matching < -1 || tp->anchor_matching > 2)
        return cs_error(CELLSAM_ERR_INVALID, "detector matching %d is not -1 (the model's), 0, 1 or 2",
                        tp->anchor_matching);
    if (tp->cell_diameter && (tp->cell_diameter < 4 || tp->cell_diameter > 1024)) /* the metadata's range */
        return cs_error(CELLSAM_ERR_INVALID, "training cell diameter %d is not within 4..1024 network pixels",
                        tp->cell_diameter);
    double t0 = cs_now_seconds();
    trainer T;
    char *sp = NULL; /* optimiser state path, freed at done */
    memset(&T, 0, sizeof T);
    trainer *t = &T;
    t->tp = tp;
    cs_tparams_init(&t->ps);
    int rc = tp->init_model ? arch_from_checkpoint(tp->init_model, &t->arch) : arch_from_name(tp, &t->arch);
    if (rc) return rc;
    if (tp->init_model && tp->detector_from) {
        /* the CellFinder comes from another file, and so do its shapes (a widened trunk, another
         * query count); its ViT shares the head count of the model's (one vit_heads) */
        arch_config da;
        rc = arch_from_checkpoint(tp->detector_from, &da);
        if (!rc && da.vit_heads != t->arch.vit_heads)
            rc = cs_error(CELLSAM_ERR_MODEL, "%s: its ViTs have %d heads, %s's have %d", tp->detector_from, da.vit_heads,
                          tp->init_model, t->arch.vit_heads);
        if (rc) {
            cs_error_prefix(rc, "--detector-from");
            return rc;
        }
        t->arch.det_vit = da.det_vit;
        t->arch.det = da.det;
    }
    /* fine-tuning with another number of queries: the head's weights do not depend on it,
     * only the anchor table does, which then starts as a fresh grid */
    const char *anchor_table = "cellfinder.decode_head.transformer.position.weight";
    int new_anchors = tp->init_model && tp->n_queries > 0 && tp->n_queries != t->arch.det.n_positions;
    if (new_anchors) {
        if (tp->n_queries > 10000) return cs_error(CELLSAM_ERR_INVALID, "%d queries (at most 10000)", tp->n_queries);
        t->arch.det.n_positions = tp->n_queries;
    }
    cs_rng_seed(&t->rng, tp->seed);
    rc = cs_tvit_create(&t->ps, "model_cp.image_encoder.", &t->arch.sam_vit, &t->rng, &t->sam_vit);
    if (!rc) rc = cs_tdecoder_create(&t->ps, "model_cp.", &t->arch.dec, &t->rng, &t->dec);
    if (!rc) rc = cs_tvit_create(&t->ps, "cellfinder.decode_head.backbone.body.", &t->arch.det_vit, &t->rng, &t->det_vit);
    if (!rc) rc = cs_tdetector_create(&t->ps, "cellfinder.decode_head.", &t->arch.det, &t->rng, &t->det);
    if (rc) goto done;
    /* weights to start from: the run being resumed, else the fine-tuning checkpoint */
    sp = state_path(tp->out_path);
    if (!sp) {
        rc = CELLSAM_ERR_NOMEM;
        goto done;
    }
    int resuming = tp->resume && file_exists(tp->out_path) && file_exists(sp);
    const char *start = resuming ? tp->out_path : tp->init_model;
    if (!start) {
        cs_tdetector_init_local(t->det, 0);
    } else {
        cs_weights *w = NULL;
        size_t n_loaded = 0, n_missing = 0;
        rc = cs_weights_open(start, &w);
        /* a resumed run already has the new table */
        const char *except = new_anchors && !resuming ? anchor_table : NULL;
        /* a CellFinder taken from elsewhere is loaded below, with its own shapes */
        const char *only = !resuming && tp->detector_from ? "model_cp." : NULL;
        if (!rc) rc = cs_tparams_load_except(&t->ps, w, only, except, &n_loaded, &n_missing);
        /* a fine-tuned model keeps its starting point's recommendations */
        for (int h = 0; !rc && h < N_HINTS; h++) take_hint(t, w, h);
        cs_weights_free(w);
        if (!rc && n_missing)
            rc = cs_error(CELLSAM_ERR_MODEL, "%s lacks %zu of the %zu trainable tensors", start, n_missing, t->ps.n);
        if (rc) {
            goto done;
        }
    }
    if (!resuming && tp->detector_from) {
        cs_weights *w = NULL;
        size_t n_loaded = 0, n_missing = 0;
        rc = cs_weights_open(tp->detector_from, &w);
        if (!rc)
            rc = cs_tparams_load_except(&t->ps, w, "cellfinder.", new_anchors ? anchor_table : NULL, &n_loaded,
                                        &n_missing);
        if (!rc) { /* the NMS hint and the targets' record travel with the detector */
            take_hint(t, w, HINT_BOX_NMS);
            take_hint(t, w, HINT_TARGETS);
        }
        cs_weights_free(w);
        if (!rc && (n_missing || !n_loaded))
            rc = cs_error(CELLSAM_ERR_MODEL, "%s lacks %zu of the CellFinder's trainable tensors", tp->detector_from,
                          n_missing ? n_missing : (size_t)1);
        if (rc) {
            cs_error_prefix(rc, "--detector-from");
            goto done;
        }
        tlog(t, "CellFinder taken from %s (%zu tensors)", tp->detector_from, n_loaded);
    }
    /* -1: the targets the starting detector was trained with: those its metadata records
     * (models trained since 2026-11-27), else inferred from its box NMS. A model that
     * recommends one was trained one-to-many (dense), and Hungarian one-to-one targets
     * would retrain it to score one box per cell that its NMS then no longer expects;
     * the official checkpoint recommends none and was trained with Hungarian matching. */
    t->matching = tp->anchor_matching;
    if (t->matching < 0) {
        for (int m = 0; m < 3; m++)
            if (!strcmp(t->hint[HINT_TARGETS], cs_detector_targets[m])) t->matching = m;
        if (t->matching >= 0) {
            if (tp->train_detector)
                tlog(t, "detector targets: %s, as the starting model's (recorded in its metadata)",
                     cs_detector_targets[t->matching]);
        } else {
            t->matching = atof(t->hint[HINT_BOX_NMS]) > 0 ? 2 : 0; /* "" reads as 0 */
            if (tp->train_detector)
                tlog(t, "detector targets: %s, as the starting model's (box NMS %s)", cs_detector_targets[t->matching],
                     t->matching == 2 ? t->hint[HINT_BOX_NMS] : "none");
        }
    }
    if (tp->train_detector) {
        snprintf(t->hint[HINT_TARGETS], sizeof t->hint[HINT_TARGETS], "%s", cs_detector_targets[t->matching]);
        if (t->matching == 2)
            snprintf(t->hint[HINT_BOX_NMS], sizeof t->hint[HINT_BOX_NMS], "%s", DENSE_TARGETS_BOX_NMS);
    }
    if (tp->whole_image_max_side > 0) /* trained on whole images: segment them whole */
        snprintf(t->hint[HINT_WHOLE_MAX], sizeof t->hint[HINT_WHOLE_MAX], "%d", tp->whole_image_max_side);
    if (tp->cell_diameter > 0) { /* trained at cell size: segment at cell size */
        snprintf(t->hint[HINT_CELL_DIAMETER], sizeof t->hint[HINT_CELL_DIAMETER], "%d", tp->cell_diameter);
        snprintf(t->hint[HINT_SIZING], sizeof t->hint[HINT_SIZING], "auto");
    }
    if (!resuming && tp->reset_detector_head) {
        /* a fresh head from the same initialisers, copied over the loaded one */
        cs_tparams fresh;
        cs_tparams_init(&fresh);
        cs_tdetector *tmp = NULL;
        cs_rng r;
        cs_rng_seed(&r, tp->seed + 17);
        rc = cs_tdetector_create(&fresh, "cellfinder.decode_head.", &t->arch.det, &r, &tmp);
        if (!rc) cs_tdetector_init_local(tmp, 0);
        for (size_t i = 0; !rc && i < fresh.n; i++) {
            cs_tparam *dst = cs_tparams_find(&t->ps, fresh.items[i].name);
            if (dst && dst->n == fresh.items[i].n) memcpy(dst->w, fresh.items[i].w, dst->n * sizeof(float));
        }
        cs_tdetector_free(tmp);
        cs_tparams_free(&fresh);
        if (rc) goto done;
    }
    if (!resuming && tp->trunk_from_sam && (t->arch.det_vit.dim != t->arch.sam_vit.dim ||
                                            t->arch.det_vit.mlp != t->arch.sam_vit.mlp ||
                                            t->arch.det_vit.depth != t->arch.sam_vit.depth)) {
        rc = cs_error(CELLSAM_ERR_INVALID, "--trunk-from-sam: the CellFinder trunk (dim %d, depth %d) is not shaped "
                      "like the SAM encoder (dim %d, depth %d)", t->arch.det_vit.dim, t->arch.det_vit.depth,
                      t->arch.sam_vit.dim, t->arch.sam_vit.depth);
        goto done;
    }
    if (!resuming && tp->trunk_from_sam) {
        const char *trunk = "cellfinder.decode_head.backbone.body.";
        size_t tl = strlen(trunk);
        int copied = 0;
        for (size_t i = 0; i < t->ps.n; i++) {
            cs_tparam *dst = &t->ps.items[i];
            if (strncmp(dst->name, trunk, tl)) continue;
            char src_name[512];
            snprintf(src_name, sizeof src_name, "model_cp.image_encoder.%s", dst->name + tl);
            const cs_tparam *src = cs_tparams_find(&t->ps, src_name);
            if (src && src->n == dst->n) {
                memcpy(dst->w, src->w, dst->n * sizeof(float));
                copied++;
            }
        }
        /* The two branches see the same [0,1] map up to the SAM branch's final
         * (x - mean/255)/(std/255): fold that affine map into the trunk's patch
         * embedding so its first layer starts where the SAM encoder's is. */
        static const double pixel_mean[3] = {123.675, 116.28, 103.53}, pixel_std[3] = {58.395, 57.12, 57.375};
        char wn[128], bn[128];
        snprintf(wn, sizeof wn, "%spatch_embed.proj.weight", trunk);
        snprintf(bn, sizeof bn, "%spatch_embed.proj.bias", trunk);
        cs_tparam *pw = cs_tparams_find(&t->ps, wn), *pb = cs_tparams_find(&t->ps, bn);
        if (copied && pw && pb && pw->ndim == 4 && pw->shape[1] == 3) {
            size_t D = (size_t)pw->shape[0], kk = (size_t)(pw->shape[2] * pw->shape[3]);
            for (size_t o = 0; o < D; o++)
                for (size_t c = 0; c < 3; c++) {
                    double inv = 255.0 / pixel_std[c], shift = -pixel_mean[c] / pixel_std[c];
                    float *w = pw->w + (o * 3 + c) * kk;
                    double sum = 0;
                    for (size_t k = 0; k < kk; k++) sum += w[k];
                    pb->w[o] += (float)(sum * shift);
                    for (size_t k = 0; k < kk; k++) w[k] = (float)(w[k] * inv);
                }
        }
        tlog(t, "CellFinder trunk initialised from the SAM encoder (%d tensors)", copied);
    }
    cs_tdetector_sync_shared(t->det);
    if (!tp->train_encoders && tp->init_model && !tp->trunk_from_sam) {
        /* Frozen encoders equal the fine-tuning checkpoint's: run them with the
         * inference engine, which keeps no activations (a ViT-B trainable forward
         * holds its attention buffers, several GB). */
        const int trunk_elsewhere = tp->detector_from && tp->train_detector;
        if (tp->train_decoder || (tp->train_detector && !trunk_elsewhere)) {
            rc = cellsam_model_load(tp->init_model, NULL, &t->frozen_model);
            if (!rc && !t->frozen_model->has_detector)
                rc = cs_error(CELLSAM_ERR_MODEL, "%s: no CellFinder detector", tp->init_model);
        }
        /* the trunk's weights are --detector-from's, so its features come from there */
        if (!rc && trunk_elsewhere) {
            rc = cellsam_model_load(tp->detector_from, NULL, &t->frozen_det_model);
            if (!rc && !t->frozen_det_model->has_detector)
                rc = cs_error(CELLSAM_ERR_MODEL, "%s: no CellFinder detector", tp->detector_from);
        }
        if (rc) goto done;
    }
    if (!tp->train_encoders) {
        cs_tparams_set_frozen(&t->ps, "model_cp.image_encoder.", 1);
        cs_tparams_set_frozen(&t->ps, "cellfinder.decode_head.backbone.", 1);
    }
    /* CellSAM decodes mask token 0 only: the multimask heads get no gradient, and
     * freezing them keeps weight decay from eroding them (the labeling tool uses them) */
    for (int k = 1; k < t->arch.dec.n_mask_tokens; k++) {
        char pfx[96];
        snprintf(pfx, sizeof pfx, "model_cp.mask_decoder.output_hypernetworks_mlps.%d.", k);
        cs_tparams_set_frozen(&t->ps, pfx, 1);
    }
    if (!tp->train_decoder) cs_tparams_set_frozen(&t->ps, "model_cp.", 1);
    if (!tp->train_detector) cs_tparams_set_frozen(&t->ps, "cellfinder.", 1);
    /* data */
    rc = cs_dataset_open(tp->data_dir, &t->all);
    if (!rc) {
        if (tp->val_dir) {
            rc = cs_dataset_open(tp->val_dir, &t->val);
            if (!rc) {
                t->train = t->all;
                memset(&t->all, 0, sizeof t->all);
            }
        } else {
            rc = cs_dataset_split(&t->all, tp->val_fraction, tp->seed, &t->train, &t->val);
        }
    }
    if (!rc && t->train.n == 0) rc = cs_error(CELLSAM_ERR_INVALID, "%s: no training images left after the split", tp->data_dir);
    if (!rc) rc = alloc_scratch(t);
    if (rc) {
        goto done;
    }
    int steps_per_epoch = (t->train.n + tp->images_per_step - 1) / tp->images_per_step;
    int64_t total_steps = (int64_t)steps_per_epoch * tp->epochs;
    if (tp->max_steps > 0) total_steps = tp->max_steps; /* --steps wins over --epochs */
    cs_adamw_params op = cs_adamw_default_params();
    op.lr = tp->lr;
    op.weight_decay = tp->weight_decay;
    op.clip_norm = 0; /* clipped per branch (clip_group) before each step */
    op.warmup_steps = tp->warmup_steps;
    op.total_steps = (int)total_steps;
    op.schedule = CS_SCHED_COSINE;
    cs_adamw_init(&t->opt, &op);
    if (resuming) {
        rc = cs_adamw_load(&t->opt, &t->ps, sp);
        if (rc) {
            goto done;
        }
        t->opt.p.total_steps = (int)total_steps; /* a longer run may extend the schedule */
        t->opt.p.clip_norm = 0;
        t->opt.p.lr = tp->lr;
        t->opt.p.warmup_steps = tp->warmup_steps;
        tlog(t, "resuming %s at step %lld", tp->out_path, (long long)t->opt.step);
    }
    report->train_images = t->train.n;
    report->val_images = t->val.n;
    tlog(t, "training %zu parameters (%zu trainable) on %d images, %d held out; %d steps of %d images",
         cs_tparams_count_values(&t->ps, 0), cs_tparams_count_values(&t->ps, 1), t->train.n, t->val.n,
         (int)total_steps, tp->images_per_step);
    report->steps = t->opt.step; /* the split and the run's length, before the first (slowest) step */
    if (tp->progress) tp->progress(report, total_steps, tp->callback_user);
    int *order = malloc((size_t)t->train.n * sizeof *order);
    if (!order) {
        rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        goto done;
    }
    int64_t images_done = 0;
    double train_seconds = 0;
    int stop = 0;
    double val_f1 = -1;
    while (!rc && !stop && t->opt.step < total_steps) {
        int epoch = (int)(t->opt.step / steps_per_epoch);
        /* the epoch's order depends only on (seed, epoch), so a resumed run continues it */
        cs_rng er;
        cs_rng_seed(&er, tp->seed * 1000003u + (uint64_t)epoch);
        for (int i = 0; i < t->train.n; i++) order[i] = i;
        for (int i = t->train.n - 1; i > 0; i--) {
            int j = (int)(cs_rng_u64(&er) % (uint64_t)(i + 1));
            int tmp = order[i];
            order[i] = order[j];
            order[j] = tmp;
        }
        /* a fresh per-step stream for augmentation and prompts, also resumable */
        for (int s = (int)(t->opt.step % steps_per_epoch); s < steps_per_epoch && !rc && !stop &&
                                                          t->opt.step < total_steps; s++) {
            cs_rng_seed(&t->rng, tp->seed * 7919u + (uint64_t)t->opt.step);
            double ts = cs_now_seconds();
            int first = s * tp->images_per_step, last = first + tp->images_per_step;
            if (last > t->train.n) last = t->train.n;
            float scale = 1.0f / (float)(last - first);
            t->loss_mask = t->loss_iou = t->loss_det = 0;
            t->n_loss = 0;
            for (int i = first; i < last && !rc; i++) rc = train_one_image(t, order[i], scale);
            if (rc) break;
            float gnorm = 0;
            float norm_sam = clip_group(&t->ps, "model_cp.", tp->clip_norm);
            float norm_det = clip_group(&t->ps, "cellfinder.", tp->clip_norm);
            int orc = cs_adamw_step(&t->opt, &t->ps, &gnorm);
            cs_tparams_zero_grad(&t->ps);
            if (orc) tlog(t, "step %lld: non-finite gradient, batch skipped", (long long)t->opt.step);
            else cs_tdetector_sync_shared(t->det);
            images_done += last - first;
            train_seconds += cs_now_seconds() - ts;
            double n = t->n_loss ? t->n_loss : 1;
            double loss = (t->loss_mask + t->loss_iou + t->loss_det) / n;
            report->last_loss = loss;
            report->steps = t->opt.step;
            report->seconds = cs_now_seconds() - t0;
            report->images_per_second = train_seconds > 0 ? images_done / train_seconds : 0;
            tlog(t, "epoch %d step %lld/%lld loss %.4f (mask %.4f iou %.4f det %.4f) |g| sam %.3g det %.3g lr %.3g %.2f img/s",
                 epoch + 1, (long long)t->opt.step, (long long)total_steps, loss, t->loss_mask / n, t->loss_iou / n,
                 t->loss_det / n, norm_sam, norm_det, cs_adamw_lr_at(&t->opt.p, t->opt.step - 1),
                 (last - first) / (cs_now_seconds() - ts));
            int at_epoch_end = t->opt.step % steps_per_epoch == 0 || t->opt.step == total_steps;
            if (tp->time_limit_s > 0 && cs_now_seconds() - t0 > tp->time_limit_s) stop = 1;
            if (tp->abort && tp->abort(tp->callback_user)) stop = report->aborted = 1;
            if (tp->progress) tp->progress(report, total_steps, tp->callback_user);
            if (at_epoch_end || stop || (tp->save_every_steps > 0 && t->opt.step % tp->save_every_steps == 0)) {
                rc = trainer_save(t);
                if (rc) break;
            }
            if (at_epoch_end) {
                /* a stop asked for by the caller skips the validation pass (a minute or more
                 * with a full-size model); the time limit keeps it, as before */
                rc = report->aborted ? CELLSAM_OK : validate(t, &val_f1);
                if (rc) break;
                if (val_f1 >= 0 && !report->aborted)
                    tlog(t, "epoch %d: validation F1@0.5 %.4f on %d images (%.0f s elapsed)", epoch + 1, val_f1,
                         t->tp->max_val_images > 0 && t->val.n > t->tp->max_val_images ? t->tp->max_val_images : t->val.n,
                         cs_now_seconds() - t0);
                report->epochs_done++;
                report->val_f1 = val_f1;
                if (tp->progress) tp->progress(report, total_steps, tp->callback_user);
            }
        }
    }
    free(order);
    report->steps = t->opt.step;
    report->seconds = cs_now_seconds() - t0;
    report->images_per_second = train_seconds > 0 ? images_done / train_seconds : 0;
    report->val_f1 = val_f1;
done:
    if (report_out) *report_out = run;
    free(sp);
    trainer_free(t);
    return rc;
}
