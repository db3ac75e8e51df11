/* Internal helpers shared by every part of the library: errors, checked sizes,
 * aligned allocation, temp-file-and-rename output. */
#ifndef CELLSAM_COMMON_H
#define CELLSAM_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "cellsam.h"

/* Record a one-line message for cellsam_last_error() and return `code`. */
int cs_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prefix the current message with context ("loading X: ..."), return `code`. */
int cs_error_prefix(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void cs_error_clear(void);
/* The first error met by the threads of a parallel region, carried to the thread that
 * started it: messages are per thread, so a worker's would otherwise be lost. */
typedef struct {
    int code;
    char message[1024]; /* as long as a thread's own message */
} cs_worker_error;
/* On a worker, after a call failed with `code` (its message set): keeps the first. */
void cs_worker_error_keep(cs_worker_error *e, int code);
/* On the starting thread: CELLSAM_OK, or the kept code with its message set again. */
int cs_worker_error_raise(const cs_worker_error *e);

/* Checked size arithmetic: return 0 and set *out, or return -1 on overflow. */
static inline int cs_mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}
static inline int cs_add_size(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return -1;
    *out = a + b;
    return 0;
}
/* Product of n dims with overflow and cap check (cap 0 = none). */
int cs_dims_product(const int64_t *dims, int n, size_t cap, size_t *out);

/* 64-byte aligned allocation; free with cs_free. Sizes are element count times
 * element size, multiplication checked. Returns NULL (and sets an error) on failure. */
void *cs_alloc(size_t n, size_t elem_size);
void *cs_calloc(size_t n, size_t elem_size);
void cs_free(void *p);
/* A caller's abort callback (may be NULL), polled between units of work:
 * CELLSAM_ERR_ABORTED with the error message set when it asks to stop, else 0. */
int cs_poll_abort(int (*abort)(void *user), void *user);

/* A set of float buffers, all or none: *bufs[i] gets count[i] floats. On failure the
 * ones already allocated are freed, every pointer is NULL, and the result is
 * CELLSAM_ERR_NOMEM. cs_free_floats frees a set and sets its pointers to NULL. */
int cs_alloc_floats(float **const *bufs, const size_t *count, size_t n);
void cs_free_floats(float **const *bufs, size_t n);

/* Output files are written to "<path>.tmp.<pid>" and renamed on success, so an
 * interrupted run never leaves a half-written result under the final name. */
typedef struct {
    FILE *f;
    char *final_path;
    char *tmp_path;
} cs_atomic_file;
int cs_atomic_open(cs_atomic_file *af, const char *path);
int cs_atomic_commit(cs_atomic_file *af); /* fclose + fsync-free rename; error if any write failed */
void cs_atomic_abort(cs_atomic_file *af); /* close and unlink the temporary */

/* Read a whole file (capped) into a malloc'd buffer. */
int cs_read_file(const char *path, size_t cap, unsigned char **data, size_t *size);

/* Half-precision conversions (round to nearest even). */
float cs_f16_to_f32(uint16_t h);
uint16_t cs_f32_to_f16(float f);
float cs_bf16_to_f32(uint16_t h);
uint16_t cs_f32_to_bf16(float f);

double cs_now_seconds(void);

#endif
