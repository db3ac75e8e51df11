/* End to end on every reference case: 00_input through every stage the reference
 * stores (20 embedding, 30 detector trunk, 33/34 detector outputs of all layers,
 * 35-39 post-process and threshold, 40-42 prompts and decoder, 43 upscaled logits,
 * 44/45 masks and composition, 46 boxes, 50 final labels), then the public
 * cellsam_segment (whole-image mode) against 50_label_final. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cellfinder.h"
#include "metrics.h"
#include "model.h"
#include "pipeline.h"
#include "postprocess.h"
#include "preprocess.h"
#include "testutil.h"
#include "weights.h"

static cellsam_model *g_model;
static cellsam_context *g_ctx;

static int setup(void **state) {
    (void)state;
    return tu_load_reference_model("checkpoint.pt", &g_model, &g_ctx);
}

static int teardown(void **state) {
    (void)state;
    cellsam_context_free(g_ctx);
    cellsam_model_free(g_model);
    return 0;
}

static int has(const char *c, const char *f) {
    struct stat st;
    return stat(tu_path("%s/%s", c, f), &st) == 0;
}

/* crop rows 24:40, cols 24:40 of a (C,64,64) map */
static float *crop64(const float *m, int C) {
    float *o = malloc((size_t)C * 256 * sizeof(float));
    for (int c = 0; c < C; c++)
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 16; j++) o[(c * 16 + i) * 16 + j] = m[((size_t)c * 64 + 24 + i) * 64 + 24 + j];
    return o;
}

/* Compare label images: identical pixel fraction and mean IoU of same-id objects. */
static void compare_labels(const char *what, const uint32_t *got, const cs_npy *ref, size_t n, double min_equal) {
    size_t equal = 0;
    uint32_t maxg = 0, maxr = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t r = (uint32_t)cs_npy_get(ref, i);
        equal += got[i] == r;
        maxg = got[i] > maxg ? got[i] : maxg;
        maxr = r > maxr ? r : maxr;
    }
    double iou_sum = 0;
    for (uint32_t l = 1; l <= maxr; l++) {
        size_t inter = 0, uni = 0;
        for (size_t i = 0; i < n; i++) {
            int a = got[i] == l, b = (uint32_t)cs_npy_get(ref, i) == l;
            inter += a && b;
            uni += a || b;
        }
        iou_sum += uni ? (double)inter / uni : 1.0;
    }
    double frac = (double)equal / n;
    printf("  %-32s labels %u (ref %u)  identical pixels %.5f  mean IoU %.5f\n", what, maxg, maxr, frac,
           maxr ? iou_sum / maxr : 1.0);
    assert_int_equal(maxg, maxr);
    assert_true(frac >= min_equal);
    if (maxr) assert_true(iou_sum / maxr >= 0.999);
}

static void run_case(const char *c) {
    printf(" %s\n", c);
    const cellsam_model *m = g_model;
    cs_npy in;
    tu_load(&in, "%s/00_input.npy", c);
    float *raw = cs_npy_to_f32(&in);
    float *hw3;
    int H, W;
    assert_int_equal(cs_format_image_shape(raw, in.ndim, in.shape, &hw3, &H, &W), 0);
    size_t npix = (size_t)H * W;
    float *chw = malloc(npix * 3 * sizeof(float));
    assert_int_equal(cs_normalize_image(hw3, H, W, chw), 0);
    float *sam_in = malloc((size_t)3 << 20 << 2), *det_in = malloc((size_t)3 << 20 << 2);
    assert_int_equal(cs_prep_branches(chw, H, W, sam_in, det_in), 0);
    /* SAM embedding */
    assert_int_equal(cellsam_encode(g_ctx, sam_in, 2), 0);
    cs_npy ref;
    tu_load(&ref, "%s/20_sam_image_embedding.npy", c);
    tu_check_npy("20_sam_image_embedding", g_ctx->embedding, ref.count, &ref, 1e-4);
    cs_npy_free(&ref);
    /* detector trunk and head */
    const int E = m->det_vit.dim;
    float *feat = malloc((size_t)E * 4096 * sizeof(float));
    assert_int_equal(cs_vit_forward(&m->det_vit, det_in, feat, 2), 0);
    float *fc = crop64(feat, E);
    tu_load(&ref, "%s/30_det_backbone_features_crop.npy", c);
    tu_check_npy("30_det_backbone_features_crop", fc, ref.count, &ref, 1e-4);
    cs_npy_free(&ref);
    free(fc);
    cs_cellfinder_dims d;
    cs_cellfinder_get_dims(m->det, &d);
    int Q = d.n_queries, L = d.dec_layers;
    float *lg = malloc((size_t)Q * 2 * sizeof(float)), *bx = malloc((size_t)Q * 4 * sizeof(float));
    float *alg = malloc((size_t)L * Q * 2 * sizeof(float)), *abx = malloc((size_t)L * Q * 4 * sizeof(float));
    assert_int_equal(cs_cellfinder_forward(m->det, feat, lg, bx, alg, abx, 2), 0);
    tu_load(&ref, "%s/33_det_pred_logits_all_layers.npy", c);
    tu_check_npy("33_det_pred_logits_all_layers", alg, ref.count, &ref, 1e-2);
    cs_npy_free(&ref);
    tu_load(&ref, "%s/34_det_pred_boxes_all_layers.npy", c);
    tu_check_npy("34_det_pred_boxes_all_layers", abx, ref.count, &ref, 1e-5);
    cs_npy_free(&ref);
    float *scores = malloc((size_t)Q * sizeof(float)), *xyxy = malloc((size_t)Q * 4 * sizeof(float));
    int *qi = malloc((size_t)Q * sizeof(int));
    unsigned char *keep = malloc((size_t)Q);
    assert_int_equal(cs_cellfinder_postprocess(lg, bx, Q, scores, qi, xyxy), 0);
    tu_load(&ref, "%s/35_det_scores_sorted.npy", c);
    tu_check_npy("35_det_scores_sorted", scores, ref.count, &ref, 2e-3);
    cs_npy_free(&ref);
    float thr;
    assert_int_equal(cs_dynamic_threshold(scores, Q, 0.4f, &thr, keep), 0);
    tu_load(&ref, "%s/38_det_keep_mask.npy", c);
    int K = 0;
    for (int i = 0; i < Q; i++) {
        assert_int_equal(keep[i], (int)cs_npy_get(&ref, i));
        K += keep[i];
    }
    cs_npy_free(&ref);
    /* the kept boxes: order and values */
    cs_npy qref, bref;
    tu_load(&qref, "%s/36_det_topk_query_index.npy", c);
    tu_load(&bref, "%s/39_sam_box_prompts.npy", c);
    assert_int_equal((int)bref.shape[0], K);
    float *kb = malloc((size_t)(K ? K : 1) * 4 * sizeof(float));
    for (int i = 0, k = 0; i < Q; i++)
        if (keep[i]) {
            assert_int_equal(qi[i], (int)cs_npy_get(&qref, i));
            memcpy(kb + 4 * k, xyxy + 4 * i, 4 * sizeof(float));
            k++;
        }
    tu_check_npy("39_sam_box_prompts", kb, (size_t)K * 4, &bref, 1e-5 * 1024);
    cs_npy_free(&qref);
    cs_npy_free(&bref);
    /* decoder on our embedding and boxes */
    cellsam_box *cb = malloc((size_t)(K ? K : 1) * sizeof *cb);
    for (int k = 0; k < K; k++) cb[k] = (cellsam_box){kb[4 * k], kb[4 * k + 1], kb[4 * k + 2], kb[4 * k + 3]};
    cellsam_prompt pr = cellsam_default_prompt();
    pr.boxes = cb;
    pr.n_boxes = K;
    pr.n_threads = 2;
    float *dl, *di;
    int nb, nmk;
    assert_int_equal(cellsam_decode(g_ctx, &pr, &dl, &di, &nb, &nmk), 0);
    tu_load(&ref, "%s/42_iou_predictions.npy", c);
    tu_check_npy("42_iou_predictions", di, (size_t)K, &ref, 1e-5);
    cs_npy_free(&ref);
    tu_load(&ref, "%s/41_lowres_mask_logits_first.npy", c);
    tu_check_npy("41_lowres_mask_logits_first", dl, 256 * 256, &ref, 1e-4);
    cs_npy_free(&ref);
    int first_pass = -1;
    for (int k = 0; k < K && first_pass < 0; k++)
        if (di[k] >= 0.5f) first_pass = k;
    if (has(c, "43_upscaled_mask_logits_first.npy") && first_pass >= 0) {
        float *up = malloc(npix * sizeof(float));
        assert_int_equal(cs_upsample_logits(dl + (size_t)first_pass * 65536, H, W, up), 0);
        tu_load(&ref, "%s/43_upscaled_mask_logits_first.npy", c);
        tu_check_npy("43_upscaled_mask_logits_first", up, npix, &ref, 7e-4);
        cs_npy_free(&ref);
        free(up);
    }
    /* final boxes in the original frame (46) */
    tu_load(&ref, "%s/46_final_boxes_orig_frame.npy", c);
    {
        int kp = 0;
        float *fb = malloc((size_t)(K ? K : 1) * 4 * sizeof(float));
        for (int k = 0; k < K; k++)
            if (di[k] >= 0.5f) {
                double o[4];
                cs_box_to_orig_frame(kb + 4 * k, H, W, o);
                for (int j = 0; j < 4; j++) fb[4 * kp + j] = (float)o[j];
                kp++;
            }
        assert_int_equal((size_t)kp * 4, ref.count);
        tu_check_npy("46_final_boxes_orig_frame", fb, ref.count, &ref, 1e-3);
        free(fb);
    }
    cs_npy_free(&ref);
    cellsam_free(dl);
    cellsam_free(di);
    /* the whole single-image pipeline, and the public API */
    cellsam_segment_params sp = cellsam_segment_default_params();
    sp.tiled = 0;
    sp.n_threads = 2;
    tu_load(&ref, "%s/50_label_final.npy", c);
    cellsam_result *res;
    assert_int_equal(cellsam_segment(g_ctx, hw3, W, H, 3, &sp, &res), 0);
    compare_labels("50_label_final (cellsam_segment)", res->labels, &ref, npix, 0.999);
    /* reusing the reference embedding (skips the encoder) gives the same labels */
    {
        cs_npy e20;
        tu_load(&e20, "%s/20_sam_image_embedding.npy", c);
        float *e = cs_npy_to_f32(&e20);
        cellsam_segment_params sp2 = sp;
        sp2.embedding = e;
        cellsam_result *res2;
        assert_int_equal(cellsam_segment(g_ctx, hw3, W, H, 3, &sp2, &res2), 0);
        compare_labels("50_label_final (given embedding)", res2->labels, &ref, npix, 0.999);
        cellsam_result_free(res2);
        free(e);
        cs_npy_free(&e20);
    }
    assert_int_equal(res->n_boxes_detected, K);
    /* the stage times are each non-negative and add up to the call's wall time */
    {
        const double st[5] = {res->t_preprocess, res->t_encoder, res->t_detector, res->t_decoder, res->t_postprocess};
        double sum = 0;
        for (int i = 0; i < 5; i++) {
            assert_true(st[i] >= 0);
            sum += st[i];
        }
        assert_true(res->t_encoder > 0 && res->t_detector > 0);
        assert_true(fabs(sum - res->seconds) < 1e-6);
    }
    for (int i = 0; i < res->n_cells; i++) {
        assert_true(res->cells[i].area > 0);
        assert_true(res->cells[i].iou >= 0.5f);
        assert_true(res->cells[i].score > thr);
    }
    cellsam_result_free(res);
    cs_npy_free(&ref);
    free(cb);
    free(kb);
    free(keep);
    free(qi);
    free(xyxy);
    free(scores);
    free(lg);
    free(bx);
    free(alg);
    free(abx);
    free(feat);
    free(sam_in);
    free(det_in);
    free(chw);
    free(hw3);
    free(raw);
    cs_npy_free(&in);
}

static void test_all_cases(void **state) {
    (void)state;
    DIR *d = opendir(tu_testdata());
    assert_non_null(d);
    struct dirent *de;
    char names[64][256];
    int n = 0;
    while ((de = readdir(d)) && n < 64)
        if (!strncmp(de->d_name, "case_", 5)) snprintf(names[n++], 256, "%s", de->d_name);
    closedir(d);
    assert_true(n > 0);
    for (int i = 0; i < n; i++) run_case(names[i]);
}

/* The reference checkpoint with metadata `key` = `bad` must be refused with an error
 * naming the key; with `key` = `good` (and `extra_key` = `extra_value` when given) it
 * is loaded and returned. */
static cellsam_model *load_with_meta(const char *key, const char *good, const char *bad, const char *extra_key,
                                     const char *extra_value) {
    char cfg[1024];
    snprintf(cfg, sizeof cfg, "%s/config.json", tu_testdata());
    cellsam_model_params mp = cellsam_model_default_params();
    mp.config_path = cfg;
    cs_weights *w = NULL;
    assert_int_equal(cs_weights_open(tu_path("checkpoint.safetensors"), &w), 0);
    const char *bad_path = tu_tmp("%s_bad.safetensors", key);
    assert_int_equal(cs_weights_set_meta(w, key, bad), 0);
    assert_int_equal(cs_weights_save_safetensors(w, bad_path, CS_DTYPE_F32), 0);
    cellsam_model *m = NULL;
    assert_int_equal(cellsam_model_load(bad_path, &mp, &m), CELLSAM_ERR_MODEL);
    printf("  bad hint: %s\n", cellsam_last_error());
    char named[256]; /* the message, not just the file name, must name the key */
    snprintf(named, sizeof named, "metadata %s=", key);
    assert_non_null(strstr(cellsam_last_error(), named));
    const char *good_path = tu_tmp("%s_good.safetensors", key);
    assert_int_equal(cs_weights_set_meta(w, key, good), 0);
    if (extra_key) assert_int_equal(cs_weights_set_meta(w, extra_key, extra_value), 0);
    assert_int_equal(cs_weights_save_safetensors(w, good_path, CS_DTYPE_F32), 0);
    cs_weights_free(w);
    assert_int_equal(cellsam_model_load(good_path, &mp, &m), 0);
    return m;
}

/* The blob image the hint tests segment: 24 px checkerboard squares plus texture. */
static float *checker_image(int W, int H) {
    float *img = malloc((size_t)W * H * sizeof(float));
    assert_non_null(img);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) img[y * W + x] = (float)(((x / 24 + y / 24) % 2) * 200 + (x * 31 + y * 17) % 23);
    return img;
}

/* A model's recommendation of whole-image mode (metadata cellsam.whole_image_max_side):
 * with tiled = -1 (the default), images up to that side are segmented whole and larger
 * ones tiled, each exactly as the explicit mode; without the metadata (the official
 * checkpoint) the default tiles; malformed metadata and tiled values are refused. */
static void test_whole_image_hint(void **state) {
    (void)state;
    cellsam_model *m = load_with_meta("cellsam.whole_image_max_side", "100", "12x", NULL, NULL);
    cellsam_model_info info;
    assert_int_equal(cellsam_model_get_info(m, &info), 0);
    assert_int_equal(info.whole_image_max_side, 100);
    assert_int_equal(cellsam_model_tiling(m, -1, 100, 64), 0);
    assert_int_equal(cellsam_model_tiling(m, -1, 64, 101), 1);
    assert_int_equal(cellsam_model_tiling(m, 1, 10, 10), 1);
    assert_int_equal(cellsam_model_tiling(g_model, -1, 10, 10), 1); /* official: tiled */
    cellsam_context *ctx = NULL;
    assert_int_equal(cellsam_context_new(m, &ctx), 0);

    /* 96 x 96 (whole under the hint) and 160 x 96 (tiled): blobs */
    const int sizes[2][2] = {{96, 96}, {160, 96}};
    for (int k = 0; k < 2; k++) {
        const int W = sizes[k][0], H = sizes[k][1];
        float *img = checker_image(W, H);
        cellsam_segment_params sp = cellsam_segment_default_params();
        assert_int_equal(sp.tiled, -1);
        sp.n_threads = 2;
        cellsam_result *dflt = NULL, *expl = NULL, *official = NULL, *official_tiled = NULL;
        assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &dflt), 0);
        assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &sp, &official), 0);
        sp.tiled = k; /* what the hint should have chosen */
        assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &expl), 0);
        sp.tiled = 1;
        assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &sp, &official_tiled), 0);
        printf("  %d x %d: %s by the hint, %d cells\n", W, H, k ? "tiled" : "whole", dflt->n_cells);
        assert_int_equal(dflt->n_cells, expl->n_cells);
        assert_memory_equal(dflt->labels, expl->labels, (size_t)W * H * sizeof(uint32_t));
        assert_int_equal(official->n_cells, official_tiled->n_cells);
        assert_memory_equal(official->labels, official_tiled->labels, (size_t)W * H * sizeof(uint32_t));
        /* the two modes differ on these images, so the equalities above say which ran */
        cellsam_result *other = NULL;
        sp.tiled = !k;
        assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &other), 0);
        assert_memory_not_equal(dflt->labels, other->labels, (size_t)W * H * sizeof(uint32_t));
        cellsam_result_free(other);
        cellsam_result_free(dflt);
        cellsam_result_free(expl);
        cellsam_result_free(official);
        cellsam_result_free(official_tiled);
        free(img);
    }
    cellsam_result *r = NULL;
    cellsam_segment_params bad = cellsam_segment_default_params();
    bad.tiled = 2;
    float px[16] = {0};
    assert_int_equal(cellsam_segment(ctx, px, 4, 4, 1, &bad, &r), CELLSAM_ERR_INVALID);
    assert_null(r);
    cellsam_context_free(ctx);
    cellsam_model_free(m);
}

/* Two label images describe the same objects when they are equal up to renumbering;
 * `got` must also number its objects 1..n in first-seen (raster) order, as the
 * padded-canvas path renumbers them (the whole-image mode numbers by score). */
static void assert_labels_renumbered(const uint32_t *got, const uint32_t *ref, size_t n) {
    uint32_t next = 0;
    uint32_t *map = calloc(n + 1, sizeof *map);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(got[i] == 0, ref[i] == 0);
        if (!ref[i]) continue;
        if (!map[ref[i]]) map[ref[i]] = ++next;
        assert_int_equal(got[i], map[ref[i]]);
    }
    free(map);
}

/* Cell size (segment `diameter`, src/diameter.c). The zoom is cell_diameter (64 for
 * the official checkpoint, else metadata cellsam.cell_diameter) over the diameter,
 * clamped to [1/4, 4]; each path must be exactly the explicit run it stands for:
 *  - an image that fills one network input at that zoom: the whole-image mode;
 *  - a smaller one: whole-image mode on its edge-padded square, cropped and renumbered;
 *  - a larger one: tiled mode with overlap and iou_depth scaled by 2 / zoom (the
 *    official tiles' zoom) and block = 1024 / zoom - 2 overlap;
 *  - auto: the diameter cellsam_estimate_diameter gives, then as given.
 * Bad values are refused. */
static void test_diameter(void **state) {
    (void)state;
    cellsam_model *m = load_with_meta("cellsam.cell_diameter", "32", "2", NULL, NULL);
    cellsam_model_info info;
    assert_int_equal(cellsam_model_get_info(m, &info), 0);
    assert_int_equal(info.cell_diameter, 32);
    assert_int_equal(cellsam_model_get_info(g_model, &info), 0);
    assert_int_equal(info.cell_diameter, CELLSAM_DEFAULT_NET_CELL_DIAMETER);

    const int sizes[3][2] = {{256, 256}, {160, 96}, {600, 200}};
    for (int k = 0; k < 3; k++) {
        const int W = sizes[k][0], H = sizes[k][1];
        float *img = checker_image(W, H);
        cellsam_segment_params sp = cellsam_segment_default_params();
        sp.n_threads = 2;
        /* official checkpoint: zoom 64 / 16 = 4, one network input = 256 px; the large
         * image at 64 / 24 = 2.67: 384 px, halo and band 56 x 2 / 2.67 = 42 */
        sp.diameter = k == 2 ? 24 : 16;
        cellsam_result *got = NULL, *ref = NULL;
        assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &sp, &got), 0);
        assert_float_equal(got->zoom, (float)(64.0 / sp.diameter), 1e-6);
        assert_float_equal(got->diameter, sp.diameter, 0);
        assert_int_equal(got->width, W);
        assert_int_equal(got->height, H);
        cellsam_segment_params ep = cellsam_segment_default_params();
        ep.n_threads = 2;
        if (k == 0) { /* fills the input: the whole-image mode itself, renumbered */
            ep.tiled = 0;
            assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &ep, &ref), 0);
            assert_labels_renumbered(got->labels, ref->labels, (size_t)W * H);
        } else if (k == 1) { /* padded by its last row and column to 256 x 256, cropped */
            const int S = 256;
            float *canvas = malloc((size_t)S * S * sizeof(float));
            for (int y = 0; y < S; y++)
                for (int x = 0; x < S; x++) canvas[y * S + x] = img[(y < H ? y : H - 1) * W + (x < W ? x : W - 1)];
            ep.tiled = 0;
            assert_int_equal(cellsam_segment(g_ctx, canvas, S, S, 1, &ep, &ref), 0);
            uint32_t *crop = malloc((size_t)W * H * sizeof(uint32_t));
            for (int y = 0; y < H; y++) memcpy(crop + (size_t)y * W, ref->labels + (size_t)y * S, W * sizeof(uint32_t));
            assert_labels_renumbered(got->labels, crop, (size_t)W * H);
            free(crop);
            free(canvas);
        } else { /* larger than one input: tiles of 384 px, halo included */
            ep.tiled = 1;
            ep.overlap = 42;
            ep.iou_depth = 42;
            ep.block_size = 384 - 2 * 42;
            assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &ep, &ref), 0);
            assert_memory_equal(got->labels, ref->labels, (size_t)W * H * sizeof(uint32_t));
            /* and not the same tiles with the halo left at 56 px (so the check above can fail) */
            cellsam_result *unscaled = NULL;
            ep.overlap = ep.iou_depth = 56;
            ep.block_size = 384 - 2 * 56;
            assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &ep, &unscaled), 0);
            assert_memory_not_equal(got->labels, unscaled->labels, (size_t)W * H * sizeof(uint32_t));
            cellsam_result_free(unscaled);
        }
        printf("  %d x %d, diameter %g: %d cells (explicit run: %d)\n", W, H, sp.diameter, got->n_cells, ref->n_cells);
        assert_true(got->n_cells > 0);
        /* the same objects, so the same count (the crop may cut off padded-only ones) */
        if (k != 1) assert_int_equal(got->n_cells, ref->n_cells);
        cellsam_result_free(ref);
        cellsam_result_free(got);
        /* auto = the estimated diameter, given */
        float d = -1;
        sp.diameter = CELLSAM_DIAMETER_AUTO;
        sp.tiled = 0; /* the first pass in whole-image mode, which finds enough cells to size here */
        assert_int_equal(cellsam_estimate_diameter(g_ctx, img, W, H, 1, &sp, &d), 0);
        assert_true(d >= 0);
        assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &sp, &got), 0);
        sp.diameter = d;
        /* (with d = 0, too few cells to size, both are the first pass) */
        assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &sp, &ref), 0);
        printf("  %d x %d, auto: diameter %.1f, zoom %.2f, %d cells\n", W, H, d, got->zoom, got->n_cells);
        assert_float_equal(got->diameter, d, 0);
        assert_memory_equal(got->labels, ref->labels, (size_t)W * H * sizeof(uint32_t));
        cellsam_result_free(ref);
        cellsam_result_free(got);
        free(img);
    }
    /* the model's own cell diameter: 32 / 16 = zoom 2 */
    cellsam_context *ctx = NULL;
    assert_int_equal(cellsam_context_new(m, &ctx), 0);
    float blank[64 * 64] = {0}; /* (the random tiny model finds "cells" even here) */
    cellsam_segment_params sp = cellsam_segment_default_params();
    sp.diameter = 16;
    cellsam_result *r = NULL;
    assert_int_equal(cellsam_segment(ctx, blank, 64, 64, 1, &sp, &r), 0);
    assert_float_equal(r->zoom, 2.0f, 0);
    cellsam_result_free(r);
    const float bad[] = {NAN, INFINITY, -3.0f, -0.5f};
    for (int i = 0; i < 4; i++) {
        r = NULL;
        sp.diameter = bad[i];
        assert_int_equal(cellsam_segment(ctx, blank, 64, 64, 1, &sp, &r), CELLSAM_ERR_INVALID);
        assert_non_null(strstr(cellsam_last_error(), "diameter"));
        assert_null(r);
    }
    cellsam_context_free(ctx);
    cellsam_model_free(m);
}

/* User boxes at a cell size (src/diameter.c). Auto takes the upper median of the
 * boxes' sqrt(w h). Each box is prompted once, exactly as the explicit whole-image run
 * with the boxes on the network-input canvas it lands in: the edge-padded image when
 * it fits one input, else the window around the tiling block holding the box's centre
 * (image-wide min-max, as tiles), pasted back; blocks without a box are skipped. */
static void test_diameter_boxes(void **state) {
    (void)state;
    /* sqrt(w h) = 8, 16, 16, 40 and a degenerate box (1 x 1 -> 1): upper median 16 */
    const cellsam_box sized[5] = {{0, 0, 8, 8}, {10, 10, 42, 18}, {0, 0, 4, 64}, {5, 5, 45, 45}, {3, 3, 3, 3}};
    assert_float_equal(cs_boxes_diameter(sized, 5), 16, 1e-6);
    assert_float_equal(cs_boxes_diameter(sized, 4), 16, 1e-6);
    assert_float_equal(cs_boxes_diameter(sized, 1), 8, 1e-6);
    assert_float_equal(cs_boxes_diameter(sized, 0), 0, 0);

    /* 600 x 200 at diameter 16: zoom 64 / 16 = 4, windows of 256 px, halo 56 x 2 / 4 =
     * 28, blocks of 200: three blocks along x, the middle one's window at x = 172 */
    const int W = 600, H = 200, S = 256, X0 = 172;
    float *img = checker_image(W, H);
    const cellsam_box mid[2] = {{240, 40, 272, 76}, {300, 120, 330, 150}}; /* sqrt(w h) 33.9, 30 */
    cellsam_segment_params sp = cellsam_segment_default_params();
    sp.n_threads = 2;
    sp.boxes = mid;
    sp.n_boxes = 2;
    sp.diameter = 16;
    cellsam_result *got = NULL, *ref = NULL;
    assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &sp, &got), 0);
    assert_float_equal(got->zoom, 4.0f, 0);
    assert_int_equal(got->n_boxes_detected, 2);
    /* the explicit run: the window, min-max over the whole image, padded to S x S */
    float mn = img[0], mx = img[0];
    for (int i = 0; i < W * H; i++) {
        mn = img[i] < mn ? img[i] : mn;
        mx = img[i] > mx ? img[i] : mx;
    }
    float *canvas = malloc((size_t)S * S * sizeof(float));
    for (int y = 0; y < S; y++)
        for (int x = 0; x < S; x++) canvas[y * S + x] = (img[(y < H ? y : H - 1) * W + X0 + x] - mn) / (mx - mn);
    cellsam_box shifted[2];
    for (int i = 0; i < 2; i++) shifted[i] = (cellsam_box){mid[i].x1 - X0, mid[i].y1, mid[i].x2 - X0, mid[i].y2};
    cellsam_segment_params ep = cellsam_segment_default_params();
    ep.n_threads = 2;
    ep.boxes = shifted;
    ep.n_boxes = 2;
    ep.diameter = 0;
    assert_int_equal(cellsam_segment(g_ctx, canvas, S, S, 1, &ep, &ref), 0);
    uint32_t *expect = calloc((size_t)W * H, sizeof *expect);
    for (int y = 0; y < H; y++) memcpy(expect + (size_t)y * W + X0, ref->labels + (size_t)y * S, S * sizeof(uint32_t));
    assert_labels_renumbered(got->labels, expect, (size_t)W * H);
    printf("  boxes in windows: %d cells from 2 boxes (explicit window run: %d)\n", got->n_cells, ref->n_cells);
    cellsam_result_free(got);
    cellsam_result_free(ref);

    /* auto: the boxes' diameter (upper median of 33.9 and 30), no first pass */
    sp.diameter = CELLSAM_DIAMETER_AUTO;
    assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &sp, &got), 0);
    assert_float_equal(got->diameter, cs_boxes_diameter(mid, 2), 0);
    assert_float_equal(got->zoom, (float)(64.0 / cs_boxes_diameter(mid, 2)), 1e-6);
    cellsam_result_free(got);

    /* a box in each block, and one whose centre lies off the image: each decoded once */
    const cellsam_box spread[4] = {{20, 20, 50, 50}, {260, 90, 290, 120}, {560, 150, 590, 180}, {590, -20, 640, 10}};
    sp.boxes = spread;
    sp.n_boxes = 4;
    sp.diameter = 16;
    assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &sp, &got), 0);
    assert_int_equal(got->n_boxes_detected, 4);
    assert_true(got->n_cells <= 4);
    cellsam_result_free(got);

    /* a small image fits one input: the boxes keep their coordinates on the padded canvas */
    const int w = 160, h = 96;
    for (int y = 0; y < S; y++)
        for (int x = 0; x < S; x++) canvas[y * S + x] = img[(y < h ? y : h - 1) * W + (x < w ? x : w - 1)];
    float *small = malloc((size_t)w * h * sizeof(float));
    for (int y = 0; y < h; y++) memcpy(small + (size_t)y * w, img + (size_t)y * W, w * sizeof(float));
    const cellsam_box two[2] = {{20, 20, 52, 52}, {90, 30, 122, 62}};
    sp.boxes = ep.boxes = two;
    sp.n_boxes = ep.n_boxes = 2;
    assert_int_equal(cellsam_segment(g_ctx, small, w, h, 1, &sp, &got), 0);
    assert_int_equal(cellsam_segment(g_ctx, canvas, S, S, 1, &ep, &ref), 0);
    assert_float_equal(got->zoom, 4.0f, 0);
    for (int y = 0; y < h; y++) memcpy(expect + (size_t)y * w, ref->labels + (size_t)y * S, w * sizeof(uint32_t));
    assert_labels_renumbered(got->labels, expect, (size_t)w * h);
    assert_true(got->n_cells > 0);
    cellsam_result_free(got);
    cellsam_result_free(ref);
    /* diameter 0: the official way, the image stretched to the input (not the canvas) */
    sp.diameter = 0;
    assert_int_equal(cellsam_segment(g_ctx, small, w, h, 1, &sp, &got), 0);
    assert_float_equal(got->zoom, 0, 0);
    cellsam_result_free(got);
    free(small);
    free(expect);
    free(canvas);
    free(img);
}

/* A model can recommend cell sizing per image (metadata cellsam.diameter = "auto"):
 * the default diameter (CELLSAM_DIAMETER_MODEL) is then auto in the model's own mode
 * (tiled = -1), and off when a mode is chosen (the official modes stay exact); the
 * official checkpoint recommends nothing; other values are refused. */
static void test_diameter_hint(void **state) {
    (void)state;
    /* with whole-image mode recommended too: its first pass finds enough cells to size */
    cellsam_model *m = load_with_meta("cellsam.diameter", "auto", "sometimes", "cellsam.whole_image_max_side", "1024");
    cellsam_model_info info;
    assert_int_equal(cellsam_model_get_info(m, &info), 0);
    assert_int_equal(info.auto_diameter, 1);
    assert_int_equal(cellsam_model_get_info(g_model, &info), 0);
    assert_int_equal(info.auto_diameter, 0);
    cellsam_segment_params sp = cellsam_segment_default_params();
    assert_true(sp.diameter == CELLSAM_DIAMETER_MODEL);
    assert_true(cellsam_model_diameter(m, CELLSAM_DIAMETER_MODEL, -1) == CELLSAM_DIAMETER_AUTO);
    assert_true(cellsam_model_diameter(m, CELLSAM_DIAMETER_MODEL, 0) == 0);
    assert_true(cellsam_model_diameter(m, CELLSAM_DIAMETER_MODEL, 1) == 0);
    assert_true(cellsam_model_diameter(g_model, CELLSAM_DIAMETER_MODEL, -1) == 0);
    assert_true(cellsam_model_diameter(m, 12.5f, -1) == 12.5f);
    assert_true(cellsam_model_diameter(m, 0, -1) == 0);

    cellsam_context *ctx = NULL;
    assert_int_equal(cellsam_context_new(m, &ctx), 0);
    const int W = 256, H = 256;
    float *img = checker_image(W, H);
    sp.n_threads = 2;
    cellsam_result *dflt = NULL, *expl = NULL, *whole = NULL, *off = NULL;
    assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &dflt), 0);
    sp.diameter = CELLSAM_DIAMETER_AUTO;
    assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &expl), 0);
    assert_memory_equal(dflt->labels, expl->labels, (size_t)W * H * sizeof(uint32_t));
    assert_float_equal(dflt->diameter, expl->diameter, 0);
    assert_true(dflt->zoom > 0); /* it did zoom */
    sp.diameter = CELLSAM_DIAMETER_MODEL;
    sp.tiled = 1; /* an explicit mode: the official one, unzoomed */
    assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &whole), 0);
    sp.diameter = 0;
    assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &off), 0);
    assert_float_equal(whole->zoom, 0, 0);
    assert_memory_equal(whole->labels, off->labels, (size_t)W * H * sizeof(uint32_t));
    printf("  model-recommended sizing: diameter %.1f, zoom %.2f, %d cells; explicit tiled mode: %d cells\n",
           dflt->diameter, dflt->zoom, dflt->n_cells, whole->n_cells);
    cellsam_result_free(dflt);
    cellsam_result_free(expl);
    cellsam_result_free(whole);
    cellsam_result_free(off);
    /* user boxes: the recommended auto sizes them from the boxes; an explicit mode, not */
    const cellsam_box boxes[3] = {{10, 10, 30, 30}, {100, 100, 124, 124}, {200, 40, 228, 68}};
    cellsam_segment_params bp = cellsam_segment_default_params();
    bp.boxes = boxes;
    bp.n_boxes = 3;
    bp.n_threads = 2;
    assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &bp, &dflt), 0);
    assert_float_equal(dflt->diameter, 24, 0);
    assert_float_equal(dflt->zoom, (float)(CELLSAM_DEFAULT_NET_CELL_DIAMETER / 24.0), 1e-6);
    bp.tiled = 0;
    assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &bp, &off), 0);
    assert_float_equal(off->zoom, 0, 0);
    assert_int_equal(off->n_boxes_detected, 3);
    cellsam_result_free(dflt);
    cellsam_result_free(off);
    free(img);
    cellsam_context_free(ctx);
    cellsam_model_free(m);
}

/* Opt-in reduced-precision compute (--precision bf16, --precision int8) on every
 * reference case, against the official float32 labels (50_label_final), as objects
 * (F1 at IoU 0.5):
 *  - with only the SAM branch in reduced precision the labels must agree (measured:
 *    bf16 F1 1 on all four cases, >= 99.8 % identical pixels; int8 F1 1 on three
 *    and 0.667 on one, where one of 3 masks moved, >= 99.5 % identical pixels: int8's
 *    bound is pixels >= 99 % and F1 >= 0.6);
 *  - with the detector in reduced precision too (what --precision does), the random
 *    tiny detector, ill-conditioned (test_cellfinder), moves its logits by units and
 *    other boxes pass its threshold (measured bf16 F1 0.15-0.33 on the four cases).
 *    That is reported, not asserted; on a trained model the bundled model's F1 on real
 *    images is unchanged (tests/cli_default_model.sh). */
static void check_compute_labels(int dtype) {
    const char *name = dtype == CELLSAM_DTYPE_INT8 ? "int8" : "bf16";
    cellsam_model_params p = cellsam_model_default_params();
    char cfg[1024];
    snprintf(cfg, sizeof cfg, "%s/config.json", tu_testdata());
    p.config_path = cfg;
    p.compute_dtype = dtype;
    cellsam_model *m;
    cellsam_context *ctx;
    assert_int_equal(cellsam_model_load(tu_path("checkpoint.pt"), &p, &m), 0);
    assert_int_equal(cellsam_context_new(m, &ctx), 0);
    for (int both = 0; both < 2; both++) {
        /* the detector (trunk and head) in float32 or reduced precision; the packed
         * matrices stay, and the float32 ones are still bound */
        if (dtype == CELLSAM_DTYPE_INT8) {
            m->det_vit.compute_int8 = both; /* the head has no int8 path */
        } else {
            m->det_vit.compute_bf16 = both;
            cs_cellfinder_set_compute_bf16(m->det, both);
        }
        DIR *d = opendir(tu_testdata());
        assert_non_null(d);
        struct dirent *de;
        int n_cases = 0;
        double worst = 1;
        while ((de = readdir(d))) {
            if (strncmp(de->d_name, "case_", 5)) continue;
            cs_npy in, ref;
            tu_load(&in, "%s/00_input.npy", de->d_name);
            tu_load(&ref, "%s/50_label_final.npy", de->d_name);
            float *raw = cs_npy_to_f32(&in), *hw3;
            int H, W;
            assert_int_equal(cs_format_image_shape(raw, in.ndim, in.shape, &hw3, &H, &W), 0);
            cellsam_segment_params sp = cellsam_segment_default_params();
            sp.tiled = 0;
            sp.n_threads = 2;
            cellsam_result *res;
            assert_int_equal(cellsam_segment(ctx, hw3, W, H, 3, &sp, &res), 0);
            const size_t npix = (size_t)H * W;
            uint32_t *gt = malloc(npix * sizeof(uint32_t));
            size_t same = 0;
            for (size_t i = 0; i < npix; i++) {
                gt[i] = (uint32_t)cs_npy_get(&ref, i);
                same += gt[i] == res->labels[i];
            }
            cs_match_stats st;
            assert_int_equal(cs_evaluate_labels(gt, res->labels, npix, &st), 0);
            printf("  %-28s %s %-13s %d cells (float32 %d), F1@0.5 %.3f, identical pixels %.4f\n", de->d_name,
                   name, both ? "everywhere:" : "SAM branch:", st.tp + st.fp, st.tp + st.fn, st.f1, (double)same / npix);
            assert_int_equal(st.tp + st.fp, res->n_cells);
            for (int i = 0; i < res->n_cells; i++) assert_true(res->cells[i].iou >= 0.5f && res->cells[i].area > 0);
            worst = st.f1 < worst ? st.f1 : worst;
            if (!both && dtype == CELLSAM_DTYPE_INT8) assert_true((double)same / npix >= 0.99);
            n_cases++;
            free(gt);
            cellsam_result_free(res);
            free(hw3);
            free(raw);
            cs_npy_free(&in);
            cs_npy_free(&ref);
        }
        closedir(d);
        assert_true(n_cases > 0);
        if (!both) assert_true(worst >= (dtype == CELLSAM_DTYPE_INT8 ? 0.6 : 0.9));
    }
    cellsam_context_free(ctx);
    cellsam_model_free(m);
}

static void test_bf16_compute_labels(void **state) {
    (void)state;
    check_compute_labels(CELLSAM_DTYPE_BF16);
}

static void test_int8_compute_labels(void **state) {
    (void)state;
    check_compute_labels(CELLSAM_DTYPE_INT8);
}

/* Bad and degenerate images: an error or a valid empty result, never a crash. */
static void test_degenerate_images(void **state) {
    (void)state;
    cellsam_segment_params sp = cellsam_segment_default_params();
    sp.tiled = 0;
    sp.n_threads = 2;
    cellsam_result *r = NULL;
    float *img = calloc(64 * 64, sizeof(float));
    /* all black: success, and the result is a consistent label image (the random
     * test model may still find "cells" in a constant image) */
    assert_int_equal(cellsam_segment(g_ctx, img, 64, 64, 1, &sp, &r), 0);
    uint32_t maxl = 0;
    for (int i = 0; i < 64 * 64; i++) maxl = r->labels[i] > maxl ? r->labels[i] : maxl;
    printf("  all-black: %d cells\n", r->n_cells);
    assert_int_equal((int)maxl, r->n_cells);
    cellsam_result_free(r);
    /* zero cells (every mask fails the IoU test): a valid empty label image, where
     * the official code crashes */
    sp.iou_threshold = 100.0f;
    for (int i = 0; i < 64 * 64; i++) img[i] = (float)((i * 7919) % 251);
    assert_int_equal(cellsam_segment(g_ctx, img, 64, 64, 1, &sp, &r), 0);
    assert_int_equal(r->n_cells, 0);
    for (int i = 0; i < 64 * 64; i++) assert_int_equal(r->labels[i], 0);
    printf("  zero cells: %d boxes detected, %d cells\n", r->n_boxes_detected, r->n_cells);
    cellsam_result_free(r);
    sp.iou_threshold = 0.5f;
    /* no boxes at all (user gave an empty box list) */
    cellsam_box nobox;
    sp.boxes = &nobox;
    sp.n_boxes = 0;
    assert_int_equal(cellsam_segment(g_ctx, img, 64, 64, 1, &sp, &r), 0);
    assert_int_equal(r->n_cells, 0);
    assert_true(r->t_encoder == 0.0); /* nothing to decode: the SAM encoder never ran */
    cellsam_result_free(r);
    sp.boxes = NULL;
    /* no box passes the detector's threshold: empty labels, and no SAM encoder pass */
    sp.bbox_threshold = 2.0f;
    assert_int_equal(cellsam_segment(g_ctx, img, 64, 64, 1, &sp, &r), 0);
    assert_int_equal(r->n_boxes_detected, 0);
    assert_int_equal(r->n_cells, 0);
    for (int i = 0; i < 64 * 64; i++) assert_int_equal(r->labels[i], 0);
    assert_true(r->t_detector > 0.0 && r->t_encoder == 0.0);
    cellsam_result_free(r);
    sp.bbox_threshold = 0.4f;
    /* NaN: a clear error */
    img[5] = NAN;
    assert_int_not_equal(cellsam_segment(g_ctx, img, 64, 64, 1, &sp, &r), 0);
    printf("  NaN: %s\n", cellsam_last_error());
    assert_null(r);
    /* zero size and a channel count the model cannot take */
    assert_int_not_equal(cellsam_segment(g_ctx, img, 0, 64, 1, &sp, &r), 0);
    assert_int_not_equal(cellsam_segment(g_ctx, img, 8, 8, 5, &sp, &r), 0);
    free(img);
    /* 1x1 and a 1 x 300 strip run */
    float one = 7.0f;
    assert_int_equal(cellsam_segment(g_ctx, &one, 1, 1, 1, &sp, &r), 0);
    cellsam_result_free(r);
    float *strip = malloc(300 * sizeof(float));
    for (int i = 0; i < 300; i++) strip[i] = (float)(i % 17);
    assert_int_equal(cellsam_segment(g_ctx, strip, 300, 1, 1, &sp, &r), 0);
    cellsam_result_free(r);
    free(strip);
}

/* The abort callback: polled before each tile and between the stages of a tile; a
 * non-zero answer ends the call with CELLSAM_ERR_ABORTED, no result and nothing leaked
 * (the sanitizer build runs this too). */
typedef struct {
    int polls, stop_at, tiles_done;
} abort_probe;

static int probe_abort(void *user) {
    abort_probe *a = user;
    return ++a->polls == a->stop_at;
}

static void probe_progress(int done, int total, void *user) {
    (void)total;
    ((abort_probe *)user)->tiles_done = done;
}

static void test_abort(void **state) {
    (void)state;
    const int W = 700, H = 500;
    float *img = malloc((size_t)W * H * sizeof(float));
    for (int i = 0; i < W * H; i++) img[i] = (float)(((long long)i * 7919) % 251);
    cellsam_segment_params sp = cellsam_segment_default_params();
    sp.n_threads = 2;
    sp.abort = probe_abort;
    sp.progress = probe_progress;
    for (int tiled = 0; tiled <= 1; tiled++) {
        sp.tiled = tiled;
        abort_probe a = {0, 0, 0};
        sp.progress_user = &a;
        cellsam_result *r = NULL;
        assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &sp, &r), 0); /* never stops */
        const int polls = a.polls, tiles = a.tiles_done;
        printf("  %s: %d polls, %d tiles, %d cells\n", tiled ? "tiled" : "whole image", polls, tiles, r->n_cells);
        cellsam_result_free(r);
        assert_true(polls >= (tiled ? 2 * tiles : 2));
        /* stop at a poll: the call ends there (whole image: every poll; tiled: the first
         * two, one in the middle and the last) */
        const int ks[4] = {1, 2, polls / 2 + 1, polls};
        for (int i = 0; i < (tiled ? 4 : polls); i++) {
            const int k = tiled ? ks[i] : i + 1;
            abort_probe b = {0, k, 0};
            sp.progress_user = &b;
            r = NULL;
            assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &sp, &r), CELLSAM_ERR_ABORTED);
            assert_null(r);
            assert_int_equal(b.polls, k);
            assert_true(b.tiles_done < tiles || !tiled);
        }
        printf("  %s: %s\n", tiled ? "tiled" : "whole image", cellsam_last_error());
    }
    free(img);
}

/* Greedy box NMS on a case worked by hand: B overlaps A by IoU 81/119 = 0.68; C overlaps
 * A by 72/128 = 0.5625 and B by 90/110 = 0.82; D is apart. At 0.6, C survives because
 * the box it overlaps most (B) was itself suppressed. */
static void test_box_nms(void **state) {
    (void)state;
    const float in[4][4] = {{0, 0, 10, 10}, {1, 1, 11, 11}, {2, 1, 12, 11}, {20, 20, 30, 30}};
    const float in_scores[4] = {0.9f, 0.8f, 0.7f, 0.6f};
    struct {
        float iou;
        int n;
        int kept[4];
    } cases[] = {{0.9f, 4, {0, 1, 2, 3}}, {0.7f, 3, {0, 1, 3}}, {0.6f, 3, {0, 2, 3}}, {0.5f, 2, {0, 3}}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        float boxes[16], scores[4];
        int query[4] = {10, 11, 12, 13};
        memcpy(boxes, in, sizeof boxes);
        memcpy(scores, in_scores, sizeof scores);
        int n = cs_box_nms(boxes, scores, query, 4, cases[c].iou);
        assert_int_equal(n, cases[c].n);
        for (int i = 0; i < n; i++) {
            int k = cases[c].kept[i];
            assert_int_equal(query[i], 10 + k);
            assert_true(scores[i] == in_scores[k]);
            assert_memory_equal(boxes + 4 * i, in[k], 4 * sizeof(float));
        }
    }
    assert_int_equal(cs_box_nms(NULL, NULL, NULL, 0, 0.5f), 0);
}

/* A model's recommended box NMS (metadata cellsam.box_nms_iou) is what the default
 * parameters use; 0 switches it off (the official output), and a bad value is refused. */
static void test_box_nms_hint(void **state) {
    (void)state;
    cellsam_model *m = load_with_meta("cellsam.box_nms_iou", "0.3", "1.5", NULL, NULL);
    cellsam_context *ctx = NULL;
    assert_int_equal(cellsam_context_new(m, &ctx), 0);

    /* a blob image on which the reference model keeps overlapping boxes */
    const int W = 96, H = 96;
    float *img = checker_image(W, H);
    cellsam_segment_params sp = cellsam_segment_default_params();
    sp.tiled = 0;
    sp.n_threads = 2;
    cellsam_result *hint = NULL, *explicit_nms = NULL, *off = NULL, *official = NULL;
    assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &hint), 0);
    sp.box_nms_iou = 0.3f;
    assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &explicit_nms), 0);
    sp.box_nms_iou = 0;
    assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &off), 0);
    sp.box_nms_iou = -1;
    assert_int_equal(cellsam_segment(g_ctx, img, W, H, 1, &sp, &official), 0);
    printf("  boxes: %d with the model's NMS hint, %d without\n", hint->n_boxes_detected, off->n_boxes_detected);
    assert_int_equal(hint->n_boxes_detected, explicit_nms->n_boxes_detected);
    assert_memory_equal(hint->labels, explicit_nms->labels, (size_t)W * H * sizeof(uint32_t));
    assert_int_equal(off->n_boxes_detected, official->n_boxes_detected);
    assert_memory_equal(off->labels, official->labels, (size_t)W * H * sizeof(uint32_t));
    assert_true(hint->n_boxes_detected < off->n_boxes_detected);
    /* out-of-range values are refused */
    cellsam_result *r = NULL;
    sp.box_nms_iou = 1.5f;
    assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &r), CELLSAM_ERR_INVALID);
    sp.box_nms_iou = -0.5f;
    assert_int_equal(cellsam_segment(ctx, img, W, H, 1, &sp, &r), CELLSAM_ERR_INVALID);
    assert_null(r);
    cellsam_result_free(hint);
    cellsam_result_free(explicit_nms);
    cellsam_result_free(off);
    cellsam_result_free(official);
    free(img);
    cellsam_context_free(ctx);
    cellsam_model_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_all_cases),
        cmocka_unit_test(test_whole_image_hint),
        cmocka_unit_test(test_diameter),
        cmocka_unit_test(test_diameter_hint),
        cmocka_unit_test(test_diameter_boxes),
        cmocka_unit_test(test_bf16_compute_labels),
        cmocka_unit_test(test_int8_compute_labels),
        cmocka_unit_test(test_degenerate_images),
        cmocka_unit_test(test_abort),
        cmocka_unit_test(test_box_nms),
        cmocka_unit_test(test_box_nms_hint),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
