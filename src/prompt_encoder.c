/* SAM prompt encoder (spec §4.3): random-Fourier positional encoding of points and
 * box corners, the dense positional map, and the dense prompt (no-mask embedding or
 * a downscaled mask). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model.h"
#include "ops.h"

void cs_pe_encode(const cs_prompt_encoder *pe, float u, float v, float *out) {
    const int F = pe->dim / 2;
    const float two_pi = (float)(2.0 * M_PI); /* the reference multiplies by a float32 2*pi */
    float tu = 2.0f * u - 1.0f, tv = 2.0f * v - 1.0f;
    for (int k = 0; k < F; k++) {
        float z = tu * pe->pe_gauss[k] + tv * pe->pe_gauss[F + k];
        z = z * two_pi;
        out[k] = sinf(z);
        out[F + k] = cosf(z);
    }
}

void cs_prompt_dense_pe(const cs_prompt_encoder *pe, float *out) {
    const int G = pe->grid, C = pe->dim;
    float *tmp = malloc((size_t)C * sizeof(float));
    if (!tmp) return;
    for (int i = 0; i < G; i++)
        for (int j = 0; j < G; j++) {
            cs_pe_encode(pe, ((float)j + 0.5f) / (float)G, ((float)i + 0.5f) / (float)G, tmp);
            for (int c = 0; c < C; c++) out[((size_t)c * G + i) * G + j] = tmp[c];
        }
    free(tmp);
}

int cs_prompt_sparse(const cs_prompt_encoder *pe, const float *box, const cellsam_point *points,
                     int n_points, float *out) {
    const int C = pe->dim;
    const float W = (float)pe->img_size, H = (float)pe->img_size;
    int t = 0;
    if (n_points > 0) {
        /* without a box, SAM appends a padding point (0,0) with label -1 */
        int n = n_points + (box ? 0 : 1);
        for (int i = 0; i < n; i++) {
            float *o = out + (size_t)t * C;
            int label = i < n_points ? points[i].label : -1;
            float x = i < n_points ? points[i].x : 0.f, y = i < n_points ? points[i].y : 0.f;
            cs_pe_encode(pe, (x + 0.5f) / W, (y + 0.5f) / H, o);
            if (label == -1) {
                for (int c = 0; c < C; c++) o[c] = pe->not_a_point[c];
            } else {
                const float *e = pe->point_emb[label ? 1 : 0];
                for (int c = 0; c < C; c++) o[c] += e[c];
            }
            t++;
        }
    }
    if (box) {
        for (int corner = 0; corner < 2; corner++) {
            float *o = out + (size_t)t * C;
            cs_pe_encode(pe, (box[2 * corner] + 0.5f) / W, (box[2 * corner + 1] + 0.5f) / H, o);
            const float *e = pe->point_emb[2 + corner];
            for (int c = 0; c < C; c++) o[c] += e[c];
            t++;
        }
    }
    return t;
}

/* 2x2 stride-2 convolution on channel-first input (cin, h, w) -> (cout, h/2, w/2). */
static void conv2x2s2(const float *in, int cin, int h, int w, const float *wt, const float *bias,
                      int cout, float *out) {
    int ho = h / 2, wo = w / 2;
    for (int o = 0; o < cout; o++)
        for (int y = 0; y < ho; y++)
            for (int x = 0; x < wo; x++) {
                float s = bias[o];
                for (int i = 0; i < cin; i++)
                    for (int a = 0; a < 2; a++)
                        for (int b = 0; b < 2; b++)
                            s += in[((size_t)i * h + 2 * y + a) * w + 2 * x + b] *
                                 wt[((o * cin + i) * 2 + a) * 2 + b];
                out[((size_t)o * ho + y) * wo + x] = s;
            }
}

int cs_prompt_dense(const cs_prompt_encoder *pe, const float *mask_input, float *out, int n_threads) {
    const int G = pe->grid, C = pe->dim;
    const size_t HW = (size_t)G * G;
    if (!mask_input) {
        for (int c = 0; c < C; c++)
            for (size_t p = 0; p < HW; p++) out[(size_t)c * HW + p] = pe->no_mask[c];
        return CELLSAM_OK;
    }
    const int c2 = pe->mask_in_chans, c1 = c2 / 4, M = 4 * G;
    float *a = cs_alloc((size_t)c1 * (M / 2) * (M / 2), sizeof(float));
    float *b = cs_alloc((size_t)c2 * HW, sizeof(float));
    if (!a || !b) {
        free(a);
        free(b);
        return CELLSAM_ERR_NOMEM;
    }
    conv2x2s2(mask_input, 1, M, M, pe->md0_w, pe->md0_b, c1, a);
    cs_layernorm2d_chw(a, c1, (M / 2) * (M / 2), pe->md1_w, pe->md1_b, 1e-6f);
    cs_gelu(a, (size_t)c1 * (M / 2) * (M / 2), n_threads);
    conv2x2s2(a, c1, M / 2, M / 2, pe->md3_w, pe->md3_b, c2, b);
    cs_layernorm2d_chw(b, c2, (int)HW, pe->md4_w, pe->md4_b, 1e-6f);
    cs_gelu(b, (size_t)c2 * HW, n_threads);
    /* 1x1 conv c2 -> C: out[C, HW] = W[C, c2] x b[c2, HW] + bias */
    for (int c = 0; c < C; c++)
        for (size_t p = 0; p < HW; p++) out[(size_t)c * HW + p] = pe->md6_b[c];
    cs_gemm(C, (int)HW, c2, pe->md6_w, c2, b, (int)HW, 0, 1.0f, out, (int)HW, n_threads);
    free(a);
    free(b);
    return CELLSAM_OK;
}
