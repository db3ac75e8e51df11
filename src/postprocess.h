/* Mask post-processing: from SAM's 256x256 low-resolution mask logits to the
 * final label image, as CellSAM's predict() + fill_holes_and_remove_small_masks
 * do it, but one mask at a time and only inside each mask's neighbourhood
 * (the official code stacks K full-size float masks: K*H*W*5 bytes).
 *
 * Upsampling is SAM's postprocess_masks as PyTorch CPU computes it for a
 * (1,1,256,256) float tensor (which is channels-last contiguous, so the
 * channels-last bilinear kernel runs): bilinear, align_corners=False,
 * 256 -> 1024x1024, then 1024x1024 -> HxW. Per axis: scale = (float)in/out;
 * src = scale*(i+0.5)-0.5 in double, clamped at 0; i0 = (int)src;
 * i1 = i0 + (i0 < in-1); l1 = (float)(src-i0); l0 = 1.0f-l1 (identity when
 * in == out). Per pixel: w_ab = lh_a*lw_b in float, value = float of
 * x00*w00 + x01*w01 + x10*w10 + x11*w11 summed in double in that order.
 * This reproduces the reference 43_ arrays bit for bit. */
#ifndef CELLSAM_POSTPROCESS_H
#define CELLSAM_POSTPROCESS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "cellsam.h"

#define CS_LOWRES_SIZE 256   /* SAM low-resolution mask side */
#define CS_SAM_INPUT_SIZE 1024 /* SAM input side (intermediate map) */
#define CS_MASK_THRESHOLD 0.4f /* CellSAM mask_threshold (on the sigmoid) */
#define CS_MIN_MASK_SIZE 25  /* fill_holes_and_remove_small_masks min_size */
/* Largest output side and pixel count accepted (labels are uint32, pixel
 * indices inside a bounding box fit in uint32). */
#define CS_POST_MAX_SIDE (1 << 20)
#define CS_POST_MAX_PIXELS ((size_t)UINT32_MAX)

/* CellSAM's binarisation: torch.sigmoid on float32, then > 0.4 in float32. */
static inline int cs_mask_logit_on(float logit) {
    float s = 1.0f / (1.0f + expf(-logit));
    return s > CS_MASK_THRESHOLD;
}
/* A logit at or below this is off under cs_mask_logit_on (logit(0.4) is
 * -0.4054651; the gap of ~3e-5 is far above float rounding of the sigmoid). */
#define CS_MASK_LOGIT_OFF (-0.4055f)

/* ------------------------------------------------------------ upsampling */

/* One output index of a 1-D bilinear resampling step. */
typedef struct {
    int32_t i0, i1;
    float l0, l1;
} cs_lerp_tap;

/* Resampling tables and scratch for one output size; reusable across masks. */
typedef struct {
    int H, W;
    cs_lerp_tap step1[CS_SAM_INPUT_SIZE]; /* 256 -> 1024 (same for both axes) */
    cs_lerp_tap *rows;                    /* H taps: 1024 -> H */
    cs_lerp_tap *cols;                    /* W taps: 1024 -> W */
    float *mid;                           /* intermediate 1024-map window */
    int32_t *mid_cols;                    /* needed intermediate columns */
    uint8_t *mid_row_done;                /* 1024 flags */
} cs_mask_upsampler;

int cs_upsampler_init(cs_mask_upsampler *u, int H, int W);
void cs_upsampler_free(cs_mask_upsampler *u);
/* Output pixels [y0,y1) x [x0,x1) into out, (y1-y0) rows of (x1-x0) floats. */
int cs_upsampler_region(cs_mask_upsampler *u, const float *lowres, int x0, int y0, int x1, int y1,
                        float *out);

/* postprocess_masks of one 256x256 low-res logit map to H x W (out: H*W). */
int cs_upsample_logits(const float *lowres, int H, int W, float *out);
/* The same values for output pixels [y0,y1) x [x0,x1) only, written compactly
 * to out ((y1-y0) rows of (x1-x0) floats); bit-identical to the full call. */
int cs_upsample_logits_region(const float *lowres, int H, int W, int x0, int y0, int x1, int y1,
                              float *out);

/* Output-pixel rectangle [x0,x1) x [y0,y1) outside of which every upsampled
 * logit is <= logit_threshold (or NaN) for finite input. Bilinear weights are
 * non-negative and the rounded sums are monotone, so an output pixel can only
 * exceed the threshold if one of the low-res pixels it draws on does; the
 * low-res bounding box (taken at threshold minus a small margin that covers
 * rounding) is mapped through both steps' index tables, plus one pixel.
 * Returns the number of low-res pixels above the threshold (0: empty rect,
 * all zero), or -1 on invalid arguments. */
int cs_mask_support_region(const float *lowres, int H, int W, float logit_threshold, int *x0,
                           int *y0, int *x1, int *y1);
/* The same using prepared tables. */
int cs_upsampler_support(const cs_mask_upsampler *u, const float *lowres, float logit_threshold,
                         int *x0, int *y0, int *x1, int *y1);

/* ------------------------------------------------------ label composition */

/* Incremental label image: label = v wherever mask v is on, later masks
 * overwriting earlier ones. With v = 1, 2, ... in processing order this equals
 * the official max_k(mask_k * k). Memory: the label image plus O(1024^2). */
typedef struct cs_label_composer {
    int H, W;
    uint32_t *labels;   /* H*W, row-major; owned (cs_free) */
    size_t last_count;  /* pixels written by the last add */
    cs_mask_upsampler up;
    float *rowbuf;      /* one output row */
} cs_label_composer;

int cs_composer_init(cs_label_composer *c, int H, int W);
/* Upsample, threshold (sigmoid > 0.4) and write label_value where the mask is
 * on; work is limited to the mask's support rectangle. */
int cs_composer_add_mask(cs_label_composer *c, const float *lowres_logits, uint32_t label_value);
/* Same for an already binarised H x W mask (nonzero = on). */
int cs_composer_add_binary(cs_label_composer *c, const uint8_t *mask, uint32_t label_value);
/* Hand the label image over (free with cs_free); the composer keeps none. */
uint32_t *cs_composer_take_labels(cs_label_composer *c);
void cs_composer_free(cs_label_composer *c);

/* ------------------------------------------------------- label clean-up */

/* fill_holes_and_remove_small_masks(labels, min_size) in place: bounding boxes
 * of every label value are taken once up front (scipy find_objects); then for
 * each value in increasing order, inside its box: pixels == value are erased
 * if fewer than min_size (when min_size > 0), else their holes (background
 * not 4-connected to the box border) are filled and every pixel of the filled
 * mask in the box is set to the next label j+1 (overwriting whatever was
 * there). Output labels are 1..j. Work per label is proportional to its box. */
int cs_fill_holes_remove_small(uint32_t *labels, int H, int W, int min_size);

/* The bounding box of every label of an H x W label image, in increasing label
 * order, as pixel edges (x2 = last column + 1), for prompting with existing labels;
 * free *boxes with free(). */
int cs_label_boxes(const uint32_t *labels, int H, int W, cellsam_box **boxes, int *n_boxes);

/* Number of distinct non-zero values of a label image (H x W). */
int cs_count_labels(const uint32_t *labels, int H, int W, size_t *n_out);

/* CellSAM subtract_boundaries: a pixel is zeroed if its label differs from its
 * left neighbour, or from the pixel below it. */
int cs_subtract_boundaries(uint32_t *labels, int H, int W);

/* Box from the 1024x1024 frame back to the original image, as predict() does
 * it: x * (W/1024), y * (H/1024) in double. */
void cs_box_to_orig_frame(const float box1024[4], int H, int W, double out[4]);

#endif
