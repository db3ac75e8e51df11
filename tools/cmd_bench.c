/* cellsam bench: speed and memory of each stage on a full-size model, with the
 * BLAS sgemm throughput on the encoder's GEMM shapes measured in the same run as
 * the baseline (ratios, not absolute times, are what carry across machines). */
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "cellfinder.h"
#include "cli.h"
#include "common.h"
#include "gemm_bf16.h"
#include "gemm_int8.h"
#include "model.h"
#include "ops.h"
#include "pipeline.h"

static double peak_rss_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024.0;
}

/* Deterministic pseudo-random fill in [-1, 1). */
static void fill_random(float *x, size_t n, uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        x[i] = (float)((s >> 40) & 0xFFFFFF) / (float)(1 << 23) - 1.0f;
    }
}

/* Multiply-adds x2 of one ViT pass (linear layers, attention incl. padded windows, patch embed, neck). */
static double vit_flops(const cs_vit *v) {
    const double N = (double)v->grid * v->grid, D = v->dim, hd = (double)v->dim / v->heads;
    double f = 2 * N * D * 3 * v->patch * v->patch;
    for (int b = 0; b < v->depth; b++) {
        f += 2 * N * D * (3 * D + D + 2.0 * v->mlp);
        int side = v->blocks[b].window ? v->blocks[b].window : v->grid;
        int nw = (v->grid + side - 1) / side;
        double tok = (double)side * side, windows = (double)nw * nw;
        f += windows * v->heads * (2 * tok * tok * hd * 2); /* QK^T and AV */
        if (v->blocks[b].window) f += 2 * (windows * tok - N) * D * 3 * D; /* qkv of padded tokens */
    }
    if (v->has_neck) f += 2 * N * D * v->out_chans + 2 * N * 9.0 * v->out_chans * v->out_chans;
    return f;
}

/* Throughput of the ViT block's four GEMM shapes (qkv, proj, lin1, lin2 on grid x grid
 * tokens): OpenBLAS sgemm, or our bfloat16 or int8 kernel (weights packed first, as at
 * model load; int8 counts the activations' quantisation too). Best of `reps` rounds. */
static double gemm_gflops(const cs_vit *v, int threads, int reps, int precision) {
    const int N = v->grid * v->grid, D = v->dim, M = v->mlp;
    const int shapes[4][2] = {{D, 3 * D}, {D, D}, {D, M}, {M, D}}; /* K, Nout */
    size_t maxk = (size_t)(M > D ? M : D), maxn = (size_t)(M > 3 * D ? M : 3 * D);
    float *A = cs_alloc((size_t)N, maxk * sizeof(float));
    float *B = cs_alloc(maxn, maxk * sizeof(float));
    float *C = cs_alloc((size_t)N, maxn * sizeof(float));
    if (!A || !B || !C) {
        free(A);
        free(B);
        free(C);
        return 0;
    }
    fill_random(A, (size_t)N * maxk, 1);
    fill_random(B, maxn * maxk, 2);
    cs_bf16_weights packed[4] = {{0}};
    cs_int8_weights packed8[4] = {{0}};
    int ok = 1;
    for (int s = 0; s < 4; s++) {
        if (precision == CELLSAM_DTYPE_BF16 && cs_bf16_weights_pack(&packed[s], B, NULL, 0, shapes[s][1], shapes[s][0], threads))
            ok = 0;
        if (precision == CELLSAM_DTYPE_INT8 && cs_int8_weights_pack(&packed8[s], B, NULL, 0, shapes[s][1], shapes[s][0], threads))
            ok = 0;
    }
    double flops = 0, best = 1e30;
    for (int r = 0; r < reps && ok; r++) {
        double t0 = cs_now_seconds();
        flops = 0;
        for (int s = 0; s < 4; s++) {
            if (precision == CELLSAM_DTYPE_BF16) cs_bf16_linear(A, N, shapes[s][0], &packed[s], NULL, 0, C, shapes[s][1], threads);
            else if (precision == CELLSAM_DTYPE_INT8) cs_int8_linear(A, N, shapes[s][0], &packed8[s], NULL, 0, C, shapes[s][1], threads);
            else cs_gemm(N, shapes[s][1], shapes[s][0], A, shapes[s][0], B, shapes[s][0], 1, 0.0f, C, shapes[s][1], threads);
            flops += 2.0 * N * shapes[s][0] * shapes[s][1];
        }
        double t = cs_now_seconds() - t0;
        best = t < best ? t : best;
    }
    for (int s = 0; s < 4; s++) {
        cs_bf16_weights_free(&packed[s]);
        cs_int8_weights_free(&packed8[s]);
    }
    free(A);
    free(B);
    free(C);
    return flops / best / 1e9;
}

/* Median wall time of `reps` (at most 9) decoder calls on nb boxes, mask token 0 as
 * segment decodes it. With `boxes`, each mask is upscaled around its box only, as
 * segment does, without growing the region: the cost for masks that stay inside their
 * box's neighbourhood, as a trained model's do (a random model's masks cover the
 * image and would grow to the whole grid); without, on the whole grid (--full-masks).
 * With `fresh_image` the per-image shared work is redone before each call, as when
 * boxes are decoded one call at a time; without it, it is reused (a labeling-tool click). */
static double median_decode_s(cellsam_context *ctx, const float *dense, const float *sparse, const float *boxes,
                              int nb, int reps, int fresh_image, int factored_from, float *lgs, float *ious,
                              int threads) {
    const cellsam_model *m = ctx->model;
    cs_decoder_options dopt = cs_decoder_default_options(&m->md);
    dopt.factored_from = factored_from;
    dopt.mask_count = 1;
    dopt.boxes = boxes;
    dopt.grow_above = INFINITY;
    double times[9];
    for (int r = 0; r < reps; r++) {
        if (fresh_image) cs_decoder_ws_invalidate(ctx->dec_ws);
        double t0 = cs_now_seconds();
        cs_mask_decoder_forward_ex(&m->md, ctx->embedding, ctx->dense_pe, dense, 0, sparse, nb, 2, &dopt, lgs, ious,
                                   ctx->dec_ws, threads);
        times[r] = cs_now_seconds() - t0;
    }
    for (int i = 1; i < reps; i++) /* insertion sort: at most 9 values */
        for (int j = i; j > 0 && times[j - 1] > times[j]; j--) {
            double tmp = times[j];
            times[j] = times[j - 1];
            times[j - 1] = tmp;
        }
    return times[reps / 2];
}

static double max_abs_diff(const float *a, const float *b, size_t n, double *max_ref) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        d = fabs((double)a[i] - b[i]) > d ? fabs((double)a[i] - b[i]) : d;
        r = fabs((double)b[i]) > r ? fabs((double)b[i]) : r;
    }
    *max_ref = r;
    return d;
}

/* --precision bf16 / int8: the same input through a float32 copy of the model; prints
 * the largest deviation of each stage's output (after the peak RSS, which it would
 * otherwise inflate by a second model). JSON keys start with `tag` (bf16_, int8_). */
static int precision_deviation(const char *tag, const char *ckpt, const char *config, cellsam_context *ctx16,
                               const float *x, int threads, FILE *out, json_t *js) {
    char key[64];
    const cellsam_model *m16 = ctx16->model;
    cellsam_model_params mp = cellsam_model_default_params();
    mp.config_path = config;
    cellsam_model *m32 = NULL;
    cellsam_context *ctx32 = NULL;
    if (cellsam_model_load(ckpt, &mp, &m32) || cellsam_context_new(m32, &ctx32)) {
        cli_error("bench", "%s", cellsam_last_error());
        cellsam_model_free(m32);
        return 1;
    }
    const size_t ne = (size_t)m32->pe.dim * 64 * 64;
    float *e16 = cs_alloc(ne, sizeof(float));
    int rc = e16 ? cellsam_encode(ctx16, x, threads) : CELLSAM_ERR_NOMEM;
    if (!rc) memcpy(e16, ctx16->embedding, ne * sizeof(float));
    if (!rc) rc = cellsam_encode(ctx32, x, threads);
    if (!rc) {
        double ref, d = max_abs_diff(e16, ctx32->embedding, ne, &ref);
        snprintf(key, sizeof key, "%s_embedding_max_abs_dev", tag);
        json_object_set_new(js, key, json_real(d));
        fprintf(out, "%s against float32, the same input:\n  %-32s max abs %.2e  (values up to %.3g)\n", tag,
                "SAM image embedding", d, ref);
    }
    if (!rc && m32->has_detector && m16->has_detector) {
        const cs_vit *dv = &m32->det_vit;
        const size_t nf = (size_t)dv->dim * dv->grid * dv->grid;
        cs_cellfinder_dims d;
        cs_cellfinder_get_dims(m32->det, &d);
        const size_t nq = (size_t)d.n_queries;
        float *f16 = cs_alloc(nf, sizeof(float)), *f32 = cs_alloc(nf, sizeof(float));
        float *l16 = cs_alloc(nq, 2 * sizeof(float)), *l32 = cs_alloc(nq, 2 * sizeof(float));
        float *b16 = cs_alloc(nq, 4 * sizeof(float)), *b32 = cs_alloc(nq, 4 * sizeof(float));
        if (!f16 || !f32 || !l16 || !l32 || !b16 || !b32) rc = CELLSAM_ERR_NOMEM;
        if (!rc) rc = cs_vit_forward(&m16->det_vit, x, f16, threads);
        if (!rc) rc = cs_vit_forward(dv, x, f32, threads);
        if (!rc) rc = cs_cellfinder_forward(m16->det, f16, l16, b16, NULL, NULL, threads);
        if (!rc) rc = cs_cellfinder_forward(m32->det, f32, l32, b32, NULL, NULL, threads);
        if (!rc) {
            const struct { const char *key, *name; const float *a, *b; size_t n; } rows[3] = {
                {"trunk_max_abs_dev", "CellFinder trunk features", f16, f32, nf},
                {"logits_max_abs_dev", "detector logits", l16, l32, nq * 2},
                {"boxes_max_abs_dev", "detector boxes (0..1)", b16, b32, nq * 4}};
            for (int i = 0; i < 3; i++) {
                double ref, dv2 = max_abs_diff(rows[i].a, rows[i].b, rows[i].n, &ref);
                snprintf(key, sizeof key, "%s_%s", tag, rows[i].key);
                json_object_set_new(js, key, json_real(dv2));
                fprintf(out, "  %-32s max abs %.2e  (values up to %.3g)\n", rows[i].name, dv2, ref);
            }
        }
        free(f16);
        free(f32);
        free(l16);
        free(l32);
        free(b16);
        free(b32);
    }
    free(e16);
    cellsam_context_free(ctx32);
    cellsam_model_free(m32);
    if (rc) cli_error("bench", "%s deviation: %s", tag, cellsam_last_error());
    return rc != CELLSAM_OK;
}

int cmd_bench(int argc, char **argv) {
    const char *ckpt = NULL, *config = NULL;
    int threads = cli_default_threads(), json = 0, e2e4096 = 0, weights = CELLSAM_DTYPE_F32,
        precision = CELLSAM_DTYPE_F32;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: cellsam bench -m CKPT [--config JSON] [--threads N] [--json] [--e2e-4096] [--weights f16|bf16]\n"
                   "       [--precision bf16|int8]\n\n"
                   "Times each stage on the given (full-size) model and prints GFLOP/s next to the BLAS sgemm\n"
                   "throughput on the encoder's GEMM shapes, measured in the same run. A random full-size\n"
                   "checkpoint: build/make_checkpoint ../shared/testdata/official_keys.tsv /tmp/full\n"
                   "--e2e-4096 adds the 4096 x 4096 tiled end-to-end run (121 tiles: long).\n"
                   "--json prints one object: encoder_s, encoder_vs_sgemm, det_trunk_s, det_head_s,\n"
                   "decoder_per_box_s_{1,16,64,256}, decoder_batch_speedup, decoder_gflop_per_box,\n"
                   "decoder_gflop_shared, decoder_per_box_s_64_direct, end_to_end_1024_s, peak_rss_mb, ...\n");
            return 0;
        } else if ((!strcmp(argv[i], "-m") || !strcmp(argv[i], "--model")) && i + 1 < argc) ckpt = argv[++i];
        else if (!strcmp(argv[i], "--config") && i + 1 < argc) config = argv[++i];
        else if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--e2e-4096")) e2e4096 = 1;
        else if (!strcmp(argv[i], "--weights") && i + 1 < argc) {
            if ((weights = cli_parse_weights(argv[++i])) < 0) {
                cli_error("bench", "--weights must be f32, f16 or bf16");
                return 2;
            }
        }
        else if (!strcmp(argv[i], "--precision") && i + 1 < argc) {
            if ((precision = cli_parse_precision("bench", argv[++i])) < 0) return 2;
        }
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            if (cli_parse_int(argv[++i], 1, 256, &threads)) {
                cli_error("bench", "--threads needs a number from 1 to 256");
                return 2;
            }
        } else {
            cli_error("bench", "unexpected argument '%s' (see --help)", argv[i]);
            return 2;
        }
    }
    if (!ckpt) {
        cli_error("bench", "need -m CKPT (see --help for making a random full-size one)");
        return 2;
    }
    FILE *out = json ? stderr : stdout;
    cellsam_model_params mp = cellsam_model_default_params();
    mp.config_path = config;
    mp.weights_dtype = weights;
    mp.compute_dtype = precision;
    mp.n_threads = threads;
    cellsam_model *m;
    cellsam_context *ctx;
    double t0 = cs_now_seconds();
    if (cellsam_model_load(ckpt, &mp, &m) || cellsam_context_new(m, &ctx)) {
        cli_error("bench", "%s", cellsam_last_error());
        return 1;
    }
    double load_s = cs_now_seconds() - t0;
    json_t *js = json_object();
    json_object_set_new(js, "threads", json_integer(threads));
    json_object_set_new(js, "load_s", json_real(load_s));
    fprintf(out, "model loaded in %.3f s (%s), threads %d\n", load_s, cs_weights_format(m->weights), threads);
    fprintf(out, "%s\n", cellsam_system_info());
    json_object_set_new(js, "system", json_string(cellsam_system_info()));

    double sg = gemm_gflops(&m->sam_vit, threads, 3, CELLSAM_DTYPE_F32);
    json_object_set_new(js, "sgemm_gflops", json_real(sg));
    fprintf(out, "%-34s %8.1f GFLOP/s  (baseline: qkv/proj/mlp shapes, %d x %d tokens)\n", "BLAS sgemm", sg,
            m->sam_vit.grid, m->sam_vit.grid);
    double bg = 0;
    const char *tag = precision == CELLSAM_DTYPE_BF16 ? "bf16" : precision == CELLSAM_DTYPE_INT8 ? "int8" : NULL;
    if (tag) {
        char key[64], name[64];
        bg = gemm_gflops(&m->sam_vit, threads, 3, precision);
        snprintf(key, sizeof key, "%s_gemm_gflops", tag);
        json_object_set_new(js, key, json_real(bg));
        snprintf(name, sizeof name, "%s GEMM", tag);
        fprintf(out, "%-34s %8.1f GFLOP/s  = %.2f x sgemm (the same shapes, our %s kernel%s%s)\n", name, bg, bg / sg,
                tag, precision == CELLSAM_DTYPE_INT8 ? ": " : "",
                precision == CELLSAM_DTYPE_INT8 ? cs_int8_kernel_name(cs_int8_best_kernel()) : "");
    }

    float *x = cs_alloc((size_t)3 << 20, sizeof(float));
    if (!x) return 1;
    fill_random(x, (size_t)3 << 20, 3);
    /* best of 3, like the sgemm baseline: the first call also pays page faults on
     * the mmap'd weights and fresh buffers */
    double enc_s = 1e30;
    for (int r = 0; r < 3; r++) {
        t0 = cs_now_seconds();
        if (cellsam_encode(ctx, x, threads)) {
            cli_error("bench", "%s", cellsam_last_error());
            return 1;
        }
        double t = cs_now_seconds() - t0;
        enc_s = t < enc_s ? t : enc_s;
    }
    double enc_gf = vit_flops(&m->sam_vit) / enc_s / 1e9;
    json_object_set_new(js, "encoder_s", json_real(enc_s));
    json_object_set_new(js, "encoder_gflops", json_real(enc_gf));
    json_object_set_new(js, "encoder_vs_sgemm", json_real(enc_gf / sg));
    fprintf(out, "%-34s %8.3f s  %8.1f GFLOP/s  = %.2f x sgemm\n", "SAM image encoder", enc_s, enc_gf, enc_gf / sg);
    if (bg > 0) {
        char key[64], name[64];
        snprintf(key, sizeof key, "encoder_vs_%s_gemm", tag);
        json_object_set_new(js, key, json_real(enc_gf / bg));
        snprintf(name, sizeof name, "  against the %s GEMM", tag);
        fprintf(out, "%-34s %8.2f x  (encoder GFLOP/s / %s GEMM GFLOP/s)\n", name, enc_gf / bg, tag);
    }

    if (m->has_detector) {
        const cs_vit *dv = &m->det_vit;
        float *feat = cs_alloc((size_t)dv->dim * dv->grid, (size_t)dv->grid * sizeof(float));
        cs_cellfinder_dims d;
        cs_cellfinder_get_dims(m->det, &d);
        float *lg = cs_alloc((size_t)d.n_queries, 2 * sizeof(float)), *bx = cs_alloc((size_t)d.n_queries, 4 * sizeof(float));
        t0 = cs_now_seconds();
        cs_vit_forward(dv, x, feat, threads);
        double tr_s = cs_now_seconds() - t0;
        t0 = cs_now_seconds();
        const uint64_t hf0 = cs_gemm_flops();
        cs_cellfinder_forward(m->det, feat, lg, bx, NULL, NULL, threads);
        double hd_s = cs_now_seconds() - t0;
        const double hd_flops = (double)(cs_gemm_flops() - hf0); /* its BLAS GEMMs (all, unless bf16) */
        json_object_set_new(js, "det_trunk_s", json_real(tr_s));
        json_object_set_new(js, "det_head_s", json_real(hd_s));
        fprintf(out, "%-34s %8.3f s  %8.1f GFLOP/s  = %.2f x sgemm\n", "CellFinder trunk", tr_s,
                vit_flops(dv) / tr_s / 1e9, vit_flops(dv) / tr_s / 1e9 / sg);
        if (precision == CELLSAM_DTYPE_BF16) /* its products then run in our bf16 kernel, uncounted */
            fprintf(out, "%-34s %8.3f s  (%d queries)\n", "CellFinder head", hd_s, d.n_queries);
        else
            fprintf(out, "%-34s %8.3f s  %8.1f GFLOP/s  = %.2f x sgemm (%d queries, %.0f GFLOP in GEMMs)\n",
                    "CellFinder head", hd_s, hd_flops / hd_s / 1e9, hd_flops / hd_s / 1e9 / sg, d.n_queries,
                    hd_flops / 1e9);
        free(feat);
        free(lg);
        free(bx);
    }

    /* decoder: per-box time of one batched call at several batch sizes */
    const int sizes[4] = {1, 16, 64, 256};
    double per_box[4] = {0};
    const int P = m->pe.dim;
    float *dense = cs_alloc((size_t)P * 64, 64 * sizeof(float));
    float *sparse = cs_alloc((size_t)256 * 2, (size_t)P * sizeof(float));
    float *lgs = cs_alloc((size_t)256, (size_t)65536 * sizeof(float));
    float *ious = cs_alloc((size_t)256 * m->md.n_mask_tokens, sizeof(float));
    float *boxes = cs_alloc((size_t)256, 4 * sizeof(float));
    cs_prompt_dense(&m->pe, NULL, dense, threads);
    for (int i = 0; i < 256; i++) {
        float *b = boxes + 4 * i;
        b[0] = (float)(i % 16) * 60 + 10;
        b[1] = (float)(i / 16) * 60 + 10;
        b[2] = b[0] + 40;
        b[3] = b[1] + 45;
        cs_prompt_sparse(&m->pe, b, NULL, 0, sparse + (size_t)i * 2 * P);
    }
    /* a warm-up call first (page faults of the output, caches), then the median of
     * several calls: single short calls varied by +-30 % between runs */
    const int reps[4] = {9, 5, 3, 1};
    /* the warm-up call also counts the arithmetic of 64 boxes (GEMM flops; used below) */
    const int FX = CS_DECODER_FACTORED_FROM, DIRECT = INT_MAX;
    const uint64_t f64_start = cs_gemm_flops();
    median_decode_s(ctx, dense, sparse, boxes, 64, 1, 1, FX, lgs, ious, threads);
    const double f64 = (double)(cs_gemm_flops() - f64_start);
    for (int k = 0; k < 4; k++) {
        per_box[k] = median_decode_s(ctx, dense, sparse, boxes, sizes[k], reps[k], 1, FX, lgs, ious, threads) / sizes[k];
        char key[64];
        snprintf(key, sizeof key, "decoder_per_box_s_%d", sizes[k]);
        json_object_set_new(js, key, json_real(per_box[k]));
        fprintf(out, "%-34s %8.4f s per box (%d boxes in one call, median of %d)\n", "mask decoder, box region",
                per_box[k], sizes[k], reps[k]);
    }
    /* the decoder's arithmetic, counted in its GEMMs. Batches (from CS_DECODER_FACTORED_FROM
     * boxes) decode in factored form: two batch sizes separate what each box costs from
     * what the boxes of an image share. The direct path (one box, or --direct-decoder):
     * 64 boxes against 1. */
    uint64_t f0 = cs_gemm_flops();
    median_decode_s(ctx, dense, sparse, boxes, 16, 1, 1, FX, lgs, ious, threads);
    const double f16 = (double)(cs_gemm_flops() - f0), flop_box = (f64 - f16) / 48, flop_shared = f64 - 64 * flop_box;
    f0 = cs_gemm_flops();
    median_decode_s(ctx, dense, sparse, boxes, 1, 1, 1, DIRECT, lgs, ious, threads);
    const double f1d = (double)(cs_gemm_flops() - f0);
    f0 = cs_gemm_flops();
    const double direct_64 = median_decode_s(ctx, dense, sparse, boxes, 64, 3, 1, DIRECT, lgs, ious, threads) / 64;
    const double f64d = (double)(cs_gemm_flops() - f0) / 3;
    const double flop_box_d = (f64d - f1d) / 63, flop_shared_d = f1d - flop_box_d;
    json_object_set_new(js, "decoder_gflop_per_box", json_real(flop_box / 1e9));
    json_object_set_new(js, "decoder_gflop_shared", json_real(flop_shared / 1e9));
    json_object_set_new(js, "decoder_gflop_per_box_direct", json_real(flop_box_d / 1e9));
    json_object_set_new(js, "decoder_gflop_shared_direct", json_real(flop_shared_d / 1e9));
    json_object_set_new(js, "decoder_per_box_s_64_direct", json_real(direct_64));
    fprintf(out, "%-34s %8.3f GFLOP per box, %.3f GFLOP shared by an image's boxes (GEMMs, counted)\n",
            "mask decoder arithmetic, batch", flop_box / 1e9, flop_shared / 1e9);
    fprintf(out, "%-34s %8.3f GFLOP per box, %.3f GFLOP shared; %.4f s per box of 64 (--direct-decoder)\n",
            "  direct, one box at a time", flop_box_d / 1e9, flop_shared_d / 1e9, direct_64);
    /* masks on the whole grid (--full-masks) */
    const double full_1 = median_decode_s(ctx, dense, sparse, NULL, 1, 9, 1, FX, lgs, ious, threads);
    const double full_64 = median_decode_s(ctx, dense, sparse, NULL, 64, 3, 1, FX, lgs, ious, threads) / 64;
    json_object_set_new(js, "decoder_per_box_s_1_full", json_real(full_1));
    json_object_set_new(js, "decoder_per_box_s_64_full", json_real(full_64));
    fprintf(out, "%-34s %8.4f s per box alone, %.4f s per box of 64 (batch speedup %.2f x)\n",
            "mask decoder, --full-masks", full_1, full_64, full_1 / full_64);
    const double prompt_s = median_decode_s(ctx, dense, sparse, NULL, 1, 9, 0, FX, lgs, ious, threads);
    json_object_set_new(js, "decoder_prompt_s", json_real(prompt_s));
    fprintf(out, "%-34s %8.4f s  (1 box, same image: shared data reused, median of 9)\n", "mask decoder, next prompt (full)",
            prompt_s);
    json_object_set_new(js, "decoder_batch_speedup", json_real(per_box[0] / per_box[2]));
    fprintf(out, "%-34s %8.2f x  (per box: 1 box alone / 64 boxes batched)\n", "decoder batch speedup",
            per_box[0] / per_box[2]);
    free(dense);
    free(sparse);
    free(boxes);
    free(lgs);
    free(ious);
    cs_decoder_ws_release(ctx->dec_ws); /* as segment does: no decoder buffers into the next encoder pass */

    /* end to end: a synthetic 1024 x 1024 image of bright discs */
    if (m->has_detector) {
        const int S = 1024;
        float *img = cs_alloc((size_t)S, (size_t)S * sizeof(float));
        for (int y = 0; y < S; y++)
            for (int xx = 0; xx < S; xx++) {
                int cy = (y / 64) * 64 + 32, cx = (xx / 64) * 64 + 32;
                float d2 = (float)((y - cy) * (y - cy) + (xx - cx) * (xx - cx));
                img[(size_t)y * S + xx] = (d2 < 20 * 20 ? 1000.0f : 100.0f) + (float)((xx * 7 + y * 13) % 17);
            }
        cellsam_segment_params sp = cellsam_segment_default_params();
        sp.tiled = 0;
        sp.n_threads = threads;
        cellsam_result *r = NULL;
        /* a random detector keeps all its queries; like baseline.md, steer to ~50
         * cells: 50 boxes on the discs, plus the detector's own time */
        cellsam_box disc_boxes[50];
        for (int i = 0; i < 50; i++) {
            float cx = (float)((i % 16) * 64 + 32), cy = (float)((i / 16) * 64 + 32);
            disc_boxes[i] = (cellsam_box){cx - 22, cy - 22, cx + 22, cy + 22};
        }
        sp.boxes = disc_boxes;
        sp.n_boxes = 50;
        t0 = cs_now_seconds();
        int rc = cellsam_segment(ctx, img, S, S, 1, &sp, &r);
        double seg50 = cs_now_seconds() - t0;
        double det_s = json_real_value(json_object_get(js, "det_trunk_s")) + json_real_value(json_object_get(js, "det_head_s"));
        if (!rc) {
            json_object_set_new(js, "end_to_end_1024_s", json_real(seg50 + det_s));
            fprintf(out, "%-34s %8.3f s  (50 boxes: %.3f s segment + %.3f s detector)\n", "end to end 1024x1024, 50 cells",
                    seg50 + det_s, seg50, det_s);
            /* where the time goes: the segment call's own stage timers, plus the
             * detector stages timed above */
            const char *names[6] = {"pre-processing", "SAM image encoder", "CellFinder trunk", "CellFinder head",
                                    "mask decoder + labels", "post-processing"};
            const char *keys[6] = {"preprocess", "encoder", "det_trunk", "det_head", "decoder", "postprocess"};
            const double st[6] = {r->t_preprocess, r->t_encoder, json_real_value(json_object_get(js, "det_trunk_s")),
                                  json_real_value(json_object_get(js, "det_head_s")), r->t_decoder,
                                  r->t_postprocess};
            json_t *prof = json_object();
            for (int k = 0; k < 6; k++) {
                json_object_set_new(prof, keys[k], json_real(st[k]));
                fprintf(out, "  %-32s %8.3f s  %5.1f %%\n", names[k], st[k], 100.0 * st[k] / (seg50 + det_s));
            }
            json_object_set_new(js, "profile_1024_s", prof);
        }
        cellsam_result_free(r);
        r = NULL;
        sp.boxes = NULL;
        sp.n_boxes = 0;
        t0 = cs_now_seconds();
        rc = cellsam_segment(ctx, img, S, S, 1, &sp, &r);
        double e2e = cs_now_seconds() - t0;
        if (!rc) {
            json_object_set_new(js, "end_to_end_1024_detector_s", json_real(e2e));
            json_object_set_new(js, "end_to_end_1024_detector_boxes", json_integer(r->n_boxes_detected));
            fprintf(out, "%-34s %8.3f s  (%d boxes kept by the random detector, %d cells)\n", "end to end 1024x1024, detector", e2e,
                    r->n_boxes_detected, r->n_cells);
        }
        cellsam_result_free(r);
        free(img);
        if (e2e4096) {
            const int S4 = 4096;
            float *big = cs_alloc((size_t)S4, (size_t)S4 * sizeof(float));
            for (size_t i = 0; i < (size_t)S4 * S4; i++) big[i] = (float)((i * 2654435761u) % 4096);
            sp.tiled = 1;
            t0 = cs_now_seconds();
            rc = cellsam_segment(ctx, big, S4, S4, 1, &sp, &r);
            double e4 = cs_now_seconds() - t0;
            if (!rc) {
                json_object_set_new(js, "end_to_end_4096_tiled_s", json_real(e4));
                fprintf(out, "%-34s %8.3f s\n", "end to end 4096x4096 (tiled)", e4);
            }
            cellsam_result_free(r);
            free(big);
        }
    }
    json_object_set_new(js, "peak_rss_mb", json_real(peak_rss_mb()));
    fprintf(out, "%-34s %8.1f MB\n", "peak RSS", peak_rss_mb());
    if (tag && precision_deviation(tag, ckpt, config, ctx, x, threads, out, js)) return 1;
    if (json) {
        char *s = json_dumps(js, JSON_INDENT(1) | JSON_PRESERVE_ORDER);
        printf("%s\n", s);
        free(s);
    }
    json_decref(js);
    free(x);
    cellsam_context_free(ctx);
    cellsam_model_free(m);
    return 0;
}
