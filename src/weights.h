/* Tensor store: the named tensors of a checkpoint, from either format.
 *  - safetensors: memory-mapped, zero-copy (weights_safetensors.c)
 *  - PyTorch .pt (zip + pickle): stored zip entries are memory-mapped and
 *    contiguous tensors point into the map; strided views are copied (weights_pt.c)
 * The store owns the map and any copies; entries stay valid until cs_weights_free. */
#ifndef CELLSAM_WEIGHTS_H
#define CELLSAM_WEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#define CS_MAX_DIMS 8
/* Largest checkpoint accepted (the official one is ~1.2 GB in f32). */
#define CS_MAX_CHECKPOINT_BYTES ((size_t)16 << 30)
#define CS_MAX_TENSORS 100000

typedef enum { CS_DTYPE_F32 = 0, CS_DTYPE_F16 = 1, CS_DTYPE_BF16 = 2 } cs_dtype;

typedef struct {
    char *name;
    cs_dtype dtype;
    int ndim;
    int64_t shape[CS_MAX_DIMS];
    const void *data; /* contiguous, row-major, little-endian; may be unaligned */
    size_t nbytes;    /* = product(shape) * dtype size */
} cs_tensor_entry;

typedef struct cs_weights cs_weights;

size_t cs_dtype_size(cs_dtype t);
/* The entry's values as float32 (dst holds nbytes / dtype size of them); the data may be
 * unaligned. */
void cs_tensor_to_f32(const cs_tensor_entry *e, float *dst);
const char *cs_dtype_name(cs_dtype t);

/* Open a checkpoint; the format is chosen from the file's first bytes (zip magic
 * "PK\3\4" = PyTorch, otherwise safetensors). On failure returns a CELLSAM_ERR_*
 * code with a message naming the file and the problem. */
int cs_weights_open(const char *path, cs_weights **out);
int cs_weights_open_safetensors(const char *path, cs_weights **out);
int cs_weights_open_pt(const char *path, cs_weights **out);
/* Parse from memory (used by the fuzzers); `data` must outlive the store. */
int cs_weights_parse_safetensors(const unsigned char *data, size_t size, cs_weights **out);
int cs_weights_parse_pt(const unsigned char *data, size_t size, cs_weights **out);
void cs_weights_free(cs_weights *w);
/* Hand back to the kernel the whole pages of [p, p+bytes) when they lie in the file
 * mapping (for tensors that were copied and will not be read again). */
void cs_weights_drop_pages(const cs_weights *w, const void *p, size_t bytes);

size_t cs_weights_count(const cs_weights *w);
const cs_tensor_entry *cs_weights_at(const cs_weights *w, size_t i);
const cs_tensor_entry *cs_weights_find(const cs_weights *w, const char *name);
/* Size along `axis` of the tensor named prefix+name (prefix may be NULL), or -1 when the
 * tensor is absent or has fewer axes: how loaders infer an architecture from shapes. */
int64_t cs_weights_dim(const cs_weights *w, const char *prefix, const char *name, int axis);
const char *cs_weights_format(const cs_weights *w); /* "safetensors" or "pytorch" */

/* Write a safetensors file (atomic rename) with every tensor converted to `dtype`,
 * in the store's order. */
int cs_weights_save_safetensors(const cs_weights *w, const char *path, cs_dtype dtype);

/* String metadata (safetensors "__metadata__"): read from a file, written by
 * cs_weights_save_safetensors. get returns NULL when absent. cellsam stores the
 * attention head counts there ("cellsam.vit_heads", ...), which shapes cannot tell. */
int cs_weights_set_meta(cs_weights *w, const char *key, const char *value);
const char *cs_weights_get_meta(const cs_weights *w, const char *key);
/* Every metadata entry of src set on dst (dst's own entries of other keys stay). */
int cs_weights_copy_meta(cs_weights *dst, const cs_weights *src);

/* ---- building a store (used by both loaders) ---- */
cs_weights *cs_weights_new(const char *format);
/* Add an entry that points at external memory (the mmap). Name is copied. */
int cs_weights_add_view(cs_weights *w, const char *name, cs_dtype dtype, int ndim,
                        const int64_t *shape, const void *data, size_t nbytes);
/* Add an entry whose data the store owns (takes ownership of `owned`, freed with free()). */
int cs_weights_add_owned(cs_weights *w, const char *name, cs_dtype dtype, int ndim,
                         const int64_t *shape, void *owned, size_t nbytes);
/* Hand the store a memory map to unmap on free. */
void cs_weights_set_mapping(cs_weights *w, void *addr, size_t len);
/* Build the name index (call once after all adds); fails on duplicate names. */
int cs_weights_finish(cs_weights *w);

#endif
