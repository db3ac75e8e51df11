/* cellsam command-line tool: dispatch to subcommands (tools/cmd_*.c). */
#include <stdio.h>
#include <string.h>

#include "cellsam.h"
#include "cli.h"

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *help;
} k_commands[] = {
    {"segment", cmd_segment, "segment cells in an image (or a folder) into a label image"},
    {"eval", cmd_eval, "score predicted label images against ground truth (F1, AP)"},
    {"embed", cmd_embed, "compute the SAM image embedding of an image or network input"},
    {"prompt", cmd_prompt, "decode masks from boxes/points for a stored embedding"},
    {"convert", cmd_convert, "convert a checkpoint (.pt or .safetensors) to safetensors"},
    {"info", cmd_info, "print a checkpoint's hyper-parameters and tensor check"},
    {"serve", cmd_serve, "start the browser labeling tool"},
    {"bench", cmd_bench, "run the speed and memory benchmarks"},
    {"train", cmd_train, "train a model from scratch on image/label pairs"},
    {"finetune", cmd_finetune, "fine-tune a checkpoint on image/label pairs (frozen encoders)"},
};

static void usage(FILE *f) {
    fprintf(f, "cellsam %s: CellSAM cell segmentation in C\n\nusage: cellsam <command> [options]\n\ncommands:\n",
            CELLSAM_VERSION);
    for (size_t i = 0; i < sizeof k_commands / sizeof k_commands[0]; i++)
        fprintf(f, "  %-9s %s\n", k_commands[i].name, k_commands[i].help);
    fprintf(f, "\n'cellsam <command> --help' describes each command.\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("cellsam %s\n%s\n", CELLSAM_VERSION, cellsam_system_info());
        return 0;
    }
    for (size_t i = 0; i < sizeof k_commands / sizeof k_commands[0]; i++)
        if (!strcmp(argv[1], k_commands[i].name)) return k_commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "cellsam: error: unknown command '%s' (see 'cellsam --help')\n", argv[1]);
    return 2;
}
