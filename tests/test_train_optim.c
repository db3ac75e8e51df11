/* AdamW optimiser: the update against the torch.optim.AdamW formula evaluated in
 * double, weight-decay exclusions, gradient clipping, learning-rate schedules,
 * convergence on a quadratic, non-finite gradients, and resuming from a saved
 * optimiser state (bit-identical to an uninterrupted run) with its error paths. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "testutil.h"
#include "train.h"

static cs_tparam *add1(cs_tparams *ps, const char *name, int64_t n) {
    cs_tparam *p = cs_tparams_add(ps, name, 1, &n);
    assert_non_null(p);
    return p;
}

static cs_tparam *add2(cs_tparams *ps, const char *name, int64_t a, int64_t b) {
    int64_t shape[2] = {a, b};
    cs_tparam *p = cs_tparams_add(ps, name, 2, shape);
    assert_non_null(p);
    return p;
}

static double rel_err(double got, double ref) {
    double d = fabs(got - ref), s = fabs(ref);
    return d / (s > 1e-30 ? s : 1e-30);
}

static cs_adamw_params plain_params(float lr, float wd) {
    cs_adamw_params p = cs_adamw_default_params();
    p.lr = lr;
    p.weight_decay = wd;
    p.clip_norm = 0.0f;
    p.schedule = CS_SCHED_CONSTANT;
    return p;
}

/* torch.optim.AdamW single-tensor step in double. */
typedef struct { double w[3], m[3], v[3]; } ref_state;
static void ref_adamw(ref_state *s, const double *g, int t, double lr, double b1, double b2, double eps,
                      double wd) {
    double bc1 = 1.0 - pow(b1, t), bc2 = 1.0 - pow(b2, t);
    for (int i = 0; i < 3; i++) {
        s->w[i] *= 1.0 - lr * wd;
        s->m[i] = b1 * s->m[i] + (1.0 - b1) * g[i];
        s->v[i] = b2 * s->v[i] + (1.0 - b2) * g[i] * g[i];
        double denom = sqrt(s->v[i]) / sqrt(bc2) + eps;
        s->w[i] -= lr / bc1 * s->m[i] / denom;
    }
}

static void test_step_matches_torch_formula(void **state) {
    (void)state;
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_tparam *dec = add2(&ps, "layer.weight", 1, 3); /* 2-D: decayed */
    cs_tparam *nod = add1(&ps, "layer.bias", 3);      /* 1-D: no_decay */
    assert_int_equal(dec->no_decay, 0);
    assert_int_equal(nod->no_decay, 1);
    const double w0[3] = {0.8, -1.3, 0.45};
    const double grads[3][3] = {{0.3, -0.02, 1.5}, {-0.1, 0.04, 0.7}, {0.25, 1e-4, -2.0}};
    /* The reference takes the float32 hyper-parameters the optimiser holds, in double. */
    const double lr = (float)0.05, wd = (float)0.2, b1 = (float)0.9, b2 = (float)0.999, eps = (float)1e-8;
    ref_state rd, rn;
    memset(&rd, 0, sizeof rd);
    memset(&rn, 0, sizeof rn);
    for (int i = 0; i < 3; i++) {
        dec->w[i] = nod->w[i] = (float)w0[i];
        rd.w[i] = rn.w[i] = (double)(float)w0[i];
    }
    cs_adamw_params hp = plain_params((float)lr, (float)wd);
    cs_adamw opt;
    cs_adamw_init(&opt, &hp);
    double max_w = 0, max_m = 0, max_v = 0, max_delta = 0;
    for (int t = 1; t <= 3; t++) {
        double gf[3], prev_d[3], prev_n[3];
        for (int i = 0; i < 3; i++) {
            dec->g[i] = nod->g[i] = (float)grads[t - 1][i];
            gf[i] = (double)(float)grads[t - 1][i];
            prev_d[i] = rd.w[i];
            prev_n[i] = rn.w[i];
        }
        float norm = -1;
        assert_int_equal(cs_adamw_step(&opt, &ps, &norm), 0);
        assert_int_equal(opt.step, t);
        double sq = 0;
        for (int i = 0; i < 3; i++) sq += 2 * gf[i] * gf[i];
        assert_true(rel_err(norm, sqrt(sq)) < 1e-6);
        ref_adamw(&rd, gf, t, lr, b1, b2, eps, wd);
        ref_adamw(&rn, gf, t, lr, b1, b2, eps, 0.0);
        for (int i = 0; i < 3; i++) {
            max_w = fmax(max_w, fmax(rel_err(dec->w[i], rd.w[i]), rel_err(nod->w[i], rn.w[i])));
            max_m = fmax(max_m, fmax(rel_err(dec->m[i], rd.m[i]), rel_err(nod->m[i], rn.m[i])));
            max_v = fmax(max_v, fmax(rel_err(dec->v[i], rd.v[i]), rel_err(nod->v[i], rn.v[i])));
            /* The update itself, as a fraction of lr (its natural scale; tighter than w). */
            max_delta = fmax(max_delta, fabs(((double)dec->w[i] - prev_d[i]) - (rd.w[i] - prev_d[i])) / lr);
            max_delta = fmax(max_delta, fabs(((double)nod->w[i] - prev_n[i]) - (rn.w[i] - prev_n[i])) / lr);
            /* Keep the float state as the reference's start so errors do not compound. */
            rd.w[i] = dec->w[i];
            rn.w[i] = nod->w[i];
        }
        cs_tparams_zero_grad(&ps);
    }
    printf("adamw vs torch formula (double): max rel err w %.3g m %.3g v %.3g (tol 1e-6), update err / lr %.3g (tol 1e-5)\n",
           max_w, max_m, max_v, max_delta);
    assert_true(max_w < 1e-6);
    assert_true(max_m < 1e-6);
    assert_true(max_v < 1e-6);
    assert_true(max_delta < 1e-5);
    cs_tparams_free(&ps);
}

static void test_weight_decay_exclusions(void **state) {
    (void)state;
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_tparam *dec = add2(&ps, "blk.weight", 2, 2);
    cs_tparam *nod = add1(&ps, "blk.norm.weight", 4);
    cs_tparam *frz = add2(&ps, "frozen.weight", 2, 2);
    frz->frozen = 1;
    for (int i = 0; i < 4; i++) {
        dec->w[i] = nod->w[i] = frz->w[i] = 1.0f + (float)i;
        frz->g[i] = 3.0f; /* a frozen gradient must change nothing */
    }
    /* Zero gradients: Adam's term is exactly 0, so only decay can move a weight. */
    cs_adamw_params hp = plain_params(0.1f, 0.5f);
    cs_adamw opt;
    cs_adamw_init(&opt, &hp);
    float norm = -1;
    assert_int_equal(cs_adamw_step(&opt, &ps, &norm), 0);
    assert_true(norm == 0.0f); /* frozen gradients are not counted */
    const float factor = (float)(1.0 - 0.1 * 0.5);
    for (int i = 0; i < 4; i++) {
        assert_true(fabsf(dec->w[i] - (1.0f + (float)i) * factor) <= 1e-6f * (1.0f + (float)i));
        assert_true(nod->w[i] == 1.0f + (float)i);
        assert_true(frz->w[i] == 1.0f + (float)i);
        assert_true(frz->g[i] == 3.0f);
    }
    assert_null(frz->m);
    assert_null(frz->v);
    assert_non_null(dec->m);
    cs_tparams_free(&ps);
}

static double trainable_grad_norm(const cs_tparams *ps) {
    double s = 0;
    for (size_t i = 0; i < ps->n; i++)
        if (!ps->items[i].frozen)
            for (size_t k = 0; k < ps->items[i].n; k++) s += (double)ps->items[i].g[k] * ps->items[i].g[k];
    return sqrt(s);
}

static void test_clipping(void **state) {
    (void)state;
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_tparam *a = add1(&ps, "a.bias", 2);
    cs_tparam *b = add2(&ps, "b.weight", 1, 1);
    cs_tparam *f = add1(&ps, "f.bias", 1);
    f->frozen = 1;
    a->g[0] = 3.0f;
    a->g[1] = 0.0f;
    b->g[0] = -4.0f; /* norm 5 */
    f->g[0] = 100.0f;
    cs_adamw_params hp = plain_params(0.01f, 0.0f);
    hp.clip_norm = 1.0f;
    cs_adamw opt;
    cs_adamw_init(&opt, &hp);
    float norm = -1;
    assert_int_equal(cs_adamw_step(&opt, &ps, &norm), 0);
    double after = trainable_grad_norm(&ps);
    printf("clipping: norm before %.7g (expected 5), after %.9g (expected 5/(5+1e-6))\n", norm, after);
    assert_true(fabs(norm - 5.0) < 1e-6);
    assert_true(fabs(after - 5.0 / (5.0 + 1e-6)) < 1e-6);
    assert_true(f->g[0] == 100.0f);
    /* The moments saw the clipped gradient. */
    assert_true(fabs(a->m[0] - 0.1 * 3.0 / 5.0) < 1e-7);
    assert_true(fabs(b->m[0] + 0.1 * 4.0 / 5.0) < 1e-7);

    /* Below the threshold nothing is scaled. */
    a->g[0] = 0.3f;
    a->g[1] = 0.0f;
    b->g[0] = -0.4f;
    assert_int_equal(cs_adamw_step(&opt, &ps, &norm), 0);
    assert_true(a->g[0] == 0.3f && b->g[0] == -0.4f);
    assert_true(fabs(norm - 0.5) < 1e-6);
    cs_tparams_free(&ps);
}

static void check_lr(const cs_adamw_params *p, int64_t step, double expected, double *max_err) {
    float got = cs_adamw_lr_at(p, step);
    double e = rel_err(got, expected);
    if (e > *max_err) *max_err = e;
    if (e > 1e-6) fail_msg("lr at step %lld: %.9g, expected %.9g", (long long)step, got, expected);
}

static void test_schedules(void **state) {
    (void)state;
    double max_err = 0;
    const double lr = 1e-3, mn = 0.01;
    cs_adamw_params p = cs_adamw_default_params();
    p.lr = (float)lr;
    p.min_lr_ratio = (float)mn;
    p.warmup_steps = 10;
    p.total_steps = 110;
    p.schedule = CS_SCHED_COSINE;
    check_lr(&p, 0, lr / 10, &max_err);
    check_lr(&p, 4, lr * 5 / 10, &max_err);
    check_lr(&p, 9, lr, &max_err);
    check_lr(&p, 10, lr, &max_err);
    check_lr(&p, 60, (1 + mn) / 2 * lr, &max_err);       /* cosine midpoint */
    check_lr(&p, 35, lr * (mn + (1 - mn) * 0.5 * (1 + cos(M_PI * 0.25))), &max_err);
    check_lr(&p, 110, lr * mn, &max_err);                 /* end */
    check_lr(&p, 5000, lr * mn, &max_err);                /* stays at the floor */
    p.total_steps = 5; /* no horizon beyond the warm-up: constant after it */
    check_lr(&p, 20, lr, &max_err);

    p.schedule = CS_SCHED_STEP;
    p.step_every = 30;
    p.step_gamma = 0.1f;
    check_lr(&p, 3, lr * 4 / 10, &max_err);
    check_lr(&p, 39, lr, &max_err);
    check_lr(&p, 40, lr * 0.1, &max_err);
    check_lr(&p, 70, lr * 0.01, &max_err);
    p.step_every = 0; /* off */
    check_lr(&p, 1000, lr, &max_err);

    p.schedule = CS_SCHED_CONSTANT;
    p.warmup_steps = 0;
    check_lr(&p, 0, lr, &max_err);
    check_lr(&p, 123456789, lr, &max_err);

    cs_adamw_params d = cs_adamw_default_params();
    assert_true(d.lr == 1e-4f && d.beta1 == 0.9f && d.beta2 == 0.999f && d.eps == 1e-8f);
    assert_true(d.weight_decay == 1e-4f && d.clip_norm == 0.1f && d.schedule == CS_SCHED_COSINE);
    printf("schedules: max rel err %.3g (tol 1e-6)\n", max_err);
}

static void test_quadratic_converges(void **state) {
    (void)state;
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_tparam *x = add2(&ps, "x.weight", 2, 4);
    const double a[8] = {1, 10, 0.1, 3, 0.5, 2, 7, 0.3}; /* condition number 100 */
    const double c[8] = {1, -2, 0.5, 3, -0.7, 0, 2.5, -1};
    cs_adamw_params hp = plain_params(0.05f, 0.0f);
    hp.schedule = CS_SCHED_COSINE;
    hp.total_steps = 600;
    hp.min_lr_ratio = 0.001f;
    cs_adamw opt;
    cs_adamw_init(&opt, &hp);
    double f0 = 0, f = 0, max_dev = 0;
    for (int i = 0; i < 8; i++) f0 += 0.5 * a[i] * c[i] * c[i];
    for (int t = 0; t < 600; t++) {
        for (int i = 0; i < 8; i++) x->g[i] = (float)(a[i] * (x->w[i] - c[i]));
        assert_int_equal(cs_adamw_step(&opt, &ps, NULL), 0);
    }
    for (int i = 0; i < 8; i++) {
        f += 0.5 * a[i] * (x->w[i] - c[i]) * (x->w[i] - c[i]);
        max_dev = fmax(max_dev, fabs(x->w[i] - c[i]));
    }
    printf("quadratic: f %.3g -> %.3g after 600 steps, max |x-c| %.3g (tol 1e-2)\n", f0, f, max_dev);
    assert_true(f < 1e-6 * f0);
    assert_true(max_dev < 1e-2);
    cs_tparams_free(&ps);
}

static void test_nonfinite_gradient(void **state) {
    (void)state;
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_tparam *a = add2(&ps, "ok.weight", 2, 2);
    cs_tparam *b = add1(&ps, "bad.bias", 3);
    cs_adamw_params hp = plain_params(0.1f, 0.1f);
    cs_adamw opt;
    cs_adamw_init(&opt, &hp);
    for (int i = 0; i < 4; i++) a->w[i] = a->g[i] = 0.5f + (float)i;
    for (int i = 0; i < 3; i++) b->w[i] = b->g[i] = 1.0f;
    assert_int_equal(cs_adamw_step(&opt, &ps, NULL), 0);
    float wa[4], ma[4], va[4], wb[3], ga[4];
    memcpy(wa, a->w, sizeof wa);
    memcpy(ma, a->m, sizeof ma);
    memcpy(va, a->v, sizeof va);
    memcpy(wb, b->w, sizeof wb);
    memcpy(ga, a->g, sizeof ga);
    const float bad[2] = {NAN, INFINITY};
    for (int k = 0; k < 2; k++) {
        b->g[1] = bad[k];
        float norm = 1;
        assert_int_equal(cs_adamw_step(&opt, &ps, &norm), CELLSAM_ERR_INVALID);
        assert_non_null(strstr(cellsam_last_error(), "bad.bias"));
        assert_int_equal(opt.step, 1);
        assert_memory_equal(a->w, wa, sizeof wa);
        assert_memory_equal(a->m, ma, sizeof ma);
        assert_memory_equal(a->v, va, sizeof va);
        assert_memory_equal(a->g, ga, sizeof ga); /* not clipped either */
        assert_memory_equal(b->w, wb, sizeof wb);
    }
    /* A NaN in a frozen parameter's gradient is ignored. */
    b->frozen = 1;
    assert_int_equal(cs_adamw_step(&opt, &ps, NULL), 0);
    assert_int_equal(opt.step, 2);
    cs_tparams_free(&ps);
}

/* ------------------------------------------------------------ resume */

#define BIG_N 40000 /* above the size where updates run multi-threaded */

static void build_store(cs_tparams *ps) {
    cs_tparams_init(ps);
    cs_tparam *w = add2(ps, "enc.proj.weight", 200, 200);
    cs_tparam *b = add1(ps, "enc.proj.bias", 5);
    cs_tparam *f = add2(ps, "head.frozen.weight", 2, 3);
    f->frozen = 1;
    assert_int_equal((int)w->n, BIG_N);
    cs_rng r;
    cs_rng_seed(&r, 7);
    cs_init_trunc_normal(w, &r, 0.5f);
    cs_init_trunc_normal(b, &r, 0.5f);
    cs_init_trunc_normal(f, &r, 0.5f);
}

/* Deterministic gradients of a fake loss that depend on the weights and the step. */
static void fake_grads(cs_tparams *ps, int t) {
    cs_tparams_zero_grad(ps);
    for (size_t i = 0; i < ps->n; i++) {
        cs_tparam *p = &ps->items[i];
        for (size_t k = 0; k < p->n; k++)
            p->g[k] = (float)(p->w[k] * 0.3 + sin(0.37 * (double)k + 1.3 * t + (double)i));
    }
}

static void run_steps(cs_adamw *opt, cs_tparams *ps, int from, int to) {
    for (int t = from; t < to; t++) {
        fake_grads(ps, t);
        assert_int_equal(cs_adamw_step(opt, ps, NULL), 0);
    }
}

static cs_adamw_params resume_params(void) {
    cs_adamw_params hp = cs_adamw_default_params();
    hp.lr = 0.01f;
    hp.weight_decay = 0.05f;
    hp.clip_norm = 20.0f; /* active: the gradient norm is ~100 */
    hp.warmup_steps = 3;
    hp.total_steps = 10;
    return hp;
}

static void assert_same_store(const cs_tparams *x, const cs_tparams *y) {
    assert_int_equal(x->n, y->n);
    for (size_t i = 0; i < x->n; i++) {
        assert_int_equal(x->items[i].n, y->items[i].n);
        assert_memory_equal(x->items[i].w, y->items[i].w, x->items[i].n * sizeof(float));
        assert_true((x->items[i].m == NULL) == (y->items[i].m == NULL));
        if (x->items[i].m) {
            assert_memory_equal(x->items[i].m, y->items[i].m, x->items[i].n * sizeof(float));
            assert_memory_equal(x->items[i].v, y->items[i].v, x->items[i].n * sizeof(float));
        }
    }
}

static void test_save_load_resume(void **state) {
    (void)state;
    cs_adamw_params hp = resume_params();
    /* Uninterrupted: 10 steps. */
    cs_tparams full;
    build_store(&full);
    cs_adamw opt_full;
    cs_adamw_init(&opt_full, &hp);
    run_steps(&opt_full, &full, 0, 10);

    /* Interrupted at 5: save parameters and optimiser state. */
    cs_tparams half;
    build_store(&half);
    cs_adamw opt_half;
    cs_adamw_init(&opt_half, &hp);
    run_steps(&opt_half, &half, 0, 5);
    const char *model_path = tu_tmp("resume_model.safetensors");
    const char *state_path = tu_tmp("resume_optim.safetensors");
    assert_int_equal(cs_tparams_save(&half, model_path, CS_DTYPE_F32, NULL), 0);
    assert_int_equal(cs_adamw_save(&opt_half, &half, state_path), 0);

    /* Fresh process: new store and an optimiser with other settings; load restores all. */
    cs_tparams fresh;
    build_store(&fresh);
    cs_weights *mw = NULL;
    assert_int_equal(cs_weights_open(model_path, &mw), 0);
    size_t loaded = 0, missing = 9;
    assert_int_equal(cs_tparams_load(&fresh, mw, &loaded, &missing), 0);
    assert_int_equal(loaded, 3);
    assert_int_equal(missing, 0);
    cs_weights_free(mw);
    cs_adamw opt_fresh;
    cs_adamw_init(&opt_fresh, NULL);
    assert_int_equal(cs_adamw_load(&opt_fresh, &fresh, state_path), 0);
    assert_int_equal(opt_fresh.step, 5);
    assert_memory_equal(&opt_fresh.p, &hp, sizeof hp);
    assert_same_store(&fresh, &half); /* moments restored exactly */
    assert_null(fresh.items[2].m);    /* frozen: never had moments */

    run_steps(&opt_half, &half, 5, 10);
    run_steps(&opt_fresh, &fresh, 5, 10);
    assert_int_equal(opt_fresh.step, 10);
    assert_same_store(&half, &full);
    assert_same_store(&fresh, &full);
    printf("resume: 5 + save/load + 5 steps bit-identical to 10 uninterrupted steps (%zu values)\n",
           cs_tparams_count_values(&full, 0));

    /* A state saved before any step loads too (zero moments, step 0). */
    cs_tparams zero;
    build_store(&zero);
    cs_adamw opt_zero;
    cs_adamw_init(&opt_zero, &hp);
    const char *zero_path = tu_tmp("zero_optim.safetensors");
    assert_int_equal(cs_adamw_save(&opt_zero, &zero, zero_path), 0);
    opt_zero.step = 99;
    assert_int_equal(cs_adamw_load(&opt_zero, &zero, zero_path), 0);
    assert_int_equal(opt_zero.step, 0);
    assert_non_null(zero.items[0].m);
    for (size_t k = 0; k < zero.items[0].n; k++) assert_true(zero.items[0].m[k] == 0.0f);

    cs_tparams_free(&zero);
    cs_tparams_free(&full);
    cs_tparams_free(&half);
    cs_tparams_free(&fresh);
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

static unsigned char *read_bytes(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)len);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *n = (size_t)len;
    return buf;
}

/* Expect a failed load naming `what`, leaving the optimiser and store untouched. */
static void expect_load_error(cs_tparams *ps, const char *path, int code, const char *what) {
    cs_adamw opt;
    cs_adamw_init(&opt, NULL);
    opt.step = 42;
    float *m0 = ps->items[0].m;
    float first = m0 ? m0[0] : 0.0f;
    int rc = cs_adamw_load(&opt, ps, path);
    printf("  load %s -> %d: %s\n", strrchr(path, '/') ? strrchr(path, '/') + 1 : path, rc,
           cellsam_last_error());
    if (code) assert_int_equal(rc, code);
    else assert_int_not_equal(rc, 0);
    if (what) assert_non_null(strstr(cellsam_last_error(), what));
    assert_int_equal(opt.step, 42);
    assert_ptr_equal(ps->items[0].m, m0);
    if (m0) assert_true(m0[0] == first);
}

/* Write a small store of hand-made tensors as safetensors. */
static void write_state(const char *path, const float *step_hl, const float *hparams, int n_hp) {
    cs_weights *w = cs_weights_new("safetensors");
    assert_non_null(w);
    int64_t two = 2, nh = n_hp;
    assert_int_equal(cs_weights_add_view(w, "adam.step", CS_DTYPE_F32, 1, &two, step_hl, 8), 0);
    assert_int_equal(cs_weights_add_view(w, "adam.hparams", CS_DTYPE_F32, 1, &nh, hparams,
                                         (size_t)n_hp * 4), 0);
    assert_int_equal(cs_weights_finish(w), 0);
    assert_int_equal(cs_weights_save_safetensors(w, path, CS_DTYPE_F32), 0);
    cs_weights_free(w);
}

static void test_load_errors(void **state) {
    (void)state;
    cs_adamw_params hp = resume_params();
    cs_tparams ps;
    build_store(&ps);
    cs_adamw opt;
    cs_adamw_init(&opt, &hp);
    run_steps(&opt, &ps, 0, 2);
    const char *good = tu_tmp("good_optim.safetensors");
    assert_int_equal(cs_adamw_save(&opt, &ps, good), 0);

    expect_load_error(&ps, tu_tmp("does_not_exist.safetensors"), CELLSAM_ERR_IO, NULL);

    /* A model checkpoint is not an optimiser state. */
    const char *model = tu_tmp("model_only.safetensors");
    assert_int_equal(cs_tparams_save(&ps, model, CS_DTYPE_F32, NULL), 0);
    expect_load_error(&ps, model, CELLSAM_ERR_FORMAT, "not an AdamW optimiser state");

    /* Shape mismatch names the tensor. */
    cs_tparams other;
    cs_tparams_init(&other);
    add2(&other, "enc.proj.weight", 100, 400);
    add1(&other, "enc.proj.bias", 5);
    add2(&other, "head.frozen.weight", 2, 3)->frozen = 1;
    expect_load_error(&other, good, CELLSAM_ERR_MODEL, "adam_m.enc.proj.weight");
    cs_tparams_free(&other);

    /* A trainable parameter the state does not cover. */
    cs_tparams extra;
    build_store(&extra);
    add1(&extra, "new.bias", 2);
    expect_load_error(&extra, good, CELLSAM_ERR_MODEL, "adam_m.new.bias");
    cs_tparams_free(&extra);

    /* Moments of a parameter the model does not have. */
    cs_tparams fewer;
    cs_tparams_init(&fewer);
    add2(&fewer, "enc.proj.weight", 200, 200);
    expect_load_error(&fewer, good, CELLSAM_ERR_MODEL, "enc.proj.bias");
    cs_tparams_free(&fewer);

    /* Truncated and garbage files. */
    size_t n = 0;
    unsigned char *bytes = read_bytes(good, &n);
    const char *trunc = tu_tmp("truncated.safetensors");
    write_bytes(trunc, bytes, n / 2);
    expect_load_error(&ps, trunc, 0, NULL);
    const char *garbage = tu_tmp("garbage.safetensors");
    for (size_t i = 0; i < 64 && i < n; i++) bytes[i] = (unsigned char)(i * 37 + 11);
    write_bytes(garbage, bytes, n);
    expect_load_error(&ps, garbage, 0, NULL);
    free(bytes);

    /* Hand-made states with bad scalars. */
    float hparams[16];
    {
        cs_weights *w = NULL;
        assert_int_equal(cs_weights_open(good, &w), 0);
        const cs_tensor_entry *e = cs_weights_find(w, "adam.hparams");
        assert_non_null(e);
        assert_int_equal(e->shape[0], 16);
        memcpy(hparams, e->data, sizeof hparams);
        cs_weights_free(w);
    }
    const char *bad = tu_tmp("bad_scalars.safetensors");
    const float half_step[2] = {0.0f, 2.5f};
    write_state(bad, half_step, hparams, 16);
    expect_load_error(&ps, bad, CELLSAM_ERR_FORMAT, "adam.step");
    const float ok_step[2] = {0.0f, 2.0f};
    write_state(bad, ok_step, hparams, 15);
    expect_load_error(&ps, bad, CELLSAM_ERR_FORMAT, "adam.hparams");
    float bad_hp[16];
    memcpy(bad_hp, hparams, sizeof bad_hp);
    bad_hp[0] = 7.0f; /* unknown version */
    write_state(bad, ok_step, bad_hp, 16);
    expect_load_error(&ps, bad, CELLSAM_ERR_UNSUPPORTED, "version");
    memcpy(bad_hp, hparams, sizeof bad_hp);
    bad_hp[2] = 1.5f; /* beta1 */
    write_state(bad, ok_step, bad_hp, 16);
    expect_load_error(&ps, bad, CELLSAM_ERR_FORMAT, "hyper-parameters");
    /* Valid scalars but no moments for the trainable parameters. */
    write_state(bad, ok_step, hparams, 16);
    expect_load_error(&ps, bad, CELLSAM_ERR_MODEL, "adam_m.enc.proj.weight");

    /* The good file still loads after all that. */
    cs_adamw again;
    cs_adamw_init(&again, NULL);
    assert_int_equal(cs_adamw_load(&again, &ps, good), 0);
    assert_int_equal(again.step, 2);
    cs_tparams_free(&ps);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_step_matches_torch_formula),
        cmocka_unit_test(test_weight_decay_exclusions),
        cmocka_unit_test(test_clipping),
        cmocka_unit_test(test_schedules),
        cmocka_unit_test(test_quadratic_converges),
        cmocka_unit_test(test_nonfinite_gradient),
        cmocka_unit_test(test_save_load_resume),
        cmocka_unit_test(test_load_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
