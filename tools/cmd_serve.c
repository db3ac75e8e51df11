/* cellsam serve: the browser labeling tool (src/server.c + web/). */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "common.h"

#include "server.h"

#ifndef CELLSAM_WEB_DIR
#define CELLSAM_WEB_DIR "web"
#endif

static void usage(void) {
    printf("usage: cellsam serve -m CKPT [--config JSON] [--root DIR] [--port N] [--host ADDR] [options]\n\n"
           "Start the browser labeling tool: open an image under --root, compute its embedding once,\n"
           "\"Segment all\", add cells with a box or positive/negative points (mask decoder only),\n"
           "fix labels by hand. Edits are autosaved under ROOT/.cellsam/.\n"
           "  --root DIR        folder with the images (default: current folder); uploads go to DIR/uploads\n"
           "  --port N          TCP port (default 8765; 0 picks a free one)\n"
           "  --host ADDR       numeric bind address (default 127.0.0.1; 0.0.0.0 exposes the tool to the network)\n"
           "  --threads N       compute threads for embeddings and segment-all (default: all cores)\n"
           "  --http-threads N  connection threads = concurrent prompts (default 4)\n"
           "  --cache N         image embeddings kept in memory (default 8; 4 MB each for the full model)\n"
           "  --max-upload MB   upload size limit (default 512)\n"
           "  --tiled           segment-all in tiled mode (default: whole image at once)\n"
           "  --precision P     bf16: ViT matrix products in bfloat16 (faster with AVX512-BF16);\n"
           "                    int8: ViT block matrices in 8-bit integers (faster with AVX2)\n"
           "  --web DIR         page files (default: %s)\n"
           "  --log             log each request on stderr\n"
           "The first line on stdout is \"cellsam serve: http://HOST:PORT/\". Stop with Ctrl+C.\n",
           CELLSAM_WEB_DIR);
}

int cmd_serve(int argc, char **argv) {
    cs_server_options o = cs_server_default_options();
    const char *model = NULL, *config = NULL, *precision = NULL;
    o.port = 8765;
    o.web_dir = CELLSAM_WEB_DIR;
    o.threads = cli_default_threads();
    int mb = 512;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int *iv = NULL, lo = 0, hi = 0;
        const char **sv = NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) sv = &model;
        else if (!strcmp(a, "--config")) sv = &config;
        else if (!strcmp(a, "--precision")) sv = &precision;
        else if (!strcmp(a, "--root")) sv = &o.root;
        else if (!strcmp(a, "--host")) sv = &o.host;
        else if (!strcmp(a, "--web")) sv = &o.web_dir;
        else if (!strcmp(a, "--port")) iv = &o.port, lo = 0, hi = 65535;
        else if (!strcmp(a, "--threads")) iv = &o.threads, lo = 1, hi = 256;
        else if (!strcmp(a, "--http-threads")) iv = &o.http_threads, lo = 1, hi = 64;
        else if (!strcmp(a, "--cache")) iv = &o.cache, lo = 1, hi = 1024;
        else if (!strcmp(a, "--max-upload")) iv = &mb, lo = 1, hi = 65536;
        else if (!strcmp(a, "--tiled")) o.tiled = 1;
        else if (!strcmp(a, "--log")) o.log = 1;
        else {
            cli_error("serve", "unexpected argument '%s' (see --help)", a);
            return 2;
        }
        if (sv || iv) {
            if (!v) {
                cli_error("serve", "%s needs a value", a);
                return 2;
            }
            i++;
            if (sv) *sv = v;
            else if (cli_parse_int(v, lo, hi, iv)) {
                cli_error("serve", "%s needs a whole number from %d to %d", a, lo, hi);
                return 2;
            }
        }
    }
    o.max_upload = (size_t)mb << 20;
    if (o.cache > 0 && o.max_images < o.cache * 2) o.max_images = o.cache * 2;
    if (!model) model = cli_default_model();
    if (!model) {
        cli_error("serve", "no model: give -m CKPT, set CELLSAM_MODEL, or keep models/" CELLSAM_DEFAULT_MODEL_NAME " beside the build");
        return 2;
    }
    cellsam_model_params mp = cellsam_model_default_params();
    mp.config_path = config;
    mp.n_threads = o.threads;
    if (precision && (mp.compute_dtype = cli_parse_precision("serve", precision)) < 0) return 2;
    cellsam_model *m = NULL;
    if (cellsam_model_load(model, &mp, &m)) {
        cli_error("serve", "%s", cellsam_last_error());
        return 1;
    }
    o.model = m;
    o.model_path = model; /* POST /api/finetune starts from it */
    o.model_params = mp;
    /* Signals are taken by sigwait below; block them before any thread starts so
       that every thread inherits the mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    cs_server *srv = NULL;
    if (cs_server_start(&o, &srv)) {
        cli_error("serve", "%s", cellsam_last_error());
        cellsam_model_free(m);
        return 1;
    }
    int v6 = strchr(o.host, ':') != NULL;
    printf("cellsam serve: http://%s%s%s:%d/\n", v6 ? "[" : "", o.host, v6 ? "]" : "", cs_server_port(srv));
    fflush(stdout);
    fprintf(stderr, "cellsam serve: root %s, %d compute thread%s, cache %d embeddings; Ctrl+C stops\n", o.root,
            o.threads, o.threads == 1 ? "" : "s", o.cache);
    int sig = 0;
    sigwait(&set, &sig);
    fprintf(stderr, "cellsam serve: stopping (signal %d)\n", sig);
    cs_server_stop(srv);
    cellsam_model_free(m);
    return 0;
}
