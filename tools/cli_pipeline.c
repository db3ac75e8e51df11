/* Placeholder until the image pipeline lands. */
#include "cli.h"
#include "pipeline_cli.h"

int cli_prepare_sam_input(const char *cmd, const char *image_path, float **input) {
    (void)image_path;
    *input = 0;
    cli_error(cmd, "image input is not available in this build yet (use --tensor)");
    return 1;
}

int cli_write_prompt_png(const char *cmd, const char *path, const float *logits, const float *iou,
                         int n_batch, int n_masks, int width, int height) {
    (void)path; (void)logits; (void)iou; (void)n_batch; (void)n_masks; (void)width; (void)height;
    cli_error(cmd, "--png is not available in this build yet");
    return 1;
}
