/* Tensor store shared by both checkpoint formats, and the safetensors format
 * (read: mmap + zero copy; write: any dtype, atomic rename). */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"
#include "weights.h"

struct cs_weights {
    char format[16];
    cs_tensor_entry *entries;
    void **owned; /* per entry: buffer to free, or NULL */
    size_t count, cap;
    size_t *index; /* entries sorted by name, for binary search */
    void *map_addr;
    size_t map_len;
    json_t *meta; /* safetensors __metadata__ (string values), or NULL */
};

size_t cs_dtype_size(cs_dtype t) { return t == CS_DTYPE_F32 ? 4 : 2; }

const char *cs_dtype_name(cs_dtype t) {
    switch (t) {
    case CS_DTYPE_F32: return "F32";
    case CS_DTYPE_F16: return "F16";
    case CS_DTYPE_BF16: return "BF16";
    }
    return "?";
}

void cs_tensor_to_f32(const cs_tensor_entry *e, float *dst) {
    const size_t n = e->nbytes / cs_dtype_size(e->dtype);
    const unsigned char *src = e->data;
    if (e->dtype == CS_DTYPE_F32) {
        memcpy(dst, src, n * sizeof *dst);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        dst[i] = e->dtype == CS_DTYPE_F16 ? cs_f16_to_f32(h) : cs_bf16_to_f32(h);
    }
}

cs_weights *cs_weights_new(const char *format) {
    cs_weights *w = calloc(1, sizeof *w);
    if (!w) {
        cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        return NULL;
    }
    snprintf(w->format, sizeof w->format, "%s", format);
    return w;
}

static int add_entry(cs_weights *w, const char *name, cs_dtype dtype, int ndim,
                     const int64_t *shape, const void *data, size_t nbytes, void *owned) {
    if (ndim < 0 || ndim > CS_MAX_DIMS)
        return cs_error(CELLSAM_ERR_FORMAT, "tensor %s has %d dimensions (max %d)", name, ndim,
                        CS_MAX_DIMS);
    size_t n;
    if (cs_dims_product(shape, ndim, 0, &n) || cs_mul_size(n, cs_dtype_size(dtype), &n) ||
        n != nbytes)
        return cs_error(CELLSAM_ERR_FORMAT, "tensor %s: shape does not match its %zu data bytes",
                        name, nbytes);
    if (w->count >= CS_MAX_TENSORS)
        return cs_error(CELLSAM_ERR_LIMIT, "more than %d tensors", CS_MAX_TENSORS);
    if (w->count == w->cap) {
        size_t ncap = w->cap ? w->cap * 2 : 256;
        cs_tensor_entry *e = realloc(w->entries, ncap * sizeof *e);
        if (!e) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        w->entries = e;
        void **o = realloc(w->owned, ncap * sizeof *o);
        if (!o) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        w->owned = o;
        w->cap = ncap;
    }
    cs_tensor_entry *e = &w->entries[w->count];
    memset(e, 0, sizeof *e);
    e->name = strdup(name);
    if (!e->name) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    e->dtype = dtype;
    e->ndim = ndim;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
    e->data = data;
    e->nbytes = nbytes;
    w->owned[w->count] = owned;
    w->count++;
    return CELLSAM_OK;
}

int cs_weights_add_view(cs_weights *w, const char *name, cs_dtype dtype, int ndim,
                        const int64_t *shape, const void *data, size_t nbytes) {
    return add_entry(w, name, dtype, ndim, shape, data, nbytes, NULL);
}

int cs_weights_add_owned(cs_weights *w, const char *name, cs_dtype dtype, int ndim,
                         const int64_t *shape, void *owned, size_t nbytes) {
    int rc = add_entry(w, name, dtype, ndim, shape, owned, nbytes, owned);
    if (rc) free(owned);
    return rc;
}

void cs_weights_drop_pages(const cs_weights *w, const void *p, size_t bytes) {
    const uintptr_t base = (uintptr_t)w->map_addr, a = (uintptr_t)p;
    if (!w->map_addr || a < base || bytes > w->map_len || a - base > w->map_len - bytes) return;
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t lo = (a + page - 1) / page * page, hi = (a + bytes) / page * page;
    /* a private read-only file mapping: dropped pages are re-read from the file if touched */
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

void cs_weights_set_mapping(cs_weights *w, void *addr, size_t len) {
    w->map_addr = addr;
    w->map_len = len;
}

int cs_weights_finish(cs_weights *w) {
    free(w->index);
    w->index = malloc((w->count ? w->count : 1) * sizeof *w->index);
    if (!w->index) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < w->count; i++) w->index[i] = i;
    /* Bottom-up merge sort of the index by name (qsort has no context argument). */
    size_t n = w->count;
    size_t *tmp = malloc((n ? n : 1) * sizeof *tmp);
    if (!tmp) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    for (size_t width = 1; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = lo + width < n ? lo + width : n;
            size_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi)
                tmp[k++] = strcmp(w->entries[w->index[i]].name, w->entries[w->index[j]].name) <= 0
                               ? w->index[i++]
                               : w->index[j++];
            while (i < mid) tmp[k++] = w->index[i++];
            while (j < hi) tmp[k++] = w->index[j++];
        }
        memcpy(w->index, tmp, n * sizeof *tmp);
    }
    free(tmp);
    for (size_t i = 1; i < n; i++)
        if (strcmp(w->entries[w->index[i]].name, w->entries[w->index[i - 1]].name) == 0)
            return cs_error(CELLSAM_ERR_FORMAT, "duplicate tensor name %s",
                            w->entries[w->index[i]].name);
    return CELLSAM_OK;
}

void cs_weights_free(cs_weights *w) {
    if (!w) return;
    for (size_t i = 0; i < w->count; i++) {
        free(w->entries[i].name);
        free(w->owned[i]);
    }
    free(w->entries);
    free(w->owned);
    free(w->index);
    if (w->map_addr) munmap(w->map_addr, w->map_len);
    if (w->meta) json_decref(w->meta);
    free(w);
}

size_t cs_weights_count(const cs_weights *w) { return w->count; }
const cs_tensor_entry *cs_weights_at(const cs_weights *w, size_t i) {
    return i < w->count ? &w->entries[i] : NULL;
}
const char *cs_weights_format(const cs_weights *w) { return w->format; }

const cs_tensor_entry *cs_weights_find(const cs_weights *w, const char *name) {
    if (!w->index) return NULL;
    size_t lo = 0, hi = w->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(w->entries[w->index[mid]].name, name);
        if (c == 0) return &w->entries[w->index[mid]];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

int64_t cs_weights_dim(const cs_weights *w, const char *prefix, const char *name, int axis) {
    char full[512];
    snprintf(full, sizeof full, "%s%s", prefix ? prefix : "", name);
    const cs_tensor_entry *e = cs_weights_find(w, full);
    return e && axis >= 0 && axis < e->ndim ? e->shape[axis] : -1;
}

/* ---------------------------------------------------------------- mmap */

static int map_file(const char *path, void **addr, size_t *len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return cs_error(CELLSAM_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return cs_error(CELLSAM_ERR_IO, "%s is not a regular file", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return cs_error(CELLSAM_ERR_FORMAT, "%s is empty", path);
    }
    if ((uint64_t)st.st_size > CS_MAX_CHECKPOINT_BYTES) {
        close(fd);
        return cs_error(CELLSAM_ERR_LIMIT, "%s is larger than the checkpoint limit", path);
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return cs_error(CELLSAM_ERR_IO, "cannot map %s: %s", path, strerror(errno));
    *addr = p;
    *len = (size_t)st.st_size;
    return CELLSAM_OK;
}

int cs_weights_open(const char *path, cs_weights **out) {
    *out = NULL;
    unsigned char magic[4] = {0};
    FILE *f = fopen(path, "rb");
    if (!f) return cs_error(CELLSAM_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    size_t got = fread(magic, 1, 4, f);
    fclose(f);
    if (got == 4 && magic[0] == 'P' && magic[1] == 'K' && magic[2] == 3 && magic[3] == 4)
        return cs_weights_open_pt(path, out);
    if (got >= 2 && magic[0] == 0x80 && magic[1] <= 5)
        return cs_error(CELLSAM_ERR_UNSUPPORTED,
                        "%s: legacy (pre-1.6) PyTorch serialization; re-save it with torch >= 1.6 "
                        "(torch.save(torch.load(f), g)) or convert it to safetensors", path);
    return cs_weights_open_safetensors(path, out);
}

/* ---------------------------------------------------------- safetensors */

#define ST_MAX_HEADER ((size_t)100 << 20)

int cs_weights_parse_safetensors(const unsigned char *data, size_t size, cs_weights **out) {
    *out = NULL;
    if (size < 8) return cs_error(CELLSAM_ERR_FORMAT, "safetensors: file shorter than its header");
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | data[i];
    if (hlen > ST_MAX_HEADER || hlen > size - 8)
        return cs_error(CELLSAM_ERR_FORMAT, "safetensors: header length %llu exceeds the file",
                        (unsigned long long)hlen);
    json_error_t jerr;
    json_t *root = json_loadb((const char *)data + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return cs_error(CELLSAM_ERR_FORMAT, "safetensors: bad JSON header: %s", jerr.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return cs_error(CELLSAM_ERR_FORMAT, "safetensors: header is not a JSON object");
    }
    const unsigned char *base = data + 8 + hlen;
    size_t avail = size - 8 - (size_t)hlen;
    cs_weights *w = cs_weights_new("safetensors");
    if (!w) {
        json_decref(root);
        return CELLSAM_ERR_NOMEM;
    }
    int rc = CELLSAM_OK;
    /* Keep the file's order: jansson iterates objects in insertion order. */
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            /* keep string entries only (the format allows nothing else) */
            const char *mk;
            json_t *mv;
            json_object_foreach(val, mk, mv) {
                if (json_is_string(mv) && cs_weights_set_meta(w, mk, json_string_value(mv)) != CELLSAM_OK) {
                    rc = CELLSAM_ERR_NOMEM;
                    break;
                }
            }
            if (rc) break;
            continue;
        }
        json_t *jd = json_object_get(val, "dtype");
        json_t *js = json_object_get(val, "shape");
        json_t *jo = json_object_get(val, "data_offsets");
        if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
            json_array_size(jo) != 2) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "safetensors: tensor %s has a malformed entry", key);
            break;
        }
        const char *ds = json_string_value(jd);
        cs_dtype dt;
        if (!strcmp(ds, "F32")) dt = CS_DTYPE_F32;
        else if (!strcmp(ds, "F16")) dt = CS_DTYPE_F16;
        else if (!strcmp(ds, "BF16")) dt = CS_DTYPE_BF16;
        else {
            rc = cs_error(CELLSAM_ERR_UNSUPPORTED, "safetensors: tensor %s has dtype %s (need F32, F16 or BF16)",
                          key, ds);
            break;
        }
        size_t nd = json_array_size(js);
        if (nd > CS_MAX_DIMS) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "safetensors: tensor %s has %zu dimensions", key, nd);
            break;
        }
        int64_t shape[CS_MAX_DIMS];
        for (size_t i = 0; i < nd; i++) {
            json_t *d = json_array_get(js, i);
            if (!json_is_integer(d) || json_integer_value(d) < 0) {
                rc = cs_error(CELLSAM_ERR_FORMAT, "safetensors: tensor %s has a bad shape", key);
                break;
            }
            shape[i] = json_integer_value(d);
        }
        if (rc) break;
        json_t *o0 = json_array_get(jo, 0), *o1 = json_array_get(jo, 1);
        if (!json_is_integer(o0) || !json_is_integer(o1)) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "safetensors: tensor %s has bad offsets", key);
            break;
        }
        json_int_t b = json_integer_value(o0), e = json_integer_value(o1);
        if (b < 0 || e < b || (uint64_t)e > avail) {
            rc = cs_error(CELLSAM_ERR_FORMAT,
                          "safetensors: tensor %s data [%lld,%lld) lies outside the file (%zu data bytes): truncated?",
                          key, (long long)b, (long long)e, avail);
            break;
        }
        size_t n = 0;
        if (cs_dims_product(shape, (int)nd, 0, &n) || cs_mul_size(n, cs_dtype_size(dt), &n)) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "safetensors: tensor %s: shape is too large", key);
            break;
        }
        if (n != (size_t)(e - b)) {
            rc = cs_error(CELLSAM_ERR_FORMAT,
                          "safetensors: tensor %s: shape needs %zu bytes but offsets give %lld", key,
                          n, (long long)(e - b));
            break;
        }
        rc = cs_weights_add_view(w, key, dt, (int)nd, shape, base + b, (size_t)(e - b));
        if (rc) break;
    }
    json_decref(root);
    if (!rc) rc = cs_weights_finish(w);
    if (rc) {
        cs_weights_free(w);
        return rc;
    }
    *out = w;
    return CELLSAM_OK;
}

int cs_weights_open_safetensors(const char *path, cs_weights **out) {
    void *addr = NULL;
    size_t len = 0;
    *out = NULL;
    int rc = map_file(path, &addr, &len);
    if (rc) return rc;
    rc = cs_weights_parse_safetensors(addr, len, out);
    if (rc) {
        munmap(addr, len);
        return cs_error_prefix(rc, "%s", path);
    }
    cs_weights_set_mapping(*out, addr, len);
    return CELLSAM_OK;
}

int cs_weights_open_pt(const char *path, cs_weights **out) {
    void *addr = NULL;
    size_t len = 0;
    *out = NULL;
    int rc = map_file(path, &addr, &len);
    if (rc) return rc;
    rc = cs_weights_parse_pt(addr, len, out);
    if (rc) {
        munmap(addr, len);
        return cs_error_prefix(rc, "%s", path);
    }
    cs_weights_set_mapping(*out, addr, len);
    return CELLSAM_OK;
}

/* Convert n elements of `src` (dtype s) into `dst` (dtype d). */
static void convert_elems(void *dst, cs_dtype d, const void *src, cs_dtype s, size_t n) {
    const unsigned char *sp = src;
    unsigned char *dp = dst;
    for (size_t i = 0; i < n; i++) {
        float v;
        if (s == CS_DTYPE_F32) memcpy(&v, sp + 4 * i, 4);
        else {
            uint16_t h;
            memcpy(&h, sp + 2 * i, 2);
            v = s == CS_DTYPE_F16 ? cs_f16_to_f32(h) : cs_bf16_to_f32(h);
        }
        if (d == CS_DTYPE_F32) memcpy(dp + 4 * i, &v, 4);
        else {
            uint16_t h = d == CS_DTYPE_F16 ? cs_f32_to_f16(v) : cs_f32_to_bf16(v);
            memcpy(dp + 2 * i, &h, 2);
        }
    }
}

int cs_weights_save_safetensors(const cs_weights *w, const char *path, cs_dtype dtype) {
    json_t *root = json_object();
    if (!root) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    size_t offset = 0;
    for (size_t i = 0; i < w->count; i++) {
        const cs_tensor_entry *e = &w->entries[i];
        size_t n = e->nbytes / cs_dtype_size(e->dtype) * cs_dtype_size(dtype);
        json_t *t = json_object();
        json_t *shape = json_array();
        for (int d = 0; d < e->ndim; d++) json_array_append_new(shape, json_integer(e->shape[d]));
        json_object_set_new(t, "dtype", json_string(cs_dtype_name(dtype)));
        json_object_set_new(t, "shape", shape);
        json_t *offs = json_array();
        json_array_append_new(offs, json_integer((json_int_t)offset));
        json_array_append_new(offs, json_integer((json_int_t)(offset + n)));
        json_object_set_new(t, "data_offsets", offs);
        json_object_set_new(root, e->name, t);
        offset += n;
    }
    json_t *meta = json_object();
    json_object_set_new(meta, "format", json_string("pt"));
    json_object_set_new(meta, "writer", json_string("cellsam " CELLSAM_VERSION));
    if (w->meta) {
        const char *mk;
        json_t *mv;
        json_object_foreach(w->meta, mk, mv) {
            if (strcmp(mk, "format") && strcmp(mk, "writer")) json_object_set(meta, mk, mv);
        }
    }
    json_object_set_new(root, "__metadata__", meta);
    char *hdr = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!hdr) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    size_t hlen = strlen(hdr);
    size_t padded = (hlen + 7) & ~(size_t)7;
    cs_atomic_file af;
    int rc = cs_atomic_open(&af, path);
    if (rc) {
        free(hdr);
        return rc;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    fwrite(len8, 1, 8, af.f);
    fwrite(hdr, 1, hlen, af.f);
    for (size_t i = hlen; i < padded; i++) fputc(' ', af.f);
    free(hdr);
    unsigned char *buf = malloc(1 << 20);
    if (!buf) {
        cs_atomic_abort(&af);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < w->count; i++) {
        const cs_tensor_entry *e = &w->entries[i];
        size_t esz = cs_dtype_size(e->dtype), n = e->nbytes / esz;
        const size_t chunk = (1 << 20) / 4;
        for (size_t k = 0; k < n; k += chunk) {
            size_t m = n - k < chunk ? n - k : chunk;
            convert_elems(buf, dtype, (const unsigned char *)e->data + k * esz, e->dtype, m);
            fwrite(buf, cs_dtype_size(dtype), m, af.f);
        }
    }
    free(buf);
    return cs_atomic_commit(&af);
}

int cs_weights_set_meta(cs_weights *w, const char *key, const char *value) {
    if (!w || !key || !value) return cs_error(CELLSAM_ERR_INVALID, "cs_weights_set_meta: NULL argument");
    if (!w->meta && !(w->meta = json_object())) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    if (json_object_set_new(w->meta, key, json_string(value)) != 0)
        return cs_error(CELLSAM_ERR_INVALID, "metadata %s: not valid UTF-8", key);
    return CELLSAM_OK;
}

int cs_weights_copy_meta(cs_weights *dst, const cs_weights *src) {
    if (!dst || !src) return cs_error(CELLSAM_ERR_INVALID, "cs_weights_copy_meta: NULL argument");
    if (!src->meta) return CELLSAM_OK;
    const char *mk;
    json_t *mv;
    json_object_foreach(src->meta, mk, mv) {
        int rc = json_is_string(mv) ? cs_weights_set_meta(dst, mk, json_string_value(mv)) : CELLSAM_OK;
        if (rc) return rc;
    }
    return CELLSAM_OK;
}

const char *cs_weights_get_meta(const cs_weights *w, const char *key) {
    if (!w || !w->meta || !key) return NULL;
    return json_string_value(json_object_get(w->meta, key));
}
