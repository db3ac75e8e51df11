/* Training losses (src/train_loss.c): hand-computed values, double central
 * finite differences of every gradient, Hungarian matching against brute force
 * (on a case where greedy matching is wrong), G = 0, G > Q and error paths. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cellsam.h"
#include "common.h"
#include "train.h"
#include "testutil.h"

/* Own small generator so the test does not depend on other training files. */
static uint64_t g_rng_state;
static void rng_seed(uint64_t s) { g_rng_state = s * 0x9E3779B97F4A7C15ull + 1; }
static double rng_uniform(void) {
    g_rng_state ^= g_rng_state << 13;
    g_rng_state ^= g_rng_state >> 7;
    g_rng_state ^= g_rng_state << 17;
    return (double)(g_rng_state >> 11) * (1.0 / 9007199254740992.0);
}
static float rng_range(double lo, double hi) { return (float)(lo + (hi - lo) * rng_uniform()); }

/* Relative error metric of the training tests: |a-n| / max(|a|+|n|, floor). */
static double rel_err(double a, double n, double floor_) {
    double d = fabs(a) + fabs(n);
    return fabs(a - n) / (d > floor_ ? d : floor_);
}

#define FD_TOL 1e-4     /* relative; losses are evaluated in double, grads stored as float32 */
#define FD_FLOOR 1e-6   /* below this |a|+|n| the error is measured absolutely */

/* Perturb v[i] by +-h in float and return the actual step (denominator). */
static double fd_step(float *v, size_t i, double h, float *plus, float *minus) {
    float x = v[i];
    *plus = (float)(x + h);
    *minus = (float)(x - h);
    return (double)*plus - (double)*minus;
}

static void report(const char *what, size_t n, double max_err, double tol) {
    printf("  %-44s n=%-5zu max_rel_err=%.3g (tol %.1g)\n", what, n, max_err, tol);
    if (!(max_err <= tol)) fail_msg("%s: max relative gradient error %.4g exceeds %.1g", what, max_err, tol);
}

/* ------------------------------------------------------------ focal */

static void test_focal_values(void **state) {
    (void)state;
    const double ln2 = log(2.0);
    float x[4] = {0, 0, 100, -100};
    float t[4] = {1, 0, 0, 1};
    float g[4];
    /* x = 0: p = 0.5, ce = ln 2, (1-p_t)^2 = 1/4; alpha_t = 0.25 (t=1) or 0.75 (t=0). */
    double l1 = cs_loss_sigmoid_focal(x, t, 1, 0.25f, 2.0f, 1.0f, g);
    double want1 = 0.25 * 0.25 * ln2;
    /* d/dx = alpha_t [(p-t) m^2 + ce 2 m (1-2t) p(1-p)] with m = 1/2. */
    double dwant1 = 0.25 * (-0.5 * 0.25 + ln2 * 2 * 0.5 * -1.0 * 0.25);
    double l0 = cs_loss_sigmoid_focal(x + 1, t + 1, 1, 0.25f, 2.0f, 1.0f, g + 1);
    double want0 = 0.75 * 0.25 * ln2;
    double dwant0 = 0.75 * (0.5 * 0.25 + ln2 * 2 * 0.5 * 1.0 * 0.25);
    /* Confidently wrong logits: ce ~ |x|, (1-p_t) ~ 1: loss alpha_t |x|, finite. */
    double lbig = cs_loss_sigmoid_focal(x + 2, t + 2, 2, 0.25f, 2.0f, 1.0f, g + 2);
    double wantbig = 0.75 * 100 + 0.25 * 100;
    printf("  focal(x=0,t=1) %.9f want %.9f; grad %.9f want %.9f\n", l1, want1, (double)g[0], dwant1);
    printf("  focal(x=0,t=0) %.9f want %.9f; grad %.9f want %.9f\n", l0, want0, (double)g[1], dwant0);
    printf("  focal(+-100 wrong) %.6f want %.6f; grads %g %g\n", lbig, wantbig, (double)g[2], (double)g[3]);
    assert_true(fabs(l1 - want1) < 1e-12);
    assert_true(fabs(l0 - want0) < 1e-12);
    assert_true(fabs(g[0] - dwant1) < 1e-7);
    assert_true(fabs(g[1] - dwant0) < 1e-7);
    assert_true(fabs(lbig - wantbig) < 1e-6);
    assert_true(fabs(g[2] - 0.75) < 1e-6 && fabs(g[3] + 0.25) < 1e-6);
    /* scale multiplies the gradient only. */
    float gs;
    double ls = cs_loss_sigmoid_focal(x, t, 1, 0.25f, 2.0f, 3.0f, &gs);
    assert_true(fabs(ls - want1) < 1e-12);
    assert_true(fabs(gs - 3 * dwant1) < 1e-6);
    /* gamma 0, alpha < 0 (no weighting): plain BCE. */
    double bce = cs_loss_sigmoid_focal(x, t, 2, -1.0f, 0.0f, 1.0f, NULL);
    assert_true(fabs(bce - 2 * ln2) < 1e-12);
    assert_true(cs_loss_sigmoid_focal(x, t, 0, 0.25f, 2.0f, 1.0f, NULL) == 0.0);
    assert_true(isnan(cs_loss_sigmoid_focal(NULL, t, 1, 0.25f, 2.0f, 1.0f, NULL)));
}

static void focal_fd_case(float alpha, float gamma, int soft, const char *what) {
    enum { N = 40 };
    float x[N], t[N], g[N];
    for (int i = 0; i < N; i++) {
        x[i] = rng_range(-5, 5);
        t[i] = soft ? rng_range(0, 1) : (float)(rng_uniform() < 0.3);
    }
    const float scale = 0.7f;
    cs_loss_sigmoid_focal(x, t, N, alpha, gamma, scale, g);
    double max_err = 0;
    for (int i = 0; i < N; i++) {
        float xi = x[i], xp, xm;
        double step = fd_step(x, (size_t)i, 1e-3, &xp, &xm);
        x[i] = xp;
        double lp = cs_loss_sigmoid_focal(x, t, N, alpha, gamma, scale, NULL);
        x[i] = xm;
        double lm = cs_loss_sigmoid_focal(x, t, N, alpha, gamma, scale, NULL);
        x[i] = xi;
        double num = scale * (lp - lm) / step;
        double e = rel_err(g[i], num, FD_FLOOR);
        if (e > max_err) max_err = e;
    }
    report(what, N, max_err, FD_TOL);
}

static void test_focal_fd(void **state) {
    (void)state;
    rng_seed(1);
    focal_fd_case(0.25f, 2.0f, 0, "focal grad, alpha .25 gamma 2, hard t");
    focal_fd_case(0.25f, 2.0f, 1, "focal grad, alpha .25 gamma 2, soft t");
    focal_fd_case(0.4f, 1.5f, 1, "focal grad, alpha .4 gamma 1.5, soft t");
    focal_fd_case(-1.0f, 0.0f, 1, "focal grad, no alpha, gamma 0 (BCE)");
}

/* ------------------------------------------------------------ dice / mse / l1 */

static void test_dice(void **state) {
    (void)state;
    /* x = 0 -> p = 1/2; t = 1,1,0,0: I = 1, S = 2 + 2: 1 - 3/5. */
    float x[4] = {0, 0, 0, 0}, t[4] = {1, 1, 0, 0};
    double l = cs_loss_dice(x, t, 4, 1.0f, NULL);
    printf("  dice(x=0, t=1100) %.9f want 0.4\n", l);
    assert_true(fabs(l - 0.4) < 1e-12);
    /* Perfect saturated prediction: (2n+1)/(2n+1) -> 0. */
    float xs[3] = {60, 60, -60}, ts[3] = {1, 1, 0};
    double l0 = cs_loss_dice(xs, ts, 3, 1.0f, NULL);
    assert_true(fabs(l0) < 1e-12);
    assert_true(fabs(cs_loss_dice(NULL, NULL, 0, 1.0f, NULL)) < 1e-15);

    enum { N = 50 };
    float xr[N], tr[N], g[N];
    rng_seed(2);
    for (int i = 0; i < N; i++) {
        xr[i] = rng_range(-3, 3);
        tr[i] = (float)(rng_uniform() < 0.4);
    }
    const float scale = 1.3f;
    cs_loss_dice(xr, tr, N, scale, g);
    double max_err = 0;
    for (int i = 0; i < N; i++) {
        float xi = xr[i], xp, xm;
        double step = fd_step(xr, (size_t)i, 1e-3, &xp, &xm);
        xr[i] = xp;
        double lp = cs_loss_dice(xr, tr, N, scale, NULL);
        xr[i] = xm;
        double lm = cs_loss_dice(xr, tr, N, scale, NULL);
        xr[i] = xi;
        double e = rel_err(g[i], scale * (lp - lm) / step, FD_FLOOR);
        if (e > max_err) max_err = e;
    }
    report("dice grad", N, max_err, FD_TOL);
}

static void test_mse_l1(void **state) {
    (void)state;
    float a[3] = {1, -2, 0.5f}, b[3] = {0, 1, 0.5f}, g[3];
    double l = cs_loss_mse(a, b, 3, 0.5f, g);
    assert_true(fabs(l - 10.0) < 1e-12);
    /* d(0.5 * sum (a-b)^2)/da = a - b. */
    assert_true(g[0] == 1.0f && g[1] == -3.0f && g[2] == 0.0f);

    enum { N = 20 };
    float ar[N], br[N], gr[N];
    rng_seed(3);
    for (int i = 0; i < N; i++) {
        ar[i] = rng_range(-2, 2);
        br[i] = rng_range(-2, 2);
    }
    cs_loss_mse(ar, br, N, 2.0f, gr);
    double max_err = 0;
    for (int i = 0; i < N; i++) {
        float ai = ar[i], xp, xm;
        double step = fd_step(ar, (size_t)i, 1e-3, &xp, &xm);
        ar[i] = xp;
        double lp = cs_loss_mse(ar, br, N, 2.0f, NULL);
        ar[i] = xm;
        double lm = cs_loss_mse(ar, br, N, 2.0f, NULL);
        ar[i] = ai;
        double e = rel_err(gr[i], 2.0 * (lp - lm) / step, FD_FLOOR);
        if (e > max_err) max_err = e;
    }
    report("mse grad", N, max_err, FD_TOL);

    float p[4] = {0.5f, 0.25f, 0.1f, 0.3f}, q[4] = {0.25f, 0.5f, 0.1f, 0.2f}, gl[4];
    double l1 = cs_loss_box_l1(p, q, 2.0f, gl);
    printf("  box L1 %.9f want 0.6\n", l1);
    assert_true(fabs(l1 - (0.25 + 0.25 + 0.0 + (double)(0.3f - 0.2f))) < 1e-9);
    assert_true(gl[0] == 2.0f && gl[1] == -2.0f && gl[2] == 0.0f && gl[3] == 2.0f);
    assert_true(isnan(cs_loss_box_l1(NULL, q, 1.0f, NULL)));
}

/* ------------------------------------------------------------ GIoU */

static void test_giou_values(void **state) {
    (void)state;
    struct { float a[4], b[4]; double want; const char *what; } cases[] = {
        {{0.5f, 0.5f, 0.25f, 0.5f}, {0.5f, 0.5f, 0.25f, 0.5f}, 0.0, "identical"},
        /* xyxy [0,0,1,1] vs [2,0,3,1]: I 0, U 2, C 3: GIoU -1/3. */
        {{0.5f, 0.5f, 1, 1}, {2.5f, 0.5f, 1, 1}, 1.0 + 1.0 / 3.0, "disjoint"},
        /* [0,0,2,2] vs [1,1,3,3]: I 1, U 7, C 9. */
        {{1, 1, 2, 2}, {2, 2, 2, 2}, 1.0 - (1.0 / 7.0 - 2.0 / 9.0), "overlapping"},
        /* [0,0,4,4] contains [1,1,2,2]: IoU 1/16, C = U. */
        {{2, 2, 4, 4}, {1.5f, 1.5f, 1, 1}, 1.0 - 1.0 / 16.0, "contained"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        float g[4];
        double l = cs_loss_giou(cases[c].a, cases[c].b, 1.0f, g);
        printf("  1-GIoU %-12s %.9f want %.9f\n", cases[c].what, l, cases[c].want);
        assert_true(fabs(l - cases[c].want) < 1e-6);
        for (int k = 0; k < 4; k++) assert_true(isfinite(g[k]));
    }
    /* A perfect match of a 3-pixel cell (1024 frame) must cost ~0: the anti-0/0
     * epsilon may not bias small boxes. */
    float small[4] = {0.5f, 0.5f, 3.0f / 1024, 3.0f / 1024};
    double ls = cs_loss_giou(small, small, 1.0f, NULL);
    printf("  1-GIoU identical 3 px box %.3g (tol 1e-5)\n", ls);
    assert_true(fabs(ls) < 1e-5);
    /* Degenerate boxes: zero and negative widths must not give NaN. */
    float z[4] = {0.5f, 0.5f, 0, 0}, neg[4] = {0.2f, 0.3f, -0.1f, 0.2f}, ok[4] = {0.5f, 0.5f, 0.2f, 0.2f};
    float g[4];
    double l1 = cs_loss_giou(z, z, 1.0f, g);
    assert_true(isfinite(l1) && isfinite(g[0]) && isfinite(g[2]));
    double l2 = cs_loss_giou(neg, ok, 1.0f, g);
    assert_true(isfinite(l2) && isfinite(g[0]) && isfinite(g[1]) && isfinite(g[3]));
    assert_true(g[2] == 0.0f); /* a clamped (negative) width gets no gradient */
    double l3 = cs_loss_giou(z, ok, 1.0f, g);
    assert_true(isfinite(l3) && l3 >= 0 && l3 <= 2);
    printf("  degenerate: 1-GIoU(point,point) %.6f, (neg width, box) %.6f, (point, box) %.6f\n", l1, l2, l3);
}

static void test_giou_fd(void **state) {
    (void)state;
    rng_seed(4);
    double max_err = 0;
    int n = 0;
    const float scale = 1.7f;
    for (int trial = 0; trial < 40; trial++) {
        float a[4], b[4], g[4];
        /* Centres spread so that overlapping, disjoint and nested pairs all occur. */
        a[0] = rng_range(0.2, 0.8);
        a[1] = rng_range(0.2, 0.8);
        a[2] = rng_range(0.05, 0.5);
        a[3] = rng_range(0.05, 0.5);
        b[0] = rng_range(0.2, 0.8);
        b[1] = rng_range(0.2, 0.8);
        b[2] = rng_range(0.05, 0.5);
        b[3] = rng_range(0.05, 0.5);
        cs_loss_giou(a, b, scale, g);
        for (int k = 0; k < 4; k++) {
            float ak = a[k], xp, xm;
            double step = fd_step(a, (size_t)k, 1e-4, &xp, &xm);
            a[k] = xp;
            double lp = cs_loss_giou(a, b, scale, NULL);
            a[k] = xm;
            double lm = cs_loss_giou(a, b, scale, NULL);
            a[k] = ak;
            double e = rel_err(g[k], scale * (lp - lm) / step, FD_FLOOR);
            if (e > max_err) max_err = e;
            n++;
        }
    }
    report("GIoU grad (40 random pairs)", (size_t)n, max_err, FD_TOL);
}

/* ------------------------------------------------------------ DETR */

/* Independent matcher cost (Anchor-DETR HungarianMatcher) for brute force. */
static double ref_giou(const float *a, const float *b) {
    double ax1 = a[0] - a[2] / 2.0, ax2 = a[0] + a[2] / 2.0, ay1 = a[1] - a[3] / 2.0, ay2 = a[1] + a[3] / 2.0;
    double bx1 = b[0] - b[2] / 2.0, bx2 = b[0] + b[2] / 2.0, by1 = b[1] - b[3] / 2.0, by2 = b[1] + b[3] / 2.0;
    double iw = fmax(0, fmin(ax2, bx2) - fmax(ax1, bx1)), ih = fmax(0, fmin(ay2, by2) - fmax(ay1, by1));
    double inter = iw * ih;
    double uni = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter;
    double c = (fmax(ax2, bx2) - fmin(ax1, bx1)) * (fmax(ay2, by2) - fmin(ay1, by1));
    return inter / uni - (c - uni) / c;
}

static double ref_cost(const float *logits, const float *boxes, int nc, const float *gt, int q, int g,
                       const cs_detr_loss_params *p) {
    double prob = 1.0 / (1.0 + exp(-(double)logits[q * nc + p->target_class]));
    double neg = (1 - 0.25) * prob * prob * -log(1 - prob + 1e-8);
    double pos = 0.25 * (1 - prob) * (1 - prob) * -log(prob + 1e-8);
    double l1 = 0;
    for (int k = 0; k < 4; k++) l1 += fabs((double)boxes[q * 4 + k] - gt[g * 4 + k]);
    return p->cost_class * (pos - neg) + p->cost_bbox * l1 - p->cost_giou * ref_giou(boxes + q * 4, gt + g * 4);
}

/* Minimum total cost over all injective maps gt -> query (G <= Q, small). */
static double brute_force(const float *logits, const float *boxes, int Q, int nc, const float *gt, int G,
                          const cs_detr_loss_params *p, int *best) {
    int cur[8], used[16] = {0};
    double best_cost = INFINITY;
    /* Iterative depth-first enumeration. */
    int depth = 0;
    cur[0] = -1;
    while (depth >= 0) {
        if (cur[depth] >= 0) used[cur[depth]] = 0;
        cur[depth]++;
        while (cur[depth] < Q && used[cur[depth]]) cur[depth]++;
        if (cur[depth] >= Q) {
            depth--;
            continue;
        }
        used[cur[depth]] = 1;
        if (depth == G - 1) {
            double c = 0;
            for (int g = 0; g < G; g++) c += ref_cost(logits, boxes, nc, gt, cur[g], g, p);
            if (c < best_cost) {
                best_cost = c;
                memcpy(best, cur, (size_t)G * sizeof *best);
            }
        } else {
            depth++;
            cur[depth] = -1;
        }
    }
    return best_cost;
}

/* Two ground-truth boxes A (x 0.3) and B (x 0.5); query 0 sits at 0.39 (best for
 * A, nearly as good for B), query 1 at 0.18 (only near A). Greedy per gt gives
 * A<-q0, B<-q1; the optimum is A<-q1, B<-q0. Queries 2, 3 are far away. */
static void test_detr_matching_known(void **state) {
    (void)state;
    cs_detr_loss_params p = cs_detr_loss_default_params();
    enum { Q = 4, NC = 2, G = 2 };
    float logits[Q * NC] = {0, 0, 0, 0, 0, 0, 0, 0};
    float boxes[Q * 4] = {0.39f, 0.5f, 0.2f, 0.2f, 0.18f, 0.5f, 0.2f, 0.2f,
                          0.85f, 0.85f, 0.1f, 0.1f, 0.1f, 0.9f, 0.1f, 0.1f};
    float gt[G * 4] = {0.3f, 0.5f, 0.2f, 0.2f, 0.5f, 0.5f, 0.2f, 0.2f};
    int match[G];
    cs_detr_loss_value v;
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, G, &p, NULL, NULL, match, &v), CELLSAM_OK);
    /* Greedy: each gt in turn takes its cheapest free query. */
    int greedy[G], taken[Q] = {0};
    double greedy_cost = 0;
    for (int g = 0; g < G; g++) {
        int bq = -1;
        for (int q = 0; q < Q; q++)
            if (!taken[q] && (bq < 0 || ref_cost(logits, boxes, NC, gt, q, g, &p) <
                                            ref_cost(logits, boxes, NC, gt, bq, g, &p)))
                bq = q;
        greedy[g] = bq;
        taken[bq] = 1;
        greedy_cost += ref_cost(logits, boxes, NC, gt, bq, g, &p);
    }
    int best[G];
    double best_cost = brute_force(logits, boxes, Q, NC, gt, G, &p, best);
    double got_cost = ref_cost(logits, boxes, NC, gt, match[0], 0, &p) + ref_cost(logits, boxes, NC, gt, match[1], 1, &p);
    printf("  match (%d,%d) cost %.6f; brute force (%d,%d) %.6f; greedy (%d,%d) %.6f\n", match[0], match[1],
           got_cost, best[0], best[1], best_cost, greedy[0], greedy[1], greedy_cost);
    assert_int_equal(greedy[0], 0);
    assert_int_equal(greedy[1], 1);
    assert_true(greedy_cost > best_cost + 0.1);
    assert_int_equal(match[0], 1);
    assert_int_equal(match[1], 0);
    assert_int_equal(best[0], 1);
    assert_int_equal(best[1], 0);
    assert_int_equal(v.n_matched, 2);
}

static void random_case(int Q, int nc, int G, float *logits, float *boxes, float *gt) {
    for (int i = 0; i < Q * nc; i++) logits[i] = rng_range(-3, 3);
    for (int q = 0; q < Q; q++) {
        boxes[q * 4 + 0] = rng_range(0.15, 0.85);
        boxes[q * 4 + 1] = rng_range(0.15, 0.85);
        boxes[q * 4 + 2] = rng_range(0.05, 0.3);
        boxes[q * 4 + 3] = rng_range(0.05, 0.3);
    }
    for (int g = 0; g < G; g++) {
        gt[g * 4 + 0] = rng_range(0.15, 0.85);
        gt[g * 4 + 1] = rng_range(0.15, 0.85);
        gt[g * 4 + 2] = rng_range(0.05, 0.3);
        gt[g * 4 + 3] = rng_range(0.05, 0.3);
    }
}

static void test_detr_matching_brute(void **state) {
    (void)state;
    cs_detr_loss_params p = cs_detr_loss_default_params();
    enum { Q = 7, NC = 2, G = 4 };
    float logits[Q * NC], boxes[Q * 4], gt[G * 4];
    double max_gap = 0;
    rng_seed(5);
    for (int trial = 0; trial < 30; trial++) {
        random_case(Q, NC, G, logits, boxes, gt);
        int match[G], best[G];
        assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, G, &p, NULL, NULL, match, NULL), CELLSAM_OK);
        double got = 0;
        for (int g = 0; g < G; g++) {
            assert_true(match[g] >= 0 && match[g] < Q);
            for (int h = 0; h < g; h++) assert_int_not_equal(match[g], match[h]);
            got += ref_cost(logits, boxes, NC, gt, match[g], g, &p);
        }
        double want = brute_force(logits, boxes, Q, NC, gt, G, &p, best);
        if (fabs(got - want) > max_gap) max_gap = fabs(got - want);
    }
    printf("  30 random 7x4 cases: max |matched cost - brute-force optimum| = %.3g (tol 1e-6)\n", max_gap);
    assert_true(max_gap < 1e-6);
}

/* Static anchor matching: each box goes to the anchors nearest its centre, one to
 * one and optimally (two boxes nearest the same anchor share them by total
 * distance), whatever the predictions say; the loss terms stay the DETR ones. */
static void test_detr_anchor_matching(void **state) {
    (void)state;
    enum { Q = 4, NC = 2, G = 3 };
    const float anchors[Q * 2] = {0.1f, 0.1f, 0.9f, 0.1f, 0.1f, 0.9f, 0.9f, 0.9f};
    /* box 0 near anchor 3; boxes 1 and 2 both nearest anchor 0, box 2 only slightly:
     * the optimum gives anchor 0 to box 1 and anchor 1 or 2 to box 2 */
    const float gt[G * 4] = {0.85f, 0.8f, 0.1f, 0.1f, 0.12f, 0.1f, 0.1f, 0.1f, 0.3f, 0.3f, 0.1f, 0.1f};
    float logits[Q * NC], boxes[Q * 4];
    rng_seed(11);
    random_case(Q, NC, G, logits, boxes, (float[G * 4]){0});
    cs_detr_loss_params p = cs_detr_loss_default_params();
    p.anchors = anchors;
    int match[G];
    float dl[Q * NC], db[Q * 4];
    cs_detr_loss_value v;
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, G, &p, dl, db, match, &v), CELLSAM_OK);
    printf("  anchor matching: box->anchor %d %d %d\n", match[0], match[1], match[2]);
    assert_int_equal(match[0], 3);
    assert_int_equal(match[1], 0);
    assert_true(match[2] == 1 || match[2] == 2);
    /* the same predictions under Hungarian matching pick by prediction cost; the
     * anchor rule must not depend on them: shuffle the predictions, same match */
    for (int i = 0; i < Q * 4; i++) boxes[i] = 0.5f;
    int match2[G];
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, G, &p, NULL, NULL, match2, NULL), CELLSAM_OK);
    for (int g = 0; g < G; g++) assert_int_equal(match[g], match2[g]);
    /* unmatched queries get no box gradient; matched ones do */
    for (int k = 0; k < 4; k++) assert_true(db[1 * 4 + k] == 0.0f || match[2] == 1);
    double gsum = 0;
    for (int k = 0; k < 4; k++) gsum += fabs(db[3 * 4 + k]);
    assert_true(gsum > 0);
    assert_int_equal(v.n_matched, G);
}

/* One-to-many targets: every anchor in a box's central region is a positive for it;
 * a box with none takes its nearest anchor (here from a box that has spare ones);
 * losses are normalised by the number of positives. Checked against a loss composed
 * by hand from the single-pair losses. */
static void test_detr_dense_assignment(void **state) {
    (void)state;
    enum { Q = 16, NC = 2, G = 3 };
    float anchors[Q * 2];
    for (int q = 0; q < Q; q++) {
        anchors[2 * q] = (float)(q % 4 + 0.5) / 4.0f; /* 0.125 0.375 0.625 0.875 */
        anchors[2 * q + 1] = (float)(q / 4 + 0.5) / 4.0f;
    }
    /* A: big, centre region (half-extent 0.225) holds anchors 0, 1, 4, 5;
     * B: tiny near anchor 15, holds none; C: tiny, nearest anchor 5, which A gives up */
    const float gt[G * 4] = {0.3f, 0.3f, 0.9f, 0.9f, 0.8f, 0.8f, 0.05f, 0.05f, 0.36f, 0.36f, 0.05f, 0.05f};
    float logits[Q * NC], boxes[Q * 4], dl[Q * NC], db[Q * 4];
    rng_seed(21);
    random_case(Q, NC, 0, logits, boxes, NULL);
    cs_detr_loss_params p = cs_detr_loss_default_params();
    p.anchors = anchors;
    p.dense_center = 0.5f;
    int match[G];
    cs_detr_loss_value v;
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, G, &p, dl, db, match, &v), CELLSAM_OK);
    printf("  dense: %d positives, box->nearest positive %d %d %d\n", v.n_matched, match[0], match[1], match[2]);
    assert_int_equal(v.n_matched, 5);
    assert_int_equal(match[0], 1); /* anchors 1 and 4 tie at L1 0.25 from A's centre: the first */
    assert_int_equal(match[1], 15);
    assert_int_equal(match[2], 5);
    const int owner[Q] = {0, 0, -1, -1, 0, 2, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1};
    float t[Q * NC] = {0};
    double l1 = 0, gi = 0;
    for (int q = 0; q < Q; q++) {
        int g = owner[q];
        double gsum = 0;
        for (int k = 0; k < 4; k++) gsum += fabs(db[q * 4 + k]);
        if (g < 0) {
            assert_true(gsum == 0); /* negatives get no box gradient */
            continue;
        }
        assert_true(gsum > 0);
        t[q * NC + p.target_class] = 1;
        l1 += cs_loss_box_l1(boxes + q * 4, gt + g * 4, 1.0f, NULL);
        gi += cs_loss_giou(boxes + q * 4, gt + g * 4, 1.0f, NULL);
    }
    double cls = cs_loss_sigmoid_focal(logits, t, Q * NC, 0.25f, 2.0f, 1.0f, NULL) / 5;
    double total = 2 * cls + 5 * l1 / 5 + 2 * gi / 5;
    printf("  dense loss total %.9f want %.9f\n", v.total, total);
    assert_true(fabs(v.total - total) < 1e-9);
    /* one-to-many needs anchors, and a fraction in 0..1 */
    p.anchors = NULL;
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, G, &p, NULL, NULL, NULL, NULL), CELLSAM_ERR_INVALID);
    p.anchors = anchors;
    p.dense_center = 1.5f;
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, G, &p, NULL, NULL, NULL, NULL), CELLSAM_ERR_INVALID);
}

/* Total loss composed from the single-pair losses (consistency with the parts). */
static void test_detr_value(void **state) {
    (void)state;
    cs_detr_loss_params p = cs_detr_loss_default_params();
    enum { Q = 5, NC = 2, G = 2 };
    float logits[Q * NC], boxes[Q * 4], gt[G * 4];
    rng_seed(6);
    random_case(Q, NC, G, logits, boxes, gt);
    int match[G];
    cs_detr_loss_value v;
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, G, &p, NULL, NULL, match, &v), CELLSAM_OK);
    float t[Q * NC] = {0};
    double l1 = 0, gi = 0;
    for (int g = 0; g < G; g++) {
        t[match[g] * NC + p.target_class] = 1;
        l1 += cs_loss_box_l1(boxes + match[g] * 4, gt + g * 4, 1.0f, NULL);
        gi += cs_loss_giou(boxes + match[g] * 4, gt + g * 4, 1.0f, NULL);
    }
    double cls = cs_loss_sigmoid_focal(logits, t, Q * NC, 0.25f, 2.0f, 1.0f, NULL) / G;
    double total = 2 * cls + 5 * l1 / G + 2 * gi / G;
    printf("  detr loss total %.9f (cls %.6f bbox %.6f giou %.6f) want %.9f\n", v.total, v.cls, v.bbox, v.giou,
           total);
    assert_true(fabs(v.total - total) < 1e-9);
    assert_true(fabs(v.cls - cls) < 1e-12 && fabs(v.bbox - l1 / G) < 1e-12 && fabs(v.giou - gi / G) < 1e-12);
}

static double detr_total(const float *logits, const float *boxes, int Q, int NC, const float *gt, int G,
                         const cs_detr_loss_params *p, const int *want_match) {
    int match[16];
    cs_detr_loss_value v;
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, G, p, NULL, NULL, match, &v), CELLSAM_OK);
    for (int g = 0; g < G; g++)
        if (match[g] != want_match[g]) fail_msg("matching changed under a finite-difference step (gt %d)", g);
    return v.total;
}

static void detr_fd_case(int Q, int NC, int G, uint64_t seed, const char *what, float dense_center) {
    cs_detr_loss_params p = cs_detr_loss_default_params();
    float anchors[64];
    assert_true(Q <= 32);
    if (dense_center > 0) {
        /* anchors on a loose grid, so that several fall inside the random boxes */
        for (int q = 0; q < Q; q++) {
            anchors[2 * q] = (float)(q % 4 + 0.5) / 4.0f;
            anchors[2 * q + 1] = (float)(q / 4 + 0.5) / (float)((Q + 3) / 4);
        }
        p.anchors = anchors;
        p.dense_center = dense_center;
    }
    float *logits = malloc(sizeof(float) * (size_t)(Q * NC)), *boxes = malloc(sizeof(float) * (size_t)(Q * 4));
    float *gt = malloc(sizeof(float) * (size_t)(G * 4 + 1));
    float *dl = malloc(sizeof(float) * (size_t)(Q * NC)), *db = malloc(sizeof(float) * (size_t)(Q * 4));
    assert_true(logits && boxes && gt && dl && db);
    rng_seed(seed);
    random_case(Q, NC, G, logits, boxes, gt);
    int match[16];
    cs_detr_loss_value v;
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, G, &p, dl, db, match, &v), CELLSAM_OK);
    double err_l = 0, err_b = 0;
    for (int i = 0; i < Q * NC; i++) {
        float xi = logits[i], xp, xm;
        double step = fd_step(logits, (size_t)i, 1e-3, &xp, &xm);
        logits[i] = xp;
        double lp = detr_total(logits, boxes, Q, NC, gt, G, &p, match);
        logits[i] = xm;
        double lm = detr_total(logits, boxes, Q, NC, gt, G, &p, match);
        logits[i] = xi;
        double e = rel_err(dl[i], (lp - lm) / step, FD_FLOOR);
        if (e > err_l) err_l = e;
    }
    int n_nonzero = 0;
    for (int i = 0; i < Q * 4; i++) {
        float xi = boxes[i], xp, xm;
        double step = fd_step(boxes, (size_t)i, 1e-4, &xp, &xm);
        boxes[i] = xp;
        double lp = detr_total(logits, boxes, Q, NC, gt, G, &p, match);
        boxes[i] = xm;
        double lm = detr_total(logits, boxes, Q, NC, gt, G, &p, match);
        boxes[i] = xi;
        double e = rel_err(db[i], (lp - lm) / step, FD_FLOOR);
        if (e > err_b) err_b = e;
        n_nonzero += db[i] != 0;
    }
    char name[128];
    snprintf(name, sizeof name, "%s dlogits", what);
    report(name, (size_t)(Q * NC), err_l, FD_TOL);
    snprintf(name, sizeof name, "%s dboxes (%d non-zero)", what, n_nonzero);
    report(name, (size_t)(Q * 4), err_b, FD_TOL);
    /* Only matched queries receive box gradients (one per box unless one-to-many). */
    assert_true(n_nonzero <= 4 * (dense_center > 0 ? v.n_matched : G));
    assert_true(v.n_matched >= (G < Q ? G : Q) || dense_center > 0);
    if (G > 0) assert_true(n_nonzero > 0);
    free(logits);
    free(boxes);
    free(gt);
    free(dl);
    free(db);
}

static void test_detr_fd(void **state) {
    (void)state;
    detr_fd_case(8, 2, 3, 7, "detr Q8 C2 G3", 0);
    detr_fd_case(6, 3, 5, 8, "detr Q6 C3 G5", 0);
    detr_fd_case(5, 2, 0, 9, "detr Q5 C2 G0", 0);
    detr_fd_case(16, 2, 3, 10, "dense Q16 C2 G3", 0.8f);
    detr_fd_case(12, 2, 4, 12, "dense Q12 C2 G4", 0.5f);
}

static void test_detr_g0_and_g_over_q(void **state) {
    (void)state;
    cs_detr_loss_params p = cs_detr_loss_default_params();
    enum { Q = 3, NC = 2 };
    float logits[Q * NC] = {0, 1, -1, 2, 0.5f, -0.5f};
    float boxes[Q * 4] = {0.2f, 0.2f, 0.1f, 0.1f, 0.5f, 0.5f, 0.2f, 0.2f, 0.8f, 0.8f, 0.1f, 0.1f};
    float dl[Q * NC], db[Q * 4];
    cs_detr_loss_value v;
    /* G = 0: focal against all-zero targets, normaliser 1, no box terms. */
    memset(db, 0x7f, sizeof db);
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, NULL, 0, &p, dl, db, NULL, &v), CELLSAM_OK);
    float zeros[Q * NC] = {0};
    float want_dl[Q * NC];
    double want = 2 * cs_loss_sigmoid_focal(logits, zeros, Q * NC, 0.25f, 2.0f, 2.0f, want_dl);
    printf("  G=0: total %.9f want %.9f, n_matched %d\n", v.total, want, v.n_matched);
    assert_true(fabs(v.total - want) < 1e-12);
    assert_true(v.bbox == 0 && v.giou == 0 && v.n_matched == 0);
    tu_check_close("G=0 dlogits vs 2 * focal grad", dl, want_dl, Q * NC, 1e-7);
    for (int i = 0; i < Q * 4; i++) assert_true(db[i] == 0.0f);

    /* G > Q: every query is used once; the rest of the gt stays unmatched (-1). */
    float gt[5 * 4] = {0.2f, 0.2f, 0.1f, 0.1f, 0.5f, 0.5f, 0.2f, 0.2f, 0.8f, 0.8f, 0.1f, 0.1f,
                       0.3f, 0.7f, 0.1f, 0.1f, 0.7f, 0.3f, 0.1f, 0.1f};
    int match[5];
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, 5, &p, dl, db, match, &v), CELLSAM_OK);
    printf("  G=5>Q=3: match %d %d %d %d %d, n_matched %d\n", match[0], match[1], match[2], match[3], match[4],
           v.n_matched);
    assert_int_equal(v.n_matched, 3);
    /* Boxes 0..2 coincide with gt 0..2, so those pairs are the optimum. */
    assert_int_equal(match[0], 0);
    assert_int_equal(match[1], 1);
    assert_int_equal(match[2], 2);
    assert_int_equal(match[3], -1);
    assert_int_equal(match[4], -1);
    assert_true(fabs(v.giou) < 1e-6 && fabs(v.bbox) < 1e-12);
}

static void test_detr_speed(void **state) {
    (void)state;
    cs_detr_loss_params p = cs_detr_loss_default_params();
    enum { Q = 1000, NC = 2, G = 300 };
    float *logits = malloc(sizeof(float) * Q * NC), *boxes = malloc(sizeof(float) * Q * 4);
    float *gt = malloc(sizeof(float) * G * 4), *dl = malloc(sizeof(float) * Q * NC);
    float *db = malloc(sizeof(float) * Q * 4);
    int *match = malloc(sizeof(int) * G), *seen = calloc(Q, sizeof(int));
    assert_true(logits && boxes && gt && dl && db && match && seen);
    rng_seed(10);
    random_case(Q, NC, G, logits, boxes, gt);
    cs_detr_loss_value v;
    double t0 = cs_now_seconds();
    assert_int_equal(cs_detr_loss(logits, boxes, Q, NC, gt, G, &p, dl, db, match, &v), CELLSAM_OK);
    double dt = cs_now_seconds() - t0;
    printf("  Q=%d G=%d: %.3f s, total %.4f, n_matched %d\n", Q, G, dt, v.total, v.n_matched);
    assert_int_equal(v.n_matched, G);
    for (int g = 0; g < G; g++) {
        assert_true(match[g] >= 0 && match[g] < Q);
        assert_int_equal(seen[match[g]], 0);
        seen[match[g]] = 1;
    }
    assert_true(isfinite(v.total));
    free(logits);
    free(boxes);
    free(gt);
    free(dl);
    free(db);
    free(match);
    free(seen);
}

static void expect_invalid(int rc, const char *what) {
    const char *msg = cellsam_last_error();
    printf("  %-28s rc %d: %s\n", what, rc, msg);
    assert_int_equal(rc, CELLSAM_ERR_INVALID);
    assert_true(msg && msg[0]);
}

static void test_detr_errors(void **state) {
    (void)state;
    cs_detr_loss_params p = cs_detr_loss_default_params();
    float logits[4] = {0, 0, 0, 0}, boxes[8] = {0.5f, 0.5f, 0.1f, 0.1f, 0.3f, 0.3f, 0.1f, 0.1f};
    float gt[4] = {0.5f, 0.5f, 0.1f, 0.1f};
    int match[1];
    expect_invalid(cs_detr_loss(NULL, boxes, 2, 2, gt, 1, &p, NULL, NULL, match, NULL), "NULL logits");
    expect_invalid(cs_detr_loss(logits, NULL, 2, 2, gt, 1, &p, NULL, NULL, match, NULL), "NULL boxes");
    expect_invalid(cs_detr_loss(logits, boxes, 2, 2, gt, 1, NULL, NULL, NULL, match, NULL), "NULL params");
    expect_invalid(cs_detr_loss(logits, boxes, 2, 2, NULL, 1, &p, NULL, NULL, match, NULL), "NULL gt with G=1");
    expect_invalid(cs_detr_loss(logits, boxes, 0, 2, gt, 1, &p, NULL, NULL, match, NULL), "Q=0");
    expect_invalid(cs_detr_loss(logits, boxes, -3, 2, gt, 1, &p, NULL, NULL, match, NULL), "Q<0");
    expect_invalid(cs_detr_loss(logits, boxes, 2, 0, gt, 1, &p, NULL, NULL, match, NULL), "n_classes=0");
    expect_invalid(cs_detr_loss(logits, boxes, 2, 2, gt, -1, &p, NULL, NULL, match, NULL), "G<0");
    p.target_class = 2;
    expect_invalid(cs_detr_loss(logits, boxes, 2, 2, gt, 1, &p, NULL, NULL, match, NULL), "target_class=2 of 2");
    p.target_class = -1;
    expect_invalid(cs_detr_loss(logits, boxes, 2, 2, gt, 1, &p, NULL, NULL, match, NULL), "target_class=-1");
    p = cs_detr_loss_default_params();
    p.focal_gamma = -1;
    expect_invalid(cs_detr_loss(logits, boxes, 2, 2, gt, 1, &p, NULL, NULL, match, NULL), "gamma<0");
    p = cs_detr_loss_default_params();
    p.loss_bbox = NAN;
    expect_invalid(cs_detr_loss(logits, boxes, 2, 2, gt, 1, &p, NULL, NULL, match, NULL), "NaN weight");
    p = cs_detr_loss_default_params();
    logits[3] = NAN;
    expect_invalid(cs_detr_loss(logits, boxes, 2, 2, gt, 1, &p, NULL, NULL, match, NULL), "NaN logit");
    logits[3] = 0;
    boxes[5] = INFINITY;
    expect_invalid(cs_detr_loss(logits, boxes, 2, 2, gt, 1, &p, NULL, NULL, match, NULL), "inf box");
    boxes[5] = 0.3f;
    gt[2] = NAN;
    expect_invalid(cs_detr_loss(logits, boxes, 2, 2, gt, 1, &p, NULL, NULL, match, NULL), "NaN gt box");
    gt[2] = 0.1f;
    /* A valid call afterwards still works. */
    assert_int_equal(cs_detr_loss(logits, boxes, 2, 2, gt, 1, &p, NULL, NULL, match, NULL), CELLSAM_OK);
    assert_int_equal(match[0], 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_focal_values),
        cmocka_unit_test(test_focal_fd),
        cmocka_unit_test(test_dice),
        cmocka_unit_test(test_mse_l1),
        cmocka_unit_test(test_giou_values),
        cmocka_unit_test(test_giou_fd),
        cmocka_unit_test(test_detr_matching_known),
        cmocka_unit_test(test_detr_matching_brute),
        cmocka_unit_test(test_detr_anchor_matching),
        cmocka_unit_test(test_detr_dense_assignment),
        cmocka_unit_test(test_detr_value),
        cmocka_unit_test(test_detr_fd),
        cmocka_unit_test(test_detr_g0_and_g_over_q),
        cmocka_unit_test(test_detr_speed),
        cmocka_unit_test(test_detr_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
