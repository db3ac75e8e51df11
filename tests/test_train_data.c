/* Training data (src/train_data.c): data set listing and split, samples
 * bit-identical to what the tiled inference feeds the networks, label geometry
 * checked against an independent mapping, augmentation alignment, error paths. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "testutil.h"

#include "common.h"
#include "image_io.h"
#include "pipeline.h"
#include "preprocess.h"
#include "tiling.h"
#include "train.h"

#define NET 1024
#define NN ((size_t)NET * NET)

/* $CELLSAM_TRAIN, else "train" beside the data folder (../shared/train). */
static const char *train_dir(void) {
    static char buf[1024];
    const char *e = getenv("CELLSAM_TRAIN");
    if (e && *e) return e;
    snprintf(buf, sizeof buf, "%s", tu_datadir());
    size_t n = strlen(buf);
    while (n > 1 && buf[n - 1] == '/') buf[--n] = '\0';
    char *slash = strrchr(buf, '/');
    if (slash) snprintf(slash + 1, sizeof buf - (size_t)(slash + 1 - buf), "train");
    else snprintf(buf, sizeof buf, "train");
    return buf;
}

static cs_dataset g_train; /* opened once */

static int setup(void **state) {
    (void)state;
    if (cs_dataset_open(train_dir(), &g_train)) {
        fprintf(stderr, "cannot open %s: %s\n", train_dir(), cellsam_last_error());
        return -1;
    }
    return 0;
}

static int teardown(void **state) {
    (void)state;
    cs_dataset_free(&g_train);
    return 0;
}

static int find_index(const cs_dataset *ds, const char *name) {
    for (int i = 0; i < ds->n; i++)
        if (strstr(ds->img_paths[i], name)) return i;
    fail_msg("%s not in the data set", name);
    return -1;
}

#define GREY_256 "00071198d059ba7f5914a526d124d28e6d010c92466da21d4a04cd5413362552_img"
#define RGB_256x320 "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e_img"
#define GREY_520x696 "07fb37aafa6626608af90c1e18f6a743f29b6b233d2e427dcd1102df6a916cf5_img"

/* ------------------------------------------------------------------ data set */

static void test_open_counts(void **state) {
    (void)state;
    assert_int_equal(g_train.n, 677);
    int dsb = 0, usi = 0;
    for (int i = 0; i < g_train.n; i++) {
        const char *im = g_train.img_paths[i], *mk = g_train.mask_paths[i];
        dsb += strstr(im, "/dsb2018_stage1_train/") != NULL;
        usi += strstr(im, "/usiigaci_phase/") != NULL;
        /* same stem, _masks beside _img */
        size_t a = strlen(im) - strlen("_img.png");
        assert_true(strlen(mk) == a + strlen("_masks.png"));
        assert_memory_equal(im, mk, a);
        assert_string_equal(mk + a, "_masks.png");
        if (i) assert_true(strcmp(g_train.img_paths[i - 1], im) < 0);
    }
    printf("  %s: %d pairs (dsb2018 %d, usiigaci %d)\n", train_dir(), g_train.n, dsb, usi);
    assert_int_equal(dsb, 659);
    assert_int_equal(usi, 18);
}

static int ds_contains(const cs_dataset *ds, const char *path) {
    int lo = 0, hi = ds->n - 1; /* sorted */
    while (lo <= hi) {
        int mid = (lo + hi) / 2, c = strcmp(ds->img_paths[mid], path);
        if (!c) return 1;
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return 0;
}

static void test_split(void **state) {
    (void)state;
    cs_dataset tr, va, tr2, va2, tr3, va3;
    assert_int_equal(cs_dataset_split(&g_train, 0.1f, 7, &tr, &va), 0);
    assert_int_equal(cs_dataset_split(&g_train, 0.1f, 7, &tr2, &va2), 0);
    assert_int_equal(cs_dataset_split(&g_train, 0.1f, 8, &tr3, &va3), 0);
    printf("  split 0.1 seed 7: train %d, val %d; seed 8: val %d\n", tr.n, va.n, va3.n);
    assert_int_equal(tr.n + va.n, g_train.n);
    assert_true(va.n >= 34 && va.n <= 102); /* 68 expected; +-50% */
    /* deterministic */
    assert_int_equal(tr.n, tr2.n);
    for (int i = 0; i < va.n; i++) assert_string_equal(va.img_paths[i], va2.img_paths[i]);
    /* disjoint, and together the whole set */
    for (int i = 0; i < va.n; i++) assert_false(ds_contains(&tr, va.img_paths[i]));
    for (int i = 0; i < g_train.n; i++)
        assert_int_equal(ds_contains(&tr, g_train.img_paths[i]) + ds_contains(&va, g_train.img_paths[i]), 1);
    /* another seed, another split */
    int same = va3.n == va.n;
    for (int i = 0; same && i < va.n; i++) same = !strcmp(va.img_paths[i], va3.img_paths[i]);
    assert_false(same);
    cs_dataset_free(&tr);
    cs_dataset_free(&va);
    cs_dataset_free(&tr2);
    cs_dataset_free(&va2);
    cs_dataset_free(&tr3);
    cs_dataset_free(&va3);

    /* two images and a tiny fraction: both parts still non-empty */
    char *img[2] = {"x/a_img.png", "x/b_img.png"}, *msk[2] = {"x/a_masks.png", "x/b_masks.png"};
    cs_dataset two = {img, msk, 2};
    assert_int_equal(cs_dataset_split(&two, 0.001f, 1, &tr, &va), 0);
    assert_int_equal(tr.n, 1);
    assert_int_equal(va.n, 1);
    cs_dataset_free(&tr);
    cs_dataset_free(&va);
    assert_int_equal(cs_dataset_split(&two, 0.0f, 1, &tr, &va), 0); /* 0: no validation */
    assert_int_equal(tr.n, 2);
    assert_int_equal(va.n, 0);
    cs_dataset_free(&tr);
    cs_dataset_free(&va);
    assert_int_equal(cs_dataset_split(&two, 1.5f, 1, &tr, &va), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_dataset_split(&two, NAN, 1, &tr, &va), CELLSAM_ERR_INVALID);
}

/* ------------------------------------------- samples = inference pre-processing */

typedef struct {
    const float *hw3;
    int W;
} hw3_src;

static int read_src(void *user, int x0, int y0, int w, int h, float *out) {
    const hw3_src *s = user;
    for (int y = 0; y < h; y++)
        memcpy(out + (size_t)y * w * 3, s->hw3 + ((size_t)(y0 + y) * s->W + x0) * 3, (size_t)w * 3 * sizeof(float));
    return 0;
}

#define MAX_TILES 64
typedef struct {
    float *tile[MAX_TILES];
    int th[MAX_TILES], tw[MAX_TILES];
    int n;
} tile_capture;

/* Segmenter that keeps what the tiler hands to cs_segment_hw3. */
static int capture_tile(void *user, const float *tile, int th, int tw, uint32_t *labels, int *n_labels) {
    (void)labels;
    tile_capture *c = user;
    *n_labels = 0;
    if (c->n >= MAX_TILES) return 1;
    c->tile[c->n] = malloc((size_t)th * tw * 3 * sizeof(float));
    if (!c->tile[c->n]) return 1;
    memcpy(c->tile[c->n], tile, (size_t)th * tw * 3 * sizeof(float));
    c->th[c->n] = th;
    c->tw[c->n] = tw;
    c->n++;
    return 0;
}

/* The tiles `cellsam segment` would segment for this file (default tiled mode). */
static void inference_tiles(const char *path, tile_capture *cap, int *H, int *W) {
    cs_image img;
    assert_int_equal(cs_image_read(path, &img), 0);
    float *hw3 = NULL;
    assert_int_equal(cs_image_to_model_input(&img, 0, 0, CS_CHANNELS_OFFICIAL, &hw3), 0);
    *H = img.height;
    *W = img.width;
    cs_image_free(&img);
    const cellsam_segment_params sp = cellsam_segment_default_params();
    cs_tile_params tp = cs_tile_default_params(); /* as tiled_pipeline.c sets it up */
    tp.block_size = sp.block_size;
    tp.overlap = sp.overlap;
    tp.iou_depth = sp.iou_depth;
    tp.halo_mode = sp.halo_mirror ? CS_HALO_MIRROR : CS_HALO_PERIODIC;
    tp.minmax_normalize = 1;
    hw3_src src = {hw3, *W};
    memset(cap, 0, sizeof *cap);
    uint32_t *labels = NULL;
    assert_int_equal(cs_tiled_segment_mem(*H, *W, read_src, &src, capture_tile, cap, &tp, &labels, NULL), 0);
    free(labels);
    free(hw3);
}

static void free_capture(tile_capture *c) {
    for (int i = 0; i < c->n; i++) free(c->tile[i]);
    memset(c, 0, sizeof *c);
}

/* What cs_segment_hw3 computes from a tile before the networks. */
static int tile_matches_sample(const float *tile, int th, int tw, const cs_train_sample *s) {
    float *chw = malloc((size_t)th * tw * 3 * sizeof(float));
    float *sam = malloc(3 * NN * sizeof(float)), *det = malloc(3 * NN * sizeof(float));
    assert_non_null(chw);
    assert_non_null(sam);
    assert_non_null(det);
    assert_int_equal(cs_normalize_image(tile, th, tw, chw), 0);
    assert_int_equal(cs_prep_branches(chw, th, tw, sam, det), 0);
    int same = !memcmp(sam, s->sam_input, 3 * NN * sizeof(float)) && !memcmp(det, s->det_input, 3 * NN * sizeof(float));
    if (!same) {
        double e = 0;
        for (size_t i = 0; i < 3 * NN; i++) e = fmax(e, fabs((double)sam[i] - s->sam_input[i]));
        printf("  tile %d x %d differs: max |sam diff| %.3g\n", tw, th, e);
    }
    free(chw);
    free(sam);
    free(det);
    return same;
}

static void check_against_inference(const char *name, cs_rng *rng) {
    const int idx = find_index(&g_train, name);
    cs_augment none = cs_augment_none();
    cs_train_sample s;
    assert_int_equal(cs_train_sample_load(&g_train, idx, &none, rng, 1, &s), 0);
    tile_capture cap;
    int H, W;
    inference_tiles(g_train.img_paths[idx], &cap, &H, &W);
    int matches = 0, candidates = 0;
    for (int t = 0; t < cap.n; t++) {
        if (cap.th[t] != s.H || cap.tw[t] != s.W) continue;
        candidates++;
        matches += tile_matches_sample(cap.tile[t], cap.th[t], cap.tw[t], &s);
    }
    printf("  %.16s... %d x %d: %d inference tile(s); sample = a %d x %d tile, bitwise equal to %d of %d same-size "
           "tile(s); %d cells\n",
           name, W, H, cap.n, s.W, s.H, matches, candidates, s.n_cells);
    assert_int_equal(matches, 1);
    free_capture(&cap);
    cs_train_sample_free(&s);
}

static void test_matches_inference(void **state) {
    (void)state;
    check_against_inference(GREY_256, NULL);     /* one tile: the whole image with its wrapped halo */
    check_against_inference(RGB_256x320, NULL);  /* 3 channels as is */
    check_against_inference(GREY_520x696, NULL); /* 4 tiles: the middle one */
    cs_rng rng;
    cs_rng_seed(&rng, 3);
    check_against_inference(GREY_520x696, &rng); /* a random one */
}

/* ---------------------------------------------------------- label geometry */

/* A label image as uint32, its size, and its largest label. */
static uint32_t *read_mask(const char *path, int *H, int *W, uint32_t *max_label) {
    cs_image m;
    assert_int_equal(cs_image_read(path, &m), 0);
    assert_int_equal(m.channels, 1);
    uint32_t *l = malloc((size_t)m.width * m.height * sizeof *l);
    assert_non_null(l);
    *max_label = 0;
    for (size_t i = 0; i < (size_t)m.width * m.height; i++) {
        l[i] = (uint32_t)m.data[i];
        *max_label = l[i] > *max_label ? l[i] : *max_label;
    }
    *H = m.height;
    *W = m.width;
    cs_image_free(&m);
    return l;
}

/* Every id 1..n present, box = tight pixel-edge bounds of its pixels. */
static void check_boxes(const cs_train_sample *s) {
    const int n = s->n_cells;
    int *b = malloc((size_t)(n + 1) * 4 * sizeof(int));
    assert_non_null(b);
    for (int k = 0; k <= n; k++) {
        b[4 * k] = b[4 * k + 1] = NET;
        b[4 * k + 2] = b[4 * k + 3] = -1;
    }
    for (size_t q = 0; q < NN; q++) {
        const int l = s->labels[q];
        assert_true(l >= 0 && l <= n);
        const int x = (int)(q % NET), y = (int)(q / NET);
        int *bb = b + 4 * l;
        if (x < bb[0]) bb[0] = x;
        if (y < bb[1]) bb[1] = y;
        if (x > bb[2]) bb[2] = x;
        if (y > bb[3]) bb[3] = y;
    }
    for (int k = 1; k <= n; k++) {
        const float *f = s->boxes_xyxy + 4 * (k - 1);
        assert_true(b[4 * k + 2] >= 0); /* present */
        assert_true(f[0] == (float)b[4 * k] && f[1] == (float)b[4 * k + 1] && f[2] == (float)(b[4 * k + 2] + 1) &&
                    f[3] == (float)(b[4 * k + 3] + 1));
    }
    free(b);
}

/* --whole-image-max-side: a small image is one sample without halo (its own size,
 * one instance per label), as whole-image inference sees it; a larger limit than
 * the image is needed, a smaller one leaves the tiler's haloed tile. */
static void test_whole_image_sample(void **state) {
    (void)state;
    const int idx = find_index(&g_train, GREY_256);
    int H, W;
    uint32_t maxl;
    uint32_t *raw = read_mask(g_train.mask_paths[idx], &H, &W, &maxl);
    cs_augment a = cs_augment_none();
    a.whole_image_max_side = H > W ? H : W;
    cs_train_sample s;
    assert_int_equal(cs_train_sample_load(&g_train, idx, &a, NULL, 1, &s), 0);
    assert_int_equal(s.H, H);
    assert_int_equal(s.W, W);
    /* no halo copies: every label once (the image is upscaled, so every label shows) */
    assert_int_equal(s.n_cells, (int)maxl);
    for (int i = 0; i < NET; i += 7)
        for (int j = 0; j < NET; j += 7) {
            const int y = (int)floor((i + 0.5) * H / NET), x = (int)floor((j + 0.5) * W / NET);
            assert_int_equal(raw[(size_t)y * W + x] == 0, s.labels[(size_t)i * NET + j] == 0);
        }
    printf("  %d x %d image, whole: %d cells (the haloed tile has more)\n", W, H, s.n_cells);
    cs_train_sample_free(&s);
    a.whole_image_max_side = (H < W ? H : W) - 1; /* too small: the tiler's tile */
    assert_int_equal(cs_train_sample_load(&g_train, idx, &a, NULL, 1, &s), 0);
    const int d = cellsam_segment_default_params().overlap;
    assert_int_equal(s.H, H + 2 * d);
    cs_train_sample_free(&s);
    free(raw);
}

/* Upper median of the equivalent diameters 2 sqrt(area / pi) of labels 1..max. */
static int cmp_u32(const void *a, const void *b) {
    const uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}
static double median_diameter(const void *labels, int is_i32, size_t n, uint32_t max_label) {
    uint32_t *area = calloc((size_t)max_label + 1, sizeof *area);
    assert_non_null(area);
    for (size_t i = 0; i < n; i++) {
        const uint32_t l = is_i32 ? (uint32_t)((const int32_t *)labels)[i] : ((const uint32_t *)labels)[i];
        assert_true(l <= max_label);
        area[l]++;
    }
    size_t k = 0;
    for (uint32_t l = 1; l <= max_label; l++)
        if (area[l]) area[k++] = area[l];
    assert_true(k > 0);
    qsort(area, k, sizeof *area, cmp_u32);
    const double d = 2.0 * sqrt(area[k / 2] / M_PI);
    free(area);
    return d;
}

/* Samples at cell size (--cell-diameter): the frame is the S x S square that one
 * network input spans at zoom cell_diameter / (the mask's median diameter), computed
 * here from the mask; the cells then measure cell_diameter network pixels; a small
 * image sits top-left with label-free padding; the scale range multiplies the zoom. */
static void check_cell_size(const char *name, float cell_diameter, float scale) {
    const int idx = find_index(&g_train, name);
    int H, W;
    uint32_t maxl;
    uint32_t *raw = read_mask(g_train.mask_paths[idx], &H, &W, &maxl);
    const double gt = median_diameter(raw, 0, (size_t)H * W, maxl);
    const double z = cell_diameter / gt * scale;
    const int S = (int)ceil(NET / z - 1e-9);
    cs_augment a = cs_augment_none();
    a.cell_diameter = cell_diameter;
    a.scale_lo = a.scale_hi = scale;
    a.whole_image_max_side = 100000; /* unused at cell size */
    cs_train_sample s;
    assert_int_equal(cs_train_sample_load(&g_train, idx, &a, NULL, 1, &s), 0);
    assert_int_equal(s.H, S);
    assert_int_equal(s.W, S);
    check_boxes(&s);
    const double got = median_diameter(s.labels, 1, NN, (uint32_t)s.n_cells);
    printf("  %s: %d x %d, mask median %.1f px; zoom %.2f, frame %d; cells %d, median %.1f network px (want %.1f)\n",
           name, W, H, gt, z, S, s.n_cells, got, cell_diameter * scale);
    /* windows cut border cells, and nearest resampling rounds: 12 % */
    assert_true(fabs(got - cell_diameter * scale) < 0.12 * cell_diameter * scale);
    if (S > H) { /* padded below the image: no labels there */
        const int y_pad = (int)ceil((double)H * NET / S) + 1;
        for (int y = y_pad; y < NET; y++)
            for (int x = 0; x < NET; x++) assert_int_equal(s.labels[(size_t)y * NET + x], 0);
    }
    cs_train_sample_free(&s);
    free(raw);
}

static void test_cell_size_sample(void **state) {
    (void)state;
    check_cell_size(GREY_256, 64, 1.0f);     /* a small image: padded */
    check_cell_size(GREY_256, 64, 0.5f);     /* the scale range applies */
    check_cell_size(GREY_520x696, 64, 1.0f); /* a window of a larger one */
    cs_augment a = cs_augment_none();
    a.cell_diameter = 2000;
    cs_train_sample s;
    assert_int_equal(cs_train_sample_load(&g_train, find_index(&g_train, GREY_256), &a, NULL, 1, &s),
                     CELLSAM_ERR_INVALID);
    assert_non_null(strstr(cellsam_last_error(), "cell diameter"));
}

static void test_label_geometry(void **state) {
    (void)state;
    const int idx = find_index(&g_train, GREY_256);
    int H, W;
    uint32_t maxl;
    uint32_t *raw = read_mask(g_train.mask_paths[idx], &H, &W, &maxl);
    const int d = cellsam_segment_default_params().overlap;
    assert_true(H <= 400 && W <= 400 && H >= d && W >= d); /* one tile, wraps in {-1,0,1} */

    cs_augment none = cs_augment_none();
    cs_train_sample s;
    assert_int_equal(cs_train_sample_load(&g_train, idx, &none, NULL, 1, &s), 0);
    assert_int_equal(s.H, H + 2 * d);
    assert_int_equal(s.W, W + 2 * d);
    /* independent mapping: 1024 pixel -> tile pixel (pixel centres) -> raw pixel
     * with its periodic wrap; (label, wrap) <-> sample id must be a bijection */
    const size_t nkeys = ((size_t)maxl + 1) * 9;
    int *key_to_id = calloc(nkeys, sizeof(int));
    size_t *id_to_key = calloc((size_t)s.n_cells + 1, sizeof(size_t));
    assert_non_null(key_to_id);
    assert_non_null(id_to_key);
    int n_keys = 0;
    for (int i = 0; i < NET; i++) {
        const int ty = (int)floor((i + 0.5) * s.H / NET) - d;
        const int wy = ty < 0 ? -1 : ty >= H ? 1 : 0, y = ty - wy * H;
        for (int j = 0; j < NET; j++) {
            const int tx = (int)floor((j + 0.5) * s.W / NET) - d;
            const int wx = tx < 0 ? -1 : tx >= W ? 1 : 0, x = tx - wx * W;
            const uint32_t l = raw[(size_t)y * W + x];
            const int id = s.labels[(size_t)i * NET + j];
            assert_int_equal(l == 0, id == 0);
            if (!l) continue;
            const size_t key = (size_t)l * 9 + (size_t)(wy + 1) * 3 + (size_t)(wx + 1);
            assert_true(id >= 1 && id <= s.n_cells);
            if (!key_to_id[key]) {
                n_keys++;
                key_to_id[key] = id;
                assert_true(id_to_key[id] == 0);
                id_to_key[id] = key;
            }
            assert_int_equal(key_to_id[key], id);
            assert_true(id_to_key[id] == key);
        }
    }
    /* the tile is upscaled, so every (label, wrap) of the tile appears */
    printf("  %d x %d image, tile %d x %d: %u labels, %d instances with the halo copies, n_cells %d\n", W, H, s.W, s.H,
           maxl, n_keys, s.n_cells);
    assert_int_equal(n_keys, s.n_cells);
    assert_true(s.n_cells > (int)maxl);
    check_boxes(&s);

    /* min_area: the same cells minus those under it, renumbered in order */
    const int min_area = 300;
    int64_t *area = calloc((size_t)s.n_cells + 1, sizeof *area);
    int *remap = calloc((size_t)s.n_cells + 1, sizeof(int));
    assert_non_null(area);
    assert_non_null(remap);
    for (size_t q = 0; q < NN; q++) area[s.labels[q]]++;
    int kept = 0;
    for (int k = 1; k <= s.n_cells; k++) remap[k] = area[k] >= min_area ? ++kept : 0;
    cs_train_sample s2;
    assert_int_equal(cs_train_sample_load(&g_train, idx, &none, NULL, min_area, &s2), 0);
    printf("  min_area %d: %d of %d cells kept (expected %d)\n", min_area, s2.n_cells, s.n_cells, kept);
    assert_int_equal(s2.n_cells, kept);
    assert_true(kept > 0 && kept < s.n_cells);
    for (size_t q = 0; q < NN; q++) assert_int_equal(s2.labels[q], remap[s.labels[q]]);
    check_boxes(&s2);

    /* target masks: nearest sampling of the labels */
    float *m = malloc(256 * 256 * sizeof(float));
    assert_non_null(m);
    cs_train_sample_mask(&s2, 1, 256, m);
    double sum = 0;
    for (int y = 0; y < 256; y++)
        for (int x = 0; x < 256; x++) {
            const float want = s2.labels[(size_t)(4 * y + 2) * NET + 4 * x + 2] == 1 ? 1.0f : 0.0f;
            assert_true(m[y * 256 + x] == want);
            sum += want;
        }
    assert_true(sum > 0);
    free(m);
    free(area);
    free(remap);
    free(key_to_id);
    free(id_to_key);
    free(raw);
    cs_train_sample_free(&s);
    cs_train_sample_free(&s2);
}

/* ----------------------------------------------------------- augmentation */

/* Position in the untransformed 1024 frame of pixel (i, j) after a horizontal
 * flip of the source then k counter-clockwise quarter turns (numpy rot90). The
 * 8 maps t = 2k + hflip are all flips and rotations (a vertical flip is a
 * horizontal one and two turns). */
#define N_DIHEDRAL 8
static size_t dihedral_src(int i, int j, int t) {
    const int hflip = t & 1, k = t >> 1;
    int fy, fx;
    switch (k) {
    case 1: fy = j; fx = NET - 1 - i; break;
    case 2: fy = NET - 1 - i; fx = NET - 1 - j; break;
    case 3: fy = NET - 1 - j; fx = i; break;
    default: fy = i; fx = j; break;
    }
    if (hflip) fx = NET - 1 - fx;
    return (size_t)fy * NET + fx;
}

/* Do a's labels equal transform t of b's, up to renumbering? */
static int same_partition(const cs_train_sample *a, const cs_train_sample *b, int t) {
    if (a->n_cells != b->n_cells) return 0;
    int *fwd = calloc((size_t)a->n_cells + 1, sizeof(int)), *bwd = calloc((size_t)a->n_cells + 1, sizeof(int));
    assert_non_null(fwd);
    assert_non_null(bwd);
    int ok = 1;
    for (int i = 0; ok && i < NET; i++)
        for (int j = 0; ok && j < NET; j++) {
            const int la = a->labels[(size_t)i * NET + j], lb = b->labels[dihedral_src(i, j, t)];
            if ((la == 0) != (lb == 0)) ok = 0;
            else if (la) {
                if (!fwd[la] && !bwd[lb]) fwd[la] = lb, bwd[lb] = la;
                ok = fwd[la] == lb && bwd[lb] == la;
            }
        }
    free(fwd);
    free(bwd);
    return ok;
}

static double mean_abs_diff(const float *a, const float *b, int t) {
    double s = 0;
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < NET; i++)
            for (int j = 0; j < NET; j++)
                s += fabs((double)a[c * NN + (size_t)i * NET + j] - b[c * NN + dihedral_src(i, j, t)]);
    return s / (3.0 * NN);
}

static void test_flips_rot90(void **state) {
    (void)state;
    const int idx = find_index(&g_train, GREY_256);
    cs_augment none = cs_augment_none(), geo = cs_augment_none();
    geo.flips = geo.rot90 = 1;
    cs_train_sample base;
    assert_int_equal(cs_train_sample_load(&g_train, idx, &none, NULL, 1, &base), 0);
    int seen = 0; /* bit per transform found */
    for (uint64_t seed = 1; seed <= 6; seed++) {
        cs_rng rng;
        cs_rng_seed(&rng, seed);
        cs_train_sample s;
        assert_int_equal(cs_train_sample_load(&g_train, idx, &geo, &rng, 1, &s), 0);
        /* labels: exactly some flip/rotation of the unaugmented ones (the nearest
         * resize of a square tile to 1024 commutes with them) */
        int t_lab = -1, t_img = 0;
        for (int t = 0; t < N_DIHEDRAL && t_lab < 0; t++)
            if (same_partition(&s, &base, t)) t_lab = t;
        /* image: the same transform fits best (CLAHE is only nearly equivariant) */
        double best = INFINITY, second = INFINITY;
        for (int t = 0; t < N_DIHEDRAL; t++) {
            const double e = mean_abs_diff(s.sam_input, base.sam_input, t);
            if (e < best) {
                second = best;
                best = e;
                t_img = t;
            } else if (e < second) {
                second = e;
            }
        }
        printf("  seed %d: labels = transform %d (hflip %d, rot90 x%d), image best fit %d (mean |diff| %.3g, "
               "next best %.3g), cells %d = %d\n",
               (int)seed, t_lab, t_lab & 1, t_lab >> 1, t_img, best, second, s.n_cells, base.n_cells);
        assert_true(t_lab >= 0);
        assert_int_equal(t_img, t_lab);
        assert_true(best < 0.1 * second);
        assert_int_equal(s.n_cells, base.n_cells);
        check_boxes(&s);
        seen |= 1 << t_lab;
        cs_train_sample_free(&s);
    }
    int distinct = 0;
    for (int t = 0; t < N_DIHEDRAL; t++) distinct += seen >> t & 1;
    assert_true(distinct >= 2); /* the augmentation does something */
    cs_train_sample_free(&base);
}

/* Synthetic pair: bright ellipses (cells) on a dark noisy background. */
static void write_synthetic(const char *dir, const char *name, int H, int W, int n_cells, uint64_t seed) {
    uint32_t *img = malloc((size_t)H * W * sizeof *img), *lab = calloc((size_t)H * W, sizeof *lab);
    assert_non_null(img);
    assert_non_null(lab);
    cs_rng r;
    cs_rng_seed(&r, seed);
    for (int k = 1; k <= n_cells; k++) {
        const double cy = cs_rng_uniform(&r) * H, cx = cs_rng_uniform(&r) * W;
        const double ry = 7 + 10 * cs_rng_uniform(&r), rx = 7 + 10 * cs_rng_uniform(&r);
        for (int y = (int)(cy - ry) - 1; y <= (int)(cy + ry) + 1; y++)
            for (int x = (int)(cx - rx) - 1; x <= (int)(cx + rx) + 1; x++) {
                if (y < 0 || y >= H || x < 0 || x >= W) continue;
                const double u = (y - cy) / ry, v = (x - cx) / rx;
                if (u * u + v * v <= 1) lab[(size_t)y * W + x] = (uint32_t)k;
            }
    }
    for (size_t i = 0; i < (size_t)H * W; i++)
        img[i] = (lab[i] ? 2000u : 200u) + (uint32_t)(cs_rng_uniform(&r) * 100);
    char p[1100];
    snprintf(p, sizeof p, "%s/%s_img.png", dir, name);
    assert_int_equal(cs_write_labels(p, img, W, H), 0);
    snprintf(p, sizeof p, "%s/%s_masks.png", dir, name);
    assert_int_equal(cs_write_labels(p, lab, W, H), 0);
    free(img);
    free(lab);
}

/* Fraction of pixels where "bright" (whole-cell slot of the SAM input, cut at the
 * midpoint of the class means) agrees with "labelled"; flip_labels compares with
 * mirrored labels instead (a misalignment, to show the measure can fail). */
static double agreement(const cs_train_sample *s, int flip_labels) {
    const float *v = s->sam_input + 2 * NN;
    double si = 0, so = 0;
    size_t ni = 0;
    for (size_t q = 0; q < NN; q++) {
        if (s->labels[q]) si += v[q], ni++;
        else so += v[q];
    }
    assert_true(ni > 0 && ni < NN);
    const double thr = 0.5 * (si / ni + so / (NN - ni));
    size_t agree = 0;
    for (size_t q = 0; q < NN; q++) {
        const size_t lq = flip_labels ? (q / NET) * NET + (NET - 1 - q % NET) : q;
        agree += (v[q] > thr) == (s->labels[lq] != 0);
    }
    return (double)agree / NN;
}

static void test_augment_alignment(void **state) {
    (void)state;
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", tu_tmp("synthetic"));
    mkdir(dir, 0755);
    write_synthetic(dir, "small", 300, 260, 40, 11); /* one tile */
    write_synthetic(dir, "large", 700, 520, 200, 12); /* several tiles */
    cs_dataset ds;
    assert_int_equal(cs_dataset_open(dir, &ds), 0);
    assert_int_equal(ds.n, 2);
    cs_augment aug = cs_augment_default();
    aug.gain_hi = 1.6f; /* saturation */
    aug.gamma_lo = 0.5f;
    aug.gamma_hi = 2.0f;
    cs_rng rng;
    cs_rng_seed(&rng, 5);
    double worst = 1, worst_flipped = 0;
    for (int k = 0; k < 6; k++) {
        cs_train_sample s;
        const int i = k & 1;
        assert_int_equal(cs_train_sample_load(&ds, i, &aug, &rng, 10, &s), 0);
        const double a = agreement(&s, 0), af = agreement(&s, 1);
        printf("  %s, draw %d: tile %d x %d, %d cells, bright/labelled agreement %.4f (mirrored labels %.4f)\n",
               i ? "small" : "large", k / 2, s.W, s.H, s.n_cells, a, af);
        assert_true(s.n_cells > 0);
        check_boxes(&s);
        worst = fmin(worst, a);
        worst_flipped = fmax(worst_flipped, af);
        cs_train_sample_free(&s);
    }
    assert_true(worst >= 0.97);
    assert_true(worst_flipped < 0.9);

    /* gain <= 1 alone is undone by the normalisation; gamma is not */
    cs_augment none = cs_augment_none(), g = cs_augment_none();
    cs_train_sample s0, s1, s2;
    assert_int_equal(cs_train_sample_load(&ds, 1, &none, NULL, 10, &s0), 0);
    g.gain_lo = g.gain_hi = 0.7f;
    assert_int_equal(cs_train_sample_load(&ds, 1, &g, NULL, 10, &s1), 0);
    g = cs_augment_none();
    g.gamma_lo = g.gamma_hi = 2.0f;
    assert_int_equal(cs_train_sample_load(&ds, 1, &g, NULL, 10, &s2), 0);
    double d1 = 0, d2 = 0;
    for (size_t q = 0; q < 3 * NN; q++) {
        d1 += fabs((double)s1.sam_input[q] - s0.sam_input[q]);
        d2 += fabs((double)s2.sam_input[q] - s0.sam_input[q]);
    }
    printf("  mean |sam input change|: gain 0.7 %.3g, gamma 2 %.3g\n", d1 / (3 * NN), d2 / (3 * NN));
    assert_true(d1 / (3 * NN) < 1e-3);
    assert_true(d2 / (3 * NN) > 1e-2);
    assert_memory_equal(s0.labels, s2.labels, NN * sizeof(int32_t));
    cs_train_sample_free(&s0);
    cs_train_sample_free(&s1);
    cs_train_sample_free(&s2);
    cs_dataset_free(&ds);
}

/* ------------------------------------------------------------------ errors */

static void write_grey(const char *path, int W, int H, uint32_t v) {
    uint32_t *p = malloc((size_t)W * H * sizeof *p);
    assert_non_null(p);
    for (size_t i = 0; i < (size_t)W * H; i++) p[i] = (uint32_t)(v + i % 7);
    assert_int_equal(cs_write_labels(path, p, W, H), 0);
    free(p);
}

static void write_const(const char *path, int W, int H, uint32_t v) {
    uint32_t *p = malloc((size_t)W * H * sizeof *p);
    assert_non_null(p);
    for (size_t i = 0; i < (size_t)W * H; i++) p[i] = v;
    assert_int_equal(cs_write_labels(path, p, W, H), 0);
    free(p);
}

static void expect_error(int rc, int code, const char *needle) {
    printf("  rc %d: %s\n", rc, cellsam_last_error());
    assert_int_equal(rc, code);
    assert_non_null(strstr(cellsam_last_error(), needle));
}

static void test_errors(void **state) {
    (void)state;
    cs_dataset ds;
    cs_train_sample s;
    cs_rng rng;
    cs_rng_seed(&rng, 1);
    cs_augment none = cs_augment_none();

    expect_error(cs_dataset_open("/nonexistent/cellsam-train", &ds), CELLSAM_ERR_IO, "/nonexistent/cellsam-train");

    char nomask[1024], bad[1024]; /* tu_tmp's buffers rotate */
    snprintf(nomask, sizeof nomask, "%s", tu_tmp("nomask"));
    mkdir(nomask, 0755);
    write_grey(tu_tmp("nomask/a_img.png"), 40, 30, 10);
    write_grey(tu_tmp("nomask/b_masks.png"), 40, 30, 0); /* a mask without its image */
    expect_error(cs_dataset_open(nomask, &ds), CELLSAM_ERR_INVALID, nomask);

    snprintf(bad, sizeof bad, "%s", tu_tmp("bad"));
    mkdir(bad, 0755);
    write_grey(tu_tmp("bad/a_img.png"), 40, 30, 10); /* mask size differs */
    write_grey(tu_tmp("bad/a_masks.png"), 30, 40, 0);
    FILE *f = fopen(tu_tmp("bad/b_img.png"), "wb"); /* not an image */
    assert_non_null(f);
    fputs("\x89PNG\r\n\x1a\n garbage", f);
    fclose(f);
    write_grey(tu_tmp("bad/b_masks.png"), 40, 30, 0);
    write_grey(tu_tmp("bad/c_img.png"), 8193, 2, 10); /* over the size cap */
    write_grey(tu_tmp("bad/c_masks.png"), 8193, 2, 0);
    write_grey(tu_tmp("bad/d_img.png"), 40, 30, 10); /* RGB mask */
    cs_image rgb = {40, 30, 1, NULL, 16, 0};
    rgb.data = calloc(40 * 30, sizeof(float));
    assert_non_null(rgb.data);
    assert_int_equal(cs_write_overlay_png(tu_tmp("bad/d_masks.png"), &rgb, -1, NULL), 0);
    free(rgb.data);
    write_grey(tu_tmp("bad/e_img.png"), 40, 30, 10); /* fine */
    write_const(tu_tmp("bad/e_masks.png"), 40, 30, 1); /* one cell covering everything */
    mkdir(tu_tmp("bad/sub"), 0755); /* recursion */
    write_grey(tu_tmp("bad/sub/f_img.png"), 40, 30, 10);
    write_grey(tu_tmp("bad/sub/f_masks.png"), 40, 30, 0);

    assert_int_equal(cs_dataset_open(bad, &ds), 0);
    assert_int_equal(ds.n, 6);
    assert_non_null(strstr(ds.img_paths[5], "/sub/f_img.png"));
    expect_error(cs_train_sample_load(&ds, 0, &none, NULL, 0, &s), CELLSAM_ERR_INVALID, "a_masks.png");
    assert_int_not_equal(cs_train_sample_load(&ds, 1, &none, NULL, 0, &s), 0);
    printf("  %s\n", cellsam_last_error());
    assert_non_null(strstr(cellsam_last_error(), "b_img.png"));
    expect_error(cs_train_sample_load(&ds, 2, &none, NULL, 0, &s), CELLSAM_ERR_LIMIT, "c_img.png");
    expect_error(cs_train_sample_load(&ds, 3, &none, NULL, 0, &s), CELLSAM_ERR_UNSUPPORTED, "d_masks.png");
    assert_null(s.sam_input);
    assert_int_equal(cs_train_sample_load(&ds, 4, &none, NULL, 0, &s), 0); /* the good ones load */
    /* the 142 x 152 tile wraps the 40 x 30 image 5 x 5 times: 25 instances */
    printf("  40 x 30 image of one cell: tile %d x %d, %d instances\n", s.W, s.H, s.n_cells);
    assert_int_equal(s.n_cells, 25);
    cs_train_sample_free(&s);
    expect_error(cs_train_sample_load(&ds, 6, &none, NULL, 0, &s), CELLSAM_ERR_INVALID, "out of range");
    cs_augment a = cs_augment_default();
    expect_error(cs_train_sample_load(&ds, 4, &a, NULL, 0, &s), CELLSAM_ERR_INVALID, "rng");
    a.crop_lo = 0;
    expect_error(cs_train_sample_load(&ds, 4, &a, &rng, 0, &s), CELLSAM_ERR_INVALID, "crop");
    a = cs_augment_default();
    a.gamma_hi = NAN;
    expect_error(cs_train_sample_load(&ds, 4, &a, &rng, 0, &s), CELLSAM_ERR_INVALID, "gamma");
    cs_dataset_free(&ds);
}

/* ------------------------------------------------------------------ timing */

/* Corrections autosaved by the labeling tool (ROOT/.cellsam/<rel>.labels.png) are
 * training pairs; an explicit NAME_masks file wins for the same image. */
static void test_labeling_tool_corrections(void **state) {
    (void)state;
    char root[1024];
    snprintf(root, sizeof root, "%s", tu_tmp("served"));
    mkdir(root, 0755);
    mkdir(tu_tmp("served/sub"), 0755);
    mkdir(tu_tmp("served/.cellsam"), 0755);
    mkdir(tu_tmp("served/.cellsam/sub"), 0755);
    write_grey(tu_tmp("served/sub/plate1.png"), 40, 30, 10);             /* corrected in the tool */
    write_const(tu_tmp("served/.cellsam/sub/plate1.png.labels.png"), 40, 30, 1);
    write_grey(tu_tmp("served/a_img.png"), 40, 30, 10);                  /* explicit pair */
    write_const(tu_tmp("served/a_masks.png"), 40, 30, 1);
    write_const(tu_tmp("served/.cellsam/a_img.png.labels.png"), 40, 30, 1);
    write_const(tu_tmp("served/.cellsam/gone.png.labels.png"), 40, 30, 1); /* image deleted */
    cs_dataset ds;
    assert_int_equal(cs_dataset_open(root, &ds), CELLSAM_OK);
    assert_int_equal(ds.n, 2);
    int found = 0;
    for (int i = 0; i < ds.n; i++) {
        if (strstr(ds.img_paths[i], "sub/plate1.png")) {
            assert_non_null(strstr(ds.mask_paths[i], ".cellsam/sub/plate1.png.labels.png"));
            found++;
        } else {
            assert_non_null(strstr(ds.mask_paths[i], "a_masks.png"));
        }
    }
    assert_int_equal(found, 1);
    cs_train_sample smp;
    cs_augment none = cs_augment_none();
    assert_int_equal(cs_train_sample_load(&ds, 0, &none, NULL, 1, &smp), CELLSAM_OK);
    assert_true(smp.n_cells >= 1);
    cs_train_sample_free(&smp);
    cs_dataset_free(&ds);
}

static void test_load_time(void **state) {
    (void)state;
    cs_augment aug = cs_augment_default();
    cs_rng rng;
    cs_rng_seed(&rng, 9);
    const int n = 4;
    int cells = 0;
    double t0 = cs_now_seconds();
    for (int k = 0; k < n; k++) {
        cs_train_sample s;
        const int idx = (int)(cs_rng_uniform(&rng) * g_train.n);
        assert_int_equal(cs_train_sample_load(&g_train, idx, &aug, &rng, 10, &s), 0);
        cells += s.n_cells;
        check_boxes(&s);
        cs_train_sample_free(&s);
    }
    printf("  default augmentation: %.1f ms per sample (%d samples, %d cells)\n", 1e3 * (cs_now_seconds() - t0) / n, n,
           cells);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open_counts),      cmocka_unit_test(test_split),
        cmocka_unit_test(test_matches_inference), cmocka_unit_test(test_label_geometry),
        cmocka_unit_test(test_whole_image_sample), cmocka_unit_test(test_cell_size_sample),
        cmocka_unit_test(test_flips_rot90),      cmocka_unit_test(test_augment_alignment),
        cmocka_unit_test(test_errors),           cmocka_unit_test(test_load_time),
        cmocka_unit_test(test_labeling_tool_corrections),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
