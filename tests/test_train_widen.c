/* cs_widen_trunk (train_widen.c): without noise, the widened CellFinder computes what
 * the narrow one did on the testdata model (trunk channel n = narrow channel n mod D,
 * the same logits and boxes); with noise the copies part; bad arguments and stores
 * without a trunk are refused. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cellfinder.h"
#include "common.h"
#include "model.h"
#include "testutil.h"
#include "train.h"
#include "weights.h"

#define GRID 64
#define QKV0 "cellfinder.decode_head.backbone.body.blocks.0.attn.qkv.weight"

/* A smooth 3 x 1024 x 1024 input in the detector branch's range. */
static float *smooth_input(void) {
    float *x = malloc((size_t)3 << 20 << 2);
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < 1024; i++)
            for (int j = 0; j < 1024; j++)
                x[((size_t)c << 20) + (size_t)i * 1024 + j] =
                    0.5f + 0.4f * sinf(0.011f * (float)(i + 3 * c)) * cosf(0.017f * (float)j + (float)c);
    return x;
}

static cellsam_model *load_with_config(const char *path) {
    cellsam_model_params p = cellsam_model_default_params();
    char cfg[1024];
    snprintf(cfg, sizeof cfg, "%s/config.json", tu_testdata());
    p.config_path = cfg;
    cellsam_model *m = NULL;
    if (cellsam_model_load(path, &p, &m)) fail_msg("load %s: %s", path, cellsam_last_error());
    return m;
}

static double max_abs_diff(const float *a, const float *b, size_t n, double *max_abs) {
    double d = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        m = fmax(m, fabs((double)a[i]));
    }
    if (max_abs) *max_abs = m;
    return d;
}

static void test_widened_computes_the_same(void **state) {
    (void)state;
    cs_weights *in = NULL, *wide = NULL;
    assert_int_equal(cs_weights_open(tu_path("checkpoint.safetensors"), &in), CELLSAM_OK);
    assert_int_equal(cs_widen_trunk(in, 2, 0.0f, 1, &wide), CELLSAM_OK);
    const char *path = tu_tmp("wide.safetensors");
    assert_int_equal(cs_weights_save_safetensors(wide, path, CS_DTYPE_F32), CELLSAM_OK);
    /* without noise the copies are exact */
    const cs_tensor_entry *q = cs_weights_find(wide, QKV0);
    assert_non_null(q);
    int64_t cols = q->shape[1];
    int64_t hd2 = cs_weights_dim(wide, NULL, "cellfinder.decode_head.backbone.body.blocks.0.attn.rel_pos_h", 1);
    assert_memory_equal((const float *)q->data, (const float *)q->data + (hd2 / 2) * cols, (size_t)cols * 4);
    cs_weights_free(wide);

    cellsam_model *narrow = load_with_config(tu_path("checkpoint.safetensors"));
    cellsam_model *wider = load_with_config(path);
    const int D = narrow->det_vit.dim;
    assert_int_equal(wider->det_vit.dim, 2 * D);
    assert_int_equal(wider->det_vit.mlp, 2 * narrow->det_vit.mlp);
    assert_int_equal(wider->det_vit.heads, narrow->det_vit.heads);
    assert_int_equal(wider->sam_vit.dim, narrow->sam_vit.dim);

    float *x = smooth_input();
    float *fa = malloc((size_t)D * GRID * GRID * 4), *fb = malloc((size_t)2 * D * GRID * GRID * 4);
    assert_int_equal(cs_vit_forward(&narrow->det_vit, x, fa, 2), CELLSAM_OK);
    assert_int_equal(cs_vit_forward(&wider->det_vit, x, fb, 2), CELLSAM_OK);
    double worst = 0, mag = 0;
    for (int n = 0; n < 2 * D; n++) {
        double m;
        worst = fmax(worst, max_abs_diff(fa + (size_t)(n % D) * GRID * GRID, fb + (size_t)n * GRID * GRID,
                                         GRID * GRID, &m));
        mag = fmax(mag, m);
    }
    printf("  trunk features: max |wide - narrow| %.3g (max |narrow| %.3g)\n", worst, mag);
    assert_true(worst <= 1e-4 * fmax(1.0, mag));

    cs_cellfinder_dims d;
    cs_cellfinder_get_dims(narrow->det, &d);
    const int Q = d.n_queries;
    float *la = malloc((size_t)Q * 2 * 4), *lb = malloc((size_t)Q * 2 * 4);
    float *ba = malloc((size_t)Q * 4 * 4), *bb = malloc((size_t)Q * 4 * 4);
    assert_int_equal(cs_cellfinder_forward(narrow->det, fa, la, ba, NULL, NULL, 2), CELLSAM_OK);
    assert_int_equal(cs_cellfinder_forward(wider->det, fb, lb, bb, NULL, NULL, 2), CELLSAM_OK);
    double dl = max_abs_diff(la, lb, (size_t)Q * 2, NULL), db = max_abs_diff(ba, bb, (size_t)Q * 4, NULL);
    printf("  head: max |logit diff| %.3g, max |box diff| %.3g over %d queries\n", dl, db, Q);
    assert_true(dl <= 5e-3); /* measured 8e-4: the input projection sums twice as many terms */
    assert_true(db <= 1e-5);

    free(la), free(lb), free(ba), free(bb), free(fa), free(fb), free(x);
    cellsam_model_free(narrow);
    cellsam_model_free(wider);
    cs_weights_free(in);
}

static void test_noise_parts_the_copies(void **state) {
    (void)state;
    cs_weights *in = NULL, *wide = NULL;
    assert_int_equal(cs_weights_open(tu_path("checkpoint.safetensors"), &in), CELLSAM_OK);
    assert_int_equal(cs_widen_trunk(in, 3, 0.01f, 7, &wide), CELLSAM_OK);
    const cs_tensor_entry *q = cs_weights_find(wide, QKV0), *q0 = cs_weights_find(in, QKV0);
    assert_int_equal(q->shape[0], 3 * q0->shape[0]);
    assert_int_equal(q->shape[1], 3 * q0->shape[1]);
    assert_int_equal(q->dtype, CS_DTYPE_F32);
    /* row 0 and its first copy (one old head width further): close, not equal */
    int64_t hd3 = cs_weights_dim(wide, NULL, "cellfinder.decode_head.backbone.body.blocks.0.attn.rel_pos_h", 1);
    const float *r0 = q->data, *r1 = (const float *)q->data + (hd3 / 3) * q->shape[1];
    double diff = 0, ss = 0;
    for (int64_t k = 0; k < q->shape[1]; k++) {
        diff += ((double)r0[k] - r1[k]) * ((double)r0[k] - r1[k]);
        ss += (double)r0[k] * r0[k];
    }
    printf("  copies of a q row differ by %.3g of its norm\n", sqrt(diff / ss));
    assert_true(diff > 0);
    assert_true(sqrt(diff / ss) < 0.05);
    /* tensors outside the trunk are the input's, unchanged */
    const char *sam = "model_cp.image_encoder.blocks.0.attn.qkv.weight";
    assert_ptr_equal(cs_weights_find(wide, sam)->data, cs_weights_find(in, sam)->data);
    assert_int_equal(cs_weights_count(wide), cs_weights_count(in));
    cs_weights_free(wide);
    cs_weights_free(in);
}

static void test_refusals(void **state) {
    (void)state;
    cs_weights *in = NULL, *out = (cs_weights *)&out;
    assert_int_equal(cs_weights_open(tu_path("checkpoint.safetensors"), &in), CELLSAM_OK);
    assert_int_equal(cs_widen_trunk(in, 1, 0.01f, 1, &out), CELLSAM_ERR_INVALID);
    assert_null(out);
    assert_int_equal(cs_widen_trunk(in, 5, 0.01f, 1, &out), CELLSAM_ERR_INVALID);
    assert_int_equal(cs_widen_trunk(in, 2, NAN, 1, &out), CELLSAM_ERR_INVALID);
    assert_non_null(strstr(cellsam_last_error(), "noise"));
    /* a trunk tensor whose shape does not fit the trunk's width: refused, not read past */
    const char *pe = "cellfinder.decode_head.backbone.body.pos_embed";
    cs_weights *odd = cs_weights_new("safetensors");
    for (size_t i = 0; i < cs_weights_count(in); i++) {
        const cs_tensor_entry *e = cs_weights_at(in, i);
        if (strcmp(e->name, pe)) {
            assert_int_equal(cs_weights_add_view(odd, e->name, e->dtype, e->ndim, e->shape, e->data, e->nbytes), 0);
            continue;
        }
        int64_t sh[4] = {1, 64, 64, e->shape[3] - 1};
        size_t n = (size_t)(64 * 64 * sh[3]);
        assert_int_equal(cs_weights_add_owned(odd, pe, CS_DTYPE_F32, 4, sh, calloc(n, 4), n * 4), 0);
    }
    assert_int_equal(cs_weights_finish(odd), CELLSAM_OK);
    assert_int_equal(cs_widen_trunk(odd, 2, 0.01f, 1, &out), CELLSAM_ERR_MODEL);
    assert_null(out);
    assert_non_null(strstr(cellsam_last_error(), "pos_embed"));
    cs_weights_free(odd);
    cs_weights_free(in);
    /* a store without a CellFinder (a plain SAM) */
    cs_weights *sam = cs_weights_new("safetensors");
    float *v = calloc(4, sizeof *v);
    int64_t shape[1] = {4};
    assert_int_equal(cs_weights_add_owned(sam, "image_encoder.patch_embed.proj.bias", CS_DTYPE_F32, 1, shape, v, 16),
                     CELLSAM_OK);
    assert_int_equal(cs_weights_finish(sam), CELLSAM_OK);
    assert_int_equal(cs_widen_trunk(sam, 2, 0.01f, 1, &out), CELLSAM_ERR_MODEL);
    assert_null(out);
    assert_non_null(strstr(cellsam_last_error(), "trunk"));
    cs_weights_free(sam);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_widened_computes_the_same),
        cmocka_unit_test(test_noise_parts_the_copies),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
