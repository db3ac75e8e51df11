/* Allocation, checked sizes, atomic output files, half-precision conversion. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

int cs_dims_product(const int64_t *dims, int n, size_t cap, size_t *out) {
    size_t total = 1;
    for (int i = 0; i < n; i++) {
        if (dims[i] < 0) return -1;
        if (cs_mul_size(total, (size_t)dims[i], &total)) return -1;
    }
    if (cap && total > cap) return -1;
    *out = total;
    return 0;
}

void *cs_alloc(size_t n, size_t elem_size) {
    size_t bytes;
    if (cs_mul_size(n, elem_size, &bytes)) {
        cs_error(CELLSAM_ERR_LIMIT, "allocation of %zu x %zu bytes overflows", n, elem_size);
        return NULL;
    }
    if (bytes == 0) bytes = 64;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded < bytes) {
        cs_error(CELLSAM_ERR_LIMIT, "allocation too large");
        return NULL;
    }
    void *p = aligned_alloc(64, rounded);
    if (!p) cs_error(CELLSAM_ERR_NOMEM, "out of memory allocating %zu bytes", bytes);
    return p;
}

void *cs_calloc(size_t n, size_t elem_size) {
    void *p = cs_alloc(n, elem_size);
    if (p) memset(p, 0, n * elem_size);
    return p;
}

void cs_free(void *p) { free(p); }

int cs_poll_abort(int (*abort)(void *user), void *user) {
    if (abort && abort(user)) return cs_error(CELLSAM_ERR_ABORTED, "segmentation aborted");
    return 0;
}

void cs_free_floats(float **const *bufs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(*bufs[i]);
        *bufs[i] = NULL;
    }
}

int cs_alloc_floats(float **const *bufs, const size_t *count, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!(*bufs[i] = cs_alloc(count[i], sizeof(float)))) {
            cs_free_floats(bufs, i);
            for (size_t j = i; j < n; j++) *bufs[j] = NULL;
            return CELLSAM_ERR_NOMEM;
        }
    return CELLSAM_OK;
}

void cellsam_free(void *p) { free(p); }

int cs_atomic_open(cs_atomic_file *af, const char *path) {
    memset(af, 0, sizeof *af);
    size_t n = strlen(path);
    af->final_path = malloc(n + 1);
    af->tmp_path = malloc(n + 32);
    if (!af->final_path || !af->tmp_path) {
        free(af->final_path);
        free(af->tmp_path);
        memset(af, 0, sizeof *af);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory");
    }
    memcpy(af->final_path, path, n + 1);
    snprintf(af->tmp_path, n + 32, "%s.tmp.%ld", path, (long)getpid());
    af->f = fopen(af->tmp_path, "wb");
    if (!af->f) {
        int e = errno;
        free(af->final_path);
        free(af->tmp_path);
        memset(af, 0, sizeof *af);
        return cs_error(CELLSAM_ERR_IO, "cannot create %s: %s", path, strerror(e));
    }
    return CELLSAM_OK;
}

int cs_atomic_commit(cs_atomic_file *af) {
    int rc = CELLSAM_OK;
    if (!af->f) return cs_error(CELLSAM_ERR_IO, "output file not open");
    int bad = ferror(af->f);
    if (fclose(af->f) != 0) bad = 1;
    af->f = NULL;
    if (bad) {
        rc = cs_error(CELLSAM_ERR_IO, "write to %s failed: %s", af->final_path, strerror(errno));
        unlink(af->tmp_path);
    } else if (rename(af->tmp_path, af->final_path) != 0) {
        rc = cs_error(CELLSAM_ERR_IO, "cannot rename to %s: %s", af->final_path, strerror(errno));
        unlink(af->tmp_path);
    }
    free(af->final_path);
    free(af->tmp_path);
    memset(af, 0, sizeof *af);
    return rc;
}

void cs_atomic_abort(cs_atomic_file *af) {
    if (af->f) fclose(af->f);
    if (af->tmp_path) unlink(af->tmp_path);
    free(af->final_path);
    free(af->tmp_path);
    memset(af, 0, sizeof *af);
}

int cs_read_file(const char *path, size_t cap, unsigned char **data, size_t *size) {
    *data = NULL;
    *size = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return cs_error(CELLSAM_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return cs_error(CELLSAM_ERR_IO, "%s is not a regular file", path);
    }
    if (cap && (uint64_t)st.st_size > cap) {
        fclose(f);
        return cs_error(CELLSAM_ERR_LIMIT, "%s is %lld bytes, over the limit of %zu", path,
                        (long long)st.st_size, cap);
    }
    size_t n = (size_t)st.st_size;
    unsigned char *buf = malloc(n ? n : 1);
    if (!buf) {
        fclose(f);
        return cs_error(CELLSAM_ERR_NOMEM, "out of memory reading %s", path);
    }
    if (n && fread(buf, 1, n, f) != n) {
        free(buf);
        fclose(f);
        return cs_error(CELLSAM_ERR_IO, "short read on %s", path);
    }
    fclose(f);
    *data = buf;
    *size = n;
    return CELLSAM_OK;
}

float cs_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3ff;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t cs_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t exp = (x >> 23) & 0xff;
    uint32_t mant = x & 0x7fffff;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000;
        int shift = 14 - e;
        uint32_t half = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = (uint32_t)(e << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++; /* may carry into exponent: correct */
    return (uint16_t)(sign | half);
}

float cs_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t cs_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40); /* quiet NaN */
    uint32_t lsb = (x >> 16) & 1;
    x += 0x7fff + lsb;
    return (uint16_t)(x >> 16);
}

double cs_now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
