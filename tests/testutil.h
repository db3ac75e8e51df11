/* Shared test helpers: locating the reference folders, loading .npy references,
 * comparing arrays at a stated tolerance (and printing the error seen). */
#ifndef CELLSAM_TESTUTIL_H
#define CELLSAM_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <cmocka.h>

#include "npy.h"

/* $CELLSAM_TESTDATA, else the build's default (../shared/testdata/tiny). */
const char *tu_testdata(void);
/* $CELLSAM_DATA, else ../shared/data. */
const char *tu_datadir(void);
/* Path under the reference folder (static buffer rotated over 8 slots). */
const char *tu_path(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Load a reference array; fails the test if it is missing. */
void tu_load(cs_npy *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Deterministic test data: xorshift64 on *state, uniform in [lo, hi) (24 bits). */
float tu_urand(uint64_t *state, float lo, float hi);
/* n such values in a malloc'd buffer (asserted non-NULL). */
float *tu_rand_buf(uint64_t *state, size_t n, float lo, float hi);
/* max |a-b| over n, and fail (with a message) if it exceeds atol. NaN fails. */
double tu_check_close(const char *what, const float *got, const float *ref, size_t n, double atol);
/* Compare got (float32) with a loaded reference of the same element count. */
double tu_check_npy(const char *what, const float *got, size_t n, const cs_npy *ref, double atol);
/* Run a shell command (stdout+stderr captured into out), return its exit status;
 * a command killed by a signal fails the test. */
int tu_run(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Load the reference model (CKPT_NAME in the reference folder, with its config.json)
 * and a context; returns 0 on success. */
struct cellsam_model;
struct cellsam_context;
int tu_load_reference_model(const char *ckpt_name, struct cellsam_model **model, struct cellsam_context **ctx);
/* Path of the built CLI. */
const char *tu_cli(void);
/* Path of a file in the test's temporary directory (printf-formatted; static
 * buffer rotated over 8 slots). */
const char *tu_tmp(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Temporary directory for the test (created once). */
const char *tu_tmpdir(void);

#endif
