/* cellsam train / cellsam finetune: thin wrappers over cellsam_train(). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cellsam.h"
#include "cli.h"

static void usage(const char *cmd) {
    int ft = !strcmp(cmd, "finetune");
    if (ft)
        printf("usage: cellsam finetune -m CKPT --data DIR --out MODEL.safetensors [options]\n\n"
               "Fine-tune a checkpoint (the official one included) on NAME_img.png / NAME_masks.png\n"
               "pairs. By default both image encoders stay frozen and each image's features are\n"
               "computed once and cached, so only the mask decoder and the CellFinder head train.\n"
               "  --train-encoders   also train both ViTs (slow; disables the cache)\n"
               "  --no-detector / --no-decoder   train only the other part\n"
               "  --reset-detector-head  start the CellFinder head afresh (new object type)\n"
               "  --trunk-from-sam   start the CellFinder trunk from the SAM image encoder\n"
               "  --detector-from CKPT  take the CellFinder (trunk and head) from CKPT instead\n"
               "                     (join a detector and a mask branch trained in separate runs)\n"
               "  --queries N        re-lay the CellFinder's anchors as a fresh grid of N (more anchors\n"
               "                     for small, dense cells); the head's other weights are kept\n");
    else
        printf("usage: cellsam train --data DIR --out MODEL.safetensors [--arch tiny|small|vit_b] [options]\n\n"
               "Train a CellSAM-architecture model from scratch on NAME_img.png / NAME_masks.png pairs.\n"
               "  --arch NAME        tiny, small (default) or vit_b (the official sizes)\n"
               "  --dim N --depth N --heads N --queries N   override the architecture\n");
    printf("Common options:\n"
           "  --data DIR         training pairs (searched recursively)\n"
           "  --val DIR          validation pairs (default: hold out --val-fraction 0.1 of --data)\n"
           "  --max-val N        validation images per epoch (default 40; 0 = all)\n"
           "  --out FILE         model written after every epoch; optimiser state in FILE.state\n"
           "  --resume           continue from FILE and FILE.state when they exist\n"
           "  --epochs N (%d)  --steps N (stop after N optimiser steps)  --batch N images per step\n"
           "  --prompts N        boxes decoded per image (16)\n"
           "  --box-jitter F     box prompt noise: each side moves by up to F of the box's size\n"
           "                     (0.1, SAM's); larger F teaches the decoder imprecise boxes\n"
           "  --lr X  --weight-decay X  --clip X  --warmup N\n"
           "  --no-augment       no flips, rotations, crops or intensity changes\n"
           "  --whole-image-max-side N  take images up to N px per side whole (no tiler halo), as\n"
           "                     whole-image inference sees them, and record N in the model so that\n"
           "                     `segment` works on such images whole (default 0: tiler tiles)\n"
           "  --cell-diameter N  samples at cell size: each image zoomed (isotropically) so that the\n"
           "                     median cell of its masks spans N of the 1024 network pixels, times\n"
           "                     the random scale; records N and `--diameter auto` in the model\n"
           "  --matching M       detector targets: dense (every anchor in the central half of a cell's\n"
           "                     box; train's default), anchor (each cell to its nearest anchor),\n"
           "                     hungarian (DETR's matching) or model (finetune's default: the targets\n"
           "                     the starting model records; without a record dense when it recommends\n"
           "                     a box NMS, as cellsam's models do, else hungarian, as for the official\n"
           "                     checkpoint)\n"
           "  --time-limit SEC   save and stop cleanly after SEC seconds (resume later)\n"
           "  --save-every N     also save every N steps\n"
           "  --threads N  --seed N\n"
           "Progress (one line per step) and the validation F1@0.5 per epoch go to stderr.\n",
           ft ? 5 : 10);
}

static int run(const char *cmd, int argc, char **argv) {
    int ft = !strcmp(cmd, "finetune");
    cellsam_train_params p = ft ? cellsam_finetune_default_params() : cellsam_train_default_params();
    p.n_threads = cli_default_threads();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEED_VALUE                                                 \
    do {                                                           \
        if (!v) {                                                  \
            cli_error(cmd, "%s needs a value", a);                 \
            return 2;                                              \
        }                                                          \
        i++;                                                       \
    } while (0)
#define INT_OPT(flag, lo, hi, dst)                                 \
    else if (!strcmp(a, flag)) {                                   \
        NEED_VALUE;                                                \
        if (cli_parse_int(v, lo, hi, &(dst))) {                    \
            cli_error(cmd, "%s: expected an integer in [%d, %d]", flag, lo, hi); \
            return 2;                                              \
        }                                                          \
    }
#define FLOAT_OPT(flag, lo, hi, dst)                               \
    else if (!strcmp(a, flag)) {                                   \
        NEED_VALUE;                                                \
        char *end;                                                 \
        double x = strtod(v, &end);                                \
        if (*end || !(x >= (lo) && x <= (hi))) {                   \
            cli_error(cmd, "%s: expected a number in [%g, %g]", flag, (double)(lo), (double)(hi)); \
            return 2;                                              \
        }                                                          \
        dst = (float)x;                                            \
    }
        int seed = 1, max_steps = 0;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(cmd);
            return 0;
        } else if (!strcmp(a, "--data")) {
            NEED_VALUE;
            p.data_dir = v;
        } else if (!strcmp(a, "--val")) {
            NEED_VALUE;
            p.val_dir = v;
        } else if (!strcmp(a, "--out") || !strcmp(a, "-o")) {
            NEED_VALUE;
            p.out_path = v;
        } else if (ft && (!strcmp(a, "-m") || !strcmp(a, "--model"))) {
            NEED_VALUE;
            p.init_model = v;
        } else if (!ft && !strcmp(a, "--arch")) {
            NEED_VALUE;
            p.arch = v;
        } else if (!strcmp(a, "--resume")) {
            p.resume = 1;
        } else if (!strcmp(a, "--matching")) {
            NEED_VALUE;
            if (!strcmp(v, "anchor")) p.anchor_matching = 1;
            else if (!strcmp(v, "dense")) p.anchor_matching = 2;
            else if (!strcmp(v, "hungarian")) p.anchor_matching = 0;
            else if (!strcmp(v, "model")) p.anchor_matching = -1;
            else {
                cli_error(cmd, "--matching: expected dense, anchor, hungarian or model");
                return 2;
            }
        } else if (!strcmp(a, "--no-augment")) {
            p.augment = 0;
        } else if (ft && !strcmp(a, "--train-encoders")) {
            p.train_encoders = 1;
            p.cache_embeddings = 0;
        } else if (!strcmp(a, "--reset-detector-head")) {
            p.reset_detector_head = 1;
        } else if (!strcmp(a, "--trunk-from-sam")) {
            p.trunk_from_sam = 1;
        } else if (ft && !strcmp(a, "--detector-from")) {
            NEED_VALUE;
            p.detector_from = v;
        } else if (!strcmp(a, "--no-detector")) {
            p.train_detector = 0;
        } else if (!strcmp(a, "--no-decoder")) {
            p.train_decoder = 0;
        } else if (!strcmp(a, "--time-limit")) {
            NEED_VALUE;
            char *end;
            p.time_limit_s = strtod(v, &end);
            if (*end || !(p.time_limit_s > 0)) {
                cli_error(cmd, "--time-limit: expected seconds > 0");
                return 2;
            }
        } else if (!strcmp(a, "--seed")) {
            NEED_VALUE;
            if (cli_parse_int(v, 0, 2000000000, &seed)) {
                cli_error(cmd, "--seed: expected a non-negative integer");
                return 2;
            }
            p.seed = (uint64_t)seed;
        } else if (!strcmp(a, "--steps")) {
            NEED_VALUE;
            if (cli_parse_int(v, 1, 100000000, &max_steps)) {
                cli_error(cmd, "--steps: expected a positive integer");
                return 2;
            }
            p.max_steps = max_steps;
        }
        INT_OPT("--epochs", 1, 100000, p.epochs)
        INT_OPT("--batch", 1, 1024, p.images_per_step)
        INT_OPT("--prompts", 1, 256, p.prompts_per_image)
        INT_OPT("--warmup", 0, 1000000, p.warmup_steps)
        INT_OPT("--threads", 1, 1024, p.n_threads)
        INT_OPT("--save-every", 0, 100000000, p.save_every_steps)
        INT_OPT("--max-val", 0, 1000000, p.max_val_images)
        INT_OPT("--dim", 8, 2048, p.embed_dim)
        INT_OPT("--depth", 1, 32, p.depth)
        INT_OPT("--heads", 1, 64, p.heads)
        INT_OPT("--queries", 1, 10000, p.n_queries)
        INT_OPT("--whole-image-max-side", 0, 65536, p.whole_image_max_side)
        INT_OPT("--cell-diameter", 4, 1024, p.cell_diameter)
        FLOAT_OPT("--lr", 1e-9, 1.0, p.lr)
        FLOAT_OPT("--weight-decay", 0.0, 1.0, p.weight_decay)
        FLOAT_OPT("--clip", 0.0, 1e6, p.clip_norm)
        FLOAT_OPT("--box-jitter", 0.0, 0.5, p.box_jitter)
        FLOAT_OPT("--val-fraction", 0.0, 0.9, p.val_fraction)
        else {
            cli_error(cmd, "unknown option '%s' (see --help)", a);
            return 2;
        }
#undef NEED_VALUE
#undef INT_OPT
#undef FLOAT_OPT
    }
    if (ft && !p.init_model) p.init_model = getenv("CELLSAM_MODEL");
    if (ft && !p.init_model) {
        cli_error(cmd, "no checkpoint to fine-tune: give -m CKPT");
        return 2;
    }
    if (!p.data_dir || !p.out_path) {
        cli_error(cmd, "--data DIR and --out FILE are required (see --help)");
        return 2;
    }
    cellsam_train_report r;
    int rc = cellsam_train(&p, &r);
    if (rc) {
        cli_error(cmd, "%s", cellsam_last_error());
        return 1;
    }
    fprintf(stderr, "%s: %lld steps, %.1f s, %.2f training images/s", cmd, (long long)r.steps, r.seconds,
            r.images_per_second);
    if (r.val_f1 >= 0) fprintf(stderr, ", validation F1@0.5 %.4f", r.val_f1);
    fprintf(stderr, "; model in %s\n", p.out_path);
    return 0;
}

int cmd_train(int argc, char **argv) { return run("train", argc, argv); }
int cmd_finetune(int argc, char **argv) { return run("finetune", argc, argv); }
