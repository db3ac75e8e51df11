/* libFuzzer target for the exact label reader (cs_read_labels: PNG, TIFF, .npy), which
 * cellsam eval and training use. The reader takes a path (libtiff opens files), so each
 * input is written to one temporary file first.
 * Seeds: fuzz/corpus/image/ (the image seeds are label-like PNG/TIFF/.npy files too). */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "image_io.h"

static char g_path[64];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    snprintf(g_path, sizeof g_path, "/tmp/cellsam-fuzz-labels-%ld", (long)getpid());
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    FILE *f = fopen(g_path, "wb");
    if (!f) return 0;
    size_t put = fwrite(data, 1, size, f);
    fclose(f);
    if (put != size) return 0;
    uint32_t *labels;
    int w, h;
    if (cs_read_labels(g_path, &labels, &w, &h) == 0) {
        /* touch every label so that ASan sees a short buffer */
        uint32_t acc = 0;
        for (size_t i = 0; i < (size_t)w * (size_t)h; i++) acc += labels[i];
        free(labels);
        if (acc == 0xdeadbeefu) return -1; /* keeps the sum alive */
    }
    return 0;
}
