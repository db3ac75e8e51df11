/* The single-image CellSAM pipeline (official segment_cellular_image) used by
 * cellsam_segment directly and by the tiled mode per tile. */
#ifndef CELLSAM_PIPELINE_H
#define CELLSAM_PIPELINE_H

#include <stdint.h>

#include "cellsam.h"

typedef struct {
    uint32_t *labels;  /* H x W */
    int n_labels;      /* labels are 1..n_labels */
    float *score;      /* per label (index label-1): detector score */
    float *iou;        /* per label: predicted IoU */
    int n_boxes;       /* boxes kept by the detector (or given) */
} cs_tile_result;

/* Segment an H x W x 3 image (channels already placed as format_image_shape does).
 * user_boxes (n_user_boxes x 4, xyxy in image pixels) skip the detector. */
int cs_segment_hw3(cellsam_context *ctx, const float *hw3, int H, int W, const cellsam_segment_params *p,
                   cs_tile_result *out);
void cs_tile_result_free(cs_tile_result *r);

/* Greedy box NMS over xyxy boxes in descending score order, in place (query may be
 * NULL); returns the number kept. */
int cs_box_nms(float *xyxy, float *scores, int *query, int n, float iou);

/* Place 1..3 channels of an interleaved H x W x C image into H x W x 3 (last C slots),
 * as the official format_image_shape does. */
int cs_place_channels(const float *img, int H, int W, int C, float **hw3);

/* Per-cell statistics accumulated row by row (for streamed label images). */
typedef struct {
    cellsam_cell *cells; /* indexed by label */
    size_t cap;
} cs_cell_acc;
int cs_cell_acc_rows(cs_cell_acc *a, const uint32_t *rows, int y0, int n_rows, int W);
int cs_cell_acc_finish(cs_cell_acc *a, const float *score, const float *iou, int n_labels, cellsam_cell **cells,
                       int *n_cells);
void cs_cell_acc_free(cs_cell_acc *a);

/* Per-cell statistics for a label image. */
int cs_cell_stats(const uint32_t *labels, int H, int W, const float *score, const float *iou, int n_labels,
                  cellsam_cell **cells, int *n_cells);

/* Tiled mode: the model plugged into the tiler (src/tiled_pipeline.c, src/tiling.c). */
int cs_segment_tiled(cellsam_context *ctx, const float *hw3, int H, int W, const cellsam_segment_params *p,
                     uint32_t **labels, float **score, float **iou, int *n_labels, int *n_boxes);

/* Streaming tiled mode (bounded memory): see src/tiling.h for the callbacks. */
#include "tiling.h"
int cs_segment_tiled_stream(cellsam_context *ctx, int H, int W, cs_region_read_fn read, void *read_user,
                            cs_rows_write_fn write_rows, void *write_user, const cellsam_segment_params *p,
                            int *n_boxes, uint32_t *max_label);

/* Cell size (src/diameter.c). The zoom (network pixels per image pixel) that shows
 * cells of `diameter` image pixels at the model's cell_diameter, clamped to [1/4, 4];
 * the tiling for zoom z (overlap and iou_depth scaled by 2 / z, so that they span
 * what they span at the official tiles' zoom, and the block that makes block + 2
 * overlap = 1024 / z); the parameter check. */
double cs_diameter_zoom(const cellsam_model *m, float diameter);
double cs_zoom_clamp(double z);
int cs_zoom_side(double z); /* image pixels one network input spans at zoom z */
/* The cells' size as the estimate measures it: the equivalent diameter 2 sqrt(a / pi) of
 * the upper median of the n areas (sorted in place); 0 when n = 0. */
float cs_median_diameter(int64_t *area, size_t n);
void cs_zoom_tiling(double z, cellsam_segment_params *q);
/* The cells' size that n user boxes show: the upper median of sqrt(w h) (what
 * cs_median_diameter gives for the ellipses they bound); 0 for no boxes. */
float cs_boxes_diameter(const cellsam_box *boxes, int n);
int cs_diameter_check(float diameter);
/* An S x S canvas (free()) holding the w x h region at (x0, y0) of a W-wide H x W x 3
 * image in its top-left corner, the rest edge-padded; NULL (error set) when out of memory. */
float *cs_zoom_canvas(const float *hw3, int W, int x0, int y0, int w, int h, int S);
/* The origin of a window of S pixels along an axis of n that starts `halo` before b0,
 * moved inside the axis (0 when the axis is shorter than S). */
int cs_window_origin(int b0, int halo, int S, int n);
/* Segment at zoom z: one edge-padded square canvas when the image fits one network
 * input at that zoom, else tiled as cs_zoom_tiling says; user boxes (p->boxes) are
 * then each prompted once, in the window around the tiling block holding the box's
 * centre. Outputs as cs_segment_tiled. */
int cs_segment_zoomed(cellsam_context *ctx, const float *hw3, int H, int W, const cellsam_segment_params *p,
                      double zoom, uint32_t **labels, float **score, float **iou, int *n_labels, int *n_boxes);
/* cellsam_estimate_diameter, also handing back the first pass's result when it
 * covered the whole image (*whole, else NULL). */
int cs_estimate_diameter(cellsam_context *ctx, const float *image, int width, int height, int channels,
                         const cellsam_segment_params *params, float *diameter, cellsam_result **whole);

#endif
