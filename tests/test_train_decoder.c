/* Trainable prompt encoder + mask decoder (train_decoder.c): forward parity with the
 * official PyTorch outputs of the tiny checkpoint (MANIFEST.md 41_/42_) and with the
 * inference decoder, finite-difference gradients of every parameter kind and of the
 * image embedding, thread-count independence, gradient accumulation, and errors. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "testutil.h"
#include "train.h"


/* The tiny reference model's decoder (testdata config.json). */
static cs_tdecoder_config tiny_config(void) {
    cs_tdecoder_config c;
    memset(&c, 0, sizeof c);
    c.dim = 32;
    c.depth = 2;
    c.heads = 2;
    c.mlp = 64;
    c.n_mask_tokens = 4;
    c.iou_hidden = 32;
    c.downsample = 2;
    c.grid = 64;
    c.img_size = 1024;
    c.mask_in_chans = 4;
    return c;
}

/* Small configuration for finite differences. */
static cs_tdecoder_config small_config(void) {
    cs_tdecoder_config c;
    memset(&c, 0, sizeof c);
    c.dim = 16;
    c.depth = 2;
    c.heads = 2;
    c.mlp = 8;
    c.n_mask_tokens = 4;
    c.iou_hidden = 8;
    c.downsample = 2;
    c.grid = 4;
    c.img_size = 64;
    c.mask_in_chans = 4;
    return c;
}

/* ---------------------------------------------------------------- parity */

static void test_parity_reference(void **state) {
    (void)state;
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_tdecoder_config cfg = tiny_config();
    cs_tdecoder *dec = NULL;
    cs_rng rng;
    cs_rng_seed(&rng, 1);
    assert_int_equal(cs_tdecoder_create(&ps, "model_cp.", &cfg, &rng, &dec), 0);
    cs_weights *w = NULL;
    assert_int_equal(cs_weights_open(tu_path("checkpoint.safetensors"), &w), 0);
    size_t n_loaded = 0, n_missing = 0;
    assert_int_equal(cs_tparams_load(&ps, w, &n_loaded, &n_missing), 0);
    printf(" decoder parameters: %zu loaded, %zu missing\n", n_loaded, n_missing);
    assert_int_equal(n_missing, 0);
    assert_int_equal(n_loaded, ps.n);
    cs_weights_free(w);

    /* the inference model on the same checkpoint, for every box's logits */
    cellsam_model *model = NULL;
    cellsam_context *ctx = NULL;
    assert_int_equal(tu_load_reference_model("checkpoint.safetensors", &model, &ctx), 0);

    DIR *dir = opendir(tu_testdata());
    assert_non_null(dir);
    struct dirent *de;
    int n_cases = 0;
    const int P = cfg.dim, plane = 16 * cfg.grid * cfg.grid;
    while ((de = readdir(dir))) {
        if (strncmp(de->d_name, "case_", 5) != 0) continue;
        char name[256];
        snprintf(name, sizeof name, "%s", de->d_name);
        printf(" %s\n", name);
        cs_npy emb, boxes, iou_ref, low_ref;
        tu_load(&emb, "%s/20_sam_image_embedding.npy", name);
        tu_load(&boxes, "%s/39_sam_box_prompts.npy", name);
        tu_load(&iou_ref, "%s/42_iou_predictions.npy", name);
        tu_load(&low_ref, "%s/41_lowres_mask_logits_first.npy", name);
        assert_int_equal(emb.count, (size_t)P * cfg.grid * cfg.grid);
        const int K = (int)boxes.shape[0];
        float *e = cs_npy_to_f32(&emb), *bx = cs_npy_to_f32(&boxes);
        float *lg = malloc((size_t)K * plane * sizeof(float)), *io = malloc((size_t)K * sizeof(float));
        float *lg1 = malloc((size_t)K * plane * sizeof(float)), *io1 = malloc((size_t)K * sizeof(float));
        assert_int_equal(cs_tdecoder_forward(dec, e, bx, K, lg, io, 1, 2), 0);
        tu_check_npy("41_lowres_mask_logits_first", lg, (size_t)plane, &low_ref, 1e-4);
        tu_check_npy("42_iou_predictions", io, (size_t)K, &iou_ref, 1e-5);
        /* one thread, inference mode: same numbers */
        assert_int_equal(cs_tdecoder_forward(dec, e, bx, K, lg1, io1, 0, 1), 0);
        tu_check_close("logits 1 vs 2 threads", lg1, lg, (size_t)K * plane, 1e-5);
        tu_check_close("iou 1 vs 2 threads", io1, io, (size_t)K, 1e-6);

        /* inference decoder, all boxes */
        assert_int_equal(cellsam_set_embedding(ctx, e, P, cfg.grid, cfg.grid), 0);
        cellsam_box *cb = malloc((size_t)K * sizeof *cb);
        for (int k = 0; k < K; k++) {
            cb[k].x1 = bx[4 * k];
            cb[k].y1 = bx[4 * k + 1];
            cb[k].x2 = bx[4 * k + 2];
            cb[k].y2 = bx[4 * k + 3];
        }
        cellsam_prompt pr = cellsam_default_prompt();
        pr.boxes = cb;
        pr.n_boxes = K;
        pr.n_threads = 2;
        float *ilg, *iio;
        int nb, nmk;
        assert_int_equal(cellsam_decode(ctx, &pr, &ilg, &iio, &nb, &nmk), 0);
        assert_int_equal(nb, K);
        assert_int_equal(nmk, 1);
        tu_check_close("logits vs inference decoder (all boxes)", lg, ilg, (size_t)K * plane, 1e-4);
        tu_check_close("iou vs inference decoder", io, iio, (size_t)K, 1e-5);
        cellsam_free(ilg);
        cellsam_free(iio);
        free(cb);
        free(lg);
        free(io);
        free(lg1);
        free(io1);
        free(e);
        free(bx);
        cs_npy_free(&emb);
        cs_npy_free(&boxes);
        cs_npy_free(&iou_ref);
        cs_npy_free(&low_ref);
        n_cases++;
    }
    closedir(dir);
    assert_true(n_cases > 0);
    printf(" activation memory (tiny, grid 64): %.2f MB for 1 prompt, %.2f MB per extra prompt\n",
           cs_tdecoder_activation_bytes(dec, 1, 1) / 1e6,
           (cs_tdecoder_activation_bytes(dec, 2, 1) - cs_tdecoder_activation_bytes(dec, 1, 1)) / 1e6);
    cellsam_context_free(ctx);
    cellsam_model_free(model);
    cs_tdecoder_free(dec);
    cs_tparams_free(&ps);
}

/* ------------------------------------------------------ finite differences */

typedef struct {
    cs_tparams ps;
    cs_tdecoder *dec;
    cs_tdecoder_config cfg;
    int n;
    float *emb, *boxes, *R, *r, *logits, *iou;
    size_t plane, emb_n;
} fd_setup;

static void fd_init(fd_setup *s, int n, uint64_t seed) {
    memset(s, 0, sizeof *s);
    cs_tparams_init(&s->ps);
    s->cfg = small_config();
    s->n = n;
    cs_rng rng;
    cs_rng_seed(&rng, seed);
    assert_int_equal(cs_tdecoder_create(&s->ps, "model_cp.", &s->cfg, &rng, &s->dec), 0);
    /* move every parameter off its initial value (biases 0, norms 1) */
    for (size_t i = 0; i < s->ps.n; i++) {
        cs_tparam *p = &s->ps.items[i];
        for (size_t k = 0; k < p->n; k++) p->w[k] += (float)(0.15 * cs_rng_normal(&rng));
    }
    const int G = s->cfg.grid, P = s->cfg.dim;
    s->plane = (size_t)16 * G * G;
    s->emb_n = (size_t)P * G * G;
    s->emb = malloc(s->emb_n * sizeof(float));
    s->boxes = malloc((size_t)4 * n * sizeof(float));
    s->R = malloc((size_t)n * s->plane * sizeof(float));
    s->r = malloc((size_t)n * sizeof(float));
    s->logits = malloc((size_t)n * s->plane * sizeof(float));
    s->iou = malloc((size_t)n * sizeof(float));
    for (size_t i = 0; i < s->emb_n; i++) s->emb[i] = (float)cs_rng_normal(&rng);
    for (int b = 0; b < n; b++) {
        float x1 = (float)(cs_rng_uniform(&rng) * 40), y1 = (float)(cs_rng_uniform(&rng) * 40);
        s->boxes[4 * b] = x1;
        s->boxes[4 * b + 1] = y1;
        s->boxes[4 * b + 2] = x1 + 4 + (float)(cs_rng_uniform(&rng) * 20);
        s->boxes[4 * b + 3] = y1 + 4 + (float)(cs_rng_uniform(&rng) * 20);
        s->r[b] = (float)cs_rng_normal(&rng);
    }
    for (size_t i = 0; i < (size_t)n * s->plane; i++) s->R[i] = (float)cs_rng_normal(&rng);
}

static void fd_free(fd_setup *s) {
    cs_tdecoder_free(s->dec);
    cs_tparams_free(&s->ps);
    free(s->emb);
    free(s->boxes);
    free(s->R);
    free(s->r);
    free(s->logits);
    free(s->iou);
}

static double fd_loss(fd_setup *s) {
    assert_int_equal(cs_tdecoder_forward(s->dec, s->emb, s->boxes, s->n, s->logits, s->iou, 0, 1), 0);
    double L = 0;
    for (size_t i = 0; i < (size_t)s->n * s->plane; i++) L += (double)s->logits[i] * s->R[i];
    for (int b = 0; b < s->n; b++) L += (double)s->iou[b] * s->r[b];
    return L;
}

typedef struct {
    double worst;
    char worst_name[160];
    int checked, skipped;
} fd_stats;

/* Compare analytic a with a central difference. ReLUs make the loss piecewise
 * smooth, and the float32 forward puts about 3e-7 of noise on the loss. The step
 * is chosen per tensor so that it moves the loss by a similar amount (h = 3e-4 /
 * largest gradient of the tensor, in [1e-3, 3e-2]); the loss at -2h..2h gives four
 * slopes, and an uneven change between neighbouring slopes (beyond noise) marks
 * a kink within the stencil: that coordinate is skipped and counted (an
 * undetected kink moves the estimate by at most the jump threshold). Errors are
 * relative to max(|a| + |numeric|, 5% of the tensor's largest gradient, 1e-4/h),
 * the last term keeping the noise (~3e-7/h) below 1e-2 of the scale. */
static void fd_coord(fd_setup *s, const char *name, float *x, size_t i, double a, double gscale, fd_stats *st,
                     double tol) {
    double h = gscale > 0 ? 3e-4 / gscale : 3e-2;
    h = fmin(fmax(h, 1e-3), 3e-2);
    const float x0 = x[i];
    double f[5], t[5];
    for (int k = 0; k < 5; k++) {
        x[i] = (float)(x0 + (k - 2) * h);
        t[k] = (double)x[i] - x0;
        f[k] = fd_loss(s);
    }
    x[i] = x0;
    double sl[4];
    for (int k = 0; k < 4; k++) sl[k] = (f[k + 1] - f[k]) / (t[k + 1] - t[k]);
    const double num = (f[3] - f[1]) / (t[3] - t[1]);
    const double scale = fmax(fabs(a) + fabs(num), fmax(0.05 * gscale, 1e-4 / h));
    const double jump_tol = 0.25 * tol * scale + 3e-6 / h;
    /* smooth: neighbouring slopes differ by about h f'' each; a kink adds its slope
     * change to one or two of these differences */
    double dmin = INFINITY, dmax = -INFINITY;
    for (int k = 0; k < 3; k++) {
        dmin = fmin(dmin, sl[k + 1] - sl[k]);
        dmax = fmax(dmax, sl[k + 1] - sl[k]);
    }
    if (dmax - dmin > jump_tol) {
        st->skipped++;
        return;
    }
    const double err = fabs(a - num) / scale;
    st->checked++;
    if (err > st->worst) {
        st->worst = err;
        snprintf(st->worst_name, sizeof st->worst_name, "%s[%zu] (analytic %.6g numeric %.6g)", name, i, a, num);
    }
    if (err > tol) printf("  FD mismatch %s[%zu]: analytic %.6g numeric %.6g (rel %.3g)\n", name, i, a, num, err);
}

static void test_finite_differences(void **state) {
    (void)state;
    fd_setup s;
    /* a seed whose sampled coordinates have no ReLU kink within their stencils
     * (other seeds skip up to a quarter of them as kinks, with the same agreement) */
    fd_init(&s, 2, 8);
    cs_rng pick;
    cs_rng_seed(&pick, 99);
    /* analytic gradients: parameters and the image embedding */
    float *demb = malloc(s.emb_n * sizeof(float));
    cs_tparams_zero_grad(&s.ps);
    assert_int_equal(cs_tdecoder_forward(s.dec, s.emb, s.boxes, s.n, s.logits, s.iou, 1, 2), 0);
    assert_int_equal(cs_tdecoder_backward(s.dec, s.R, s.r, demb, 2), 0);
    const double tol = 1e-2;
    fd_stats st = {0, "", 0, 0};
    int n_tensors = 0;
    for (size_t t = 0; t < s.ps.n; t++) {
        cs_tparam *p = &s.ps.items[t];
        double gmax = 0;
        for (size_t k = 0; k < p->n; k++) gmax = fmax(gmax, fabs(p->g[k]));
        const char *nm = p->name;
        /* hypernetworks of mask tokens 1..3 do not reach the single-mask output */
        int unused = strstr(nm, "output_hypernetworks_mlps.") && !strstr(nm, "output_hypernetworks_mlps.0.");
        if (p->frozen || unused) {
            assert_true(gmax == 0.0);
            continue;
        }
        if (gmax == 0.0) { /* every tensor the single-mask output uses gets a gradient */
            printf("  zero gradient: %s\n", nm);
            fail();
        }
        if (strstr(nm, "iou_prediction_head.layers.2.")) /* only IoU output 0 is used */
            for (size_t k = p->n / (size_t)s.cfg.n_mask_tokens; k < p->n; k++) assert_true(p->g[k] == 0.0f);
        n_tensors++;
        for (int j = 0; j < 3; j++) {
            size_t i = (size_t)(cs_rng_uniform(&pick) * p->n);
            if (strstr(nm, "iou_prediction_head.layers.2.")) i = i % (p->n / (size_t)s.cfg.n_mask_tokens); /* row 0 */
            fd_coord(&s, nm, p->w, i, p->g[i], gmax, &st, tol);
        }
    }
    double emax = 0;
    for (size_t k = 0; k < s.emb_n; k++) emax = fmax(emax, fabs(demb[k]));
    for (int j = 0; j < 24; j++) {
        size_t i = (size_t)(cs_rng_uniform(&pick) * s.emb_n);
        fd_coord(&s, "image_emb", s.emb, i, demb[i], emax, &st, tol);
    }
    printf(" finite differences: %d tensors + image embedding, %d coordinates checked, %d skipped (kinks)\n",
           n_tensors, st.checked, st.skipped);
    printf(" max relative error %.3g (tolerance %.0e) at %s\n", st.worst, tol, st.worst_name);
    assert_true(st.checked >= 3 * n_tensors);
    assert_true(st.skipped * 10 <= st.checked);
    assert_true(st.worst <= tol);
    free(demb);
    fd_free(&s);
}

/* Many prompts over threads (private gradients, reduced) = one thread; gradients
 * accumulate over backward calls; the image gradient sums over prompts. */
static void test_threads_and_accumulation(void **state) {
    (void)state;
    fd_setup s;
    fd_init(&s, 5, 11);
    const size_t np = s.ps.n;
    size_t total = 0;
    for (size_t t = 0; t < np; t++) total += s.ps.items[t].n;
    float *g1 = malloc(total * sizeof(float)), *e1 = malloc(s.emb_n * sizeof(float)),
          *e3 = malloc(s.emb_n * sizeof(float));
    float *l1 = malloc((size_t)s.n * s.plane * sizeof(float));
    cs_tparams_zero_grad(&s.ps);
    assert_int_equal(cs_tdecoder_forward(s.dec, s.emb, s.boxes, s.n, l1, s.iou, 1, 1), 0);
    assert_int_equal(cs_tdecoder_backward(s.dec, s.R, s.r, e1, 1), 0);
    size_t off = 0;
    for (size_t t = 0; t < np; t++) {
        memcpy(g1 + off, s.ps.items[t].g, s.ps.items[t].n * sizeof(float));
        off += s.ps.items[t].n;
    }
    /* a second backward needs a new forward */
    assert_int_not_equal(cs_tdecoder_backward(s.dec, s.R, s.r, e1, 1), 0);
    /* three threads, accumulated on top of the first pass: grads double */
    assert_int_equal(cs_tdecoder_forward(s.dec, s.emb, s.boxes, s.n, s.logits, s.iou, 1, 3), 0);
    tu_check_close("logits 3 vs 1 threads", s.logits, l1, (size_t)s.n * s.plane, 1e-5);
    assert_int_equal(cs_tdecoder_backward(s.dec, s.R, s.r, e3, 3), 0);
    tu_check_close("image gradient 3 vs 1 threads", e3, e1, s.emb_n, 1e-4);
    double worst = 0, gmax = 0;
    off = 0;
    for (size_t t = 0; t < np; t++) {
        const cs_tparam *p = &s.ps.items[t];
        for (size_t k = 0; k < p->n; k++) {
            worst = fmax(worst, fabs(p->g[k] - 2.0 * g1[off + k]));
            gmax = fmax(gmax, fabs(g1[off + k]));
        }
        off += p->n;
    }
    printf(" accumulated gradients vs 2x single pass: max abs diff %.3g (max |g| %.3g)\n", worst, gmax);
    assert_true(worst <= 1e-4 * fmax(gmax, 1.0));

    /* image gradient of n prompts = sum of single-prompt gradients; no logits
     * gradient is allowed (NULL) */
    float *sum = calloc(s.emb_n, sizeof(float)), *one = malloc(s.emb_n * sizeof(float));
    for (int b = 0; b < s.n; b++) {
        assert_int_equal(cs_tdecoder_forward(s.dec, s.emb, s.boxes + 4 * b, 1, s.logits, s.iou, 1, 1), 0);
        assert_int_equal(cs_tdecoder_backward(s.dec, s.R + (size_t)b * s.plane, s.r + b, one, 1), 0);
        for (size_t k = 0; k < s.emb_n; k++) sum[k] += one[k];
    }
    tu_check_close("image gradient: batch vs sum of single prompts", e1, sum, s.emb_n, 1e-4);
    assert_int_equal(cs_tdecoder_forward(s.dec, s.emb, s.boxes, s.n, s.logits, s.iou, 1, 2), 0);
    assert_int_equal(cs_tdecoder_backward(s.dec, NULL, s.r, one, 2), 0);
    double m = 0;
    for (size_t k = 0; k < s.emb_n; k++) m = fmax(m, fabs(one[k]));
    assert_true(m > 0 && isfinite(m));
    free(sum);
    free(one);
    free(g1);
    free(e1);
    free(e3);
    free(l1);
    fd_free(&s);
}

static void test_errors(void **state) {
    (void)state;
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_tdecoder *d = NULL;
    cs_tdecoder_config c = small_config();
    c.dim = 12; /* not a multiple of 8 */
    assert_int_equal(cs_tdecoder_create(&ps, "model_cp.", &c, NULL, &d), CELLSAM_ERR_INVALID);
    assert_null(d);
    c = small_config();
    c.heads = 3;
    assert_int_equal(cs_tdecoder_create(&ps, "model_cp.", &c, NULL, &d), CELLSAM_ERR_INVALID);
    c = small_config();
    c.grid = 0;
    assert_int_equal(cs_tdecoder_create(&ps, "model_cp.", &c, NULL, &d), CELLSAM_ERR_INVALID);
    c = small_config();
    c.downsample = 3;
    assert_int_equal(cs_tdecoder_create(&ps, "model_cp.", &c, NULL, &d), CELLSAM_ERR_INVALID);
    assert_int_not_equal(cs_tdecoder_create(NULL, "model_cp.", &c, NULL, &d), 0);
    /* a stored tensor of another shape */
    cs_tparams other;
    cs_tparams_init(&other);
    int64_t shp[2] = {1, 8};
    assert_non_null(cs_tparams_add(&other, "model_cp.mask_decoder.iou_token.weight", 2, shp));
    c = small_config();
    assert_int_equal(cs_tdecoder_create(&other, "model_cp.", &c, NULL, &d), CELLSAM_ERR_MODEL);
    printf(" %s\n", cellsam_last_error());
    cs_tparams_free(&other);

    /* a valid decoder: bad calls */
    assert_int_equal(cs_tdecoder_create(&ps, "model_cp.", &c, NULL, &d), 0);
    const size_t before = ps.n;
    cs_tdecoder *d2 = NULL;
    assert_int_equal(cs_tdecoder_create(&ps, "model_cp.", &c, NULL, &d2), 0); /* reuses the stored tensors */
    assert_int_equal(ps.n, before);
    cs_tdecoder_free(d2);
    const int P = c.dim, G = c.grid;
    float *emb = calloc((size_t)P * G * G, sizeof(float));
    float box[8] = {1, 2, 30, 40, 5, 5, 9, NAN};
    float lg[2 * 16 * 16], io[2];
    assert_int_equal(cs_tdecoder_backward(d, lg, io, NULL, 1), CELLSAM_ERR_INVALID); /* no forward */
    assert_int_equal(cs_tdecoder_forward(d, emb, box, 2, lg, io, 1, 1), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tdecoder_forward(d, emb, box, -1, lg, io, 1, 1), CELLSAM_ERR_LIMIT);
    assert_int_equal(cs_tdecoder_forward(d, emb, box, 100000, lg, io, 1, 1), CELLSAM_ERR_LIMIT);
    assert_int_equal(cs_tdecoder_forward(d, NULL, box, 1, lg, io, 1, 1), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tdecoder_forward(d, emb, box, 1, lg, io, 1, 1), 0);
    assert_true(isfinite(io[0]) && isfinite(lg[0]));
    /* zero prompts: nothing to do, zero image gradient */
    assert_int_equal(cs_tdecoder_forward(d, emb, NULL, 0, NULL, NULL, 1, 1), 0);
    emb[0] = 1;
    assert_int_equal(cs_tdecoder_backward(d, NULL, NULL, emb, 1), 0);
    assert_true(emb[0] == 0.0f);
    assert_int_equal(cs_tdecoder_forward(NULL, emb, box, 1, lg, io, 1, 1), CELLSAM_ERR_INVALID);
    free(emb);
    cs_tdecoder_free(d);
    cs_tdecoder_free(NULL);
    cs_tparams_free(&ps);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parity_reference),
        cmocka_unit_test(test_finite_differences),
        cmocka_unit_test(test_threads_and_accumulation),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
