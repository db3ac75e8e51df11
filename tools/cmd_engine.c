/* Engine subcommands: embed, prompt, convert, info. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "common.h"
#include "model.h"
#include "npy.h"
#include "weights.h"
#include "pipeline_cli.h"
#include "train.h"

/* ------------------------------------------------------------------ info */

static void print_info(const cellsam_model_info *in) {
    printf("format        %s\n", in->format);
    printf("layout        %s\n", in->prefix[0] ? in->prefix : "(plain SAM: image_encoder.*)");
    printf("image encoder ViT dim %d, depth %d, heads %d, window %d, mlp %d, global blocks", in->embed_dim,
           in->depth, in->num_heads, in->window_size, in->mlp_dim);
    for (int i = 0; i < in->n_global; i++) printf(" %d", in->global_blocks[i]);
    printf("\ninput         %d x %d, patch %d\n", in->image_size, in->image_size, in->patch_size);
    printf("mask decoder  dim %d, depth %d, heads %d, mlp %d\n", in->prompt_dim, in->decoder_depth,
           in->decoder_heads, in->decoder_mlp_dim);
    if (in->has_detector)
        printf("cellfinder    %d queries, %d encoder / %d decoder layers, %d heads; trunk dim %d, mlp %d\n",
               in->det_queries, in->det_enc_layers, in->det_dec_layers, in->det_heads, in->det_trunk_dim,
               in->det_trunk_mlp_dim);
    else
        printf("cellfinder    absent\n");
    if (in->box_nms_iou > 0)
        printf("box NMS       %g (recommended by the model: a detector trained one-to-many)\n", in->box_nms_iou);
    if (in->whole_image_max_side > 0)
        printf("whole image   up to %d px per side, tiled above (recommended by the model)\n",
               in->whole_image_max_side);
    printf("cell diameter %d px of the 1024 px network input (segment --diameter zooms cells to it)\n",
           in->cell_diameter);
    if (in->auto_diameter)
        printf("cell sizing   per image, --diameter auto (recommended by the model)\n");
    if (in->detector_targets)
        printf("trained with  %s detector targets (recorded; finetune --matching model continues with them)\n",
               in->detector_targets);
}

int cmd_info(int argc, char **argv) {
    const char *ckpt = NULL, *config = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: cellsam info -m CKPT [--config JSON]\n\n"
                   "Load a checkpoint (.pt as published, or .safetensors), check every tensor the\n"
                   "model needs, and print the hyper-parameters inferred from the tensor shapes.\n");
            return 0;
        } else if ((!strcmp(argv[i], "-m") || !strcmp(argv[i], "--model")) && i + 1 < argc) ckpt = argv[++i];
        else if (!strcmp(argv[i], "--config") && i + 1 < argc) config = argv[++i];
        else if (!ckpt && argv[i][0] != '-') ckpt = argv[i];
        else {
            cli_error("info", "unexpected argument '%s' (see --help)", argv[i]);
            return 2;
        }
    }
    if (!ckpt) {
        cli_error("info", "no checkpoint given (-m CKPT)");
        return 2;
    }
    cellsam_model_params p = cellsam_model_default_params();
    p.config_path = config;
    cellsam_model *m;
    if (cellsam_model_load(ckpt, &p, &m)) {
        cli_error("info", "%s", cellsam_last_error());
        return 1;
    }
    cellsam_model_info in;
    cellsam_model_get_info(m, &in);
    print_info(&in);
    cellsam_model_free(m);
    return 0;
}

/* --------------------------------------------------------------- convert */

int cmd_convert(int argc, char **argv) {
    const char *in = NULL, *out = NULL, *dt = "f32", *nms = NULL, *whole = NULL, *diam = NULL, *sizing = NULL;
    int widen = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: cellsam convert IN OUT.safetensors [--dtype f32|f16|bf16] [--box-nms IOU]\n"
                   "                      [--whole-image-max-side N] [--cell-diameter N] [--diameter auto|off]\n"
                   "                      [--widen-trunk K]\n\n"
                   "Rewrite a checkpoint (PyTorch .pt as published, or safetensors) as safetensors,\n"
                   "keeping every tensor name and shape; --dtype converts the values (default f32).\n"
                   "safetensors loads memory-mapped and zero-copy.\n"
                   "  --box-nms IOU  record the box NMS that `cellsam segment` applies to this model by\n"
                   "                 default (metadata cellsam.box_nms_iou; 0 = none, as the official model)\n"
                   "  --whole-image-max-side N  record that `cellsam segment` should segment images up\n"
                   "                 to N pixels per side whole and tile larger ones (metadata\n"
                   "                 cellsam.whole_image_max_side; 0 = always tile, as the official model)\n"
                   "  --cell-diameter N  record the cell diameter, in pixels of the 1024 px network input,\n"
                   "                 that `segment --diameter` zooms cells to (metadata cellsam.cell_diameter;\n"
                   "                 default 64): the typical cell size in the model's training inputs\n"
                   "  --diameter auto|off  record whether `cellsam segment` sizes cells per image by default\n"
                   "                 (segment --diameter auto) in the model's own mode (metadata cellsam.diameter)\n"
                   "  --widen-trunk K  make the CellFinder trunk K (2-4) times as wide, computing what the\n"
                   "                 narrow one did (each channel repeated, the weights that read them divided;\n"
                   "                 1 %% noise so that the copies can part): a bigger detector to fine-tune\n"
                   "                 from a trained one (cellsam finetune --train-encoders)\n");
            return 0;
        } else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) dt = argv[++i];
        else if (!strcmp(argv[i], "--box-nms") && i + 1 < argc) {
            nms = argv[++i];
            float v;
            if (cli_parse_floats(nms, &v, 1) || !(v >= 0 && v <= 1)) {
                cli_error("convert", "--box-nms: expected an IoU in [0, 1], not '%s'", nms);
                return 2;
            }
        }
        else if (!strcmp(argv[i], "--whole-image-max-side") && i + 1 < argc) {
            whole = argv[++i];
            int v;
            if (cli_parse_int(whole, 0, 65536, &v)) {
                cli_error("convert", "--whole-image-max-side: expected a side length from 0 to 65536, not '%s'",
                          whole);
                return 2;
            }
        }
        else if (!strcmp(argv[i], "--cell-diameter") && i + 1 < argc) {
            diam = argv[++i];
            int v;
            if (cli_parse_int(diam, 4, 1024, &v)) {
                cli_error("convert", "--cell-diameter: expected network pixels from 4 to 1024, not '%s'", diam);
                return 2;
            }
        }
        else if (!strcmp(argv[i], "--diameter") && i + 1 < argc) {
            sizing = argv[++i];
            if (strcmp(sizing, "auto") && strcmp(sizing, "off")) {
                cli_error("convert", "--diameter: expected auto or off, not '%s'", sizing);
                return 2;
            }
        }
        else if (!strcmp(argv[i], "--widen-trunk") && i + 1 < argc) {
            if (cli_parse_int(argv[++i], 2, 4, &widen)) {
                cli_error("convert", "--widen-trunk: expected a factor from 2 to 4, not '%s'", argv[i]);
                return 2;
            }
        }
        else if (argv[i][0] != '-' && !in) in = argv[i];
        else if (argv[i][0] != '-' && !out) out = argv[i];
        else {
            cli_error("convert", "unexpected argument '%s' (see --help)", argv[i]);
            return 2;
        }
    }
    if (!in || !out) {
        cli_error("convert", "need IN and OUT (see --help)");
        return 2;
    }
    cs_dtype d;
    if (!strcmp(dt, "f32")) d = CS_DTYPE_F32;
    else if (!strcmp(dt, "f16")) d = CS_DTYPE_F16;
    else if (!strcmp(dt, "bf16")) d = CS_DTYPE_BF16;
    else {
        cli_error("convert", "--dtype must be f32, f16 or bf16, not '%s'", dt);
        return 2;
    }
    cs_weights *w;
    if (cs_weights_open(in, &w)) {
        cli_error("convert", "%s", cellsam_last_error());
        return 1;
    }
    cs_weights *src = w; /* a widened store's other tensors are views into src */
    if (widen && cs_widen_trunk(src, widen, 0.01f, 1, &w)) {
        cli_error("convert", "%s: %s", in, cellsam_last_error());
        cs_weights_free(src);
        return 1;
    }
    int rc = nms ? cs_weights_set_meta(w, "cellsam.box_nms_iou", nms) : CELLSAM_OK;
    if (!rc && whole) rc = cs_weights_set_meta(w, "cellsam.whole_image_max_side", whole);
    if (!rc && diam) rc = cs_weights_set_meta(w, "cellsam.cell_diameter", diam);
    if (!rc && sizing) rc = cs_weights_set_meta(w, "cellsam.diameter", sizing);
    if (!rc) rc = cs_weights_save_safetensors(w, out, d);
    if (rc) cli_error("convert", "%s", cellsam_last_error());
    else fprintf(stderr, "cellsam convert: wrote %zu tensors to %s (%s)\n", cs_weights_count(w), out, dt);
    if (w != src) cs_weights_free(w);
    cs_weights_free(src);
    return rc ? 1 : 0;
}

/* ----------------------------------------------------------------- embed */

static int load_model(const char *cmd, const char *ckpt, const char *config, int need_detector,
                      int precision, cellsam_model **m) {
    cellsam_model_params p = cellsam_model_default_params();
    p.config_path = config;
    p.compute_dtype = precision;
    p.load_detector = need_detector;
    if (cellsam_model_load(ckpt, &p, m)) {
        cli_error(cmd, "%s", cellsam_last_error());
        return 1;
    }
    return 0;
}

int cmd_embed(int argc, char **argv) {
    const char *ckpt = NULL, *config = NULL, *tensor = NULL, *image = NULL, *out = NULL;
    int threads = cli_default_threads(), precision = CELLSAM_DTYPE_F32;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: cellsam embed -m CKPT [--config JSON] (--tensor X.npy | IMAGE) -o EMB.npy [--threads N]\n"
                   "                    [--precision bf16|int8]\n\n"
                   "Compute the SAM image embedding (P x 64 x 64 float32 .npy).\n"
                   "  --tensor X.npy  an already pre-processed network input (3 x 1024 x 1024 float32,\n"
                   "                  or 1 x 3 x 1024 x 1024), as the reference testdata holds it\n"
                   "  IMAGE           an image file (TIFF, PNG, JPEG, .npy): pre-processed as the official\n"
                   "                  segment_cellular_image does (channels, percentile, CLAHE, resize)\n");
            return 0;
        } else if ((!strcmp(argv[i], "-m") || !strcmp(argv[i], "--model")) && i + 1 < argc) ckpt = argv[++i];
        else if (!strcmp(argv[i], "--config") && i + 1 < argc) config = argv[++i];
        else if (!strcmp(argv[i], "--tensor") && i + 1 < argc) tensor = argv[++i];
        else if (!strcmp(argv[i], "--precision") && i + 1 < argc) {
            if ((precision = cli_parse_precision("embed", argv[++i])) < 0) return 2;
        }
        else if (!strcmp(argv[i], "-o") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            if (cli_parse_int(argv[++i], 1, 256, &threads)) {
                cli_error("embed", "--threads needs a number from 1 to 256");
                return 2;
            }
        } else if (argv[i][0] != '-' && !image) image = argv[i];
        else {
            cli_error("embed", "unexpected argument '%s' (see --help)", argv[i]);
            return 2;
        }
    }
    if (!ckpt || !out || (!tensor == !image)) {
        cli_error("embed", "need -m CKPT, -o OUT and exactly one of --tensor X.npy or IMAGE");
        return 2;
    }
    float *input = NULL;
    if (tensor) {
        cs_npy a;
        if (cs_npy_load(tensor, &a)) {
            cli_error("embed", "%s", cellsam_last_error());
            return 1;
        }
        int ok = a.count == (size_t)3 * 1024 * 1024 && (a.ndim == 3 || (a.ndim == 4 && a.shape[0] == 1)) &&
                 a.shape[a.ndim - 3] == 3;
        if (!ok) {
            cli_error("embed", "%s: expected a 3 x 1024 x 1024 network input", tensor);
            cs_npy_free(&a);
            return 1;
        }
        input = cs_npy_to_f32(&a);
        cs_npy_free(&a);
        for (size_t i = 0; input && i < (size_t)3 * 1024 * 1024; i++)
            if (input[i] != input[i]) {
                cli_error("embed", "%s contains NaN", tensor);
                free(input);
                return 1;
            }
    }
    cellsam_model *m;
    if (load_model("embed", ckpt, config, 0, precision, &m)) {
        free(input);
        return 1;
    }
    if (image && cli_prepare_sam_input("embed", image, &input)) {
        cellsam_model_free(m);
        return 1;
    }
    cellsam_context *ctx;
    int rc = cellsam_context_new(m, &ctx);
    if (!rc) rc = cellsam_encode(ctx, input, threads);
    const float *emb;
    int C, H, W;
    if (!rc) rc = cellsam_get_embedding(ctx, &emb, &C, &H, &W);
    if (!rc) {
        int64_t shape[3] = {C, H, W};
        rc = cs_npy_save_f32(out, emb, 3, shape);
    }
    if (rc) cli_error("embed", "%s", cellsam_last_error());
    cellsam_context_free(ctx);
    cellsam_model_free(m);
    free(input);
    return rc ? 1 : 0;
}

/* ---------------------------------------------------------------- prompt */

#define MAX_CLI_BOXES 10000
#define MAX_CLI_POINTS 1000

int cmd_prompt(int argc, char **argv) {
    const char *ckpt = NULL, *config = NULL, *emb_path = NULL, *mask_path = NULL, *out = NULL, *png = NULL;
    int multimask = 0, threads = cli_default_threads(), orig = 0;
    float orig_w = 1024, orig_h = 1024;
    cellsam_box *boxes = calloc(MAX_CLI_BOXES, sizeof *boxes);
    cellsam_point *points = calloc(MAX_CLI_POINTS, sizeof *points);
    int nb = 0, np = 0, status = 2;
    float *mask = NULL, *emb = NULL, *lg = NULL, *io = NULL;
    cellsam_model *m = NULL;
    cellsam_context *ctx = NULL;
    if (!boxes || !points) {
        cli_error("prompt", "out of memory");
        status = 1;
        goto out;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: cellsam prompt -m CKPT [--config JSON] --embedding EMB.npy [--box x1,y1,x2,y2]...\n"
                   "                      [--point x,y,label]... [--mask-input M.npy] [--multimask]\n"
                   "                      [--orig-frame W,H] -o LOGITS.npy [--png MASK.png] [--threads N]\n\n"
                   "Decode masks from prompts for an embedding made by 'cellsam embed'.\n"
                   "  --box        one prompt per box; all boxes run as one batch\n"
                   "  --point      one point set (label 1 positive, 0 negative), joined to every box's\n"
                   "               prompt when boxes are given (as SAM's predictor does)\n"
                   "  --mask-input low-resolution mask logits (256 x 256, e.g. a previous output)\n"
                   "  --multimask  return SAM's 3 candidate masks instead of the single mask\n"
                   "  --orig-frame coordinates are in an original image of W x H pixels (default: the\n"
                   "               1024 x 1024 network-input frame)\n"
                   "Writes batch x masks x 256 x 256 float32 logits and prints one line per mask with\n"
                   "its predicted IoU. --png writes the masks (sigmoid > 0.4, upsampled to the frame)\n"
                   "as a label image: mask i of the batch gets label i+1 (best IoU when multimask).\n");
            status = 0;
            goto out;
        } else if ((!strcmp(argv[i], "-m") || !strcmp(argv[i], "--model")) && i + 1 < argc) ckpt = argv[++i];
        else if (!strcmp(argv[i], "--config") && i + 1 < argc) config = argv[++i];
        else if (!strcmp(argv[i], "--embedding") && i + 1 < argc) emb_path = argv[++i];
        else if (!strcmp(argv[i], "--mask-input") && i + 1 < argc) mask_path = argv[++i];
        else if (!strcmp(argv[i], "-o") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--png") && i + 1 < argc) png = argv[++i];
        else if (!strcmp(argv[i], "--multimask")) multimask = 1;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            if (cli_parse_int(argv[++i], 1, 256, &threads)) {
                cli_error("prompt", "--threads needs a number from 1 to 256");
                goto out;
            }
        } else if (!strcmp(argv[i], "--orig-frame") && i + 1 < argc) {
            float wh[2];
            if (cli_parse_floats(argv[++i], wh, 2) || wh[0] < 1 || wh[1] < 1 || wh[0] > 1e6 || wh[1] > 1e6) {
                cli_error("prompt", "--orig-frame needs W,H (positive image size)");
                goto out;
            }
            orig = 1;
            orig_w = wh[0];
            orig_h = wh[1];
        } else if (!strcmp(argv[i], "--box") && i + 1 < argc) {
            float v[4];
            if (nb >= MAX_CLI_BOXES || cli_parse_floats(argv[++i], v, 4)) {
                cli_error("prompt", "--box needs x1,y1,x2,y2 (at most %d boxes)", MAX_CLI_BOXES);
                goto out;
            }
            boxes[nb++] = (cellsam_box){v[0], v[1], v[2], v[3]};
        } else if (!strcmp(argv[i], "--point") && i + 1 < argc) {
            float v[3];
            if (np >= MAX_CLI_POINTS || cli_parse_floats(argv[++i], v, 3) || (v[2] != 0 && v[2] != 1)) {
                cli_error("prompt", "--point needs x,y,label with label 1 (positive) or 0 (negative)");
                goto out;
            }
            points[np++] = (cellsam_point){v[0], v[1], (int)v[2]};
        } else {
            cli_error("prompt", "unexpected argument '%s' (see --help)", argv[i]);
            goto out;
        }
    }
    if (!ckpt || !emb_path || !out) {
        cli_error("prompt", "need -m CKPT, --embedding EMB.npy and -o OUT");
        goto out;
    }
    if (!nb && !np && !mask_path) {
        cli_error("prompt", "no prompt: give --box, --point or --mask-input");
        goto out;
    }
    status = 1;
    if (orig) {
        float sx = 1024.0f / orig_w, sy = 1024.0f / orig_h;
        for (int i = 0; i < nb; i++) {
            boxes[i].x1 *= sx;
            boxes[i].x2 *= sx;
            boxes[i].y1 *= sy;
            boxes[i].y2 *= sy;
        }
        for (int i = 0; i < np; i++) {
            points[i].x *= sx;
            points[i].y *= sy;
        }
    }
    cs_npy a;
    if (cs_npy_load(emb_path, &a)) {
        cli_error("prompt", "%s", cellsam_last_error());
        goto out;
    }
    int64_t ec = a.ndim == 4 ? a.shape[1] : a.shape[0];
    if (!((a.ndim == 3) || (a.ndim == 4 && a.shape[0] == 1)) || a.shape[a.ndim - 1] != 64 || a.shape[a.ndim - 2] != 64) {
        cli_error("prompt", "%s: expected an embedding of shape (P, 64, 64)", emb_path);
        cs_npy_free(&a);
        goto out;
    }
    emb = cs_npy_to_f32(&a);
    cs_npy_free(&a);
    if (mask_path) {
        if (cs_npy_load(mask_path, &a)) {
            cli_error("prompt", "%s", cellsam_last_error());
            goto out;
        }
        if (a.count != 256 * 256) {
            cli_error("prompt", "%s: mask input must hold 256 x 256 values", mask_path);
            cs_npy_free(&a);
            goto out;
        }
        mask = cs_npy_to_f32(&a);
        cs_npy_free(&a);
    }
    if (load_model("prompt", ckpt, config, 0, CELLSAM_DTYPE_F32, &m)) goto out;
    if (cellsam_context_new(m, &ctx) || cellsam_set_embedding(ctx, emb, (int)ec, 64, 64)) {
        cli_error("prompt", "%s", cellsam_last_error());
        goto out;
    }
    cellsam_prompt pr = cellsam_default_prompt();
    pr.boxes = nb ? boxes : NULL;
    pr.n_boxes = nb;
    pr.points = np ? points : NULL;
    pr.n_points = np;
    pr.mask_input = mask;
    pr.multimask = multimask;
    pr.n_threads = threads;
    int ob, om;
    if (cellsam_decode(ctx, &pr, &lg, &io, &ob, &om)) {
        cli_error("prompt", "%s", cellsam_last_error());
        goto out;
    }
    int64_t shape[4] = {ob, om, 256, 256};
    if (cs_npy_save_f32(out, lg, 4, shape)) {
        cli_error("prompt", "%s", cellsam_last_error());
        goto out;
    }
    for (int i = 0; i < ob; i++)
        for (int k = 0; k < om; k++) printf("prompt %d mask %d iou %.6f\n", i, k, io[i * om + k]);
    if (png && cli_write_prompt_png("prompt", png, lg, io, ob, om, orig ? (int)orig_w : 1024, orig ? (int)orig_h : 1024))
        goto out;
    status = 0;
out:
    cellsam_free(lg);
    cellsam_free(io);
    cellsam_context_free(ctx);
    cellsam_model_free(m);
    free(emb);
    free(mask);
    free(boxes);
    free(points);
    return status;
}
