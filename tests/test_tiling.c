/* Tiled whole-slide inference (official segment_wsi): chunking, halo extraction,
 * offsets, IoU linking and connected-components numbering, checked by hand on small
 * scenes and against an independent re-implementation of the official non-streaming
 * algorithm (full mosaic, link, trim) on many random images and settings; error
 * paths and memory boundedness of the streaming entry point. No model: mock
 * segmenters label thresholded connected components. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "testutil.h"
#include "tiling.h"

/* ------------------------------------------------------------------ helpers */

typedef struct {
    int H, W;
    float *px; /* H x W x 3 */
    int reads, fail_read_at, fail_code;
} timg;

static timg timg_new(int H, int W) {
    timg t;
    memset(&t, 0, sizeof t);
    t.H = H;
    t.W = W;
    t.px = calloc((size_t)H * W * 3, sizeof(float));
    assert_non_null(t.px);
    t.fail_read_at = -1;
    return t;
}

static int timg_read(void *user, int x0, int y0, int w, int h, float *out) {
    timg *t = user;
    if (t->fail_read_at >= 0 && t->reads == t->fail_read_at) {
        t->reads++;
        return t->fail_code;
    }
    t->reads++;
    if (x0 < 0 || y0 < 0 || w < 1 || h < 1 || x0 + w > t->W || y0 + h > t->H)
        fail_msg("read out of bounds: x0=%d y0=%d w=%d h=%d (image %dx%d)", x0, y0, w, h, t->W, t->H);
    for (int y = 0; y < h; y++)
        memcpy(out + (size_t)y * w * 3, t->px + ((size_t)(y0 + y) * t->W + x0) * 3, (size_t)w * 3 * sizeof(float));
    return 0;
}

static uint64_t g_rng = 88172645463325252ULL;
static uint32_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}
static int rnd_int(int lo, int hi) { return lo + (int)(rnd() % (uint32_t)(hi - lo + 1)); }
static float rnd_unit(void) { return (float)(rnd() % 1000000) / 1000000.0f; }

/* Mock segmenter: channel 2 above a threshold -> 4-connected components numbered
 * in raster order of their first pixel. adaptive: the threshold depends on the tile
 * (like the model's per-tile normalisation), so one object can get different masks
 * in two tiles. mult > 1 leaves gaps in the label values. */
typedef struct {
    int adaptive;
    uint32_t mult;
    int fail_call; /* -1: never */
    int calls;
    float *captured; /* copy of the first tile, if capture */
    int capture, cap_th, cap_tw;
} mock_seg;

static int mock_segment(void *user, const float *tile, int th, int tw, uint32_t *labels, int *n_labels) {
    mock_seg *m = user;
    const int call = m->calls++;
    if (m->capture && call == 0) {
        m->captured = malloc((size_t)th * tw * 3 * sizeof(float));
        assert_non_null(m->captured);
        memcpy(m->captured, tile, (size_t)th * tw * 3 * sizeof(float));
        m->cap_th = th;
        m->cap_tw = tw;
    }
    if (call == m->fail_call) return CELLSAM_ERR_MODEL;
    float thr = 0.5f;
    if (m->adaptive) {
        double s = 0;
        for (size_t i = 0; i < (size_t)th * tw; i++) s += tile[i * 3 + 2];
        thr = (float)(0.35 + 0.6 * s / ((double)th * tw));
    }
    const size_t n = (size_t)th * tw;
    int *stack = malloc(n * sizeof(int));
    assert_non_null(stack);
    for (size_t i = 0; i < n; i++) labels[i] = 0;
    uint32_t next = 0;
    for (int y = 0; y < th; y++)
        for (int x = 0; x < tw; x++) {
            const size_t k = (size_t)y * tw + x;
            if (labels[k] || !(tile[k * 3 + 2] > thr)) continue;
            next++;
            const uint32_t value = next * (m->mult ? m->mult : 1);
            size_t top = 0;
            stack[top++] = (int)k;
            labels[k] = value;
            while (top) {
                const int q = stack[--top];
                const int qy = q / tw, qx = q % tw;
                const int ny[4] = {qy - 1, qy + 1, qy, qy}, nx[4] = {qx, qx, qx - 1, qx + 1};
                for (int t = 0; t < 4; t++) {
                    if (ny[t] < 0 || ny[t] >= th || nx[t] < 0 || nx[t] >= tw) continue;
                    const size_t r = (size_t)ny[t] * tw + nx[t];
                    if (labels[r] || !(tile[r * 3 + 2] > thr)) continue;
                    labels[r] = value;
                    stack[top++] = (int)r;
                }
            }
        }
    free(stack);
    *n_labels = (int)next;
    return 0;
}

static mock_seg mock_new(int adaptive, uint32_t mult) {
    mock_seg m;
    memset(&m, 0, sizeof m);
    m.adaptive = adaptive;
    m.mult = mult;
    m.fail_call = -1;
    return m;
}

/* Streaming sink: assembles the rows and checks they arrive in order. */
typedef struct {
    int H, W, next_row, fail;
    uint32_t *img;
} rows_sink;

static int sink_write(void *user, int y0, int n_rows, const uint32_t *rows) {
    rows_sink *s = user;
    if (s->fail) return -5;
    if (y0 != s->next_row || n_rows < 1 || y0 + n_rows > s->H)
        fail_msg("rows out of order: y0=%d n=%d expected y0=%d", y0, n_rows, s->next_row);
    memcpy(s->img + (size_t)y0 * s->W, rows, (size_t)n_rows * s->W * sizeof(uint32_t));
    s->next_row += n_rows;
    return 0;
}

/* --------------------------------------- reference: the official algorithm */

/* Source index with the dask boundary: periodic (numpy wrap) or reflect (symmetric). */
static int ref_src(int i, int n, int mirror) {
    if (!mirror) {
        int m = i % n;
        return m < 0 ? m + n : m;
    }
    while (i < 0 || i >= n) i = i < 0 ? -1 - i : 2 * n - 1 - i;
    return i;
}

#define REF_MAX_CHUNKS 512

/* segment_wsi as written: pad with the boundary, cut the overlapping tiles, label
 * each, offset, assemble the (sum of haloed tiles) mosaic; if more than one tile:
 * trim by d - di, build faces from the trimmed mosaic's chunks, dense confusion
 * matrices, edges, scipy-style connected components over 0..T, relabel, trim by di.
 * Single tile: the core (the official trims by di, equal to d by default). */
static uint32_t *ref_wsi(const timg *im, const cs_tile_params *p, mock_seg *seg, uint64_t *total_out,
                         int *n_failed) {
    const int H = im->H, W = im->W, d = p->overlap, di = p->iou_depth;
    const int mirror = p->halo_mode == CS_HALO_MIRROR;
    int cy[REF_MAX_CHUNKS], cx[REF_MAX_CHUNKS];
    const int ny = cs_chunks(H, p->block_size, d, cy, REF_MAX_CHUNKS);
    const int nx = cs_chunks(W, p->block_size, d, cx, REF_MAX_CHUNKS);
    assert_true(ny >= 1 && ny <= REF_MAX_CHUNKS && nx >= 1 && nx <= REF_MAX_CHUNKS);
    const int PH = H + 2 * d, PW = W + 2 * d;
    float *P = malloc((size_t)PH * PW * 3 * sizeof(float));
    assert_non_null(P);
    for (int y = 0; y < PH; y++)
        for (int x = 0; x < PW; x++)
            memcpy(P + ((size_t)y * PW + x) * 3,
                   im->px + ((size_t)ref_src(y - d, H, mirror) * W + ref_src(x - d, W, mirror)) * 3,
                   3 * sizeof(float));
    int sy[REF_MAX_CHUNKS + 1], sx[REF_MAX_CHUNKS + 1], my[REF_MAX_CHUNKS + 1], mx[REF_MAX_CHUNKS + 1];
    sy[0] = sx[0] = my[0] = mx[0] = 0;
    for (int i = 0; i < ny; i++) {
        sy[i + 1] = sy[i] + cy[i];
        my[i + 1] = my[i] + cy[i] + 2 * d;
    }
    for (int j = 0; j < nx; j++) {
        sx[j + 1] = sx[j] + cx[j];
        mx[j + 1] = mx[j] + cx[j] + 2 * d;
    }
    const int MH = my[ny], MW = mx[nx];
    uint32_t *M = calloc((size_t)MH * MW, sizeof(uint32_t));
    assert_non_null(M);
    int64_t total = -1;
    *n_failed = 0;
    for (int i = 0; i < ny; i++)
        for (int j = 0; j < nx; j++) {
            const int th = cy[i] + 2 * d, tw = cx[j] + 2 * d;
            float *tile = malloc((size_t)th * tw * 3 * sizeof(float));
            uint32_t *lab = calloc((size_t)th * tw, sizeof(uint32_t));
            assert_true(tile && lab);
            for (int y = 0; y < th; y++)
                memcpy(tile + (size_t)y * tw * 3, P + ((size_t)(sy[i] + y) * PW + sx[j]) * 3,
                       (size_t)tw * 3 * sizeof(float));
            int nl = 0;
            if (mock_segment(seg, tile, th, tw, lab, &nl) != 0) {
                memset(lab, 0, (size_t)th * tw * sizeof(uint32_t));
                (*n_failed)++;
            }
            uint32_t n = 0;
            for (int k = 0; k < th * tw; k++) n = lab[k] > n ? lab[k] : n;
            total = total < 0 ? (int64_t)n : total + n;
            for (int k = 0; k < th * tw; k++)
                if (lab[k] > 0) lab[k] += (uint32_t)total;
            total += n;
            for (int y = 0; y < th; y++)
                memcpy(M + (size_t)(my[i] + y) * MW + mx[j], lab + (size_t)y * tw, (size_t)tw * sizeof(uint32_t));
            free(tile);
            free(lab);
        }
    free(P);
    *total_out = (uint64_t)total;
    uint32_t *out = calloc((size_t)H * W, sizeof(uint32_t));
    assert_non_null(out);
    if (ny * nx == 1) {
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) out[(size_t)y * W + x] = M[(size_t)(d + y) * MW + d + x];
        free(M);
        return out;
    }
    /* trim_internal(d - di) */
    const int t = d - di;
    int m2y[REF_MAX_CHUNKS + 1], m2x[REF_MAX_CHUNKS + 1];
    m2y[0] = m2x[0] = 0;
    for (int i = 0; i < ny; i++) m2y[i + 1] = m2y[i] + cy[i] + 2 * di;
    for (int j = 0; j < nx; j++) m2x[j + 1] = m2x[j] + cx[j] + 2 * di;
    const int M2H = m2y[ny], M2W = m2x[nx];
    uint32_t *M2 = calloc((size_t)M2H * M2W, sizeof(uint32_t));
    assert_non_null(M2);
    for (int i = 0; i < ny; i++)
        for (int j = 0; j < nx; j++)
            for (int y = 0; y < cy[i] + 2 * di; y++)
                for (int x = 0; x < cx[j] + 2 * di; x++)
                    M2[(size_t)(m2y[i] + y) * M2W + m2x[j] + x] = M[(size_t)(my[i] + t + y) * MW + mx[j] + t + x];
    free(M);
    /* label graph over nodes 0..T as a dense adjacency matrix */
    const size_t T = (size_t)total;
    assert_true(T < 6000);
    unsigned char *adj = calloc((T + 1) * (T + 1), 1);
    assert_non_null(adj);
    for (int ax = 0; ax < 2; ax++)
        for (int i = 0; i < ny; i++)
            for (int j = 0; j < nx; j++) {
                if ((ax == 0 && i == ny - 1) || (ax == 1 && j == nx - 1)) continue;
                int r0, c0, rows, cols; /* face in M2 */
                if (ax == 0) {
                    r0 = m2y[i + 1] - 2 * di;
                    rows = 4 * di;
                    c0 = m2x[j];
                    cols = cx[j] + 2 * di;
                } else {
                    r0 = m2y[i];
                    rows = cy[i] + 2 * di;
                    c0 = m2x[j + 1] - 2 * di;
                    cols = 4 * di;
                }
                const int n = rows * cols;
                if (n == 0) continue;
                uint32_t *u = malloc((size_t)n * sizeof(uint32_t));
                assert_non_null(u);
                for (int y = 0; y < rows; y++)
                    for (int x = 0; x < cols; x++) u[y * cols + x] = M2[(size_t)(r0 + y) * M2W + c0 + x];
                /* np.unique: insertion sort is fine at these sizes */
                int K = 0;
                uint32_t *uniq = malloc((size_t)n * sizeof(uint32_t));
                assert_non_null(uniq);
                for (int k = 0; k < n; k++) {
                    int pos = 0;
                    while (pos < K && uniq[pos] < u[k]) pos++;
                    if (pos < K && uniq[pos] == u[k]) continue;
                    memmove(uniq + pos + 1, uniq + pos, (size_t)(K - pos) * sizeof(uint32_t));
                    uniq[pos] = u[k];
                    K++;
                }
                long *conf = calloc((size_t)K * K, sizeof(long));
                assert_non_null(conf);
                const int hr = ax == 0 ? rows / 2 : rows, hc = ax == 0 ? cols : cols / 2;
                for (int y = 0; y < hr; y++)
                    for (int x = 0; x < hc; x++) {
                        const uint32_t a = u[y * cols + x];
                        const uint32_t b = ax == 0 ? u[(y + hr) * cols + x] : u[y * cols + x + hc];
                        int ia = 0, ib = 0;
                        while (uniq[ia] != a) ia++;
                        while (uniq[ib] != b) ib++;
                        conf[ia * K + ib]++;
                    }
                for (int a = 0; a < K; a++)
                    for (int b = 0; b < K; b++) {
                        long area0 = 0, area1 = 0;
                        for (int k = 0; k < K; k++) {
                            area0 += conf[a * K + k];
                            area1 += conf[k * K + b];
                        }
                        const long inter = conf[a * K + b];
                        const double iou = inter > 0 ? (double)inter / (double)(area0 + area1 - inter) : 0.0;
                        if (iou >= p->link_iou && uniq[a] != 0 && uniq[b] != 0) {
                            adj[uniq[a] * (T + 1) + uniq[b]] = 1;
                            adj[uniq[b] * (T + 1) + uniq[a]] = 1;
                        }
                    }
                free(conf);
                free(uniq);
                free(u);
            }
    /* scipy connected_components: scan nodes in order, flood the unlabelled ones */
    int64_t *comp = malloc((T + 1) * sizeof(int64_t));
    size_t *queue = malloc((T + 1) * sizeof(size_t));
    assert_true(comp && queue);
    for (size_t v = 0; v <= T; v++) comp[v] = -1;
    int64_t next = 0;
    for (size_t v = 0; v <= T; v++) {
        if (comp[v] >= 0) continue;
        size_t qh = 0, qt = 0;
        queue[qt++] = v;
        comp[v] = next;
        while (qh < qt) {
            const size_t a = queue[qh++];
            for (size_t b = 0; b <= T; b++)
                if (adj[a * (T + 1) + b] && comp[b] < 0) {
                    comp[b] = next;
                    queue[qt++] = b;
                }
        }
        next++;
    }
    for (size_t k = 0; k < (size_t)M2H * M2W; k++) M2[k] = (uint32_t)comp[M2[k]];
    for (int i = 0; i < ny; i++)
        for (int j = 0; j < nx; j++)
            for (int y = 0; y < cy[i]; y++)
                for (int x = 0; x < cx[j]; x++)
                    out[(size_t)(sy[i] + y) * W + sx[j] + x] = M2[(size_t)(m2y[i] + di + y) * M2W + m2x[j] + di + x];
    free(comp);
    free(queue);
    free(adj);
    free(M2);
    return out;
}

/* Runs the in-memory and the streaming entry points and the reference; all three
 * must agree exactly. Returns the in-memory result (caller frees). */
static uint32_t *run_all(timg *im, const cs_tile_params *p, const mock_seg *proto, cs_tile_stats *st_out) {
    mock_seg s1 = *proto, s2 = *proto, s3 = *proto;
    uint32_t *mem = NULL;
    cs_tile_stats st;
    int rc = cs_tiled_segment_mem(im->H, im->W, timg_read, im, mock_segment, &s1, p, &mem, &st);
    if (rc) fail_msg("cs_tiled_segment_mem: %s", cellsam_last_error());
    rows_sink sink = {im->H, im->W, 0, 0, calloc((size_t)im->H * im->W, sizeof(uint32_t))};
    assert_non_null(sink.img);
    cs_tile_stats st2;
    rc = cs_tiled_segment_stream(im->H, im->W, timg_read, im, mock_segment, &s2, sink_write, &sink, p, &st2);
    if (rc) fail_msg("cs_tiled_segment_stream: %s", cellsam_last_error());
    assert_int_equal(sink.next_row, im->H);
    uint64_t ref_total = 0;
    int ref_failed = 0;
    uint32_t *ref = ref_wsi(im, p, &s3, &ref_total, &ref_failed);
    uint32_t ref_max = 0;
    for (size_t k = 0; k < (size_t)im->H * im->W; k++) {
        if (mem[k] != ref[k] || sink.img[k] != ref[k])
            fail_msg("pixel (%zu,%zu) of %dx%d (B=%d d=%d di=%d thr=%g mode=%d): mem %u stream %u reference %u",
                     k / im->W, k % im->W, im->H, im->W, p->block_size, p->overlap, p->iou_depth, p->link_iou,
                     p->halo_mode, mem[k], sink.img[k], ref[k]);
        if (ref[k] > ref_max) ref_max = ref[k];
    }
    assert_int_equal(st.total, ref_total);
    assert_int_equal(st2.total, ref_total);
    assert_int_equal(st.n_failed, ref_failed);
    assert_int_equal(st2.n_failed, ref_failed);
    assert_int_equal(st.max_label, ref_max);
    assert_int_equal(st2.max_label, ref_max);
    free(ref);
    free(sink.img);
    if (st_out) *st_out = st;
    return mem;
}

/* Soft blobs (peak 0.55..1, radial fall-off) in channel 2, noise elsewhere. */
static void fill_blobs(timg *im, int n_blobs, int max_r) {
    for (size_t k = 0; k < (size_t)im->H * im->W; k++) {
        im->px[k * 3 + 0] = rnd_unit() * 0.1f;
        im->px[k * 3 + 1] = rnd_unit();
        im->px[k * 3 + 2] = 0;
    }
    for (int b = 0; b < n_blobs; b++) {
        const int cy = rnd_int(0, im->H - 1), cx = rnd_int(0, im->W - 1);
        const float ry = (float)rnd_int(1, max_r), rx = (float)rnd_int(1, max_r);
        const float peak = 0.55f + 0.45f * rnd_unit();
        for (int y = cy - (int)ry; y <= cy + (int)ry; y++)
            for (int x = cx - (int)rx; x <= cx + (int)rx; x++) {
                if (y < 0 || y >= im->H || x < 0 || x >= im->W) continue;
                const float q = ((y - cy) * (y - cy)) / (ry * ry) + ((x - cx) * (x - cx)) / (rx * rx);
                if (q > 1) continue;
                const float v = peak * (1.0f - 0.5f * q);
                float *dst = &im->px[((size_t)y * im->W + x) * 3 + 2];
                if (v > *dst) *dst = v;
            }
    }
}

static cs_tile_params params(int B, int d, int di, double thr, int mode) {
    cs_tile_params p = cs_tile_default_params();
    p.block_size = B;
    p.overlap = d;
    p.iou_depth = di;
    p.link_iou = thr;
    p.halo_mode = mode;
    return p;
}

/* ------------------------------------------------------------------- tests */

static void expect_chunks(int n, int block, int depth, const int *want, int n_want) {
    int got[64];
    const int k = cs_chunks(n, block, depth, got, 64);
    if (k != n_want) fail_msg("cs_chunks(%d, %d, %d): %d chunks, want %d", n, block, depth, k, n_want);
    for (int i = 0; i < k; i++)
        if (got[i] != want[i]) fail_msg("cs_chunks(%d, %d, %d)[%d] = %d, want %d", n, block, depth, i, got[i], want[i]);
}

static void test_chunks(void **state) {
    (void)state;
    expect_chunks(830, 400, 56, (const int[]){400, 374, 56}, 3);   /* (400,400,30) rebalanced */
    expect_chunks(800, 400, 56, (const int[]){400, 400}, 2);       /* exact multiple */
    expect_chunks(856, 400, 56, (const int[]){400, 400, 56}, 3);   /* remainder == depth */
    expect_chunks(855, 400, 56, (const int[]){400, 399, 56}, 3);   /* remainder 55 */
    expect_chunks(1000, 400, 56, (const int[]){400, 400, 200}, 3); /* no rebalancing */
    expect_chunks(30, 400, 56, (const int[]){30}, 1);              /* n < depth: one chunk */
    expect_chunks(1, 400, 56, (const int[]){1}, 1);
    expect_chunks(41, 20, 10, (const int[]){20, 11, 10}, 3);       /* dask docstring (20,20,1) */
    expect_chunks(5, 1, 3, (const int[]){5}, 1);                   /* (1,1,1,1,1): tail folded back */
    expect_chunks(50, 10, 25, (const int[]){50}, 1);               /* block < depth */
    expect_chunks(60, 10, 25, (const int[]){30, 30}, 2);
    expect_chunks(400, 400, 56, (const int[]){400}, 1);
    expect_chunks(17, 4, 0, (const int[]){4, 4, 4, 4, 1}, 5);      /* depth 0: unchanged */
    /* count with a short or absent output buffer */
    int one[1];
    assert_int_equal(cs_chunks(830, 400, 56, one, 1), 3);
    assert_int_equal(one[0], 400);
    assert_int_equal(cs_chunks(830, 400, 56, NULL, 0), 3);
    assert_int_equal(cs_chunks(0, 400, 56, NULL, 0), -1);
    assert_int_equal(cs_chunks(10, 0, 56, NULL, 0), -1);
    assert_int_equal(cs_chunks(10, 4, -1, NULL, 0), -1);
    /* chunks always sum to n and are >= depth when n >= depth */
    for (int n = 1; n < 300; n += 7)
        for (int b = 1; b < 40; b += 3)
            for (int dd = 0; dd < 30; dd += 4) {
                int c[400];
                const int k = cs_chunks(n, b, dd, c, 400);
                int sum = 0;
                for (int i = 0; i < k; i++) {
                    sum += c[i];
                    if (n >= dd) assert_true(c[i] >= dd);
                }
                assert_int_equal(sum, n);
            }
}

static void fill_coords(timg *im) {
    for (int y = 0; y < im->H; y++)
        for (int x = 0; x < im->W; x++)
            for (int c = 0; c < 3; c++) im->px[((size_t)y * im->W + x) * 3 + c] = (float)(y * 1000 + x * 10 + c);
}

static void check_pixel(const float *out, int w, int t, int u, const timg *im, int sy_, int sx_) {
    for (int c = 0; c < 3; c++) {
        const float want = im->px[((size_t)sy_ * im->W + sx_) * 3 + c];
        const float got = out[((size_t)t * w + u) * 3 + c];
        if (got != want) fail_msg("region pixel (%d,%d,%d) = %g, want image (%d,%d) = %g", t, u, c, got, sy_, sx_, want);
    }
}

static void test_halo_periodic(void **state) {
    (void)state;
    timg im = timg_new(5, 7);
    fill_coords(&im);
    const int y0 = -3, x0 = -9, h = 14, w = 23; /* wraps more than once horizontally */
    float *out = malloc((size_t)h * w * 3 * sizeof(float));
    assert_non_null(out);
    assert_int_equal(cs_tile_read_region(timg_read, &im, 5, 7, y0, x0, h, w, CS_HALO_PERIODIC, NULL, NULL, out), 0);
    for (int t = 0; t < h; t++)
        for (int u = 0; u < w; u++) check_pixel(out, w, t, u, &im, ((y0 + t) % 5 + 5) % 5, ((x0 + u) % 7 + 7) % 7);
    /* hand-checked corners: (-3,-9) -> (2,5); (10,13) -> (0,6) */
    assert_true(out[0] == 2 * 1000 + 5 * 10);
    assert_true(out[((size_t)(h - 1) * w + (w - 1)) * 3 + 2] == 0 * 1000 + 6 * 10 + 2);
    free(out);
    free(im.px);
}

static void test_halo_mirror(void **state) {
    (void)state;
    timg im = timg_new(6, 4);
    fill_coords(&im);
    const int y0 = -7, x0 = -5, h = 20, w = 15;
    float *out = malloc((size_t)h * w * 3 * sizeof(float));
    assert_non_null(out);
    assert_int_equal(cs_tile_read_region(timg_read, &im, 6, 4, y0, x0, h, w, CS_HALO_MIRROR, NULL, NULL, out), 0);
    for (int t = 0; t < h; t++)
        for (int u = 0; u < w; u++) check_pixel(out, w, t, u, &im, ref_src(y0 + t, 6, 1), ref_src(x0 + u, 4, 1));
    /* dask 'reflect' by hand: -1 -> 0, -2 -> 1, N -> N-1, N+1 -> N-2 */
    assert_int_equal(ref_src(-1, 6, 1), 0);
    assert_int_equal(ref_src(-2, 6, 1), 1);
    assert_int_equal(ref_src(6, 6, 1), 5);
    assert_int_equal(ref_src(7, 6, 1), 4);
    /* row -1 col -1 of the image = pixel (0,0): region index (6, 4) */
    assert_true(out[((size_t)6 * w + 4) * 3] == 0);
    /* row -2 col 4 (= N) -> pixel (1, 3) */
    assert_true(out[((size_t)5 * w + 9) * 3] == 1 * 1000 + 3 * 10);
    free(out);
    /* one-pixel-wide image in both modes */
    timg one = timg_new(3, 1);
    fill_coords(&one);
    float r[9 * 5 * 3];
    for (int mode = 0; mode < 2; mode++) {
        assert_int_equal(cs_tile_read_region(timg_read, &one, 3, 1, -4, -2, 9, 5, mode, NULL, NULL, r), 0);
        for (int t = 0; t < 9; t++)
            for (int u = 0; u < 5; u++) check_pixel(r, 5, t, u, &one, ref_src(-4 + t, 3, mode), 0);
    }
    free(one.px);
    free(im.px);
}

/* A 30x30 image with the default d = 56: one 142x142 tile that wraps several times. */
static void test_tiny_image_tile(void **state) {
    (void)state;
    timg im = timg_new(30, 30);
    fill_coords(&im);
    mock_seg m = mock_new(0, 1);
    m.capture = 1;
    cs_tile_params p = cs_tile_default_params();
    uint32_t *lab = NULL;
    cs_tile_stats st;
    assert_int_equal(cs_tiled_segment_mem(30, 30, timg_read, &im, mock_segment, &m, &p, &lab, &st), 0);
    assert_int_equal(st.n_tiles, 1);
    assert_int_equal(m.cap_th, 142);
    assert_int_equal(m.cap_tw, 142);
    for (int t = 0; t < 142; t++)
        for (int u = 0; u < 142; u++) check_pixel(m.captured, 142, t, u, &im, ((t - 56) % 30 + 30) % 30, ((u - 56) % 30 + 30) % 30);
    free(m.captured);
    free(lab);
    free(im.px);
}

/* Single tile: no linking; labels keep the offset n (official single-chunk path). */
static void test_single_tile_offsets(void **state) {
    (void)state;
    timg im = timg_new(40, 40);
    for (int y = 0; y < 40; y++)
        for (int x = 0; x < 40; x++)
            if ((y - 20) * (y - 20) + (x - 20) * (x - 20) <= 9) im.px[((size_t)y * 40 + x) * 3 + 2] = 1;
    cs_tile_params p = cs_tile_default_params();
    mock_seg m = mock_new(0, 1);
    cs_tile_stats st;
    uint32_t *lab = run_all(&im, &p, &m, &st);
    /* The 152x152 tile holds 3x3 periodic copies of the disc; the core copy is the
     * 5th in raster order, n = 9, so its label is 5 + 9 = 14; total = 2 * 9. */
    assert_int_equal(st.total, 18);
    for (int y = 0; y < 40; y++)
        for (int x = 0; x < 40; x++) {
            const int in = (y - 20) * (y - 20) + (x - 20) * (x - 20) <= 9;
            assert_int_equal(lab[y * 40 + x], in ? 14 : 0);
        }
    assert_int_equal(st.max_label, 14);
    free(lab);
    free(im.px);
}

static void set_c2(timg *im, int y, int x, float v) { im->px[((size_t)y * im->W + x) * 3 + 2] = v; }

/* A disc on the boundary, fully visible in both tiles: linked (IoU 1). */
static void test_link_full_view(void **state) {
    (void)state;
    timg im = timg_new(16, 32);
    for (int y = 0; y < 16; y++)
        for (int x = 0; x < 32; x++)
            if ((y - 8) * (y - 8) + (x - 16) * (x - 16) <= 9) set_c2(&im, y, x, 1);
    for (int mode = 0; mode < 2; mode++) {
        cs_tile_params p = params(16, 4, 4, 0.5, mode);
        mock_seg m = mock_new(0, 1);
        cs_tile_stats st;
        uint32_t *lab = run_all(&im, &p, &m, &st);
        /* tile 0: label 1 -> 1+1 = 2, T = 2; tile 1: label 1 -> 3+1 = 4, T = 4;
         * edge (2,4); components 0,1,{2,4},3 -> the disc is 2 on both sides */
        assert_int_equal(st.total, 4);
        assert_int_equal(st.n_edges, 1);
        for (int y = 0; y < 16; y++)
            for (int x = 0; x < 32; x++) {
                const int in = (y - 8) * (y - 8) + (x - 16) * (x - 16) <= 9;
                assert_int_equal(lab[y * 32 + x], in ? 2 : 0);
            }
        free(lab);
    }
    free(im.px);
}

/* An E shape whose spine only the left tile sees: the right tile sees three bars.
 * IoU of each bar with the E inside the face = 8 / 24 = 1/3: split at 0.5,
 * merged at 0.3. */
static void test_split_low_iou(void **state) {
    (void)state;
    timg im = timg_new(16, 32);
    for (int y = 5; y <= 9; y++)
        for (int x = 8; x <= 9; x++) set_c2(&im, y, x, 1);
    for (int y = 5; y <= 9; y += 2)
        for (int x = 8; x <= 19; x++) set_c2(&im, y, x, 1);
    cs_tile_params p = params(16, 4, 4, 0.5, CS_HALO_PERIODIC);
    mock_seg m = mock_new(0, 1);
    cs_tile_stats st;
    uint32_t *lab = run_all(&im, &p, &m, &st);
    /* tile 0: one object -> 2 (T = 2); tile 1: bars 1,2,3 -> 6,7,8 (T = 8); no edge */
    assert_int_equal(st.total, 8);
    assert_int_equal(st.n_edges, 0);
    assert_int_equal(lab[5 * 32 + 8], 2);
    assert_int_equal(lab[7 * 32 + 15], 2);
    assert_int_equal(lab[5 * 32 + 16], 6);
    assert_int_equal(lab[7 * 32 + 19], 7);
    assert_int_equal(lab[9 * 32 + 17], 8);
    assert_int_equal(lab[6 * 32 + 17], 0);
    assert_int_equal(st.max_label, 8);
    free(lab);
    p.link_iou = 0.3; /* 1/3 >= 0.3: edges (2,6), (2,7), (2,8) -> one component, id 2 */
    m = mock_new(0, 1);
    lab = run_all(&im, &p, &m, &st);
    assert_int_equal(st.n_edges, 3);
    assert_int_equal(lab[5 * 32 + 16], 2);
    assert_int_equal(lab[7 * 32 + 19], 2);
    assert_int_equal(lab[9 * 32 + 17], 2);
    assert_int_equal(lab[5 * 32 + 8], 2);
    assert_int_equal(st.max_label, 2);
    free(lab);
    free(im.px);
}

/* The streaming and in-memory results equal the reference on random scenes. */
static void test_random_vs_reference(void **state) {
    (void)state;
    const double thrs[] = {0.5, 0.5, 0.3, 0.7, 1.0, 0.0, -1.0};
    int n_multi = 0, n_linked = 0, n_small = 0;
    for (int it = 0; it < 260; it++) {
        const int H = rnd_int(1, 64), W = rnd_int(1, 64);
        const int B = rnd_int(3, 24), d = rnd_int(0, 10), di = rnd_int(0, d);
        const double thr = thrs[rnd_int(0, 6)];
        const int mode = rnd_int(0, 1);
        timg im = timg_new(H, W);
        fill_blobs(&im, rnd_int(0, H * W / 30 + 2), rnd_int(1, 7));
        cs_tile_params p = params(B, d, di, thr, mode);
        mock_seg m = mock_new(rnd_int(0, 1), (uint32_t)rnd_int(1, 3));
        if (rnd_int(0, 5) == 0) m.fail_call = rnd_int(0, 6);
        cs_tile_stats st;
        uint32_t *lab = run_all(&im, &p, &m, &st);
        n_multi += st.n_tiles > 1;
        n_linked += st.n_edges > 0;
        n_small += H < d || W < d;
        free(lab);
        free(im.px);
    }
    printf("  random scenes: %d multi-tile, %d with links, %d smaller than the halo\n", n_multi, n_linked, n_small);
    assert_true(n_multi > 150 && n_linked > 50 && n_small > 10);
}

/* Default settings on a 1 x 5000 strip and a 5000 x 1 column. */
static void test_strips(void **state) {
    (void)state;
    for (int k = 0; k < 2; k++) {
        const int H = k ? 5000 : 1, W = k ? 1 : 5000;
        timg im = timg_new(H, W);
        for (int i = 0; i < 5000; i++)
            im.px[(size_t)i * 3 + 2] = (i % 97) < 30 ? 0.9f : 0.0f; /* runs of 30 crossing tile borders */
        cs_tile_params p = cs_tile_default_params();
        mock_seg m = mock_new(0, 1);
        cs_tile_stats st;
        uint32_t *lab = run_all(&im, &p, &m, &st);
        assert_int_equal(k ? st.tiles_y : st.tiles_x, 13);
        assert_int_equal(k ? st.tiles_x : st.tiles_y, 1);
        for (int i = 0; i < 5000; i++) assert_true((lab[i] != 0) == ((i % 97) < 30));
        free(lab);
        free(im.px);
    }
}

static void test_no_cells(void **state) {
    (void)state;
    timg im = timg_new(50, 70);
    cs_tile_params p = params(16, 4, 4, 0.5, CS_HALO_PERIODIC);
    mock_seg m = mock_new(0, 1);
    cs_tile_stats st;
    uint32_t *lab = run_all(&im, &p, &m, &st);
    for (int k = 0; k < 50 * 70; k++) assert_int_equal(lab[k], 0);
    assert_int_equal(st.max_label, 0);
    assert_int_equal(st.total, 0);
    assert_int_equal(st.n_tiles, 4 * 5); /* rows (16,16,14,4), columns (16,16,16,16,6) */
    free(lab);
    free(im.px);
}

/* A failing tile is all zeros (official behaviour) and counted. */
static void test_segment_failure(void **state) {
    (void)state;
    timg im = timg_new(32, 48);
    for (size_t k = 0; k < 32 * 48; k++) im.px[k * 3 + 2] = (k / 48 + k % 48) % 5 == 0 ? 1.0f : 0.0f;
    cs_tile_params p = params(16, 4, 4, 0.5, CS_HALO_PERIODIC);
    mock_seg m = mock_new(0, 1);
    m.fail_call = 4; /* tile (1,1) */
    cs_tile_stats st;
    uint32_t *lab = run_all(&im, &p, &m, &st);
    assert_int_equal(st.n_failed, 1);
    size_t nonzero_elsewhere = 0;
    for (int y = 0; y < 32; y++)
        for (int x = 0; x < 48; x++) {
            if (y >= 16 && x >= 16 && x < 32) assert_int_equal(lab[y * 48 + x], 0);
            else nonzero_elsewhere += lab[y * 48 + x] != 0;
        }
    assert_true(nonzero_elsewhere > 100);
    free(lab);
    free(im.px);
}

static int write_fail(void *user, int y0, int n_rows, const uint32_t *rows) {
    (void)user; (void)y0; (void)n_rows; (void)rows;
    return -3;
}

static void test_errors(void **state) {
    (void)state;
    timg im = timg_new(40, 40);
    fill_blobs(&im, 10, 4);
    cs_tile_params p = params(16, 4, 4, 0.5, CS_HALO_PERIODIC);
    mock_seg m = mock_new(0, 1);
    uint32_t *lab = (uint32_t *)&m; /* must be reset to NULL on failure */
    cs_tile_stats st;
    im.fail_read_at = 3;
    im.fail_code = -1;
    assert_int_equal(cs_tiled_segment_mem(40, 40, timg_read, &im, mock_segment, &m, &p, &lab, &st), CELLSAM_ERR_IO);
    assert_null(lab);
    printf("  read error: %s\n", cellsam_last_error());
    im.reads = 0;
    im.fail_code = CELLSAM_ERR_FORMAT; /* a CELLSAM code is passed through */
    rows_sink sink = {40, 40, 0, 0, calloc(40 * 40, sizeof(uint32_t))};
    m = mock_new(0, 1);
    assert_int_equal(cs_tiled_segment_stream(40, 40, timg_read, &im, mock_segment, &m, sink_write, &sink, &p, &st),
                     CELLSAM_ERR_FORMAT);
    im.fail_read_at = -1;
    m = mock_new(0, 1);
    assert_int_equal(cs_tiled_segment_stream(40, 40, timg_read, &im, mock_segment, &m, write_fail, NULL, &p, &st),
                     CELLSAM_ERR_IO);
    printf("  write error: %s\n", cellsam_last_error());
    /* the min-max first pass reads through the same callback */
    p.minmax_normalize = 1;
    im.reads = 0;
    im.fail_read_at = 0;
    im.fail_code = 7;
    m = mock_new(0, 1);
    assert_int_equal(cs_tiled_segment_mem(40, 40, timg_read, &im, mock_segment, &m, &p, &lab, &st), CELLSAM_ERR_MODEL);
    im.fail_read_at = -1;
    p.minmax_normalize = 0;
    /* invalid arguments */
    cs_tile_params bad = p;
    bad.iou_depth = 5; /* > overlap */
    assert_int_equal(cs_tiled_segment_mem(40, 40, timg_read, &im, mock_segment, &m, &bad, &lab, &st), CELLSAM_ERR_INVALID);
    bad = p;
    bad.block_size = 0;
    assert_int_equal(cs_tiled_segment_mem(40, 40, timg_read, &im, mock_segment, &m, &bad, &lab, &st), CELLSAM_ERR_INVALID);
    bad = p;
    bad.overlap = -1;
    assert_int_equal(cs_tiled_segment_mem(40, 40, timg_read, &im, mock_segment, &m, &bad, &lab, &st), CELLSAM_ERR_INVALID);
    bad = p;
    bad.halo_mode = 9;
    assert_int_equal(cs_tiled_segment_mem(40, 40, timg_read, &im, mock_segment, &m, &bad, &lab, &st), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tiled_segment_mem(0, 40, timg_read, &im, mock_segment, &m, &p, &lab, &st), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tiled_segment_mem(40, 40, NULL, &im, mock_segment, &m, &p, &lab, &st), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tiled_segment_stream(40, 40, timg_read, &im, mock_segment, &m, NULL, NULL, &p, &st),
                     CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tiled_segment_mem(1 << 25, 40, timg_read, &im, mock_segment, &m, &p, &lab, &st), CELLSAM_ERR_LIMIT);
    float r[3];
    assert_int_equal(cs_tile_read_region(timg_read, &im, 40, 40, 0, 0, 0, 1, 0, NULL, NULL, r), CELLSAM_ERR_INVALID);
    free(sink.img);
    free(im.px);
}

/* Streaming memory does not grow with the image height and stays far below H*W. */
static void test_memory_bounded(void **state) {
    (void)state;
    size_t peak[2][2];
    const int heights[2] = {512, 8192}, W = 96;
    for (int cells = 0; cells < 2; cells++)
        for (int k = 0; k < 2; k++) {
            const int H = heights[k];
            timg im = timg_new(H, W);
            g_rng = 12345;
            if (cells) fill_blobs(&im, H * W / 200, 5);
            cs_tile_params p = params(64, 16, 16, 0.5, CS_HALO_PERIODIC);
            mock_seg m = mock_new(1, 1);
            rows_sink sink = {H, W, 0, 0, calloc((size_t)H * W, sizeof(uint32_t))};
            cs_tile_stats st;
            assert_int_equal(cs_tiled_segment_stream(H, W, timg_read, &im, mock_segment, &m, sink_write, &sink, &p, &st), 0);
            peak[cells][k] = st.peak_bytes;
            printf("  H=%d W=%d cells=%d: peak %zu bytes (H*W*4 = %zu), %zu links\n", H, W, cells, st.peak_bytes,
                   (size_t)H * W * 4, st.n_edges);
            if (k == 1) assert_true(st.peak_bytes < (size_t)H * W * 4 / 4);
            free(sink.img);
            free(im.px);
        }
    /* no cells: only the per-tile-row chunk table (8 bytes per row of tiles) grows */
    assert_true(peak[0][1] - peak[0][0] <= 8 * (8192 - 512) / 64);
    assert_true(peak[1][1] < peak[1][0] + 64 * 1024); /* cells: plus the link graph */
}

static void test_minmax(void **state) {
    (void)state;
    timg im = timg_new(23, 31);
    for (size_t k = 0; k < 23 * 31; k++) {
        im.px[k * 3 + 0] = 5.0f;                      /* constant: unchanged */
        im.px[k * 3 + 1] = 2.0f + (float)(k % 17) * 0.5f; /* 2 .. 10 */
        im.px[k * 3 + 2] = -3.0f + (float)((k * 7) % 11);
    }
    float mn[3], mx[3];
    assert_int_equal(cs_tile_channel_minmax(timg_read, &im, 23, 31, mn, mx), 0);
    assert_true(mn[0] == 5 && mx[0] == 5 && mn[1] == 2 && mx[1] == 10 && mn[2] == -3 && mx[2] == 7);
    float mn2[3], mx2[3]; /* the in-memory version: the same values */
    cs_tile_channel_minmax_hw3(im.px, 23 * 31, mn2, mx2);
    assert_memory_equal(mn, mn2, sizeof mn);
    assert_memory_equal(mx, mx2, sizeof mx);
    /* through the tiler: the tile the segmenter sees is normalised */
    cs_tile_params p = params(400, 8, 8, 0.5, CS_HALO_PERIODIC);
    p.minmax_normalize = 1;
    mock_seg m = mock_new(0, 1);
    m.capture = 1;
    uint32_t *lab = NULL;
    cs_tile_stats st;
    assert_int_equal(cs_tiled_segment_mem(23, 31, timg_read, &im, mock_segment, &m, &p, &lab, &st), 0);
    assert_true(st.ch_min[1] == 2 && st.ch_max[1] == 10);
    double maxerr = 0;
    for (int t = 0; t < m.cap_th; t++)
        for (int u = 0; u < m.cap_tw; u++) {
            const size_t s = (size_t)(((t - 8) % 23 + 23) % 23) * 31 + ((u - 8) % 31 + 31) % 31;
            const float *g = &m.captured[((size_t)t * m.cap_tw + u) * 3];
            const float w1 = (im.px[s * 3 + 1] - 2.0f) / 8.0f, w2 = (im.px[s * 3 + 2] - (-3.0f)) / 10.0f;
            assert_true(g[0] == 5.0f);
            maxerr = fmax(maxerr, fabs((double)g[1] - w1) + fabs((double)g[2] - w2));
        }
    printf("  min-max tile: max abs error %.3g (exact expected)\n", maxerr);
    assert_true(maxerr == 0);
    free(m.captured);
    free(lab);
    /* numpy semantics: a NaN makes the channel min/max NaN and the channel NaN */
    im.px[3 * 40 + 1] = NAN;
    assert_int_equal(cs_tile_channel_minmax(timg_read, &im, 23, 31, mn, mx), 0);
    assert_true(isnan(mn[1]) && isnan(mx[1]) && mn[2] == -3);
    cs_tile_channel_minmax_hw3(im.px, 23 * 31, mn2, mx2);
    assert_true(isnan(mn2[1]) && isnan(mx2[1]) && mn2[2] == -3 && mx2[2] == 7 && mn2[0] == 5);
    float px[6] = {1, 2, 3, 4, 5, 6};
    cs_tile_apply_minmax(px, 2, mn, mx);
    assert_true(isnan(px[1]) && isnan(px[4]));
    assert_true(px[0] == 1 && px[3] == 4);                          /* mn[0] = mx[0]: unchanged */
    assert_true(px[2] == (3.0f + 3.0f) / 10.0f && px[5] == (6.0f + 3.0f) / 10.0f);
    free(im.px);
}

typedef struct {
    int calls, last_done, total;
} progress_log;

static void on_progress(int done, int total, void *user) {
    progress_log *l = user;
    assert_int_equal(done, l->last_done + 1);
    l->last_done = done;
    l->total = total;
    l->calls++;
}

static void test_progress(void **state) {
    (void)state;
    timg im = timg_new(830, 30);
    progress_log log = {0, 0, 0};
    cs_tile_params p = cs_tile_default_params();
    p.progress = on_progress;
    p.progress_user = &log;
    mock_seg m = mock_new(0, 1);
    uint32_t *lab = NULL;
    cs_tile_stats st;
    assert_int_equal(cs_tiled_segment_mem(830, 30, timg_read, &im, mock_segment, &m, &p, &lab, &st), 0);
    assert_int_equal(st.tiles_y, 3); /* (400, 374, 56) */
    assert_int_equal(st.tiles_x, 1);
    assert_int_equal(log.calls, 3);
    assert_int_equal(log.total, 3);
    assert_int_equal(m.calls, 3);
    free(lab);
    free(im.px);
}

/* on_tile reports each tile's offset (T_{k-1} + n_k, n_k = its max label) and
 * raw_to_final maps raw ids to the output: with linking disabled (IoU threshold 2)
 * the output is the raw core labels, so the linked output must equal the table
 * applied to it. */
typedef struct {
    int calls;
    uint64_t total;
    int ok;
} tile_log;

static void on_tile(void *user, int tile_index, uint32_t offset, uint32_t n, int failed) {
    tile_log *l = user;
    if (tile_index != l->calls || (uint64_t)offset != l->total + n || failed) l->ok = 0;
    l->total = (uint64_t)offset + n;
    l->calls++;
}

static void test_raw_to_final(void **state) {
    (void)state;
    g_rng = 777;
    timg im = timg_new(61, 53);
    fill_blobs(&im, 40, 6);
    cs_tile_params p = params(12, 4, 3, 2.0, CS_HALO_PERIODIC);
    tile_log log = {0, 0, 1};
    p.on_tile = on_tile;
    p.on_tile_user = &log;
    mock_seg m = mock_new(1, 2);
    uint32_t *raw = NULL, *table = NULL, *linked = NULL;
    cs_tile_stats st, st2;
    assert_int_equal(cs_tiled_segment_mem_ex(61, 53, timg_read, &im, mock_segment, &m, &p, &raw, &table, &st), 0);
    assert_true(log.ok);
    assert_int_equal(log.calls, st.n_tiles);
    assert_int_equal(log.total, st.total);
    for (uint32_t r = 0; r <= st.total; r++) assert_int_equal(table[r], r); /* no links: identity */
    free(table);
    p.link_iou = 0.5;
    p.on_tile = NULL;
    m = mock_new(1, 2);
    assert_int_equal(cs_tiled_segment_mem_ex(61, 53, timg_read, &im, mock_segment, &m, &p, &linked, &table, &st2), 0);
    assert_int_equal(st2.total, st.total);
    assert_true(st2.n_edges > 0);
    size_t merged = 0;
    for (size_t k = 0; k < 61 * 53; k++) {
        assert_int_equal(linked[k], table[raw[k]]);
        merged += linked[k] != raw[k];
    }
    printf("  %zu links, %zu pixels relabelled\n", st2.n_edges, merged);
    assert_true(merged > 0);
    free(raw);
    free(table);
    free(linked);
    free(im.px);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chunks),
        cmocka_unit_test(test_halo_periodic),
        cmocka_unit_test(test_halo_mirror),
        cmocka_unit_test(test_tiny_image_tile),
        cmocka_unit_test(test_single_tile_offsets),
        cmocka_unit_test(test_link_full_view),
        cmocka_unit_test(test_split_low_iou),
        cmocka_unit_test(test_random_vs_reference),
        cmocka_unit_test(test_strips),
        cmocka_unit_test(test_no_cells),
        cmocka_unit_test(test_segment_failure),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_memory_bounded),
        cmocka_unit_test(test_minmax),
        cmocka_unit_test(test_progress),
        cmocka_unit_test(test_raw_to_final),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
