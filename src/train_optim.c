/* AdamW (torch.optim.AdamW semantics), global-norm gradient clipping, learning-rate
 * schedules, and the optimiser state as safetensors for resuming a run. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "train.h"

/* Below this many elements a tensor is updated serially: thread start-up costs
 * more than the work. */
#define OPTIM_PAR_MIN ((size_t)1 << 15)
/* The squared-norm sum runs over fixed chunks summed in order, so the norm (and
 * therefore every update) does not depend on the thread count. */
#define OPTIM_NORM_CHUNK ((size_t)1 << 16)

/* Layout of the "adam.hparams" vector. Integers are split into hi * 2^24 + lo so
 * every value is exact in float32. */
enum {
    HP_VERSION = 0,
    HP_LR, HP_BETA1, HP_BETA2, HP_EPS, HP_WEIGHT_DECAY, HP_CLIP_NORM, HP_MIN_LR_RATIO,
    HP_STEP_GAMMA, HP_SCHEDULE,
    HP_WARMUP, /* hi, lo */
    HP_TOTAL = HP_WARMUP + 2,
    HP_STEP_EVERY = HP_TOTAL + 2,
    HP_COUNT = HP_STEP_EVERY + 2
};
#define OPTIM_STATE_VERSION 1
#define SPLIT_BASE 16777216.0 /* 2^24 */
/* Steps are stored as two float32 halves of 24 bits each. */
#define OPTIM_MAX_STEP ((int64_t)1 << 48)

cs_adamw_params cs_adamw_default_params(void) {
    cs_adamw_params p;
    memset(&p, 0, sizeof p);
    p.lr = 1e-4f;
    p.beta1 = 0.9f;
    p.beta2 = 0.999f;
    p.eps = 1e-8f;
    p.weight_decay = 1e-4f;
    p.clip_norm = 0.1f; /* DETR's max_norm */
    p.warmup_steps = 0;
    p.total_steps = 0;  /* the trainer sets it; cosine without a horizon stays at lr */
    p.schedule = CS_SCHED_COSINE;
    p.min_lr_ratio = 0.01f;
    p.step_every = 0;
    p.step_gamma = 0.1f;
    return p;
}

void cs_adamw_init(cs_adamw *opt, const cs_adamw_params *p) {
    memset(opt, 0, sizeof *opt);
    opt->p = p ? *p : cs_adamw_default_params();
    opt->step = 0;
}

float cs_adamw_lr_at(const cs_adamw_params *p, int64_t step) {
    double lr = p->lr;
    if (step < 0) step = 0;
    if (p->warmup_steps > 0 && step < p->warmup_steps)
        return (float)(lr * (double)(step + 1) / (double)p->warmup_steps);
    int64_t warm = p->warmup_steps > 0 ? p->warmup_steps : 0;
    int64_t after = step - warm;
    switch (p->schedule) {
    case CS_SCHED_COSINE: {
        int64_t span = (int64_t)p->total_steps - warm;
        if (span <= 0) return (float)lr; /* no horizon known */
        double progress = (double)after / (double)span;
        if (progress > 1.0) progress = 1.0;
        double floor_ratio = p->min_lr_ratio;
        return (float)(lr * (floor_ratio + (1.0 - floor_ratio) * 0.5 * (1.0 + cos(3.14159265358979323846 * progress))));
    }
    case CS_SCHED_STEP:
        if (p->step_every <= 0) return (float)lr;
        return (float)(lr * pow((double)p->step_gamma, (double)(after / p->step_every)));
    case CS_SCHED_CONSTANT:
    default:
        return (float)lr;
    }
}

static int trainable(const cs_tparam *p) { return !p->frozen && p->g && p->w && p->n > 0; }

/* Sum of squares of x in double, deterministic for any thread count. */
static double sum_squares(const float *x, size_t n) {
    if (n < OPTIM_PAR_MIN) {
        double s = 0.0;
        for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
        return s;
    }
    size_t chunks = (n + OPTIM_NORM_CHUNK - 1) / OPTIM_NORM_CHUNK;
    double *part = malloc(chunks * sizeof *part);
    if (!part) { /* serial fallback: same value up to rounding, no failure path */
        double s = 0.0;
        for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
        return s;
    }
    long long nc = (long long)chunks;
#pragma omp parallel for schedule(static)
    for (long long c = 0; c < nc; c++) {
        size_t lo = (size_t)c * OPTIM_NORM_CHUNK;
        size_t hi = lo + OPTIM_NORM_CHUNK < n ? lo + OPTIM_NORM_CHUNK : n;
        double s = 0.0;
        for (size_t i = lo; i < hi; i++) s += (double)x[i] * x[i];
        part[c] = s;
    }
    double s = 0.0;
    for (size_t c = 0; c < chunks; c++) s += part[c];
    free(part);
    return s;
}

static void scale_values(float *x, size_t n, float scale) {
    long long nn = (long long)n;
#pragma omp parallel for schedule(static) if (n >= OPTIM_PAR_MIN)
    for (long long i = 0; i < nn; i++) x[i] *= scale;
}

/* One tensor's AdamW update, in the order of torch's single-tensor AdamW:
 * w *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2 v + (1-b2) g^2;
 * w -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps). */
static void adamw_update(cs_tparam *p, float decay_factor, float one_m_b1, float beta2, float one_m_b2,
                         float step_size, float sqrt_bc2, float eps) {
    float *w = p->w, *m = p->m, *v = p->v;
    const float *g = p->g;
    long long nn = (long long)p->n;
#pragma omp parallel for schedule(static) if (p->n >= OPTIM_PAR_MIN)
    for (long long i = 0; i < nn; i++) {
        float gi = g[i];
        float mi = m[i] + one_m_b1 * (gi - m[i]);
        float vi = beta2 * v[i] + one_m_b2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float wi = w[i] * decay_factor;
        w[i] = wi - step_size * mi / (sqrtf(vi) / sqrt_bc2 + eps);
    }
}

int cs_adamw_step(cs_adamw *opt, cs_tparams *ps, float *grad_norm) {
    if (grad_norm) *grad_norm = 0.0f;
    if (!opt || !ps) return cs_error(CELLSAM_ERR_INVALID, "cs_adamw_step: NULL argument");
    const cs_adamw_params *hp = &opt->p;
    if (!(hp->beta1 >= 0.0f && hp->beta1 < 1.0f && hp->beta2 >= 0.0f && hp->beta2 < 1.0f &&
          hp->eps > 0.0f && isfinite(hp->lr) && isfinite(hp->weight_decay) && isfinite(hp->eps)))
        return cs_error(CELLSAM_ERR_INVALID, "AdamW: invalid hyper-parameters (betas in [0,1), eps > 0)");
    if (opt->step < 0 || opt->step >= OPTIM_MAX_STEP - 1)
        return cs_error(CELLSAM_ERR_LIMIT, "AdamW: step counter %lld out of range", (long long)opt->step);

    /* Global L2 norm over trainable gradients; the first non-finite tensor is named. */
    double sq = 0.0;
    for (size_t i = 0; i < ps->n; i++) {
        cs_tparam *p = &ps->items[i];
        if (!trainable(p)) continue;
        double s = sum_squares(p->g, p->n);
        if (!isfinite(s))
            return cs_error(CELLSAM_ERR_INVALID, "AdamW: non-finite gradient in %s; step skipped",
                            p->name ? p->name : "?");
        sq += s;
    }
    double norm = sqrt(sq);
    if (!isfinite(norm))
        return cs_error(CELLSAM_ERR_INVALID, "AdamW: non-finite gradient norm; step skipped");
    if (grad_norm) *grad_norm = (float)norm;

    /* Moments first, so an allocation failure leaves parameters untouched. */
    for (size_t i = 0; i < ps->n; i++) {
        cs_tparam *p = &ps->items[i];
        if (!trainable(p)) continue;
        if (!p->m) p->m = cs_calloc(p->n, sizeof(float));
        if (!p->v) p->v = cs_calloc(p->n, sizeof(float));
        if (!p->m || !p->v)
            return cs_error(CELLSAM_ERR_NOMEM, "AdamW: out of memory for the moments of %s", p->name);
    }

    /* clip_grad_norm_: scale in place by clip / (norm + 1e-6) when that is below 1. */
    if (hp->clip_norm > 0.0f) {
        double coef = (double)hp->clip_norm / (norm + 1e-6);
        if (coef < 1.0)
            for (size_t i = 0; i < ps->n; i++)
                if (trainable(&ps->items[i])) scale_values(ps->items[i].g, ps->items[i].n, (float)coef);
    }

    double lr = cs_adamw_lr_at(hp, opt->step);
    double t = (double)(opt->step + 1);
    double bc1 = 1.0 - pow((double)hp->beta1, t);
    double bc2 = 1.0 - pow((double)hp->beta2, t);
    float step_size = (float)(lr / bc1);
    float sqrt_bc2 = (float)sqrt(bc2);
    /* 1 - beta in double, rounded once (as torch does with its Python-float betas). */
    float one_m_b1 = (float)(1.0 - (double)hp->beta1), one_m_b2 = (float)(1.0 - (double)hp->beta2);
    for (size_t i = 0; i < ps->n; i++) {
        cs_tparam *p = &ps->items[i];
        if (!trainable(p)) continue;
        float decay = p->no_decay ? 1.0f : (float)(1.0 - lr * (double)hp->weight_decay);
        adamw_update(p, decay, one_m_b1, hp->beta2, one_m_b2, step_size, sqrt_bc2, hp->eps);
    }
    opt->step++;
    return CELLSAM_OK;
}

/* ------------------------------------------------------------ save / load */

static void split_int(int64_t v, float *hi, float *lo) {
    double h = floor((double)v / SPLIT_BASE);
    *hi = (float)h;
    *lo = (float)((double)v - h * SPLIT_BASE);
}

/* Inverse of split_int; fails unless both halves are exact integers in range. */
static int join_int(float hi, float lo, int64_t min, int64_t max, int64_t *out) {
    if (!isfinite(hi) || !isfinite(lo) || hi != floorf(hi) || lo != floorf(lo) || lo < 0.0f ||
        (double)lo >= SPLIT_BASE || fabs((double)hi) >= SPLIT_BASE)
        return -1;
    double v = (double)hi * SPLIT_BASE + (double)lo;
    if (v < (double)min || v > (double)max) return -1;
    *out = (int64_t)v;
    return 0;
}

static char *moment_name(const char *kind, const char *name) {
    size_t a = strlen(kind), b = strlen(name);
    char *s = malloc(a + b + 1);
    if (!s) return NULL;
    memcpy(s, kind, a);
    memcpy(s + a, name, b + 1);
    return s;
}

/* Moments are saved for every trainable parameter (zeros before the first step)
 * and for any frozen one that already has moments (frozen after training). */
static int saves_moments(const cs_tparam *p) { return trainable(p) || (p->m && p->v); }

int cs_adamw_save(const cs_adamw *opt, const cs_tparams *ps, const char *path) {
    if (!opt || !ps || !path) return cs_error(CELLSAM_ERR_INVALID, "cs_adamw_save: NULL argument");
    if (opt->step < 0 || opt->step >= OPTIM_MAX_STEP)
        return cs_error(CELLSAM_ERR_LIMIT, "AdamW: step counter %lld cannot be saved", (long long)opt->step);
    float step_hl[2], hp[HP_COUNT];
    split_int(opt->step, &step_hl[0], &step_hl[1]);
    const cs_adamw_params *p = &opt->p;
    hp[HP_VERSION] = OPTIM_STATE_VERSION;
    hp[HP_LR] = p->lr;
    hp[HP_BETA1] = p->beta1;
    hp[HP_BETA2] = p->beta2;
    hp[HP_EPS] = p->eps;
    hp[HP_WEIGHT_DECAY] = p->weight_decay;
    hp[HP_CLIP_NORM] = p->clip_norm;
    hp[HP_MIN_LR_RATIO] = p->min_lr_ratio;
    hp[HP_STEP_GAMMA] = p->step_gamma;
    hp[HP_SCHEDULE] = (float)p->schedule;
    split_int(p->warmup_steps, &hp[HP_WARMUP], &hp[HP_WARMUP + 1]);
    split_int(p->total_steps, &hp[HP_TOTAL], &hp[HP_TOTAL + 1]);
    split_int(p->step_every, &hp[HP_STEP_EVERY], &hp[HP_STEP_EVERY + 1]);

    /* One shared zero buffer stands in for moments not allocated yet. */
    size_t zero_n = 0;
    for (size_t i = 0; i < ps->n; i++) {
        const cs_tparam *q = &ps->items[i];
        if (saves_moments(q) && (!q->m || !q->v) && q->n > zero_n) zero_n = q->n;
    }
    float *zeros = NULL;
    if (zero_n && !(zeros = cs_calloc(zero_n, sizeof(float))))
        return cs_error_prefix(CELLSAM_ERR_NOMEM, "saving %s", path);

    cs_weights *w = cs_weights_new("safetensors");
    if (!w) {
        cs_free(zeros);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory saving %s", path);
    }
    int64_t two = 2, hp_count = HP_COUNT;
    int rc = cs_weights_add_view(w, "adam.step", CS_DTYPE_F32, 1, &two, step_hl, sizeof step_hl);
    if (!rc) rc = cs_weights_add_view(w, "adam.hparams", CS_DTYPE_F32, 1, &hp_count, hp, sizeof hp);
    for (size_t i = 0; i < ps->n && !rc; i++) {
        const cs_tparam *q = &ps->items[i];
        if (!saves_moments(q)) continue;
        for (int k = 0; k < 2 && !rc; k++) {
            const float *data = k == 0 ? q->m : q->v;
            char *name = moment_name(k == 0 ? "adam_m." : "adam_v.", q->name);
            if (!name) {
                rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory saving %s", path);
                break;
            }
            rc = cs_weights_add_view(w, name, CS_DTYPE_F32, q->ndim, q->shape, data ? data : zeros,
                                     q->n * sizeof(float));
            free(name);
        }
    }
    if (!rc) rc = cs_weights_finish(w);
    if (!rc) rc = cs_weights_save_safetensors(w, path, CS_DTYPE_F32);
    cs_weights_free(w);
    cs_free(zeros);
    return rc;
}

static int same_shape(const cs_tensor_entry *e, const cs_tparam *p) {
    if (e->ndim != p->ndim) return 0;
    for (int d = 0; d < p->ndim; d++)
        if (e->shape[d] != p->shape[d]) return 0;
    return 1;
}

static void shape_str(char *buf, size_t cap, int ndim, const int64_t *shape) {
    buf[0] = '\0';
    for (int d = 0; d < ndim && d < CS_MAX_DIMS; d++) {
        size_t len = strlen(buf);
        snprintf(buf + len, cap - len, "%s%lld", d ? "," : "", (long long)shape[d]);
    }
}

/* Read a float32 vector entry of exactly n elements. */
static int read_f32_vector(const cs_weights *w, const char *name, const char *path, float *out, size_t n) {
    const cs_tensor_entry *e = cs_weights_find(w, name);
    if (!e)
        return cs_error(CELLSAM_ERR_FORMAT, "%s is not an AdamW optimiser state (no %s tensor)", path, name);
    if (e->dtype != CS_DTYPE_F32 || e->ndim != 1 || e->shape[0] != (int64_t)n || e->nbytes != n * 4)
        return cs_error(CELLSAM_ERR_FORMAT, "%s: %s must be a float32 vector of %zu values", path, name, n);
    memcpy(out, e->data, n * 4);
    return CELLSAM_OK;
}

static int decode_hparams(const float *hp, const char *path, cs_adamw_params *p) {
    if (hp[HP_VERSION] != OPTIM_STATE_VERSION)
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "%s: optimiser state version %g (expected %d)", path,
                        (double)hp[HP_VERSION], OPTIM_STATE_VERSION);
    for (int i = 0; i < HP_COUNT; i++)
        if (!isfinite(hp[i])) return cs_error(CELLSAM_ERR_FORMAT, "%s: non-finite hyper-parameter", path);
    memset(p, 0, sizeof *p);
    p->lr = hp[HP_LR];
    p->beta1 = hp[HP_BETA1];
    p->beta2 = hp[HP_BETA2];
    p->eps = hp[HP_EPS];
    p->weight_decay = hp[HP_WEIGHT_DECAY];
    p->clip_norm = hp[HP_CLIP_NORM];
    p->min_lr_ratio = hp[HP_MIN_LR_RATIO];
    p->step_gamma = hp[HP_STEP_GAMMA];
    float sched = hp[HP_SCHEDULE];
    if (sched != CS_SCHED_CONSTANT && sched != CS_SCHED_COSINE && sched != CS_SCHED_STEP)
        return cs_error(CELLSAM_ERR_FORMAT, "%s: unknown schedule %g", path, (double)sched);
    p->schedule = (cs_schedule_kind)(int)sched;
    int64_t warm, total, every;
    if (join_int(hp[HP_WARMUP], hp[HP_WARMUP + 1], -2147483647 - 1, 2147483647, &warm) ||
        join_int(hp[HP_TOTAL], hp[HP_TOTAL + 1], -2147483647 - 1, 2147483647, &total) ||
        join_int(hp[HP_STEP_EVERY], hp[HP_STEP_EVERY + 1], -2147483647 - 1, 2147483647, &every))
        return cs_error(CELLSAM_ERR_FORMAT, "%s: malformed integer hyper-parameter", path);
    p->warmup_steps = (int)warm;
    p->total_steps = (int)total;
    p->step_every = (int)every;
    if (!(p->beta1 >= 0.0f && p->beta1 < 1.0f && p->beta2 >= 0.0f && p->beta2 < 1.0f && p->eps > 0.0f))
        return cs_error(CELLSAM_ERR_FORMAT, "%s: invalid AdamW hyper-parameters", path);
    return CELLSAM_OK;
}

/* Check one moment entry of parameter p: present (unless optional), float32, same
 * shape, finite (and >= 0 for the second moment). Sets *found. */
static int check_moment(const cs_weights *w, const char *path, int second, const cs_tparam *p,
                        int optional, const cs_tensor_entry **found) {
    const char *kind = second ? "adam_v." : "adam_m.";
    *found = NULL;
    char *name = moment_name(kind, p->name);
    if (!name) return cs_error(CELLSAM_ERR_NOMEM, "out of memory loading %s", path);
    const cs_tensor_entry *e = cs_weights_find(w, name);
    int rc = CELLSAM_OK;
    if (!e) {
        if (!optional)
            rc = cs_error(CELLSAM_ERR_MODEL, "%s: optimiser state lacks %s", path, name);
    } else if (!same_shape(e, p)) {
        char got[160], want[160];
        shape_str(got, sizeof got, e->ndim, e->shape);
        shape_str(want, sizeof want, p->ndim, p->shape);
        rc = cs_error(CELLSAM_ERR_MODEL, "%s: tensor %s has shape (%s), expected (%s)", path, name, got, want);
    } else if (e->dtype != CS_DTYPE_F32 || e->nbytes != p->n * sizeof(float)) {
        rc = cs_error(CELLSAM_ERR_FORMAT, "%s: tensor %s is not float32", path, name);
    } else {
        const unsigned char *src = e->data;
        for (size_t k = 0; k < p->n; k++) {
            float f;
            memcpy(&f, src + 4 * k, 4);
            if (!isfinite(f) || (second && f < 0.0f)) {
                rc = cs_error(CELLSAM_ERR_FORMAT, "%s: tensor %s holds an invalid value at %zu", path, name, k);
                break;
            }
        }
        if (!rc) *found = e;
    }
    free(name);
    return rc;
}

int cs_adamw_load(cs_adamw *opt, cs_tparams *ps, const char *path) {
    if (!opt || !ps || !path) return cs_error(CELLSAM_ERR_INVALID, "cs_adamw_load: NULL argument");
    cs_weights *w = NULL;
    int rc = cs_weights_open(path, &w);
    if (rc) return rc;

    float step_hl[2], hp[HP_COUNT];
    cs_adamw_params params;
    int64_t step = 0;
    rc = read_f32_vector(w, "adam.step", path, step_hl, 2);
    if (!rc) rc = read_f32_vector(w, "adam.hparams", path, hp, HP_COUNT);
    if (!rc && join_int(step_hl[0], step_hl[1], 0, OPTIM_MAX_STEP - 1, &step))
        rc = cs_error(CELLSAM_ERR_FORMAT, "%s: malformed adam.step", path);
    if (!rc) rc = decode_hparams(hp, path, &params);

    /* Every moment tensor in the file must belong to a parameter of ps. */
    for (size_t i = 0; i < cs_weights_count(w) && !rc; i++) {
        const cs_tensor_entry *e = cs_weights_at(w, i);
        if (!strcmp(e->name, "adam.step") || !strcmp(e->name, "adam.hparams")) continue;
        const char *pname = NULL;
        if (!strncmp(e->name, "adam_m.", 7) || !strncmp(e->name, "adam_v.", 7)) pname = e->name + 7;
        if (!pname)
            rc = cs_error(CELLSAM_ERR_FORMAT, "%s: unexpected tensor %s in an optimiser state", path, e->name);
        else if (!cs_tparams_find(ps, pname))
            rc = cs_error(CELLSAM_ERR_MODEL, "%s: tensor %s belongs to no parameter of the model", path, e->name);
    }

    /* Validate everything and allocate missing moment buffers before changing any
     * state, so a failed load leaves the optimiser and parameters as they were. */
    const cs_tensor_entry **src = NULL;
    float **fresh = NULL;
    if (!rc) {
        src = calloc(ps->n ? 2 * ps->n : 1, sizeof *src);
        fresh = calloc(ps->n ? 2 * ps->n : 1, sizeof *fresh);
        if (!src || !fresh) rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory loading %s", path);
    }
    for (size_t i = 0; i < ps->n && !rc; i++) {
        const cs_tparam *p = &ps->items[i];
        int optional = !trainable(p);
        rc = check_moment(w, path, 0, p, optional, &src[2 * i]);
        if (!rc) rc = check_moment(w, path, 1, p, optional, &src[2 * i + 1]);
        if (!rc && (!src[2 * i]) != (!src[2 * i + 1]))
            rc = cs_error(CELLSAM_ERR_MODEL, "%s: only one of the two moments of %s is present", path, p->name);
        for (int k = 0; k < 2 && !rc; k++) {
            float *have = k == 0 ? p->m : p->v;
            if (src[2 * i + k] && !have && !(fresh[2 * i + k] = cs_alloc(p->n, sizeof(float))))
                rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory for the moments of %s", p->name);
        }
    }
    if (!rc) {
        for (size_t i = 0; i < ps->n; i++) {
            cs_tparam *p = &ps->items[i];
            for (int k = 0; k < 2; k++) {
                float **dst = k == 0 ? &p->m : &p->v;
                if (fresh[2 * i + k]) *dst = fresh[2 * i + k];
                if (src[2 * i + k]) memcpy(*dst, src[2 * i + k]->data, p->n * sizeof(float));
                else if (*dst) memset(*dst, 0, p->n * sizeof(float)); /* frozen, not in the file */
            }
        }
        opt->p = params;
        opt->step = step;
    } else if (fresh) {
        for (size_t i = 0; i < 2 * ps->n; i++) cs_free(fresh[i]);
    }
    free(src);
    free(fresh);
    cs_weights_free(w);
    return rc;
}
