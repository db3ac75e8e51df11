/* Training data (train.h, "data"): folders of NAME_img + NAME_masks pairs,
 * augmentation, and samples pre-processed exactly as `cellsam segment` feeds the
 * two networks.
 *
 * What inference does with an image file (tools/cmd_segment.c, default tiled mode):
 *   cs_image_read -> cs_image_to_model_input(0, 0, official) -> H x W x 3
 *   -> tiler (src/tiling.c): per-channel min-max of the whole image, chunks of
 *      block_size (400) rebalanced by cs_chunks, every tile = chunk + a halo of
 *      `overlap` (56) pixels on each side, wrapping periodically at the image
 *      borders, mapped by the min-max
 *   -> per tile (cs_segment_hw3): cs_normalize_image -> cs_prep_branches.
 * A sample is one such tile: the whole image (with its wrapped halo) when the
 * image is one tile (sides up to the block size), otherwise one tile of the
 * tiler's grid (random with an rng, the middle one without). The tile is read
 * with the tiler's own functions (cs_tile_channel_minmax, cs_tile_read_region),
 * so the network inputs are bit-identical to inference on that tile.
 * cs_train_sample.H / W are the size of that tile, halo included: the frame
 * that is resized to 1024 x 1024.
 *
 * Labels follow the same geometry: the label image is read through the same
 * periodic halo; a cell seen through a wrap of the border is a separate instance
 * (it is a different object in the tile the network sees). The tile is resized
 * to 1024 x 1024 by nearest neighbour with pixel centres, src = floor((dst + 0.5)
 * * in / out), like the image resize (not aspect-preserving).
 *
 * Augmentation runs on the raw H x W x 3 image and the label image before all
 * of that, in this order: crop, rescale, flips, rot90, intensity. Intensity:
 * every channel with max > min is mapped to [0,1] by its own min-max (the same
 * rule as the tiler's pipeline min-max, so nothing changes for the later steps),
 * then v -> min(1, gain * v) ^ gamma. The later pre-processing (min-max, 99.9
 * percentile clip of the non-zero values, min-max, CLAHE) is invariant to any
 * per-channel positive affine change of intensities, so a plain gain would be a
 * no-op: here gain > 1 saturates the brightest part of the range (over-exposure)
 * and gain <= 1 has no effect after normalisation; gamma changes the contrast
 * curve. 0 stays 0 and blank channels stay blank, so the percentile of non-zero
 * values and the channel layout are unaffected. */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "common.h"
#include "image_io.h"
#include "pipeline.h"
#include "preprocess.h"
#include "tiling.h"
#include "train.h"

#define TD_MAX_SIDE 8192                      /* image and mask side cap */
#define TD_MAX_PIXELS ((size_t)8192 * 8192)   /* also after rescaling */
#define TD_MIN_SIDE 32                        /* crop and rescale keep at least this */
#define TD_MAX_DEPTH 32                       /* folder recursion */
#define TD_MAX_PAIRS (1 << 22)
#define TD_MAX_PATH 4096
#define TD_NET CS_PREP_SIZE                   /* 1024 */

/* ------------------------------------------------------------------ dataset */

typedef struct {
    char **img, **mask;
    int n, cap;
} pair_list;

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

static int is_regular_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Length of the stem NAME when `name` is NAME_img.<png|tif|tiff>, else 0. */
static size_t image_stem_len(const char *name) {
    const char *dot = strrchr(name, '.');
    if (!dot || (strcasecmp(dot, ".png") && strcasecmp(dot, ".tif") && strcasecmp(dot, ".tiff"))) return 0;
    size_t base = (size_t)(dot - name);
    if (base <= 4 || strncmp(name + base - 4, "_img", 4)) return 0;
    return base - 4;
}

static int pair_add(pair_list *l, char *img, char *mask) {
    if (l->n == l->cap) {
        if (l->cap >= TD_MAX_PAIRS) return cs_error(CELLSAM_ERR_LIMIT, "data set has over %d image pairs", TD_MAX_PAIRS);
        int cap = l->cap ? 2 * l->cap : 256;
        char **a = realloc(l->img, (size_t)cap * sizeof *a);
        if (a) l->img = a;
        char **b = a ? realloc(l->mask, (size_t)cap * sizeof *b) : NULL;
        if (!b) return cs_error(CELLSAM_ERR_NOMEM, "out of memory listing the data set");
        l->mask = b;
        l->cap = cap;
    }
    l->img[l->n] = img;
    l->mask[l->n] = mask;
    l->n++;
    return CELLSAM_OK;
}

/* The mask beside an image: same extension first, then the others. */
static char *find_mask(const char *dir, const char *name, size_t stem) {
    const char *ext = name + stem + 4;
    const char *cands[] = {ext, ".png", ".tif", ".tiff", ".PNG", ".TIF", ".TIFF"};
    char path[TD_MAX_PATH];
    for (size_t i = 0; i < sizeof cands / sizeof *cands; i++) {
        int n = snprintf(path, sizeof path, "%s/%.*s_masks%s", dir, (int)stem, name, cands[i]);
        if (n > 0 && (size_t)n < sizeof path && is_regular_file(path)) return dup_str(path);
    }
    return NULL;
}

static int walk(const char *dir, int depth, pair_list *l) {
    if (depth > TD_MAX_DEPTH) return cs_error(CELLSAM_ERR_LIMIT, "%s: folders nested over %d deep", dir, TD_MAX_DEPTH);
    DIR *d = opendir(dir);
    if (!d) return cs_error(CELLSAM_ERR_IO, "cannot open data set folder %s: %s", dir, strerror(errno));
    int rc = CELLSAM_OK;
    struct dirent *ent;
    char path[TD_MAX_PATH];
    while (!rc && (ent = readdir(d))) {
        if (ent->d_name[0] == '.') continue; /* ., .., hidden files and folders */
        int n = snprintf(path, sizeof path, "%s/%s", dir, ent->d_name);
        if (n < 0 || (size_t)n >= sizeof path) {
            rc = cs_error(CELLSAM_ERR_LIMIT, "%s/%s: path too long", dir, ent->d_name);
            break;
        }
        struct stat st;
        if (stat(path, &st) != 0) continue; /* dangling link */
        if (S_ISDIR(st.st_mode)) {
            rc = walk(path, depth + 1, l);
            continue;
        }
        if (!S_ISREG(st.st_mode)) continue;
        size_t stem = image_stem_len(ent->d_name);
        if (!stem) continue;
        char *mask = find_mask(dir, ent->d_name, stem);
        if (!mask) continue; /* an image without labels is not a training pair */
        char *img = dup_str(path);
        if (!img) {
            free(mask);
            rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory listing the data set");
            break;
        }
        rc = pair_add(l, img, mask);
        if (rc) {
            free(img);
            free(mask);
        }
    }
    closedir(d);
    return rc;
}

/* Corrections saved by the labeling tool (`cellsam serve --root DIR` autosaves
 * DIR/.cellsam/<rel>.labels.png for image DIR/<rel>) are training pairs too, so
 * `cellsam finetune --data DIR` learns from what a person fixed. An image that also
 * has a NAME_masks file keeps that pair. */
static int walk_corrections(const char *root, const char *store, const char *rel, int depth, pair_list *l) {
    if (depth > TD_MAX_DEPTH) return CELLSAM_OK;
    char dir[TD_MAX_PATH];
    int n = snprintf(dir, sizeof dir, "%s%s%s", store, *rel ? "/" : "", rel);
    if (n < 0 || (size_t)n >= sizeof dir) return CELLSAM_OK;
    DIR *d = opendir(dir);
    if (!d) return CELLSAM_OK; /* no corrections */
    int rc = CELLSAM_OK;
    struct dirent *ent;
    const char *suffix = ".labels.png";
    size_t sl = strlen(suffix);
    while (!rc && (ent = readdir(d))) {
        if (ent->d_name[0] == '.') continue;
        char sub[TD_MAX_PATH], path[TD_MAX_PATH];
        int a = snprintf(sub, sizeof sub, "%s%s%s", rel, *rel ? "/" : "", ent->d_name);
        int b = snprintf(path, sizeof path, "%s/%s", dir, ent->d_name);
        if (a < 0 || (size_t)a >= sizeof sub || b < 0 || (size_t)b >= sizeof path) continue;
        struct stat st;
        if (stat(path, &st) != 0) continue;
        if (S_ISDIR(st.st_mode)) {
            rc = walk_corrections(root, store, sub, depth + 1, l);
            continue;
        }
        size_t len = strlen(sub);
        if (!S_ISREG(st.st_mode) || len <= sl || strcmp(sub + len - sl, suffix)) continue;
        char img[TD_MAX_PATH];
        int c = snprintf(img, sizeof img, "%s/%.*s", root, (int)(len - sl), sub);
        if (c < 0 || (size_t)c >= sizeof img || !is_regular_file(img)) continue;
        int dup = 0;
        for (int i = 0; i < l->n && !dup; i++) dup = !strcmp(l->img[i], img);
        if (dup) continue;
        char *ip = dup_str(img), *mp = dup_str(path);
        if (!ip || !mp) rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory listing the data set");
        if (!rc) rc = pair_add(l, ip, mp);
        if (rc) {
            free(ip);
            free(mp);
        }
    }
    closedir(d);
    return rc;
}

typedef struct {
    char *img, *mask;
} pair_ref;

static int cmp_pair(const void *a, const void *b) {
    return strcmp(((const pair_ref *)a)->img, ((const pair_ref *)b)->img);
}

void cs_dataset_free(cs_dataset *ds) {
    if (!ds) return;
    for (int i = 0; i < ds->n; i++) {
        if (ds->img_paths) free(ds->img_paths[i]);
        if (ds->mask_paths) free(ds->mask_paths[i]);
    }
    free(ds->img_paths);
    free(ds->mask_paths);
    memset(ds, 0, sizeof *ds);
}

int cs_dataset_open(const char *dir, cs_dataset *ds) {
    if (!ds) return cs_error(CELLSAM_ERR_INVALID, "data set: null argument");
    memset(ds, 0, sizeof *ds);
    if (!dir || !*dir) return cs_error(CELLSAM_ERR_INVALID, "data set: no folder given");
    struct stat st;
    if (stat(dir, &st) != 0) return cs_error(CELLSAM_ERR_IO, "cannot open data set folder %s: %s", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode)) return cs_error(CELLSAM_ERR_INVALID, "data set %s is not a folder", dir);
    /* without the trailing slash, so paths read dir/sub/NAME_img.png */
    char root[TD_MAX_PATH];
    size_t len = strlen(dir);
    if (len >= sizeof root) return cs_error(CELLSAM_ERR_LIMIT, "data set folder path too long");
    memcpy(root, dir, len + 1);
    while (len > 1 && root[len - 1] == '/') root[--len] = '\0';
    pair_list l = {0};
    int rc = walk(root, 0, &l);
    if (!rc) {
        char store[TD_MAX_PATH];
        int n = snprintf(store, sizeof store, "%s/.cellsam", root);
        if (n > 0 && (size_t)n < sizeof store) rc = walk_corrections(root, store, "", 0, &l);
    }
    if (!rc && l.n == 0)
        rc = cs_error(CELLSAM_ERR_INVALID, "no NAME_img.png|tif + NAME_masks.png|tif pairs found under %s", dir);
    pair_ref *refs = NULL;
    if (!rc) {
        refs = malloc((size_t)l.n * sizeof *refs);
        if (!refs) rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory listing the data set");
    }
    if (rc) {
        for (int i = 0; i < l.n; i++) {
            free(l.img[i]);
            free(l.mask[i]);
        }
        free(l.img);
        free(l.mask);
        return rc;
    }
    for (int i = 0; i < l.n; i++) refs[i] = (pair_ref){l.img[i], l.mask[i]};
    qsort(refs, (size_t)l.n, sizeof *refs, cmp_pair);
    for (int i = 0; i < l.n; i++) {
        l.img[i] = refs[i].img;
        l.mask[i] = refs[i].mask;
    }
    free(refs);
    ds->img_paths = l.img;
    ds->mask_paths = l.mask;
    ds->n = l.n;
    return CELLSAM_OK;
}

/* The last two path components ("folder/NAME_img.png"): the split does not depend
 * on where the data set lives. */
static const char *split_key(const char *path) {
    const char *last = strrchr(path, '/');
    if (!last) return path;
    const char *p = last;
    while (p > path && p[-1] != '/') p--;
    return p;
}

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double path_uniform(const char *path, uint64_t seed) {
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a, then a seeded finaliser */
    for (const unsigned char *s = (const unsigned char *)split_key(path); *s; s++) h = (h ^ *s) * 0x100000001b3ULL;
    h = mix64(h ^ mix64(seed + 0x9e3779b97f4a7c15ULL));
    return (double)(h >> 11) * (1.0 / 9007199254740992.0);
}

static int copy_subset(const cs_dataset *all, const unsigned char *pick, unsigned char want, cs_dataset *out) {
    memset(out, 0, sizeof *out);
    int n = 0;
    for (int i = 0; i < all->n; i++) n += pick[i] == want;
    out->img_paths = calloc((size_t)(n ? n : 1), sizeof(char *));
    out->mask_paths = calloc((size_t)(n ? n : 1), sizeof(char *));
    if (!out->img_paths || !out->mask_paths) {
        cs_dataset_free(out);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory splitting the data set");
    }
    for (int i = 0; i < all->n; i++) {
        if (pick[i] != want) continue;
        char *a = dup_str(all->img_paths[i]), *b = dup_str(all->mask_paths[i]);
        out->img_paths[out->n] = a;
        out->mask_paths[out->n] = b;
        out->n++;
        if (!a || !b) {
            cs_dataset_free(out);
            return cs_error(CELLSAM_ERR_NOMEM, "out of memory splitting the data set");
        }
    }
    return CELLSAM_OK;
}

int cs_dataset_split(const cs_dataset *all, float val_fraction, uint64_t seed, cs_dataset *train, cs_dataset *val) {
    if (!all || !train || !val || (all->n > 0 && (!all->img_paths || !all->mask_paths)) || all->n < 0)
        return cs_error(CELLSAM_ERR_INVALID, "data set split: null argument");
    memset(train, 0, sizeof *train);
    memset(val, 0, sizeof *val);
    if (!(val_fraction >= 0.0f && val_fraction < 1.0f))
        return cs_error(CELLSAM_ERR_INVALID, "validation fraction %g is not in [0, 1)", (double)val_fraction);
    const int n = all->n;
    unsigned char *is_val = calloc((size_t)(n ? n : 1), 1);
    double *u = malloc((size_t)(n ? n : 1) * sizeof *u);
    if (!is_val || !u) {
        free(is_val);
        free(u);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory splitting the data set");
    }
    int n_val = 0;
    for (int i = 0; i < n; i++) {
        u[i] = path_uniform(all->img_paths[i], seed);
        is_val[i] = u[i] < (double)val_fraction;
        n_val += is_val[i];
    }
    /* a fraction > 0 promises both parts when there are two images at least:
     * move the image nearest to the other side */
    if (val_fraction > 0 && n >= 2 && (n_val == 0 || n_val == n)) {
        int pick = -1;
        for (int i = 0; i < n; i++)
            if (pick < 0 || (n_val == 0 ? u[i] < u[pick] : u[i] > u[pick])) pick = i;
        is_val[pick] = n_val == 0;
    }
    free(u);
    int rc = copy_subset(all, is_val, 0, train);
    if (!rc) rc = copy_subset(all, is_val, 1, val);
    if (rc) {
        cs_dataset_free(train);
        cs_dataset_free(val);
    }
    free(is_val);
    return rc;
}

/* ------------------------------------------------------------- augmentation */

cs_augment cs_augment_none(void) {
    cs_augment a;
    memset(&a, 0, sizeof a);
    a.gain_lo = a.gain_hi = 1;
    a.gamma_lo = a.gamma_hi = 1;
    a.crop_lo = a.crop_hi = 1;
    a.scale_lo = a.scale_hi = 1;
    return a;
}

cs_augment cs_augment_default(void) {
    cs_augment a = cs_augment_none();
    a.flips = 1;
    a.rot90 = 1;
    a.gain_lo = 0.7f;
    a.gain_hi = 1.3f;
    a.gamma_lo = 0.8f;
    a.gamma_hi = 1.25f;
    a.crop_lo = 0.5f;
    a.crop_hi = 1.0f;
    a.scale_lo = 0.75f;
    a.scale_hi = 1.25f;
    return a;
}

static int check_range(const char *what, float lo, float hi, float min_excl, float max_incl) {
    if (!(lo > min_excl && hi >= lo && hi <= max_incl))
        return cs_error(CELLSAM_ERR_INVALID, "augmentation %s range [%g, %g] is not within (%g, %g]", what, (double)lo,
                        (double)hi, (double)min_excl, (double)max_incl);
    return CELLSAM_OK;
}

static int check_augment(const cs_augment *a) {
    if (!(a->cell_diameter >= 0 && a->cell_diameter <= TD_NET))
        return cs_error(CELLSAM_ERR_INVALID, "training cell diameter %g is not within [0, %d] network pixels",
                        (double)a->cell_diameter, TD_NET);
    int rc = check_range("crop", a->crop_lo, a->crop_hi, 0.0f, 1.0f);
    if (!rc) rc = check_range("scale", a->scale_lo, a->scale_hi, 0.0f, 8.0f);
    if (!rc) rc = check_range("gain", a->gain_lo, a->gain_hi, 0.0f, 100.0f);
    if (!rc) rc = check_range("gamma", a->gamma_lo, a->gamma_hi, 0.0f, 100.0f);
    return rc;
}

/* Draws in a fixed order and number whatever is enabled, so one setting does not
 * shift the random choices of the others. */
typedef struct {
    double crop_f, crop_y, crop_x, scale, hflip, vflip, rot, gain, gamma, tile;
} aug_draws;

static void draw_all(cs_rng *rng, aug_draws *d) {
    if (!rng) {
        memset(d, 0, sizeof *d);
        d->tile = -1; /* no rng: the middle tile */
        d->hflip = d->vflip = 1;
        return;
    }
    d->crop_f = cs_rng_uniform(rng);
    d->crop_y = cs_rng_uniform(rng);
    d->crop_x = cs_rng_uniform(rng);
    d->scale = cs_rng_uniform(rng);
    d->hflip = cs_rng_uniform(rng);
    d->vflip = cs_rng_uniform(rng);
    d->rot = cs_rng_uniform(rng);
    d->gain = cs_rng_uniform(rng);
    d->gamma = cs_rng_uniform(rng);
    d->tile = cs_rng_uniform(rng);
}

static double lerp(double lo, double hi, double u) { return lo + (hi - lo) * u; }

/* The raw pair being augmented: H x W x 3 floats and H x W labels. */
typedef struct {
    float *img;
    uint32_t *lab;
    int H, W;
} raw_pair;

static void raw_free(raw_pair *p) {
    free(p->img);
    free(p->lab);
    memset(p, 0, sizeof *p);
}

static int raw_alloc(raw_pair *p, int H, int W) {
    memset(p, 0, sizeof *p);
    p->img = cs_alloc((size_t)H * W, 3 * sizeof(float));
    p->lab = cs_alloc((size_t)H * W, sizeof(uint32_t));
    if (!p->img || !p->lab) {
        raw_free(p);
        return CELLSAM_ERR_NOMEM;
    }
    p->H = H;
    p->W = W;
    return CELLSAM_OK;
}

static int crop_pair(raw_pair *p, int y0, int x0, int h, int w) {
    raw_pair o;
    if (raw_alloc(&o, h, w)) return CELLSAM_ERR_NOMEM;
    for (int y = 0; y < h; y++) {
        const size_t s = (size_t)(y0 + y) * p->W + x0, d = (size_t)y * w;
        memcpy(o.img + 3 * d, p->img + 3 * s, (size_t)w * 3 * sizeof(float));
        memcpy(o.lab + d, p->lab + s, (size_t)w * sizeof(uint32_t));
    }
    raw_free(p);
    *p = o;
    return CELLSAM_OK;
}

/* Nearest source index of destination dst with pixel centres: floor((dst+0.5)*in/out). */
static int nearest_src(int dst, int in, int out) {
    const int64_t s = ((2 * (int64_t)dst + 1) * in) / (2 * (int64_t)out);
    return s < in ? (int)s : in - 1;
}

/* Image bilinear (torchvision antialiased resize, as the network resize), labels nearest. */
static int rescale_pair(raw_pair *p, int h, int w) {
    raw_pair o;
    memset(&o, 0, sizeof o);
    const size_t in_px = (size_t)p->H * p->W, out_px = (size_t)h * w;
    float *chw_in = cs_alloc(in_px, 3 * sizeof(float)), *chw_out = cs_alloc(out_px, 3 * sizeof(float));
    int rc = chw_in && chw_out ? raw_alloc(&o, h, w) : CELLSAM_ERR_NOMEM;
    if (!rc) {
        for (size_t i = 0; i < in_px; i++)
            for (int c = 0; c < 3; c++) chw_in[c * in_px + i] = p->img[3 * i + c];
        rc = cs_resize_bilinear_aa(chw_in, 3, p->H, p->W, chw_out, h, w);
    }
    if (!rc) {
        for (size_t i = 0; i < out_px; i++)
            for (int c = 0; c < 3; c++) o.img[3 * i + c] = chw_out[c * out_px + i];
        for (int y = 0; y < h; y++) {
            const int sy = nearest_src(y, p->H, h);
            for (int x = 0; x < w; x++) o.lab[(size_t)y * w + x] = p->lab[(size_t)sy * p->W + nearest_src(x, p->W, w)];
        }
        raw_free(p);
        *p = o;
    } else if (o.img || o.lab) {
        raw_free(&o);
    }
    free(chw_in);
    free(chw_out);
    return rc;
}

/* Flips (of the source) then k counter-clockwise quarter turns (numpy rot90). */
static int dihedral_pair(raw_pair *p, int hflip, int vflip, int k) {
    if (!hflip && !vflip && k == 0) return CELLSAM_OK;
    const int h = p->H, w = p->W;
    const int oh = k & 1 ? w : h, ow = k & 1 ? h : w;
    raw_pair o;
    if (raw_alloc(&o, oh, ow)) return CELLSAM_ERR_NOMEM;
    for (int i = 0; i < oh; i++)
        for (int j = 0; j < ow; j++) {
            int fy, fx; /* position in the flipped image */
            switch (k) {
            case 1: fy = j; fx = w - 1 - i; break;
            case 2: fy = h - 1 - i; fx = w - 1 - j; break;
            case 3: fy = h - 1 - j; fx = i; break;
            default: fy = i; fx = j; break;
            }
            const int sy = vflip ? h - 1 - fy : fy, sx = hflip ? w - 1 - fx : fx;
            const size_t s = (size_t)sy * w + sx, d = (size_t)i * ow + j;
            memcpy(o.img + 3 * d, p->img + 3 * s, 3 * sizeof(float));
            o.lab[d] = p->lab[s];
        }
    raw_free(p);
    *p = o;
    return CELLSAM_OK;
}

static void intensity(raw_pair *p, double gain, double gamma) {
    const size_t n = (size_t)p->H * p->W;
    for (int c = 0; c < 3; c++) {
        float mn = p->img[c], mx = p->img[c];
        for (size_t i = 0; i < n; i++) {
            const float v = p->img[3 * i + c];
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        const float range = mx - mn;
        if (!(range > 0)) continue; /* blank or constant channel: left as is */
        for (size_t i = 0; i < n; i++) {
            double v = (double)((p->img[3 * i + c] - mn) / range) * gain;
            if (v > 1) v = 1;
            p->img[3 * i + c] = (float)pow(v, gamma);
        }
    }
}

/* Crop p to h x w at the place the draws u_y, u_x in [0, 1) give (no-op at full size). */
static int crop_at(raw_pair *p, int h, int w, double uy, double ux) {
    if (h == p->H && w == p->W) return CELLSAM_OK;
    int y0 = (int)(uy * (p->H - h + 1)), x0 = (int)(ux * (p->W - w + 1));
    y0 = y0 > p->H - h ? p->H - h : y0;
    x0 = x0 > p->W - w ? p->W - w : x0;
    return crop_pair(p, y0, x0, h, w);
}

/* The flips, quarter turns and intensity change the draws select, in that order. */
static int orient_and_shade(raw_pair *p, const cs_augment *a, const aug_draws *d) {
    const int hflip = a->flips && d->hflip < 0.5, vflip = a->flips && d->vflip < 0.5;
    int k = a->rot90 ? (int)(d->rot * 4) : 0;
    k = k > 3 ? 3 : k;
    int rc = dihedral_pair(p, hflip, vflip, k);
    if (!rc && (a->gain_lo != 1 || a->gain_hi != 1 || a->gamma_lo != 1 || a->gamma_hi != 1))
        intensity(p, lerp(a->gain_lo, a->gain_hi, d->gain), lerp(a->gamma_lo, a->gamma_hi, d->gamma));
    return rc;
}

static int augment(raw_pair *p, const cs_augment *a, const aug_draws *d) {
    int rc = CELLSAM_OK;
    if (a->crop_lo < 1 || a->crop_hi < 1) {
        /* one fraction for both sides keeps the aspect ratio */
        const double f = lerp(a->crop_lo, a->crop_hi, d->crop_f);
        int h = (int)lround(f * p->H), w = (int)lround(f * p->W);
        const int min_h = p->H < TD_MIN_SIDE ? p->H : TD_MIN_SIDE, min_w = p->W < TD_MIN_SIDE ? p->W : TD_MIN_SIDE;
        h = h < min_h ? min_h : h > p->H ? p->H : h;
        w = w < min_w ? min_w : w > p->W ? p->W : w;
        rc = crop_at(p, h, w, d->crop_y, d->crop_x);
    }
    if (!rc && (a->scale_lo != 1 || a->scale_hi != 1)) {
        double s = lerp(a->scale_lo, a->scale_hi, d->scale);
        const double cap = sqrt((double)TD_MAX_PIXELS / ((double)p->H * p->W));
        if (s > cap) s = cap;
        int h = (int)lround(s * p->H), w = (int)lround(s * p->W);
        const int min_h = p->H < TD_MIN_SIDE ? p->H : TD_MIN_SIDE, min_w = p->W < TD_MIN_SIDE ? p->W : TD_MIN_SIDE;
        h = h < min_h ? min_h : h > TD_MAX_SIDE ? TD_MAX_SIDE : h;
        w = w < min_w ? min_w : w > TD_MAX_SIDE ? TD_MAX_SIDE : w;
        if (h != p->H || w != p->W) rc = rescale_pair(p, h, w);
    }
    if (!rc) rc = orient_and_shade(p, a, d);
    return rc;
}

/* ------------------------------------------------------------------- reading */

/* Prefix the current message with the file name unless it already names it. */
static int name_file(int rc, const char *what, const char *path) {
    if (strstr(cellsam_last_error(), path)) return rc;
    return cs_error_prefix(rc, "%s %s", what, path);
}

static int probe_size(const char *path, const char *what, int *w, int *h) {
    int c;
    int rc = cs_image_probe(path, w, h, &c);
    if (rc) return name_file(rc, what, path);
    if (*w < 1 || *h < 1) return cs_error(CELLSAM_ERR_FORMAT, "%s %s is empty", what, path);
    if (*w > TD_MAX_SIDE || *h > TD_MAX_SIDE)
        return cs_error(CELLSAM_ERR_LIMIT, "%s %s is %d x %d pixels; training takes at most %d x %d", what, path, *w, *h,
                        TD_MAX_SIDE, TD_MAX_SIDE);
    return CELLSAM_OK;
}

/* Labels read exactly (cs_read_labels), checked against the image's size. */
int cs_read_label_image(const char *path, int W, int H, uint32_t **out) {
    *out = NULL;
    uint32_t *lab;
    int w, h;
    int rc = cs_read_labels(path, &lab, &w, &h);
    if (rc) return name_file(rc, "mask", path);
    if (w != W || h != H) {
        free(lab);
        return cs_error(CELLSAM_ERR_INVALID, "mask %s is %d x %d but its image is %d x %d", path, w, h, W, H);
    }
    *out = lab;
    return CELLSAM_OK;
}

/* Image and labels of pair i, channels placed as the CLI does by default. */
static int read_pair(const cs_dataset *ds, int i, raw_pair *p) {
    memset(p, 0, sizeof *p);
    const char *ip = ds->img_paths[i], *mp = ds->mask_paths[i];
    int W, H, mw, mh;
    int rc = probe_size(ip, "image", &W, &H);
    if (!rc) rc = probe_size(mp, "mask", &mw, &mh);
    if (!rc && (mw != W || mh != H))
        rc = cs_error(CELLSAM_ERR_INVALID, "mask %s is %d x %d but its image %s is %d x %d", mp, mw, mh, ip, W, H);
    if (rc) return rc;
    cs_image img;
    rc = cs_image_read(ip, &img);
    if (rc) return name_file(rc, "image", ip);
    if (img.width != W || img.height != H)
        rc = cs_error(CELLSAM_ERR_FORMAT, "image %s decodes to %d x %d, its header says %d x %d", ip, img.width,
                      img.height, W, H);
    if (!rc) {
        rc = cs_image_to_model_input(&img, 0, 0, CS_CHANNELS_OFFICIAL, &p->img);
        if (rc) rc = name_file(rc, "image", ip);
    }
    cs_image_free(&img);
    for (size_t k = 0; !rc && k < (size_t)W * H * 3; k++)
        if (!isfinite(p->img[k])) rc = cs_error(CELLSAM_ERR_INVALID, "image %s contains NaN or infinite values", ip);
    if (!rc) rc = cs_read_label_image(mp, W, H, &p->lab);
    if (rc) {
        raw_free(p);
        return rc;
    }
    p->H = H;
    p->W = W;
    return CELLSAM_OK;
}

/* ------------------------------------------------------------------- tiling */

static int read_hw3(void *user, int x0, int y0, int w, int h, float *out) {
    const raw_pair *p = user;
    for (int y = 0; y < h; y++)
        memcpy(out + (size_t)y * w * 3, p->img + ((size_t)(y0 + y) * p->W + x0) * 3, (size_t)w * 3 * sizeof(float));
    return 0;
}

typedef struct {
    int y0, x0, h, w; /* haloed tile in extended image coordinates */
} tile_geom;

/* The tile of the tiler's grid that the draw selects (middle one without rng), or
 * the whole image without halo when it is at most whole_max per side. */
static int pick_tile(int H, int W, double u, int whole_max, tile_geom *t) {
    if (whole_max > 0 && H <= whole_max && W <= whole_max) {
        t->y0 = t->x0 = 0;
        t->h = H;
        t->w = W;
        return CELLSAM_OK;
    }
    const cellsam_segment_params sp = cellsam_segment_default_params();
    const int block = sp.block_size, d = sp.overlap;
    const int ny = cs_chunks(H, block, d, NULL, 0), nx = cs_chunks(W, block, d, NULL, 0);
    if (ny < 1 || nx < 1) return cs_error(CELLSAM_ERR_INVALID, "training sample: cannot tile a %d x %d image", W, H);
    int *cy = malloc((size_t)ny * sizeof(int)), *cx = malloc((size_t)nx * sizeof(int));
    if (!cy || !cx) {
        free(cy);
        free(cx);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    cs_chunks(H, block, d, cy, ny);
    cs_chunks(W, block, d, cx, nx);
    int ti = ny / 2, tj = nx / 2;
    if (u >= 0) {
        int k = (int)(u * ny * nx);
        k = k >= ny * nx ? ny * nx - 1 : k;
        ti = k / nx;
        tj = k % nx;
    }
    int sy = 0, sx = 0;
    for (int i = 0; i < ti; i++) sy += cy[i];
    for (int j = 0; j < tj; j++) sx += cx[j];
    t->y0 = sy - d;
    t->x0 = sx - d;
    t->h = cy[ti] + 2 * d;
    t->w = cx[tj] + 2 * d;
    free(cy);
    free(cx);
    return CELLSAM_OK;
}

static int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

/* Instance key -> compact id, open addressing. Keys are never 0 (label >= 1). */
typedef struct {
    uint64_t *keys;
    int32_t *ids;
    size_t cap, n;
} id_map;

static int id_map_grow(id_map *m) {
    const size_t cap = m->cap ? 2 * m->cap : 1024;
    uint64_t *keys = calloc(cap, sizeof *keys);
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!keys || !ids) {
        free(keys);
        free(ids);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory numbering cells");
    }
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->keys[i]) continue;
        size_t h = mix64(m->keys[i]) & (cap - 1);
        while (keys[h]) h = (h + 1) & (cap - 1);
        keys[h] = m->keys[i];
        ids[h] = m->ids[i];
    }
    free(m->keys);
    free(m->ids);
    m->keys = keys;
    m->ids = ids;
    m->cap = cap;
    return CELLSAM_OK;
}

/* Id of key, adding it as n+1 when new; 0 on allocation failure. */
static int32_t id_map_get(id_map *m, uint64_t key) {
    if (2 * (m->n + 1) > m->cap && id_map_grow(m)) return 0;
    size_t h = mix64(key) & (m->cap - 1);
    while (m->keys[h]) {
        if (m->keys[h] == key) return m->ids[h];
        h = (h + 1) & (m->cap - 1);
    }
    m->keys[h] = key;
    m->ids[h] = (int32_t)++m->n;
    return m->ids[h];
}

/* Instances of the haloed tile, numbered 1.. in raster order of first appearance:
 * a label seen through a different wrap of the image border is another instance. */
static int tile_instances(const raw_pair *p, const tile_geom *t, int32_t *cid, int *n_out) {
    id_map m = {0};
    int rc = CELLSAM_OK;
    for (int ty = 0; ty < t->h && !rc; ty++) {
        const int64_t Y = (int64_t)t->y0 + ty;
        const int64_t wy = floor_div(Y, p->H), y = Y - wy * p->H;
        for (int tx = 0; tx < t->w; tx++) {
            const int64_t X = (int64_t)t->x0 + tx;
            const int64_t wx = floor_div(X, p->W), x = X - wx * p->W;
            const uint32_t l = p->lab[(size_t)y * p->W + (size_t)x];
            int32_t id = 0;
            if (l) {
                const uint64_t key = (uint64_t)l | (uint64_t)(uint16_t)(wy + 32768) << 32 | (uint64_t)(uint16_t)(wx + 32768) << 48;
                id = id_map_get(&m, key);
                if (!id) {
                    rc = CELLSAM_ERR_NOMEM;
                    break;
                }
            }
            cid[(size_t)ty * t->w + tx] = id;
        }
    }
    *n_out = (int)m.n;
    free(m.keys);
    free(m.ids);
    return rc;
}

/* Nearest resize of the instance map to the network frame, small cells dropped,
 * the rest renumbered 1..n in order, boxes (pixel edges). */
static int labels_to_net(const int32_t *cid, int n_inst, int th, int tw, int min_area, cs_train_sample *s) {
    const size_t NN = (size_t)TD_NET * TD_NET;
    int64_t *area = calloc((size_t)n_inst + 1, sizeof *area);
    int32_t *remap = calloc((size_t)n_inst + 1, sizeof *remap);
    int *sx = malloc(TD_NET * sizeof *sx);
    int rc = CELLSAM_OK;
    if (!area || !remap || !sx) {
        rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory for training labels");
        goto done;
    }
    for (int j = 0; j < TD_NET; j++) sx[j] = nearest_src(j, tw, TD_NET);
    for (int i = 0; i < TD_NET; i++) {
        const int32_t *row = cid + (size_t)nearest_src(i, th, TD_NET) * tw;
        int32_t *dst = s->labels + (size_t)i * TD_NET;
        for (int j = 0; j < TD_NET; j++) {
            dst[j] = row[sx[j]];
            area[dst[j]]++;
        }
    }
    int n = 0;
    for (int k = 1; k <= n_inst; k++) remap[k] = area[k] >= (min_area > 1 ? min_area : 1) ? ++n : 0;
    s->boxes_xyxy = cs_alloc((size_t)(n ? n : 1), 4 * sizeof(float));
    if (!s->boxes_xyxy) {
        rc = CELLSAM_ERR_NOMEM;
        goto done;
    }
    for (int k = 0; k < n; k++) {
        s->boxes_xyxy[4 * k] = s->boxes_xyxy[4 * k + 1] = TD_NET;
        s->boxes_xyxy[4 * k + 2] = s->boxes_xyxy[4 * k + 3] = 0;
    }
    for (size_t q = 0; q < NN; q++) {
        const int32_t l = remap[s->labels[q]];
        s->labels[q] = l;
        if (!l) continue;
        float *b = s->boxes_xyxy + 4 * (size_t)(l - 1);
        const float x = (float)(q % TD_NET), y = (float)(q / TD_NET);
        if (x < b[0]) b[0] = x;
        if (y < b[1]) b[1] = y;
        if (x + 1 > b[2]) b[2] = x + 1;
        if (y + 1 > b[3]) b[3] = y + 1;
    }
    s->n_cells = n;
done:
    free(area);
    free(remap);
    free(sx);
    return rc;
}

/* The median cell diameter of the labels, by inference's rule (cs_median_diameter);
 * 0 when there is no cell. */
static int median_cell_diameter(const raw_pair *p, double *diameter) {
    *diameter = 0;
    const size_t n = (size_t)p->H * p->W;
    id_map m = {0};
    uint32_t *count = cs_calloc(n + 1, sizeof *count); /* at most one cell per pixel */
    int rc = count ? CELLSAM_OK : CELLSAM_ERR_NOMEM;
    for (size_t i = 0; !rc && i < n; i++) {
        if (!p->lab[i]) continue;
        const int32_t id = id_map_get(&m, p->lab[i]);
        if (id) count[id]++;
        else rc = CELLSAM_ERR_NOMEM;
    }
    int64_t *area = NULL;
    if (!rc && m.n && !(area = cs_alloc(m.n, sizeof *area))) rc = CELLSAM_ERR_NOMEM;
    if (area) {
        for (size_t k = 0; k < m.n; k++) area[k] = count[k + 1];
        *diameter = cs_median_diameter(area, m.n);
    }
    free(area);
    free(count);
    free(m.keys);
    free(m.ids);
    return rc ? cs_error(rc, "out of memory measuring the cells") : CELLSAM_OK;
}

/* The sample at cell size (cs_augment.cell_diameter): the window of the image that
 * one network input spans at the zoom `segment --diameter` would use, then flips,
 * turns and intensity, then inference's canvas: the window top-left in an S x S
 * square, its last row and column repeated (labels 0 there). */
static int size_pair(raw_pair *p, const cs_augment *a, const aug_draws *d, tile_geom *t) {
    double diameter;
    int rc = median_cell_diameter(p, &diameter);
    if (rc) return rc;
    const double z = cs_zoom_clamp((diameter > 0 ? a->cell_diameter / diameter : 1.0) *
                                   lerp(a->scale_lo, a->scale_hi, d->scale));
    const int S = cs_zoom_side(z);
    const int h = p->H < S ? p->H : S, w = p->W < S ? p->W : S;
    const int no_rng = d->tile < 0; /* then the centre */
    rc = crop_at(p, h, w, no_rng ? 0.5 : d->crop_y, no_rng ? 0.5 : d->crop_x);
    if (!rc) rc = orient_and_shade(p, a, d);
    if (!rc && (p->H < S || p->W < S)) {
        raw_pair o;
        if (raw_alloc(&o, S, S)) return CELLSAM_ERR_NOMEM;
        for (int y = 0; y < S; y++) {
            const size_t sy = (size_t)(y < p->H ? y : p->H - 1);
            float *dst = o.img + (size_t)y * S * 3;
            memcpy(dst, p->img + sy * p->W * 3, (size_t)p->W * 3 * sizeof(float));
            for (int x = p->W; x < S; x++) memcpy(dst + (size_t)x * 3, p->img + (sy * p->W + p->W - 1) * 3, 3 * sizeof(float));
            uint32_t *lrow = o.lab + (size_t)y * S;
            memset(lrow, 0, (size_t)S * sizeof *lrow);
            if (y < p->H) memcpy(lrow, p->lab + (size_t)y * p->W, (size_t)p->W * sizeof *lrow);
        }
        raw_free(p);
        *p = o;
    }
    t->y0 = t->x0 = 0;
    t->h = p->H;
    t->w = p->W;
    return rc;
}

/* ------------------------------------------------------------------ samples */

void cs_train_sample_free(cs_train_sample *s) {
    if (!s) return;
    free(s->sam_input);
    free(s->det_input);
    free(s->labels);
    free(s->boxes_xyxy);
    memset(s, 0, sizeof *s);
}

static int needs_rng(const cs_augment *a) {
    return a->flips || a->rot90 || a->gain_lo != a->gain_hi || a->gamma_lo != a->gamma_hi || a->crop_lo < 1 ||
           a->scale_lo != a->scale_hi;
}

int cs_train_sample_load(const cs_dataset *ds, int index, const cs_augment *aug, cs_rng *rng, int min_area,
                         cs_train_sample *out) {
    if (!out) return cs_error(CELLSAM_ERR_INVALID, "training sample: null argument");
    memset(out, 0, sizeof *out);
    if (!ds || !ds->img_paths || !ds->mask_paths) return cs_error(CELLSAM_ERR_INVALID, "training sample: null data set");
    if (index < 0 || index >= ds->n)
        return cs_error(CELLSAM_ERR_INVALID, "training sample %d is out of range (data set of %d)", index, ds->n);
    if (min_area < 0) return cs_error(CELLSAM_ERR_INVALID, "training sample: negative min_area %d", min_area);
    const cs_augment none = cs_augment_none();
    const cs_augment *a = aug ? aug : &none;
    int rc = check_augment(a);
    if (rc) return rc;
    if (!rng && needs_rng(a)) return cs_error(CELLSAM_ERR_INVALID, "training sample: random augmentation needs an rng");
    aug_draws d;
    draw_all(rng, &d);

    raw_pair p;
    float *tile = NULL, *chw = NULL;
    int32_t *cid = NULL;
    rc = read_pair(ds, index, &p);
    if (rc) return rc;
    tile_geom t = {0, 0, 0, 0};
    if (a->cell_diameter > 0) {
        rc = size_pair(&p, a, &d, &t);
    } else {
        rc = augment(&p, a, &d);
        if (!rc) rc = pick_tile(p.H, p.W, d.tile, a->whole_image_max_side, &t);
    }
    const size_t tpx = rc ? 0 : (size_t)t.h * t.w;
    if (!rc) {
        tile = cs_alloc(tpx, 3 * sizeof(float));
        chw = cs_alloc(tpx, 3 * sizeof(float));
        cid = cs_alloc(tpx, sizeof(int32_t));
        out->sam_input = cs_alloc((size_t)3 * TD_NET, TD_NET * sizeof(float));
        out->det_input = cs_alloc((size_t)3 * TD_NET, TD_NET * sizeof(float));
        out->labels = cs_alloc((size_t)TD_NET, TD_NET * sizeof(int32_t));
        if (!tile || !chw || !cid || !out->sam_input || !out->det_input || !out->labels) rc = CELLSAM_ERR_NOMEM;
    }
    /* the tiler's own reads: whole-image channel min-max, periodic halo */
    float mn[3], mx[3];
    if (!rc) rc = cs_tile_channel_minmax(read_hw3, &p, p.H, p.W, mn, mx);
    if (!rc) rc = cs_tile_read_region(read_hw3, &p, p.H, p.W, t.y0, t.x0, t.h, t.w, CS_HALO_PERIODIC, mn, mx, tile);
    if (!rc) rc = cs_normalize_image(tile, t.h, t.w, chw);
    if (!rc) rc = cs_prep_branches(chw, t.h, t.w, out->sam_input, out->det_input);
    int n_inst = 0;
    if (!rc) rc = tile_instances(&p, &t, cid, &n_inst);
    if (!rc) rc = labels_to_net(cid, n_inst, t.h, t.w, min_area, out);
    if (!rc) {
        out->H = t.h;
        out->W = t.w;
    }
    if (rc) {
        if (!strstr(cellsam_last_error(), ds->img_paths[index]))
            cs_error_prefix(rc, "training sample %s", ds->img_paths[index]);
        cs_train_sample_free(out);
    }
    raw_free(&p);
    free(tile);
    free(chw);
    free(cid);
    return rc;
}

void cs_train_sample_mask(const cs_train_sample *s, int id, int side, float *out) {
    if (!s || !s->labels || !out || side < 1) return;
    for (int y = 0; y < side; y++) {
        const int32_t *row = s->labels + (size_t)nearest_src(y, TD_NET, side) * TD_NET;
        for (int x = 0; x < side; x++) out[(size_t)y * side + x] = row[nearest_src(x, TD_NET, side)] == id ? 1.0f : 0.0f;
    }
}
