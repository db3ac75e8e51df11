/* Training primitives (train_ops.c): every backward against central finite
 * differences of its forward, every forward against naive reference loops or
 * the inference kernels.
 *
 * Finite differences: loss = sum(out * R) with a fixed random R, evaluated in
 * double over the float32 forward output; step h = 5e-3 on inputs of size ~1.
 * Error metric per coordinate: |analytic - numeric| / max(|analytic| + |numeric|, 1e-2),
 * tolerance FD_TOL = 1e-2 on every coordinate (float32 rounding in the forward
 * gives ~1e-5 absolute noise at this step). Parameter gradients are checked to
 * ACCUMULATE (buffers start at a non-zero value that is subtracted), input
 * gradients to be WRITTEN (buffers start at garbage). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "testutil.h"
#include "train.h"

#define FD_STEP 5e-3f
#define FD_TOL 1e-2
#define FD_FLOOR 1e-2
#define G0 0.25f      /* initial value of parameter gradients */
#define GARBAGE 1e30f /* initial value of input gradients */

/* ------------------------------------------------------------- helpers */

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static float *rand_buf(size_t n, float lo, float hi) { return tu_rand_buf(&rng_state, n, lo, hi); }

static float *const_buf(size_t n, float v) {
    float *p = malloc(n * sizeof(float));
    assert_non_null(p);
    for (size_t i = 0; i < n; i++) p[i] = v;
    return p;
}

static cs_tparam make_param(const char *name, size_t n, float lo, float hi) {
    cs_tparam p;
    memset(&p, 0, sizeof p);
    p.name = (char *)name;
    p.ndim = 1;
    p.shape[0] = (int64_t)n;
    p.n = n;
    p.w = rand_buf(n, lo, hi);
    p.g = const_buf(n, G0);
    return p;
}

static void free_param(cs_tparam *p) {
    free(p->w);
    free(p->g);
}

/* Gradient accumulated into p->g since make_param (copy, G0 removed). */
static float *param_grad(const cs_tparam *p) {
    float *d = malloc(p->n * sizeof(float));
    assert_non_null(d);
    for (size_t i = 0; i < p->n; i++) d[i] = p->g[i] - G0;
    return d;
}

static double weighted_sum(const float *out, const float *R, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)out[i] * R[i];
    return s;
}

/* Forward of the op under test: fills out (n_out floats) from the current
 * contents of the buffers its context points to. */
typedef void (*forward_fn)(void *ctx, float *out);

/* Central differences of sum(out * R) w.r.t. x[r*ld + c] for r < rows, c < cols,
 * against analytic[r*lda + c]. Prints and returns the max error (metric above). */
static double fd_check(const char *what, forward_fn fwd, void *ctx, size_t n_out, const float *R, float *x,
                       int rows, int cols, int ld, const float *analytic, int lda) {
    float *out = malloc(n_out * sizeof(float));
    assert_non_null(out);
    double worst = 0.0, worst_a = 0.0, worst_n = 0.0;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            float *xp = &x[(size_t)r * ld + c];
            const float orig = *xp;
            *xp = orig + FD_STEP;
            const float up = *xp; /* the float step actually taken */
            fwd(ctx, out);
            const double fp = weighted_sum(out, R, n_out);
            *xp = orig - FD_STEP;
            const float dn = *xp;
            fwd(ctx, out);
            const double fm = weighted_sum(out, R, n_out);
            *xp = orig;
            const double num = (fp - fm) / ((double)up - (double)dn);
            const double a = analytic[(size_t)r * lda + c];
            double den = fabs(a) + fabs(num);
            if (den < FD_FLOOR) den = FD_FLOOR;
            const double e = fabs(a - num) / den;
            if (!(e <= worst)) {
                worst = e;
                worst_a = a;
                worst_n = num;
            }
        }
    free(out);
    printf("  FD %-44s n=%-6d max_rel_err=%.3g (tol %.0e)\n", what, rows * cols, worst, FD_TOL);
    if (!(worst <= FD_TOL))
        fail_msg("%s: finite-difference error %.4g (analytic %.6g, numeric %.6g) exceeds %.1g", what, worst,
                 worst_a, worst_n, FD_TOL);
    return worst;
}

/* Every element still equal to GARBAGE? (input gradients must be overwritten) */
static void assert_written(const char *what, const float *g, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (g[i] == GARBAGE || !isfinite(g[i])) fail_msg("%s: element %zu not written", what, i);
}

/* --------------------------------------------------------------- linear */

typedef struct {
    float *X;
    int M, K, N;
    cs_tparam *W, *b;
} linear_ctx;

static void linear_forward(void *p, float *out) {
    linear_ctx *c = p;
    cs_linear_fwd(c->X, c->M, c->K, c->W, c->b, c->N, out, 2);
}

static void test_linear(void **state) {
    (void)state;
    const int M = 5, K = 7, N = 3;
    float *X = rand_buf((size_t)M * K, -1, 1);
    cs_tparam W = make_param("w", (size_t)N * K, -1, 1), b = make_param("b", (size_t)N, -1, 1);
    float *R = rand_buf((size_t)M * N, -1, 1);

    /* forward: same as the inference cs_linear, with and without bias */
    float *Y = malloc((size_t)M * N * sizeof(float)), *Yref = malloc((size_t)M * N * sizeof(float));
    assert_non_null(Y);
    assert_non_null(Yref);
    cs_linear_fwd(X, M, K, &W, &b, N, Y, 2);
    cs_linear(X, M, K, W.w, b.w, N, Yref, 1);
    tu_check_close("linear fwd vs cs_linear", Y, Yref, (size_t)M * N, 1e-6);
    /* and against a double loop */
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = b.w[n];
            for (int k = 0; k < K; k++) s += (double)X[m * K + k] * W.w[n * K + k];
            Yref[m * N + n] = (float)s;
        }
    tu_check_close("linear fwd vs double loop", Y, Yref, (size_t)M * N, 1e-5);
    cs_linear_fwd(X, M, K, &W, NULL, N, Y, 2);
    cs_linear(X, M, K, W.w, NULL, N, Yref, 1);
    tu_check_close("linear fwd (no bias) vs cs_linear", Y, Yref, (size_t)M * N, 1e-6);

    float *dX = const_buf((size_t)M * K, GARBAGE);
    cs_linear_bwd(X, M, K, &W, &b, N, R, dX, 2);
    assert_written("linear dX", dX, (size_t)M * K);
    float *dW = param_grad(&W), *db = param_grad(&b);
    linear_ctx c = {X, M, K, N, &W, &b};
    fd_check("linear dX", linear_forward, &c, (size_t)M * N, R, X, 1, M * K, M * K, dX, M * K);
    fd_check("linear dW", linear_forward, &c, (size_t)M * N, R, W.w, 1, N * K, N * K, dW, N * K);
    fd_check("linear db", linear_forward, &c, (size_t)M * N, R, b.w, 1, N, N, db, N);

    /* a second backward without dX accumulates the same gradients again */
    cs_linear_bwd(X, M, K, &W, &b, N, R, NULL, 1);
    float *dW2 = param_grad(&W), *dW2ref = malloc((size_t)N * K * sizeof(float));
    assert_non_null(dW2ref);
    for (int i = 0; i < N * K; i++) dW2ref[i] = 2 * dW[i];
    tu_check_close("linear dW accumulates over two calls", dW2, dW2ref, (size_t)N * K, 1e-5);

    /* a frozen parameter gets no gradient */
    W.frozen = 1;
    memcpy(dW2ref, W.g, (size_t)N * K * sizeof(float));
    cs_linear_bwd(X, M, K, &W, NULL, N, R, NULL, 1);
    assert_memory_equal(dW2ref, W.g, (size_t)N * K * sizeof(float));

    free(X), free(R), free(Y), free(Yref), free(dX), free(dW), free(db), free(dW2), free(dW2ref);
    free_param(&W), free_param(&b);
}

/* ------------------------------------------------------------ layernorm */

typedef struct {
    float *in;
    int rows, dim;
    cs_tparam *g, *b;
} norm_ctx;

static void layernorm_forward(void *p, float *out) {
    norm_ctx *c = p;
    cs_layernorm_fwd(c->in, out, c->rows, c->dim, c->g, c->b, 1e-5f, NULL, NULL);
}

static void test_layernorm(void **state) {
    (void)state;
    const int rows = 4, dim = 9;
    const size_t n = (size_t)rows * dim;
    float *x = rand_buf(n, -2, 2), *R = rand_buf(n, -1, 1);
    cs_tparam g = make_param("g", (size_t)dim, 0.5f, 1.5f), b = make_param("b", (size_t)dim, -1, 1);
    float mean[4], rstd[4];
    float *y = malloc(n * sizeof(float)), *yref = malloc(n * sizeof(float));
    assert_non_null(y);
    assert_non_null(yref);
    cs_layernorm_fwd(x, y, rows, dim, &g, &b, 1e-5f, mean, rstd);
    cs_layernorm(x, yref, rows, dim, g.w, b.w, 1e-5f, 1);
    tu_check_close("layernorm fwd vs cs_layernorm", y, yref, n, 1e-5);

    float *dx = const_buf(n, GARBAGE);
    cs_layernorm_bwd(x, R, rows, dim, &g, &b, mean, rstd, dx);
    assert_written("layernorm din", dx, n);
    float *dg = param_grad(&g), *db = param_grad(&b);
    norm_ctx c = {x, rows, dim, &g, &b};
    fd_check("layernorm din", layernorm_forward, &c, n, R, x, 1, (int)n, (int)n, dx, (int)n);
    fd_check("layernorm dgamma", layernorm_forward, &c, n, R, g.w, 1, dim, dim, dg, dim);
    fd_check("layernorm dbeta", layernorm_forward, &c, n, R, b.w, 1, dim, dim, db, dim);

    /* din may alias dout */
    float *alias = malloc(n * sizeof(float));
    assert_non_null(alias);
    memcpy(alias, R, n * sizeof(float));
    cs_layernorm_bwd(x, alias, rows, dim, &g, &b, mean, rstd, alias);
    tu_check_close("layernorm din aliasing dout", alias, dx, n, 1e-6);

    /* in place forward */
    memcpy(alias, x, n * sizeof(float));
    cs_layernorm_fwd(alias, alias, rows, dim, &g, &b, 1e-5f, NULL, NULL);
    tu_check_close("layernorm fwd in place", alias, y, n, 0);

    /* no affine: plain normalisation, checked by its statistics */
    cs_layernorm_fwd(x, y, rows, dim, NULL, NULL, 1e-5f, mean, rstd);
    float moments[8], want_moments[8];
    for (int r = 0; r < rows; r++) {
        double s = 0, s2 = 0;
        for (int i = 0; i < dim; i++) s += y[r * dim + i], s2 += (double)y[r * dim + i] * y[r * dim + i];
        moments[r * 2] = (float)(s / dim), moments[r * 2 + 1] = (float)(s2 / dim);
        want_moments[r * 2] = 0.f, want_moments[r * 2 + 1] = 1.f; /* variance 1 up to eps */
    }
    tu_check_close("layernorm (no affine) row mean/var", moments, want_moments, (size_t)rows * 2, 1e-4);
    cs_layernorm_bwd(x, R, rows, dim, NULL, NULL, mean, rstd, dx);
    c.g = c.b = NULL;
    fd_check("layernorm (no affine) din", layernorm_forward, &c, n, R, x, 1, (int)n, (int)n, dx, (int)n);

    free(x), free(R), free(y), free(yref), free(dx), free(dg), free(db), free(alias);
    free_param(&g), free_param(&b);
}

/* ------------------------------------------------------------ groupnorm */

typedef struct {
    float *in;
    int C, HW, groups;
    cs_tparam *g, *b;
} gn_ctx;

static void groupnorm_forward(void *p, float *out) {
    gn_ctx *c = p;
    cs_groupnorm_fwd(c->in, out, c->C, c->HW, c->groups, c->g, c->b, 1e-5f, NULL, NULL);
}

static void test_groupnorm(void **state) {
    (void)state;
    const int C = 6, HW = 5, groups = 3, cpg = C / groups;
    const size_t n = (size_t)C * HW;
    float *x = rand_buf(n, -2, 2), *R = rand_buf(n, -1, 1);
    cs_tparam g = make_param("g", (size_t)C, 0.5f, 1.5f), b = make_param("b", (size_t)C, -1, 1);
    float mean[3], rstd[3];
    float *y = malloc(n * sizeof(float)), *yref = malloc(n * sizeof(float));
    assert_non_null(y);
    assert_non_null(yref);
    cs_groupnorm_fwd(x, y, C, HW, groups, &g, &b, 1e-5f, mean, rstd);
    /* reference: biased variance over cpg*HW values per group, eps inside the sqrt */
    for (int gr = 0; gr < groups; gr++) {
        const float *xg = x + (size_t)gr * cpg * HW;
        double s = 0, s2 = 0;
        for (int i = 0; i < cpg * HW; i++) s += xg[i];
        const double mu = s / (cpg * HW);
        for (int i = 0; i < cpg * HW; i++) s2 += (xg[i] - mu) * (xg[i] - mu);
        const double inv = 1.0 / sqrt(s2 / (cpg * HW) + 1e-5);
        for (int cc = 0; cc < cpg; cc++) {
            const int ch = gr * cpg + cc;
            for (int p = 0; p < HW; p++)
                yref[ch * HW + p] = (float)((x[ch * HW + p] - mu) * inv * g.w[ch] + b.w[ch]);
        }
    }
    tu_check_close("groupnorm fwd vs double loop", y, yref, n, 1e-5);

    float *dx = const_buf(n, GARBAGE);
    cs_groupnorm_bwd(x, R, C, HW, groups, &g, &b, mean, rstd, dx);
    assert_written("groupnorm din", dx, n);
    float *dg = param_grad(&g), *db = param_grad(&b);
    gn_ctx c = {x, C, HW, groups, &g, &b};
    fd_check("groupnorm din", groupnorm_forward, &c, n, R, x, 1, (int)n, (int)n, dx, (int)n);
    fd_check("groupnorm dgamma", groupnorm_forward, &c, n, R, g.w, 1, C, C, dg, C);
    fd_check("groupnorm dbeta", groupnorm_forward, &c, n, R, b.w, 1, C, C, db, C);

    /* no affine */
    cs_groupnorm_fwd(x, y, C, HW, groups, NULL, NULL, 1e-5f, mean, rstd);
    cs_groupnorm_bwd(x, R, C, HW, groups, NULL, NULL, mean, rstd, dx);
    c.g = c.b = NULL;
    fd_check("groupnorm (no affine) din", groupnorm_forward, &c, n, R, x, 1, (int)n, (int)n, dx, (int)n);

    /* channels not divisible by groups: a no-op, not a crash */
    float *untouched = const_buf(n, 7.f);
    cs_groupnorm_fwd(x, untouched, C, HW, 4, &g, &b, 1e-5f, mean, rstd);
    for (size_t i = 0; i < n; i++) assert_true(untouched[i] == 7.f);

    free(x), free(R), free(y), free(yref), free(dx), free(dg), free(db), free(untouched);
    free_param(&g), free_param(&b);
}

/* ---------------------------------------------------------- activations */

typedef struct {
    float *x;
    size_t n;
    void (*f)(const float *, float *, size_t);
} act_ctx;

static void act_forward(void *p, float *out) {
    act_ctx *c = p;
    c->f(c->x, out, c->n);
}

static void test_activations(void **state) {
    (void)state;
    const size_t n = 43; /* 8-lane kernels plus a scalar tail */
    float *x = rand_buf(n, -4, 4), *R = rand_buf(n, -1, 1);
    /* keep inputs off relu's kink by more than the FD step */
    for (size_t i = 0; i < n; i++)
        if (fabsf(x[i]) < 0.05f) x[i] = x[i] < 0 ? -0.3f : 0.3f;
    float *y = malloc(n * sizeof(float)), *yref = malloc(n * sizeof(float)), *dx = malloc(n * sizeof(float));
    assert_non_null(y);
    assert_non_null(yref);
    assert_non_null(dx);
    act_ctx c = {x, n, NULL};

    cs_gelu_fwd(x, y, n);
    for (size_t i = 0; i < n; i++) yref[i] = (float)(0.5 * x[i] * (1.0 + erf(x[i] / sqrt(2.0))));
    tu_check_close("gelu fwd vs erf formula", y, yref, n, 2e-6);
    memcpy(yref, x, n * sizeof(float));
    cs_gelu_fwd(yref, yref, n);
    tu_check_close("gelu fwd in place", yref, y, n, 0);
    for (size_t i = 0; i < n; i++) dx[i] = GARBAGE;
    cs_gelu_bwd(x, R, dx, n);
    assert_written("gelu dx", dx, n);
    c.f = cs_gelu_fwd;
    fd_check("gelu dx", act_forward, &c, n, R, x, 1, (int)n, (int)n, dx, (int)n);

    cs_relu_fwd(x, y, n);
    for (size_t i = 0; i < n; i++) yref[i] = x[i] > 0 ? x[i] : 0.f;
    tu_check_close("relu fwd", y, yref, n, 0);
    cs_relu_bwd(x, R, dx, n);
    c.f = cs_relu_fwd;
    fd_check("relu dx", act_forward, &c, n, R, x, 1, (int)n, (int)n, dx, (int)n);

    cs_sigmoid_fwd(x, y, n);
    for (size_t i = 0; i < n; i++) yref[i] = (float)(1.0 / (1.0 + exp(-(double)x[i])));
    tu_check_close("sigmoid fwd vs double", y, yref, n, 1e-6);
    cs_sigmoid_bwd_from_y(y, R, dx, n);
    c.f = cs_sigmoid_fwd;
    fd_check("sigmoid dx (from y)", act_forward, &c, n, R, x, 1, (int)n, (int)n, dx, (int)n);

    free(x), free(R), free(y), free(yref), free(dx);
}

/* -------------------------------------------------------------- softmax */

typedef struct {
    float *x;
    int rows, n;
} softmax_ctx;

static void softmax_forward(void *p, float *out) {
    softmax_ctx *c = p;
    memcpy(out, c->x, (size_t)c->rows * c->n * sizeof(float));
    for (int r = 0; r < c->rows; r++) cs_softmax_row(out + (size_t)r * c->n, c->n);
}

/* Grouped softmax (short rows, exponentials across row boundaries) against a
 * double-precision softmax of each group, for group lengths that do and do not
 * divide 8. */
static void test_softmax_groups(void **state) {
    (void)state;
    const int lens[3] = {7, 8, 3};
    for (int li = 0; li < 3; li++) {
        const int n = lens[li], groups = 9, len = n * groups;
        float x[72];
        float want[72];
        for (int i = 0; i < len; i++) x[i] = (float)(sin(1.7 * i) * 3.0 + (i == 2 ? 30.0 : 0.0)); /* group 0: one dominant value */
        for (int g = 0; g < groups; g++) {
            double m = -INFINITY, s = 0;
            for (int k = 0; k < n; k++) m = fmax(m, x[g * n + k]);
            for (int k = 0; k < n; k++) s += exp(x[g * n + k] - m);
            for (int k = 0; k < n; k++) want[g * n + k] = (float)(exp(x[g * n + k] - m) / s);
        }
        cs_softmax_groups(x, groups, n);
        tu_check_close("softmax_groups", x, want, (size_t)len, 1e-6);
    }
}

static void test_softmax_bwd(void **state) {
    (void)state;
    const int rows = 3, n = 7;
    float *x = rand_buf((size_t)rows * n, -3, 3), *R = rand_buf((size_t)rows * n, -1, 1);
    float *p = malloc((size_t)rows * n * sizeof(float)), *dx = const_buf((size_t)rows * n, GARBAGE);
    assert_non_null(p);
    softmax_ctx c = {x, rows, n};
    softmax_forward(&c, p);
    cs_softmax_bwd(p, R, dx, rows, n);
    assert_written("softmax dx", dx, (size_t)rows * n);
    fd_check("softmax dx", softmax_forward, &c, (size_t)rows * n, R, x, 1, rows * n, rows * n, dx, rows * n);
    /* dx may alias dp */
    float *alias = malloc((size_t)rows * n * sizeof(float));
    assert_non_null(alias);
    memcpy(alias, R, (size_t)rows * n * sizeof(float));
    cs_softmax_bwd(p, alias, alias, rows, n);
    tu_check_close("softmax dx aliasing dp", alias, dx, (size_t)rows * n, 0);
    free(x), free(R), free(p), free(dx), free(alias);
}

/* ------------------------------------------------------------ attention */

typedef struct {
    float *q, *k, *v, *bias;
    int ldq, ldk, ldv, nq, nk, dh;
    float scale;
    float *P;
} attn_ctx;

/* out: o as a dense nq x dh block */
static void attn_forward(void *p, float *out) {
    attn_ctx *c = p;
    cs_attn_head_fwd(c->q, c->ldq, c->k, c->ldk, c->v, c->ldv, c->nq, c->nk, c->dh, c->scale, c->bias, c->P,
                     out, c->dh, 2);
}

static void attention_case(int nq, int nk, int dh, int ldq, int ldk, int ldv, int with_bias) {
    printf(" attention nq=%d nk=%d dh=%d ldq=%d ldk=%d ldv=%d bias=%d\n", nq, nk, dh, ldq, ldk, ldv, with_bias);
    /* q, k, v live in wider rows (as one head of a fused qkv buffer) */
    float *q = rand_buf((size_t)nq * ldq, -1.5f, 1.5f), *k = rand_buf((size_t)nk * ldk, -1.5f, 1.5f);
    float *v = rand_buf((size_t)nk * ldv, -1, 1);
    float *bias = with_bias ? rand_buf((size_t)nq * nk, -1, 1) : NULL;
    float *R = rand_buf((size_t)nq * dh, -1, 1);
    float *P = malloc((size_t)nq * nk * sizeof(float)), *o = malloc((size_t)nq * dh * sizeof(float));
    float *oref = malloc((size_t)nq * dh * sizeof(float)), *scratch = malloc((size_t)nq * nk * sizeof(float));
    assert_non_null(P);
    assert_non_null(o);
    assert_non_null(oref);
    assert_non_null(scratch);
    const float scale = 1.0f / sqrtf((float)dh);
    attn_ctx c = {q, k, v, bias, ldq, ldk, ldv, nq, nk, dh, scale, P};
    attn_forward(&c, o);

    /* reference in double */
    double maxrow = 0;
    for (int i = 0; i < nq; i++) {
        double s[64], m = -1e300, tot = 0, ps = 0;
        assert_true(nk <= 64);
        for (int j = 0; j < nk; j++) {
            double d = 0;
            for (int t = 0; t < dh; t++) d += (double)q[i * ldq + t] * k[j * ldk + t];
            s[j] = scale * d + (bias ? bias[i * nk + j] : 0);
            if (s[j] > m) m = s[j];
        }
        for (int j = 0; j < nk; j++) tot += (s[j] = exp(s[j] - m));
        for (int t = 0; t < dh; t++) {
            double a = 0;
            for (int j = 0; j < nk; j++) a += s[j] / tot * v[j * ldv + t];
            oref[i * dh + t] = (float)a;
        }
        for (int j = 0; j < nk; j++) ps += P[i * nk + j];
        if (fabs(ps - 1) > maxrow) maxrow = fabs(ps - 1);
    }
    printf("  attention P row sums: max |sum-1| = %.3g (tol 1e-6)\n", maxrow);
    assert_true(maxrow <= 1e-6);
    tu_check_close("attention o vs double reference", o, oref, (size_t)nq * dh, 1e-5);

    /* gradients with the inputs' strides; columns outside the head stay untouched */
    float *dq = const_buf((size_t)nq * ldq, GARBAGE), *dk = const_buf((size_t)nk * ldk, GARBAGE);
    float *dv = const_buf((size_t)nk * ldv, GARBAGE), *dbias = const_buf((size_t)nq * nk, GARBAGE);
    cs_attn_head_bwd(q, ldq, k, ldk, v, ldv, nq, nk, dh, scale, P, R, dh, dq, dk, dv, dbias, scratch, 2);
    for (int i = 0; i < nq; i++)
        for (int t = 0; t < ldq; t++) assert_true((t < dh) == (dq[i * ldq + t] != GARBAGE));
    for (int j = 0; j < nk; j++) {
        for (int t = 0; t < ldk; t++) assert_true((t < dh) == (dk[j * ldk + t] != GARBAGE));
        for (int t = 0; t < ldv; t++) assert_true((t < dh) == (dv[j * ldv + t] != GARBAGE));
    }
    assert_written("attention dbias", dbias, (size_t)nq * nk);
    const size_t n_out = (size_t)nq * dh;
    fd_check("attention dq", attn_forward, &c, n_out, R, q, nq, dh, ldq, dq, ldq);
    fd_check("attention dk", attn_forward, &c, n_out, R, k, nk, dh, ldk, dk, ldk);
    fd_check("attention dv", attn_forward, &c, n_out, R, v, nk, dh, ldv, dv, ldv);
    if (bias) {
        fd_check("attention dbias", attn_forward, &c, n_out, R, bias, nq, nk, nk, dbias, nk);
    } else {
        /* dbias is dL/dlogits even without a bias: check against a zero bias */
        float *zero = const_buf((size_t)nq * nk, 0.f);
        c.bias = zero;
        fd_check("attention dlogits (zero bias)", attn_forward, &c, n_out, R, zero, nq, nk, nk, dbias, nk);
        c.bias = NULL;
        free(zero);
    }
    /* only dv requested: same dv */
    float *dv2 = const_buf((size_t)nk * ldv, GARBAGE);
    attn_forward(&c, o); /* restore P */
    cs_attn_head_bwd(q, ldq, k, ldk, v, ldv, nq, nk, dh, scale, P, R, dh, NULL, NULL, dv2, NULL, scratch, 1);
    tu_check_close("attention dv alone", dv2, dv, (size_t)nk * ldv, 1e-6);

    free(q), free(k), free(v), free(bias), free(R), free(P), free(o), free(oref), free(scratch);
    free(dq), free(dk), free(dv), free(dbias), free(dv2);
}

static void test_attention(void **state) {
    (void)state;
    attention_case(5, 7, 3, 3 * 3 + 1, 3 * 3 + 1, 3 * 3 + 1, 1); /* strided, with bias */
    attention_case(6, 4, 5, 5, 8, 11, 0);                        /* dense q, no bias */
    attention_case(1, 9, 4, 4, 4, 4, 1);                         /* a single query */
}

/* --------------------------------------------------------------- conv2d */

typedef struct {
    float *in;
    int Cin, H, W, Cout, ks, pad;
    cs_tparam *w, *b;
    float *col;
} conv_ctx;

static void conv_forward(void *p, float *out) {
    conv_ctx *c = p;
    cs_conv2d_fwd(c->in, c->Cin, c->H, c->W, c->w, c->b, c->Cout, c->ks, c->pad, out, c->col, 2);
}

static void conv_case(int Cin, int H, int W, int Cout, int ks, int pad, int with_bias) {
    printf(" conv2d Cin=%d %dx%d Cout=%d k=%d pad=%d bias=%d\n", Cin, H, W, Cout, ks, pad, with_bias);
    const int OH = H + 2 * pad - ks + 1, OW = W + 2 * pad - ks + 1;
    const size_t n_in = (size_t)Cin * H * W, n_out = (size_t)Cout * OH * OW, n_w = (size_t)Cout * Cin * ks * ks;
    float *in = rand_buf(n_in, -1, 1), *R = rand_buf(n_out, -1, 1);
    cs_tparam w = make_param("w", n_w, -0.5f, 0.5f), b = make_param("b", (size_t)Cout, -1, 1);
    cs_tparam *bp = with_bias ? &b : NULL;
    float *col = const_buf((size_t)Cin * ks * ks * H * W, GARBAGE);
    float *out = malloc(n_out * sizeof(float)), *ref = malloc(n_out * sizeof(float));
    assert_non_null(out);
    assert_non_null(ref);
    conv_ctx c = {in, Cin, H, W, Cout, ks, pad, &w, bp, col};
    conv_forward(&c, out);
    for (int co = 0; co < Cout; co++)
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                double s = bp ? b.w[co] : 0;
                for (int ci = 0; ci < Cin; ci++)
                    for (int ky = 0; ky < ks; ky++)
                        for (int kx = 0; kx < ks; kx++) {
                            int iy = oy + ky - pad, ix = ox + kx - pad;
                            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                            s += (double)in[(ci * H + iy) * W + ix] * w.w[((co * Cin + ci) * ks + ky) * ks + kx];
                        }
                ref[(co * OH + oy) * OW + ox] = (float)s;
            }
    tu_check_close("conv2d fwd vs direct loops", out, ref, n_out, 1e-5);

    float *din = const_buf(n_in, GARBAGE);
    cs_conv2d_bwd(in, Cin, H, W, &w, bp, Cout, ks, pad, R, din, col, 2);
    assert_written("conv2d din", din, n_in);
    float *dw = param_grad(&w), *db = param_grad(&b);
    fd_check("conv2d din", conv_forward, &c, n_out, R, in, 1, (int)n_in, (int)n_in, din, (int)n_in);
    fd_check("conv2d dweight", conv_forward, &c, n_out, R, w.w, 1, (int)n_w, (int)n_w, dw, (int)n_w);
    if (bp) fd_check("conv2d dbias", conv_forward, &c, n_out, R, b.w, 1, Cout, Cout, db, Cout);
    else
        for (int i = 0; i < Cout; i++) assert_true(db[i] == 0.f); /* no bias: untouched */

    free(in), free(R), free(col), free(out), free(ref), free(din), free(dw), free(db);
    free_param(&w), free_param(&b);
}

static void test_conv2d(void **state) {
    (void)state;
    conv_case(3, 5, 6, 4, 3, 1, 1);
    conv_case(2, 6, 5, 3, 3, 0, 1);
    conv_case(4, 4, 7, 3, 1, 0, 1);
    conv_case(3, 5, 4, 2, 3, 1, 0);
    conv_case(2, 7, 7, 2, 5, 2, 1);
    /* pad too large for the col buffer: a no-op */
    float in[2 * 3 * 3], out[2 * 5 * 5], col[2 * 3 * 3];
    for (int i = 0; i < 18; i++) in[i] = 1.f;
    for (int i = 0; i < 50; i++) out[i] = 7.f;
    cs_tparam w = make_param("w", 2 * 2, -1, 1);
    cs_conv2d_fwd(in, 2, 3, 3, &w, NULL, 2, 1, 1, out, col, 1);
    for (int i = 0; i < 50; i++) assert_true(out[i] == 7.f);
    free_param(&w);
}

/* ------------------------------------------------------- convT 2x2 s2 */

typedef struct {
    float *in;
    int Cin, H, W, Cout;
    cs_tparam *w, *b;
} convT_ctx;

static void convT_forward(void *p, float *out) {
    convT_ctx *c = p;
    cs_convT2x2_fwd(c->in, c->Cin, c->H, c->W, c->w, c->b, c->Cout, out, 2);
}

/* Direct loops: out[co, 2y+dy, 2x+dx] = b[co] + sum_ci in[ci,y,x] w[ci,co,dy,dx]. */
static void convT_reference(const float *in, int Cin, int H, int W, const float *w, const float *b, int Cout,
                            float *out) {
    for (int co = 0; co < Cout; co++)
        for (int Y = 0; Y < 2 * H; Y++)
            for (int X = 0; X < 2 * W; X++) {
                double s = b ? b[co] : 0;
                for (int ci = 0; ci < Cin; ci++)
                    s += (double)in[(ci * H + Y / 2) * W + X / 2] * w[((ci * Cout + co) * 2 + Y % 2) * 2 + X % 2];
                out[((size_t)co * 2 * H + Y) * 2 * W + X] = (float)s;
            }
}

static void test_convT(void **state) {
    (void)state;
    {
        const int Cin = 3, H = 3, W = 4, Cout = 2;
        const size_t n_in = (size_t)Cin * H * W, n_out = (size_t)Cout * 4 * H * W, n_w = (size_t)Cin * Cout * 4;
        float *in = rand_buf(n_in, -1, 1), *R = rand_buf(n_out, -1, 1);
        cs_tparam w = make_param("w", n_w, -1, 1), b = make_param("b", (size_t)Cout, -1, 1);
        float *out = malloc(n_out * sizeof(float)), *ref = malloc(n_out * sizeof(float));
        assert_non_null(out);
        assert_non_null(ref);
        convT_ctx c = {in, Cin, H, W, Cout, &w, &b};
        convT_forward(&c, out);
        convT_reference(in, Cin, H, W, w.w, b.w, Cout, ref);
        tu_check_close("convT2x2 fwd vs direct loops", out, ref, n_out, 1e-5);
        float *din = const_buf(n_in, GARBAGE);
        cs_convT2x2_bwd(in, Cin, H, W, &w, &b, Cout, R, din, 2);
        assert_written("convT2x2 din", din, n_in);
        float *dw = param_grad(&w), *db = param_grad(&b);
        fd_check("convT2x2 din", convT_forward, &c, n_out, R, in, 1, (int)n_in, (int)n_in, din, (int)n_in);
        fd_check("convT2x2 dweight", convT_forward, &c, n_out, R, w.w, 1, (int)n_w, (int)n_w, dw, (int)n_w);
        fd_check("convT2x2 dbias", convT_forward, &c, n_out, R, b.w, 1, Cout, Cout, db, Cout);
        /* without bias */
        cs_convT2x2_fwd(in, Cin, H, W, &w, NULL, Cout, out, 1);
        convT_reference(in, Cin, H, W, w.w, NULL, Cout, ref);
        tu_check_close("convT2x2 fwd (no bias) vs direct loops", out, ref, n_out, 1e-5);
        free(in), free(R), free(out), free(ref), free(din), free(dw), free(db);
        free_param(&w), free_param(&b);
    }
    {
        /* Larger than one block (256 rows x 1024 pixels) in both directions: the
         * blocked GEMM/scatter path against direct loops for the forward and the
         * adjoint (din, dW, db computed by direct loops from R). */
        const int Cin = 3, H = 36, W = 37, Cout = 80;
        const int HW = H * W;
        const size_t n_in = (size_t)Cin * HW, n_out = (size_t)Cout * 4 * HW, n_w = (size_t)Cin * Cout * 4;
        float *in = rand_buf(n_in, -1, 1), *R = rand_buf(n_out, -1, 1);
        cs_tparam w = make_param("w", n_w, -1, 1), b = make_param("b", (size_t)Cout, -1, 1);
        float *out = malloc(n_out * sizeof(float)), *ref = malloc(n_out * sizeof(float));
        assert_non_null(out);
        assert_non_null(ref);
        cs_convT2x2_fwd(in, Cin, H, W, &w, &b, Cout, out, 2);
        convT_reference(in, Cin, H, W, w.w, b.w, Cout, ref);
        tu_check_close("convT2x2 blocked fwd vs direct loops", out, ref, n_out, 1e-5);
        float *din = const_buf(n_in, GARBAGE);
        cs_convT2x2_bwd(in, Cin, H, W, &w, &b, Cout, R, din, 2);
        float *dw = param_grad(&w), *db = param_grad(&b);
        float *din_ref = malloc(n_in * sizeof(float)), *dw_ref = malloc(n_w * sizeof(float));
        float *db_ref = malloc((size_t)Cout * sizeof(float));
        assert_non_null(din_ref);
        assert_non_null(dw_ref);
        assert_non_null(db_ref);
        for (int ci = 0; ci < Cin; ci++)
            for (int p = 0; p < HW; p++) {
                double s = 0;
                for (int co = 0; co < Cout; co++)
                    for (int t = 0; t < 4; t++)
                        s += (double)w.w[(ci * Cout + co) * 4 + t] *
                             R[((size_t)co * 2 * H + 2 * (p / W) + t / 2) * 2 * W + 2 * (p % W) + t % 2];
                din_ref[ci * HW + p] = (float)s;
            }
        for (int ci = 0; ci < Cin; ci++)
            for (int co = 0; co < Cout; co++)
                for (int t = 0; t < 4; t++) {
                    double s = 0;
                    for (int p = 0; p < HW; p++)
                        s += (double)in[ci * HW + p] *
                             R[((size_t)co * 2 * H + 2 * (p / W) + t / 2) * 2 * W + 2 * (p % W) + t % 2];
                    dw_ref[(ci * Cout + co) * 4 + t] = (float)s;
                }
        for (int co = 0; co < Cout; co++) {
            double s = 0;
            for (size_t i = 0; i < (size_t)4 * HW; i++) s += R[co * 4 * (size_t)HW + i];
            db_ref[co] = (float)s;
        }
        tu_check_close("convT2x2 blocked din vs direct loops", din, din_ref, n_in, 1e-4);
        tu_check_close("convT2x2 blocked dweight vs direct loops", dw, dw_ref, n_w, 1e-3);
        tu_check_close("convT2x2 blocked dbias vs direct loops", db, db_ref, (size_t)Cout, 1e-3);
        free(in), free(R), free(out), free(ref), free(din), free(dw), free(db), free(din_ref), free(dw_ref),
            free(db_ref);
        free_param(&w), free_param(&b);
    }
}

/* ------------------------------------------------------------- bilinear */

typedef struct {
    float *in;
    int C, H, W, OH, OW;
} bil_ctx;

static void bilinear_forward(void *p, float *out) {
    bil_ctx *c = p;
    cs_bilinear_fwd(c->in, c->C, c->H, c->W, out, c->OH, c->OW);
}

/* align_corners=False source index and weight, written out independently:
 * src = (i + 0.5) * in/out - 0.5, clamped to [0, in-1]. */
static void ref_tap(int n_in, int n_out, int i, int *i0, int *i1, double *w1) {
    double src = ((double)i + 0.5) * n_in / n_out - 0.5;
    if (src < 0) src = 0;
    *i0 = (int)floor(src);
    if (*i0 >= n_in - 1) {
        *i0 = *i1 = n_in - 1;
        *w1 = 0;
        return;
    }
    *i1 = *i0 + 1;
    *w1 = src - *i0;
}

static void bilinear_case(int C, int H, int W, int OH, int OW) {
    printf(" bilinear C=%d %dx%d -> %dx%d\n", C, H, W, OH, OW);
    const size_t n_in = (size_t)C * H * W, n_out = (size_t)C * OH * OW;
    float *in = rand_buf(n_in, -1, 1), *R = rand_buf(n_out, -1, 1);
    float *out = malloc(n_out * sizeof(float)), *ref = malloc(n_out * sizeof(float));
    assert_non_null(out);
    assert_non_null(ref);
    bil_ctx c = {in, C, H, W, OH, OW};
    bilinear_forward(&c, out);
    for (int ch = 0; ch < C; ch++)
        for (int oy = 0; oy < OH; oy++)
            for (int ox = 0; ox < OW; ox++) {
                int y0, y1, x0, x1;
                double wy, wx;
                ref_tap(H, OH, oy, &y0, &y1, &wy);
                ref_tap(W, OW, ox, &x0, &x1, &wx);
                const float *p = in + (size_t)ch * H * W;
                ref[((size_t)ch * OH + oy) * OW + ox] =
                    (float)((1 - wy) * ((1 - wx) * p[y0 * W + x0] + wx * p[y0 * W + x1]) +
                            wy * ((1 - wx) * p[y1 * W + x0] + wx * p[y1 * W + x1]));
            }
    tu_check_close("bilinear fwd vs double reference", out, ref, n_out, 1e-5);
    float *din = const_buf(n_in, GARBAGE);
    cs_bilinear_bwd(R, C, H, W, OH, OW, din);
    assert_written("bilinear din", din, n_in);
    fd_check("bilinear din (adjoint)", bilinear_forward, &c, n_out, R, in, 1, (int)n_in, (int)n_in, din, (int)n_in);
    /* adjoint identity <fwd(x), R> = <x, bwd(R)> */
    const double lhs = weighted_sum(out, R, n_out), rhs = weighted_sum(in, din, n_in);
    printf("  bilinear adjoint <Ax,r>=%.9g <x,A'r>=%.9g rel diff %.3g (tol 1e-5)\n", lhs, rhs,
           fabs(lhs - rhs) / fabs(lhs));
    assert_true(fabs(lhs - rhs) <= 1e-5 * fabs(lhs) + 1e-6);
    free(in), free(R), free(out), free(ref), free(din);
}

static void test_bilinear(void **state) {
    (void)state;
    /* Hand computation, 2x2 -> 4x4: source coordinates of outputs 0..3 are
     * -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to the last sample), so each
     * axis mixes (1,0), (.75,.25), (.25,.75), (0,1). */
    const float in[4] = {0, 1, 2, 3};
    const float want[16] = {0, 0.25f, 0.75f, 1, 0.5f, 0.75f, 1.25f, 1.5f, 1.5f, 1.75f, 2.25f, 2.5f,
                            2, 2.25f, 2.75f, 3};
    float out[16];
    cs_bilinear_fwd(in, 1, 2, 2, out, 4, 4);
    tu_check_close("bilinear 2x2->4x4 vs hand computation", out, want, 16, 1e-6);
    /* 4 -> 2 (downsampling by 2 without antialias): sources 0.5 and 2.5, i.e. means of pairs */
    const float in4[4] = {1, 3, 10, 30};
    const float want2[2] = {2, 20};
    float out2[2];
    cs_bilinear_fwd(in4, 1, 1, 4, out2, 1, 2);
    tu_check_close("bilinear 1x4->1x2 vs hand computation", out2, want2, 2, 1e-6);

    bilinear_case(2, 5, 7, 3, 11);
    bilinear_case(1, 4, 4, 16, 16);
    bilinear_case(3, 6, 5, 6, 5); /* identity */
}

/* ------------------------------------------------- threaded code paths
 * Sizes above the thresholds where the ops split work over OpenMP threads,
 * checked against closed-form backward formulas evaluated in double. */

static void test_threaded_sizes(void **state) {
    (void)state;
    {
        const int rows = 300, dim = 256;
        const size_t n = (size_t)rows * dim;
        float *x = rand_buf(n, -2, 2), *dy = rand_buf(n, -1, 1);
        cs_tparam g = make_param("g", (size_t)dim, 0.5f, 1.5f), b = make_param("b", (size_t)dim, -1, 1);
        float *y = malloc(n * sizeof(float)), *yref = malloc(n * sizeof(float)), *dx = malloc(n * sizeof(float));
        float *dx_ref = malloc(n * sizeof(float)), *dg_ref = calloc((size_t)dim, sizeof(float));
        float *db_ref = calloc((size_t)dim, sizeof(float)), *mean = malloc(rows * sizeof(float));
        float *rstd = malloc(rows * sizeof(float));
        double *dgd = calloc((size_t)dim, sizeof(double)), *dbd = calloc((size_t)dim, sizeof(double));
        assert_true(y && yref && dx && dx_ref && dg_ref && db_ref && mean && rstd && dgd && dbd);
        cs_layernorm_fwd(x, y, rows, dim, &g, &b, 1e-6f, mean, rstd);
        cs_layernorm(x, yref, rows, dim, g.w, b.w, 1e-6f, 2);
        tu_check_close("layernorm 300x256 fwd vs cs_layernorm", y, yref, n, 1e-5);
        cs_layernorm_bwd(x, dy, rows, dim, &g, &b, mean, rstd, dx);
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * dim, *gr = dy + (size_t)r * dim;
            double mu = 0, var = 0, s1 = 0, s2 = 0;
            for (int i = 0; i < dim; i++) mu += xr[i];
            mu /= dim;
            for (int i = 0; i < dim; i++) var += (xr[i] - mu) * (xr[i] - mu);
            const double rs = 1.0 / sqrt(var / dim + 1e-6);
            for (int i = 0; i < dim; i++) {
                const double xh = (xr[i] - mu) * rs, d = (double)gr[i] * g.w[i];
                s1 += d, s2 += d * xh;
                dgd[i] += gr[i] * xh, dbd[i] += gr[i];
            }
            for (int i = 0; i < dim; i++) {
                const double xh = (xr[i] - mu) * rs;
                dx_ref[(size_t)r * dim + i] = (float)(rs * ((double)gr[i] * g.w[i] - s1 / dim - xh * s2 / dim));
            }
        }
        for (int i = 0; i < dim; i++) dg_ref[i] = (float)dgd[i], db_ref[i] = (float)dbd[i];
        float *dg = param_grad(&g), *db = param_grad(&b);
        tu_check_close("layernorm 300x256 din vs double formula", dx, dx_ref, n, 1e-4);
        tu_check_close("layernorm 300x256 dgamma vs double formula", dg, dg_ref, (size_t)dim, 1e-4);
        tu_check_close("layernorm 300x256 dbeta vs double formula", db, db_ref, (size_t)dim, 1e-4);
        free(x), free(dy), free(y), free(yref), free(dx), free(dx_ref), free(dg_ref), free(db_ref), free(mean);
        free(rstd), free(dgd), free(dbd), free(dg), free(db);
        free_param(&g), free_param(&b);
    }
    {
        /* attention 400 x 330 (softmax split over threads), strided q/k/v */
        const int nq = 400, nk = 330, dh = 8, ld = 3 * dh;
        const float scale = 1.0f / sqrtf((float)dh);
        float *qkv_q = rand_buf((size_t)nq * ld, -2, 2), *qkv_k = rand_buf((size_t)nk * ld, -2, 2);
        float *q = qkv_q, *k = qkv_k + dh, *v = qkv_k + 2 * dh;
        float *dout = rand_buf((size_t)nq * dh, -1, 1);
        float *P = malloc((size_t)nq * nk * sizeof(float)), *scratch = malloc((size_t)nq * nk * sizeof(float));
        float *o = malloc((size_t)nq * dh * sizeof(float)), *oref = malloc((size_t)nq * dh * sizeof(float));
        float *dq = calloc((size_t)nq * ld, sizeof(float)), *dkv = calloc((size_t)nk * ld, sizeof(float));
        float *dq_ref = calloc((size_t)nq * ld, sizeof(float)), *dkv_ref = calloc((size_t)nk * ld, sizeof(float));
        double *Pd = malloc((size_t)nq * nk * sizeof(double)), *dS = malloc((size_t)nq * nk * sizeof(double));
        assert_true(P && scratch && o && oref && dq && dkv && dq_ref && dkv_ref && Pd && dS);
        cs_attn_head_fwd(q, ld, k, ld, v, ld, nq, nk, dh, scale, NULL, P, o, dh, 2);
        cs_attn_head_bwd(q, ld, k, ld, v, ld, nq, nk, dh, scale, P, dout, dh, dq, dkv, dkv + dh, NULL, scratch, 2);
        for (int i = 0; i < nq; i++) {
            double m = -1e300, tot = 0, rsum = 0;
            double *pr = Pd + (size_t)i * nk;
            for (int j = 0; j < nk; j++) {
                double d = 0;
                for (int t = 0; t < dh; t++) d += (double)q[i * ld + t] * k[j * ld + t];
                pr[j] = scale * d;
                if (pr[j] > m) m = pr[j];
            }
            for (int j = 0; j < nk; j++) tot += (pr[j] = exp(pr[j] - m));
            for (int j = 0; j < nk; j++) pr[j] /= tot;
            for (int t = 0; t < dh; t++) {
                double a = 0;
                for (int j = 0; j < nk; j++) a += pr[j] * v[j * ld + t];
                oref[i * dh + t] = (float)a;
            }
            for (int j = 0; j < nk; j++) {
                double dp = 0;
                for (int t = 0; t < dh; t++) dp += (double)dout[i * dh + t] * v[j * ld + t];
                dS[(size_t)i * nk + j] = dp;
                rsum += dp * pr[j];
            }
            for (int j = 0; j < nk; j++) dS[(size_t)i * nk + j] = pr[j] * (dS[(size_t)i * nk + j] - rsum);
        }
        for (int i = 0; i < nq; i++)
            for (int t = 0; t < dh; t++) {
                double a = 0;
                for (int j = 0; j < nk; j++) a += dS[(size_t)i * nk + j] * k[j * ld + t];
                dq_ref[i * ld + t] = (float)(scale * a);
            }
        for (int j = 0; j < nk; j++)
            for (int t = 0; t < dh; t++) {
                double a = 0, b = 0;
                for (int i = 0; i < nq; i++) {
                    a += dS[(size_t)i * nk + j] * q[i * ld + t];
                    b += Pd[(size_t)i * nk + j] * dout[i * dh + t];
                }
                dkv_ref[j * ld + t] = (float)(scale * a);
                dkv_ref[j * ld + dh + t] = (float)b;
            }
        tu_check_close("attention 400x330 o vs double", o, oref, (size_t)nq * dh, 1e-5);
        tu_check_close("attention 400x330 dq vs double", dq, dq_ref, (size_t)nq * ld, 1e-5);
        tu_check_close("attention 400x330 dk,dv vs double", dkv, dkv_ref, (size_t)nk * ld, 1e-5);
        free(qkv_q), free(qkv_k), free(dout), free(P), free(scratch), free(o), free(oref), free(dq), free(dkv);
        free(dq_ref), free(dkv_ref), free(Pd), free(dS);
    }
    {
        /* conv 3x3 pad 1, 16 -> 12 channels on 24x24 (im2col/col2im split over threads) */
        const int Cin = 16, Cout = 12, H = 24, W = 24, ks = 3, pad = 1, HW = H * W;
        const size_t n_in = (size_t)Cin * HW, n_out = (size_t)Cout * HW, n_w = (size_t)Cout * Cin * 9;
        float *in = rand_buf(n_in, -1, 1), *dout = rand_buf(n_out, -1, 1);
        cs_tparam w = make_param("w", n_w, -0.3f, 0.3f), b = make_param("b", (size_t)Cout, -1, 1);
        float *col = malloc((size_t)Cin * 9 * HW * sizeof(float)), *din = malloc(n_in * sizeof(float));
        double *din_d = calloc(n_in, sizeof(double)), *dw_d = calloc(n_w, sizeof(double));
        float *din_ref = malloc(n_in * sizeof(float)), *dw_ref = malloc(n_w * sizeof(float));
        assert_true(col && din && din_d && dw_d && din_ref && dw_ref);
        cs_conv2d_bwd(in, Cin, H, W, &w, &b, Cout, ks, pad, dout, din, col, 2);
        for (int co = 0; co < Cout; co++)
            for (int oy = 0; oy < H; oy++)
                for (int ox = 0; ox < W; ox++) {
                    const double gv = dout[(size_t)co * HW + oy * W + ox];
                    for (int ci = 0; ci < Cin; ci++)
                        for (int ky = 0; ky < ks; ky++)
                            for (int kx = 0; kx < ks; kx++) {
                                const int iy = oy + ky - pad, ix = ox + kx - pad;
                                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                                const size_t wi = ((size_t)(co * Cin + ci) * ks + ky) * ks + kx;
                                din_d[(size_t)ci * HW + iy * W + ix] += w.w[wi] * gv;
                                dw_d[wi] += in[(size_t)ci * HW + iy * W + ix] * gv;
                            }
                }
        for (size_t i = 0; i < n_in; i++) din_ref[i] = (float)din_d[i];
        for (size_t i = 0; i < n_w; i++) dw_ref[i] = (float)dw_d[i];
        float *dw = param_grad(&w);
        tu_check_close("conv2d 16x24x24 din vs direct loops", din, din_ref, n_in, 1e-4);
        tu_check_close("conv2d 16x24x24 dweight vs direct loops", dw, dw_ref, n_w, 1e-3);
        free(in), free(dout), free(col), free(din), free(din_d), free(dw_d), free(din_ref), free(dw_ref), free(dw);
        free_param(&w), free_param(&b);
    }
    {
        const size_t n = 100003;
        float *x = rand_buf(n, -9, 9), *dy = rand_buf(n, -1, 1), *dx = malloc(n * sizeof(float));
        float *ref = malloc(n * sizeof(float));
        assert_true(dx && ref);
        cs_gelu_bwd(x, dy, dx, n);
        for (size_t i = 0; i < n; i++) {
            const double t = x[i];
            ref[i] = (float)(dy[i] * (0.5 * (1 + erf(t / sqrt(2.0))) + t * exp(-0.5 * t * t) / sqrt(2 * M_PI)));
        }
        tu_check_close("gelu bwd n=1e5 vs double formula", dx, ref, n, 1e-6);
        free(x), free(dy), free(dx), free(ref);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_linear),     cmocka_unit_test(test_layernorm), cmocka_unit_test(test_groupnorm),
        cmocka_unit_test(test_activations), cmocka_unit_test(test_softmax_bwd), cmocka_unit_test(test_attention),
        cmocka_unit_test(test_conv2d),     cmocka_unit_test(test_convT),     cmocka_unit_test(test_bilinear),
        cmocka_unit_test(test_threaded_sizes), cmocka_unit_test(test_softmax_groups),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
