/* Image input and output for the CLI and the server: microscopy files in, label
 * images and overlays out.
 *
 * Readers pick the format by magic bytes (never by extension): TIFF (incl. BigTIFF,
 * multi-page, OME-TIFF, ImageJ hyperstacks), PNG, JPEG and NumPy .npy. Every
 * reader is meant to survive hostile files: sizes are checked against
 * cs_image_limits before any allocation, codec errors become CELLSAM_ERR_* codes
 * with a one-line message (cellsam_last_error()), nothing is printed.
 *
 * Pixel values are the file's raw sample values converted to float (no scaling,
 * no photometric inversion, TIFF orientation ignored, like tifffile). Integers
 * above 2^24 (32/64-bit samples) lose precision in float.
 *
 * Channels, per format:
 *   TIFF  samples per pixel become channels (an alpha sample of an RGB image is
 *         dropped); pages of equal size with one sample each become channels
 *         (at most CS_IMAGE_MAX_CHANNELS); pages of a different size or type
 *         than the first (thumbnails, pyramids) are ignored. OME-TIFF: the first
 *         series' SizeC channels at Z=0, T=0. ImageJ: its "channels=" pages.
 *         Palette images give the index values.
 *   PNG   grey and grey+alpha -> 1 channel, RGB and RGBA -> 3 (alpha dropped),
 *         palette -> expanded to RGB (3), 1/2/4-bit grey -> raw values 0..2^b-1.
 *   JPEG  grey -> 1, colour -> RGB (3), CMYK -> 4.
 *   .npy  (H,W) -> 1 channel; (H,W,C), (C,H,W): the smallest axis is the
 *         channel axis (numpy argmin, like the official format_image_shape).
 */
#ifndef CELLSAM_IMAGE_IO_H
#define CELLSAM_IMAGE_IO_H

#include <stddef.h>
#include <stdint.h>

#define CS_IMAGE_MAX_CHANNELS 16

typedef struct {
    int width, height, channels;
    float *data;  /* height * width * channels floats, HWC interleaved */
    int bits;     /* bits per sample in the file: 1..64 */
    int is_float; /* the file's samples were floating point */
} cs_image;

void cs_image_free(cs_image *img);

/* Checked before allocating anything. Process-wide; set once at start-up. */
typedef struct {
    int max_dim;            /* width and height each at most this (default 200000) */
    uint64_t max_samples;   /* width * height * channels at most this (default 4 Gi) */
    size_t max_codec_alloc; /* largest single allocation inside libtiff, libjpeg's memory
                               budget, and the largest TIFF tile or scanline (default 1 GiB) */
} cs_image_limits;

cs_image_limits cs_image_default_limits(void);
cs_image_limits cs_image_get_limits(void);
void cs_image_set_limits(const cs_image_limits *limits); /* NULL restores the defaults */

/* Whole image from a file or from memory (name_hint is only used in messages). */
int cs_image_read(const char *path, cs_image *out);
int cs_image_decode(const unsigned char *buf, size_t size, const char *name_hint, cs_image *out);
/* Size and channel count from the header only (pixel data is not decoded; a JPEG
 * is read into memory but not decoded). */
int cs_image_probe(const char *path, int *width, int *height, int *channels);

/* Region reading. For TIFF only the strips or tiles that touch the region are
 * decoded, so a large slide can be processed tile by tile in bounded memory;
 * other formats are decoded once at open and cropped. */
typedef struct cs_image_reader cs_image_reader;
typedef struct {
    int width, height, channels, bits, is_float;
    int pages;          /* TIFF pages read as channels (1 otherwise) */
    const char *format; /* "tiff", "ome-tiff", "png", "jpeg", "npy" */
} cs_image_info;

int cs_image_reader_open(const char *path, cs_image_reader **out);
/* buf must stay valid until cs_image_reader_close. */
int cs_image_reader_open_memory(const unsigned char *buf, size_t size, const char *name_hint,
                                cs_image_reader **out);
void cs_image_reader_info(const cs_image_reader *r, cs_image_info *info);
/* x, y, w, h must lie inside the image. */
int cs_image_reader_read_region(cs_image_reader *r, int x, int y, int w, int h, cs_image *out);
/* The whole image. A format decoded at open hands its buffer over instead of copying it,
 * so read nothing more from the reader afterwards: close it. */
int cs_image_reader_read_all(cs_image_reader *r, cs_image *out);
void cs_image_reader_close(cs_image_reader *r);
int cs_image_read_region(const char *path, int x, int y, int w, int h, cs_image *out);

/* Label images, format by extension (case-insensitive):
 *   .png          16-bit grey (error if a label exceeds 65535: use .tif)
 *   .tif / .tiff  16-bit unsigned, or 32-bit when a label exceeds 65535; deflate
 *   .npy          int32 (uint32 if a label exceeds INT32_MAX), shape (H, W)
 * Written to a temporary name and renamed, so a failed or interrupted write never
 * leaves a partial file under `path`. */
int cs_write_labels(const char *path, const uint32_t *labels, int width, int height);

/* Read a label image exactly, as 32-bit unsigned ids (src/label_read.c): grey PNG (8/16
 * bit), single-sample integer TIFF (first page), or an .npy of integers (H, W); the format
 * by signature. *labels (width x height) is the caller's to free. */
int cs_read_labels(const char *path, uint32_t **labels, int *width, int *height);

/* Streaming label writer (src/label_stream.c): rows in order, temp file renamed on
 * close. .tif is 32-bit unsigned, .png 16-bit (a label over 65535 is an error),
 * .npy uint32. */
typedef struct cs_label_stream cs_label_stream;
int cs_label_stream_open(const char *path, int width, int height, cs_label_stream **out);
int cs_label_stream_write(cs_label_stream *s, const uint32_t *rows, int n_rows);
int cs_label_stream_close(cs_label_stream *s); /* commits (rename) */
void cs_label_stream_abort(cs_label_stream *s);

/* 8-bit RGB PNG: the image contrast-stretched between its 0.5 and 99.5 percentiles
 * (finite values), with 1-pixel label outlines in distinct colours. channel >= 0
 * (0-based) shows that channel in grey; -1: 1 channel grey, 2 channels as a
 * green (first) / magenta (second) composite, 3 or more channels as RGB of the first
 * three (one joint stretch, keeping colour balance). labels: width * height or NULL. */
int cs_write_overlay_png(const char *path, const cs_image *img, int channel, const uint32_t *labels);

/* Model input (H,W,3) float in the official channel order: slot 0 blank, slot 1
 * nuclear, slot 2 whole-cell. Channel numbers are 1-based, 0 = none (like Cellpose
 * --chan/--chan2).
 *
 * mode CS_CHANNELS_OFFICIAL:
 *   nuclear = cell = 0: what format_image_shape does with the array as is:
 *       1 channel  -> (0, 0, c1)          grey goes to the whole-cell slot
 *       2 channels -> (0, c1, c2)         first = nuclear, second = whole-cell
 *       3 channels -> (c1, c2, c3)        unchanged (RGB: red lands in the blank slot)
 *       more       -> error: choose channels
 *   otherwise -> (0, c[nuclear] or 0, c[cell] or 0); a nuclear-only input becomes
 *       (0, N, N) later in preprocessing (the official ToRGB step).
 * mode CS_CHANNELS_GREY: the mean over all channels -> (0, 0, mean); nuclear and
 *   cell must be 0 (e.g. for RGB brightfield or H&E).
 * *hw3 is allocated (free with free()). */
enum { CS_CHANNELS_OFFICIAL = 0, CS_CHANNELS_GREY = 1 };
int cs_image_to_model_input(const cs_image *img, int nuclear_channel, int cell_channel, int mode,
                            float **hw3);

#endif
