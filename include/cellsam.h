/* cellsam: CellSAM (a foundation model for cell segmentation) in C.
 *
 * One model handle (read-only after load, shared by threads) and one context per
 * thread (scratch memory and the current image embedding). Every call returns an
 * int status (CELLSAM_OK or a CELLSAM_ERR_* code); cellsam_last_error() gives a
 * one-line message for the calling thread. Everything the library allocates and
 * hands out is released with a *_free function.
 */
#ifndef CELLSAM_H
#define CELLSAM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CELLSAM_VERSION "0.1.0"

enum cellsam_status {
    CELLSAM_OK = 0,
    CELLSAM_ERR_IO = 1,          /* cannot open, read or write a file */
    CELLSAM_ERR_FORMAT = 2,      /* malformed or truncated input */
    CELLSAM_ERR_NOMEM = 3,       /* allocation failed */
    CELLSAM_ERR_INVALID = 4,     /* invalid argument */
    CELLSAM_ERR_UNSUPPORTED = 5, /* valid input that this build cannot handle */
    CELLSAM_ERR_LIMIT = 6,       /* a size limit was exceeded */
    CELLSAM_ERR_MODEL = 7,       /* checkpoint lacks tensors or has wrong shapes */
    CELLSAM_ERR_ABORTED = 8      /* stopped by the caller's abort callback */
};

const char *cellsam_last_error(void);
const char *cellsam_status_string(int status);
/* One line about the arithmetic this process uses: the BLAS kernels (chosen at the first
 * model load; see the README on OpenBLAS and AVX-512) and whether the CPU has AVX512-BF16. */
const char *cellsam_system_info(void);
/* 1 when the CPU runs bfloat16 products natively (AVX512-BF16), so compute_dtype = BF16 is
 * fast; 0 when that path is emulated (same results, slower than float32). */
int cellsam_has_native_bf16(void);
/* Free a buffer returned by the library (logits, labels, ...). */
void cellsam_free(void *p);

/* ------------------------------------------------------------------ model */

typedef struct cellsam_model cellsam_model;
typedef struct cellsam_context cellsam_context;

typedef struct {
    const char *config_path; /* optional JSON overriding hyper-parameters (heads, ...) */
    int weights_dtype;       /* CELLSAM_DTYPE_F32 (default), _F16 or _BF16: compute dtype of weights */
    int load_detector;       /* 1 (default): require and load CellFinder; 0: SAM only */
    int compute_dtype;       /* CELLSAM_DTYPE_F32 (default) or _BF16: the ViT blocks' matrix products
                                with inputs rounded to bfloat16, sums in float32 (AVX512-BF16 when the
                                CPU has it, else emulated and slower); see the README for its accuracy.
                                _INT8: the ViT blocks' four weight matrices quantised to 7 bits per
                                output column, their inputs to 8 bits per token, exact integer sums
                                (AVX512-VNNI or AVX2); attention, norms and the heads stay float32 */
    int n_threads;           /* threads for load-time work (packing for bf16/int8 compute); 0
                                (default): all cores */
} cellsam_model_params;

enum { CELLSAM_DTYPE_F32 = 0, CELLSAM_DTYPE_F16 = 1, CELLSAM_DTYPE_BF16 = 2, CELLSAM_DTYPE_INT8 = 3 };

cellsam_model_params cellsam_model_default_params(void);
/* Load a checkpoint: PyTorch .pt (zip + pickle, as published) or .safetensors.
 * Every tensor the model needs is checked for presence and shape. */
int cellsam_model_load(const char *path, const cellsam_model_params *params, cellsam_model **out);
void cellsam_model_free(cellsam_model *model);

typedef struct {
    int image_size;       /* 1024 */
    int patch_size;       /* 16 */
    int embed_dim;        /* ViT width (768 for ViT-B) */
    int depth;            /* ViT blocks */
    int num_heads;
    int window_size;
    int mlp_dim;
    int n_global;         /* number of global-attention blocks */
    int global_blocks[32];
    int prompt_dim;       /* P: embedding channels (256) */
    int decoder_depth;
    int decoder_heads;
    int decoder_mlp_dim;
    int has_detector;
    int det_queries;
    int det_enc_layers;
    int det_dec_layers;
    int det_heads;
    float box_nms_iou;    /* box NMS the model recommends (metadata), 0 = none (official) */
    int whole_image_max_side; /* images up to this side are best segmented whole (metadata
                                 cellsam.whole_image_max_side), 0 = none: tiled (official) */
    int cell_diameter;    /* the cell diameter in network-input pixels (of 1024) that a
                             segment `diameter` zooms cells to: metadata cellsam.cell_diameter,
                             else CELLSAM_DEFAULT_NET_CELL_DIAMETER */
    int auto_diameter;    /* 1: the model recommends sizing cells per image (diameter auto) in
                             its own mode (metadata cellsam.diameter = "auto"); 0: none */
    const char *prefix;   /* "model_cp." or "" (plain SAM) */
    const char *format;   /* "pytorch" or "safetensors" */
    int det_trunk_dim;    /* CellFinder trunk width: the image encoder's, unless widened
                             (cellsam convert --widen-trunk) */
    int det_trunk_mlp_dim;
    const char *detector_targets; /* the detector targets the model last trained with
                             (metadata cellsam.detector_targets: "hungarian", "anchor" or
                             "dense"; fine-tuning continues with them), NULL: no record */
} cellsam_model_info;

int cellsam_model_get_info(const cellsam_model *model, cellsam_model_info *info);
/* Whether cellsam_segment tiles an image of this size for a `tiled` parameter value:
 * 1 or 0 as given, or for -1 the model's recommendation (1 = tiled, 0 = whole image). */
int cellsam_model_tiling(const cellsam_model *model, int tiled, int width, int height);

/* Per-thread context. */
int cellsam_context_new(const cellsam_model *model, cellsam_context **out);
void cellsam_context_free(cellsam_context *ctx);

/* ------------------------------------------------------------------ engine */

/* Run the SAM image encoder on a pre-processed network input (3 x S x S float32,
 * channel-first, S = image_size) and keep the embedding in the context. */
int cellsam_encode(cellsam_context *ctx, const float *input_chw, int n_threads);
/* The current embedding (P x 64 x 64), owned by the context. */
int cellsam_get_embedding(const cellsam_context *ctx, const float **data, int *channels,
                          int *height, int *width);
/* Install an embedding computed earlier (copied). */
int cellsam_set_embedding(cellsam_context *ctx, const float *data, int channels, int height,
                          int width);

typedef struct {
    float x1, y1, x2, y2; /* network-input frame (0..image_size) */
} cellsam_box;

typedef struct {
    float x, y;
    int label; /* 1 positive, 0 negative */
} cellsam_point;

typedef struct {
    const cellsam_box *boxes;     /* one prompt per box; may be NULL */
    int n_boxes;
    const cellsam_point *points;  /* one point set, joined to every box's prompt */
    int n_points;
    const float *mask_input;      /* optional 256x256 low-resolution mask logits */
    int multimask;                /* 0: mask token 0 only; 1: tokens 1..3 */
    int n_threads;
} cellsam_prompt;

cellsam_prompt cellsam_default_prompt(void);

/* Decode masks for the context's embedding. Outputs (free with cellsam_free):
 * logits: n_batch x n_masks x 256 x 256 low-resolution mask logits;
 * iou:    n_batch x n_masks predicted IoU.
 * From 12 boxes on, the boxes share their image-token products (factored decoding, as
 * segment's default): the same in exact arithmetic, float32 rounding differs (~1e-5 in
 * the logits). Smaller later calls on the same embedding reuse that shared work, except
 * a single prompt on several threads (which splits the direct path between them). */
int cellsam_decode(cellsam_context *ctx, const cellsam_prompt *prompt, float **logits,
                   float **iou, int *n_batch, int *n_masks);


/* ------------------------------------------------------------ segmentation */

typedef struct {
    float bbox_threshold;  /* detector score threshold blended with k-means (0.4) */
    float iou_threshold;   /* masks with predicted IoU below this are dropped (0.5) */
    float mask_threshold;  /* sigmoid(logit) > this is foreground (0.4) */
    float box_nms_iou;     /* 0 = off (official). In (0, 1]: drop a detected box whose IoU
                              with a higher-scored kept box exceeds this, before decoding.
                              For detectors trained one-to-many (cellsam train's default),
                              which score several boxes per cell; negative = the model's
                              recommendation (its safetensors metadata), else off */
    int min_size;          /* objects smaller than this many pixels are removed (25) */
    int full_masks;        /* 0 (default): each mask is upscaled around its box only, the
                              region growing while the mask touches its border, so a mask
                              is complete where it is connected to its box; parts cut off
                              from it by background are left out. 1: every mask on the
                              whole image, as the official code (slower per cell) */
    int direct_decoder;    /* 0 (default): a tile's boxes, from 12 on, are decoded in
                              factored form, sharing the image tokens' products between
                              boxes (exact in real arithmetic; float32 rounding moves mask
                              logits by about 1e-4). 1: each box's image tokens computed on
                              their own, as the official code (slower per cell) */
    int remove_boundaries; /* subtract a 1-pixel outline from every label (0) */
    int normalize;         /* percentile clip + CLAHE per channel, as the official code (1) */
    const float *embedding; /* optional: this image's SAM embedding (P x 64 x 64, as
                               cellsam_get_embedding gives it after encoding the same
                               image); whole-image mode then skips the SAM encoder */
    const cellsam_box *boxes; /* optional user boxes in image pixels: skip CellFinder. Each
                                 is prompted once: on the whole image (diameter 0, the
                                 official way), or at the cell size `diameter` gives, in
                                 the network-input window around it on large images */
    int n_boxes;
    /* tiled (whole-slide) mode, the official default: blocks with halos, IoU linking */
    int tiled;             /* 1 tiled, 0 whole image (official segment_cellular_image); -1
                              (default): the model's recommendation, which for the official
                              checkpoint is tiled; cellsam-trained models recommend the whole
                              image up to a side length (cellsam_model_info) */
    int block_size;        /* 400 */
    int overlap;           /* 56: halo on every side of a block */
    int iou_depth;         /* 56: half-width of the linking band */
    float link_iou;        /* 0.5: IoU needed to merge labels across tiles */
    int halo_mirror;       /* 0: periodic wrap at image borders (official); 1: mirror */
    /* cell size (like Cellpose's diameter): 0 segments at the mode's own scale (official).
       > 0: the typical cell diameter in image pixels; the image is then seen
       at the zoom that makes it the model's cell_diameter in the network input: whole,
       edge-padded to a square, when the image fits one network input at that zoom, else
       tiled at that zoom (overlap and iou_depth scaled by 2 / zoom). CELLSAM_DIAMETER_AUTO:
       estimated by a first pass (cellsam_estimate_diameter), then as above.
       CELLSAM_DIAMETER_MODEL (default): auto when the model recommends it and `tiled` is
       -1 (the model's mode), else 0. With user boxes, auto takes the median of their
       sqrt(width x height) instead of a first pass. Zoom clamped to [1/4, 4] */
    float diameter;
    int n_threads;
    /* progress: called after each tile with (done, total); may be NULL */
    void (*progress)(int done, int total, void *user);
    void *progress_user;   /* passed to progress and abort */
    /* abort: polled before each tile and between the stages of a tile (detector, encoder,
       each batch of boxes); non-zero stops the call with CELLSAM_ERR_ABORTED and no
       result. May be NULL. A server stops a running segmentation with it. */
    int (*abort)(void *user);
} cellsam_segment_params;

cellsam_segment_params cellsam_segment_default_params(void);

typedef struct {
    uint32_t label;
    int x0, y0, x1, y1;    /* bounding box, half-open, image pixels */
    int64_t area;
    double cx, cy;         /* centroid */
    float score;           /* detector score (1 for user boxes) */
    float iou;             /* predicted IoU of the mask */
} cellsam_cell;

typedef struct {
    int width, height;
    uint32_t *labels;      /* height x width, 0 = background */
    int n_cells;
    cellsam_cell *cells;   /* n_cells entries, by label */
    int n_boxes_detected;  /* boxes kept by the detector (or given) */
    double seconds;        /* wall time of the call */
    /* where that time went (summed over tiles in tiled mode): pre-processing
     * (normalisation, CLAHE, resizing), SAM image encoder, CellFinder (trunk, head,
     * threshold, box NMS), mask decoding (prompts, decoder, composing labels), and
     * the rest (hole filling, small objects, tile linking, cell table) */
    double t_preprocess, t_encoder, t_detector, t_decoder, t_postprocess;
    float diameter;        /* the cell diameter used (given or estimated), 0 = none */
    float zoom;            /* network-input pixels per image pixel it gave, 0 = none */
} cellsam_result;

/* Segment an image: `image` is height x width x channels float32 (interleaved), with
 * channels already in the official order: 1 channel = whole-cell, 2 = (nuclear,
 * whole-cell), 3 = (blank, nuclear, whole-cell) or RGB as the official code takes it.
 * A result with zero cells is a success (n_cells = 0), not an error. */
int cellsam_segment(cellsam_context *ctx, const float *image, int width, int height, int channels,
                    const cellsam_segment_params *params, cellsam_result **out);
void cellsam_result_free(cellsam_result *result);

#define CELLSAM_DIAMETER_AUTO (-1.0f)
#define CELLSAM_DIAMETER_MODEL (-2.0f)
/* The diameter cellsam_segment uses for a `diameter` and `tiled` parameter pair:
 * CELLSAM_DIAMETER_MODEL resolved (to CELLSAM_DIAMETER_AUTO or 0), others as given. */
float cellsam_model_diameter(const cellsam_model *model, float diameter, int tiled);
#define CELLSAM_DEFAULT_NET_CELL_DIAMETER 64
#define CELLSAM_DIAMETER_ESTIMATE_SIDE 1024
/* Estimate the typical cell diameter (image pixels) of an image, as `diameter` takes
 * it: a segmentation at the mode's own scale (params->diameter is ignored) of the
 * central crop of at most CELLSAM_DIAMETER_ESTIMATE_SIDE pixels per side (origin
 * ((width - crop width) / 2, (height - crop height) / 2)), then the median of the
 * cells' equivalent diameters (2 sqrt(area / pi)). *diameter = 0 when fewer than 5 cells
 * are found (too few to size; segment then keeps its own scale). */
int cellsam_estimate_diameter(cellsam_context *ctx, const float *image, int width, int height, int channels,
                              const cellsam_segment_params *params, float *diameter);

/* ---------------------------------------------------------------- training */

/* Train from scratch (init_model NULL) or fine-tune a checkpoint on folders of
 * NAME_img.png + NAME_masks.png pairs. The model is saved to out_path
 * (safetensors, loadable by cellsam_model_load) after every epoch and every
 * save_every_steps steps; the optimiser state goes to out_path + ".state", and
 * resume = 1 continues from both when present. */
struct cellsam_train_report; /* below */

typedef struct {
    const char *data_dir;      /* training pairs (searched recursively) */
    const char *val_dir;       /* validation pairs; NULL: hold out val_fraction of data_dir */
    float val_fraction;        /* 0.1 */
    int max_val_images;        /* cap on validation images per epoch (0 = all) */
    const char *init_model;    /* fine-tune: start from this checkpoint; NULL: from scratch */
    const char *out_path;      /* required */
    int resume;                /* 1: continue from out_path and its .state */
    const char *arch;          /* from scratch: "tiny", "small" (default) or "vit_b" */
    int embed_dim, depth, heads, n_queries; /* overrides of the arch (0 = keep) */
    int epochs;                /* 10 */
    int max_steps;             /* total optimiser steps (0 = epochs decide); wins over epochs */
    int images_per_step;       /* gradient accumulation (2) */
    int prompts_per_image;     /* boxes decoded per image per step (16) */
    float box_jitter;          /* box prompt noise: each side moves by up to this fraction of
                                  the box's size, and at most 200 x it pixels (0.1: SAM's 10 %
                                  and 20 px); larger values teach the decoder imprecise boxes */
    float lr, weight_decay, clip_norm;
    int warmup_steps;
    int train_encoders;        /* 1: back-propagate into both ViTs; 0: frozen (fine-tuning) */
    int train_decoder;         /* prompt encoder + mask decoder (1) */
    int train_detector;        /* CellFinder head (1) */
    int cache_embeddings;      /* frozen encoders: compute each image's features once (1) */
    int augment;               /* flips, rotations, crops, intensity (1; off with a cache) */
    int reset_detector_head;   /* fine-tune: re-initialise the CellFinder head (keep the trunk) */
    int trunk_from_sam;        /* start the CellFinder trunk from the SAM image encoder's weights
                                  (same architecture without the neck), as CellSAM does */
    const char *detector_from; /* fine-tune: take the whole CellFinder (cellfinder.*: trunk and head)
                                  from this checkpoint instead of init_model (combine branches
                                  trained in separate runs) */
    int anchor_matching;       /* detector targets: 2 = one-to-many (every anchor in the central
                                  half of a cell's box; train's default), 1 = each cell to its
                                  nearest anchor, 0 = DETR's Hungarian matching on the
                                  predictions, -1 = the starting model's (finetune's default):
                                  those its metadata records (cellsam.detector_targets), else
                                  dense when it recommends a box NMS (it was trained one-to-many,
                                  as cellsam's models are), else Hungarian (the official one) */
    int whole_image_max_side;  /* 0 (default): samples are tiles of the official tiler, as tiled
                                  inference sees them; N: images up to N px per side are taken
                                  whole, without the tiler's halo, as whole-image inference sees
                                  them, and N is recorded in the model (cellsam_model_info) */
    int cell_diameter;         /* 0 (default): off; N (4..1024): samples at cell size, as
                                  segment's `diameter` shows images: each zoomed so that the median
                                  cell of its masks spans N network pixels (x the random scale),
                                  isotropically; N and diameter "auto" are recorded in the model */
    int n_threads;
    uint64_t seed;
    double time_limit_s;       /* stop cleanly (after saving) past this wall time; 0 = none */
    int save_every_steps;      /* 0 = at epoch ends only */
    int save_optimizer_state;  /* 1 (default): write out_path + ".state" with every save, for
                                  resume; 0: the model only (a caller that never resumes) */
    /* progress lines ("epoch 1 step 20 loss ..."); NULL prints to stderr */
    void (*log)(const char *line, void *user);
    void *log_user;
    /* called once before the first step (the split and the run's length are known), then
       after every optimiser step and every validation, with the figures so far (as the
       final report gives them) and the run's total steps; NULL: none */
    void (*progress)(const struct cellsam_train_report *so_far, int64_t total_steps, void *user);
    /* checked after every optimiser step: nonzero saves the model and stops, as the
       time limit does (a labeling tool's "stop"); NULL: never */
    int (*abort)(void *user);
    void *callback_user;       /* passed to progress and abort */
} cellsam_train_params;

cellsam_train_params cellsam_train_default_params(void);    /* training from scratch */
/* Fine-tuning (init_model set by the caller): frozen encoders, 5 epochs, lr 1e-4 with 10
 * warm-up steps, the starting model's detector targets (anchor_matching -1). */
cellsam_train_params cellsam_finetune_default_params(void);

typedef struct cellsam_train_report {
    int64_t steps;             /* optimiser steps taken in total (including resumed ones) */
    int epochs_done;
    double seconds;            /* wall time of this call */
    double images_per_second;  /* training images processed per second in this call */
    double val_f1;             /* mean F1@0.5 on the validation images at the last epoch (-1 if none) */
    double last_loss;
    int train_images, val_images; /* the split trained on and validated on */
    int aborted;               /* 1: stopped by params.abort (the model was saved first) */
} cellsam_train_report;

int cellsam_train(const cellsam_train_params *params, cellsam_train_report *report);

#ifdef __cplusplus
}
#endif
#endif
