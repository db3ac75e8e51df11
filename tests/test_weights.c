/* Checkpoint loading: the reference .pt and .safetensors against keys.tsv and each
 * other, the .pt writer (f32/f16/bf16, nested, views, deflate), and malformed or
 * hostile files (each must fail with a message, never crash). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <unistd.h>

#include "common.h"
#include "testutil.h"
#include "weights.h"
#include "weights_pt_write.h"

/* ------------------------------------------------------------------ helpers */

typedef struct {
    char name[256];
    int ndim;
    int64_t shape[CS_MAX_DIMS];
} key_row;

static key_row *read_keys(size_t *n) {
    FILE *f = fopen(tu_path("keys.tsv"), "r");
    if (!f) fail_msg("cannot open %s", tu_path("keys.tsv"));
    size_t cap = 1024, count = 0;
    key_row *rows = calloc(cap, sizeof *rows);
    assert_non_null(rows);
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char *tab1 = strchr(line, '\t');
        if (!tab1) continue;
        *tab1 = '\0';
        char *shape = tab1 + 1, *tab2 = strchr(shape, '\t');
        if (tab2) *tab2 = '\0';
        assert_true(count < cap);
        key_row *r = &rows[count++];
        snprintf(r->name, sizeof r->name, "%.255s", line);
        r->ndim = 0;
        for (char *s = shape; *s;) {
            r->shape[r->ndim++] = strtoll(s, &s, 10);
            if (*s == ',') s++;
            else break;
        }
    }
    fclose(f);
    *n = count;
    return rows;
}

static const char *tmp_file(const char *name) {
    static char bufs[4][512];
    static int slot;
    char *b = bufs[slot++ & 3];
    snprintf(b, 512, "%s/%s", tu_tmpdir(), name);
    return b;
}

static unsigned char *slurp(const char *path, size_t *size) {
    unsigned char *d;
    if (cs_read_file(path, 0, &d, size)) fail_msg("cannot read %s: %s", path, cellsam_last_error());
    return d;
}

/* Copy into an exactly sized buffer so that ASan sees any read past the end. */
static unsigned char *dup_bytes(const unsigned char *d, size_t n) {
    unsigned char *p = malloc(n ? n : 1);
    assert_non_null(p);
    memcpy(p, d, n);
    return p;
}

static void expect_error(int rc, const char *what, const char *needle) {
    const char *msg = cellsam_last_error();
    printf("  %-34s -> rc %d: %s\n", what, rc, msg);
    if (rc == 0) fail_msg("%s: expected an error", what);
    if (needle && !strstr(msg, needle)) fail_msg("%s: message \"%s\" lacks \"%s\"", what, msg, needle);
}

static int parse_pt_copy(const unsigned char *d, size_t n, unsigned flags) {
    unsigned char *c = dup_bytes(d, n);
    cs_pt_options o = {flags, (size_t)64 << 20};
    cs_weights *w = NULL;
    cs_error_clear();
    int rc = cs_weights_parse_pt_ex(c, n, &o, &w);
    if (rc == 0) {
        assert_non_null(w);
        cs_weights_free(w);
    } else {
        assert_null(w);
        assert_string_not_equal(cellsam_last_error(), "no error");
    }
    free(c);
    return rc;
}

static int parse_st_copy(const unsigned char *d, size_t n) {
    unsigned char *c = dup_bytes(d, n);
    cs_weights *w = NULL;
    cs_error_clear();
    int rc = cs_weights_parse_safetensors(c, n, &w);
    if (rc == 0) cs_weights_free(w);
    else assert_string_not_equal(cellsam_last_error(), "no error");
    free(c);
    return rc;
}

static float f32_at(const cs_tensor_entry *e, size_t i) {
    if (e->dtype == CS_DTYPE_F32) {
        float v;
        memcpy(&v, (const unsigned char *)e->data + 4 * i, 4);
        return v;
    }
    uint16_t h;
    memcpy(&h, (const unsigned char *)e->data + 2 * i, 2);
    return e->dtype == CS_DTYPE_F16 ? cs_f16_to_f32(h) : cs_bf16_to_f32(h);
}

/* Offset of the central-directory entry named `name` (test files only). */
static size_t find_cd_entry(const unsigned char *d, size_t n, const char *name) {
    size_t nl = strlen(name);
    for (size_t p = 0; p + 46 + nl <= n; p++)
        if (d[p] == 'P' && d[p + 1] == 'K' && d[p + 2] == 1 && d[p + 3] == 2 &&
            (size_t)(d[p + 28] | d[p + 29] << 8) == nl && memcmp(d + p + 46, name, nl) == 0)
            return p;
    fail_msg("central directory entry %s not found", name);
    return 0;
}

static void put32le(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* A small .pt with views of one storage, plus a float16 storage. */
static const float SRC_VALUES_SCALE = 0.5f;
static float src_value(size_t i) { return (float)i * SRC_VALUES_SCALE - 3.0f; }

typedef struct {
    const char *name;
    int64_t offset;
    int ndim;
    int64_t shape[3], stride[3];
} view_case;

static const view_case VIEWS[] = {
    {"offset", 7, 2, {2, 3}, {3, 1}},
    {"transposed", 2, 2, {4, 5}, {1, 4}},
    {"strided3d", 1, 3, {2, 3, 4}, {30, 8, 2}},
    {"expand", 10, 2, {3, 2}, {0, 1}},
    {"size1_any_stride", 3, 2, {1, 4}, {999, 1}},
    {"scalar", 59, 0, {0}, {0}},
    {"empty", 0, 2, {0, 5}, {5, 1}},
};
#define N_VIEWS (sizeof VIEWS / sizeof VIEWS[0])
#define N_SRC 60

static void write_views_file(const char *path, int compress) {
    cs_pt_writer *pw;
    assert_int_equal(cs_pt_writer_open(&pw, path, "views", compress), 0);
    float src[N_SRC];
    uint16_t half[N_SRC];
    for (size_t i = 0; i < N_SRC; i++) {
        src[i] = src_value(i);
        half[i] = cs_f32_to_f16(src[i]);
    }
    int s32, s16;
    assert_int_equal(cs_pt_writer_add_storage(pw, CS_DTYPE_F32, src, N_SRC, &s32), 0);
    assert_int_equal(cs_pt_writer_add_storage(pw, CS_DTYPE_F16, half, N_SRC, &s16), 0);
    for (size_t v = 0; v < N_VIEWS; v++)
        assert_int_equal(cs_pt_writer_add_tensor(pw, VIEWS[v].name, s32, VIEWS[v].offset, VIEWS[v].ndim,
                                                 VIEWS[v].shape, VIEWS[v].stride),
                         0);
    assert_int_equal(cs_pt_writer_add_tensor(pw, "half_transposed", s16, VIEWS[1].offset, 2,
                                             VIEWS[1].shape, VIEWS[1].stride),
                     0);
    assert_int_equal(cs_pt_writer_close(pw), 0);
}

/* value of view `c` at flat (row-major) index k */
static size_t view_source_index(const view_case *c, size_t k) {
    size_t idx = (size_t)c->offset;
    for (int d = c->ndim - 1; d >= 0; d--) {
        size_t i = k % (size_t)c->shape[d];
        k /= (size_t)c->shape[d];
        idx += i * (size_t)c->stride[d];
    }
    return idx;
}

static void check_views(const unsigned char *buf, size_t size, int zero_copy_expected) {
    cs_weights *w;
    if (cs_weights_parse_pt(buf, size, &w)) fail_msg("%s", cellsam_last_error());
    assert_int_equal(cs_weights_count(w), N_VIEWS + 1);
    for (size_t v = 0; v <= N_VIEWS; v++) {
        const view_case *c = v < N_VIEWS ? &VIEWS[v] : &VIEWS[1];
        const cs_tensor_entry *e = cs_weights_at(w, v);
        assert_string_equal(e->name, v < N_VIEWS ? c->name : "half_transposed");
        assert_int_equal(e->ndim, c->ndim);
        size_t numel = 1;
        for (int d = 0; d < c->ndim; d++) {
            assert_int_equal(e->shape[d], c->shape[d]);
            numel *= (size_t)c->shape[d];
        }
        assert_int_equal(e->nbytes, numel * cs_dtype_size(e->dtype));
        size_t wrong = 0;
        for (size_t k = 0; k < numel; k++) {
            float want = src_value(view_source_index(c, k));
            if (v == N_VIEWS) want = cs_f16_to_f32(cs_f32_to_f16(want));
            if (f32_at(e, k) != want) wrong++;
        }
        printf("  view %-18s numel %-3zu mismatches %zu\n", e->name, numel, wrong);
        assert_int_equal(wrong, 0);
        /* Contiguous views of stored entries point into the file; others are copies. */
        int contiguous = v == 0 || v == 4 || v == 5 || v == 6;
        int inside = (const unsigned char *)e->data >= buf && (const unsigned char *)e->data < buf + size;
        if (numel) assert_int_equal(inside, contiguous && zero_copy_expected);
    }
    cs_weights_free(w);
}

/* ----------------------------------------------------- reference checkpoints */

static void check_against_keys(cs_weights *w, const char *format) {
    size_t n;
    key_row *rows = read_keys(&n);
    assert_true(n > 500);
    assert_string_equal(cs_weights_format(w), format);
    assert_int_equal(cs_weights_count(w), n);
    for (size_t i = 0; i < n; i++) {
        const cs_tensor_entry *e = cs_weights_at(w, i);
        if (strcmp(e->name, rows[i].name) != 0)
            fail_msg("%s entry %zu is %s, keys.tsv has %s", format, i, e->name, rows[i].name);
        assert_int_equal(e->dtype, CS_DTYPE_F32);
        assert_int_equal(e->ndim, rows[i].ndim);
        size_t numel = 1;
        for (int d = 0; d < e->ndim; d++) {
            assert_int_equal(e->shape[d], rows[i].shape[d]);
            numel *= (size_t)rows[i].shape[d];
        }
        assert_int_equal(e->nbytes, numel * 4);
        assert_ptr_equal(cs_weights_find(w, rows[i].name), e);
    }
    printf("  %s: %zu tensors match keys.tsv (names, order, shapes)\n", format, n);
    free(rows);
}

static void test_tiny_pt_keys(void **state) {
    (void)state;
    cs_weights *w;
    if (cs_weights_open(tu_path("checkpoint.pt"), &w)) fail_msg("%s", cellsam_last_error());
    check_against_keys(w, "pytorch");
    cs_weights_free(w);
    /* From memory: every tensor points into the buffer (zero copy). */
    size_t size;
    unsigned char *buf = slurp(tu_path("checkpoint.pt"), &size);
    if (cs_weights_parse_pt(buf, size, &w)) fail_msg("%s", cellsam_last_error());
    for (size_t i = 0; i < cs_weights_count(w); i++) {
        const unsigned char *p = cs_weights_at(w, i)->data;
        assert_true(p >= buf && p + cs_weights_at(w, i)->nbytes <= buf + size);
    }
    cs_weights_free(w);
    free(buf);
}

static void test_tiny_safetensors_keys(void **state) {
    (void)state;
    cs_weights *w;
    if (cs_weights_open(tu_path("checkpoint.safetensors"), &w)) fail_msg("%s", cellsam_last_error());
    check_against_keys(w, "safetensors");
    cs_weights_free(w);
}

static void test_tiny_formats_identical(void **state) {
    (void)state;
    cs_weights *a, *b;
    if (cs_weights_open(tu_path("checkpoint.pt"), &a)) fail_msg("%s", cellsam_last_error());
    if (cs_weights_open(tu_path("checkpoint.safetensors"), &b)) fail_msg("%s", cellsam_last_error());
    assert_int_equal(cs_weights_count(a), cs_weights_count(b));
    size_t bytes = 0, differing = 0;
    for (size_t i = 0; i < cs_weights_count(a); i++) {
        const cs_tensor_entry *x = cs_weights_at(a, i), *y = cs_weights_at(b, i);
        assert_string_equal(x->name, y->name);
        assert_int_equal(x->nbytes, y->nbytes);
        if (memcmp(x->data, y->data, x->nbytes) != 0) differing++;
        bytes += x->nbytes;
    }
    printf("  .pt vs .safetensors: %zu tensors, %zu bytes, %zu differ\n", cs_weights_count(a), bytes,
           differing);
    assert_int_equal(differing, 0);
    cs_weights_free(a);
    cs_weights_free(b);
}

/* The detector's class_embed.k / bbox_embed.k (k = 0..L-1) are one module saved under
 * L names: equal values in both files, and one shared storage in the .pt. */
static void check_shared_group(cs_weights *w, int is_pt, const char *fmt, const char *file,
                               size_t expected) {
    char name[160];
    snprintf(name, sizeof name, fmt, 0);
    const cs_tensor_entry *first = cs_weights_find(w, name);
    assert_non_null(first);
    size_t found = 1;
    for (int k = 1; k < 64; k++) {
        snprintf(name, sizeof name, fmt, k);
        const cs_tensor_entry *e = cs_weights_find(w, name);
        if (!e) break;
        found++;
        assert_int_equal(e->nbytes, first->nbytes);
        assert_memory_equal(e->data, first->data, e->nbytes);
        if (is_pt) assert_ptr_equal(e->data, first->data);
    }
    snprintf(name, sizeof name, fmt, 0);
    printf("  %-22s %zu equal copies of %s\n", file, found, name);
    assert_int_equal(found, expected);
}

static void test_shared_class_embed(void **state) {
    (void)state;
    /* Expected copy count: the decoder depth, counted from keys.tsv. */
    size_t n, layers = 0;
    key_row *rows = read_keys(&n);
    for (size_t i = 0; i < n; i++)
        if (strstr(rows[i].name, "transformer.class_embed.") && strstr(rows[i].name, ".weight")) layers++;
    free(rows);
    assert_true(layers >= 2);
    const char *groups[] = {
        "cellfinder.decode_head.transformer.class_embed.%d.weight",
        "cellfinder.decode_head.transformer.class_embed.%d.bias",
        "cellfinder.decode_head.transformer.bbox_embed.%d.layers.0.weight",
        "cellfinder.decode_head.transformer.bbox_embed.%d.layers.2.bias",
    };
    const char *files[2] = {"checkpoint.pt", "checkpoint.safetensors"};
    for (int f = 0; f < 2; f++) {
        cs_weights *w;
        if (cs_weights_open(tu_path("%s", files[f]), &w)) fail_msg("%s", cellsam_last_error());
        for (size_t g = 0; g < sizeof groups / sizeof groups[0]; g++)
            check_shared_group(w, f == 0, groups[g], files[f], layers);
        cs_weights_free(w);
    }
}

/* ------------------------------------------------------------------ writer */

static void test_roundtrip_dtypes(void **state) {
    (void)state;
    cs_weights *ref;
    if (cs_weights_open(tu_path("checkpoint.safetensors"), &ref)) fail_msg("%s", cellsam_last_error());
    const cs_dtype types[3] = {CS_DTYPE_F32, CS_DTYPE_F16, CS_DTYPE_BF16};
    for (int t = 0; t < 3; t++) {
        const char *path = tmp_file("roundtrip.pt");
        assert_int_equal(cs_weights_save_pt(ref, path, types[t], 0), 0);
        cs_weights *w;
        if (cs_weights_open(path, &w)) fail_msg("%s", cellsam_last_error());
        assert_string_equal(cs_weights_format(w), "pytorch");
        assert_int_equal(cs_weights_count(w), cs_weights_count(ref));
        size_t elems = 0, wrong = 0;
        for (size_t i = 0; i < cs_weights_count(ref); i++) {
            const cs_tensor_entry *x = cs_weights_at(ref, i), *y = cs_weights_at(w, i);
            assert_string_equal(x->name, y->name);
            assert_int_equal(y->dtype, types[t]);
            assert_int_equal(x->ndim, y->ndim);
            for (int d = 0; d < x->ndim; d++) assert_int_equal(x->shape[d], y->shape[d]);
            size_t n = x->nbytes / 4;
            for (size_t k = 0; k < n; k++) {
                float v;
                memcpy(&v, (const unsigned char *)x->data + 4 * k, 4);
                uint32_t want, got;
                if (types[t] == CS_DTYPE_F32) {
                    memcpy(&want, &v, 4);
                    memcpy(&got, (const unsigned char *)y->data + 4 * k, 4);
                } else {
                    uint16_t h;
                    memcpy(&h, (const unsigned char *)y->data + 2 * k, 2);
                    got = h;
                    want = types[t] == CS_DTYPE_F16 ? cs_f32_to_f16(v) : cs_f32_to_bf16(v);
                }
                wrong += want != got;
            }
            elems += n;
        }
        printf("  save_pt %-4s: %zu tensors, %zu elements, %zu not bit-identical to the rounded f32\n",
               cs_dtype_name(types[t]), cs_weights_count(w), elems, wrong);
        assert_int_equal(wrong, 0);
        cs_weights_free(w);
    }
    cs_weights_free(ref);
}

static void test_nested_state_dict(void **state) {
    (void)state;
    cs_weights *ref;
    if (cs_weights_open(tu_path("checkpoint.pt"), &ref)) fail_msg("%s", cellsam_last_error());
    const char *path = tmp_file("nested.pt");
    assert_int_equal(cs_weights_save_pt(ref, path, CS_DTYPE_F32, 1), 0);
    cs_weights *w;
    if (cs_weights_open(path, &w)) fail_msg("%s", cellsam_last_error());
    assert_int_equal(cs_weights_count(w), cs_weights_count(ref));
    for (size_t i = 0; i < cs_weights_count(ref); i++) {
        const cs_tensor_entry *x = cs_weights_at(ref, i), *y = cs_weights_at(w, i);
        assert_string_equal(x->name, y->name);
        assert_int_equal(x->nbytes, y->nbytes);
        assert_memory_equal(x->data, y->data, x->nbytes);
    }
    printf("  nested {'epoch', 'state_dict', 'arch'}: %zu tensors identical\n", cs_weights_count(w));
    cs_weights_free(w);
    cs_weights_free(ref);
}

static void test_views(void **state) {
    (void)state;
    for (int compress = 0; compress < 2; compress++) {
        const char *path = tmp_file("views.pt");
        write_views_file(path, compress);
        size_t size;
        unsigned char *buf = slurp(path, &size);
        printf("  %s file: %zu bytes\n", compress ? "deflated" : "stored", size);
        check_views(buf, size, !compress);
        free(buf);
    }
}

/* ------------------------------------------------------------- bad .pt files */

static void test_truncated_pt(void **state) {
    (void)state;
    size_t size;
    unsigned char *buf = slurp(tu_path("checkpoint.pt"), &size);
    const size_t cuts[] = {0, 1, 4, 21, 22, 100, 4096, size / 3, size / 2, size - 200, size - 23,
                           size - 22, size - 21, size - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        char what[64];
        snprintf(what, sizeof what, "checkpoint.pt cut at %zu", cuts[i]);
        expect_error(parse_pt_copy(buf, cuts[i], 0), what, "zip");
    }
    /* Not a zip at all. */
    expect_error(parse_pt_copy((const unsigned char *)"PK\3\4 nothing else here at all", 30, 0),
                 "zip magic only", "end of central directory");
    free(buf);
}

static void test_corrupt_zip_directory(void **state) {
    (void)state;
    const char *path = tmp_file("views.pt");
    write_views_file(path, 0);
    size_t size;
    unsigned char *good = slurp(path, &size);
    size_t cd = find_cd_entry(good, size, "views/data/0");
    size_t cd1 = find_cd_entry(good, size, "views/data/1");
    size_t eocd = size - 22;
    assert_true(good[eocd] == 'P' && good[eocd + 3] == 6);
    struct {
        const char *what, *needle;
        size_t at;
        unsigned char bytes[8];
        size_t n;
    } cases[] = {
        {"central entry signature", "central directory entry", cd, {'X'}, 1},
        {"encrypted flag", "encrypted", cd + 8, {0x09, 0x08}, 2},
        {"compression method 12", "compression method 12", cd + 10, {12, 0}, 2},
        {"stored sizes differ", "different packed", cd + 20, {1, 0, 0, 0}, 4},
        {"entry size past directory", "outside the archive", cd + 20, {0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff, 0x7f}, 8},
        {"local offset past directory", "no local header", cd + 42, {0xf0, 0xff, 0xff, 0x7f}, 4},
        {"local offset of another entry", "local header names", cd1 + 42, {0, 0, 0, 0}, 4},
        {"name length overruns", "overruns", cd + 28, {0xff, 0xff}, 2},
        {"entry count (eocd) vs zip64", "disagree", eocd + 10, {0xff, 0x7f}, 2},
        {"entry count (zip64)", "cannot fit", eocd + 8, {0xff, 0xff, 0xff, 0xff}, 4},
        {"comment length", "end of central directory", eocd + 20, {5, 0}, 2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        unsigned char *bad = dup_bytes(good, size);
        memcpy(bad + cases[i].at, cases[i].bytes, cases[i].n);
        /* The zip64 record wins over the classic one: patch both counts. */
        if (cases[i].at == eocd + 8) {
            size_t z = size - 22 - 20 - 56;
            assert_true(bad[z] == 'P' && bad[z + 2] == 6 && bad[z + 3] == 6);
            memset(bad + z + 24, 0x7f, 8);
            memset(bad + z + 32, 0x7f, 8);
        }
        expect_error(parse_pt_copy(bad, size, 0), cases[i].what, cases[i].needle);
        free(bad);
    }
    /* Two entries claiming the same bytes. */
    {
        unsigned char *bad = dup_bytes(good, size);
        size_t cd2 = find_cd_entry(good, size, "views/data.pkl");
        /* data.pkl's entry now also covers data/1's local header */
        uint32_t pkl_off = (uint32_t)(bad[cd2 + 42] | bad[cd2 + 43] << 8 | bad[cd2 + 44] << 16 |
                                      (uint32_t)bad[cd2 + 45] << 24);
        uint32_t d1_off = (uint32_t)(bad[cd1 + 42] | bad[cd1 + 43] << 8 | bad[cd1 + 44] << 16 |
                                     (uint32_t)bad[cd1 + 45] << 24);
        assert_true(d1_off < pkl_off);
        put32le(bad + cd1 + 20, pkl_off - d1_off); /* data/1 packed size reaches into data.pkl */
        put32le(bad + cd1 + 24, pkl_off - d1_off);
        expect_error(parse_pt_copy(bad, size, 0), "overlapping entries", "overlap");
        free(bad);
    }
    /* Every single-byte change in the directory and trailer: an error or a
     * clean load, never a crash (ASan/UBSan builds check the "never"). */
    size_t fails = 0, tried = 0;
    for (size_t p = cd; p < size; p++) {
        unsigned char *bad = dup_bytes(good, size);
        bad[p] ^= 0xa5;
        fails += parse_pt_copy(bad, size, 0) != 0;
        tried++;
        free(bad);
    }
    printf("  directory byte flips: %zu tried, %zu rejected\n", tried, fails);
    assert_true(fails > 0);
    free(good);
}

/* The pickle bytes inside a .pt written by the writer (first bytes are unique). */
static size_t find_pickle(const unsigned char *d, size_t n) {
    static const char head[] = "\x80\x02" "ccollections\nOrderedDict\n";
    for (size_t p = 0; p + sizeof head - 1 <= n; p++)
        if (memcmp(d + p, head, sizeof head - 1) == 0) return p;
    fail_msg("pickle not found");
    return 0;
}

static void test_corrupt_pickle(void **state) {
    (void)state;
    const char *path = tmp_file("views.pt");
    write_views_file(path, 0);
    size_t size;
    unsigned char *good = slurp(path, &size);
    size_t pk = find_pickle(good, size);
    size_t cd = find_cd_entry(good, size, "views/data.pkl");
    size_t pk_len = (size_t)(good[cd + 24] | good[cd + 25] << 8);
    assert_int_equal(good[pk + pk_len - 1], '.');

    unsigned char *bad = dup_bytes(good, size);
    bad[pk + pk_len / 2] ^= 0x20;
    expect_error(parse_pt_copy(bad, size, 0), "data.pkl byte changed", "CRC");
    free(bad);

    /* Without the checksum every flipped byte reaches the unpickler. */
    size_t fails = 0;
    for (size_t i = 0; i < pk_len; i++) {
        const unsigned char pattern[3] = {0xff, 0x01, 0x80};
        for (int k = 0; k < 3; k++) {
            bad = dup_bytes(good, size);
            bad[pk + i] ^= pattern[k];
            fails += parse_pt_copy(bad, size, CS_PT_NO_CRC) != 0;
            free(bad);
        }
    }
    printf("  data.pkl byte flips (no CRC): %zu tried, %zu rejected\n", pk_len * 3, fails);
    assert_true(fails > 0);

    /* Every truncation of the pickle fails cleanly. */
    fails = 0;
    for (size_t cut = 0; cut < pk_len; cut++) {
        cs_pt_writer *pw;
        assert_int_equal(cs_pt_writer_open(&pw, path, "cut", 0), 0);
        float v[N_SRC] = {0};
        int id;
        cs_pt_writer_add_storage(pw, CS_DTYPE_F32, v, N_SRC, &id);
        cs_pt_writer_add_storage(pw, CS_DTYPE_F16, v, N_SRC, &id);
        cs_pt_writer_set_pickle(pw, good + pk, cut);
        assert_int_equal(cs_pt_writer_close(pw), 0);
        size_t n;
        unsigned char *f = slurp(path, &n);
        fails += parse_pt_copy(f, n, 0) != 0;
        free(f);
    }
    printf("  data.pkl truncations: %zu tried, %zu rejected\n", pk_len, fails);
    assert_int_equal(fails, pk_len);
    free(good);
}

/* A .pt whose data.pkl is `pickle` (one 4-float storage "0" is present). */
static int parse_with_pickle(const void *pickle, size_t len) {
    const char *path = tmp_file("custom.pt");
    cs_pt_writer *pw;
    assert_int_equal(cs_pt_writer_open(&pw, path, "archive", 0), 0);
    float v[4] = {1, 2, 3, 4};
    int id;
    assert_int_equal(cs_pt_writer_add_storage(pw, CS_DTYPE_F32, v, 4, &id), 0);
    assert_int_equal(cs_pt_writer_set_pickle(pw, pickle, len), 0);
    assert_int_equal(cs_pt_writer_close(pw), 0);
    cs_weights *w = NULL;
    cs_error_clear();
    int rc = cs_weights_open(path, &w);
    cs_weights_free(w);
    return rc;
}

#define PICKLE(s) s, sizeof(s) - 1

static void append(char *buf, size_t *n, const void *p, size_t len) {
    memcpy(buf + *n, p, len);
    *n += len;
}

static void test_hostile_pickles(void **state) {
    (void)state;
    char sentinel[512], pk[1024];
    snprintf(sentinel, sizeof sentinel, "%s/pwned", tu_tmpdir());
    char cmd[600];
    snprintf(cmd, sizeof cmd, "touch %s", sentinel);
    unsigned char cl = (unsigned char)strlen(cmd);
    /* os.system(cmd) via GLOBAL + REDUCE */
    size_t n = 0;
    append(pk, &n, PICKLE("\x80\x02" "cos\nsystem\nq\x00" "U"));
    pk[n++] = (char)cl;
    append(pk, &n, cmd, cl);
    append(pk, &n, PICKLE("\x85R."));
    expect_error(parse_with_pickle(pk, n), "GLOBAL os.system + REDUCE", "os.system");
    /* builtins.eval */
    const char *expr = "__import__('os').system('true')";
    n = 0;
    append(pk, &n, PICKLE("\x80\x02" "cbuiltins\neval\n" "U"));
    pk[n++] = (char)strlen(expr);
    append(pk, &n, expr, strlen(expr));
    append(pk, &n, PICKLE("\x85R."));
    expect_error(parse_with_pickle(pk, n), "GLOBAL builtins.eval + REDUCE", "builtins.eval");
    /* STACK_GLOBAL (protocol 4) is checked the same way. */
    expect_error(parse_with_pickle(PICKLE("\x80\x04\x8c\x05posix\x8c\x06system\x93)R.")),
                 "STACK_GLOBAL posix.system", "posix.system");
    expect_error(parse_with_pickle(PICKLE("\x80\x02" "ctorch\nload\n)R.")), "GLOBAL torch.load",
                 "torch.load");
    /* A whitelisted class cannot be called with arbitrary arguments. */
    expect_error(parse_with_pickle(PICKLE("\x80\x02" "ctorch\nFloatStorage\n)R.")),
                 "REDUCE on a storage class", "not allowed");
    assert_int_not_equal(access(sentinel, F_OK), 0);
    printf("  no command ran (%s absent)\n", sentinel);
}

static void test_pickle_errors(void **state) {
    (void)state;
    /* PROTO 2, EMPTY_DICT at offset 2, then opcode 0xff at offset 3 */
    expect_error(parse_with_pickle(PICKLE("\x80\x02}\xff.")), "unknown opcode 0xff",
                 "unsupported pickle opcode 0xff at offset 3");
    expect_error(parse_with_pickle(PICKLE("\x80\x02I1\n.")), "text INT opcode",
                 "unsupported pickle opcode 0x49 at offset 2");
    expect_error(parse_with_pickle(PICKLE("\x80\x02}")), "no STOP", "without STOP");
    expect_error(parse_with_pickle(PICKLE("\x80\x02h\x05.")), "BINGET unset", "memo");
    expect_error(parse_with_pickle(PICKLE("\x80\x02s.")), "SETITEM on empty stack", "SETITEM");
    expect_error(parse_with_pickle(PICKLE("\x80\x02(t(u.")), "SETITEMS without dict", "SETITEMS");
    expect_error(parse_with_pickle(PICKLE("\x80\x02X\xff\xff\x00\x00" "ab.")), "string past end",
                 "past the end");
    expect_error(parse_with_pickle(PICKLE("\x80\x02].")), "list at top", "holds a list, not a state dict");
    /* A flat state dict whose value is not a tensor */
    expect_error(parse_with_pickle(PICKLE("\x80\x02}X\x01\x00\x00\x00" "aK\x01s.")), "int in state dict",
                 "state dict entry a is a int");
    /* Persistent id naming a storage that is not in the archive */
    expect_error(parse_with_pickle(PICKLE("\x80\x02}X\x01\x00\x00\x00" "a" "ctorch._utils\n_rebuild_tensor_v2\n"
                                          "((X\x07\x00\x00\x00storage" "ctorch\nFloatStorage\n"
                                          "X\x01\x00\x00\x00" "7" "X\x03\x00\x00\x00" "cpuK\x04tQK\x00K\x04\x85K\x01\x85"
                                          "\x89}tRs.")),
                 "missing storage", "storage 7 is missing");
    /* The same with storage "0" loads: 4 floats [1,2,3,4] */
    assert_int_equal(parse_with_pickle(PICKLE("\x80\x02}X\x01\x00\x00\x00" "a" "ctorch._utils\n_rebuild_tensor_v2\n"
                                              "((X\x07\x00\x00\x00storage" "ctorch\nFloatStorage\n"
                                              "X\x01\x00\x00\x00" "0" "X\x03\x00\x00\x00" "cpuK\x04tQK\x00K\x04\x85K\x01\x85"
                                              "\x89}tRs.")),
                     0);
    /* Wrapper dict: non-tensor entries are skipped */
    assert_int_equal(parse_with_pickle(PICKLE("\x80\x02}(X\x05\x00\x00\x00" "epochK\x03X\x0a\x00\x00\x00" "state_dict}u.")), 0);
    /* Deep MARK nesting is bounded */
    char deep[70000 + 4];
    memcpy(deep, "\x80\x02", 2);
    memset(deep + 2, '(', 70000);
    memcpy(deep + 70002, "}.", 2);
    expect_error(parse_with_pickle(deep, sizeof deep), "70000 nested MARKs", "MARK");
    /* Large memo index is bounded */
    expect_error(parse_with_pickle(PICKLE("\x80\x02}r\xff\xff\xff\x7f.")), "LONG_BINPUT 2^31", "memo index");
}

static void test_bad_storages(void **state) {
    (void)state;
    const char *path = tmp_file("storage.pt");
    float v[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    int64_t shape24[2] = {2, 4}, shape2[1] = {2}, stride1[1] = {1}, shape4[1] = {4};
    cs_pt_writer *pw;
    int id;
    cs_weights *w = NULL;

    /* 6-element storage under a 2x4 tensor */
    assert_int_equal(cs_pt_writer_open(&pw, path, "archive", 0), 0);
    assert_int_equal(cs_pt_writer_add_storage(pw, CS_DTYPE_F32, v, 6, &id), 0);
    assert_int_equal(cs_pt_writer_add_tensor(pw, "short.weight", id, 0, 2, shape24, NULL), 0);
    assert_int_equal(cs_pt_writer_close(pw), 0);
    expect_error(cs_weights_open(path, &w), "storage shorter than tensor", "short.weight: storage shorter");

    /* in range except for the offset */
    assert_int_equal(cs_pt_writer_open(&pw, path, "archive", 0), 0);
    assert_int_equal(cs_pt_writer_add_storage(pw, CS_DTYPE_F32, v, 8, &id), 0);
    assert_int_equal(cs_pt_writer_add_tensor(pw, "offset.bias", id, 7, 1, shape2, stride1), 0);
    assert_int_equal(cs_pt_writer_close(pw), 0);
    expect_error(cs_weights_open(path, &w), "offset past storage", "offset.bias: storage shorter");

    /* huge stride overflowing 64 bits */
    int64_t huge[1] = {INT64_MAX};
    assert_int_equal(cs_pt_writer_open(&pw, path, "archive", 0), 0);
    assert_int_equal(cs_pt_writer_add_storage(pw, CS_DTYPE_F32, v, 8, &id), 0);
    assert_int_equal(cs_pt_writer_add_tensor(pw, "stride.weight", id, 0, 1, shape4, huge), 0);
    assert_int_equal(cs_pt_writer_close(pw), 0);
    expect_error(cs_weights_open(path, &w), "stride overflow", "stride.weight: storage shorter");

    /* the persistent id claims more elements than the entry holds */
    assert_int_equal(cs_pt_writer_open(&pw, path, "archive", 0), 0);
    assert_int_equal(cs_pt_writer_begin_storage(pw, "FloatStorage", 2, 8, &id), 0);
    assert_int_equal(cs_pt_writer_write(pw, v, 16), 0);
    assert_int_equal(cs_pt_writer_end_storage(pw), 0);
    assert_int_equal(cs_pt_writer_add_tensor(pw, "t", id, 0, 1, shape4, NULL), 0);
    assert_int_equal(cs_pt_writer_close(pw), 0);
    expect_error(cs_weights_open(path, &w), "entry smaller than numel", "fewer than");

    const char *types[3] = {"DoubleStorage", "LongStorage", "ByteStorage"};
    const size_t sizes[3] = {8, 8, 1};
    for (int t = 0; t < 3; t++) {
        assert_int_equal(cs_pt_writer_open(&pw, path, "archive", 0), 0);
        assert_int_equal(cs_pt_writer_begin_storage(pw, types[t], sizes[t], 4, &id), 0);
        assert_int_equal(cs_pt_writer_write(pw, v, 4 * sizes[t]), 0);
        assert_int_equal(cs_pt_writer_end_storage(pw), 0);
        assert_int_equal(cs_pt_writer_add_tensor(pw, "num_batches", id, 0, 1, shape4, NULL), 0);
        assert_int_equal(cs_pt_writer_close(pw), 0);
        int rc = cs_weights_open(path, &w);
        char what[64];
        snprintf(what, sizeof what, "torch.%s", types[t]);
        expect_error(rc, what, types[t]);
        assert_int_equal(rc, CELLSAM_ERR_UNSUPPORTED);
        assert_non_null(strstr(cellsam_last_error(), "num_batches has unsupported dtype"));
    }

    /* big-endian archives */
    assert_int_equal(cs_pt_writer_open(&pw, path, "archive", 0), 0);
    assert_int_equal(cs_pt_writer_add_storage(pw, CS_DTYPE_F32, v, 4, &id), 0);
    assert_int_equal(cs_pt_writer_add_tensor(pw, "t", id, 0, 1, shape4, NULL), 0);
    assert_int_equal(cs_pt_writer_add_file(pw, "byteorder", "big", 3), 0);
    assert_int_equal(cs_pt_writer_close(pw), 0);
    expect_error(cs_weights_open(path, &w), "byteorder big", "big-endian");

    /* duplicate names in the state dict */
    assert_int_equal(cs_pt_writer_open(&pw, path, "archive", 0), 0);
    assert_int_equal(cs_pt_writer_add_storage(pw, CS_DTYPE_F32, v, 4, &id), 0);
    assert_int_equal(cs_pt_writer_add_tensor(pw, "t", id, 0, 1, shape4, NULL), 0);
    assert_int_equal(cs_pt_writer_add_tensor(pw, "t", id, 0, 1, shape4, NULL), 0);
    assert_int_equal(cs_pt_writer_close(pw), 0);
    expect_error(cs_weights_open(path, &w), "duplicate tensor name", "duplicate");

    /* a deflated storage with a wrong CRC in the directory */
    write_views_file(path, 1);
    size_t size;
    unsigned char *buf = slurp(path, &size);
    size_t cd = find_cd_entry(buf, size, "views/data/0");
    buf[cd + 16] ^= 1;
    expect_error(parse_pt_copy(buf, size, 0), "deflated storage CRC", "CRC");
    /* ...and with a wrong stated size */
    buf[cd + 16] ^= 1;
    buf[cd + 24] ^= 4;
    expect_error(parse_pt_copy(buf, size, 0), "deflated size mismatch", "inflate");
    free(buf);
    assert_null(w);
}

/* ------------------------------------------------------- bad safetensors */

static unsigned char *make_st(const char *json, const void *data, size_t ndata, size_t *size) {
    size_t hl = strlen(json);
    *size = 8 + hl + ndata;
    unsigned char *b = malloc(*size);
    assert_non_null(b);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, json, hl);
    if (ndata) memcpy(b + 8 + hl, data, ndata);
    return b;
}

static void st_case(const char *what, const char *json, size_t ndata, const char *needle) {
    unsigned char data[64] = {0};
    size_t size;
    unsigned char *b = make_st(json, data, ndata, &size);
    expect_error(parse_st_copy(b, size), what, needle);
    free(b);
}

static void test_bad_safetensors(void **state) {
    (void)state;
    /* a valid file first */
    float a[6] = {1, 2, 3, 4, 5, 6};
    size_t size;
    unsigned char *ok = make_st("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}", a,
                                sizeof a, &size);
    cs_weights *w;
    assert_int_equal(cs_weights_parse_safetensors(ok, size, &w), 0);
    assert_int_equal(cs_weights_count(w), 1);
    assert_memory_equal(cs_weights_at(w, 0)->data, a, sizeof a);
    cs_weights_free(w);
    const size_t cuts[] = {0, 4, 7, 8, 20, size - 24, size - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        char what[64];
        snprintf(what, sizeof what, "safetensors cut at %zu", cuts[i]);
        expect_error(parse_st_copy(ok, cuts[i]), what, "safetensors");
    }
    unsigned char *bad = dup_bytes(ok, size);
    bad[6] = 1; /* header length ~2^48 */
    expect_error(parse_st_copy(bad, size), "header length 2^48", "header length");
    memset(bad, 0, 8);
    bad[0] = 200; /* longer than the file */
    expect_error(parse_st_copy(bad, size), "header length > file", "header length");
    free(bad);
    free(ok);

    st_case("bad JSON", "{\"a\":{\"dtype\":\"F32\",", 0, "bad JSON");
    st_case("JSON not an object", "[1,2,3]", 0, "not a JSON object");
    st_case("duplicate key", "{\"a\":{},\"a\":{}}", 0, "bad JSON");
    st_case("offsets past end", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8,
            "outside the file");
    st_case("negative offset", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 8,
            "outside the file");
    st_case("end before begin", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 8,
            "outside the file");
    st_case("shape/offset mismatch", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8,
            "shape needs 12 bytes but offsets give 8");
    st_case("dtype I64", "{\"a\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8,
            "dtype I64");
    st_case("shape overflow",
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8,
            "shape is too large");
    st_case("negative dim", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8,
            "bad shape");
    st_case("missing offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "malformed");
    st_case("9 dims", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 8,
            "dimensions");

    /* byte flips over a real header: errors or clean loads, no crash */
    cs_weights *ref;
    if (cs_weights_open(tu_path("checkpoint.safetensors"), &ref)) fail_msg("%s", cellsam_last_error());
    cs_weights *small = cs_weights_new("test");
    for (size_t i = 0; i < 4; i++) {
        const cs_tensor_entry *e = cs_weights_at(ref, i);
        assert_int_equal(cs_weights_add_view(small, e->name, e->dtype, e->ndim, e->shape, e->data, e->nbytes), 0);
    }
    assert_int_equal(cs_weights_finish(small), 0);
    const char *path = tmp_file("small.safetensors");
    assert_int_equal(cs_weights_save_safetensors(small, path, CS_DTYPE_F16), 0);
    cs_weights_free(small);
    cs_weights_free(ref);
    unsigned char *good = slurp(path, &size);
    size_t hl = (size_t)good[0] | (size_t)good[1] << 8;
    size_t fails = 0;
    for (size_t p = 0; p < 8 + hl; p++) {
        bad = dup_bytes(good, size);
        bad[p] ^= 0x5a;
        fails += parse_st_copy(bad, size) != 0;
        free(bad);
    }
    printf("  safetensors header byte flips: %zu tried, %zu rejected\n", 8 + hl, fails);
    assert_true(fails > 0);
    free(good);
}

/* ------------------------------------------------------------ fuzz corpus */

/* Checkpoints written by CPython's own pickler (protocols 2 and 4) with stand-in
 * torch classes, kept as fuzz seeds: OrderedDict with _metadata (BUILD), memo,
 * _rebuild_parameter, a transposed view, two names on one storage, a float16
 * storage; the protocol-4 file adds FRAME, MEMOIZE, STACK_GLOBAL and a wrapper
 * dict with float, list and None values. Storage 0 holds k * 0.25 (k < 12),
 * storage 1 holds -k (k < 6, float16). */
static void test_python_pickles(void **state) {
    (void)state;
    const char *files[2] = {"ok_python_proto2.pt", "ok_python_proto4_nested.pt"};
    for (int f = 0; f < 2; f++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/fuzz/corpus/pt/%s", CELLSAM_SOURCE_DIR, files[f]);
        cs_weights *w;
        if (cs_weights_open(path, &w)) fail_msg("%s", cellsam_last_error());
        assert_int_equal(cs_weights_count(w), 5);
        const char *names[5] = {"enc.weight", "enc.weight_t", "head.0.bias", "head.1.bias", "half.w"};
        size_t wrong = 0;
        for (int i = 0; i < 5; i++) {
            const cs_tensor_entry *e = cs_weights_at(w, (size_t)i);
            assert_string_equal(e->name, names[i]);
            size_t n = e->nbytes / cs_dtype_size(e->dtype);
            for (size_t k = 0; k < n; k++) {
                float want;
                if (i == 0) want = (float)k * 0.25f;
                else if (i == 1) want = (float)(k / 3 + 4 * (k % 3)) * 0.25f; /* (4,3) stride (1,4) */
                else if (i < 4) want = (float)(8 + k) * 0.25f;
                else want = -(float)(k + 1);
                wrong += f32_at(e, k) != want;
            }
        }
        assert_int_equal(cs_weights_at(w, 4)->dtype, CS_DTYPE_F16);
        assert_ptr_equal(cs_weights_at(w, 2)->data, cs_weights_at(w, 3)->data);
        printf("  %s: 5 tensors, %zu wrong values\n", files[f], wrong);
        assert_int_equal(wrong, 0);
        cs_weights_free(w);
    }
}

/* A bare data.pkl from the corpus in an archive like the one fuzz_weights_pt
 * builds: storages "0".."15" of 256 float32 each. */
static unsigned char *wrap_raw_pickle(const unsigned char *pkl, size_t n, size_t *size) {
    const char *path = tmp_file("wrapped.pt");
    cs_pt_writer *pw;
    assert_int_equal(cs_pt_writer_open(&pw, path, "archive", 0), 0);
    float v[256];
    for (int i = 0; i < 256; i++) v[i] = (float)i;
    for (int s = 0; s < 16; s++) {
        int id;
        assert_int_equal(cs_pt_writer_add_storage(pw, CS_DTYPE_F32, v, 256, &id), 0);
    }
    assert_int_equal(cs_pt_writer_set_pickle(pw, pkl, n), 0);
    assert_int_equal(cs_pt_writer_close(pw), 0);
    return slurp(path, size);
}

/* Every seed and regression input: ok_* load, bad_* fail, the rest (inputs that
 * once crashed a fuzzer) just must not crash. Files not starting with "PK" are
 * bare pickles. */
static void test_fuzz_corpus(void **state) {
    (void)state;
    const char *kinds[2] = {"pt", "safetensors"};
    for (int k = 0; k < 2; k++) {
        char dir[1024];
        snprintf(dir, sizeof dir, "%s/fuzz/corpus/%s", CELLSAM_SOURCE_DIR, kinds[k]);
        DIR *d = opendir(dir);
        if (!d) fail_msg("cannot open %s", dir);
        size_t files = 0, ok = 0;
        struct dirent *de;
        while ((de = readdir(d))) {
            if (de->d_name[0] == '.') continue;
            char path[2048];
            snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
            size_t size;
            unsigned char *buf = slurp(path, &size);
            if (k == 0 && !(size >= 2 && buf[0] == 'P' && buf[1] == 'K')) {
                unsigned char *wrapped = wrap_raw_pickle(buf, size, &size);
                free(buf);
                buf = wrapped;
            }
            int rc = k == 0 ? parse_pt_copy(buf, size, CS_PT_NO_CRC) : parse_st_copy(buf, size);
            if (k == 0 && !strncmp(de->d_name, "ok_", 3)) rc |= parse_pt_copy(buf, size, 0);
            free(buf);
            if (!strncmp(de->d_name, "ok_", 3) && rc) fail_msg("%s: %s", path, cellsam_last_error());
            if (!strncmp(de->d_name, "bad_", 4) && !rc) fail_msg("%s loaded but should not", path);
            files++;
            ok += rc == 0;
        }
        closedir(d);
        printf("  corpus %-12s %zu files, %zu load\n", kinds[k], files, ok);
        assert_true(files > 0);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_pt_keys),
        cmocka_unit_test(test_tiny_safetensors_keys),
        cmocka_unit_test(test_tiny_formats_identical),
        cmocka_unit_test(test_shared_class_embed),
        cmocka_unit_test(test_roundtrip_dtypes),
        cmocka_unit_test(test_nested_state_dict),
        cmocka_unit_test(test_views),
        cmocka_unit_test(test_truncated_pt),
        cmocka_unit_test(test_corrupt_zip_directory),
        cmocka_unit_test(test_corrupt_pickle),
        cmocka_unit_test(test_hostile_pickles),
        cmocka_unit_test(test_pickle_errors),
        cmocka_unit_test(test_bad_storages),
        cmocka_unit_test(test_bad_safetensors),
        cmocka_unit_test(test_python_pickles),
        cmocka_unit_test(test_fuzz_corpus),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
