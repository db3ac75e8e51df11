/* Matrix products with 8-bit integer inputs and exact 32-bit integer sums: the
 * opt-in `--precision int8` path of the ViT blocks (see gemm_int8.c). */
#ifndef CELLSAM_GEMM_INT8_H
#define CELLSAM_GEMM_INT8_H

#include <stddef.h>
#include <stdint.h>

/* A weight matrix W (n x k, PyTorch Linear layout: out x in) quantised per output
 * column to 7 bits, W[j][i] ~ scale[j] * q, |q| <= 63, and laid out for the kernels:
 * panels of 16 output columns, each k_quads rows of 16 x 4 bytes (W[j][4p..4p+3]).
 * Built once at model load; read-only afterwards. */
typedef struct {
    int n, k;
    int k_quads;     /* ceil(k / 4): k is padded with zero weights */
    int n_panels;    /* ceil(n / 16): missing columns are zero */
    int8_t *data;
    float *scale;    /* n_panels * 16 per-column scales (0 past n) */
    int32_t *colsum; /* n_panels * 16 sums of each column's q (the activations' offset) */
} cs_int8_weights;

/* Quantise and pack W given as float32 (src32) or as 16-bit values of dtype
 * CS_DTYPE_F16 / CS_DTYPE_BF16 (src16). CELLSAM_OK, or CELLSAM_ERR_NOMEM / _LIMIT /
 * _INVALID (a non-finite weight). */
int cs_int8_weights_pack(cs_int8_weights *w, const float *src32, const uint16_t *src16, int dtype16, int n, int k,
                         int n_threads);
void cs_int8_weights_free(cs_int8_weights *w);

/* Packing into a caller's buffer of cs_int8_packed_bytes(n, k) bytes (aligned for
 * floats), on the calling thread, for operands built at run time (attention keys):
 * W's rows are src's n rows of k floats, `ld` floats apart. row: k floats of scratch.
 * The result must not be passed to cs_int8_weights_free. CELLSAM_OK, or
 * CELLSAM_ERR_INVALID for a non-finite row. */
size_t cs_int8_packed_bytes(int n, int k);
int cs_int8_pack_strided(cs_int8_weights *w, void *buf, const float *src, size_t ld, int n, int k, float *row);

/* Y[m][j] = (accumulate ? Y[m][j] : 0) + sx[m] scale[j] sum_k qx[m][k] q[j][k] + bias[j]
 * for m < M, j < W->n, where each row of X is quantised to 8 bits by its own largest
 * magnitude (qx = round(127 x / max|x_m|), sx = max|x_m| / 127). The integer sums are
 * exact, so every kernel (AVX512-VNNI, AVX2, portable) gives the same result. X has
 * row stride ldx, Y row stride ldy; bias may be NULL. CELLSAM_OK or CELLSAM_ERR_NOMEM. */
int cs_int8_linear(const float *X, int M, int ldx, const cs_int8_weights *W, const float *bias, int accumulate,
                   float *Y, int ldy, int n_threads);

/* The same with a given kernel (tests compare them; bench forces AVX2 to stand for the
 * reference CPU): 0 = the best the CPU has, 1 = portable C, 2 = AVX2, 3 = AVX512-VNNI.
 * A kernel the CPU lacks gives CELLSAM_ERR_INVALID. */
int cs_int8_linear_with(int kernel, const float *X, int M, int ldx, const cs_int8_weights *W, const float *bias,
                        int accumulate, float *Y, int ldy, int n_threads);

/* The kernel cs_int8_linear uses here (2 or 3, or 1 without AVX2), and its name. */
int cs_int8_best_kernel(void);
const char *cs_int8_kernel_name(int kernel);

#endif
