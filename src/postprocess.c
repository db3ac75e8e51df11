/* Mask post-processing: logits upsampling (bit-exact with PyTorch CPU), support
 * rectangles, incremental label composition, fill holes / remove small
 * labels, boundary subtraction. See postprocess.h for the arithmetic. */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "postprocess.h"

/* ---------------------------------------------------------------- checks */

static int check_size(int H, int W, const char *what) {
    if (H <= 0 || W <= 0 || H > CS_POST_MAX_SIDE || W > CS_POST_MAX_SIDE)
        return cs_error(CELLSAM_ERR_INVALID, "%s: invalid image size %dx%d", what, H, W);
    size_t n;
    if (cs_mul_size((size_t)H, (size_t)W, &n) || n > CS_POST_MAX_PIXELS)
        return cs_error(CELLSAM_ERR_LIMIT, "%s: image %dx%d too large", what, H, W);
    return CELLSAM_OK;
}

/* ------------------------------------------------------------ resampling */

/* PyTorch's channels-last bilinear kernel (align_corners=False): float scale,
 * source coordinate in double, lambdas rounded to float. */
static void make_taps(int n_in, int n_out, cs_lerp_tap *taps) {
    float scale = (float)n_in / (float)n_out;
    for (int i = 0; i < n_out; i++) {
        cs_lerp_tap *t = &taps[i];
        if (n_in == n_out) {
            t->i0 = t->i1 = i;
            t->l0 = 1.0f;
            t->l1 = 0.0f;
            continue;
        }
        double src = (double)scale * ((double)i + 0.5) - 0.5;
        if (src < 0) src = 0;
        int i0 = (int)src;
        if (i0 > n_in - 1) i0 = n_in - 1; /* unreachable for valid sizes; keeps reads in range */
        t->i0 = i0;
        t->i1 = i0 + (i0 < n_in - 1 ? 1 : 0);
        t->l1 = (float)(src - (double)i0);
        t->l0 = 1.0f - t->l1;
    }
}

/* One bilinear output value from two source rows. The float products of the
 * lambdas are the kernel's weights; the four terms are summed in double in
 * this order (each product is exact in double, so FMA contraction cannot
 * change the result). */
static inline float lerp2(const float *row0, const float *row1, int c0, int c1,
                          const cs_lerp_tap *ty, const cs_lerp_tap *tx) {
    float w00 = ty->l0 * tx->l0, w01 = ty->l0 * tx->l1;
    float w10 = ty->l1 * tx->l0, w11 = ty->l1 * tx->l1;
    double acc = (double)row0[c0] * (double)w00;
    acc += (double)row0[c1] * (double)w01;
    acc += (double)row1[c0] * (double)w10;
    acc += (double)row1[c1] * (double)w11;
    return (float)acc;
}

int cs_upsampler_init(cs_mask_upsampler *u, int H, int W) {
    memset(u, 0, sizeof *u);
    int rc = check_size(H, W, "mask upsampling");
    if (rc) return rc;
    u->H = H;
    u->W = W;
    make_taps(CS_LOWRES_SIZE, CS_SAM_INPUT_SIZE, u->step1);
    u->rows = cs_alloc((size_t)H, sizeof *u->rows);
    u->cols = cs_alloc((size_t)W, sizeof *u->cols);
    u->mid = cs_alloc((size_t)CS_SAM_INPUT_SIZE * CS_SAM_INPUT_SIZE, sizeof *u->mid);
    u->mid_cols = cs_alloc(CS_SAM_INPUT_SIZE, sizeof *u->mid_cols);
    u->mid_row_done = cs_alloc(CS_SAM_INPUT_SIZE, 1);
    if (!u->rows || !u->cols || !u->mid || !u->mid_cols || !u->mid_row_done) {
        cs_upsampler_free(u);
        return CELLSAM_ERR_NOMEM;
    }
    make_taps(CS_SAM_INPUT_SIZE, H, u->rows);
    make_taps(CS_SAM_INPUT_SIZE, W, u->cols);
    return CELLSAM_OK;
}

void cs_upsampler_free(cs_mask_upsampler *u) {
    if (!u) return;
    cs_free(u->rows);
    cs_free(u->cols);
    cs_free(u->mid);
    cs_free(u->mid_cols);
    cs_free(u->mid_row_done);
    memset(u, 0, sizeof *u);
}

/* State of one region pass: the window [r0,r1] x [c0,c1] of the intermediate
 * 1024-map, filled lazily (only rows and columns that output pixels use). */
typedef struct {
    int x0, x1;
    int r0, c0, mid_w;
    int n_cols;
} region_pass;

static void region_begin(cs_mask_upsampler *u, int x0, int y0, int x1, int y1, region_pass *p) {
    p->x0 = x0;
    p->x1 = x1;
    p->r0 = u->rows[y0].i0;
    int r1 = u->rows[y1 - 1].i1;
    p->c0 = u->cols[x0].i0;
    p->mid_w = u->cols[x1 - 1].i1 - p->c0 + 1;
    memset(u->mid_row_done + p->r0, 0, (size_t)(r1 - p->r0 + 1));
    /* Taps are non-decreasing, so "greater than the last one" keeps the list
     * sorted and unique. */
    int n = 0, last = -1;
    for (int x = x0; x < x1; x++) {
        if (u->cols[x].i0 > last) last = u->mid_cols[n++] = u->cols[x].i0;
        if (u->cols[x].i1 > last) last = u->mid_cols[n++] = u->cols[x].i1;
    }
    p->n_cols = n;
}

static const float *mid_row(cs_mask_upsampler *u, const float *lowres, const region_pass *p,
                            int r) {
    float *dst = u->mid + (size_t)(r - p->r0) * (size_t)p->mid_w;
    if (!u->mid_row_done[r]) {
        const cs_lerp_tap *ty = &u->step1[r];
        const float *a = lowres + (size_t)ty->i0 * CS_LOWRES_SIZE;
        const float *b = lowres + (size_t)ty->i1 * CS_LOWRES_SIZE;
        for (int k = 0; k < p->n_cols; k++) {
            int c = u->mid_cols[k];
            const cs_lerp_tap *tx = &u->step1[c];
            dst[c - p->c0] = lerp2(a, b, tx->i0, tx->i1, ty, tx);
        }
        u->mid_row_done[r] = 1;
    }
    return dst;
}

static void region_row(cs_mask_upsampler *u, const float *lowres, const region_pass *p, int y,
                       float *out) {
    const cs_lerp_tap *ty = &u->rows[y];
    const float *a = mid_row(u, lowres, p, ty->i0);
    const float *b = mid_row(u, lowres, p, ty->i1);
    for (int x = p->x0; x < p->x1; x++) {
        const cs_lerp_tap *tx = &u->cols[x];
        out[x - p->x0] = lerp2(a, b, tx->i0 - p->c0, tx->i1 - p->c0, ty, tx);
    }
}

static int check_rect(int H, int W, int x0, int y0, int x1, int y1) {
    if (x0 < 0 || y0 < 0 || x1 > W || y1 > H || x0 > x1 || y0 > y1)
        return cs_error(CELLSAM_ERR_INVALID, "region [%d,%d)x[%d,%d) outside %dx%d", x0, x1, y0,
                        y1, W, H);
    return CELLSAM_OK;
}

int cs_upsampler_region(cs_mask_upsampler *u, const float *lowres, int x0, int y0, int x1, int y1,
                        float *out) {
    if (!u || !u->rows || !lowres || !out)
        return cs_error(CELLSAM_ERR_INVALID, "mask upsampling: NULL argument");
    int rc = check_rect(u->H, u->W, x0, y0, x1, y1);
    if (rc) return rc;
    if (x0 == x1 || y0 == y1) return CELLSAM_OK;
    region_pass p;
    region_begin(u, x0, y0, x1, y1, &p);
    size_t w = (size_t)(x1 - x0);
    for (int y = y0; y < y1; y++) region_row(u, lowres, &p, y, out + (size_t)(y - y0) * w);
    return CELLSAM_OK;
}

/* The full computation, written plainly (whole intermediate map, then every
 * output pixel); the region path must agree with it bit for bit. */
int cs_upsample_logits(const float *lowres, int H, int W, float *out) {
    if (!lowres || !out) return cs_error(CELLSAM_ERR_INVALID, "mask upsampling: NULL argument");
    cs_mask_upsampler u;
    int rc = cs_upsampler_init(&u, H, W);
    if (rc) return rc;
    const int S = CS_SAM_INPUT_SIZE;
    for (int r = 0; r < S; r++) {
        const cs_lerp_tap *ty = &u.step1[r];
        const float *a = lowres + (size_t)ty->i0 * CS_LOWRES_SIZE;
        const float *b = lowres + (size_t)ty->i1 * CS_LOWRES_SIZE;
        for (int c = 0; c < S; c++)
            u.mid[(size_t)r * S + c] = lerp2(a, b, u.step1[c].i0, u.step1[c].i1, ty, &u.step1[c]);
    }
    for (int y = 0; y < H; y++) {
        const cs_lerp_tap *ty = &u.rows[y];
        const float *a = u.mid + (size_t)ty->i0 * S;
        const float *b = u.mid + (size_t)ty->i1 * S;
        for (int x = 0; x < W; x++)
            out[(size_t)y * W + x] = lerp2(a, b, u.cols[x].i0, u.cols[x].i1, ty, &u.cols[x]);
    }
    cs_upsampler_free(&u);
    return CELLSAM_OK;
}

int cs_upsample_logits_region(const float *lowres, int H, int W, int x0, int y0, int x1, int y1,
                              float *out) {
    if (!lowres || !out) return cs_error(CELLSAM_ERR_INVALID, "mask upsampling: NULL argument");
    int rc = check_size(H, W, "mask upsampling");
    if (rc) return rc;
    rc = check_rect(H, W, x0, y0, x1, y1);
    if (rc) return rc;
    cs_mask_upsampler u;
    rc = cs_upsampler_init(&u, H, W);
    if (rc) return rc;
    rc = cs_upsampler_region(&u, lowres, x0, y0, x1, y1, out);
    cs_upsampler_free(&u);
    return rc;
}

/* ------------------------------------------------------------- support */

/* First index whose tap i1 >= lo (taps non-decreasing); n if none. */
static int first_reaching(const cs_lerp_tap *t, int n, int lo) {
    int a = 0, b = n;
    while (a < b) {
        int m = a + (b - a) / 2;
        if (t[m].i1 >= lo) b = m;
        else a = m + 1;
    }
    return a;
}

/* One past the last index whose tap i0 <= hi. */
static int end_reaching(const cs_lerp_tap *t, int n, int hi) {
    int a = 0, b = n;
    while (a < b) {
        int m = a + (b - a) / 2;
        if (t[m].i0 <= hi) a = m + 1;
        else b = m;
    }
    return a;
}

/* Output indices [*o0,*o1) of a step whose taps touch source interval
 * [lo,hi]: a tap pair {i0, i0 or i0+1} meets it iff i1 >= lo and i0 <= hi. */
static void map_interval(const cs_lerp_tap *t, int n, int lo, int hi, int *o0, int *o1) {
    *o0 = first_reaching(t, n, lo);
    *o1 = end_reaching(t, n, hi);
    if (*o1 < *o0) *o1 = *o0;
}

int cs_upsampler_support(const cs_mask_upsampler *u, const float *lowres, float logit_threshold,
                         int *x0, int *y0, int *x1, int *y1) {
    if (!u || !u->rows || !lowres || !x0 || !y0 || !x1 || !y1 || isnan(logit_threshold)) {
        cs_error(CELLSAM_ERR_INVALID, "mask support: invalid argument");
        return -1;
    }
    *x0 = *y0 = *x1 = *y1 = 0;
    /* Each resampling step's output exceeds an upper bound b of its inputs by
     * at most a few ulps of b (weights sum to 1 within 2^-22); the margin
     * covers both steps with room to spare. */
    float sel = logit_threshold - 1e-5f * (1.0f + fabsf(logit_threshold));
    int n = 0, lr0 = CS_LOWRES_SIZE, lr1 = -1, lc0 = CS_LOWRES_SIZE, lc1 = -1;
    for (int r = 0; r < CS_LOWRES_SIZE; r++) {
        const float *row = lowres + (size_t)r * CS_LOWRES_SIZE;
        int first = -1, last = -1;
        for (int c = 0; c < CS_LOWRES_SIZE; c++) {
            if (row[c] > sel) {
                if (first < 0) first = c;
                last = c;
                n++;
            }
        }
        if (first < 0) continue;
        if (r < lr0) lr0 = r;
        lr1 = r;
        if (first < lc0) lc0 = first;
        if (last > lc1) lc1 = last;
    }
    if (n == 0) return 0;
    int R0, R1, C0, C1, Y0, Y1, X0, X1;
    map_interval(u->step1, CS_SAM_INPUT_SIZE, lr0, lr1, &R0, &R1);
    map_interval(u->step1, CS_SAM_INPUT_SIZE, lc0, lc1, &C0, &C1);
    if (R0 >= R1 || C0 >= C1) return 0;
    map_interval(u->rows, u->H, R0, R1 - 1, &Y0, &Y1);
    map_interval(u->cols, u->W, C0, C1 - 1, &X0, &X1);
    if (Y0 >= Y1 || X0 >= X1) return 0; /* the output grid misses the mask */
    /* One pixel of slack: costs little, guards the argument above. */
    *y0 = Y0 > 0 ? Y0 - 1 : 0;
    *x0 = X0 > 0 ? X0 - 1 : 0;
    *y1 = Y1 < u->H ? Y1 + 1 : u->H;
    *x1 = X1 < u->W ? X1 + 1 : u->W;
    return n;
}

int cs_mask_support_region(const float *lowres, int H, int W, float logit_threshold, int *x0,
                           int *y0, int *x1, int *y1) {
    if (x0 && y0 && x1 && y1) *x0 = *y0 = *x1 = *y1 = 0;
    cs_mask_upsampler u;
    if (cs_upsampler_init(&u, H, W)) return -1;
    int n = cs_upsampler_support(&u, lowres, logit_threshold, x0, y0, x1, y1);
    cs_upsampler_free(&u);
    return n;
}

/* ---------------------------------------------------------- composition */

int cs_composer_init(cs_label_composer *c, int H, int W) {
    if (!c) return cs_error(CELLSAM_ERR_INVALID, "label composer: NULL argument");
    memset(c, 0, sizeof *c);
    int rc = cs_upsampler_init(&c->up, H, W);
    if (rc) return rc;
    c->H = H;
    c->W = W;
    c->labels = cs_calloc((size_t)H * (size_t)W, sizeof *c->labels);
    c->rowbuf = cs_alloc((size_t)W, sizeof *c->rowbuf);
    if (!c->labels || !c->rowbuf) {
        cs_composer_free(c);
        return CELLSAM_ERR_NOMEM;
    }
    return CELLSAM_OK;
}

int cs_composer_add_mask(cs_label_composer *c, const float *lowres_logits, uint32_t label_value) {
    if (!c || !c->labels || !lowres_logits)
        return cs_error(CELLSAM_ERR_INVALID, "label composer: invalid argument");
    c->last_count = 0;
    int x0, y0, x1, y1;
    int n = cs_upsampler_support(&c->up, lowres_logits, CS_MASK_LOGIT_OFF, &x0, &y0, &x1, &y1);
    if (n < 0) return CELLSAM_ERR_INVALID;
    if (n == 0) return CELLSAM_OK;
    region_pass p;
    region_begin(&c->up, x0, y0, x1, y1, &p);
    size_t count = 0;
    for (int y = y0; y < y1; y++) {
        region_row(&c->up, lowres_logits, &p, y, c->rowbuf);
        uint32_t *lab = c->labels + (size_t)y * (size_t)c->W;
        for (int x = x0; x < x1; x++) {
            if (cs_mask_logit_on(c->rowbuf[x - x0])) {
                lab[x] = label_value;
                count++;
            }
        }
    }
    c->last_count = count;
    return CELLSAM_OK;
}

int cs_composer_add_binary(cs_label_composer *c, const uint8_t *mask, uint32_t label_value) {
    if (!c || !c->labels || !mask)
        return cs_error(CELLSAM_ERR_INVALID, "label composer: invalid argument");
    size_t n = (size_t)c->H * (size_t)c->W, count = 0;
    for (size_t i = 0; i < n; i++) {
        if (mask[i]) {
            c->labels[i] = label_value;
            count++;
        }
    }
    c->last_count = count;
    return CELLSAM_OK;
}

uint32_t *cs_composer_take_labels(cs_label_composer *c) {
    if (!c) return NULL;
    uint32_t *l = c->labels;
    c->labels = NULL;
    return l;
}

void cs_composer_free(cs_label_composer *c) {
    if (!c) return;
    cs_upsampler_free(&c->up);
    cs_free(c->labels);
    cs_free(c->rowbuf);
    memset(c, 0, sizeof *c);
}

/* ------------------------------------------------ fill holes, small masks */

typedef struct {
    uint32_t value;
    int x0, y0, x1, y1; /* inclusive bounds */
} label_box;

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Bounding boxes of every label value present, in increasing value order
 * (scipy find_objects, computed once before any relabelling). */
static int find_label_boxes(const uint32_t *labels, int H, int W, label_box **out, size_t *n_out) {
    size_t n = (size_t)H * (size_t)W;
    uint32_t maxv = 0;
    for (size_t i = 0; i < n; i++)
        if (labels[i] > maxv) maxv = labels[i];
    *out = NULL;
    *n_out = 0;
    if (maxv == 0) return CELLSAM_OK;

    /* value -> slot: a direct table when the values are dense enough, else
     * the sorted distinct values (searched per pixel). */
    uint32_t *slot_of = NULL, *distinct = NULL;
    size_t n_slots;
    int direct = (size_t)maxv <= n || maxv <= (1u << 20);
    if (direct) {
        slot_of = cs_alloc((size_t)maxv + 1, sizeof *slot_of);
        if (!slot_of) return CELLSAM_ERR_NOMEM;
        for (size_t v = 0; v <= maxv; v++) slot_of[v] = UINT32_MAX;
        for (size_t i = 0; i < n; i++) slot_of[labels[i]] = 0;
        n_slots = 0;
        for (size_t v = 1; v <= maxv; v++)
            if (slot_of[v] == 0) slot_of[v] = (uint32_t)n_slots++;
    } else {
        distinct = cs_alloc(n, sizeof *distinct);
        if (!distinct) return CELLSAM_ERR_NOMEM;
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if (labels[i]) distinct[k++] = labels[i];
        qsort(distinct, k, sizeof *distinct, cmp_u32);
        n_slots = 0;
        for (size_t i = 0; i < k; i++)
            if (n_slots == 0 || distinct[n_slots - 1] != distinct[i]) distinct[n_slots++] = distinct[i];
    }
    label_box *boxes = cs_alloc(n_slots, sizeof *boxes);
    if (!boxes) {
        cs_free(slot_of);
        cs_free(distinct);
        return CELLSAM_ERR_NOMEM;
    }
    for (size_t s = 0; s < n_slots; s++) {
        boxes[s].value = 0;
        boxes[s].x0 = W;
        boxes[s].y0 = H;
        boxes[s].x1 = -1;
        boxes[s].y1 = -1;
    }
    for (int y = 0; y < H; y++) {
        const uint32_t *row = labels + (size_t)y * (size_t)W;
        for (int x = 0; x < W; x++) {
            uint32_t v = row[x];
            if (!v) continue;
            size_t s;
            if (direct) {
                s = slot_of[v];
            } else {
                size_t a = 0, b = n_slots;
                while (b - a > 1) {
                    size_t m = a + (b - a) / 2;
                    if (distinct[m] <= v) a = m;
                    else b = m;
                }
                s = a;
            }
            label_box *bx = &boxes[s];
            bx->value = v;
            if (x < bx->x0) bx->x0 = x;
            if (x > bx->x1) bx->x1 = x;
            if (y < bx->y0) bx->y0 = y;
            bx->y1 = y;
        }
    }
    cs_free(slot_of);
    cs_free(distinct);
    *out = boxes;
    *n_out = n_slots;
    return CELLSAM_OK;
}

enum { PX_BACKGROUND = 0, PX_MASK = 1, PX_OUTSIDE = 2 };

int cs_count_labels(const uint32_t *labels, int H, int W, size_t *n_out) {
    label_box *boxes = NULL;
    *n_out = 0;
    int rc = find_label_boxes(labels, H, W, &boxes, n_out);
    cs_free(boxes);
    return rc;
}

int cs_label_boxes(const uint32_t *labels, int H, int W, cellsam_box **boxes_out, int *n_out) {
    *boxes_out = NULL;
    *n_out = 0;
    int rc = check_size(H, W, "label boxes");
    if (rc) return rc;
    label_box *lb = NULL;
    size_t n = 0;
    rc = find_label_boxes(labels, H, W, &lb, &n);
    if (rc) return cs_error(rc, "out of memory for the boxes of a %d x %d label image", W, H);
    if (n > INT_MAX) {
        cs_free(lb);
        return cs_error(CELLSAM_ERR_LIMIT, "%zu labels: too many boxes", n);
    }
    cellsam_box *b = cs_alloc(n ? n : 1, sizeof *b);
    if (!b) {
        cs_free(lb);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory for %zu boxes", n);
    }
    for (size_t i = 0; i < n; i++)
        b[i] = (cellsam_box){(float)lb[i].x0, (float)lb[i].y0, (float)lb[i].x1 + 1, (float)lb[i].y1 + 1};
    cs_free(lb);
    *boxes_out = b;
    *n_out = (int)n;
    return CELLSAM_OK;
}

int cs_fill_holes_remove_small(uint32_t *labels, int H, int W, int min_size) {
    if (!labels) return cs_error(CELLSAM_ERR_INVALID, "fill holes: NULL labels");
    int rc = check_size(H, W, "fill holes");
    if (rc) return rc;
    label_box *boxes;
    size_t n_boxes;
    rc = find_label_boxes(labels, H, W, &boxes, &n_boxes);
    if (rc) return rc;
    if (n_boxes == 0) return CELLSAM_OK;

    size_t max_area = 0;
    for (size_t s = 0; s < n_boxes; s++) {
        size_t a = (size_t)(boxes[s].x1 - boxes[s].x0 + 1) * (size_t)(boxes[s].y1 - boxes[s].y0 + 1);
        if (a > max_area) max_area = a;
    }
    uint8_t *state = cs_alloc(max_area, 1);
    uint32_t *stack = cs_alloc(max_area, sizeof *stack);
    if (!state || !stack) {
        cs_free(state);
        cs_free(stack);
        cs_free(boxes);
        return CELLSAM_ERR_NOMEM;
    }

    uint32_t next = 0; /* labels written so far (j in the official code) */
    for (size_t s = 0; s < n_boxes; s++) {
        const label_box *b = &boxes[s];
        const uint32_t v = b->value;
        const int bw = b->x1 - b->x0 + 1, bh = b->y1 - b->y0 + 1;
        /* Current pixels of v (earlier fills may have taken some). */
        size_t count = 0;
        for (int y = 0; y < bh; y++) {
            const uint32_t *row = labels + (size_t)(b->y0 + y) * W + b->x0;
            uint8_t *st = state + (size_t)y * bw;
            for (int x = 0; x < bw; x++) {
                st[x] = row[x] == v ? PX_MASK : PX_BACKGROUND;
                count += st[x];
            }
        }
        if (min_size > 0 && count < (size_t)min_size) {
            for (int y = 0; y < bh; y++) {
                uint32_t *row = labels + (size_t)(b->y0 + y) * W + b->x0;
                for (int x = 0; x < bw; x++)
                    if (row[x] == v) row[x] = 0;
            }
            continue;
        }
        if (count == 0) continue;

        /* binary_fill_holes: flood the background from the box border
         * (4-connected); whatever it does not reach is mask or hole. */
        size_t top = 0;
#define SEED(xx, yy)                                                  \
    do {                                                              \
        size_t k_ = (size_t)(yy) * (size_t)bw + (size_t)(xx);         \
        if (state[k_] == PX_BACKGROUND) {                             \
            state[k_] = PX_OUTSIDE;                                   \
            stack[top++] = (uint32_t)k_;                              \
        }                                                             \
    } while (0)
        for (int x = 0; x < bw; x++) {
            SEED(x, 0);
            SEED(x, bh - 1);
        }
        for (int y = 0; y < bh; y++) {
            SEED(0, y);
            SEED(bw - 1, y);
        }
        while (top > 0) {
            uint32_t k = stack[--top];
            int y = (int)(k / (uint32_t)bw), x = (int)(k % (uint32_t)bw);
            if (x > 0) SEED(x - 1, y);
            if (x + 1 < bw) SEED(x + 1, y);
            if (y > 0) SEED(x, y - 1);
            if (y + 1 < bh) SEED(x, y + 1);
        }
#undef SEED
        next++;
        for (int y = 0; y < bh; y++) {
            uint32_t *row = labels + (size_t)(b->y0 + y) * W + b->x0;
            const uint8_t *st = state + (size_t)y * bw;
            for (int x = 0; x < bw; x++)
                if (st[x] != PX_OUTSIDE) row[x] = next;
        }
    }
    cs_free(state);
    cs_free(stack);
    cs_free(boxes);
    return CELLSAM_OK;
}

/* ------------------------------------------------------------ boundaries */

int cs_subtract_boundaries(uint32_t *labels, int H, int W) {
    if (!labels) return cs_error(CELLSAM_ERR_INVALID, "subtract boundaries: NULL labels");
    int rc = check_size(H, W, "subtract boundaries");
    if (rc) return rc;
    /* In place: rows top to bottom and each row right to left, so the left
     * neighbour and the row below still hold their original values. */
    for (int y = 0; y < H; y++) {
        uint32_t *row = labels + (size_t)y * W;
        const uint32_t *below = y + 1 < H ? row + W : NULL;
        for (int x = W - 1; x >= 0; x--) {
            int edge = (x > 0 && row[x - 1] != row[x]) || (below && below[x] != row[x]);
            if (edge) row[x] = 0;
        }
    }
    return CELLSAM_OK;
}

/* ----------------------------------------------------------------- boxes */

void cs_box_to_orig_frame(const float box1024[4], int H, int W, double out[4]) {
    double sx = (double)W / 1024.0, sy = (double)H / 1024.0;
    out[0] = (double)box1024[0] * sx;
    out[1] = (double)box1024[1] * sy;
    out[2] = (double)box1024[2] * sx;
    out[3] = (double)box1024[3] * sy;
}
