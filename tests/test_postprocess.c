/* Mask post-processing: upsampling against the reference 43_ arrays, masks
 * (44_), label composition (45_), fill holes (50_), region/support identities
 * on reference and random logits, hand-made fill-holes and boundary cases,
 * error paths. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "postprocess.h"
#include "testutil.h"

#define UPSCALED_TOL 7e-4 /* MANIFEST section 7, 43_ upscaled logits */
#define LOGIT_04 (-0.40546510810816438)

typedef struct {
    const char *name;
    int H, W;
} ref_case;

static const ref_case CASES[] = {
    {"case_blobs256_u16", 256, 256},
    {"case_ihc_2x160x224_chfirst", 160, 224},
    {"case_strip_1040x80_u8", 1040, 80},
    {"case_ihc_rgb_192x160", 192, 160},
};
#define N_CASES (sizeof CASES / sizeof CASES[0])

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    fclose(f);
    return 1;
}

static uint32_t *npy_to_u32(const cs_npy *a) {
    uint32_t *out = malloc(a->count * sizeof *out);
    assert_non_null(out);
    for (size_t i = 0; i < a->count; i++) out[i] = (uint32_t)cs_npy_get(a, i);
    return out;
}

/* Index of the first box whose IoU prediction passes (>= 0.5), -1 if none. */
static int first_passed(const char *case_name, int *n_passed) {
    cs_npy iou;
    tu_load(&iou, "%s/42_iou_predictions.npy", case_name);
    int first = -1, n = 0;
    for (size_t i = 0; i < iou.count; i++) {
        if (!((float)cs_npy_get(&iou, i) < 0.5f)) {
            if (first < 0) first = (int)i;
            n++;
        }
    }
    cs_npy_free(&iou);
    if (n_passed) *n_passed = n;
    return first;
}

/* ---------------------------------------------------------- reference */

/* 41_ (first box) -> 43_ (first box that passed): a pair only when the first
 * box passed; the strip case (H > 1024, W << 1024) is one. */
static void test_upsample_reference(void **state) {
    (void)state;
    int paired = 0;
    for (size_t c = 0; c < N_CASES; c++) {
        const ref_case *rc = &CASES[c];
        if (!file_exists(tu_path("%s/43_upscaled_mask_logits_first.npy", rc->name))) continue;
        if (first_passed(rc->name, NULL) != 0) {
            printf("  %s: first box failed the IoU test, 41_ and 43_ are different boxes\n",
                   rc->name);
            continue;
        }
        cs_npy lo, up;
        tu_load(&lo, "%s/41_lowres_mask_logits_first.npy", rc->name);
        tu_load(&up, "%s/43_upscaled_mask_logits_first.npy", rc->name);
        assert_int_equal(lo.count, 256 * 256);
        assert_int_equal(up.count, (size_t)rc->H * rc->W);
        float *got = malloc(up.count * sizeof *got);
        assert_non_null(got);
        assert_int_equal(cs_upsample_logits(lo.data, rc->H, rc->W, got), CELLSAM_OK);
        char what[128];
        snprintf(what, sizeof what, "%s 43_ upscaled logits", rc->name);
        double err = tu_check_npy(what, got, up.count, &up, UPSCALED_TOL);
        /* The arithmetic follows PyTorch's kernel; anything above rounding
         * noise means it drifted (float coordinates give ~2e-5 here). */
        assert_true(err <= 1e-6);
        size_t differ = 0;
        const float *ref = up.data;
        for (size_t i = 0; i < up.count; i++) differ += got[i] != ref[i];
        printf("  %s: %zu of %zu pixels not bit-identical\n", rc->name, differ, up.count);

        /* Thresholding: same decisions as on the reference logits, except
         * where a logit sits within rounding of logit(0.4). */
        size_t flips = 0, near = 0;
        for (size_t i = 0; i < up.count; i++) {
            if (fabs((double)ref[i] - LOGIT_04) < 1e-6) near++;
            flips += cs_mask_logit_on(got[i]) != cs_mask_logit_on(ref[i]);
        }
        printf("  %s: mask flips vs reference logits %zu (pixels within 1e-6 of logit(0.4): %zu)\n",
               rc->name, flips, near);
        assert_true(flips <= near);
        free(got);
        cs_npy_free(&lo);
        cs_npy_free(&up);
        paired++;
    }
    assert_true(paired >= 1);
}

/* sigmoid > 0.4 on the reference 43_ logits reproduces the reference mask 44_
 * of the same box (mask index 0 = first box that passed). */
static void test_threshold_reference(void **state) {
    (void)state;
    int tested = 0;
    for (size_t c = 0; c < N_CASES; c++) {
        const ref_case *rc = &CASES[c];
        if (!file_exists(tu_path("%s/43_upscaled_mask_logits_first.npy", rc->name)) ||
            !file_exists(tu_path("%s/44_masks_binary.npy", rc->name)))
            continue;
        cs_npy up, masks;
        tu_load(&up, "%s/43_upscaled_mask_logits_first.npy", rc->name);
        tu_load(&masks, "%s/44_masks_binary.npy", rc->name);
        size_t n = (size_t)rc->H * rc->W;
        assert_int_equal(up.count, n);
        assert_true(masks.count >= n);
        const float *lg = up.data;
        const uint8_t *m = masks.data;
        size_t flips = 0, near = 0, on = 0;
        for (size_t i = 0; i < n; i++) {
            int mine = cs_mask_logit_on(lg[i]);
            on += mine;
            if (fabs((double)lg[i] - LOGIT_04) < 1e-6) near++;
            flips += mine != (m[i] != 0);
        }
        printf("  %s: 44_ mask 0: %zu on, %zu flips, %zu pixels within 1e-6 of logit(0.4)\n",
               rc->name, on, flips, near);
        assert_true(flips <= near);
        assert_true(on > 0);
        cs_npy_free(&up);
        cs_npy_free(&masks);
        tested++;
    }
    assert_true(tested >= 1);
}

/* 44_ masks composed in order give 45_ (later masks win). */
static void test_compose_reference(void **state) {
    (void)state;
    int tested = 0;
    for (size_t c = 0; c < N_CASES; c++) {
        const ref_case *rc = &CASES[c];
        if (!file_exists(tu_path("%s/44_masks_binary.npy", rc->name)) ||
            !file_exists(tu_path("%s/45_label_before_fill.npy", rc->name)))
            continue;
        cs_npy masks, before;
        tu_load(&masks, "%s/44_masks_binary.npy", rc->name);
        tu_load(&before, "%s/45_label_before_fill.npy", rc->name);
        size_t n = (size_t)rc->H * rc->W;
        int n_passed;
        first_passed(rc->name, &n_passed);
        assert_int_equal(masks.shape[0], n_passed);
        cs_label_composer comp;
        assert_int_equal(cs_composer_init(&comp, rc->H, rc->W), CELLSAM_OK);
        for (int k = 0; k < n_passed; k++)
            assert_int_equal(cs_composer_add_binary(&comp, (const uint8_t *)masks.data + k * n,
                                                    (uint32_t)k + 1),
                             CELLSAM_OK);
        uint32_t *ref = npy_to_u32(&before);
        size_t differ = 0;
        for (size_t i = 0; i < n; i++) differ += comp.labels[i] != ref[i];
        printf("  %s: composed 45_ from %d masks, %zu pixels differ\n", rc->name, n_passed,
               differ);
        assert_int_equal(differ, 0);
        free(ref);
        cs_composer_free(&comp);
        cs_npy_free(&masks);
        cs_npy_free(&before);
        tested++;
    }
    assert_true(tested >= 1);
}

/* 45_ -> 50_ through fill holes / remove small, exactly. */
static void test_fill_holes_reference(void **state) {
    (void)state;
    int tested = 0;
    for (size_t c = 0; c < N_CASES; c++) {
        const ref_case *rc = &CASES[c];
        if (!file_exists(tu_path("%s/45_label_before_fill.npy", rc->name))) continue;
        cs_npy before, final;
        tu_load(&before, "%s/45_label_before_fill.npy", rc->name);
        tu_load(&final, "%s/50_label_final.npy", rc->name);
        uint32_t *lab = npy_to_u32(&before), *ref = npy_to_u32(&final);
        size_t n = before.count, changed = 0, differ = 0;
        uint32_t *orig = malloc(n * sizeof *orig);
        assert_non_null(orig);
        memcpy(orig, lab, n * sizeof *orig);
        assert_int_equal(cs_fill_holes_remove_small(lab, rc->H, rc->W, CS_MIN_MASK_SIZE),
                         CELLSAM_OK);
        for (size_t i = 0; i < n; i++) {
            differ += lab[i] != ref[i];
            changed += lab[i] != orig[i];
        }
        printf("  %s: fill holes changed %zu pixels, %zu differ from 50_\n", rc->name, changed,
               differ);
        assert_int_equal(differ, 0);
        free(lab);
        free(ref);
        free(orig);
        cs_npy_free(&before);
        cs_npy_free(&final);
        tested++;
    }
    assert_true(tested >= 1);
}

static void test_boxes_reference(void **state) {
    (void)state;
    for (size_t c = 0; c < N_CASES; c++) {
        const ref_case *rc = &CASES[c];
        cs_npy boxes, iou, final;
        tu_load(&boxes, "%s/39_sam_box_prompts.npy", rc->name);
        tu_load(&iou, "%s/42_iou_predictions.npy", rc->name);
        tu_load(&final, "%s/46_final_boxes_orig_frame.npy", rc->name);
        assert_int_equal(final.dtype, CS_NPY_F64);
        const float *b = boxes.data, *s = iou.data;
        const double *f = final.data;
        size_t k = 0;
        for (size_t i = 0; i < iou.count; i++) {
            if (s[i] < 0.5f) continue;
            double got[4];
            cs_box_to_orig_frame(b + 4 * i, rc->H, rc->W, got);
            assert_true(4 * k + 3 < final.count);
            for (int j = 0; j < 4; j++) assert_true(got[j] == f[4 * k + j]);
            k++;
        }
        assert_int_equal(4 * k, final.count);
        cs_npy_free(&boxes);
        cs_npy_free(&iou);
        cs_npy_free(&final);
    }
}

/* ------------------------------------------------- region and support */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rng_u32(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
static float rng_unit(void) { return (float)(rng_u32() & 0xffffff) / 16777216.0f; }

/* Low-res maps to check: every stored one, plus synthetic ones. */
typedef struct {
    float *maps;
    int n;
    int cap;
} map_list;

static void maps_add(map_list *l, const float *m) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->maps = realloc(l->maps, (size_t)l->cap * 65536 * sizeof(float));
        assert_non_null(l->maps);
    }
    memcpy(l->maps + (size_t)l->n * 65536, m, 65536 * sizeof(float));
    l->n++;
}

static void maps_add_npy(map_list *l, const char *rel) {
    cs_npy a;
    tu_load(&a, "%s", rel);
    assert_int_equal(a.count % 65536, 0);
    for (size_t k = 0; k < a.count / 65536; k++) maps_add(l, (const float *)a.data + k * 65536);
    cs_npy_free(&a);
}

static void collect_maps(map_list *l) {
    memset(l, 0, sizeof *l);
    char rel[256];
    for (size_t c = 0; c < N_CASES; c++) {
        snprintf(rel, sizeof rel, "%s/41_lowres_mask_logits_first.npy", CASES[c].name);
        maps_add_npy(l, rel);
    }
    maps_add_npy(l, "prompts_blobs256_u16/P1_two_boxes/lowres_logits.npy");
    maps_add_npy(l, "prompts_blobs256_u16/P2_one_box_multimask/lowres_logits.npy");
    maps_add_npy(l, "prompts_blobs256_u16/P3_pos_neg_pos_points/lowres_logits.npy");
    maps_add_npy(l, "prompts_blobs256_u16/P4_box_plus_pos_neg_points/lowres_logits.npy");
    float *m = malloc(65536 * sizeof *m);
    assert_non_null(m);
    /* Small bright blobs on a negative background, at edges and corners too. */
    const int centers[][2] = {{128, 128}, {0, 0}, {255, 3}, {3, 250}, {200, 40}};
    for (size_t b = 0; b < sizeof centers / sizeof centers[0]; b++) {
        int rad = 1 + (int)(rng_u32() % 6);
        for (int y = 0; y < 256; y++)
            for (int x = 0; x < 256; x++) {
                int dy = y - centers[b][0], dx = x - centers[b][1];
                float v = -3.0f + rng_unit();
                if (dy * dy + dx * dx <= rad * rad) v = 2.0f * rng_unit() - 0.5f;
                m[y * 256 + x] = v;
            }
        maps_add(l, m);
    }
    /* A single pixel just above the threshold. */
    for (int i = 0; i < 65536; i++) m[i] = -1.0f;
    m[77 * 256 + 190] = -0.40f;
    maps_add(l, m);
    /* Noise straddling the threshold everywhere. */
    for (int i = 0; i < 65536; i++) m[i] = -0.4054651f + 0.02f * (rng_unit() - 0.5f);
    maps_add(l, m);
    /* Everything off; and everything at the largest value the support scan
     * leaves out (rounding of a constant map must not turn pixels on). */
    for (int i = 0; i < 65536; i++) m[i] = -5.0f;
    maps_add(l, m);
    free(m);
}

static const int SIZES[][2] = {{256, 256}, {1040, 80}, {160, 224}, {192, 160},
                               {1024, 1024}, {7, 1500}, {1100, 13}, {1, 1}};
#define N_SIZES (sizeof SIZES / sizeof SIZES[0])

static void test_region_equals_full(void **state) {
    (void)state;
    map_list l;
    collect_maps(&l);
    size_t checked = 0;
    for (size_t s = 0; s < N_SIZES; s++) {
        int H = SIZES[s][0], W = SIZES[s][1];
        float *full = malloc((size_t)H * W * sizeof *full);
        float *reg = malloc((size_t)H * W * sizeof *reg);
        assert_non_null(full);
        assert_non_null(reg);
        cs_mask_upsampler u;
        assert_int_equal(cs_upsampler_init(&u, H, W), CELLSAM_OK);
        for (int k = 0; k < l.n; k += (H * W > 300000 ? 5 : 1)) {
            const float *lo = l.maps + (size_t)k * 65536;
            assert_int_equal(cs_upsample_logits(lo, H, W, full), CELLSAM_OK);
            for (int trial = 0; trial < 6; trial++) {
                int x0, x1, y0, y1;
                if (trial == 0) {
                    x0 = y0 = 0;
                    x1 = W;
                    y1 = H;
                } else {
                    x0 = (int)(rng_u32() % W);
                    x1 = x0 + 1 + (int)(rng_u32() % (W - x0));
                    y0 = (int)(rng_u32() % H);
                    y1 = y0 + 1 + (int)(rng_u32() % (H - y0));
                }
                int rw = x1 - x0;
                if (trial % 2)
                    assert_int_equal(cs_upsample_logits_region(lo, H, W, x0, y0, x1, y1, reg),
                                     CELLSAM_OK);
                else
                    assert_int_equal(cs_upsampler_region(&u, lo, x0, y0, x1, y1, reg), CELLSAM_OK);
                for (int y = y0; y < y1; y++)
                    if (memcmp(reg + (size_t)(y - y0) * rw, full + (size_t)y * W + x0,
                               (size_t)rw * sizeof(float)) != 0)
                        fail_msg("region [%d,%d)x[%d,%d) of map %d at %dx%d differs in row %d",
                                 x0, x1, y0, y1, k, H, W, y);
                checked++;
            }
        }
        cs_upsampler_free(&u);
        free(full);
        free(reg);
    }
    printf("  %zu regions bit-identical to the full computation\n", checked);
    free(l.maps);
}

/* The support rectangle contains every pixel above the threshold, for the
 * mask threshold and others; composing within it equals thresholding the
 * full upsampled map. */
static void test_support_and_composer(void **state) {
    (void)state;
    map_list l;
    collect_maps(&l);
    const float thresholds[] = {CS_MASK_LOGIT_OFF, -2.0f, 0.0f, 1.5f};
    size_t n_masks = 0, n_on = 0, area_rect = 0, area_full = 0;
    for (size_t s = 0; s < N_SIZES; s++) {
        int H = SIZES[s][0], W = SIZES[s][1];
        size_t n = (size_t)H * W;
        float *full = malloc(n * sizeof *full);
        uint32_t *want = calloc(n, sizeof *want);
        assert_non_null(full);
        assert_non_null(want);
        cs_label_composer comp;
        assert_int_equal(cs_composer_init(&comp, H, W), CELLSAM_OK);
        cs_mask_upsampler u;
        assert_int_equal(cs_upsampler_init(&u, H, W), CELLSAM_OK);
        for (int k = 0; k < l.n; k += (n > 300000 ? 4 : 1)) {
            const float *lo = l.maps + (size_t)k * 65536;
            assert_int_equal(cs_upsample_logits(lo, H, W, full), CELLSAM_OK);
            for (size_t t = 0; t < sizeof thresholds / sizeof thresholds[0]; t++) {
                int x0, y0, x1, y1, a0, b0, a1, b1;
                int cnt = cs_mask_support_region(lo, H, W, thresholds[t], &x0, &y0, &x1, &y1);
                int cnt2 = cs_upsampler_support(&u, lo, thresholds[t], &a0, &b0, &a1, &b1);
                assert_true(cnt >= 0);
                assert_int_equal(cnt, cnt2);
                assert_true(x0 == a0 && y0 == b0 && x1 == a1 && y1 == b1);
                if (cnt == 0) assert_true(x0 == 0 && y0 == 0 && x1 == 0 && y1 == 0);
                assert_true(0 <= x0 && x0 <= x1 && x1 <= W && 0 <= y0 && y0 <= y1 && y1 <= H);
                for (int y = 0; y < H; y++)
                    for (int x = 0; x < W; x++) {
                        float v = full[(size_t)y * W + x];
                        int inside = x >= x0 && x < x1 && y >= y0 && y < y1;
                        if (!inside && v > thresholds[t])
                            fail_msg("map %d at %dx%d: pixel (%d,%d) = %.9g > %.9g outside "
                                     "[%d,%d)x[%d,%d)",
                                     k, H, W, y, x, (double)v, (double)thresholds[t], x0, x1, y0,
                                     y1);
                    }
                if (t == 0) {
                    area_rect += (size_t)(x1 - x0) * (size_t)(y1 - y0);
                    area_full += n;
                }
            }
            /* Composer (label k+1 over the earlier ones) vs the full map. */
            uint32_t label = (uint32_t)k + 1;
            size_t on = 0;
            for (size_t i = 0; i < n; i++)
                if (cs_mask_logit_on(full[i])) {
                    want[i] = label;
                    on++;
                }
            assert_int_equal(cs_composer_add_mask(&comp, lo, label), CELLSAM_OK);
            assert_int_equal(comp.last_count, on);
            n_on += on;
            n_masks++;
        }
        assert_memory_equal(comp.labels, want, n * sizeof *want);
        uint32_t *taken = cs_composer_take_labels(&comp);
        assert_non_null(taken);
        assert_null(comp.labels);
        assert_int_not_equal(cs_composer_add_mask(&comp, l.maps, 1), CELLSAM_OK);
        cs_free(taken);
        cs_composer_free(&comp);
        cs_upsampler_free(&u);
        free(full);
        free(want);
    }
    printf("  %zu masks composed identically (%zu on-pixels); support area %.1f%% of full\n",
           n_masks, n_on, 100.0 * (double)area_rect / (double)area_full);
    free(l.maps);
}

/* Adversarial rounding: a constant map at the largest float the support scan
 * excludes, and constant maps right at the threshold. */
static void test_support_constant_maps(void **state) {
    (void)state;
    float *lo = malloc(65536 * sizeof *lo);
    float *full = malloc((size_t)1040 * 80 * sizeof *full);
    assert_non_null(lo);
    assert_non_null(full);
    const float thr[] = {CS_MASK_LOGIT_OFF, -0.4054651f, -1e-30f, 3.0f, -100.0f};
    for (size_t t = 0; t < sizeof thr / sizeof thr[0]; t++) {
        for (int variant = 0; variant < 2; variant++) {
            /* variant 0: value where the scan just says "no"; 1: at thr. */
            float v = thr[t];
            if (variant == 0) {
                float sel = thr[t] - 1e-5f * (1.0f + fabsf(thr[t]));
                v = sel;
            }
            for (int i = 0; i < 65536; i++) lo[i] = v;
            int x0, y0, x1, y1;
            int cnt = cs_mask_support_region(lo, 1040, 80, thr[t], &x0, &y0, &x1, &y1);
            assert_int_equal(cs_upsample_logits(lo, 1040, 80, full), CELLSAM_OK);
            size_t above = 0;
            for (size_t i = 0; i < (size_t)1040 * 80; i++) above += full[i] > thr[t];
            if (variant == 0) {
                assert_int_equal(cnt, 0);
                assert_int_equal(above, 0);
            } else {
                assert_int_equal(cnt, 65536);
                assert_true(x0 == 0 && y0 == 0 && x1 == 80 && y1 == 1040);
            }
        }
    }
    free(lo);
    free(full);
}

/* ------------------------------------------------ fill holes by hand */

static void run_fill(const uint32_t *in, const uint32_t *want, int H, int W, int min_size) {
    uint32_t *lab = malloc((size_t)H * W * sizeof *lab);
    assert_non_null(lab);
    memcpy(lab, in, (size_t)H * W * sizeof *lab);
    assert_int_equal(cs_fill_holes_remove_small(lab, H, W, min_size), CELLSAM_OK);
    for (int i = 0; i < H * W; i++)
        if (lab[i] != want[i])
            fail_msg("fill holes: pixel (%d,%d) = %u, want %u", i / W, i % W, lab[i], want[i]);
    free(lab);
}

static void test_fill_holes_hand(void **state) {
    (void)state;
    /* A ring with a hole: the hole is filled. Label 4 -> 1. */
    {
        const uint32_t in[] = {
            0, 0, 0, 0, 0, 0,
            0, 4, 4, 4, 4, 0,
            0, 4, 0, 0, 4, 0,
            0, 4, 0, 0, 4, 0,
            0, 4, 4, 4, 4, 0,
            0, 0, 0, 0, 0, 0,
        };
        const uint32_t want[] = {
            0, 0, 0, 0, 0, 0,
            0, 1, 1, 1, 1, 0,
            0, 1, 1, 1, 1, 0,
            0, 1, 1, 1, 1, 0,
            0, 1, 1, 1, 1, 0,
            0, 0, 0, 0, 0, 0,
        };
        run_fill(in, want, 6, 6, 1);
    }
    /* The gap opens onto the bounding box border: background reaches the
     * border, no hole. The box of label 2 is rows 0-3, cols 0-3. */
    {
        const uint32_t in[] = {
            2, 2, 2, 2, 0,
            2, 0, 0, 0, 0,
            2, 0, 0, 2, 0,
            2, 2, 2, 2, 0,
        };
        const uint32_t want[] = {
            1, 1, 1, 1, 0,
            1, 0, 0, 0, 0,
            1, 0, 0, 1, 0,
            1, 1, 1, 1, 0,
        };
        run_fill(in, want, 4, 5, 1);
    }
    /* Background that touches the outside only diagonally is a hole (the
     * flood is 4-connected): the ring is closed except at a corner. */
    {
        const uint32_t in[] = {
            0, 0, 0, 0, 0,
            0, 0, 3, 3, 0,
            0, 3, 0, 3, 0,
            0, 3, 3, 3, 0,
            0, 0, 0, 0, 0,
        };
        const uint32_t want[] = {
            0, 0, 0, 0, 0,
            0, 0, 1, 1, 0,
            0, 1, 1, 1, 0,
            0, 1, 1, 1, 0,
            0, 0, 0, 0, 0,
        };
        run_fill(in, want, 5, 5, 1);
        /* A diamond: the centre touches all four box corners diagonally. */
        const uint32_t diamond[] = {
            0, 0, 0, 0, 0,
            0, 0, 3, 0, 0,
            0, 3, 0, 3, 0,
            0, 0, 3, 0, 0,
            0, 0, 0, 0, 0,
        };
        const uint32_t diamond_want[] = {
            0, 0, 0, 0, 0,
            0, 0, 1, 0, 0,
            0, 1, 1, 1, 0,
            0, 0, 1, 0, 0,
            0, 0, 0, 0, 0,
        };
        run_fill(diamond, diamond_want, 5, 5, 1);
    }
    /* A ring (1) around another label (2): filling 1's hole overwrites 2,
     * which then has no pixels left and gets no new id. */
    {
        const uint32_t in[] = {
            1, 1, 1, 1, 1,
            1, 2, 2, 0, 1,
            1, 2, 2, 0, 1,
            1, 1, 1, 1, 1,
        };
        const uint32_t want[] = {
            1, 1, 1, 1, 1,
            1, 1, 1, 1, 1,
            1, 1, 1, 1, 1,
            1, 1, 1, 1, 1,
        };
        run_fill(in, want, 4, 5, 1);
        run_fill(in, want, 4, 5, 0); /* min_size 0: no removal, same result */
        /* A later label shows that the emptied label 2 consumed no id, with
         * removal on (1), off (0) and off the Cellpose way (-1). */
        const uint32_t in3[] = {
            1, 1, 1, 1, 1, 0,
            1, 2, 2, 0, 1, 0,
            1, 2, 2, 0, 1, 0,
            1, 1, 1, 1, 1, 3,
        };
        const uint32_t want3[] = {
            1, 1, 1, 1, 1, 0,
            1, 1, 1, 1, 1, 0,
            1, 1, 1, 1, 1, 0,
            1, 1, 1, 1, 1, 2,
        };
        run_fill(in3, want3, 4, 6, 1);
        run_fill(in3, want3, 4, 6, 0);
        run_fill(in3, want3, 4, 6, -1);
        /* min_size 2 removes the 1-pixel label 3. */
        const uint32_t want3b[] = {
            1, 1, 1, 1, 1, 0,
            1, 1, 1, 1, 1, 0,
            1, 1, 1, 1, 1, 0,
            1, 1, 1, 1, 1, 0,
        };
        run_fill(in3, want3b, 4, 6, 2);
    }
    /* The other way round: label 1 inside ring 2. Label 1 becomes 1, then
     * ring 2 (new id 2) fills its hole over it: id 1 disappears. */
    {
        const uint32_t in[] = {
            2, 2, 2, 2,
            2, 1, 1, 2,
            2, 0, 1, 2,
            2, 2, 2, 2,
        };
        const uint32_t want[] = {
            2, 2, 2, 2,
            2, 2, 2, 2,
            2, 2, 2, 2,
            2, 2, 2, 2,
        };
        run_fill(in, want, 4, 4, 1);
    }
    /* Small labels removed and ids renumbered in value order; gaps in ids;
     * a label split in two parts (its box spans both, the background between
     * them touches the box border, nothing filled). */
    {
        const uint32_t in[] = {
            9, 9, 0, 0, 0, 3, 3,
            9, 9, 0, 5, 0, 3, 3,
            0, 0, 0, 0, 0, 3, 3,
            7, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 7, 7,
        };
        /* sizes: 3 -> 6, 5 -> 1, 7 -> 3, 9 -> 4; min_size 3 removes 5. */
        const uint32_t want[] = {
            3, 3, 0, 0, 0, 1, 1,
            3, 3, 0, 0, 0, 1, 1,
            0, 0, 0, 0, 0, 1, 1,
            2, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 2, 2,
        };
        run_fill(in, want, 5, 7, 3);
        /* min_size 5 also removes 7 and 9. */
        const uint32_t want5[] = {
            0, 0, 0, 0, 0, 1, 1,
            0, 0, 0, 0, 0, 1, 1,
            0, 0, 0, 0, 0, 1, 1,
            0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0,
        };
        run_fill(in, want5, 5, 7, 5);
        /* Huge ids (sparse lookup path) behave the same. */
        uint32_t big[35];
        for (int i = 0; i < 35; i++) big[i] = in[i] ? 4000000000u + in[i] : 0;
        run_fill(big, want, 5, 7, 3);
    }
    /* Empty image: unchanged. */
    {
        uint32_t in[12] = {0}, want[12] = {0};
        run_fill(in, want, 3, 4, 25);
    }
    /* A label whose own pixels are all < min_size after an earlier fill:
     * default min_size with a real-size ring. */
    {
        enum { N = 12 };
        uint32_t in[N * N], want[N * N];
        for (int y = 0; y < N; y++)
            for (int x = 0; x < N; x++) {
                int ring = (y == 1 || y == N - 2 || x == 1 || x == N - 2) && y >= 1 && y <= N - 2 &&
                           x >= 1 && x <= N - 2;
                int inner = y >= 4 && y <= 6 && x >= 4 && x <= 6;
                in[y * N + x] = ring ? 6 : inner ? 2 : 0;
                want[y * N + x] = (y >= 1 && y <= N - 2 && x >= 1 && x <= N - 2) ? 1 : 0;
            }
        /* 2 has 9 px < 25: erased first (hole stays background), then ring 6
         * (36 px) fills its hole and becomes 1. */
        run_fill(in, want, N, N, CS_MIN_MASK_SIZE);
    }
}

/* distinct non-zero values, counted against a hand-made image: gaps, repeats, and values
 * far above the pixel count (the sorted path instead of the direct table) */
static void test_count_labels(void **state) {
    (void)state;
    const uint32_t lab[12] = {0, 7, 7, 3, 0, 0, 4000000000u, 3, 9, 9, 7, 0};
    size_t n = 99;
    assert_int_equal(cs_count_labels(lab, 3, 4, &n), CELLSAM_OK);
    assert_int_equal(n, 4); /* 3, 7, 9, 4000000000 */
    const uint32_t empty[6] = {0};
    assert_int_equal(cs_count_labels(empty, 2, 3, &n), CELLSAM_OK);
    assert_int_equal(n, 0);
    const uint32_t dense[4] = {1, 2, 3, 4};
    assert_int_equal(cs_count_labels(dense, 2, 2, &n), CELLSAM_OK);
    assert_int_equal(n, 4);
}

/* Label bounding boxes as pixel edges, in increasing label order, for values sparse
 * (the sorted path of find_label_boxes) and dense alike; no labels, no boxes. */
static void test_label_boxes(void **state) {
    (void)state;
    /* 3 x 4: label 7 at (1,0), (2,0), (2,2); 3 at (3,0), (3,1); 9 at (0,2), (1,2);
     * 4000000000 at (2,1) */
    const uint32_t lab[12] = {0, 7, 7, 3, 0, 0, 4000000000u, 3, 9, 9, 7, 0};
    cellsam_box *b = NULL;
    int n = -1;
    assert_int_equal(cs_label_boxes(lab, 3, 4, &b, &n), CELLSAM_OK);
    assert_int_equal(n, 4);
    const float want[4][4] = {{3, 0, 4, 2}, {1, 0, 3, 3}, {0, 2, 2, 3}, {2, 1, 3, 2}};
    for (int i = 0; i < 4; i++) {
        assert_float_equal(b[i].x1, want[i][0], 0);
        assert_float_equal(b[i].y1, want[i][1], 0);
        assert_float_equal(b[i].x2, want[i][2], 0);
        assert_float_equal(b[i].y2, want[i][3], 0);
    }
    free(b);
    const uint32_t empty[6] = {0};
    assert_int_equal(cs_label_boxes(empty, 2, 3, &b, &n), CELLSAM_OK);
    assert_int_equal(n, 0);
    free(b);
    assert_int_equal(cs_label_boxes(empty, 0, 3, &b, &n), CELLSAM_ERR_INVALID);
    assert_null(b);
}

static void test_subtract_boundaries_hand(void **state) {
    (void)state;
    uint32_t lab[] = {
        1, 1, 2, 2,
        1, 1, 2, 2,
        0, 0, 0, 0,
    };
    /* left-neighbour change marks (0,2),(1,2); change to the pixel below
     * marks all of row 1. */
    const uint32_t want[] = {
        1, 1, 0, 2,
        0, 0, 0, 0,
        0, 0, 0, 0,
    };
    assert_int_equal(cs_subtract_boundaries(lab, 3, 4), CELLSAM_OK);
    assert_memory_equal(lab, want, sizeof want);

    uint32_t lab2[] = {
        5, 5, 5, 0, 3,
        5, 5, 5, 0, 3,
        5, 5, 5, 3, 3,
        5, 5, 5, 3, 3,
    };
    const uint32_t want2[] = {
        5, 5, 5, 0, 0,
        5, 5, 5, 0, 0,
        5, 5, 5, 0, 3,
        5, 5, 5, 0, 3,
    };
    /* (0,4),(1,4): left neighbour 0 differs; (1,3): pixel below differs;
     * column 3 of rows 2-3: left neighbour 5 differs. */
    assert_int_equal(cs_subtract_boundaries(lab2, 4, 5), CELLSAM_OK);
    assert_memory_equal(lab2, want2, sizeof want2);
}

/* ----------------------------------------------------------- errors */

static void test_errors(void **state) {
    (void)state;
    float lo[16] = {0};
    float out[4];
    uint32_t lab[4] = {0};
    int x0, y0, x1, y1;
    assert_int_equal(cs_upsample_logits(NULL, 2, 2, out), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_upsample_logits(lo, 0, 2, out), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_upsample_logits(lo, 2, -1, out), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_upsample_logits(lo, CS_POST_MAX_SIDE + 1, 2, out), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_upsample_logits(lo, CS_POST_MAX_SIDE, CS_POST_MAX_SIDE, out),
                     CELLSAM_ERR_LIMIT);
    assert_int_equal(cs_upsample_logits_region(lo, 2, 2, 0, 0, 3, 1, out), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_upsample_logits_region(lo, 2, 2, 1, 0, 0, 1, out), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_upsample_logits_region(lo, 2, 2, 0, -1, 1, 1, out), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_mask_support_region(NULL, 2, 2, 0.0f, &x0, &y0, &x1, &y1), -1);
    assert_int_equal(cs_mask_support_region(lo, 0, 2, 0.0f, &x0, &y0, &x1, &y1), -1);
    assert_int_equal(x0 | y0 | x1 | y1, 0);
    cs_label_composer c;
    assert_int_equal(cs_composer_init(&c, 0, 5), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_composer_init(NULL, 5, 5), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_fill_holes_remove_small(NULL, 2, 2, 25), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_fill_holes_remove_small(lab, 2, 0, 25), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_subtract_boundaries(NULL, 2, 2), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_subtract_boundaries(lab, -2, 2), CELLSAM_ERR_INVALID);
    cs_composer_free(NULL);
    cs_upsampler_free(NULL);
    assert_null(cs_composer_take_labels(NULL));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_upsample_reference),
        cmocka_unit_test(test_threshold_reference),
        cmocka_unit_test(test_compose_reference),
        cmocka_unit_test(test_fill_holes_reference),
        cmocka_unit_test(test_boxes_reference),
        cmocka_unit_test(test_region_equals_full),
        cmocka_unit_test(test_support_and_composer),
        cmocka_unit_test(test_support_constant_maps),
        cmocka_unit_test(test_fill_holes_hand),
        cmocka_unit_test(test_label_boxes),
        cmocka_unit_test(test_subtract_boundaries_hand),
        cmocka_unit_test(test_count_labels),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
