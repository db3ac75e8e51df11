/* Shared by the weight-loader fuzzers: read every byte of every tensor (so that
 * ASan sees any bad view) and check the name index. */
#ifndef CELLSAM_FUZZ_COMMON_H
#define CELLSAM_FUZZ_COMMON_H

#include "weights.h"

static inline unsigned fuzz_touch_weights(const cs_weights *w) {
    unsigned acc = 0;
    for (size_t i = 0; i < cs_weights_count(w); i++) {
        const cs_tensor_entry *e = cs_weights_at(w, i);
        const unsigned char *p = e->data;
        for (size_t k = 0; k < e->nbytes; k++) acc += p[k];
        if (cs_weights_find(w, e->name) != e) __builtin_trap();
    }
    return acc;
}

#endif
