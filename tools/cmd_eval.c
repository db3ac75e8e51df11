/* cellsam eval: score predicted label images against ground truth with the
 * paper's metric (src/metrics.h): per-image F1 / precision / recall at one IoU
 * threshold and AP over IoU 0.50:0.05:0.95, plus their means. Label images are read
 * exactly by cs_read_labels (src/label_read.c). */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <dirent.h>

#include "cli.h"
#include "common.h"
#include "image_io.h"
#include "metrics.h"

#define CMD "eval"
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
    uint32_t *g, *p;
    int gw, gh, pw, ph;
    int rc = cs_read_labels(pe->gt, &g, &gw, &gh);
    if (rc) return cs_error_prefix(rc, "cannot read GT label image");
    rc = cs_read_labels(pe->pred, &p, &pw, &ph);
    if (rc) {
        free(g);
        return cs_error_prefix(rc, "cannot read predicted label image");
    }
    if (gw != pw || gh != ph)
        rc = cs_error(CELLSAM_ERR_INVALID, "size mismatch: GT %s is %dx%d, prediction %s is %dx%d", pe->gt, gw, gh,
                      pe->pred, pw, ph);
    else
        rc = cs_evaluate_labels_at(g, p, (size_t)gw * gh, th, st);
    free(g);
    free(p);
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
