/* Tensor operations on float32 row-major buffers. GEMMs go to OpenBLAS; each call
 * takes n_threads and splits the work itself (OpenBLAS runs single-threaded inside
 * our OpenMP region), so contexts in different threads never share a thread pool
 * setting. LayerNorm and softmax always accumulate in float32 or wider. */
#ifndef CELLSAM_OPS_H
#define CELLSAM_OPS_H

#include <stddef.h>
#include <stdint.h>

/* C[M,N] = A[M,K] * B + beta*C; B is [K,N] (trans_b=0) or [N,K] (trans_b=1). */
void cs_gemm(int M, int N, int K, const float *A, int lda, const float *B, int ldb, int trans_b,
             float beta, float *C, int ldc, int n_threads);
/* Flops (2 M N K) of every cs_gemm so far, all threads together: benches read it
 * around a stage to report the arithmetic it did. */
uint64_t cs_gemm_flops(void);
/* B[M,N] = upper(A[M,M]) * B in place (the upper triangle of A, diagonal included;
 * single-threaded; counted in cs_gemm_flops). */
void cs_trmm_upper(int M, int N, const float *A, int lda, float *B, int ldb);
/* Linear layer: Y[M,N] = X[M,K] W^T + b, W in PyTorch layout (N,K); bias may be NULL. */
void cs_linear(const float *X, int M, int K, const float *W, const float *bias, int N, float *Y,
               int n_threads);
/* LayerNorm over the last dim (rows x dim); in may equal out. */
void cs_layernorm(const float *in, float *out, int rows, int dim, const float *gamma,
                  const float *beta, float eps, int n_threads);
/* LayerNorm2d on channel-first C x HW: normalise each pixel over channels. */
void cs_layernorm2d_chw(float *x, int C, int HW, const float *gamma, const float *beta, float eps);
void cs_gelu(float *x, size_t n, int n_threads);   /* exact erf GELU */
void cs_relu(float *x, size_t n);
void cs_add(float *y, const float *x, size_t n);   /* y += x */
void cs_softmax_row(float *x, int n);              /* in place, max-subtracted */
float cs_exp_row_sum(float *x, int n);             /* exp(x - max) in place; returns the sum */
/* Softmax of each of `groups` consecutive runs of n values, in place: for many short
 * rows (attention over a few prompt tokens), exponentials 8 at a time across runs. */
void cs_softmax_groups(float *x, int groups, int n);
/* exp(x) in place, for x <= 0 (softmax arguments after the max is subtracted). */
void cs_exp_nonpos(float *x, size_t n);
float cs_sigmoidf(float x);
/* out[N,C] = transpose(in[C,N]) */
void cs_transpose(const float *in, float *out, int rows, int cols);

#endif
