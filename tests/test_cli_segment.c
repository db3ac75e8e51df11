/* cellsam segment end to end through the CLI: the reference cases reproduce
 * 50_label_final, every real image in the data folder runs in both modes, and bad
 * or odd inputs give a clear one-line error or a valid (possibly empty) label image,
 * never a crash, and never a half-written output. */
#include <dirent.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <zlib.h>

#include "image_io.h"
#include "testutil.h"

static char g_model_args[2048];


static int exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0;
}

static int setup(void **s) {
    (void)s;
    snprintf(g_model_args, sizeof g_model_args, "-m %s/checkpoint.pt --config %s/config.json --threads 2",
             tu_testdata(), tu_testdata());
    return 0;
}

/* Only every k-th real image when CELLSAM_TEST_SUBSET=k (the sanitizer build). */
static int subset_step(void) {
    const char *e = getenv("CELLSAM_TEST_SUBSET");
    int k = e ? atoi(e) : 1;
    return k > 1 ? k : 1;
}

static void test_reference_cases(void **s) {
    (void)s;
    DIR *d = opendir(tu_testdata());
    assert_non_null(d);
    struct dirent *de;
    int n = 0;
    char out[16384];
    while ((de = readdir(d))) {
        if (strncmp(de->d_name, "case_", 5)) continue;
        const char *o = tu_tmp("%s.npy", de->d_name);
        int rc = tu_run(out, sizeof out, "%s segment %s --no-tiling %s/%s/00_input.npy -o %s", tu_cli(), g_model_args,
                     tu_testdata(), de->d_name, o);
        printf("  %s: %s", de->d_name, out);
        assert_int_equal(rc, 0);
        cs_npy got, ref;
        assert_int_equal(cs_npy_load(o, &got), 0);
        tu_load(&ref, "%s/50_label_final.npy", de->d_name);
        assert_int_equal(got.count, ref.count);
        size_t diff = 0;
        for (size_t i = 0; i < ref.count; i++) diff += cs_npy_get(&got, i) != cs_npy_get(&ref, i);
        printf("  %s: %zu of %zu pixels differ from 50_label_final\n", de->d_name, diff, ref.count);
        assert_true(diff <= ref.count / 1000);
        cs_npy_free(&got);
        cs_npy_free(&ref);
        n++;
    }
    closedir(d);
    assert_true(n > 0);
}

static void run_folder(const char *folder, int tiled, int *count) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/%s", tu_datadir(), folder);
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *de;
    char names[256][300];
    int n = 0;
    while ((de = readdir(d)) && n < 256)
        if (strstr(de->d_name, "_img.png")) snprintf(names[n++], 300, "%s", de->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof names[0], (int (*)(const void *, const void *))strcmp);
    char out[16384];
    for (int i = 0; i < n; i += subset_step()) {
        const char *o = tu_tmp("real_%d.png", tiled);
        remove(o);
        int rc = tu_run(out, sizeof out, "%s segment %s %s %s/%s -o %s --csv %s", tu_cli(), g_model_args,
                     tiled ? "" : "--no-tiling", dir, names[i], o, tu_tmp("real.csv"));
        if (rc) fail_msg("%s/%s (%s): exit %d: %s", folder, names[i], tiled ? "tiled" : "whole", rc, out);
        cs_image lab, img;
        char ip[1400];
        snprintf(ip, sizeof ip, "%s/%s", dir, names[i]);
        assert_int_equal(cs_image_read(o, &lab), 0);
        assert_int_equal(cs_image_read(ip, &img), 0);
        assert_int_equal(lab.width, img.width);
        assert_int_equal(lab.height, img.height);
        cs_image_free(&lab);
        cs_image_free(&img);
        (*count)++;
    }
}

static void test_real_images_both_modes(void **s) {
    (void)s;
    const char *folders[] = {"dsb2018_stage1_test", "usiigaci_phase", "baby_brightfield", "stardist_example"};
    int count[2] = {0, 0};
    for (int tiled = 0; tiled < 2; tiled++)
        for (size_t f = 0; f < sizeof folders / sizeof folders[0]; f++) run_folder(folders[f], tiled, &count[tiled]);
    printf("  real images segmented: %d whole-image, %d tiled (subset step %d)\n", count[0], count[1], subset_step());
    assert_true(count[0] > 0 && count[0] == count[1]);
}

static void write_npy_f32(const char *path, int ndim, const int64_t *shape, float fill, int pattern) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
    float *v = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = pattern ? (float)((i * 7919) % 251) : fill;
    assert_int_equal(cs_npy_save_f32(path, v, ndim, shape), 0);
    free(v);
}

/* A PNG whose IHDR claims the given size (valid CRC), with no image data. */
static void write_png_header(const char *path, uint32_t w, uint32_t h) {
    unsigned char b[33] = {0x89, 'P', 'N', 'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
    for (int i = 0; i < 4; i++) {
        b[16 + i] = (unsigned char)(w >> (24 - 8 * i));
        b[20 + i] = (unsigned char)(h >> (24 - 8 * i));
    }
    b[24] = 8; /* depth */
    b[25] = 0; /* grey */
    uLong crc = crc32(0, b + 12, 17);
    for (int i = 0; i < 4; i++) b[29 + i] = (unsigned char)(crc >> (24 - 8 * i));
    FILE *f = fopen(path, "wb");
    fwrite(b, 1, sizeof b, f);
    fclose(f);
}

static void expect(const char *what, const char *input, int want_ok, const char *extra) {
    char out[16384];
    const char *o = tu_tmp("bad_out.png");
    remove(o);
    int rc = tu_run(out, sizeof out, "%s segment %s --no-tiling %s %s -o %s", tu_cli(), g_model_args, extra ? extra : "",
                 input, o);
    printf("  %-26s exit %d: %s", what, rc, out);
    if (want_ok) {
        assert_int_equal(rc, 0);
        assert_true(exists(o));
    } else {
        assert_int_equal(rc, 1);
        assert_false(exists(o)); /* nothing half-written */
        int lines = 0;
        for (const char *p = out; *p; p++) lines += *p == '\n';
        assert_int_equal(lines, 1);
        assert_non_null(strstr(out, "error"));
    }
}

static void test_bad_inputs(void **s) {
    (void)s;
    /* truncated and corrupted real PNG */
    char src[1024];
    snprintf(src, sizeof src, "%s/stardist_example/img2d_img.png", tu_datadir());
    unsigned char *buf;
    FILE *f = fopen(src, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)n);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    f = fopen(tu_tmp("trunc.png"), "wb");
    fwrite(buf, 1, (size_t)n / 2, f);
    fclose(f);
    expect("truncated PNG", tu_tmp("trunc.png"), 0, NULL);
    buf[n / 3] ^= 0x5a;
    buf[n / 3 + 1] ^= 0xa5;
    f = fopen(tu_tmp("corrupt.png"), "wb");
    fwrite(buf, 1, (size_t)n, f);
    fclose(f);
    expect("corrupted PNG", tu_tmp("corrupt.png"), 0, NULL);
    free(buf);
    write_png_header(tu_tmp("huge.png"), 300000, 300000);
    expect("dimension over the limit", tu_tmp("huge.png"), 0, NULL);
    int64_t s0[2] = {0, 10};
    write_npy_f32(tu_tmp("zero.npy"), 2, s0, 0, 0);
    expect("zero-size image", tu_tmp("zero.npy"), 0, NULL);
    int64_t s1[2] = {1, 1};
    write_npy_f32(tu_tmp("one.npy"), 2, s1, 5, 0);
    expect("1x1 image", tu_tmp("one.npy"), 1, NULL);
    int64_t s2[2] = {1, 5000};
    write_npy_f32(tu_tmp("strip.npy"), 2, s2, 0, 1);
    expect("1x5000 strip", tu_tmp("strip.npy"), 1, NULL);
    int64_t s3[2] = {64, 64};
    write_npy_f32(tu_tmp("nan.npy"), 2, s3, NAN, 0);
    expect("NaN-filled image", tu_tmp("nan.npy"), 0, NULL);
    write_npy_f32(tu_tmp("black.npy"), 2, s3, 0, 0);
    expect("all-black image", tu_tmp("black.npy"), 1, NULL);
    int64_t s4[3] = {64, 64, 5};
    write_npy_f32(tu_tmp("five.npy"), 3, s4, 0, 1);
    expect("5 channels, none chosen", tu_tmp("five.npy"), 0, NULL);
    expect("5 channels, --nuclear 1 --cell 5", tu_tmp("five.npy"), 1, "--nuclear 1 --cell 5");
    expect("channel out of range", tu_tmp("five.npy"), 0, "--cell 9");
    f = fopen(tu_tmp("anim.gif"), "wb");
    fputs("GIF89a\x01\x00\x01\x00\x00\x00\x00;", f);
    fclose(f);
    expect("unsupported format (GIF)", tu_tmp("anim.gif"), 0, NULL);
    expect("missing file", tu_tmp("does_not_exist.tif"), 0, NULL);
    /* zero cells: a valid empty label image and a "0 cells" message */
    char out[16384];
    const char *o = tu_tmp("empty.png");
    assert_int_equal(tu_run(out, sizeof out, "%s segment %s --no-tiling --iou-threshold 10 %s -o %s", tu_cli(), g_model_args,
                         tu_tmp("strip.npy"), o), 0);
    assert_non_null(strstr(out, "0 cells"));
    cs_image lab;
    assert_int_equal(cs_image_read(o, &lab), 0);
    for (int i = 0; i < lab.width * lab.height; i++) assert_true(lab.data[i] == 0);
    cs_image_free(&lab);
    /* usage errors */
    assert_int_equal(tu_run(out, sizeof out, "%s segment %s", tu_cli(), g_model_args), 2);
    assert_int_equal(tu_run(out, sizeof out, "%s segment %s %s -o %s --threads 0", tu_cli(), g_model_args, tu_tmp("one.npy"), o), 2);
}

static void test_batch_folder(void **s) {
    (void)s;
    char out[16384];
    const char *in = tu_tmp("batch_in"), *od = tu_tmp("batch_out");
    mkdir(in, 0777);
    int64_t sh[2] = {48, 40};
    write_npy_f32(tu_tmp("batch_in/a.npy"), 2, sh, 0, 1);
    write_npy_f32(tu_tmp("batch_in/b.npy"), 2, sh, 0, 1);
    assert_int_equal(tu_run(out, sizeof out, "%s segment %s --no-tiling %s -o %s --csv x", tu_cli(), g_model_args, in, od), 0);
    assert_non_null(strstr(out, "2 segmented"));
    assert_true(exists(tu_tmp("batch_out/a_cp_masks.png")));
    assert_true(exists(tu_tmp("batch_out/b_cp_cells.csv")));
    /* existing outputs are skipped unless --overwrite */
    assert_int_equal(tu_run(out, sizeof out, "%s segment %s --no-tiling %s -o %s", tu_cli(), g_model_args, in, od), 0);
    assert_non_null(strstr(out, "2 skipped"));
    assert_int_equal(tu_run(out, sizeof out, "%s segment %s --no-tiling %s -o %s --overwrite", tu_cli(), g_model_args, in, od), 0);
    assert_non_null(strstr(out, "2 segmented"));
}

/* The streamed whole-slide path (regions read on demand, rows written as they are
 * final) gives the same labels and CSV geometry as the in-memory tiled path. */
static void test_stream_equals_memory(void **s) {
    (void)s;
    char out[16384], in[1024];
    snprintf(in, sizeof in, "%s/stardist_example/img2d_img.png", tu_datadir());
    const char *tiling = "--block-size 200 --overlap 40 --iou-depth 40";
    assert_int_equal(tu_run(out, sizeof out, "%s segment %s %s %s -o %s --csv %s -q", tu_cli(), g_model_args, tiling, in,
                            tu_tmp("mem.tif"), tu_tmp("mem.csv")), 0);
    assert_int_equal(tu_run(out, sizeof out, "%s segment %s %s %s -o %s --csv %s -q --stream", tu_cli(), g_model_args,
                            tiling, in, tu_tmp("str.tif"), tu_tmp("str.csv")), 0);
    cs_image a, b;
    assert_int_equal(cs_image_read(tu_tmp("mem.tif"), &a), 0);
    assert_int_equal(cs_image_read(tu_tmp("str.tif"), &b), 0);
    assert_int_equal(a.width * a.height, b.width * b.height);
    size_t diff = 0, fg = 0;
    for (int i = 0; i < a.width * a.height; i++) {
        diff += a.data[i] != b.data[i];
        fg += a.data[i] != 0;
    }
    printf("  streamed vs in-memory: %zu of %d pixels differ (%zu foreground)\n", diff, a.width * a.height, fg);
    assert_int_equal(diff, 0);
    cs_image_free(&a);
    cs_image_free(&b);
    /* the same cells, bounding boxes, areas and centroids (the first 8 columns) */
    FILE *fa = fopen(tu_tmp("mem.csv"), "r"), *fb = fopen(tu_tmp("str.csv"), "r");
    assert_non_null(fa);
    assert_non_null(fb);
    char la[512], lb[512];
    int rows = 0;
    while (fgets(la, sizeof la, fa)) {
        assert_non_null(fgets(lb, sizeof lb, fb));
        int commas = 0;
        size_t k = 0;
        while (la[k] && commas < 8) commas += la[k++] == ',';
        assert_memory_equal(la, lb, k);
        rows++;
    }
    assert_null(fgets(lb, sizeof lb, fb));
    fclose(fa);
    fclose(fb);
    assert_true(rows >= 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_cases),
        cmocka_unit_test(test_bad_inputs),
        cmocka_unit_test(test_batch_folder),
        cmocka_unit_test(test_stream_equals_memory),
        cmocka_unit_test(test_real_images_both_modes),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
