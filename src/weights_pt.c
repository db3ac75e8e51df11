/* PyTorch checkpoint reader: the zip container of torch.save (torch >= 1.6) and a
 * restricted unpickler that understands only what a state dict needs.
 *
 * Nothing from the pickle is ever executed: GLOBAL names are checked against a
 * short whitelist and REDUCE is interpreted for those few callables only.
 * Stored (uncompressed) storages are used in place, so contiguous tensors point
 * into the caller's buffer (the file's memory map); deflated storages and strided
 * views are copied into buffers the store owns. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "common.h"
#include "weights.h"
#include "weights_pt_write.h"

/* ------------------------------------------------------------------ limits */

#define ZIP_EOCD_SIZE 22
#define ZIP_EOCD64_SIZE 56
#define ZIP_LOCATOR_SIZE 20
#define ZIP_CDH_SIZE 46
#define ZIP_LFH_SIZE 30
#define ZIP_MAX_COMMENT 65535u
#define ZIP_MAX_ENTRIES ((size_t)4 * CS_MAX_TENSORS + 64)
#define ZIP_MAX_NAME 4096u
/* Deflate cannot expand data by more than about 1032:1. */
#define DEFLATE_MAX_RATIO 1032u

#define PK_MAX_STACK ((size_t)1 << 20)
#define PK_MAX_MARKS ((size_t)1 << 16)
#define PK_MAX_LINE 256
#define PK_MAX_KEY 256

/* ------------------------------------------------------------ byte access */

static uint16_t rd16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd64(const unsigned char *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }
static int is_sig(const unsigned char *p, unsigned char a, unsigned char b) {
    return p[0] == 'P' && p[1] == 'K' && p[2] == a && p[3] == b;
}

/* ------------------------------------------------------------------- zip */

typedef struct {
    const unsigned char *name;
    size_t name_len;
    uint64_t local_off, data_off, csize, usize;
    uint32_t crc;
    uint16_t method, flags;
    unsigned char *inflated; /* DEFLATE entries, once read (freed after parsing) */
} zip_entry;

typedef struct {
    const unsigned char *data;
    size_t size;
    zip_entry *entries; /* sorted by name */
    size_t count;
    unsigned flags;
    size_t owned_cap, owned_used;
} pt_reader;

static int entry_cmp(const void *a, const void *b) {
    const zip_entry *x = a, *y = b;
    size_t n = x->name_len < y->name_len ? x->name_len : y->name_len;
    int c = memcmp(x->name, y->name, n);
    if (c) return c;
    return x->name_len < y->name_len ? -1 : x->name_len > y->name_len;
}

typedef struct {
    uint64_t begin, end;
} span;

static int span_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

/* The end-of-central-directory record must end exactly at the end of the file
 * (after its comment), which also rejects a "PK\5\6" inside a comment. */
static int zip_find_eocd(const unsigned char *d, size_t size, size_t *pos) {
    if (size < ZIP_EOCD_SIZE)
        return cs_error(CELLSAM_ERR_FORMAT, "zip: file too short for an archive (truncated?)");
    size_t last = size - ZIP_EOCD_SIZE;
    size_t first = last > ZIP_MAX_COMMENT ? last - ZIP_MAX_COMMENT : 0;
    for (size_t p = last + 1; p-- > first;) {
        if (is_sig(d + p, 5, 6) && p + ZIP_EOCD_SIZE + rd16(d + p + 20) == size) {
            *pos = p;
            return CELLSAM_OK;
        }
    }
    return cs_error(CELLSAM_ERR_FORMAT, "zip: end of central directory not found (truncated file?)");
}

/* Replace saturated 32-bit fields by the values of a zip64 extra field. */
static int zip64_extra(const unsigned char *x, size_t xl, uint64_t *usize, uint64_t *csize,
                       uint64_t *loff, uint32_t *disk) {
    size_t q = 0;
    while (xl - q >= 4) {
        uint16_t id = rd16(x + q), len = rd16(x + q + 2);
        if (len > xl - q - 4) return -1;
        if (id == 1) {
            const unsigned char *f = x + q + 4;
            size_t used = 0;
            uint64_t *fields[3] = {usize, csize, loff};
            for (int i = 0; i < 3; i++) {
                if (*fields[i] != 0xffffffffu) continue;
                if (len - used < 8) return -1;
                *fields[i] = rd64(f + used);
                used += 8;
            }
            if (*disk == 0xffffu) {
                if (len - used < 4) return -1;
                *disk = rd32(f + used);
            }
        }
        q += 4 + (size_t)len;
    }
    return 0;
}

static int zip_open(pt_reader *r) {
    const unsigned char *d = r->data;
    size_t eocd = 0;
    int rc = zip_find_eocd(d, r->size, &eocd);
    if (rc) return rc;
    const unsigned char *e = d + eocd;
    uint64_t disk = rd16(e + 4), cd_disk = rd16(e + 6), n_disk = rd16(e + 8), n_total = rd16(e + 10);
    uint64_t cd_size = rd32(e + 12), cd_off = rd32(e + 16);
    uint64_t cd_limit = eocd;
    if (eocd >= ZIP_LOCATOR_SIZE && is_sig(d + eocd - ZIP_LOCATOR_SIZE, 6, 7)) {
        const unsigned char *loc = d + eocd - ZIP_LOCATOR_SIZE;
        uint64_t z = rd64(loc + 8);
        uint64_t room = eocd - ZIP_LOCATOR_SIZE;
        if (rd32(loc + 4) != 0 || rd32(loc + 16) > 1)
            return cs_error(CELLSAM_ERR_UNSUPPORTED, "zip: multi-disk archives are not supported");
        if (z > room || room - z < ZIP_EOCD64_SIZE || !is_sig(d + z, 6, 6))
            return cs_error(CELLSAM_ERR_FORMAT, "zip: zip64 end of central directory is missing or corrupt");
        const unsigned char *z64 = d + z;
        uint64_t z_total = rd64(z64 + 32), z_size = rd64(z64 + 40), z_off = rd64(z64 + 48);
        /* A classic field that is not saturated must agree with its zip64 twin. */
        if ((n_total != 0xffffu && n_total != z_total) || (cd_size != 0xffffffffu && cd_size != z_size) ||
            (cd_off != 0xffffffffu && cd_off != z_off))
            return cs_error(CELLSAM_ERR_FORMAT, "zip: the end records disagree about the central directory");
        disk = rd32(z64 + 16);
        cd_disk = rd32(z64 + 20);
        n_disk = rd64(z64 + 24);
        n_total = z_total;
        cd_size = z_size;
        cd_off = z_off;
        cd_limit = z;
    }
    if (disk != 0 || cd_disk != 0 || n_disk != n_total)
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "zip: multi-disk archives are not supported");
    if (cd_off > cd_limit || cd_size > cd_limit - cd_off)
        return cs_error(CELLSAM_ERR_FORMAT,
                        "zip: central directory [%llu, +%llu) lies outside the file (truncated?)",
                        (unsigned long long)cd_off, (unsigned long long)cd_size);
    if (n_total == 0) return cs_error(CELLSAM_ERR_FORMAT, "zip: archive has no entries");
    if (n_total > cd_size / ZIP_CDH_SIZE || n_total > ZIP_MAX_ENTRIES)
        return cs_error(CELLSAM_ERR_FORMAT, "zip: %llu entries cannot fit a %llu-byte directory (limit %zu)",
                        (unsigned long long)n_total, (unsigned long long)cd_size, ZIP_MAX_ENTRIES);
    size_t n = (size_t)n_total;
    r->entries = calloc(n, sizeof *r->entries);
    span *spans = malloc(n * sizeof *spans);
    if (!r->entries || !spans) {
        free(spans);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    r->count = n;
    uint64_t p = cd_off, end = cd_off + cd_size;
    rc = CELLSAM_OK;
    for (size_t i = 0; i < n && !rc; i++) {
        zip_entry *z = &r->entries[i];
        if (end - p < ZIP_CDH_SIZE || !is_sig(d + p, 1, 2)) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "zip: central directory entry %zu is corrupt", i);
            break;
        }
        const unsigned char *c = d + p;
        size_t nl = rd16(c + 28), xl = rd16(c + 30), cl = rd16(c + 32);
        if (ZIP_CDH_SIZE + nl + xl + cl > end - p) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "zip: central directory entry %zu overruns the directory", i);
            break;
        }
        z->flags = rd16(c + 8);
        z->method = rd16(c + 10);
        z->crc = rd32(c + 16);
        z->csize = rd32(c + 20);
        z->usize = rd32(c + 24);
        z->local_off = rd32(c + 42);
        uint32_t disk_start = rd16(c + 34);
        z->name = c + ZIP_CDH_SIZE;
        z->name_len = nl;
        int nlen = (int)nl;
        if (zip64_extra(c + ZIP_CDH_SIZE + nl, xl, &z->usize, &z->csize, &z->local_off, &disk_start)) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "zip: entry %.*s has a corrupt zip64 field", nlen, z->name);
            break;
        }
        if (nl == 0 || nl > ZIP_MAX_NAME || memchr(z->name, 0, nl)) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "zip: central directory entry %zu has a bad name", i);
            break;
        }
        if (disk_start != 0) {
            rc = cs_error(CELLSAM_ERR_UNSUPPORTED, "zip: multi-disk archives are not supported");
            break;
        }
        if (z->flags & 0x41) {
            rc = cs_error(CELLSAM_ERR_UNSUPPORTED, "zip: entry %.*s is encrypted", nlen, z->name);
            break;
        }
        if (z->method != 0 && z->method != 8) {
            rc = cs_error(CELLSAM_ERR_UNSUPPORTED,
                          "zip: entry %.*s uses compression method %u (only stored and deflate are supported)",
                          nlen, z->name, (unsigned)z->method);
            break;
        }
        if (z->method == 0 && z->csize != z->usize) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "zip: stored entry %.*s has different packed and unpacked sizes",
                          nlen, z->name);
            break;
        }
        /* Entries lie before the central directory. */
        if (z->local_off > cd_off || cd_off - z->local_off < ZIP_LFH_SIZE ||
            !is_sig(d + z->local_off, 3, 4)) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "zip: entry %.*s has no local header at offset %llu", nlen,
                          z->name, (unsigned long long)z->local_off);
            break;
        }
        const unsigned char *lh = d + z->local_off;
        uint64_t lnl = rd16(lh + 26), lxl = rd16(lh + 28);
        z->data_off = z->local_off + ZIP_LFH_SIZE + lnl + lxl;
        if (z->data_off > cd_off || z->csize > cd_off - z->data_off) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "zip: entry %.*s data lies outside the archive (truncated?)",
                          nlen, z->name);
            break;
        }
        if (lnl != nl || memcmp(lh + ZIP_LFH_SIZE, z->name, nl) != 0) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "zip: entry %.*s: local header names a different file", nlen,
                          z->name);
            break;
        }
        spans[i].begin = z->local_off;
        spans[i].end = z->data_off + z->csize;
        p += ZIP_CDH_SIZE + nl + xl + cl;
    }
    if (!rc) {
        qsort(spans, n, sizeof *spans, span_cmp);
        for (size_t i = 1; i < n; i++)
            if (spans[i].begin < spans[i - 1].end) {
                rc = cs_error(CELLSAM_ERR_FORMAT, "zip: entries at offsets %llu and %llu overlap",
                              (unsigned long long)spans[i - 1].begin, (unsigned long long)spans[i].begin);
                break;
            }
    }
    free(spans);
    if (rc) return rc;
    qsort(r->entries, n, sizeof *r->entries, entry_cmp);
    for (size_t i = 1; i < n; i++)
        if (entry_cmp(&r->entries[i - 1], &r->entries[i]) == 0)
            return cs_error(CELLSAM_ERR_FORMAT, "zip: entry %.*s appears twice", (int)r->entries[i].name_len,
                            r->entries[i].name);
    return CELLSAM_OK;
}

static zip_entry *zip_find(pt_reader *r, const char *name, size_t len) {
    zip_entry key;
    memset(&key, 0, sizeof key);
    key.name = (const unsigned char *)name;
    key.name_len = len;
    return bsearch(&key, r->entries, r->count, sizeof *r->entries, entry_cmp);
}

static int owned_reserve(pt_reader *r, size_t bytes, const char *what) {
    if (bytes > r->owned_cap - r->owned_used)
        return cs_error(CELLSAM_ERR_LIMIT, "%s needs %zu more bytes than the reader's memory cap of %zu",
                        what, bytes, r->owned_cap);
    r->owned_used += bytes;
    return CELLSAM_OK;
}

static int check_crc(const pt_reader *r, const zip_entry *z, const unsigned char *bytes) {
    if (r->flags & CS_PT_NO_CRC) return CELLSAM_OK;
    uLong crc = crc32_z(0L, bytes, (z_size_t)z->usize);
    if ((uint32_t)crc != z->crc)
        return cs_error(CELLSAM_ERR_FORMAT, "zip: entry %.*s fails its CRC-32 check (corrupt file)",
                        (int)z->name_len, z->name);
    return CELLSAM_OK;
}

static int inflate_entry(pt_reader *r, zip_entry *z) {
    int nlen = (int)z->name_len;
    uint64_t most;
    if (__builtin_mul_overflow(z->csize, (uint64_t)DEFLATE_MAX_RATIO, &most)) most = UINT64_MAX;
    if (z->usize > most + 1024 || z->usize > SIZE_MAX)
        return cs_error(CELLSAM_ERR_FORMAT, "zip: entry %.*s claims an impossible compression ratio",
                        nlen, z->name);
    char what[96];
    snprintf(what, sizeof what, "inflating %.*s", nlen > 60 ? 60 : nlen, z->name);
    int rc = owned_reserve(r, (size_t)z->usize, what);
    if (rc) return rc;
    unsigned char *buf = malloc(z->usize ? (size_t)z->usize : 1);
    if (!buf) return cs_error(CELLSAM_ERR_NOMEM, "out of memory inflating %.*s", nlen, z->name);
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) {
        free(buf);
        return cs_error(CELLSAM_ERR_NOMEM, "zlib: cannot start inflating");
    }
    const unsigned char *in = r->data + z->data_off;
    uint64_t in_left = z->csize, out_left = z->usize;
    unsigned char *out = buf;
    int zr = Z_OK;
    for (;;) {
        if (zs.avail_in == 0 && in_left) {
            uInt take = in_left > UINT32_MAX ? UINT32_MAX : (uInt)in_left;
            zs.next_in = (Bytef *)(uintptr_t)in;
            zs.avail_in = take;
            in += take;
            in_left -= take;
        }
        if (zs.avail_out == 0 && out_left) {
            uInt take = out_left > UINT32_MAX ? UINT32_MAX : (uInt)out_left;
            zs.next_out = out;
            zs.avail_out = take;
            out += take;
            out_left -= take;
        }
        /* A zero-length output window still lets zlib report the stream's end. */
        unsigned char dummy;
        int no_room = zs.avail_out == 0;
        if (no_room) {
            zs.next_out = &dummy;
            zs.avail_out = 1;
        }
        zr = inflate(&zs, Z_NO_FLUSH);
        if (no_room && zs.avail_out == 0) {
            zr = Z_DATA_ERROR; /* more data than the directory says */
            break;
        }
        if (no_room) zs.avail_out = 0;
        if (zr == Z_STREAM_END) break;
        if (zr == Z_BUF_ERROR && zs.avail_in == 0 && in_left == 0) break; /* input exhausted */
        if (zr != Z_OK && zr != Z_BUF_ERROR) break;
    }
    uint64_t produced = zs.total_out;
    inflateEnd(&zs);
    if (zr != Z_STREAM_END || produced != z->usize) {
        free(buf);
        return cs_error(CELLSAM_ERR_FORMAT, "zip: entry %.*s does not inflate to its stated %llu bytes",
                        nlen, z->name, (unsigned long long)z->usize);
    }
    rc = check_crc(r, z, buf);
    if (rc) {
        free(buf);
        return rc;
    }
    z->inflated = buf;
    return CELLSAM_OK;
}

/* The entry's bytes: in place for stored entries, inflated (once) otherwise.
 * Stored tensor data skips the CRC so that loading does not read every page. */
static int zip_entry_bytes(pt_reader *r, zip_entry *z, int verify, const unsigned char **out) {
    if (z->method == 0) {
        *out = r->data + z->data_off;
        return verify ? check_crc(r, z, *out) : CELLSAM_OK;
    }
    if (!z->inflated) {
        int rc = inflate_entry(r, z);
        if (rc) return rc;
    }
    *out = z->inflated;
    return CELLSAM_OK;
}

/* ---------------------------------------------------------------- pickle */

typedef enum {
    V_NONE,
    V_BOOL,
    V_INT,
    V_FLOAT,
    V_STR,
    V_TUPLE,
    V_LIST,
    V_DICT, /* items hold key, value, key, value, ... */
    V_GLOBAL,
    V_STORAGE,
    V_TENSOR
} vtype;

static const char *vtype_name(vtype t) {
    static const char *names[] = {"None",   "bool", "int",    "float",   "str",   "tuple",
                                  "list",   "dict", "global", "storage", "tensor"};
    return names[t];
}

typedef enum { G_ORDERED_DICT, G_REBUILD_TENSOR, G_REBUILD_PARAM, G_STORAGE } global_kind;

typedef struct {
    char type_name[48]; /* e.g. "FloatStorage" */
    int supported;
    cs_dtype dtype;
    const unsigned char *bytes; /* NULL when unsupported */
    size_t numel;
    int copy; /* bytes live in an inflated buffer that is freed after parsing */
} pt_storage;

typedef struct {
    pt_storage *storage;
    int64_t offset;
    int ndim;
    int64_t shape[CS_MAX_DIMS];
    int64_t stride[CS_MAX_DIMS];
} pt_tensor;

typedef struct pval pval;
struct pval {
    vtype type;
    union {
        int64_t i;
        double f;
        struct {
            const char *s;
            size_t n;
        } str;
        struct {
            pval **items;
            size_t n, cap;
        } seq;
        struct {
            global_kind kind;
            int supported; /* storages */
            cs_dtype dtype;
            char name[48];
        } g;
        pt_storage *storage;
        pt_tensor *tensor;
    } u;
};

/* Every pickle object lives in one arena, freed at once: objects can be shared
 * through the memo, so there is no per-object ownership. */
typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    max_align_t data[];
} arena_chunk;

typedef struct {
    pt_reader *zr;
    const char *prefix;
    size_t prefix_len;
    const unsigned char *p;
    size_t n, pos;
    pval **stack;
    size_t sp, stack_cap;
    size_t *marks;
    size_t nmarks, marks_cap;
    pval **memo;
    size_t memo_len, memo_max;
    size_t memo_count; /* indices set so far: MEMOIZE's next index */
    arena_chunk *arena;
    size_t arena_total, arena_max;
} unpickler;

static void *arena_alloc(unpickler *u, size_t bytes) {
    bytes = (bytes + 15) & ~(size_t)15;
    arena_chunk *c = u->arena;
    if (!c || c->cap - c->used < bytes) {
        size_t cap = bytes > ((size_t)1 << 16) ? bytes : ((size_t)1 << 16);
        if (cap > u->arena_max - u->arena_total) {
            cs_error(CELLSAM_ERR_LIMIT, "data.pkl: the pickle needs more than %zu bytes of memory",
                     u->arena_max);
            return NULL;
        }
        c = malloc(sizeof *c + cap);
        if (!c) {
            cs_error(CELLSAM_ERR_NOMEM, "out of memory");
            return NULL;
        }
        c->next = u->arena;
        c->used = 0;
        c->cap = cap;
        u->arena = c;
        u->arena_total += cap;
    }
    void *p = (unsigned char *)c->data + c->used;
    c->used += bytes;
    memset(p, 0, bytes);
    return p;
}

static pval *new_val(unpickler *u, vtype t) {
    pval *v = arena_alloc(u, sizeof *v);
    if (v) v->type = t;
    return v;
}

static int pk_err(unpickler *u, size_t at, const char *what) {
    return cs_error(CELLSAM_ERR_FORMAT, "data.pkl: %s at offset %zu", what, at);
}

static int push(unpickler *u, pval *v) {
    if (!v) return CELLSAM_ERR_NOMEM; /* message already set */
    if (u->sp == u->stack_cap) {
        if (u->stack_cap >= PK_MAX_STACK)
            return cs_error(CELLSAM_ERR_LIMIT, "data.pkl: stack deeper than %zu at offset %zu",
                            PK_MAX_STACK, u->pos);
        size_t cap = u->stack_cap ? u->stack_cap * 2 : 256;
        pval **s = realloc(u->stack, cap * sizeof *s);
        if (!s) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        u->stack = s;
        u->stack_cap = cap;
    }
    u->stack[u->sp++] = v;
    return CELLSAM_OK;
}

/* Pop one value, not crossing the innermost MARK. */
static pval *pop(unpickler *u) {
    size_t floor = u->nmarks ? u->marks[u->nmarks - 1] : 0;
    if (u->sp <= floor) return NULL;
    return u->stack[--u->sp];
}

static pval *top(unpickler *u) {
    size_t floor = u->nmarks ? u->marks[u->nmarks - 1] : 0;
    return u->sp > floor ? u->stack[u->sp - 1] : NULL;
}

/* Pop back to the innermost MARK: items are stack[*first .. sp). */
static int pop_mark(unpickler *u, size_t at, size_t *first) {
    if (!u->nmarks) return pk_err(u, at, "no MARK for this opcode");
    *first = u->marks[--u->nmarks];
    return CELLSAM_OK;
}

/* The container just below a popped MARK at `first` (not below an outer MARK). */
static pval *below_mark(unpickler *u, size_t first) {
    size_t floor = u->nmarks ? u->marks[u->nmarks - 1] : 0;
    return first > floor ? u->stack[first - 1] : NULL;
}

static int seq_append(unpickler *u, pval *c, pval *v) {
    if (c->u.seq.n == c->u.seq.cap) {
        size_t cap = c->u.seq.cap ? c->u.seq.cap * 2 : 4;
        pval **items = arena_alloc(u, cap * sizeof *items);
        if (!items) return CELLSAM_ERR_LIMIT;
        if (c->u.seq.n) memcpy(items, c->u.seq.items, c->u.seq.n * sizeof *items);
        c->u.seq.items = items;
        c->u.seq.cap = cap;
    }
    c->u.seq.items[c->u.seq.n++] = v;
    return CELLSAM_OK;
}

static pval *make_tuple(unpickler *u, pval **items, size_t n) {
    pval *t = new_val(u, V_TUPLE);
    if (!t) return NULL;
    if (n) {
        t->u.seq.items = arena_alloc(u, n * sizeof *items);
        if (!t->u.seq.items) return NULL;
        memcpy(t->u.seq.items, items, n * sizeof *items);
    }
    t->u.seq.n = t->u.seq.cap = n;
    return t;
}

static int need(unpickler *u, size_t k) {
    if (u->n - u->pos < k)
        return cs_error(CELLSAM_ERR_FORMAT, "data.pkl: truncated pickle at offset %zu", u->pos);
    return CELLSAM_OK;
}

static int memo_put(unpickler *u, size_t idx, pval *v, size_t at) {
    if (!v) return pk_err(u, at, "memo store from an empty stack");
    if (idx >= u->memo_max) return pk_err(u, at, "memo index too large");
    if (idx >= u->memo_len) {
        size_t len = u->memo_len ? u->memo_len : 64;
        while (len <= idx) len *= 2;
        if (len > u->memo_max) len = u->memo_max;
        pval **m = realloc(u->memo, len * sizeof *m);
        if (!m) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        memset(m + u->memo_len, 0, (len - u->memo_len) * sizeof *m);
        u->memo = m;
        u->memo_len = len;
    }
    if (!u->memo[idx]) u->memo_count++;
    u->memo[idx] = v;
    return CELLSAM_OK;
}

static int memo_get(unpickler *u, size_t idx, size_t at) {
    if (idx >= u->memo_len || !u->memo[idx]) return pk_err(u, at, "memo lookup of an unset index");
    return push(u, u->memo[idx]);
}

static int str_is(const pval *v, const char *s) {
    size_t n = strlen(s);
    return v && v->type == V_STR && v->u.str.n == n && memcmp(v->u.str.s, s, n) == 0;
}

/* The only callables and classes a state dict needs. */
static int resolve_global(unpickler *u, const char *mod, size_t ml, const char *name, size_t nl,
                          size_t at) {
    pval *g = new_val(u, V_GLOBAL);
    if (!g) return CELLSAM_ERR_NOMEM;
#define IS(str, len, lit) ((len) == sizeof(lit) - 1 && memcmp((str), (lit), (len)) == 0)
    if (IS(mod, ml, "collections") && IS(name, nl, "OrderedDict")) g->u.g.kind = G_ORDERED_DICT;
    else if (IS(mod, ml, "torch._utils") && IS(name, nl, "_rebuild_tensor_v2"))
        g->u.g.kind = G_REBUILD_TENSOR;
    else if (IS(mod, ml, "torch._utils") && IS(name, nl, "_rebuild_parameter"))
        g->u.g.kind = G_REBUILD_PARAM;
    else if (IS(mod, ml, "torch") && nl > 7 && nl < sizeof g->u.g.name &&
             memcmp(name + nl - 7, "Storage", 7) == 0) {
        g->u.g.kind = G_STORAGE;
        memcpy(g->u.g.name, name, nl);
        g->u.g.name[nl] = '\0';
        g->u.g.supported = 1;
        if (IS(name, nl, "FloatStorage")) g->u.g.dtype = CS_DTYPE_F32;
        else if (IS(name, nl, "HalfStorage")) g->u.g.dtype = CS_DTYPE_F16;
        else if (IS(name, nl, "BFloat16Storage")) g->u.g.dtype = CS_DTYPE_BF16;
        else g->u.g.supported = 0; /* refused where a tensor uses it, naming the tensor */
    } else {
        return cs_error(CELLSAM_ERR_FORMAT,
                        "data.pkl: refusing pickle global %.*s.%.*s at offset %zu (a state dict "
                        "needs only tensors; this file may run code under Python)",
                        (int)ml, mod, (int)nl, name, at);
    }
#undef IS
    return push(u, g);
}

static int read_line(unpickler *u, const char **s, size_t *len) {
    size_t lim = u->n - u->pos < PK_MAX_LINE ? u->n - u->pos : PK_MAX_LINE;
    const unsigned char *nl = memchr(u->p + u->pos, '\n', lim);
    if (!nl) return pk_err(u, u->pos, "GLOBAL name not terminated");
    *s = (const char *)u->p + u->pos;
    *len = (size_t)(nl - (u->p + u->pos));
    u->pos += *len + 1;
    return CELLSAM_OK;
}

/* ('storage', StorageType, key, location, numel) -> a storage in the archive. */
static int persistent_load(unpickler *u, pval *pid, size_t at) {
    if (!pid || pid->type != V_TUPLE || pid->u.seq.n != 5 || !str_is(pid->u.seq.items[0], "storage"))
        return pk_err(u, at, "persistent id is not a ('storage', type, key, location, numel) tuple");
    pval *type = pid->u.seq.items[1], *key = pid->u.seq.items[2], *numel = pid->u.seq.items[4];
    if (type->type != V_GLOBAL || type->u.g.kind != G_STORAGE)
        return pk_err(u, at, "persistent id does not name a torch storage type");
    if (key->type != V_STR || key->u.str.n == 0 || key->u.str.n > PK_MAX_KEY)
        return pk_err(u, at, "persistent id has a bad storage key");
    if (numel->type != V_INT || numel->u.i < 0)
        return pk_err(u, at, "persistent id has a bad element count");
    pt_storage *st = arena_alloc(u, sizeof *st);
    pval *v = new_val(u, V_STORAGE);
    if (!st || !v) return CELLSAM_ERR_LIMIT;
    snprintf(st->type_name, sizeof st->type_name, "%s", type->u.g.name);
    st->supported = type->u.g.supported;
    st->dtype = type->u.g.dtype;
    st->numel = (size_t)numel->u.i;
    v->u.storage = st;
    if (!st->supported) return push(u, v);

    char path[ZIP_MAX_NAME + PK_MAX_KEY + 16];
    int pl = snprintf(path, sizeof path, "%.*s/data/%.*s", (int)u->prefix_len, u->prefix,
                      (int)key->u.str.n, key->u.str.s);
    if (pl < 0 || (size_t)pl >= sizeof path) return pk_err(u, at, "storage key too long");
    zip_entry *z = zip_find(u->zr, path, (size_t)pl);
    if (!z)
        return cs_error(CELLSAM_ERR_FORMAT, "data.pkl: storage %.*s is missing from the archive (%s)",
                        (int)key->u.str.n, key->u.str.s, path);
    size_t need_bytes;
    if (cs_mul_size(st->numel, cs_dtype_size(st->dtype), &need_bytes) || z->usize < need_bytes)
        return cs_error(CELLSAM_ERR_FORMAT,
                        "data.pkl: storage %.*s has %llu bytes, fewer than its %zu %s elements need",
                        (int)key->u.str.n, key->u.str.s, (unsigned long long)z->usize, st->numel,
                        st->type_name);
    int rc = zip_entry_bytes(u->zr, z, 0, &st->bytes);
    if (rc) return rc;
    st->copy = z->method != 0;
    return push(u, v);
}

static int int_tuple(const pval *t, int64_t *out, int *n) {
    if (!t || t->type != V_TUPLE || t->u.seq.n > CS_MAX_DIMS) return -1;
    for (size_t i = 0; i < t->u.seq.n; i++) {
        const pval *e = t->u.seq.items[i];
        if (e->type != V_INT || e->u.i < 0) return -1;
        out[i] = e->u.i;
    }
    *n = (int)t->u.seq.n;
    return 0;
}

static int reduce(unpickler *u, size_t at) {
    pval *args = pop(u), *fn = pop(u);
    if (!args || !fn) return pk_err(u, at, "REDUCE needs a callable and its arguments");
    if (fn->type != V_GLOBAL || args->type != V_TUPLE) return pk_err(u, at, "REDUCE of a non-callable");
    pval **a = args->u.seq.items;
    size_t na = args->u.seq.n;
    switch (fn->u.g.kind) {
    case G_ORDERED_DICT:
        if (na != 0) return pk_err(u, at, "OrderedDict with constructor arguments");
        return push(u, new_val(u, V_DICT));
    case G_REBUILD_TENSOR: {
        /* (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]) */
        if (na != 6 && na != 7) return pk_err(u, at, "_rebuild_tensor_v2 with a wrong argument count");
        if (a[0]->type != V_STORAGE) return pk_err(u, at, "_rebuild_tensor_v2 without a storage");
        if (a[1]->type != V_INT || a[1]->u.i < 0)
            return pk_err(u, at, "_rebuild_tensor_v2 with a bad storage offset");
        pt_tensor *t = arena_alloc(u, sizeof *t);
        pval *v = new_val(u, V_TENSOR);
        if (!t || !v) return CELLSAM_ERR_LIMIT;
        int ns = 0, nst = 0;
        if (int_tuple(a[2], t->shape, &ns) || int_tuple(a[3], t->stride, &nst) || ns != nst)
            return pk_err(u, at, "_rebuild_tensor_v2 with a bad size or stride");
        t->storage = a[0]->u.storage;
        t->offset = a[1]->u.i;
        t->ndim = ns;
        v->u.tensor = t;
        return push(u, v);
    }
    case G_REBUILD_PARAM:
        /* (tensor, requires_grad, backward_hooks) */
        if (na < 1 || a[0]->type != V_TENSOR) return pk_err(u, at, "_rebuild_parameter without a tensor");
        return push(u, a[0]);
    case G_STORAGE: break;
    }
    return cs_error(CELLSAM_ERR_FORMAT, "data.pkl: REDUCE calls torch.%s at offset %zu (not allowed)",
                    fn->u.g.name, at);
}

static int64_t read_le_signed(const unsigned char *b, size_t n) {
    uint64_t v = 0;
    for (size_t i = n; i-- > 0;) v = (v << 8) | b[i];
    if (n < 8 && n > 0 && (b[n - 1] & 0x80)) v |= ~(uint64_t)0 << (8 * n);
    int64_t s;
    memcpy(&s, &v, sizeof s);
    return s;
}

static int push_str(unpickler *u, size_t len_bytes, int is_signed) {
    int rc = need(u, len_bytes);
    if (rc) return rc;
    uint64_t len = len_bytes == 1 ? u->p[u->pos] : rd32(u->p + u->pos);
    if (is_signed && (len & 0x80000000u)) return pk_err(u, u->pos, "negative string length");
    u->pos += len_bytes;
    if (len > u->n - u->pos) return pk_err(u, u->pos, "string runs past the end of the pickle");
    pval *v = new_val(u, V_STR);
    if (!v) return CELLSAM_ERR_LIMIT;
    v->u.str.s = (const char *)u->p + u->pos;
    v->u.str.n = (size_t)len;
    u->pos += (size_t)len;
    return push(u, v);
}

static int run_pickle(unpickler *u, pval **result) {
    for (;;) {
        if (u->pos >= u->n) return pk_err(u, u->pos, "pickle ends without STOP");
        size_t at = u->pos;
        unsigned op = u->p[u->pos++];
        int rc = CELLSAM_OK;
        switch (op) {
        case 0x80: /* PROTO */
            if ((rc = need(u, 1))) return rc;
            if (u->p[u->pos] > 5) return pk_err(u, at, "unknown pickle protocol");
            u->pos++;
            break;
        case 0x95: /* FRAME: only a read-ahead hint */
            if ((rc = need(u, 8))) return rc;
            u->pos += 8;
            break;
        case 'c': { /* GLOBAL */
            const char *mod = NULL, *name = NULL;
            size_t ml = 0, nl = 0;
            if ((rc = read_line(u, &mod, &ml)) || (rc = read_line(u, &name, &nl))) return rc;
            rc = resolve_global(u, mod, ml, name, nl, at);
            break;
        }
        case 0x93: { /* STACK_GLOBAL */
            pval *name = pop(u), *mod = pop(u);
            if (!name || !mod || name->type != V_STR || mod->type != V_STR)
                return pk_err(u, at, "STACK_GLOBAL needs two strings");
            rc = resolve_global(u, mod->u.str.s, mod->u.str.n, name->u.str.s, name->u.str.n, at);
            break;
        }
        case 'Q': /* BINPERSID */
            rc = persistent_load(u, pop(u), at);
            break;
        case 'R': rc = reduce(u, at); break;
        case 'b': { /* BUILD: the OrderedDict's state (_metadata) is not needed */
            pval *state = pop(u), *obj = top(u);
            if (!state || !obj) return pk_err(u, at, "BUILD on an empty stack");
            if (obj->type != V_DICT) return pk_err(u, at, "BUILD on something other than a dict");
            break;
        }
        case '}': rc = push(u, new_val(u, V_DICT)); break;
        case ']': rc = push(u, new_val(u, V_LIST)); break;
        case ')': rc = push(u, make_tuple(u, NULL, 0)); break;
        case 't': { /* TUPLE */
            size_t first = 0;
            if ((rc = pop_mark(u, at, &first))) return rc;
            /* (no pointer arithmetic on a stack that was never allocated) */
            pval *t = make_tuple(u, u->sp > first ? u->stack + first : NULL, u->sp - first);
            u->sp = first;
            rc = push(u, t);
            break;
        }
        case 0x85:
        case 0x86:
        case 0x87: { /* TUPLE1..3 */
            size_t k = op - 0x84;
            size_t floor = u->nmarks ? u->marks[u->nmarks - 1] : 0;
            if (u->sp - floor < k) return pk_err(u, at, "TUPLEn on a short stack");
            pval *t = make_tuple(u, u->stack + u->sp - k, k);
            u->sp -= k;
            rc = push(u, t);
            break;
        }
        case '(': /* MARK */
            if (u->nmarks == u->marks_cap) {
                if (u->marks_cap >= PK_MAX_MARKS) return pk_err(u, at, "MARKs nested too deeply");
                size_t cap = u->marks_cap ? u->marks_cap * 2 : 16;
                size_t *m = realloc(u->marks, cap * sizeof *m);
                if (!m) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
                u->marks = m;
                u->marks_cap = cap;
            }
            u->marks[u->nmarks++] = u->sp;
            break;
        case 's': { /* SETITEM */
            pval *val = pop(u), *key = pop(u), *d = top(u);
            if (!val || !key || !d || d->type != V_DICT) return pk_err(u, at, "SETITEM without a dict");
            if ((rc = seq_append(u, d, key)) || (rc = seq_append(u, d, val))) return rc;
            break;
        }
        case 'u': { /* SETITEMS */
            size_t first = 0;
            if ((rc = pop_mark(u, at, &first))) return rc;
            pval *d = below_mark(u, first);
            if (!d || d->type != V_DICT || (u->sp - first) % 2)
                return pk_err(u, at, "SETITEMS without a dict or with an odd item count");
            for (size_t i = first; i < u->sp && !rc; i++) rc = seq_append(u, d, u->stack[i]);
            u->sp = first;
            break;
        }
        case 'a': { /* APPEND */
            pval *val = pop(u), *l = top(u);
            if (!val || !l || l->type != V_LIST) return pk_err(u, at, "APPEND without a list");
            rc = seq_append(u, l, val);
            break;
        }
        case 'e': { /* APPENDS */
            size_t first = 0;
            if ((rc = pop_mark(u, at, &first))) return rc;
            pval *l = below_mark(u, first);
            if (!l || l->type != V_LIST) return pk_err(u, at, "APPENDS without a list");
            for (size_t i = first; i < u->sp && !rc; i++) rc = seq_append(u, l, u->stack[i]);
            u->sp = first;
            break;
        }
        case 'J': /* BININT */
        case 'K': /* BININT1 */
        case 'M': { /* BININT2 */
            size_t k = op == 'J' ? 4 : op == 'K' ? 1 : 2;
            if ((rc = need(u, k))) return rc;
            pval *v = new_val(u, V_INT);
            if (!v) return CELLSAM_ERR_LIMIT;
            v->u.i = op == 'J' ? read_le_signed(u->p + u->pos, 4)
                               : (int64_t)(k == 1 ? u->p[u->pos] : rd16(u->p + u->pos));
            u->pos += k;
            rc = push(u, v);
            break;
        }
        case 0x8a: { /* LONG1 */
            if ((rc = need(u, 1))) return rc;
            size_t k = u->p[u->pos++];
            if (k > 8) return pk_err(u, at, "integer wider than 64 bits");
            if ((rc = need(u, k))) return rc;
            pval *v = new_val(u, V_INT);
            if (!v) return CELLSAM_ERR_LIMIT;
            v->u.i = read_le_signed(u->p + u->pos, k);
            u->pos += k;
            rc = push(u, v);
            break;
        }
        case 'G': { /* BINFLOAT, big-endian */
            if ((rc = need(u, 8))) return rc;
            uint64_t bits = 0;
            for (int i = 0; i < 8; i++) bits = (bits << 8) | u->p[u->pos + (size_t)i];
            u->pos += 8;
            pval *v = new_val(u, V_FLOAT);
            if (!v) return CELLSAM_ERR_LIMIT;
            memcpy(&v->u.f, &bits, sizeof v->u.f);
            rc = push(u, v);
            break;
        }
        case 'X': rc = push_str(u, 4, 0); break;    /* BINUNICODE */
        case 0x8c: rc = push_str(u, 1, 0); break;   /* SHORT_BINUNICODE */
        case 'T': rc = push_str(u, 4, 1); break;    /* BINSTRING */
        case 'U': rc = push_str(u, 1, 0); break;    /* SHORT_BINSTRING */
        case 'N': rc = push(u, new_val(u, V_NONE)); break;
        case 0x88:
        case 0x89: {
            pval *v = new_val(u, V_BOOL);
            if (v) v->u.i = op == 0x88;
            rc = push(u, v);
            break;
        }
        case 'q': /* BINPUT */
            if ((rc = need(u, 1))) return rc;
            rc = memo_put(u, u->p[u->pos++], top(u), at);
            break;
        case 'r': /* LONG_BINPUT */
            if ((rc = need(u, 4))) return rc;
            rc = memo_put(u, rd32(u->p + u->pos), top(u), at);
            u->pos += 4;
            break;
        case 0x94: /* MEMOIZE */
            rc = memo_put(u, u->memo_count, top(u), at);
            break;
        case 'h': /* BINGET */
            if ((rc = need(u, 1))) return rc;
            rc = memo_get(u, u->p[u->pos++], at);
            break;
        case 'j': /* LONG_BINGET */
            if ((rc = need(u, 4))) return rc;
            rc = memo_get(u, rd32(u->p + u->pos), at);
            u->pos += 4;
            break;
        case '.': { /* STOP */
            pval *v = top(u);
            if (!v) return pk_err(u, at, "STOP with an empty stack");
            *result = v;
            return CELLSAM_OK;
        }
        default:
            return cs_error(CELLSAM_ERR_FORMAT, "data.pkl: unsupported pickle opcode 0x%02x at offset %zu",
                            op, at);
        }
        if (rc) return rc;
    }
}

/* --------------------------------------------------------------- tensors */

static const pval *dict_get(const pval *d, const char *key) {
    for (size_t i = 0; i + 1 < d->u.seq.n; i += 2)
        if (str_is(d->u.seq.items[i], key)) return d->u.seq.items[i + 1];
    return NULL;
}

/* Copy a strided view element by element (bounds were checked by the caller). */
static void gather(unsigned char *dst, const unsigned char *base, size_t esz, const pt_tensor *t,
                   size_t numel) {
    uint64_t idx[CS_MAX_DIMS] = {0};
    uint64_t src = (uint64_t)t->offset;
    for (size_t k = 0; k < numel; k++) {
        memcpy(dst + k * esz, base + src * esz, esz);
        for (int d = t->ndim - 1; d >= 0; d--) {
            if (++idx[d] < (uint64_t)t->shape[d]) {
                src += (uint64_t)t->stride[d];
                break;
            }
            src -= (uint64_t)t->stride[d] * (idx[d] - 1);
            idx[d] = 0;
        }
    }
}

static int add_tensor(pt_reader *r, cs_weights *w, const char *name, const pt_tensor *t) {
    const pt_storage *st = t->storage;
    if (!st->supported)
        return cs_error(CELLSAM_ERR_UNSUPPORTED,
                        "tensor %s has unsupported dtype torch.%s (only float32, float16 and bfloat16 "
                        "storages are supported)",
                        name, st->type_name);
    size_t esz = cs_dtype_size(st->dtype), numel, nbytes;
    if (cs_dims_product(t->shape, t->ndim, 0, &numel) || cs_mul_size(numel, esz, &nbytes))
        return cs_error(CELLSAM_ERR_FORMAT, "tensor %s: shape is too large", name);
    if (numel == 0) {
        if ((uint64_t)t->offset > st->numel)
            return cs_error(CELLSAM_ERR_FORMAT, "tensor %s: storage shorter than its tensor's offset", name);
        return cs_weights_add_view(w, name, st->dtype, t->ndim, t->shape, st->bytes, 0);
    }
    /* The highest element the view reaches must lie inside the storage; dims of
     * size 1 reach nothing, whatever their stride. */
    uint64_t last = (uint64_t)t->offset, expect = 1;
    int contiguous = 1, overflow = 0;
    for (int d = t->ndim - 1; d >= 0; d--) {
        uint64_t s = (uint64_t)t->shape[d], step = (uint64_t)t->stride[d], reach;
        if (s == 1) continue;
        if (step != expect) contiguous = 0;
        expect *= s; /* cannot overflow: the product of all dims fits */
        if (__builtin_mul_overflow(s - 1, step, &reach) || __builtin_add_overflow(last, reach, &last))
            overflow = 1;
    }
    if (overflow || last >= st->numel)
        return cs_error(CELLSAM_ERR_FORMAT,
                        "tensor %s: storage shorter than its tensor (the view reaches element %llu of a "
                        "%zu-element %s)",
                        name, overflow ? (unsigned long long)UINT64_MAX : (unsigned long long)last,
                        st->numel, st->type_name);
    const unsigned char *src = st->bytes + (size_t)t->offset * esz;
    if (contiguous && !st->copy)
        return cs_weights_add_view(w, name, st->dtype, t->ndim, t->shape, src, nbytes);
    int rc = owned_reserve(r, nbytes, name);
    if (rc) return rc;
    unsigned char *buf = malloc(nbytes);
    if (!buf) return cs_error(CELLSAM_ERR_NOMEM, "out of memory copying tensor %s", name);
    if (contiguous) memcpy(buf, src, nbytes);
    else gather(buf, st->bytes, esz, t, numel);
    return cs_weights_add_owned(w, name, st->dtype, t->ndim, t->shape, buf, nbytes);
}

/* A flat state dict, or a wrapper dict whose "state_dict" (or "model") entry is one;
 * a wrapper's other entries (epoch, optimizer, ...) are ignored. */
static int collect(pt_reader *r, const pval *root, cs_weights *w) {
    if (root->type != V_DICT)
        return cs_error(CELLSAM_ERR_FORMAT, "data.pkl holds a %s, not a state dict", vtype_name(root->type));
    const pval *sd = root, *inner = dict_get(root, "state_dict");
    if (!inner || inner->type != V_DICT) inner = dict_get(root, "model");
    if (inner && inner->type == V_DICT) sd = inner;
    static _Thread_local char name[ZIP_MAX_NAME + 1];
    for (size_t i = 0; i + 1 < sd->u.seq.n; i += 2) {
        const pval *k = sd->u.seq.items[i], *v = sd->u.seq.items[i + 1];
        if (k->type != V_STR || k->u.str.n == 0 || k->u.str.n > ZIP_MAX_NAME ||
            memchr(k->u.str.s, 0, k->u.str.n))
            return cs_error(CELLSAM_ERR_FORMAT, "state dict key %zu is not a tensor name", i / 2);
        memcpy(name, k->u.str.s, k->u.str.n);
        name[k->u.str.n] = '\0';
        if (v->type != V_TENSOR)
            return cs_error(CELLSAM_ERR_FORMAT, "state dict entry %s is a %s, not a tensor", name,
                            vtype_name(v->type));
        int rc = add_tensor(r, w, name, v->u.tensor);
        if (rc) return rc;
    }
    return CELLSAM_OK;
}

/* ------------------------------------------------------------------ entry */

static int check_byteorder(pt_reader *r, const unsigned char *prefix, size_t prefix_len) {
    char path[ZIP_MAX_NAME + 16];
    int n = snprintf(path, sizeof path, "%.*s/byteorder", (int)prefix_len, prefix);
    zip_entry *z = zip_find(r, path, (size_t)n);
    if (!z) return CELLSAM_OK; /* older torch: always little-endian */
    if (z->usize > 16) return cs_error(CELLSAM_ERR_FORMAT, "zip: byteorder entry is too long");
    const unsigned char *b;
    int rc = zip_entry_bytes(r, z, 1, &b);
    if (rc) return rc;
    size_t len = (size_t)z->usize;
    while (len && (b[len - 1] == '\n' || b[len - 1] == '\r' || b[len - 1] == ' ')) len--;
    if (len == 3 && memcmp(b, "big", 3) == 0)
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "big-endian PyTorch checkpoints are not supported");
    if (len != 6 || memcmp(b, "little", 6) != 0)
        return cs_error(CELLSAM_ERR_FORMAT, "zip: byteorder entry is neither \"little\" nor \"big\"");
    return CELLSAM_OK;
}

int cs_weights_parse_pt_ex(const unsigned char *data, size_t size, const cs_pt_options *opts,
                           cs_weights **out) {
    *out = NULL;
    pt_reader r;
    memset(&r, 0, sizeof r);
    r.data = data;
    r.size = size;
    r.flags = opts ? opts->flags : 0;
    if (opts && opts->max_owned_bytes) r.owned_cap = opts->max_owned_bytes;
    else {
        r.owned_cap = size > SIZE_MAX / 8 ? SIZE_MAX : size * 8;
        if (r.owned_cap < ((size_t)1 << 30)) r.owned_cap = (size_t)1 << 30;
        if (r.owned_cap > CS_MAX_CHECKPOINT_BYTES) r.owned_cap = CS_MAX_CHECKPOINT_BYTES;
    }
    unpickler u;
    memset(&u, 0, sizeof u);
    cs_weights *w = NULL;
    pval *root = NULL;

    int rc = zip_open(&r);
    if (rc) goto done;
    /* The pickle sits in the archive's top folder, whatever it is called. */
    zip_entry *pkl = NULL;
    for (size_t i = 0; i < r.count; i++) {
        zip_entry *z = &r.entries[i];
        const size_t tail = sizeof "/data.pkl" - 1;
        if (z->name_len > tail && memcmp(z->name + z->name_len - tail, "/data.pkl", tail) == 0 &&
            !memchr(z->name, '/', z->name_len - tail)) {
            if (pkl) {
                rc = cs_error(CELLSAM_ERR_FORMAT, "zip: archive holds more than one data.pkl");
                goto done;
            }
            pkl = z;
        }
    }
    if (!pkl) {
        rc = cs_error(CELLSAM_ERR_FORMAT,
                      "zip archive has no <folder>/data.pkl: not a PyTorch (torch.save) checkpoint");
        goto done;
    }
    u.zr = &r;
    u.prefix = (const char *)pkl->name;
    u.prefix_len = pkl->name_len - (sizeof "/data.pkl" - 1);
    if ((rc = check_byteorder(&r, pkl->name, u.prefix_len))) goto done;
    if (pkl->usize > SIZE_MAX / 256) {
        rc = cs_error(CELLSAM_ERR_LIMIT, "data.pkl is too large");
        goto done;
    }
    if ((rc = zip_entry_bytes(&r, pkl, 1, &u.p))) goto done;
    u.n = (size_t)pkl->usize;
    /* Every opcode allocates a bounded amount, so memory is linear in the pickle. */
    u.memo_max = u.n + 16 < ((size_t)1 << 24) ? u.n + 16 : ((size_t)1 << 24);
    u.arena_max = 128 * u.n + ((size_t)4 << 20);
    w = cs_weights_new("pytorch");
    if (!w) {
        rc = CELLSAM_ERR_NOMEM;
        goto done;
    }
    rc = run_pickle(&u, &root);
    if (!rc) rc = collect(&r, root, w);
    if (!rc) rc = cs_weights_finish(w);

done:
    while (u.arena) {
        arena_chunk *next = u.arena->next;
        free(u.arena);
        u.arena = next;
    }
    free(u.stack);
    free(u.marks);
    free(u.memo);
    for (size_t i = 0; i < r.count; i++) free(r.entries[i].inflated);
    free(r.entries);
    if (rc) {
        cs_weights_free(w);
        return rc;
    }
    *out = w;
    return CELLSAM_OK;
}

int cs_weights_parse_pt(const unsigned char *data, size_t size, cs_weights **out) {
    return cs_weights_parse_pt_ex(data, size, NULL, out);
}
