/* CellSAM pre-processing, bit-faithful to the official code (numpy 1.24,
 * scikit-image 0.19, PyTorch CPU float32). Every rounding step below mirrors one
 * in the reference; comments name the Python expression it reproduces. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "preprocess.h"

/* Bit fidelity needs every a*b+c below to round twice, exactly as written (the one
 * deliberate fused multiply-add calls fmaf). GCC contracts nothing in ISO C mode
 * (-std=c11, as built); clang contracts within an expression unless told not to. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* ------------------------------------------------------------ shapes */

static int check_hw(int H, int W) {
    if (H < 1 || W < 1) return cs_error(CELLSAM_ERR_INVALID, "image size %dx%d is empty", H, W);
    if (H > CS_PREP_MAX_SIDE || W > CS_PREP_MAX_SIDE || (size_t)H * (size_t)W > CS_PREP_MAX_PIXELS)
        return cs_error(CELLSAM_ERR_LIMIT,
                        "image size %dx%d exceeds the limit (%d per side, %zu pixels)", H, W,
                        CS_PREP_MAX_SIDE, CS_PREP_MAX_PIXELS);
    return CELLSAM_OK;
}

int cs_format_image_shape(const float *in, int ndim, const int64_t *shape, float **out_hw3, int *H,
                          int *W) {
    if (out_hw3) *out_hw3 = NULL;
    if (!in || !shape || !out_hw3 || !H || !W)
        return cs_error(CELLSAM_ERR_INVALID, "format_image_shape: NULL argument");
    if (ndim != 2 && ndim != 3)
        return cs_error(
            CELLSAM_ERR_INVALID,
            "image must be 2-D (H,W) or 3-D (H,W,C) in any axis order; got %d dimensions", ndim);
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 1)
            return cs_error(CELLSAM_ERR_INVALID, "image axis %d has extent %lld", i,
                            (long long)shape[i]);
    /* Element (y, x, k) lives at y*sy + x*sx + k*sc in the C-order input. */
    int64_t h, w, c;
    size_t sy, sx, sc = 0;
    if (ndim == 2) {
        h = shape[0], w = shape[1], c = 1;
        sy = (size_t)w, sx = 1;
    } else {
        /* np.argmin(shape): the first smallest axis holds the channels; the other
         * two keep their order. */
        int ch = 0;
        for (int i = 1; i < 3; i++)
            if (shape[i] < shape[ch]) ch = i;
        int a0 = ch == 0 ? 1 : 0, a1 = ch == 2 ? 1 : 2;
        if (shape[0] > CS_PREP_MAX_SIDE || shape[1] > CS_PREP_MAX_SIDE ||
            shape[2] > CS_PREP_MAX_SIDE)
            return cs_error(CELLSAM_ERR_LIMIT, "image axis extent exceeds %d", CS_PREP_MAX_SIDE);
        size_t stride[3] = {(size_t)(shape[1] * shape[2]), (size_t)shape[2], 1};
        h = shape[a0], w = shape[a1], c = shape[ch];
        sy = stride[a0], sx = stride[a1], sc = stride[ch];
    }
    if (c > 3)
        return cs_error(
            CELLSAM_ERR_INVALID,
            "image has %lld channels (the smallest axis is taken as channels); at most 3 "
            "are supported",
            (long long)c);
    if (h > CS_PREP_MAX_SIDE || w > CS_PREP_MAX_SIDE)
        return cs_error(CELLSAM_ERR_LIMIT, "image size %lldx%lld exceeds %d per side", (long long)h,
                        (long long)w, CS_PREP_MAX_SIDE);
    int rc = check_hw((int)h, (int)w);
    if (rc) return rc;
    size_t npix = (size_t)h * (size_t)w, n3;
    if (cs_mul_size(npix, 3, &n3)) return cs_error(CELLSAM_ERR_LIMIT, "image too large");
    float *out = cs_calloc(n3, sizeof(float));
    if (!out) return CELLSAM_ERR_NOMEM;
    int off = 3 - (int)c; /* out[..., 3-C:] = img */
    for (int64_t y = 0; y < h; y++)
        for (int64_t x = 0; x < w; x++) {
            const float *src = in + (size_t)y * sy + (size_t)x * sx;
            float *dst = out + ((size_t)y * (size_t)w + (size_t)x) * 3 + off;
            for (int64_t k = 0; k < c; k++) dst[k] = src[(size_t)k * sc];
        }
    *out_hw3 = out;
    *H = (int)h;
    *W = (int)w;
    return CELLSAM_OK;
}

/* ------------------------------------------------------------ percentiles */

static inline void swapf(float *a, float *b) {
    float t = *a;
    *a = *b;
    *b = t;
}

static void sift_down(float *a, size_t root, size_t n) {
    for (;;) {
        size_t child = 2 * root + 1;
        if (child >= n) return;
        if (child + 1 < n && a[child + 1] > a[child]) child++;
        if (!(a[child] > a[root])) return;
        swapf(&a[root], &a[child]);
        root = child;
    }
}

/* In-place heapsort: O(n log n) whatever the input, no allocation. */
static void heap_sort(float *a, size_t n) {
    if (n < 2) return;
    for (size_t i = n / 2; i-- > 0;) sift_down(a, i, n);
    for (size_t end = n - 1; end > 0; end--) {
        swapf(&a[0], &a[end]);
        sift_down(a, 0, end);
    }
}

/* Partially order a[0..n) so that a[k] is the k-th smallest and every later
 * element is >= a[k]. Three-way quickselect (copes with many equal values); falls
 * back to heapsort of the remaining range if pivots keep failing, so adversarial
 * inputs cost O(n log n), never O(n^2). */
static void select_kth(float *a, size_t n, size_t k) {
    size_t lo = 0, hi = n;
    int budget = 16;
    for (size_t m = n; m > 1; m >>= 1) budget += 2;
    while (hi - lo > 32) {
        if (budget-- <= 0) break;
        size_t mid = lo + (hi - lo) / 2;
        float x = a[lo], y = a[mid], z = a[hi - 1];
        float pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        size_t lt = lo, i = lo, gt = hi;
        while (i < gt) {
            if (a[i] < pivot)
                swapf(&a[lt++], &a[i++]);
            else if (a[i] > pivot)
                swapf(&a[i], &a[--gt]);
            else
                i++;
        }
        if (k < lt)
            hi = lt;
        else if (k >= gt)
            lo = gt;
        else
            return;
    }
    heap_sort(a + lo, hi - lo);
}

/* numpy 'linear' percentiles of buf[0..m) (m >= 1, all values non-zero and not
 * NaN); buf is reordered. */
static void percentiles_of(float *buf, size_t m, const double *pct, int n_pct, int float32_data,
                           double *out) {
    for (int p = 0; p < n_pct; p++) {
        /* virtual index (n-1)*q with q = pct/100 (float64) */
        double q = pct[p] / 100.0;
        double vi = (double)(m - 1) * q;
        if (vi >= (double)(m - 1)) {
            /* numpy takes the last element (index -1) for both neighbours */
            float mx = buf[0];
            for (size_t i = 1; i < m; i++)
                if (buf[i] > mx) mx = buf[i];
            out[p] = mx;
            continue;
        }
        double prev = floor(vi);
        size_t k = (size_t)prev;
        double gamma = vi - prev;
        select_kth(buf, m, k);
        float a = buf[k], b = buf[k + 1];
        for (size_t i = k + 2; i < m; i++)
            if (buf[i] < b) b = buf[i];
        /* _lerp: diff = b - a in the array dtype; the float64 gamma promotes the
         * rest; from the upper neighbour when gamma >= 0.5 */
        double diff = float32_data ? (double)(b - a) : (double)b - (double)a;
        double step = gamma >= 0.5 ? diff * (1.0 - gamma) : diff * gamma;
        out[p] = gamma >= 0.5 ? (double)b - step : (double)a + step;
    }
}

static int check_pcts(const double *pct, int n_pct) {
    for (int i = 0; i < n_pct; i++)
        if (!(pct[i] >= 0.0 && pct[i] <= 100.0))
            return cs_error(CELLSAM_ERR_INVALID, "percentile %g outside [0,100]", pct[i]);
    return CELLSAM_OK;
}

int cs_percentile_nonzero(const float *v, size_t n, const double *pct, int n_pct, int float32_data,
                          double *out) {
    if ((!v && n) || !pct || !out || n_pct < 1)
        return -cs_error(CELLSAM_ERR_INVALID, "percentile: NULL argument");
    if (check_pcts(pct, n_pct)) return -CELLSAM_ERR_INVALID;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(v[i])) return -cs_error(CELLSAM_ERR_INVALID, "image contains NaN");
        m += v[i] != 0.0f;
    }
    if (m == 0) return 0;
    float *buf = cs_alloc(m, sizeof(float));
    if (!buf) return -CELLSAM_ERR_NOMEM;
    for (size_t i = 0, j = 0; i < n; i++)
        if (v[i] != 0.0f) buf[j++] = v[i];
    percentiles_of(buf, m, pct, n_pct, float32_data, out);
    cs_free(buf);
    return 1;
}

int cs_percentile_clip(const float *v, size_t n, float *out, double *threshold) {
    if (!v || !threshold) return -cs_error(CELLSAM_ERR_INVALID, "percentile_clip: NULL argument");
    const double pct = 99.9;
    int r = cs_percentile_nonzero(v, n, &pct, 1, 0, threshold);
    if (r < 0) return r;
    if (out) {
        if (r == 0) {
            memmove(out, v, n * sizeof(float));
        } else {
            /* current_img[current_img > img_max] = img_max (float64 image). */
            double t = *threshold;
            for (size_t i = 0; i < n; i++) out[i] = (double)v[i] > t ? (float)t : v[i];
        }
    }
    return r;
}

/* ------------------------------------------------------------ CLAHE */

enum {
    CLAHE_KERNEL = 128,
    CLAHE_HALF = CLAHE_KERNEL / 2,
    CLAHE_NBINS = 256,
    CLAHE_GRAY = 1 << 14,                          /* NR_OF_GRAY */
    CLAHE_BIN_SIZE = 1 + CLAHE_GRAY / CLAHE_NBINS, /* 65 */
};

/* Index map of np.pad(np.arange(n), (left, right), mode='reflect'). numpy fills a
 * pad wider than the data in rounds, mirroring the part filled so far about the
 * current edge; replaying those rounds keeps odd sizes exact. A length-1 axis is
 * edge-padded (numpy's legacy behaviour). */
static void numpy_reflect_index(int n, int left, int right, int *out) {
    int total = left + n + right;
    if (n == 1) {
        for (int i = 0; i < total; i++) out[i] = 0;
        return;
    }
    for (int i = 0; i < n; i++) out[left + i] = i;
    while (left > 0 || right > 0) {
        int old_len = total - left - right - 1; /* the edge is not repeated */
        if (left > 0) {
            int chunk = old_len < left ? old_len : left;
            for (int k = 0; k < chunk; k++) out[left - 1 - k] = out[left + 1 + k];
            left -= chunk;
        }
        if (right > 0) {
            int chunk = old_len < right ? old_len : right;
            for (int k = 0; k < chunk; k++) out[total - right + k] = out[total - right - 2 - k];
            right -= chunk;
        }
    }
}

/* clip_histogram(hist, clip_limit) of skimage, step by step. */
static void clip_histogram(int64_t *hist, int64_t clim) {
    int64_t n_excess = 0;
    for (int k = 0; k < CLAHE_NBINS; k++)
        if (hist[k] > clim) {
            n_excess += hist[k] - clim;
            hist[k] = clim;
        }
    int64_t bin_incr = n_excess / CLAHE_NBINS;
    int64_t upper = clim - bin_incr;
    int64_t n_low = 0;
    for (int k = 0; k < CLAHE_NBINS; k++)
        if (hist[k] < upper) {
            hist[k] += bin_incr;
            n_low++;
        }
    n_excess -= n_low * bin_incr;
    /* mid_mask is evaluated after the low bins were raised. */
    for (int k = 0; k < CLAHE_NBINS; k++)
        if (hist[k] >= upper && hist[k] < clim) {
            n_excess += hist[k] - clim;
            hist[k] = clim;
        }
    while (n_excess > 0) {
        int64_t prev_excess = n_excess;
        for (int index = 0; index < CLAHE_NBINS; index++) {
            int64_t n_under = 0;
            for (int k = 0; k < CLAHE_NBINS; k++) n_under += hist[k] < clim;
            int64_t step = n_under / n_excess;
            if (step < 1) step = 1;
            int64_t added = 0;
            for (int64_t k = index; k < CLAHE_NBINS; k += step)
                if (hist[k] < clim) {
                    hist[k]++;
                    added++;
                }
            n_excess -= added;
            if (n_excess <= 0) break;
        }
        if (prev_excess == n_excess) break;
    }
}

/* The CLAHE core from the uint16 image u (img_as_uint of the [0,1] input) to the
 * integer result levels (before the final rescale); levels may alias u. */
static int clahe_levels(const uint16_t *u, int H, int W, uint16_t *levels, int *lmin, int *lmax) {
    size_t npix = (size_t)H * (size_t)W;
    int nty = (H + CLAHE_KERNEL - 1) / CLAHE_KERNEL, ntx = (W + CLAHE_KERNEL - 1) / CLAHE_KERNEL;
    /* (k - s % k) % k + ceil(k/2) after, k//2 before */
    int pad_end_y = (CLAHE_KERNEL - H % CLAHE_KERNEL) % CLAHE_KERNEL + CLAHE_HALF;
    int pad_end_x = (CLAHE_KERNEL - W % CLAHE_KERNEL) % CLAHE_KERNEL + CLAHE_HALF;
    size_t ntiles = (size_t)nty * (size_t)ntx;
    uint8_t *bins = cs_alloc(npix, 1);
    int *rowmap = cs_alloc((size_t)CLAHE_HALF + (size_t)H + (size_t)pad_end_y, sizeof(int));
    int *colmap = cs_alloc((size_t)CLAHE_HALF + (size_t)W + (size_t)pad_end_x, sizeof(int));
    int32_t *maps = cs_alloc(ntiles, CLAHE_NBINS * sizeof(int32_t));
    if (!bins || !rowmap || !colmap || !maps) {
        cs_free(bins), cs_free(rowmap), cs_free(colmap), cs_free(maps);
        return CELLSAM_ERR_NOMEM;
    }

    /* rescale_intensity(u, out_range=(0, 16383)): numpy 1.x value-based casting
     * runs np.clip(uint16, float, float) in float32, so the whole expression is
     * float32: (u - umin) / (umax - umin) * 16383; then np.round (half to even). */
    int umin = 65535, umax = 0;
    for (size_t i = 0; i < npix; i++) {
        if (u[i] < umin) umin = u[i];
        if (u[i] > umax) umax = u[i];
    }
    uint8_t *lut = cs_alloc(65536, 1);
    if (!lut) {
        cs_free(bins), cs_free(rowmap), cs_free(colmap), cs_free(maps);
        return CELLSAM_ERR_NOMEM;
    }
    float range = (float)(umax - umin);
    for (int v = umin; v <= umax; v++) {
        int g;
        if (umax == umin) {
            g = v < CLAHE_GRAY - 1 ? v : CLAHE_GRAY - 1; /* np.clip(image, omin, omax) */
        } else {
            float f = (float)(v - umin) / range;
            f = f * (float)(CLAHE_GRAY - 1);
            g = (int)rint((double)f);
        }
        lut[v] = (uint8_t)(g / CLAHE_BIN_SIZE);
    }
    for (size_t i = 0; i < npix; i++) bins[i] = lut[u[i]];
    cs_free(lut);

    numpy_reflect_index(H, CLAHE_HALF, pad_end_y, rowmap);
    numpy_reflect_index(W, CLAHE_HALF, pad_end_x, colmap);
    /* Padded coordinate p maps to original index map[p]; tile t covers padded
     * [64 + 128 t, 64 + 128 (t+1)). */
    const int *trow = rowmap + CLAHE_HALF, *tcol = colmap + CLAHE_HALF;
    /* clim = int(np.clip(clip_limit * kernel_elements, 1, None)) = int(163.84) */
    const int64_t clim = (int64_t)fmax(0.01 * (double)(CLAHE_KERNEL * CLAHE_KERNEL), 1.0);
    const double scale = (double)(CLAHE_GRAY - 1) / (double)(CLAHE_KERNEL * CLAHE_KERNEL);
    for (int ty = 0; ty < nty; ty++)
        for (int tx = 0; tx < ntx; tx++) {
            int64_t hist[CLAHE_NBINS] = {0};
            for (int r = 0; r < CLAHE_KERNEL; r++) {
                const uint8_t *brow = bins + (size_t)trow[ty * CLAHE_KERNEL + r] * (size_t)W;
                const int *cols = tcol + tx * CLAHE_KERNEL;
                for (int c = 0; c < CLAHE_KERNEL; c++) hist[brow[cols[c]]]++;
            }
            clip_histogram(hist, clim);
            /* map_histogram: int(min(cumsum * 16383/16384, 16383)) in float64 */
            int32_t *m = maps + ((size_t)ty * (size_t)ntx + (size_t)tx) * CLAHE_NBINS;
            int64_t cum = 0;
            for (int k = 0; k < CLAHE_NBINS; k++) {
                cum += hist[k];
                double val = (double)cum * scale;
                if (val > CLAHE_GRAY - 1) val = CLAHE_GRAY - 1;
                m[k] = (int32_t)val;
            }
        }

    /* Interpolation: pixel at padded p = y + 64 lies in block p / 128 at offset
     * p % 128; its four neighbour maps are tiles block-1 and block (clamped: the
     * map grid is edge-padded by one). Each product int * float64 coefficient is
     * rounded to float32 and summed in float32 in edge order (0,0),(0,1),(1,0),(1,1);
     * the sum is truncated to an integer (astype(uint16)). */
    int lo = 65535, hi = 0;
    for (int y = 0; y < H; y++) {
        int py = y + CLAHE_HALF, by = py / CLAHE_KERNEL, ry = py % CLAHE_KERNEL;
        int ta = by - 1 < 0 ? 0 : by - 1, tb = by > nty - 1 ? nty - 1 : by;
        double wr1 = (double)ry / CLAHE_KERNEL, wr0 = 1.0 - wr1;
        for (int x = 0; x < W; x++) {
            int px = x + CLAHE_HALF, bx = px / CLAHE_KERNEL, rx = px % CLAHE_KERNEL;
            int tc = bx - 1 < 0 ? 0 : bx - 1, td = bx > ntx - 1 ? ntx - 1 : bx;
            double wc1 = (double)rx / CLAHE_KERNEL, wc0 = 1.0 - wc1;
            size_t i = (size_t)y * (size_t)W + (size_t)x;
            int b = bins[i];
            const int32_t *m00 = maps + ((size_t)ta * (size_t)ntx + (size_t)tc) * CLAHE_NBINS;
            const int32_t *m01 = maps + ((size_t)ta * (size_t)ntx + (size_t)td) * CLAHE_NBINS;
            const int32_t *m10 = maps + ((size_t)tb * (size_t)ntx + (size_t)tc) * CLAHE_NBINS;
            const int32_t *m11 = maps + ((size_t)tb * (size_t)ntx + (size_t)td) * CLAHE_NBINS;
            /* edge_coeffs = column coefficient * row coefficient (np.prod order) */
            float t00 = (float)((double)m00[b] * (wc0 * wr0));
            float t01 = (float)((double)m01[b] * (wc1 * wr0));
            float t10 = (float)((double)m10[b] * (wc0 * wr1));
            float t11 = (float)((double)m11[b] * (wc1 * wr1));
            float acc = 0.0f;
            acc += t00;
            acc += t01;
            acc += t10;
            acc += t11;
            int lev = (int)acc;
            levels[i] = (uint16_t)lev;
            if (lev < lo) lo = lev;
            if (lev > hi) hi = lev;
        }
    }
    *lmin = lo;
    *lmax = hi;
    cs_free(bins), cs_free(rowmap), cs_free(colmap), cs_free(maps);
    return CELLSAM_OK;
}

/* Final rescale_intensity(image.astype(float64)) of the CLAHE levels. */
static inline double clahe_rescale(int level, int lmin, int lmax) {
    if (lmax == lmin) return level < 0 ? 0.0 : (level > 1 ? 1.0 : (double)level);
    return ((double)level - (double)lmin) / ((double)lmax - (double)lmin);
}

/* img_as_uint of a float64 value in [0,1]: rint(x * 65535) (half to even), clipped. */
static inline uint16_t to_uint16_level(double x01) {
    double v = rint(x01 * 65535.0);
    if (v < 0) v = 0;
    if (v > 65535) v = 65535;
    return (uint16_t)v;
}

int cs_clahe(const double *x, int H, int W, double *out) {
    if (!x || !out) return cs_error(CELLSAM_ERR_INVALID, "clahe: NULL argument");
    int rc = check_hw(H, W);
    if (rc) return rc;
    size_t npix = (size_t)H * (size_t)W;
    for (size_t i = 0; i < npix; i++)
        if (!(x[i] >= -1.0 && x[i] <= 1.0))
            return cs_error(CELLSAM_ERR_INVALID, "clahe: input values must lie in [-1,1] (got %g)",
                            x[i]);
    uint16_t *u = cs_alloc(npix, sizeof(uint16_t));
    if (!u) return CELLSAM_ERR_NOMEM;
    for (size_t i = 0; i < npix; i++) u[i] = to_uint16_level(x[i]);
    int lmin, lmax;
    rc = clahe_levels(u, H, W, u, &lmin, &lmax);
    if (rc == CELLSAM_OK)
        for (size_t i = 0; i < npix; i++) out[i] = clahe_rescale(u[i], lmin, lmax);
    cs_free(u);
    return rc;
}

/* ------------------------------------------------------------ normalize_image */

int cs_normalize_image(const float *hw3, int H, int W, float *out_chw) {
    if (!hw3 || !out_chw) return cs_error(CELLSAM_ERR_INVALID, "normalize_image: NULL argument");
    int rc = check_hw(H, W);
    if (rc) return rc;
    size_t npix = (size_t)H * (size_t)W;
    for (size_t i = 0; i < npix * 3; i++)
        if (!isfinite(hw3[i]))
            return cs_error(CELLSAM_ERR_INVALID,
                            "image contains NaN or infinite values (pixel %zu)", i / 3);
    float *nonzero = cs_alloc(npix, sizeof(float)); /* percentile scratch */
    uint16_t *u = cs_alloc(npix, sizeof(uint16_t));
    if (!nonzero || !u) {
        cs_free(nonzero), cs_free(u);
        return CELLSAM_ERR_NOMEM;
    }
    static const double pct999 = 99.9;
    for (int c = 0; c < 3 && rc == CELLSAM_OK; c++) {
        const float *src = hw3 + c; /* stride 3 */
        float *dst = out_chw + (size_t)c * npix;
        /* _percentile_threshold: float64 99.9 percentile of the non-zero values;
         * values above it are set to it (a blank channel stays as it is) */
        size_t m = 0;
        for (size_t i = 0; i < npix; i++)
            if (src[3 * i] != 0.0f) nonzero[m++] = src[3 * i];
        double t = 0;
        if (m) percentiles_of(nonzero, m, &pct999, 1, 0, &t);
#define CLIPPED(v) (m && (double)(v) > t ? t : (double)(v))
        /* _histogram_normalization: a constant channel becomes 0 */
        double first = CLIPPED(src[0]), vmin = first, vmax = first;
        for (size_t i = 1; i < npix; i++) {
            double v = CLIPPED(src[3 * i]);
            if (v < vmin) vmin = v;
            if (v > vmax) vmax = v;
        }
        if (vmin == vmax) {
            memset(dst, 0, npix * sizeof(float));
            continue;
        }
        /* rescale_intensity(X, out_range=(0,1)) in float64, then img_as_uint */
        double range = vmax - vmin;
        for (size_t i = 0; i < npix; i++)
            u[i] = to_uint16_level((CLIPPED(src[3 * i]) - vmin) / range);
#undef CLIPPED
        int lmin, lmax;
        rc = clahe_levels(u, H, W, u, &lmin, &lmax);
        if (rc) break;
        for (size_t i = 0; i < npix; i++) dst[i] = (float)clahe_rescale(u[i], lmin, lmax);
    }
    cs_free(nonzero);
    cs_free(u);
    return rc;
}

/* ------------------------------------------------------------ antialiased resize */

typedef struct {
    int64_t *xmin, *xsize;
    float *w; /* n_out x taps */
    int taps;
} aa_axis;

static void aa_axis_free(aa_axis *ax) {
    cs_free(ax->xmin), cs_free(ax->xsize), cs_free(ax->w);
    memset(ax, 0, sizeof *ax);
}

static inline float aa_filter(float x) {
    if (x < 0.0f) x = -x;
    if (x < 1.0f) return (float)(1.0 - (double)x);
    return 0.0f;
}

/* PyTorch _compute_weights_aa with scalar_t = float. The mixed float/double
 * expressions follow the C++ source, where literals like 0.5 are double. */
static int aa_axis_init(int n_in, int n_out, aa_axis *ax) {
    memset(ax, 0, sizeof *ax);
    float scale = (float)n_in / (float)n_out;
    float support = scale >= 1.0f ? scale : 1.0f;
    float invscale = scale >= 1.0f ? (float)(1.0 / (double)scale) : 1.0f;
    double taps_d = ceil((double)support) * 2 + 1;
    if (taps_d > (double)(2 * CS_PREP_MAX_SIDE + 3))
        return cs_error(CELLSAM_ERR_LIMIT, "resize ratio %d -> %d too large", n_in, n_out);
    int taps = (int)taps_d;
    ax->taps = taps;
    ax->xmin = cs_alloc((size_t)n_out, sizeof(int64_t));
    ax->xsize = cs_alloc((size_t)n_out, sizeof(int64_t));
    ax->w = cs_alloc((size_t)n_out, (size_t)taps * sizeof(float));
    if (!ax->xmin || !ax->xsize || !ax->w) {
        aa_axis_free(ax);
        return CELLSAM_ERR_NOMEM;
    }
    for (int i = 0; i < n_out; i++) {
        float center = (float)((double)scale * ((double)i + 0.5));
        int64_t xmin = (int64_t)((double)(center - support) + 0.5);
        if (xmin < 0) xmin = 0;
        int64_t xmax = (int64_t)((double)(center + support) + 0.5);
        if (xmax > n_in) xmax = n_in;
        int64_t xsize = xmax - xmin;
        if (xsize < 0) xsize = 0;
        if (xsize > taps) xsize = taps;
        float *w = ax->w + (size_t)i * (size_t)taps;
        float total = 0.0f;
        for (int64_t j = 0; j < xsize; j++) {
            float d = (float)(j + xmin) - center;
            float arg = (float)(((double)d + 0.5) * (double)invscale);
            w[j] = aa_filter(arg);
            total += w[j];
        }
        for (int64_t j = 0; j < xsize; j++)
            if (total != 0.0f) w[j] /= total;
        for (int64_t j = xsize; j < taps; j++) w[j] = 0.0f;
        ax->xmin[i] = xmin;
        ax->xsize[i] = xsize;
    }
    return CELLSAM_OK;
}

/* out = t0*w0 + t1*w1 + ... accumulated in float32 in increasing j, matching the
 * reference build of PyTorch bit for bit: there the accumulation loop
 * (`output += t * wts`) is compiled with FMA contraction and GCC's in-order
 * ("fold-left") vectorisation, so the taps j = 1..4k (k = (n-1)/4 vector
 * iterations of 4) are a separate multiply then add, and the remaining (n-1)%4
 * scalar taps are fused multiply-adds. Found by matching unit_resize/ and the
 * case maps exactly; any other order differs by an ulp here and there. */
static inline float aa_dot(const float *src, size_t stride, const float *w, int64_t n) {
    if (n <= 0) return 0.0f;
    float acc = src[0] * w[0];
    int64_t vec_end = 4 * ((n - 1) / 4);
    int64_t j = 1;
    for (; j <= vec_end; j++) {
        float p = src[(size_t)j * stride] * w[j];
        acc += p;
    }
    for (; j < n; j++) acc = fmaf(src[(size_t)j * stride], w[j], acc);
    return acc;
}

int cs_resize_bilinear_aa(const float *in, int C, int Hin, int Win, float *out, int Hout,
                          int Wout) {
    return cs_resize_bilinear_aa_band(in, C, Hin, Win, out, Hout, Wout, CS_RESIZE_BAND_FLOATS);
}

/* Taller inputs are resized in bands of output rows; rows two bands share are
 * recomputed identically, so the result does not depend on the band size. */
int cs_resize_bilinear_aa_band(const float *in, int C, int Hin, int Win, float *out, int Hout,
                               int Wout, size_t band_floats) {
    if (!in || !out || C < 1) return cs_error(CELLSAM_ERR_INVALID, "resize: bad argument");
    int rc = check_hw(Hin, Win);
    if (!rc) rc = check_hw(Hout, Wout);
    if (rc) return rc;
    aa_axis ax, ay;
    rc = aa_axis_init(Win, Wout, &ax);
    if (rc) return rc;
    rc = aa_axis_init(Hin, Hout, &ay);
    if (rc) {
        aa_axis_free(&ax);
        return rc;
    }
    size_t band_rows = band_floats / (size_t)Wout;
    if (band_rows < (size_t)ay.taps) band_rows = (size_t)ay.taps;
    if (band_rows > (size_t)Hin) band_rows = (size_t)Hin;
    float *tmp = cs_alloc(band_rows, (size_t)Wout * sizeof(float));
    if (!tmp) {
        aa_axis_free(&ax), aa_axis_free(&ay);
        return CELLSAM_ERR_NOMEM;
    }
    for (int c = 0; c < C; c++) {
        const float *plane = in + (size_t)c * (size_t)Hin * (size_t)Win;
        for (int y0 = 0; y0 < Hout;) {
            /* input rows [r0, r1) feed output rows [y0, y1) */
            int64_t r0 = ay.xmin[y0], r1 = r0 + ay.xsize[y0];
            int y1 = y0 + 1;
            while (y1 < Hout && ay.xmin[y1] + ay.xsize[y1] - r0 <= (int64_t)band_rows) {
                if (ay.xmin[y1] + ay.xsize[y1] > r1) r1 = ay.xmin[y1] + ay.xsize[y1];
                y1++;
            }
            /* horizontal pass (contiguous axis) into the float32 temporary */
            for (int64_t r = r0; r < r1; r++) {
                const float *src = plane + (size_t)r * (size_t)Win;
                float *dst = tmp + (size_t)(r - r0) * (size_t)Wout;
                for (int x = 0; x < Wout; x++)
                    dst[x] = aa_dot(src + ax.xmin[x], 1, ax.w + (size_t)x * (size_t)ax.taps,
                                    ax.xsize[x]);
            }
            /* vertical pass */
            for (int y = y0; y < y1; y++) {
                const float *src = tmp + (size_t)(ay.xmin[y] - r0) * (size_t)Wout;
                const float *w = ay.w + (size_t)y * (size_t)ay.taps;
                float *dst = out + ((size_t)c * (size_t)Hout + (size_t)y) * (size_t)Wout;
                for (int x = 0; x < Wout; x++)
                    dst[x] = aa_dot(src + x, (size_t)Wout, w, ay.xsize[y]);
            }
            y0 = y1;
        }
    }
    cs_free(tmp);
    aa_axis_free(&ax), aa_axis_free(&ay);
    return CELLSAM_OK;
}

/* ------------------------------------------------------------ network inputs */

static const float k_sam_mean[3] = {123.675f, 116.28f, 103.53f}; /* pixel_mean buffer */
static const float k_sam_std[3] = {58.395f, 57.12f, 57.375f};    /* pixel_std buffer */
static const float k_imagenet_mean[3] = {0.485f, 0.456f, 0.406f};
static const float k_imagenet_std[3] = {0.229f, 0.224f, 0.225f};
static const float k_minmax_eps = 1e-6f;

/* ToPILImage: pic.mul(255).byte(). PyTorch wraps out-of-range values; inputs
 * here are in [0,1], so saturating is a documented stand-in. */
static inline uint8_t to_u8(float x) {
    float v = x * 255.0f;
    if (!(v > 0.0f)) return 0;
    if (v >= 255.0f) return 255;
    return (uint8_t)(int)v;
}

/* kornia normalize_min_max over n values in place:
 * (max_val - min_val) * (x - x_min) / (x_max - x_min + eps) + min_val. */
static void kornia_minmax(float *x, size_t n) {
    float mn = x[0], mx = x[0];
    for (size_t i = 1; i < n; i++) {
        if (x[i] < mn) mn = x[i];
        if (x[i] > mx) mx = x[i];
    }
    float den = (mx - mn) + k_minmax_eps;
    for (size_t i = 0; i < n; i++) x[i] = (1.0f * (x[i] - mn)) / den + 0.0f;
}

/* Branch D from the resized map; every output pointer may be NULL. */
static void det_branch(const float *res, float *det_in, uint8_t *u8_out, float *norm_out,
                       cs_prep_trace *tr) {
    const size_t n = (size_t)CS_PREP_SIZE * CS_PREP_SIZE;
    float chan_max[3] = {0, 0, 0};
    for (int c = 0; c < 3; c++) {
        const float *src = res + (size_t)c * n;
        /* After the uint8 cast each channel takes 256 values at most: evaluate the
         * float32 sequence once per value. */
        float norm[256], fin[256];
        int present[256] = {0};
        for (int q = 0; q < 256; q++) {
            float y = ((float)q - k_sam_mean[c]) / k_sam_std[c];    /* sam_preprocess */
            norm[q] = (y - k_imagenet_mean[c]) / k_imagenet_std[c]; /* ImageNet */
        }
        for (size_t i = 0; i < n; i++) present[to_u8(src[i])] = 1;
        float mn = 0, mx = 0;
        int first = 1;
        for (int q = 0; q < 256; q++)
            if (present[q]) {
                if (first || norm[q] < mn) mn = norm[q];
                if (first || norm[q] > mx) mx = norm[q];
                first = 0;
            }
        float den = (mx - mn) + k_minmax_eps;
        float cmax = 0;
        first = 1;
        for (int q = 0; q < 256; q++) {
            fin[q] = (1.0f * (norm[q] - mn)) / den + 0.0f;
            if (present[q] && (first || fin[q] > cmax)) cmax = fin[q], first = 0;
        }
        chan_max[c] = cmax;
        for (size_t i = 0; i < n; i++) {
            uint8_t q = to_u8(src[i]);
            if (u8_out) u8_out[(size_t)c * n + i] = q;
            if (norm_out) norm_out[(size_t)c * n + i] = norm[q];
            if (det_in) det_in[(size_t)c * n + i] = fin[q];
        }
    }
    /* ToRGB: if max(ch1) == 0: ch1 = ch2; then if max(ch2) == 0: ch2 = ch1 */
    int c21 = 0, c12 = 0;
    if (chan_max[1] == 0.0f) {
        if (det_in) memcpy(det_in + n, det_in + 2 * n, n * sizeof(float));
        chan_max[1] = chan_max[2];
        c21 = 1;
    }
    if (chan_max[2] == 0.0f) {
        if (det_in) memcpy(det_in + 2 * n, det_in + n, n * sizeof(float));
        c12 = 1;
    }
    if (tr) tr->torgb_copied_2_to_1 = c21, tr->torgb_copied_1_to_2 = c12;
}

/* Branch S in place on the resized map x. */
static int sam_branch(float *x, cs_prep_trace *tr) {
    const size_t n = (size_t)CS_PREP_SIZE * CS_PREP_SIZE, n3 = 3 * n;
    /* PercentileThreshold(0, 99.5): np.percentile of the float32 non-zero values */
    static const double pcts[2] = {0.0, 99.5};
    double p[2] = {0, 0};
    size_t nnz = 0;
    for (size_t i = 0; i < n3; i++) nnz += x[i] != 0.0f;
    int r = cs_percentile_nonzero(x, n3, pcts, 2, 1, p);
    if (r < 0) return -r;
    int is_signed = 0;
    if (r == 0) {
        /* all zero: the official code crashes; define the output as zeros */
        memset(x, 0, n3 * sizeof(float));
    } else {
        /* rescale_intensity(img, in_range=(p0,p1), out_range="float32"): numpy 1.x
         * value-based casting keeps float32 arithmetic, the bounds cast to float32. */
        is_signed = !(p[0] >= 0.0);
        double omin = is_signed ? -1.0 : 0.0, omax = 1.0;
        float lo = (float)p[0], hi = (float)p[1];
        if (p[0] != p[1]) {
            float den = (float)(p[1] - p[0]);
            float oscale = (float)(omax - omin), ooff = (float)omin;
            for (size_t i = 0; i < n3; i++) {
                float v = x[i] < lo ? lo : x[i];
                v = v > hi ? hi : v;
                v = (v - lo) / den;
                v = v * oscale;
                x[i] = v + ooff;
            }
        } else {
            float v = lo < (float)omin ? (float)omin : lo;
            v = v > (float)omax ? (float)omax : v;
            for (size_t i = 0; i < n3; i++) x[i] = v;
        }
    }
    if (tr) {
        tr->p0 = r ? p[0] : 0.0;
        tr->p99_5 = r ? p[1] : 0.0;
        tr->n_nonzero = nnz;
        tr->rescale_signed = is_signed;
        if (tr->sam_pct) memcpy(tr->sam_pct, x, n3 * sizeof(float));
    }
    for (int c = 0; c < 3; c++) {
        float *ch = x + (size_t)c * n;
        for (size_t i = 0; i < n; i++) ch[i] = (ch[i] - k_imagenet_mean[c]) / k_imagenet_std[c];
    }
    if (tr && tr->sam_imagenet) memcpy(tr->sam_imagenet, x, n3 * sizeof(float));
    for (int c = 0; c < 3; c++) kornia_minmax(x + (size_t)c * n, n);
    if (tr && tr->sam_minmax) memcpy(tr->sam_minmax, x, n3 * sizeof(float));
    for (int c = 0; c < 3; c++) {
        /* sam_preprocess(div_255=True): buffers divided by 255 in float32 */
        float mean = k_sam_mean[c] / 255.0f, stdv = k_sam_std[c] / 255.0f;
        float *ch = x + (size_t)c * n;
        for (size_t i = 0; i < n; i++) ch[i] = (ch[i] - mean) / stdv;
    }
    return CELLSAM_OK;
}

int cs_prep_branches_trace(const float *chw_norm, int H, int W, float *sam_in, float *det_in,
                           cs_prep_trace *tr) {
    if (!chw_norm) return cs_error(CELLSAM_ERR_INVALID, "prep_branches: NULL image");
    int rc = check_hw(H, W);
    if (rc) return rc;
    size_t npix = (size_t)H * (size_t)W;
    for (size_t i = 0; i < 3 * npix; i++)
        if (!isfinite(chw_norm[i]))
            return cs_error(CELLSAM_ERR_INVALID, "image contains NaN or infinite values");
    if (tr) {
        tr->p0 = tr->p99_5 = 0;
        tr->n_nonzero = 0;
        tr->rescale_signed = tr->torgb_copied_1_to_2 = tr->torgb_copied_2_to_1 = 0;
    }
    const size_t n3 = (size_t)3 * CS_PREP_SIZE * CS_PREP_SIZE;
    int want_det = det_in || (tr && (tr->det_u8 || tr->det_norm));
    int want_sam = sam_in || (tr && (tr->sam_pct || tr->sam_imagenet || tr->sam_minmax));
    /* The SAM branch works in place, so the resized map goes straight into sam_in. */
    float *res = sam_in ? sam_in : cs_alloc(n3, sizeof(float));
    if (!res) return CELLSAM_ERR_NOMEM;
    if (H == CS_PREP_SIZE && W == CS_PREP_SIZE)
        memcpy(res, chw_norm, n3 * sizeof(float)); /* v2.Resize returns the input */
    else
        rc = cs_resize_bilinear_aa(chw_norm, 3, H, W, res, CS_PREP_SIZE, CS_PREP_SIZE);
    if (!rc && tr && tr->resized) memcpy(tr->resized, res, n3 * sizeof(float));
    if (!rc && want_det)
        det_branch(res, det_in, tr ? tr->det_u8 : NULL, tr ? tr->det_norm : NULL, tr);
    if (!rc && want_sam) rc = sam_branch(res, tr);
    if (res != sam_in) cs_free(res);
    return rc;
}

int cs_prep_branches(const float *chw_norm, int H, int W, float *sam_in, float *det_in) {
    return cs_prep_branches_trace(chw_norm, H, W, sam_in, det_in, NULL);
}
