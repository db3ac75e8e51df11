/* CLI helpers that need the image pipeline (tools/cli_pipeline.c). */
#ifndef CELLSAM_PIPELINE_CLI_H
#define CELLSAM_PIPELINE_CLI_H

/* Read an image file and pre-process it into the SAM network input (3 x 1024 x 1024). */
int cli_prepare_sam_input(const char *cmd, const char *image_path, float **input);
/* Write prompt masks as a label PNG in a W x H frame. */
int cli_write_prompt_png(const char *cmd, const char *path, const float *logits, const float *iou,
                         int n_batch, int n_masks, int width, int height);

#endif
