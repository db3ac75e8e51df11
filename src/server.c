/* cellsam serve back end: libmicrohttpd + jansson. See server.h for the API. */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "common.h"
#include "image_io.h"
#include "pipeline.h"
#include "postprocess.h"
#include "preprocess.h"
#include "server.h"
#include "train.h"

#define MAX_PATH_LEN 1024
#define MAX_POINTS 64
#define LOGIT_SLOTS 4           /* low-res logits kept per image for refinement */
#define VIEWS 8                 /* window embeddings kept per image for prompts at cell size */
#define PROMPT_VIEW_BAND 1.5    /* whole-image prompts while cells show within 1/1.5..1.5 x the
                                   model's cell diameter (README: 1.25 and 1 no better, 2 worse) */
#define LIST_MAX_FILES 5000
#define LIST_MAX_VISITED 50000
#define LIST_MAX_DEPTH 8
#define STATIC_MAX_BYTES (16u << 20)
#define MAX_MASK_REGION ((size_t)1 << 26) /* pixels of one upsampled prompt mask */
#define LABEL_MAX_VALUE 65535u  /* autosave is a 16-bit PNG */
#define LOWRES (CS_LOWRES_SIZE * CS_LOWRES_SIZE)

enum { ST_NONE, ST_QUEUED, ST_RUNNING, ST_READY, ST_ERROR, ST_STOPPED };
static const char *const k_state[] = {"none", "queued", "running", "ready", "error", "stopped"};
enum { JOB_EMBED, JOB_SEGMENT };

/* The network input a prompt decodes in: the whole image stretched to 1024 x 1024
 * (side 0), or a window of side x side image pixels at (x0, y0), edge-padded where the
 * image is smaller, for cells too small in the whole-image input (see prompt_view). */
typedef struct {
    int x0, y0, side;
} view;

typedef struct {
    uint64_t ref;
    int n_masks;
    float *logits; /* n_masks x 256 x 256 */
    view v;        /* the input they were decoded in */
} logit_slot;

typedef struct {
    view v;        /* side 0: unused */
    float *emb;    /* its embedding */
    uint64_t serial, last_used;
} view_emb;

/* A segment-all result, shared by its image and the requests reading it: a reader takes
 * a reference under the server lock and reads without it, so that a pass over a
 * slide's labels does not stall every other request. References change under the lock;
 * the last one frees it. */
typedef struct {
    cellsam_result *r;
    int refs;
} shared_result;

static void shared_result_release(shared_result *sr) {
    if (sr && --sr->refs == 0) {
        cellsam_result_free(sr->r);
        free(sr);
    }
}

typedef struct image {
    char id[16];
    char *rel, *abs;
    int nuclear, cell, grey;
    int width, height, channels;
    long long mtime_ns, fsize;
    int refs; /* handlers and queued jobs using it */
    uint64_t last_used;
    /* embedding */
    int emb_state;
    float *emb;
    int emb_c, emb_h, emb_w;
    uint64_t emb_serial;
    float range[6]; /* per-channel min, then max, of the model input: found by the
                       whole-image embedding pass, given to windows (as tiles get it) */
    double emb_t0, emb_seconds;
    char emb_error[256];
    /* segment all */
    int seg_state;
    cellsam_segment_params seg_params;
    double seg_t0, seg_seconds;
    int seg_done, seg_total;
    int seg_stop; /* POST .../segment/stop asked the running segment-all to stop */
    shared_result *seg;
    char seg_error[256];
    logit_slot slots[LOGIT_SLOTS];
    int slot_next;
    view_emb views[VIEWS];
    struct image *next;
} image;

typedef struct job {
    image *im;
    int kind;
    struct job *next;
} job;

typedef struct {
    cellsam_context *ctx;
    uint64_t serial; /* embedding the context holds (0: none) */
    int busy;
} ctx_slot;

struct cs_server {
    cs_server_options o;
    char *root, *web; /* real paths */
    struct MHD_Daemon *daemon;
    int port;
    pthread_mutex_t mu;
    pthread_mutex_t store_mu; /* saved labels: the library's temp-file names are per process */
    pthread_cond_t job_cv, ctx_cv;
    image *images;
    int n_images;
    uint64_t clock, serial, next_id, next_ref;
    job *jobs_head, *jobs_tail;
    int quit;
    pthread_t worker;
    int worker_started;
    cellsam_context *worker_ctx;
    ctx_slot *pool;
    int n_pool;
    double emb_estimate, seg_estimate; /* seconds of the last run, for progress */
    /* the serving model: o.model, or a fine-tuned one the server loaded (owned_model) */
    const cellsam_model *model;
    cellsam_model *owned_model;
    char *model_path;  /* its file: the next fine-tune starts from it (NULL: no fine-tuning) */
    int swapping;      /* a model swap waits for the worker and every context to be idle */
    int worker_busy;
    /* fine-tuning from the page (one run at a time, on its own thread) */
    pthread_t ft_thread;
    int ft_started;    /* ft_thread is to be joined */
    int ft_state;      /* ST_NONE, ST_RUNNING, ST_READY (model saved), ST_ERROR */
    int ft_abort, ft_in_use;
    cellsam_train_params ft_params;
    cellsam_train_report ft_report;
    int64_t ft_total_steps;
    double ft_t0;
    char *ft_out;      /* absolute path of the model being trained */
    char ft_log[256], ft_error[256];
};

typedef struct {
    char *body;
    size_t len, cap, limit;
    int too_large, responded;
    double t0;
} request;

cs_server_options cs_server_default_options(void) {
    cs_server_options o;
    memset(&o, 0, sizeof o);
    o.root = ".";
    o.host = "127.0.0.1";
    o.port = 0;
    o.threads = 1;
    o.http_threads = 4;
    o.cache = 8;
    o.max_images = 32;
    o.max_upload = (size_t)512 << 20;
    o.max_json = (size_t)1 << 20;
    o.max_pixels = (size_t)100 << 20;
    o.model_params = cellsam_model_default_params();
    return o;
}

int cs_server_port(const cs_server *s) { return s ? s->port : 0; }

/* ------------------------------------------------------------ responses */

static enum MHD_Result respond(struct MHD_Connection *c, unsigned status, const char *ctype, void *data,
                               size_t len, const char *const *headers) {
    struct MHD_Response *r;
    if (len == 0) {
        free(data);
        r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    } else {
        r = MHD_create_response_from_buffer(len, data, MHD_RESPMEM_MUST_FREE);
        if (!r) free(data);
    }
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", ctype);
    MHD_add_response_header(r, "Cache-Control", "no-store");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    for (int i = 0; headers && headers[i]; i += 2) MHD_add_response_header(r, headers[i], headers[i + 1]);
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result respond_json(struct MHD_Connection *c, unsigned status, json_t *obj) {
    char *txt = obj ? json_dumps(obj, JSON_COMPACT) : NULL;
    json_decref(obj);
    if (!txt) { /* json_pack failed (out of memory, or a file name that is not UTF-8) */
        txt = strdup("{\"error\":\"internal error building the answer\"}");
        status = 500;
        if (!txt) return MHD_NO;
    }
    return respond(c, status, "application/json", txt, strlen(txt), NULL);
}

static enum MHD_Result respond_error(struct MHD_Connection *c, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static enum MHD_Result respond_error(struct MHD_Connection *c, unsigned status, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *p = msg; *p; p++) /* messages may quote file names: keep the JSON valid UTF-8 */
        if ((unsigned char)*p >= 0x80 || (unsigned char)*p < 0x20) *p = '?';
    return respond_json(c, status, json_pack("{s:s}", "error", msg));
}

/* ------------------------------------------------------------ small helpers */

static int has_image_ext(const char *name) {
    const char *dot = strrchr(name, '.');
    if (!dot) return 0;
    const char *exts[] = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy"};
    for (size_t i = 0; i < sizeof exts / sizeof exts[0]; i++)
        if (!strcasecmp(dot, exts[i])) return 1;
    return 0;
}

static int valid_id(const char *s, size_t n) {
    if (n == 0 || n >= 16) return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9'))) return 0;
    return 1;
}

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* mkdir that refuses to walk through a symlink (the folder must be ours). */
static int ensure_dir(const char *path) {
    struct stat st;
    if (lstat(path, &st) == 0) return S_ISDIR(st.st_mode) ? 0 : -1;
    if (mkdir(path, 0777) != 0 && errno != EEXIST) return -1;
    return lstat(path, &st) == 0 && S_ISDIR(st.st_mode) ? 0 : -1;
}

/* Resolve a client path relative to the root. Returns 0 and malloc'd absolute
 * and normalised relative paths, or an HTTP status with a message. */
static int resolve_path(const cs_server *s, const char *rel, char **abs_out, char **norm_out, char *msg,
                        size_t msz) {
    *abs_out = *norm_out = NULL;
    size_t n = strlen(rel);
    if (n == 0 || n > MAX_PATH_LEN) {
        snprintf(msg, msz, "path is empty or too long");
        return 400;
    }
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)rel[i] < 0x20 || rel[i] == 0x7f) {
            snprintf(msg, msz, "path contains control characters");
            return 400;
        }
    if (rel[0] == '/') {
        snprintf(msg, msz, "absolute paths are not allowed (paths are relative to the root)");
        return 403;
    }
    char *norm = malloc(n + 1);
    if (!norm) {
        snprintf(msg, msz, "out of memory");
        return 500;
    }
    size_t k = 0;
    const char *p = rel;
    while (*p) {
        const char *e = strchr(p, '/');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len > 0) {
            if (p[0] == '.') {
                free(norm);
                snprintf(msg, msz, "path components may not be '..' or start with '.'");
                return 403;
            }
            if (k) norm[k++] = '/';
            memcpy(norm + k, p, len);
            k += len;
        }
        p += len;
        if (*p == '/') p++;
    }
    norm[k] = 0;
    if (k == 0) {
        free(norm);
        snprintf(msg, msz, "path is empty");
        return 400;
    }
    size_t jl = strlen(s->root) + 1 + k + 1;
    char *joined = malloc(jl);
    if (!joined) {
        free(norm);
        snprintf(msg, msz, "out of memory");
        return 500;
    }
    snprintf(joined, jl, "%s/%s", s->root, norm);
    char *real = realpath(joined, NULL);
    free(joined);
    if (!real) {
        free(norm);
        snprintf(msg, msz, "no such file");
        return 404;
    }
    size_t rl = strlen(s->root);
    if (strncmp(real, s->root, rl) != 0 || real[rl] != '/') {
        free(real);
        free(norm);
        snprintf(msg, msz, "path leads outside the root");
        return 403;
    }
    struct stat st;
    if (stat(real, &st) != 0 || !S_ISREG(st.st_mode)) {
        free(real);
        free(norm);
        snprintf(msg, msz, "not a regular file");
        return 404;
    }
    *abs_out = real;
    *norm_out = norm;
    return 0;
}

/* ------------------------------------------------------------ registry (lock held) */

static image *find_image(cs_server *s, const char *id, size_t n) {
    for (image *im = s->images; im; im = im->next)
        if (strlen(im->id) == n && !memcmp(im->id, id, n)) return im;
    return NULL;
}

/* Drop an image's prompt state: logits kept for refinement and window embeddings. */
static void free_slots(image *im) {
    for (int i = 0; i < LOGIT_SLOTS; i++) {
        free(im->slots[i].logits);
        im->slots[i].logits = NULL;
        im->slots[i].ref = 0;
    }
    for (int i = 0; i < VIEWS; i++) {
        free(im->views[i].emb);
        memset(&im->views[i], 0, sizeof im->views[i]);
    }
}

static void image_free(image *im) {
    if (!im) return;
    free(im->rel);
    free(im->abs);
    free(im->emb);
    shared_result_release(im->seg);
    free_slots(im);
    free(im);
}

static void queue_job(cs_server *s, image *im, int kind) {
    job *j = calloc(1, sizeof *j);
    if (!j) {
        if (kind == JOB_EMBED) {
            im->emb_state = ST_ERROR;
            snprintf(im->emb_error, sizeof im->emb_error, "out of memory");
        } else {
            im->seg_state = ST_ERROR;
            snprintf(im->seg_error, sizeof im->seg_error, "out of memory");
        }
        return;
    }
    j->im = im;
    j->kind = kind;
    im->refs++;
    if (kind == JOB_EMBED) im->emb_state = ST_QUEUED;
    else im->seg_state = ST_QUEUED;
    if (s->jobs_tail) s->jobs_tail->next = j;
    else s->jobs_head = j;
    s->jobs_tail = j;
    pthread_cond_signal(&s->job_cv);
}

static int image_busy(const image *im) {
    return im->refs > 0 || im->emb_state == ST_QUEUED || im->emb_state == ST_RUNNING ||
           im->seg_state == ST_QUEUED || im->seg_state == ST_RUNNING;
}

/* Keep at most o.cache embeddings: drop the least recently used (not `keep`). */
static void evict_embeddings(cs_server *s, const image *keep) {
    for (;;) {
        int n = 0;
        image *lru = NULL;
        for (image *im = s->images; im; im = im->next) {
            if (im->emb_state != ST_READY) continue;
            n++;
            if (im != keep && (!lru || im->last_used < lru->last_used)) lru = im;
        }
        if (n <= s->o.cache || !lru) return;
        free(lru->emb);
        lru->emb = NULL;
        lru->emb_state = ST_NONE;
        free_slots(lru);
    }
}

static json_t *status_json(const cs_server *s, const image *im) {
    double now = cs_now_seconds();
    json_t *emb = json_pack("{s:s}", "state", k_state[im->emb_state]);
    double ep = im->emb_state == ST_READY ? 1.0 : 0.0;
    if (im->emb_state == ST_RUNNING) {
        double el = now - im->emb_t0;
        ep = s->emb_estimate > 0 ? el / s->emb_estimate : 0.0;
        if (ep > 0.95) ep = 0.95;
        json_object_set_new(emb, "elapsed", json_real(el));
    }
    json_object_set_new(emb, "progress", json_real(ep));
    if (im->emb_state == ST_READY) json_object_set_new(emb, "seconds", json_real(im->emb_seconds));
    if (im->emb_state == ST_ERROR) json_object_set_new(emb, "error", json_string(im->emb_error));
    json_t *seg = json_pack("{s:s}", "state", k_state[im->seg_state]);
    double sp = im->seg_state == ST_READY ? 1.0 : 0.0;
    if (im->seg_state == ST_RUNNING) {
        double el = now - im->seg_t0;
        if (im->seg_total > 0) sp = (double)im->seg_done / im->seg_total;
        else if (!im->seg_params.tiled) sp = s->seg_estimate > 0 ? el / s->seg_estimate : 0.0;
        if (sp > 0.95) sp = 0.95;
        json_object_set_new(seg, "elapsed", json_real(el));
        json_object_set_new(seg, "tiles_done", json_integer(im->seg_done));
        json_object_set_new(seg, "tiles_total", json_integer(im->seg_total));
    }
    json_object_set_new(seg, "progress", json_real(sp));
    if (im->seg_state == ST_READY && im->seg) {
        json_object_set_new(seg, "seconds", json_real(im->seg_seconds));
        json_object_set_new(seg, "n_cells", json_integer(im->seg->r->n_cells));
    }
    if (im->seg_state == ST_ERROR) json_object_set_new(seg, "error", json_string(im->seg_error));
    return json_pack("{s:s,s:s,s:i,s:i,s:i,s:i,s:i,s:b,s:o,s:o}", "id", im->id, "path", im->rel, "width",
                     im->width, "height", im->height, "channels", im->channels, "nuclear", im->nuclear, "cell",
                     im->cell, "grey", im->grey, "embedding", emb, "segment", seg);
}

/* ------------------------------------------------------------ worker */

/* Read the image file again, all of it or only view v's window of it (for a TIFF, only
 * the strips or tiles that touch it; w x h pixels), and place its channels as the model
 * takes them. */
static int load_model_input(const image *im, const char *abs, const view *v, int w, int h, float **hw3, char *err,
                            size_t esz) {
    *hw3 = NULL;
    cs_image_reader *r = NULL;
    cs_image img;
    int rc = cs_image_reader_open(abs, &r);
    if (!rc) {
        cs_image_info info;
        cs_image_reader_info(r, &info);
        if (info.width != im->width || info.height != im->height) {
            cs_image_reader_close(r);
            snprintf(err, esz, "the file changed since it was opened; open it again");
            return -1;
        }
        rc = v && v->side ? cs_image_reader_read_region(r, v->x0, v->y0, w, h, &img) : cs_image_reader_read_all(r, &img);
        cs_image_reader_close(r);
    }
    if (!rc) {
        rc = cs_image_to_model_input(&img, im->nuclear, im->cell, im->grey ? CS_CHANNELS_GREY : CS_CHANNELS_OFFICIAL,
                                     hw3);
        cs_image_free(&img);
    }
    if (rc) snprintf(err, esz, "%s", cellsam_last_error());
    return rc ? -1 : 0;
}

/* The SAM embedding of an image (v NULL or whole) or of a window of it, computed
 * with ctx (which then holds it). The whole image's pass also writes the image's
 * per-channel range (min x3, max x3) to `range`. A window is seen as segment --boxes
 * sees it at cell size: edge-padded, min-max normalised with that range; only the
 * window's region of the file is read. */
static int compute_embedding(cs_server *s, cellsam_context *ctx, const image *im, const char *abs, const view *v,
                             float range[6], float **emb, int *C, int *h, int *w, char *err, size_t esz) {
    float *hw3 = NULL, *chw = NULL, *sam = NULL, *win = NULL;
    const int is_window = v && v->side;
    const int S = is_window ? v->side : 0, vw = is_window && im->width - v->x0 < S ? im->width - v->x0 : S,
              vh = is_window && im->height - v->y0 < S ? im->height - v->y0 : S;
    if (load_model_input(im, abs, v, vw, vh, &hw3, err, esz)) return -1;
    int rc = CELLSAM_OK;
    const float *in = hw3;
    int iw = im->width, ih = im->height;
    if (is_window) {
        win = cs_zoom_canvas(hw3, vw, 0, 0, vw, vh, S);
        if (!win) rc = CELLSAM_ERR_NOMEM;
        else cs_tile_apply_minmax(win, (size_t)S * S, range, range + 3);
        in = win;
        iw = ih = S;
    } else {
        cs_tile_channel_minmax_hw3(hw3, (size_t)im->width * im->height, range, range + 3);
    }
    chw = cs_alloc((size_t)iw * ih, 3 * sizeof(float));
    sam = cs_alloc((size_t)3 * CS_PREP_SIZE, CS_PREP_SIZE * sizeof(float));
    if (!chw || !sam) rc = CELLSAM_ERR_NOMEM;
    if (!rc) rc = cs_normalize_image(in, ih, iw, chw);
    if (!rc) rc = cs_prep_branches(chw, ih, iw, sam, NULL);
    if (!rc) rc = cellsam_encode(ctx, sam, s->o.threads);
    const float *e = NULL;
    if (!rc) rc = cellsam_get_embedding(ctx, &e, C, h, w);
    if (!rc) {
        size_t n = (size_t)*C * *h * *w;
        *emb = malloc(n * sizeof(float));
        if (*emb) memcpy(*emb, e, n * sizeof(float));
        else rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    if (rc) snprintf(err, esz, "%s", rc == CELLSAM_ERR_NOMEM ? "out of memory" : cellsam_last_error());
    free(hw3);
    free(win);
    cs_free(chw);
    cs_free(sam);
    return rc ? -1 : 0;
}

typedef struct {
    cs_server *s;
    image *im;
} progress_ctx;

static void seg_progress(int done, int total, void *user) {
    progress_ctx *p = user;
    pthread_mutex_lock(&p->s->mu);
    p->im->seg_done = done;
    p->im->seg_total = total;
    pthread_mutex_unlock(&p->s->mu);
}

/* A running segment-all stops between tiles and stages when it is asked to, or when the
 * server shuts down. */
static int seg_should_abort(void *user) {
    progress_ctx *p = user;
    pthread_mutex_lock(&p->s->mu);
    const int stop = p->s->quit || p->im->seg_stop;
    pthread_mutex_unlock(&p->s->mu);
    return stop;
}

static void *worker_main(void *arg) {
    cs_server *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->quit && (!s->jobs_head || s->swapping)) pthread_cond_wait(&s->job_cv, &s->mu);
        if (s->quit) break;
        s->worker_busy = 1;
        job *j = s->jobs_head;
        s->jobs_head = j->next;
        if (!s->jobs_head) s->jobs_tail = NULL;
        image *im = j->im;
        char err[256] = "";
        char *abs = strdup(im->abs);
        double t0 = cs_now_seconds();
        if (j->kind == JOB_EMBED) {
            im->emb_state = ST_RUNNING;
            im->emb_t0 = t0;
            pthread_mutex_unlock(&s->mu);
            float *emb = NULL, range[6];
            int C = 0, h = 0, w = 0;
            int rc = abs ? compute_embedding(s, s->worker_ctx, im, abs, NULL, range, &emb, &C, &h, &w, err, sizeof err)
                         : -1;
            if (!abs) snprintf(err, sizeof err, "out of memory");
            pthread_mutex_lock(&s->mu);
            if (!rc) {
                free(im->emb);
                im->emb = emb;
                im->emb_c = C;
                im->emb_h = h;
                im->emb_w = w;
                im->emb_serial = ++s->serial;
                memcpy(im->range, range, sizeof range);
                im->emb_state = ST_READY;
                im->emb_seconds = cs_now_seconds() - t0;
                s->emb_estimate = im->emb_seconds;
                free_slots(im);
                evict_embeddings(s, im);
            } else {
                im->emb_state = ST_ERROR;
                snprintf(im->emb_error, sizeof im->emb_error, "%s", err);
            }
        } else {
            im->seg_state = ST_RUNNING;
            im->seg_stop = 0;
            im->seg_t0 = t0;
            im->seg_done = im->seg_total = 0;
            cellsam_segment_params sp = im->seg_params;
            pthread_mutex_unlock(&s->mu);
            progress_ctx pc = {s, im};
            sp.n_threads = s->o.threads;
            sp.progress = seg_progress;
            sp.abort = seg_should_abort;
            sp.progress_user = &pc;
            float *hw3 = NULL, *emb = NULL;
            cellsam_result *r = NULL;
            /* whole-image mode reuses the embedding computed for prompting (copied under
             * the lock: the cache may evict it meanwhile) */
            if (!sp.tiled && sp.diameter == 0) { /* (a zoomed image is another network input) */
                pthread_mutex_lock(&s->mu);
                if (im->emb_state == ST_READY && im->emb) {
                    size_t n = (size_t)im->emb_c * im->emb_h * im->emb_w;
                    emb = malloc(n * sizeof(float));
                    if (emb) memcpy(emb, im->emb, n * sizeof(float));
                }
                pthread_mutex_unlock(&s->mu);
                sp.embedding = emb;
            }
            int rc = abs ? load_model_input(im, abs, NULL, 0, 0, &hw3, err, sizeof err) : -1;
            if (!abs) snprintf(err, sizeof err, "out of memory");
            int aborted = 0;
            if (!rc) {
                const int src = cellsam_segment(s->worker_ctx, hw3, im->width, im->height, 3, &sp, &r);
                if (src) {
                    snprintf(err, sizeof err, "%s", cellsam_last_error());
                    aborted = src == CELLSAM_ERR_ABORTED;
                    rc = -1;
                }
            }
            free(hw3);
            free(emb);
            shared_result *held = rc ? NULL : malloc(sizeof *held);
            if (!rc && !held) {
                cellsam_result_free(r);
                snprintf(err, sizeof err, "out of memory");
                rc = -1;
            }
            pthread_mutex_lock(&s->mu);
            if (!rc) {
                shared_result_release(im->seg);
                *held = (shared_result){r, 1};
                im->seg = held;
                im->seg_state = ST_READY;
                im->seg_seconds = cs_now_seconds() - t0;
                s->seg_estimate = im->seg_seconds;
            } else if (aborted) {
                im->seg_state = ST_STOPPED;
            } else {
                im->seg_state = ST_ERROR;
                snprintf(im->seg_error, sizeof im->seg_error, "%s", err);
            }
        }
        free(abs);
        im->refs--;
        free(j);
        s->worker_busy = 0;
        pthread_cond_broadcast(&s->ctx_cv); /* a model swap may be waiting */
    }
    /* drop what is still queued */
    while (s->jobs_head) {
        job *j = s->jobs_head;
        s->jobs_head = j->next;
        j->im->refs--;
        if (j->kind == JOB_EMBED) j->im->emb_state = ST_NONE;
        else j->im->seg_state = ST_NONE;
        free(j);
    }
    s->jobs_tail = NULL;
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ------------------------------------------------------------ label container */

/* Encode labels (W x H) as the "CSL1" run-length container with optional JSON. */
static unsigned char *encode_labels(const uint32_t *lab, int W, int H, const char *info, size_t *len_out) {
    size_t n = (size_t)W * H, runs = 0;
    for (size_t i = 0; i < n; i++)
        if (i == 0 || lab[i] != lab[i - 1]) runs++;
    size_t ilen = info ? strlen(info) : 0, total;
    if (cs_mul_size(runs, 8, &total) || cs_add_size(total, 16 + ilen, &total)) return NULL;
    unsigned char *b = malloc(total);
    if (!b) return NULL;
    memcpy(b, "CSL1", 4);
    put_u32(b + 4, (uint32_t)W);
    put_u32(b + 8, (uint32_t)H);
    put_u32(b + 12, (uint32_t)runs);
    unsigned char *p = b + 16;
    size_t i = 0;
    while (i < n) {
        size_t j = i + 1;
        while (j < n && lab[j] == lab[i] && j - i < UINT32_MAX) j++;
        put_u32(p, (uint32_t)(j - i));
        put_u32(p + 4, lab[i]);
        p += 8;
        i = j;
    }
    if (ilen) memcpy(p, info, ilen);
    *len_out = total;
    return b;
}

/* Decode and validate a container for a W x H image. info_out gets the parsed
 * JSON (or NULL). Returns 0 or an HTTP status with a message. */
static int decode_labels(const unsigned char *b, size_t len, int W, int H, uint32_t **out, json_t **info_out,
                         char *msg, size_t msz) {
    *out = NULL;
    *info_out = NULL;
    if (len < 16 || memcmp(b, "CSL1", 4) != 0) {
        snprintf(msg, msz, "body is not a label container (expected 'CSL1' header)");
        return 400;
    }
    if (get_u32(b + 4) != (uint32_t)W || get_u32(b + 8) != (uint32_t)H) {
        snprintf(msg, msz, "label image is %ux%u, the image is %dx%d", get_u32(b + 4), get_u32(b + 8), W, H);
        return 400;
    }
    uint64_t runs = get_u32(b + 12), n = (uint64_t)W * H;
    if (runs == 0 || runs > n || 16 + runs * 8 > len) {
        snprintf(msg, msz, "bad run count %llu", (unsigned long long)runs);
        return 400;
    }
    uint32_t *lab = malloc((size_t)n * sizeof *lab);
    if (!lab) {
        snprintf(msg, msz, "out of memory");
        return 500;
    }
    uint64_t pos = 0;
    const unsigned char *p = b + 16;
    for (uint64_t r = 0; r < runs; r++, p += 8) {
        uint64_t cnt = get_u32(p);
        uint32_t v = get_u32(p + 4);
        if (cnt == 0 || pos + cnt > n) {
            free(lab);
            snprintf(msg, msz, "runs do not cover the image exactly");
            return 400;
        }
        if (v > LABEL_MAX_VALUE) {
            free(lab);
            snprintf(msg, msz, "label %u is above %u (renumber the labels)", v, LABEL_MAX_VALUE);
            return 400;
        }
        for (uint64_t i = 0; i < cnt; i++) lab[pos + i] = v;
        pos += cnt;
    }
    if (pos != n) {
        free(lab);
        snprintf(msg, msz, "runs do not cover the image exactly");
        return 400;
    }
    size_t rest = len - 16 - (size_t)runs * 8;
    if (rest) {
        json_error_t je;
        json_t *info = json_loadb((const char *)p, rest, JSON_REJECT_DUPLICATES, &je);
        if (!info || !json_is_object(info)) {
            json_decref(info);
            free(lab);
            snprintf(msg, msz, "cell info after the runs is not a JSON object");
            return 400;
        }
        *info_out = info;
    }
    *out = lab;
    return 0;
}

/* ------------------------------------------------------------ storage */

/* root/.cellsam/<rel>.<suffix>, creating folders. NULL if a folder cannot be made. */
static char *store_path(const cs_server *s, const char *rel, const char *suffix, int create) {
    size_t n = strlen(s->root) + strlen(rel) + strlen(suffix) + 16;
    char *p = malloc(n);
    if (!p) return NULL;
    snprintf(p, n, "%s/.cellsam", s->root);
    if (create && ensure_dir(p)) {
        free(p);
        return NULL;
    }
    size_t base = strlen(p);
    snprintf(p + base, n - base, "/%s%s", rel, suffix);
    if (create)
        for (char *q = p + base + 1; *q; q++)
            if (*q == '/') {
                *q = 0;
                int bad = ensure_dir(p);
                *q = '/';
                if (bad) {
                    free(p);
                    return NULL;
                }
            }
    return p;
}

/* A path under the root as the API shows it: relative to the root (else unchanged). */
static const char *root_relative(const cs_server *s, const char *path) {
    size_t rl = strlen(s->root);
    return !strncmp(path, s->root, rl) && path[rl] == '/' ? path + rl + 1 : path;
}

/* Saved labels of an image: 0 ok, 404 none, other status on error. */
static int load_saved_locked(const cs_server *s, const char *rel, int W, int H, uint32_t **lab_out,
                             json_t **info_out, char *msg, size_t msz) {
    *lab_out = NULL;
    *info_out = NULL;
    char *lp = store_path(s, rel, ".labels.png", 0);
    char *ip = store_path(s, rel, ".cells.json", 0);
    int status = 0;
    struct stat st;
    if (!lp || !ip) {
        snprintf(msg, msz, "out of memory");
        status = 500;
    } else if (lstat(lp, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(msg, msz, "no labels saved for this image");
        status = 404;
    }
    cs_image img;
    memset(&img, 0, sizeof img);
    if (!status && cs_image_read(lp, &img)) {
        snprintf(msg, msz, "saved labels unreadable: %s", cellsam_last_error());
        status = 500;
    }
    if (!status && (img.width != W || img.height != H || img.channels != 1)) {
        snprintf(msg, msz, "saved labels are %dx%d, the image is %dx%d", img.width, img.height, W, H);
        status = 409;
    }
    if (!status) {
        size_t n = (size_t)W * H;
        uint32_t *lab = malloc(n * sizeof *lab);
        if (!lab) {
            snprintf(msg, msz, "out of memory");
            status = 500;
        } else {
            for (size_t i = 0; i < n; i++) {
                float v = img.data[i];
                lab[i] = v > 0 && v <= 4294967040.0f ? (uint32_t)v : 0;
            }
            *lab_out = lab;
            if (lstat(ip, &st) == 0 && S_ISREG(st.st_mode)) {
                json_error_t je;
                json_t *info = json_load_file(ip, JSON_REJECT_DUPLICATES, &je);
                if (info && json_is_object(info)) *info_out = info;
                else json_decref(info);
            }
        }
    }
    cs_image_free(&img);
    free(lp);
    free(ip);
    return status;
}

static int load_saved(cs_server *s, const char *rel, int W, int H, uint32_t **lab_out, json_t **info_out, char *msg,
                      size_t msz) {
    pthread_mutex_lock(&s->store_mu);
    int st = load_saved_locked(s, rel, W, H, lab_out, info_out, msg, msz);
    pthread_mutex_unlock(&s->store_mu);
    return st;
}

/* ------------------------------------------------------------ handlers */

static enum MHD_Result h_info(cs_server *s, struct MHD_Connection *c) {
    cellsam_model_info mi;
    json_t *model = NULL;
    pthread_mutex_lock(&s->mu);
    int info_rc = cellsam_model_get_info(s->model, &mi);
    int can_finetune = s->model_path != NULL;
    pthread_mutex_unlock(&s->mu);
    if (!info_rc)
        model = json_pack("{s:i,s:i,s:i,s:i,s:b,s:i,s:b}", "embed_dim", mi.embed_dim, "depth", mi.depth, "prompt_dim",
                          mi.prompt_dim, "image_size", mi.image_size, "has_detector", mi.has_detector,
                          "cell_diameter", mi.cell_diameter, "auto_diameter", mi.auto_diameter);
    if (!model) model = json_object();
    return respond_json(c, 200, json_pack("{s:s,s:o,s:i,s:i,s:I,s:I,s:I,s:b,s:b}", "version", CELLSAM_VERSION,
                                          "model", model, "cache", s->o.cache, "threads", s->o.threads,
                                          "max_upload", (json_int_t)s->o.max_upload, "max_json",
                                          (json_int_t)s->o.max_json, "max_pixels", (json_int_t)s->o.max_pixels,
                                          "tiled", s->o.tiled, "finetune", can_finetune));
}

typedef struct {
    const cs_server *s;
    json_t *files;
    int n_files, n_visited, truncated;
} walk_state;

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void walk(walk_state *w, const char *dir, const char *rel, int depth) {
    if (depth > LIST_MAX_DEPTH) {
        w->truncated = 1;
        return;
    }
    DIR *d = opendir(dir);
    if (!d) return;
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (++w->n_visited > LIST_MAX_VISITED) {
            w->truncated = 1;
            break;
        }
        if (de->d_name[0] == '.') continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 32;
            char **nn = realloc(names, cap * sizeof *nn);
            if (!nn) break;
            names = nn;
        }
        if (!(names[n] = strdup(de->d_name))) break;
        n++;
    }
    closedir(d);
    if (n) qsort(names, n, sizeof *names, cmp_str);
    size_t rl = strlen(w->s->root);
    for (size_t i = 0; i < n; i++) {
        char path[4096], relp[4096];
        int l1 = snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        int l2 = snprintf(relp, sizeof relp, "%s%s%s", rel, *rel ? "/" : "", names[i]);
        if (l1 >= (int)sizeof path || l2 >= (int)sizeof relp || l2 > MAX_PATH_LEN) continue;
        struct stat st;
        if (lstat(path, &st) != 0) continue;
        if (S_ISLNK(st.st_mode)) {
            /* symlinked files count when they stay inside the root; linked folders are skipped (loops) */
            char *real = realpath(path, NULL);
            int inside = real && !strncmp(real, w->s->root, rl) && real[rl] == '/' && stat(real, &st) == 0 &&
                         S_ISREG(st.st_mode);
            free(real);
            if (!inside) continue;
        }
        if (S_ISDIR(st.st_mode)) walk(w, path, relp, depth + 1);
        else if (S_ISREG(st.st_mode) && has_image_ext(names[i])) {
            if (w->n_files >= LIST_MAX_FILES) {
                w->truncated = 1;
                continue;
            }
            w->n_files++;
            json_array_append_new(w->files, json_pack("{s:s,s:I}", "path", relp, "size", (json_int_t)st.st_size));
        }
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
}

static enum MHD_Result h_files(cs_server *s, struct MHD_Connection *c) {
    walk_state w = {s, json_array(), 0, 0, 0};
    walk(&w, s->root, "", 0);
    const char *base = strrchr(s->root, '/');
    return respond_json(c, 200, json_pack("{s:s,s:o,s:b}", "root", base && base[1] ? base + 1 : s->root, "files",
                                          w.files, "truncated", w.truncated));
}

static enum MHD_Result h_upload(cs_server *s, struct MHD_Connection *c, request *rq) {
    const char *name = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "name");
    if (!name || !*name) return respond_error(c, 400, "give the file name: /api/upload?name=FILE");
    const char *base = name;
    for (const char *q = name; *q; q++)
        if (*q == '/' || *q == '\\') base = q + 1;
    char clean[128];
    size_t k = 0;
    for (const char *q = base; *q && k < sizeof clean - 1; q++) {
        char ch = *q;
        int ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
                 ch == '_' || ch == '-';
        if (k == 0 && (ch == '.' || ch == '-')) continue; /* no hidden files, no option-like names */
        clean[k++] = ok ? ch : '_';
    }
    clean[k] = 0;
    if (!k || !has_image_ext(clean))
        return respond_error(c, 415, "file name must end in .tif, .tiff, .png, .jpg, .jpeg or .npy");
    if (rq->len == 0) return respond_error(c, 400, "empty upload");
    cs_image img;
    if (cs_image_decode((const unsigned char *)rq->body, rq->len, clean, &img))
        return respond_error(c, 415, "not a readable image: %s", cellsam_last_error());
    size_t npix = (size_t)img.width * img.height;
    cs_image_free(&img);
    if (npix > s->o.max_pixels) return respond_error(c, 413, "image has more than %zu pixels", s->o.max_pixels);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/uploads", s->root);
    if (ensure_dir(dir)) return respond_error(c, 500, "cannot create the uploads folder");
    char stem[128], ext[16];
    const char *dot = strrchr(clean, '.');
    snprintf(ext, sizeof ext, "%s", dot);
    snprintf(stem, sizeof stem, "%.*s", (int)(dot - clean), clean);
    char path[4400], rel[200];
    int fd = -1;
    for (int i = 0; i < 1000 && fd < 0; i++) {
        if (i == 0) snprintf(rel, sizeof rel, "uploads/%s%s", stem, ext);
        else snprintf(rel, sizeof rel, "uploads/%s-%d%s", stem, i, ext);
        snprintf(path, sizeof path, "%s/%s", s->root, rel);
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0) return respond_error(c, 500, "cannot create the upload file");
    size_t off = 0;
    while (off < rq->len) {
        ssize_t w = write(fd, rq->body + off, rq->len - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        off += (size_t)w;
    }
    int ok = off == rq->len;
    if (close(fd) != 0) ok = 0;
    if (!ok) {
        unlink(path);
        return respond_error(c, 500, "cannot write the upload");
    }
    return respond_json(c, 201, json_pack("{s:s,s:I}", "path", rel, "size", (json_int_t)rq->len));
}

static json_t *parse_body(request *rq, struct MHD_Connection *c, enum MHD_Result *ret, int allow_empty) {
    if (rq->len == 0 && allow_empty) return json_object();
    json_error_t je;
    json_t *j = rq->len ? json_loadb(rq->body, rq->len, JSON_REJECT_DUPLICATES, &je) : NULL;
    if (!j) {
        *ret = rq->len ? respond_error(c, 400, "malformed JSON: %s (line %d)", je.text, je.line)
                       : respond_error(c, 400, "expected a JSON body");
        return NULL;
    }
    if (!json_is_object(j)) {
        json_decref(j);
        *ret = respond_error(c, 400, "expected a JSON object");
        return NULL;
    }
    return j;
}

/* Optional integer member in [lo, hi]; 0 ok, -1 bad (message set). */
static int get_int(json_t *o, const char *key, int lo, int hi, int *out, char *msg, size_t msz) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        snprintf(msg, msz, "'%s' must be a whole number from %d to %d", key, lo, hi);
        return -1;
    }
    *out = (int)json_integer_value(v);
    return 0;
}

static int get_bool(json_t *o, const char *key, int *out, char *msg, size_t msz) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) {
        snprintf(msg, msz, "'%s' must be true or false", key);
        return -1;
    }
    *out = json_is_true(v);
    return 0;
}

static int get_real(json_t *o, const char *key, double lo, double hi, float *out, char *msg, size_t msz) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v) || !(json_number_value(v) >= lo && json_number_value(v) <= hi)) {
        snprintf(msg, msz, "'%s' must be a number from %g to %g", key, lo, hi);
        return -1;
    }
    *out = (float)json_number_value(v);
    return 0;
}

static enum MHD_Result h_open(cs_server *s, struct MHD_Connection *c, request *rq) {
    enum MHD_Result ret = MHD_NO;
    json_t *j = parse_body(rq, c, &ret, 0);
    if (!j) return ret;
    char msg[300];
    json_t *pv = json_object_get(j, "path");
    int nuclear = 0, cell = 0, grey = 0;
    if (!json_is_string(pv)) {
        json_decref(j);
        return respond_error(c, 400, "'path' must be a string (relative to the root)");
    }
    if (get_int(j, "nuclear", 0, CS_IMAGE_MAX_CHANNELS, &nuclear, msg, sizeof msg) ||
        get_int(j, "cell", 0, CS_IMAGE_MAX_CHANNELS, &cell, msg, sizeof msg) ||
        get_bool(j, "grey", &grey, msg, sizeof msg)) {
        json_decref(j);
        return respond_error(c, 400, "%s", msg);
    }
    if (grey && (nuclear || cell)) {
        json_decref(j);
        return respond_error(c, 400, "'grey' cannot be combined with 'nuclear' or 'cell'");
    }
    char *abs = NULL, *rel = NULL;
    int st = resolve_path(s, json_string_value(pv), &abs, &rel, msg, sizeof msg);
    json_decref(j);
    if (st) return respond_error(c, (unsigned)st, "%s", msg);
    struct stat sb;
    int W = 0, H = 0, C = 0;
    if (stat(abs, &sb) != 0 || cs_image_probe(abs, &W, &H, &C)) {
        free(abs);
        free(rel);
        return respond_error(c, 415, "cannot read the image: %s", cellsam_last_error());
    }
    if ((size_t)W * H > s->o.max_pixels) {
        free(abs);
        free(rel);
        return respond_error(c, 413, "image has %dx%d pixels, more than the server's limit of %zu", W, H,
                             s->o.max_pixels);
    }
    if (nuclear > C || cell > C) {
        free(abs);
        free(rel);
        return respond_error(c, 400, "the image has %d channel%s", C, C == 1 ? "" : "s");
    }
    long long mt = (long long)sb.st_mtim.tv_sec * 1000000000LL + sb.st_mtim.tv_nsec;
    pthread_mutex_lock(&s->mu);
    image *im = NULL;
    for (image *x = s->images; x; x = x->next)
        if (!strcmp(x->rel, rel) && x->nuclear == nuclear && x->cell == cell && x->grey == grey &&
            x->mtime_ns == mt && x->fsize == (long long)sb.st_size && x->width == W && x->height == H) {
            im = x;
            break;
        }
    if (!im) {
        if (s->n_images >= s->o.max_images) {
            image **lp = NULL;
            for (image **pp = &s->images; *pp; pp = &(*pp)->next)
                if (!image_busy(*pp) && (!lp || (*pp)->last_used < (*lp)->last_used)) lp = pp;
            if (!lp) {
                pthread_mutex_unlock(&s->mu);
                free(abs);
                free(rel);
                return respond_error(c, 503, "too many images open; try again later");
            }
            image *old = *lp;
            *lp = old->next;
            image_free(old);
            s->n_images--;
        }
        im = calloc(1, sizeof *im);
        if (!im) {
            pthread_mutex_unlock(&s->mu);
            free(abs);
            free(rel);
            return respond_error(c, 500, "out of memory");
        }
        snprintf(im->id, sizeof im->id, "i%llu", (unsigned long long)++s->next_id);
        im->rel = rel;
        im->abs = abs;
        rel = abs = NULL;
        im->nuclear = nuclear;
        im->cell = cell;
        im->grey = grey;
        im->width = W;
        im->height = H;
        im->channels = C;
        im->mtime_ns = mt;
        im->fsize = (long long)sb.st_size;
        im->next = s->images;
        s->images = im;
        s->n_images++;
    }
    free(abs);
    free(rel);
    im->last_used = ++s->clock;
    if (im->emb_state == ST_NONE) queue_job(s, im, JOB_EMBED);
    json_t *out = status_json(s, im);
    char *lp = store_path(s, im->rel, ".labels.png", 0);
    pthread_mutex_unlock(&s->mu);
    json_object_set_new(out, "saved_labels", json_boolean(lp && access(lp, R_OK) == 0));
    free(lp);
    return respond_json(c, 200, out);
}

/* Look up the image of an /api/images/ID/... request and take a reference. */
static image *acquire_image(cs_server *s, const char *id, size_t n) {
    pthread_mutex_lock(&s->mu);
    image *im = find_image(s, id, n);
    if (im) {
        im->refs++;
        im->last_used = ++s->clock;
    }
    pthread_mutex_unlock(&s->mu);
    return im;
}

static void release_image(cs_server *s, image *im) {
    pthread_mutex_lock(&s->mu);
    im->refs--;
    pthread_mutex_unlock(&s->mu);
}

static enum MHD_Result h_status(cs_server *s, struct MHD_Connection *c, image *im) {
    pthread_mutex_lock(&s->mu);
    json_t *out = status_json(s, im);
    pthread_mutex_unlock(&s->mu);
    return respond_json(c, 200, out);
}

/* Display data: uint16 planes (channel-major), each channel stretched from its
 * min to max; headers give min/max and the 0.5/99.5 percentiles in that scale. */
static enum MHD_Result h_pixels(cs_server *s, struct MHD_Connection *c, image *im) {
    cs_image img;
    if (cs_image_read(im->abs, &img)) return respond_error(c, 500, "cannot read the image: %s", cellsam_last_error());
    if (img.width != im->width || img.height != im->height) {
        cs_image_free(&img);
        return respond_error(c, 409, "the file changed since it was opened; open it again");
    }
    size_t npix = (size_t)img.width * img.height, total;
    int C = img.channels;
    if (cs_mul_size(npix, (size_t)C * 2, &total)) {
        cs_image_free(&img);
        return respond_error(c, 413, "image too large");
    }
    uint16_t *out = malloc(total ? total : 1);
    uint32_t *hist = calloc(65536, sizeof *hist);
    if (!out || !hist) {
        free(out);
        free(hist);
        cs_image_free(&img);
        return respond_error(c, 500, "out of memory");
    }
    char stats[CS_IMAGE_MAX_CHANNELS * 80 + 1] = "";
    size_t sl = 0;
    for (int ch = 0; ch < C; ch++) {
        double mn = INFINITY, mx = -INFINITY;
        for (size_t i = 0; i < npix; i++) {
            float v = img.data[i * C + ch];
            if (!isfinite(v)) continue;
            if (v < mn) mn = v;
            if (v > mx) mx = v;
        }
        if (!(mn <= mx)) mn = mx = 0;
        double scale = mx > mn ? 65535.0 / (mx - mn) : 0.0;
        memset(hist, 0, 65536 * sizeof *hist);
        uint16_t *plane = out + (size_t)ch * npix;
        for (size_t i = 0; i < npix; i++) {
            float v = img.data[i * C + ch];
            double t = isfinite(v) ? (v - mn) * scale : 0.0;
            uint16_t q = (uint16_t)(t < 0 ? 0 : t > 65535 ? 65535 : t + 0.5);
            plane[i] = q; /* little-endian hosts: the client reads a Uint16Array */
            hist[q]++;
        }
        size_t lo_n = (size_t)(npix * 0.005), hi_n = (size_t)(npix * 0.995), acc = 0;
        int lo = -1, hi = 65535;
        for (int v = 0; v < 65536; v++) {
            acc += hist[v];
            if (lo < 0 && acc > lo_n) lo = v;
            if (acc > hi_n || acc == npix) {
                hi = v;
                break;
            }
        }
        if (lo < 0) lo = 0;
        if (hi <= lo) hi = lo + 1 > 65535 ? 65535 : lo + 1;
        sl += (size_t)snprintf(stats + sl, sizeof stats - sl, "%s%.9g,%.9g,%d,%d", ch ? ";" : "", mn, mx, lo, hi);
    }
    free(hist);
    char dims[64];
    snprintf(dims, sizeof dims, "%d,%d,%d", img.width, img.height, C);
    cs_image_free(&img);
    const char *hdr[] = {"X-Cellsam-Stats", stats, "X-Cellsam-Dims", dims, NULL};
    return respond(c, 200, "application/octet-stream", out, total, hdr);
}

static int parse_xy(json_t *a, int n, double *v) {
    if (!json_is_array(a) || (int)json_array_size(a) != n) return -1;
    for (int i = 0; i < n; i++) {
        json_t *e = json_array_get(a, (size_t)i);
        if (!json_is_number(e)) return -1;
        v[i] = json_number_value(e);
        if (!isfinite(v[i]) || fabs(v[i]) > 1e9) return -1;
    }
    return 0;
}

static double clampd(double v, double lo, double hi) { return v < lo ? lo : v > hi ? hi : v; }

/* One mask of a W x H image, decoded in view v: tight box and run lengths (alternating
 * off/on from off) inside it, in image pixels (a window's padding cut off). */
static json_t *mask_json(const float *lg, int W, int H, const view *vw, float iou, char *msg, size_t msz) {
    const int fw = vw->side ? vw->side : W, fh = vw->side ? vw->side : H; /* the frame decoded */
    const int cw = vw->side && W - vw->x0 < fw ? W - vw->x0 : fw, ch = vw->side && H - vw->y0 < fh ? H - vw->y0 : fh;
    int x0, y0, x1, y1;
    int nlow = cs_mask_support_region(lg, fh, fw, CS_MASK_LOGIT_OFF, &x0, &y0, &x1, &y1);
    if (x1 > cw) x1 = cw;
    if (y1 > ch) y1 = ch;
    json_t *counts = json_array();
    long long area = 0;
    int bx0 = 0, by0 = 0, bx1 = 0, by1 = 0;
    if (nlow > 0 && x1 > x0 && y1 > y0) {
        size_t rw = (size_t)(x1 - x0), rh = (size_t)(y1 - y0);
        if (rw * rh > MAX_MASK_REGION) {
            json_decref(counts);
            snprintf(msg, msz, "mask region too large");
            return NULL;
        }
        float *buf = malloc(rw * rh * sizeof *buf);
        uint8_t *on = malloc(rw * rh);
        if (!buf || !on || cs_upsample_logits_region(lg, fh, fw, x0, y0, x1, y1, buf)) {
            free(buf);
            free(on);
            json_decref(counts);
            snprintf(msg, msz, "mask upsampling failed");
            return NULL;
        }
        int tx0 = INT_MAX, ty0 = INT_MAX, tx1 = -1, ty1 = -1;
        for (size_t y = 0; y < rh; y++)
            for (size_t x = 0; x < rw; x++) {
                uint8_t v = (uint8_t)cs_mask_logit_on(buf[y * rw + x]);
                on[y * rw + x] = v;
                if (v) {
                    area++;
                    if ((int)x < tx0) tx0 = (int)x;
                    if ((int)x > tx1) tx1 = (int)x;
                    if ((int)y < ty0) ty0 = (int)y;
                    if ((int)y > ty1) ty1 = (int)y;
                }
            }
        if (area) {
            bx0 = vw->x0 + x0 + tx0;
            by0 = vw->y0 + y0 + ty0;
            bx1 = vw->x0 + x0 + tx1 + 1;
            by1 = vw->y0 + y0 + ty1 + 1;
            uint8_t cur = 0;
            long long run = 0;
            for (int y = ty0; y <= ty1; y++)
                for (int x = tx0; x <= tx1; x++) {
                    uint8_t v = on[(size_t)y * rw + x];
                    if (v != cur) {
                        json_array_append_new(counts, json_integer(run));
                        run = 0;
                        cur = v;
                    }
                    run++;
                }
            json_array_append_new(counts, json_integer(run));
        }
        free(buf);
        free(on);
    }
    return json_pack("{s:f,s:I,s:[iiii],s:o}", "iou", (double)iou, "area", (json_int_t)area, "bbox", bx0, by0, bx1,
                     by1, "counts", counts);
}

static ctx_slot *pool_acquire(cs_server *s, uint64_t serial) {
    for (;;) {
        if (s->swapping) {
            pthread_cond_wait(&s->ctx_cv, &s->mu);
            continue;
        }
        ctx_slot *any = NULL;
        for (int i = 0; i < s->n_pool; i++) {
            if (s->pool[i].busy) continue;
            if (s->pool[i].serial == serial) {
                s->pool[i].busy = 1;
                return &s->pool[i];
            }
            if (!any) any = &s->pool[i];
        }
        if (any) {
            any->busy = 1;
            return any;
        }
        pthread_cond_wait(&s->ctx_cv, &s->mu);
    }
}

/* The view a box prompt decodes in. With a model that recommends cell sizing (as
 * segment --boxes does then), a box the whole-image input shows at more than 1.5 times
 * the model's cell diameter or less than 1/1.5 of it (small cells on large images,
 * large cells on small ones) is decoded in the window that shows it at the cell
 * diameter: zoom = cell diameter / sqrt(w h), in quarter octaves so that cells of a
 * size share windows, within [1/4, 4]; a kept window of that side holding the box with
 * a margin of an eighth is reused, else one is centred on the box and moved inside the
 * image. Otherwise the whole-image input (no encoder pass per prompt), as the official
 * checkpoint always does. Called with the lock held (the model may be swapped). */
static view prompt_view(const cs_server *s, const image *im, double bx0, double by0, double bx1, double by1) {
    view v = {0, 0, 0};
    cellsam_model_info info;
    if (cellsam_model_get_info(s->model, &info) || info.cell_diameter <= 0 || !info.auto_diameter) return v;
    const double bw = fmax(bx1 - bx0, 1), bh = fmax(by1 - by0, 1), cd = info.cell_diameter;
    const double whole = sqrt(bw * CS_SAM_INPUT_SIZE / im->width * bh * CS_SAM_INPUT_SIZE / im->height);
    if (whole >= cd / PROMPT_VIEW_BAND && whole <= cd * PROMPT_VIEW_BAND) return v;
    const double z = cs_zoom_clamp(pow(2.0, round(4 * log2(cd / sqrt(bw * bh))) / 4));
    const int S = cs_zoom_side(z), margin = S / 8;
    for (int i = 0; i < VIEWS; i++) {
        const view *k = &im->views[i].v;
        if (k->side == S && bx0 >= k->x0 + margin && by0 >= k->y0 + margin && bx1 <= k->x0 + S - margin &&
            by1 <= k->y0 + S - margin)
            return *k;
    }
    v.side = S;
    v.x0 = cs_window_origin((int)floor(0.5 * (bx0 + bx1)), S / 2, S, im->width);
    v.y0 = cs_window_origin((int)floor(0.5 * (by0 + by1)), S / 2, S, im->height);
    return v;
}

static view_emb *find_view_emb(image *im, const view *v) {
    for (int i = 0; i < VIEWS; i++)
        if (im->views[i].emb && !memcmp(&im->views[i].v, v, sizeof *v)) return &im->views[i];
    return NULL;
}

/* Image pixels to the 1024 x 1024 input of view v. */
static float to_view(double p, int origin, int side, int extent) {
    return (float)(side ? (p - origin) * CS_SAM_INPUT_SIZE / side : p * CS_SAM_INPUT_SIZE / extent);
}

static enum MHD_Result h_prompt(cs_server *s, struct MHD_Connection *c, request *rq, image *im) {
    double t0 = cs_now_seconds();
    enum MHD_Result ret = MHD_NO;
    json_t *j = parse_body(rq, c, &ret, 0);
    if (!j) return ret;
    char msg[300];
    const int W = im->width, H = im->height;
    double box_px[4] = {0, 0, 0, 0}; /* x0, y0, x1, y1 in image pixels */
    double pt_px[MAX_POINTS][2];
    cellsam_box box;
    cellsam_point pts[MAX_POINTS];
    int has_box = 0, np = 0, multimask = 0;
    long long mref = -1, midx = 0;
    json_t *bv = json_object_get(j, "box"), *pv = json_object_get(j, "points"), *mv = json_object_get(j, "mask_input");
    if (bv && !json_is_null(bv)) {
        double b[4];
        if (parse_xy(bv, 4, b)) {
            json_decref(j);
            return respond_error(c, 400, "'box' must be [x0, y0, x1, y1] in image pixels");
        }
        box_px[0] = clampd(fmin(b[0], b[2]), 0, W);
        box_px[2] = clampd(fmax(b[0], b[2]), 0, W);
        box_px[1] = clampd(fmin(b[1], b[3]), 0, H);
        box_px[3] = clampd(fmax(b[1], b[3]), 0, H);
        has_box = 1;
    }
    if (pv && !json_is_null(pv)) {
        if (!json_is_array(pv) || json_array_size(pv) > MAX_POINTS) {
            json_decref(j);
            return respond_error(c, 400, "'points' must be an array of at most %d [x, y, label]", MAX_POINTS);
        }
        for (size_t i = 0; i < json_array_size(pv); i++) {
            json_t *e = json_array_get(pv, i);
            json_t *xv = json_array_get(e, 0), *yv = json_array_get(e, 1), *lv = json_array_get(e, 2);
            double xy[2] = {json_number_value(xv), json_number_value(yv)};
            int bad = !json_is_array(e) || json_array_size(e) != 3 || !json_is_number(xv) || !json_is_number(yv) ||
                      !isfinite(xy[0]) || !isfinite(xy[1]) || !json_is_integer(lv) ||
                      (json_integer_value(lv) != 0 && json_integer_value(lv) != 1);
            if (bad) {
                json_decref(j);
                return respond_error(c, 400, "point %zu must be [x, y, label] with label 1 (positive) or 0 (negative)",
                                     i);
            }
            pt_px[np][0] = clampd(xy[0], 0, W);
            pt_px[np][1] = clampd(xy[1], 0, H);
            pts[np].label = (int)json_integer_value(lv);
            np++;
        }
    }
    if (get_bool(j, "multimask", &multimask, msg, sizeof msg)) {
        json_decref(j);
        return respond_error(c, 400, "%s", msg);
    }
    if (mv && !json_is_null(mv)) {
        json_t *r = json_object_get(mv, "ref"), *k = json_object_get(mv, "index");
        if (!json_is_object(mv) || !json_is_integer(r) || (k && !json_is_integer(k))) {
            json_decref(j);
            return respond_error(c, 400, "'mask_input' must be {\"ref\": N, \"index\": K}");
        }
        mref = json_integer_value(r);
        midx = k ? json_integer_value(k) : 0;
    }
    json_decref(j);
    if (!has_box && np == 0) return respond_error(c, 400, "give a 'box' or at least one point");

    pthread_mutex_lock(&s->mu);
    if (im->emb_state != ST_READY) {
        if (im->emb_state == ST_NONE) queue_job(s, im, JOB_EMBED);
        json_t *st = status_json(s, im);
        pthread_mutex_unlock(&s->mu);
        json_object_set_new(st, "error", json_string("the image embedding is not ready yet"));
        return respond_json(c, 409, st);
    }
    /* the view: the refined mask's, else the box's (points alone: the whole image) */
    float *mask_in = NULL;
    int mask_used = 0, from_ref = 0;
    view v = {0, 0, 0};
    if (mref >= 0)
        for (int i = 0; i < LOGIT_SLOTS; i++)
            if (im->slots[i].logits && (long long)im->slots[i].ref == mref && midx >= 0 &&
                midx < im->slots[i].n_masks) {
                v = im->slots[i].v;
                from_ref = 1;
                mask_in = malloc(LOWRES * sizeof(float));
                if (mask_in) memcpy(mask_in, im->slots[i].logits + (size_t)midx * LOWRES, LOWRES * sizeof(float));
                mask_used = mask_in != NULL;
            }
    if (!from_ref && has_box) v = prompt_view(s, im, box_px[0], box_px[1], box_px[2], box_px[3]);
    view_emb *ve = v.side ? find_view_emb(im, &v) : NULL;
    const uint64_t want = v.side ? (ve ? ve->serial : 0) : im->emb_serial;
    ctx_slot *slot = pool_acquire(s, want);
    int rc = CELLSAM_OK, view_encoded = 0;
    if (im->emb_state == ST_READY && v.side && !ve) {
        /* a new window: encoded with this context, outside the lock (the handler's
           reference keeps the image), then kept in place of the least recently used */
        float range[6];
        memcpy(range, im->range, sizeof range);
        pthread_mutex_unlock(&s->mu);
        float *emb = NULL;
        int C, eh, ew;
        rc = compute_embedding(s, slot->ctx, im, im->abs, &v, range, &emb, &C, &eh, &ew, msg, sizeof msg) ? -1 : 0;
        pthread_mutex_lock(&s->mu);
        slot->serial = 0;
        if (!rc && im->emb_state == ST_READY) { /* (not dropped or re-channelled meanwhile) */
            ve = &im->views[0];
            for (int i = 1; i < VIEWS; i++)
                if (im->views[i].last_used < ve->last_used) ve = &im->views[i];
            free(ve->emb);
            ve->v = v;
            ve->emb = emb;
            ve->serial = ++s->serial;
            slot->serial = ve->serial;
            view_encoded = 1;
        } else {
            free(emb);
        }
    }
    if (im->emb_state != ST_READY || (!rc && v.side && !ve)) { /* evicted while waiting */
        slot->busy = 0;
        pthread_cond_broadcast(&s->ctx_cv);
        pthread_mutex_unlock(&s->mu);
        free(mask_in);
        return respond_error(c, 409, "the image embedding is not ready yet");
    }
    if (!rc) {
        const uint64_t serial = v.side ? ve->serial : im->emb_serial;
        if (slot->serial != serial) {
            rc = cellsam_set_embedding(slot->ctx, v.side ? ve->emb : im->emb, im->emb_c, im->emb_h, im->emb_w);
            if (rc) snprintf(msg, sizeof msg, "%s", cellsam_last_error());
            slot->serial = rc ? 0 : serial;
        }
        if (ve) ve->last_used = ++s->clock;
    }
    pthread_mutex_unlock(&s->mu);

    if (has_box)
        box = (cellsam_box){to_view(box_px[0], v.x0, v.side, W), to_view(box_px[1], v.y0, v.side, H),
                            to_view(box_px[2], v.x0, v.side, W), to_view(box_px[3], v.y0, v.side, H)};
    for (int i = 0; i < np; i++) {
        pts[i].x = to_view(pt_px[i][0], v.x0, v.side, W);
        pts[i].y = to_view(pt_px[i][1], v.y0, v.side, H);
    }
    float *logits = NULL, *iou = NULL;
    int nb = 0, nm = 0;
    double td = cs_now_seconds();
    if (!rc) {
        cellsam_prompt pr = cellsam_default_prompt();
        pr.boxes = has_box ? &box : NULL;
        pr.n_boxes = has_box;
        pr.points = np ? pts : NULL;
        pr.n_points = np;
        pr.mask_input = mask_in;
        pr.multimask = multimask;
        /* latency over throughput: one prompt may use every core (~3.6 GFLOP per box at full size) */
        pr.n_threads = s->o.threads;
        rc = cellsam_decode(slot->ctx, &pr, &logits, &iou, &nb, &nm);
        if (rc) snprintf(msg, sizeof msg, "%s", cellsam_last_error());
    }
    double decode_ms = (cs_now_seconds() - td) * 1000;
    free(mask_in);
    pthread_mutex_lock(&s->mu);
    slot->busy = 0;
    pthread_cond_broadcast(&s->ctx_cv);
    uint64_t ref = 0;
    if (!rc && nb == 1 && nm > 0) {
        logit_slot *ls = &im->slots[im->slot_next];
        float *copy = malloc((size_t)nm * LOWRES * sizeof(float));
        if (copy) {
            memcpy(copy, logits, (size_t)nm * LOWRES * sizeof(float));
            free(ls->logits);
            ls->logits = copy;
            ls->n_masks = nm;
            ls->v = v;
            ls->ref = ref = ++s->next_ref;
            im->slot_next = (im->slot_next + 1) % LOGIT_SLOTS;
        }
    }
    pthread_mutex_unlock(&s->mu);
    if (rc) {
        cellsam_free(logits);
        cellsam_free(iou);
        return respond_error(c, 400, "decoding failed: %s", msg);
    }
    json_t *masks = json_array();
    int best = 0;
    for (int k = 0; k < nm && masks; k++) {
        json_t *m = mask_json(logits + (size_t)k * LOWRES, W, H, &v, iou[k], msg, sizeof msg);
        if (!m) {
            json_decref(masks);
            masks = NULL;
            break;
        }
        json_array_append_new(masks, m);
        if (iou[k] > iou[best]) best = k;
    }
    cellsam_free(logits);
    cellsam_free(iou);
    if (!masks) return respond_error(c, 413, "%s", msg);
    json_t *vj = v.side ? json_pack("[iii]", v.x0, v.y0, v.side) : json_null();
    return respond_json(c, 200,
                        json_pack("{s:o,s:i,s:I,s:b,s:f,s:f,s:o,s:b}", "masks", masks, "best", best, "ref",
                                  (json_int_t)ref, "mask_input_used", mask_used, "decode_ms", decode_ms, "total_ms",
                                  (cs_now_seconds() - t0) * 1000, "view", vj, "view_encoded", view_encoded));
}

/* "diameter": a cell diameter in pixels (0 = off) or "auto" (segment --diameter) */
static int get_diameter(json_t *o, float *out, char *msg, size_t msz) {
    json_t *v = json_object_get(o, "diameter");
    if (!v || json_is_null(v)) return 0;
    if (json_is_string(v) && !strcmp(json_string_value(v), "auto")) {
        *out = CELLSAM_DIAMETER_AUTO;
        return 0;
    }
    if (get_real(o, "diameter", 0, 100000, out, msg, msz)) {
        snprintf(msg, msz, "'diameter' must be a cell diameter in pixels from 0 to 100000, or \"auto\"");
        return -1;
    }
    return 0;
}

static enum MHD_Result h_segment_start(cs_server *s, struct MHD_Connection *c, request *rq, image *im) {
    enum MHD_Result ret = MHD_NO;
    json_t *j = parse_body(rq, c, &ret, 1);
    if (!j) return ret;
    char msg[300];
    cellsam_segment_params p = cellsam_segment_default_params();
    p.tiled = s->o.tiled;
    int tiled = p.tiled, rb = 0;
    if (get_real(j, "bbox_threshold", 0, 1, &p.bbox_threshold, msg, sizeof msg) ||
        get_real(j, "iou_threshold", -10, 10, &p.iou_threshold, msg, sizeof msg) ||
        get_real(j, "box_nms_iou", 0, 1, &p.box_nms_iou, msg, sizeof msg) ||
        get_int(j, "min_size", 0, 1000000, &p.min_size, msg, sizeof msg) || get_diameter(j, &p.diameter, msg, sizeof msg) ||
        get_bool(j, "tiled", &tiled, msg, sizeof msg) || get_bool(j, "remove_boundaries", &rb, msg, sizeof msg)) {
        json_decref(j);
        return respond_error(c, 400, "%s", msg);
    }
    json_decref(j);
    p.tiled = tiled;
    p.remove_boundaries = rb;
    cellsam_model_info mi;
    pthread_mutex_lock(&s->mu);
    if (cellsam_model_get_info(s->model, &mi) == 0 && !mi.has_detector) {
        pthread_mutex_unlock(&s->mu);
        return respond_error(c, 501, "the model was loaded without its detector: segment-all is not available");
    }
    if (im->seg_state == ST_QUEUED || im->seg_state == ST_RUNNING) {
        json_t *st = status_json(s, im);
        pthread_mutex_unlock(&s->mu);
        return respond_json(c, 202, st);
    }
    im->seg_params = p;
    queue_job(s, im, JOB_SEGMENT);
    json_t *st = status_json(s, im);
    pthread_mutex_unlock(&s->mu);
    return respond_json(c, 202, st);
}

static char *cells_info_from_result(const cellsam_result *r) {
    json_t *cells = json_object();
    for (int i = 0; i < r->n_cells; i++) {
        char key[16];
        snprintf(key, sizeof key, "%u", r->cells[i].label);
        json_object_set_new(cells, key, json_pack("[ff]", (double)r->cells[i].score, (double)r->cells[i].iou));
    }
    json_t *o = json_pack("{s:o,s:i}", "cells", cells, "n_cells", r->n_cells);
    char *txt = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return txt;
}

/* POST /api/images/ID/segment/stop: a queued segment-all leaves the queue, a running one
 * stops between its tiles or stages; either way the state becomes "stopped" (409 when
 * none is queued or running). */
static enum MHD_Result h_segment_stop(cs_server *s, struct MHD_Connection *c, image *im) {
    pthread_mutex_lock(&s->mu);
    if (im->seg_state == ST_QUEUED) {
        for (job **pp = &s->jobs_head, *prev = NULL; *pp; prev = *pp, pp = &(*pp)->next) {
            job *j = *pp;
            if (j->im != im || j->kind != JOB_SEGMENT) continue;
            *pp = j->next;
            if (s->jobs_tail == j) s->jobs_tail = prev;
            im->refs--;
            free(j);
            break;
        }
        im->seg_state = ST_STOPPED;
    } else if (im->seg_state == ST_RUNNING) {
        im->seg_stop = 1; /* the worker sets "stopped" when the pipeline returns */
    } else {
        json_t *st = status_json(s, im);
        pthread_mutex_unlock(&s->mu);
        json_object_set_new(st, "error", json_string("no segment-all is queued or running"));
        return respond_json(c, 409, st);
    }
    json_t *st = status_json(s, im);
    pthread_mutex_unlock(&s->mu);
    return respond_json(c, 202, st);
}

static enum MHD_Result h_segment_result(cs_server *s, struct MHD_Connection *c, image *im) {
    pthread_mutex_lock(&s->mu);
    if (im->seg_state != ST_READY || !im->seg) {
        json_t *st = status_json(s, im);
        pthread_mutex_unlock(&s->mu);
        json_object_set_new(st, "error", json_string("no segment-all result (start one with POST)"));
        return respond_json(c, im->seg_state == ST_NONE ? 404 : 409, st);
    }
    shared_result *held = im->seg; /* encoded without the lock: see shared_result */
    held->refs++;
    pthread_mutex_unlock(&s->mu);
    const cellsam_result *r = held->r;
    char *info = cells_info_from_result(r);
    size_t len = 0;
    unsigned char *b = encode_labels(r->labels, r->width, r->height, info, &len);
    free(info);
    pthread_mutex_lock(&s->mu);
    shared_result_release(held);
    pthread_mutex_unlock(&s->mu);
    if (!b) return respond_error(c, 500, "out of memory");
    return respond(c, 200, "application/octet-stream", b, len, NULL);
}

static enum MHD_Result h_labels_get(cs_server *s, struct MHD_Connection *c, image *im) {
    uint32_t *lab = NULL;
    json_t *info = NULL;
    char msg[300];
    int st = load_saved(s, im->rel, im->width, im->height, &lab, &info, msg, sizeof msg);
    if (st) return respond_error(c, (unsigned)st, "%s", msg);
    char *txt = info ? json_dumps(info, JSON_COMPACT) : NULL;
    json_decref(info);
    size_t len = 0;
    unsigned char *b = encode_labels(lab, im->width, im->height, txt, &len);
    free(lab);
    free(txt);
    if (!b) return respond_error(c, 500, "out of memory");
    return respond(c, 200, "application/octet-stream", b, len, NULL);
}

static enum MHD_Result h_labels_put(cs_server *s, struct MHD_Connection *c, request *rq, image *im) {
    uint32_t *lab = NULL;
    json_t *info = NULL;
    char msg[300];
    int st = decode_labels((const unsigned char *)rq->body, rq->len, im->width, im->height, &lab, &info, msg,
                           sizeof msg);
    if (st) return respond_error(c, (unsigned)st, "%s", msg);
    uint32_t mx = 0;
    size_t n = (size_t)im->width * im->height;
    for (size_t i = 0; i < n; i++) mx = lab[i] > mx ? lab[i] : mx;
    pthread_mutex_lock(&s->store_mu);
    char *lp = store_path(s, im->rel, ".labels.png", 1);
    char *ip = store_path(s, im->rel, ".cells.json", 1);
    int rc = lp && ip ? cs_write_labels(lp, lab, im->width, im->height) : -1;
    if (!rc && info) {
        cs_atomic_file af;
        rc = cs_atomic_open(&af, ip);
        if (!rc) {
            if (json_dumpf(info, af.f, JSON_COMPACT)) {
                cs_atomic_abort(&af);
                rc = -1;
            } else rc = cs_atomic_commit(&af);
        }
    } else if (!rc && ip) unlink(ip);
    pthread_mutex_unlock(&s->store_mu);
    free(lab);
    json_decref(info);
    free(lp);
    free(ip);
    if (rc) return respond_error(c, 500, "cannot save the labels: %s", rc > 0 ? cellsam_last_error() : "folder");
    return respond_json(c, 200, json_pack("{s:b,s:i}", "saved", 1, "max_label", (int)mx));
}

/* Export: saved labels renumbered 1..N in order of their value. */
static enum MHD_Result h_export(cs_server *s, struct MHD_Connection *c, image *im) {
    const char *fmt = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "format");
    if (!fmt) fmt = "png";
    int kind = !strcmp(fmt, "png") ? 0 : (!strcmp(fmt, "tif") || !strcmp(fmt, "tiff")) ? 1 : !strcmp(fmt, "csv") ? 2
                                                                                                               : -1;
    if (kind < 0) return respond_error(c, 400, "format must be png, tif or csv");
    uint32_t *lab = NULL;
    json_t *info = NULL;
    char msg[300];
    int st = load_saved(s, im->rel, im->width, im->height, &lab, &info, msg, sizeof msg);
    if (st) return respond_error(c, (unsigned)st, "%s", msg);
    size_t n = (size_t)im->width * im->height;
    uint32_t mx = 0;
    for (size_t i = 0; i < n; i++) mx = lab[i] > mx ? lab[i] : mx;
    uint32_t *map = calloc((size_t)mx + 1, sizeof *map);
    if (!map) {
        free(lab);
        json_decref(info);
        return respond_error(c, 500, "out of memory");
    }
    for (size_t i = 0; i < n; i++) map[lab[i]] = 1;
    int nl = 0;
    for (uint32_t v = 1; v <= mx; v++)
        if (map[v]) map[v] = (uint32_t)++nl;
    for (size_t i = 0; i < n; i++) lab[i] = map[lab[i]];
    /* file name: the image's stem, restricted to safe characters */
    const char *base = strrchr(im->rel, '/');
    base = base ? base + 1 : im->rel;
    char stem[128];
    size_t k = 0;
    for (const char *q = base; *q && k < sizeof stem - 1; q++)
        stem[k++] = (char)((*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z') || (*q >= '0' && *q <= '9') ||
                                   *q == '-' || *q == '_' || *q == '.'
                               ? *q
                               : '_');
    stem[k] = 0;
    char *dot = strrchr(stem, '.');
    if (dot && dot != stem) *dot = 0;
    char disp[256];
    unsigned char *data = NULL;
    size_t len = 0;
    int rc = 0;
    if (kind == 2) {
        float *score = malloc(((size_t)nl + 1) * sizeof *score), *iou = malloc(((size_t)nl + 1) * sizeof *iou);
        cellsam_cell *cells = NULL;
        int nc = 0;
        rc = score && iou ? 0 : -1;
        json_t *ci = json_object_get(info, "cells");
        for (uint32_t v = 1; !rc && v <= mx; v++) {
            if (!map[v]) continue;
            char key[16];
            snprintf(key, sizeof key, "%u", v);
            json_t *e = json_object_get(ci, key);
            int ok = json_is_array(e) && json_array_size(e) == 2 && json_is_number(json_array_get(e, 0)) &&
                     json_is_number(json_array_get(e, 1));
            score[map[v] - 1] = ok ? (float)json_number_value(json_array_get(e, 0)) : NAN;
            iou[map[v] - 1] = ok ? (float)json_number_value(json_array_get(e, 1)) : NAN;
        }
        if (!rc) rc = cs_cell_stats(lab, im->height, im->width, score, iou, nl, &cells, &nc);
        char *mem = NULL;
        size_t ml = 0;
        FILE *f = rc ? NULL : open_memstream(&mem, &ml);
        if (f) {
            fprintf(f, "label,x0,y0,x1,y1,area,centroid_x,centroid_y,score,predicted_iou\n");
            for (int i = 0; i < nc; i++) {
                const cellsam_cell *cc = &cells[i];
                fprintf(f, "%u,%d,%d,%d,%d,%lld,%.3f,%.3f,", cc->label, cc->x0, cc->y0, cc->x1, cc->y1,
                        (long long)cc->area, cc->cx, cc->cy);
                /* hand-drawn cells have no detector score or predicted IoU */
                if (isfinite(cc->score)) fprintf(f, "%.6f", cc->score);
                fputc(',', f);
                if (isfinite(cc->iou)) fprintf(f, "%.6f", cc->iou);
                fputc('\n', f);
            }
            rc = fclose(f) ? -1 : 0;
            data = (unsigned char *)mem;
            len = ml;
        } else if (!rc) rc = -1;
        free(score);
        free(iou);
        free(cells);
        snprintf(disp, sizeof disp, "attachment; filename=\"%s_cells.csv\"", stem);
    } else {
        char tdir[] = "/tmp/cellsam-export-XXXXXX";
        if (!mkdtemp(tdir)) rc = -1;
        else {
            char tp[64];
            snprintf(tp, sizeof tp, "%s/labels.%s", tdir, kind ? "tif" : "png");
            rc = cs_write_labels(tp, lab, im->width, im->height);
            if (!rc) rc = cs_read_file(tp, (size_t)1 << 34, &data, &len);
            unlink(tp);
            rmdir(tdir);
        }
        snprintf(disp, sizeof disp, "attachment; filename=\"%s_labels.%s\"", stem, kind ? "tif" : "png");
    }
    free(lab);
    free(map);
    json_decref(info);
    if (rc) {
        free(data);
        return respond_error(c, 500, "export failed: %s", cellsam_last_error());
    }
    char ncount[32];
    snprintf(ncount, sizeof ncount, "%d", nl);
    const char *hdr[] = {"Content-Disposition", disp, "X-Cellsam-Labels", ncount, NULL};
    return respond(c, 200, kind == 2 ? "text/csv" : kind ? "image/tiff" : "image/png", data, len, hdr);
}

/* ------------------------------------------------------------ fine-tuning from the page */

static const char *ft_state_name(const cs_server *s) {
    if (s->ft_state == ST_READY && s->ft_report.aborted) return "stopped";
    return s->ft_state == ST_READY ? "done" : k_state[s->ft_state];
}

/* Progress of the fine-tune (call with s->mu held). */
static json_t *ft_status_json(const cs_server *s) {
    const cellsam_train_report *r = &s->ft_report;
    json_t *o = json_pack("{s:s,s:b,s:b}", "state", ft_state_name(s), "available", s->model_path != NULL,
                          "in_use", s->ft_in_use);
    if (s->ft_state == ST_NONE) return o;
    double progress = s->ft_total_steps > 0 ? (double)r->steps / (double)s->ft_total_steps : 0;
    json_object_set_new(o, "step", json_integer(r->steps));
    json_object_set_new(o, "total_steps", json_integer(s->ft_total_steps));
    json_object_set_new(o, "progress", json_real(progress > 1 ? 1 : progress));
    json_object_set_new(o, "epochs_done", json_integer(r->epochs_done));
    json_object_set_new(o, "images", json_integer(r->train_images));
    json_object_set_new(o, "held_out", json_integer(r->val_images));
    json_object_set_new(o, "loss", json_real(r->last_loss));
    if (r->val_f1 >= 0) json_object_set_new(o, "val_f1", json_real(r->val_f1));
    json_object_set_new(o, "images_per_second", json_real(r->images_per_second));
    json_object_set_new(o, "seconds", json_real(cs_now_seconds() - s->ft_t0));
    json_object_set_new(o, "log", json_string(s->ft_log));
    if (s->ft_out) {
        json_object_set_new(o, "model", json_string(root_relative(s, s->ft_out)));
    }
    if (s->ft_state == ST_ERROR) json_object_set_new(o, "error", json_string(s->ft_error));
    return o;
}

static void ft_on_log(const char *line, void *user) {
    cs_server *s = user;
    pthread_mutex_lock(&s->mu);
    snprintf(s->ft_log, sizeof s->ft_log, "%s", line);
    pthread_mutex_unlock(&s->mu);
    if (s->o.log) fprintf(stderr, "cellsam serve: finetune: %s\n", line);
}

static void ft_on_progress(const cellsam_train_report *so_far, int64_t total_steps, void *user) {
    cs_server *s = user;
    pthread_mutex_lock(&s->mu);
    s->ft_report = *so_far;
    s->ft_total_steps = total_steps;
    pthread_mutex_unlock(&s->mu);
}

static int ft_should_stop(void *user) {
    cs_server *s = user;
    pthread_mutex_lock(&s->mu);
    int stop = s->ft_abort || s->quit;
    pthread_mutex_unlock(&s->mu);
    return stop;
}

static void *ft_main(void *arg) {
    cs_server *s = arg;
    cellsam_train_report r;
    int rc = cellsam_train(&s->ft_params, &r);
    char err[256] = "";
    if (rc) snprintf(err, sizeof err, "%s", cellsam_last_error()); /* the message is per thread */
    pthread_mutex_lock(&s->mu);
    if (r.steps > 0 || !rc) s->ft_report = r;
    s->ft_state = rc ? ST_ERROR : ST_READY;
    snprintf(s->ft_error, sizeof s->ft_error, "%s", err);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* First root/.cellsam/finetuned-N.safetensors that does not exist yet. */
static char *ft_new_path(const cs_server *s) {
    char *dir = store_path(s, "", "", 1); /* root/.cellsam/ */
    if (!dir) return NULL;
    size_t n = strlen(dir) + 40;
    char *p = malloc(n);
    for (int k = 1; p && k < 10000; k++) {
        snprintf(p, n, "%sfinetuned-%d.safetensors", dir, k);
        if (access(p, F_OK) != 0) {
            free(dir);
            return p;
        }
    }
    free(dir);
    free(p);
    return NULL;
}

static enum MHD_Result h_finetune_start(cs_server *s, struct MHD_Connection *c, request *rq) {
    enum MHD_Result ret = MHD_NO;
    json_t *j = parse_body(rq, c, &ret, 1);
    if (!j) return ret;
    char msg[300];
    cellsam_train_params tp = cellsam_finetune_default_params(); /* as `cellsam finetune` */
    tp.epochs = 10; /* a few corrected images: a few steps per epoch */
    int detector = 1, decoder = 1;
    if (get_int(j, "epochs", 1, 1000, &tp.epochs, msg, sizeof msg) ||
        get_int(j, "steps", 0, 1000000, &tp.max_steps, msg, sizeof msg) ||
        get_real(j, "lr", 1e-7, 1e-1, &tp.lr, msg, sizeof msg) || get_bool(j, "detector", &detector, msg, sizeof msg) ||
        get_bool(j, "decoder", &decoder, msg, sizeof msg)) {
        json_decref(j);
        return respond_error(c, 400, "%s", msg);
    }
    json_decref(j);
    if (!detector && !decoder) return respond_error(c, 400, "nothing to train: 'detector' and 'decoder' are both false");
    /* count the pairs now, so that "nothing saved yet" is an answer and not a failed run */
    cs_dataset ds;
    memset(&ds, 0, sizeof ds);
    if (cs_dataset_open(s->root, &ds) || ds.n == 0) {
        cs_dataset_free(&ds);
        return respond_error(c, 400, "no labelled images under the root yet: correct an image (labels are saved "
                                     "automatically) or add NAME_img.png / NAME_masks.png pairs");
    }
    int n_pairs = ds.n;
    cs_dataset_free(&ds);

    pthread_mutex_lock(&s->mu);
    if (!s->model_path) {
        pthread_mutex_unlock(&s->mu);
        return respond_error(c, 409, "this server was started without a model file: fine-tuning is not available");
    }
    if (s->ft_state == ST_RUNNING) {
        json_t *st = ft_status_json(s);
        pthread_mutex_unlock(&s->mu);
        json_object_set_new(st, "error", json_string("a fine-tune is already running"));
        return respond_json(c, 409, st);
    }
    if (s->ft_started) { /* the previous run has finished: reap its thread */
        pthread_join(s->ft_thread, NULL);
        s->ft_started = 0;
    }
    char *out = ft_new_path(s);
    char *init = out ? strdup(s->model_path) : NULL;
    if (!out || !init) {
        pthread_mutex_unlock(&s->mu);
        free(out);
        free(init);
        return respond_error(c, 500, "cannot create a model file under %s/.cellsam", s->root);
    }
    free(s->ft_out);
    free((char *)s->ft_params.init_model);
    s->ft_out = out;
    tp.init_model = init;
    tp.data_dir = s->root;
    tp.out_path = out;
    /* few images: train on all; from 10 on, hold 10 % out for the F1 per epoch */
    tp.val_fraction = n_pairs >= 10 ? 0.1f : 0.0f;
    tp.train_encoders = 0; /* frozen, so the served image embeddings stay valid for the new model */
    tp.save_optimizer_state = 0; /* only --resume reads it, which the page does not offer */
    tp.train_detector = detector;
    tp.train_decoder = decoder;
    tp.n_threads = s->o.threads;
    tp.log = ft_on_log;
    tp.log_user = s;
    tp.progress = ft_on_progress;
    tp.abort = ft_should_stop;
    tp.callback_user = s;
    s->ft_params = tp;
    memset(&s->ft_report, 0, sizeof s->ft_report);
    s->ft_report.val_f1 = -1;
    s->ft_total_steps = 0;
    s->ft_abort = 0;
    s->ft_in_use = 0; /* (of this run's model; the one serving stays until /use) */
    s->ft_t0 = cs_now_seconds();
    s->ft_log[0] = s->ft_error[0] = 0;
    s->ft_state = ST_RUNNING;
    if (pthread_create(&s->ft_thread, NULL, ft_main, s) != 0) {
        s->ft_state = ST_ERROR;
        snprintf(s->ft_error, sizeof s->ft_error, "cannot start the training thread");
    } else {
        s->ft_started = 1;
    }
    json_t *st = ft_status_json(s);
    int failed = s->ft_state == ST_ERROR;
    pthread_mutex_unlock(&s->mu);
    return respond_json(c, failed ? 500 : 202, st);
}

static enum MHD_Result h_finetune_status(cs_server *s, struct MHD_Connection *c) {
    pthread_mutex_lock(&s->mu);
    json_t *st = ft_status_json(s);
    pthread_mutex_unlock(&s->mu);
    return respond_json(c, 200, st);
}

/* Cells of a segment-all result that the saved labels leave mostly (more than half of
 * their pixels) unlabelled: each is either a false detection the user deleted or a
 * cell still to label, which fine-tuning would teach as background. -1: out of memory. */
static long count_unlabelled_cells(const cellsam_result *r, const uint32_t *saved) {
    uint32_t max_label = 0;
    for (int k = 0; k < r->n_cells; k++)
        if (r->cells[k].label > max_label) max_label = r->cells[k].label;
    if (!max_label) return 0;
    int64_t *area = calloc((size_t)max_label + 1, 2 * sizeof *area); /* [label][total, labelled] */
    if (!area) return -1;
    size_t n = (size_t)r->width * r->height;
    for (size_t i = 0; i < n; i++) {
        uint32_t l = r->labels[i];
        if (!l || l > max_label) continue;
        area[2 * l]++;
        area[2 * l + 1] += saved[i] != 0;
    }
    long unlabelled = 0;
    for (uint32_t l = 1; l <= max_label; l++) unlabelled += area[2 * l] > 0 && 2 * area[2 * l + 1] < area[2 * l];
    free(area);
    return unlabelled;
}

/* What a fine-tune would train on: every image/labels pair under the root, with its
 * number of labelled cells and, where this server holds a segment-all result of the
 * image, how many of the model's cells have no label. An image is "partial" when a
 * fifth of the model's cells or more are unlabelled: the page asks before training. */
static enum MHD_Result h_finetune_data(cs_server *s, struct MHD_Connection *c) {
    cs_dataset ds;
    memset(&ds, 0, sizeof ds);
    if (cs_dataset_open(s->root, &ds)) ds.n = 0; /* nothing labelled yet: an empty list */
    json_t *list = json_array();
    long total_cells = 0;
    int n_partial = 0;
    for (int i = 0; list && i < ds.n; i++) {
        const char *img = ds.img_paths[i];
        uint32_t *saved = NULL;
        int W = 0, H = 0;
        json_t *e = json_pack("{s:s}", "image", root_relative(s, img));
        if (cs_read_labels(ds.mask_paths[i], &saved, &W, &H)) {
            json_object_set_new(e, "error", json_string(cellsam_last_error()));
            json_array_append_new(list, e);
            continue;
        }
        size_t cells = 0;
        if (cs_count_labels(saved, H, W, &cells)) {
            json_object_set_new(e, "error", json_string("out of memory counting its labels"));
            json_array_append_new(list, e);
            free(saved);
            continue;
        }
        json_object_set_new(e, "cells", json_integer((json_int_t)cells));
        total_cells += (long)cells;
        pthread_mutex_lock(&s->mu);
        const image *seg_of = NULL;
        for (const image *x = s->images; x; x = x->next)
            if (x->seg_state == ST_READY && x->seg && !strcmp(x->abs, img) && x->seg->r->width == W &&
                x->seg->r->height == H && (!seg_of || x->last_used > seg_of->last_used))
                seg_of = x;
        shared_result *held = seg_of ? seg_of->seg : NULL; /* compared without the lock */
        if (held) held->refs++;
        pthread_mutex_unlock(&s->mu);
        long unlabelled = held ? count_unlabelled_cells(held->r, saved) : 0;
        if (unlabelled < 0) {
            json_object_set_new(e, "error", json_string("out of memory comparing it with the model's cells"));
        } else if (held) {
            int partial = unlabelled > 0 && 5 * unlabelled >= held->r->n_cells;
            json_object_set_new(e, "model_cells", json_integer(held->r->n_cells));
            json_object_set_new(e, "unlabelled", json_integer(unlabelled));
            json_object_set_new(e, "partial", json_boolean(partial));
            n_partial += partial;
        }
        pthread_mutex_lock(&s->mu);
        shared_result_release(held);
        pthread_mutex_unlock(&s->mu);
        free(saved);
        json_array_append_new(list, e);
    }
    int n_images = ds.n;
    cs_dataset_free(&ds);
    if (!list) return respond_error(c, 500, "out of memory");
    return respond_json(c, 200,
                        json_pack("{s:o,s:i,s:I,s:i}", "images", list, "n_images", n_images, "cells",
                                  (json_int_t)total_cells, "partial", n_partial));
}

static enum MHD_Result h_finetune_stop(cs_server *s, struct MHD_Connection *c) {
    pthread_mutex_lock(&s->mu);
    int running = s->ft_state == ST_RUNNING;
    if (running) s->ft_abort = 1;
    json_t *st = ft_status_json(s);
    pthread_mutex_unlock(&s->mu);
    if (!running) json_object_set_new(st, "error", json_string("no fine-tune is running"));
    return respond_json(c, running ? 202 : 409, st);
}

/* Serve the fine-tuned model: load it, then swap it in once the worker and every
 * prompt context are idle (new prompts and jobs wait meanwhile). The image
 * embeddings are kept: the page's fine-tunes leave the SAM encoder frozen. */
static enum MHD_Result h_finetune_use(cs_server *s, struct MHD_Connection *c) {
    pthread_mutex_lock(&s->mu);
    if (s->ft_state != ST_READY || !s->ft_out) {
        json_t *st = ft_status_json(s);
        pthread_mutex_unlock(&s->mu);
        json_object_set_new(st, "error", json_string("no finished fine-tune to use"));
        return respond_json(c, 409, st);
    }
    char *path = strdup(s->ft_out);
    pthread_mutex_unlock(&s->mu);
    if (!path) return respond_error(c, 500, "out of memory");
    cellsam_model_params mp = s->o.model_params;
    mp.config_path = NULL; /* the fine-tuned file records its own configuration */
    cellsam_model *m = NULL;
    int n_ctx = s->n_pool + 1;
    cellsam_context **ctx = calloc((size_t)n_ctx, sizeof *ctx);
    int rc = ctx ? cellsam_model_load(path, &mp, &m) : cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    for (int i = 0; !rc && i < n_ctx; i++) rc = cellsam_context_new(m, &ctx[i]);
    if (rc) {
        char err[300];
        snprintf(err, sizeof err, "%s", cellsam_last_error());
        for (int i = 0; ctx && i < n_ctx; i++) cellsam_context_free(ctx[i]);
        free(ctx);
        cellsam_model_free(m);
        free(path);
        return respond_error(c, 500, "cannot load the fine-tuned model: %s", err);
    }
    pthread_mutex_lock(&s->mu);
    while (s->swapping) pthread_cond_wait(&s->ctx_cv, &s->mu); /* another swap first */
    s->swapping = 1;
    for (;;) {
        int busy = s->worker_busy;
        for (int i = 0; i < s->n_pool; i++) busy |= s->pool[i].busy;
        if (!busy) break;
        pthread_cond_wait(&s->ctx_cv, &s->mu);
    }
    for (int i = 0; i < s->n_pool; i++) { /* old contexts handed back in ctx[] */
        cellsam_context *old = s->pool[i].ctx;
        s->pool[i].ctx = ctx[i];
        s->pool[i].serial = 0;
        ctx[i] = old;
    }
    cellsam_context *old_worker = s->worker_ctx;
    s->worker_ctx = ctx[s->n_pool];
    ctx[s->n_pool] = old_worker;
    cellsam_model *old_model = s->owned_model;
    s->owned_model = m;
    s->model = m;
    free(s->model_path);
    s->model_path = path; /* the next fine-tune continues from this one */
    s->ft_in_use = 1;
    s->swapping = 0;
    pthread_cond_broadcast(&s->ctx_cv);
    pthread_cond_broadcast(&s->job_cv);
    json_t *st = ft_status_json(s);
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < n_ctx; i++) cellsam_context_free(ctx[i]);
    free(ctx);
    cellsam_model_free(old_model);
    return respond_json(c, 200, st);
}

/* ------------------------------------------------------------ static files */

static enum MHD_Result serve_static(cs_server *s, struct MHD_Connection *c, const char *url) {
    const char *name = url[0] == '/' ? url + 1 : url;
    if (!*name) name = "index.html";
    size_t n = strlen(name);
    int ok = n > 0 && n < 64 && name[0] != '.' && name[0] != '-';
    for (size_t i = 0; ok && i < n; i++) {
        char ch = name[i];
        ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
             ch == '_' || ch == '-';
    }
    if (!ok) return respond_error(c, 404, "not found");
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", s->web, name);
    struct stat st;
    if (lstat(path, &st) != 0 || !S_ISREG(st.st_mode)) return respond_error(c, 404, "not found");
    unsigned char *data = NULL;
    size_t len = 0;
    if (cs_read_file(path, STATIC_MAX_BYTES, &data, &len)) return respond_error(c, 500, "cannot read %s", name);
    const char *dot = strrchr(name, '.');
    const char *type = "application/octet-stream";
    if (dot) {
        if (!strcmp(dot, ".html")) type = "text/html; charset=utf-8";
        else if (!strcmp(dot, ".js")) type = "text/javascript; charset=utf-8";
        else if (!strcmp(dot, ".css")) type = "text/css; charset=utf-8";
        else if (!strcmp(dot, ".png")) type = "image/png";
        else if (!strcmp(dot, ".svg")) type = "image/svg+xml";
        else if (!strcmp(dot, ".json")) type = "application/json";
        else if (!strcmp(dot, ".ico")) type = "image/x-icon";
    }
    return respond(c, 200, type, data, len, NULL);
}

/* ------------------------------------------------------------ dispatch */

static enum MHD_Result method_not_allowed(struct MHD_Connection *c, const char *allow) {
    char *txt = strdup("{\"error\":\"method not allowed\"}");
    if (!txt) return MHD_NO;
    const char *hdr[] = {"Allow", allow, NULL};
    return respond(c, 405, "application/json", txt, strlen(txt), hdr);
}

static enum MHD_Result dispatch(cs_server *s, struct MHD_Connection *c, const char *url, const char *method,
                                request *rq) {
    int get = !strcmp(method, "GET") || !strcmp(method, "HEAD"), post = !strcmp(method, "POST"),
        put = !strcmp(method, "PUT");
    if (strncmp(url, "/api/", 5) != 0) {
        if (!get) return method_not_allowed(c, "GET, HEAD");
        return serve_static(s, c, url);
    }
    const char *r = url + 5;
    if (!strcmp(r, "info")) return get ? h_info(s, c) : method_not_allowed(c, "GET");
    if (!strcmp(r, "files")) return get ? h_files(s, c) : method_not_allowed(c, "GET");
    if (!strcmp(r, "upload")) return post ? h_upload(s, c, rq) : method_not_allowed(c, "POST");
    if (!strcmp(r, "open")) return post ? h_open(s, c, rq) : method_not_allowed(c, "POST");
    if (!strcmp(r, "finetune"))
        return post ? h_finetune_start(s, c, rq) : get ? h_finetune_status(s, c) : method_not_allowed(c, "GET, POST");
    if (!strcmp(r, "finetune/stop")) return post ? h_finetune_stop(s, c) : method_not_allowed(c, "POST");
    if (!strcmp(r, "finetune/data")) return get ? h_finetune_data(s, c) : method_not_allowed(c, "GET");
    if (!strcmp(r, "finetune/use")) return post ? h_finetune_use(s, c) : method_not_allowed(c, "POST");
    if (strncmp(r, "images/", 7) != 0) return respond_error(c, 404, "no such API endpoint");
    const char *id = r + 7, *slash = strchr(id, '/');
    size_t idn = slash ? (size_t)(slash - id) : strlen(id);
    const char *action = slash ? slash + 1 : "";
    static const char *const actions[] = {"", "pixels", "prompt", "segment", "labels", "export", "segment/stop"};
    int a = -1;
    for (int i = 0; i < (int)(sizeof actions / sizeof actions[0]); i++)
        if (!strcmp(action, actions[i])) a = i;
    if (a < 0) return respond_error(c, 404, "no such API endpoint");
    if (!valid_id(id, idn)) return respond_error(c, 404, "unknown image id");
    static const char *const allow[] = {"GET", "GET", "POST", "GET, POST", "GET, PUT", "GET", "POST"};
    int ok = (a == 2 || a == 6) ? post : (a == 3) ? (get || post) : (a == 4) ? (get || put) : get;
    if (!ok) return method_not_allowed(c, allow[a]);
    image *im = acquire_image(s, id, idn);
    if (!im) return respond_error(c, 404, "unknown image id (open the image first)");
    enum MHD_Result ret;
    switch (a) {
    case 0: ret = h_status(s, c, im); break;
    case 1: ret = h_pixels(s, c, im); break;
    case 2: ret = h_prompt(s, c, rq, im); break;
    case 3: ret = post ? h_segment_start(s, c, rq, im) : h_segment_result(s, c, im); break;
    case 4: ret = put ? h_labels_put(s, c, rq, im) : h_labels_get(s, c, im); break;
    case 5: ret = h_export(s, c, im); break;
    default: ret = h_segment_stop(s, c, im); break;
    }
    release_image(s, im);
    return ret;
}

/* Body limit of a request, known from its method and URL before the body arrives. */
static size_t body_limit(cs_server *s, const char *method, const char *url) {
    if (!strcmp(method, "POST") && !strcmp(url, "/api/upload")) return s->o.max_upload;
    if (!strcmp(method, "PUT") && !strncmp(url, "/api/images/", 12)) {
        const char *id = url + 12, *slash = strchr(id, '/');
        size_t lim = s->o.max_json;
        if (slash && valid_id(id, (size_t)(slash - id))) {
            pthread_mutex_lock(&s->mu);
            image *im = find_image(s, id, (size_t)(slash - id));
            /* worst case one run per pixel, plus the cell info */
            if (im) lim = 16 + (size_t)im->width * im->height * 8 + ((size_t)8 << 20);
            pthread_mutex_unlock(&s->mu);
        }
        return lim;
    }
    if (!strcmp(method, "POST") || !strcmp(method, "PUT")) return s->o.max_json;
    return 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    (void)version;
    cs_server *s = cls;
    request *rq = *con_cls;
    if (!rq) {
        rq = calloc(1, sizeof *rq);
        if (!rq) return MHD_NO;
        *con_cls = rq;
        rq->t0 = cs_now_seconds();
        if (s->o.log) fprintf(stderr, "cellsam serve: %s %.200s\n", method, url);
        rq->limit = body_limit(s, method, url);
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl) {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(cl, &end, 10);
            if (errno || end == cl || v > rq->limit) {
                rq->too_large = rq->responded = 1;
                return respond_error(c, 413, "request body too large (limit %zu bytes)", rq->limit);
            }
        }
        return MHD_YES;
    }
    if (*upload_size) {
        if (!rq->too_large) {
            if (*upload_size > rq->limit - rq->len) {
                rq->too_large = 1;
                free(rq->body);
                rq->body = NULL;
                rq->len = rq->cap = 0;
            } else {
                if (rq->len + *upload_size > rq->cap) {
                    size_t nc = rq->cap ? rq->cap * 2 : 65536;
                    while (nc < rq->len + *upload_size) nc *= 2;
                    if (nc > rq->limit) nc = rq->limit;
                    char *nb = realloc(rq->body, nc);
                    if (!nb) return MHD_NO;
                    rq->body = nb;
                    rq->cap = nc;
                }
                memcpy(rq->body + rq->len, upload, *upload_size);
                rq->len += *upload_size;
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (rq->responded) return MHD_YES;
    rq->responded = 1;
    if (rq->too_large) return respond_error(c, 413, "request body too large (limit %zu bytes)", rq->limit);
    return dispatch(s, c, url, method, rq);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    (void)c;
    (void)toe;
    cs_server *s = cls;
    request *rq = *con_cls;
    if (!rq) return;
    if (s->o.log) fprintf(stderr, "cellsam serve: request done in %.1f ms\n", (cs_now_seconds() - rq->t0) * 1000);
    free(rq->body);
    free(rq);
    *con_cls = NULL;
}

/* ------------------------------------------------------------ start / stop */

void cs_server_stop(cs_server *s) {
    if (!s) return;
    if (s->daemon) MHD_stop_daemon(s->daemon);
    pthread_mutex_lock(&s->mu);
    s->quit = 1; /* also stops a fine-tune after its current step (it saves first) */
    pthread_cond_broadcast(&s->job_cv);
    pthread_mutex_unlock(&s->mu);
    if (s->worker_started) pthread_join(s->worker, NULL);
    if (s->ft_started) pthread_join(s->ft_thread, NULL);
    while (s->images) {
        image *im = s->images;
        s->images = im->next;
        image_free(im);
    }
    for (int i = 0; i < s->n_pool; i++) cellsam_context_free(s->pool[i].ctx);
    free(s->pool);
    cellsam_context_free(s->worker_ctx);
    cellsam_model_free(s->owned_model);
    free(s->model_path);
    free(s->ft_out);
    free((char *)s->ft_params.init_model);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->store_mu);
    pthread_cond_destroy(&s->job_cv);
    pthread_cond_destroy(&s->ctx_cv);
    free(s->root);
    free(s->web);
    free(s);
}

int cs_server_start(const cs_server_options *opt, cs_server **out) {
    *out = NULL;
    if (!opt || !opt->model || !opt->root || !opt->web_dir) return cs_error(CELLSAM_ERR_INVALID, "null argument");
    if (opt->port < 0 || opt->port > 65535) return cs_error(CELLSAM_ERR_INVALID, "port %d out of range", opt->port);
    cs_server *s = calloc(1, sizeof *s);
    if (!s) return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    s->o = *opt;
    if (s->o.threads < 1) s->o.threads = 1;
    if (s->o.http_threads < 1) s->o.http_threads = 1;
    if (s->o.http_threads > 64) s->o.http_threads = 64;
    if (s->o.cache < 1) s->o.cache = 1;
    if (s->o.max_images < s->o.cache) s->o.max_images = s->o.cache;
    if (!s->o.host) s->o.host = "127.0.0.1";
    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->store_mu, NULL);
    pthread_cond_init(&s->job_cv, NULL);
    pthread_cond_init(&s->ctx_cv, NULL);
    s->emb_estimate = 0;
    s->model = opt->model;
    int rc = CELLSAM_OK;
    if (opt->model_path && !(s->model_path = strdup(opt->model_path))) {
        rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    struct stat st;
    s->root = realpath(opt->root, NULL);
    if (!s->root || stat(s->root, &st) || !S_ISDIR(st.st_mode)) {
        rc = cs_error(CELLSAM_ERR_IO, "root folder %s does not exist", opt->root);
        goto fail;
    }
    s->web = realpath(opt->web_dir, NULL);
    if (!s->web || stat(s->web, &st) || !S_ISDIR(st.st_mode)) {
        rc = cs_error(CELLSAM_ERR_IO, "web folder %s does not exist (give --web DIR)", opt->web_dir);
        goto fail;
    }
    s->n_pool = s->o.http_threads;
    s->pool = calloc((size_t)s->n_pool, sizeof *s->pool);
    if (!s->pool) {
        rc = cs_error(CELLSAM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < s->n_pool; i++)
        if ((rc = cellsam_context_new(opt->model, &s->pool[i].ctx))) goto fail;
    if ((rc = cellsam_context_new(opt->model, &s->worker_ctx))) goto fail;

    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    memset(&a4, 0, sizeof a4);
    memset(&a6, 0, sizeof a6);
    const struct sockaddr *sa;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO;
    if (inet_pton(AF_INET, s->o.host, &a4.sin_addr) == 1) {
        a4.sin_family = AF_INET;
        a4.sin_port = htons((uint16_t)s->o.port);
        sa = (const struct sockaddr *)&a4;
    } else if (inet_pton(AF_INET6, s->o.host, &a6.sin6_addr) == 1) {
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons((uint16_t)s->o.port);
        sa = (const struct sockaddr *)&a6;
        flags |= MHD_USE_IPv6;
    } else {
        rc = cs_error(CELLSAM_ERR_INVALID, "--host needs a numeric IPv4 or IPv6 address, not '%s'", s->o.host);
        goto fail;
    }
    if (pthread_create(&s->worker, NULL, worker_main, s) != 0) {
        rc = cs_error(CELLSAM_ERR_NOMEM, "cannot start the worker thread");
        goto fail;
    }
    s->worker_started = 1;
    s->daemon = MHD_start_daemon(flags, (uint16_t)s->o.port, NULL, NULL, on_request, s, MHD_OPTION_SOCK_ADDR, sa,
                                 MHD_OPTION_THREAD_POOL_SIZE, (unsigned)s->o.http_threads,
                                 MHD_OPTION_CONNECTION_LIMIT, 256u, MHD_OPTION_CONNECTION_TIMEOUT, 60u,
                                 MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_END);
    if (!s->daemon) {
        rc = cs_error(CELLSAM_ERR_IO, "cannot listen on %s port %d (in use?)", s->o.host, s->o.port);
        goto fail;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : s->o.port;
    *out = s;
    return CELLSAM_OK;
fail:
    cs_server_stop(s);
    return rc ? rc : CELLSAM_ERR_IO;
}
