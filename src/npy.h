/* NumPy .npy arrays (format 1.0/2.0/3.0, little-endian, C order): the testdata and
 * Python users hand these around. */
#ifndef CELLSAM_NPY_H
#define CELLSAM_NPY_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    CS_NPY_U8, CS_NPY_I8, CS_NPY_U16, CS_NPY_I16, CS_NPY_U32, CS_NPY_I32,
    CS_NPY_U64, CS_NPY_I64, CS_NPY_F16, CS_NPY_F32, CS_NPY_F64, CS_NPY_BOOL
} cs_npy_dtype;

typedef struct {
    cs_npy_dtype dtype;
    int ndim;
    int64_t shape[8];
    size_t count;  /* number of elements */
    void *data;    /* malloc'd, native little-endian, C order */
} cs_npy;

#define CS_NPY_MAX_BYTES ((size_t)4 << 30)

int cs_npy_load(const char *path, cs_npy *out);
int cs_npy_parse(const unsigned char *buf, size_t size, cs_npy *out);
/* Header only: dtype, ndim, shape and count (data stays NULL) and where the data
 * starts; the data itself need not be present. */
int cs_npy_parse_header(const unsigned char *buf, size_t size, cs_npy *meta, size_t *data_offset);
void cs_npy_free(cs_npy *a);
/* Element i converted to double / float. */
double cs_npy_get(const cs_npy *a, size_t i);
/* Whole array converted to a new float32 buffer (malloc'd). */
float *cs_npy_to_f32(const cs_npy *a);
size_t cs_npy_dtype_size(cs_npy_dtype t);

/* Write arrays (atomic rename). */
int cs_npy_save(const char *path, cs_npy_dtype dtype, const void *data, int ndim,
                const int64_t *shape);
static inline int cs_npy_save_f32(const char *path, const float *data, int ndim,
                                  const int64_t *shape) {
    return cs_npy_save(path, CS_NPY_F32, data, ndim, shape);
}

#endif
