/* Segmentation metrics (paper evaluation, spec 7.1): sparse IoU from one pass
 * over the pixels, optimal matching per IoU threshold, F1 / precision / recall / AP.
 *
 * The matching only needs pairs that overlap: a pair with IoU 0 has cost 0, so
 * the optimal rectangular assignment equals a minimum-cost matching on the
 * overlap graph in which any row may stay unmatched. We solve that exactly by
 * giving every GT row a private zero-cost "unmatched" column and running
 * shortest augmenting paths (Dijkstra with potentials) over the sparse graph;
 * each search only explores the rows and columns reachable from the new row,
 * so large images with thousands of labels stay cheap. */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "metrics.h"

/* ------------------------------------------------------------------ solver */

typedef struct {
    int n_rows, n_cols; /* requires n_rows <= n_cols for a complete graph */
    /* sparse form: row i has edges row_start[i] .. row_start[i+1]-1 */
    const size_t *row_start;
    const int *edge_col;
    const double *edge_cost;
    /* dense form (used when non-NULL): cost(i, j) = dense[i*stride_row + j*stride_col] */
    const double *dense;
    size_t stride_row, stride_col;
} assign_graph;

typedef struct {
    int n_rows, n_cols;
    double *u, *v, *dist;  /* row / column potentials, tentative distances */
    int *path;             /* row a column was reached from */
    int *row4col, *col4row;
    int *heap, *heap_pos;  /* indexed binary min-heap of columns keyed by dist */
    int heap_n;
    int *touched;          /* columns with finite dist in the current search */
    int n_touched;
    int *visited;          /* rows scanned in the current search */
    int n_visited;
    unsigned char *done;   /* column's distance is final */
} solver;

static void solver_free(solver *s) {
    free(s->u);
    free(s->v);
    free(s->dist);
    free(s->path);
    free(s->row4col);
    free(s->col4row);
    free(s->heap);
    free(s->heap_pos);
    free(s->touched);
    free(s->visited);
    free(s->done);
    memset(s, 0, sizeof *s);
}

static void solver_reset(solver *s) {
    for (int i = 0; i < s->n_rows; i++) {
        s->u[i] = 0;
        s->col4row[i] = -1;
    }
    for (int j = 0; j < s->n_cols; j++) {
        s->v[j] = 0;
        s->dist[j] = INFINITY;
        s->row4col[j] = -1;
        s->heap_pos[j] = -1;
        s->done[j] = 0;
    }
    s->heap_n = s->n_touched = s->n_visited = 0;
}

static int solver_init(solver *s, int n_rows, int n_cols) {
    memset(s, 0, sizeof *s);
    s->n_rows = n_rows;
    s->n_cols = n_cols;
    size_t r = (size_t)(n_rows > 0 ? n_rows : 1), c = (size_t)(n_cols > 0 ? n_cols : 1);
    s->u = malloc(r * sizeof *s->u);
    s->col4row = malloc(r * sizeof *s->col4row);
    s->visited = malloc(r * sizeof *s->visited);
    s->v = malloc(c * sizeof *s->v);
    s->dist = malloc(c * sizeof *s->dist);
    s->path = malloc(c * sizeof *s->path);
    s->row4col = malloc(c * sizeof *s->row4col);
    s->heap = malloc(c * sizeof *s->heap);
    s->heap_pos = malloc(c * sizeof *s->heap_pos);
    s->touched = malloc(c * sizeof *s->touched);
    s->done = malloc(c);
    if (!s->u || !s->col4row || !s->visited || !s->v || !s->dist || !s->path || !s->row4col ||
        !s->heap || !s->heap_pos || !s->touched || !s->done) {
        solver_free(s);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory for the assignment solver (%d x %d)", n_rows, n_cols);
    }
    solver_reset(s);
    return CELLSAM_OK;
}

/* Ties prefer a free column: the search can stop there instead of going on. */
static int heap_less(const solver *s, int a, int b) {
    if (s->dist[a] != s->dist[b]) return s->dist[a] < s->dist[b];
    return s->row4col[a] < 0 && s->row4col[b] >= 0;
}

static void heap_place(solver *s, int pos, int col) {
    s->heap[pos] = col;
    s->heap_pos[col] = pos;
}

static void heap_up(solver *s, int pos) {
    int col = s->heap[pos];
    while (pos > 0) {
        int parent = (pos - 1) / 2;
        if (!heap_less(s, col, s->heap[parent])) break;
        heap_place(s, pos, s->heap[parent]);
        pos = parent;
    }
    heap_place(s, pos, col);
}

static void heap_down(solver *s, int pos) {
    int col = s->heap[pos];
    for (;;) {
        int child = 2 * pos + 1;
        if (child >= s->heap_n) break;
        if (child + 1 < s->heap_n && heap_less(s, s->heap[child + 1], s->heap[child])) child++;
        if (!heap_less(s, s->heap[child], col)) break;
        heap_place(s, pos, s->heap[child]);
        pos = child;
    }
    heap_place(s, pos, col);
}

static int heap_pop(solver *s) {
    int top = s->heap[0];
    s->heap_pos[top] = -1;
    s->heap_n--;
    if (s->heap_n > 0) {
        heap_place(s, 0, s->heap[s->heap_n]);
        heap_down(s, 0);
    }
    return top;
}

static void relax(solver *s, int row, int col, double cost, double base) {
    if (s->done[col]) return;
    double reduced = base + cost - s->u[row] - s->v[col];
    if (reduced < s->dist[col]) {
        if (s->dist[col] == INFINITY) s->touched[s->n_touched++] = col;
        s->dist[col] = reduced;
        s->path[col] = row;
        if (s->heap_pos[col] < 0) {
            s->heap_pos[col] = s->heap_n;
            s->heap[s->heap_n++] = col;
        }
        heap_up(s, s->heap_pos[col]);
    }
}

static void search_cleanup(solver *s) {
    for (int t = 0; t < s->n_touched; t++) {
        int j = s->touched[t];
        s->dist[j] = INFINITY;
        s->done[j] = 0;
        s->heap_pos[j] = -1;
    }
    s->heap_n = s->n_touched = s->n_visited = 0;
}

/* Assign row `cur` (currently unmatched) along a shortest augmenting path,
 * keeping the duals feasible (u_i + v_j <= cost_ij, equality on matched pairs). */
static int augment_row(solver *s, const assign_graph *g, int cur) {
    double min_val = 0;
    int row = cur, sink = -1;
    while (sink < 0) {
        s->visited[s->n_visited++] = row;
        if (g->dense) {
            const double *rp = g->dense + (size_t)row * g->stride_row;
            for (int j = 0; j < g->n_cols; j++) relax(s, row, j, rp[(size_t)j * g->stride_col], min_val);
        } else {
            for (size_t e = g->row_start[row]; e < g->row_start[row + 1]; e++)
                relax(s, row, g->edge_col[e], g->edge_cost[e], min_val);
        }
        if (s->heap_n == 0) {
            search_cleanup(s);
            return cs_error(CELLSAM_ERR_INVALID, "assignment infeasible: row %d cannot be matched", cur);
        }
        int col = heap_pop(s);
        min_val = s->dist[col];
        s->done[col] = 1;
        if (s->row4col[col] < 0)
            sink = col;
        else
            row = s->row4col[col];
    }
    s->u[cur] += min_val;
    for (int k = 1; k < s->n_visited; k++) {
        int r = s->visited[k];
        s->u[r] += min_val - s->dist[s->col4row[r]];
    }
    for (int t = 0; t < s->n_touched; t++) {
        int j = s->touched[t];
        if (s->done[j]) s->v[j] -= min_val - s->dist[j];
    }
    for (int col = sink;;) {
        int r = s->path[col];
        s->row4col[col] = r;
        int prev = s->col4row[r];
        s->col4row[r] = col;
        col = prev;
        if (r == cur) break;
    }
    search_cleanup(s);
    return CELLSAM_OK;
}

/* Match every row of g; s must be initialised for g's sizes (and reset). */
static int solve_all_rows(solver *s, const assign_graph *g) {
    for (int i = 0; i < g->n_rows; i++) {
        int rc = augment_row(s, g, i);
        if (rc) return rc;
    }
    return CELLSAM_OK;
}

int cs_linear_sum_assignment(const double *cost, int n_rows, int n_cols, int *row_ind, int *col_ind) {
    if (n_rows < 0 || n_cols < 0)
        return cs_error(CELLSAM_ERR_INVALID, "linear_sum_assignment: negative size %d x %d", n_rows, n_cols);
    size_t n;
    if (cs_mul_size((size_t)n_rows, (size_t)n_cols, &n) || n > ((size_t)1 << 26))
        return cs_error(CELLSAM_ERR_LIMIT, "linear_sum_assignment: %d x %d matrix over the 2^26 entry limit",
                        n_rows, n_cols);
    if (n == 0) return CELLSAM_OK;
    if (!cost || !row_ind || !col_ind)
        return cs_error(CELLSAM_ERR_INVALID, "linear_sum_assignment: NULL argument");
    for (size_t k = 0; k < n; k++)
        if (!isfinite(cost[k]))
            return cs_error(CELLSAM_ERR_INVALID, "linear_sum_assignment: cost[%zu] is not finite", k);

    /* The solver matches every row, so it runs on the side with fewer entries. */
    int transposed = n_rows > n_cols;
    assign_graph g = {0};
    g.dense = cost;
    if (!transposed) {
        g.n_rows = n_rows;
        g.n_cols = n_cols;
        g.stride_row = (size_t)n_cols;
        g.stride_col = 1;
    } else {
        g.n_rows = n_cols;
        g.n_cols = n_rows;
        g.stride_row = 1;
        g.stride_col = (size_t)n_cols;
    }
    solver s;
    int rc = solver_init(&s, g.n_rows, g.n_cols);
    if (rc) return rc;
    rc = solve_all_rows(&s, &g);
    if (!rc) {
        if (!transposed) {
            for (int i = 0; i < n_rows; i++) {
                row_ind[i] = i;
                col_ind[i] = s.col4row[i];
            }
        } else {
            /* row4col of the transposed problem is indexed by original row. */
            int k = 0;
            for (int i = 0; i < n_rows; i++) {
                if (s.row4col[i] < 0) continue;
                row_ind[k] = i;
                col_ind[k] = s.row4col[i];
                k++;
            }
        }
    }
    solver_free(&s);
    return rc;
}

/* ------------------------------------------------------------------ hashing */

static inline size_t hash_slot(uint64_t key, int bits) {
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> (64 - bits));
}

/* Open addressing, linear probing; key 0 marks an empty slot (labels and
 * label pairs are never 0 here). */
typedef struct {
    uint64_t *keys;
    uint32_t *vals;
    size_t cap, n;
    int bits;
} u64_map;

static void map_free(u64_map *m) {
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

static int map_alloc(u64_map *m, int bits) {
    m->bits = bits;
    m->cap = (size_t)1 << bits;
    m->n = 0;
    m->keys = calloc(m->cap, sizeof *m->keys);
    m->vals = calloc(m->cap, sizeof *m->vals);
    if (!m->keys || !m->vals) {
        map_free(m);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory for a label table");
    }
    return CELLSAM_OK;
}

static int map_grow(u64_map *m) {
    if (m->bits >= 40) return cs_error(CELLSAM_ERR_LIMIT, "label table too large");
    u64_map bigger;
    int rc = map_alloc(&bigger, m->bits + 1);
    if (rc) return rc;
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->keys[i]) continue;
        size_t slot = hash_slot(m->keys[i], bigger.bits);
        while (bigger.keys[slot]) slot = (slot + 1) & (bigger.cap - 1);
        bigger.keys[slot] = m->keys[i];
        bigger.vals[slot] = m->vals[i];
    }
    bigger.n = m->n;
    map_free(m);
    *m = bigger;
    return CELLSAM_OK;
}

/* Slot of key, inserting it with value 0 if absent (*inserted set to 1). */
static int map_slot(u64_map *m, uint64_t key, size_t *slot_out, int *inserted) {
    if (2 * (m->n + 1) > m->cap) {
        int rc = map_grow(m);
        if (rc) return rc;
    }
    size_t slot = hash_slot(key, m->bits);
    while (m->keys[slot] && m->keys[slot] != key) slot = (slot + 1) & (m->cap - 1);
    *inserted = 0;
    if (!m->keys[slot]) {
        m->keys[slot] = key;
        m->vals[slot] = 0;
        m->n++;
        *inserted = 1;
    }
    *slot_out = slot;
    return CELLSAM_OK;
}

/* Growable per-id pixel counts (index 0 unused). */
typedef struct {
    uint32_t *a;
    size_t n, cap;
} u32_vec;

static int vec_push_zero(u32_vec *v) {
    if (v->n == v->cap) {
        size_t cap = v->cap ? 2 * v->cap : 256;
        uint32_t *a = realloc(v->a, cap * sizeof *a);
        if (!a) return cs_error(CELLSAM_ERR_NOMEM, "out of memory for label areas");
        v->a = a;
        v->cap = cap;
    }
    v->a[v->n++] = 0;
    return CELLSAM_OK;
}

/* Raw label -> sequential id (1, 2, ... in order of first appearance). */
static int renumber(u64_map *m, u32_vec *area, uint32_t label, uint32_t *id) {
    size_t slot;
    int inserted, rc = map_slot(m, label, &slot, &inserted);
    if (rc) return rc;
    if (inserted) {
        rc = vec_push_zero(area);
        if (rc) return rc;
        m->vals[slot] = (uint32_t)(area->n - 1);
    }
    *id = m->vals[slot];
    return CELLSAM_OK;
}

/* ------------------------------------------------------------------ metric */

typedef struct {
    u64_map gt_ids, pred_ids, pairs;
    u32_vec gt_area, pred_area;
} overlap_tables;

static void tables_free(overlap_tables *t) {
    map_free(&t->gt_ids);
    map_free(&t->pred_ids);
    map_free(&t->pairs);
    free(t->gt_area.a);
    free(t->pred_area.a);
}

/* Account `run` consecutive pixels with the same (gt, pred) labels. */
static int add_run(overlap_tables *t, uint32_t gl, uint32_t pl, uint32_t run) {
    uint32_t gid = 0, pid = 0;
    int rc;
    if (gl) {
        if ((rc = renumber(&t->gt_ids, &t->gt_area, gl, &gid))) return rc;
        t->gt_area.a[gid] += run;
    }
    if (pl) {
        if ((rc = renumber(&t->pred_ids, &t->pred_area, pl, &pid))) return rc;
        t->pred_area.a[pid] += run;
    }
    if (gid && pid) {
        size_t slot;
        int inserted;
        if ((rc = map_slot(&t->pairs, ((uint64_t)gid << 32) | pid, &slot, &inserted))) return rc;
        t->pairs.vals[slot] += run;
    }
    return CELLSAM_OK;
}

static int count_overlaps(const uint32_t *gt, const uint32_t *pred, size_t n_pixels, overlap_tables *t) {
    int rc;
    memset(t, 0, sizeof *t);
    if ((rc = map_alloc(&t->gt_ids, 10)) || (rc = map_alloc(&t->pred_ids, 10)) || (rc = map_alloc(&t->pairs, 10)) ||
        (rc = vec_push_zero(&t->gt_area)) || (rc = vec_push_zero(&t->pred_area)))
        return rc;
    if (n_pixels == 0) return CELLSAM_OK;
    uint32_t gl = gt[0], pl = pred[0], run = 1;
    for (size_t i = 1; i < n_pixels; i++) {
        if (gt[i] == gl && pred[i] == pl) {
            run++;
            continue;
        }
        if ((rc = add_run(t, gl, pl, run))) return rc;
        gl = gt[i];
        pl = pred[i];
        run = 1;
    }
    return add_run(t, gl, pl, run);
}

double cs_ap_threshold(int k) { return (double)(10 + k) / 20.0; }

static double safe_ratio(double num, double den) { return den > 0 ? num / den : 0.0; }

/* Overlap graph in CSR form over GT rows; columns 0..n_pred-1 are predictions,
 * column n_pred + i is row i's private "stay unmatched" column (cost 0). */
typedef struct {
    int n_gt, n_pred;
    size_t *row_start;
    int *col;
    double *iou;
    double *cost;
} overlap_graph;

static void graph_free(overlap_graph *og) {
    free(og->row_start);
    free(og->col);
    free(og->iou);
    free(og->cost);
}

static int build_graph(const overlap_tables *t, overlap_graph *og) {
    memset(og, 0, sizeof *og);
    og->n_gt = (int)t->gt_ids.n;
    og->n_pred = (int)t->pred_ids.n;
    size_t n_edges = t->pairs.n + t->gt_ids.n;
    og->row_start = calloc((size_t)og->n_gt + 1, sizeof *og->row_start);
    og->col = malloc((n_edges ? n_edges : 1) * sizeof *og->col);
    og->iou = malloc((n_edges ? n_edges : 1) * sizeof *og->iou);
    og->cost = malloc((n_edges ? n_edges : 1) * sizeof *og->cost);
    if (!og->row_start || !og->col || !og->iou || !og->cost) {
        graph_free(og);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory for the overlap graph (%zu edges)", n_edges);
    }
    /* Counting sort of the pairs by GT row: row i (id i+1) counts into
     * row_start[i+1], plus one dummy edge per row, then a prefix sum. */
    for (size_t s = 0; s < t->pairs.cap; s++)
        if (t->pairs.keys[s]) og->row_start[t->pairs.keys[s] >> 32]++;
    for (int i = 0; i < og->n_gt; i++) og->row_start[i + 1]++;
    for (int i = 0; i < og->n_gt; i++) og->row_start[i + 1] += og->row_start[i];
    /* row_start[i] is the start of row i; fill with a moving cursor per row. */
    size_t *cursor = malloc(((size_t)og->n_gt + 1) * sizeof *cursor);
    if (!cursor) {
        graph_free(og);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory for the overlap graph");
    }
    memcpy(cursor, og->row_start, ((size_t)og->n_gt + 1) * sizeof *cursor);
    for (size_t s = 0; s < t->pairs.cap; s++) {
        uint64_t key = t->pairs.keys[s];
        if (!key) continue;
        uint32_t gid = (uint32_t)(key >> 32), pid = (uint32_t)key;
        uint64_t inter = t->pairs.vals[s];
        uint64_t uni = (uint64_t)t->gt_area.a[gid] + t->pred_area.a[pid] - inter;
        size_t e = cursor[gid - 1]++;
        og->col[e] = (int)pid - 1;
        og->iou[e] = (double)inter / (double)uni;
    }
    for (int i = 0; i < og->n_gt; i++) {
        size_t e = cursor[i]++;
        og->col[e] = og->n_pred + i;
        og->iou[e] = 0;
    }
    free(cursor);
    return CELLSAM_OK;
}

/* Number of true positives at IoU threshold th (optimal matching). */
static int count_tp(const overlap_graph *og, solver *s, double th, int *tp_out) {
    *tp_out = 0;
    int n_min = og->n_gt < og->n_pred ? og->n_gt : og->n_pred;
    if (n_min == 0) return CELLSAM_OK;
    double scale = 1.0 / (2.0 * n_min);
    size_t n_edges = og->row_start[og->n_gt];
    for (size_t e = 0; e < n_edges; e++) {
        if (og->col[e] >= og->n_pred)
            og->cost[e] = 0;
        else
            og->cost[e] = -(og->iou[e] >= th ? 1.0 : 0.0) - og->iou[e] * scale;
    }
    assign_graph g = {0};
    g.n_rows = og->n_gt;
    g.n_cols = og->n_pred + og->n_gt;
    g.row_start = og->row_start;
    g.edge_col = og->col;
    g.edge_cost = og->cost;
    solver_reset(s);
    int rc = solve_all_rows(s, &g);
    if (rc) return rc;
    int tp = 0;
    for (int i = 0; i < og->n_gt; i++) {
        int c = s->col4row[i];
        if (c >= og->n_pred) continue;
        for (size_t e = og->row_start[i]; e < og->row_start[i + 1]; e++)
            if (og->col[e] == c) {
                if (og->iou[e] >= th) tp++;
                break;
            }
    }
    *tp_out = tp;
    return CELLSAM_OK;
}

int cs_evaluate_labels_at(const uint32_t *gt, const uint32_t *pred, size_t n_pixels, double iou_threshold,
                          cs_match_stats *out) {
    if (!out) return cs_error(CELLSAM_ERR_INVALID, "evaluate_labels: NULL output");
    memset(out, 0, sizeof *out);
    if (n_pixels && (!gt || !pred)) return cs_error(CELLSAM_ERR_INVALID, "evaluate_labels: NULL label image");
    if (n_pixels > CS_METRICS_MAX_PIXELS)
        return cs_error(CELLSAM_ERR_LIMIT, "evaluate_labels: %zu pixels over the limit of %zu", n_pixels,
                        CS_METRICS_MAX_PIXELS);
    /* Thresholds <= 0 would count non-overlapping pairs as matches. */
    if (!(iou_threshold > 0 && iou_threshold <= 1))
        return cs_error(CELLSAM_ERR_INVALID, "evaluate_labels: IoU threshold %g outside (0, 1]", iou_threshold);

    overlap_tables t;
    int rc = count_overlaps(gt, pred, n_pixels, &t);
    if (rc) {
        tables_free(&t);
        return rc;
    }
    if (t.gt_ids.n + t.pred_ids.n > (size_t)INT_MAX) {
        tables_free(&t);
        return cs_error(CELLSAM_ERR_LIMIT, "evaluate_labels: too many labels");
    }
    overlap_graph og;
    rc = build_graph(&t, &og);
    tables_free(&t);
    if (rc) return rc;
    solver s;
    rc = solver_init(&s, og.n_gt, og.n_pred + og.n_gt);
    if (rc) {
        graph_free(&og);
        return rc;
    }

    out->n_gt = og.n_gt;
    out->n_pred = og.n_pred;
    int tp_main = -1;
    double ap_sum = 0;
    for (int k = 0; k < CS_AP_THRESHOLDS && !rc; k++) {
        double th = cs_ap_threshold(k);
        int tp;
        rc = count_tp(&og, &s, th, &tp);
        if (rc) break;
        if (th == iou_threshold) tp_main = tp;
        int fp = og.n_pred - tp, fn = og.n_gt - tp;
        out->ap[k] = safe_ratio(tp, (double)tp + fp + fn);
        ap_sum += out->ap[k];
    }
    if (!rc && tp_main < 0) rc = count_tp(&og, &s, iou_threshold, &tp_main);
    solver_free(&s);
    graph_free(&og);
    if (rc) {
        memset(out, 0, sizeof *out);
        return rc;
    }
    out->mean_ap = ap_sum / CS_AP_THRESHOLDS;
    out->tp = tp_main;
    out->fp = out->n_pred - tp_main;
    out->fn = out->n_gt - tp_main;
    out->f1 = safe_ratio(out->tp, out->tp + 0.5 * (out->fp + out->fn));
    out->precision = safe_ratio(out->tp, (double)out->tp + out->fp);
    out->recall = safe_ratio(out->tp, (double)out->tp + out->fn);
    return CELLSAM_OK;
}

int cs_evaluate_labels(const uint32_t *gt, const uint32_t *pred, size_t n_pixels, cs_match_stats *out) {
    return cs_evaluate_labels_at(gt, pred, n_pixels, 0.5, out);
}
