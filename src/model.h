/* The model as loaded: hyper-parameters and float32 weight pointers for every part.
 * Weights point into the checkpoint's memory map where possible (f32, aligned) and
 * into owned converted copies otherwise. Read-only after load. */
#ifndef CELLSAM_MODEL_H
#define CELLSAM_MODEL_H

#include "cellsam.h"
#include "gemm_bf16.h"
#include "gemm_int8.h"
#include "weights.h"

/* ---- binding named tensors with shape checks ----
 * Every failed lookup is recorded, so that a load error names every missing or
 * mis-shaped tensor at once (the official loader silently keeps random values). */
typedef struct {
    const cs_weights *w;
    const char *prefix;
    char *problems;      /* newline-separated list */
    size_t problems_len, problems_cap;
    int n_problems;
    void **owned;        /* converted copies (freed with the model) */
    size_t n_owned, cap_owned;
} cs_binder;

/* Look up prefix+name (printf-formatted) and check its shape (-1 matches any size).
 * Returns a float32 pointer or NULL (problem recorded). Use with CS_SHAPE:
 *   cs_bindf(b, CS_SHAPE(D, 3, 16, 16), "image_encoder.patch_embed.proj.weight") */
#define CS_SHAPE(...)                                                        \
    (int)(sizeof((const int64_t[]){__VA_ARGS__}) / sizeof(int64_t)),         \
        (const int64_t[]) { __VA_ARGS__ }
const float *cs_bindf(cs_binder *b, int ndim, const int64_t *dims, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

void cs_binder_release(cs_binder *b);
/* Bind as 16-bit (dtype CS_DTYPE_F16 or CS_DTYPE_BF16): points into the checkpoint
 * when it already holds that dtype, else converts once into an owned copy. */
const uint16_t *cs_bind16f(cs_binder *b, cs_dtype dtype, int ndim, const int64_t *dims, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* ---- SAM ViT image encoder (also the CellFinder trunk, without neck) ---- */
typedef struct {
    const float *norm1_w, *norm1_b;
    const float *qkv_w, *qkv_b;   /* (3D, D), (3D) */
    const float *proj_w, *proj_b; /* (D, D) */
    const float *rel_h, *rel_w;   /* (2*S-1, head_dim), S = window or grid */
    const float *norm2_w, *norm2_b;
    const float *lin1_w, *lin1_b; /* (mlp, D) */
    const float *lin2_w, *lin2_b; /* (D, mlp) */
    int window;                   /* 0 = global attention */
    /* opt-in reduced-precision storage of the four large matrices (then the float
     * pointers above are NULL and each block converts them to float32 before use) */
    const uint16_t *qkv_w16, *proj_w16, *lin1_w16, *lin2_w16;
    /* opt-in bfloat16 compute: the four matrices packed for gemm_bf16.c (owned) */
    cs_bf16_weights qkv_bf16, proj_bf16, lin1_bf16, lin2_bf16;
    /* opt-in int8 compute: the same four quantised for gemm_int8.c (owned) */
    cs_int8_weights qkv_i8, proj_i8, lin1_i8, lin2_i8;
} cs_vit_block;

typedef struct {
    int img_size, patch, grid; /* 1024, 16, 64 */
    int dim, depth, heads, window, mlp;
    const float *patch_w, *patch_b; /* (D,3,16,16), (D) */
    const float *pos_embed;         /* (1,grid,grid,D) */
    cs_vit_block *blocks;
    int has_neck, out_chans;
    int weights16;                  /* 0, CS_DTYPE_F16 or CS_DTYPE_BF16 for the block matrices */
    int compute_bf16;               /* the block matrices run through cs_bf16_linear */
    int compute_int8;               /* ... or through cs_int8_linear */
    const float *neck0_w;           /* (P, D, 1, 1) */
    const float *neck1_w, *neck1_b; /* (P) */
    const float *neck2_w;           /* (P, P, 3, 3) */
    const float *neck3_w, *neck3_b; /* (P) */
} cs_vit;

/* Run the ViT on a 3 x img x img input. Output is channel-first:
 * (out_chans, grid, grid) with a neck, (dim, grid, grid) without. */
int cs_vit_forward(const cs_vit *v, const float *input_chw, float *out, int n_threads);

/* ---- SAM prompt encoder ---- */
typedef struct {
    int dim;                /* P */
    int img_size;           /* 1024 */
    int grid;               /* 64 */
    const float *pe_gauss;  /* (2, P/2) */
    const float *point_emb[4]; /* (1,P): neg, pos, box corner 1, box corner 2 */
    const float *not_a_point;  /* (1,P) */
    const float *no_mask;      /* (1,P) */
    /* mask downscaling (used only with a mask prompt) */
    int mask_in_chans;
    const float *md0_w, *md0_b, *md1_w, *md1_b, *md3_w, *md3_b, *md4_w, *md4_b, *md6_w, *md6_b;
} cs_prompt_encoder;

/* Positional encoding of normalised coordinates (u,v) in [0,1]: out has P floats. */
void cs_pe_encode(const cs_prompt_encoder *pe, float u, float v, float *out);
/* Dense positional map (P, grid, grid), channel-first. */
void cs_prompt_dense_pe(const cs_prompt_encoder *pe, float *out);
/* Sparse embeddings for one prompt: optional box (x1,y1,x2,y2 in the 1024 frame)
 * and points. Writes n_tokens x P to out (out must hold n_points+3 tokens);
 * returns n_tokens. A padding point is added when there is no box. */
int cs_prompt_sparse(const cs_prompt_encoder *pe, const float *box, const cellsam_point *points,
                     int n_points, float *out);
/* Dense embedding (P, grid, grid): no_mask broadcast, or the downscaled mask input
 * (4*grid x 4*grid logits). */
int cs_prompt_dense(const cs_prompt_encoder *pe, const float *mask_input, float *out, int n_threads);

/* ---- SAM mask decoder (two-way transformer) ---- */
typedef struct {
    const float *q_w, *q_b, *k_w, *k_b, *v_w, *v_b, *o_w, *o_b;
    int internal; /* internal dim */
} cs_attn;

typedef struct {
    cs_attn self_attn, t2i, i2t;
    const float *norm1_w, *norm1_b, *norm2_w, *norm2_b, *norm3_w, *norm3_b, *norm4_w, *norm4_b;
    const float *mlp1_w, *mlp1_b, *mlp2_w, *mlp2_b;
} cs_twoway_layer;

typedef struct {
    int dim, depth, heads, mlp, n_mask_tokens;
    cs_twoway_layer *layers;
    cs_attn final_attn;
    const float *norm_final_w, *norm_final_b;
    const float *iou_token, *mask_tokens; /* (1,P), (n_mask_tokens,P) */
    const float *up0_w, *up0_b;           /* ConvT (P, P/4, 2, 2) */
    const float *up1_w, *up1_b;           /* LN2d (P/4) */
    const float *up3_w, *up3_b;           /* ConvT (P/4, P/8, 2, 2) */
    const float *hyper_w[16][3], *hyper_b[16][3]; /* per mask token: P->P->P->P/8 */
    const float *iou_w[3], *iou_b[3];     /* P->H->H->n_mask_tokens */
    int iou_hidden;
} cs_mask_decoder;

/* Decode one prompt batch. image_emb and dense_pe: (P,64,64); dense: (P,64,64) per
 * batch item (dense_stride floats apart, 0 = shared); sparse: n_batch x n_tok x P.
 * Outputs all mask tokens: logits n_batch x n_mask_tokens x 256 x 256, iou n_batch x n_mask_tokens. */
int cs_mask_decoder_forward(const cs_mask_decoder *md, const float *image_emb, const float *dense_pe,
                            const float *dense, size_t dense_stride, const float *sparse,
                            int n_batch, int n_tok, float *logits, float *iou, int n_threads);

/* Which outputs to compute: mask tokens [mask_first, mask_first+mask_count) (logits
 * are n_batch x mask_count x 256 x 256), and skip the upscaler for prompts whose IoU
 * of token mask_first is below skip_below (their logits are left unwritten; the IoU
 * of every token is always written, n_batch x n_mask_tokens). */
typedef struct {
    int mask_first, mask_count;
    float skip_below;
    /* NULL: every mask is upscaled on the whole 256 x 256 grid (SAM). Else n_batch boxes
     * (x0, y0, x1, y1, 1024 frame): each mask is upscaled only around its box, the region
     * growing while the mask has a logit above grow_above at its border; the rest of the
     * planes holds CS_LOGIT_NOT_COMPUTED. */
    const float *boxes;
    float grow_above;
    /* batches of at least this many prompts (with a shared dense prompt) are decoded in
     * factored form (mask_decoder.c): each prompt costs less, the image's shared part
     * more; once that part is ready for the image, smaller calls use it too. INT_MAX:
     * never. */
    int factored_from;
} cs_decoder_options;
#define CS_DECODER_FACTORED_FROM 12
/* Low-res logit of pixels a box-limited decode did not compute: far below any threshold. */
#define CS_LOGIT_NOT_COMPUTED (-1.0e4f)
cs_decoder_options cs_decoder_default_options(const cs_mask_decoder *md);
/* Decoder buffers kept between calls (one per context, not shared between threads):
 * prompt scratch and the per-image shared data, reused while the embedding pointer
 * and the dense prompt's values stay the same. Invalidate after rewriting the
 * embedding in place; release frees the buffers but keeps the handle. */
typedef struct cs_decoder_ws cs_decoder_ws;
cs_decoder_ws *cs_decoder_ws_new(void);
void cs_decoder_ws_invalidate(cs_decoder_ws *ws);
void cs_decoder_ws_release(cs_decoder_ws *ws);
void cs_decoder_ws_free(cs_decoder_ws *ws);
/* ws may be NULL (buffers for this call only). */
int cs_mask_decoder_forward_ex(const cs_mask_decoder *md, const float *image_emb, const float *dense_pe,
                               const float *dense, size_t dense_stride, const float *sparse, int n_batch,
                               int n_tok, const cs_decoder_options *opt, float *logits, float *iou,
                               cs_decoder_ws *ws, int n_threads);

/* ---- CellFinder head (Anchor-DETR with RCDA), filled in by cellfinder.c ---- */
struct cs_cellfinder;

struct cellsam_model {
    cs_weights *weights;
    char prefix[32];
    cs_vit sam_vit;
    cs_prompt_encoder pe;
    cs_mask_decoder md;
    int has_detector;
    float box_nms_iou; /* recommended box NMS (metadata cellsam.box_nms_iou), 0 = none */
    int whole_image_max_side; /* metadata cellsam.whole_image_max_side, 0 = none */
    int cell_diameter;        /* metadata cellsam.cell_diameter (network pixels), else the default */
    int auto_diameter;        /* metadata cellsam.diameter = "auto" */
    cs_vit det_vit;
    struct cs_cellfinder *det;
    cs_binder binder; /* owns converted tensors */
    cellsam_model_info info;
};

/* The detector targets a model records (metadata cellsam.detector_targets), indexed as
 * cellsam_train_params.anchor_matching 0..2. */
extern const char *const cs_detector_targets[3];

enum { CS_STAGE_PREPROCESS, CS_STAGE_ENCODER, CS_STAGE_DETECTOR, CS_STAGE_DECODER, CS_STAGE_COUNT };

struct cellsam_context {
    const cellsam_model *model;
    float *embedding; /* (P,64,64) */
    int has_embedding;
    float *dense_pe;  /* (P,64,64), computed once */
    cs_decoder_ws *dec_ws; /* decoder buffers and per-image shared data */
    /* seconds by pipeline stage, accumulated by cs_segment_hw3 (CS_STAGE_*) */
    double stage_s[CS_STAGE_COUNT];
};

#endif
