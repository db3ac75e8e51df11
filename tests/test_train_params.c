/* Parameter store: registration, loading from a checkpoint with shape checks,
 * saving with metadata (head counts) that the inference loader honours. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cellsam.h"
#include "common.h"
#include "testutil.h"
#include "train.h"

static void test_add_find_duplicate(void **state) {
    (void)state;
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_tparam *a = cs_tparams_add(&ps, "blocks.0.norm1.weight", 1, (int64_t[]){8});
    cs_tparam *b = cs_tparams_add(&ps, "blocks.0.attn.qkv.weight", 2, (int64_t[]){24, 8});
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(a->n, 8);
    assert_int_equal(b->n, 192);
    assert_true(a->no_decay);  /* 1-D: no weight decay */
    assert_false(b->no_decay);
    for (size_t i = 0; i < b->n; i++) assert_true(b->w[i] == 0.0f && b->g[i] == 0.0f);
    /* a re-allocation of the item array keeps the data (pointers re-fetched by name) */
    char name[32];
    for (int i = 0; i < 200; i++) {
        snprintf(name, sizeof name, "p%d", i);
        assert_non_null(cs_tparams_add(&ps, name, 2, (int64_t[]){2, 3}));
    }
    assert_non_null(cs_tparams_find(&ps, "p199"));
    assert_int_equal(cs_tparams_find(&ps, "blocks.0.attn.qkv.weight")->n, 192);
    assert_null(cs_tparams_add(&ps, "p7", 1, (int64_t[]){3}));
    assert_non_null(strstr(cellsam_last_error(), "twice"));
    assert_null(cs_tparams_add(&ps, "bad", 2, (int64_t[]){0, 3}));
    assert_int_equal(cs_tparams_set_frozen(&ps, "blocks.0.", 1), 2);
    assert_int_equal(cs_tparams_count_values(&ps, 1), 200 * 6);
    assert_int_equal(cs_tparams_count_values(&ps, 0), 200 * 6 + 200);
    cs_tparams_free(&ps);
}

static void test_rng_and_init(void **state) {
    (void)state;
    cs_rng r1, r2;
    cs_rng_seed(&r1, 42);
    cs_rng_seed(&r2, 42);
    for (int i = 0; i < 100; i++) assert_true(cs_rng_u64(&r1) == cs_rng_u64(&r2));
    cs_tparams ps;
    cs_tparams_init(&ps);
    cs_tparam *p = cs_tparams_add(&ps, "w", 2, (int64_t[]){200, 100});
    cs_init_trunc_normal(p, &r1, 0.02f);
    double s = 0, s2 = 0, mx = 0;
    for (size_t i = 0; i < p->n; i++) {
        s += p->w[i];
        s2 += (double)p->w[i] * p->w[i];
        mx = fmax(mx, fabs(p->w[i]));
    }
    double mean = s / p->n, sd = sqrt(s2 / p->n - mean * mean);
    printf("trunc_normal(0.02): mean %.2e sd %.4f max %.4f\n", mean, sd, mx);
    assert_true(fabs(mean) < 1e-3);
    assert_true(sd > 0.016 && sd < 0.019); /* N(0,1) truncated at 2 sd has sd 0.88 */
    assert_true(mx <= 0.04 + 1e-7);
    cs_init_kaiming_uniform(p, &r1); /* fan_in 100: bound 0.1 */
    mx = 0;
    for (size_t i = 0; i < p->n; i++) mx = fmax(mx, fabs(p->w[i]));
    assert_true(mx <= 0.1 && mx > 0.099);
    cs_tparams_free(&ps);
}

static void test_load_save_roundtrip(void **state) {
    (void)state;
    cs_weights *w = NULL;
    assert_int_equal(cs_weights_open(tu_path("checkpoint.safetensors"), &w), CELLSAM_OK);
    cs_tparams ps;
    cs_tparams_init(&ps);
    const cs_tensor_entry *e = cs_weights_find(w, "model_cp.mask_decoder.iou_token.weight");
    assert_non_null(e);
    cs_tparam *p = cs_tparams_add(&ps, e->name, e->ndim, e->shape);
    cs_tparams_add(&ps, "not.in.the.checkpoint", 1, (int64_t[]){4});
    size_t loaded = 0, missing = 0;
    assert_int_equal(cs_tparams_load(&ps, w, &loaded, &missing), CELLSAM_OK);
    assert_int_equal(loaded, 1);
    assert_int_equal(missing, 1);
    assert_memory_equal(p->w, e->data, p->n * sizeof(float));
    /* a prefix restricts the load to the tensors under it (finetune --detector-from) */
    memset(p->w, 0, p->n * sizeof(float));
    assert_int_equal(cs_tparams_load_prefix(&ps, w, "cellfinder.", &loaded, &missing), CELLSAM_OK);
    assert_int_equal(loaded, 0);
    assert_int_equal(missing, 0);
    assert_true(p->w[0] == 0.0f);
    assert_int_equal(cs_tparams_load_prefix(&ps, w, "model_cp.", &loaded, &missing), CELLSAM_OK);
    assert_int_equal(loaded, 1);
    assert_int_equal(missing, 0);
    assert_memory_equal(p->w, e->data, p->n * sizeof(float));
    /* a shape mismatch names the tensor */
    cs_tparams bad;
    cs_tparams_init(&bad);
    cs_tparams_add(&bad, e->name, 2, (int64_t[]){1, (int64_t)p->n + 1});
    assert_int_equal(cs_tparams_load(&bad, w, NULL, NULL), CELLSAM_ERR_MODEL);
    assert_non_null(strstr(cellsam_last_error(), "iou_token"));
    cs_tparams_free(&bad);

    /* whole checkpoint -> store -> safetensors with head metadata -> same values */
    cs_tparams all;
    cs_tparams_init(&all);
    for (size_t i = 0; i < cs_weights_count(w); i++) {
        const cs_tensor_entry *t = cs_weights_at(w, i);
        assert_non_null(cs_tparams_add(&all, t->name, t->ndim, t->shape));
    }
    assert_int_equal(cs_tparams_load(&all, w, &loaded, &missing), CELLSAM_OK);
    assert_int_equal(missing, 0);
    const char *meta[] = {"cellsam.vit_heads", "2", "cellsam.decoder_heads", "2", "cellsam.detector_heads", "4", NULL};
    const char *out = tu_tmp("roundtrip.safetensors");
    assert_int_equal(cs_tparams_save(&all, out, CS_DTYPE_F32, meta), CELLSAM_OK);
    cs_weights *w2 = NULL;
    assert_int_equal(cs_weights_open(out, &w2), CELLSAM_OK);
    assert_string_equal(cs_weights_get_meta(w2, "cellsam.detector_heads"), "4");
    assert_null(cs_weights_get_meta(w2, "absent"));
    for (size_t i = 0; i < cs_weights_count(w); i++) {
        const cs_tensor_entry *a = cs_weights_at(w, i);
        const cs_tensor_entry *b = cs_weights_find(w2, a->name);
        assert_non_null(b);
        assert_int_equal(a->nbytes, b->nbytes);
        assert_memory_equal(a->data, b->data, a->nbytes);
    }
    cs_weights_free(w2);
    /* the saved file loads without a config: the heads come from the metadata and
     * the model matches the reference one exactly */
    cellsam_model *m = NULL, *ref = NULL;
    cellsam_context *ctx = NULL;
    assert_int_equal(cellsam_model_load(out, NULL, &m), CELLSAM_OK);
    assert_int_equal(tu_load_reference_model("checkpoint.safetensors", &ref, &ctx), 0);
    cellsam_model_info a, b;
    cellsam_model_get_info(m, &a);
    cellsam_model_get_info(ref, &b);
    assert_int_equal(a.num_heads, b.num_heads);
    assert_int_equal(a.decoder_heads, b.decoder_heads);
    assert_int_equal(a.det_heads, b.det_heads);
    cellsam_model_free(m);
    /* bad metadata is a load error, not a silent default */
    const char *bad_meta[] = {"cellsam.vit_heads", "two", NULL};
    assert_int_equal(cs_tparams_save(&all, out, CS_DTYPE_F32, bad_meta), CELLSAM_OK);
    assert_int_equal(cellsam_model_load(out, NULL, &m), CELLSAM_ERR_MODEL);
    assert_non_null(strstr(cellsam_last_error(), "cellsam.vit_heads"));
    cellsam_context_free(ctx);
    cellsam_model_free(ref);
    cs_tparams_free(&all);
    cs_tparams_free(&ps);
    cs_weights_free(w);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_add_find_duplicate),
        cmocka_unit_test(test_rng_and_init),
        cmocka_unit_test(test_load_save_roundtrip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
