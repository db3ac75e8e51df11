/* Streaming label-image writer: rows arrive in order (from the tiled pipeline) and
 * go straight to the file, so a whole-slide label image is never held in memory.
 * .tif/.tiff: 32-bit unsigned, deflate, one strip per 64 rows; .png: 16-bit grey
 * (error once a label exceeds 65535); .npy: uint32. Written to a temporary name
 * and renamed on close, so an interrupted run leaves nothing under the final name. */
#include <png.h>
#include <setjmp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <tiffio.h>
#include <unistd.h>

#include "common.h"
#include "image_io.h"
#include "npy.h"

enum { LS_TIFF, LS_PNG, LS_NPY };

struct cs_label_stream {
    int kind, width, height, rows_done;
    char *final_path, *tmp_path;
    TIFF *tif;
    FILE *f;
    png_structp png;
    png_infop info;
    uint16_t *row16;
};

static int ext_is(const char *path, const char *ext) {
    size_t a = strlen(path), b = strlen(ext);
    return a >= b && !strcasecmp(path + a - b, ext);
}

int cs_label_stream_open(const char *path, int width, int height, cs_label_stream **out) {
    *out = NULL;
    if (width < 1 || height < 1) return cs_error(CELLSAM_ERR_INVALID, "label image has zero size");
    cs_label_stream *s = calloc(1, sizeof *s);
    if (!s) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    s->width = width;
    s->height = height;
    if (ext_is(path, ".tif") || ext_is(path, ".tiff")) s->kind = LS_TIFF;
    else if (ext_is(path, ".png")) s->kind = LS_PNG;
    else if (ext_is(path, ".npy")) s->kind = LS_NPY;
    else {
        free(s);
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "%s: label output must be .tif, .png or .npy", path);
    }
    size_t n = strlen(path);
    s->final_path = strdup(path);
    s->tmp_path = malloc(n + 32);
    if (!s->final_path || !s->tmp_path) {
        cs_label_stream_abort(s);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    snprintf(s->tmp_path, n + 32, "%s.tmp.%ld", path, (long)getpid());
    if (s->kind == LS_TIFF) {
        s->tif = TIFFOpen(s->tmp_path, (uint64_t)width * height * 4 > 0xF0000000u ? "w8" : "w");
        if (!s->tif) {
            cs_label_stream_abort(s);
            return cs_error(CELLSAM_ERR_IO, "cannot create %s", path);
        }
        TIFFSetField(s->tif, TIFFTAG_IMAGEWIDTH, (uint32_t)width);
        TIFFSetField(s->tif, TIFFTAG_IMAGELENGTH, (uint32_t)height);
        TIFFSetField(s->tif, TIFFTAG_BITSPERSAMPLE, 32);
        TIFFSetField(s->tif, TIFFTAG_SAMPLESPERPIXEL, 1);
        TIFFSetField(s->tif, TIFFTAG_SAMPLEFORMAT, SAMPLEFORMAT_UINT);
        TIFFSetField(s->tif, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_MINISBLACK);
        TIFFSetField(s->tif, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG);
        TIFFSetField(s->tif, TIFFTAG_COMPRESSION, COMPRESSION_ADOBE_DEFLATE);
        TIFFSetField(s->tif, TIFFTAG_ROWSPERSTRIP, 64);
        return (*out = s), CELLSAM_OK;
    }
    s->f = fopen(s->tmp_path, "wb");
    if (!s->f) {
        cs_label_stream_abort(s);
        return cs_error(CELLSAM_ERR_IO, "cannot create %s", path);
    }
    if (s->kind == LS_NPY) {
        char hdr[128];
        int hl = snprintf(hdr, sizeof hdr, "{'descr': '<u4', 'fortran_order': False, 'shape': (%d, %d), }", height, width);
        size_t total = 10 + (size_t)hl + 1, pad = (64 - total % 64) % 64;
        unsigned short len = (unsigned short)(hl + pad + 1);
        unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(len & 0xff), (unsigned char)(len >> 8)};
        fwrite(pre, 1, 10, s->f);
        fwrite(hdr, 1, (size_t)hl, s->f);
        for (size_t i = 0; i < pad; i++) fputc(' ', s->f);
        fputc('\n', s->f);
        return (*out = s), CELLSAM_OK;
    }
    s->row16 = malloc((size_t)width * 2);
    s->png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    s->info = s->png ? png_create_info_struct(s->png) : NULL;
    if (!s->row16 || !s->info) {
        cs_label_stream_abort(s);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    if (setjmp(png_jmpbuf(s->png))) {
        cs_label_stream_abort(s);
        return cs_error(CELLSAM_ERR_IO, "%s: PNG write failed", path);
    }
    png_init_io(s->png, s->f);
    png_set_IHDR(s->png, s->info, (png_uint_32)width, (png_uint_32)height, 16, PNG_COLOR_TYPE_GRAY,
                 PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(s->png, s->info);
    png_set_swap(s->png); /* our rows are little-endian uint16 */
    *out = s;
    return CELLSAM_OK;
}

int cs_label_stream_write(cs_label_stream *s, const uint32_t *rows, int n_rows) {
    if (n_rows < 0 || s->rows_done + n_rows > s->height)
        return cs_error(CELLSAM_ERR_INVALID, "label stream: more rows than the image has");
    for (int r = 0; r < n_rows; r++) {
        const uint32_t *row = rows + (size_t)r * s->width;
        if (s->kind == LS_TIFF) {
            if (TIFFWriteScanline(s->tif, (void *)row, (uint32_t)s->rows_done, 0) < 0)
                return cs_error(CELLSAM_ERR_IO, "%s: TIFF write failed", s->final_path);
        } else if (s->kind == LS_NPY) {
            if (fwrite(row, 4, (size_t)s->width, s->f) != (size_t)s->width)
                return cs_error(CELLSAM_ERR_IO, "%s: write failed", s->final_path);
        } else {
            for (int x = 0; x < s->width; x++) {
                if (row[x] > 65535)
                    return cs_error(CELLSAM_ERR_LIMIT, "%s: label %u exceeds 65535: write a .tif instead",
                                    s->final_path, row[x]);
                s->row16[x] = (uint16_t)row[x];
            }
            if (setjmp(png_jmpbuf(s->png))) return cs_error(CELLSAM_ERR_IO, "%s: PNG write failed", s->final_path);
            png_write_row(s->png, (png_const_bytep)s->row16);
        }
        s->rows_done++;
    }
    return CELLSAM_OK;
}

static int png_finish(cs_label_stream *s) {
    if (setjmp(png_jmpbuf(s->png))) return cs_error(CELLSAM_ERR_IO, "%s: PNG write failed", s->final_path);
    png_write_end(s->png, NULL);
    return CELLSAM_OK;
}

int cs_label_stream_close(cs_label_stream *s) {
    int rc = CELLSAM_OK;
    if (s->rows_done != s->height) {
        rc = cs_error(CELLSAM_ERR_INVALID, "%s: only %d of %d rows written", s->final_path, s->rows_done, s->height);
        cs_label_stream_abort(s);
        return rc;
    }
    if (s->kind == LS_TIFF) {
        TIFFClose(s->tif);
        s->tif = NULL;
    } else {
        if (s->kind == LS_PNG) rc = png_finish(s);
        if (ferror(s->f)) rc = cs_error(CELLSAM_ERR_IO, "%s: write failed", s->final_path);
        if (fclose(s->f) != 0 && !rc) rc = cs_error(CELLSAM_ERR_IO, "%s: write failed", s->final_path);
        s->f = NULL;
    }
    if (!rc && rename(s->tmp_path, s->final_path) != 0) rc = cs_error(CELLSAM_ERR_IO, "cannot rename to %s", s->final_path);
    if (rc) unlink(s->tmp_path);
    if (s->png) png_destroy_write_struct(&s->png, &s->info);
    free(s->row16);
    free(s->final_path);
    free(s->tmp_path);
    free(s);
    return rc;
}

void cs_label_stream_abort(cs_label_stream *s) {
    if (!s) return;
    if (s->tif) TIFFClose(s->tif);
    if (s->f) fclose(s->f);
    if (s->tmp_path) unlink(s->tmp_path);
    if (s->png) png_destroy_write_struct(&s->png, s->info ? &s->info : NULL);
    free(s->row16);
    free(s->final_path);
    free(s->tmp_path);
    free(s);
}
