/* Error reporting: one thread-local message per thread, returned by cellsam_last_error(). */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common.h"

static _Thread_local char g_error[1024];

int cs_error(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return code;
}

int cs_error_prefix(int code, const char *fmt, ...) {
    char prefix[512];
    char old[sizeof g_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, g_error, sizeof old);
    /* Truncation of an over-long message is acceptable. */
    size_t n = strlen(prefix);
    if (n > sizeof g_error - 3) n = sizeof g_error - 3;
    memcpy(g_error, prefix, n);
    g_error[n] = ':';
    g_error[n + 1] = ' ';
    size_t rest = sizeof g_error - n - 3;
    size_t m = strnlen(old, rest);
    memcpy(g_error + n + 2, old, m);
    g_error[n + 2 + m] = '\0';
    return code;
}

void cs_error_clear(void) { g_error[0] = '\0'; }

void cs_worker_error_keep(cs_worker_error *e, int code) {
#pragma omp critical(cs_worker_error)
    if (!e->code) {
        e->code = code;
        snprintf(e->message, sizeof e->message, "%s", g_error);
    }
}

int cs_worker_error_raise(const cs_worker_error *e) { return e->code ? cs_error(e->code, "%s", e->message) : CELLSAM_OK; }

const char *cellsam_last_error(void) { return g_error[0] ? g_error : "no error"; }

const char *cellsam_status_string(int status) {
    switch (status) {
    case CELLSAM_OK: return "ok";
    case CELLSAM_ERR_IO: return "I/O error";
    case CELLSAM_ERR_FORMAT: return "malformed input";
    case CELLSAM_ERR_NOMEM: return "out of memory";
    case CELLSAM_ERR_INVALID: return "invalid argument";
    case CELLSAM_ERR_UNSUPPORTED: return "unsupported";
    case CELLSAM_ERR_LIMIT: return "size limit exceeded";
    case CELLSAM_ERR_MODEL: return "model mismatch";
    case CELLSAM_ERR_ABORTED: return "aborted";
    default: return "unknown error";
    }
}
