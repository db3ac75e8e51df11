/* Segmentation metrics: hand-computed matchings, the assignment solver against
 * brute force, the sparse metric against a brute-force matching on random
 * label images, and error paths. */
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <tiffio.h>

#include "cellsam.h"
#include "common.h"
#include "metrics.h"
#include "testutil.h"

#if defined(__has_include)
#if __has_include("image_io.h")
#include "image_io.h"
#define HAVE_IMAGE_IO 1
#endif
#endif

#define EPS 1e-12

static cs_match_stats eval_at(const uint32_t *gt, const uint32_t *pred, size_t n, double th) {
    cs_match_stats st;
    int rc = cs_evaluate_labels_at(gt, pred, n, th, &st);
    if (rc) fail_msg("cs_evaluate_labels_at failed: %s", cellsam_last_error());
    return st;
}

static cs_match_stats eval(const uint32_t *gt, const uint32_t *pred, size_t n) {
    cs_match_stats st;
    int rc = cs_evaluate_labels(gt, pred, n, &st);
    if (rc) fail_msg("cs_evaluate_labels failed: %s", cellsam_last_error());
    return st;
}

/* Paint label `id` on the rectangle [x0,x1) x [y0,y1) of a w-wide image. */
static void rect(uint32_t *img, int w, int x0, int y0, int x1, int y1, uint32_t id) {
    for (int y = y0; y < y1; y++)
        for (int x = x0; x < x1; x++) img[y * w + x] = id;
}

static void check_counts(const cs_match_stats *st, int n_gt, int n_pred, int tp) {
    assert_int_equal(st->n_gt, n_gt);
    assert_int_equal(st->n_pred, n_pred);
    assert_int_equal(st->tp, tp);
    assert_int_equal(st->fp, n_pred - tp);
    assert_int_equal(st->fn, n_gt - tp);
}

static void check_ap(const cs_match_stats *st, const double *want) {
    double sum = 0;
    for (int k = 0; k < CS_AP_THRESHOLDS; k++) {
        if (fabs(st->ap[k] - want[k]) > EPS)
            fail_msg("ap[%d] (IoU %.2f) = %.15g, want %.15g", k, cs_ap_threshold(k), st->ap[k], want[k]);
        sum += want[k];
    }
    assert_true(fabs(st->mean_ap - sum / CS_AP_THRESHOLDS) < EPS);
}

/* ------------------------------------------------------------ hand-computed */

static void test_identical(void **state) {
    (void)state;
    uint32_t gt[100] = {0};
    rect(gt, 10, 0, 0, 3, 3, 1);
    rect(gt, 10, 4, 0, 10, 2, 2);
    rect(gt, 10, 2, 5, 7, 9, 3);
    cs_match_stats st = eval(gt, gt, 100);
    check_counts(&st, 3, 3, 3);
    assert_true(st.f1 == 1.0 && st.precision == 1.0 && st.recall == 1.0 && st.mean_ap == 1.0);
    double ones[10] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    check_ap(&st, ones);
}

static void test_empty_cases(void **state) {
    (void)state;
    uint32_t empty[64] = {0}, some[64] = {0};
    rect(some, 8, 0, 0, 2, 2, 1);
    rect(some, 8, 4, 4, 8, 8, 2);
    const double zeros[10] = {0};

    cs_match_stats st = eval(empty, some, 64); /* predictions, no GT */
    check_counts(&st, 0, 2, 0);
    assert_true(st.f1 == 0 && st.precision == 0 && st.recall == 0);
    check_ap(&st, zeros);

    st = eval(some, empty, 64); /* GT, no predictions */
    check_counts(&st, 2, 0, 0);
    assert_true(st.f1 == 0 && st.precision == 0 && st.recall == 0);
    check_ap(&st, zeros);

    /* Both empty: every ratio is 0/0; the paper maps NaN to 0, so F1 = 0. */
    st = eval(empty, empty, 64);
    check_counts(&st, 0, 0, 0);
    assert_true(st.f1 == 0 && st.precision == 0 && st.recall == 0 && st.mean_ap == 0);
    check_ap(&st, zeros);
    assert_false(isnan(st.f1));

    /* Zero pixels is the same as both empty. */
    st = eval(NULL, NULL, 0);
    check_counts(&st, 0, 0, 0);
    assert_true(st.f1 == 0);
}

static void test_one_pixel_shift(void **state) {
    (void)state;
    /* 4x4 square shifted right by one: overlap 12, union 20, IoU 0.6 exactly:
     * passes 0.50, 0.55 and (on the boundary) 0.60. */
    uint32_t gt[100] = {0}, pred[100] = {0};
    rect(gt, 10, 2, 2, 6, 6, 1);
    rect(pred, 10, 3, 2, 7, 6, 1);
    cs_match_stats st = eval(gt, pred, 100);
    check_counts(&st, 1, 1, 1);
    assert_true(st.f1 == 1.0);
    double want[10] = {1, 1, 1, 0, 0, 0, 0, 0, 0, 0};
    check_ap(&st, want);
    assert_true(fabs(st.mean_ap - 0.3) < EPS);

    /* Diagonal shift by one: overlap 9, union 23, IoU 0.391 -> no match at 0.5,
     * a match at 0.39 but not at 0.392. */
    memset(pred, 0, sizeof pred);
    rect(pred, 10, 3, 3, 7, 7, 1);
    st = eval(gt, pred, 100);
    check_counts(&st, 1, 1, 0);
    assert_true(st.f1 == 0 && st.mean_ap == 0);
    st = eval_at(gt, pred, 100, 0.39);
    assert_int_equal(st.tp, 1);
    st = eval_at(gt, pred, 100, 9.0 / 23.0);
    assert_int_equal(st.tp, 1);
    st = eval_at(gt, pred, 100, 0.392);
    assert_int_equal(st.tp, 0);
}

static void test_iou_exactly_half(void **state) {
    (void)state;
    /* GT 2x4 (8 px), prediction its left 1x4 column (4 px) inside it: IoU 4/8 = 0.5. */
    uint32_t gt[64] = {0}, pred[64] = {0};
    rect(gt, 8, 1, 1, 3, 5, 7);
    rect(pred, 8, 1, 1, 2, 5, 3);
    cs_match_stats st = eval(gt, pred, 64);
    check_counts(&st, 1, 1, 1); /* IoU >= 0.5 counts */
    assert_true(st.f1 == 1.0 && st.precision == 1.0 && st.recall == 1.0);
    double want[10] = {1, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    check_ap(&st, want);
    st = eval_at(gt, pred, 64, 0.5000001);
    check_counts(&st, 1, 1, 0);
    assert_true(st.f1 == 0);
}

static void test_split_and_merge(void **state) {
    (void)state;
    uint32_t one[64] = {0}, two[64] = {0};
    rect(one, 8, 0, 0, 4, 4, 1);  /* 16 px */
    rect(two, 8, 0, 0, 2, 4, 1);  /* left half, 8 px: IoU 0.5 with `one` */
    rect(two, 8, 2, 0, 4, 4, 2);  /* right half */

    /* Split: one GT, two predictions. One half matches (IoU 0.5), the other is a FP. */
    cs_match_stats st = eval(one, two, 64);
    check_counts(&st, 1, 2, 1);
    assert_true(fabs(st.f1 - 2.0 / 3.0) < EPS);
    assert_true(fabs(st.precision - 0.5) < EPS && st.recall == 1.0);
    double want_split[10] = {0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    check_ap(&st, want_split);

    /* Merge: two GT, one prediction covering both. */
    st = eval(two, one, 64);
    check_counts(&st, 2, 1, 1);
    assert_true(fabs(st.f1 - 2.0 / 3.0) < EPS);
    assert_true(st.precision == 1.0 && fabs(st.recall - 0.5) < EPS);
    check_ap(&st, want_split);

    /* Uneven split 10 + 6 px: IoU 10/16 = 0.625 passes 0.50..0.60 only. */
    uint32_t uneven[64] = {0};
    rect(uneven, 8, 0, 0, 4, 4, 2);
    rect(uneven, 8, 0, 0, 4, 2, 5); /* 8 px */
    uneven[2 * 8 + 0] = 5;
    uneven[2 * 8 + 1] = 5; /* now 10 px of label 5, 6 px of label 2 */
    st = eval(one, uneven, 64);
    check_counts(&st, 1, 2, 1);
    double want_uneven[10] = {0.5, 0.5, 0.5, 0, 0, 0, 0, 0, 0, 0};
    check_ap(&st, want_uneven);
}

static void test_permuted_and_gapped_ids(void **state) {
    (void)state;
    uint32_t gt[100] = {0}, pred[100] = {0}, gapped[100] = {0};
    const uint32_t perm[4] = {0, 3, 1, 2};
    const uint32_t gaps[4] = {0, 5, 1000, 4000000000u};
    rect(gt, 10, 0, 0, 3, 3, 1);
    rect(gt, 10, 5, 0, 10, 4, 2);
    rect(gt, 10, 0, 6, 10, 10, 3);
    for (int i = 0; i < 100; i++) {
        pred[i] = perm[gt[i]];
        gapped[i] = gaps[gt[i]];
    }
    cs_match_stats st = eval(gt, pred, 100);
    check_counts(&st, 3, 3, 3);
    assert_true(st.f1 == 1.0 && st.mean_ap == 1.0);
    st = eval(gapped, pred, 100);
    check_counts(&st, 3, 3, 3);
    assert_true(st.f1 == 1.0 && st.mean_ap == 1.0);
    st = eval(gt, gapped, 100);
    check_counts(&st, 3, 3, 3);
    assert_true(st.f1 == 1.0 && st.mean_ap == 1.0);
}

/* Greedy matching (best IoU first) that a naive implementation would use. */
static int greedy_tp(const double iou[2][2], double th) {
    int best_g = 0, best_p = 0;
    for (int g = 0; g < 2; g++)
        for (int p = 0; p < 2; p++)
            if (iou[g][p] > iou[best_g][best_p]) {
                best_g = g;
                best_p = p;
            }
    return (iou[best_g][best_p] >= th) + (iou[1 - best_g][1 - best_p] >= th);
}

static void test_greedy_differs_from_optimal(void **state) {
    (void)state;
    /* Pixel counts per (gt, pred) pair: (A,P)=4, (A,Q)=3, (B,P)=3, (B,Q)=1.
     * Areas A=7, B=4, P=7, Q=4. IoU(A,P)=4/10, IoU(A,Q)=3/8, IoU(B,P)=3/8,
     * IoU(B,Q)=1/7. At threshold 0.35 greedy takes A-P (0.4) and is left with
     * B-Q (0.14): 1 TP. The optimum A-Q + B-P gives 2 TP. */
    uint32_t gt[11], pred[11];
    int k = 0;
    for (int i = 0; i < 4; i++, k++) gt[k] = 1, pred[k] = 1;
    for (int i = 0; i < 3; i++, k++) gt[k] = 1, pred[k] = 2;
    for (int i = 0; i < 3; i++, k++) gt[k] = 2, pred[k] = 1;
    gt[k] = 2, pred[k] = 2;
    const double iou[2][2] = {{4.0 / 10, 3.0 / 8}, {3.0 / 8, 1.0 / 7}};
    assert_int_equal(greedy_tp(iou, 0.35), 1);
    cs_match_stats st = eval_at(gt, pred, 11, 0.35);
    check_counts(&st, 2, 2, 2);
    assert_true(st.f1 == 1.0);
    st = eval_at(gt, pred, 11, 0.38); /* only A-P passes now */
    check_counts(&st, 2, 2, 1);
    st = eval(gt, pred, 11);
    check_counts(&st, 2, 2, 0);
}

static void test_large_grid_shift(void **state) {
    (void)state;
    /* 1000x1000 image, 10000 squares of 10x10; the prediction is the GT shifted
     * right by one pixel. Interior squares: IoU 90/110 = 0.818 (also touching the
     * next GT square); the last column of squares is cropped: IoU 90/100 = 0.9.
     * Every row of squares is one connected chain in the overlap graph. */
    enum { W = 1000, S = 10, N = W / S };
    uint32_t *gt = malloc(sizeof(uint32_t) * W * W), *pred = malloc(sizeof(uint32_t) * W * W);
    assert_non_null(gt);
    assert_non_null(pred);
    for (int y = 0; y < W; y++)
        for (int x = 0; x < W; x++) {
            gt[y * W + x] = (uint32_t)((y / S) * N + x / S + 1);
            pred[y * W + x] = x > 0 ? (uint32_t)((y / S) * N + (x - 1) / S + 1) : 0;
        }
    double t0 = cs_now_seconds();
    cs_match_stats st = eval(gt, pred, (size_t)W * W);
    printf("  10000-label image evaluated in %.3f s\n", cs_now_seconds() - t0);
    check_counts(&st, N * N, N * N, N * N);
    assert_true(st.f1 == 1.0);
    double edge = (double)N / (N + 2.0 * (N * N - N));
    double want[10] = {1, 1, 1, 1, 1, 1, 1, edge, edge, 0};
    check_ap(&st, want);

    /* One prediction covering everything: 10000 GT rows, one column. */
    for (size_t i = 0; i < (size_t)W * W; i++) pred[i] = 42;
    st = eval(gt, pred, (size_t)W * W);
    check_counts(&st, N * N, 1, 0);
    free(gt);
    free(pred);
}

/* ------------------------------------------------------------ brute force */

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static uint32_t rng(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

/* Minimum over injections of the smaller side into the larger (recursive). */
static void brute_rec(const double *c, int nr, int nc, int depth, int used, double acc, double *best) {
    int transposed = nr > nc;
    int small = transposed ? nc : nr, large = transposed ? nr : nc;
    if (depth == small) {
        if (acc < *best) *best = acc;
        return;
    }
    for (int j = 0; j < large; j++) {
        if (used & (1 << j)) continue;
        double v = transposed ? c[j * nc + depth] : c[depth * nc + j];
        brute_rec(c, nr, nc, depth + 1, used | (1 << j), acc + v, best);
    }
}

static double brute_min(const double *c, int nr, int nc) {
    double best = INFINITY;
    brute_rec(c, nr, nc, 0, 0, 0.0, &best);
    return best;
}

static void test_assignment_vs_brute_force(void **state) {
    (void)state;
    double cost[49];
    int ri[7], ci[7];
    double max_diff = 0;
    int trials = 0;
    for (int nr = 1; nr <= 7; nr++)
        for (int nc = 1; nc <= 7; nc++)
            for (int rep = 0; rep < 12; rep++) {
                for (int k = 0; k < nr * nc; k++) {
                    /* Alternate continuous costs and small integers (many ties). */
                    cost[k] = rep % 2 ? (double)(rng() % 2001) / 1000.0 - 1.0 : (double)(rng() % 4) - 2.0;
                }
                int kmin = nr < nc ? nr : nc;
                assert_int_equal(cs_linear_sum_assignment(cost, nr, nc, ri, ci), 0);
                int seen_c = 0;
                double total = 0;
                for (int k = 0; k < kmin; k++) {
                    assert_true(ri[k] >= 0 && ri[k] < nr && ci[k] >= 0 && ci[k] < nc);
                    if (k) assert_true(ri[k] > ri[k - 1]);
                    assert_false(seen_c & (1 << ci[k]));
                    seen_c |= 1 << ci[k];
                    total += cost[ri[k] * nc + ci[k]];
                }
                double d = fabs(total - brute_min(cost, nr, nc));
                if (d > max_diff) max_diff = d;
                trials++;
            }
    printf("  %d random matrices up to 7x7: max |solver - brute force| = %.3g\n", trials, max_diff);
    assert_true(max_diff < 1e-9);

    /* A known case: the diagonal is not optimal. */
    const double c3[9] = {4, 1, 3, 2, 0, 5, 3, 2, 2};
    assert_int_equal(cs_linear_sum_assignment(c3, 3, 3, ri, ci), 0);
    assert_int_equal(ci[0], 1);
    assert_int_equal(ci[1], 0);
    assert_int_equal(ci[2], 2);
}

/* Brute-force TP for small label images: dense IoU, then the paper's cost
 * minimized over all injections. */
static int brute_tp(const uint32_t *gt, const uint32_t *pred, int n, int ng, int np, double th) {
    double inter[8][8] = {{0}}, ag[8] = {0}, ap[8] = {0};
    for (int i = 0; i < n; i++) {
        ag[gt[i]]++;
        ap[pred[i]]++;
        inter[gt[i]][pred[i]]++;
    }
    int n_min = ng < np ? ng : np;
    if (n_min == 0) return 0;
    double iou[49], cost[49];
    for (int g = 0; g < ng; g++)
        for (int p = 0; p < np; p++) {
            double in = inter[g + 1][p + 1];
            iou[g * np + p] = in / (ag[g + 1] + ap[p + 1] - in);
            cost[g * np + p] = -(iou[g * np + p] >= th) - iou[g * np + p] / (2.0 * n_min);
        }
    double best = brute_min(cost, ng, np);
    /* TP is the count of IoU >= th pairs of an optimal assignment; the cost's
     * integer part equals -TP because the IoU term sums to less than 1/2. */
    return (int)floor(-best + 1e-9);
}

static void test_metric_vs_brute_force(void **state) {
    (void)state;
    enum { W = 6, N = W * W };
    uint32_t gt[N], pred[N];
    int trials = 0;
    for (int rep = 0; rep < 300; rep++) {
        int ng = 1 + (int)(rng() % 6), np = 1 + (int)(rng() % 6);
        /* Blocky random labelings so that instances overlap partially. */
        for (int i = 0; i < N; i++) gt[i] = pred[i] = 0;
        for (int b = 0; b < 8; b++) {
            int x0 = (int)(rng() % W), y0 = (int)(rng() % W);
            rect(gt, W, x0, y0, x0 + 1 + (int)(rng() % (W - x0)), y0 + 1 + (int)(rng() % (W - y0)),
                 (uint32_t)(rng() % (ng + 1)));
            x0 = (int)(rng() % W), y0 = (int)(rng() % W);
            rect(pred, W, x0, y0, x0 + 1 + (int)(rng() % (W - x0)), y0 + 1 + (int)(rng() % (W - y0)),
                 (uint32_t)(rng() % (np + 1)));
        }
        /* Renumber densely in the test (the library renumbers on its own). */
        uint32_t map_g[8] = {0}, map_p[8] = {0};
        int cg = 0, cp = 0;
        for (int i = 0; i < N; i++) {
            if (gt[i] && !map_g[gt[i]]) map_g[gt[i]] = (uint32_t)++cg;
            if (pred[i] && !map_p[pred[i]]) map_p[pred[i]] = (uint32_t)++cp;
        }
        uint32_t g2[N], p2[N];
        for (int i = 0; i < N; i++) {
            g2[i] = map_g[gt[i]];
            p2[i] = map_p[pred[i]];
        }
        for (int k = 0; k < CS_AP_THRESHOLDS; k++) {
            double th = cs_ap_threshold(k);
            int want = brute_tp(g2, p2, N, cg, cp, th);
            cs_match_stats st = eval_at(gt, pred, N, th);
            if (st.n_gt != cg || st.n_pred != cp || st.tp != want)
                fail_msg("trial %d th %.2f: n_gt %d/%d n_pred %d/%d tp %d, brute force %d", rep, th, st.n_gt,
                         cg, st.n_pred, cp, st.tp, want);
            int fp = cp - want, fn = cg - want;
            double ap_want = want + fp + fn ? (double)want / (want + fp + fn) : 0.0;
            assert_true(fabs(st.ap[k] - ap_want) < EPS);
        }
        for (double th = 0.1; th < 0.5; th += 0.1) {
            int want = brute_tp(g2, p2, N, cg, cp, th);
            cs_match_stats st = eval_at(gt, pred, N, th);
            assert_int_equal(st.tp, want);
        }
        trials++;
    }
    printf("  %d random 6x6 labelings x 14 thresholds agree with brute force\n", trials);
}

/* ------------------------------------------------------------ errors */

static void test_errors(void **state) {
    (void)state;
    uint32_t a[4] = {1, 1, 0, 2};
    cs_match_stats st;
    assert_int_equal(cs_evaluate_labels(a, a, 4, NULL), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_evaluate_labels(NULL, a, 4, &st), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_evaluate_labels(a, NULL, 4, &st), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_evaluate_labels_at(a, a, 4, 0.0, &st), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_evaluate_labels_at(a, a, 4, 1.5, &st), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_evaluate_labels_at(a, a, 4, NAN, &st), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_evaluate_labels(a, a, CS_METRICS_MAX_PIXELS + 1, &st), CELLSAM_ERR_LIMIT);
    assert_non_null(strstr(cellsam_last_error(), "limit"));
    st = eval_at(a, a, 4, 1.0); /* threshold 1 is allowed: identical instances pass */
    check_counts(&st, 2, 2, 2);

    double c[4] = {1, 2, NAN, 0};
    int ri[2], ci[2];
    assert_int_equal(cs_linear_sum_assignment(c, 2, 2, ri, ci), CELLSAM_ERR_INVALID);
    c[2] = INFINITY;
    assert_int_equal(cs_linear_sum_assignment(c, 2, 2, ri, ci), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_linear_sum_assignment(c, -1, 2, ri, ci), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_linear_sum_assignment(c, 1 << 14, 1 << 13, ri, ci), CELLSAM_ERR_LIMIT);
    assert_int_equal(cs_linear_sum_assignment(NULL, 0, 5, ri, ci), CELLSAM_OK);
    assert_int_equal(cs_linear_sum_assignment(NULL, 2, 2, ri, ci), CELLSAM_ERR_INVALID);
}

/* ------------------------------------------------------------ real labels */

static void test_dataset_gt_vs_gt(void **state) {
    (void)state;
#ifdef HAVE_IMAGE_IO
    static const char *folders[] = {"dsb2018_stage1_test", "usiigaci_phase", "baby_brightfield",
                                    "stardist_example"};
    int n_files = 0;
    for (size_t f = 0; f < sizeof folders / sizeof folders[0]; f++) {
        char dir[1024];
        snprintf(dir, sizeof dir, "%s/%s", tu_datadir(), folders[f]);
        DIR *d = opendir(dir);
        if (!d) fail_msg("cannot open %s", dir);
        struct dirent *ent;
        while ((ent = readdir(d))) {
            size_t len = strlen(ent->d_name);
            if (len < 10 || strcmp(ent->d_name + len - 10, "_masks.png")) continue;
            char path[2048];
            snprintf(path, sizeof path, "%s/%s", dir, ent->d_name);
            cs_image img;
            if (cs_image_read(path, &img)) fail_msg("cannot read %s: %s", path, cellsam_last_error());
            size_t n = (size_t)img.width * img.height;
            assert_int_equal(img.channels, 1);
            uint32_t *lab = malloc(n * sizeof *lab);
            assert_non_null(lab);
            uint32_t max_label = 0;
            for (size_t i = 0; i < n; i++) {
                lab[i] = (uint32_t)img.data[i];
                if (lab[i] > max_label) max_label = lab[i];
            }
            cs_image_free(&img);
            cs_match_stats st = eval(lab, lab, n);
            /* The data's labels are sequential: n_gt is the maximum label. */
            assert_int_equal(st.n_gt, (int)max_label);
            assert_int_equal(st.tp, (int)max_label);
            /* Empty masks (an empty trap) score 0 under the paper's NaN -> 0. */
            assert_true(st.f1 == (max_label ? 1.0 : 0.0));
            assert_true(st.mean_ap == (max_label ? 1.0 : 0.0));
            free(lab);
            n_files++;
        }
        closedir(d);
    }
    printf("  %d ground-truth label images scored against themselves\n", n_files);
    assert_true(n_files >= 50);
#else
    printf("  image_io.h not available: GT-vs-GT over the data set runs in cli_eval.sh instead\n");
    skip();
#endif
}

/* ------------------------------------------------------------ CLI */

static void write_png(const char *path, int w, int h, int depth, int color, const uint32_t *lab) {
    FILE *f = fopen(path, "wb");
    if (!f) fail_msg("cannot create %s", path);
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    assert_non_null(info);
    if (setjmp(png_jmpbuf(png))) fail_msg("libpng failed writing %s", path);
    png_init_io(png, f);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, depth, color, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (color == PNG_COLOR_TYPE_PALETTE) {
        png_color pal[256];
        for (int i = 0; i < 256; i++) pal[i] = (png_color){(png_byte)i, (png_byte)(255 - i), (png_byte)(i * 7)};
        png_set_PLTE(png, info, pal, 256);
    }
    png_write_info(png, info);
    int channels = color == PNG_COLOR_TYPE_RGB ? 3 : 1, bytes = depth / 8;
    unsigned char row[64 * 3 * 2];
    assert_true(w * channels * bytes <= (int)sizeof row);
    for (int y = 0; y < h; y++) {
        for (int x = 0; x < w; x++)
            for (int c = 0; c < channels; c++) {
                uint32_t v = lab[y * w + x];
                unsigned char *p = row + ((size_t)x * channels + c) * bytes;
                if (bytes == 2) {
                    p[0] = (unsigned char)(v >> 8);
                    p[1] = (unsigned char)v;
                } else {
                    p[0] = (unsigned char)v;
                }
            }
        png_write_row(png, row);
    }
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    fclose(f);
}

/* One-channel TIFF of `pages` identical pages: deflate strips, or one 16x16 tile. */
static void write_tiff(const char *path, int w, int h, int bits, int format, const double *vals, int tiled,
                       int pages) {
    TIFF *t = TIFFOpen(path, "w");
    if (!t) fail_msg("cannot create %s", path);
    int bps = bits / 8, tile = 16;
    unsigned char buf[16 * 16 * 8];
    assert_true(w <= tile && h <= tile);
    for (int pg = 0; pg < pages; pg++) {
        TIFFSetField(t, TIFFTAG_IMAGEWIDTH, (uint32_t)w);
        TIFFSetField(t, TIFFTAG_IMAGELENGTH, (uint32_t)h);
        TIFFSetField(t, TIFFTAG_BITSPERSAMPLE, (uint16_t)bits);
        TIFFSetField(t, TIFFTAG_SAMPLESPERPIXEL, (uint16_t)1);
        TIFFSetField(t, TIFFTAG_SAMPLEFORMAT, (uint16_t)format);
        TIFFSetField(t, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_MINISBLACK);
        TIFFSetField(t, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG);
        TIFFSetField(t, TIFFTAG_COMPRESSION, tiled ? COMPRESSION_NONE : COMPRESSION_ADOBE_DEFLATE);
        int stride = tiled ? tile : w;
        memset(buf, 0, sizeof buf);
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++) {
                double v = vals[y * w + x];
                unsigned char *p = buf + ((size_t)y * stride + x) * bps;
                if (format == SAMPLEFORMAT_IEEEFP) {
                    float fv = (float)v;
                    memcpy(p, &fv, 4);
                } else if (bits == 16) {
                    uint16_t u = format == SAMPLEFORMAT_INT ? (uint16_t)(int16_t)v : (uint16_t)v;
                    memcpy(p, &u, 2);
                } else {
                    uint32_t u = format == SAMPLEFORMAT_INT ? (uint32_t)(int32_t)v : (uint32_t)v;
                    memcpy(p, &u, 4);
                }
            }
        if (tiled) {
            TIFFSetField(t, TIFFTAG_TILEWIDTH, (uint32_t)tile);
            TIFFSetField(t, TIFFTAG_TILELENGTH, (uint32_t)tile);
            if (TIFFWriteTile(t, buf, 0, 0, 0, 0) < 0) fail_msg("TIFFWriteTile failed");
        } else {
            TIFFSetField(t, TIFFTAG_ROWSPERSTRIP, (uint32_t)h);
            for (int y = 0; y < h; y++)
                if (TIFFWriteScanline(t, buf + (size_t)y * w * bps, (uint32_t)y, 0) < 0)
                    fail_msg("TIFFWriteScanline failed");
        }
        if (pages > 1) TIFFWriteDirectory(t);
    }
    TIFFClose(t);
}

static const char *cli_exe(void) {
    const char *e = getenv("CELLSAM_CLI"); /* lets the test target another build of the CLI */
    return e && *e ? e : tu_cli();
}

/* Path under the test's temporary folder (static buffer rotated over 8 slots). */
static const char *tmp_file(const char *name) {
    static char bufs[8][512];
    static int slot;
    char *b = bufs[slot++ & 7];
    snprintf(b, 512, "%s/%s", tu_tmpdir(), name);
    return b;
}

static char g_cli_out[65536], g_cli_err[65536];

static void slurp(const char *path, char *buf, size_t cap) {
    buf[0] = '\0';
    FILE *f = fopen(path, "rb");
    if (!f) return;
    size_t n = fread(buf, 1, cap - 1, f);
    buf[n] = '\0';
    fclose(f);
}

/* Run `cellsam eval ARGS` (paths relative to the temporary folder); stdout and
 * stderr land in g_cli_out / g_cli_err. Returns the exit status. */
static int run_eval(const char *args) {
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "cd \"%s\" && \"%s\" eval %s >cli_out.txt 2>cli_err.txt", tu_tmpdir(), cli_exe(),
             args);
    int st = system(cmd);
    slurp(tmp_file("cli_out.txt"), g_cli_out, sizeof g_cli_out);
    slurp(tmp_file("cli_err.txt"), g_cli_err, sizeof g_cli_err);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void expect_error(const char *args, const char *message_part) {
    int rc = run_eval(args);
    if (rc != 1 || !strstr(g_cli_err, message_part) || g_cli_out[0])
        fail_msg("eval %s: exit %d, stderr '%s', stdout '%s'; wanted exit 1 and '%s'", args, rc, g_cli_err,
                 g_cli_out, message_part);
    const char *line = strstr(g_cli_err, "error:");
    printf("  eval %-36s -> %s", args, line ? line : g_cli_err);
}

/* The JSON of a one-image run must carry exactly the library's numbers. */
static void expect_json(const char *args, const cs_match_stats *want) {
    int rc = run_eval(args);
    if (rc != 0) fail_msg("eval %s: exit %d: %s", args, rc, g_cli_err);
    json_error_t jerr;
    json_t *root = json_loads(g_cli_out, 0, &jerr);
    if (!root) fail_msg("eval %s: bad JSON (%s): %s", args, jerr.text, g_cli_out);
    json_t *img = json_array_get(json_object_get(root, "images"), 0);
    assert_non_null(img);
    assert_int_equal(json_integer_value(json_object_get(root, "n_images")), 1);
    assert_int_equal(json_integer_value(json_object_get(img, "n_gt")), want->n_gt);
    assert_int_equal(json_integer_value(json_object_get(img, "n_pred")), want->n_pred);
    assert_int_equal(json_integer_value(json_object_get(img, "tp")), want->tp);
    assert_int_equal(json_integer_value(json_object_get(img, "fp")), want->fp);
    assert_int_equal(json_integer_value(json_object_get(img, "fn")), want->fn);
    assert_true(fabs(json_real_value(json_object_get(img, "f1")) - want->f1) < 1e-9);
    assert_true(fabs(json_real_value(json_object_get(img, "ap")) - want->mean_ap) < 1e-9);
    assert_true(fabs(json_real_value(json_object_get(root, "mean_f1")) - want->f1) < 1e-9);
    json_t *aps = json_object_get(img, "ap_per_threshold");
    assert_int_equal(json_array_size(aps), CS_AP_THRESHOLDS);
    for (int k = 0; k < CS_AP_THRESHOLDS; k++)
        assert_true(fabs(json_real_value(json_array_get(aps, (size_t)k)) - want->ap[k]) < 1e-9);
    json_decref(root);
}

static void test_cli_formats_and_pairing(void **state) {
    (void)state;
    enum { W = 8, H = 8, N = W * H };
    /* GT: a 16-px square (label 1), a 9-px square (300), a 24-px band (1000).
     * Prediction: the square split in halves (3, 4; one half has IoU 0.5), the
     * small square exact (9), the band minus its first column (200; IoU 21/24).
     * TP 3, FP 1, FN 0, F1 = 3 / 3.5. */
    uint32_t gt[N] = {0}, pred[N] = {0};
    rect(gt, W, 0, 0, 4, 4, 1);
    rect(gt, W, 5, 0, 8, 3, 300);
    rect(gt, W, 0, 5, 8, 8, 1000);
    rect(pred, W, 0, 0, 2, 4, 3);
    rect(pred, W, 2, 0, 4, 4, 4);
    rect(pred, W, 5, 0, 8, 3, 9);
    rect(pred, W, 1, 5, 8, 8, 200);
    cs_match_stats want = eval(gt, pred, N);
    check_counts(&want, 3, 4, 3);
    assert_true(fabs(want.f1 - 3.0 / 3.5) < EPS);
    double pv[N];
    for (int i = 0; i < N; i++) pv[i] = pred[i];

    write_png(tmp_file("gt.png"), W, H, 16, PNG_COLOR_TYPE_GRAY, gt);
    write_png(tmp_file("p8.png"), W, H, 8, PNG_COLOR_TYPE_GRAY, pred);
    write_png(tmp_file("ppal.png"), W, H, 8, PNG_COLOR_TYPE_PALETTE, pred);
    write_tiff(tmp_file("p16.tif"), W, H, 16, SAMPLEFORMAT_UINT, pv, 0, 1);
    write_tiff(tmp_file("p32s.tif"), W, H, 32, SAMPLEFORMAT_INT, pv, 0, 1);
    write_tiff(tmp_file("pf.tiff"), W, H, 32, SAMPLEFORMAT_IEEEFP, pv, 0, 1);
    write_tiff(tmp_file("ptile.tif"), W, H, 16, SAMPLEFORMAT_UINT, pv, 1, 1);
    int64_t shape[2] = {H, W};
    int32_t pred_i32[N];
    for (int i = 0; i < N; i++) pred_i32[i] = (int32_t)pred[i];
    assert_int_equal(cs_npy_save(tmp_file("pi32.npy"), CS_NPY_I32, pred_i32, 2, shape), 0);
    const char *variants[] = {"p8.png", "ppal.png", "p16.tif", "p32s.tif", "pf.tiff", "ptile.tif", "pi32.npy"};
    char args[512];
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        snprintf(args, sizeof args, "gt.png %s --json", variants[v]);
        expect_json(args, &want);
    }
    printf("  7 label formats (PNG 8/16-bit/palette, TIFF u16/i32/f32/tiled, npy) give the library's numbers\n");

    /* --threshold reaches the metric. */
    cs_match_stats want_hi = eval_at(gt, pred, N, 0.9);
    assert_int_equal(want_hi.tp, 1);
    expect_json("gt.png p16.tif --threshold 0.9 --json", &want_hi);
    expect_json("gt.png p16.tif --json --threshold=0.9", &want_hi);

    /* Table output. */
    assert_int_equal(run_eval("gt.png p8.png"), 0);
    assert_non_null(strstr(g_cli_out, "mean F1 0.8571"));

    /* Errors: one line on stderr, exit 1, nothing on stdout. */
    double bad[N];
    memcpy(bad, pv, sizeof bad);
    bad[5] = -1;
    write_tiff(tmp_file("neg.tif"), W, H, 16, SAMPLEFORMAT_INT, bad, 0, 1);
    bad[5] = 1.5;
    write_tiff(tmp_file("frac.tif"), W, H, 32, SAMPLEFORMAT_IEEEFP, bad, 0, 1);
    write_tiff(tmp_file("pages.tif"), W, H, 16, SAMPLEFORMAT_UINT, pv, 0, 2);
    write_png(tmp_file("rgb.png"), W, H, 8, PNG_COLOR_TYPE_RGB, pred);
    assert_int_equal(cs_npy_save(tmp_file("frac.npy"), CS_NPY_F64, bad, 2, shape), 0);
    int64_t shape3[3] = {2, 4, 8};
    assert_int_equal(cs_npy_save(tmp_file("stack.npy"), CS_NPY_F64, pv, 3, shape3), 0);
    write_png(tmp_file("small.png"), 4, 4, 16, PNG_COLOR_TYPE_GRAY, gt);
    FILE *f = fopen(tmp_file("text.png"), "wb");
    assert_non_null(f);
    fputs("not an image\n", f);
    fclose(f);
    unsigned char png_bytes[4096];
    f = fopen(tmp_file("gt.png"), "rb");
    assert_non_null(f);
    size_t n = fread(png_bytes, 1, sizeof png_bytes, f);
    fclose(f);
    f = fopen(tmp_file("trunc.png"), "wb");
    assert_non_null(f);
    fwrite(png_bytes, 1, n / 2, f);
    fclose(f);
    expect_error("gt.png neg.tif", "not a label");
    expect_error("gt.png frac.tif", "not a label");
    expect_error("gt.png pages.tif", "multi-page");
    expect_error("gt.png rgb.png", "single-channel");
    expect_error("gt.png small.png", "size mismatch");
    expect_error("gt.png text.png", "not a PNG, TIFF or .npy");
    expect_error("gt.png frac.npy", "not a label");
    expect_error("gt.png stack.npy", "must be (H, W)");
    expect_error("trunc.png gt.png", "bad PNG");
    expect_error("gt.png missing.png", "cannot open missing.png");
    assert_int_equal(run_eval("gt.png"), 2);
    assert_int_equal(run_eval("gt.png p8.png --threshold 0"), 2);
    assert_int_equal(run_eval("gt.png p8.png --threshold 1.5"), 2);
    assert_int_equal(run_eval("gt.png p8.png --frobnicate"), 2);
    assert_int_equal(run_eval("--help"), 0);
    assert_non_null(strstr(g_cli_out, "NAME_cp_masks"));

    /* Folders: a/b pair (by _cp_masks and plain .tif), c has no prediction,
     * d_labels has no GT; both are reported and skipped. */
    mkdir(tmp_file("gtd"), 0755);
    mkdir(tmp_file("prd"), 0755);
    mkdir(tmp_file("emptyd"), 0755);
    write_png(tmp_file("gtd/a_masks.png"), W, H, 16, PNG_COLOR_TYPE_GRAY, gt);
    write_png(tmp_file("gtd/b_masks.png"), W, H, 16, PNG_COLOR_TYPE_GRAY, gt);
    write_png(tmp_file("gtd/c_masks.png"), W, H, 16, PNG_COLOR_TYPE_GRAY, gt);
    write_png(tmp_file("gtd/a_img.png"), W, H, 8, PNG_COLOR_TYPE_RGB, gt); /* not a GT file */
    write_png(tmp_file("prd/a_cp_masks.png"), W, H, 8, PNG_COLOR_TYPE_GRAY, pred);
    write_png(tmp_file("prd/b_masks.tif.png"), W, H, 8, PNG_COLOR_TYPE_GRAY, gt); /* no rule matches it */
    write_tiff(tmp_file("prd/b.tif"), W, H, 16, SAMPLEFORMAT_UINT, pv, 0, 1);
    write_png(tmp_file("prd/d_labels.png"), W, H, 8, PNG_COLOR_TYPE_GRAY, pred);
    assert_int_equal(run_eval("gtd prd --json"), 0);
    json_t *root = json_loads(g_cli_out, 0, NULL);
    assert_non_null(root);
    json_t *imgs = json_object_get(root, "images");
    assert_int_equal(json_array_size(imgs), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(imgs, 0), "name")), "a");
    assert_string_equal(json_string_value(json_object_get(json_array_get(imgs, 1), "name")), "b");
    assert_non_null(strstr(json_string_value(json_object_get(json_array_get(imgs, 0), "pred")), "a_cp_masks.png"));
    assert_non_null(strstr(json_string_value(json_object_get(json_array_get(imgs, 1), "pred")), "b.tif"));
    assert_true(fabs(json_real_value(json_object_get(root, "mean_f1")) - want.f1) < 1e-9);
    json_decref(root);
    assert_non_null(strstr(g_cli_err, "c_masks.png"));
    assert_non_null(strstr(g_cli_err, "d_labels.png"));
    assert_null(strstr(g_cli_err, "a_img"));
    /* GT file with a PRED folder uses the same lookup. */
    assert_int_equal(run_eval("gtd/a_masks.png prd --json"), 0);
    assert_non_null(strstr(g_cli_out, "a_cp_masks.png"));
    expect_error("gtd emptyd", "no GT file");
    expect_error("gtd gt.png", "is a folder");
    expect_error("gtd/c_masks.png prd", "no prediction");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_identical),
        cmocka_unit_test(test_empty_cases),
        cmocka_unit_test(test_one_pixel_shift),
        cmocka_unit_test(test_iou_exactly_half),
        cmocka_unit_test(test_split_and_merge),
        cmocka_unit_test(test_permuted_and_gapped_ids),
        cmocka_unit_test(test_greedy_differs_from_optimal),
        cmocka_unit_test(test_large_grid_shift),
        cmocka_unit_test(test_assignment_vs_brute_force),
        cmocka_unit_test(test_metric_vs_brute_force),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_cli_formats_and_pairing),
        cmocka_unit_test(test_dataset_gt_vs_gt),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
