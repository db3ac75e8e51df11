/* Tiled whole-slide inference (official cellSAM segment_wsi, spec §3.6), streaming.
 *
 * The tiler knows nothing about the model: it is driven by three callbacks.
 *   read      returns an in-bounds region of the H x W x 3 float32 image (channels
 *             already in the official (blank, nuclear, whole-cell) slots);
 *   segment   labels one haloed tile (the official segment_cellular_image);
 *   write_rows receives the final label image, a band of rows at a time (streaming
 *             entry point only).
 *
 * Algorithm (identical results to the official dask code):
 *  1. chunks per axis: (B, B, ..., N mod B), then dask ensure_minimum_chunksize(d);
 *  2. the tile of chunk [s, e) is [s-d, e+d) with periodic wrap at the image
 *     borders (or mirror, opt-in);
 *  3. tiles in row-major order; a tile whose segmenter fails is all zeros;
 *  4. offsets: n = max label of the tile; T = n (first) or T + n; labels += T;
 *     T += n  (so the final T is 2 * sum(n));
 *  5. faces of width 4 * iou_depth centred on every internal tile boundary, split
 *     into the halves seen by the two tiles; IoU = inter / (area_a + area_b - inter)
 *     with areas counted in the halves; IoU >= link_iou with both labels non-zero
 *     is an edge;
 *  6. connected components over nodes 0..T numbered like scipy (in order of the
 *     smallest member; unused ids are singletons and consume numbers);
 *  7. output = the core [s, e) of every tile, relabelled.
 * With a single tile there is no linking and the labels keep their offset (n+1..2n).
 *
 * Memory: one tile, one tile row of core labels, the linking strips (a band of
 * 2 * iou_depth rows over the width) and the link graph (proportional to the number
 * of linked labels). The streaming entry point keeps the raw core labels in an
 * unlinked temporary file in $TMPDIR (4 bytes per pixel on disk). */
#ifndef CELLSAM_TILING_H
#define CELLSAM_TILING_H

#include <stddef.h>
#include <stdint.h>

/* Region source: fill out_hw3 (h rows x w columns x 3 channels, interleaved) with
 * image pixels [y0, y0+h) x [x0, x0+w); always in bounds. Return 0, or non-zero on
 * error (fatal: the tiler stops and returns CELLSAM_ERR_IO, or the callback's code
 * if it is a CELLSAM_ERR_* value). */
typedef int (*cs_region_read_fn)(void *user, int x0, int y0, int w, int h, float *out_hw3);

/* Tile segmenter: label the th x tw x 3 tile into labels_out (th x tw, 0 =
 * background, cells 1..n). Return 0, or non-zero to mark the tile as failed: the
 * tile is then all zeros (the official behaviour) and counted in stats.n_failed.
 * Like the official code (mask.max()), the tiler uses the largest label present as
 * n; *n_labels is informational. labels_out is zeroed before the call. */
typedef int (*cs_tile_segment_fn)(void *user, const float *tile_hw3, int th, int tw,
                                  uint32_t *labels_out, int *n_labels);

/* Label sink: rows [y0, y0 + n_rows) of the final W-wide label image, delivered in
 * order, top to bottom. Return 0, or non-zero (fatal, as for read). */
typedef int (*cs_rows_write_fn)(void *user, int y0, int n_rows, const uint32_t *rows);

enum { CS_HALO_PERIODIC = 0, CS_HALO_MIRROR = 1 };

typedef struct {
    int block_size;       /* 400: tile core size before chunk rebalancing */
    int overlap;          /* 56: halo d on every side */
    int iou_depth;        /* 56: half-width of the linking band; 0..overlap */
    double link_iou;      /* 0.5: IoU >= this merges two labels across a boundary */
    int halo_mode;        /* CS_HALO_PERIODIC (official) or CS_HALO_MIRROR (dask
                           * 'reflect': -1 -> 0, -2 -> 1, N -> N-1) */
    int minmax_normalize; /* 1: first pass over the image through read() computes the
                           * per-channel min/max, and every region read is mapped
                           * x -> (x-min)/(max-min) (float32) where max-min != 0, as
                           * cellsam_pipeline does; 0 (default): the caller did it */
    void (*progress)(int done, int total, void *user); /* after each tile; may be NULL */
    void *progress_user;  /* passed to progress and abort */
    /* polled before each tile; non-zero ends the run with CELLSAM_ERR_ABORTED, as does a
     * segmenter returning CELLSAM_ERR_ABORTED (any other error only fails its tile).
     * May be NULL. */
    int (*abort)(void *user);
    /* Optional, after each tile's offset is applied: its raw labels are
     * offset+1 .. offset+n_labels (n = its max label; 0 if it failed). With
     * raw_to_final (cs_tiled_segment_mem_ex) this carries per-label data such as
     * detector scores to the final ids. */
    void (*on_tile)(void *user, int tile_index, uint32_t offset, uint32_t n_labels, int failed);
    void *on_tile_user;
} cs_tile_params;

typedef struct {
    int n_tiles, tiles_y, tiles_x;
    int n_failed;           /* tiles whose segmenter returned an error (zeros there) */
    uint32_t max_label;     /* largest id in the output (ids are not contiguous) */
    uint32_t total;         /* T: 2 * sum over tiles of the tile's max label */
    size_t n_edges;         /* links kept between labels of neighbouring tiles */
    size_t peak_bytes;      /* peak heap memory held by the tiler (the output of the
                             * in-memory entry point not included) */
    float ch_min[3], ch_max[3]; /* per-channel min/max when minmax_normalize */
} cs_tile_stats;

cs_tile_params cs_tile_default_params(void);

/* In-memory entry point: *labels_out = malloc'd H x W label image (free with free()
 * or cellsam_free). stats may be NULL. */
int cs_tiled_segment_mem(int height, int width, cs_region_read_fn read, void *read_user,
                         cs_tile_segment_fn segment, void *segment_user,
                         const cs_tile_params *params, uint32_t **labels_out,
                         cs_tile_stats *stats);

/* As cs_tiled_segment_mem, and if raw_to_final is non-NULL a malloc'd table of
 * stats.total + 1 entries: final id of every raw (offset) label 0..T; a raw label
 * seen only in halos maps to an id that may not appear in the output. */
int cs_tiled_segment_mem_ex(int height, int width, cs_region_read_fn read, void *read_user,
                            cs_tile_segment_fn segment, void *segment_user,
                            const cs_tile_params *params, uint32_t **labels_out,
                            uint32_t **raw_to_final, cs_tile_stats *stats);

/* Streaming entry point: memory bounded by one tile row; raw core labels go to an
 * unlinked temporary file in $TMPDIR (default /tmp); the final rows go to
 * write_rows in order. stats may be NULL. */
int cs_tiled_segment_stream(int height, int width, cs_region_read_fn read, void *read_user,
                            cs_tile_segment_fn segment, void *segment_user,
                            cs_rows_write_fn write_rows, void *write_user,
                            const cs_tile_params *params, cs_tile_stats *stats);

/* Chunks along one axis of length n: (block, ..., n mod block) then dask's
 * ensure_minimum_chunksize(depth). Writes up to max_out sizes to out (may be NULL)
 * and returns the number of chunks, or -1 for invalid arguments. When n < depth
 * (dask raises there) the result is the single chunk (n). */
int cs_chunks(int n, int block, int depth, int *out, int max_out);

/* Read the extended-coordinate region [y0, y0+h) x [x0, x0+w) of an H x W image
 * through read(), wrapping (periodic) or mirroring out-of-bounds coordinates as
 * many times as needed, into out (h x w x 3). If ch_min/ch_max are non-NULL the
 * pipeline min-max is applied. Exposed for tests. */
int cs_tile_read_region(cs_region_read_fn read, void *user, int height, int width, int y0,
                        int x0, int h, int w, int halo_mode, const float *ch_min,
                        const float *ch_max, float *out);

/* First pass of the pipeline min-max: per-channel min and max of the whole image
 * through read() (strips of rows; numpy semantics: a NaN makes min and max NaN). */
int cs_tile_channel_minmax(cs_region_read_fn read, void *user, int height, int width,
                           float ch_min[3], float ch_max[3]);

/* The same on an image in memory (n_pixels x 3 interleaved). */
void cs_tile_channel_minmax_hw3(const float *hw3, size_t n_pixels, float ch_min[3], float ch_max[3]);

/* The official rule on n pixels of an interleaved x3 buffer, in place. */
void cs_tile_apply_minmax(float *hw3, size_t n_pixels, const float ch_min[3],
                          const float ch_max[3]);

#endif
