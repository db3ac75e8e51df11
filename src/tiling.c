/* Tiled whole-slide inference (official segment_wsi, spec §3.6), streamed tile by
 * tile: only the current tile, the current tile row's core labels and the linking
 * strips are held; the link graph is kept sparse. See tiling.h for the algorithm. */
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "tiling.h"

/* Caps: a tile (haloed block) and an image side. */
#define TL_MAX_SIDE (1 << 24)
#define TL_MAX_TILE_PIXELS ((size_t)1 << 26)
#define TL_MAX_LABEL ((uint64_t)INT32_MAX) /* the official labels are int32 */

cs_tile_params cs_tile_default_params(void) {
    cs_tile_params p;
    memset(&p, 0, sizeof p);
    p.block_size = 400;
    p.overlap = 56;
    p.iou_depth = 56;
    p.link_iou = 0.5;
    p.halo_mode = CS_HALO_PERIODIC;
    return p;
}

/* ------------------------------------------------------------ memory accounting */

/* Every scratch allocation goes through these so stats.peak_bytes is exact. */
typedef struct {
    size_t live, peak;
} tl_mem;

typedef union {
    max_align_t align;
    size_t bytes;
} tl_hdr;

static void *tl_alloc(tl_mem *m, size_t n, size_t elem, int zero) {
    size_t bytes;
    if (cs_mul_size(n, elem, &bytes) || bytes > SIZE_MAX - sizeof(tl_hdr)) {
        cs_error(CELLSAM_ERR_LIMIT, "tiling: allocation of %zu x %zu bytes overflows", n, elem);
        return NULL;
    }
    tl_hdr *h = zero ? calloc(1, sizeof *h + bytes) : malloc(sizeof *h + bytes);
    if (!h) {
        cs_error(CELLSAM_ERR_NOMEM, "tiling: out of memory (%zu bytes)", bytes);
        return NULL;
    }
    h->bytes = bytes;
    m->live += bytes;
    if (m->live > m->peak) m->peak = m->live;
    return h + 1;
}

static void tl_free(tl_mem *m, void *p) {
    if (!p) return;
    tl_hdr *h = (tl_hdr *)p - 1;
    m->live -= h->bytes;
    free(h);
}

static void *tl_realloc(tl_mem *m, void *p, size_t n, size_t elem) {
    if (!p) return tl_alloc(m, n, elem, 0);
    size_t bytes;
    if (cs_mul_size(n, elem, &bytes) || bytes > SIZE_MAX - sizeof(tl_hdr)) {
        cs_error(CELLSAM_ERR_LIMIT, "tiling: allocation of %zu x %zu bytes overflows", n, elem);
        return NULL;
    }
    tl_hdr *h = (tl_hdr *)p - 1;
    size_t old = h->bytes;
    tl_hdr *nh = realloc(h, sizeof *nh + bytes);
    if (!nh) {
        cs_error(CELLSAM_ERR_NOMEM, "tiling: out of memory (%zu bytes)", bytes);
        return NULL;
    }
    nh->bytes = bytes;
    m->live = m->live - old + bytes;
    if (m->live > m->peak) m->peak = m->live;
    return nh + 1;
}

/* ------------------------------------------------------------------- chunking */

int cs_chunks(int n, int block, int depth, int *out, int max_out) {
    if (n < 1 || block < 1 || depth < 0 || max_out < 0) return -1;
    if (!out) max_out = 0;
    const int nfull = n / block, rem = n % block;
    const int count = nfull + (rem > 0);
    const int min_chunk = rem > 0 ? rem : block;
    int k = 0;
    if (depth <= min_chunk) {
        for (int i = 0; i < count; i++)
            if (k < max_out) out[k++] = i < nfull ? block : rem;
            else k++;
        return count;
    }
    if (n < depth) { /* dask raises here; one chunk, the halo wraps several times */
        if (max_out > 0) out[0] = n;
        return 1;
    }
    /* dask.array.overlap.ensure_minimum_chunksize. The last emitted chunk may still
     * grow at the end, so emission lags by one. */
    long long acc = 0, pending = 0;
    int has_pending = 0;
#define TL_EMIT(v)                                   \
    do {                                             \
        if (has_pending) {                           \
            if (k < max_out) out[k] = (int)pending;  \
            k++;                                     \
        }                                            \
        pending = (v);                               \
        has_pending = 1;                             \
    } while (0)
    for (int i = 0; i < count; i++) {
        const long long c = i < nfull ? block : rem;
        if (c < depth) {
            if (acc > depth + (depth - c)) {
                TL_EMIT(acc - (depth - c));
                acc = depth;
            } else {
                acc += c;
            }
        }
        if (acc >= depth) {
            TL_EMIT(acc);
            acc = 0;
        }
        if (c >= depth) acc += c;
    }
    if (acc >= depth) TL_EMIT(acc);
    else pending += acc; /* n >= depth guarantees something was emitted */
#undef TL_EMIT
    if (k < max_out) out[k] = (int)pending;
    k++;
    return k;
}

/* ----------------------------------------------------------- halo extraction */

static int map_index(long long i, int n, int mode) {
    if (mode == CS_HALO_MIRROR) {
        const long long period = 2LL * n;
        long long m = i % period;
        if (m < 0) m += period;
        return (int)(m < n ? m : period - 1 - m);
    }
    long long m = i % n;
    if (m < 0) m += n;
    return (int)m;
}

/* A maximal stretch of destination positions whose source indices step by +1 or -1. */
typedef struct {
    int dst, src, len, step, copy_of; /* copy_of: earlier run with the same source span, or -1 */
} tl_run;

static int run_lo(const tl_run *r) { return r->step > 0 ? r->src : r->src - (r->len - 1); }

static int build_runs(long long start, int len, int n, int mode, tl_run *runs) {
    int k = -1;
    for (int t = 0; t < len; t++) {
        const int s = map_index(start + t, n, mode);
        if (k >= 0) {
            tl_run *r = &runs[k];
            const int last = r->src + r->step * (r->len - 1);
            if (r->len == 1 && (s == last + 1 || s == last - 1)) {
                r->step = s - last;
                r->len++;
                continue;
            }
            if (r->len > 1 && s == last + r->step) {
                r->len++;
                continue;
            }
        }
        k++;
        runs[k].dst = t;
        runs[k].src = s;
        runs[k].len = 1;
        runs[k].step = 1;
        runs[k].copy_of = -1;
    }
    const int nr = k + 1;
    /* Runs covering the same source span are filled by copying (1-pixel-wide images
     * and multiple wraps would otherwise read the same pixels many times). */
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < i; j++)
            if (runs[j].copy_of < 0 && runs[j].len == runs[i].len && run_lo(&runs[j]) == run_lo(&runs[i])) {
                runs[i].copy_of = j;
                break;
            }
    return nr;
}

/* Position within run r of source index s. */
static int run_pos(const tl_run *r, int s) { return (s - r->src) * r->step; }

static int callback_error(int rc, const char *what) {
    if (rc >= CELLSAM_ERR_IO && rc <= CELLSAM_ERR_MODEL) return cs_error_prefix(rc, "%s", what);
    return cs_error(CELLSAM_ERR_IO, "%s failed (callback returned %d)", what, rc);
}

void cs_tile_apply_minmax(float *hw3, size_t n_pixels, const float ch_min[3], const float ch_max[3]) {
    for (int c = 0; c < 3; c++) {
        const float mn = ch_min[c];
        const float range = ch_max[c] - ch_min[c];
        if (!(range != 0)) continue; /* numpy: skipped only when max-min == 0 (NaN applies) */
        for (size_t i = 0; i < n_pixels; i++) {
            const float centred = hw3[i * 3 + c] - mn;
            hw3[i * 3 + c] = centred / range;
        }
    }
}

/* Reads with caller-provided run and scratch buffers (sizes h, w and h*w*3). */
static int read_region_into(cs_region_read_fn read, void *user, int H, int W, int y0, int x0, int h,
                            int w, int mode, tl_run *ry, tl_run *rx, float *scratch, float *out) {
    const int nry = build_runs(y0, h, H, mode, ry);
    const int nrx = build_runs(x0, w, W, mode, rx);
    const size_t row = (size_t)w * 3;
    for (int a = 0; a < nry; a++) {
        if (ry[a].copy_of >= 0) continue;
        const int ylo = run_lo(&ry[a]);
        for (int b = 0; b < nrx; b++) {
            if (rx[b].copy_of >= 0) continue;
            const int xlo = run_lo(&rx[b]);
            const int rh = ry[a].len, rw = rx[b].len;
            int rc = read(user, xlo, ylo, rw, rh, scratch);
            if (rc) return callback_error(rc, "tiling: reading the image region");
            for (int t = 0; t < rh; t++) {
                /* scratch row (image row ylo + t) lands at run position of that row */
                const int ty = ry[a].dst + run_pos(&ry[a], ylo + t);
                float *dst = out + (size_t)ty * row;
                const float *src = scratch + (size_t)t * rw * 3;
                if (rx[b].step > 0) {
                    memcpy(dst + (size_t)rx[b].dst * 3, src, (size_t)rw * 3 * sizeof(float));
                } else {
                    for (int u = 0; u < rw; u++) {
                        const int tx = rx[b].dst + run_pos(&rx[b], xlo + u);
                        memcpy(dst + (size_t)tx * 3, src + (size_t)u * 3, 3 * sizeof(float));
                    }
                }
            }
        }
    }
    /* Column copies first (within rows that were read), then whole-row copies. */
    for (int b = 0; b < nrx; b++) {
        if (rx[b].copy_of < 0) continue;
        const tl_run *from = &rx[rx[b].copy_of];
        for (int a = 0; a < nry; a++) {
            if (ry[a].copy_of >= 0) continue;
            for (int t = 0; t < ry[a].len; t++) {
                float *r = out + (size_t)(ry[a].dst + t) * row;
                for (int u = 0; u < rx[b].len; u++) {
                    const int s = rx[b].src + rx[b].step * u;
                    const int fx = from->dst + run_pos(from, s);
                    memcpy(r + (size_t)(rx[b].dst + u) * 3, r + (size_t)fx * 3, 3 * sizeof(float));
                }
            }
        }
    }
    for (int a = 0; a < nry; a++) {
        if (ry[a].copy_of < 0) continue;
        const tl_run *from = &ry[ry[a].copy_of];
        for (int t = 0; t < ry[a].len; t++) {
            const int s = ry[a].src + ry[a].step * t;
            const int fy = from->dst + run_pos(from, s);
            memcpy(out + (size_t)(ry[a].dst + t) * row, out + (size_t)fy * row, row * sizeof(float));
        }
    }
    return CELLSAM_OK;
}

static int check_dims(int H, int W) {
    if (H < 1 || W < 1) return cs_error(CELLSAM_ERR_INVALID, "tiling: image has zero size (%d x %d)", W, H);
    if (H > TL_MAX_SIDE || W > TL_MAX_SIDE)
        return cs_error(CELLSAM_ERR_LIMIT, "tiling: image of %d x %d pixels is too large", W, H);
    return CELLSAM_OK;
}

int cs_tile_read_region(cs_region_read_fn read, void *user, int height, int width, int y0, int x0, int h,
                        int w, int halo_mode, const float *ch_min, const float *ch_max, float *out) {
    if (!read || !out || h < 1 || w < 1) return cs_error(CELLSAM_ERR_INVALID, "tiling: bad region arguments");
    int rc = check_dims(height, width);
    if (rc) return rc;
    size_t px;
    if (cs_mul_size((size_t)h, (size_t)w, &px) || px > TL_MAX_TILE_PIXELS)
        return cs_error(CELLSAM_ERR_LIMIT, "tiling: region of %d x %d pixels is too large", w, h);
    tl_mem mem = {0, 0};
    tl_run *ry = tl_alloc(&mem, (size_t)h, sizeof *ry, 0);
    tl_run *rx = tl_alloc(&mem, (size_t)w, sizeof *rx, 0);
    float *scratch = tl_alloc(&mem, px, 3 * sizeof(float), 0);
    if (!ry || !rx || !scratch) rc = CELLSAM_ERR_NOMEM;
    else rc = read_region_into(read, user, height, width, y0, x0, h, w, halo_mode, ry, rx, scratch, out);
    if (!rc && ch_min && ch_max) cs_tile_apply_minmax(out, px, ch_min, ch_max);
    tl_free(&mem, ry);
    tl_free(&mem, rx);
    tl_free(&mem, scratch);
    return rc;
}

/* Fold n interleaved x3 pixels into the running per-channel min and max (the first
 * call starts them); a NaN is only flagged, min-max finishes it. */
static void minmax_accumulate(const float *buf, size_t n, int first, float mn[3], float mx[3], int has_nan[3]) {
    for (int c = 0; c < 3; c++) {
        if (first) mn[c] = mx[c] = buf[c];
        for (size_t i = 0; i < n; i++) {
            const float v = buf[i * 3 + c];
            if (isnan(v)) has_nan[c] = 1;
            else {
                if (v < mn[c] || isnan(mn[c])) mn[c] = v;
                if (v > mx[c] || isnan(mx[c])) mx[c] = v;
            }
        }
    }
}

static void minmax_finish(const int has_nan[3], float mn[3], float mx[3]) {
    for (int c = 0; c < 3; c++)
        if (has_nan[c]) mn[c] = mx[c] = NAN; /* numpy min/max propagate NaN */
}

void cs_tile_channel_minmax_hw3(const float *hw3, size_t n_pixels, float ch_min[3], float ch_max[3]) {
    int has_nan[3] = {0, 0, 0};
    if (!n_pixels) {
        for (int c = 0; c < 3; c++) ch_min[c] = ch_max[c] = NAN;
        return;
    }
    minmax_accumulate(hw3, n_pixels, 1, ch_min, ch_max, has_nan);
    minmax_finish(has_nan, ch_min, ch_max);
}

static int channel_minmax(tl_mem *mem, cs_region_read_fn read, void *user, int H, int W, float mn[3],
                          float mx[3]) {
    int rows = (int)((size_t)1 << 18) / W;
    if (rows < 1) rows = 1;
    if (rows > H) rows = H;
    float *buf = tl_alloc(mem, (size_t)rows * W, 3 * sizeof(float), 0);
    if (!buf) return CELLSAM_ERR_NOMEM;
    int has_nan[3] = {0, 0, 0}, first = 1;
    int rc = CELLSAM_OK;
    for (int y0 = 0; y0 < H; y0 += rows) {
        const int nr = H - y0 < rows ? H - y0 : rows;
        rc = read(user, 0, y0, W, nr, buf);
        if (rc) {
            rc = callback_error(rc, "tiling: reading the image for min-max");
            break;
        }
        minmax_accumulate(buf, (size_t)nr * W, first, mn, mx, has_nan);
        first = 0;
    }
    if (!rc) minmax_finish(has_nan, mn, mx);
    tl_free(mem, buf);
    return rc;
}

int cs_tile_channel_minmax(cs_region_read_fn read, void *user, int height, int width, float ch_min[3],
                           float ch_max[3]) {
    if (!read || !ch_min || !ch_max) return cs_error(CELLSAM_ERR_INVALID, "tiling: null argument");
    int rc = check_dims(height, width);
    if (rc) return rc;
    tl_mem mem = {0, 0};
    return channel_minmax(&mem, read, user, height, width, ch_min, ch_max);
}

/* ------------------------------------------------------------- label linking */

typedef struct {
    uint32_t *nodes;   /* sorted distinct labels that appear in an edge */
    uint32_t *compmin; /* per node: smallest label of its component */
    size_t n_nodes;
    uint32_t *nonmin;  /* sorted labels that are not the smallest of their component */
    size_t n_nonmin;
    uint32_t cache_in, cache_out;
} tl_relabel;

static int cmp_u32(const void *a, const void *b) {
    const uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}
static int cmp_u64(const void *a, const void *b) {
    const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Index of the first element >= v in sorted a[0..n). */
static size_t lower_bound_u32(const uint32_t *a, size_t n, uint32_t v) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        const size_t mid = lo + (hi - lo) / 2;
        if (a[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static size_t count_in_sorted(const uint32_t *a, size_t n, uint32_t v) {
    return lower_bound_u32(a, n, v + 1) - lower_bound_u32(a, n, v); /* v < UINT32_MAX: labels <= INT32_MAX */
}

/* scipy's connected_components numbers components in order of their smallest node,
 * and every node not in an edge is its own component. So the component of node v,
 * whose smallest member is m, gets m minus the number of non-smallest nodes below m
 * — all of which appear in edges. */
static uint32_t relabel_value(tl_relabel *r, uint32_t v) {
    if (v == 0) return 0;
    if (v == r->cache_in) return r->cache_out;
    uint32_t m = v;
    const size_t i = lower_bound_u32(r->nodes, r->n_nodes, v);
    if (i < r->n_nodes && r->nodes[i] == v) m = r->compmin[i];
    const uint32_t out = m - (uint32_t)lower_bound_u32(r->nonmin, r->n_nonmin, m);
    r->cache_in = v;
    r->cache_out = out;
    return out;
}

static uint32_t uf_find(uint32_t *parent, uint32_t i) {
    while (parent[i] != i) {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    return i;
}

/* Consumes the edge list (pairs). */
static int build_relabel(tl_mem *mem, uint32_t *edges, size_t n_edges, tl_relabel *r) {
    memset(r, 0, sizeof *r);
    if (n_edges == 0) return CELLSAM_OK;
    const size_t n_end = 2 * n_edges;
    uint32_t *ends = tl_alloc(mem, n_end, sizeof *ends, 0);
    if (!ends) return CELLSAM_ERR_NOMEM;
    memcpy(ends, edges, n_end * sizeof *ends);
    qsort(ends, n_end, sizeof *ends, cmp_u32);
    size_t m = 0;
    for (size_t i = 0; i < n_end; i++)
        if (m == 0 || ends[m - 1] != ends[i]) ends[m++] = ends[i];
    uint32_t *parent = tl_alloc(mem, m, sizeof *parent, 0);
    uint32_t *compmin = tl_alloc(mem, m, sizeof *compmin, 0);
    if (!parent || !compmin) {
        tl_free(mem, ends);
        tl_free(mem, parent);
        tl_free(mem, compmin);
        return CELLSAM_ERR_NOMEM;
    }
    for (size_t i = 0; i < m; i++) parent[i] = (uint32_t)i;
    for (size_t e = 0; e < n_edges; e++) {
        const uint32_t a = uf_find(parent, (uint32_t)lower_bound_u32(ends, m, edges[2 * e]));
        const uint32_t b = uf_find(parent, (uint32_t)lower_bound_u32(ends, m, edges[2 * e + 1]));
        if (a < b) parent[b] = a; /* the root is the smallest index = smallest label */
        else if (b < a) parent[a] = b;
    }
    for (size_t i = 0; i < m; i++) compmin[i] = uf_find(parent, (uint32_t)i); /* root index */
    /* parent[] is no longer needed as a forest: it collects the non-smallest labels
     * (ascending, since ends[] is sorted); n_nonmin <= i at every write. */
    size_t n_nonmin = 0;
    for (size_t i = 0; i < m; i++) {
        const uint32_t root = compmin[i];
        if (root != i) parent[n_nonmin++] = ends[i];
        compmin[i] = ends[root];
    }
    r->nodes = ends;
    r->compmin = compmin;
    r->n_nodes = m;
    r->nonmin = parent;
    r->n_nonmin = n_nonmin;
    return CELLSAM_OK;
}

/* ---------------------------------------------------------------- the engine */

enum { SINK_MEM = 0, SINK_FILE = 1 };

typedef struct {
    tl_mem mem;
    int H, W;
    cs_region_read_fn read;
    void *read_user;
    cs_tile_segment_fn segment;
    void *segment_user;
    cs_tile_params p;

    int nty, ntx;
    int *cy, *cx, *sy, *sx; /* chunk sizes and starts */
    int max_cy, max_cx;
    float mn[3], mx[3];

    float *tile, *scratch;
    uint32_t *lab;
    tl_run *ry, *rx;
    uint32_t *bot_prev, *bot_cur, *right;
    size_t *bot_off;
    uint64_t *face_keys;
    uint32_t *face_a, *face_b;

    uint32_t *edges;
    size_t n_edges, cap_edges;
    uint64_t total;
    int n_failed;
    tl_relabel map;
    uint32_t max_label;

    int sink;
    uint32_t *out;          /* SINK_MEM */
    FILE *tmp;              /* SINK_FILE */
    uint32_t *rowbuf;
    cs_rows_write_fn write_rows;
    void *write_user;
} tl_engine;

static void engine_free(tl_engine *e) {
    void *bufs[] = {e->cy, e->cx, e->sy, e->sx, e->tile, e->scratch, e->lab, e->ry, e->rx,
                    e->bot_prev, e->bot_cur, e->right, e->bot_off, e->face_keys, e->face_a,
                    e->face_b, e->edges, e->map.nodes, e->map.compmin, e->map.nonmin, e->rowbuf};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) tl_free(&e->mem, bufs[i]);
    if (e->tmp) fclose(e->tmp);
    e->tmp = NULL;
}

static int add_edge(tl_engine *e, uint32_t a, uint32_t b) {
    if (e->n_edges == e->cap_edges) {
        const size_t cap = e->cap_edges ? 2 * e->cap_edges : 256;
        uint32_t *ne = tl_realloc(&e->mem, e->edges, cap, 2 * sizeof(uint32_t));
        if (!ne) return CELLSAM_ERR_NOMEM;
        e->edges = ne;
        e->cap_edges = cap;
    }
    e->edges[2 * e->n_edges] = a;
    e->edges[2 * e->n_edges + 1] = b;
    e->n_edges++;
    return CELLSAM_OK;
}

/* One face: half A (seen by the earlier tile) and half B (the later tile) cover the
 * same image region, rows x cols. Official _across_block_label_iou: confusion matrix
 * over the labels of the face, IoU = inter / (area_a + area_b - inter), an edge for
 * IoU >= threshold with both labels non-zero; pairs that do not intersect have IoU 0. */
static int link_face(tl_engine *e, const uint32_t *a, size_t a_stride, const uint32_t *b, size_t b_stride,
                     int rows, int cols) {
    const size_t n = (size_t)rows * cols;
    if (n == 0) return CELLSAM_OK;
    const double thr = e->p.link_iou;
    if (isnan(thr)) return CELLSAM_OK;
    /* Only non-zero labels can form edges: background pixels are dropped, which
     * keeps the sorts small on sparse faces. */
    uint32_t *va = e->face_a, *vb = e->face_b;
    uint64_t *keys = e->face_keys;
    size_t na = 0, nb = 0, nk = 0;
    for (int y = 0; y < rows; y++)
        for (int x = 0; x < cols; x++) {
            const uint32_t la = a[(size_t)y * a_stride + x], lb = b[(size_t)y * b_stride + x];
            if (la) va[na++] = la;
            if (lb) vb[nb++] = lb;
            if (la && lb) keys[nk++] = ((uint64_t)la << 32) | lb;
        }
    qsort(va, na, sizeof *va, cmp_u32);
    qsort(vb, nb, sizeof *vb, cmp_u32);
    if (thr <= 0) {
        /* Every pair of face labels passes (IoU 0 >= threshold): they all join. */
        uint32_t prev = 0;
        size_t i = 0, j = 0;
        while (i < na || j < nb) {
            uint32_t v;
            if (j >= nb || (i < na && va[i] <= vb[j])) v = va[i++];
            else v = vb[j++];
            if (v == 0 || v == prev) continue;
            if (prev != 0) {
                int rc = add_edge(e, prev, v);
                if (rc) return rc;
            }
            prev = v;
        }
        return CELLSAM_OK;
    }
    qsort(keys, nk, sizeof *keys, cmp_u64);
    for (size_t i = 0; i < nk;) {
        size_t j = i + 1;
        while (j < nk && keys[j] == keys[i]) j++;
        const uint32_t la = (uint32_t)(keys[i] >> 32), lb = (uint32_t)keys[i];
        const size_t inter = j - i;
        const size_t uni = count_in_sorted(va, na, la) + count_in_sorted(vb, nb, lb) - inter;
        const double iou = (double)inter / (double)uni;
        if (iou >= thr) {
            int rc = add_edge(e, la, lb);
            if (rc) return rc;
        }
        i = j;
    }
    return CELLSAM_OK;
}

static int validate_params(const cs_tile_params *p) {
    if (p->block_size < 1 || p->block_size > (1 << 20))
        return cs_error(CELLSAM_ERR_INVALID, "tiling: block size %d out of range (1..%d)", p->block_size, 1 << 20);
    if (p->overlap < 0 || p->overlap > (1 << 16))
        return cs_error(CELLSAM_ERR_INVALID, "tiling: overlap %d out of range (0..%d)", p->overlap, 1 << 16);
    if (p->iou_depth < 0 || p->iou_depth > p->overlap)
        return cs_error(CELLSAM_ERR_INVALID, "tiling: iou_depth %d must be within 0..overlap (%d)", p->iou_depth,
                        p->overlap);
    if (p->halo_mode != CS_HALO_PERIODIC && p->halo_mode != CS_HALO_MIRROR)
        return cs_error(CELLSAM_ERR_INVALID, "tiling: unknown halo mode %d", p->halo_mode);
    return CELLSAM_OK;
}

static int engine_setup(tl_engine *e) {
    const int d = e->p.overlap, di = e->p.iou_depth;
    int rc = validate_params(&e->p);
    if (rc) return rc;
    rc = check_dims(e->H, e->W);
    if (rc) return rc;
    e->nty = cs_chunks(e->H, e->p.block_size, d, NULL, 0);
    e->ntx = cs_chunks(e->W, e->p.block_size, d, NULL, 0);
    if (e->nty < 1 || e->ntx < 1) return cs_error(CELLSAM_ERR_INVALID, "tiling: bad chunking");
    if ((long long)e->nty * e->ntx > INT_MAX)
        return cs_error(CELLSAM_ERR_LIMIT, "tiling: %d x %d tiles is too many", e->ntx, e->nty);
    e->cy = tl_alloc(&e->mem, (size_t)e->nty, sizeof(int), 0);
    e->sy = tl_alloc(&e->mem, (size_t)e->nty, sizeof(int), 0);
    e->cx = tl_alloc(&e->mem, (size_t)e->ntx, sizeof(int), 0);
    e->sx = tl_alloc(&e->mem, (size_t)e->ntx, sizeof(int), 0);
    e->bot_off = tl_alloc(&e->mem, (size_t)e->ntx, sizeof(size_t), 0);
    if (!e->cy || !e->sy || !e->cx || !e->sx || !e->bot_off) return CELLSAM_ERR_NOMEM;
    cs_chunks(e->H, e->p.block_size, d, e->cy, e->nty);
    cs_chunks(e->W, e->p.block_size, d, e->cx, e->ntx);
    e->max_cy = e->max_cx = 0;
    for (int i = 0, s = 0; i < e->nty; s += e->cy[i], i++) {
        e->sy[i] = s;
        if (e->cy[i] > e->max_cy) e->max_cy = e->cy[i];
    }
    size_t bot_width = 0;
    for (int j = 0, s = 0; j < e->ntx; s += e->cx[j], j++) {
        e->sx[j] = s;
        if (e->cx[j] > e->max_cx) e->max_cx = e->cx[j];
        e->bot_off[j] = bot_width * 2 * (size_t)di;
        bot_width += (size_t)e->cx[j] + 2 * (size_t)di;
    }
    const size_t th = (size_t)e->max_cy + 2 * (size_t)d, tw = (size_t)e->max_cx + 2 * (size_t)d;
    size_t tpx;
    if (cs_mul_size(th, tw, &tpx) || tpx > TL_MAX_TILE_PIXELS)
        return cs_error(CELLSAM_ERR_LIMIT, "tiling: tiles of %zu x %zu pixels are too large", tw, th);
    e->tile = tl_alloc(&e->mem, tpx, 3 * sizeof(float), 0);
    e->scratch = tl_alloc(&e->mem, tpx, 3 * sizeof(float), 0);
    e->lab = tl_alloc(&e->mem, tpx, sizeof(uint32_t), 0);
    e->ry = tl_alloc(&e->mem, th, sizeof(tl_run), 0);
    e->rx = tl_alloc(&e->mem, tw, sizeof(tl_run), 0);
    if (!e->tile || !e->scratch || !e->lab || !e->ry || !e->rx) return CELLSAM_ERR_NOMEM;
    const int multi = e->nty * e->ntx > 1;
    if (multi && di > 0) {
        const size_t strip = bot_width * 2 * (size_t)di;
        const size_t rpx = ((size_t)e->max_cy + 2 * (size_t)di) * 2 * (size_t)di;
        size_t face = 2 * (size_t)di * ((size_t)e->max_cx + 2 * (size_t)di);
        if (rpx > face) face = rpx;
        e->bot_prev = tl_alloc(&e->mem, strip, sizeof(uint32_t), 0);
        e->bot_cur = tl_alloc(&e->mem, strip, sizeof(uint32_t), 0);
        e->right = tl_alloc(&e->mem, rpx, sizeof(uint32_t), 0);
        e->face_keys = tl_alloc(&e->mem, face, sizeof(uint64_t), 0);
        e->face_a = tl_alloc(&e->mem, face, sizeof(uint32_t), 0);
        e->face_b = tl_alloc(&e->mem, face, sizeof(uint32_t), 0);
        if (!e->bot_prev || !e->bot_cur || !e->right || !e->face_keys || !e->face_a || !e->face_b)
            return CELLSAM_ERR_NOMEM;
    }
    if (e->sink == SINK_FILE) {
        e->rowbuf = tl_alloc(&e->mem, (size_t)e->max_cy * e->W, sizeof(uint32_t), 0);
        if (!e->rowbuf) return CELLSAM_ERR_NOMEM;
    }
    return CELLSAM_OK;
}

static void copy_block(uint32_t *dst, size_t dst_stride, const uint32_t *src, size_t src_stride, int rows,
                       int cols) {
    for (int y = 0; y < rows; y++)
        memcpy(dst + (size_t)y * dst_stride, src + (size_t)y * src_stride, (size_t)cols * sizeof(uint32_t));
}

static int process_tile(tl_engine *e, int i, int j) {
    const int d = e->p.overlap, di = e->p.iou_depth;
    const int ci = e->cy[i], cj = e->cx[j];
    const int th = ci + 2 * d, tw = cj + 2 * d;
    const size_t tpx = (size_t)th * tw;
    int rc = read_region_into(e->read, e->read_user, e->H, e->W, e->sy[i] - d, e->sx[j] - d, th, tw,
                              e->p.halo_mode, e->ry, e->rx, e->scratch, e->tile);
    if (rc) return rc;
    if (e->p.minmax_normalize) cs_tile_apply_minmax(e->tile, tpx, e->mn, e->mx);

    memset(e->lab, 0, tpx * sizeof(uint32_t));
    int n_reported = 0;
    const int seg_rc = e->segment(e->segment_user, e->tile, th, tw, e->lab, &n_reported);
    if (seg_rc == CELLSAM_ERR_ABORTED) return seg_rc; /* the caller's stop, not a failed tile */
    const int failed = seg_rc != 0;
    if (failed) { /* official: any exception -> all-zero tile */
        memset(e->lab, 0, tpx * sizeof(uint32_t));
        e->n_failed++;
    }
    uint32_t n = 0; /* official: n = mask.max() */
    for (size_t k = 0; k < tpx; k++)
        if (e->lab[k] > n) n = e->lab[k];
    /* total = n (first tile) or total + n; labels += total; total += n */
    const uint64_t offset = e->total + n;
    if (offset + n > TL_MAX_LABEL)
        return cs_error(CELLSAM_ERR_LIMIT, "tiling: label total exceeds the int32 range of the official labels");
    if (n > 0)
        for (size_t k = 0; k < tpx; k++)
            if (e->lab[k]) e->lab[k] += (uint32_t)offset;
    e->total = offset + n;
    if (e->p.on_tile) e->p.on_tile(e->p.on_tile_user, i * e->ntx + j, (uint32_t)offset, n, failed);

    if (e->nty * e->ntx > 1 && di > 0) {
        /* In tile-local coordinates the trimmed tile starts at d - di. */
        const int o = d - di;
        const uint32_t *b_origin = e->lab + (size_t)o * tw + o;
        if (j > 0) {
            rc = link_face(e, e->right, 2 * (size_t)di, b_origin, (size_t)tw, ci + 2 * di, 2 * di);
            if (rc) return rc;
        }
        if (i > 0) {
            const size_t bw = (size_t)cj + 2 * di;
            rc = link_face(e, e->bot_prev + e->bot_off[j], bw, b_origin, (size_t)tw, 2 * di, cj + 2 * di);
            if (rc) return rc;
        }
        if (j < e->ntx - 1) /* rows [d-di, d+ci+di), cols [d+cj-di, d+cj+di) */
            copy_block(e->right, 2 * (size_t)di, e->lab + (size_t)o * tw + (d + cj - di), (size_t)tw,
                       ci + 2 * di, 2 * di);
        if (i < e->nty - 1) /* rows [d+ci-di, d+ci+di), cols [d-di, d+cj+di) */
            copy_block(e->bot_cur + e->bot_off[j], (size_t)cj + 2 * di, e->lab + (size_t)(d + ci - di) * tw + o,
                       (size_t)tw, 2 * di, cj + 2 * di);
    }

    const uint32_t *core = e->lab + (size_t)d * tw + d;
    if (e->sink == SINK_MEM)
        copy_block(e->out + (size_t)e->sy[i] * e->W + e->sx[j], (size_t)e->W, core, (size_t)tw, ci, cj);
    else
        copy_block(e->rowbuf + e->sx[j], (size_t)e->W, core, (size_t)tw, ci, cj);
    return CELLSAM_OK;
}

static FILE *open_temp(void) {
    const char *dir = getenv("TMPDIR");
    if (!dir || !*dir) dir = "/tmp";
    char path[4096];
    int len = snprintf(path, sizeof path, "%s/cellsam-tiles-XXXXXX", dir);
    if (len < 0 || (size_t)len >= sizeof path) {
        cs_error(CELLSAM_ERR_IO, "tiling: temporary directory path is too long");
        return NULL;
    }
    int fd = mkstemp(path);
    if (fd < 0) {
        cs_error(CELLSAM_ERR_IO, "tiling: cannot create a temporary file in %s", dir);
        return NULL;
    }
    unlink(path); /* nothing is left behind, whatever happens */
    FILE *f = fdopen(fd, "w+b");
    if (!f) {
        close(fd);
        cs_error(CELLSAM_ERR_IO, "tiling: cannot open the temporary file");
    }
    return f;
}

static void relabel_rows(tl_engine *e, uint32_t *px, size_t n) {
    for (size_t k = 0; k < n; k++) {
        if (!px[k]) continue;
        const uint32_t v = relabel_value(&e->map, px[k]);
        px[k] = v;
        if (v > e->max_label) e->max_label = v;
    }
}

static int engine_run(tl_engine *e) {
    int rc = engine_setup(e);
    if (rc) return rc;
    if (e->p.minmax_normalize) {
        rc = channel_minmax(&e->mem, e->read, e->read_user, e->H, e->W, e->mn, e->mx);
        if (rc) return rc;
    }
    if (e->sink == SINK_FILE) {
        e->tmp = open_temp();
        if (!e->tmp) return CELLSAM_ERR_IO;
    }
    const int n_tiles = e->nty * e->ntx;
    int done = 0;
    for (int i = 0; i < e->nty; i++) {
        for (int j = 0; j < e->ntx; j++) {
            rc = cs_poll_abort(e->p.abort, e->p.progress_user);
            if (!rc) rc = process_tile(e, i, j);
            if (rc) return rc;
            done++;
            if (e->p.progress) e->p.progress(done, n_tiles, e->p.progress_user);
        }
        if (e->sink == SINK_FILE) {
            const size_t n = (size_t)e->cy[i] * e->W;
            if (fwrite(e->rowbuf, sizeof(uint32_t), n, e->tmp) != n)
                return cs_error(CELLSAM_ERR_IO, "tiling: writing the temporary label file failed");
        }
        uint32_t *t = e->bot_prev;
        e->bot_prev = e->bot_cur;
        e->bot_cur = t;
    }
    /* The linking buffers are no longer needed; free them before the graph work. */
    void **done_bufs[] = {(void **)&e->tile, (void **)&e->scratch, (void **)&e->lab, (void **)&e->bot_prev,
                          (void **)&e->bot_cur, (void **)&e->right, (void **)&e->face_keys,
                          (void **)&e->face_a, (void **)&e->face_b};
    for (size_t k = 0; k < sizeof done_bufs / sizeof done_bufs[0]; k++) {
        tl_free(&e->mem, *done_bufs[k]);
        *done_bufs[k] = NULL;
    }
    rc = build_relabel(&e->mem, e->edges, e->n_edges, &e->map);
    if (rc) return rc;
    tl_free(&e->mem, e->edges);
    e->edges = NULL;
    e->max_label = 0;
    if (e->sink == SINK_MEM) {
        relabel_rows(e, e->out, (size_t)e->H * e->W);
        return CELLSAM_OK;
    }
    if (fflush(e->tmp) != 0 || fseek(e->tmp, 0, SEEK_SET) != 0)
        return cs_error(CELLSAM_ERR_IO, "tiling: the temporary label file failed");
    for (int y0 = 0; y0 < e->H; y0 += e->max_cy) {
        const int nr = e->H - y0 < e->max_cy ? e->H - y0 : e->max_cy;
        const size_t n = (size_t)nr * e->W;
        if (fread(e->rowbuf, sizeof(uint32_t), n, e->tmp) != n)
            return cs_error(CELLSAM_ERR_IO, "tiling: reading the temporary label file failed");
        relabel_rows(e, e->rowbuf, n);
        rc = e->write_rows(e->write_user, y0, nr, e->rowbuf);
        if (rc) return callback_error(rc, "tiling: writing label rows");
    }
    return CELLSAM_OK;
}

static void fill_stats(const tl_engine *e, cs_tile_stats *st) {
    if (!st) return;
    memset(st, 0, sizeof *st);
    st->tiles_y = e->nty > 0 ? e->nty : 0;
    st->tiles_x = e->ntx > 0 ? e->ntx : 0;
    st->n_tiles = st->tiles_y * st->tiles_x;
    st->n_failed = e->n_failed;
    st->max_label = e->max_label;
    st->total = (uint32_t)e->total;
    st->n_edges = e->n_edges;
    st->peak_bytes = e->mem.peak;
    for (int c = 0; c < 3; c++) {
        st->ch_min[c] = e->p.minmax_normalize ? e->mn[c] : 0;
        st->ch_max[c] = e->p.minmax_normalize ? e->mx[c] : 0;
    }
}

static int engine_init(tl_engine *e, int H, int W, cs_region_read_fn read, void *read_user,
                       cs_tile_segment_fn segment, void *segment_user, const cs_tile_params *params) {
    memset(e, 0, sizeof *e);
    if (!read || !segment) return cs_error(CELLSAM_ERR_INVALID, "tiling: read and segment callbacks are required");
    e->H = H;
    e->W = W;
    e->read = read;
    e->read_user = read_user;
    e->segment = segment;
    e->segment_user = segment_user;
    e->p = params ? *params : cs_tile_default_params();
    return CELLSAM_OK;
}

/* In-memory run; the engine (and its relabel map) stays alive for the caller. */
static int run_mem(tl_engine *e, uint32_t **labels_out) {
    int rc = check_dims(e->H, e->W);
    if (rc) return rc;
    size_t npix;
    if (cs_mul_size((size_t)e->H, (size_t)e->W, &npix) || npix > ((size_t)1 << 34))
        return cs_error(CELLSAM_ERR_LIMIT, "tiling: image of %d x %d pixels is too large", e->W, e->H);
    e->out = calloc(npix, sizeof(uint32_t));
    if (!e->out) return cs_error(CELLSAM_ERR_NOMEM, "tiling: out of memory for the %d x %d label image", e->W, e->H);
    e->sink = SINK_MEM;
    rc = engine_run(e);
    if (rc) {
        free(e->out);
        e->out = NULL;
        return rc;
    }
    *labels_out = e->out;
    return CELLSAM_OK;
}

int cs_tiled_segment_mem_ex(int height, int width, cs_region_read_fn read, void *read_user,
                            cs_tile_segment_fn segment, void *segment_user, const cs_tile_params *params,
                            uint32_t **labels_out, uint32_t **raw_to_final, cs_tile_stats *stats) {
    if (!labels_out) return cs_error(CELLSAM_ERR_INVALID, "tiling: null output");
    *labels_out = NULL;
    if (raw_to_final) *raw_to_final = NULL;
    tl_engine e;
    int rc = engine_init(&e, height, width, read, read_user, segment, segment_user, params);
    if (!rc) rc = run_mem(&e, labels_out);
    if (!rc && raw_to_final) {
        uint32_t *table = malloc(((size_t)e.total + 1) * sizeof(uint32_t));
        if (!table) {
            rc = cs_error(CELLSAM_ERR_NOMEM, "tiling: out of memory for the label table");
            free(*labels_out);
            *labels_out = NULL;
        } else {
            for (uint64_t r = 0; r <= e.total; r++) table[r] = relabel_value(&e.map, (uint32_t)r);
            *raw_to_final = table;
        }
    }
    fill_stats(&e, stats);
    engine_free(&e);
    return rc;
}

int cs_tiled_segment_mem(int height, int width, cs_region_read_fn read, void *read_user,
                         cs_tile_segment_fn segment, void *segment_user, const cs_tile_params *params,
                         uint32_t **labels_out, cs_tile_stats *stats) {
    return cs_tiled_segment_mem_ex(height, width, read, read_user, segment, segment_user, params, labels_out, NULL,
                                   stats);
}

int cs_tiled_segment_stream(int height, int width, cs_region_read_fn read, void *read_user,
                            cs_tile_segment_fn segment, void *segment_user, cs_rows_write_fn write_rows,
                            void *write_user, const cs_tile_params *params, cs_tile_stats *stats) {
    if (!write_rows) return cs_error(CELLSAM_ERR_INVALID, "tiling: write_rows callback is required");
    tl_engine e;
    int rc = engine_init(&e, height, width, read, read_user, segment, segment_user, params);
    if (!rc) {
        e.sink = SINK_FILE;
        e.write_rows = write_rows;
        e.write_user = write_user;
        rc = engine_run(&e);
    }
    fill_stats(&e, stats);
    engine_free(&e);
    return rc;
}
