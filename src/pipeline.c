/* Single-image pipeline (spec §3.2-3.4): normalise, the two network inputs, SAM
 * embedding, CellFinder boxes and the k-means threshold, batched mask decoding,
 * incremental label composition, hole filling and small-object removal. */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cellfinder.h"
#include "common.h"
#include "model.h"
#include "pipeline.h"
#include "postprocess.h"
#include "preprocess.h"

/* Boxes decoded per batch: bounds memory to DECODE_CHUNK x 4 x 256 x 256 floats. */
#define DECODE_CHUNK 32

cellsam_segment_params cellsam_segment_default_params(void) {
    cellsam_segment_params p;
    memset(&p, 0, sizeof p);
    p.bbox_threshold = 0.4f;
    p.iou_threshold = 0.5f;
    p.mask_threshold = 0.4f;
    p.box_nms_iou = -1.0f; /* the model's recommendation; none for the official checkpoint */
    p.min_size = 25;
    p.normalize = 1;
    p.tiled = -1; /* the model's recommendation; tiled for the official checkpoint */
    p.diameter = CELLSAM_DIAMETER_MODEL; /* the model's; none for the official checkpoint */
    /* tiling defaults have one home: the tiler's */
    const cs_tile_params t = cs_tile_default_params();
    p.block_size = t.block_size;
    p.overlap = t.overlap;
    p.iou_depth = t.iou_depth;
    p.link_iou = (float)t.link_iou;
    p.n_threads = 1;
    return p;
}

void cs_tile_result_free(cs_tile_result *r) {
    free(r->labels);
    free(r->score);
    free(r->iou);
    memset(r, 0, sizeof *r);
}

int cs_place_channels(const float *img, int H, int W, int C, float **hw3) {
    *hw3 = NULL;
    if (C < 1 || C > 3)
        return cs_error(CELLSAM_ERR_INVALID, "image has %d channels; the model takes 1 to 3 "
                        "(choose channels with --nuclear/--cell)", C);
    float *o = cs_calloc((size_t)H * W, 3 * sizeof(float));
    if (!o) return CELLSAM_ERR_NOMEM;
    for (size_t i = 0; i < (size_t)H * W; i++)
        for (int c = 0; c < C; c++) o[i * 3 + (3 - C) + c] = img[i * C + c];
    *hw3 = o;
    return CELLSAM_OK;
}

static float box_iou(const float *a, const float *b) {
    float ix = fminf(a[2], b[2]) - fmaxf(a[0], b[0]), iy = fminf(a[3], b[3]) - fmaxf(a[1], b[1]);
    if (ix <= 0 || iy <= 0) return 0;
    float inter = ix * iy;
    float uni = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    return uni > 0 ? inter / uni : 0;
}

/* Greedy NMS over boxes sorted by descending score: keeps a box unless it overlaps a kept
 * one by more than `iou`. In place; returns the number kept. Kept boxes are compared in
 * order, so the cost is O(n x kept). */
int cs_box_nms(float *xyxy, float *scores, int *query, int n, float iou) {
    int k = 0;
    for (int i = 0; i < n; i++) {
        int suppressed = 0;
        for (int j = 0; j < k && !suppressed; j++) suppressed = box_iou(xyxy + 4 * i, xyxy + 4 * j) > iou;
        if (suppressed) continue;
        memmove(xyxy + 4 * k, xyxy + 4 * i, 4 * sizeof(float));
        scores[k] = scores[i];
        if (query) query[k] = query[i];
        k++;
    }
    return k;
}

/* The box NMS IoU a call uses: the caller's, or the model's recommendation when < 0. */
static float effective_box_nms(const cellsam_model *m, const cellsam_segment_params *p) {
    return p->box_nms_iou < 0 ? m->box_nms_iou : p->box_nms_iou;
}

/* Detector: boxes (1024 frame) kept by the dynamic threshold (and the box NMS, when
 * on), in descending score order. */
static int detect_boxes(cellsam_context *ctx, const float *det_in, const cellsam_segment_params *p,
                        float **boxes_out, float **scores_out, int **query_out, int *n_out) {
    const cellsam_model *m = ctx->model;
    const int E = m->det_vit.dim, G = m->det_vit.grid;
    cs_cellfinder_dims dims;
    cs_cellfinder_get_dims(m->det, &dims);
    const int Q = dims.n_queries;
    int rc = CELLSAM_OK;
    float *feat = cs_alloc((size_t)E * G, (size_t)G * sizeof(float));
    float *logits = cs_alloc((size_t)Q, 2 * sizeof(float));
    float *boxes = cs_alloc((size_t)Q, 4 * sizeof(float));
    float *scores = cs_alloc((size_t)Q, sizeof(float));
    int *query = cs_alloc((size_t)Q, sizeof(int));
    float *xyxy = cs_alloc((size_t)Q, 4 * sizeof(float));
    unsigned char *keep = cs_alloc((size_t)Q, 1);
    *boxes_out = NULL;
    *scores_out = NULL;
    *query_out = NULL;
    *n_out = 0;
    if (!feat || !logits || !boxes || !scores || !query || !xyxy || !keep) {
        rc = CELLSAM_ERR_NOMEM;
        goto done;
    }
    rc = cs_vit_forward(&m->det_vit, det_in, feat, p->n_threads);
    if (!rc) rc = cs_cellfinder_forward(m->det, feat, logits, boxes, NULL, NULL, p->n_threads);
    if (!rc) rc = cs_cellfinder_postprocess(logits, boxes, Q, scores, query, xyxy);
    float thr;
    if (!rc) rc = cs_dynamic_threshold(scores, Q, p->bbox_threshold, &thr, keep);
    if (rc) goto done;
    int k = 0;
    for (int i = 0; i < Q; i++)
        if (keep[i]) {
            memmove(xyxy + 4 * k, xyxy + 4 * i, 4 * sizeof(float));
            scores[k] = scores[i];
            query[k] = query[i];
            k++;
        }
    const float nms = effective_box_nms(m, p);
    if (nms > 0 && nms < 1) k = cs_box_nms(xyxy, scores, query, k, nms);
    *boxes_out = xyxy;
    *scores_out = scores;
    *query_out = query;
    *n_out = k;
    xyxy = NULL;
    scores = NULL;
    query = NULL;
done:
    free(feat);
    free(logits);
    free(boxes);
    free(scores);
    free(query);
    free(xyxy);
    free(keep);
    return rc;
}

int cs_segment_hw3(cellsam_context *ctx, const float *hw3, int H, int W, const cellsam_segment_params *p,
                   cs_tile_result *out) {
    const cellsam_model *m = ctx->model;
    memset(out, 0, sizeof *out);
    const size_t npix = (size_t)H * W;
    int rc = CELLSAM_OK;
    float *chw = NULL, *sam_in = NULL, *det_in = NULL, *boxes = NULL, *scores = NULL;
    int *query = NULL, K = 0;
    float *sparse = NULL, *dense = NULL, *lg = NULL, *io = NULL, *pass_score = NULL, *pass_iou = NULL;
    cs_label_composer comp;
    int comp_ok = 0;
    uint32_t *prefill = NULL;
    for (size_t i = 0; i < npix * 3; i++)
        if (!isfinite(hw3[i])) return cs_error(CELLSAM_ERR_INVALID, "image contains NaN or infinite values");
    if (!p->boxes && !m->has_detector)
        return cs_error(CELLSAM_ERR_MODEL, "this checkpoint has no CellFinder detector: give boxes");

    double t_stage = cs_now_seconds(), t_now;
#define STAGE_DONE(k) (t_now = cs_now_seconds(), ctx->stage_s[k] += t_now - t_stage, t_stage = t_now)
    chw = cs_alloc(npix, 3 * sizeof(float));
    sam_in = cs_alloc((size_t)3 * 1024, 1024 * sizeof(float));
    if (!p->boxes) det_in = cs_alloc((size_t)3 * 1024, 1024 * sizeof(float));
    if (!chw || !sam_in || (!p->boxes && !det_in)) {
        rc = CELLSAM_ERR_NOMEM;
        goto done;
    }
    if (p->normalize) {
        rc = cs_normalize_image(hw3, H, W, chw);
        if (rc) goto done;
    } else {
        for (size_t i = 0; i < npix; i++)
            for (int c = 0; c < 3; c++) chw[c * npix + i] = hw3[i * 3 + c];
    }
    /* a given embedding (of this same image) replaces the SAM branch and encoder */
    rc = cs_prep_branches(chw, H, W, p->embedding ? NULL : sam_in, det_in);
    free(chw);
    chw = NULL;
    if (rc) goto done;
    STAGE_DONE(CS_STAGE_PREPROCESS);

    if (p->boxes) {
        /* user boxes: scaled to the stretched 1024 frame per axis (spec §3.4) */
        K = p->n_boxes;
        boxes = cs_alloc((size_t)(K ? K : 1), 4 * sizeof(float));
        scores = cs_alloc((size_t)(K ? K : 1), sizeof(float));
        query = cs_alloc((size_t)(K ? K : 1), sizeof(int));
        if (!boxes || !scores || !query) {
            rc = CELLSAM_ERR_NOMEM;
            goto done;
        }
        for (int i = 0; i < K; i++) {
            boxes[4 * i] = (float)(p->boxes[i].x1 * 1024.0 / W);
            boxes[4 * i + 1] = (float)(p->boxes[i].y1 * 1024.0 / H);
            boxes[4 * i + 2] = (float)(p->boxes[i].x2 * 1024.0 / W);
            boxes[4 * i + 3] = (float)(p->boxes[i].y2 * 1024.0 / H);
            scores[i] = 1.0f;
            query[i] = i;
        }
    } else {
        rc = cs_poll_abort(p->abort, p->progress_user);
        if (!rc) rc = detect_boxes(ctx, det_in, p, &boxes, &scores, &query, &K);
        free(det_in);
        det_in = NULL;
        if (rc) goto done;
    }
    out->n_boxes = K;
    STAGE_DONE(CS_STAGE_DETECTOR);
    /* the SAM branch runs after the detector, and only when there is a box to
     * decode: empty tiles of a slide (background) cost one ViT pass, not two */
    if (K > 0) {
        rc = cs_poll_abort(p->abort, p->progress_user);
        if (rc) goto done;
        if (p->embedding)
            rc = cellsam_set_embedding(ctx, p->embedding, m->pe.dim, m->pe.grid, m->pe.grid);
        else
            rc = cellsam_encode(ctx, sam_in, p->n_threads);
        if (rc) goto done;
        STAGE_DONE(CS_STAGE_ENCODER);
    }
    free(sam_in);
    sam_in = NULL;

    if (p->mask_threshold != 0.4f) {
        rc = cs_error(CELLSAM_ERR_UNSUPPORTED, "mask threshold %g: only the official 0.4 is implemented", p->mask_threshold);
        goto done;
    }
    rc = cs_composer_init(&comp, H, W);
    if (rc) goto done;
    comp_ok = 1;
    pass_score = cs_alloc((size_t)(K ? K : 1), sizeof(float));
    pass_iou = cs_alloc((size_t)(K ? K : 1), sizeof(float));
    const int P = m->pe.dim, nm = m->md.n_mask_tokens;
    const size_t plane = (size_t)256 * 256;
    sparse = cs_alloc((size_t)DECODE_CHUNK * 2, (size_t)P * sizeof(float));
    dense = cs_alloc((size_t)P * 64, 64 * sizeof(float));
    lg = cs_alloc((size_t)DECODE_CHUNK, plane * sizeof(float));
    io = cs_alloc((size_t)DECODE_CHUNK * nm, sizeof(float));
    if (!pass_score || !pass_iou || !sparse || !dense || !lg || !io) {
        rc = CELLSAM_ERR_NOMEM;
        goto done;
    }
    rc = cs_prompt_dense(&m->pe, NULL, dense, p->n_threads);
    if (rc) goto done;
    int n_pass = 0;
    for (int k0 = 0; k0 < K; k0 += DECODE_CHUNK) {
        rc = cs_poll_abort(p->abort, p->progress_user);
        if (rc) goto done;
        int kn = K - k0 < DECODE_CHUNK ? K - k0 : DECODE_CHUNK;
        /* a query kept twice (once per class) has the same box: decode it once */
        int uniq[DECODE_CHUNK], slot[DECODE_CHUNK], nu = 0;
        for (int i = 0; i < kn; i++) {
            int s = -1;
            for (int j = 0; j < nu && s < 0; j++)
                if (query[k0 + uniq[j]] == query[k0 + i] &&
                    !memcmp(boxes + 4 * (k0 + uniq[j]), boxes + 4 * (k0 + i), 4 * sizeof(float)))
                    s = j;
            if (s < 0) {
                s = nu;
                uniq[nu++] = i;
            }
            slot[i] = s;
        }
        float ubox[DECODE_CHUNK * 4];
        for (int j = 0; j < nu; j++) {
            cs_prompt_sparse(&m->pe, boxes + 4 * (k0 + uniq[j]), NULL, 0, sparse + (size_t)j * 2 * P);
            memcpy(ubox + 4 * j, boxes + 4 * (k0 + uniq[j]), 4 * sizeof(float));
        }
        /* only mask token 0, no upscaling for masks the IoU test will drop, and each
         * mask upscaled around its box unless full masks are asked for */
        cs_decoder_options dopt = cs_decoder_default_options(&m->md);
        dopt.mask_count = 1;
        dopt.skip_below = p->iou_threshold;
        if (p->direct_decoder) dopt.factored_from = INT_MAX;
        if (!p->full_masks) {
            dopt.boxes = ubox;
            dopt.grow_above = CS_MASK_LOGIT_OFF;
        }
        rc = cs_mask_decoder_forward_ex(&m->md, ctx->embedding, ctx->dense_pe, dense, 0, sparse, nu, 2, &dopt, lg, io,
                                        ctx->dec_ws, p->n_threads);
        if (rc) goto done;
        for (int i = 0; i < kn; i++) {
            int s = slot[i];
            float iou0 = io[(size_t)s * nm];
            if (iou0 < p->iou_threshold) continue; /* official: skip if iou < threshold */
            n_pass++;
            rc = cs_composer_add_mask(&comp, lg + (size_t)s * plane, (uint32_t)n_pass);
            if (rc) goto done;
            pass_score[n_pass - 1] = scores[k0 + i];
            pass_iou[n_pass - 1] = iou0;
        }
    }
    /* a whole-image run keeps no decoder buffers (about 120 MB at full size) into
     * the next image's encoder pass; interactive prompting keeps them */
    cs_decoder_ws_release(ctx->dec_ws);
    STAGE_DONE(CS_STAGE_DECODER);
#undef STAGE_DONE
    /* holes and small objects; remember which composed label each final label came from */
    uint32_t *labels = cs_composer_take_labels(&comp);
    prefill = cs_alloc(npix, sizeof(uint32_t));
    if (!labels || !prefill) {
        free(labels);
        rc = CELLSAM_ERR_NOMEM;
        goto done;
    }
    memcpy(prefill, labels, npix * sizeof(uint32_t));
    rc = cs_fill_holes_remove_small(labels, H, W, p->min_size);
    if (rc) {
        free(labels);
        goto done;
    }
    int n_final = 0; /* labels are now 1..n_final */
    for (size_t i = 0; i < npix; i++) n_final = (int)labels[i] > n_final ? (int)labels[i] : n_final;
    if (p->remove_boundaries) cs_subtract_boundaries(labels, H, W);
    out->labels = labels;
    out->n_labels = n_final;
    out->score = cs_calloc((size_t)(n_final ? n_final : 1), sizeof(float));
    out->iou = cs_calloc((size_t)(n_final ? n_final : 1), sizeof(float));
    if (!out->score || !out->iou) {
        rc = CELLSAM_ERR_NOMEM;
        goto done;
    }
    /* the first pixel of a final label in raster order lies on its outer boundary,
     * so it is one of its own composed pixels, never a filled hole */
    {
        unsigned char *seen = cs_calloc((size_t)n_final + 1, 1);
        if (!seen) {
            rc = CELLSAM_ERR_NOMEM;
            goto done;
        }
        for (size_t i = 0; i < npix; i++) {
            uint32_t f = labels[i];
            if (!f || (int)f > n_final || seen[f]) continue;
            seen[f] = 1;
            uint32_t src = prefill[i];
            if (src >= 1 && (int)src <= n_pass) {
                out->score[f - 1] = pass_score[src - 1];
                out->iou[f - 1] = pass_iou[src - 1];
            }
        }
        free(seen);
    }
done:
    if (rc) {
        cs_tile_result_free(out);
        if (rc == CELLSAM_ERR_NOMEM) cs_error(rc, "out of memory segmenting a %d x %d image", W, H);
    }
    if (comp_ok) cs_composer_free(&comp);
    free(prefill);
    free(chw);
    free(sam_in);
    free(det_in);
    free(boxes);
    free(scores);
    free(query);
    free(sparse);
    free(dense);
    free(lg);
    free(io);
    free(pass_score);
    free(pass_iou);
    return rc;
}

int cs_cell_acc_rows(cs_cell_acc *a, const uint32_t *rows, int y0, int n_rows, int W) {
    for (int r = 0; r < n_rows; r++)
        for (int x = 0; x < W; x++) {
            uint32_t l = rows[(size_t)r * W + x];
            if (!l) continue;
            if (l >= a->cap) {
                if (l >= ((uint32_t)1 << 30)) return cs_error(CELLSAM_ERR_LIMIT, "label values too large");
                size_t cap = a->cap ? a->cap : 1024;
                while (cap <= l) cap *= 2;
                cellsam_cell *c = realloc(a->cells, cap * sizeof *c);
                if (!c) return cs_error(CELLSAM_ERR_NOMEM, "out of memory for cell statistics");
                memset(c + a->cap, 0, (cap - a->cap) * sizeof *c);
                a->cells = c;
                a->cap = cap;
            }
            cellsam_cell *c = &a->cells[l];
            int y = y0 + r;
            if (!c->area) {
                c->x0 = c->x1 = x;
                c->y0 = c->y1 = y;
            }
            c->area++;
            if (x < c->x0) c->x0 = x;
            if (x > c->x1) c->x1 = x;
            if (y > c->y1) c->y1 = y;
            c->cx += x; /* sums until cs_cell_acc_finish */
            c->cy += y;
        }
    return CELLSAM_OK;
}

int cs_cell_acc_finish(cs_cell_acc *a, const float *score, const float *iou, int n_labels, cellsam_cell **cells_out,
                       int *n_cells_out) {
    int n = 0;
    for (size_t l = 1; l < a->cap; l++) n += a->cells[l].area > 0;
    cellsam_cell *cells = cs_calloc((size_t)(n ? n : 1), sizeof *cells);
    if (!cells) return CELLSAM_ERR_NOMEM;
    int k = 0;
    for (size_t l = 1; l < a->cap; l++) {
        if (!a->cells[l].area) continue;
        cellsam_cell c = a->cells[l];
        c.label = (uint32_t)l;
        c.x1 += 1;
        c.y1 += 1;
        c.cx /= (double)c.area;
        c.cy /= (double)c.area;
        c.score = score && (int)l <= n_labels ? score[l - 1] : 0;
        c.iou = iou && (int)l <= n_labels ? iou[l - 1] : 0;
        cells[k++] = c;
    }
    *cells_out = cells;
    *n_cells_out = n;
    return CELLSAM_OK;
}

void cs_cell_acc_free(cs_cell_acc *a) {
    free(a->cells);
    memset(a, 0, sizeof *a);
}

int cs_cell_stats(const uint32_t *labels, int H, int W, const float *score, const float *iou, int n_labels,
                  cellsam_cell **cells_out, int *n_cells_out) {
    cs_cell_acc a = {0};
    *cells_out = NULL;
    *n_cells_out = 0;
    int rc = cs_cell_acc_rows(&a, labels, 0, H, W);
    if (!rc) rc = cs_cell_acc_finish(&a, score, iou, n_labels, cells_out, n_cells_out);
    cs_cell_acc_free(&a);
    return rc;
}

void cellsam_result_free(cellsam_result *r) {
    if (!r) return;
    free(r->labels);
    free(r->cells);
    free(r);
}

int cellsam_model_tiling(const cellsam_model *m, int tiled, int width, int height) {
    if (tiled >= 0) return tiled != 0;
    const int side = width > height ? width : height;
    return !(m && m->whole_image_max_side > 0 && side <= m->whole_image_max_side);
}

int cellsam_segment(cellsam_context *ctx, const float *image, int width, int height, int channels,
                    const cellsam_segment_params *params, cellsam_result **out) {
    *out = NULL;
    if (!ctx || !image) return cs_error(CELLSAM_ERR_INVALID, "null argument");
    cellsam_segment_params dp = cellsam_segment_default_params();
    const cellsam_segment_params *p = params ? params : &dp;
    if (width < 1 || height < 1) return cs_error(CELLSAM_ERR_INVALID, "image has zero size (%d x %d)", width, height);
    if (!(p->box_nms_iou <= 1) || (p->box_nms_iou < 0 && p->box_nms_iou != -1.0f))
        return cs_error(CELLSAM_ERR_INVALID, "box NMS IoU %g: give 0 (off), a value in (0, 1], or -1 (the model's)",
                        p->box_nms_iou);
    if (p->tiled < -1 || p->tiled > 1)
        return cs_error(CELLSAM_ERR_INVALID, "tiled %d: give 1 (tiled), 0 (whole image) or -1 (the model's)", p->tiled);
    if (cs_diameter_check(p->diameter)) return CELLSAM_ERR_INVALID;
    const int tiled = cellsam_model_tiling(ctx->model, p->tiled, width, height);
    size_t npix;
    if (cs_mul_size((size_t)width, (size_t)height, &npix) || npix > ((size_t)1 << 34))
        return cs_error(CELLSAM_ERR_LIMIT, "image of %d x %d pixels is too large", width, height);
    double t0 = cs_now_seconds();
    /* cell size: given, taken from the user's boxes, or estimated by a first pass at the
     * mode's own scale */
    float diameter = cellsam_model_diameter(ctx->model, p->diameter, p->tiled);
    if (p->boxes && diameter < 0) diameter = cs_boxes_diameter(p->boxes, p->n_boxes);
    double first_s[CS_STAGE_COUNT] = {0};
    if (diameter < 0) {
        cellsam_result *first = NULL;
        int rc = cs_estimate_diameter(ctx, image, width, height, channels, p, &diameter, &first);
        if (rc) return rc;
        if (diameter == 0 && first) { /* too few cells to size: the first pass is the answer */
            first->seconds = cs_now_seconds() - t0;
            *out = first;
            return CELLSAM_OK;
        }
        memcpy(first_s, ctx->stage_s, sizeof first_s);
        cellsam_result_free(first);
    }
    const double zoom = diameter > 0 ? cs_diameter_zoom(ctx->model, diameter) : 0;
    memset(ctx->stage_s, 0, sizeof ctx->stage_s);
    const double t_place = cs_now_seconds();
    float *hw3;
    int rc = cs_place_channels(image, height, width, channels, &hw3);
    if (rc) return rc;
    ctx->stage_s[CS_STAGE_PREPROCESS] = cs_now_seconds() - t_place;
    cellsam_result *r = calloc(1, sizeof *r);
    if (!r) {
        free(hw3);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    r->width = width;
    r->height = height;
    float *score = NULL, *iou = NULL;
    int n_labels = 0;
    if (zoom > 0) {
        rc = cs_segment_zoomed(ctx, hw3, height, width, p, zoom, &r->labels, &score, &iou, &n_labels,
                               &r->n_boxes_detected);
        r->diameter = diameter;
        r->zoom = (float)zoom;
    } else if (tiled && !p->boxes) {
        rc = cs_segment_tiled(ctx, hw3, height, width, p, &r->labels, &score, &iou, &n_labels, &r->n_boxes_detected);
    } else {
        cs_tile_result tr;
        rc = cs_segment_hw3(ctx, hw3, height, width, p, &tr);
        if (!rc) {
            r->labels = tr.labels;
            score = tr.score;
            iou = tr.iou;
            n_labels = tr.n_labels;
            r->n_boxes_detected = tr.n_boxes;
        }
    }
    free(hw3);
    if (!rc) rc = cs_cell_stats(r->labels, height, width, score, iou, n_labels, &r->cells, &r->n_cells);
    free(score);
    free(iou);
    if (rc) {
        cellsam_result_free(r);
        return rc;
    }
    r->seconds = cs_now_seconds() - t0;
    for (int k = 0; k < CS_STAGE_COUNT; k++) ctx->stage_s[k] += first_s[k];
    r->t_preprocess = ctx->stage_s[CS_STAGE_PREPROCESS];
    r->t_encoder = ctx->stage_s[CS_STAGE_ENCODER];
    r->t_detector = ctx->stage_s[CS_STAGE_DETECTOR];
    r->t_decoder = ctx->stage_s[CS_STAGE_DECODER];
    r->t_postprocess = r->seconds - r->t_preprocess - r->t_encoder - r->t_detector - r->t_decoder;
    *out = r;
    return CELLSAM_OK;
}
