/* Trainable parameter store: named float32 tensors with gradients, loaded from and
 * saved to checkpoints under the official names; deterministic initialisers. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "train.h"

#define CS_TPARAMS_MAX 100000

void cs_tparams_init(cs_tparams *ps) { memset(ps, 0, sizeof *ps); }

void cs_tparams_free(cs_tparams *ps) {
    if (!ps) return;
    for (size_t i = 0; i < ps->n; i++) {
        cs_tparam *p = &ps->items[i];
        free(p->name);
        cs_free(p->w);
        cs_free(p->g);
        cs_free(p->m);
        cs_free(p->v);
    }
    free(ps->items);
    memset(ps, 0, sizeof *ps);
}

static int name_has(const char *name, const char *part) { return strstr(name, part) != NULL; }

cs_tparam *cs_tparams_add(cs_tparams *ps, const char *name, int ndim, const int64_t *shape) {
    if (!ps || !name || ndim < 0 || ndim > 4 || (ndim > 0 && !shape)) {
        cs_error(CELLSAM_ERR_INVALID, "cs_tparams_add: invalid arguments");
        return NULL;
    }
    if (cs_tparams_find(ps, name)) {
        cs_error(CELLSAM_ERR_INVALID, "parameter %s registered twice", name);
        return NULL;
    }
    size_t n;
    if (cs_dims_product(shape, ndim, (size_t)1 << 31, &n) != 0 || n == 0) {
        cs_error(CELLSAM_ERR_LIMIT, "parameter %s: invalid or oversized shape", name);
        return NULL;
    }
    if (ps->n == ps->cap) {
        if (ps->cap >= CS_TPARAMS_MAX) {
            cs_error(CELLSAM_ERR_LIMIT, "too many parameters");
            return NULL;
        }
        size_t cap = ps->cap ? ps->cap * 2 : 64;
        cs_tparam *items = realloc(ps->items, cap * sizeof *items);
        if (!items) {
            cs_error(CELLSAM_ERR_NOMEM, "out of memory registering parameters");
            return NULL;
        }
        ps->items = items;
        ps->cap = cap;
    }
    cs_tparam *p = &ps->items[ps->n];
    memset(p, 0, sizeof *p);
    p->name = strdup(name);
    p->w = cs_calloc(n, sizeof(float));
    p->g = cs_calloc(n, sizeof(float));
    if (!p->name || !p->w || !p->g) {
        free(p->name);
        cs_free(p->w);
        cs_free(p->g);
        cs_error(CELLSAM_ERR_NOMEM, "out of memory for parameter %s", name);
        return NULL;
    }
    p->ndim = ndim;
    for (int d = 0; d < ndim; d++) p->shape[d] = shape[d];
    p->n = n;
    /* Norms, biases and learned embeddings are not weight-decayed (as DETR/SAM recipes). */
    p->no_decay = ndim <= 1 || name_has(name, "pos_embed") || name_has(name, "rel_pos") ||
                  name_has(name, "token") || name_has(name, "point_embeddings") ||
                  name_has(name, "not_a_point") || name_has(name, "no_mask_embed") ||
                  name_has(name, "transformer.pattern") || name_has(name, "transformer.position");
    ps->n++;
    return p;
}

/* Linear search is fine: a few hundred parameters, looked up at setup only. */
cs_tparam *cs_tparams_find(const cs_tparams *ps, const char *name) {
    if (!ps || !name) return NULL;
    for (size_t i = 0; i < ps->n; i++)
        if (!strcmp(ps->items[i].name, name)) return &ps->items[i];
    return NULL;
}

size_t cs_tparams_count_values(const cs_tparams *ps, int trainable_only) {
    size_t total = 0;
    for (size_t i = 0; i < ps->n; i++)
        if (!trainable_only || !ps->items[i].frozen) total += ps->items[i].n;
    return total;
}

void cs_tparams_zero_grad(cs_tparams *ps) {
    for (size_t i = 0; i < ps->n; i++) memset(ps->items[i].g, 0, ps->items[i].n * sizeof(float));
}

int cs_tparams_set_frozen(cs_tparams *ps, const char *prefix, int frozen) {
    size_t len = strlen(prefix);
    int count = 0;
    for (size_t i = 0; i < ps->n; i++)
        if (!strncmp(ps->items[i].name, prefix, len)) {
            ps->items[i].frozen = frozen;
            count++;
        }
    return count;
}

int cs_tparams_load(cs_tparams *ps, const cs_weights *w, size_t *n_loaded, size_t *n_missing) {
    return cs_tparams_load_prefix(ps, w, NULL, n_loaded, n_missing);
}

int cs_tparams_load_prefix(cs_tparams *ps, const cs_weights *w, const char *prefix, size_t *n_loaded,
                           size_t *n_missing) {
    return cs_tparams_load_except(ps, w, prefix, NULL, n_loaded, n_missing);
}

int cs_tparams_load_except(cs_tparams *ps, const cs_weights *w, const char *prefix, const char *except,
                           size_t *n_loaded, size_t *n_missing) {
    size_t loaded = 0, missing = 0, plen = prefix ? strlen(prefix) : 0;
    for (size_t i = 0; i < ps->n; i++) {
        cs_tparam *p = &ps->items[i];
        if (plen && strncmp(p->name, prefix, plen)) continue;
        if (except && !strcmp(p->name, except)) continue;
        const cs_tensor_entry *e = cs_weights_find(w, p->name);
        if (!e) {
            missing++;
            continue;
        }
        int same = e->ndim == p->ndim;
        for (int d = 0; same && d < p->ndim; d++) same = e->shape[d] == p->shape[d];
        if (!same) {
            char got[96] = "", want[96] = "";
            for (int d = 0; d < e->ndim && d < 8; d++)
                snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? "," : "",
                         (long long)e->shape[d]);
            for (int d = 0; d < p->ndim; d++)
                snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", d ? "," : "",
                         (long long)p->shape[d]);
            return cs_error(CELLSAM_ERR_MODEL, "tensor %s has shape (%s), expected (%s)", p->name, got, want);
        }
        cs_tensor_to_f32(e, p->w); /* the same shape, so p->n values */
        loaded++;
    }
    if (n_loaded) *n_loaded = loaded;
    if (n_missing) *n_missing = missing;
    return CELLSAM_OK;
}

int cs_tparams_save(const cs_tparams *ps, const char *path, cs_dtype dtype, const char *const *meta) {
    cs_weights *w = cs_weights_new("safetensors");
    if (!w) return cs_error(CELLSAM_ERR_NOMEM, "out of memory saving %s", path);
    int rc = CELLSAM_OK;
    for (size_t i = 0; i < ps->n && rc == CELLSAM_OK; i++) {
        const cs_tparam *p = &ps->items[i];
        rc = cs_weights_add_view(w, p->name, CS_DTYPE_F32, p->ndim, p->shape, p->w, p->n * sizeof(float));
    }
    for (size_t i = 0; meta && meta[i] && meta[i + 1] && rc == CELLSAM_OK; i += 2)
        rc = cs_weights_set_meta(w, meta[i], meta[i + 1]);
    if (rc == CELLSAM_OK) rc = cs_weights_finish(w);
    if (rc == CELLSAM_OK) rc = cs_weights_save_safetensors(w, path, dtype);
    cs_weights_free(w);
    return rc;
}

/* ------------------------------------------------------------------ rng */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void cs_rng_seed(cs_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t cs_rng_u64(cs_rng *r) { /* xoshiro256** */
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double cs_rng_uniform(cs_rng *r) { return (double)(cs_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }

double cs_rng_normal(cs_rng *r) { /* Box-Muller; one value per call keeps the state simple */
    double u1 = cs_rng_uniform(r), u2 = cs_rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

void cs_init_trunc_normal(cs_tparam *p, cs_rng *r, float std) {
    for (size_t i = 0; i < p->n; i++) {
        double z;
        do z = cs_rng_normal(r);
        while (z < -2.0 || z > 2.0);
        p->w[i] = (float)(z * std);
    }
}

void cs_init_uniform(cs_tparam *p, cs_rng *r, float lo, float hi) {
    for (size_t i = 0; i < p->n; i++) p->w[i] = (float)(lo + (hi - lo) * cs_rng_uniform(r));
}

void cs_init_const(cs_tparam *p, float value) {
    for (size_t i = 0; i < p->n; i++) p->w[i] = value;
}

void cs_init_kaiming_uniform(cs_tparam *p, cs_rng *r) {
    size_t fan_in = p->ndim > 0 && p->shape[0] > 0 ? p->n / (size_t)p->shape[0] : p->n;
    float bound = fan_in ? 1.0f / sqrtf((float)fan_in) : 0.0f;
    cs_init_uniform(p, r, -bound, bound);
}

void cs_init_xavier_uniform(cs_tparam *p, cs_rng *r) {
    size_t fan_out = p->ndim > 0 ? (size_t)p->shape[0] : 1;
    size_t fan_in = fan_out ? p->n / fan_out : p->n;
    size_t receptive = 1;
    for (int d = 2; d < p->ndim; d++) receptive *= (size_t)p->shape[d];
    if (p->ndim >= 2) {
        fan_in = (size_t)p->shape[1] * receptive;
        fan_out = (size_t)p->shape[0] * receptive;
    }
    float bound = sqrtf(6.0f / (float)(fan_in + fan_out));
    cs_init_uniform(p, r, -bound, bound);
}
