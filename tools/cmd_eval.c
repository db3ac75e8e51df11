/* cellsam eval: score predicted label images against ground truth with the
 * paper's metric (src/metrics.h): per-image F1 / precision / recall at one IoU
 * threshold and AP over IoU 0.50:0.05:0.95, plus their means.
 *
 * Label images are read here with libpng / libtiff directly, as exact 32-bit
 * integers: cs_image_read (src/image_io.h) returns float samples (exact only up
 * to 2^24), expands palette PNGs to RGB and turns TIFF pages into channels, none
 * of which suits label images. TODO: use an integer label reader from image_io
 * if one is added there. */
#include <errno.h>
#include <jansson.h>
#include <png.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <tiffio.h>
#include <dirent.h>

#include "cli.h"
#include "common.h"
#include "metrics.h"
#include "npy.h"

#define CMD "eval"
#define MAX_LABEL_DIM 65536u
#define MAX_LABEL_PIXELS ((size_t)1 << 28)
#define MAX_DIR_ENTRIES 1000000

static void usage(FILE *f) {
    fprintf(f,
            "usage: cellsam eval GT PRED [--json] [--threshold T]\n"
            "\n"
            "Score predicted instance label images against ground truth with the CellSAM\n"
            "paper's metric. GT and PRED are label image files or folders of them.\n"
            "\n"
            "Label images (format by content): PNG (8/16-bit grayscale, or palette indices),\n"
            "TIFF (one page, one sample per pixel, 8/16/32-bit integer or integral float) or\n"
            ".npy (H x W integers or integral floats). 0 is background, every other value one\n"
            "instance; values need not be sequential. GT and PRED of a pair must have the\n"
            "same width and height.\n"
            "\n"
            "Pairing (folders):\n"
            "  GT files are the folder's NAME_masks.{png,tif,tiff,npy}; if it has none, every\n"
            "  .png/.tif/.tiff/.npy file is a GT file named by its stem (NAME.png -> NAME).\n"
            "  The prediction for NAME is the first file in PRED that exists of\n"
            "    NAME_masks, NAME_cp_masks, NAME_img_cp_masks (what `cellsam segment FOLDER`\n"
            "    writes for NAME_img.png), NAME_labels, NAME\n"
            "  each tried as .png, .tif, .tiff, .npy in that order (names are case-sensitive).\n"
            "  GT files without a prediction, and prediction files named *_masks, *_cp_masks\n"
            "  or *_labels that no GT file claims, are reported on stderr and skipped.\n"
            "  GT may be a file and PRED a folder (same lookup); two files are paired as is.\n"
            "\n"
            "Metric per image (paper_evaluation / Cellpose metrics):\n"
            "  labels renumbered; IoU of every overlapping (GT, prediction) pair; optimal\n"
            "  assignment on cost = -[IoU >= t] - IoU / (2 min(n_gt, n_pred)); TP = matched\n"
            "  pairs with IoU >= t, FP = n_pred - TP, FN = n_gt - TP;\n"
            "  precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = TP/(TP + (FP+FN)/2) at t;\n"
            "  AP(t') = TP/(TP+FP+FN) matched again at each t' = 0.50, 0.55, ..., 0.95, and\n"
            "  ap = the mean of those ten. Every 0/0 counts as 0, as in the paper (NaN -> 0):\n"
            "  an image where both GT and prediction are empty scores F1 = AP = 0.\n"
            "  The summary gives the mean over images of F1 (the paper's number) and of ap.\n"
            "\n"
            "Options:\n"
            "  --threshold T  IoU threshold t for tp/fp/fn, precision, recall, F1\n"
            "                 (0 < T <= 1; default 0.5). AP thresholds do not change.\n"
            "  --json         print one JSON object instead of the table:\n"
            "                 {threshold, n_images, mean_f1, mean_ap, mean_precision, mean_recall,\n"
            "                  ap_thresholds, images: [{name, gt, pred, n_gt, n_pred, tp, fp, fn,\n"
            "                  precision, recall, f1, ap, ap_per_threshold}]}\n"
            "  -h, --help     this text\n"
            "\n"
            "Exit status: 0 success; 1 an unreadable file, a size mismatch or nothing to pair\n"
            "(one-line message on stderr, nothing on stdout); 2 usage error.\n");
}

/* ------------------------------------------------------------ label images */

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

/* ------------------------------------------------------------ pairing */

typedef struct {
    char *name, *gt, *pred;
} pair_entry;

typedef struct {
    pair_entry *items;
    size_t n, cap;
} pair_list;

typedef struct {
    char **names;
    unsigned char *used;
    size_t n;
} dir_listing;

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static char *join_path(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (p) snprintf(p, a + b + 2, "%s%s%s", dir, (a && dir[a - 1] == '/') ? "" : "/", name);
    return p;
}

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Length of the stem if `name` ends in .png/.tif/.tiff/.npy (any case), else 0. */
static size_t label_stem_len(const char *name) {
    const char *dot = strrchr(name, '.');
    if (!dot || dot == name) return 0;
    if (strcasecmp(dot, ".png") && strcasecmp(dot, ".tif") && strcasecmp(dot, ".tiff") && strcasecmp(dot, ".npy"))
        return 0;
    return (size_t)(dot - name);
}

static int stem_has_suffix(const char *name, size_t stem_len, const char *suffix) {
    size_t s = strlen(suffix);
    return stem_len > s && !strncmp(name + stem_len - s, suffix, s);
}

static void listing_free(dir_listing *d) {
    for (size_t i = 0; i < d->n; i++) free(d->names[i]);
    free(d->names);
    free(d->used);
    memset(d, 0, sizeof *d);
}

/* Regular files (symlinks followed) with a label-image extension, sorted. */
static int list_label_files(const char *dir, dir_listing *out) {
    memset(out, 0, sizeof *out);
    DIR *d = opendir(dir);
    if (!d) return cs_error(CELLSAM_ERR_IO, "cannot open folder %s: %s", dir, strerror(errno));
    size_t cap = 0;
    int rc = CELLSAM_OK;
    struct dirent *ent;
    while ((ent = readdir(d))) {
        if (!label_stem_len(ent->d_name)) continue;
        char *full = join_path(dir, ent->d_name);
        struct stat st;
        int regular = full && stat(full, &st) == 0 && S_ISREG(st.st_mode);
        free(full);
        if (!regular) continue;
        if (out->n == MAX_DIR_ENTRIES) {
            rc = cs_error(CELLSAM_ERR_LIMIT, "folder %s has over %d label files", dir, MAX_DIR_ENTRIES);
            break;
        }
        if (out->n == cap) {
            size_t ncap = cap ? 2 * cap : 64;
            char **names = realloc(out->names, ncap * sizeof *names);
            if (!names) {
                rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory listing %s", dir);
                break;
            }
            out->names = names;
            cap = ncap;
        }
        if (!(out->names[out->n] = dup_str(ent->d_name))) {
            rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory listing %s", dir);
            break;
        }
        out->n++;
    }
    closedir(d);
    if (!rc && !(out->used = calloc(out->n ? out->n : 1, 1))) rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    if (rc) {
        listing_free(out);
        return rc;
    }
    if (out->n) qsort(out->names, out->n, sizeof *out->names, cmp_str);
    return CELLSAM_OK;
}

static long listing_find(const dir_listing *d, const char *name) {
    if (!d->n) return -1;
    char **hit = bsearch(&name, d->names, d->n, sizeof *d->names, cmp_str);
    return hit ? (long)(hit - d->names) : -1;
}

/* Prediction for NAME in a folder (see usage()), marking it used; -1 if none. */
static long find_prediction(dir_listing *pred, const char *name) {
    static const char *suffixes[] = {"_masks", "_cp_masks", "_img_cp_masks", "_labels", ""};
    static const char *exts[] = {".png", ".tif", ".tiff", ".npy"};
    size_t n = strlen(name) + 32;
    char *cand = malloc(n);
    if (!cand) return -1;
    long hit = -1;
    for (size_t s = 0; s < sizeof suffixes / sizeof *suffixes && hit < 0; s++)
        for (size_t e = 0; e < 4 && hit < 0; e++) {
            snprintf(cand, n, "%s%s%s", name, suffixes[s], exts[e]);
            hit = listing_find(pred, cand);
        }
    free(cand);
    if (hit >= 0) pred->used[hit] = 1;
    return hit;
}

static int pairs_add(pair_list *pl, const char *name, size_t name_len, char *gt, char *pred) {
    if (pl->n == pl->cap) {
        size_t ncap = pl->cap ? 2 * pl->cap : 64;
        pair_entry *items = realloc(pl->items, ncap * sizeof *items);
        if (!items) goto oom;
        pl->items = items;
        pl->cap = ncap;
    }
    char *nm = malloc(name_len + 1);
    if (!nm) goto oom;
    memcpy(nm, name, name_len);
    nm[name_len] = '\0';
    pl->items[pl->n++] = (pair_entry){nm, gt, pred};
    return CELLSAM_OK;
oom:
    free(gt);
    free(pred);
    return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
}

static void pairs_free(pair_list *pl) {
    for (size_t i = 0; i < pl->n; i++) {
        free(pl->items[i].name);
        free(pl->items[i].gt);
        free(pl->items[i].pred);
    }
    free(pl->items);
    memset(pl, 0, sizeof *pl);
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* NAME of a GT file: its stem without a trailing "_masks". */
static size_t gt_name_len(const char *file) {
    size_t stem = label_stem_len(file);
    if (!stem) {
        const char *dot = strrchr(file, '.');
        stem = dot && dot != file ? (size_t)(dot - file) : strlen(file);
    }
    if (stem_has_suffix(file, stem, "_masks")) stem -= 6;
    return stem;
}

static int build_pairs(const char *gt, const char *pred, pair_list *pl) {
    memset(pl, 0, sizeof *pl);
    int gt_dir = is_dir(gt), pred_dir = is_dir(pred);
    int rc;
    if (!gt_dir && !pred_dir) {
        char *g = dup_str(gt), *p = dup_str(pred);
        if (!g || !p) {
            free(g);
            free(p);
            return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        }
        const char *b = base_name(gt);
        return pairs_add(pl, b, gt_name_len(b), g, p);
    }
    if (gt_dir && !pred_dir)
        return cs_error(CELLSAM_ERR_INVALID, "GT %s is a folder but PRED %s is not", gt, pred);

    dir_listing pd;
    if ((rc = list_label_files(pred, &pd))) return rc;
    if (!gt_dir) {
        const char *b = base_name(gt);
        size_t len = gt_name_len(b);
        char *name = malloc(len + 1);
        if (!name) {
            listing_free(&pd);
            return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        }
        memcpy(name, b, len);
        name[len] = '\0';
        long hit = find_prediction(&pd, name);
        free(name);
        if (hit < 0) {
            rc = cs_error(CELLSAM_ERR_IO, "no prediction for %s in %s", gt, pred);
        } else {
            char *g = dup_str(gt), *p = join_path(pred, pd.names[hit]);
            rc = (g && p) ? pairs_add(pl, b, len, g, p) : cs_error(CELLSAM_ERR_NOMEM, "out of memory");
            if (!g || !p) free(g), free(p);
        }
        listing_free(&pd);
        return rc;
    }

    dir_listing gd;
    if ((rc = list_label_files(gt, &gd))) {
        listing_free(&pd);
        return rc;
    }
    int any_masks = 0;
    for (size_t i = 0; i < gd.n; i++)
        if (stem_has_suffix(gd.names[i], label_stem_len(gd.names[i]), "_masks")) any_masks = 1;
    for (size_t i = 0; i < gd.n && !rc; i++) {
        const char *f = gd.names[i];
        size_t stem = label_stem_len(f);
        if (any_masks && !stem_has_suffix(f, stem, "_masks")) continue;
        size_t len = gt_name_len(f);
        char *name = malloc(len + 1);
        if (!name) {
            rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory");
            break;
        }
        memcpy(name, f, len);
        name[len] = '\0';
        long hit = find_prediction(&pd, name);
        free(name);
        if (hit < 0) {
            fprintf(stderr, "cellsam eval: warning: no prediction for GT %s/%s; skipped\n", gt, f);
            continue;
        }
        char *g = join_path(gt, f), *p = join_path(pred, pd.names[hit]);
        if (!g || !p) {
            free(g);
            free(p);
            rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory");
            break;
        }
        rc = pairs_add(pl, f, len, g, p);
    }
    for (size_t i = 0; i < pd.n && !rc; i++) {
        const char *f = pd.names[i];
        size_t stem = label_stem_len(f);
        if (!pd.used[i] && (stem_has_suffix(f, stem, "_masks") || stem_has_suffix(f, stem, "_cp_masks") ||
                            stem_has_suffix(f, stem, "_labels")))
            fprintf(stderr, "cellsam eval: warning: prediction %s/%s has no GT; skipped\n", pred, f);
    }
    listing_free(&gd);
    listing_free(&pd);
    if (rc) pairs_free(pl);
    return rc;
}

/* ------------------------------------------------------------ output */

static void print_table(const pair_list *pl, const cs_match_stats *st, double th) {
    int width = 4;
    for (size_t i = 0; i < pl->n; i++) {
        int len = (int)strlen(pl->items[i].name);
        if (len > width) width = len;
    }
    if (width > 72) width = 72;
    printf("%-*s %7s %7s %7s %7s %7s %9s %7s %7s %7s\n", width, "name", "n_gt", "n_pred", "tp", "fp", "fn",
           "precision", "recall", "f1", "ap");
    double sum_f1 = 0, sum_ap = 0;
    for (size_t i = 0; i < pl->n; i++) {
        const cs_match_stats *s = &st[i];
        printf("%-*s %7d %7d %7d %7d %7d %9.4f %7.4f %7.4f %7.4f\n", width, pl->items[i].name, s->n_gt, s->n_pred,
               s->tp, s->fp, s->fn, s->precision, s->recall, s->f1, s->mean_ap);
        sum_f1 += s->f1;
        sum_ap += s->mean_ap;
    }
    printf("mean F1 %.4f  mean AP %.4f  over %zu image%s (F1 at IoU %.2f; AP = mean over IoU 0.50:0.05:0.95)\n",
           sum_f1 / (double)pl->n, sum_ap / (double)pl->n, pl->n, pl->n == 1 ? "" : "s", th);
}

static int print_json(const pair_list *pl, const cs_match_stats *st, double th) {
    json_t *root = json_object(), *images = json_array(), *ths = json_array();
    if (!root || !images || !ths) goto oom;
    double sum_f1 = 0, sum_ap = 0, sum_p = 0, sum_r = 0;
    for (int k = 0; k < CS_AP_THRESHOLDS; k++)
        if (json_array_append_new(ths, json_real(cs_ap_threshold(k)))) goto oom;
    for (size_t i = 0; i < pl->n; i++) {
        const cs_match_stats *s = &st[i];
        json_t *img = json_object(), *aps = json_array();
        if (!img || !aps) {
            json_decref(img);
            json_decref(aps);
            goto oom;
        }
        for (int k = 0; k < CS_AP_THRESHOLDS; k++) json_array_append_new(aps, json_real(s->ap[k]));
        json_object_set_new(img, "name", json_string(pl->items[i].name));
        json_object_set_new(img, "gt", json_string(pl->items[i].gt));
        json_object_set_new(img, "pred", json_string(pl->items[i].pred));
        json_object_set_new(img, "n_gt", json_integer(s->n_gt));
        json_object_set_new(img, "n_pred", json_integer(s->n_pred));
        json_object_set_new(img, "tp", json_integer(s->tp));
        json_object_set_new(img, "fp", json_integer(s->fp));
        json_object_set_new(img, "fn", json_integer(s->fn));
        json_object_set_new(img, "precision", json_real(s->precision));
        json_object_set_new(img, "recall", json_real(s->recall));
        json_object_set_new(img, "f1", json_real(s->f1));
        json_object_set_new(img, "ap", json_real(s->mean_ap));
        json_object_set_new(img, "ap_per_threshold", aps);
        if (json_array_append_new(images, img)) goto oom;
        sum_f1 += s->f1;
        sum_ap += s->mean_ap;
        sum_p += s->precision;
        sum_r += s->recall;
    }
    double n = (double)pl->n;
    json_object_set_new(root, "threshold", json_real(th));
    json_object_set_new(root, "n_images", json_integer((json_int_t)pl->n));
    json_object_set_new(root, "mean_f1", json_real(sum_f1 / n));
    json_object_set_new(root, "mean_ap", json_real(sum_ap / n));
    json_object_set_new(root, "mean_precision", json_real(sum_p / n));
    json_object_set_new(root, "mean_recall", json_real(sum_r / n));
    json_object_set_new(root, "ap_thresholds", ths);
    json_object_set_new(root, "images", images);
    ths = images = NULL;
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    json_decref(root);
    if (!text) return cs_error(CELLSAM_ERR_NOMEM, "out of memory writing JSON");
    printf("%s\n", text);
    free(text);
    return CELLSAM_OK;
oom:
    json_decref(root);
    json_decref(images);
    json_decref(ths);
    return cs_error(CELLSAM_ERR_NOMEM, "out of memory writing JSON");
}

/* ------------------------------------------------------------ command */

static int evaluate_pair(const pair_entry *pe, double th, cs_match_stats *st) {
    label_image g, p;
    int rc = read_labels(pe->gt, &g);
    if (rc) return cs_error_prefix(rc, "cannot read GT label image");
    rc = read_labels(pe->pred, &p);
    if (rc) {
        free(g.labels);
        return cs_error_prefix(rc, "cannot read predicted label image");
    }
    if (g.width != p.width || g.height != p.height)
        rc = cs_error(CELLSAM_ERR_INVALID, "size mismatch: GT %s is %ux%u, prediction %s is %ux%u", pe->gt,
                      g.width, g.height, pe->pred, p.width, p.height);
    else
        rc = cs_evaluate_labels_at(g.labels, p.labels, (size_t)g.width * g.height, th, st);
    free(g.labels);
    free(p.labels);
    return rc;
}

int cmd_eval(int argc, char **argv) {
    const char *gt = NULL, *pred = NULL;
    int json = 0;
    double th = 0.5;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (!strcmp(a, "--threshold") || !strncmp(a, "--threshold=", 12)) {
            const char *v = a[11] == '=' ? a + 12 : (i + 1 < argc ? argv[++i] : NULL);
            char *end;
            errno = 0;
            th = v ? strtod(v, &end) : 0;
            if (!v || errno || end == v || *end || !(th > 0 && th <= 1)) {
                cli_error(CMD, "--threshold needs a number in (0, 1], got '%s'", v ? v : "");
                return 2;
            }
        } else if (a[0] == '-' && a[1]) {
            cli_error(CMD, "unknown option '%s' (see 'cellsam eval --help')", a);
            return 2;
        } else if (!gt) {
            gt = a;
        } else if (!pred) {
            pred = a;
        } else {
            cli_error(CMD, "unexpected argument '%s' (see 'cellsam eval --help')", a);
            return 2;
        }
    }
    if (!gt || !pred) {
        cli_error(CMD, "need GT and PRED (see 'cellsam eval --help')");
        return 2;
    }
    pair_list pl;
    if (build_pairs(gt, pred, &pl)) {
        cli_error(CMD, "%s", cellsam_last_error());
        return 1;
    }
    if (pl.n == 0) {
        cli_error(CMD, "no GT file in %s has a prediction in %s (see the pairing rule in --help)", gt, pred);
        pairs_free(&pl);
        return 1;
    }
    cs_match_stats *st = calloc(pl.n, sizeof *st);
    int status = 0;
    if (!st) {
        cli_error(CMD, "out of memory");
        status = 1;
    }
    for (size_t i = 0; i < pl.n && !status; i++)
        if (evaluate_pair(&pl.items[i], th, &st[i])) {
            cli_error(CMD, "%s", cellsam_last_error());
            status = 1;
        }
    if (!status) {
        if (json) {
            if (print_json(&pl, st, th)) {
                cli_error(CMD, "%s", cellsam_last_error());
                status = 1;
            }
        } else {
            print_table(&pl, st, th);
        }
        if (fflush(stdout) != 0 || ferror(stdout)) {
            cli_error(CMD, "writing the output failed");
            status = 1;
        }
    }
    free(st);
    pairs_free(&pl);
    return status;
}
