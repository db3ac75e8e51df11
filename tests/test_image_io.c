/* Image input/output: every supported TIFF/PNG/JPEG/.npy variant is written here
 * with the codec libraries and read back value by value; the real data set is
 * read and checked against its headers and manifest; label and overlay writers
 * round-trip; damaged, truncated, oversized and foreign files must fail cleanly. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
/* jpeglib.h needs FILE from stdio.h first. */
#include <jpeglib.h>
#include <png.h>
#include <sys/stat.h>
#include <tiffio.h>
#include <unistd.h>
#include <zlib.h>

#include "cellsam.h"
#include "common.h"
#include "image_io.h"
#include "testutil.h"

static const char *tmp_path(const char *name) {
    static char bufs[8][512];
    static int slot;
    char *b = bufs[slot++ & 7];
    snprintf(b, 512, "%s/%s", tu_tmpdir(), name);
    return b;
}

static unsigned char *slurp(const char *path, size_t *size) {
    unsigned char *buf;
    if (cs_read_file(path, 0, &buf, size)) fail_msg("cannot read %s: %s", path, cellsam_last_error());
    return buf;
}

static void spit(const char *path, const void *data, size_t size) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, size, f), size);
    assert_int_equal(fclose(f), 0);
}

/* An error must carry a code, a message, and (when given) the expected code/text. */
static void expect_error(int rc, int code, const char *substring, const char *what) {
    const char *msg = cellsam_last_error();
    printf("  %-40s rc=%d: %s\n", what, rc, msg);
    if (rc == 0) fail_msg("%s: expected an error", what);
    if (code >= 0 && rc != code) fail_msg("%s: expected code %d, got %d (%s)", what, code, rc, msg);
    if (!msg[0] || strcmp(msg, "no error") == 0) fail_msg("%s: no message", what);
    if (substring && !strstr(msg, substring)) fail_msg("%s: message lacks '%s': %s", what, substring, msg);
}

/* ------------------------------------------------------------------ TIFF writer */

typedef struct {
    int w, h, spp, bps, fmt; /* fmt: SAMPLEFORMAT_* */
    int separate;            /* PLANARCONFIG_SEPARATE */
    int tile;                /* tile size; 0 = strips */
    int rps;                 /* rows per strip; 0 = 7 */
    int bigtiff;
    int compression;         /* 0 = none */
    int predictor;
    int pages;               /* 0 = 1 */
    int photo;               /* 0 = MINISBLACK (RGB when alpha is set) */
    int alpha;               /* RGB + unassociated alpha */
    const char *desc;        /* ImageDescription of the first page */
    int extra_reduced;       /* append a reduced-resolution page */
    int extra_small;         /* append a full-resolution page of another size */
} tspec;

/* Distinct, exactly representable (in float) values for every sample type. */
static double tval(const tspec *s, int x, int y, int c, int page) {
    long b = x * 7L + y * 13L + c * 50L + page * 100L;
    if (s->fmt == SAMPLEFORMAT_IEEEFP)
        return s->bps == 16 ? (double)(b % 2048) * 0.5 - 100 : s->bps == 32 ? (double)b * 0.25 - 300.5 : (double)b * 0.125 - 1000;
    if (s->bps < 8) return (double)(b % (1L << s->bps));
    double u;
    switch (s->bps) {
    case 8: u = (double)(b % 256); break;
    case 16: u = (double)(b * 23 % 65536); break;
    case 32: u = (double)(b % 4096) * 1048576.0; break;
    default: u = (double)(b % 4096) * 1099511627776.0; break;
    }
    if (s->fmt == SAMPLEFORMAT_INT) u -= ldexp(1.0, s->bps - 1);
    return u;
}

static void put_sample(unsigned char *row, size_t idx, const tspec *s, double v) {
    if (s->bps < 8) {
        size_t bit = idx * (size_t)s->bps;
        row[bit / 8] |= (unsigned char)((unsigned)v << (8 - s->bps - (int)(bit % 8)));
        return;
    }
    int f = s->fmt == SAMPLEFORMAT_IEEEFP, i = s->fmt == SAMPLEFORMAT_INT;
    switch (s->bps) {
    case 8: row[idx] = i ? (unsigned char)(int8_t)v : (unsigned char)v; break;
    case 16: {
        uint16_t u = f ? cs_f32_to_f16((float)v) : i ? (uint16_t)(int16_t)v : (uint16_t)v;
        memcpy(row + 2 * idx, &u, 2);
        break;
    }
    case 32: {
        uint32_t u;
        if (f) {
            float x = (float)v;
            memcpy(&u, &x, 4);
        } else {
            u = i ? (uint32_t)(int32_t)v : (uint32_t)v;
        }
        memcpy(row + 4 * idx, &u, 4);
        break;
    }
    default: {
        uint64_t u;
        if (f) memcpy(&u, &v, 8);
        else u = i ? (uint64_t)(int64_t)v : (uint64_t)v;
        memcpy(row + 8 * idx, &u, 8);
        break;
    }
    }
}

static void set_page_tags(TIFF *t, const tspec *s, int w, int h, int reduced, int first) {
    int photo = s->photo ? s->photo : (s->alpha ? PHOTOMETRIC_RGB : PHOTOMETRIC_MINISBLACK);
    TIFFSetField(t, TIFFTAG_IMAGEWIDTH, (uint32_t)w);
    TIFFSetField(t, TIFFTAG_IMAGELENGTH, (uint32_t)h);
    TIFFSetField(t, TIFFTAG_SAMPLESPERPIXEL, (uint16_t)s->spp);
    TIFFSetField(t, TIFFTAG_BITSPERSAMPLE, (uint16_t)s->bps);
    TIFFSetField(t, TIFFTAG_SAMPLEFORMAT, (uint16_t)s->fmt);
    TIFFSetField(t, TIFFTAG_PHOTOMETRIC, (uint16_t)photo);
    TIFFSetField(t, TIFFTAG_PLANARCONFIG, (uint16_t)(s->separate ? PLANARCONFIG_SEPARATE : PLANARCONFIG_CONTIG));
    TIFFSetField(t, TIFFTAG_COMPRESSION, (uint16_t)(s->compression ? s->compression : COMPRESSION_NONE));
    if (s->predictor) TIFFSetField(t, TIFFTAG_PREDICTOR, (uint16_t)s->predictor);
    int base = photo == PHOTOMETRIC_RGB || photo == PHOTOMETRIC_YCBCR ? 3 : 1;
    if (s->spp > base) {
        uint16_t extra[16];
        for (int i = 0; i < s->spp - base; i++) extra[i] = EXTRASAMPLE_UNSPECIFIED;
        if (s->alpha) extra[0] = EXTRASAMPLE_UNASSALPHA;
        TIFFSetField(t, TIFFTAG_EXTRASAMPLES, (uint16_t)(s->spp - base), extra);
    }
    if (photo == PHOTOMETRIC_PALETTE) {
        static uint16_t r[256], g[256], b[256];
        for (int i = 0; i < 256; i++) {
            r[i] = (uint16_t)(i * 257);
            g[i] = (uint16_t)(65535 - i * 257);
            b[i] = (uint16_t)(i * 100);
        }
        TIFFSetField(t, TIFFTAG_COLORMAP, r, g, b);
    }
    if (reduced) TIFFSetField(t, TIFFTAG_SUBFILETYPE, (uint32_t)FILETYPE_REDUCEDIMAGE);
    if (first && s->desc) TIFFSetField(t, TIFFTAG_IMAGEDESCRIPTION, s->desc);
    if (s->tile) {
        TIFFSetField(t, TIFFTAG_TILEWIDTH, (uint32_t)s->tile);
        TIFFSetField(t, TIFFTAG_TILELENGTH, (uint32_t)s->tile);
    } else {
        TIFFSetField(t, TIFFTAG_ROWSPERSTRIP, (uint32_t)(s->rps ? s->rps : 7));
    }
}

static void write_page_data(TIFF *t, const tspec *s, int w, int h, int page) {
    int planes = s->separate ? s->spp : 1, spp_plane = s->separate ? 1 : s->spp;
    if (s->tile) {
        tmsize_t tsz = TIFFTileSize(t), trow = TIFFTileRowSize(t);
        unsigned char *buf = malloc((size_t)tsz);
        assert_non_null(buf);
        for (int pl = 0; pl < planes; pl++)
            for (int ty = 0; ty < h; ty += s->tile)
                for (int tx = 0; tx < w; tx += s->tile) {
                    memset(buf, 0, (size_t)tsz);
                    for (int yy = 0; yy < s->tile && ty + yy < h; yy++)
                        for (int xx = 0; xx < s->tile && tx + xx < w; xx++)
                            for (int k = 0; k < spp_plane; k++)
                                put_sample(buf + (size_t)yy * (size_t)trow, (size_t)xx * (size_t)spp_plane + (size_t)k, s,
                                           tval(s, tx + xx, ty + yy, s->separate ? pl : k, page));
                    uint32_t tile = TIFFComputeTile(t, (uint32_t)tx, (uint32_t)ty, 0, (uint16_t)pl);
                    assert_true(TIFFWriteEncodedTile(t, tile, buf, tsz) >= 0);
                }
        free(buf);
    } else {
        tmsize_t sl = TIFFScanlineSize(t);
        unsigned char *row = malloc((size_t)sl);
        assert_non_null(row);
        for (int pl = 0; pl < planes; pl++)
            for (int y = 0; y < h; y++) {
                memset(row, 0, (size_t)sl);
                for (int x = 0; x < w; x++)
                    for (int k = 0; k < spp_plane; k++)
                        put_sample(row, (size_t)x * (size_t)spp_plane + (size_t)k, s, tval(s, x, y, s->separate ? pl : k, page));
                assert_int_equal(TIFFWriteScanline(t, row, (uint32_t)y, (uint16_t)pl), 1);
            }
        free(row);
    }
}

static void write_tiff(const char *path, const tspec *s) {
    TIFF *t = TIFFOpen(path, s->bigtiff ? "w8" : "w");
    assert_non_null(t);
    int pages = s->pages ? s->pages : 1;
    for (int p = 0; p < pages; p++) {
        set_page_tags(t, s, s->w, s->h, 0, p == 0);
        write_page_data(t, s, s->w, s->h, p);
        assert_true(TIFFWriteDirectory(t));
    }
    if (s->extra_reduced) {
        set_page_tags(t, s, s->w / 2, s->h / 2, 1, 0);
        write_page_data(t, s, s->w / 2, s->h / 2, pages);
        assert_true(TIFFWriteDirectory(t));
    }
    if (s->extra_small) {
        set_page_tags(t, s, s->w / 2 + 1, s->h, 0, 0);
        write_page_data(t, s, s->w / 2 + 1, s->h, pages);
        assert_true(TIFFWriteDirectory(t));
    }
    TIFFClose(t);
}

/* Compare an image (or a region at x0,y0) with tval: channel c comes from
 * page_of[c], sample sample_of[c]. */
static void check_tiff_values(const char *what, const cs_image *img, const tspec *s, int x0, int y0,
                              const int *page_of, const int *sample_of) {
    size_t bad = 0;
    double maxerr = 0;
    for (int y = 0; y < img->height; y++)
        for (int x = 0; x < img->width; x++)
            for (int c = 0; c < img->channels; c++) {
                float want = (float)tval(s, x0 + x, y0 + y, sample_of[c], page_of[c]);
                float got = img->data[((size_t)y * (size_t)img->width + (size_t)x) * (size_t)img->channels + (size_t)c];
                if (got != want) {
                    if (!bad) printf("    first mismatch at (%d,%d,%d): got %.9g want %.9g\n", x, y, c, got, want);
                    bad++;
                    if (fabs((double)got - want) > maxerr) maxerr = fabs((double)got - want);
                }
            }
    printf("  %-44s %dx%dx%d bits=%d float=%d mismatches=%zu\n", what, img->width, img->height, img->channels,
           img->bits, img->is_float, bad);
    if (bad) fail_msg("%s: %zu values differ (max error %g)", what, bad, maxerr);
}

typedef struct {
    const char *name;
    tspec s;
    int want_channels;
    int stack; /* channels are pages (else samples) */
    int page_of[4];
} tiff_case;

static void test_tiff_variants(void **state) {
    (void)state;
    const int U = SAMPLEFORMAT_UINT, I = SAMPLEFORMAT_INT, F = SAMPLEFORMAT_IEEEFP;
    const tiff_case cases[] = {
        {"u8 strips deflate", {.w = 41, .h = 23, .spp = 1, .bps = 8, .fmt = U, .compression = COMPRESSION_ADOBE_DEFLATE}, 1, 0, {0}},
        {"u16 strips lzw+predictor", {.w = 40, .h = 30, .spp = 1, .bps = 16, .fmt = U, .compression = COMPRESSION_LZW, .predictor = 2}, 1, 0, {0}},
        {"u32 strips", {.w = 17, .h = 9, .spp = 1, .bps = 32, .fmt = U}, 1, 0, {0}},
        {"u64 strips", {.w = 17, .h = 9, .spp = 1, .bps = 64, .fmt = U}, 1, 0, {0}},
        {"i8 strips", {.w = 30, .h = 20, .spp = 1, .bps = 8, .fmt = I}, 1, 0, {0}},
        {"i16 strips packbits", {.w = 30, .h = 20, .spp = 1, .bps = 16, .fmt = I, .compression = COMPRESSION_PACKBITS}, 1, 0, {0}},
        {"i32 strips deflate", {.w = 30, .h = 20, .spp = 1, .bps = 32, .fmt = I, .compression = COMPRESSION_ADOBE_DEFLATE}, 1, 0, {0}},
        {"f16 strips", {.w = 30, .h = 20, .spp = 1, .bps = 16, .fmt = F}, 1, 0, {0}},
        {"f32 strips deflate+fp predictor", {.w = 30, .h = 20, .spp = 1, .bps = 32, .fmt = F, .compression = COMPRESSION_ADOBE_DEFLATE, .predictor = 3}, 1, 0, {0}},
        {"f64 strips", {.w = 30, .h = 20, .spp = 1, .bps = 64, .fmt = F}, 1, 0, {0}},
        {"u1 bilevel", {.w = 37, .h = 11, .spp = 1, .bps = 1, .fmt = U}, 1, 0, {0}},
        {"u4 palette (indices)", {.w = 19, .h = 8, .spp = 1, .bps = 4, .fmt = U, .photo = PHOTOMETRIC_PALETTE}, 1, 0, {0}},
        {"u8 palette (indices)", {.w = 19, .h = 8, .spp = 1, .bps = 8, .fmt = U, .photo = PHOTOMETRIC_PALETTE}, 1, 0, {0}},
        {"u8 RGB contig", {.w = 33, .h = 21, .spp = 3, .bps = 8, .fmt = U, .photo = PHOTOMETRIC_RGB}, 3, 0, {0}},
        {"u8 RGBA -> RGB", {.w = 33, .h = 21, .spp = 4, .bps = 8, .fmt = U, .alpha = 1}, 3, 0, {0}},
        {"u16 2ch contig", {.w = 33, .h = 21, .spp = 2, .bps = 16, .fmt = U, .compression = COMPRESSION_ADOBE_DEFLATE}, 2, 0, {0}},
        {"u16 4ch planar separate", {.w = 33, .h = 21, .spp = 4, .bps = 16, .fmt = U, .separate = 1, .rps = 5}, 4, 0, {0}},
        {"f32 3ch planar separate", {.w = 12, .h = 13, .spp = 3, .bps = 32, .fmt = F, .separate = 1}, 3, 0, {0}},
        {"u8 RGB tiled", {.w = 40, .h = 37, .spp = 3, .bps = 8, .fmt = U, .photo = PHOTOMETRIC_RGB, .tile = 16}, 3, 0, {0}},
        {"u16 2ch tiled separate deflate", {.w = 40, .h = 37, .spp = 2, .bps = 16, .fmt = U, .separate = 1, .tile = 16, .compression = COMPRESSION_ADOBE_DEFLATE}, 2, 0, {0}},
        {"u1 tiled", {.w = 40, .h = 37, .spp = 1, .bps = 1, .fmt = U, .tile = 16}, 1, 0, {0}},
        {"BigTIFF u16 tiled", {.w = 40, .h = 37, .spp = 1, .bps = 16, .fmt = U, .tile = 16, .bigtiff = 1}, 1, 0, {0}},
        {"BigTIFF f32 strips 2 pages", {.w = 20, .h = 10, .spp = 1, .bps = 32, .fmt = F, .bigtiff = 1, .pages = 2}, 2, 1, {0, 1}},
        {"3 pages u16 -> 3 channels", {.w = 25, .h = 15, .spp = 1, .bps = 16, .fmt = U, .pages = 3}, 3, 1, {0, 1, 2}},
        {"3 pages + reduced page", {.w = 26, .h = 16, .spp = 1, .bps = 16, .fmt = U, .pages = 3, .extra_reduced = 1}, 3, 1, {0, 1, 2}},
        {"2 pages tiled + other size -> page 0", {.w = 26, .h = 16, .spp = 1, .bps = 8, .fmt = U, .pages = 2, .tile = 16, .extra_small = 1}, 1, 1, {0}},
        {"ImageJ channels=2 slices=2",
         {.w = 20, .h = 12, .spp = 1, .bps = 16, .fmt = U, .pages = 4,
          .desc = "ImageJ=1.53t\nimages=4\nchannels=2\nslices=2\nhyperstack=true\n"}, 2, 1, {0, 1}},
        {"ImageJ z-stack only -> page 0",
         {.w = 20, .h = 12, .spp = 1, .bps = 16, .fmt = U, .pages = 3, .desc = "ImageJ=1.53t\nimages=3\nslices=3\n"}, 1, 1, {0}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const tiff_case *tc = &cases[i];
        char name[64];
        snprintf(name, sizeof name, "variant%02zu.tif", i);
        const char *path = tmp_path(name);
        write_tiff(path, &tc->s);
        cs_image img;
        int rc = cs_image_read(path, &img);
        if (rc) fail_msg("%s: %s", tc->name, cellsam_last_error());
        assert_int_equal(img.channels, tc->want_channels);
        assert_int_equal(img.width, tc->s.w);
        assert_int_equal(img.height, tc->s.h);
        assert_int_equal(img.bits, tc->s.bps);
        assert_int_equal(img.is_float, tc->s.fmt == SAMPLEFORMAT_IEEEFP);
        int page_of[16] = {0}, sample_of[16] = {0};
        for (int c = 0; c < img.channels; c++) {
            page_of[c] = tc->stack ? tc->page_of[c] : 0;
            sample_of[c] = tc->stack ? 0 : c;
        }
        check_tiff_values(tc->name, &img, &tc->s, 0, 0, page_of, sample_of);
        /* The same bytes from memory. */
        size_t size;
        unsigned char *buf = slurp(path, &size);
        cs_image mem;
        rc = cs_image_decode(buf, size, tc->name, &mem);
        if (rc) fail_msg("%s (memory): %s", tc->name, cellsam_last_error());
        assert_int_equal(mem.channels, img.channels);
        assert_memory_equal(mem.data, img.data, (size_t)img.width * img.height * img.channels * sizeof(float));
        cs_image_free(&mem);
        /* Probe agrees with the decoder. */
        int pw, ph, pc;
        assert_int_equal(cs_image_probe(path, &pw, &ph, &pc), 0);
        assert_int_equal(pw, img.width);
        assert_int_equal(ph, img.height);
        assert_int_equal(pc, img.channels);
        free(buf);
        cs_image_free(&img);
    }
}

/* Regions from strips and tiles, forwards and backwards, must equal the crop. */
static void test_tiff_regions(void **state) {
    (void)state;
    const tspec specs[] = {
        {.w = 40, .h = 37, .spp = 1, .bps = 16, .fmt = SAMPLEFORMAT_UINT, .rps = 6, .compression = COMPRESSION_ADOBE_DEFLATE},
        {.w = 40, .h = 37, .spp = 3, .bps = 8, .fmt = SAMPLEFORMAT_UINT, .photo = PHOTOMETRIC_RGB, .tile = 16, .compression = COMPRESSION_LZW},
        {.w = 40, .h = 37, .spp = 2, .bps = 16, .fmt = SAMPLEFORMAT_UINT, .separate = 1, .tile = 16},
        {.w = 40, .h = 37, .spp = 2, .bps = 32, .fmt = SAMPLEFORMAT_IEEEFP, .separate = 1, .rps = 4},
        {.w = 40, .h = 37, .spp = 1, .bps = 1, .fmt = SAMPLEFORMAT_UINT, .rps = 37, .compression = COMPRESSION_ADOBE_DEFLATE},
        {.w = 40, .h = 37, .spp = 1, .bps = 16, .fmt = SAMPLEFORMAT_UINT, .tile = 16, .pages = 3, .bigtiff = 1},
    };
    const int regions[][4] = {{0, 0, 40, 37}, {5, 3, 10, 20}, {39, 36, 1, 1}, {0, 0, 3, 3}, {16, 16, 16, 16},
                              {15, 15, 2, 2}, {1, 30, 39, 7}, {0, 10, 40, 1}, {0, 5, 40, 2},
                              /* bands in order (strip readers continue where they stopped) */
                              {0, 20, 40, 3}, {0, 23, 40, 3}, {0, 26, 40, 5}, {3, 31, 30, 2}, {0, 33, 40, 4}};
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "region%02zu.tif", i);
        const char *path = tmp_path(name);
        write_tiff(path, &specs[i]);
        cs_image_reader *r;
        if (cs_image_reader_open(path, &r)) fail_msg("open %s: %s", path, cellsam_last_error());
        cs_image_info info;
        cs_image_reader_info(r, &info);
        int page_of[16], sample_of[16];
        for (int c = 0; c < info.channels; c++) {
            page_of[c] = specs[i].pages > 1 ? c : 0;
            sample_of[c] = specs[i].pages > 1 ? 0 : c;
        }
        for (size_t k = 0; k < sizeof regions / sizeof regions[0]; k++) {
            const int *g = regions[k];
            cs_image reg;
            if (cs_image_reader_read_region(r, g[0], g[1], g[2], g[3], &reg))
                fail_msg("region %d,%d %dx%d of %s: %s", g[0], g[1], g[2], g[3], path, cellsam_last_error());
            char what[96];
            snprintf(what, sizeof what, "spec %zu region %d,%d %dx%d", i, g[0], g[1], g[2], g[3]);
            check_tiff_values(what, &reg, &specs[i], g[0], g[1], page_of, sample_of);
            cs_image_free(&reg);
        }
        cs_image bad;
        expect_error(cs_image_reader_read_region(r, 30, 30, 11, 1, &bad), CELLSAM_ERR_INVALID, "outside", "region outside");
        expect_error(cs_image_reader_read_region(r, -1, 0, 1, 1, &bad), CELLSAM_ERR_INVALID, NULL, "negative region");
        expect_error(cs_image_reader_read_region(r, 0, 0, 0, 1, &bad), CELLSAM_ERR_INVALID, NULL, "empty region");
        cs_image_reader_close(r);
        /* the whole image at once, as cs_image_read reads it */
        if (cs_image_reader_open(path, &r)) fail_msg("open %s: %s", path, cellsam_last_error());
        cs_image all;
        if (cs_image_reader_read_all(r, &all)) fail_msg("read all of %s: %s", path, cellsam_last_error());
        cs_image_reader_close(r);
        char what[96];
        snprintf(what, sizeof what, "spec %zu, read all", i);
        check_tiff_values(what, &all, &specs[i], 0, 0, page_of, sample_of);
        cs_image_free(&all);
    }
    /* Non-TIFF formats crop the decoded image. */
    int64_t shape[2] = {5, 4};
    uint16_t v[20];
    for (int i = 0; i < 20; i++) v[i] = (uint16_t)(i * 3);
    const char *p = tmp_path("region.npy");
    assert_int_equal(cs_npy_save(p, CS_NPY_U16, v, 2, shape), 0);
    cs_image reg;
    assert_int_equal(cs_image_read_region(p, 1, 2, 2, 3, &reg), 0);
    for (int y = 0; y < 3; y++)
        for (int x = 0; x < 2; x++) assert_true(reg.data[y * 2 + x] == (float)((2 + y) * 4 + 1 + x) * 3);
    cs_image_free(&reg);
    /* ... and hand the decoded image over whole */
    cs_image_reader *r;
    assert_int_equal(cs_image_reader_open(p, &r), 0);
    assert_int_equal(cs_image_reader_read_all(r, &reg), 0);
    cs_image_reader_close(r);
    assert_true(reg.width == 4 && reg.height == 5 && reg.channels == 1);
    for (int i = 0; i < 20; i++) assert_true(reg.data[i] == (float)(i * 3));
    cs_image_free(&reg);
}

/* OME-TIFF: pages are planes in DimensionOrder; channels at Z=0, T=0. */
static void test_ome_tiff(void **state) {
    (void)state;
    char desc[1024];
    /* XYZCT, C=2, Z=3: plane index = z + 3 c -> channels at pages 0 and 3. */
    snprintf(desc, sizeof desc,
             "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<OME xmlns=\"http://www.openmicroscopy.org/Schemas/OME/2016-06\">"
             "<Image ID=\"Image:0\"><Pixels DimensionOrder=\"XYZCT\" ID=\"Pixels:0\" PhysicalSizeX=\"0.5\" SizeC=\"2\" SizeT=\"1\" "
             "SizeX=\"24\" SizeY=\"14\" SizeZ=\"3\" Type=\"uint16\"><Channel ID=\"Channel:0:0\" SamplesPerPixel=\"1\"/>"
             "<TiffData IFD=\"0\" PlaneCount=\"6\"/></Pixels></Image></OME>");
    tspec s = {.w = 24, .h = 14, .spp = 1, .bps = 16, .fmt = SAMPLEFORMAT_UINT, .pages = 6, .desc = desc};
    const char *path = tmp_path("ome_zct.ome.tif");
    write_tiff(path, &s);
    cs_image img;
    if (cs_image_read(path, &img)) fail_msg("%s", cellsam_last_error());
    assert_int_equal(img.channels, 2);
    int page_of[2] = {0, 3}, sample_of[2] = {0, 0};
    check_tiff_values("OME XYZCT C=2 Z=3", &img, &s, 0, 0, page_of, sample_of);
    cs_image_free(&img);
    cs_image_reader *r;
    assert_int_equal(cs_image_reader_open(path, &r), 0);
    cs_image_info info;
    cs_image_reader_info(r, &info);
    assert_string_equal(info.format, "ome-tiff");
    assert_int_equal(info.pages, 2);
    cs_image_reader_close(r);

    /* XYCZT with a namespace prefix and single quotes, C=3 Z=2 T=2 -> pages 0,1,2. */
    snprintf(desc, sizeof desc,
             "<ome:OME xmlns:ome='http://www.openmicroscopy.org/Schemas/OME/2016-06'><ome:Image><ome:Pixels SizeT='2' "
             "DimensionOrder='XYCZT' SizeZ='2' SizeC='3' SizeY='10' SizeX='12' Type='float'></ome:Pixels></ome:Image></ome:OME>");
    tspec s2 = {.w = 12, .h = 10, .spp = 1, .bps = 32, .fmt = SAMPLEFORMAT_IEEEFP, .pages = 12, .desc = desc, .tile = 16};
    path = tmp_path("ome_czt.ome.tif");
    write_tiff(path, &s2);
    if (cs_image_read(path, &img)) fail_msg("%s", cellsam_last_error());
    int page_of2[3] = {0, 1, 2}, sample_of2[3] = {0};
    assert_int_equal(img.channels, 3);
    check_tiff_values("OME XYCZT C=3 Z=2 T=2", &img, &s2, 0, 0, page_of2, sample_of2);
    cs_image_free(&img);

    /* XYTZC, C=2 Z=2 T=3: channel stride Z*T = 6 -> pages 0 and 6. */
    snprintf(desc, sizeof desc, "<OME><Image><Pixels DimensionOrder=\"XYTZC\" SizeC=\"2\" SizeZ=\"2\" SizeT=\"3\"/></Image></OME>");
    tspec s3 = {.w = 9, .h = 7, .spp = 1, .bps = 8, .fmt = SAMPLEFORMAT_UINT, .pages = 12, .desc = desc};
    path = tmp_path("ome_tzc.ome.tif");
    write_tiff(path, &s3);
    if (cs_image_read(path, &img)) fail_msg("%s", cellsam_last_error());
    int page_of3[2] = {0, 6};
    assert_int_equal(img.channels, 2);
    check_tiff_values("OME XYTZC C=2 Z=2 T=3", &img, &s3, 0, 0, page_of3, sample_of);
    cs_image_free(&img);

    /* OME-XML that promises more planes than the file holds (multi-file set). */
    snprintf(desc, sizeof desc, "<OME><Image><Pixels DimensionOrder=\"XYZCT\" SizeC=\"4\" SizeZ=\"5\" SizeT=\"1\"/></Image></OME>");
    tspec s4 = {.w = 9, .h = 7, .spp = 1, .bps = 8, .fmt = SAMPLEFORMAT_UINT, .pages = 2, .desc = desc};
    path = tmp_path("ome_missing.ome.tif");
    write_tiff(path, &s4);
    expect_error(cs_image_read(path, &img), CELLSAM_ERR_FORMAT, "OME", "OME planes in another file");

    /* Too many OME channels. */
    snprintf(desc, sizeof desc, "<OME><Pixels DimensionOrder=\"XYCZT\" SizeC=\"17\" SizeZ=\"1\" SizeT=\"1\"/></OME>");
    tspec s5 = {.w = 4, .h = 4, .spp = 1, .bps = 8, .fmt = SAMPLEFORMAT_UINT, .pages = 17, .desc = desc};
    path = tmp_path("ome_17.ome.tif");
    write_tiff(path, &s5);
    expect_error(cs_image_read(path, &img), CELLSAM_ERR_UNSUPPORTED, "17", "OME 17 channels");

    /* Broken XML (no DimensionOrder, unterminated): the generic page rule applies. */
    snprintf(desc, sizeof desc, "<OME><Pixels SizeC=\"2\" SizeZ=\"1");
    tspec s6 = {.w = 5, .h = 4, .spp = 1, .bps = 8, .fmt = SAMPLEFORMAT_UINT, .pages = 2, .desc = desc};
    path = tmp_path("ome_broken.ome.tif");
    write_tiff(path, &s6);
    if (cs_image_read(path, &img)) fail_msg("%s", cellsam_last_error());
    assert_int_equal(img.channels, 2);
    cs_image_free(&img);
}

static void test_tiff_limits_and_stacks(void **state) {
    (void)state;
    cs_image img;
    /* 17 same-size pages: a z-stack, not channels. */
    tspec s = {.w = 4, .h = 3, .spp = 1, .bps = 8, .fmt = SAMPLEFORMAT_UINT, .pages = 17};
    const char *path = tmp_path("pages17.tif");
    write_tiff(path, &s);
    expect_error(cs_image_read(path, &img), CELLSAM_ERR_UNSUPPORTED, "pages", "17-page stack");
    /* 12-bit samples are not supported. */
    tspec s12 = {.w = 4, .h = 3, .spp = 1, .bps = 12, .fmt = SAMPLEFORMAT_UINT};
    TIFF *t = TIFFOpen(tmp_path("bits12.tif"), "w");
    set_page_tags(t, &s12, 4, 3, 0, 1);
    unsigned char row[8] = {0};
    for (int y = 0; y < 3; y++) TIFFWriteScanline(t, row, (uint32_t)y, 0);
    TIFFWriteDirectory(t);
    TIFFClose(t);
    expect_error(cs_image_read(tmp_path("bits12.tif"), &img), CELLSAM_ERR_UNSUPPORTED, "12-bit", "12-bit TIFF");
    /* Configurable limits. */
    tspec big = {.w = 300, .h = 20, .spp = 1, .bps = 8, .fmt = SAMPLEFORMAT_UINT};
    path = tmp_path("wide.tif");
    write_tiff(path, &big);
    cs_image_limits l = cs_image_default_limits();
    l.max_dim = 256;
    cs_image_set_limits(&l);
    expect_error(cs_image_read(path, &img), CELLSAM_ERR_LIMIT, "limit", "width over max_dim");
    l = cs_image_default_limits();
    l.max_samples = 5999;
    cs_image_set_limits(&l);
    expect_error(cs_image_read(path, &img), CELLSAM_ERR_LIMIT, "limit", "samples over max_samples");
    l.max_samples = 6000;
    cs_image_set_limits(&l);
    assert_int_equal(cs_image_read(path, &img), 0);
    cs_image_free(&img);
    cs_image_set_limits(NULL);
    assert_int_equal(cs_image_get_limits().max_dim, 200000);
}

/* Raw YCbCr needs libtiff's RGBA conversion (the fallback path). */
static void test_tiff_ycbcr_fallback(void **state) {
    (void)state;
    const char *path = tmp_path("ycbcr.tif");
    TIFF *t = TIFFOpen(path, "w");
    assert_non_null(t);
    int w = 16, h = 8;
    TIFFSetField(t, TIFFTAG_IMAGEWIDTH, (uint32_t)w);
    TIFFSetField(t, TIFFTAG_IMAGELENGTH, (uint32_t)h);
    TIFFSetField(t, TIFFTAG_SAMPLESPERPIXEL, (uint16_t)3);
    TIFFSetField(t, TIFFTAG_BITSPERSAMPLE, (uint16_t)8);
    TIFFSetField(t, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_YCBCR);
    TIFFSetField(t, TIFFTAG_YCBCRSUBSAMPLING, (uint16_t)1, (uint16_t)1);
    TIFFSetField(t, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG);
    TIFFSetField(t, TIFFTAG_ROWSPERSTRIP, (uint32_t)h);
    unsigned char row[48];
    for (int y = 0; y < h; y++) {
        for (int x = 0; x < w; x++) {
            row[3 * x] = (unsigned char)(20 + 10 * x + y); /* Y */
            row[3 * x + 1] = 128;                          /* Cb, Cr neutral: grey */
            row[3 * x + 2] = 128;
        }
        assert_int_equal(TIFFWriteScanline(t, row, (uint32_t)y, 0), 1);
    }
    TIFFWriteDirectory(t);
    TIFFClose(t);
    cs_image img;
    if (cs_image_read(path, &img)) fail_msg("%s", cellsam_last_error());
    assert_int_equal(img.channels, 3);
    double maxerr = 0;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < 3; c++) {
                double e = fabs(img.data[(y * w + x) * 3 + c] - (20 + 10 * x + y));
                if (e > maxerr) maxerr = e;
            }
    printf("  YCbCr via RGBA fallback: max error %.3g (tol 2)\n", maxerr);
    assert_true(maxerr <= 2);
    cs_image_free(&img);
    cs_image reg;
    assert_int_equal(cs_image_read_region(path, 3, 2, 4, 5, &reg), 0);
    assert_true(fabs(reg.data[0] - (20 + 10 * 3 + 2)) <= 2);
    cs_image_free(&reg);
}

/* ------------------------------------------------------------------ PNG */

/* samples: w*h*file_channels values (palette: indices). */
static void write_png_file(const char *path, int w, int h, int bd, int color, int interlace, const uint16_t *samples,
                           const png_color *pal, int npal, const png_byte *trns, int ntrns) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    if (setjmp(png_jmpbuf(png))) fail_msg("libpng write failed");
    png_init_io(png, f);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, bd, color, interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (pal) png_set_PLTE(png, info, pal, npal);
    if (trns) png_set_tRNS(png, info, trns, ntrns, NULL);
    png_write_info(png, info);
    if (bd < 8) png_set_packing(png);
    int ch = color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_PALETTE ? 1 : color == PNG_COLOR_TYPE_GRAY_ALPHA ? 2
             : color == PNG_COLOR_TYPE_RGB ? 3 : 4;
    size_t bps = bd == 16 ? 2 : 1;
    unsigned char *img = calloc((size_t)w * h * ch * bps, 1);
    png_bytep *rows = calloc((size_t)h, sizeof *rows);
    for (int y = 0; y < h; y++) {
        rows[y] = img + (size_t)y * w * ch * bps;
        for (int i = 0; i < w * ch; i++) {
            uint16_t v = samples[(size_t)y * w * ch + i];
            if (bd == 16) {
                rows[y][2 * i] = (unsigned char)(v >> 8);
                rows[y][2 * i + 1] = (unsigned char)v;
            } else {
                rows[y][i] = (unsigned char)v;
            }
        }
    }
    png_write_image(png, rows);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    fclose(f);
    free(rows);
    free(img);
}

static void test_png_variants(void **state) {
    (void)state;
    const int w = 23, h = 17;
    uint16_t *s = malloc((size_t)w * h * 4 * sizeof *s);
    assert_non_null(s);
    struct { const char *name; int bd, color, interlace, want_ch; } cases[] = {
        {"grey 1-bit", 1, PNG_COLOR_TYPE_GRAY, 0, 1},
        {"grey 2-bit", 2, PNG_COLOR_TYPE_GRAY, 0, 1},
        {"grey 4-bit", 4, PNG_COLOR_TYPE_GRAY, 0, 1},
        {"grey 8-bit", 8, PNG_COLOR_TYPE_GRAY, 0, 1},
        {"grey 16-bit", 16, PNG_COLOR_TYPE_GRAY, 0, 1},
        {"grey 16-bit interlaced", 16, PNG_COLOR_TYPE_GRAY, 1, 1},
        {"grey+alpha 8-bit", 8, PNG_COLOR_TYPE_GRAY_ALPHA, 0, 1},
        {"grey+alpha 16-bit", 16, PNG_COLOR_TYPE_GRAY_ALPHA, 0, 1},
        {"RGB 8-bit", 8, PNG_COLOR_TYPE_RGB, 0, 3},
        {"RGB 16-bit interlaced", 16, PNG_COLOR_TYPE_RGB, 1, 3},
        {"RGBA 8-bit", 8, PNG_COLOR_TYPE_RGBA, 0, 3},
        {"RGBA 16-bit", 16, PNG_COLOR_TYPE_RGBA, 0, 3},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int ch = cases[k].color == PNG_COLOR_TYPE_GRAY ? 1 : cases[k].color == PNG_COLOR_TYPE_GRAY_ALPHA ? 2
                 : cases[k].color == PNG_COLOR_TYPE_RGB ? 3 : 4;
        long range = 1L << cases[k].bd;
        for (int i = 0; i < w * h * ch; i++) s[i] = (uint16_t)(((long)i * 2654435761L >> 7) % range);
        char name[64];
        snprintf(name, sizeof name, "png%02zu.png", k);
        const char *path = tmp_path(name);
        write_png_file(path, w, h, cases[k].bd, cases[k].color, cases[k].interlace, s, NULL, 0, NULL, 0);
        cs_image img;
        if (cs_image_read(path, &img)) fail_msg("%s: %s", cases[k].name, cellsam_last_error());
        assert_int_equal(img.width, w);
        assert_int_equal(img.height, h);
        assert_int_equal(img.channels, cases[k].want_ch);
        assert_int_equal(img.bits, cases[k].bd);
        size_t bad = 0;
        for (int i = 0; i < w * h; i++)
            for (int c = 0; c < img.channels; c++)
                if (img.data[i * img.channels + c] != (float)s[i * ch + c]) bad++;
        printf("  PNG %-28s %dx%dx%d mismatches=%zu\n", cases[k].name, img.width, img.height, img.channels, bad);
        assert_int_equal(bad, 0);
        int pw, ph, pc;
        assert_int_equal(cs_image_probe(path, &pw, &ph, &pc), 0);
        assert_true(pw == w && ph == h && pc == img.channels);
        cs_image_free(&img);
    }
    /* Palette (4-bit, with transparency) expands to RGB. */
    png_color pal[16];
    png_byte trns[3] = {0, 128, 255};
    for (int i = 0; i < 16; i++) {
        pal[i].red = (png_byte)(i * 16);
        pal[i].green = (png_byte)(255 - i * 16);
        pal[i].blue = (png_byte)(i * 3);
    }
    for (int i = 0; i < w * h; i++) s[i] = (uint16_t)(i % 16);
    const char *path = tmp_path("palette.png");
    write_png_file(path, w, h, 4, PNG_COLOR_TYPE_PALETTE, 0, s, pal, 16, trns, 3);
    cs_image img;
    if (cs_image_read(path, &img)) fail_msg("palette: %s", cellsam_last_error());
    assert_int_equal(img.channels, 3);
    assert_int_equal(img.bits, 8);
    for (int i = 0; i < w * h; i++) {
        const png_color *p = &pal[s[i]];
        if (img.data[3 * i] != p->red || img.data[3 * i + 1] != p->green || img.data[3 * i + 2] != p->blue)
            fail_msg("palette pixel %d differs", i);
    }
    printf("  PNG palette 4-bit + tRNS -> RGB: ok\n");
    cs_image_free(&img);
    free(s);
}

/* ------------------------------------------------------------------ JPEG */

static void write_jpeg_file(const char *path, int w, int h, int ch, int progressive, const unsigned char *px) {
    struct jpeg_compress_struct c;
    struct jpeg_error_mgr e;
    c.err = jpeg_std_error(&e);
    jpeg_create_compress(&c);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    jpeg_stdio_dest(&c, f);
    c.image_width = (JDIMENSION)w;
    c.image_height = (JDIMENSION)h;
    c.input_components = ch;
    c.in_color_space = ch == 1 ? JCS_GRAYSCALE : JCS_RGB;
    jpeg_set_defaults(&c);
    jpeg_set_quality(&c, 95, TRUE);
    if (progressive) jpeg_simple_progression(&c);
    jpeg_start_compress(&c, TRUE);
    while (c.next_scanline < c.image_height) {
        JSAMPROW row = (JSAMPROW)(px + (size_t)c.next_scanline * w * ch);
        jpeg_write_scanlines(&c, &row, 1);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    fclose(f);
}

/* Reference decode with plain libjpeg (valid files only). */
static unsigned char *ref_jpeg(const char *path, int *w, int *h, int *ch) {
    struct jpeg_decompress_struct d;
    struct jpeg_error_mgr e;
    d.err = jpeg_std_error(&e);
    jpeg_create_decompress(&d);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    jpeg_stdio_src(&d, f);
    jpeg_read_header(&d, TRUE);
    jpeg_start_decompress(&d);
    *w = (int)d.output_width;
    *h = (int)d.output_height;
    *ch = d.output_components;
    unsigned char *px = malloc((size_t)*w * *h * *ch);
    while (d.output_scanline < d.output_height) {
        JSAMPROW row = px + (size_t)d.output_scanline * *w * *ch;
        jpeg_read_scanlines(&d, &row, 1);
    }
    jpeg_finish_decompress(&d);
    jpeg_destroy_decompress(&d);
    fclose(f);
    return px;
}

static void make_jpeg(const char *path, int w, int h, int ch, int progressive, unsigned char **src_out) {
    unsigned char *px = malloc((size_t)w * h * ch);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < ch; c++) px[((size_t)y * w + x) * ch + c] = (unsigned char)(20 + 2 * x + 2 * y + 30 * c);
    write_jpeg_file(path, w, h, ch, progressive, px);
    if (src_out) *src_out = px;
    else free(px);
}

static void test_jpeg(void **state) {
    (void)state;
    const int w = 45, h = 33;
    for (int variant = 0; variant < 3; variant++) {
        int ch = variant == 0 ? 1 : 3, prog = variant == 2;
        char name[32];
        snprintf(name, sizeof name, "j%d.jpg", variant);
        const char *path = tmp_path(name);
        unsigned char *src;
        make_jpeg(path, w, h, ch, prog, &src);
        cs_image img;
        if (cs_image_read(path, &img)) fail_msg("jpeg %d: %s", variant, cellsam_last_error());
        int rw, rh, rc;
        unsigned char *ref = ref_jpeg(path, &rw, &rh, &rc);
        assert_int_equal(img.width, rw);
        assert_int_equal(img.height, rh);
        assert_int_equal(img.channels, rc);
        assert_int_equal(img.channels, ch);
        size_t n = (size_t)w * h * ch, bad = 0;
        double maxerr = 0;
        for (size_t i = 0; i < n; i++) {
            if (img.data[i] != ref[i]) bad++;
            double e = fabs(img.data[i] - src[i]);
            if (e > maxerr) maxerr = e;
        }
        printf("  JPEG %s%s: %zu differences from libjpeg, max |decoded - source| = %.0f (tol 8)\n",
               ch == 1 ? "grey" : "RGB", prog ? " progressive" : "", bad, maxerr);
        assert_int_equal(bad, 0);
        assert_true(maxerr <= 8);
        int pw, ph, pc;
        assert_int_equal(cs_image_probe(path, &pw, &ph, &pc), 0);
        assert_true(pw == w && ph == h && pc == ch);
        cs_image_free(&img);
        free(ref);
        free(src);
    }
}

/* ------------------------------------------------------------------ npy */

static void test_npy(void **state) {
    (void)state;
    cs_image img;
    const char *p = tmp_path("hw.npy");
    int64_t s2[2] = {3, 5};
    uint16_t u[15];
    for (int i = 0; i < 15; i++) u[i] = (uint16_t)(i * 1000);
    assert_int_equal(cs_npy_save(p, CS_NPY_U16, u, 2, s2), 0);
    assert_int_equal(cs_image_read(p, &img), 0);
    assert_true(img.width == 5 && img.height == 3 && img.channels == 1 && img.bits == 16 && !img.is_float);
    for (int i = 0; i < 15; i++) assert_true(img.data[i] == (float)u[i]);
    cs_image_free(&img);

    /* (H,W,C) float32. */
    float f[4 * 6 * 3];
    for (int i = 0; i < 72; i++) f[i] = (float)i * 0.5f - 7;
    int64_t hwc[3] = {4, 6, 3};
    p = tmp_path("hwc.npy");
    assert_int_equal(cs_npy_save_f32(p, f, 3, hwc), 0);
    assert_int_equal(cs_image_read(p, &img), 0);
    assert_true(img.width == 6 && img.height == 4 && img.channels == 3 && img.is_float && img.bits == 32);
    assert_memory_equal(img.data, f, sizeof f);
    cs_image_free(&img);

    /* (C,H,W) int16: the smallest axis is moved last. */
    int16_t chw[2 * 4 * 5];
    for (int i = 0; i < 40; i++) chw[i] = (int16_t)(i * 37 - 600);
    int64_t sc[3] = {2, 4, 5};
    p = tmp_path("chw.npy");
    assert_int_equal(cs_npy_save(p, CS_NPY_I16, chw, 3, sc), 0);
    assert_int_equal(cs_image_read(p, &img), 0);
    assert_true(img.width == 5 && img.height == 4 && img.channels == 2);
    for (int c = 0; c < 2; c++)
        for (int y = 0; y < 4; y++)
            for (int x = 0; x < 5; x++)
                assert_true(img.data[(y * 5 + x) * 2 + c] == (float)chw[(c * 4 + y) * 5 + x]);
    int pw, ph, pc;
    assert_int_equal(cs_image_probe(p, &pw, &ph, &pc), 0);
    assert_true(pw == 5 && ph == 4 && pc == 2);
    cs_image_free(&img);

    /* (H,C,W) with C smallest in the middle; bool and float64. */
    unsigned char b[3 * 2 * 4];
    for (int i = 0; i < 24; i++) b[i] = (unsigned char)(i % 3 == 0);
    int64_t hcw[3] = {3, 2, 4};
    p = tmp_path("hcw.npy");
    assert_int_equal(cs_npy_save(p, CS_NPY_BOOL, b, 3, hcw), 0);
    assert_int_equal(cs_image_read(p, &img), 0);
    assert_true(img.width == 4 && img.height == 3 && img.channels == 2);
    for (int y = 0; y < 3; y++)
        for (int c = 0; c < 2; c++)
            for (int x = 0; x < 4; x++) assert_true(img.data[(y * 4 + x) * 2 + c] == (float)b[(y * 2 + c) * 4 + x]);
    cs_image_free(&img);

    /* Errors: 5-D, 1-D, too many channels, zero size. */
    float z[64] = {0};
    int64_t s5[5] = {2, 2, 2, 2, 2};
    p = tmp_path("five.npy");
    assert_int_equal(cs_npy_save_f32(p, z, 5, s5), 0);
    expect_error(cs_image_read(p, &img), CELLSAM_ERR_UNSUPPORTED, "5-D", "npy 5-D");
    expect_error(cs_image_probe(p, &pw, &ph, &pc), CELLSAM_ERR_UNSUPPORTED, "5-D", "npy 5-D probe");
    int64_t s1[1] = {8};
    p = tmp_path("one.npy");
    assert_int_equal(cs_npy_save_f32(p, z, 1, s1), 0);
    expect_error(cs_image_read(p, &img), CELLSAM_ERR_UNSUPPORTED, "1-D", "npy 1-D");
    int64_t s20[3] = {20, 30, 20};
    float *many = calloc(20 * 30 * 20, sizeof(float));
    p = tmp_path("many.npy");
    assert_int_equal(cs_npy_save_f32(p, many, 3, s20), 0);
    free(many);
    expect_error(cs_image_read(p, &img), CELLSAM_ERR_UNSUPPORTED, "channels", "npy 20 channels");
    int64_t s0[2] = {0, 5};
    p = tmp_path("zero.npy");
    assert_int_equal(cs_npy_save_f32(p, z, 2, s0), 0);
    expect_error(cs_image_read(p, &img), CELLSAM_ERR_FORMAT, "zero size", "npy zero size");
    /* A key whose value would start right after the header (fuzz_image regression). */
    const char past[] = "\x93NUMPY\x01\x00\x32\x00{'shape': (2, 2), 'fortran_order': False, 'descr':'<f4'0123456789abcdef";
    expect_error(cs_image_decode((const unsigned char *)past, sizeof past - 1, "past.npy", &img), CELLSAM_ERR_FORMAT,
                 "malformed", "npy value after the header");
    /* Header claims more data than present (no allocation of the claimed size). */
    const char hdr[] = "\x93NUMPY\x01\x00\x46\x00{'descr': '<f4', 'fortran_order': False, 'shape': (60000, 60000), }    \n";
    expect_error(cs_image_decode((const unsigned char *)hdr, sizeof hdr - 1, "hostile.npy", &img), -1, NULL, "npy truncated data");
}

/* ------------------------------------------------------------------ real data */

static int png_header_dims(const char *path, int *w, int *h) {
    unsigned char b[33];
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    size_t n = fread(b, 1, sizeof b, f);
    fclose(f);
    if (n != sizeof b || memcmp(b + 12, "IHDR", 4)) return -1;
    *w = (b[16] << 24) | (b[17] << 16) | (b[18] << 8) | b[19];
    *h = (b[20] << 24) | (b[21] << 16) | (b[22] << 8) | b[23];
    return 0;
}

static void test_real_data(void **state) {
    (void)state;
    char path[2048];
    snprintf(path, sizeof path, "%s/manifest.csv", tu_datadir());
    FILE *f = fopen(path, "r");
    if (!f) fail_msg("cannot open %s", path);
    char line[4096];
    int rows = 0, checked_files = 0;
    assert_non_null(fgets(line, sizeof line, f)); /* header */
    while (fgets(line, sizeof line, f)) {
        char *field[10] = {0};
        int nf = 0;
        for (char *s = line; nf < 10; nf++) {
            field[nf] = s;
            char *comma = strchr(s, ',');
            if (!comma) {
                nf++;
                break;
            }
            *comma = '\0';
            s = comma + 1;
        }
        if (nf < 9) continue;
        int mh = atoi(field[4]), mw = atoi(field[5]), mc = atoi(field[6]), ncell = atoi(field[8]);
        int mbits = strcmp(field[7], "uint8") == 0 ? 8 : 16;
        for (int which = 0; which < 2; which++) {
            snprintf(path, sizeof path, "%s/%s", tu_datadir(), which ? field[3] : field[2]);
            int hw = 0, hh = 0;
            if (png_header_dims(path, &hw, &hh)) fail_msg("%s: no PNG header", path);
            cs_image img;
            if (cs_image_read(path, &img)) fail_msg("%s: %s", path, cellsam_last_error());
            if (img.width != hw || img.height != hh || img.width != mw || img.height != mh)
                fail_msg("%s: %dx%d, header %dx%d, manifest %dx%d", path, img.width, img.height, hw, hh, mw, mh);
            if (which == 0) {
                if (img.channels != mc || img.bits != mbits)
                    fail_msg("%s: %d channels %d bits, manifest %d %d", path, img.channels, img.bits, mc, mbits);
            } else {
                assert_int_equal(img.channels, 1);
                assert_int_equal(img.bits, 16);
                float mx = 0;
                for (size_t i = 0; i < (size_t)img.width * img.height; i++) {
                    float v = img.data[i];
                    if (v != floorf(v) || v < 0) fail_msg("%s: non-integer label %g", path, v);
                    if (v > mx) mx = v;
                }
                if ((int)mx != ncell) fail_msg("%s: max label %g, manifest n_cells %d", path, mx, ncell);
            }
            int pw, ph, pc;
            assert_int_equal(cs_image_probe(path, &pw, &ph, &pc), 0);
            assert_true(pw == img.width && ph == img.height && pc == img.channels);
            cs_image_free(&img);
            checked_files++;
        }
        rows++;
    }
    fclose(f);
    /* Every *_img.png / *_masks.png on disk is in the manifest. */
    int on_disk = 0;
    const char *folders[] = {"dsb2018_stage1_test", "usiigaci_phase", "baby_brightfield", "stardist_example"};
    for (size_t i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", tu_datadir(), folders[i]);
        DIR *d = opendir(path);
        if (!d) fail_msg("cannot open %s", path);
        struct dirent *e;
        while ((e = readdir(d))) {
            size_t n = strlen(e->d_name);
            if ((n > 8 && !strcmp(e->d_name + n - 8, "_img.png")) || (n > 10 && !strcmp(e->d_name + n - 10, "_masks.png")))
                on_disk++;
        }
        closedir(d);
    }
    printf("  real data: %d manifest rows, %d files read and checked, %d files on disk\n", rows, checked_files, on_disk);
    assert_true(rows >= 50);
    assert_int_equal(on_disk, checked_files);
}

/* ------------------------------------------------------------------ writers */

static int tmp_leftovers(void) {
    DIR *d = opendir(tu_tmpdir());
    assert_non_null(d);
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d)))
        if (strstr(e->d_name, ".tmp.")) n++;
    closedir(d);
    return n;
}

static void test_write_labels(void **state) {
    (void)state;
    const int w = 37, h = 21;
    uint32_t *lab = malloc((size_t)w * h * sizeof *lab);
    assert_non_null(lab);
    for (int i = 0; i < w * h; i++) lab[i] = (uint32_t)((i * 997u) % 65536u);
    cs_image img;

    /* PNG16 */
    const char *p = tmp_path("labels.png");
    assert_int_equal(cs_write_labels(p, lab, w, h), 0);
    assert_int_equal(cs_image_read(p, &img), 0);
    assert_true(img.width == w && img.height == h && img.channels == 1 && img.bits == 16);
    for (int i = 0; i < w * h; i++) assert_true(img.data[i] == (float)lab[i]);
    cs_image_free(&img);

    /* TIFF, 16-bit while labels fit. */
    p = tmp_path("labels16.tif");
    assert_int_equal(cs_write_labels(p, lab, w, h), 0);
    assert_int_equal(cs_image_read(p, &img), 0);
    assert_int_equal(img.bits, 16);
    for (int i = 0; i < w * h; i++) assert_true(img.data[i] == (float)lab[i]);
    cs_image_free(&img);

    /* TIFF, 32-bit once a label exceeds 65535; exact through float below 2^24 ... */
    for (int i = 0; i < w * h; i++) lab[i] = (uint32_t)i * 12345u % 16777216u;
    p = tmp_path("labels32.TIFF");
    assert_int_equal(cs_write_labels(p, lab, w, h), 0);
    assert_int_equal(cs_image_read(p, &img), 0);
    assert_int_equal(img.bits, 32);
    for (int i = 0; i < w * h; i++) assert_true(img.data[i] == (float)lab[i]);
    cs_image_free(&img);
    /* ... and bit-exact as stored (checked with libtiff directly, any uint32). */
    lab[5] = 4000000001u;
    assert_int_equal(cs_write_labels(p, lab, w, h), 0);
    TIFF *t = TIFFOpen(p, "r");
    assert_non_null(t);
    uint16_t bps = 0, comp = 0;
    TIFFGetField(t, TIFFTAG_BITSPERSAMPLE, &bps);
    TIFFGetField(t, TIFFTAG_COMPRESSION, &comp);
    assert_int_equal(bps, 32);
    assert_int_equal(comp, COMPRESSION_ADOBE_DEFLATE);
    uint32_t *row = malloc((size_t)TIFFScanlineSize(t));
    for (int y = 0; y < h; y++) {
        assert_int_equal(TIFFReadScanline(t, row, (uint32_t)y, 0), 1);
        assert_memory_equal(row, lab + (size_t)y * w, (size_t)w * 4);
    }
    free(row);
    TIFFClose(t);

    /* npy: int32 normally, uint32 past INT32_MAX. */
    p = tmp_path("labels.npy");
    lab[5] = 7;
    assert_int_equal(cs_write_labels(p, lab, w, h), 0);
    cs_npy a;
    assert_int_equal(cs_npy_load(p, &a), 0);
    assert_int_equal(a.dtype, CS_NPY_I32);
    assert_true(a.ndim == 2 && a.shape[0] == h && a.shape[1] == w);
    assert_memory_equal(a.data, lab, (size_t)w * h * 4);
    cs_npy_free(&a);
    lab[5] = 4000000001u;
    assert_int_equal(cs_write_labels(p, lab, w, h), 0);
    assert_int_equal(cs_npy_load(p, &a), 0);
    assert_int_equal(a.dtype, CS_NPY_U32);
    assert_memory_equal(a.data, lab, (size_t)w * h * 4);
    cs_npy_free(&a);

    /* Labels over 65535 do not fit a PNG: an error that suggests .tif, no file. */
    p = tmp_path("too_many.png");
    expect_error(cs_write_labels(p, lab, w, h), CELLSAM_ERR_LIMIT, ".tif", "PNG with label > 65535");
    assert_int_not_equal(access(p, F_OK), 0);
    expect_error(cs_write_labels(tmp_path("labels.bmp"), lab, w, h), CELLSAM_ERR_INVALID, "extension", "unknown extension");
    expect_error(cs_write_labels(tmp_path("labels.png"), lab, 0, h), CELLSAM_ERR_INVALID, NULL, "zero width");

    /* Failing writes leave neither the final name nor the temporary behind. */
    for (int i = 0; i < w * h; i++) lab[i] = (uint32_t)(i % 50);
    p = tmp_path("no_such_dir/labels.png");
    expect_error(cs_write_labels(p, lab, 3, 3), CELLSAM_ERR_IO, NULL, "write into missing directory");
    assert_int_not_equal(access(p, F_OK), 0);
    p = tmp_path("a_directory.tif");
    assert_int_equal(mkdir(p, 0700), 0);
    char inner[600];
    snprintf(inner, sizeof inner, "%s/keep", p);
    spit(inner, "x", 1); /* non-empty: rename over it must fail */
    expect_error(cs_write_labels(p, lab, w, h), CELLSAM_ERR_IO, NULL, "rename onto a directory (tif)");
    expect_error(cs_write_overlay_png(p, &(cs_image){.width = 2, .height = 1, .channels = 1, .data = (float[2]){0, 1}}, -1, NULL),
                 CELLSAM_ERR_IO, NULL, "rename onto a directory (overlay)");
    struct stat st;
    assert_int_equal(stat(p, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(tmp_leftovers(), 0);
    free(lab);
}

static void test_overlay(void **state) {
    (void)state;
    const int w = 32, h = 32;
    cs_image img = {.width = w, .height = h, .channels = 1, .bits = 16};
    img.data = malloc((size_t)w * h * sizeof(float));
    uint32_t *lab = calloc((size_t)w * h, sizeof *lab);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            img.data[y * w + x] = (float)(100 + x);
            if (x >= 8 && x < 16 && y >= 8 && y < 16) lab[y * w + x] = 5;
            if (x >= 20 && x < 28 && y >= 4 && y < 12) lab[y * w + x] = 70000;
        }
    img.data[0] = NAN; /* non-finite values are ignored by the stretch */
    const char *p = tmp_path("overlay.png");
    if (cs_write_overlay_png(p, &img, -1, lab)) fail_msg("%s", cellsam_last_error());
    cs_image o;
    assert_int_equal(cs_image_read(p, &o), 0);
    assert_true(o.width == w && o.height == h && o.channels == 3 && o.bits == 8);
#define PX(x, y, c) o.data[((y) * w + (x)) * 3 + (c)]
#define GREY(x, y) (PX(x, y, 0) == PX(x, y, 1) && PX(x, y, 1) == PX(x, y, 2))
    /* Background: grey, stretched so the darkest column is black, the brightest white. */
    assert_true(GREY(0, 20) && PX(0, 20, 0) == 0);
    assert_true(GREY(31, 20) && PX(31, 20, 0) == 255);
    assert_true(GREY(15, 20) && PX(15, 20, 0) > PX(14, 20, 0));
    /* Interior of a cell: grey. Outline: coloured, different colours per label. */
    assert_true(GREY(12, 12));
    assert_false(GREY(8, 12));
    assert_false(GREY(15, 15));
    assert_false(GREY(20, 4));
    assert_true(PX(8, 12, 0) != PX(20, 4, 0) || PX(8, 12, 1) != PX(20, 4, 1) || PX(8, 12, 2) != PX(20, 4, 2));
    int outline = 0;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) outline += !GREY(x, y);
    printf("  overlay: %d outline pixels (want %d)\n", outline, 2 * 28);
    assert_int_equal(outline, 2 * 28); /* two 8x8 squares: 28 border pixels each */
    cs_image_free(&o);

    /* RGB and two-channel composites, explicit channel, bad channel. */
    cs_image rgb = {.width = 4, .height = 2, .channels = 3};
    float px[24];
    for (int i = 0; i < 24; i++) px[i] = (float)i;
    rgb.data = px;
    assert_int_equal(cs_write_overlay_png(tmp_path("ov_rgb.png"), &rgb, -1, NULL), 0);
    assert_int_equal(cs_write_overlay_png(tmp_path("ov_c2.png"), &rgb, 2, NULL), 0);
    rgb.channels = 2;
    assert_int_equal(cs_write_overlay_png(tmp_path("ov_2ch.png"), &rgb, -1, NULL), 0);
    assert_int_equal(cs_image_read(tmp_path("ov_2ch.png"), &o), 0);
    /* Channel 0 is green, channel 1 magenta: R == B everywhere. */
    for (int i = 0; i < 8; i++) assert_true(o.data[3 * i] == o.data[3 * i + 2]);
    cs_image_free(&o);
    expect_error(cs_write_overlay_png(tmp_path("ov_bad.png"), &rgb, 2, NULL), CELLSAM_ERR_INVALID, NULL, "overlay bad channel");
    free(img.data);
    free(lab);
}

static void test_model_input(void **state) {
    (void)state;
    float px[2 * 4];
    cs_image img = {.width = 2, .height = 1, .data = px};
    for (int i = 0; i < 8; i++) px[i] = (float)(i + 1);
    float *o;
    /* grey -> whole-cell slot */
    img.channels = 1;
    assert_int_equal(cs_image_to_model_input(&img, 0, 0, CS_CHANNELS_OFFICIAL, &o), 0);
    float g1[6] = {0, 0, 1, 0, 0, 2};
    assert_memory_equal(o, g1, sizeof g1);
    free(o);
    /* two channels -> nuclear, whole-cell */
    img.channels = 2;
    assert_int_equal(cs_image_to_model_input(&img, 0, 0, CS_CHANNELS_OFFICIAL, &o), 0);
    float g2[6] = {0, 1, 2, 0, 3, 4};
    assert_memory_equal(o, g2, sizeof g2);
    free(o);
    /* RGB as is */
    img.channels = 3;
    assert_int_equal(cs_image_to_model_input(&img, 0, 0, CS_CHANNELS_OFFICIAL, &o), 0);
    float g3[6] = {1, 2, 3, 4, 5, 6};
    assert_memory_equal(o, g3, sizeof g3);
    free(o);
    /* RGB collapsed to grey (mean) */
    assert_int_equal(cs_image_to_model_input(&img, 0, 0, CS_CHANNELS_GREY, &o), 0);
    float gg[6] = {0, 0, 2, 0, 0, 5};
    assert_memory_equal(o, gg, sizeof gg);
    free(o);
    /* four channels: must choose; nuclear = 4, cell = 2 */
    img.channels = 4;
    expect_error(cs_image_to_model_input(&img, 0, 0, CS_CHANNELS_OFFICIAL, &o), CELLSAM_ERR_INVALID, "choose", "4 channels, none chosen");
    assert_null(o);
    assert_int_equal(cs_image_to_model_input(&img, 4, 2, CS_CHANNELS_OFFICIAL, &o), 0);
    float g4[6] = {0, 4, 2, 0, 8, 6};
    assert_memory_equal(o, g4, sizeof g4);
    free(o);
    /* nuclear only */
    assert_int_equal(cs_image_to_model_input(&img, 3, 0, CS_CHANNELS_OFFICIAL, &o), 0);
    float g5[6] = {0, 3, 0, 0, 7, 0};
    assert_memory_equal(o, g5, sizeof g5);
    free(o);
    expect_error(cs_image_to_model_input(&img, 5, 0, CS_CHANNELS_OFFICIAL, &o), CELLSAM_ERR_INVALID, NULL, "channel 5 of 4");
    expect_error(cs_image_to_model_input(&img, 1, 0, CS_CHANNELS_GREY, &o), CELLSAM_ERR_INVALID, NULL, "grey + channel");
    expect_error(cs_image_to_model_input(&img, 0, 0, 7, &o), CELLSAM_ERR_INVALID, NULL, "bad mode");
}

/* ------------------------------------------------------------------ hostile input */

static void decode_must_fail(const unsigned char *buf, size_t size, const char *what) {
    cs_image img;
    int rc = cs_image_decode(buf, size, what, &img);
    if (rc == 0) {
        cs_image_free(&img);
        fail_msg("%s: decoded without error", what);
    }
    expect_error(rc, -1, NULL, what);
    assert_null(img.data);
}

/* Patch a SHORT/LONG count-1 entry of the first IFD of a classic little-endian TIFF. */
static void patch_tiff_tag(unsigned char *b, size_t n, uint16_t tag, uint32_t value) {
    assert_true(n > 8 && b[0] == 'I');
    uint32_t ifd = (uint32_t)b[4] | ((uint32_t)b[5] << 8) | ((uint32_t)b[6] << 16) | ((uint32_t)b[7] << 24);
    assert_true(ifd + 2 <= n);
    int count = b[ifd] | (b[ifd + 1] << 8);
    for (int i = 0; i < count; i++) {
        unsigned char *e = b + ifd + 2 + 12 * i;
        assert_true((size_t)(e + 12 - b) <= n);
        if ((e[0] | (e[1] << 8)) != tag) continue;
        int type = e[2] | (e[3] << 8);
        if (type == TIFF_SHORT && value > 65535) { /* widen to LONG (still inline) */
            e[2] = TIFF_LONG;
            e[3] = 0;
            type = TIFF_LONG;
        }
        if (type == TIFF_SHORT) {
            e[8] = (unsigned char)value;
            e[9] = (unsigned char)(value >> 8);
        } else {
            for (int k = 0; k < 4; k++) e[8 + k] = (unsigned char)(value >> (8 * k));
        }
        return;
    }
    fail_msg("tag %u not found", tag);
}

/* Rewrite IHDR width/height and fix the CRC. */
static void patch_png_dims(unsigned char *b, uint32_t w, uint32_t h) {
    for (int k = 0; k < 4; k++) {
        b[16 + k] = (unsigned char)(w >> (24 - 8 * k));
        b[20 + k] = (unsigned char)(h >> (24 - 8 * k));
    }
    uLong crc = crc32(0, b + 12, 17);
    for (int k = 0; k < 4; k++) b[29 + k] = (unsigned char)(crc >> (24 - 8 * k));
}

static void test_hostile(void **state) {
    (void)state;
    cs_image img;
    size_t size;
    unsigned char *buf, *cut;

    /* Truncated PNG (the image is incompressible enough to have a long IDAT). */
    const char *png = tmp_path("png04.png"); /* grey 16-bit from test_png_variants */
    {
        uint16_t s[40 * 30];
        for (int i = 0; i < 40 * 30; i++) s[i] = (uint16_t)((i * 2654435761u) >> 13);
        png = tmp_path("hostile.png");
        write_png_file(png, 40, 30, 16, PNG_COLOR_TYPE_GRAY, 0, s, NULL, 0, NULL, 0);
    }
    buf = slurp(png, &size);
    size_t png_cuts[] = {0, 4, 8, 16, 30, 40, size / 3, size / 2, size - 13, size - 1};
    for (size_t i = 0; i < sizeof png_cuts / sizeof png_cuts[0]; i++) {
        char what[64];
        snprintf(what, sizeof what, "PNG cut at %zu of %zu", png_cuts[i], size);
        cut = malloc(png_cuts[i] + 1);
        memcpy(cut, buf, png_cuts[i]);
        decode_must_fail(cut, png_cuts[i], what);
        free(cut);
    }
    /* Corrupted IDAT byte: CRC mismatch. */
    cut = malloc(size);
    memcpy(cut, buf, size);
    cut[size / 2] ^= 0x55;
    decode_must_fail(cut, size, "PNG corrupted IDAT byte");
    /* Oversized and zero-sized headers. */
    memcpy(cut, buf, size);
    patch_png_dims(cut, 300000, 30);
    cs_image_set_limits(NULL);
    int rc = cs_image_decode(cut, size, "wide.png", &img);
    expect_error(rc, CELLSAM_ERR_LIMIT, "limit", "PNG width 300000");
    patch_png_dims(cut, 40, 0);
    decode_must_fail(cut, size, "PNG height 0");
    patch_png_dims(cut, 0x7fffffff, 0x7fffffff);
    expect_error(cs_image_decode(cut, size, "huge.png", &img), CELLSAM_ERR_LIMIT, NULL, "PNG 2^31-1 square");
    free(cut);
    free(buf);

    /* Truncated TIFF (single uncompressed strip, IFD at the end). */
    tspec s = {.w = 40, .h = 30, .spp = 1, .bps = 16, .fmt = SAMPLEFORMAT_UINT, .rps = 30};
    const char *tif = tmp_path("hostile.tif");
    write_tiff(tif, &s);
    buf = slurp(tif, &size);
    /* (Cutting only the final next-IFD pointer loses nothing: not tested.) */
    size_t tif_cuts[] = {0, 3, 4, 8, 16, size / 2, size - 10, size - 5};
    for (size_t i = 0; i < sizeof tif_cuts / sizeof tif_cuts[0]; i++) {
        char what[64];
        snprintf(what, sizeof what, "TIFF cut at %zu of %zu", tif_cuts[i], size);
        cut = malloc(tif_cuts[i] + 1);
        memcpy(cut, buf, tif_cuts[i]);
        decode_must_fail(cut, tif_cuts[i], what);
        free(cut);
    }
    cut = malloc(size);
    memcpy(cut, buf, size);
    patch_tiff_tag(cut, size, TIFFTAG_STRIPOFFSETS, 0xFFFFFF00u);
    decode_must_fail(cut, size, "TIFF strip beyond end of file");
    memcpy(cut, buf, size);
    patch_tiff_tag(cut, size, TIFFTAG_IMAGEWIDTH, 300000);
    expect_error(cs_image_decode(cut, size, "wide.tif", &img), CELLSAM_ERR_LIMIT, NULL, "TIFF width 300000");
    memcpy(cut, buf, size);
    patch_tiff_tag(cut, size, TIFFTAG_IMAGEWIDTH, 0);
    decode_must_fail(cut, size, "TIFF width 0");
    memcpy(cut, buf, size);
    patch_tiff_tag(cut, size, TIFFTAG_BITSPERSAMPLE, 24);
    decode_must_fail(cut, size, "TIFF 24 bits per sample");
    memcpy(cut, buf, size);
    patch_tiff_tag(cut, size, TIFFTAG_SAMPLESPERPIXEL, 40);
    decode_must_fail(cut, size, "TIFF 40 samples per pixel");
    /* Bytes overwritten through the header and IFD: anything but a crash. */
    unsigned lcg = 12345;
    int failures = 0, trials = 0;
    for (int k = 0; k < 300; k++) {
        memcpy(cut, buf, size);
        for (int j = 0; j < 4; j++) {
            lcg = lcg * 1103515245u + 12345u;
            size_t pos = (lcg >> 8) % size;
            if (k % 2 == 0 && pos > 16 && pos < size - 200) pos = size - 1 - pos % 200; /* aim at the IFD */
            lcg = lcg * 1103515245u + 12345u;
            cut[pos] = (unsigned char)(lcg >> 16);
        }
        if (cs_image_decode(cut, size, "mutated.tif", &img) == 0) {
            assert_true(img.width > 0 && img.height > 0 && img.data);
            cs_image_free(&img);
        } else {
            failures++;
        }
        trials++;
    }
    printf("  mutated TIFFs: %d of %d rejected, none crashed\n", failures, trials);
    free(cut);
    free(buf);

    /* Truncated / corrupted JPEG. */
    const char *jpg = tmp_path("hostile.jpg");
    make_jpeg(jpg, 64, 48, 3, 0, NULL);
    buf = slurp(jpg, &size);
    size_t jpg_cuts[] = {0, 2, 3, 20, 200, size / 2, size - 2};
    for (size_t i = 0; i < sizeof jpg_cuts / sizeof jpg_cuts[0]; i++) {
        char what[64];
        snprintf(what, sizeof what, "JPEG cut at %zu of %zu", jpg_cuts[i], size);
        cut = malloc(jpg_cuts[i] + 1);
        memcpy(cut, buf, jpg_cuts[i]);
        decode_must_fail(cut, jpg_cuts[i], what);
        free(cut);
    }
    cut = malloc(size);
    /* SOF0 with 60000 x 60000: over the sample limit before any decoding. */
    memcpy(cut, buf, size);
    size_t sof = 0;
    for (size_t i = 2; i + 9 < size; i++)
        if (cut[i] == 0xFF && cut[i + 1] == 0xC0) {
            sof = i;
            break;
        }
    assert_true(sof > 0);
    cut[sof + 5] = 0xEA;
    cut[sof + 6] = 0x60;
    cut[sof + 7] = 0xEA;
    cut[sof + 8] = 0x60;
    expect_error(cs_image_decode(cut, size, "huge.jpg", &img), CELLSAM_ERR_LIMIT, NULL, "JPEG 60000x60000");
    for (int k = 0; k < 100; k++) {
        memcpy(cut, buf, size);
        lcg = lcg * 1103515245u + 12345u;
        cut[(lcg >> 8) % size] ^= (unsigned char)(1 + (lcg >> 20) % 255);
        if (cs_image_decode(cut, size, "mutated.jpg", &img) == 0) cs_image_free(&img);
    }
    free(cut);
    free(buf);

    /* Not an image at all. */
    const char text[] = "hello, this is a text file\n";
    expect_error(cs_image_decode((const unsigned char *)text, sizeof text - 1, "a.txt", &img), CELLSAM_ERR_UNSUPPORTED,
                 "unrecognised", "text file");
    const unsigned char gif[] = "GIF89a\x01\x00\x01\x00\x80\x00\x00";
    expect_error(cs_image_decode(gif, sizeof gif - 1, "a.gif", &img), CELLSAM_ERR_UNSUPPORTED, "GIF", "GIF header");
    expect_error(cs_image_decode(gif, 0, "empty", &img), CELLSAM_ERR_FORMAT, "empty", "empty buffer");
    const char *txt = tmp_path("notes.png"); /* extension lies: content decides */
    spit(txt, text, sizeof text - 1);
    expect_error(cs_image_read(txt, &img), CELLSAM_ERR_UNSUPPORTED, "notes.png", "text named .png");
    spit(tmp_path("empty.tif"), "", 0);
    expect_error(cs_image_read(tmp_path("empty.tif"), &img), CELLSAM_ERR_FORMAT, "empty", "empty file");
    expect_error(cs_image_read(tmp_path("does_not_exist.tif"), &img), CELLSAM_ERR_IO, NULL, "missing file");
    expect_error(cs_image_read(tu_tmpdir(), &img), CELLSAM_ERR_IO, NULL, "directory");
    int pw, ph, pc;
    expect_error(cs_image_probe(txt, &pw, &ph, &pc), CELLSAM_ERR_UNSUPPORTED, NULL, "probe text file");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiff_variants),
        cmocka_unit_test(test_tiff_regions),
        cmocka_unit_test(test_ome_tiff),
        cmocka_unit_test(test_tiff_limits_and_stacks),
        cmocka_unit_test(test_tiff_ycbcr_fallback),
        cmocka_unit_test(test_png_variants),
        cmocka_unit_test(test_jpeg),
        cmocka_unit_test(test_npy),
        cmocka_unit_test(test_real_data),
        cmocka_unit_test(test_write_labels),
        cmocka_unit_test(test_overlay),
        cmocka_unit_test(test_model_input),
        cmocka_unit_test(test_hostile),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
