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

int cs_segment_zoomed(cellsam_context *ctx, const float *hw3, int H, int W, const cellsam_segment_params *p,
                      double zoom, uint32_t **labels, float **score, float **iou, int *n_labels, int *n_boxes) {
    cellsam_segment_params q = *p;
    q.diameter = 0;
    q.embedding = NULL; /* an embedding of the unzoomed image describes another input */
    const int S = cs_zoom_side(zoom);
    if (S < W || S < H) { /* more than one network input: tiles of S pixels, halo included */
        cs_zoom_tiling(zoom, &q);
        return cs_segment_tiled(ctx, hw3, H, W, &q, labels, score, iou, n_labels, n_boxes);
    }
    /* One network input: the image in the top-left corner of an S x S canvas, the rest
     * repeating its last row and column (zeros would add a dark edge, and a mirror
     * would add cells that overlap the real ones). */
    float *canvas = cs_alloc((size_t)S * (size_t)S, 3 * sizeof(float));
    if (!canvas) return cs_error(CELLSAM_ERR_NOMEM, "out of memory for a %d x %d zoom canvas", S, S);
    for (int y = 0; y < S; y++) {
        const float *src = hw3 + (size_t)(y < H ? y : H - 1) * W * 3;
        float *dst = canvas + (size_t)y * S * 3;
        memcpy(dst, src, (size_t)W * 3 * sizeof(float));
        for (int x = W; x < S; x++) memcpy(dst + (size_t)x * 3, src + (size_t)(W - 1) * 3, 3 * sizeof(float));
    }
    cs_tile_result tr;
    int rc = cs_segment_hw3(ctx, canvas, S, S, &q, &tr);
    free(canvas);
    if (rc) return rc;
    /* crop, and renumber the labels left in the image 1..n in their order */
    uint32_t *map = cs_calloc((size_t)tr.n_labels + 1, sizeof *map);
    uint32_t *out = cs_alloc((size_t)W * (size_t)H, sizeof *out);
    float *sc = cs_alloc((size_t)tr.n_labels + 1, sizeof *sc), *io = cs_alloc((size_t)tr.n_labels + 1, sizeof *io);
    if (!map || !out || !sc || !io) {
        free(map);
        free(out);
        free(sc);
        free(io);
        cs_tile_result_free(&tr);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory for a %d x %d label image", W, H);
    }
    uint32_t n = 0;
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            uint32_t l = tr.labels[(size_t)y * S + x];
            if (l && !map[l]) {
                map[l] = ++n;
                sc[n - 1] = tr.score ? tr.score[l - 1] : 0;
                io[n - 1] = tr.iou ? tr.iou[l - 1] : 0;
            }
            out[(size_t)y * W + x] = l ? map[l] : 0;
        }
    *labels = out;
    *score = sc;
    *iou = io;
    *n_labels = (int)n;
    *n_boxes = tr.n_boxes;
    free(map);
    cs_tile_result_free(&tr);
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
