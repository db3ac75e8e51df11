/* PyTorch checkpoint writer: the layout torch.save produces (torch >= 1.6), so the
 * files load with torch.load. A zip archive whose entries are
 *   <prefix>/data/<n>     raw little-endian storages, data aligned to 64 bytes,
 *   <prefix>/data.pkl     pickle protocol 2 of an OrderedDict name -> tensor,
 *   <prefix>/version, <prefix>/byteorder.
 * Like torch, local headers carry no sizes (a data descriptor follows each entry)
 * and the archive ends with zip64 records; storages are streamed, so a
 * checkpoint larger than memory can be written. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "common.h"
#include "weights.h"
#include "weights_pt_write.h"

#define ALIGN 64
#define MAX_ENTRY_BYTES 0xfffffffeull /* sizes in the data descriptor are 32-bit */
#define SETITEMS_BATCH 1000           /* as Python's pickler batches */

typedef struct {
    char *name;
    uint64_t local_off, csize, usize;
    uint32_t crc;
    uint16_t method;
} wz_entry;

typedef struct {
    char type[48];
    size_t numel;
} w_storage;

typedef struct {
    char *name;
    int storage;
    int64_t offset;
    int ndim;
    int64_t shape[CS_MAX_DIMS], stride[CS_MAX_DIMS];
} w_tensor;

typedef struct {
    unsigned char *p;
    size_t n, cap;
    int failed;
} bytebuf;

typedef struct {
    char key[112];
    uint32_t memo;
} memo_slot;

struct cs_pt_writer {
    cs_atomic_file af;
    int failed; /* first error code; every later call is a no-op */
    char prefix[128];
    int compress, nested;
    uint64_t pos;
    wz_entry *entries;
    size_t n_entries, cap_entries;
    w_storage *storages;
    size_t n_storages, cap_storages;
    w_tensor *tensors;
    size_t n_tensors, cap_tensors;
    /* the entry being written */
    int in_entry;
    uint64_t data_start, expect, got;
    uint32_t crc;
    z_stream zs;
    unsigned char *zbuf;
    /* optional overrides */
    unsigned char *custom_pkl;
    size_t custom_pkl_len;
    int has_custom_pkl, has_version, has_byteorder;
    /* pickle memo for repeated globals */
    memo_slot memo[16];
    uint32_t n_memo;
};

static const size_t ZBUF_SIZE = (size_t)1 << 16;

/* ------------------------------------------------------------ raw output */

static int fail(cs_pt_writer *pw, int code) {
    if (!pw->failed) pw->failed = code;
    return code;
}

static void out(cs_pt_writer *pw, const void *p, size_t n) {
    if (pw->failed || n == 0) return;
    if (fwrite(p, 1, n, pw->af.f) != n) {
        cs_error(CELLSAM_ERR_IO, "write to %s failed", pw->af.final_path);
        fail(pw, CELLSAM_ERR_IO);
        return;
    }
    pw->pos += n;
}

static void put16(unsigned char *b, uint16_t v) {
    b[0] = (unsigned char)v;
    b[1] = (unsigned char)(v >> 8);
}
static void put32(unsigned char *b, uint32_t v) {
    for (int i = 0; i < 4; i++) b[i] = (unsigned char)(v >> (8 * i));
}
static void put64(unsigned char *b, uint64_t v) {
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(v >> (8 * i));
}

static void *grow(void *arr, size_t *cap, size_t elem) {
    size_t ncap = *cap ? *cap * 2 : 16;
    void *p = realloc(arr, ncap * elem);
    if (p) *cap = ncap;
    return p;
}

/* ------------------------------------------------------------- zip entries */

static int entry_begin(cs_pt_writer *pw, const char *rel) {
    if (pw->failed) return pw->failed;
    if (pw->in_entry) {
        cs_error(CELLSAM_ERR_INVALID, "pt writer: an entry is still open");
        return fail(pw, CELLSAM_ERR_INVALID);
    }
    if (pw->n_entries == pw->cap_entries) {
        wz_entry *e = grow(pw->entries, &pw->cap_entries, sizeof *e);
        if (!e) {
            cs_error(CELLSAM_ERR_NOMEM, "out of memory");
            return fail(pw, CELLSAM_ERR_NOMEM);
        }
        pw->entries = e;
    }
    size_t nl = strlen(pw->prefix) + 1 + strlen(rel);
    if (nl > 0xffff) {
        cs_error(CELLSAM_ERR_INVALID, "pt writer: entry name too long");
        return fail(pw, CELLSAM_ERR_INVALID);
    }
    wz_entry *e = &pw->entries[pw->n_entries];
    memset(e, 0, sizeof *e);
    e->name = malloc(nl + 1);
    if (!e->name) {
        cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        return fail(pw, CELLSAM_ERR_NOMEM);
    }
    snprintf(e->name, nl + 1, "%s/%s", pw->prefix, rel);
    e->local_off = pw->pos;
    e->method = pw->compress ? 8 : 0;
    pw->n_entries++;

    /* Pad with an extra field (id "FB", as torch does) so the data is 64-aligned. */
    uint64_t after = pw->pos + 30 + nl + 4;
    size_t pad = (size_t)((ALIGN - after % ALIGN) % ALIGN);
    unsigned char h[30];
    put32(h, 0x04034b50u);
    put16(h + 4, 20);
    put16(h + 6, 0x0808); /* sizes in a data descriptor; UTF-8 names */
    put16(h + 8, e->method);
    put16(h + 10, 0);
    put16(h + 12, 0x21); /* 1980-01-01 */
    put32(h + 14, 0);
    put32(h + 18, 0);
    put32(h + 22, 0);
    put16(h + 26, (uint16_t)nl);
    put16(h + 28, (uint16_t)(4 + pad));
    out(pw, h, sizeof h);
    out(pw, e->name, nl);
    unsigned char x[4 + ALIGN];
    put16(x, 0x4246);
    put16(x + 2, (uint16_t)pad);
    memset(x + 4, 'Z', pad);
    out(pw, x, 4 + pad);

    pw->in_entry = 1;
    pw->data_start = pw->pos;
    pw->got = 0;
    pw->expect = UINT64_MAX;
    pw->crc = (uint32_t)crc32(0L, Z_NULL, 0);
    if (pw->compress) {
        memset(&pw->zs, 0, sizeof pw->zs);
        if (!pw->zbuf) pw->zbuf = malloc(ZBUF_SIZE);
        if (!pw->zbuf || deflateInit2(&pw->zs, 6, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
            pw->in_entry = 0;
            cs_error(CELLSAM_ERR_NOMEM, "zlib: cannot start deflating");
            return fail(pw, CELLSAM_ERR_NOMEM);
        }
    }
    return pw->failed;
}

static int deflate_out(cs_pt_writer *pw, int flush) {
    int zr;
    do {
        pw->zs.next_out = pw->zbuf;
        pw->zs.avail_out = (uInt)ZBUF_SIZE;
        zr = deflate(&pw->zs, flush);
        if (zr == Z_STREAM_ERROR) {
            cs_error(CELLSAM_ERR_IO, "zlib: deflate failed");
            return fail(pw, CELLSAM_ERR_IO);
        }
        out(pw, pw->zbuf, ZBUF_SIZE - pw->zs.avail_out);
    } while (pw->zs.avail_out == 0 && !pw->failed);
    (void)zr;
    return pw->failed;
}

static int entry_data(cs_pt_writer *pw, const void *data, size_t n) {
    if (pw->failed) return pw->failed;
    if (!pw->in_entry) {
        cs_error(CELLSAM_ERR_INVALID, "pt writer: no entry open");
        return fail(pw, CELLSAM_ERR_INVALID);
    }
    if (n > pw->expect - pw->got || n > MAX_ENTRY_BYTES - pw->got) {
        cs_error(CELLSAM_ERR_INVALID, "pt writer: more data than the storage holds");
        return fail(pw, CELLSAM_ERR_INVALID);
    }
    if (n == 0) return CELLSAM_OK; /* crc32 of a NULL buffer would reset the sum */
    pw->crc = (uint32_t)crc32_z(pw->crc, data, (z_size_t)n);
    pw->got += n;
    if (!pw->compress) {
        out(pw, data, n);
        return pw->failed;
    }
    const unsigned char *p = data;
    while (n && !pw->failed) {
        uInt take = n > UINT32_MAX ? UINT32_MAX : (uInt)n;
        pw->zs.next_in = (Bytef *)(uintptr_t)p;
        pw->zs.avail_in = take;
        deflate_out(pw, Z_NO_FLUSH);
        p += take;
        n -= take;
    }
    return pw->failed;
}

static int entry_end(cs_pt_writer *pw) {
    if (pw->failed) return pw->failed;
    if (!pw->in_entry) {
        cs_error(CELLSAM_ERR_INVALID, "pt writer: no entry open");
        return fail(pw, CELLSAM_ERR_INVALID);
    }
    if (pw->expect != UINT64_MAX && pw->got != pw->expect) {
        cs_error(CELLSAM_ERR_INVALID, "pt writer: storage got %llu of its %llu bytes",
                 (unsigned long long)pw->got, (unsigned long long)pw->expect);
        return fail(pw, CELLSAM_ERR_INVALID);
    }
    if (pw->compress) {
        pw->zs.next_in = Z_NULL;
        pw->zs.avail_in = 0;
        deflate_out(pw, Z_FINISH);
        deflateEnd(&pw->zs);
    }
    pw->in_entry = 0;
    wz_entry *e = &pw->entries[pw->n_entries - 1];
    e->crc = pw->crc;
    e->usize = pw->got;
    e->csize = pw->pos - pw->data_start;
    if (e->csize > MAX_ENTRY_BYTES) {
        cs_error(CELLSAM_ERR_LIMIT, "pt writer: entry %s exceeds 4 GiB", e->name);
        return fail(pw, CELLSAM_ERR_LIMIT);
    }
    unsigned char d[16];
    put32(d, 0x08074b50u);
    put32(d + 4, e->crc);
    put32(d + 8, (uint32_t)e->csize);
    put32(d + 12, (uint32_t)e->usize);
    out(pw, d, sizeof d);
    return pw->failed;
}

static int whole_entry(cs_pt_writer *pw, const char *rel, const void *data, size_t n) {
    entry_begin(pw, rel);
    entry_data(pw, data, n);
    return entry_end(pw);
}

/* ------------------------------------------------------------------ pickle */

static void bb_put(bytebuf *b, const void *p, size_t n) {
    if (b->failed) return;
    if (n > b->cap - b->n) {
        size_t cap = b->cap ? b->cap : 4096;
        while (n > cap - b->n) {
            if (cap > SIZE_MAX / 2) {
                b->failed = 1;
                return;
            }
            cap *= 2;
        }
        unsigned char *q = realloc(b->p, cap);
        if (!q) {
            b->failed = 1;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}

static void bb_op(bytebuf *b, unsigned char op) { bb_put(b, &op, 1); }

static void pk_int(bytebuf *b, int64_t v) {
    unsigned char t[9];
    if (v >= 0 && v < 256) {
        t[0] = (unsigned char)v;
        bb_op(b, 'K');
        bb_put(b, t, 1);
    } else if (v >= 0 && v < 65536) {
        put16(t, (uint16_t)v);
        bb_op(b, 'M');
        bb_put(b, t, 2);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
        put32(t, (uint32_t)(int32_t)v);
        bb_op(b, 'J');
        bb_put(b, t, 4);
    } else { /* LONG1 with 8 bytes of two's complement */
        t[0] = 8;
        put64(t + 1, (uint64_t)v);
        bb_op(b, 0x8a);
        bb_put(b, t, 9);
    }
}

static void pk_str(bytebuf *b, const char *s) {
    size_t n = strlen(s);
    unsigned char t[4];
    put32(t, (uint32_t)n);
    bb_op(b, 'X');
    bb_put(b, t, 4);
    bb_put(b, s, n);
}

/* GLOBAL once, then BINGET of its memo slot (as Python's pickler does). */
static void pk_global(cs_pt_writer *pw, bytebuf *b, const char *mod, const char *name) {
    char key[112];
    snprintf(key, sizeof key, "%s\n%s\n", mod, name);
    for (uint32_t i = 0; i < pw->n_memo; i++)
        if (strcmp(pw->memo[i].key, key) == 0) {
            unsigned char t[2] = {'h', (unsigned char)pw->memo[i].memo};
            bb_put(b, t, 2);
            return;
        }
    bb_op(b, 'c');
    bb_put(b, key, strlen(key));
    if (pw->n_memo < sizeof pw->memo / sizeof pw->memo[0]) {
        memo_slot *m = &pw->memo[pw->n_memo];
        snprintf(m->key, sizeof m->key, "%s", key);
        m->memo = pw->n_memo++;
        unsigned char t[2] = {'q', (unsigned char)m->memo};
        bb_put(b, t, 2);
    }
}

static void pk_tensor(cs_pt_writer *pw, bytebuf *b, const w_tensor *t) {
    const w_storage *st = &pw->storages[t->storage];
    char key[32];
    snprintf(key, sizeof key, "%d", t->storage);
    pk_global(pw, b, "torch._utils", "_rebuild_tensor_v2");
    bb_op(b, '(');
    bb_op(b, '(');
    pk_str(b, "storage");
    pk_global(pw, b, "torch", st->type);
    pk_str(b, key);
    pk_str(b, "cpu");
    pk_int(b, (int64_t)st->numel);
    bb_op(b, 't');
    bb_op(b, 'Q');
    pk_int(b, t->offset);
    bb_op(b, '(');
    for (int d = 0; d < t->ndim; d++) pk_int(b, t->shape[d]);
    bb_op(b, 't');
    bb_op(b, '(');
    for (int d = 0; d < t->ndim; d++) pk_int(b, t->stride[d]);
    bb_op(b, 't');
    bb_op(b, 0x89); /* requires_grad = False */
    pk_global(pw, b, "collections", "OrderedDict");
    bb_op(b, ')');
    bb_op(b, 'R'); /* backward_hooks = OrderedDict() */
    bb_op(b, 't');
    bb_op(b, 'R');
}

static void pk_state_dict(cs_pt_writer *pw, bytebuf *b) {
    pk_global(pw, b, "collections", "OrderedDict");
    bb_op(b, ')');
    bb_op(b, 'R');
    for (size_t i = 0; i < pw->n_tensors; i += SETITEMS_BATCH) {
        bb_op(b, '(');
        for (size_t k = i; k < pw->n_tensors && k < i + SETITEMS_BATCH; k++) {
            pk_str(b, pw->tensors[k].name);
            pk_tensor(pw, b, &pw->tensors[k]);
        }
        bb_op(b, 'u');
    }
}

static void pk_checkpoint(cs_pt_writer *pw, bytebuf *b) {
    const unsigned char proto[2] = {0x80, 2};
    bb_put(b, proto, 2);
    if (pw->nested) {
        bb_op(b, '}');
        bb_op(b, '(');
        pk_str(b, "epoch");
        pk_int(b, 1);
        pk_str(b, "state_dict");
        pk_state_dict(pw, b);
        pk_str(b, "arch");
        pk_str(b, "cellsam");
        bb_op(b, 'u');
    } else {
        pk_state_dict(pw, b);
    }
    bb_op(b, '.');
}

/* ------------------------------------------------------------------ public */

const char *cs_pt_storage_type(cs_dtype dtype) {
    switch (dtype) {
    case CS_DTYPE_F32: return "FloatStorage";
    case CS_DTYPE_F16: return "HalfStorage";
    case CS_DTYPE_BF16: return "BFloat16Storage";
    }
    return "FloatStorage";
}

int cs_pt_writer_open(cs_pt_writer **out, const char *path, const char *prefix, int compress) {
    *out = NULL;
    if (!prefix) prefix = "archive";
    if (!*prefix || strlen(prefix) >= sizeof((cs_pt_writer *)0)->prefix || strchr(prefix, '/'))
        return cs_error(CELLSAM_ERR_INVALID, "pt writer: bad archive folder name");
    cs_pt_writer *pw = calloc(1, sizeof *pw);
    if (!pw) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    snprintf(pw->prefix, sizeof pw->prefix, "%s", prefix);
    pw->compress = compress != 0;
    int rc = cs_atomic_open(&pw->af, path);
    if (rc) {
        free(pw);
        return rc;
    }
    *out = pw;
    return CELLSAM_OK;
}

int cs_pt_writer_begin_storage(cs_pt_writer *pw, const char *torch_type, size_t elem_size,
                               size_t numel, int *id) {
    if (pw->failed) return pw->failed;
    size_t nbytes;
    if (!torch_type || strlen(torch_type) >= sizeof pw->storages[0].type ||
        cs_mul_size(numel, elem_size, &nbytes) || nbytes > MAX_ENTRY_BYTES) {
        cs_error(CELLSAM_ERR_INVALID, "pt writer: bad storage type or size");
        return fail(pw, CELLSAM_ERR_INVALID);
    }
    if (pw->n_storages == pw->cap_storages) {
        w_storage *s = grow(pw->storages, &pw->cap_storages, sizeof *s);
        if (!s) {
            cs_error(CELLSAM_ERR_NOMEM, "out of memory");
            return fail(pw, CELLSAM_ERR_NOMEM);
        }
        pw->storages = s;
    }
    int n = (int)pw->n_storages;
    char rel[32];
    snprintf(rel, sizeof rel, "data/%d", n);
    if (entry_begin(pw, rel)) return pw->failed;
    pw->expect = nbytes;
    w_storage *s = &pw->storages[pw->n_storages++];
    snprintf(s->type, sizeof s->type, "%s", torch_type);
    s->numel = numel;
    if (id) *id = n;
    return CELLSAM_OK;
}

int cs_pt_writer_write(cs_pt_writer *pw, const void *data, size_t nbytes) {
    return entry_data(pw, data, nbytes);
}

int cs_pt_writer_end_storage(cs_pt_writer *pw) { return entry_end(pw); }

int cs_pt_writer_add_storage(cs_pt_writer *pw, cs_dtype dtype, const void *data, size_t numel,
                             int *id) {
    size_t esz = cs_dtype_size(dtype);
    if (cs_pt_writer_begin_storage(pw, cs_pt_storage_type(dtype), esz, numel, id)) return pw->failed;
    entry_data(pw, data, numel * esz);
    return entry_end(pw);
}

int cs_pt_writer_add_tensor(cs_pt_writer *pw, const char *name, int storage_id, int64_t offset,
                            int ndim, const int64_t *shape, const int64_t *stride) {
    if (pw->failed) return pw->failed;
    if (!name || ndim < 0 || ndim > CS_MAX_DIMS || storage_id < 0 ||
        (size_t)storage_id >= pw->n_storages) {
        cs_error(CELLSAM_ERR_INVALID, "pt writer: bad tensor %s", name ? name : "(null)");
        return fail(pw, CELLSAM_ERR_INVALID);
    }
    if (pw->n_tensors == pw->cap_tensors) {
        w_tensor *t = grow(pw->tensors, &pw->cap_tensors, sizeof *t);
        if (!t) {
            cs_error(CELLSAM_ERR_NOMEM, "out of memory");
            return fail(pw, CELLSAM_ERR_NOMEM);
        }
        pw->tensors = t;
    }
    w_tensor *t = &pw->tensors[pw->n_tensors];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    if (!t->name) {
        cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        return fail(pw, CELLSAM_ERR_NOMEM);
    }
    t->storage = storage_id;
    t->offset = offset;
    t->ndim = ndim;
    int64_t step = 1;
    for (int d = ndim - 1; d >= 0; d--) {
        t->shape[d] = shape[d];
        t->stride[d] = stride ? stride[d] : step;
        step *= shape[d] > 0 ? shape[d] : 1;
    }
    pw->n_tensors++;
    return CELLSAM_OK;
}

void cs_pt_writer_set_nested(cs_pt_writer *pw, int nested) { pw->nested = nested != 0; }

int cs_pt_writer_set_pickle(cs_pt_writer *pw, const void *pickle, size_t len) {
    if (pw->failed) return pw->failed;
    free(pw->custom_pkl);
    pw->custom_pkl = malloc(len ? len : 1);
    if (!pw->custom_pkl) {
        cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        return fail(pw, CELLSAM_ERR_NOMEM);
    }
    if (len) memcpy(pw->custom_pkl, pickle, len);
    pw->custom_pkl_len = len;
    pw->has_custom_pkl = 1;
    return CELLSAM_OK;
}

int cs_pt_writer_add_file(cs_pt_writer *pw, const char *name, const void *data, size_t len) {
    if (strcmp(name, "version") == 0) pw->has_version = 1;
    if (strcmp(name, "byteorder") == 0) pw->has_byteorder = 1;
    return whole_entry(pw, name, data, len);
}

static void writer_free(cs_pt_writer *pw) {
    for (size_t i = 0; i < pw->n_entries; i++) free(pw->entries[i].name);
    for (size_t i = 0; i < pw->n_tensors; i++) free(pw->tensors[i].name);
    free(pw->entries);
    free(pw->storages);
    free(pw->tensors);
    free(pw->custom_pkl);
    free(pw->zbuf);
    free(pw);
}

void cs_pt_writer_abort(cs_pt_writer *pw) {
    if (!pw) return;
    if (pw->in_entry && pw->compress) deflateEnd(&pw->zs);
    cs_atomic_abort(&pw->af);
    writer_free(pw);
}

static void write_directory(cs_pt_writer *pw) {
    uint64_t cd_off = pw->pos;
    for (size_t i = 0; i < pw->n_entries && !pw->failed; i++) {
        const wz_entry *e = &pw->entries[i];
        size_t nl = strlen(e->name);
        int z64 = e->local_off >= 0xffffffffu;
        unsigned char c[46];
        put32(c, 0x02014b50u);
        put16(c + 4, 45);
        put16(c + 6, z64 ? 45 : 20);
        put16(c + 8, 0x0808);
        put16(c + 10, e->method);
        put16(c + 12, 0);
        put16(c + 14, 0x21);
        put32(c + 16, e->crc);
        put32(c + 20, (uint32_t)e->csize);
        put32(c + 24, (uint32_t)e->usize);
        put16(c + 28, (uint16_t)nl);
        put16(c + 30, z64 ? 12 : 0);
        put16(c + 32, 0);
        put16(c + 34, 0);
        put16(c + 36, 0);
        put32(c + 38, 0);
        put32(c + 42, z64 ? 0xffffffffu : (uint32_t)e->local_off);
        out(pw, c, sizeof c);
        out(pw, e->name, nl);
        if (z64) {
            unsigned char x[12];
            put16(x, 1);
            put16(x + 2, 8);
            put64(x + 4, e->local_off);
            out(pw, x, sizeof x);
        }
    }
    uint64_t cd_size = pw->pos - cd_off, z64_off = pw->pos, n = pw->n_entries;
    unsigned char z[56];
    put32(z, 0x06064b50u);
    put64(z + 4, 44);
    put16(z + 12, 45);
    put16(z + 14, 45);
    put32(z + 16, 0);
    put32(z + 20, 0);
    put64(z + 24, n);
    put64(z + 32, n);
    put64(z + 40, cd_size);
    put64(z + 48, cd_off);
    out(pw, z, sizeof z);
    unsigned char l[20];
    put32(l, 0x07064b50u);
    put32(l + 4, 0);
    put64(l + 8, z64_off);
    put32(l + 16, 1);
    out(pw, l, sizeof l);
    unsigned char e[22];
    put32(e, 0x06054b50u);
    put16(e + 4, 0);
    put16(e + 6, 0);
    put16(e + 8, n > 0xffff ? 0xffff : (uint16_t)n);
    put16(e + 10, n > 0xffff ? 0xffff : (uint16_t)n);
    put32(e + 12, cd_size >= 0xffffffffu ? 0xffffffffu : (uint32_t)cd_size);
    put32(e + 16, cd_off >= 0xffffffffu ? 0xffffffffu : (uint32_t)cd_off);
    put16(e + 20, 0);
    out(pw, e, sizeof e);
}

int cs_pt_writer_close(cs_pt_writer *pw) {
    if (!pw->failed && pw->in_entry) {
        cs_error(CELLSAM_ERR_INVALID, "pt writer: a storage was not ended");
        fail(pw, CELLSAM_ERR_INVALID);
    }
    if (!pw->failed) {
        if (pw->has_custom_pkl) {
            whole_entry(pw, "data.pkl", pw->custom_pkl, pw->custom_pkl_len);
        } else {
            bytebuf b = {0};
            pk_checkpoint(pw, &b);
            if (b.failed) {
                cs_error(CELLSAM_ERR_NOMEM, "out of memory building data.pkl");
                fail(pw, CELLSAM_ERR_NOMEM);
            } else {
                whole_entry(pw, "data.pkl", b.p, b.n);
            }
            free(b.p);
        }
    }
    if (!pw->has_version) whole_entry(pw, "version", "3\n", 2);
    if (!pw->has_byteorder) whole_entry(pw, "byteorder", "little", 6);
    write_directory(pw);
    int rc = pw->failed;
    if (rc) {
        cs_pt_writer_abort(pw);
        return rc;
    }
    rc = cs_atomic_commit(&pw->af);
    writer_free(pw);
    return rc;
}

/* ------------------------------------------------------------ whole store */

static void convert(void *dst, cs_dtype d, const void *src, cs_dtype s, size_t n) {
    const unsigned char *sp = src;
    unsigned char *dp = dst;
    for (size_t i = 0; i < n; i++) {
        float v;
        if (s == CS_DTYPE_F32) {
            memcpy(&v, sp + 4 * i, 4);
        } else {
            uint16_t h;
            memcpy(&h, sp + 2 * i, 2);
            v = s == CS_DTYPE_F16 ? cs_f16_to_f32(h) : cs_bf16_to_f32(h);
        }
        if (d == CS_DTYPE_F32) {
            memcpy(dp + 4 * i, &v, 4);
        } else {
            uint16_t h = d == CS_DTYPE_F16 ? cs_f32_to_f16(v) : cs_f32_to_bf16(v);
            memcpy(dp + 2 * i, &h, 2);
        }
    }
}

int cs_weights_save_pt(const cs_weights *w, const char *path, cs_dtype dtype, int nest_state_dict) {
    cs_pt_writer *pw;
    int rc = cs_pt_writer_open(&pw, path, "archive", 0);
    if (rc) return rc;
    cs_pt_writer_set_nested(pw, nest_state_dict);
    enum { CHUNK = 1 << 16 };
    unsigned char *buf = malloc((size_t)CHUNK * 4);
    if (!buf) {
        cs_pt_writer_abort(pw);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    size_t osz = cs_dtype_size(dtype);
    for (size_t i = 0; i < cs_weights_count(w) && !pw->failed; i++) {
        const cs_tensor_entry *e = cs_weights_at(w, i);
        size_t isz = cs_dtype_size(e->dtype), n = e->nbytes / isz;
        int id = 0;
        if (cs_pt_writer_begin_storage(pw, cs_pt_storage_type(dtype), osz, n, &id)) break;
        for (size_t k = 0; k < n && !pw->failed; k += CHUNK) {
            size_t m = n - k < CHUNK ? n - k : CHUNK;
            convert(buf, dtype, (const unsigned char *)e->data + k * isz, e->dtype, m);
            cs_pt_writer_write(pw, buf, m * osz);
        }
        cs_pt_writer_end_storage(pw);
        cs_pt_writer_add_tensor(pw, e->name, id, 0, e->ndim, e->shape, NULL);
    }
    free(buf);
    if (pw->failed) {
        rc = pw->failed;
        cs_pt_writer_abort(pw);
        return rc;
    }
    return cs_pt_writer_close(pw);
}
