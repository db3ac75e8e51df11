/* PyTorch checkpoint writer (the zip + pickle layout torch.save uses, so the
 * files load with torch.load), and reader options for tests and fuzzers.
 *
 * Two levels:
 *  - cs_weights_save_pt: a whole tensor store as one state dict;
 *  - cs_pt_writer: storages and tensors one by one, so a tensor can be a view
 *    (offset, strides) of a shared storage and large files can be streamed. */
#ifndef CELLSAM_WEIGHTS_PT_WRITE_H
#define CELLSAM_WEIGHTS_PT_WRITE_H

#include <stddef.h>
#include <stdint.h>

#include "weights.h"

/* Write `w` as a .pt file (atomic rename) with every tensor converted to `dtype`,
 * one storage per tensor, in the store's order. nest_state_dict != 0 wraps the
 * state dict as {"epoch": 1, "state_dict": ..., "arch": "cellsam"}. */
int cs_weights_save_pt(const cs_weights *w, const char *path, cs_dtype dtype, int nest_state_dict);

typedef struct cs_pt_writer cs_pt_writer;

/* Start a .pt file; `prefix` is the archive's top folder (NULL: "archive").
 * compress != 0 deflates every entry (torch never does; used to test the reader). */
int cs_pt_writer_open(cs_pt_writer **out, const char *path, const char *prefix, int compress);

/* Storage type name for a dtype: "FloatStorage", "HalfStorage", "BFloat16Storage". */
const char *cs_pt_storage_type(cs_dtype dtype);

/* Stream one storage: begin, write exactly numel * elem_size bytes (any number of
 * calls), end. `torch_type` is the class name in module torch ("FloatStorage",
 * or any other, e.g. "DoubleStorage", to make files the reader must refuse).
 * *id receives the storage number for cs_pt_writer_add_tensor. */
int cs_pt_writer_begin_storage(cs_pt_writer *pw, const char *torch_type, size_t elem_size,
                               size_t numel, int *id);
int cs_pt_writer_write(cs_pt_writer *pw, const void *data, size_t nbytes);
int cs_pt_writer_end_storage(cs_pt_writer *pw);
/* begin + write + end for data in memory (little-endian values of `dtype`). */
int cs_pt_writer_add_storage(cs_pt_writer *pw, cs_dtype dtype, const void *data, size_t numel,
                             int *id);

/* A tensor (state-dict entry, in call order) viewing storage `storage_id` from
 * element `offset` with `shape` and `stride` (element strides; NULL = contiguous
 * row-major). Nothing is checked against the storage, so broken files can be made. */
int cs_pt_writer_add_tensor(cs_pt_writer *pw, const char *name, int storage_id, int64_t offset,
                            int ndim, const int64_t *shape, const int64_t *stride);

/* Wrap the state dict as {"epoch": 1, "state_dict": ..., "arch": "cellsam"}. */
void cs_pt_writer_set_nested(cs_pt_writer *pw, int nested);
/* Use these bytes as data.pkl instead of the generated pickle (tests). */
int cs_pt_writer_set_pickle(cs_pt_writer *pw, const void *pickle, size_t len);
/* Add "<prefix>/<name>" with the given bytes (e.g. "byteorder"). The writer adds
 * "version" and "byteorder" ("little") itself unless given here. */
int cs_pt_writer_add_file(cs_pt_writer *pw, const char *name, const void *data, size_t len);

/* Write data.pkl and the zip directory, then rename into place. Frees pw. */
int cs_pt_writer_close(cs_pt_writer *pw);
/* Drop the partial file. Frees pw. */
void cs_pt_writer_abort(cs_pt_writer *pw);

/* ---- reader options (tests and fuzzers; cs_weights_parse_pt uses the defaults) ---- */
enum {
    /* Skip the CRC-32 check of data.pkl and deflated entries, so that a fuzzer's
     * mutations reach the unpickler instead of failing the checksum. */
    CS_PT_NO_CRC = 1u << 0
};
typedef struct {
    unsigned flags;
    /* Cap on memory the reader allocates for inflated entries and strided copies
     * (0: default, 8 x the file size clamped to [1 GiB, CS_MAX_CHECKPOINT_BYTES]). */
    size_t max_owned_bytes;
} cs_pt_options;

int cs_weights_parse_pt_ex(const unsigned char *data, size_t size, const cs_pt_options *opts,
                           cs_weights **out);

#endif
