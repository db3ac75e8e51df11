/* Dynamic detection threshold (spec §3.4 step 2, trap 20): scikit-learn 1.2.1
 * KMeans(n_clusters=2, random_state=42) on the 1-D float32 score vector, replayed
 * operation by operation so that the cluster centres come out bit-identical:
 *  - numpy legacy RandomState(42) (MT19937, 53-bit doubles, masked randint);
 *  - n_init = 10 (the pre-1.4 default), greedy k-means++ with 2 local trials,
 *    distances from sklearn's float64 "upcast" path rounded to float32, numpy
 *    float32 pairwise sums, float64 cumulative sum + searchsorted;
 *  - data centred by its float32 mean, tol = 1e-4 * float32 variance;
 *  - Lloyd in float32: -2 x.c + |c|^2 distances, per-thread partial sums over
 *    256-sample chunks (static OpenMP schedule), centre = sum * float(1/count).
 * Every float expression below is written in the order sklearn/numpy evaluate it;
 * contraction into FMA must stay off (GCC's ISO C mode default). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cellfinder.h"
#include "common.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#define KM_MAX_SAMPLES (1 << 24) /* float32 counts stay exact */
#define KM_CHUNK 256             /* sklearn's CHUNK_SIZE in _k_means_lloyd.pyx */
#define KM_N_INIT 10
#define KM_MAX_ITER 300

/* ---------------------------------------------------------------- MT19937 */

void cs_np_random_seed(cs_np_random_state *rs, uint32_t seed) {
    rs->mt[0] = seed;
    for (int i = 1; i < 624; i++)
        rs->mt[i] = 1812433253u * (rs->mt[i - 1] ^ (rs->mt[i - 1] >> 30)) + (uint32_t)i;
    rs->pos = 624;
}

static void mt_refill(cs_np_random_state *rs) {
    uint32_t *mt = rs->mt;
    for (int i = 0; i < 624; i++) {
        uint32_t y = (mt[i] & 0x80000000u) | (mt[(i + 1) % 624] & 0x7fffffffu);
        mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    rs->pos = 0;
}

uint32_t cs_np_random_uint32(cs_np_random_state *rs) {
    if (rs->pos >= 624) mt_refill(rs);
    uint32_t y = rs->mt[rs->pos++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

double cs_np_random_sample(cs_np_random_state *rs) {
    uint32_t a = cs_np_random_uint32(rs) >> 5, b = cs_np_random_uint32(rs) >> 6;
    return ((double)a * 67108864.0 + (double)b) / 9007199254740992.0;
}

int64_t cs_np_random_randint(cs_np_random_state *rs, int64_t high) {
    if (high <= 1) return 0;
    uint64_t rng = (uint64_t)(high - 1);
    if (rng > 0xffffffffu) return -1; /* never needed here (n < 2^24) */
    uint32_t mask = (uint32_t)rng;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    uint32_t v;
    do {
        v = cs_np_random_uint32(rs) & mask;
    } while (v > rng);
    return (int64_t)v;
}

/* ------------------------------------------------------ numpy float32 sums */

/* numpy's pairwise summation for float32 add.reduce over a contiguous axis. */
static float np_pairwise_sum_f32(const float *a, size_t n) {
    if (n < 8) {
        float res = 0.f;
        for (size_t i = 0; i < n; i++) res += a[i];
        return res;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; j++) r[j] = a[j];
        size_t i;
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    size_t n2 = n / 2;
    n2 -= n2 % 8;
    return np_pairwise_sum_f32(a, n2) + np_pairwise_sum_f32(a + n2, n - n2);
}

/* np.mean of a float32 column: float32 pairwise sum divided in float32. */
static float np_mean_f32(const float *a, size_t n) {
    return np_pairwise_sum_f32(a, n) / (float)n;
}

/* sklearn _euclidean_distances_upcast for one feature: computed in float64 as
 * (-2*c*x + c*c) + x*x, stored as float32, then clipped at 0. */
static float upcast_sqdist(float c, float x) {
    double cd = c, xd = x;
    double d = -2.0 * (cd * xd);
    d += cd * cd;
    d += xd * xd;
    float f = (float)d;
    return f > 0.f ? f : 0.f; /* np.maximum(d, 0) */
}

/* ------------------------------------------------------------- k-means++ */

typedef struct {
    const float *x; /* centred data */
    size_t n;
    float *dist0, *cand; /* n floats each */
    double *cum;         /* n doubles */
} kpp_work;

static void kmeans_plusplus(kpp_work *w, cs_np_random_state *rs, float centers[2]) {
    const float *x = w->x;
    size_t n = w->n;
    int64_t id0 = cs_np_random_randint(rs, (int64_t)n);
    centers[0] = x[id0];
    for (size_t i = 0; i < n; i++) w->dist0[i] = upcast_sqdist(centers[0], x[i]);
    float pot = np_pairwise_sum_f32(w->dist0, n);
    /* n_local_trials = 2 + int(log(2)) = 2; uniform(size=2) * current_pot (float64) */
    double rv[2];
    rv[0] = cs_np_random_sample(rs) * (double)pot;
    rv[1] = cs_np_random_sample(rs) * (double)pot;
    double acc = 0.0; /* stable_cumsum: float64 running sum */
    for (size_t i = 0; i < n; i++) {
        acc += (double)w->dist0[i];
        w->cum[i] = acc;
    }
    size_t cand_id[2];
    for (int t = 0; t < 2; t++) {
        /* np.searchsorted(side='left'): first index with cum[i] >= v */
        size_t lo = 0, hi = n;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (w->cum[mid] < rv[t])
                lo = mid + 1;
            else
                hi = mid;
        }
        cand_id[t] = lo < n ? lo : n - 1;
    }
    float best_pot = 0.f;
    int best = -1;
    for (int t = 0; t < 2; t++) {
        float c = x[cand_id[t]];
        for (size_t i = 0; i < n; i++) {
            float d = upcast_sqdist(c, x[i]);
            w->cand[i] = w->dist0[i] < d ? w->dist0[i] : d; /* np.minimum */
        }
        float p = np_pairwise_sum_f32(w->cand, n);
        if (best < 0 || p < best_pot) { /* np.argmin: first minimum */
            best_pot = p;
            best = t;
        }
    }
    centers[1] = x[cand_id[best]];
}

/* ----------------------------------------------------------------- Lloyd */

/* First/last chunk of OpenMP static schedule thread t over n_chunks chunks. */
static void static_block(int n_chunks, int nt, int t, int *c0, int *c1) {
    int q = n_chunks / nt, r = n_chunks % nt;
    if (t < r) {
        q++;
        r = 0;
    }
    *c0 = q * t + r;
    *c1 = *c0 + q;
}

/* One lloyd_iter_chunked_dense call. Labels from -2 x.c + |c|^2 (float32, first
 * centre wins ties); with update, new centres from per-thread float32 sums. */
static void lloyd_iter(const float *x, size_t n, const float c_old[2], float c_new[2],
                       float weight[2], int *labels, float shift[2], int nt, int update) {
    float c2[2] = {c_old[0] * c_old[0], c_old[1] * c_old[1]};
    size_t n_chunks = (n + KM_CHUNK - 1) / KM_CHUNK;
    int threads = nt < (int)n_chunks ? nt : (int)n_chunks;
    float sum[2] = {0.f, 0.f}, wsum[2] = {0.f, 0.f};
    for (int t = 0; t < threads; t++) {
        int ch0, ch1;
        static_block((int)n_chunks, threads, t, &ch0, &ch1);
        float ls[2] = {0.f, 0.f}, lw[2] = {0.f, 0.f}; /* thread-local buffers (calloc) */
        size_t i0 = (size_t)ch0 * KM_CHUNK, i1 = (size_t)ch1 * KM_CHUNK;
        if (i1 > n) i1 = n;
        for (size_t i = i0; i < i1; i++) {
            float p0 = x[i] * c_old[0], p1 = x[i] * c_old[1];
            float d0 = c2[0] + -2.0f * p0, d1 = c2[1] + -2.0f * p1;
            int lab = d1 < d0 ? 1 : 0;
            labels[i] = lab;
            if (update) {
                lw[lab] += 1.0f;
                ls[lab] += x[i] * 1.0f;
            }
        }
        /* reduction under the lock: thread order (commutative for two threads) */
        for (int j = 0; j < 2; j++) {
            wsum[j] += lw[j];
            sum[j] += ls[j];
        }
    }
    if (!update) return;
    /* _relocate_empty_clusters_dense: an empty cluster takes the point farthest
     * from its centre (first index among equal distances) */
    for (int e = 0; e < 2; e++) {
        if (wsum[e] != 0.f) continue;
        size_t far = 0;
        float best = -1.f;
        for (size_t i = 0; i < n; i++) {
            float d = x[i] - c_old[labels[i]];
            d = d * d;
            if (d > best) {
                best = d;
                far = i;
            }
        }
        int old = labels[far];
        sum[old] -= x[far] * 1.0f;
        sum[e] = x[far] * 1.0f;
        wsum[e] = 1.0f;
        wsum[old] -= 1.0f;
    }
    for (int j = 0; j < 2; j++) {
        float cj = sum[j];
        if (wsum[j] > 0.f) {
            float alpha = (float)(1.0 / (double)wsum[j]);
            cj *= alpha;
        }
        c_new[j] = cj;
        weight[j] = wsum[j];
        float d = c_new[j] - c_old[j];
        float r = 0.f + d * d;
        shift[j] = (float)sqrt((double)r);
    }
}

static float inertia_f32(const float *x, size_t n, const float c[2], const int *labels, int nt) {
    int threads = nt < (int)n ? nt : (int)n;
    if (threads < 1) threads = 1;
    float total = 0.f;
    for (int t = 0; t < threads; t++) {
        int i0, i1;
        static_block((int)n, threads, t, &i0, &i1);
        float part = 0.f;
        for (int i = i0; i < i1; i++) {
            float d = x[i] - c[labels[i]];
            part += (0.f + d * d) * 1.0f;
        }
        total += part;
    }
    return total;
}

static int same_clustering(const int *a, const int *b, size_t n) {
    int map[2] = {-1, -1};
    for (size_t i = 0; i < n; i++) {
        if (map[a[i]] == -1)
            map[a[i]] = b[i];
        else if (map[a[i]] != b[i])
            return 0;
    }
    return 1;
}

/* _kmeans_single_lloyd; returns n_iter. */
static int kmeans_single_lloyd(const float *x, size_t n, const float init[2], double tol, int nt,
                               float centers_out[2], int *labels, int *labels_old) {
    float c[2] = {init[0], init[1]}, c_new[2] = {0.f, 0.f}, weight[2], shift[2];
    for (size_t i = 0; i < n; i++) labels[i] = labels_old[i] = -1;
    int strict = 0, it;
    for (it = 0; it < KM_MAX_ITER; it++) {
        lloyd_iter(x, n, c, c_new, weight, labels, shift, nt, 1);
        float t0 = c[0], t1 = c[1];
        c[0] = c_new[0];
        c[1] = c_new[1];
        c_new[0] = t0;
        c_new[1] = t1;
        if (memcmp(labels, labels_old, n * sizeof *labels) == 0) {
            strict = 1;
            break;
        }
        float s0 = shift[0] * shift[0], s1 = shift[1] * shift[1];
        float shift_tot = (0.f + s0) + s1; /* (center_shift**2).sum(), float32 */
        if ((double)shift_tot <= tol) break;
        memcpy(labels_old, labels, n * sizeof *labels);
    }
    if (!strict) lloyd_iter(x, n, c, c, weight, labels, shift, nt, 0);
    centers_out[0] = c[0];
    centers_out[1] = c[1];
    return (it < KM_MAX_ITER ? it : KM_MAX_ITER - 1) + 1;
}

int cs_kmeans2_sklearn(const float *x, int n, int emulated_threads, cs_kmeans2_result *res) {
    if (!x || !res) return cs_error(CELLSAM_ERR_INVALID, "kmeans: NULL argument");
    if (n < 2) return cs_error(CELLSAM_ERR_INVALID, "kmeans: %d samples for 2 clusters", n);
    if (n > KM_MAX_SAMPLES) return cs_error(CELLSAM_ERR_LIMIT, "kmeans: %d samples (max %d)", n, KM_MAX_SAMPLES);
    for (int i = 0; i < n; i++)
        if (!isfinite(x[i])) return cs_error(CELLSAM_ERR_INVALID, "kmeans: non-finite score at %d", i);
    int nt = emulated_threads < 1 ? 1 : emulated_threads;
    size_t N = (size_t)n;
    float *xc = cs_alloc(N, 4 * sizeof(float)); /* xc | dist0 | cand | tmp */
    double *cum = cs_alloc(N, sizeof(double));
    int *lab = cs_alloc(N, 3 * sizeof(int)); /* labels | labels_old | best */
    if (!xc || !cum || !lab) {
        cs_free(xc);
        cs_free(cum);
        cs_free(lab);
        return CELLSAM_ERR_NOMEM;
    }
    float *tmp = xc + 3 * N;
    /* tol = mean(np.var(X, axis=0)) * 1e-4 on the uncentred data; var in float32 */
    float mean = np_mean_f32(x, N);
    for (size_t i = 0; i < N; i++) {
        float d = x[i] - mean;
        tmp[i] = d * d;
    }
    float var = np_pairwise_sum_f32(tmp, N) / (float)N;
    double tol = (double)var * 1e-4;
    /* X -= X.mean(axis=0) */
    for (size_t i = 0; i < N; i++) xc[i] = x[i] - mean;

    kpp_work w = {xc, N, xc + N, xc + 2 * N, cum};
    cs_np_random_state rs;
    cs_np_random_seed(&rs, 42);
    int *labels = lab, *labels_old = lab + N, *best_labels = lab + 2 * N;
    float best_c[2] = {0.f, 0.f}, best_inertia = 0.f;
    int best_iter = 0, have_best = 0;
    for (int run = 0; run < KM_N_INIT; run++) {
        float init[2], c[2];
        kmeans_plusplus(&w, &rs, init);
        int iters = kmeans_single_lloyd(xc, N, init, tol, nt, c, labels, labels_old);
        float inertia = inertia_f32(xc, N, c, labels, nt);
        if (!have_best || (inertia < best_inertia && !same_clustering(labels, best_labels, N))) {
            memcpy(best_labels, labels, N * sizeof *labels);
            best_c[0] = c[0];
            best_c[1] = c[1];
            best_inertia = inertia;
            best_iter = iters;
            have_best = 1;
        }
    }
    res->centers[0] = best_c[0] + mean; /* best_centers += X_mean */
    res->centers[1] = best_c[1] + mean;
    res->n_iter = best_iter;
    res->inertia = best_inertia;
    cs_free(xc);
    cs_free(cum);
    cs_free(lab);
    return CELLSAM_OK;
}

/* ------------------------------------------------------ exact 1-D optimum */

static int cmp_float_asc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

int cs_kmeans2_exact_1d(const float *x, int n, double centers[2]) {
    if (!x || !centers) return cs_error(CELLSAM_ERR_INVALID, "kmeans: NULL argument");
    if (n < 2) return cs_error(CELLSAM_ERR_INVALID, "kmeans: %d samples for 2 clusters", n);
    if (n > KM_MAX_SAMPLES) return cs_error(CELLSAM_ERR_LIMIT, "kmeans: %d samples (max %d)", n, KM_MAX_SAMPLES);
    for (int i = 0; i < n; i++)
        if (!isfinite(x[i])) return cs_error(CELLSAM_ERR_INVALID, "kmeans: non-finite score at %d", i);
    float *s = cs_alloc((size_t)n, sizeof(float));
    if (!s) return CELLSAM_ERR_NOMEM;
    memcpy(s, x, (size_t)n * sizeof(float));
    qsort(s, (size_t)n, sizeof(float), cmp_float_asc);
    /* SSE of a split = sum of squares about each side's mean; centre the data on
     * its median first so the prefix sums lose no precision */
    double ref = s[n / 2], tot = 0.0, tot2 = 0.0;
    for (int i = 0; i < n; i++) {
        double d = (double)s[i] - ref;
        tot += d;
        tot2 += d * d;
    }
    double best = INFINITY, pre = 0.0;
    int best_k = 1;
    for (int k = 1; k < n; k++) {
        pre += (double)s[k - 1] - ref;
        double post = tot - pre;
        /* minimise SSE = tot2 - pre^2/k - post^2/(n-k), i.e. maximise the subtracted part */
        double gain = pre * pre / k + post * post / (n - k);
        double sse = tot2 - gain;
        if (sse < best) {
            best = sse;
            best_k = k;
        }
    }
    double lo = 0.0, hi = 0.0;
    for (int i = 0; i < best_k; i++) lo += (double)s[i];
    for (int i = best_k; i < n; i++) hi += (double)s[i];
    centers[0] = lo / best_k;
    centers[1] = hi / (n - best_k);
    cs_free(s);
    return CELLSAM_OK;
}

/* ----------------------------------------------------- dynamic threshold */

int cs_dynamic_threshold_ex(const float *scores, int n, double bbox_threshold,
                            cs_dynamic_threshold_info *info, unsigned char *keep) {
    if (!info || (n > 0 && !scores) || n < 0)
        return cs_error(CELLSAM_ERR_INVALID, "dynamic threshold: bad arguments");
    memset(info, 0, sizeof *info);
    int rc = n >= 2 ? cs_kmeans2_sklearn(scores, n, 2, &info->km) : CELLSAM_ERR_INVALID;
    if (rc == CELLSAM_ERR_NOMEM || rc == CELLSAM_ERR_LIMIT) return rc;
    if (rc == CELLSAM_OK) {
        /* np.mean of the float32 centres is float32; 0.33 * it promotes to float64 */
        float m = (info->km.centers[0] + info->km.centers[1]) / 2.0f;
        info->threshold = 0.66 * bbox_threshold + 0.33 * (double)m;
        info->used_kmeans = 1;
    } else {
        /* the reference falls back to bbox_threshold when KMeans raises */
        cs_error_clear();
        info->threshold = bbox_threshold;
    }
    info->threshold_f32 = (float)info->threshold;
    int kept = 0;
    for (int i = 0; i < n; i++) {
        int k = scores[i] > info->threshold_f32;
        if (keep) keep[i] = (unsigned char)k;
        kept += k;
    }
    info->n_kept = kept;
    return CELLSAM_OK;
}

/* The shortest decimal that reads back as f: what the user typed. */
static double float_as_decimal(float f) {
    char buf[64];
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        double d = strtod(buf, NULL);
        if ((float)d == f) return d;
    }
    return (double)f;
}

int cs_dynamic_threshold(const float *scores, int n, float bbox_threshold, float *threshold,
                         unsigned char *keep) {
    cs_dynamic_threshold_info info;
    int rc = cs_dynamic_threshold_ex(scores, n, float_as_decimal(bbox_threshold), &info, keep);
    if (rc == CELLSAM_OK && threshold) *threshold = info.threshold_f32;
    return rc;
}
