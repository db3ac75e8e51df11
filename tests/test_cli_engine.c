/* The engine CLI (info, convert, embed, prompt) and the model loader's error paths:
 * exit codes, one-line messages naming the problem, no half-written outputs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "model.h"
#include "testutil.h"
#include "weights.h"

/* Run a shell command, capture stdout+stderr, return the exit status. */

static int count_lines(const char *s) {
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

static char cfg[1024];

static int setup(void **s) {
    (void)s;
    snprintf(cfg, sizeof cfg, "%s/config.json", tu_testdata());
    return 0;
}

static void test_info_and_help(void **s) {
    (void)s;
    char out[8192];
    assert_int_equal(tu_run(out, sizeof out, "%s info -m %s --config %s", tu_cli(), tu_path("checkpoint.safetensors"), cfg), 0);
    assert_non_null(strstr(out, "model_cp."));
    assert_non_null(strstr(out, "depth 4"));
    assert_non_null(strstr(out, "global blocks 1 3"));
    const char *cmds[] = {"info", "convert", "embed", "prompt"};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(tu_run(out, sizeof out, "%s %s --help", tu_cli(), cmds[i]), 0);
        assert_non_null(strstr(out, "usage: cellsam"));
    }
    assert_int_equal(tu_run(out, sizeof out, "%s nosuchcommand", tu_cli()), 2);
}

/* Copy the first `keep` bytes of a file. */
static void truncate_copy(const char *src, const char *dst, long keep) {
    FILE *in = fopen(src, "rb"), *o = fopen(dst, "wb");
    assert_non_null(in);
    assert_non_null(o);
    char buf[65536];
    long left = keep;
    while (left > 0) {
        size_t n = fread(buf, 1, left < (long)sizeof buf ? (size_t)left : sizeof buf, in);
        if (!n) break;
        fwrite(buf, 1, n, o);
        left -= (long)n;
    }
    fclose(in);
    fclose(o);
}

static void test_bad_checkpoints(void **s) {
    (void)s;
    char out[65536];
    const char *st = tu_path("checkpoint.safetensors");
    struct stat sb;
    assert_int_equal(stat(st, &sb), 0);
    long cuts[] = {0, 7, 100, sb.st_size / 2, sb.st_size - 1};
    for (int i = 0; i < 5; i++) {
        truncate_copy(st, tu_tmp("trunc.safetensors"), cuts[i]);
        int rc = tu_run(out, sizeof out, "%s info -m %s --config %s", tu_cli(), tu_tmp("trunc.safetensors"), cfg);
        printf("  truncated at %ld: rc=%d %s", cuts[i], rc, out);
        assert_int_equal(rc, 1);
        assert_int_equal(count_lines(out), 1);
        assert_non_null(strstr(out, "error"));
    }
    /* a checkpoint lacking one tensor and with one mis-shaped tensor: both are named */
    cs_weights *w, *w2 = cs_weights_new("safetensors");
    assert_int_equal(cs_weights_open(st, &w), 0);
    for (size_t i = 0; i < cs_weights_count(w); i++) {
        const cs_tensor_entry *e = cs_weights_at(w, i);
        if (!strcmp(e->name, "model_cp.mask_decoder.iou_token.weight")) continue;
        if (!strcmp(e->name, "model_cp.image_encoder.blocks.2.attn.proj.weight")) {
            int64_t flat[1] = {e->shape[0] * e->shape[1]};
            assert_int_equal(cs_weights_add_view(w2, e->name, e->dtype, 1, flat, e->data, e->nbytes), 0);
            continue;
        }
        assert_int_equal(cs_weights_add_view(w2, e->name, e->dtype, e->ndim, e->shape, e->data, e->nbytes), 0);
    }
    assert_int_equal(cs_weights_finish(w2), 0);
    assert_int_equal(cs_weights_save_safetensors(w2, tu_tmp("broken.safetensors"), CS_DTYPE_F32), 0);
    cs_weights_free(w2);
    cs_weights_free(w);
    int rc = tu_run(out, sizeof out, "%s info -m %s --config %s", tu_cli(), tu_tmp("broken.safetensors"), cfg);
    printf("  %s", out);
    assert_int_equal(rc, 1);
    assert_non_null(strstr(out, "missing tensor model_cp.mask_decoder.iou_token.weight"));
    assert_non_null(strstr(out, "model_cp.image_encoder.blocks.2.attn.proj.weight has shape (2304), expected (48,48)"));
    /* not a checkpoint at all */
    FILE *f = fopen(tu_tmp("text.pt"), "w");
    fputs("hello, I am not a checkpoint\n", f);
    fclose(f);
    assert_int_equal(tu_run(out, sizeof out, "%s info -m %s", tu_cli(), tu_tmp("text.pt")), 1);
    assert_int_equal(count_lines(out), 1);
    assert_int_equal(tu_run(out, sizeof out, "%s info -m /nonexistent/ckpt.pt", tu_cli()), 1);
}

static void test_convert_roundtrip(void **s) {
    (void)s;
    char out[8192];
    const char *dts[] = {"f32", "f16", "bf16"};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(tu_run(out, sizeof out, "%s convert %s %s --dtype %s", tu_cli(), tu_path("checkpoint.pt"),
                             tu_tmp("conv.safetensors"), dts[i]), 0);
        assert_int_equal(tu_run(out, sizeof out, "%s info -m %s --config %s", tu_cli(), tu_tmp("conv.safetensors"), cfg), 0);
        cs_weights *a, *b;
        assert_int_equal(cs_weights_open(tu_path("checkpoint.safetensors"), &a), 0);
        assert_int_equal(cs_weights_open(tu_tmp("conv.safetensors"), &b), 0);
        assert_int_equal(cs_weights_count(a), cs_weights_count(b));
        for (size_t k = 0; k < cs_weights_count(a); k++) {
            const cs_tensor_entry *ea = cs_weights_at(a, k), *eb = cs_weights_find(b, ea->name);
            assert_non_null(eb);
            assert_int_equal(ea->ndim, eb->ndim);
            if (i == 0) assert_memory_equal(ea->data, eb->data, ea->nbytes);
            else assert_int_equal(eb->nbytes * 2, ea->nbytes);
        }
        cs_weights_free(a);
        cs_weights_free(b);
    }
    /* --box-nms records the model's recommendation, which info reports; a bad value is refused */
    assert_int_equal(tu_run(out, sizeof out, "%s info -m %s --config %s", tu_cli(), tu_tmp("conv.safetensors"), cfg), 0);
    assert_null(strstr(out, "box NMS"));
    assert_int_equal(tu_run(out, sizeof out, "%s convert %s %s --box-nms 0.25", tu_cli(), tu_path("checkpoint.pt"),
                            tu_tmp("nms.safetensors")), 0);
    assert_int_equal(tu_run(out, sizeof out, "%s info -m %s --config %s", tu_cli(), tu_tmp("nms.safetensors"), cfg), 0);
    assert_non_null(strstr(out, "box NMS       0.25 "));
    assert_int_equal(tu_run(out, sizeof out, "%s convert %s %s --box-nms 1.5", tu_cli(), tu_path("checkpoint.pt"),
                            tu_tmp("x.safetensors")), 2);
    assert_int_equal(tu_run(out, sizeof out, "%s convert %s %s --dtype f64", tu_cli(), tu_path("checkpoint.pt"), tu_tmp("x.safetensors")), 2);
    /* a failed conversion leaves no output file */
    assert_int_equal(tu_run(out, sizeof out, "%s convert /nonexistent.pt %s", tu_cli(), tu_tmp("none.safetensors")), 1);
    struct stat sb;
    assert_int_not_equal(stat(tu_tmp("none.safetensors"), &sb), 0);
}

static void test_embed_and_prompt(void **s) {
    (void)s;
    char out[8192];
    /* the unit-pattern network input, written as .npy */
    float *x = malloc((size_t)3 * 1024 * 1024 * sizeof(float));
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < 1024; y++)
            for (int xx = 0; xx < 1024; xx++)
                x[((size_t)c * 1024 + y) * 1024 + xx] = (float)((7 * xx + 13 * y + 29 * c) % 256) / 64.0f - 2.0f;
    int64_t shape[3] = {3, 1024, 1024};
    assert_int_equal(cs_npy_save_f32(tu_tmp("x.npy"), x, 3, shape), 0);
    free(x);
    assert_int_equal(tu_run(out, sizeof out, "%s embed -m %s --config %s --tensor %s -o %s --threads 2", tu_cli(),
                         tu_path("checkpoint.pt"), cfg, tu_tmp("x.npy"), tu_tmp("emb.npy")), 0);
    cs_npy got, ref;
    assert_int_equal(cs_npy_load(tu_tmp("emb.npy"), &got), 0);
    tu_load(&ref, "unit_pattern/sam_encoder_output.npy");
    tu_check_npy("cli embed vs sam_encoder_output", got.data, got.count, &ref, 1e-4);
    cs_npy_free(&got);
    cs_npy_free(&ref);
    /* embed from an image file: the official pre-processing, then the encoder (20_) */
    assert_int_equal(tu_run(out, sizeof out, "%s embed -m %s --config %s %s -o %s", tu_cli(), tu_path("checkpoint.pt"), cfg,
                         tu_path("case_ihc_2x160x224_chfirst/00_input.npy"), tu_tmp("emb2.npy")), 0);
    assert_int_equal(cs_npy_load(tu_tmp("emb2.npy"), &got), 0);
    tu_load(&ref, "case_ihc_2x160x224_chfirst/20_sam_image_embedding.npy");
    tu_check_npy("cli embed IMAGE vs 20_sam_image_embedding", got.data, got.count, &ref, 1e-4);
    cs_npy_free(&got);
    cs_npy_free(&ref);
    /* prompt: the P1 two-box set on the first case's embedding */
    const char *set = "prompts_blobs256_u16/P1_two_boxes";
    cs_npy boxes;
    tu_load(&boxes, "%s/in_boxes.npy", set);
    char b0[128], b1[128];
    snprintf(b0, sizeof b0, "%.9g,%.9g,%.9g,%.9g", cs_npy_get(&boxes, 0), cs_npy_get(&boxes, 1), cs_npy_get(&boxes, 2), cs_npy_get(&boxes, 3));
    snprintf(b1, sizeof b1, "%.9g,%.9g,%.9g,%.9g", cs_npy_get(&boxes, 4), cs_npy_get(&boxes, 5), cs_npy_get(&boxes, 6), cs_npy_get(&boxes, 7));
    cs_npy_free(&boxes);
    assert_int_equal(tu_run(out, sizeof out, "%s prompt -m %s --config %s --embedding %s --box %s --box %s -o %s", tu_cli(),
                         tu_path("checkpoint.safetensors"), cfg, tu_path("case_blobs256_u16/20_sam_image_embedding.npy"),
                         b0, b1, tu_tmp("lg.npy")), 0);
    assert_int_equal(count_lines(out), 2);
    assert_non_null(strstr(out, "prompt 1 mask 0 iou "));
    assert_int_equal(cs_npy_load(tu_tmp("lg.npy"), &got), 0);
    assert_int_equal(got.ndim, 4);
    tu_load(&ref, "%s/lowres_logits.npy", set);
    tu_check_npy("cli prompt vs P1 lowres_logits", got.data, got.count, &ref, 1e-4);
    cs_npy_free(&got);
    cs_npy_free(&ref);
    /* --png: masks in the original frame as a label image */
    assert_int_equal(tu_run(out, sizeof out, "%s prompt -m %s --config %s --embedding %s --box 40,40,120,120 --orig-frame 256,256 "
                         "--multimask -o %s --png %s", tu_cli(), tu_path("checkpoint.safetensors"), cfg,
                         tu_path("case_blobs256_u16/20_sam_image_embedding.npy"), tu_tmp("lm.npy"), tu_tmp("m.png")), 0);
    assert_int_equal(count_lines(out), 3);
    struct stat sb;
    assert_int_equal(stat(tu_tmp("m.png"), &sb), 0);
    /* usage errors */
    assert_int_equal(tu_run(out, sizeof out, "%s prompt -m %s --embedding %s --box 1,2,3 -o %s", tu_cli(),
                         tu_path("checkpoint.safetensors"), tu_path("case_blobs256_u16/20_sam_image_embedding.npy"), tu_tmp("l.npy")), 2);
    assert_int_equal(tu_run(out, sizeof out, "%s prompt -m %s --embedding %s --point 1,2,5 -o %s", tu_cli(),
                         tu_path("checkpoint.safetensors"), tu_path("case_blobs256_u16/20_sam_image_embedding.npy"), tu_tmp("l.npy")), 2);
    /* an embedding of the wrong shape */
    assert_int_equal(tu_run(out, sizeof out, "%s prompt -m %s --config %s --embedding %s --box 1,2,3,4 -o %s", tu_cli(),
                         tu_path("checkpoint.safetensors"), cfg, tu_path("case_blobs256_u16/00_input.npy"), tu_tmp("l.npy")), 1);
    assert_int_equal(count_lines(out), 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_info_and_help),
        cmocka_unit_test(test_bad_checkpoints),
        cmocka_unit_test(test_convert_roundtrip),
        cmocka_unit_test(test_embed_and_prompt),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
