/* make_checkpoint KEYS.tsv OUT_PREFIX [--seed N]
 *
 * Writes OUT_PREFIX.safetensors and OUT_PREFIX.pt holding exactly the tensors of
 * KEYS.tsv (name<TAB>shape<TAB>float32, e.g. official_keys.tsv) with deterministic
 * pseudo-random values: roughly N(0, 0.02), and 1 for normalisation weights.
 * As in the official file, the decoder's class_embed.k / bbox_embed.k (k = 0..L-1)
 * are one module under L names: equal values, and one shared storage in the .pt.
 * Tensors are generated one at a time and streamed to disk (values are a function
 * of the name and seed, so both files get the same bytes without keeping them). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "weights.h"
#include "weights_pt_write.h"

typedef struct {
    char *name;
    char *canonical; /* name with the shared-module index replaced by 0 */
    int ndim;
    int64_t shape[CS_MAX_DIMS];
    size_t numel;
    int storage; /* .pt storage id, -1 until written */
} key;

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t hash_name(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

static int is_norm_weight(const char *name) {
    size_t n = strlen(name);
    return strstr(name, "norm") && n > 7 && strcmp(name + n - 7, ".weight") == 0;
}

/* Values of one tensor: a sum of four 16-bit uniforms (Irwin-Hall, variance 1/3)
 * is close enough to a normal distribution for load tests. */
static void fill(float *out, size_t n, const key *k, uint64_t seed) {
    if (is_norm_weight(k->canonical)) {
        for (size_t i = 0; i < n; i++) out[i] = 1.0f;
        return;
    }
    uint64_t s = hash_name(k->canonical) ^ (seed * 0x2545f4914f6cdd1dull);
    const float scale = 0.02f * 1.7320508f / 65536.0f;
    for (size_t i = 0; i < n; i++) {
        uint64_t r = splitmix64(&s);
        uint32_t sum = (uint32_t)(r & 0xffff) + (uint32_t)((r >> 16) & 0xffff) +
                       (uint32_t)((r >> 32) & 0xffff) + (uint32_t)(r >> 48);
        out[i] = ((float)sum - 131070.0f) * scale;
    }
}

/* "…transformer.class_embed.3.weight" -> "…transformer.class_embed.0.weight" */
static char *canonical_name(const char *name) {
    char *c = strdup(name);
    if (!c) return NULL;
    const char *groups[2] = {".class_embed.", ".bbox_embed."};
    for (int g = 0; g < 2; g++) {
        char *p = strstr(c, groups[g]);
        if (!p) continue;
        char *d = p + strlen(groups[g]), *e = d;
        while (*e >= '0' && *e <= '9') e++;
        if (e == d || *e != '.') continue;
        *d = '0';
        memmove(d + 1, e, strlen(e) + 1);
    }
    return c;
}

static int read_keys(const char *path, key **out, size_t *count) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "make_checkpoint: cannot open %s\n", path);
        return 1;
    }
    size_t cap = 0, n = 0;
    key *keys = NULL;
    char line[4096];
    int lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        line[strcspn(line, "\r\n")] = '\0';
        if (!line[0]) continue;
        char *t1 = strchr(line, '\t');
        char *t2 = t1 ? strchr(t1 + 1, '\t') : NULL;
        if (!t1 || !t2 || strcmp(t2 + 1, "float32") != 0) {
            fprintf(stderr, "make_checkpoint: %s:%d: expected name<TAB>shape<TAB>float32\n", path, lineno);
            fclose(f);
            free(keys);
            return 1;
        }
        *t1 = *t2 = '\0';
        if (n == cap) {
            cap = cap ? 2 * cap : 1024;
            key *k = realloc(keys, cap * sizeof *k);
            if (!k) {
                fclose(f);
                free(keys);
                return 1;
            }
            keys = k;
        }
        key *k = &keys[n];
        memset(k, 0, sizeof *k);
        for (char *s = t1 + 1; *s;) {
            char *end;
            long long v = strtoll(s, &end, 10);
            if (end == s || v < 0 || k->ndim == CS_MAX_DIMS) {
                fprintf(stderr, "make_checkpoint: %s:%d: bad shape\n", path, lineno);
                fclose(f);
                free(keys);
                return 1;
            }
            k->shape[k->ndim++] = v;
            s = *end == ',' ? end + 1 : end;
            if (*end && *end != ',') break;
        }
        if (cs_dims_product(k->shape, k->ndim, (size_t)1 << 31, &k->numel)) {
            fprintf(stderr, "make_checkpoint: %s:%d: tensor too large\n", path, lineno);
            fclose(f);
            free(keys);
            return 1;
        }
        k->name = strdup(line);
        k->canonical = canonical_name(line);
        k->storage = -1;
        n++;
    }
    fclose(f);
    *out = keys;
    *count = n;
    return 0;
}

static int write_safetensors(const char *path, const key *keys, size_t n, float *buf, uint64_t seed) {
    json_t *root = json_object();
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_object(), *shape = json_array(), *offs = json_array();
        for (int d = 0; d < keys[i].ndim; d++) json_array_append_new(shape, json_integer(keys[i].shape[d]));
        json_array_append_new(offs, json_integer((json_int_t)off));
        off += keys[i].numel * 4;
        json_array_append_new(offs, json_integer((json_int_t)off));
        json_object_set_new(t, "dtype", json_string("F32"));
        json_object_set_new(t, "shape", shape);
        json_object_set_new(t, "data_offsets", offs);
        json_object_set_new(root, keys[i].name, t);
    }
    json_t *meta = json_object();
    json_object_set_new(meta, "format", json_string("pt"));
    json_object_set_new(root, "__metadata__", meta);
    char *hdr = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!hdr) return 1;
    size_t hl = strlen(hdr), padded = (hl + 7) & ~(size_t)7;
    cs_atomic_file af;
    if (cs_atomic_open(&af, path)) {
        free(hdr);
        fprintf(stderr, "make_checkpoint: %s\n", cellsam_last_error());
        return 1;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    fwrite(len8, 1, 8, af.f);
    fwrite(hdr, 1, hl, af.f);
    for (size_t i = hl; i < padded; i++) fputc(' ', af.f);
    free(hdr);
    for (size_t i = 0; i < n; i++) {
        fill(buf, keys[i].numel, &keys[i], seed);
        fwrite(buf, 4, keys[i].numel, af.f);
    }
    if (cs_atomic_commit(&af)) {
        fprintf(stderr, "make_checkpoint: %s\n", cellsam_last_error());
        return 1;
    }
    return 0;
}

static int write_pt(const char *path, key *keys, size_t n, float *buf, uint64_t seed) {
    cs_pt_writer *pw;
    if (cs_pt_writer_open(&pw, path, "archive", 0)) {
        fprintf(stderr, "make_checkpoint: %s\n", cellsam_last_error());
        return 1;
    }
    size_t shared = 0;
    for (size_t i = 0; i < n; i++) {
        key *k = &keys[i];
        /* a later copy of a shared module reuses the first copy's storage */
        for (size_t j = 0; j < i && k->storage < 0; j++)
            if (keys[j].storage >= 0 && strcmp(keys[j].canonical, k->canonical) == 0 &&
                keys[j].numel == k->numel)
                k->storage = keys[j].storage;
        if (k->storage >= 0) {
            shared++;
        } else {
            fill(buf, k->numel, k, seed);
            if (cs_pt_writer_add_storage(pw, CS_DTYPE_F32, buf, k->numel, &k->storage)) break;
        }
        if (cs_pt_writer_add_tensor(pw, k->name, k->storage, 0, k->ndim, k->shape, NULL)) break;
    }
    int rc = cs_pt_writer_close(pw);
    if (rc) {
        fprintf(stderr, "make_checkpoint: %s\n", cellsam_last_error());
        return 1;
    }
    printf("  %zu names share another name's storage\n", shared);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3 && !(argc == 5 && strcmp(argv[3], "--seed") == 0)) {
        fprintf(stderr, "usage: make_checkpoint KEYS.tsv OUT_PREFIX [--seed N]\n");
        return 2;
    }
    uint64_t seed = argc == 5 ? strtoull(argv[4], NULL, 10) : 1;
    key *keys;
    size_t n;
    if (read_keys(argv[1], &keys, &n)) return 1;
    size_t largest = 1, total = 0;
    for (size_t i = 0; i < n; i++) {
        if (keys[i].numel > largest) largest = keys[i].numel;
        total += keys[i].numel;
    }
    float *buf = malloc(largest * sizeof *buf);
    if (!buf) return 1;
    size_t plen = strlen(argv[2]) + 32;
    char *path = malloc(plen);
    if (!path) return 1;
    printf("%zu tensors, %zu values (%.1f MB as float32), largest %zu\n", n, total, total * 4.0 / 1e6,
           largest);
    double t0 = cs_now_seconds();
    snprintf(path, plen, "%s.safetensors", argv[2]);
    int rc = write_safetensors(path, keys, n, buf, seed);
    double t1 = cs_now_seconds();
    if (!rc) printf("wrote %s in %.2f s\n", path, t1 - t0);
    snprintf(path, plen, "%s.pt", argv[2]);
    if (!rc) rc = write_pt(path, keys, n, buf, seed);
    if (!rc) printf("wrote %s in %.2f s\n", path, cs_now_seconds() - t1);
    for (size_t i = 0; i < n; i++) {
        free(keys[i].name);
        free(keys[i].canonical);
    }
    free(keys);
    free(buf);
    free(path);
    return rc;
}
