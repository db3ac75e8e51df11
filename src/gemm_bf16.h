/* Matrix products with bfloat16 inputs and float32 accumulation: the opt-in
 * `--precision bf16` path of the ViT blocks (see gemm_bf16.c). */
#ifndef CELLSAM_GEMM_BF16_H
#define CELLSAM_GEMM_BF16_H

#include <stddef.h>
#include <stdint.h>

/* A weight matrix W (n x k, PyTorch Linear layout: out x in) rounded to bfloat16 and
 * laid out for the kernel: panels of 32 output columns, each k_pairs rows of 32
 * (W[j][2p], W[j][2p+1]) pairs. Built once at model load; read-only afterwards. */
typedef struct {
    int n, k;
    int k_pairs;  /* ceil(k / 2): an odd k is padded with a zero */
    int n_panels; /* ceil(n / 32): missing columns are zero */
    uint16_t *data;
} cs_bf16_weights;

/* Pack W given as float32 (src32) or as 16-bit values of dtype CS_DTYPE_F16 /
 * CS_DTYPE_BF16 (src16). Returns CELLSAM_OK or CELLSAM_ERR_NOMEM / _LIMIT. */
int cs_bf16_weights_pack(cs_bf16_weights *w, const float *src32, const uint16_t *src16, int dtype16, int n,
                         int k, int n_threads);
void cs_bf16_weights_free(cs_bf16_weights *w);

/* Packing into a caller's buffer of cs_bf16_packed_count(n, k) values, on the calling
 * thread (for operands made per call, such as attention's keys and values): element
 * (j, i) of the n x k matrix W is src[j * rs + i * cs], so a transpose is rs = 1,
 * cs = row stride. w->data is then the caller's buffer: do not cs_bf16_weights_free it. */
size_t cs_bf16_packed_count(int n, int k);
void cs_bf16_pack_strided(cs_bf16_weights *w, uint16_t *data, const float *src, size_t rs, size_t cs, int n,
                          int k);

/* Y[m][j] = (accumulate ? Y[m][j] : 0) + sum_k bf16(X[m][k]) W[j][k] + bias[j], for
 * m < M, j < W->n; X has row stride ldx, Y row stride ldy; bias may be NULL.
 * Products of bfloat16 values are exact in float32; sums are float32. Uses the
 * AVX512-BF16 kernel when the CPU has it, else a portable kernel with the same
 * rounding and summation order (slower than float32). Returns CELLSAM_OK or
 * CELLSAM_ERR_NOMEM. */
int cs_bf16_linear(const float *X, int M, int ldx, const cs_bf16_weights *W, const float *bias, int accumulate,
                   float *Y, int ldy, int n_threads);

/* The same with the portable kernel forced (tests compare the two). */
int cs_bf16_linear_portable(const float *X, int M, int ldx, const cs_bf16_weights *W, const float *bias,
                            int accumulate, float *Y, int ldy, int n_threads);

/* float32 -> bfloat16, round to nearest even; subnormal inputs become signed zero
 * (as the AVX512-BF16 conversion does), NaN stays NaN. */
uint16_t cs_bf16_round(float x);

#endif
