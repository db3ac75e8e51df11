/* Cell size (Cellpose's "diameter"): segment at the zoom that shows cells at the
 * diameter the model works best at, and estimate that diameter from a first pass.
 *
 * Why: CellFinder places its anchors on a fixed grid of the 1024 x 1024 network
 * input, so cells that the official whole-image or tiled modes show at 15-20 network
 * pixels (crowded tissue nuclei) sit several to an anchor and come out merged or
 * missed. Zooming so that the median cell spans the model's cell_diameter fixes that
 * without retraining. The zoom is isotropic: a whole image is edge-padded to a
 * square instead of being stretched to 1024 x 1024 per axis. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model.h"
#include "pipeline.h"
#include "postprocess.h"

#define ZOOM_MIN 0.25
#define ZOOM_MAX 4.0
#define MIN_CELLS_TO_SIZE 5
#define MIN_BLOCK 16
#define OFFICIAL_TILE_ZOOM 2.0

double cs_zoom_clamp(double z) { return z < ZOOM_MIN ? ZOOM_MIN : z > ZOOM_MAX ? ZOOM_MAX : z; }

double cs_diameter_zoom(const cellsam_model *m, float diameter) {
    return cs_zoom_clamp((double)m->cell_diameter / (double)diameter);
}

int cs_zoom_side(double z) { return (int)ceil(CS_SAM_INPUT_SIZE / z - 1e-9); }

void cs_zoom_tiling(double z, cellsam_segment_params *q) {
    /* the halo and the linking band keep their width in network pixels: what the
     * given values mean at the official tiles' zoom (400 + 2 x 56 px -> 1024) */
    const double scale = OFFICIAL_TILE_ZOOM / z;
    q->overlap = (int)lround(q->overlap * scale);
    q->iou_depth = (int)lround(q->iou_depth * scale);
    if (q->iou_depth > q->overlap) q->iou_depth = q->overlap;
    const int b = cs_zoom_side(z) - 2 * q->overlap;
    q->block_size = b < MIN_BLOCK ? MIN_BLOCK : b;
}

int cs_diameter_check(float diameter) {
    if (diameter == CELLSAM_DIAMETER_AUTO || diameter == CELLSAM_DIAMETER_MODEL || diameter == 0 ||
        (isfinite(diameter) && diameter > 0))
        return CELLSAM_OK;
    return cs_error(CELLSAM_ERR_INVALID,
                    "diameter %g: give a cell diameter in pixels (> 0), 0 (off), auto (-1) or the model's (-2)",
                    (double)diameter);
}

float cellsam_model_diameter(const cellsam_model *m, float diameter, int tiled) {
    if (diameter != CELLSAM_DIAMETER_MODEL) return diameter;
    /* an explicit mode is the official one, exactly: no recommendation added to it */
    return m && m->auto_diameter && tiled == -1 ? CELLSAM_DIAMETER_AUTO : 0;
}

/* The rest of the canvas repeats the region's last row and column: zeros would add a
 * dark edge, and a mirror would add cells that overlap the real ones. */
float *cs_zoom_canvas(const float *hw3, int W, int x0, int y0, int w, int h, int S) {
    float *canvas = cs_alloc((size_t)S * (size_t)S, 3 * sizeof(float));
    if (!canvas) {
        cs_error(CELLSAM_ERR_NOMEM, "out of memory for a %d x %d zoom canvas", S, S);
        return NULL;
    }
    for (int y = 0; y < S; y++) {
        const float *src = hw3 + ((size_t)(y0 + (y < h ? y : h - 1)) * W + x0) * 3;
        float *dst = canvas + (size_t)y * S * 3;
        memcpy(dst, src, (size_t)w * 3 * sizeof(float));
        for (int x = w; x < S; x++) memcpy(dst + (size_t)x * 3, src + (size_t)(w - 1) * 3, 3 * sizeof(float));
    }
    return canvas;
}

/* Labels of one segmented canvas pasted into the image's label image at (x0, y0),
 * w x h of it, onto pixels still background; each canvas label that lands gets the
 * next image label (so labels come out 1..n in paste order), its score and IoU. */
typedef struct {
    uint32_t *labels; /* H x W */
    float *score, *iou;
    uint32_t n, cap;  /* labels given, room in score / iou */
} label_paste;

static int paste_labels(label_paste *lp, int W, const cs_tile_result *tr, int S, int x0, int y0, int w, int h) {
    uint32_t *map = cs_calloc((size_t)tr->n_labels + 1, sizeof *map);
    if (!map) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            const uint32_t l = tr->labels[(size_t)y * S + x];
            uint32_t *dst = lp->labels + (size_t)(y0 + y) * W + (x0 + x);
            if (!l || *dst) continue;
            if (!map[l]) {
                if (lp->n >= lp->cap) { /* not reached: one image label per canvas label at most */
                    free(map);
                    return cs_error(CELLSAM_ERR_LIMIT, "zoomed segmentation: more labels than boxes");
                }
                map[l] = ++lp->n;
                lp->score[lp->n - 1] = tr->score ? tr->score[l - 1] : 0;
                lp->iou[lp->n - 1] = tr->iou ? tr->iou[l - 1] : 0;
            }
            *dst = map[l];
        }
    free(map);
    return CELLSAM_OK;
}

static void paste_free(label_paste *lp) {
    free(lp->labels);
    free(lp->score);
    free(lp->iou);
    memset(lp, 0, sizeof *lp);
}

static int paste_init(label_paste *lp, int H, int W, size_t max_labels) {
    memset(lp, 0, sizeof *lp);
    if (max_labels > UINT32_MAX - 1) return cs_error(CELLSAM_ERR_LIMIT, "too many labels");
    lp->labels = cs_calloc((size_t)W * (size_t)H, sizeof *lp->labels);
    lp->score = cs_alloc(max_labels + 1, sizeof *lp->score);
    lp->iou = cs_alloc(max_labels + 1, sizeof *lp->iou);
    lp->cap = (uint32_t)max_labels;
    if (lp->labels && lp->score && lp->iou) return CELLSAM_OK;
    paste_free(lp);
    return cs_error(CELLSAM_ERR_NOMEM, "out of memory for a %d x %d label image", W, H);
}

int cs_window_origin(int b0, int halo, int S, int n) {
    if (n <= S) return 0;
    int o = b0 - halo;
    return o < 0 ? 0 : o > n - S ? n - S : o;
}

/* User boxes on an image larger than one network input at the zoom: the image is cut
 * into blocks as the zoomed tiling cuts it (cs_zoom_tiling), and each box is prompted
 * once, in the S x S window around the block that holds its centre; blocks without a
 * box cost nothing. Windows get the image-wide per-channel min-max, as tiles do;
 * progress counts the windows. */
typedef struct {
    int block, box;
} box_in_block;

static int cmp_box_in_block(const void *a, const void *b) {
    const box_in_block *x = a, *y = b;
    return x->block != y->block ? (x->block > y->block) - (x->block < y->block) : (x->box > y->box) - (x->box < y->box);
}

static int segment_boxes_windows(cellsam_context *ctx, const float *hw3, int H, int W, cellsam_segment_params q,
                                 double zoom, label_paste *lp, int *n_boxes) {
    const cellsam_box *boxes = q.boxes;
    const int nb = q.n_boxes, S = cs_zoom_side(zoom);
    cs_zoom_tiling(zoom, &q);
    const int B = q.block_size, halo = q.overlap;
    const int nbx = (W + B - 1) / B, nby = (H + B - 1) / B;
    float mn[3], mx[3];
    cs_tile_channel_minmax_hw3(hw3, (size_t)W * H, mn, mx);
    box_in_block *order = cs_alloc((size_t)nb, sizeof *order);
    cellsam_box *win = cs_alloc((size_t)nb, sizeof *win);
    if (!order || !win) {
        free(order);
        free(win);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory for %d boxes", nb);
    }
    int n_windows = 0;
    for (int i = 0; i < nb; i++) {
        const double cx = 0.5 * ((double)boxes[i].x1 + boxes[i].x2), cy = 0.5 * ((double)boxes[i].y1 + boxes[i].y2);
        const int bx = cx < 0 ? 0 : cx >= W ? nbx - 1 : (int)(cx / B);
        const int by = cy < 0 ? 0 : cy >= H ? nby - 1 : (int)(cy / B);
        order[i] = (box_in_block){by * nbx + bx, i};
    }
    qsort(order, (size_t)nb, sizeof *order, cmp_box_in_block); /* windows in raster order */
    for (int i = 0; i < nb; i++) n_windows += i == 0 || order[i].block != order[i - 1].block;
    int rc = CELLSAM_OK, done = 0;
    *n_boxes = 0;
    for (int i = 0; i < nb && !rc;) {
        const int blk = order[i].block;
        const int x0 = cs_window_origin((blk % nbx) * B, halo, S, W), y0 = cs_window_origin((blk / nbx) * B, halo, S, H);
        const int w = W < S ? W : S, h = H < S ? H : S;
        int k = 0;
        for (; i < nb && order[i].block == blk; i++) {
            const cellsam_box *b = &boxes[order[i].box];
            win[k++] = (cellsam_box){b->x1 - x0, b->y1 - y0, b->x2 - x0, b->y2 - y0};
        }
        rc = cs_poll_abort(q.abort, q.progress_user);
        float *canvas = rc ? NULL : cs_zoom_canvas(hw3, W, x0, y0, w, h, S);
        if (!rc && !canvas) rc = CELLSAM_ERR_NOMEM;
        if (rc) break;
        cs_tile_apply_minmax(canvas, (size_t)S * S, mn, mx);
        cellsam_segment_params wq = q;
        wq.boxes = win;
        wq.n_boxes = k;
        cs_tile_result tr;
        rc = cs_segment_hw3(ctx, canvas, S, S, &wq, &tr);
        free(canvas);
        if (rc) break;
        *n_boxes += tr.n_boxes;
        rc = paste_labels(lp, W, &tr, S, x0, y0, w, h);
        cs_tile_result_free(&tr);
        if (q.progress) q.progress(++done, n_windows, q.progress_user);
    }
    free(order);
    free(win);
    return rc;
}

int cs_segment_zoomed(cellsam_context *ctx, const float *hw3, int H, int W, const cellsam_segment_params *p,
                      double zoom, uint32_t **labels, float **score, float **iou, int *n_labels, int *n_boxes) {
    cellsam_segment_params q = *p;
    q.diameter = 0;
    q.embedding = NULL; /* an embedding of the unzoomed image describes another input */
    const int S = cs_zoom_side(zoom);
    const int fits = S >= W && S >= H;
    if (!fits && !q.boxes) { /* more than one network input: tiles of S pixels, halo included */
        cs_zoom_tiling(zoom, &q);
        return cs_segment_tiled(ctx, hw3, H, W, &q, labels, score, iou, n_labels, n_boxes);
    }
    label_paste lp;
    int rc;
    if (!fits) {
        rc = paste_init(&lp, H, W, (size_t)q.n_boxes);
        if (!rc) rc = segment_boxes_windows(ctx, hw3, H, W, q, zoom, &lp, n_boxes);
    } else {
        /* One network input: the image in the top-left corner of an S x S canvas (user
         * boxes keep their coordinates there); the labels left in the image are
         * renumbered 1..n in raster order. */
        memset(&lp, 0, sizeof lp);
        float *canvas = cs_zoom_canvas(hw3, W, 0, 0, W, H, S);
        if (!canvas) return CELLSAM_ERR_NOMEM;
        cs_tile_result tr;
        rc = cs_segment_hw3(ctx, canvas, S, S, &q, &tr);
        free(canvas);
        if (rc) return rc;
        *n_boxes = tr.n_boxes;
        rc = paste_init(&lp, H, W, (size_t)tr.n_labels);
        if (!rc) rc = paste_labels(&lp, W, &tr, S, 0, 0, W, H);
        cs_tile_result_free(&tr);
    }
    if (rc) {
        paste_free(&lp);
        return rc;
    }
    *labels = lp.labels;
    *score = lp.score;
    *iou = lp.iou;
    *n_labels = (int)lp.n;
    return CELLSAM_OK;
}

static int cmp_int64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

float cs_median_diameter(int64_t *area, size_t n) {
    if (!n) return 0;
    qsort(area, n, sizeof *area, cmp_int64);
    return (float)(2.0 * sqrt((double)area[n / 2] / M_PI));
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

float cs_boxes_diameter(const cellsam_box *boxes, int n) {
    if (n <= 0) return 0;
    double *side = cs_alloc((size_t)n, sizeof *side);
    if (!side) return 0; /* then the boxes are prompted unzoomed */
    for (int i = 0; i < n; i++) {
        /* sqrt(w h): the equivalent diameter 2 sqrt(a / pi) of the ellipse the box bounds,
         * as the estimate measures cells; degenerate boxes count as one pixel wide */
        const double w = fmax((double)boxes[i].x2 - boxes[i].x1, 1.0), h = fmax((double)boxes[i].y2 - boxes[i].y1, 1.0);
        side[i] = sqrt(w * h);
    }
    qsort(side, (size_t)n, sizeof *side, cmp_double);
    const float d = (float)side[n / 2];
    free(side);
    return d;
}

int cs_estimate_diameter(cellsam_context *ctx, const float *image, int width, int height, int channels,
                         const cellsam_segment_params *params, float *diameter, cellsam_result **whole) {
    *diameter = 0;
    if (whole) *whole = NULL;
    if (!ctx || !image) return cs_error(CELLSAM_ERR_INVALID, "estimate diameter: null argument");
    if (width < 1 || height < 1 || channels < 1 || channels > 3)
        return cs_error(CELLSAM_ERR_INVALID, "estimate diameter: image of %d x %d x %d", width, height, channels);
    cellsam_segment_params q = params ? *params : cellsam_segment_default_params();
    q.diameter = 0;
    q.boxes = NULL;
    q.n_boxes = 0;
    /* the central crop: cells there are as representative as anywhere, at bounded cost */
    const int side = CELLSAM_DIAMETER_ESTIMATE_SIDE;
    const int cw = width < side ? width : side, ch = height < side ? height : side;
    const int x0 = (width - cw) / 2, y0 = (height - ch) / 2;
    const int is_whole = cw == width && ch == height;
    float *crop = NULL;
    if (!is_whole) {
        q.embedding = NULL;
        crop = cs_alloc((size_t)cw * (size_t)ch, (size_t)channels * sizeof(float));
        if (!crop) return cs_error(CELLSAM_ERR_NOMEM, "out of memory for a %d x %d crop", cw, ch);
        for (int y = 0; y < ch; y++)
            memcpy(crop + (size_t)y * cw * channels, image + ((size_t)(y0 + y) * width + x0) * channels,
                   (size_t)cw * channels * sizeof(float));
    }
    cellsam_result *r = NULL;
    int rc = cellsam_segment(ctx, is_whole ? image : crop, cw, ch, channels, &q, &r);
    free(crop);
    if (rc) return rc;
    if (r->n_cells >= MIN_CELLS_TO_SIZE) {
        int64_t *area = cs_alloc((size_t)r->n_cells, sizeof *area);
        if (!area) {
            cellsam_result_free(r);
            return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        }
        for (int i = 0; i < r->n_cells; i++) area[i] = r->cells[i].area;
        *diameter = cs_median_diameter(area, (size_t)r->n_cells);
        free(area);
    }
    if (whole && is_whole) *whole = r;
    else cellsam_result_free(r);
    return CELLSAM_OK;
}

int cellsam_estimate_diameter(cellsam_context *ctx, const float *image, int width, int height, int channels,
                              const cellsam_segment_params *params, float *diameter) {
    if (!diameter) return cs_error(CELLSAM_ERR_INVALID, "estimate diameter: null argument");
    return cs_estimate_diameter(ctx, image, width, height, channels, params, diameter, NULL);
}
