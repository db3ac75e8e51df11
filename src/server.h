/* cellsam serve: the HTTP back end of the browser labeling tool (web/).
 *
 * One read-only model is shared by every thread. A background worker computes
 * image embeddings (once per image and channel choice, kept in a bounded LRU
 * cache) and runs "segment all" jobs; prompt requests run only the mask decoder
 * on the connection's thread, on a pool of contexts that each remember which
 * embedding they hold, so repeated prompts on one image copy nothing.
 *
 * Every path a client names is relative to the root folder and confined to it
 * (no "..", no absolute paths, no hidden components, symlinks resolved and
 * checked). Request bodies are size-limited (413), bad JSON and unknown ids get
 * a 4xx answer with {"error": "..."}.
 *
 * HTTP API (JSON unless noted; ids look like "i3"):
 *   GET  /api/info                      model and server limits
 *   GET  /api/files                     images under the root (recursive, bounded)
 *   POST /api/upload?name=F             raw body -> root/uploads/<sanitised F>
 *   POST /api/open {path,nuclear,cell,grey}  open an image, queue its embedding
 *   GET  /api/images/ID                 status: embedding and segment-all progress
 *   GET  /api/images/ID/pixels          uint16 channel planes for display (binary)
 *   POST /api/images/ID/prompt {box,points,multimask,mask_input}  decoder only
 *   POST /api/images/ID/segment {...}   start segment-all (202); GET: result
 *   GET|PUT /api/images/ID/labels       autosaved labels (binary container)
 *   GET  /api/images/ID/export?format=png|tif|csv  download (labels renumbered 1..N)
 *   POST /api/finetune {epochs,steps,lr,detector,decoder}  fine-tune the serving model on the
 *                                       saved labels under the root (202); GET: progress
 *   POST /api/finetune/stop             save what has trained and stop
 *   POST /api/finetune/use              serve the fine-tuned model from now on
 * Label container (little-endian): "CSL1", u32 width, u32 height, u32 n_runs,
 * n_runs x (u32 count, u32 value) row-major over the image, then optional JSON
 * {"cells": {"<label>": [score, iou]}}. */
#ifndef CELLSAM_SERVER_H
#define CELLSAM_SERVER_H

#include <stddef.h>

#include "cellsam.h"

typedef struct {
    const cellsam_model *model; /* shared, read-only; must outlive the server */
    const char *root;           /* folder the images are confined to */
    const char *web_dir;        /* static files of the page */
    const char *host;           /* numeric bind address (default "127.0.0.1") */
    int port;                   /* 0: any free port (see cs_server_port) */
    int threads;                /* compute threads for embeddings and segment-all */
    int http_threads;           /* connection thread pool = concurrent prompts (4) */
    int cache;                  /* embeddings kept in memory, LRU (8) */
    int max_images;             /* open images remembered (32) */
    size_t max_upload;          /* upload body limit, bytes (512 MiB) */
    size_t max_json;            /* JSON body limit, bytes (1 MiB) */
    size_t max_pixels;          /* largest image (width * height) served (100 M) */
    int tiled;                  /* segment-all in tiled mode (0: whole image) */
    int log;                    /* 1: one line per request on stderr */
    /* fine-tuning from the page (POST /api/finetune): the file `model` was loaded from and
       the parameters it was loaded with (a fine-tuned model is loaded the same way);
       NULL: the page cannot fine-tune */
    const char *model_path;
    cellsam_model_params model_params;
} cs_server_options;

typedef struct cs_server cs_server;

cs_server_options cs_server_default_options(void);
/* Start listening and the worker; returns CELLSAM_OK or an error (message in
 * cellsam_last_error()). */
int cs_server_start(const cs_server_options *opt, cs_server **out);
/* The bound port (useful with port 0). */
int cs_server_port(const cs_server *s);
/* Stop accepting; stop a running segment-all between its tiles or stages (an embedding
 * pass in progress finishes) and a fine-tune after its step (saved first); free
 * everything. */
void cs_server_stop(cs_server *s);

#endif
