/* Tiled whole-slide segmentation with the model: plugs cs_segment_hw3 into the
 * model-agnostic tiler (src/tiling.c), with the pipeline-level per-channel min-max
 * of cellsam_pipeline (idempotent if already applied). Per-label detector score and
 * predicted IoU follow the labels through the tile offsets and the cross-tile
 * relabelling; for labels merged across tiles the highest score wins. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model.h"
#include "pipeline.h"
#include "tiling.h"

typedef struct {
    cellsam_context *ctx;
    const cellsam_segment_params *p;
    const float *hw3;
    int W;
    float *last_score, *last_iou; /* the last tile's per-label values */
    int last_n;
    float *raw_score, *raw_iou;   /* by raw (offset) label; -inf = none */
    size_t raw_cap;
    int n_boxes, oom;
} tiled_glue;

static int glue_read(void *user, int x0, int y0, int w, int h, float *out) {
    const tiled_glue *g = user;
    for (int y = 0; y < h; y++)
        memcpy(out + (size_t)y * w * 3, g->hw3 + ((size_t)(y0 + y) * g->W + x0) * 3, (size_t)w * 3 * sizeof(float));
    return 0;
}

static int glue_segment(void *user, const float *tile, int th, int tw, uint32_t *labels, int *n_labels) {
    tiled_glue *g = user;
    cellsam_segment_params tp = *g->p;
    tp.embedding = NULL; /* a whole-image embedding does not describe a tile */
    free(g->last_score);
    free(g->last_iou);
    g->last_score = g->last_iou = NULL;
    g->last_n = 0;
    cs_tile_result tr;
    int rc = cs_segment_hw3(g->ctx, tile, th, tw, &tp, &tr);
    if (rc) return rc;
    memcpy(labels, tr.labels, (size_t)th * tw * sizeof(uint32_t));
    *n_labels = tr.n_labels;
    g->last_score = tr.score;
    g->last_iou = tr.iou;
    g->last_n = tr.n_labels;
    g->n_boxes += tr.n_boxes;
    tr.score = tr.iou = NULL;
    cs_tile_result_free(&tr);
    return 0;
}

static void glue_on_tile(void *user, int tile_index, uint32_t offset, uint32_t n, int failed) {
    tiled_glue *g = user;
    (void)tile_index;
    if (failed || n == 0 || g->oom || !g->last_score) return;
    const size_t need = (size_t)offset + n + 1;
    if (need > g->raw_cap) {
        size_t cap = g->raw_cap ? g->raw_cap : 1024;
        while (cap < need) cap *= 2;
        float *s = realloc(g->raw_score, cap * sizeof(float));
        if (s) g->raw_score = s;
        float *q = s ? realloc(g->raw_iou, cap * sizeof(float)) : NULL;
        if (!q) {
            g->oom = 1;
            return;
        }
        g->raw_iou = q;
        for (size_t k = g->raw_cap; k < cap; k++) {
            g->raw_score[k] = -INFINITY;
            g->raw_iou[k] = 0;
        }
        g->raw_cap = cap;
    }
    for (uint32_t l = 1; l <= n && (int)l <= g->last_n; l++) {
        g->raw_score[offset + l] = g->last_score[l - 1];
        g->raw_iou[offset + l] = g->last_iou ? g->last_iou[l - 1] : 0;
    }
}

/* The float parameter as the decimal the user wrote (0.3f -> 0.3), as Python has it. */
static double float_as_decimal(float f) {
    char buf[48];
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        const double v = strtod(buf, NULL);
        if ((float)v == f) return v;
    }
    return (double)f;
}

/* The tiler's settings from the segmentation parameters; the pipeline-level min-max
 * of cellsam_pipeline is applied to every region read. */
static cs_tile_params tile_params(const cellsam_segment_params *p) {
    cs_tile_params tp = cs_tile_default_params();
    tp.block_size = p->block_size;
    tp.overlap = p->overlap;
    tp.iou_depth = p->iou_depth;
    tp.link_iou = float_as_decimal(p->link_iou);
    tp.halo_mode = p->halo_mirror ? CS_HALO_MIRROR : CS_HALO_PERIODIC;
    tp.minmax_normalize = 1;
    tp.progress = p->progress;
    tp.progress_user = p->progress_user;
    tp.abort = p->abort;
    return tp;
}

int cs_segment_tiled(cellsam_context *ctx, const float *hw3, int H, int W, const cellsam_segment_params *p,
                     uint32_t **labels, float **score, float **iou, int *n_labels, int *n_boxes) {
    *labels = NULL;
    *score = *iou = NULL;
    *n_labels = *n_boxes = 0;
    if (!ctx || !hw3 || !p) return cs_error(CELLSAM_ERR_INVALID, "tiled mode: null argument");
    tiled_glue g;
    memset(&g, 0, sizeof g);
    g.ctx = ctx;
    g.p = p;
    g.hw3 = hw3;
    g.W = W;
    cs_tile_params tp = tile_params(p);
    tp.on_tile = glue_on_tile;
    tp.on_tile_user = &g;
    uint32_t *table = NULL;
    cs_tile_stats st;
    float *sc = NULL, *io = NULL;
    int rc = cs_tiled_segment_mem_ex(H, W, glue_read, &g, glue_segment, &g, &tp, labels, &table, &st);
    if (!rc && g.oom) rc = cs_error(CELLSAM_ERR_NOMEM, "tiled mode: out of memory for per-label scores");
    if (!rc && st.max_label > 0) {
        sc = malloc((size_t)st.max_label * sizeof(float));
        io = calloc(st.max_label, sizeof(float));
        if (!sc || !io) rc = cs_error(CELLSAM_ERR_NOMEM, "tiled mode: out of memory for per-label scores");
    }
    if (!rc && st.max_label > 0) {
        for (uint32_t k = 0; k < st.max_label; k++) sc[k] = -INFINITY;
        for (size_t r = 1; r < g.raw_cap && r <= st.total; r++) {
            const uint32_t f = table[r];
            if (g.raw_score[r] == -INFINITY || f == 0 || f > st.max_label) continue; /* halo-only labels */
            if (g.raw_score[r] > sc[f - 1]) {
                sc[f - 1] = g.raw_score[r];
                io[f - 1] = g.raw_iou[r];
            }
        }
        for (uint32_t k = 0; k < st.max_label; k++)
            if (sc[k] == -INFINITY) sc[k] = 0;
    }
    if (rc) {
        free(*labels);
        *labels = NULL;
        free(sc);
        free(io);
    } else {
        *score = sc;
        *iou = io;
        *n_labels = (int)st.max_label;
        *n_boxes = g.n_boxes;
    }
    free(table);
    free(g.last_score);
    free(g.last_iou);
    free(g.raw_score);
    free(g.raw_iou);
    return rc;
}

/* Streaming variant: regions come from `read`, final label rows go to `write_rows`;
 * memory is bounded by one row of tiles whatever the image size. */
int cs_segment_tiled_stream(cellsam_context *ctx, int H, int W, cs_region_read_fn read, void *read_user,
                            cs_rows_write_fn write_rows, void *write_user, const cellsam_segment_params *p,
                            int *n_boxes, uint32_t *max_label) {
    if (!ctx || !read || !write_rows || !p) return cs_error(CELLSAM_ERR_INVALID, "tiled mode: null argument");
    if (cs_diameter_check(p->diameter)) return CELLSAM_ERR_INVALID;
    cellsam_segment_params zp = *p;
    zp.diameter = cellsam_model_diameter(ctx->model, p->diameter, p->tiled);
    if (zp.diameter < 0)
        return cs_error(CELLSAM_ERR_INVALID, "streamed mode takes a cell diameter, not auto: estimate it first "
                                             "(cellsam_estimate_diameter on a region)");
    if (zp.diameter > 0) { /* the zoom for this cell size, through the tiling */
        cs_zoom_tiling(cs_diameter_zoom(ctx->model, zp.diameter), &zp);
        zp.diameter = 0;
    }
    p = &zp;
    tiled_glue g;
    memset(&g, 0, sizeof g);
    g.ctx = ctx;
    g.p = p;
    cs_tile_params tp = tile_params(p);
    cs_tile_stats st;
    int rc = cs_tiled_segment_stream(H, W, read, read_user, glue_segment, &g, write_rows, write_user, &tp, &st);
    free(g.last_score);
    free(g.last_iou);
    if (!rc) {
        if (n_boxes) *n_boxes = g.n_boxes;
        if (max_label) *max_label = st.max_label;
    }
    return rc;
}
