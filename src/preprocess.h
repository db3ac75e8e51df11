/* CellSAM image pre-processing, reproducing the official Python code bit for bit
 * where it can (spec §3.2 step 3, §3.3, §5.1):
 *
 *   raw image --cs_format_image_shape--> H x W x 3 (data in the last C channels)
 *             --cs_normalize_image-----> 3 x H x W float32 in [0,1]
 *                (per channel: 99.9-percentile clip, min-max, skimage CLAHE)
 *             --cs_prep_branches-------> SAM encoder input and CellFinder input,
 *                                        both 3 x 1024 x 1024 float32.
 *
 * All functions are thread-safe (no global state) and return CELLSAM_OK or a
 * CELLSAM_ERR_* code with a message for cellsam_last_error(). */
#ifndef CELLSAM_PREPROCESS_H
#define CELLSAM_PREPROCESS_H

#include <stddef.h>
#include <stdint.h>

#define CS_PREP_SIZE 1024                    /* network input side */
#define CS_PREP_MAX_SIDE (1 << 20)           /* cap on H and W */
#define CS_PREP_MAX_PIXELS ((size_t)1 << 28) /* cap on H*W */

/* numpy-style image (2-D (H,W) or 3-D with the channel axis = the smallest extent,
 * first one on ties, as np.argmin) -> malloc'd H*W*3 float32 array (HWC) with the C
 * input channels written to channels 3-C..2 and the others 0 (grey -> channel 2,
 * two channels -> 1,2). C > 3, ndim not 2 or 3, empty or oversized shapes ->
 * CELLSAM_ERR_INVALID / CELLSAM_ERR_LIMIT. Free *out_hw3 with cs_free. */
int cs_format_image_shape(const float *in, int ndim, const int64_t *shape, float **out_hw3, int *H,
                          int *W);

/* cellSAM.utils.normalize_image on a formatted H x W x 3 image: per channel the
 * 99.9-percentile clip of the non-zero values, then constant channel -> 0, else
 * min-max to [0,1] and skimage equalize_adapthist(kernel_size=128). Output float32
 * 3 x H x W (the tensor handed to the model). NaN or infinite pixels ->
 * CELLSAM_ERR_INVALID ("image contains NaN ..."): the official code would silently
 * produce NaN percentiles. Memory beyond the output: about 7 bytes per pixel. */
int cs_normalize_image(const float *hw3, int H, int W, float *out_chw);

/* numpy percentile (method 'linear', numpy 1.24 arithmetic) of the non-zero values
 * of v[0..n) (negative values count as non-zero), at pct in [0,100]. float32_data
 * selects the float32-array variant (the difference b-a is rounded to float32, as
 * numpy does for a float32 array) instead of the float64 one. Returns 1 and sets
 * *out, 0 when there are no non-zero values, or a negative CELLSAM_ERR_* code. */
int cs_percentile_nonzero(const float *v, size_t n, const double *pct, int n_pct, int float32_data,
                          double *out);

/* cellSAM.utils._percentile_threshold on one channel plane of n values: threshold
 * t = 99.9 percentile (float64) of the non-zero values; if out != NULL, out[i] =
 * (float)min(v[i], t) (values > t are set to t; the reference stores this as
 * float32). Returns 1 and sets *threshold, 0 for a blank channel (out = copy of v),
 * or a negative error code. */
int cs_percentile_clip(const float *v, size_t n, float *out, double *threshold);

/* skimage.exposure.equalize_adapthist(x, kernel_size=128, clip_limit=0.01,
 * nbins=256) for a float64 H x W image with values in [0,1] (skimage 0.19 code
 * path: uint16 rounding, 2^14 grey levels, 65-wide bins, reflect padding,
 * clip_histogram, float32 accumulation of the four corner maps, truncation, final
 * min-max in float64). out (H*W doubles) may equal x. Values outside [0,1] or NaN
 * -> CELLSAM_ERR_INVALID (skimage raises too). */
int cs_clahe(const double *x, int H, int W, double *out);

/* torchvision v2 Resize((Hout,Wout), antialias=True) of a C x Hin x Win float32
 * tensor, as PyTorch CPU computes it in float32 (separable, W pass then H pass
 * through a float32 temporary; triangle filter with support = scale when
 * downscaling, i.e. plain bilinear when upscaling), including the reference
 * build's order of rounding (bit-exact on unit_resize/ and all case maps). out
 * must not alias in. */
int cs_resize_bilinear_aa(const float *in, int C, int Hin, int Win, float *out, int Hout, int Wout);
/* The same with the horizontally resized temporary limited to about band_floats
 * floats (at least one band of filter taps); the result is identical for every
 * band size. cs_resize_bilinear_aa uses CS_RESIZE_BAND_FLOATS. */
#define CS_RESIZE_BAND_FLOATS ((size_t)16 << 20)
int cs_resize_bilinear_aa_band(const float *in, int C, int Hin, int Win, float *out, int Hout,
                               int Wout, size_t band_floats);

/* Intermediate maps of cs_prep_branches for tests and diagnostics; every pointer
 * may be NULL. Maps are 3 x 1024 x 1024 (CHW); det_u8 is CHW too (the reference
 * 15_ file is HWC). */
typedef struct {
    float *resized;      /* 10_: resize to 1024x1024 */
    float *sam_pct;      /* 11_: PercentileThreshold(0, 99.5) + rescale_intensity */
    float *sam_imagenet; /* 12_: ImageNet normalisation */
    float *sam_minmax;   /* 13_: kornia normalize_min_max */
    uint8_t *det_u8;     /* 15_: ToPILImage truncation to uint8 */
    float *det_norm;     /* 16_: SAM pixel normalisation then ImageNet normalisation */
    /* scalars, always filled */
    double p0, p99_5;   /* percentiles of the non-zero values (0 if none) */
    size_t n_nonzero;   /* non-zero values in the resized 3 x 1024 x 1024 map */
    int rescale_signed; /* 1 when p0 < 0 and rescale_intensity maps to (-1,1) */
    int torgb_copied_2_to_1, torgb_copied_1_to_2;
} cs_prep_trace;

/* From the normalised 3 x H x W image (cs_normalize_image), the two network
 * inputs, each 3 x 1024 x 1024 float32 (either pointer may be NULL to skip it):
 *  sam_in: resize -> PercentileThreshold(0,99.5) over all non-zero values of the
 *          3 x 1024 x 1024 map -> rescale_intensity -> ImageNet normalise -> kornia
 *          min-max (eps 1e-6) -> (x - mean/255)/(std/255);
 *  det_in: resize -> uint8 truncation of x*255 -> (q - mean)/std -> ImageNet
 *          normalise -> kornia min-max -> ToRGB.
 * The resize is done once (a copy when H = W = 1024). When the resized map has no
 * non-zero value the official code crashes; here the percentile step then yields
 * all zeros, so sam_in is the per-channel constant (0 - mean/255)/(std/255) and
 * det_in is all 0. Pixel values outside [0,1] make the uint8 cast saturate
 * (PyTorch wraps). trace may be NULL. */
int cs_prep_branches(const float *chw_norm, int H, int W, float *sam_in, float *det_in);
int cs_prep_branches_trace(const float *chw_norm, int H, int W, float *sam_in, float *det_in,
                           cs_prep_trace *trace);

#endif
