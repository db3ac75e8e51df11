/* Tiled whole-slide segmentation with the model: plugs cs_segment_hw3 into the
 * model-agnostic tiler (src/tiling.c). Placeholder until the tiler lands. */
#include "common.h"
#include "pipeline.h"

int cs_segment_tiled(cellsam_context *ctx, const float *hw3, int H, int W, const cellsam_segment_params *p,
                     uint32_t **labels, float **score, float **iou, int *n_labels, int *n_boxes) {
    (void)ctx; (void)hw3; (void)H; (void)W; (void)p; (void)labels; (void)score; (void)iou; (void)n_labels; (void)n_boxes;
    return cs_error(CELLSAM_ERR_UNSUPPORTED, "tiled mode is not available yet: use --no-tiling");
}
