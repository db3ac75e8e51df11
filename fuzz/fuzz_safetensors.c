/* libFuzzer target: the safetensors reader. */
#include <stddef.h>
#include <stdint.h>

#include "weights.h"

static volatile unsigned sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    cs_weights *w = NULL;
    if (cs_weights_parse_safetensors(data, size, &w) == 0) {
        unsigned acc = 0;
        for (size_t i = 0; i < cs_weights_count(w); i++) {
            const cs_tensor_entry *e = cs_weights_at(w, i);
            const unsigned char *p = e->data;
            for (size_t k = 0; k < e->nbytes; k++) acc += p[k];
            if (cs_weights_find(w, e->name) != e) __builtin_trap();
        }
        sink = acc;
        cs_weights_free(w);
    }
    return 0;
}
