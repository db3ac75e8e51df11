/* cellsam CLI: one function per subcommand, each in tools/cmd_<name>.c.
 * A subcommand returns the process exit status: 0 success, 1 failure (with a
 * one-line "cellsam <cmd>: error: ..." on stderr), 2 usage error. */
#ifndef CELLSAM_CLI_H
#define CELLSAM_CLI_H

int cmd_embed(int argc, char **argv);
int cmd_prompt(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_segment(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_finetune(int argc, char **argv);

/* Shared helpers (tools/cli_util.c). */
void cli_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int cli_parse_int(const char *s, int lo, int hi, int *out);
int cli_parse_floats(const char *s, float *out, int n); /* "a,b,c" -> exactly n values */
int cli_default_threads(void);
/* Model used without -m: $CELLSAM_MODEL, else the bundled cellsam-trained model
 * (models/cellsam-small.safetensors beside the executable or in the source tree);
 * NULL when none is found. */
const char *cli_default_model(void);
#define CELLSAM_DEFAULT_MODEL_NAME "cellsam-small.safetensors"
/* "f32", "f16" or "bf16" -> CELLSAM_DTYPE_*; -1 if unknown */
int cli_parse_weights(const char *s);
/* --precision f32|bf16: CELLSAM_DTYPE_F32 / _BF16, or -1; a one-line note on stderr when
 * bf16 is chosen on a CPU that can only emulate it */
int cli_parse_precision(const char *cmd, const char *s);

#endif
