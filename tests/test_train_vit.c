/* Trainable SAM ViT (train_vit.c): forward parity with the official encoder
 * outputs (unit_pattern/, MANIFEST tolerance abs 1e-4) for the SAM image encoder
 * (with neck) and the CellFinder trunk (without), parameter names and shapes
 * against the checkpoint, finite-difference checks of the gradient of
 * loss = sum(out * R) for samples of every parameter tensor (windowed blocks with
 * padding, global blocks with several query blocks, neck and no neck), gradient
 * accumulation, and error paths. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cellsam.h"
#include "common.h"
#include "testutil.h"
#include "train.h"
#include "weights.h"


/* Analytic inputs of MANIFEST unit_pattern/: kind 0 = v/64 - 2, kind 1 = v/255. */
static float *pattern_input(int a, int b, int c_mul, int kind) {
    float *x = malloc((size_t)3 * 1024 * 1024 * sizeof(float));
    assert_non_null(x);
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < 1024; y++)
            for (int xx = 0; xx < 1024; xx++) {
                int v = (a * xx + b * y + c_mul * c) % 256;
                x[((size_t)c * 1024 + y) * 1024 + xx] = kind == 0 ? (float)v / 64.0f - 2.0f : (float)v / 255.0f;
            }
    return x;
}

static int json_int(json_t *obj, const char *key) {
    json_t *v = json_object_get(obj, key);
    if (!json_is_integer(v)) fail_msg("config.json: %s is not an integer", key);
    return (int)json_integer_value(v);
}

/* The reference encoder's hyper-parameters from config.json. */
static cs_tvit_config reference_config(int with_neck) {
    json_error_t err;
    json_t *root = json_load_file(tu_path("config.json"), 0, &err);
    if (!root) fail_msg("cannot read config.json: %s", err.text);
    json_t *ie = json_object_get(root, "image_encoder");
    assert_non_null(ie);
    cs_tvit_config c;
    memset(&c, 0, sizeof c);
    c.img_size = json_int(root, "image_size");
    c.patch = json_int(root, "patch_size");
    c.dim = json_int(ie, "embed_dim");
    c.depth = json_int(ie, "depth");
    c.heads = json_int(ie, "num_heads");
    c.mlp = json_int(ie, "mlp_hidden");
    c.window = json_int(ie, "window_size");
    json_t *g = json_object_get(ie, "global_attn_indexes");
    assert_true(json_is_array(g) && json_array_size(g) <= 16);
    c.n_global = (int)json_array_size(g);
    for (int i = 0; i < c.n_global; i++) c.global_idx[i] = (int)json_integer_value(json_array_get(g, (size_t)i));
    c.out_chans = with_neck ? json_int(ie, "out_chans") : 0;
    json_decref(root);
    return c;
}

/* Create the module on a fresh store, load the reference checkpoint into it and
 * check that the registered names are exactly the checkpoint's tensors under prefix. */
static void parity_case(const char *prefix, int with_neck, const float *x, const char *ref_name, int train) {
    cs_tvit_config cfg = reference_config(with_neck);
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_rng rng;
    cs_rng_seed(&rng, 1);
    cs_tvit *v = NULL;
    assert_int_equal(cs_tvit_create(&ps, prefix, &cfg, &rng, &v), CELLSAM_OK);
    cs_weights *w = NULL;
    assert_int_equal(cs_weights_open(tu_path("checkpoint.safetensors"), &w), CELLSAM_OK);
    size_t loaded = 0, missing = 0, in_ckpt = 0;
    assert_int_equal(cs_tparams_load(&ps, w, &loaded, &missing), CELLSAM_OK);
    for (size_t i = 0; i < cs_weights_count(w); i++)
        if (!strncmp(cs_weights_at(w, i)->name, prefix, strlen(prefix))) in_ckpt++;
    printf("  %s: %zu parameters registered, %zu loaded, %zu missing, %zu in the checkpoint\n", prefix, ps.n,
           loaded, missing, in_ckpt);
    assert_int_equal(missing, 0);
    assert_int_equal(loaded, ps.n);
    assert_int_equal(in_ckpt, ps.n);
    cs_weights_free(w);

    const int G = cfg.img_size / cfg.patch, C = with_neck ? cfg.out_chans : cfg.dim;
    const size_t n = (size_t)C * G * G;
    float *out = malloc(n * sizeof(float));
    assert_non_null(out);
    double t0 = cs_now_seconds();
    assert_int_equal(cs_tvit_forward(v, x, out, train, 2), CELLSAM_OK);
    printf("  forward (train=%d, 2 threads): %.0f ms, activations held %.1f MiB\n", train,
           1e3 * (cs_now_seconds() - t0), (double)cs_tvit_activation_bytes(v) / (1 << 20));
    cs_npy ref;
    tu_load(&ref, "%s", ref_name);
    tu_check_npy(ref_name, out, n, &ref, 1e-4);
    cs_npy_free(&ref);
    free(out);
    cs_tvit_free(v);
    cs_tparams_free(&ps);
}

static void test_parity_sam_encoder(void **state) {
    (void)state;
    float *x = pattern_input(7, 13, 29, 0);
    /* train=1 also exercises the kept-probabilities path with 16 query blocks per head */
    parity_case("model_cp.image_encoder.", 1, x, "unit_pattern/sam_encoder_output.npy", 1);
    free(x);
}

static void test_parity_detector_trunk(void **state) {
    (void)state;
    float *x = pattern_input(11, 5, 17, 1);
    parity_case("cellfinder.decode_head.backbone.body.", 0, x, "unit_pattern/det_backbone_features.npy", 0);
    free(x);
}

/* ------------------------------------------------------ finite differences */

typedef struct {
    cs_tparams ps;
    cs_tvit *v;
    cs_tvit_config cfg;
    float *x, *R, *out;
    size_t nout;
} fd_model;

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

/* Non-trivial values everywhere (relative tables, biases and norm shifts are zero at
 * init, which would hide their paths from the check), scaled like the reference's. */
static void randomise(cs_tparams *ps, cs_rng *rng) {
    for (size_t i = 0; i < ps->n; i++) {
        cs_tparam *p = &ps->items[i];
        int is_norm_w = p->ndim == 1 && (strstr(p->name, "norm") || strstr(p->name, "neck.1") ||
                                         strstr(p->name, "neck.3")) && ends_with(p->name, ".weight");
        double std = p->ndim >= 2 ? 1.0 / sqrt((double)(p->n / (size_t)p->shape[0])) : 0.1;
        if (strstr(p->name, "rel_pos")) std = 0.3;
        if (strstr(p->name, "pos_embed")) std = 0.5;
        for (size_t k = 0; k < p->n; k++) p->w[k] = (float)((is_norm_w ? 1.0 : 0.0) + std * cs_rng_normal(rng));
    }
}

static void fd_setup(fd_model *m, const cs_tvit_config *cfg, uint64_t seed) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    cs_tparams_init(&m->ps);
    cs_rng rng;
    cs_rng_seed(&rng, seed);
    assert_int_equal(cs_tvit_create(&m->ps, "enc.", cfg, &rng, &m->v), CELLSAM_OK);
    randomise(&m->ps, &rng);
    const int G = cfg->img_size / cfg->patch, C = cfg->out_chans ? cfg->out_chans : cfg->dim;
    const size_t nin = (size_t)3 * cfg->img_size * cfg->img_size;
    m->nout = (size_t)C * G * G;
    m->x = malloc(nin * sizeof(float));
    m->R = malloc(m->nout * sizeof(float));
    m->out = malloc(m->nout * sizeof(float));
    assert_true(m->x && m->R && m->out);
    for (size_t i = 0; i < nin; i++) m->x[i] = (float)cs_rng_normal(&rng);
    for (size_t i = 0; i < m->nout; i++) m->R[i] = (float)(2.0 * cs_rng_uniform(&rng) - 1.0);
}

static void fd_teardown(fd_model *m) {
    cs_tvit_free(m->v);
    cs_tparams_free(&m->ps);
    free(m->x);
    free(m->R);
    free(m->out);
}

static double fd_loss(fd_model *m) {
    assert_int_equal(cs_tvit_forward(m->v, m->x, m->out, 0, 1), CELLSAM_OK);
    double s = 0;
    for (size_t i = 0; i < m->nout; i++) s += (double)m->out[i] * m->R[i];
    return s;
}

/* Central differences on a few coordinates of every parameter tensor: the two with
 * the largest analytic gradient and two random ones. Error metric
 * |a - n| / max(|a| + |n|, 0.05 + 1e-3 * max|a| over the tensor), tolerance tol: the
 * floor keeps coordinates whose true gradient is ~0 (e.g. the key bias, to which
 * softmax is invariant) from dividing float32 forward noise (~1e-4 on the
 * numeric derivative here) by ~0; for them the check is an absolute one. */
static void fd_check_all(fd_model *m, const char *label, double tol) {
    cs_tparams_zero_grad(&m->ps);
    assert_int_equal(cs_tvit_forward(m->v, m->x, m->out, 1, 2), CELLSAM_OK);
    assert_int_equal(cs_tvit_backward(m->v, m->R, 2), CELLSAM_OK);
    /* keep the analytic gradients: the FD forwards below leave the store's alone,
     * but copy them so the check cannot be fooled by later writes */
    float **grads = calloc(m->ps.n, sizeof *grads);
    assert_non_null(grads);
    for (size_t i = 0; i < m->ps.n; i++) {
        grads[i] = malloc(m->ps.items[i].n * sizeof(float));
        assert_non_null(grads[i]);
        memcpy(grads[i], m->ps.items[i].g, m->ps.items[i].n * sizeof(float));
    }
    cs_rng rng;
    cs_rng_seed(&rng, 99);
    double worst = 0;
    const char *worst_name = "";
    int n_checked = 0;
    for (size_t i = 0; i < m->ps.n; i++) {
        cs_tparam *p = &m->ps.items[i];
        const float *g = grads[i];
        size_t top[2] = {0, 0};
        double gmax = 0;
        for (size_t k = 0; k < p->n; k++) {
            double a = fabs(g[k]);
            if (a > gmax) gmax = a;
            if (a > fabs(g[top[0]])) {
                top[1] = top[0];
                top[0] = k;
            } else if (k != top[0] && a > fabs(g[top[1]])) {
                top[1] = k;
            }
        }
        if (!(gmax > 0)) fail_msg("%s %s: gradient is zero everywhere", label, p->name);
        size_t coords[4] = {top[0], top[1], (size_t)(cs_rng_uniform(&rng) * (double)p->n),
                            (size_t)(cs_rng_uniform(&rng) * (double)p->n)};
        double tensor_worst = 0;
        for (int c = 0; c < 4; c++) {
            size_t k = coords[c] < p->n ? coords[c] : p->n - 1;
            const float w0 = p->w[k];
            const double h = 1e-2 * (fabs(w0) > 1.0 ? fabs(w0) : 1.0);
            p->w[k] = (float)(w0 + h);
            const double hp = (double)p->w[k] - w0;
            double lp = fd_loss(m);
            p->w[k] = (float)(w0 - h);
            const double hm = w0 - (double)p->w[k];
            double lm = fd_loss(m);
            p->w[k] = w0;
            const double num = (lp - lm) / (hp + hm), ana = g[k];
            const double denom = fmax(fabs(ana) + fabs(num), 0.05 + 1e-3 * gmax);
            const double rel = fabs(ana - num) / denom;
            if (rel > tensor_worst) tensor_worst = rel;
            if (rel > tol)
                printf("  FAIL %s %s[%zu]: analytic %.6g numeric %.6g rel %.3g\n", label, p->name, k, ana, num, rel);
            n_checked++;
        }
        printf("  %-6s %-40s max rel err %.2e\n", label, p->name, tensor_worst);
        if (tensor_worst > worst) {
            worst = tensor_worst;
            worst_name = p->name;
        }
    }
    printf("  %s: %d coordinates in %zu tensors, max rel err %.3g (%s), tol %.1g\n", label, n_checked, m->ps.n,
           worst, worst_name, tol);
    for (size_t i = 0; i < m->ps.n; i++) free(grads[i]);
    free(grads);
    if (!(worst <= tol)) fail_msg("%s: finite-difference error %.3g on %s exceeds %.3g", label, worst, worst_name, tol);
}

/* Grid 5 with window 3: 2x2 windows over a 6x6 zero-padded grid; one global block;
 * the neck. */
static cs_tvit_config small_config_neck(void) {
    cs_tvit_config c;
    memset(&c, 0, sizeof c);
    c.img_size = 80;
    c.patch = 16;
    c.dim = 16;
    c.depth = 3;
    c.heads = 2;
    c.mlp = 32;
    c.window = 3;
    c.n_global = 1;
    c.global_idx[0] = 1;
    c.out_chans = 8;
    return c;
}

/* Grid 17: the global block has 289 queries, more than one query block of the
 * attention (256), and window 4 pads 17 to 20. No neck (the CellFinder trunk). */
static cs_tvit_config small_config_trunk(void) {
    cs_tvit_config c;
    memset(&c, 0, sizeof c);
    c.img_size = 272;
    c.patch = 16;
    c.dim = 8;
    c.depth = 2;
    c.heads = 2;
    c.mlp = 16;
    c.window = 4;
    c.n_global = 1;
    c.global_idx[0] = 0;
    c.out_chans = 0;
    return c;
}

static void test_fd_neck_padded_windows(void **state) {
    (void)state;
    fd_model m;
    cs_tvit_config c = small_config_neck();
    fd_setup(&m, &c, 7);
    fd_check_all(&m, "neck", 1e-2);
    fd_teardown(&m);
}

static void test_fd_trunk_query_blocks(void **state) {
    (void)state;
    fd_model m;
    cs_tvit_config c = small_config_trunk();
    fd_setup(&m, &c, 11);
    /* train=1 keeps the probabilities; the output must not depend on it */
    float *o2 = malloc(m.nout * sizeof(float));
    assert_non_null(o2);
    assert_int_equal(cs_tvit_forward(m.v, m.x, m.out, 0, 2), CELLSAM_OK);
    assert_int_equal(cs_tvit_forward(m.v, m.x, o2, 1, 2), CELLSAM_OK);
    tu_check_close("trunk output train=1 vs train=0", o2, m.out, m.nout, 1e-6);
    free(o2);
    fd_check_all(&m, "trunk", 1e-2);
    fd_teardown(&m);
}

/* Gradients accumulate: a second backward of the same forward doubles them. */
static void test_accumulation(void **state) {
    (void)state;
    fd_model m;
    cs_tvit_config c = small_config_neck();
    fd_setup(&m, &c, 3);
    cs_tparams_zero_grad(&m.ps);
    assert_int_equal(cs_tvit_forward(m.v, m.x, m.out, 1, 2), CELLSAM_OK);
    assert_int_equal(cs_tvit_backward(m.v, m.R, 2), CELLSAM_OK);
    size_t total = cs_tparams_count_values(&m.ps, 0), off = 0;
    float *g1 = malloc(total * sizeof(float)), *g2 = malloc(total * sizeof(float));
    assert_true(g1 && g2);
    for (size_t i = 0; i < m.ps.n; i++) {
        memcpy(g1 + off, m.ps.items[i].g, m.ps.items[i].n * sizeof(float));
        off += m.ps.items[i].n;
    }
    assert_int_equal(cs_tvit_backward(m.v, m.R, 2), CELLSAM_OK);
    double gmax = 0;
    off = 0;
    for (size_t i = 0; i < m.ps.n; i++) {
        for (size_t k = 0; k < m.ps.items[i].n; k++) {
            g2[off + k] = m.ps.items[i].g[k];
            g1[off + k] *= 2.0f;
            if (fabs(g1[off + k]) > gmax) gmax = fabs(g1[off + k]);
        }
        off += m.ps.items[i].n;
    }
    tu_check_close("two backwards vs 2 x one backward", g2, g1, total, 1e-5 * gmax);
    free(g1);
    free(g2);
    fd_teardown(&m);
}

static void test_errors(void **state) {
    (void)state;
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_tvit *v = NULL;
    cs_tvit_config c = small_config_neck();
    cs_tvit_config bad = c;
    bad.heads = 3; /* 16 not divisible */
    assert_int_equal(cs_tvit_create(&ps, "e.", &bad, NULL, &v), CELLSAM_ERR_INVALID);
    assert_null(v);
    bad = c;
    bad.img_size = 81;
    assert_int_equal(cs_tvit_create(&ps, "e.", &bad, NULL, &v), CELLSAM_ERR_INVALID);
    bad = c;
    bad.global_idx[0] = 3; /* depth 3 */
    assert_int_equal(cs_tvit_create(&ps, "e.", &bad, NULL, &v), CELLSAM_ERR_INVALID);
    bad = c;
    bad.img_size = 16 * 300;
    assert_int_equal(cs_tvit_create(&ps, "e.", &bad, NULL, &v), CELLSAM_ERR_LIMIT);
    bad = c;
    bad.depth = 0;
    assert_int_equal(cs_tvit_create(&ps, "e.", &bad, NULL, &v), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tvit_create(&ps, "e.", &c, NULL, NULL), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tvit_create(NULL, "e.", &c, NULL, &v), CELLSAM_ERR_INVALID);

    /* a store that already holds a tensor of the wrong shape */
    cs_tparams_add(&ps, "e.blocks.1.attn.rel_pos_h", 2, (const int64_t[]){5, 8}); /* global block: 9 x 8 */
    assert_int_equal(cs_tvit_create(&ps, "e.", &c, NULL, &v), CELLSAM_ERR_MODEL);
    printf("  shape mismatch: %s\n", cellsam_last_error());
    assert_null(v);
    cs_tparams_free(&ps);

    /* the store's existing values are kept (fine-tuning start), new ones initialised */
    cs_tparams_init(&ps);
    cs_tparam *pe = cs_tparams_add(&ps, "e.pos_embed", 4, (const int64_t[]){1, 5, 5, 16});
    assert_non_null(pe);
    cs_init_const(pe, 0.5f);
    assert_int_equal(cs_tvit_create(&ps, "e.", &c, NULL, &v), CELLSAM_OK);
    pe = cs_tparams_find(&ps, "e.pos_embed");
    assert_true(pe->w[0] == 0.5f && pe->w[pe->n - 1] == 0.5f);
    assert_true(cs_tparams_find(&ps, "e.blocks.2.norm1.weight")->w[0] == 1.0f);
    assert_true(cs_tparams_find(&ps, "e.neck.3.bias")->w[0] == 0.0f);
    /* a second module on the same prefix shares the parameters */
    cs_tvit *v2 = NULL;
    size_t n_before = ps.n;
    assert_int_equal(cs_tvit_create(&ps, "e.", &c, NULL, &v2), CELLSAM_OK);
    assert_int_equal(ps.n, n_before);
    cs_tvit_free(v2);

    float *x = calloc((size_t)3 * 80 * 80, sizeof(float));
    float *out = calloc((size_t)8 * 25, sizeof(float));
    assert_true(x && out);
    assert_int_equal(cs_tvit_backward(v, out, 1), CELLSAM_ERR_INVALID); /* no forward yet */
    assert_int_equal(cs_tvit_forward(v, x, out, 0, 1), CELLSAM_OK);
    assert_int_equal(cs_tvit_backward(v, out, 1), CELLSAM_ERR_INVALID); /* inference forward */
    assert_int_equal(cs_tvit_forward(v, NULL, out, 1, 1), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tvit_backward(v, out, 1), CELLSAM_ERR_INVALID); /* failed forward */
    assert_int_equal(cs_tvit_forward(v, x, out, 1, 1), CELLSAM_OK);
    assert_int_equal(cs_tvit_backward(v, NULL, 1), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_tvit_backward(v, out, 1), CELLSAM_OK);
    assert_int_equal(cs_tvit_forward(NULL, x, out, 0, 1), CELLSAM_ERR_INVALID);
    cs_tvit_free(v);
    cs_tvit_free(NULL);
    free(x);
    free(out);
    cs_tparams_free(&ps);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_accumulation),
        cmocka_unit_test(test_fd_neck_padded_windows),
        cmocka_unit_test(test_fd_trunk_query_blocks),
        cmocka_unit_test(test_parity_sam_encoder),
        cmocka_unit_test(test_parity_detector_trunk),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
