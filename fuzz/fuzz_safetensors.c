/* libFuzzer target: the safetensors reader. */
#include <stddef.h>
#include <stdint.h>

#include "fuzz_common.h"
#include "weights.h"

static volatile unsigned sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    cs_weights *w = NULL;
    if (cs_weights_parse_safetensors(data, size, &w) == 0) {
        sink = fuzz_touch_weights(w);
        cs_weights_free(w);
    }
    return 0;
}
