/* Image readers (TIFF, PNG, JPEG, .npy) and writers (label images, overlays).
 * See image_io.h for the channel conventions. Hostile input is expected: every
 * size is checked against cs_image_limits before allocating, libpng/libjpeg errors
 * longjmp back into the decoder, libtiff errors are captured per handle. */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>
#include <tiffio.h>

#include "common.h"
#include "image_io.h"
#include "npy.h"

/* ------------------------------------------------------------------ limits */

static cs_image_limits g_limits = {200000, (uint64_t)1 << 32, (size_t)1 << 30};

/* Whole non-TIFF files are read into memory; this caps that read. */
#define CS_IMAGE_MAX_FILE_BYTES ((size_t)4 << 30)
/* Progressive JPEGs can hold thousands of tiny scans (a known CPU sink). */
#define CS_JPEG_MAX_SCANS 500
/* Pages scanned when deciding whether a multi-page TIFF is a channel stack. */
#define CS_TIFF_MAX_PAGES_SCANNED 256

cs_image_limits cs_image_default_limits(void) {
    cs_image_limits l = {200000, (uint64_t)1 << 32, (size_t)1 << 30};
    return l;
}

cs_image_limits cs_image_get_limits(void) { return g_limits; }

void cs_image_set_limits(const cs_image_limits *limits) {
    g_limits = limits ? *limits : cs_image_default_limits();
}

void cs_image_free(cs_image *img) {
    if (!img) return;
    cs_free(img->data);
    memset(img, 0, sizeof *img);
}

/* Size check shared by every format, before any pixel allocation. */
static int check_dims(uint64_t w, uint64_t h, uint64_t c) {
    if (w == 0 || h == 0)
        return cs_error(CELLSAM_ERR_FORMAT, "image has zero size (%llux%llu)",
                        (unsigned long long)w, (unsigned long long)h);
    if (w > (uint64_t)g_limits.max_dim || h > (uint64_t)g_limits.max_dim)
        return cs_error(CELLSAM_ERR_LIMIT, "image is %llux%llu pixels, over the limit of %d per side",
                        (unsigned long long)w, (unsigned long long)h, g_limits.max_dim);
    if (c == 0 || c > CS_IMAGE_MAX_CHANNELS)
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "image has %llu channels (1 to %d supported)",
                        (unsigned long long)c, CS_IMAGE_MAX_CHANNELS);
    /* w, h <= INT_MAX and c <= 16: the product cannot overflow 64 bits. */
    uint64_t n = w * h * c;
    if (n > g_limits.max_samples || n > SIZE_MAX / sizeof(float))
        return cs_error(CELLSAM_ERR_LIMIT, "image has %llu samples, over the limit of %llu",
                        (unsigned long long)n, (unsigned long long)g_limits.max_samples);
    return CELLSAM_OK;
}

static int image_alloc(cs_image *img, int w, int h, int c, int bits, int is_float) {
    memset(img, 0, sizeof *img);
    int rc = check_dims((uint64_t)w, (uint64_t)h, (uint64_t)c);
    if (rc) return rc;
    img->data = cs_alloc((size_t)w * (size_t)h * (size_t)c, sizeof(float));
    if (!img->data) return CELLSAM_ERR_NOMEM;
    img->width = w;
    img->height = h;
    img->channels = c;
    img->bits = bits;
    img->is_float = is_float;
    return CELLSAM_OK;
}

static int crop_image(const cs_image *src, int x, int y, int w, int h, cs_image *dst) {
    int rc = image_alloc(dst, w, h, src->channels, src->bits, src->is_float);
    if (rc) return rc;
    size_t rowlen = (size_t)w * (size_t)src->channels;
    for (int r = 0; r < h; r++)
        memcpy(dst->data + (size_t)r * rowlen,
               src->data + ((size_t)(y + r) * (size_t)src->width + (size_t)x) * (size_t)src->channels,
               rowlen * sizeof(float));
    return CELLSAM_OK;
}

/* ------------------------------------------------------------------ formats */

typedef enum { FMT_UNKNOWN, FMT_TIFF, FMT_PNG, FMT_JPEG, FMT_NPY } image_format;

static image_format detect_format(const unsigned char *b, size_t n, const char **why) {
    *why = NULL;
    if (n >= 4 && ((b[0] == 'I' && b[1] == 'I' && (b[2] == 42 || b[2] == 43) && b[3] == 0) ||
                   (b[0] == 'M' && b[1] == 'M' && b[2] == 0 && (b[3] == 42 || b[3] == 43))))
        return FMT_TIFF;
    if (n >= 8 && memcmp(b, "\x89PNG\r\n\x1a\n", 8) == 0) return FMT_PNG;
    if (n >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF) return FMT_JPEG;
    if (n >= 6 && memcmp(b, "\x93NUMPY", 6) == 0) return FMT_NPY;
    if (n >= 4 && memcmp(b, "GIF8", 4) == 0) *why = "GIF";
    else if (n >= 2 && b[0] == 'B' && b[1] == 'M') *why = "BMP";
    else if (n >= 4 && memcmp(b, "PK\x03\x04", 4) == 0) *why = "ZIP (.npz?)";
    else if (n >= 12 && memcmp(b, "RIFF", 4) == 0 && memcmp(b + 8, "WEBP", 4) == 0) *why = "WebP";
    else if (n >= 8 && memcmp(b, "\x89HDF\r\n\x1a\n", 8) == 0) *why = "HDF5";
    return FMT_UNKNOWN;
}

static int unknown_format_error(const char *why, size_t n) {
    if (n == 0) return cs_error(CELLSAM_ERR_FORMAT, "empty file");
    if (why)
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "%s images are not supported (use TIFF, PNG, JPEG or .npy)", why);
    return cs_error(CELLSAM_ERR_UNSUPPORTED, "unrecognised image format (not TIFF, PNG, JPEG or .npy)");
}

/* ------------------------------------------------------------------ PNG read */

typedef struct {
    const unsigned char *buf;
    size_t size, pos;
    png_structp png;
    png_infop info;
    char msg[200];
    unsigned char *pixels;   /* whole image (interlaced files only) */
    unsigned char **rows;
    unsigned char *rowbuf;
    cs_image img;
} png_read_ctx;

static void png_error_fn(png_structp png, png_const_charp msg) {
    char *dst = png_get_error_ptr(png);
    snprintf(dst, 200, "%s", msg);
    png_longjmp(png, 1);
}

static void png_warning_fn(png_structp png, png_const_charp msg) { (void)png; (void)msg; }

static void png_mem_read(png_structp png, png_bytep out, size_t len) {
    png_read_ctx *c = png_get_io_ptr(png);
    if (len > c->size - c->pos) png_error(png, "data truncated");
    memcpy(out, c->buf + c->pos, len);
    c->pos += len;
}

/* One decoded row (8 or 16 bits per sample, big-endian) into floats; alpha
 * (the last sample of 2 or 4) is skipped. */
static void png_convert_row(const unsigned char *src, int w, int ch_in, int ch_out, int bd, float *dst) {
    for (int x = 0; x < w; x++)
        for (int c = 0; c < ch_out; c++) {
            size_t i = (size_t)x * (size_t)ch_in + (size_t)c;
            dst[(size_t)x * (size_t)ch_out + (size_t)c] =
                bd == 16 ? (float)((src[2 * i] << 8) | src[2 * i + 1]) : (float)src[i];
        }
}

static int png_decode_inner(png_read_ctx *c) {
    if (setjmp(png_jmpbuf(c->png))) return cs_error(CELLSAM_ERR_FORMAT, "PNG: %s", c->msg);
    png_set_read_fn(c->png, c, png_mem_read);
    /* Our own size check (below) gives the clearer message; libpng's is a backstop. */
    png_set_user_limits(c->png, 0x7fffffff, 0x7fffffff);
    png_set_chunk_malloc_max(c->png, g_limits.max_codec_alloc < ((size_t)64 << 20) ? g_limits.max_codec_alloc : ((size_t)64 << 20));
    png_set_benign_errors(c->png, 1);
    png_read_info(c->png, c->info);
    png_uint_32 w, h;
    int bd, color, interlace;
    png_get_IHDR(c->png, c->info, &w, &h, &bd, &color, &interlace, NULL, NULL);
    int ch_file = (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) ? 1 : 3;
    int rc = check_dims(w, h, (uint64_t)ch_file);
    if (rc) return rc;
    if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(c->png);
    if (bd < 8 && color != PNG_COLOR_TYPE_PALETTE) png_set_packing(c->png); /* raw values 0..2^bd-1 */
    png_set_strip_alpha(c->png);
    int passes = png_set_interlace_handling(c->png);
    png_read_update_info(c->png, c->info);
    int ch_in = png_get_channels(c->png, c->info);
    int bd_out = png_get_bit_depth(c->png, c->info);
    size_t rowbytes = png_get_rowbytes(c->png, c->info);
    if (ch_in < 1 || ch_in > 4 || (bd_out != 8 && bd_out != 16) ||
        rowbytes < (size_t)w * (size_t)ch_in * (size_t)(bd_out / 8))
        return cs_error(CELLSAM_ERR_FORMAT, "PNG: unexpected layout after transforms");
    int ch_out = (ch_in == 2) ? 1 : (ch_in == 4 ? 3 : ch_in);
    rc = image_alloc(&c->img, (int)w, (int)h, ch_out, color == PNG_COLOR_TYPE_PALETTE ? 8 : bd, 0);
    if (rc) return rc;
    size_t out_row = (size_t)w * (size_t)ch_out;
    if (passes > 1) {
        size_t total;
        if (cs_mul_size(rowbytes, h, &total)) return cs_error(CELLSAM_ERR_LIMIT, "PNG too large");
        c->pixels = cs_alloc(total, 1);
        c->rows = cs_alloc(h, sizeof *c->rows);
        if (!c->pixels || !c->rows) return CELLSAM_ERR_NOMEM;
        for (png_uint_32 y = 0; y < h; y++) c->rows[y] = c->pixels + (size_t)y * rowbytes;
        png_read_image(c->png, c->rows);
        for (png_uint_32 y = 0; y < h; y++)
            png_convert_row(c->rows[y], (int)w, ch_in, ch_out, bd_out, c->img.data + (size_t)y * out_row);
    } else {
        c->rowbuf = cs_alloc(rowbytes, 1);
        if (!c->rowbuf) return CELLSAM_ERR_NOMEM;
        for (png_uint_32 y = 0; y < h; y++) {
            png_read_row(c->png, c->rowbuf, NULL);
            png_convert_row(c->rowbuf, (int)w, ch_in, ch_out, bd_out, c->img.data + (size_t)y * out_row);
        }
    }
    /* Reading to IEND catches truncation and CRC damage after the last row. */
    png_read_end(c->png, NULL);
    return CELLSAM_OK;
}

static int decode_png(const unsigned char *buf, size_t size, cs_image *out) {
    png_read_ctx c;
    memset(&c, 0, sizeof c);
    c.buf = buf;
    c.size = size;
    c.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, c.msg, png_error_fn, png_warning_fn);
    if (!c.png) return cs_error(CELLSAM_ERR_NOMEM, "out of memory (libpng)");
    c.info = png_create_info_struct(c.png);
    if (!c.info) {
        png_destroy_read_struct(&c.png, NULL, NULL);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory (libpng)");
    }
    int rc = png_decode_inner(&c);
    png_destroy_read_struct(&c.png, &c.info, NULL);
    cs_free(c.pixels);
    cs_free(c.rows);
    cs_free(c.rowbuf);
    if (rc) {
        cs_image_free(&c.img);
        return rc;
    }
    *out = c.img;
    return CELLSAM_OK;
}

/* IHDR is always the first chunk: width, height and colour type without libpng. */
static int probe_png_header(const unsigned char *b, size_t n, int *w, int *h, int *c) {
    if (n < 33 || memcmp(b + 12, "IHDR", 4) != 0) return cs_error(CELLSAM_ERR_FORMAT, "PNG: missing IHDR");
    uint32_t pw = ((uint32_t)b[16] << 24) | ((uint32_t)b[17] << 16) | ((uint32_t)b[18] << 8) | b[19];
    uint32_t ph = ((uint32_t)b[20] << 24) | ((uint32_t)b[21] << 16) | ((uint32_t)b[22] << 8) | b[23];
    int color = b[25];
    int ch;
    switch (color) {
    case 0: case 4: ch = 1; break;
    case 2: case 3: case 6: ch = 3; break;
    default: return cs_error(CELLSAM_ERR_FORMAT, "PNG: bad colour type %d", color);
    }
    int rc = check_dims(pw, ph, (uint64_t)ch);
    if (rc) return rc;
    *w = (int)pw;
    *h = (int)ph;
    *c = ch;
    return CELLSAM_OK;
}

/* ------------------------------------------------------------------ JPEG read */

typedef struct {
    struct jpeg_error_mgr pub; /* first: libjpeg hands us a pointer to it */
    jmp_buf jb;
    char msg[JMSG_LENGTH_MAX];
    struct jpeg_progress_mgr progress;
    struct jpeg_decompress_struct cinfo;
    int created;
    unsigned char *row;
    cs_image img;
} jpeg_read_ctx;

static void jpeg_error_exit_fn(j_common_ptr cinfo) {
    jpeg_read_ctx *c = (jpeg_read_ctx *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, c->msg);
    longjmp(c->jb, 1);
}

static void jpeg_emit_message_fn(j_common_ptr cinfo, int level) {
    if (level >= 0) return; /* trace messages */
    jpeg_read_ctx *c = (jpeg_read_ctx *)cinfo->err;
    /* libjpeg pads a truncated stream with grey and only warns; a cut file is an
     * error for us, and stopping here also bounds the work on tiny hostile files. */
    if (cinfo->err->msg_code == JWRN_JPEG_EOF) {
        snprintf(c->msg, sizeof c->msg, "data truncated");
        longjmp(c->jb, 1);
    }
    cinfo->err->num_warnings++;
}

static void jpeg_output_message_fn(j_common_ptr cinfo) { (void)cinfo; }

static void jpeg_progress_fn(j_common_ptr cinfo) {
    j_decompress_ptr d = (j_decompress_ptr)cinfo;
    if (d->input_scan_number > CS_JPEG_MAX_SCANS) {
        jpeg_read_ctx *c = (jpeg_read_ctx *)cinfo->err;
        snprintf(c->msg, sizeof c->msg, "JPEG has more than %d scans", CS_JPEG_MAX_SCANS);
        longjmp(c->jb, 1);
    }
}

static int jpeg_decode_inner(jpeg_read_ctx *c, const unsigned char *buf, size_t size, int header_only,
                             int *pw, int *ph, int *pc) {
    if (setjmp(c->jb)) return cs_error(CELLSAM_ERR_FORMAT, "JPEG: %s", c->msg);
    jpeg_create_decompress(&c->cinfo);
    c->created = 1;
    c->cinfo.mem->max_memory_to_use = (long)(g_limits.max_codec_alloc > LONG_MAX ? LONG_MAX : g_limits.max_codec_alloc);
    c->progress.progress_monitor = jpeg_progress_fn;
    c->cinfo.progress = &c->progress;
    jpeg_mem_src(&c->cinfo, buf, (unsigned long)size);
    if (jpeg_read_header(&c->cinfo, TRUE) != JPEG_HEADER_OK)
        return cs_error(CELLSAM_ERR_FORMAT, "JPEG: no image in the stream");
    int ch;
    switch (c->cinfo.jpeg_color_space) {
    case JCS_GRAYSCALE: c->cinfo.out_color_space = JCS_GRAYSCALE; ch = 1; break;
    case JCS_CMYK: case JCS_YCCK: c->cinfo.out_color_space = JCS_CMYK; ch = 4; break;
    default: c->cinfo.out_color_space = JCS_RGB; ch = 3; break;
    }
    int rc = check_dims(c->cinfo.image_width, c->cinfo.image_height, (uint64_t)ch);
    if (rc) return rc;
    if (header_only) {
        *pw = (int)c->cinfo.image_width;
        *ph = (int)c->cinfo.image_height;
        *pc = ch;
        return CELLSAM_OK;
    }
    jpeg_start_decompress(&c->cinfo);
    int w = (int)c->cinfo.output_width, h = (int)c->cinfo.output_height;
    int oc = c->cinfo.output_components;
    if (oc != ch || w != (int)c->cinfo.image_width || h != (int)c->cinfo.image_height)
        return cs_error(CELLSAM_ERR_FORMAT, "JPEG: unexpected output layout");
    rc = image_alloc(&c->img, w, h, ch, 8, 0);
    if (rc) return rc;
    c->row = cs_alloc((size_t)w, (size_t)ch);
    if (!c->row) return CELLSAM_ERR_NOMEM;
    size_t rowlen = (size_t)w * (size_t)ch;
    while (c->cinfo.output_scanline < c->cinfo.output_height) {
        size_t y = c->cinfo.output_scanline;
        JSAMPROW rows[1] = {c->row};
        if (jpeg_read_scanlines(&c->cinfo, rows, 1) != 1)
            return cs_error(CELLSAM_ERR_FORMAT, "JPEG: decoding stalled");
        float *dst = c->img.data + y * rowlen;
        for (size_t i = 0; i < rowlen; i++) dst[i] = (float)c->row[i];
    }
    jpeg_finish_decompress(&c->cinfo);
    return CELLSAM_OK;
}

static int decode_jpeg(const unsigned char *buf, size_t size, int header_only, cs_image *out,
                       int *w, int *h, int *ch) {
    jpeg_read_ctx *c = calloc(1, sizeof *c);
    if (!c) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    c->cinfo.err = jpeg_std_error(&c->pub);
    c->pub.error_exit = jpeg_error_exit_fn;
    c->pub.emit_message = jpeg_emit_message_fn;
    c->pub.output_message = jpeg_output_message_fn;
    int rc = jpeg_decode_inner(c, buf, size, header_only, w, h, ch);
    if (c->created) jpeg_destroy_decompress(&c->cinfo);
    cs_free(c->row);
    if (rc) cs_image_free(&c->img);
    else if (out) *out = c->img;
    else cs_image_free(&c->img);
    free(c);
    return rc;
}

/* ------------------------------------------------------------------ .npy read */

/* Just the shape from the header (probe, and a size check before cs_npy_parse
 * copies the data). */
static int npy_peek_shape(const unsigned char *b, size_t n, int *ndim, int64_t shape[8]) {
    cs_npy meta;
    size_t doff;
    int rc = cs_npy_parse_header(b, n, &meta, &doff);
    if (rc) return rc;
    *ndim = meta.ndim;
    memcpy(shape, meta.shape, sizeof meta.shape);
    return CELLSAM_OK;
}

static int npy_layout(int ndim, const int64_t *shape, int64_t *h, int64_t *w, int64_t *c, int axes[3]) {
    if (ndim == 2) {
        *h = shape[0];
        *w = shape[1];
        *c = 1;
        axes[0] = 0;
        axes[1] = 1;
        axes[2] = -1;
    } else if (ndim == 3) {
        int ca = 0;
        for (int i = 1; i < 3; i++)
            if (shape[i] < shape[ca]) ca = i; /* first minimum, as numpy argmin */
        int a0 = ca == 0 ? 1 : 0, a1 = ca == 2 ? 1 : 2;
        *h = shape[a0];
        *w = shape[a1];
        *c = shape[ca];
        axes[0] = a0;
        axes[1] = a1;
        axes[2] = ca;
    } else {
        return cs_error(CELLSAM_ERR_UNSUPPORTED, ".npy image must be 2-D (H,W) or 3-D (H,W,C)/(C,H,W), not %d-D", ndim);
    }
    if (*h > INT_MAX || *w > INT_MAX || *c > INT_MAX) return cs_error(CELLSAM_ERR_LIMIT, ".npy dimension too large");
    return check_dims((uint64_t)*w, (uint64_t)*h, (uint64_t)*c);
}

static int decode_npy(const unsigned char *buf, size_t size, cs_image *out) {
    int ndim;
    int64_t shape[8], h, w, c;
    int axes[3];
    int rc = npy_peek_shape(buf, size, &ndim, shape);
    if (rc) return rc;
    rc = npy_layout(ndim, shape, &h, &w, &c, axes);
    if (rc) return rc;
    cs_npy a;
    rc = cs_npy_parse(buf, size, &a);
    if (rc) return rc;
    /* The peek and the full parse must agree (they read the same header). */
    if (a.ndim != ndim || memcmp(a.shape, shape, sizeof(int64_t) * (size_t)ndim) != 0) {
        cs_npy_free(&a);
        return cs_error(CELLSAM_ERR_FORMAT, ".npy header is ambiguous");
    }
    int is_float = a.dtype == CS_NPY_F16 || a.dtype == CS_NPY_F32 || a.dtype == CS_NPY_F64;
    int bits = a.dtype == CS_NPY_BOOL ? 1 : (int)cs_npy_dtype_size(a.dtype) * 8;
    rc = image_alloc(out, (int)w, (int)h, (int)c, bits, is_float);
    if (rc) {
        cs_npy_free(&a);
        return rc;
    }
    size_t stride[3] = {(size_t)(ndim == 3 ? shape[1] * shape[2] : shape[1]),
                        (size_t)(ndim == 3 ? shape[2] : 1), 1};
    size_t sh = stride[axes[0]], sw = stride[axes[1]], sc = axes[2] >= 0 ? stride[axes[2]] : 0;
    float *dst = out->data;
    for (int64_t y = 0; y < h; y++)
        for (int64_t x = 0; x < w; x++)
            for (int64_t k = 0; k < c; k++)
                *dst++ = (float)cs_npy_get(&a, (size_t)y * sh + (size_t)x * sw + (size_t)k * sc);
    cs_npy_free(&a);
    return CELLSAM_OK;
}

/* ------------------------------------------------------------------ TIFF read */

/* Fallback for messages libtiff sends to the process-wide handler (a few paths
 * have no handle yet); per-handle messages go to the reader's buffer. */
static _Thread_local char g_tiff_global_msg[256];

static void tiff_global_error(const char *module, const char *fmt, va_list ap) {
    (void)module;
    vsnprintf(g_tiff_global_msg, sizeof g_tiff_global_msg, fmt, ap);
}

static void tiff_global_warning(const char *module, const char *fmt, va_list ap) {
    (void)module; (void)fmt; (void)ap;
}

static pthread_once_t g_tiff_once = PTHREAD_ONCE_INIT;
static void tiff_install_global_handlers(void) {
    TIFFSetErrorHandler(tiff_global_error);
    TIFFSetWarningHandler(tiff_global_warning);
}

typedef struct {
    char msg[256];
} tiff_msgbuf;

static int tiff_handle_error(TIFF *tif, void *user, const char *module, const char *fmt, va_list ap) {
    (void)module;
    tiff_msgbuf *m = user;
    if (m->msg[0]) return 1; /* the first error is the cause */
    vsnprintf(m->msg, sizeof m->msg, fmt, ap);
    /* libtiff often starts with "<file name>: "; our prefix names the file already. */
    const char *name = tif ? TIFFFileName(tif) : NULL;
    size_t n = name ? strlen(name) : 0;
    if (n && strncmp(m->msg, name, n) == 0 && m->msg[n] == ':' && m->msg[n + 1] == ' ')
        memmove(m->msg, m->msg + n + 2, strlen(m->msg + n + 2) + 1);
    return 1;
}

static int tiff_handle_warning(TIFF *tif, void *user, const char *module, const char *fmt, va_list ap) {
    (void)tif; (void)user; (void)module; (void)fmt; (void)ap;
    return 1;
}

static TIFFOpenOptions *tiff_options(tiff_msgbuf *m) {
    pthread_once(&g_tiff_once, tiff_install_global_handlers);
    TIFFOpenOptions *o = TIFFOpenOptionsAlloc();
    if (!o) return NULL;
    tmsize_t cap = g_limits.max_codec_alloc > (size_t)INT64_MAX ? (tmsize_t)INT64_MAX : (tmsize_t)g_limits.max_codec_alloc;
    TIFFOpenOptionsSetMaxSingleMemAlloc(o, cap);
    TIFFOpenOptionsSetErrorHandlerExtR(o, tiff_handle_error, m);
    TIFFOpenOptionsSetWarningHandlerExtR(o, tiff_handle_warning, m);
    return o;
}

typedef struct {
    uint32_t width, height;
    uint16_t spp, bps, format, planar, photometric, compression;
} tiff_page_info;

struct cs_image_reader {
    image_format format;
    char name[256];
    int width, height, channels, bits, is_float;
    const char *format_name;
    cs_image full;    /* decoded image (non-TIFF, or TIFF via the RGBA fallback) */
    int have_full;
    /* TIFF */
    TIFF *tif;
    tiff_msgbuf tmsg;
    const unsigned char *mem;
    size_t mem_size;
    uint64_t mem_pos;
    int n_pages;                          /* pages read as channels (1 = samples are channels) */
    tdir_t page[CS_IMAGE_MAX_CHANNELS];   /* directory of each channel page */
    tdir_t cur_dir;
    /* Scanline position in the current directory: lets full-width bands read in
     * order continue inside a strip instead of re-decoding it from its start. */
    int scan_plane;
    int64_t scan_next; /* row after the last one read, -1 unknown */
    int sample_map[CS_IMAGE_MAX_CHANNELS]; /* page sample index of each output channel */
    int n_keep;                           /* samples used per page */
    int rgba_fallback;                    /* photometric libtiff must convert (YCbCr, LogLuv, ...) */
    tiff_page_info info0;
};

static tmsize_t tiff_mem_read(thandle_t h, void *buf, tmsize_t n) {
    cs_image_reader *r = h;
    if (n <= 0 || r->mem_pos >= r->mem_size) return 0;
    uint64_t avail = r->mem_size - r->mem_pos;
    size_t k = (uint64_t)n < avail ? (size_t)n : (size_t)avail;
    memcpy(buf, r->mem + r->mem_pos, k);
    r->mem_pos += k;
    return (tmsize_t)k;
}

static tmsize_t tiff_mem_write(thandle_t h, void *buf, tmsize_t n) { (void)h; (void)buf; (void)n; return -1; }

static toff_t tiff_mem_seek(thandle_t h, toff_t off, int whence) {
    cs_image_reader *r = h;
    uint64_t base;
    switch (whence) {
    case SEEK_SET: base = 0; break;
    case SEEK_CUR: base = r->mem_pos; break;
    case SEEK_END: base = r->mem_size; break;
    default: return (toff_t)-1;
    }
    /* toff_t is unsigned: a negative relative offset arrives wrapped around. */
    uint64_t pos = base + (uint64_t)off;
    if ((int64_t)off >= 0 ? pos < base : pos > base) return (toff_t)-1;
    r->mem_pos = pos;
    return pos;
}

static int tiff_mem_close(thandle_t h) { (void)h; return 0; }
static toff_t tiff_mem_size(thandle_t h) { return ((cs_image_reader *)h)->mem_size; }
static int tiff_mem_map(thandle_t h, void **base, toff_t *size) { (void)h; (void)base; (void)size; return 0; }
static void tiff_mem_unmap(thandle_t h, void *base, toff_t size) { (void)h; (void)base; (void)size; }

static int tiff_fail(cs_image_reader *r, int code, const char *what) {
    const char *why = r->tmsg.msg[0] ? r->tmsg.msg : (g_tiff_global_msg[0] ? g_tiff_global_msg : "");
    return cs_error(code, "TIFF: %s%s%s", what, why[0] ? ": " : "", why);
}

static void tiff_get_page_info(TIFF *tif, tiff_page_info *p) {
    memset(p, 0, sizeof *p);
    TIFFGetField(tif, TIFFTAG_IMAGEWIDTH, &p->width);
    TIFFGetField(tif, TIFFTAG_IMAGELENGTH, &p->height);
    TIFFGetFieldDefaulted(tif, TIFFTAG_SAMPLESPERPIXEL, &p->spp);
    TIFFGetFieldDefaulted(tif, TIFFTAG_BITSPERSAMPLE, &p->bps);
    TIFFGetFieldDefaulted(tif, TIFFTAG_SAMPLEFORMAT, &p->format);
    TIFFGetFieldDefaulted(tif, TIFFTAG_PLANARCONFIG, &p->planar);
    TIFFGetFieldDefaulted(tif, TIFFTAG_COMPRESSION, &p->compression);
    if (!TIFFGetField(tif, TIFFTAG_PHOTOMETRIC, &p->photometric)) p->photometric = PHOTOMETRIC_MINISBLACK;
    if (p->format == SAMPLEFORMAT_VOID) p->format = SAMPLEFORMAT_UINT;
}

static int tiff_same_layout(const tiff_page_info *a, const tiff_page_info *b) {
    return a->width == b->width && a->height == b->height && a->spp == b->spp && a->bps == b->bps &&
           a->format == b->format;
}

static int tiff_sample_type_ok(const tiff_page_info *p) {
    switch (p->format) {
    case SAMPLEFORMAT_UINT:
        return p->bps == 1 || p->bps == 2 || p->bps == 4 || p->bps == 8 || p->bps == 16 || p->bps == 32 || p->bps == 64;
    case SAMPLEFORMAT_INT: return p->bps == 8 || p->bps == 16 || p->bps == 32 || p->bps == 64;
    case SAMPLEFORMAT_IEEEFP: return p->bps == 16 || p->bps == 32 || p->bps == 64;
    default: return 0;
    }
}

/* Photometric interpretations whose raw samples we can use directly. */
static int tiff_needs_rgba(const tiff_page_info *p) {
    if (p->compression == COMPRESSION_OJPEG) return 1;
    switch (p->photometric) {
    case PHOTOMETRIC_YCBCR: return p->compression != COMPRESSION_JPEG;
    case PHOTOMETRIC_LOGL: case PHOTOMETRIC_LOGLUV: case PHOTOMETRIC_CFA: return 1;
    default: return 0;
    }
}

/* After every directory switch: JPEG-in-TIFF YCbCr is delivered as RGB. */
static int tiff_prepare_dir(cs_image_reader *r) {
    uint16_t photometric = 0, compression = 0;
    TIFFGetFieldDefaulted(r->tif, TIFFTAG_COMPRESSION, &compression);
    TIFFGetField(r->tif, TIFFTAG_PHOTOMETRIC, &photometric);
    if (compression == COMPRESSION_JPEG && photometric == PHOTOMETRIC_YCBCR &&
        !TIFFSetField(r->tif, TIFFTAG_JPEGCOLORMODE, JPEGCOLORMODE_RGB))
        return tiff_fail(r, CELLSAM_ERR_UNSUPPORTED, "cannot decode JPEG YCbCr");
    return CELLSAM_OK;
}

static int tiff_select_dir(cs_image_reader *r, tdir_t dir) {
    if (r->cur_dir == dir) return CELLSAM_OK;
    r->scan_next = -1;
    if (!TIFFSetDirectory(r->tif, dir)) return tiff_fail(r, CELLSAM_ERR_FORMAT, "cannot read page");
    r->cur_dir = dir;
    int rc = tiff_prepare_dir(r);
    if (rc) return rc;
    tiff_page_info p;
    tiff_get_page_info(r->tif, &p);
    /* The layout was checked at open; it cannot change, but a mismatch here must
     * never turn into an out-of-bounds read. */
    if (!tiff_same_layout(&p, &r->info0) || p.photometric != r->info0.photometric ||
        (r->n_pages > 1 && p.spp != 1))
        return cs_error(CELLSAM_ERR_FORMAT, "TIFF: page %u changed layout", (unsigned)dir);
    return CELLSAM_OK;
}

/* Bounded scan of an XML attribute value inside [s, end): name="value". */
static int xml_attr(const char *s, const char *end, const char *name, const char **val, size_t *len) {
    size_t nl = strlen(name);
    for (const char *p = s; p + nl + 2 < end; p++) {
        /* Callers start after the element name, so p[-1] is inside the string. */
        if (p == s || !isspace((unsigned char)p[-1]) || memcmp(p, name, nl) != 0) continue;
        const char *q = p + nl;
        while (q < end && isspace((unsigned char)*q)) q++;
        if (q >= end || *q != '=') continue;
        q++;
        while (q < end && isspace((unsigned char)*q)) q++;
        if (q >= end || (*q != '"' && *q != '\'')) continue;
        char quote = *q++;
        const char *e = q;
        while (e < end && *e != quote) e++;
        if (e >= end) return 0;
        *val = q;
        *len = (size_t)(e - q);
        return 1;
    }
    return 0;
}

static long xml_attr_int(const char *s, const char *end, const char *name) {
    const char *v;
    size_t n;
    if (!xml_attr(s, end, name, &v, &n) || n == 0 || n > 9) return -1;
    long x = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isdigit((unsigned char)v[i])) return -1;
        x = x * 10 + (v[i] - '0');
    }
    return x;
}

/* OME-XML: which pages hold channel c at Z=0, T=0 of the first series. Returns
 * 1 and fills pages/n when the XML is usable, 0 to fall back to the generic rule. */
static int ome_channel_pages(const char *desc, const tiff_page_info *p0, tdir_t n_dirs, tdir_t *pages, int *n, int *err) {
    *err = 0;
    if (!strstr(desc, "<OME") && !strstr(desc, ":OME")) return 0;
    const char *px = NULL;
    for (const char *s = strstr(desc, "Pixels"); s; s = strstr(s + 1, "Pixels"))
        if (s > desc && (s[-1] == '<' || s[-1] == ':') && (isspace((unsigned char)s[6]))) {
            px = s;
            break;
        }
    if (!px) return 0;
    const char *end = strchr(px, '>');
    if (!end) return 0;
    /* xml_attr looks at p[-1]: start one past the element name. */
    const char *attrs = px + 6;
    long sc = xml_attr_int(attrs, end, "SizeC"), sz = xml_attr_int(attrs, end, "SizeZ"),
         st = xml_attr_int(attrs, end, "SizeT");
    long sx = xml_attr_int(attrs, end, "SizeX"), sy = xml_attr_int(attrs, end, "SizeY");
    const char *order;
    size_t ol;
    if (sc < 1 || sz < 1 || st < 1 || !xml_attr(attrs, end, "DimensionOrder", &order, &ol) || ol != 5 ||
        order[0] != 'X' || order[1] != 'Y')
        return 0;
    if ((sx >= 0 && (uint32_t)sx != p0->width) || (sy >= 0 && (uint32_t)sy != p0->height)) return 0;
    /* Interleaved RGB planes: the samples of the first page are the channels. */
    if (p0->spp > 1) return 0;
    if (!memchr(order + 2, 'C', 3) || !memchr(order + 2, 'Z', 3) || !memchr(order + 2, 'T', 3)) return 0;
    /* Plane index of (c, z=0, t=0) is c times the product of the sizes of the
     * dimensions that vary faster than C. Sizes are < 1e9, so no overflow. */
    long stride = 1;
    for (int i = 2; i < 5 && order[i] != 'C'; i++) stride *= order[i] == 'Z' ? sz : st;
    if (sc > CS_IMAGE_MAX_CHANNELS) {
        *err = cs_error(CELLSAM_ERR_UNSUPPORTED, "OME-TIFF has %ld channels (at most %d supported)", sc, CS_IMAGE_MAX_CHANNELS);
        return 1;
    }
    if (sc > 1 && (stride >= (long)n_dirs || (sc - 1) * stride >= (long)n_dirs)) {
        *err = cs_error(CELLSAM_ERR_FORMAT, "OME-XML describes C=%ld Z=%ld T=%ld planes but the file has %u pages (multi-file OME-TIFF?)",
                        sc, sz, st, (unsigned)n_dirs);
        return 1;
    }
    for (long c = 0; c < sc; c++) pages[c] = (tdir_t)(c * stride);
    *n = (int)sc;
    return 1;
}

/* ImageJ hyperstack: pages are ordered channel fastest, then slice, then frame. */
static int imagej_channels(const char *desc) {
    if (strncmp(desc, "ImageJ=", 7) != 0) return -1;
    const char *p = strstr(desc, "\nchannels=");
    if (!p) return 1;
    long c = strtol(p + 10, NULL, 10);
    return c >= 1 && c <= 1000000 ? (int)c : 1;
}

/* Decide which pages become channels and validate every one of them. */
static int tiff_setup(cs_image_reader *r) {
    TIFF *tif = r->tif;
    r->cur_dir = TIFFCurrentDirectory(tif);
    r->scan_next = -1;
    int rc = tiff_prepare_dir(r);
    if (rc) return rc;
    tiff_page_info p0;
    tiff_get_page_info(tif, &p0);
    r->info0 = p0;
    rc = check_dims(p0.width, p0.height, 1);
    if (rc) return rc;
    if (!TIFFIsCODECConfigured(p0.compression))
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "TIFF compression %u is not supported by this libtiff", p0.compression);
    if (tiff_needs_rgba(&p0)) {
        r->rgba_fallback = 1;
        r->n_pages = 1;
        r->page[0] = r->cur_dir;
        r->channels = 3;
        r->bits = 8;
        r->is_float = 0;
        r->width = (int)p0.width;
        r->height = (int)p0.height;
        return check_dims(p0.width, p0.height, 3);
    }
    if (p0.spp < 1 || p0.spp > CS_IMAGE_MAX_CHANNELS)
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "TIFF with %u samples per pixel (1 to %d supported)", p0.spp, CS_IMAGE_MAX_CHANNELS);
    if (!tiff_sample_type_ok(&p0))
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "TIFF with %u-bit %s samples is not supported", p0.bps,
                        p0.format == SAMPLEFORMAT_INT ? "signed" : p0.format == SAMPLEFORMAT_IEEEFP ? "float" :
                        p0.format == SAMPLEFORMAT_UINT ? "unsigned" : "complex or unknown");
    if (p0.planar != PLANARCONFIG_CONTIG && p0.planar != PLANARCONFIG_SEPARATE)
        return cs_error(CELLSAM_ERR_FORMAT, "TIFF: bad planar configuration %u", p0.planar);

    /* Samples kept: all, except the alpha sample of an RGB image. */
    r->n_keep = 0;
    uint16_t n_extra = 0;
    uint16_t *extra = NULL;
    TIFFGetField(tif, TIFFTAG_EXTRASAMPLES, &n_extra, &extra);
    int drop = -1;
    if (p0.photometric == PHOTOMETRIC_RGB && p0.spp > 3 && n_extra > 0 && extra &&
        (extra[0] == EXTRASAMPLE_ASSOCALPHA || extra[0] == EXTRASAMPLE_UNASSALPHA))
        drop = 3;
    for (int s = 0; s < p0.spp; s++)
        if (s != drop) r->sample_map[r->n_keep++] = s;

    /* Pages as channels. */
    r->n_pages = 1;
    r->page[0] = r->cur_dir;
    tdir_t n_dirs = TIFFNumberOfDirectories(tif);
    if (p0.spp == 1 && n_dirs > 1) {
        const char *desc = NULL;
        if (!TIFFGetField(tif, TIFFTAG_IMAGEDESCRIPTION, &desc)) desc = NULL;
        int err = 0, n = 0, ij = desc ? imagej_channels(desc) : -1;
        if (desc && ome_channel_pages(desc, &p0, n_dirs, r->page, &n, &err)) {
            if (err) return err;
            r->n_pages = n;
            r->format_name = "ome-tiff";
        } else if (ij >= 1) {
            if (ij > CS_IMAGE_MAX_CHANNELS)
                return cs_error(CELLSAM_ERR_UNSUPPORTED, "ImageJ TIFF has %d channels (at most %d supported)", ij, CS_IMAGE_MAX_CHANNELS);
            if ((tdir_t)ij > n_dirs) return cs_error(CELLSAM_ERR_FORMAT, "ImageJ TIFF lists %d channels but has %u pages", ij, (unsigned)n_dirs);
            for (int c = 0; c < ij; c++) r->page[c] = (tdir_t)c;
            r->n_pages = ij;
        } else {
            /* Generic: every full-resolution page of the same layout is a channel;
             * any other full-resolution page means the pages are not a channel stack. */
            int count = 1, stack = 1;
            for (tdir_t d = 1; d < n_dirs && d < CS_TIFF_MAX_PAGES_SCANNED && count <= CS_IMAGE_MAX_CHANNELS; d++) {
                if (!TIFFReadDirectory(tif)) return tiff_fail(r, CELLSAM_ERR_FORMAT, "cannot read page");
                r->cur_dir = TIFFCurrentDirectory(tif);
                uint32_t subfile = 0;
                TIFFGetField(tif, TIFFTAG_SUBFILETYPE, &subfile);
                if (subfile & FILETYPE_REDUCEDIMAGE) continue;
                tiff_page_info p;
                tiff_get_page_info(tif, &p);
                if (!tiff_same_layout(&p, &p0) || p.photometric != p0.photometric) {
                    stack = 0;
                    break;
                }
                if (count < CS_IMAGE_MAX_CHANNELS) r->page[count] = r->cur_dir;
                count++;
            }
            if (stack && count > CS_IMAGE_MAX_CHANNELS)
                return cs_error(CELLSAM_ERR_UNSUPPORTED,
                                "TIFF has more than %d pages of the same size; at most %d are read as channels (z-stacks and time series are not supported)",
                                CS_IMAGE_MAX_CHANNELS, CS_IMAGE_MAX_CHANNELS);
            if (stack) r->n_pages = count;
        }
        /* Every channel page must match the first one exactly. */
        for (int c = 1; c < r->n_pages; c++) {
            if (!TIFFSetDirectory(tif, r->page[c])) return tiff_fail(r, CELLSAM_ERR_FORMAT, "cannot read page");
            r->cur_dir = r->page[c];
            tiff_page_info p;
            tiff_get_page_info(tif, &p);
            if (!tiff_same_layout(&p, &p0) || p.photometric != p0.photometric)
                return cs_error(CELLSAM_ERR_FORMAT, "TIFF page %u differs in size or sample type from the first page",
                                (unsigned)r->page[c]);
            if (!TIFFIsCODECConfigured(p.compression))
                return cs_error(CELLSAM_ERR_UNSUPPORTED, "TIFF compression %u is not supported by this libtiff", p.compression);
        }
        rc = tiff_select_dir(r, r->page[0]);
        if (rc) return rc;
    }
    r->width = (int)p0.width;
    r->height = (int)p0.height;
    r->channels = r->n_pages > 1 ? r->n_pages : r->n_keep;
    r->bits = p0.bps;
    r->is_float = p0.format == SAMPLEFORMAT_IEEEFP;
    return check_dims(p0.width, p0.height, (uint64_t)r->channels);
}

/* Convert npx samples of one decoded row: sample (px0 + i) * stride + sample of a
 * packed row with bps bits per sample. libtiff has already swapped byte order. */
static void tiff_convert(const unsigned char *row, int bps, int fmt, int stride, int sample, size_t px0,
                         size_t npx, float *dst, size_t dst_stride) {
    size_t idx = px0 * (size_t)stride + (size_t)sample;
    for (size_t i = 0; i < npx; i++, idx += (size_t)stride, dst += dst_stride) {
        float v;
        if (bps < 8) {
            size_t bit = idx * (size_t)bps;
            v = (float)((row[bit >> 3] >> (8 - bps - (int)(bit & 7))) & ((1u << bps) - 1u));
        } else if (bps == 8) {
            v = fmt == SAMPLEFORMAT_INT ? (float)(int8_t)row[idx] : (float)row[idx];
        } else if (bps == 16) {
            uint16_t u;
            memcpy(&u, row + idx * 2, 2);
            v = fmt == SAMPLEFORMAT_INT ? (float)(int16_t)u : fmt == SAMPLEFORMAT_IEEEFP ? cs_f16_to_f32(u) : (float)u;
        } else if (bps == 32) {
            uint32_t u;
            memcpy(&u, row + idx * 4, 4);
            if (fmt == SAMPLEFORMAT_IEEEFP) memcpy(&v, &u, 4);
            else v = fmt == SAMPLEFORMAT_INT ? (float)(int32_t)u : (float)u;
        } else {
            uint64_t u;
            memcpy(&u, row + idx * 8, 8);
            if (fmt == SAMPLEFORMAT_IEEEFP) {
                double d;
                memcpy(&d, &u, 8);
                v = (float)d;
            } else {
                v = fmt == SAMPLEFORMAT_INT ? (float)(int64_t)u : (float)u;
            }
        }
        *dst = v;
    }
}

/* Bytes needed for n pixels of k samples at bps bits (rows are byte-aligned). */
static int packed_bytes(uint64_t n, uint64_t k, uint64_t bps, uint64_t *out) {
    if (n > (UINT64_MAX / 64) / (k ? k : 1)) return -1;
    *out = (n * k * bps + 7) / 8;
    return 0;
}

/* One page into output channels [ch0, ch0 + n_keep) or (multi-page) channel ch0. */
static int tiff_read_page(cs_image_reader *r, int x, int y, int w, int h, int ch0, cs_image *out) {
    TIFF *tif = r->tif;
    const tiff_page_info *p = &r->info0;
    int separate = p->planar == PLANARCONFIG_SEPARATE && p->spp > 1;
    int spp_plane = separate ? 1 : p->spp;
    int passes = separate ? r->n_keep : 1;
    int out_per_pass = separate ? 1 : r->n_keep;
    size_t oc = (size_t)out->channels;
    unsigned char *buf = NULL;
    int rc = CELLSAM_OK;
    uint64_t need;
    if (TIFFIsTiled(tif)) {
        uint32_t tw = 0, th = 0;
        TIFFGetField(tif, TIFFTAG_TILEWIDTH, &tw);
        TIFFGetField(tif, TIFFTAG_TILELENGTH, &th);
        uint64_t tsize = TIFFTileSize64(tif), trow = TIFFTileRowSize64(tif);
        if (tw == 0 || th == 0 || packed_bytes(tw, (uint64_t)spp_plane, p->bps, &need) || trow < need ||
            tsize / th < trow)
            return tiff_fail(r, CELLSAM_ERR_FORMAT, "bad tile layout");
        if (tsize > g_limits.max_codec_alloc)
            return cs_error(CELLSAM_ERR_LIMIT, "TIFF tile of %llu bytes is over the limit", (unsigned long long)tsize);
        buf = cs_alloc((size_t)tsize, 1);
        if (!buf) return CELLSAM_ERR_NOMEM;
        for (int pass = 0; pass < passes && !rc; pass++) {
            uint16_t plane = (uint16_t)(separate ? r->sample_map[pass] : 0);
            for (uint64_t ty = (uint64_t)y / th * th; ty < (uint64_t)y + (uint64_t)h && !rc; ty += th)
                for (uint64_t tx = (uint64_t)x / tw * tw; tx < (uint64_t)x + (uint64_t)w; tx += tw) {
                    uint32_t tile = TIFFComputeTile(tif, (uint32_t)tx, (uint32_t)ty, 0, plane);
                    memset(buf, 0, (size_t)tsize); /* short tiles read as zeros, not stale data */
                    if (TIFFReadEncodedTile(tif, tile, buf, (tmsize_t)tsize) < 0) {
                        rc = tiff_fail(r, CELLSAM_ERR_FORMAT, "cannot decode tile");
                        break;
                    }
                    uint64_t y0 = ty > (uint64_t)y ? ty : (uint64_t)y, y1 = ty + th < (uint64_t)(y + h) ? ty + th : (uint64_t)(y + h);
                    uint64_t x0 = tx > (uint64_t)x ? tx : (uint64_t)x, x1 = tx + tw < (uint64_t)(x + w) ? tx + tw : (uint64_t)(x + w);
                    for (uint64_t yy = y0; yy < y1; yy++) {
                        const unsigned char *src = buf + (yy - ty) * trow;
                        float *dst = out->data + ((yy - (uint64_t)y) * (uint64_t)w + (x0 - (uint64_t)x)) * oc;
                        for (int k = 0; k < out_per_pass; k++) {
                            int sample = separate ? 0 : r->sample_map[k];
                            int och = ch0 + (separate ? pass : k);
                            tiff_convert(src, p->bps, p->format, spp_plane, sample, x0 - tx, x1 - x0, dst + och, oc);
                        }
                    }
                }
        }
    } else {
        /* Scanlines, each pass reading forward from the start of a strip: libtiff
         * codecs cannot seek inside a compressed strip. Memory: one scanline. */
        uint32_t rps = 0;
        TIFFGetFieldDefaulted(tif, TIFFTAG_ROWSPERSTRIP, &rps);
        if (rps == 0 || rps > p->height) rps = p->height;
        uint64_t sl = TIFFScanlineSize64(tif);
        if (packed_bytes(p->width, (uint64_t)spp_plane, p->bps, &need) || sl < need)
            return tiff_fail(r, CELLSAM_ERR_FORMAT, "bad scanline layout");
        if (sl > g_limits.max_codec_alloc)
            return cs_error(CELLSAM_ERR_LIMIT, "TIFF scanline of %llu bytes is over the limit", (unsigned long long)sl);
        buf = cs_alloc((size_t)sl, 1);
        if (!buf) return CELLSAM_ERR_NOMEM;
        for (int pass = 0; pass < passes && !rc; pass++) {
            uint16_t plane = (uint16_t)(separate ? r->sample_map[pass] : 0);
            uint32_t start = (uint32_t)y / rps * rps;
            if (r->scan_next >= 0 && r->scan_plane == plane && r->scan_next <= y &&
                (uint32_t)r->scan_next / rps == (uint32_t)y / rps)
                start = (uint32_t)r->scan_next;
            r->scan_next = -1;
            for (uint32_t row = start; row < (uint32_t)(y + h); row++) {
                if (TIFFReadScanline(tif, buf, row, plane) < 0) {
                    r->scan_next = -1;
                    rc = tiff_fail(r, CELLSAM_ERR_FORMAT, "cannot decode strip");
                    break;
                }
                r->scan_next = (int64_t)row + 1;
                r->scan_plane = plane;
                if (row < (uint32_t)y) continue;
                float *dst = out->data + (size_t)(row - (uint32_t)y) * (size_t)w * oc;
                for (int k = 0; k < out_per_pass; k++) {
                    int sample = separate ? 0 : r->sample_map[k];
                    int och = ch0 + (separate ? pass : k);
                    tiff_convert(buf, p->bps, p->format, spp_plane, sample, (size_t)x, (size_t)w, dst + och, oc);
                }
            }
        }
    }
    cs_free(buf);
    return rc;
}

static int tiff_read_rgba_full(cs_image_reader *r) {
    char emsg[1024] = "";
    int rc = tiff_select_dir(r, r->page[0]);
    if (rc) return rc;
    if (!TIFFRGBAImageOK(r->tif, emsg))
        return cs_error(CELLSAM_ERR_UNSUPPORTED, "TIFF: %s", emsg[0] ? emsg : "cannot convert to RGB");
    size_t n = (size_t)r->width * (size_t)r->height;
    uint32_t *raster = cs_alloc(n, sizeof(uint32_t));
    if (!raster) return CELLSAM_ERR_NOMEM;
    if (!TIFFReadRGBAImageOriented(r->tif, (uint32_t)r->width, (uint32_t)r->height, raster, ORIENTATION_TOPLEFT, 1)) {
        cs_free(raster);
        return tiff_fail(r, CELLSAM_ERR_FORMAT, "cannot decode image");
    }
    rc = image_alloc(&r->full, r->width, r->height, 3, 8, 0);
    if (rc) {
        cs_free(raster);
        return rc;
    }
    for (size_t i = 0; i < n; i++) {
        r->full.data[3 * i] = (float)TIFFGetR(raster[i]);
        r->full.data[3 * i + 1] = (float)TIFFGetG(raster[i]);
        r->full.data[3 * i + 2] = (float)TIFFGetB(raster[i]);
    }
    cs_free(raster);
    r->have_full = 1;
    return CELLSAM_OK;
}

/* ------------------------------------------------------------------ reader API */

static void set_name(cs_image_reader *r, const char *name) {
    snprintf(r->name, sizeof r->name, "%s", name && *name ? name : "image");
}

static int reader_finish_full(cs_image_reader *r, const char *format_name) {
    r->have_full = 1;
    r->width = r->full.width;
    r->height = r->full.height;
    r->channels = r->full.channels;
    r->bits = r->full.bits;
    r->is_float = r->full.is_float;
    r->format_name = format_name;
    return CELLSAM_OK;
}

static int decode_whole(cs_image_reader *r, image_format f, const unsigned char *buf, size_t size) {
    int rc, w, h, c;
    switch (f) {
    case FMT_PNG:
        rc = decode_png(buf, size, &r->full);
        return rc ? rc : reader_finish_full(r, "png");
    case FMT_JPEG:
        rc = decode_jpeg(buf, size, 0, &r->full, &w, &h, &c);
        return rc ? rc : reader_finish_full(r, "jpeg");
    case FMT_NPY:
        rc = decode_npy(buf, size, &r->full);
        return rc ? rc : reader_finish_full(r, "npy");
    default:
        return cs_error(CELLSAM_ERR_INVALID, "internal: bad format");
    }
}

void cs_image_reader_close(cs_image_reader *r) {
    if (!r) return;
    if (r->tif) TIFFClose(r->tif);
    cs_image_free(&r->full);
    free(r);
}

static int open_tiff(cs_image_reader *r, const char *path) {
    TIFFOpenOptions *o = tiff_options(&r->tmsg);
    if (!o) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    g_tiff_global_msg[0] = '\0';
    /* "m": plain reads, no mmap (a file shrinking under a mapping would SIGBUS). */
    if (path)
        r->tif = TIFFOpenExt(path, "rm", o);
    else
        r->tif = TIFFClientOpenExt(r->name, "rm", (thandle_t)r, tiff_mem_read, tiff_mem_write, tiff_mem_seek,
                                   tiff_mem_close, tiff_mem_size, tiff_mem_map, tiff_mem_unmap, o);
    TIFFOpenOptionsFree(o);
    if (!r->tif) return tiff_fail(r, CELLSAM_ERR_FORMAT, "cannot open");
    r->format = FMT_TIFF;
    r->format_name = "tiff";
    return tiff_setup(r);
}

int cs_image_reader_open_memory(const unsigned char *buf, size_t size, const char *name_hint,
                                cs_image_reader **out) {
    *out = NULL;
    cs_image_reader *r = calloc(1, sizeof *r);
    if (!r) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    set_name(r, name_hint);
    const char *why;
    image_format f = buf ? detect_format(buf, size, &why) : FMT_UNKNOWN;
    int rc;
    if (!buf) {
        rc = cs_error(CELLSAM_ERR_INVALID, "no data");
    } else if (f == FMT_UNKNOWN) {
        rc = unknown_format_error(why, size);
    } else if (f == FMT_TIFF) {
        r->mem = buf;
        r->mem_size = size;
        rc = open_tiff(r, NULL);
    } else {
        r->format = f;
        rc = decode_whole(r, f, buf, size);
    }
    if (rc) {
        cs_image_reader_close(r);
        return cs_error_prefix(rc, "%s", name_hint && *name_hint ? name_hint : "image");
    }
    *out = r;
    return CELLSAM_OK;
}

static int read_magic(const char *path, unsigned char *b, size_t cap, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return cs_error(CELLSAM_ERR_IO, "cannot open: %s", strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return cs_error(CELLSAM_ERR_IO, "not a regular file");
    }
    *n = fread(b, 1, cap, f);
    int bad = ferror(f);
    fclose(f);
    if (bad) return cs_error(CELLSAM_ERR_IO, "read error");
    return CELLSAM_OK;
}

int cs_image_reader_open(const char *path, cs_image_reader **out) {
    *out = NULL;
    if (!path) return cs_error(CELLSAM_ERR_INVALID, "no path");
    unsigned char magic[16];
    size_t n;
    int rc = read_magic(path, magic, sizeof magic, &n);
    if (rc) return cs_error_prefix(rc, "%s", path);
    const char *why;
    image_format f = detect_format(magic, n, &why);
    if (f == FMT_UNKNOWN) return cs_error_prefix(unknown_format_error(why, n), "%s", path);
    cs_image_reader *r = calloc(1, sizeof *r);
    if (!r) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    set_name(r, path);
    if (f == FMT_TIFF) {
        rc = open_tiff(r, path);
    } else {
        unsigned char *buf;
        size_t size;
        rc = cs_read_file(path, CS_IMAGE_MAX_FILE_BYTES, &buf, &size);
        if (rc) {
            free(r);
            return rc; /* cs_read_file names the path */
        }
        r->format = f;
        rc = decode_whole(r, f, buf, size);
        free(buf);
    }
    if (rc) {
        cs_image_reader_close(r);
        return cs_error_prefix(rc, "%s", path);
    }
    *out = r;
    return CELLSAM_OK;
}

void cs_image_reader_info(const cs_image_reader *r, cs_image_info *info) {
    memset(info, 0, sizeof *info);
    info->width = r->width;
    info->height = r->height;
    info->channels = r->channels;
    info->bits = r->bits;
    info->is_float = r->is_float;
    info->pages = r->format == FMT_TIFF ? r->n_pages : 1;
    info->format = r->format_name;
}

static int reader_region(cs_image_reader *r, int x, int y, int w, int h, cs_image *out) {
    memset(out, 0, sizeof *out);
    if (x < 0 || y < 0 || w <= 0 || h <= 0 || (int64_t)x + w > r->width || (int64_t)y + h > r->height)
        return cs_error(CELLSAM_ERR_INVALID, "region %d,%d %dx%d is outside the %dx%d image", x, y, w, h,
                        r->width, r->height);
    if (r->format == FMT_TIFF && r->rgba_fallback && !r->have_full) {
        int rc = tiff_read_rgba_full(r);
        if (rc) return rc;
    }
    if (r->have_full) return crop_image(&r->full, x, y, w, h, out);
    int rc = image_alloc(out, w, h, r->channels, r->bits, r->is_float);
    if (rc) return rc;
    r->tmsg.msg[0] = '\0';
    for (int pg = 0; pg < r->n_pages && !rc; pg++) {
        rc = tiff_select_dir(r, r->page[pg]);
        if (!rc) rc = tiff_read_page(r, x, y, w, h, pg, out);
    }
    if (rc) cs_image_free(out);
    return rc;
}

int cs_image_reader_read_region(cs_image_reader *r, int x, int y, int w, int h, cs_image *out) {
    int rc = reader_region(r, x, y, w, h, out);
    return rc ? cs_error_prefix(rc, "%s", r->name) : CELLSAM_OK;
}

/* Whole image: hand over the decoded buffer instead of copying it. */
int cs_image_reader_read_all(cs_image_reader *r, cs_image *out) {
    if (r->have_full) {
        *out = r->full;
        memset(&r->full, 0, sizeof r->full);
        r->have_full = 0;
        return CELLSAM_OK;
    }
    return cs_image_reader_read_region(r, 0, 0, r->width, r->height, out);
}

int cs_image_read(const char *path, cs_image *out) {
    memset(out, 0, sizeof *out);
    cs_image_reader *r;
    int rc = cs_image_reader_open(path, &r);
    if (rc) return rc;
    rc = cs_image_reader_read_all(r, out);
    cs_image_reader_close(r);
    return rc;
}

int cs_image_decode(const unsigned char *buf, size_t size, const char *name_hint, cs_image *out) {
    memset(out, 0, sizeof *out);
    cs_image_reader *r;
    int rc = cs_image_reader_open_memory(buf, size, name_hint, &r);
    if (rc) return rc;
    rc = cs_image_reader_read_all(r, out);
    cs_image_reader_close(r);
    return rc;
}

int cs_image_read_region(const char *path, int x, int y, int w, int h, cs_image *out) {
    memset(out, 0, sizeof *out);
    cs_image_reader *r;
    int rc = cs_image_reader_open(path, &r);
    if (rc) return rc;
    rc = cs_image_reader_read_region(r, x, y, w, h, out);
    cs_image_reader_close(r);
    return rc;
}

int cs_image_probe(const char *path, int *width, int *height, int *channels) {
    unsigned char head[65536 + 16];
    size_t n;
    int rc = read_magic(path, head, sizeof head, &n);
    if (rc) return cs_error_prefix(rc, "%s", path);
    const char *why;
    image_format f = detect_format(head, n, &why);
    int w = 0, h = 0, c = 0;
    if (f == FMT_UNKNOWN) {
        rc = unknown_format_error(why, n);
    } else if (f == FMT_PNG) {
        rc = probe_png_header(head, n, &w, &h, &c);
    } else if (f == FMT_NPY) {
        int ndim, axes[3];
        int64_t shape[8], hh, ww, cc;
        rc = npy_peek_shape(head, n, &ndim, shape);
        if (!rc) rc = npy_layout(ndim, shape, &hh, &ww, &cc, axes);
        if (!rc) {
            w = (int)ww;
            h = (int)hh;
            c = (int)cc;
        }
    } else if (f == FMT_JPEG) {
        unsigned char *buf;
        size_t size;
        rc = cs_read_file(path, CS_IMAGE_MAX_FILE_BYTES, &buf, &size);
        if (rc) return rc;
        rc = decode_jpeg(buf, size, 1, NULL, &w, &h, &c);
        free(buf);
    } else {
        cs_image_reader *r;
        rc = cs_image_reader_open(path, &r);
        if (rc) return rc; /* already prefixed */
        w = r->width;
        h = r->height;
        c = r->channels;
        cs_image_reader_close(r);
    }
    if (rc) return cs_error_prefix(rc, "%s", path);
    if (width) *width = w;
    if (height) *height = h;
    if (channels) *channels = c;
    return CELLSAM_OK;
}

/* ------------------------------------------------------------------ writers */

typedef void (*png_row_fn)(void *ctx, int y, unsigned char *row);

typedef struct {
    png_structp png;
    png_infop info;
    char msg[200];
    unsigned char *row;
} png_write_ctx;

static int png_write_inner(png_write_ctx *c, FILE *f, int w, int h, int color, int bd, png_row_fn fn, void *fnctx) {
    if (setjmp(png_jmpbuf(c->png))) return cs_error(CELLSAM_ERR_IO, "PNG write failed: %s", c->msg);
    png_init_io(c->png, f);
    png_set_IHDR(c->png, c->info, (png_uint_32)w, (png_uint_32)h, bd, color, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(c->png, c->info);
    for (int y = 0; y < h; y++) {
        fn(fnctx, y, c->row);
        png_write_row(c->png, c->row);
    }
    png_write_end(c->png, NULL);
    return CELLSAM_OK;
}

static int write_png_atomic(const char *path, int w, int h, int color, int bd, png_row_fn fn, void *fnctx) {
    int ch = color == PNG_COLOR_TYPE_RGB ? 3 : 1;
    size_t rowbytes;
    if (cs_mul_size((size_t)w, (size_t)ch * (size_t)(bd / 8), &rowbytes)) return cs_error(CELLSAM_ERR_LIMIT, "image too large");
    png_write_ctx c;
    memset(&c, 0, sizeof c);
    c.row = cs_alloc(rowbytes, 1);
    if (!c.row) return CELLSAM_ERR_NOMEM;
    cs_atomic_file af;
    int rc = cs_atomic_open(&af, path);
    if (rc) {
        cs_free(c.row);
        return rc;
    }
    c.png = png_create_write_struct(PNG_LIBPNG_VER_STRING, c.msg, png_error_fn, png_warning_fn);
    c.info = c.png ? png_create_info_struct(c.png) : NULL;
    if (!c.png || !c.info) rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory (libpng)");
    else rc = png_write_inner(&c, af.f, w, h, color, bd, fn, fnctx);
    png_destroy_write_struct(&c.png, &c.info);
    cs_free(c.row);
    if (rc) {
        cs_atomic_abort(&af);
        return rc;
    }
    return cs_atomic_commit(&af);
}

typedef struct {
    const uint32_t *labels;
    int width;
} label_rows;

static void label_row_png16(void *ctx, int y, unsigned char *row) {
    const label_rows *l = ctx;
    const uint32_t *src = l->labels + (size_t)y * (size_t)l->width;
    for (int x = 0; x < l->width; x++) {
        row[2 * x] = (unsigned char)(src[x] >> 8);
        row[2 * x + 1] = (unsigned char)src[x];
    }
}

/* libtiff output through the atomic file's FILE*. */
static tmsize_t tiff_file_read(thandle_t h, void *buf, tmsize_t n) {
    return n <= 0 ? 0 : (tmsize_t)fread(buf, 1, (size_t)n, (FILE *)h);
}
static tmsize_t tiff_file_write(thandle_t h, void *buf, tmsize_t n) {
    return n <= 0 ? 0 : (tmsize_t)fwrite(buf, 1, (size_t)n, (FILE *)h);
}
static toff_t tiff_file_seek(thandle_t h, toff_t off, int whence) {
    FILE *f = h;
    if (fseeko(f, (off_t)off, whence) != 0) return (toff_t)-1;
    off_t pos = ftello(f);
    return pos < 0 ? (toff_t)-1 : (toff_t)pos;
}
static int tiff_file_close(thandle_t h) { (void)h; return 0; }
static toff_t tiff_file_size(thandle_t h) {
    FILE *f = h;
    struct stat st;
    fflush(f);
    return fstat(fileno(f), &st) == 0 ? (toff_t)st.st_size : 0;
}

static int write_labels_tiff(const char *path, const uint32_t *labels, int w, int h, uint32_t max_label) {
    int bps = max_label > 65535 ? 32 : 16;
    size_t raw = (size_t)w * (size_t)h * (size_t)(bps / 8);
    size_t rowbytes = (size_t)w * (size_t)(bps / 8);
    cs_atomic_file af;
    int rc = cs_atomic_open(&af, path);
    if (rc) return rc;
    tiff_msgbuf m = {{0}};
    TIFFOpenOptions *o = tiff_options(&m);
    unsigned char *row = cs_alloc(rowbytes, 1);
    TIFF *tif = NULL;
    if (o && row)
        /* Classic TIFF offsets are 32-bit: switch to BigTIFF well before 4 GiB. */
        tif = TIFFClientOpenExt(path, raw > ((size_t)3 << 30) ? "w8" : "w", (thandle_t)af.f, tiff_file_read,
                                tiff_file_write, tiff_file_seek, tiff_file_close, tiff_file_size,
                                tiff_mem_map, tiff_mem_unmap, o);
    if (o) TIFFOpenOptionsFree(o);
    if (!tif) {
        cs_free(row);
        cs_atomic_abort(&af);
        return row ? cs_error(CELLSAM_ERR_IO, "TIFF: cannot write %s: %s", path, m.msg) : CELLSAM_ERR_NOMEM;
    }
    uint32_t rps = (uint32_t)(((size_t)256 << 10) / rowbytes);
    if (rps < 1) rps = 1;
    if (rps > (uint32_t)h) rps = (uint32_t)h;
    int ok = TIFFSetField(tif, TIFFTAG_IMAGEWIDTH, (uint32_t)w) && TIFFSetField(tif, TIFFTAG_IMAGELENGTH, (uint32_t)h) &&
             TIFFSetField(tif, TIFFTAG_BITSPERSAMPLE, (uint16_t)bps) && TIFFSetField(tif, TIFFTAG_SAMPLESPERPIXEL, (uint16_t)1) &&
             TIFFSetField(tif, TIFFTAG_SAMPLEFORMAT, SAMPLEFORMAT_UINT) &&
             TIFFSetField(tif, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_MINISBLACK) &&
             TIFFSetField(tif, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG) &&
             TIFFSetField(tif, TIFFTAG_COMPRESSION, COMPRESSION_ADOBE_DEFLATE) &&
             TIFFSetField(tif, TIFFTAG_PREDICTOR, PREDICTOR_HORIZONTAL) &&
             TIFFSetField(tif, TIFFTAG_ROWSPERSTRIP, rps);
    for (int y = 0; ok && y < h; y++) {
        const uint32_t *src = labels + (size_t)y * (size_t)w;
        if (bps == 16)
            for (int x = 0; x < w; x++) {
                uint16_t v = (uint16_t)src[x];
                memcpy(row + 2 * (size_t)x, &v, 2);
            }
        else
            memcpy(row, src, rowbytes);
        ok = TIFFWriteScanline(tif, row, (uint32_t)y, 0) == 1;
    }
    if (ok) ok = TIFFFlush(tif);
    TIFFClose(tif);
    cs_free(row);
    if (!ok) {
        cs_atomic_abort(&af);
        return cs_error(CELLSAM_ERR_IO, "TIFF: writing %s failed%s%s", path, m.msg[0] ? ": " : "", m.msg);
    }
    return cs_atomic_commit(&af);
}

static int has_ext(const char *path, const char *ext) {
    size_t n = strlen(path), e = strlen(ext);
    return n > e && strcasecmp(path + n - e, ext) == 0;
}

static int check_out_dims(int w, int h) {
    if (w <= 0 || h <= 0) return cs_error(CELLSAM_ERR_INVALID, "image has zero size (%dx%d)", w, h);
    return check_dims((uint64_t)w, (uint64_t)h, 1);
}

int cs_write_labels(const char *path, const uint32_t *labels, int width, int height) {
    if (!path || !labels) return cs_error(CELLSAM_ERR_INVALID, "no path or labels");
    int rc = check_out_dims(width, height);
    if (rc) return cs_error_prefix(rc, "%s", path);
    size_t n = (size_t)width * (size_t)height;
    uint32_t max_label = 0;
    for (size_t i = 0; i < n; i++)
        if (labels[i] > max_label) max_label = labels[i];
    if (has_ext(path, ".png")) {
        if (max_label > 65535)
            return cs_error(CELLSAM_ERR_LIMIT, "%s: labels up to %u do not fit a 16-bit PNG; write .tif or .npy instead",
                            path, max_label);
        label_rows lr = {labels, width};
        rc = write_png_atomic(path, width, height, PNG_COLOR_TYPE_GRAY, 16, label_row_png16, &lr);
    } else if (has_ext(path, ".tif") || has_ext(path, ".tiff")) {
        rc = write_labels_tiff(path, labels, width, height, max_label);
    } else if (has_ext(path, ".npy")) {
        int64_t shape[2] = {height, width};
        /* Same bits: a label <= INT32_MAX reads the same as int32 (what most tools expect). */
        rc = cs_npy_save(path, max_label > INT32_MAX ? CS_NPY_U32 : CS_NPY_I32, labels, 2, shape);
    } else {
        return cs_error(CELLSAM_ERR_INVALID, "%s: unknown label file extension (use .png, .tif, .tiff or .npy)", path);
    }
    return rc;
}

/* Overlay: display mapping per output colour. */
typedef struct {
    const cs_image *img;
    const uint32_t *labels;
    int mode;         /* 1 grey, 2 green/magenta, 3 RGB */
    int src[3];       /* source channels */
    float lo[3], hi[3];
} overlay_ctx;

/* 0.5 / 99.5 percentiles of the finite values of the listed channels (jointly),
 * from a 65536-bin histogram: exact enough for display, O(n) on big slides. */
static int display_range(const cs_image *img, const int *chs, int nch, float *lo, float *hi) {
    size_t n = (size_t)img->width * (size_t)img->height, C = (size_t)img->channels;
    double mn = INFINITY, mx = -INFINITY;
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < nch; k++) {
            float v = img->data[i * C + (size_t)chs[k]];
            if (!isfinite(v)) continue;
            if (v < mn) mn = v;
            if (v > mx) mx = v;
            count++;
        }
    if (count == 0) {
        *lo = *hi = 0;
        return CELLSAM_OK;
    }
    if (!(mx > mn)) {
        *lo = *hi = (float)mn;
        return CELLSAM_OK;
    }
    enum { NB = 65536 };
    uint64_t *hist = calloc(NB, sizeof *hist);
    if (!hist) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    double scale = (NB - 1) / (mx - mn);
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < nch; k++) {
            float v = img->data[i * C + (size_t)chs[k]];
            if (!isfinite(v)) continue;
            size_t b = (size_t)((v - mn) * scale);
            hist[b < NB ? b : NB - 1]++;
        }
    double r_lo = 0.005 * (double)(count - 1), r_hi = 0.995 * (double)(count - 1);
    uint64_t cum = 0;
    int b_lo = -1, b_hi = NB - 1;
    for (int b = 0; b < NB; b++) {
        cum += hist[b];
        if (b_lo < 0 && (double)cum > r_lo) b_lo = b;
        if ((double)cum > r_hi) {
            b_hi = b;
            break;
        }
    }
    free(hist);
    if (b_lo < 0) b_lo = 0;
    *lo = (float)(mn + b_lo / scale);
    *hi = (float)(mn + b_hi / scale);
    if (*hi <= *lo) *hi = (float)mx;
    return CELLSAM_OK;
}

static unsigned char stretch(float v, float lo, float hi) {
    if (!(hi > lo)) return v > lo ? 255 : 0;
    float t = (v - lo) / (hi - lo);
    if (!(t > 0)) return 0; /* also NaN */
    if (t >= 1) return 255;
    return (unsigned char)(t * 255.0f + 0.5f);
}

/* Distinct, saturated colours: hue steps by the golden ratio. */
static void label_colour(uint32_t label, unsigned char rgb[3]) {
    double hue = fmod((double)label * 0.618033988749895, 1.0) * 6.0;
    int sector = (int)hue;
    double f = hue - sector;
    unsigned char up = (unsigned char)(255 * f + 0.5), down = (unsigned char)(255 * (1 - f) + 0.5);
    switch (sector) {
    case 0: rgb[0] = 255; rgb[1] = up; rgb[2] = 0; break;
    case 1: rgb[0] = down; rgb[1] = 255; rgb[2] = 0; break;
    case 2: rgb[0] = 0; rgb[1] = 255; rgb[2] = up; break;
    case 3: rgb[0] = 0; rgb[1] = down; rgb[2] = 255; break;
    case 4: rgb[0] = up; rgb[1] = 0; rgb[2] = 255; break;
    default: rgb[0] = 255; rgb[1] = 0; rgb[2] = down; break;
    }
}

static void overlay_row(void *vctx, int y, unsigned char *row) {
    const overlay_ctx *o = vctx;
    const cs_image *img = o->img;
    int w = img->width, h = img->height;
    size_t C = (size_t)img->channels;
    for (int x = 0; x < w; x++) {
        size_t i = (size_t)y * (size_t)w + (size_t)x;
        const float *px = img->data + i * C;
        unsigned char *d = row + 3 * (size_t)x;
        if (o->mode == 1) {
            d[0] = d[1] = d[2] = stretch(px[o->src[0]], o->lo[0], o->hi[0]);
        } else if (o->mode == 2) {
            unsigned char g = stretch(px[o->src[0]], o->lo[0], o->hi[0]);
            unsigned char m = stretch(px[o->src[1]], o->lo[1], o->hi[1]);
            d[0] = m;
            d[1] = g;
            d[2] = m;
        } else {
            for (int k = 0; k < 3; k++) d[k] = stretch(px[o->src[k]], o->lo[k], o->hi[k]);
        }
        if (!o->labels) continue;
        uint32_t L = o->labels[i];
        if (!L) continue;
        /* Outline: a labelled pixel with a 4-neighbour of another label. */
        int edge = (x > 0 && o->labels[i - 1] != L) || (x + 1 < w && o->labels[i + 1] != L) ||
                   (y > 0 && o->labels[i - (size_t)w] != L) || (y + 1 < h && o->labels[i + (size_t)w] != L);
        if (edge) label_colour(L, d);
    }
}

int cs_write_overlay_png(const char *path, const cs_image *img, int channel, const uint32_t *labels) {
    if (!path || !img || !img->data) return cs_error(CELLSAM_ERR_INVALID, "no path or image");
    int rc = check_out_dims(img->width, img->height);
    if (rc) return cs_error_prefix(rc, "%s", path);
    if (img->channels < 1 || img->channels > CS_IMAGE_MAX_CHANNELS || channel < -1 || channel >= img->channels)
        return cs_error(CELLSAM_ERR_INVALID, "%s: channel %d is not in the %d-channel image", path, channel, img->channels);
    overlay_ctx o;
    memset(&o, 0, sizeof o);
    o.img = img;
    o.labels = labels;
    if (channel >= 0 || img->channels == 1) {
        o.mode = 1;
        o.src[0] = channel >= 0 ? channel : 0;
        rc = display_range(img, o.src, 1, &o.lo[0], &o.hi[0]);
    } else if (img->channels == 2) {
        o.mode = 2;
        o.src[0] = 0;
        o.src[1] = 1;
        rc = display_range(img, &o.src[0], 1, &o.lo[0], &o.hi[0]);
        if (!rc) rc = display_range(img, &o.src[1], 1, &o.lo[1], &o.hi[1]);
    } else {
        o.mode = 3;
        o.src[0] = 0;
        o.src[1] = 1;
        o.src[2] = 2;
        rc = display_range(img, o.src, 3, &o.lo[0], &o.hi[0]);
        o.lo[1] = o.lo[2] = o.lo[0];
        o.hi[1] = o.hi[2] = o.hi[0];
    }
    if (rc) return rc;
    return write_png_atomic(path, img->width, img->height, PNG_COLOR_TYPE_RGB, 8, overlay_row, &o);
}

/* ------------------------------------------------------------------ model input */

int cs_image_to_model_input(const cs_image *img, int nuclear_channel, int cell_channel, int mode, float **hw3) {
    *hw3 = NULL;
    if (!img || !img->data || img->width <= 0 || img->height <= 0 || img->channels < 1)
        return cs_error(CELLSAM_ERR_INVALID, "empty image");
    int C = img->channels;
    if (nuclear_channel < 0 || nuclear_channel > C || cell_channel < 0 || cell_channel > C)
        return cs_error(CELLSAM_ERR_INVALID, "channel %d is not in the %d-channel image (channels are 1-based, 0 = none)",
                        nuclear_channel < 0 || nuclear_channel > C ? nuclear_channel : cell_channel, C);
    /* src[slot]: 0-based source channel or -1 (blank). */
    int src[3] = {-1, -1, -1};
    if (mode == CS_CHANNELS_GREY) {
        if (nuclear_channel || cell_channel)
            return cs_error(CELLSAM_ERR_INVALID, "grey mode averages all channels; do not choose nuclear/cell channels");
    } else if (mode == CS_CHANNELS_OFFICIAL) {
        if (nuclear_channel || cell_channel) {
            src[1] = nuclear_channel - 1;
            src[2] = cell_channel - 1;
        } else if (C == 1) {
            src[2] = 0;
        } else if (C == 2) {
            src[1] = 0;
            src[2] = 1;
        } else if (C == 3) {
            src[0] = 0;
            src[1] = 1;
            src[2] = 2;
        } else {
            return cs_error(CELLSAM_ERR_INVALID, "image has %d channels; choose the nuclear and/or whole-cell channel", C);
        }
    } else {
        return cs_error(CELLSAM_ERR_INVALID, "unknown channel mode %d", mode);
    }
    size_t n = (size_t)img->width * (size_t)img->height;
    float *out = cs_calloc(n, 3 * sizeof(float));
    if (!out) return CELLSAM_ERR_NOMEM;
    for (size_t i = 0; i < n; i++) {
        const float *px = img->data + i * (size_t)C;
        if (mode == CS_CHANNELS_GREY) {
            float s = 0;
            for (int k = 0; k < C; k++) s += px[k];
            out[3 * i + 2] = s / (float)C;
        } else {
            for (int k = 0; k < 3; k++)
                if (src[k] >= 0) out[3 * i + (size_t)k] = px[src[k]];
        }
    }
    *hw3 = out;
    return CELLSAM_OK;
}
