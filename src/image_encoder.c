/* SAM ViT image encoder (spec §4.2): patch embedding, absolute positions, blocks
 * with windowed or global attention and decomposed relative positions, optional
 * neck. Used twice: SAM's encoder (with neck) and CellFinder's trunk (without).
 *
 * Tokens are kept channel-last (N x D, row-major), so every linear layer is one
 * GEMM against the PyTorch (out, in) weight without transposes. */
#include <cblas.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "gemm_int8.h"
#include "model.h"
#include "ops.h"

/* Query rows per attention block: bounds the score buffer to QB x N floats, so the
 * global attention never holds a full N x N matrix (let alone all heads at once).
 * 256 rows amortise the BLAS's packing of K and V (1 MB each for a global block)
 * while two threads' score blocks (4 MB each) stay in the shared L3. */
#define ATTN_QBLOCK 256

/* Arithmetic of the attention products. */
enum { ATTN_F32 = 0, ATTN_BF16 = 1, ATTN_INT8 = 2 };

static int attn_mode(const cs_vit *v) { return v->compute_bf16 ? ATTN_BF16 : v->compute_int8 ? ATTN_INT8 : ATTN_F32; }

/* One attention head over one window (or the whole grid, for global blocks).
 * q/k/v rows are `ld` floats apart; n = side*side tokens in row-major order.
 * out rows are `ldo` floats apart. scratch: attn_scratch_floats(side, hd, mode) floats.
 * With bf16, the two products with n terms (q k^T and p v) take bfloat16 inputs (keys
 * and values packed once per head). With int8, q k^T takes 8-bit queries (per row) and
 * 7-bit keys (per key), as the int8 linear layers do; p v stays float32, because the
 * weights of a diffuse row are too small for 8 bits of its largest one. The
 * relative-position terms and the softmax stay float32. */
static size_t attn_scratch_floats(int side, int hd, int mode) {
    const size_t n = (size_t)side * side;
    size_t floats = (size_t)ATTN_QBLOCK * (n + hd + 2 * (2 * side - 1) + 1);
    if (mode == ATTN_BF16) floats += (cs_bf16_packed_count((int)n, hd) + cs_bf16_packed_count(hd, (int)n) + 1) / 2;
    if (mode == ATTN_INT8) floats += cs_int8_packed_bytes((int)n, hd) / sizeof(float) + 1 + (size_t)hd;
    return floats;
}

static int attention_head(const float *q, const float *k, const float *v, int ld, int side, int hd,
                          const float *rel_h, const float *rel_w, float scale, float *out, int ldo, int mode,
                          float *scratch) {
    const int bf16 = mode == ATTN_BF16;
    const int n = side * side, R = 2 * side - 1;
    float *scores = scratch;
    float *qs = scores + (size_t)ATTN_QBLOCK * n;
    float *fh = qs + (size_t)ATTN_QBLOCK * hd; /* q . Rh[j] for every table row j */
    float *fw = fh + (size_t)ATTN_QBLOCK * R;
    float *inv_sum = fw + (size_t)ATTN_QBLOCK * R;
    cs_bf16_weights k16, vt16;
    cs_int8_weights k8;
    if (bf16) {
        uint16_t *kbuf = (uint16_t *)(inv_sum + ATTN_QBLOCK);
        cs_bf16_pack_strided(&k16, kbuf, k, (size_t)ld, 1, n, hd);         /* K: n x hd */
        cs_bf16_pack_strided(&vt16, kbuf + cs_bf16_packed_count(n, hd), v, 1, (size_t)ld, hd, n); /* V^T */
    }
    if (mode == ATTN_INT8) {
        float *row = inv_sum + ATTN_QBLOCK;
        int rc = cs_int8_pack_strided(&k8, row + hd, k, (size_t)ld, n, hd, row); /* K: n x hd */
        if (rc) return rc;
    }
    for (int q0 = 0; q0 < n; q0 += ATTN_QBLOCK) {
        int qb = n - q0 < ATTN_QBLOCK ? n - q0 : ATTN_QBLOCK;
        for (int i = 0; i < qb; i++)
            for (int c = 0; c < hd; c++) qs[(size_t)i * hd + c] = q[(size_t)(q0 + i) * ld + c] * scale;
        /* scores = (q * scale) k^T, as the reference orders it */
        if (bf16) {
            if (cs_bf16_linear(qs, qb, hd, &k16, NULL, 0, scores, n, 1)) return CELLSAM_ERR_NOMEM;
        } else if (mode == ATTN_INT8) {
            int rc = cs_int8_linear(qs, qb, hd, &k8, NULL, 0, scores, n, 1);
            if (rc) return rc;
        } else {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, qb, n, hd, 1.0f, qs, hd, k, ld, 0.0f, scores, n);
        }
        /* decomposed relative positions use the unscaled q: one small GEMM against each
         * whole table, then rh[ky] = fh[qy - ky + side - 1], rw[kx] = fw[qx - kx + side - 1] */
        const float *qb0 = q + (size_t)q0 * ld;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, qb, R, hd, 1.0f, qb0, ld, rel_h, hd, 0.0f, fh, R);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, qb, R, hd, 1.0f, qb0, ld, rel_w, hd, 0.0f, fw, R);
        for (int i = 0; i < qb; i++) {
            int t = q0 + i, qy = t / side, qx = t % side;
            const float *hrow = fh + (size_t)i * R + qy + side - 1; /* hrow[-ky] */
            const float *wrow = fw + (size_t)i * R + qx + side - 1; /* wrow[-kx] */
            float rw[256]; /* side <= grid <= 256, checked at load */
            for (int kx = 0; kx < side; kx++) rw[kx] = wrow[-kx];
            float *srow = scores + (size_t)i * n;
            for (int ky = 0; ky < side; ky++) {
                const float h = hrow[-ky];
                float *sp = srow + (size_t)ky * side;
                for (int kx = 0; kx < side; kx++) sp[kx] += h + rw[kx];
            }
            /* softmax without its last pass: 1/sum scales the hd outputs instead of the n weights */
            inv_sum[i] = 1.0f / cs_exp_row_sum(srow, n);
        }
        float *o = out + (size_t)q0 * ldo;
        if (bf16) {
            if (cs_bf16_linear(scores, qb, n, &vt16, NULL, 0, o, ldo, 1)) return CELLSAM_ERR_NOMEM;
        } else {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, qb, hd, n, 1.0f, scores, n, v, ld, 0.0f, o, ldo);
        }
        for (int i = 0; i < qb; i++)
            for (int c = 0; c < hd; c++) o[(size_t)i * ldo + c] *= inv_sum[i];
    }
    return CELLSAM_OK;
}

/* Buffers of the attention sub-block, sized once per forward pass for the largest
 * block (windowed blocks pad the grid to whole windows). */
typedef struct {
    float *Yw, *QKV, *Ow, *scratch;
    size_t scratch_len;
} attn_workspace;

static void attn_workspace_free(attn_workspace *ws) {
    free(ws->Yw);
    free(ws->QKV);
    free(ws->Ow);
    free(ws->scratch);
}

static int attn_workspace_init(attn_workspace *ws, const cs_vit *v, int n_threads) {
    const int D = v->dim, G = v->grid, hd = D / v->heads;
    size_t max_tok = 0, max_scratch = 0;
    for (int bi = 0; bi < v->depth; bi++) {
        const int side = v->blocks[bi].window ? v->blocks[bi].window : G;
        const int nws = (G + side - 1) / side;
        size_t tok = (size_t)nws * nws * side * side, sc = attn_scratch_floats(side, hd, attn_mode(v));
        max_tok = tok > max_tok ? tok : max_tok;
        max_scratch = sc > max_scratch ? sc : max_scratch;
    }
    memset(ws, 0, sizeof *ws);
    ws->scratch_len = max_scratch;
    ws->Yw = cs_calloc(max_tok, (size_t)D * sizeof(float));
    ws->QKV = cs_alloc(max_tok, (size_t)3 * D * sizeof(float));
    ws->Ow = cs_alloc(max_tok, (size_t)D * sizeof(float));
    ws->scratch = cs_alloc((size_t)n_threads, max_scratch * sizeof(float));
    if (!ws->Yw || !ws->QKV || !ws->Ow || !ws->scratch) {
        attn_workspace_free(ws);
        return CELLSAM_ERR_NOMEM;
    }
    return CELLSAM_OK;
}

/* Row of grid token (y, x) in the window-major layout: windows of side x side tokens,
 * nwin_side of them per grid row, each window row-major. */
static inline size_t window_row(int y, int x, int side, int nwin_side) {
    return ((size_t)((y / side) * nwin_side + x / side) * side + y % side) * side + x % side;
}

/* Y[M,N] = (accumulate ? Y : 0) + X[M,K] W^T + bias, in the model's precision for
 * the block matrices: float32 through the BLAS, bfloat16 (gemm_bf16.c) or int8
 * (gemm_int8.c). */
static int block_linear(const cs_vit *v, const float *X, int M, int K, const float *W32,
                        const cs_bf16_weights *Wbf16, const cs_int8_weights *Wi8, const float *bias, int N,
                        int accumulate, float *Y, int n_threads) {
    if (v->compute_bf16) return cs_bf16_linear(X, M, K, Wbf16, bias, accumulate, Y, N, n_threads);
    if (v->compute_int8) return cs_int8_linear(X, M, K, Wi8, bias, accumulate, Y, N, n_threads);
    if (!accumulate) {
        cs_linear(X, M, K, W32, bias, N, Y, n_threads);
        return CELLSAM_OK;
    }
    if (bias)
        for (int i = 0; i < M; i++) cs_add(Y + (size_t)i * N, bias, (size_t)N);
    cs_gemm(M, N, K, X, K, W32, K, 1, 1.0f, Y, N, n_threads);
    return CELLSAM_OK;
}

/* Attention sub-block: Y (grid*grid x D) is the LN1 output; writes the attention
 * result (before proj) into O (grid*grid x D). */
static int block_attention(const cs_vit *v, const cs_vit_block *b, const float *Y, float *O,
                            attn_workspace *ws, int n_threads) {
    const int D = v->dim, G = v->grid, H = v->heads, hd = D / H;
    const int side = b->window ? b->window : G;
    const int nwin_side = (G + side - 1) / side;
    const int nwin = nwin_side * nwin_side;
    const size_t ntok = (size_t)nwin * side * side;
    /* one window covering the grid exactly (global attention) needs no partition */
    const int partition = nwin != 1 || side != G;
    const float *Yw = Y;
    float *Ow = O;
    if (partition) {
        /* window partition of the zero-padded grid: padded tokens stay 0 after the norm,
         * so their q/k/v equal the bias and they take part in attention (reference
         * behaviour). Padding rows are zero from the calloc and never written. */
        for (int y = 0; y < G; y++)
            for (int x = 0; x < G; x++)
                memcpy(ws->Yw + window_row(y, x, side, nwin_side) * D, Y + ((size_t)y * G + x) * D,
                       (size_t)D * sizeof(float));
        Yw = ws->Yw;
        Ow = ws->Ow;
    }
    int rc = block_linear(v, Yw, (int)ntok, D, b->qkv_w, &b->qkv_bf16, &b->qkv_i8, b->qkv_b, 3 * D, 0, ws->QKV, n_threads);
    if (rc) return rc;
    const float scale = 1.0f / sqrtf((float)hd);
    const int n = side * side;
    const int items = nwin * H;
    const int nt = n_threads < items ? n_threads : items;
    cs_worker_error failed = {0};
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int it = 0; it < items; it++) {
        int w = it / H, h = it % H;
        const float *base = ws->QKV + (size_t)w * n * 3 * D;
        int r = attention_head(base + h * hd, base + D + h * hd, base + 2 * D + h * hd, 3 * D, side, hd, b->rel_h,
                               b->rel_w, scale, Ow + (size_t)w * n * D + h * hd, D, attn_mode(v),
                               ws->scratch + (size_t)omp_get_thread_num() * ws->scratch_len);
        if (r) cs_worker_error_keep(&failed, r);
    }
    if (failed.code) return cs_worker_error_raise(&failed);
    if (partition) /* un-partition and crop the padding */
        for (int y = 0; y < G; y++)
            for (int x = 0; x < G; x++)
                memcpy(O + ((size_t)y * G + x) * D, ws->Ow + window_row(y, x, side, nwin_side) * D,
                       (size_t)D * sizeof(float));
    return CELLSAM_OK;
}

/* Half-precision block matrices to float32 (F16C when built for it). */
static void widen16(const uint16_t *src, float *dst, size_t n, int dtype, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n > 65536)
    for (size_t c = 0; c < (n + 4095) / 4096; c++) {
        size_t i = c * 4096, end = i + 4096 < n ? i + 4096 : n;
        if (dtype == CS_DTYPE_F16) {
#if defined(__F16C__)
            for (; i + 8 <= end; i += 8)
                _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
            for (; i < end; i++) dst[i] = cs_f16_to_f32(src[i]);
        } else {
            for (; i < end; i++) dst[i] = cs_bf16_to_f32(src[i]);
        }
    }
}

int cs_vit_forward(const cs_vit *v, const float *input_chw, float *out, int n_threads) {
    const int D = v->dim, G = v->grid, P = v->patch, S = v->img_size;
    const size_t N = (size_t)G * G;
    const int K = 3 * P * P;
    if (n_threads < 1) n_threads = 1;
    float *X = cs_alloc(N, (size_t)D * sizeof(float));
    float *Y = cs_alloc(N, (size_t)D * sizeof(float));
    float *T = cs_alloc(N, (size_t)(K > D ? K : D) * sizeof(float));
    float *M = cs_alloc(N, (size_t)v->mlp * sizeof(float));
    /* float32 copies of one block's matrices when they are stored in 16 bits */
    const size_t wq = (size_t)3 * D * D, wp = (size_t)D * D, w1 = (size_t)v->mlp * D;
    const int widen = v->weights16 && !v->compute_bf16 && !v->compute_int8;
    float *W32 = widen ? cs_alloc(wq + wp + 2 * w1, sizeof(float)) : NULL;
    attn_workspace ws;
    int rc = attn_workspace_init(&ws, v, n_threads);
    if (rc) {
        memset(&ws, 0, sizeof ws);
        goto done;
    }
    if (!X || !Y || !T || !M || (widen && !W32)) {
        rc = CELLSAM_ERR_NOMEM;
        goto done;
    }
    /* patch embedding as one GEMM: rows = patches, columns = (c, ky, kx) as in the conv weight */
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int py = 0; py < G; py++)
        for (int px = 0; px < G; px++) {
            float *row = T + ((size_t)py * G + px) * K;
            for (int c = 0; c < 3; c++)
                for (int ky = 0; ky < P; ky++)
                    memcpy(row + (c * P + ky) * P,
                           input_chw + ((size_t)c * S + (size_t)py * P + ky) * S + (size_t)px * P,
                           (size_t)P * sizeof(float));
        }
    cs_linear(T, (int)N, K, v->patch_w, v->patch_b, D, X, n_threads);
    cs_add(X, v->pos_embed, N * D);

    for (int bi = 0; bi < v->depth; bi++) {
        cs_vit_block blk = v->blocks[bi];
        if (widen) {
            widen16(blk.qkv_w16, W32, wq, v->weights16, n_threads);
            widen16(blk.proj_w16, W32 + wq, wp, v->weights16, n_threads);
            widen16(blk.lin1_w16, W32 + wq + wp, w1, v->weights16, n_threads);
            widen16(blk.lin2_w16, W32 + wq + wp + w1, w1, v->weights16, n_threads);
            blk.qkv_w = W32;
            blk.proj_w = W32 + wq;
            blk.lin1_w = W32 + wq + wp;
            blk.lin2_w = W32 + wq + wp + w1;
        }
        const cs_vit_block *b = &blk;
        cs_layernorm(X, Y, (int)N, D, b->norm1_w, b->norm1_b, 1e-6f, n_threads);
        rc = block_attention(v, b, Y, T, &ws, n_threads);
        /* X += proj(attn) and X += lin2(gelu(lin1(LN2 X))): accumulate straight into X */
        if (!rc) rc = block_linear(v, T, (int)N, D, b->proj_w, &b->proj_bf16, &b->proj_i8, b->proj_b, D, 1, X, n_threads);
        if (rc) goto done;
        cs_layernorm(X, Y, (int)N, D, b->norm2_w, b->norm2_b, 1e-6f, n_threads);
        rc = block_linear(v, Y, (int)N, D, b->lin1_w, &b->lin1_bf16, &b->lin1_i8, b->lin1_b, v->mlp, 0, M, n_threads);
        if (rc) goto done;
        cs_gelu(M, N * v->mlp, n_threads);
        rc = block_linear(v, M, (int)N, v->mlp, b->lin2_w, &b->lin2_bf16, &b->lin2_i8, b->lin2_b, D, 1, X, n_threads);
        if (rc) goto done;
    }

    if (!v->has_neck) {
        cs_transpose(X, out, (int)N, D);
        goto done;
    }
    {
        const int C = v->out_chans;
        /* 1x1 conv (no bias) + LayerNorm2d over channels (= LayerNorm per token) */
        cs_linear(X, (int)N, D, v->neck0_w, NULL, C, Y, n_threads);
        cs_layernorm(Y, Y, (int)N, C, v->neck1_w, v->neck1_b, 1e-6f, n_threads);
        /* 3x3 conv, padding 1, no bias, via im2col: columns (c, ky, kx) */
        float *col = cs_alloc(N, (size_t)C * 9 * sizeof(float));
        if (!col) {
            rc = CELLSAM_ERR_NOMEM;
            goto done;
        }
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int y = 0; y < G; y++)
            for (int x = 0; x < G; x++) {
                float *row = col + ((size_t)y * G + x) * C * 9;
                for (int c = 0; c < C; c++)
                    for (int ky = 0; ky < 3; ky++)
                        for (int kx = 0; kx < 3; kx++) {
                            int sy = y + ky - 1, sx = x + kx - 1;
                            row[c * 9 + ky * 3 + kx] =
                                (sy < 0 || sy >= G || sx < 0 || sx >= G) ? 0.f : Y[((size_t)sy * G + sx) * C + c];
                        }
            }
        cs_linear(col, (int)N, C * 9, v->neck2_w, NULL, C, X, n_threads);
        free(col);
        cs_layernorm(X, X, (int)N, C, v->neck3_w, v->neck3_b, 1e-6f, n_threads);
        cs_transpose(X, out, (int)N, C);
    }
done:
    attn_workspace_free(&ws);
    free(W32);
    free(X);
    free(Y);
    free(T);
    free(M);
    if (rc == CELLSAM_ERR_NOMEM) return cs_error(rc, "out of memory in the image encoder");
    return rc;
}
