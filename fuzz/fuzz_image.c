/* libFuzzer target for the image readers: cs_image_decode on arbitrary bytes,
 * plus the TIFF region reader and the model-input mapping on whatever decodes.
 * Small limits keep a hostile header from asking for gigabytes.
 * Seeds: fuzz/corpus/image/ (valid TIFF/PNG/JPEG/.npy variants, broken files,
 * and every crash found so far). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "image_io.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    cs_image_limits l = cs_image_default_limits();
    l.max_dim = 4096;
    l.max_samples = (uint64_t)1 << 20;
    l.max_codec_alloc = (size_t)16 << 20;
    cs_image_set_limits(&l);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    cs_image img;
    if (cs_image_decode(data, size, "fuzz", &img) == 0) {
        float *hw3;
        int nuclear = img.channels > 3 ? 2 : 0, cell = img.channels > 3 ? 1 : 0;
        if (cs_image_to_model_input(&img, nuclear, cell, CS_CHANNELS_OFFICIAL, &hw3) == 0) free(hw3);
        cs_image_free(&img);
    }
    /* Regions only matter for TIFF (other formats are decoded whole at open). */
    if (size >= 2 && ((data[0] == 'I' && data[1] == 'I') || (data[0] == 'M' && data[1] == 'M'))) {
        cs_image_reader *r;
        if (cs_image_reader_open_memory(data, size, "fuzz", &r) == 0) {
            cs_image_info info;
            cs_image_reader_info(r, &info);
            int x = info.width / 3, y = info.height / 3;
            int w = info.width - x > 1 ? (info.width - x) / 2 + 1 : 1, h = info.height - y > 1 ? (info.height - y) / 2 + 1 : 1;
            cs_image reg;
            if (cs_image_reader_read_region(r, x, y, w, h, &reg) == 0) cs_image_free(&reg);
            /* Backwards again: strip readers restart, tile readers reuse. */
            if (cs_image_reader_read_region(r, 0, 0, 1, 1, &reg) == 0) cs_image_free(&reg);
            cs_image_reader_close(r);
        }
    }
    return 0;
}
