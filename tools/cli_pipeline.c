/* CLI helpers on top of the image pipeline: image -> SAM network input, prompt masks -> PNG. */
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "common.h"
#include "image_io.h"
#include "pipeline_cli.h"
#include "postprocess.h"
#include "preprocess.h"

int cli_prepare_sam_input(const char *cmd, const char *image_path, float **input) {
    *input = NULL;
    cs_image img;
    if (cs_image_read(image_path, &img)) {
        cli_error(cmd, "%s", cellsam_last_error());
        return 1;
    }
    float *hw3 = NULL, *chw = NULL, *sam = NULL;
    int rc = cs_image_to_model_input(&img, 0, 0, CS_CHANNELS_OFFICIAL, &hw3);
    size_t npix = (size_t)img.width * img.height;
    if (!rc) {
        chw = cs_alloc(npix, 3 * sizeof(float));
        sam = cs_alloc((size_t)3 * 1024, 1024 * sizeof(float));
        rc = chw && sam ? CELLSAM_OK : CELLSAM_ERR_NOMEM;
    }
    if (!rc) rc = cs_normalize_image(hw3, img.height, img.width, chw);
    if (!rc) rc = cs_prep_branches(chw, img.height, img.width, sam, NULL);
    if (rc) {
        cli_error(cmd, "%s: %s", image_path, cellsam_last_error());
        free(sam);
        sam = NULL;
    }
    free(hw3);
    free(chw);
    cs_image_free(&img);
    *input = sam;
    return rc ? 1 : 0;
}

int cli_write_prompt_png(const char *cmd, const char *path, const float *logits, const float *iou,
                         int n_batch, int n_masks, int width, int height) {
    cs_label_composer c;
    if (cs_composer_init(&c, height, width)) {
        cli_error(cmd, "%s", cellsam_last_error());
        return 1;
    }
    int rc = CELLSAM_OK;
    for (int b = 0; b < n_batch && !rc; b++) {
        int best = 0;
        for (int k = 1; k < n_masks; k++)
            if (iou[b * n_masks + k] > iou[b * n_masks + best]) best = k;
        rc = cs_composer_add_mask(&c, logits + ((size_t)b * n_masks + best) * 256 * 256, (uint32_t)(b + 1));
    }
    uint32_t *labels = rc ? NULL : cs_composer_take_labels(&c);
    cs_composer_free(&c);
    if (!rc) rc = labels ? cs_write_labels(path, labels, width, height) : CELLSAM_ERR_NOMEM;
    free(labels);
    if (rc) cli_error(cmd, "%s", cellsam_last_error());
    return rc ? 1 : 0;
}
