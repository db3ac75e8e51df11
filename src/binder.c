/* Binding checkpoint tensors to model fields: lookup with prefix, shape check,
 * conversion to float32 where needed, and a list of every problem found. */
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model.h"

static void add_problem(cs_binder *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_problem(cs_binder *b, const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof line) n = sizeof line - 1;
    b->n_problems++;
    if (b->n_problems > 200) return; /* keep the message bounded */
    size_t need = b->problems_len + (size_t)n + 2;
    if (need > b->problems_cap) {
        size_t cap = need * 2;
        char *p = realloc(b->problems, cap);
        if (!p) return;
        b->problems = p;
        b->problems_cap = cap;
    }
    memcpy(b->problems + b->problems_len, line, (size_t)n);
    b->problems_len += (size_t)n;
    b->problems[b->problems_len++] = '\n';
    b->problems[b->problems_len] = '\0';
}

static int keep_owned(cs_binder *b, void *p) {
    if (b->n_owned == b->cap_owned) {
        size_t cap = b->cap_owned ? b->cap_owned * 2 : 64;
        void **o = realloc(b->owned, cap * sizeof *o);
        if (!o) return -1;
        b->owned = o;
        b->cap_owned = cap;
    }
    b->owned[b->n_owned++] = p;
    return 0;
}

static const float *bind_impl(cs_binder *b, const char *name, int ndim, const int64_t *dims) {
    char full[512];
    snprintf(full, sizeof full, "%s%s", b->prefix ? b->prefix : "", name);
    const cs_tensor_entry *e = cs_weights_find(b->w, full);
    if (!e) {
        add_problem(b, "missing tensor %s", full);
        return NULL;
    }
    int ok = e->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++)
        if (dims[i] >= 0 && e->shape[i] != dims[i]) ok = 0;
    if (!ok) {
        char want[128], got[128];
        size_t o = 0;
        for (int i = 0; i < ndim && o < sizeof want; i++)
            o += (size_t)snprintf(want + o, sizeof want - o, i ? ",%lld" : "%lld", (long long)dims[i]);
        if (!ndim) want[0] = '\0';
        o = 0;
        for (int i = 0; i < e->ndim && o < sizeof got; i++)
            o += (size_t)snprintf(got + o, sizeof got - o, i ? ",%lld" : "%lld", (long long)e->shape[i]);
        if (!e->ndim) got[0] = '\0';
        add_problem(b, "tensor %s has shape (%s), expected (%s)", full, got, want);
        return NULL;
    }
    size_t n = e->nbytes / cs_dtype_size(e->dtype);
    if (e->dtype == CS_DTYPE_F32 && ((uintptr_t)e->data & 3) == 0) return e->data;
    float *f = cs_alloc(n, sizeof(float));
    if (!f || keep_owned(b, f)) {
        free(f);
        add_problem(b, "out of memory converting %s", full);
        return NULL;
    }
    cs_tensor_to_f32(e, f);
    return f;
}

const float *cs_bindf(cs_binder *b, int ndim, const int64_t *dims, const char *fmt, ...) {
    char name[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    return bind_impl(b, name, ndim, dims);
}

void cs_binder_release(cs_binder *b) {
    for (size_t i = 0; i < b->n_owned; i++) free(b->owned[i]);
    free(b->owned);
    free(b->problems);
    memset(b, 0, sizeof *b);
}

const uint16_t *cs_bind16f(cs_binder *b, cs_dtype dtype, int ndim, const int64_t *dims, const char *fmt, ...) {
    char name[512], full[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    snprintf(full, sizeof full, "%s%s", b->prefix ? b->prefix : "", name);
    const cs_tensor_entry *e = cs_weights_find(b->w, full);
    if (!e) {
        /* let the float binder record the problem with its usual message */
        bind_impl(b, name, ndim, dims);
        return NULL;
    }
    if (e->dtype == dtype && ((uintptr_t)e->data & 1) == 0) {
        /* same dtype: check the shape through the float path's rules without converting */
        int ok = e->ndim == ndim;
        for (int i = 0; ok && i < ndim; i++)
            if (dims[i] >= 0 && e->shape[i] != dims[i]) ok = 0;
        if (!ok) {
            bind_impl(b, name, ndim, dims);
            return NULL;
        }
        return e->data;
    }
    const float *f = bind_impl(b, name, ndim, dims);
    if (!f) return NULL;
    size_t n = e->nbytes / cs_dtype_size(e->dtype);
    uint16_t *h = cs_alloc(n, sizeof(uint16_t));
    if (!h || keep_owned(b, h)) {
        free(h);
        add_problem(b, "out of memory converting %s", full);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) h[i] = dtype == CS_DTYPE_F16 ? cs_f32_to_f16(f[i]) : cs_f32_to_bf16(f[i]);
    /* the float32 source in the file mapping is not read again: its pages leave the
     * resident set (a later touch would re-read them from the file) */
    if ((const void *)f == e->data) cs_weights_drop_pages(b->w, f, n * sizeof(float));
    return h;
}
