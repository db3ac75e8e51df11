/* Label images read exactly, as 32-bit unsigned ids, for scoring (cellsam eval) and
 * training: libpng / libtiff / .npy directly. cs_image_read (image_io.c) returns float
 * samples (exact only up to 2^24), expands palette PNGs to RGB and turns TIFF pages into
 * channels, none of which suits label images. */
#include <errno.h>
#include <png.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tiffio.h>

#include "common.h"
#include "image_io.h"
#include "npy.h"

#define MAX_LABEL_DIM 65536u
#define MAX_LABEL_PIXELS ((size_t)1 << 28)

typedef struct {
    uint32_t width, height;
    uint32_t *labels; /* row-major, width*height */
} label_image;

static int alloc_labels(label_image *out, uint32_t w, uint32_t h, const char *path) {
    size_t n;
    if (w == 0 || h == 0 || w > MAX_LABEL_DIM || h > MAX_LABEL_DIM || cs_mul_size(w, h, &n) ||
        n > MAX_LABEL_PIXELS)
        return cs_error(CELLSAM_ERR_LIMIT, "%s: size %u x %u is empty or over the limit", path, w, h);
    out->labels = malloc(n * sizeof *out->labels);
    if (!out->labels) return cs_error(CELLSAM_ERR_NOMEM, "%s: out of memory for %u x %u labels", path, w, h);
    out->width = w;
    out->height = h;
    return CELLSAM_OK;
}

typedef struct {
    char msg[256];
} png_error_ctx;

static void png_error_cb(png_structp png, png_const_charp msg) {
    png_error_ctx *ctx = png_get_error_ptr(png);
    snprintf(ctx->msg, sizeof ctx->msg, "%s", msg);
    png_longjmp(png, 1);
}

static void png_warning_cb(png_structp png, png_const_charp msg) {
    (void)png;
    (void)msg;
}

static int read_png_labels(const char *path, FILE *f, label_image *out) {
    png_error_ctx ctx = {{0}};
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &ctx, png_error_cb, png_warning_cb);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!info) {
        png_destroy_read_struct(&png, NULL, NULL);
        return cs_error(CELLSAM_ERR_NOMEM, "%s: out of memory", path);
    }
    /* Modified after setjmp and used by the error path. */
    unsigned char *volatile pixels = NULL;
    png_bytep *volatile rows = NULL;
    uint32_t *volatile labels = NULL;
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_read_struct(&png, &info, NULL);
        free(pixels);
        free(rows);
        free(labels);
        out->labels = NULL;
        return cs_error(CELLSAM_ERR_FORMAT, "%s: bad PNG: %s", path, ctx.msg);
    }
    png_set_user_limits(png, MAX_LABEL_DIM, MAX_LABEL_DIM);
    png_init_io(png, f);
    png_read_info(png, info);
    png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
    int depth = png_get_bit_depth(png, info), color = png_get_color_type(png, info);
    if (color != PNG_COLOR_TYPE_GRAY && color != PNG_COLOR_TYPE_PALETTE) {
        png_destroy_read_struct(&png, &info, NULL);
        return cs_error(CELLSAM_ERR_UNSUPPORTED,
                        "%s: label image must be single-channel (grayscale or palette PNG), not %s", path,
                        color == PNG_COLOR_TYPE_RGB ? "RGB" : color == PNG_COLOR_TYPE_RGBA ? "RGBA" : "gray+alpha");
    }
    /* One byte per pixel for depths < 8, values kept (no scaling, no palette expansion). */
    png_set_packing(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    size_t rowbytes = png_get_rowbytes(png, info), total;
    int rc = alloc_labels(out, w, h, path);
    if (rc || cs_mul_size(rowbytes, h, &total)) {
        png_destroy_read_struct(&png, &info, NULL);
        free(out->labels);
        out->labels = NULL;
        return rc ? rc : cs_error(CELLSAM_ERR_LIMIT, "%s: image too large", path);
    }
    labels = out->labels;
    pixels = malloc(total);
    rows = malloc(h * sizeof *rows);
    if (!pixels || !rows) png_error(png, "out of memory");
    for (png_uint_32 y = 0; y < h; y++) rows[y] = pixels + (size_t)y * rowbytes;
    png_read_image(png, rows);
    for (size_t y = 0; y < h; y++) {
        const unsigned char *r = pixels + y * rowbytes;
        uint32_t *dst = labels + y * w;
        if (depth == 16)
            for (size_t x = 0; x < w; x++) dst[x] = (uint32_t)r[2 * x] << 8 | r[2 * x + 1];
        else
            for (size_t x = 0; x < w; x++) dst[x] = r[x];
    }
    png_destroy_read_struct(&png, &info, NULL);
    free(pixels);
    free(rows);
    return CELLSAM_OK;
}

static char g_tiff_error[256];

static void tiff_error_cb(const char *module, const char *fmt, va_list ap) {
    (void)module;
    vsnprintf(g_tiff_error, sizeof g_tiff_error, fmt, ap);
}

/* One decoded sample -> label, rejecting what cannot be an instance id. */
static int tiff_sample(const unsigned char *p, int bits, int format, uint32_t *out) {
    double v;
    if (format == SAMPLEFORMAT_IEEEFP) {
        if (bits == 32) {
            float f;
            memcpy(&f, p, 4);
            v = f;
        } else {
            memcpy(&v, p, 8);
        }
        if (!(v >= 0 && v <= 4294967295.0) || v != (double)(uint32_t)v) return -1;
        *out = (uint32_t)v;
        return 0;
    }
    int is_signed = format == SAMPLEFORMAT_INT;
    switch (bits) {
    case 8:
        if (is_signed && (int8_t)p[0] < 0) return -1;
        *out = p[0];
        return 0;
    case 16: {
        uint16_t u;
        memcpy(&u, p, 2);
        if (is_signed && (int16_t)u < 0) return -1;
        *out = u;
        return 0;
    }
    case 32: {
        uint32_t u;
        memcpy(&u, p, 4);
        if (is_signed && (int32_t)u < 0) return -1;
        *out = u;
        return 0;
    }
    }
    return -1;
}

static int read_tiff_labels(const char *path, label_image *out) {
    TIFFSetErrorHandler(tiff_error_cb);
    TIFFSetWarningHandler(NULL);
    g_tiff_error[0] = '\0';
    TIFF *tif = TIFFOpen(path, "r");
    if (!tif) return cs_error(CELLSAM_ERR_FORMAT, "%s: bad TIFF: %s", path, g_tiff_error);
    uint32_t w = 0, h = 0;
    uint16_t spp = 1, bits = 1, format = SAMPLEFORMAT_UINT;
    TIFFGetField(tif, TIFFTAG_IMAGEWIDTH, &w);
    TIFFGetField(tif, TIFFTAG_IMAGELENGTH, &h);
    TIFFGetFieldDefaulted(tif, TIFFTAG_SAMPLESPERPIXEL, &spp);
    TIFFGetFieldDefaulted(tif, TIFFTAG_BITSPERSAMPLE, &bits);
    TIFFGetFieldDefaulted(tif, TIFFTAG_SAMPLEFORMAT, &format);
    int rc = CELLSAM_OK;
    unsigned char *buf = NULL;
    if (spp != 1)
        rc = cs_error(CELLSAM_ERR_UNSUPPORTED, "%s: label image must have one sample per pixel, has %u", path,
                      (unsigned)spp);
    else if (!((format == SAMPLEFORMAT_UINT || format == SAMPLEFORMAT_INT) && (bits == 8 || bits == 16 || bits == 32)) &&
             !(format == SAMPLEFORMAT_IEEEFP && (bits == 32 || bits == 64)))
        rc = cs_error(CELLSAM_ERR_UNSUPPORTED, "%s: unsupported TIFF sample type (%u-bit, format %u)", path,
                      (unsigned)bits, (unsigned)format);
    else if (TIFFNumberOfDirectories(tif) > 1)
        rc = cs_error(CELLSAM_ERR_UNSUPPORTED, "%s: multi-page TIFF (%u pages); a label image has one", path,
                      (unsigned)TIFFNumberOfDirectories(tif));
    else
        rc = alloc_labels(out, w, h, path);
    size_t bps = bits / 8;
    if (!rc && TIFFIsTiled(tif)) {
        uint32_t tw = 0, th = 0;
        TIFFGetField(tif, TIFFTAG_TILEWIDTH, &tw);
        TIFFGetField(tif, TIFFTAG_TILELENGTH, &th);
        tmsize_t tsize = TIFFTileSize(tif);
        size_t need;
        if (tw == 0 || th == 0 || tsize <= 0 || cs_mul_size((size_t)tw * th, bps, &need) || (size_t)tsize < need)
            rc = cs_error(CELLSAM_ERR_FORMAT, "%s: bad TIFF tile size", path);
        else if (!(buf = malloc((size_t)tsize)))
            rc = cs_error(CELLSAM_ERR_NOMEM, "%s: out of memory", path);
        for (uint32_t ty = 0; !rc && ty < h; ty += th)
            for (uint32_t tx = 0; !rc && tx < w; tx += tw) {
                if (TIFFReadTile(tif, buf, tx, ty, 0, 0) < 0) {
                    rc = cs_error(CELLSAM_ERR_FORMAT, "%s: cannot read tile: %s", path, g_tiff_error);
                    break;
                }
                for (uint32_t y = ty; !rc && y < ty + th && y < h; y++)
                    for (uint32_t x = tx; x < tx + tw && x < w; x++)
                        if (tiff_sample(buf + ((size_t)(y - ty) * tw + (x - tx)) * bps, bits, format,
                                        &out->labels[(size_t)y * w + x])) {
                            rc = cs_error(CELLSAM_ERR_FORMAT, "%s: pixel (%u, %u) is not a label (negative or non-integer)",
                                          path, x, y);
                            break;
                        }
            }
    } else if (!rc) {
        tmsize_t lsize = TIFFScanlineSize(tif);
        if (lsize <= 0 || (size_t)lsize < (size_t)w * bps)
            rc = cs_error(CELLSAM_ERR_FORMAT, "%s: bad TIFF scanline size", path);
        else if (!(buf = malloc((size_t)lsize)))
            rc = cs_error(CELLSAM_ERR_NOMEM, "%s: out of memory", path);
        for (uint32_t y = 0; !rc && y < h; y++) {
            if (TIFFReadScanline(tif, buf, y, 0) < 0) {
                rc = cs_error(CELLSAM_ERR_FORMAT, "%s: cannot read row %u: %s", path, y, g_tiff_error);
                break;
            }
            for (uint32_t x = 0; x < w; x++)
                if (tiff_sample(buf + (size_t)x * bps, bits, format, &out->labels[(size_t)y * w + x])) {
                    rc = cs_error(CELLSAM_ERR_FORMAT, "%s: pixel (%u, %u) is not a label (negative or non-integer)",
                                  path, x, y);
                    break;
                }
        }
    }
    free(buf);
    TIFFClose(tif);
    if (rc) {
        free(out->labels);
        out->labels = NULL;
    }
    return rc;
}

/* (H, W) array, or (H, W, 1) / (1, H, W), of integers or integral floats. */
static int read_npy_labels(const char *path, label_image *out) {
    cs_npy a;
    int rc = cs_npy_load(path, &a);
    if (rc) return rc;
    int64_t h = -1, w = -1;
    if (a.ndim == 2) {
        h = a.shape[0];
        w = a.shape[1];
    } else if (a.ndim == 3 && a.shape[2] == 1) {
        h = a.shape[0];
        w = a.shape[1];
    } else if (a.ndim == 3 && a.shape[0] == 1) {
        h = a.shape[1];
        w = a.shape[2];
    }
    if (h < 0)
        rc = cs_error(CELLSAM_ERR_UNSUPPORTED, "%s: label array must be (H, W), has %d dimensions", path, a.ndim);
    else if (h > MAX_LABEL_DIM || w > MAX_LABEL_DIM)
        rc = cs_error(CELLSAM_ERR_LIMIT, "%s: size %lld x %lld over the limit", path, (long long)w, (long long)h);
    else
        rc = alloc_labels(out, (uint32_t)w, (uint32_t)h, path);
    for (size_t i = 0; !rc && i < a.count; i++) {
        double v = cs_npy_get(&a, i);
        if (!(v >= 0 && v <= 4294967295.0) || v != (double)(uint32_t)v) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "%s: element %zu (%g) is not a label (negative or non-integer)", path,
                          i, v);
            free(out->labels);
            out->labels = NULL;
            break;
        }
        out->labels[i] = (uint32_t)v;
    }
    cs_npy_free(&a);
    return rc;
}

/* Format by signature, not by extension. */
static int read_labels(const char *path, label_image *out) {
    memset(out, 0, sizeof *out);
    FILE *f = fopen(path, "rb");
    if (!f) return cs_error(CELLSAM_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    unsigned char magic[8] = {0};
    size_t got = fread(magic, 1, sizeof magic, f);
    int rc;
    if (got == 8 && !png_sig_cmp(magic, 0, 8)) {
        rewind(f);
        rc = read_png_labels(path, f, out);
        fclose(f);
    } else if (got >= 4 && ((magic[0] == 'I' && magic[1] == 'I') || (magic[0] == 'M' && magic[1] == 'M'))) {
        fclose(f);
        rc = read_tiff_labels(path, out);
    } else if (got >= 6 && !memcmp(magic, "\x93NUMPY", 6)) {
        fclose(f);
        rc = read_npy_labels(path, out);
    } else {
        fclose(f);
        rc = cs_error(CELLSAM_ERR_FORMAT, "%s: not a PNG, TIFF or .npy label image", path);
    }
    return rc;
}

int cs_read_labels(const char *path, uint32_t **labels, int *width, int *height) {
    *labels = NULL;
    *width = *height = 0;
    label_image li;
    int rc = read_labels(path, &li);
    if (rc) return rc;
    *labels = li.labels;
    *width = (int)li.width;
    *height = (int)li.height;
    return CELLSAM_OK;
}
