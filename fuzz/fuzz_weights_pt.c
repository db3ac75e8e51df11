/* libFuzzer target: the PyTorch checkpoint reader (zip + restricted unpickler).
 *
 * Inputs starting with "PK" are whole .pt files. Any other input is taken as a
 * bare data.pkl and wrapped in an archive with 16 storages ("0".."15", 256
 * float32 each), so that mutations, which rarely keep a zip's offsets intact,
 * still exercise the unpickler in depth.
 * The CRC check is off (mutated data.pkl bytes would fail it) and the reader's
 * memory cap is lowered to stay under libFuzzer's RSS limit. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "weights.h"
#include "weights_pt_write.h"

#define N_STORAGES 16
#define STORAGE_BYTES 1024

static volatile unsigned sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void put16(unsigned char *p, unsigned v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}
static void put32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* A stored zip: local header + name + data per entry, then the directory. */
static unsigned char *wrap_pickle(const uint8_t *pkl, size_t n, size_t *out_size) {
    char names[N_STORAGES + 1][32];
    const unsigned char *bodies[N_STORAGES + 1];
    size_t lens[N_STORAGES + 1];
    static unsigned char storage[STORAGE_BYTES];
    for (size_t i = 0; i < STORAGE_BYTES; i++) storage[i] = (unsigned char)(i * 37 + 11);
    strcpy(names[0], "archive/data.pkl");
    bodies[0] = pkl;
    lens[0] = n;
    for (int s = 0; s < N_STORAGES; s++) {
        snprintf(names[s + 1], sizeof names[s + 1], "archive/data/%d", s);
        bodies[s + 1] = storage;
        lens[s + 1] = STORAGE_BYTES;
    }
    size_t total = 22;
    for (int e = 0; e <= N_STORAGES; e++) total += 30 + 46 + 2 * strlen(names[e]) + lens[e];
    unsigned char *z = calloc(1, total), *p = z;
    if (!z) return NULL;
    uint32_t offs[N_STORAGES + 1];
    for (int e = 0; e <= N_STORAGES; e++) {
        size_t nl = strlen(names[e]);
        offs[e] = (uint32_t)(p - z);
        put32(p, 0x04034b50u);
        put16(p + 4, 20);
        put32(p + 18, (uint32_t)lens[e]);
        put32(p + 22, (uint32_t)lens[e]);
        put16(p + 26, (unsigned)nl);
        memcpy(p + 30, names[e], nl);
        if (lens[e]) memcpy(p + 30 + nl, bodies[e], lens[e]);
        p += 30 + nl + lens[e];
    }
    unsigned char *cd = p;
    for (int e = 0; e <= N_STORAGES; e++) {
        size_t nl = strlen(names[e]);
        put32(p, 0x02014b50u);
        put16(p + 4, 20);
        put16(p + 6, 20);
        put32(p + 20, (uint32_t)lens[e]);
        put32(p + 24, (uint32_t)lens[e]);
        put16(p + 28, (unsigned)nl);
        put32(p + 42, offs[e]);
        memcpy(p + 46, names[e], nl);
        p += 46 + nl;
    }
    put32(p, 0x06054b50u);
    put16(p + 8, N_STORAGES + 1);
    put16(p + 10, N_STORAGES + 1);
    put32(p + 12, (uint32_t)(p - cd));
    put32(p + 16, (uint32_t)(cd - z));
    p += 22;
    *out_size = (size_t)(p - z);
    return z;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > ((size_t)1 << 20)) return 0;
    unsigned char *wrapped = NULL;
    if (!(size >= 2 && data[0] == 'P' && data[1] == 'K')) {
        wrapped = wrap_pickle(data, size, &size);
        if (!wrapped) return 0;
        data = wrapped;
    }
    cs_pt_options opts = {CS_PT_NO_CRC, (size_t)64 << 20};
    cs_weights *w = NULL;
    if (cs_weights_parse_pt_ex(data, size, &opts, &w) == 0) {
        sink = fuzz_touch_weights(w);
        cs_weights_free(w);
    }
    free(wrapped);
    return 0;
}
