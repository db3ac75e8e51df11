/* cellsam segment: image file (or folder) -> label image, CSV, overlay. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "common.h"
#include "image_io.h"
#include "model.h"
#include "pipeline.h"
#include "postprocess.h"

typedef struct {
    const char *model, *config, *out, *csv, *overlay, *boxes_file, *boxes_labels;
    int nuclear, cell, grey, threads, overwrite, quiet, stream, weights, precision;
    int labels_w, labels_h; /* size of the --boxes-from label image (the image's, checked) */
    cellsam_segment_params sp;
} seg_opts;

static void usage(void) {
    printf(
        "usage: cellsam segment -m CKPT [--config JSON] IMAGE -o LABELS [options]\n"
        "       cellsam segment -m CKPT [--config JSON] FOLDER [-o OUTDIR] [options]\n\n"
        "Segment cells: writes a label image (0 = background, 1..N = cells).\n"
        "  IMAGE           TIFF (8/16/32-bit, float, multi-page, OME, tiled, BigTIFF), PNG, JPEG or .npy\n"
        "  -o LABELS       .png (16-bit), .tif (16- or 32-bit when labels exceed 65535) or .npy\n"
        "  --csv FILE      one row per cell: label, bbox, area, centroid, detector score, predicted IoU\n"
        "  --overlay PNG   outlines over the contrast-stretched image\n"
        "  --boxes FILE    skip CellFinder and prompt with your boxes (one 'x1,y1,x2,y2' per line,\n"
        "                  image pixels), each once: at the cell size --diameter gives (default: the\n"
        "                  model's; 'auto' = the boxes' median sqrt(w h)), in the network-input\n"
        "                  window around the box on large images; with --diameter 0 or --no-tiling,\n"
        "                  on the whole image stretched to 1024 x 1024, as the official code\n"
        "  --boxes-from LABELS  the same, with the bounding box of every label of a label image of\n"
        "                  the same size (re-segment existing labels; score the mask branch alone)\n"
        "Channels (1-based, 0 = none; like Cellpose --chan/--chan2):\n"
        "  --nuclear N     channel holding the nuclear stain\n"
        "  --cell N        channel holding the whole-cell / membrane / cytoplasm stain\n"
        "  --grey          average all channels into one (RGB brightfield, H&E)\n"
        "  default         as the official code: 1 channel = whole-cell, 2 channels = (nuclear,\n"
        "                  whole-cell), 3 channels = (blank, nuclear, whole-cell) / RGB as is\n"
        "  examples        grey image: nothing to set; DAPI in 1 + membrane in 2: --nuclear 1 --cell 2;\n"
        "                  nuclei only in channel 3 of an RGB file: --nuclear 3; H&E: --grey\n"
        "Modes:\n"
        "  --tiled         tiled whole-slide mode, as the official pipeline: blocks of --block-size\n"
        "                  (400) with --overlap (56) halo, IoU --link-iou (0.5) linking across tiles\n"
        "  --no-tiling     the whole image at once (official segment_cellular_image)\n"
        "  (default)       what the model's metadata recommends: cellsam-trained models segment\n"
        "                  images up to a side length whole (the bundled model: 1024) and tile\n"
        "                  larger ones; the official checkpoint always tiles, as the official pipeline\n"
        "  --diameter D    cells are about D pixels across (like Cellpose's --diameter): segment at\n"
        "                  the zoom that shows them at the model's cell diameter (cellsam info), edge-\n"
        "                  padding a small image to a square rather than stretching it; 'auto' sizes\n"
        "                  them by a first pass (median over the central 1024 x 1024). Zoom limits 1/4..4;\n"
        "                  replaces the mode chosen above. 0 = off. Default: what the model's metadata\n"
        "                  recommends in its own mode (the bundled model: auto; the official: off);\n"
        "                  --tiled / --no-tiling are the official modes, unzoomed\n"
        "  --mirror-halo   mirror the image at its borders instead of the official wrap-around\n"
        "  --stream        read regions and write label rows as tiles finish (bounded memory);\n"
        "                  automatic above 4096 x 4096 pixels. The CSV then has no score/IoU columns\n"
        "                  filled (0) and --overlay is unavailable\n"
        "Thresholds: --bbox-threshold 0.4  --iou-threshold 0.5  --min-size 25  --remove-boundaries\n"
        "  --box-nms IOU   drop a detected box overlapping a higher-scored one by IoU > IOU before\n"
        "                  decoding (0 = off, the official behaviour). Default: what the model's\n"
        "                  metadata recommends (the bundled model: 0.15; `cellsam info` shows\n"
        "                  it), else off\n"
        "            --no-normalize (skip the percentile clip + CLAHE)\n"
        "  --full-masks    upscale every mask on the whole image, as the official code, instead of\n"
        "                  around its box (grown while the mask reaches the border: only parts cut\n"
        "                  off from the box by background are lost); slower per cell\n"
        "  --direct-decoder  decode each box's image tokens on its own, as the official code,\n"
        "                  instead of sharing their products between a tile's boxes (12 or more):\n"
        "                  the same in exact arithmetic, float32 rounding differs; slower per cell\n"
        "Other: --threads N (default: all cores)  --overwrite  --quiet\n"
        "       --weights f16|bf16  keep the ViT matrices in 16 bits (half the weight memory;\n"
        "                  opt-in, compute stays float32; deviation measured in README)\n"
        "       --precision bf16  ViT matrix products with bfloat16 inputs and float32 sums: about\n"
        "                  twice as fast on CPUs with AVX512-BF16 (opt-in; deviation measured in README)\n"
        "       --precision int8  ViT block matrices in 8-bit integers (7-bit weights per column, 8-bit\n"
        "                  inputs per token, exact sums): faster on any AVX2 CPU (opt-in; deviation in README)\n"
        "Folders: every image in FOLDER (not *_masks.*, *_cp_masks.*) is segmented into\n"
        "  OUTDIR/NAME_cp_masks.png (Cellpose-style names; default OUTDIR = FOLDER), with\n"
        "  NAME_cp_cells.csv / NAME_cp_overlay.png when --csv / --overlay is given (any value);\n"
        "  existing outputs are skipped unless --overwrite. Progress goes to stderr.\n"
        "Zero cells is not an error: an all-zero label image is written and '0 cells' reported.\n");
}

static int read_boxes(const char *path, cellsam_box **boxes, int *n) {
    FILE *f = fopen(path, "r");
    if (!f) return cs_error(CELLSAM_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    int cap = 64, k = 0;
    cellsam_box *b = malloc((size_t)cap * sizeof *b);
    char line[512];
    int lineno = 0, rc = CELLSAM_OK;
    while (b && fgets(line, sizeof line, f)) {
        lineno++;
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        if (*p == '#' || *p == '\n' || *p == '\r' || !*p) continue;
        float v[4];
        for (char *q = p; *q; q++)
            if (*q == ' ' || *q == '\t' || *q == ';') *q = ',';
        p[strcspn(p, "\r\n")] = 0;
        if (cli_parse_floats(p, v, 4) || v[2] < v[0] || v[3] < v[1]) {
            rc = cs_error(CELLSAM_ERR_FORMAT, "%s:%d: expected x1,y1,x2,y2 with x1<=x2, y1<=y2", path, lineno);
            break;
        }
        if (k == cap) {
            if (cap >= 1000000) {
                rc = cs_error(CELLSAM_ERR_LIMIT, "%s: too many boxes", path);
                break;
            }
            cap *= 2;
            cellsam_box *nb = realloc(b, (size_t)cap * sizeof *nb);
            if (!nb) break;
            b = nb;
        }
        b[k++] = (cellsam_box){v[0], v[1], v[2], v[3]};
    }
    fclose(f);
    if (!b) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    if (rc) {
        free(b);
        return rc;
    }
    *boxes = b;
    *n = k;
    return CELLSAM_OK;
}

/* --boxes-from: the bounding box of every label of a label image. */
static int read_label_boxes(const char *path, cellsam_box **boxes, int *n, int *w, int *h) {
    uint32_t *labels = NULL;
    int rc = cs_read_labels(path, &labels, w, h);
    if (rc) return rc;
    rc = cs_label_boxes(labels, *h, *w, boxes, n);
    free(labels);
    return rc; /* no labels: no boxes, and zero cells, as with an empty --boxes file */
}

static int write_csv(const char *path, const cellsam_result *r) {
    cs_atomic_file af;
    int rc = cs_atomic_open(&af, path);
    if (rc) return rc;
    fprintf(af.f, "label,x0,y0,x1,y1,area,centroid_x,centroid_y,score,predicted_iou\n");
    for (int i = 0; i < r->n_cells; i++) {
        const cellsam_cell *c = &r->cells[i];
        fprintf(af.f, "%u,%d,%d,%d,%d,%lld,%.3f,%.3f,%.6f,%.6f\n", c->label, c->x0, c->y0, c->x1, c->y1,
                (long long)c->area, c->cx, c->cy, c->score, c->iou);
    }
    return cs_atomic_commit(&af);
}

static void progress_cb(int done, int total, void *user) {
    (void)user;
    fprintf(stderr, "\r  tiles %d/%d", done, total);
    if (done == total) fputc('\n', stderr);
}

/* ---- streaming tiled mode: regions read on demand, label rows written as they are final ---- */

typedef struct {
    cs_image_reader *reader;
    const seg_opts *o;
    cs_label_stream *out;
    cs_cell_acc acc; /* per-label statistics for --csv */
    int width;
} stream_ctx;

static int stream_read(void *user, int x0, int y0, int w, int h, float *out_hw3) {
    stream_ctx *s = user;
    cs_image reg;
    int rc = cs_image_reader_read_region(s->reader, x0, y0, w, h, &reg);
    if (rc) return rc;
    float *hw3 = NULL;
    rc = cs_image_to_model_input(&reg, s->o->nuclear, s->o->cell, s->o->grey ? CS_CHANNELS_GREY : CS_CHANNELS_OFFICIAL, &hw3);
    if (!rc) memcpy(out_hw3, hw3, (size_t)w * h * 3 * sizeof(float));
    free(hw3);
    cs_image_free(&reg);
    return rc;
}

static int stream_write(void *user, int y0, int n_rows, const uint32_t *rows) {
    stream_ctx *s = user;
    int rc = cs_label_stream_write(s->out, rows, n_rows);
    if (rc || !s->o->csv) return rc;
    return cs_cell_acc_rows(&s->acc, rows, y0, n_rows, s->width);
}

/* --diameter auto on a streamed image: read only the central region that
 * cellsam_estimate_diameter crops (so it crops nothing more), size its cells, then
 * stream at the zoom they give. */
static int estimate_stream_diameter(cellsam_context *ctx, stream_ctx *s, const cs_image_info *info,
                                    cellsam_segment_params *sp) {
    const int side = CELLSAM_DIAMETER_ESTIMATE_SIDE;
    const int w = info->width < side ? info->width : side, h = info->height < side ? info->height : side;
    float *hw3 = cs_alloc((size_t)w * (size_t)h, 3 * sizeof(float));
    if (!hw3) return CELLSAM_ERR_NOMEM;
    int rc = stream_read(s, (info->width - w) / 2, (info->height - h) / 2, w, h, hw3);
    float d = 0;
    cellsam_segment_params q = *sp;
    q.tiled = s->o->sp.tiled; /* the crop in the mode the user or the model chose, as in memory */
    q.progress = NULL;
    if (!rc) rc = cellsam_estimate_diameter(ctx, hw3, w, h, 3, &q, &d);
    free(hw3);
    if (!rc && !s->o->quiet) {
        if (d > 0) fprintf(stderr, "cell diameter: %.1f px (estimated on the central %d x %d)\n", d, w, h);
        else fprintf(stderr, "cell diameter: too few cells in the central %d x %d to size; the mode's own scale\n", w, h);
    }
    sp->diameter = d;
    return rc;
}

static int segment_file_stream(cellsam_context *ctx, const seg_opts *o, const char *in, const char *out,
                               const char *csv, int *n_cells) {
    stream_ctx s;
    memset(&s, 0, sizeof s);
    s.o = o;
    if (cs_image_reader_open(in, &s.reader)) {
        cli_error("segment", "%s", cellsam_last_error());
        return 1;
    }
    cs_image_info info;
    cs_image_reader_info(s.reader, &info);
    s.width = info.width;
    double t0 = cs_now_seconds();
    int rc = cs_label_stream_open(out, info.width, info.height, &s.out);
    cellsam_segment_params sp = o->sp;
    sp.tiled = 1; /* streaming is tiled */
    sp.diameter = cellsam_model_diameter(ctx->model, o->sp.diameter, o->sp.tiled); /* the user's mode */
    if (!rc && sp.diameter < 0) rc = estimate_stream_diameter(ctx, &s, &info, &sp);
    if (!o->quiet) sp.progress = progress_cb;
    int n_boxes = 0;
    uint32_t max_label = 0;
    if (!rc) rc = cs_segment_tiled_stream(ctx, info.height, info.width, stream_read, &s, stream_write, &s, &sp, &n_boxes, &max_label);
    if (!rc) {
        rc = cs_label_stream_close(s.out);
        s.out = NULL;
    }
    int n = 0;
    cellsam_result r;
    memset(&r, 0, sizeof r);
    if (!rc) rc = cs_cell_acc_finish(&s.acc, NULL, NULL, 0, &r.cells, &r.n_cells);
    n = r.n_cells;
    if (!rc && csv) rc = write_csv(csv, &r);
    free(r.cells);
    if (rc) cli_error("segment", "%s: %s", in, cellsam_last_error());
    else if (!o->quiet)
        fprintf(stderr, "%s: %s%d cell%s (%d boxes) in %.1f s, streamed -> %s\n", in, csv ? "" : "labels up to ",
                csv ? n : (int)max_label, (csv ? n : (int)max_label) == 1 ? "" : "s", n_boxes, cs_now_seconds() - t0, out);
    *n_cells = csv ? n : (int)max_label;
    if (s.out) cs_label_stream_abort(s.out);
    cs_cell_acc_free(&s.acc);
    cs_image_reader_close(s.reader);
    return rc ? 1 : 0;
}

/* Whole-slide sizes stream through the tiler instead of being held in memory. */
#define STREAM_PIXELS ((int64_t)4096 * 4096)

/* Segment one file; returns 0 ok, 1 error (message printed). */
static int segment_file(cellsam_context *ctx, const seg_opts *o, const char *in, const char *out,
                        const char *csv, const char *overlay, int *n_cells) {
    int pw, ph, pc;
    const int probed = cs_image_probe(in, &pw, &ph, &pc) == 0;
    const int big = probed && (int64_t)pw * ph > STREAM_PIXELS;
    /* streaming is a tiled mode: --stream and whole-slide sizes tile unless told not to;
     * user boxes are prompted on the image in memory */
    const int tiled = o->sp.boxes ? 0
                      : o->sp.tiled >= 0 ? o->sp.tiled
                      : (o->stream || big) ? 1
                      : cellsam_model_tiling(ctx->model, -1, probed ? pw : 1 << 30, probed ? ph : 1 << 30);
    if (tiled && (o->stream || big)) {
        if (overlay) {
            cli_error("segment", "%s: --overlay is not available for streamed (whole-slide) images", in);
            return 1;
        }
        return segment_file_stream(ctx, o, in, out, csv, n_cells);
    }
    cs_image img;
    if (cs_image_read(in, &img)) {
        cli_error("segment", "%s", cellsam_last_error());
        return 1;
    }
    if (o->labels_w && (img.width != o->labels_w || img.height != o->labels_h)) {
        cli_error("segment", "%s is %d x %d but the --boxes-from labels are %d x %d", in, img.width, img.height,
                  o->labels_w, o->labels_h);
        cs_image_free(&img);
        return 1;
    }
    float *hw3 = NULL;
    if (cs_image_to_model_input(&img, o->nuclear, o->cell, o->grey ? CS_CHANNELS_GREY : CS_CHANNELS_OFFICIAL, &hw3)) {
        cli_error("segment", "%s: %s", in, cellsam_last_error());
        cs_image_free(&img);
        return 1;
    }
    cellsam_result *r = NULL;
    cellsam_segment_params sp = o->sp; /* tiled -1 stays: the library applies the model's
                                           mode and, with it, the model's cell sizing */
    if (!o->quiet) sp.progress = progress_cb;
    int rc = cellsam_segment(ctx, hw3, img.width, img.height, 3, &sp, &r);
    free(hw3);
    if (!rc) rc = cs_write_labels(out, r->labels, r->width, r->height);
    if (!rc && csv) rc = write_csv(csv, r);
    if (!rc && overlay) rc = cs_write_overlay_png(overlay, &img, -1, r->labels);
    if (rc) cli_error("segment", "%s: %s", in, cellsam_last_error());
    else {
        *n_cells = r->n_cells;
        if (!o->quiet)
            fprintf(stderr,
                    "%s: %d cell%s (%d boxes) in %.1f s (pre-processing %.2f, encoder %.2f, detector %.2f, "
                    "decoder %.2f, post-processing %.2f) -> %s\n",
                    in, r->n_cells, r->n_cells == 1 ? "" : "s", r->n_boxes_detected, r->seconds, r->t_preprocess,
                    r->t_encoder, r->t_detector, r->t_decoder, r->t_postprocess, out);
        if (!o->quiet && r->zoom > 0)
            fprintf(stderr, "%s: cell diameter %.1f px, zoom %.2f\n", in, r->diameter, r->zoom);
    }
    cellsam_result_free(r);
    cs_image_free(&img);
    return rc ? 1 : 0;
}

static int is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static int exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0;
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcasecmp(s + a - b, suf);
}

static int is_input_image(const char *name) {
    const char *exts[] = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy"};
    int ok = 0;
    for (size_t i = 0; i < sizeof exts / sizeof exts[0]; i++) ok |= ends_with(name, exts[i]);
    if (!ok || name[0] == '.') return 0;
    /* outputs and ground truth are not inputs */
    return !strstr(name, "_masks.") && !strstr(name, "_cp_overlay.") && !strstr(name, "_labels.");
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int cmd_segment(int argc, char **argv) {
    seg_opts o;
    memset(&o, 0, sizeof o);
    o.sp = cellsam_segment_default_params();
    o.threads = cli_default_threads();
    const char *input = NULL;
    cellsam_box *boxes = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        float f;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        }
#define NEED_VALUE()                                          \
    do {                                                      \
        if (!v) {                                             \
            cli_error("segment", "%s needs a value", a);      \
            return 2;                                         \
        }                                                     \
        i++;                                                  \
    } while (0)
#define INT_OPT(flag, lo, hi, dst)                                              \
    else if (!strcmp(a, flag)) {                                                \
        NEED_VALUE();                                                           \
        if (cli_parse_int(v, lo, hi, dst)) {                                    \
            cli_error("segment", "%s needs a whole number from %d to %d", a, lo, hi); \
            return 2;                                                           \
        }                                                                       \
    }
#define FLOAT_OPT(flag, lo, hi, dst)                                            \
    else if (!strcmp(a, flag)) {                                                \
        NEED_VALUE();                                                           \
        if (cli_parse_floats(v, &f, 1) || f < lo || f > hi) {                   \
            cli_error("segment", "%s needs a number from %g to %g", a, lo, hi); \
            return 2;                                                           \
        }                                                                       \
        *(dst) = f;                                                             \
    }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { NEED_VALUE(); o.model = v; }
        else if (!strcmp(a, "--config")) { NEED_VALUE(); o.config = v; }
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) { NEED_VALUE(); o.out = v; }
        else if (!strcmp(a, "--csv")) { NEED_VALUE(); o.csv = v; }
        else if (!strcmp(a, "--overlay")) { NEED_VALUE(); o.overlay = v; }
        else if (!strcmp(a, "--boxes")) { NEED_VALUE(); o.boxes_file = v; }
        else if (!strcmp(a, "--boxes-from")) { NEED_VALUE(); o.boxes_labels = v; }
        else if (!strcmp(a, "--no-tiling")) o.sp.tiled = 0;
        else if (!strcmp(a, "--tiled")) o.sp.tiled = 1;
        else if (!strcmp(a, "--mirror-halo")) o.sp.halo_mirror = 1;
        else if (!strcmp(a, "--remove-boundaries")) o.sp.remove_boundaries = 1;
        else if (!strcmp(a, "--full-masks")) o.sp.full_masks = 1;
        else if (!strcmp(a, "--direct-decoder")) o.sp.direct_decoder = 1;
        else if (!strcmp(a, "--no-normalize")) o.sp.normalize = 0;
        else if (!strcmp(a, "--grey") || !strcmp(a, "--gray")) o.grey = 1;
        else if (!strcmp(a, "--overwrite")) o.overwrite = 1;
        else if (!strcmp(a, "--stream")) o.stream = 1;
        else if (!strcmp(a, "--weights")) {
            NEED_VALUE();
            if ((o.weights = cli_parse_weights(v)) < 0) {
                cli_error("segment", "--weights must be f32, f16 or bf16");
                return 2;
            }
        }
        else if (!strcmp(a, "--precision")) {
            NEED_VALUE();
            if ((o.precision = cli_parse_precision("segment", v)) < 0) return 2;
        }
        else if (!strcmp(a, "--quiet") || !strcmp(a, "-q")) o.quiet = 1;
        else if (!strcmp(a, "--diameter")) {
            NEED_VALUE();
            if (!strcmp(v, "auto")) o.sp.diameter = CELLSAM_DIAMETER_AUTO;
            else if (cli_parse_floats(v, &f, 1) || !(f >= 0 && f <= 100000)) {
                cli_error("segment", "--diameter needs a cell diameter in pixels (0 = off) or 'auto'");
                return 2;
            } else o.sp.diameter = f;
        }
        INT_OPT("--nuclear", 0, 64, &o.nuclear)
        INT_OPT("--cell", 0, 64, &o.cell)
        INT_OPT("--threads", 1, 256, &o.threads)
        INT_OPT("--block-size", 64, 8192, &o.sp.block_size)
        INT_OPT("--overlap", 0, 1024, &o.sp.overlap)
        INT_OPT("--iou-depth", 0, 1024, &o.sp.iou_depth)
        INT_OPT("--min-size", 0, 1000000, &o.sp.min_size)
        FLOAT_OPT("--bbox-threshold", 0.0, 1.0, &o.sp.bbox_threshold)
        FLOAT_OPT("--iou-threshold", -10.0, 10.0, &o.sp.iou_threshold)
        FLOAT_OPT("--link-iou", 0.0, 1.0, &o.sp.link_iou)
        FLOAT_OPT("--box-nms", 0.0, 1.0, &o.sp.box_nms_iou)
        else if (a[0] != '-' && !input) input = a;
        else {
            cli_error("segment", "unexpected argument '%s' (see --help)", a);
            return 2;
        }
    }
    if (!input) {
        cli_error("segment", "no input image (see --help)");
        return 2;
    }
    if (!o.model) o.model = cli_default_model();
    if (!o.model) {
        cli_error("segment", "no model: give -m CKPT, set CELLSAM_MODEL, or keep models/" CELLSAM_DEFAULT_MODEL_NAME " beside the build");
        return 2;
    }
    if (o.grey && (o.nuclear || o.cell)) {
        cli_error("segment", "--grey cannot be combined with --nuclear/--cell");
        return 2;
    }
    int folder = is_dir(input);
    if (!folder && !o.out) {
        cli_error("segment", "-o LABELS is required for a single image");
        return 2;
    }
    o.sp.n_threads = o.threads;
    if (o.boxes_file || o.boxes_labels) {
        const char *flag = o.boxes_file ? "--boxes" : "--boxes-from";
        if (o.boxes_file && o.boxes_labels) {
            cli_error("segment", "give --boxes or --boxes-from, not both");
            return 2;
        }
        if (folder || o.stream || o.sp.tiled == 1) {
            cli_error("segment", "%s works on a single image held in memory (not with a folder, --stream or --tiled)",
                      flag);
            return 2;
        }
        if (o.boxes_file ? read_boxes(o.boxes_file, &boxes, &o.sp.n_boxes)
                         : read_label_boxes(o.boxes_labels, &boxes, &o.sp.n_boxes, &o.labels_w, &o.labels_h)) {
            cli_error("segment", "%s", cellsam_last_error());
            return 1;
        }
        o.sp.boxes = boxes;
    }
    cellsam_model_params mp = cellsam_model_default_params();
    mp.config_path = o.config;
    mp.weights_dtype = o.weights;
    mp.compute_dtype = o.precision;
    mp.n_threads = o.threads;
    cellsam_model *m = NULL;
    cellsam_context *ctx = NULL;
    if (cellsam_model_load(o.model, &mp, &m) || cellsam_context_new(m, &ctx)) {
        cli_error("segment", "%s", cellsam_last_error());
        cellsam_model_free(m);
        free(boxes);
        return 1;
    }
    int status = 0, n_cells = 0;
    if (!folder) {
        status = segment_file(ctx, &o, input, o.out, o.csv, o.overlay, &n_cells);
        if (!status && n_cells == 0 && !o.quiet) fprintf(stderr, "cellsam segment: 0 cells found\n");
    } else {
        const char *outdir = o.out ? o.out : input;
        if (!is_dir(outdir) && mkdir(outdir, 0777) != 0) {
            cli_error("segment", "cannot create output folder %s: %s", outdir, strerror(errno));
            status = 1;
            goto out;
        }
        DIR *d = opendir(input);
        if (!d) {
            cli_error("segment", "cannot read folder %s: %s", input, strerror(errno));
            status = 1;
            goto out;
        }
        char **names = NULL;
        size_t n = 0, cap = 0;
        struct dirent *de;
        while ((de = readdir(d))) {
            if (!is_input_image(de->d_name)) continue;
            if (n == cap) {
                cap = cap ? cap * 2 : 64;
                char **nn = realloc(names, cap * sizeof *nn);
                if (!nn) break;
                names = nn;
            }
            names[n++] = strdup(de->d_name);
        }
        closedir(d);
        qsort(names, n, sizeof *names, cmp_str);
        int done = 0, skipped = 0, failed = 0, total_cells = 0;
        double t0 = cs_now_seconds();
        for (size_t i = 0; i < n; i++) {
            char in[4096], outp[4096], csvp[4096], ovp[4096], stem[1024];
            snprintf(stem, sizeof stem, "%s", names[i]);
            char *dot = strrchr(stem, '.');
            if (dot) *dot = 0;
            snprintf(in, sizeof in, "%s/%s", input, names[i]);
            snprintf(outp, sizeof outp, "%s/%s_cp_masks.png", outdir, stem);
            snprintf(csvp, sizeof csvp, "%s/%s_cp_cells.csv", outdir, stem);
            snprintf(ovp, sizeof ovp, "%s/%s_cp_overlay.png", outdir, stem);
            if (!o.quiet) fprintf(stderr, "[%zu/%zu] %s\n", i + 1, n, names[i]);
            if (!o.overwrite && exists(outp)) {
                skipped++;
                continue;
            }
            int c = 0;
            seg_opts oq = o;
            oq.quiet = 1;
            if (segment_file(ctx, &oq, in, outp, o.csv ? csvp : NULL, o.overlay ? ovp : NULL, &c)) failed++;
            else {
                done++;
                total_cells += c;
                if (!o.quiet) fprintf(stderr, "        %d cells\n", c);
            }
        }
        for (size_t i = 0; i < n; i++) free(names[i]);
        free(names);
        fprintf(stderr, "cellsam segment: %d segmented, %d skipped (exist; --overwrite), %d failed, %d cells, %.1f s\n",
                done, skipped, failed, total_cells, cs_now_seconds() - t0);
        status = failed ? 1 : 0;
        if (n == 0) {
            cli_error("segment", "no images found in %s", input);
            status = 1;
        }
    }
out:
    cellsam_context_free(ctx);
    cellsam_model_free(m);
    free(boxes);
    return status;
}
