/* Trainable CellFinder head (train_detector.c): forward parity with the reference
 * detector on the analytic backbone output of unit_pattern/ (and with the inference
 * head, layer by layer), finite-difference gradients of every parameter kind and
 * of the input features on a small map, the shared-head mirrors, and error paths. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cellfinder.h"
#include "common.h"
#include "testutil.h"
#include "train.h"


#define PREFIX "cellfinder.decode_head."

static int json_int(json_t *obj, const char *key, int fallback) {
    json_t *v = json_object_get(obj, key);
    return json_is_integer(v) ? (int)json_integer_value(v) : fallback;
}

/* Tiny reference config (config.json "detector"). */
static cs_tdetector_config tiny_config(void) {
    cs_tdetector_config c = {48, 256, 4, 1, 2, 32, 300, 1, 2, 64};
    json_error_t err;
    json_t *cfg = json_load_file(tu_path("config.json"), 0, &err);
    assert_non_null(cfg);
    json_t *det = json_object_get(cfg, "detector");
    assert_non_null(det);
    c.backbone_dim = json_int(det, "backbone_channels", c.backbone_dim);
    c.d_model = json_int(det, "hidden_dim", c.d_model);
    c.heads = json_int(det, "nheads", c.heads);
    c.enc_layers = json_int(det, "enc_layers", c.enc_layers);
    c.dec_layers = json_int(det, "dec_layers", c.dec_layers);
    c.ffn = json_int(det, "dim_feedforward", c.ffn);
    c.n_positions = json_int(det, "num_query_position", c.n_positions);
    c.n_patterns = json_int(det, "num_query_pattern", c.n_patterns);
    c.n_classes = json_int(det, "num_classes", c.n_classes);
    json_decref(cfg);
    return c;
}

static int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* ------------------------------------------------------------- parity */

static void test_forward_parity(void **state) {
    (void)state;
    const cs_tdetector_config cfg = tiny_config();
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_rng rng;
    cs_rng_seed(&rng, 1);
    cs_tdetector *d = NULL;
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &cfg, &rng, &d), CELLSAM_OK);
    printf("  %zu parameters, %zu values (%zu trainable: shared head copies 1..L-1 are frozen)\n", ps.n,
           cs_tparams_count_values(&ps, 0), cs_tparams_count_values(&ps, 1));

    cs_weights *w = NULL;
    assert_int_equal(cs_weights_open(tu_path("checkpoint.safetensors"), &w), CELLSAM_OK);
    size_t loaded = 0, missing = 0;
    assert_int_equal(cs_tparams_load(&ps, w, &loaded, &missing), CELLSAM_OK);
    printf("  checkpoint: %zu loaded, %zu missing\n", loaded, missing);
    assert_int_equal(missing, 0);
    assert_int_equal(loaded, ps.n);

    cs_npy feat;
    tu_load(&feat, "unit_pattern/det_backbone_features.npy");
    assert_int_equal(feat.count, (size_t)cfg.backbone_dim * cfg.grid * cfg.grid);
    float *x = cs_npy_to_f32(&feat);
    const int Q = cfg.n_positions * cfg.n_patterns, L = cfg.dec_layers, K = cfg.n_classes;
    float *lg = malloc((size_t)L * Q * K * sizeof(float)), *bx = malloc((size_t)L * Q * 4 * sizeof(float));
    assert_true(x && lg && bx);
    double t0 = cs_now_seconds();
    assert_int_equal(cs_tdetector_forward(d, x, lg, bx, 1, 2), CELLSAM_OK);
    double t1 = cs_now_seconds();

    cs_npy ref;
    tu_load(&ref, "unit_pattern/det_aux_logits_layer0.npy");
    tu_check_npy("layer 0 logits vs det_aux_logits_layer0", lg, (size_t)Q * K, &ref, 1e-2);
    cs_npy_free(&ref);
    tu_load(&ref, "unit_pattern/det_pred_logits.npy");
    tu_check_npy("last layer logits vs det_pred_logits", lg + (size_t)(L - 1) * Q * K, (size_t)Q * K, &ref, 1e-2);
    cs_npy_free(&ref);
    tu_load(&ref, "unit_pattern/det_pred_boxes.npy");
    tu_check_npy("last layer boxes vs det_pred_boxes", bx + (size_t)(L - 1) * Q * 4, (size_t)Q * 4, &ref, 1e-5);
    cs_npy_free(&ref);

    /* every layer against the inference head on the same checkpoint */
    cs_binder b = {0};
    b.w = w;
    b.prefix = PREFIX;
    struct cs_cellfinder *cf = NULL;
    assert_int_equal(cs_cellfinder_bind(&cf, &b, cfg.backbone_dim, cfg.heads), CELLSAM_OK);
    float *il = malloc((size_t)Q * K * sizeof(float)), *ib = malloc((size_t)Q * 4 * sizeof(float));
    float *ial = malloc((size_t)L * Q * K * sizeof(float)), *iab = malloc((size_t)L * Q * 4 * sizeof(float));
    assert_true(il && ib && ial && iab);
    assert_int_equal(cs_cellfinder_forward(cf, x, il, ib, ial, iab, 2), CELLSAM_OK);
    tu_check_close("all layers' logits vs inference head", lg, ial, (size_t)L * Q * K, 1e-2);
    tu_check_close("all layers' boxes vs inference head", bx, iab, (size_t)L * Q * 4, 1e-5);
    cs_cellfinder_free(cf);
    cs_binder_release(&b);

    /* a full-size backward: finite gradients everywhere, timing and memory */
    float *dl = malloc((size_t)L * Q * K * sizeof(float)), *db = malloc((size_t)L * Q * 4 * sizeof(float));
    float *dx = malloc(feat.count * sizeof(float));
    assert_true(dl && db && dx);
    for (size_t i = 0; i < (size_t)L * Q * K; i++) dl[i] = (float)cs_rng_normal(&rng);
    for (size_t i = 0; i < (size_t)L * Q * 4; i++) db[i] = (float)cs_rng_normal(&rng);
    cs_tparams_zero_grad(&ps);
    double t2 = cs_now_seconds();
    assert_int_equal(cs_tdetector_backward(d, dl, db, dx, 2), CELLSAM_OK);
    double t3 = cs_now_seconds();
    size_t scratch = 0, act = cs_tdetector_activation_bytes(d, &scratch);
    printf("  tiny head (Q=%d, %d+%d layers, grid %d, 2 threads): forward %.3f s, backward %.3f s; activations "
           "%.1f MB, scratch %.1f MB\n",
           Q, cfg.enc_layers, L, cfg.grid, t1 - t0, t3 - t2, act / 1048576.0, scratch / 1048576.0);
    assert_true(all_finite(dx, feat.count));
    double gsum = 0;
    for (size_t i = 0; i < ps.n; i++) {
        assert_true(all_finite(ps.items[i].g, ps.items[i].n));
        for (size_t k = 0; k < ps.items[i].n; k++) gsum += fabs(ps.items[i].g[k]);
    }
    assert_true(gsum > 0);

    free(dl);
    free(db);
    free(dx);
    free(il);
    free(ib);
    free(ial);
    free(iab);
    free(x);
    free(lg);
    free(bx);
    cs_npy_free(&feat);
    cs_weights_free(w);
    cs_tdetector_free(d);
    cs_tparams_free(&ps);
}

/* ------------------------------------------------------ finite differences */

typedef struct {
    cs_tdetector *d;
    cs_tdetector_config cfg;
    float *feat, *lg, *bx;
    double *R, *S;
    size_t nl, nb;
    double floor_abs; /* loss changes below this are float32 noise */
} fd_ctx;

#define FD_TOL 1e-2    /* relative error allowed per direction */
#define FD_TARGET 0.1  /* loss change a step is sized for */

/* loss = sum over all layers of logits*R + boxes*S, in double over float outputs */
static double fd_loss_threads(fd_ctx *c, int nt, double *abs_terms) {
    assert_int_equal(cs_tdetector_forward(c->d, c->feat, c->lg, c->bx, 0, nt), CELLSAM_OK);
    double s = 0, a = 0;
    for (size_t i = 0; i < c->nl; i++) {
        s += c->lg[i] * c->R[i];
        a += fabs(c->lg[i] * c->R[i]);
    }
    for (size_t i = 0; i < c->nb; i++) {
        s += c->bx[i] * c->S[i];
        a += fabs(c->bx[i] * c->S[i]);
    }
    if (abs_terms) *abs_terms = a;
    return s;
}

static double fd_loss(fd_ctx *c) { return fd_loss_threads(c, 1, NULL); }

/* Relative error |a-n| / max(|a|+|n|, floor). */
static double rel_err(double a, double n, double floor) {
    double den = fabs(a) + fabs(n);
    if (den < floor) den = floor;
    return den > 0 ? fabs(a - n) / den : 0.0;
}

enum { DIR_ALONG_G, DIR_TOP, DIR_RANDOM };

/* Directional check: move x (n values) by +-eps*v and compare the loss change with
 * g . (x+ - x-) (the steps actually taken in float). Errors are relative to at
 * least the noise floor and, for the directions built from g, 1e-2 gmax sum|step|;
 * for a random direction, 0.1 of its typical change |g| |step| / sqrt(n) (guards
 * the rare direction nearly orthogonal to g). */
static double fd_direction(fd_ctx *c, float *x, const float *g, size_t n, const float *v, float eps, int kind,
                           double gmax) {
    float *x0 = malloc(n * sizeof(float)), *xp = malloc(n * sizeof(float)), *xm = malloc(n * sizeof(float));
    assert_true(x0 && xp && xm);
    memcpy(x0, x, n * sizeof(float));
    double pred = 0, sabs = 0, s2 = 0, g2 = 0;
    for (size_t k = 0; k < n; k++) {
        xp[k] = x0[k] + eps * v[k];
        xm[k] = x0[k] - eps * v[k];
        const double step = (double)xp[k] - (double)xm[k];
        pred += g[k] * step;
        sabs += fabs(step);
        s2 += step * step;
        g2 += (double)g[k] * g[k];
    }
    memcpy(x, xp, n * sizeof(float));
    const double lp = fd_loss(c);
    memcpy(x, xm, n * sizeof(float));
    const double lm = fd_loss(c);
    memcpy(x, x0, n * sizeof(float));
    free(x0);
    free(xp);
    free(xm);
    const double got = lp - lm;
    const double floor = kind == DIR_RANDOM ? 0.1 * sqrt(g2) * sqrt(s2) / sqrt((double)n) : 1e-2 * gmax * sabs;
    const double e = rel_err(pred, got, fmax(floor, c->floor_abs));
    if (getenv("FD_VERBOSE")) printf("    eps %.1e pred %.6g got %.6g rel %.2e\n", eps, pred, got, e);
    return e;
}

/* A ReLU network is only piecewise smooth and float32 puts noise on the loss, so
 * no single step suits every direction: the step is sized for a predicted loss
 * change of FD_TARGET (far above the noise), clamped to [1e-4, eps_max], and a check
 * that misses retries with 1/4, 4 and 1/16 times that step (ReLU kinks inside the
 * interval favour small steps, noise large ones). A wrong gradient fails at all. */
static double fd_adaptive(fd_ctx *c, float *x, const float *g, size_t n, const float *v, float eps_max, int kind,
                          double gmax) {
    double dot = 0, sq = 0;
    for (size_t k = 0; k < n; k++) {
        dot += (double)g[k] * v[k];
        sq += ((double)g[k] * v[k]) * ((double)g[k] * v[k]);
    }
    const double s = fmax(fabs(dot), sqrt(sq));
    float eps = s > 0 ? (float)(FD_TARGET / (2 * s)) : eps_max;
    eps = eps < 1e-4f ? 1e-4f : eps > eps_max ? eps_max : eps;
    double e = fd_direction(c, x, g, n, v, eps, kind, gmax);
    if (e > FD_TOL / 2) e = fmin(e, fd_direction(c, x, g, n, v, eps / 4, kind, gmax));
    if (e > FD_TOL / 2) e = fmin(e, fd_direction(c, x, g, n, v, 4 * eps, kind, gmax));
    if (e > FD_TOL / 2) e = fmin(e, fd_direction(c, x, g, n, v, eps / 16, kind, gmax));
    return e;
}

/* Four checks of x against its analytic gradient g: along g itself, at the
 * largest |g| entry, and along two random N(0,1) directions (which see an error
 * orthogonal to g, e.g. a missing term, as well as one along it). */
static double fd_check(fd_ctx *c, float *x, const float *g, size_t n, float eps_max, cs_rng *rng, int *count) {
    float *v = calloc(n, sizeof(float));
    assert_non_null(v);
    double gmax = 0;
    size_t kmax = 0;
    for (size_t k = 0; k < n; k++)
        if (fabs(g[k]) > gmax) {
            gmax = fabs(g[k]);
            kmax = k;
        }
    double worst = 0;
    if (gmax > 0) {
        for (size_t k = 0; k < n; k++) v[k] = (float)(g[k] / gmax);
        worst = fmax(worst, fd_adaptive(c, x, g, n, v, eps_max, DIR_ALONG_G, gmax));
        memset(v, 0, n * sizeof(float));
        v[kmax] = 1.0f;
        worst = fmax(worst, fd_adaptive(c, x, g, n, v, eps_max, DIR_TOP, gmax));
    }
    for (int r = 0; r < 2; r++) {
        for (size_t k = 0; k < n; k++) v[k] = (float)cs_rng_normal(rng);
        worst = fmax(worst, fd_adaptive(c, x, g, n, v, eps_max, DIR_RANDOM, gmax));
    }
    *count += gmax > 0 ? 4 : 2;
    free(v);
    return worst;
}

/* Parameter kind: the name with layer numbers removed, for the summary. */
static void kind_of(const char *name, char *out, size_t cap) {
    size_t o = 0;
    for (const char *p = name + strlen(PREFIX); *p && o + 1 < cap; p++) {
        if (*p >= '0' && *p <= '9' && p > name && p[-1] == '.') {
            while (p[1] >= '0' && p[1] <= '9') p++;
            out[o++] = '#';
        } else {
            out[o++] = *p;
        }
    }
    out[o] = 0;
}

static void test_finite_differences(void **state) {
    (void)state;
    fd_ctx c = {0};
    c.cfg = (cs_tdetector_config){16, 256, 8, 1, 2, 32, 5, 2, 2, 6};
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_rng rng;
    cs_rng_seed(&rng, 7);
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &c.cfg, &rng, &c.d), CELLSAM_OK);
    /* move every parameter off its special initial value (zero box layer, zero
     * biases, unit norms) so that every path carries gradient */
    for (size_t i = 0; i < ps.n; i++) {
        cs_tparam *p = &ps.items[i];
        const int is_pos = strstr(p->name, "position") != NULL;
        for (size_t k = 0; k < p->n; k++) p->w[k] += (float)((is_pos ? 0.03 : 0.05) * cs_rng_normal(&rng));
    }
    /* ReLU kinks limit finite differences. Before every ReLU: halve the weights
     * and set the bias to +4 (one unit in 8: -4, so the zero branch runs too),
     * which keeps every unit far from its kink; the next layer's bias takes the
     * +4 back out. This lets the check be tight. */
    static const char *pairs[][4] = {
        {"ffn.linear1.weight", "ffn.linear1.bias", "ffn.linear2.weight", "ffn.linear2.bias"},
        {"adapt_pos1d.0.weight", "adapt_pos1d.0.bias", "adapt_pos1d.2.weight", "adapt_pos1d.2.bias"},
        {"adapt_pos2d.0.weight", "adapt_pos2d.0.bias", "adapt_pos2d.2.weight", "adapt_pos2d.2.bias"},
        {"bbox_embed.0.layers.0.weight", "bbox_embed.0.layers.0.bias", "bbox_embed.0.layers.1.weight",
         "bbox_embed.0.layers.1.bias"},
        {"bbox_embed.0.layers.1.weight", "bbox_embed.0.layers.1.bias", "bbox_embed.0.layers.2.weight",
         "bbox_embed.0.layers.2.bias"},
    };
    const float shift = 4.0f;
    /* pass 0 halves the weights, pass 1 moves the biases (after every weight is final) */
    for (int pass = 0; pass < 2; pass++)
        for (size_t j = 0; j < sizeof pairs / sizeof pairs[0]; j++)
            for (size_t i = 0; i < ps.n; i++) {
                const char *at = strstr(ps.items[i].name, pairs[j][0]);
                if (!at || strlen(at) != strlen(pairs[j][0])) continue;
                const int stem = (int)(at - ps.items[i].name);
                cs_tparam *t[4];
                for (int m = 0; m < 4; m++) {
                    char name[256];
                    snprintf(name, sizeof name, "%.*s%s", stem, ps.items[i].name, pairs[j][m]);
                    t[m] = cs_tparams_find(&ps, name);
                    assert_non_null(t[m]);
                }
                const size_t units = t[1]->n;
                assert_true(t[2]->shape[1] == (int64_t)units && t[3]->n == (size_t)t[2]->shape[0]);
                if (pass == 0) {
                    for (size_t k = 0; k < t[0]->n; k++) t[0]->w[k] *= 0.5f;
                    continue;
                }
                for (size_t k = 0; k < units; k++) t[1]->w[k] += k % 8 ? shift : -shift;
                for (size_t r = 0; r < t[3]->n; r++) {
                    double rs = 0;
                    for (size_t k = 0; k < units; k++)
                        if (k % 8) rs += t[2]->w[r * units + k];
                    t[3]->w[r] -= (float)(shift * rs);
                }
            }
    cs_tdetector_sync_shared(c.d);
    const int G = c.cfg.grid, E = c.cfg.backbone_dim, Q = c.cfg.n_positions * c.cfg.n_patterns;
    const int L = c.cfg.dec_layers, K = c.cfg.n_classes;
    const size_t nf = (size_t)E * G * G;
    c.nl = (size_t)L * Q * K;
    c.nb = (size_t)L * Q * 4;
    c.feat = malloc(nf * sizeof(float));
    c.lg = malloc(c.nl * sizeof(float));
    c.bx = malloc(c.nb * sizeof(float));
    c.R = malloc(c.nl * sizeof(double));
    c.S = malloc(c.nb * sizeof(double));
    float *Rf = malloc(c.nl * sizeof(float)), *Sf = malloc(c.nb * sizeof(float)), *dfeat = malloc(nf * sizeof(float));
    assert_true(c.feat && c.lg && c.bx && c.R && c.S && Rf && Sf && dfeat);
    for (size_t i = 0; i < nf; i++) c.feat[i] = (float)cs_rng_normal(&rng);
    for (size_t i = 0; i < c.nl; i++) Rf[i] = (float)(c.R[i] = cs_rng_normal(&rng));
    for (size_t i = 0; i < c.nb; i++) Sf[i] = (float)(c.S[i] = cs_rng_normal(&rng));

    cs_tparams_zero_grad(&ps);
    assert_int_equal(cs_tdetector_forward(c.d, c.feat, c.lg, c.bx, 1, 1), CELLSAM_OK);
    assert_int_equal(cs_tdetector_backward(c.d, Rf, Sf, dfeat, 1), CELLSAM_OK);

    /* snapshot of the analytic gradients (the FD forwards do not touch them) */
    float **g0 = calloc(ps.n, sizeof *g0);
    assert_non_null(g0);
    for (size_t i = 0; i < ps.n; i++) {
        g0[i] = malloc(ps.items[i].n * sizeof(float));
        assert_non_null(g0[i]);
        memcpy(g0[i], ps.items[i].g, ps.items[i].n * sizeof(float));
    }

    /* float32 noise of the loss: 10x the spread over 1..4 threads (other summation
     * orders) or 1e-7 of the summed term magnitudes, whichever is larger; errors
     * are measured relative to at least 50x that */
    double terms = 0, lo = INFINITY, hi = -INFINITY;
    for (int nt = 1; nt <= 4; nt++) {
        const double l = fd_loss_threads(&c, nt, nt == 1 ? &terms : NULL);
        lo = fmin(lo, l);
        hi = fmax(hi, l);
    }
    const double noise = fmax(10 * (hi - lo), 1e-7 * terms);
    c.floor_abs = 50 * noise;
    printf("  loss %.6f, spread over 1..4 threads %.2e; noise taken as %.2e\n", lo, hi - lo, noise);

    /* per parameter kind; the packed in_proj matrices are checked slice by slice */
    static const char *slice5[] = {"q_row", "q_col", "k_row", "k_col", "v"}, *slice3[] = {"q", "k", "v"};
    char kinds[128][112];
    double kerr[128];
    int nk = 0, checked = 0, failures = 0;
    double worst = 0;
    char worst_name[160] = "";
    for (size_t i = 0; i < ps.n; i++) {
        cs_tparam *p = &ps.items[i];
        if (p->frozen) {
            /* shared-head mirrors get no gradient of their own */
            for (size_t k = 0; k < p->n; k++) assert_true(g0[i][k] == 0.f);
            continue;
        }
        const float eps_max = strstr(p->name, "position") ? 1e-2f : 3e-2f;
        const int packed = strstr(p->name, "in_proj") != NULL;
        const int nslice = packed ? (int)(p->shape[0] / 256) : 1;
        const size_t per = p->n / (size_t)nslice;
        for (int sl = 0; sl < nslice; sl++) {
            if (getenv("FD_VERBOSE")) printf("  %s[%d]\n", p->name, sl);
            const double e = fd_check(&c, p->w + sl * per, g0[i] + sl * per, per, eps_max, &rng, &checked);
            char kind[112], full[160];
            kind_of(p->name, kind, sizeof kind);
            if (packed) {
                size_t len = strlen(kind);
                snprintf(kind + len, sizeof kind - len, "[%s]", nslice == 5 ? slice5[sl] : slice3[sl]);
            }
            snprintf(full, sizeof full, "%s[%d]", p->name, sl);
            if (e > FD_TOL) {
                printf("  FAIL %-70s rel err %.3g\n", full, e);
                failures++;
            }
            if (e > worst) {
                worst = e;
                snprintf(worst_name, sizeof worst_name, "%s", full);
            }
            int j = 0;
            while (j < nk && strcmp(kinds[j], kind)) j++;
            if (j == nk && nk < 128) {
                snprintf(kinds[nk], sizeof kinds[nk], "%s", kind);
                kerr[nk++] = 0;
            }
            if (j < nk && e > kerr[j]) kerr[j] = e;
        }
    }
    const double ef = fd_check(&c, c.feat, dfeat, nf, 3e-2f, &rng, &checked);
    if (ef > FD_TOL) failures++;
    for (int j = 0; j < nk; j++) printf("  %-62s max rel err %.2e\n", kinds[j], kerr[j]);
    printf("  %-62s max rel err %.2e\n", "input features", ef);
    printf("  finite differences: %d directions, max rel err %.2e (%s), tolerance %.0e, %d over\n", checked,
           fmax(worst, ef), worst > ef ? worst_name : "features", FD_TOL, failures);
    assert_int_equal(failures, 0);

    /* gradients accumulate over backward calls; a NULL output gradient counts as zero */
    assert_int_equal(cs_tdetector_forward(c.d, c.feat, c.lg, c.bx, 1, 2), CELLSAM_OK);
    assert_int_equal(cs_tdetector_backward(c.d, Rf, Sf, NULL, 2), CELLSAM_OK);
    double maxdiff = 0, maxg = 0;
    for (size_t i = 0; i < ps.n; i++)
        for (size_t k = 0; k < ps.items[i].n; k++) {
            maxdiff = fmax(maxdiff, fabs(ps.items[i].g[k] - 2.0 * g0[i][k]));
            maxg = fmax(maxg, fabs(g0[i][k]));
        }
    printf("  second backward (2 threads): max |g - 2 g1| = %.2e of max |g1| = %.2e\n", maxdiff, maxg);
    assert_true(maxdiff <= 1e-3 * maxg);
    cs_tparams_zero_grad(&ps);
    assert_int_equal(cs_tdetector_backward(c.d, NULL, NULL, dfeat, 1), CELLSAM_OK);
    double zmax = 0;
    for (size_t i = 0; i < nf; i++) zmax = fmax(zmax, fabs(dfeat[i]));
    assert_true(zmax == 0.0);

    for (size_t i = 0; i < ps.n; i++) free(g0[i]);
    free(g0);
    free(Rf);
    free(Sf);
    free(dfeat);
    free(c.feat);
    free(c.lg);
    free(c.bx);
    free(c.R);
    free(c.S);
    cs_tdetector_free(c.d);
    cs_tparams_free(&ps);
}

/* --------------------------------------------------- shared heads, errors */

/* Receptive field of one query at initialisation: the gradient of its class logit
 * (last decoder layer) with respect to the features; returns the share of the
 * gradient energy within 3 feature cells of the query's anchor and the distance of
 * the cell with the most. */
static double receptive_field(int local, int n_enc, int n_dec, int *argmax_dist) {
    enum { E = 16, G = 32, NPOS = 256 }; /* anchors 16 x 16, every 2 cells */
    cs_tdetector_config cfg = {E, 256, 8, n_enc, n_dec, 64, NPOS, 1, 2, G};
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_rng rng;
    cs_rng_seed(&rng, 5);
    cs_tdetector *d = NULL;
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &cfg, &rng, &d), CELLSAM_OK);
    if (local) cs_tdetector_init_local(d, 0);
    const cs_tparam *pos = cs_tparams_find(&ps, PREFIX "transformer.position.weight");
    const size_t nl = (size_t)n_dec * NPOS * 2;
    float *feat = malloc(sizeof(float) * E * G * G), *dfeat = malloc(sizeof(float) * E * G * G),
          *lg = malloc(sizeof(float) * nl), *dlg = calloc(nl, sizeof(float)),
          *bx = malloc(sizeof(float) * nl * 2), *dbx = calloc(nl * 2, sizeof(float));
    assert_true(feat && dfeat && lg && dlg && bx && dbx && pos);
    for (int i = 0; i < E * G * G; i++) feat[i] = (float)sin(0.7 * i + 0.1 * (i % 13));
    const int q = 5 * 16 + 10; /* an anchor away from the borders */
    dlg[(size_t)(n_dec - 1) * NPOS * 2 + 2 * q + 1] = 1.0f;
    assert_int_equal(cs_tdetector_forward(d, feat, lg, bx, 1, 1), CELLSAM_OK);
    assert_int_equal(cs_tdetector_backward(d, dlg, dbx, dfeat, 1), CELLSAM_OK);
    const double ax = pos->w[2 * q] * G - 0.5, ay = pos->w[2 * q + 1] * G - 0.5; /* in cell indices */
    double near = 0, total = 0, best = -1;
    for (int y = 0; y < G; y++)
        for (int x = 0; x < G; x++) {
            double e = 0;
            for (int c = 0; c < E; c++) e += (double)dfeat[(size_t)c * G * G + y * G + x] * dfeat[(size_t)c * G * G + y * G + x];
            double dist = sqrt((x - ax) * (x - ax) + (y - ay) * (y - ay));
            total += e;
            if (dist <= 3.0) near += e;
            if (e > best) best = e, *argmax_dist = (int)lround(dist);
        }
    free(feat);
    free(dfeat);
    free(lg);
    free(dlg);
    free(bx);
    free(dbx);
    cs_tdetector_free(d);
    cs_tparams_free(&ps);
    return near / total;
}

/* A fresh head's queries read the features at their anchors (cs_tdetector_init_local);
 * with Anchor-DETR's random init they read the whole map about evenly. */
static void test_local_init(void **state) {
    (void)state;
    for (int e = 0; e < 2; e++)
        for (int l = 1; l <= 3; l += 2) {
            int dl = -1, dp = -1;
            double rl = receptive_field(1, e, l, &dl), rp = receptive_field(0, e, l, &dp);
            printf("  %d encoder / %d decoder layers: gradient share within 3 cells %.3f (peak %d cells away), "
                   "plain init %.3f (peak %d cells away)\n", e, l, rl, dl, rp, dp);
            assert_true(rl > 0.5);
            assert_true(dl <= 2);
            assert_true(rl > 5 * rp);
        }
}

static void test_shared_heads_and_reuse(void **state) {
    (void)state;
    cs_tdetector_config cfg = {8, 256, 4, 0, 3, 16, 4, 1, 2, 4};
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_rng rng;
    cs_rng_seed(&rng, 3);
    cs_tdetector *d = NULL;
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &cfg, &rng, &d), CELLSAM_OK);
    cs_tparam *w0 = cs_tparams_find(&ps, PREFIX "transformer.bbox_embed.0.layers.1.weight");
    cs_tparam *w2 = cs_tparams_find(&ps, PREFIX "transformer.bbox_embed.2.layers.1.weight");
    cs_tparam *c2 = cs_tparams_find(&ps, PREFIX "transformer.class_embed.2.bias");
    assert_true(w0 && w2 && c2);
    assert_false(w0->frozen);
    assert_true(w2->frozen && c2->frozen);
    /* Anchor-DETR initialisation: prior class bias, zero last box weight and box
     * size bias -2, anchors in (0,1) */
    printf("  class bias %.5f (prior -log(99) = %.5f)\n", c2->w[0], -log(99.0));
    assert_true(fabs(c2->w[0] + log(99.0)) < 1e-5);
    cs_tparam *last = cs_tparams_find(&ps, PREFIX "transformer.bbox_embed.0.layers.2.weight");
    for (size_t k = 0; k < last->n; k++) assert_true(last->w[k] == 0.f);
    cs_tparam *lastb = cs_tparams_find(&ps, PREFIX "transformer.bbox_embed.2.layers.2.bias");
    assert_true(lastb->w[0] == 0.f && lastb->w[1] == 0.f && lastb->w[2] == -2.f && lastb->w[3] == -2.f);
    cs_tparam *pos = cs_tparams_find(&ps, PREFIX "transformer.position.weight");
    for (size_t k = 0; k < pos->n; k++) assert_true(pos->w[k] > 0.f && pos->w[k] < 1.f);
    assert_memory_equal(w0->w, w2->w, w0->n * sizeof(float));
    w0->w[5] += 1.0f;
    cs_tdetector_sync_shared(d);
    assert_memory_equal(w0->w, w2->w, w0->n * sizeof(float));

    /* with zero box offsets every layer's boxes are the anchors' (cx, cy) and 0.5 sizes */
    float feat[8 * 16], lg[3 * 4 * 2], bx[3 * 4 * 4];
    for (int i = 0; i < 8 * 16; i++) feat[i] = (float)sin(0.37 * i);
    cs_tparam *b2 = cs_tparams_find(&ps, PREFIX "transformer.bbox_embed.0.layers.2.bias");
    memset(b2->w, 0, b2->n * sizeof(float));
    assert_int_equal(cs_tdetector_forward(d, feat, lg, bx, 0, 1), CELLSAM_OK);
    double berr = 0;
    for (int l = 0; l < 3; l++)
        for (int q = 0; q < 4; q++) {
            const float *b = bx + ((size_t)l * 4 + q) * 4;
            berr = fmax(berr, fabs(b[0] - pos->w[2 * q]));
            berr = fmax(berr, fabs(b[1] - pos->w[2 * q + 1]));
            berr = fmax(berr, fabs(b[2] - 0.5));
            berr = fmax(berr, fabs(b[3] - 0.5));
        }
    printf("  zero box head: boxes = anchors, max err %.2e\n", berr);
    assert_true(berr < 1e-6);
    /* no encoder layers: the backward still reaches the features */
    float dlg[3 * 4 * 2], dbx[3 * 4 * 4], dfeat[8 * 16];
    for (int i = 0; i < 24; i++) dlg[i] = (float)cos(0.3 * i);
    for (int i = 0; i < 48; i++) dbx[i] = (float)sin(0.7 * i);
    assert_int_equal(cs_tdetector_forward(d, feat, lg, bx, 1, 1), CELLSAM_OK);
    assert_int_equal(cs_tdetector_backward(d, dlg, dbx, dfeat, 1), CELLSAM_OK);
    double fsum = 0;
    for (int i = 0; i < 8 * 16; i++) fsum += fabs(dfeat[i]);
    assert_true(all_finite(dfeat, 8 * 16) && fsum > 0);

    /* a second module on the same store reuses the parameters as they are */
    float before = w0->w[5];
    size_t n_before = ps.n;
    cs_tdetector *d2 = NULL;
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &cfg, &rng, &d2), CELLSAM_OK);
    assert_int_equal(ps.n, n_before);
    assert_true(w0->w[5] == before);
    cs_tdetector_free(d2);
    /* ... and refuses a conflicting shape */
    cfg.backbone_dim = 9;
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &cfg, &rng, &d2), CELLSAM_ERR_MODEL);
    assert_null(d2);
    printf("  conflicting shape: %s\n", cellsam_last_error());
    cs_tdetector_free(d);
    cs_tparams_free(&ps);
}

static void test_errors(void **state) {
    (void)state;
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_tdetector *d = (cs_tdetector *)&ps;
    const cs_tdetector_config good = {8, 256, 4, 1, 1, 16, 4, 1, 2, 4};
    cs_tdetector_config c = good;
    c.d_model = 128;
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &c, NULL, &d), CELLSAM_ERR_INVALID);
    assert_null(d);
    printf("  d_model 128: %s\n", cellsam_last_error());
    c = good;
    c.heads = 3;
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &c, NULL, &d), CELLSAM_ERR_INVALID);
    c = good;
    c.dec_layers = 0;
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &c, NULL, &d), CELLSAM_ERR_INVALID);
    c = good;
    c.grid = 0;
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &c, NULL, &d), CELLSAM_ERR_INVALID);
    c = good;
    c.n_positions = 100000;
    c.n_patterns = 2;
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &c, NULL, &d), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tdetector_create(NULL, PREFIX, &good, NULL, &d), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, NULL, NULL, &d), CELLSAM_ERR_INVALID);
    assert_int_equal(ps.n, 0);

    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &good, NULL, &d), CELLSAM_OK);
    float feat[8 * 16] = {0}, lg[4 * 2], bx[4 * 4];
    assert_int_equal(cs_tdetector_backward(d, lg, bx, NULL, 1), CELLSAM_ERR_INVALID);
    printf("  backward first: %s\n", cellsam_last_error());
    assert_int_equal(cs_tdetector_forward(d, NULL, lg, bx, 1, 1), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tdetector_forward(d, feat, NULL, bx, 1, 1), CELLSAM_ERR_INVALID);
    /* inference-only forward keeps no activations for a backward */
    assert_int_equal(cs_tdetector_forward(d, feat, lg, bx, 0, 1), CELLSAM_OK);
    assert_true(all_finite(lg, 8) && all_finite(bx, 16));
    assert_int_equal(cs_tdetector_backward(d, lg, bx, NULL, 1), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tdetector_backward(NULL, lg, bx, NULL, 1), CELLSAM_ERR_INVALID);
    cs_tdetector_free(d);
    cs_tdetector_free(NULL);
    cs_tparams_free(&ps);

    /* a configuration whose buffers cannot fit is refused before allocating */
    cs_tparams_init(&ps);
    c = good;
    c.backbone_dim = 1;
    c.grid = 256;
    c.n_positions = 100000;
    assert_int_equal(cs_tdetector_create(&ps, PREFIX, &c, NULL, &d), CELLSAM_OK);
    float *big = calloc((size_t)256 * 256, sizeof(float)), *blg = malloc((size_t)100000 * 2 * sizeof(float)),
          *bbx = malloc((size_t)100000 * 4 * sizeof(float));
    assert_true(big && blg && bbx);
    assert_int_equal(cs_tdetector_forward(d, big, blg, bbx, 1, 1), CELLSAM_ERR_LIMIT);
    printf("  100000 queries on a 256 grid: %s\n", cellsam_last_error());
    free(big);
    free(blg);
    free(bbx);
    cs_tdetector_free(d);
    cs_tparams_free(&ps);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_shared_heads_and_reuse),
        cmocka_unit_test(test_local_init),
        cmocka_unit_test(test_finite_differences),
        cmocka_unit_test(test_forward_parity),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
