/* .npy reader and writer. The header is a Python dict literal of three known keys;
 * we accept exactly what numpy writes and reject anything else. */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "npy.h"

size_t cs_npy_dtype_size(cs_npy_dtype t) {
    switch (t) {
    case CS_NPY_U8: case CS_NPY_I8: case CS_NPY_BOOL: return 1;
    case CS_NPY_U16: case CS_NPY_I16: case CS_NPY_F16: return 2;
    case CS_NPY_U32: case CS_NPY_I32: case CS_NPY_F32: return 4;
    default: return 8;
    }
}

static const struct { const char *descr; cs_npy_dtype t; } k_descr[] = {
    {"|u1", CS_NPY_U8},  {"|i1", CS_NPY_I8},  {"<u2", CS_NPY_U16}, {"<i2", CS_NPY_I16},
    {"<u4", CS_NPY_U32}, {"<i4", CS_NPY_I32}, {"<u8", CS_NPY_U64}, {"<i8", CS_NPY_I64},
    {"<f2", CS_NPY_F16}, {"<f4", CS_NPY_F32}, {"<f8", CS_NPY_F64}, {"|b1", CS_NPY_BOOL},
    {"<u1", CS_NPY_U8},  {"<i1", CS_NPY_I8},  {"|u2", CS_NPY_U16},
};

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && isspace((unsigned char)*p)) p++;
    return p;
}

/* Find the value following 'key': in the header dict. */
static const char *find_key(const char *h, const char *end, const char *key) {
    size_t kl = strlen(key);
    for (const char *p = h; p + kl + 2 <= end; p++)
        if (*p == '\'' && (size_t)(end - p) > kl + 1 && memcmp(p + 1, key, kl) == 0 && p[kl + 1] == '\'') {
            const char *q = skip_ws(p + kl + 2, end);
            if (q < end && *q == ':') return skip_ws(q + 1, end);
        }
    return NULL;
}

int cs_npy_parse_header(const unsigned char *buf, size_t size, cs_npy *out, size_t *data_offset) {
    memset(out, 0, sizeof *out);
    if (size < 10 || memcmp(buf, "\x93NUMPY", 6) != 0)
        return cs_error(CELLSAM_ERR_FORMAT, "not a .npy file (bad magic)");
    int major = buf[6];
    size_t hlen, hoff;
    if (major == 1) {
        hlen = (size_t)buf[8] | ((size_t)buf[9] << 8);
        hoff = 10;
    } else if (major == 2 || major == 3) {
        if (size < 12) return cs_error(CELLSAM_ERR_FORMAT, ".npy header truncated");
        hlen = (size_t)buf[8] | ((size_t)buf[9] << 8) | ((size_t)buf[10] << 16) | ((size_t)buf[11] << 24);
        hoff = 12;
    } else {
        return cs_error(CELLSAM_ERR_UNSUPPORTED, ".npy format version %d", major);
    }
    if (hlen > size - hoff || hlen > 65536) return cs_error(CELLSAM_ERR_FORMAT, ".npy header truncated");
    const char *h = (const char *)buf + hoff, *end = h + hlen;
    const char *d = find_key(h, end, "descr");
    if (!d) return cs_error(CELLSAM_ERR_FORMAT, ".npy header has no descr");
    if (d + 1 >= end || *d != '\'') return cs_error(CELLSAM_ERR_FORMAT, ".npy header is malformed (descr)");
    const char *dq = memchr(d + 1, '\'', (size_t)(end - d - 1));
    if (!dq) return cs_error(CELLSAM_ERR_FORMAT, ".npy header: bad descr");
    size_t dl = (size_t)(dq - d - 1);
    int found = 0;
    for (size_t i = 0; i < sizeof k_descr / sizeof k_descr[0]; i++)
        if (strlen(k_descr[i].descr) == dl && memcmp(k_descr[i].descr, d + 1, dl) == 0) {
            out->dtype = k_descr[i].t;
            found = 1;
        }
    if (!found) return cs_error(CELLSAM_ERR_UNSUPPORTED, ".npy dtype '%.*s' is not supported", (int)(dl < 16 ? dl : 16), d + 1);
    const char *fo = find_key(h, end, "fortran_order");
    if (!fo) return cs_error(CELLSAM_ERR_FORMAT, ".npy header has no fortran_order");
    if (fo >= end || (size_t)(end - fo) < 5) return cs_error(CELLSAM_ERR_FORMAT, ".npy header is malformed (fortran_order)");
    if (memcmp(fo, "False", 5) != 0) return cs_error(CELLSAM_ERR_UNSUPPORTED, ".npy in Fortran order is not supported");
    const char *sh = find_key(h, end, "shape");
    if (!sh) return cs_error(CELLSAM_ERR_FORMAT, ".npy header has no shape");
    if (sh >= end || *sh != '(') return cs_error(CELLSAM_ERR_FORMAT, ".npy header is malformed (shape)");
    const char *p = sh + 1;
    out->ndim = 0;
    for (;;) {
        p = skip_ws(p, end);
        if (p >= end) return cs_error(CELLSAM_ERR_FORMAT, ".npy header: bad shape");
        if (*p == ')') break;
        if (!isdigit((unsigned char)*p)) return cs_error(CELLSAM_ERR_FORMAT, ".npy header: bad shape");
        int64_t v = 0;
        while (p < end && isdigit((unsigned char)*p)) {
            if (v > (INT64_MAX - 9) / 10) return cs_error(CELLSAM_ERR_LIMIT, ".npy dimension too large");
            v = v * 10 + (*p++ - '0');
        }
        if (out->ndim >= 8) return cs_error(CELLSAM_ERR_UNSUPPORTED, ".npy with more than 8 dimensions");
        out->shape[out->ndim++] = v;
        p = skip_ws(p, end);
        if (p < end && *p == ',') p++;
    }
    size_t n, bytes;
    if (cs_dims_product(out->shape, out->ndim, 0, &n) ||
        cs_mul_size(n, cs_npy_dtype_size(out->dtype), &bytes) || bytes > CS_NPY_MAX_BYTES)
        return cs_error(CELLSAM_ERR_LIMIT, ".npy array too large");
    out->count = n;
    *data_offset = hoff + hlen;
    return CELLSAM_OK;
}

int cs_npy_parse(const unsigned char *buf, size_t size, cs_npy *out) {
    size_t doff;
    int rc = cs_npy_parse_header(buf, size, out, &doff);
    if (rc) return rc;
    size_t bytes = out->count * cs_npy_dtype_size(out->dtype);
    if (size - doff < bytes)
        return cs_error(CELLSAM_ERR_FORMAT, ".npy data truncated (%zu of %zu bytes)", size - doff, bytes);
    out->data = malloc(bytes ? bytes : 1);
    if (!out->data) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    memcpy(out->data, buf + doff, bytes);
    return CELLSAM_OK;
}

int cs_npy_load(const char *path, cs_npy *out) {
    unsigned char *buf;
    size_t size;
    memset(out, 0, sizeof *out);
    int rc = cs_read_file(path, CS_NPY_MAX_BYTES + 65536, &buf, &size);
    if (rc) return rc;
    rc = cs_npy_parse(buf, size, out);
    free(buf);
    if (rc) return cs_error_prefix(rc, "%s", path);
    return CELLSAM_OK;
}

void cs_npy_free(cs_npy *a) {
    free(a->data);
    memset(a, 0, sizeof *a);
}

double cs_npy_get(const cs_npy *a, size_t i) {
    const unsigned char *p = (const unsigned char *)a->data + i * cs_npy_dtype_size(a->dtype);
    switch (a->dtype) {
    case CS_NPY_U8: case CS_NPY_BOOL: return *p;
    case CS_NPY_I8: return *(const int8_t *)p;
    case CS_NPY_U16: { uint16_t v; memcpy(&v, p, 2); return v; }
    case CS_NPY_I16: { int16_t v; memcpy(&v, p, 2); return v; }
    case CS_NPY_U32: { uint32_t v; memcpy(&v, p, 4); return v; }
    case CS_NPY_I32: { int32_t v; memcpy(&v, p, 4); return v; }
    case CS_NPY_U64: { uint64_t v; memcpy(&v, p, 8); return (double)v; }
    case CS_NPY_I64: { int64_t v; memcpy(&v, p, 8); return (double)v; }
    case CS_NPY_F16: { uint16_t v; memcpy(&v, p, 2); return cs_f16_to_f32(v); }
    case CS_NPY_F32: { float v; memcpy(&v, p, 4); return v; }
    case CS_NPY_F64: { double v; memcpy(&v, p, 8); return v; }
    }
    return 0;
}

float *cs_npy_to_f32(const cs_npy *a) {
    float *f = cs_alloc(a->count, sizeof(float));
    if (!f) return NULL;
    for (size_t i = 0; i < a->count; i++) f[i] = (float)cs_npy_get(a, i);
    return f;
}

int cs_npy_save(const char *path, cs_npy_dtype dtype, const void *data, int ndim,
                const int64_t *shape) {
    const char *descr = NULL;
    for (size_t i = 0; i < sizeof k_descr / sizeof k_descr[0]; i++)
        if (k_descr[i].t == dtype) {
            descr = k_descr[i].descr;
            break;
        }
    char shp[256];
    size_t o = 0;
    o += (size_t)snprintf(shp + o, sizeof shp - o, "(");
    for (int i = 0; i < ndim && o < sizeof shp; i++)
        o += (size_t)snprintf(shp + o, sizeof shp - o, "%lld%s", (long long)shape[i],
                              ndim == 1 ? "," : (i + 1 < ndim ? ", " : ""));
    if (o < sizeof shp) snprintf(shp + o, sizeof shp - o, ")");
    char hdr[512];
    int hl = snprintf(hdr, sizeof hdr, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }", descr, shp);
    size_t total = 10 + (size_t)hl + 1;
    size_t pad = (64 - total % 64) % 64;
    size_t n;
    if (cs_dims_product(shape, ndim, 0, &n)) return cs_error(CELLSAM_ERR_LIMIT, "array too large");
    cs_atomic_file af;
    int rc = cs_atomic_open(&af, path);
    if (rc) return rc;
    unsigned short hlen = (unsigned short)(hl + pad + 1);
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hlen & 0xff), (unsigned char)(hlen >> 8)};
    fwrite(pre, 1, 10, af.f);
    fwrite(hdr, 1, (size_t)hl, af.f);
    for (size_t i = 0; i < pad; i++) fputc(' ', af.f);
    fputc('\n', af.f);
    if (n) fwrite(data, cs_npy_dtype_size(dtype), n, af.f);
    return cs_atomic_commit(&af);
}
