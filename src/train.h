/* Training on CPU: trainable parameters, backward passes, losses, optimiser and
 * data. Inference keeps its own read-only structs (model.h); training modules
 * hold their weights in a cs_tparams store under the official tensor names, so
 * a trained store saves as a checkpoint that cellsam_model_load reads as is.
 *
 * Conventions for every backward function below:
 *  - activations are float32 row-major; "tokens x channels" unless a name says chw;
 *  - parameter gradients ACCUMULATE (+=) into cs_tparam.g, so several forward
 *    passes (prompts, images of a batch) can share one optimiser step;
 *  - input gradients are WRITTEN (overwritten), never accumulated; a NULL input
 *    gradient pointer means "not needed" and skips that work. */
#ifndef CELLSAM_TRAIN_H
#define CELLSAM_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "weights.h"

/* ------------------------------------------------------------ parameters */

typedef struct {
    char *name;
    int ndim;
    int64_t shape[4];
    size_t n;        /* element count */
    float *w;        /* value */
    float *g;        /* gradient (accumulated) */
    float *m, *v;    /* AdamW moments (allocated by the optimiser on first use) */
    int frozen;      /* 1: excluded from the optimiser and from gradient clipping */
    int no_decay;    /* 1: no weight decay (norms, biases, embeddings) */
} cs_tparam;

typedef struct {
    cs_tparam *items;
    size_t n, cap;
} cs_tparams;

void cs_tparams_init(cs_tparams *ps);
void cs_tparams_free(cs_tparams *ps);
/* Add a zero-filled parameter. Names are unique; a duplicate is an error. no_decay
 * is set for 1-D tensors and for names containing "pos_embed", "rel_pos", "token",
 * "embed.weight" of embeddings ("pattern", "position", "point_embeddings"). */
cs_tparam *cs_tparams_add(cs_tparams *ps, const char *name, int ndim, const int64_t *shape);
cs_tparam *cs_tparams_find(const cs_tparams *ps, const char *name);
size_t cs_tparams_count_values(const cs_tparams *ps, int trainable_only);
void cs_tparams_zero_grad(cs_tparams *ps);
/* Freeze (1) or unfreeze (0) every parameter whose name starts with prefix. */
int cs_tparams_set_frozen(cs_tparams *ps, const char *prefix, int frozen);

/* Copy values from a checkpoint store: every parameter whose name is present is
 * shape-checked and converted to float32. A shape mismatch is an error naming the
 * tensor. n_loaded, n_missing (may be NULL) count store parameters found / absent. */
int cs_tparams_load(cs_tparams *ps, const cs_weights *w, size_t *n_loaded, size_t *n_missing);
/* The same for the parameters whose names start with prefix (NULL: all). */
int cs_tparams_load_prefix(cs_tparams *ps, const cs_weights *w, const char *prefix, size_t *n_loaded,
                           size_t *n_missing);
/* The same, leaving the tensor named `except` (may be NULL) at its initial value: a
 * re-sized anchor table when fine-tuning with another number of queries. */
int cs_tparams_load_except(cs_tparams *ps, const cs_weights *w, const char *prefix, const char *except,
                           size_t *n_loaded, size_t *n_missing);
/* Save values (not gradients) as safetensors in dtype, atomically. meta: NULL or
 * a NULL-terminated list of key, value strings stored as safetensors metadata. */
int cs_tparams_save(const cs_tparams *ps, const char *path, cs_dtype dtype, const char *const *meta);

/* A copy of `in` whose CellFinder trunk is `factor` (2-4) times as wide, computing the
 * same function up to noise of `noise` times each widened matrix's RMS, which lets the
 * copies part in training (train_widen.c). Other tensors are views into `in`, which
 * must outlive *out. */
int cs_widen_trunk(const cs_weights *in, int factor, float noise, uint64_t seed, cs_weights **out);

/* Deterministic random initialisation (splitmix64-seeded xoshiro). */
typedef struct { uint64_t s[4]; } cs_rng;
void cs_rng_seed(cs_rng *r, uint64_t seed);
uint64_t cs_rng_u64(cs_rng *r);
double cs_rng_uniform(cs_rng *r);          /* [0,1) */
double cs_rng_normal(cs_rng *r);           /* N(0,1) */
/* Fill with N(0,std) truncated to +-2 std (as timm's trunc_normal_). */
void cs_init_trunc_normal(cs_tparam *p, cs_rng *r, float std);
void cs_init_uniform(cs_tparam *p, cs_rng *r, float lo, float hi);
void cs_init_const(cs_tparam *p, float value);
/* PyTorch nn.Linear / nn.Conv default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = n / shape[0]. */
void cs_init_kaiming_uniform(cs_tparam *p, cs_rng *r);
void cs_init_xavier_uniform(cs_tparam *p, cs_rng *r);

/* -------------------------------------------------- primitive operations
 * (train_ops.c). Forward functions that a backward needs save what it needs in
 * caller-provided buffers. */

/* Y[M,N] = X[M,K] W^T + b (W: PyTorch (N,K)); b may be NULL. */
void cs_linear_fwd(const float *X, int M, int K, const cs_tparam *W, const cs_tparam *b, int N,
                   float *Y, int n_threads);
/* dX[M,K] = dY W (written; may be NULL); dW += dY^T X; db += column sums of dY. */
void cs_linear_bwd(const float *X, int M, int K, cs_tparam *W, cs_tparam *b, int N, const float *dY,
                   float *dX, int n_threads);

/* LayerNorm over rows of length dim. mean/rstd (rows floats each) are saved for the
 * backward. in may equal out. */
void cs_layernorm_fwd(const float *in, float *out, int rows, int dim, const cs_tparam *gamma,
                      const cs_tparam *beta, float eps, float *mean, float *rstd);
/* in: the forward input (not overwritten by it). din written (may alias dout). */
void cs_layernorm_bwd(const float *in, const float *dout, int rows, int dim, cs_tparam *gamma,
                      cs_tparam *beta, const float *mean, const float *rstd, float *din);

/* GroupNorm on channel-first (C, HW) with `groups` groups; mean/rstd hold groups floats. */
void cs_groupnorm_fwd(const float *in, float *out, int C, int HW, int groups, const cs_tparam *gamma,
                      const cs_tparam *beta, float eps, float *mean, float *rstd);
void cs_groupnorm_bwd(const float *in, const float *dout, int C, int HW, int groups,
                      cs_tparam *gamma, cs_tparam *beta, const float *mean, const float *rstd,
                      float *din);

/* Elementwise activations: backward takes the forward INPUT x. */
void cs_gelu_fwd(const float *x, float *y, size_t n);  /* exact erf GELU; y may equal x */
void cs_gelu_bwd(const float *x, const float *dy, float *dx, size_t n);
void cs_relu_fwd(const float *x, float *y, size_t n);
void cs_relu_bwd(const float *x, const float *dy, float *dx, size_t n);
void cs_sigmoid_fwd(const float *x, float *y, size_t n);
/* backward of sigmoid from its OUTPUT y */
void cs_sigmoid_bwd_from_y(const float *y, const float *dy, float *dx, size_t n);

/* Row softmax backward from the output p: dx = p * (dp - sum(dp*p)). */
void cs_softmax_bwd(const float *p, const float *dp, float *dx, int rows, int n);

/* One attention head: P = softmax(scale * q k^T + bias), o = P v.
 * q: nq x dh (row stride ldq), k, v: nk x dh (strides ldk, ldv), o: nq x dh (ldo).
 * bias: nq x nk or NULL. P (nq x nk) is written and must be kept for the backward. */
void cs_attn_head_fwd(const float *q, int ldq, const float *k, int ldk, const float *v, int ldv,
                      int nq, int nk, int dh, float scale, const float *bias, float *P, float *o,
                      int ldo, int n_threads);
/* Gradients of one head, written with the same strides as the inputs: dq, dk, dv
 * (each may be NULL). dbias (nq x nk, may be NULL) receives dL/d(logits), which is
 * also what any additive bias of the logits gets. scratch: nq x nk floats. */
void cs_attn_head_bwd(const float *q, int ldq, const float *k, int ldk, const float *v, int ldv,
                      int nq, int nk, int dh, float scale, const float *P, const float *dout,
                      int lddo, float *dq, float *dk, float *dv, float *dbias, float *scratch,
                      int n_threads);

/* 2-D convolution, channel-first, stride 1, zero padding pad <= (k-1)/2, square
 * kernel ksize, output (Cout, H+2pad-k+1, W+2pad-k+1), weight (Cout, Cin, k, k),
 * bias may be NULL. col: Cin*k*k x H*W scratch floats (unused for 1x1). */
void cs_conv2d_fwd(const float *in, int Cin, int H, int W, const cs_tparam *weight,
                   const cs_tparam *bias, int Cout, int ksize, int pad, float *out, float *col,
                   int n_threads);
void cs_conv2d_bwd(const float *in, int Cin, int H, int W, cs_tparam *weight, cs_tparam *bias,
                   int Cout, int ksize, int pad, const float *dout, float *din, float *col,
                   int n_threads);
/* Transposed conv kernel 2 stride 2 (SAM upscaler): (Cin,H,W) -> (Cout,2H,2W),
 * weight (Cin, Cout, 2, 2), bias (Cout) may be NULL. */
void cs_convT2x2_fwd(const float *in, int Cin, int H, int W, const cs_tparam *weight,
                     const cs_tparam *bias, int Cout, float *out, int n_threads);
void cs_convT2x2_bwd(const float *in, int Cin, int H, int W, cs_tparam *weight, cs_tparam *bias,
                     int Cout, const float *dout, float *din, int n_threads);
/* Bilinear resize (align_corners=False, no antialias) of (C,H,W) to (C,OH,OW) and its
 * adjoint (dout -> din, written). */
void cs_bilinear_fwd(const float *in, int C, int H, int W, float *out, int OH, int OW);
void cs_bilinear_bwd(const float *dout, int C, int H, int W, int OH, int OW, float *din);

/* ------------------------------------------------------------------ losses
 * (train_loss.c). Each returns the loss value (double) and, when grad != NULL,
 * WRITES d(scale*loss)/d(input) into grad. */

/* Sum over n elements of the sigmoid focal loss (alpha, gamma) of logits x against
 * targets t in [0,1]: -alpha_t (1-p_t)^gamma log(p_t). */
double cs_loss_sigmoid_focal(const float *x, const float *t, size_t n, float alpha, float gamma,
                             float scale, float *grad);
/* 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1), p = sigmoid(x) (SAM's dice). */
double cs_loss_dice(const float *x, const float *t, size_t n, float scale, float *grad);
/* sum (a - b)^2 over n. */
double cs_loss_mse(const float *a, const float *b, size_t n, float scale, float *grad);
/* Boxes are normalised (cx, cy, w, h). L1 summed over 4 coordinates. */
double cs_loss_box_l1(const float *pred, const float *target, float scale, float *grad);
/* 1 - GIoU of two (cx,cy,w,h) boxes. */
double cs_loss_giou(const float *pred, const float *target, float scale, float *grad);

typedef struct {
    float cost_class, cost_bbox, cost_giou;   /* matcher weights: 2, 5, 2 (Anchor-DETR) */
    float loss_class, loss_bbox, loss_giou;   /* loss weights: 2, 5, 2 */
    float focal_alpha, focal_gamma;           /* 0.25, 2 */
    int target_class;                         /* class column a cell is (1) */
    /* Static matching (NULL = DETR's Hungarian matching on the prediction costs):
     * Q x 2 anchor points (cx, cy); each ground-truth box is matched, one to one
     * and optimally, to the anchors nearest its centre (L1). The assignment does not
     * move with the predictions, which makes training from scratch converge in far
     * fewer steps; the loss terms are unchanged. */
    const float *anchors;
    /* With anchors: one-to-many targets (0 = one to one). Every query whose anchor lies
     * in the central part of a box (the box shrunk by dense_center, e.g. 0.5) is a
     * positive for it (the nearest centre wins), and each box keeps at least its
     * nearest anchor. Duplicates are left to the pipeline's mask IoU filter, as
     * FCOS-style detectors leave them to NMS; losses are normalised by the positives. */
    float dense_center;
} cs_detr_loss_params;
cs_detr_loss_params cs_detr_loss_default_params(void);

typedef struct {
    double total, cls, bbox, giou;
    int n_matched; /* queries with a positive target */
} cs_detr_loss_value;

/* Anchor-DETR set loss for one image and one decoder layer: Hungarian matching of
 * Q predictions (logits Q x n_classes, boxes Q x 4 normalised cxcywh) to G ground
 * truth boxes (G x 4 cxcywh, G may be 0), sigmoid focal loss on every query and
 * class (target 1 only at the matched query's target_class), L1 and GIoU on
 * matched pairs; all normalised by max(G,1) as DETR does. Writes dlogits, dboxes
 * (may be NULL) and, if match != NULL, match[g] = query matched to gt g. */
int cs_detr_loss(const float *logits, const float *boxes, int Q, int n_classes, const float *gt_boxes,
                 int G, const cs_detr_loss_params *p, float *dlogits, float *dboxes, int *match,
                 cs_detr_loss_value *value);

/* --------------------------------------------------------------- optimiser
 * (train_optim.c) */

typedef enum { CS_SCHED_CONSTANT = 0, CS_SCHED_COSINE = 1, CS_SCHED_STEP = 2 } cs_schedule_kind;

typedef struct {
    float lr;            /* peak learning rate */
    float beta1, beta2, eps;
    float weight_decay;  /* decoupled (AdamW); not applied where no_decay */
    float clip_norm;     /* global L2 norm of trainable gradients; <= 0: off */
    int warmup_steps;    /* linear warm-up from 0 */
    int total_steps;     /* for the cosine schedule */
    cs_schedule_kind schedule;
    float min_lr_ratio;  /* cosine floor as a fraction of lr */
    int step_every;      /* step schedule: multiply by step_gamma every step_every steps */
    float step_gamma;
} cs_adamw_params;
cs_adamw_params cs_adamw_default_params(void);

typedef struct {
    cs_adamw_params p;
    int64_t step;        /* optimiser steps taken */
} cs_adamw;

void cs_adamw_init(cs_adamw *opt, const cs_adamw_params *p);
float cs_adamw_lr_at(const cs_adamw_params *p, int64_t step);
/* Clip, update every non-frozen parameter and increment step. Returns the global
 * gradient norm before clipping in *grad_norm (may be NULL). Non-finite gradients
 * make the step a no-op returning CELLSAM_ERR_INVALID (training can skip the batch). */
int cs_adamw_step(cs_adamw *opt, cs_tparams *ps, float *grad_norm);
/* Optimiser state: moments of every parameter plus step and hyper-parameters, as
 * safetensors next to the model ("adam_m.<name>", "adam_v.<name>", "adam.step").
 * Saving is atomic. Loading checks names and shapes against ps. */
int cs_adamw_save(const cs_adamw *opt, const cs_tparams *ps, const char *path);
int cs_adamw_load(cs_adamw *opt, cs_tparams *ps, const char *path);

/* ------------------------------------------------------ trainable modules
 * Each module registers its parameters in a cs_tparams under the official names
 * (prefix + name, exactly as model.c binds them), randomly initialised when newly
 * added and left as they are when the store already holds them (so
 * cs_tparams_load before or after create gives a fine-tuning start). A forward
 * with train=1 keeps the activations its backward needs until the next forward. */

/* SAM ViT (train_vit.c): the SAM image encoder (with neck) or the CellFinder
 * trunk (out_chans = 0, no neck). */
typedef struct {
    int img_size, patch;      /* 1024, 16 */
    int dim, depth, heads, mlp;
    int window;               /* 14 */
    int n_global;             /* blocks with global attention */
    int global_idx[16];
    int out_chans;            /* neck channels; 0 = no neck */
} cs_tvit_config;
typedef struct cs_tvit cs_tvit;
/* prefix: "model_cp.image_encoder." or "cellfinder.decode_head.backbone.body." */
int cs_tvit_create(cs_tparams *ps, const char *prefix, const cs_tvit_config *cfg, cs_rng *rng,
                   cs_tvit **out);
void cs_tvit_free(cs_tvit *v);
/* input 3 x img x img; out (out_chans or dim) x grid x grid, as cs_vit_forward. */
int cs_tvit_forward(cs_tvit *v, const float *input_chw, float *out_chw, int train, int n_threads);
int cs_tvit_backward(cs_tvit *v, const float *dout_chw, int n_threads);
/* Bytes of activations a train=1 forward keeps. */
size_t cs_tvit_activation_bytes(const cs_tvit *v);

/* SAM prompt encoder + mask decoder for box prompts (train_decoder.c). */
typedef struct {
    int dim;              /* P: prompt/transformer width */
    int depth, heads, mlp;
    int n_mask_tokens;    /* 4 */
    int iou_hidden;
    int downsample;       /* attention_downsample_rate 2 */
    int grid;             /* 64 */
    int img_size;         /* 1024 */
    int mask_in_chans;    /* 16 (mask-downscaling layers: registered, frozen, unused) */
} cs_tdecoder_config;
typedef struct cs_tdecoder cs_tdecoder;
/* prefix: "model_cp." (registers prompt_encoder.* and mask_decoder.*). */
int cs_tdecoder_create(cs_tparams *ps, const char *prefix, const cs_tdecoder_config *cfg, cs_rng *rng,
                       cs_tdecoder **out);
void cs_tdecoder_free(cs_tdecoder *d);
/* n box prompts (x1,y1,x2,y2 in the img_size frame) on one image embedding
 * (P x grid x grid). Outputs of mask token 0 (CellSAM's single-mask output):
 * logits n x (4 grid) x (4 grid), iou n. */
int cs_tdecoder_forward(cs_tdecoder *d, const float *image_emb_chw, const float *boxes_xyxy, int n,
                        float *logits, float *iou, int train, int n_threads);
/* dimage_emb_chw (P x grid x grid) may be NULL (frozen encoder). */
int cs_tdecoder_backward(cs_tdecoder *d, const float *dlogits, const float *diou, float *dimage_emb_chw,
                         int n_threads);
/* Bytes a train=1 forward of n prompts keeps (plus per-thread backward buffers). */
size_t cs_tdecoder_activation_bytes(const cs_tdecoder *d, int n, int n_threads);

/* CellFinder head: Anchor-DETR with RCDA (train_detector.c). */
typedef struct {
    int backbone_dim;     /* E: trunk width */
    int d_model;          /* 256 */
    int heads;
    int enc_layers, dec_layers;
    int ffn;
    int n_positions;      /* anchor points */
    int n_patterns;       /* 1 */
    int n_classes;        /* 2 */
    int grid;             /* 64 */
} cs_tdetector_config;
typedef struct cs_tdetector cs_tdetector;
/* prefix: "cellfinder.decode_head." */
int cs_tdetector_create(cs_tparams *ps, const char *prefix, const cs_tdetector_config *cfg, cs_rng *rng,
                        cs_tdetector **out);
void cs_tdetector_free(cs_tdetector *d);
/* features E x grid x grid. Outputs of every decoder layer (the last slice is the
 * model output): logits_all L x Q x n_classes (before sigmoid), boxes_all L x Q x 4
 * normalised (cx,cy,w,h) after sigmoid; Q = n_positions * n_patterns. */
int cs_tdetector_forward(cs_tdetector *d, const float *feat_chw, float *logits_all, float *boxes_all,
                         int train, int n_threads);
/* Gradients for every layer's outputs (zeros where a layer has no loss). */
int cs_tdetector_backward(cs_tdetector *d, const float *dlogits_all, const float *dboxes_all,
                          float *dfeat_chw, int n_threads);
/* The class and box heads are one module shared by all decoder layers, stored under
 * indices 0..L-1: copy 0 trains (copies 1..L-1 are frozen) and this copies it onto
 * the others; call after every optimiser step so a saved file is consistent. */
void cs_tdetector_sync_shared(cs_tdetector *d);
/* Fresh heads: adapt_pos1d and the decoder cross-attention start so that each query
 * attends to a bump about `width` feature cells (<= 0: 1.5) around its anchor, and
 * query self-attention starts as the identity. */
void cs_tdetector_init_local(cs_tdetector *d, float width);
/* Bytes of activations kept for the backward (and of scratch), once allocated. */
size_t cs_tdetector_activation_bytes(const cs_tdetector *d, size_t *scratch_bytes);

/* -------------------------------------------------------------------- data
 * (train_data.c) Folders of NAME_img.png + NAME_masks.png pairs. */

typedef struct {
    char **img_paths, **mask_paths;
    int n;
} cs_dataset;

/* Recursively collect every NAME_img.<png|tif|tiff> with a NAME_masks.<png|tif|tiff>
 * beside it, sorted by path. No pair found -> CELLSAM_ERR_INVALID naming dir. */
int cs_dataset_open(const char *dir, cs_dataset *ds);
void cs_dataset_free(cs_dataset *ds);
/* Deterministic hold-out split: an image goes to val when a hash of its path
 * (with seed) falls under val_fraction; both parts are non-empty when n >= 2. */
int cs_dataset_split(const cs_dataset *all, float val_fraction, uint64_t seed, cs_dataset *train,
                     cs_dataset *val);

typedef struct {
    int flips;              /* random horizontal / vertical flips */
    int rot90;              /* random multiples of 90 degrees */
    float gain_lo, gain_hi; /* intensity scaling factor range (1,1 = off) */
    float gamma_lo, gamma_hi; /* intensity gamma range on [0,1]-scaled data (1,1 = off) */
    float crop_lo, crop_hi; /* random crop side as a fraction of the image side (1,1 = off) */
    float scale_lo, scale_hi; /* random rescale of the crop before the network resize (1,1 = off) */
    int whole_image_max_side; /* sample geometry, not augmentation: 0 = a tile of the tiler;
                                 N = the whole (augmented) image without halo when its sides
                                 are at most N, as whole-image inference sees it */
    float cell_diameter;      /* sample geometry: > 0 = at cell size, as `segment --diameter`
                                 sees the image: zoom = cell_diameter / (median cell diameter of
                                 the masks) x a draw from the scale range, an S x S window
                                 (S = 1024 / zoom) at a random place, edge-padded to S x S when
                                 the image is smaller (crop range and whole_image_max_side unused) */
} cs_augment;
cs_augment cs_augment_default(void); /* training augmentation */
cs_augment cs_augment_none(void);

typedef struct {
    float *sam_input;    /* 3 x 1024 x 1024: SAM branch, as cellsam segment feeds it */
    float *det_input;    /* 3 x 1024 x 1024: CellFinder branch */
    int32_t *labels;     /* 1024 x 1024 instance ids after augmentation and resize (nearest) */
    int n_cells;
    float *boxes_xyxy;   /* n_cells x 4 in the 1024 frame (pixel-edge coordinates) */
    int H, W;            /* the tile resized to 1024: a tiler block plus its 56-px halo,
                            wrapped at image borders exactly as tiled inference reads it */
} cs_train_sample;

/* Load pair `index`, apply aug (with rng; cs_augment_none for validation), then
 * the same channel handling and pre-processing as tiled inference on one tile (a
 * random tile of larger images with an rng, the middle one without).
 * Cells are renumbered 1..n_cells; those under min_area pixels (in the 1024
 * frame) are dropped. */
int cs_train_sample_load(const cs_dataset *ds, int index, const cs_augment *aug, cs_rng *rng,
                         int min_area, cs_train_sample *out);
void cs_train_sample_free(cs_train_sample *s);
/* A label image of exactly W x H (one channel, integers 0..2^24-1, checked pixel
 * by pixel) as malloc'd uint32 ids: training targets and validation ground truth. */
int cs_read_label_image(const char *path, int W, int H, uint32_t **out);
/* Target mask of cell `id` (1-based) at side x side (nearest sampling of labels). */
void cs_train_sample_mask(const cs_train_sample *s, int id, int side, float *out);

#endif
