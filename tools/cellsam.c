/* cellsam command-line tool (placeholder main; subcommands being added). */
#include <stdio.h>
#include <string.h>
#include "cellsam.h"
int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help")) {
        printf("usage: cellsam <command> [options]\n");
        return argc < 2;
    }
    fprintf(stderr, "cellsam: unknown command '%s'\n", argv[1]);
    return 2;
}
