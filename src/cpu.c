/* CPU features and a description of the arithmetic in use.
 *
 * The BLAS picks its own kernels (OpenBLAS: for the CPU it detects, or as
 * OPENBLAS_CORETYPE says); the bench and `cellsam --version` name them, because
 * every throughput figure depends on them. Our own bfloat16 kernel (gemm_bf16.c)
 * is chosen here, at run time, from the CPU's features.
 */
#include <cblas.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cellsam.h"
#include "cpu.h"
#include "gemm_int8.h"

static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;
static int has_avx2, has_avx512, has_avx512bf16, has_avx512vnni;
static char system_info[320];

static void cpu_detect(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("avx512vl");
    has_avx512bf16 = has_avx512 && __builtin_cpu_supports("avx512bf16");
    has_avx512vnni = has_avx512 && __builtin_cpu_supports("avx512vnni");
    has_avx2 = __builtin_cpu_supports("avx2");
#endif
    const char *core = openblas_get_corename();
    const char *forced = getenv("OPENBLAS_CORETYPE");
    char why[96] = "";
    if (forced && *forced) snprintf(why, sizeof why, " (OPENBLAS_CORETYPE=%.48s)", forced);
    snprintf(system_info, sizeof system_info, "OpenBLAS %s kernels%s; AVX-512 %s; AVX512-BF16 %s",
             core ? core : "unknown", why, has_avx512 ? "yes" : "no",
             has_avx512bf16 ? "yes" : "no (--precision bf16 is emulated, slower than f32)");
}

void cs_cpu_init(void) { pthread_once(&cpu_once, cpu_detect); }

int cs_cpu_has_avx512(void) {
    cs_cpu_init();
    return has_avx512;
}

int cs_cpu_has_avx512bf16(void) {
    cs_cpu_init();
    return has_avx512bf16;
}

int cs_cpu_has_avx2(void) {
    cs_cpu_init();
    return has_avx2;
}

int cs_cpu_has_avx512vnni(void) {
    cs_cpu_init();
    return has_avx512vnni;
}

int cellsam_has_native_bf16(void) { return cs_cpu_has_avx512bf16(); }

/* The int8 kernel is picked in gemm_int8.c (from these features and
 * CELLSAM_INT8_KERNEL); its name joins the description once, on first request. */
static pthread_once_t info_once = PTHREAD_ONCE_INIT;

static void describe_int8(void) {
    const char *forced = getenv("CELLSAM_INT8_KERNEL");
    size_t n = strlen(system_info);
    snprintf(system_info + n, sizeof system_info - n, "; int8 kernel %s%s%.32s%s",
             cs_int8_kernel_name(cs_int8_best_kernel()), forced && *forced ? " (CELLSAM_INT8_KERNEL=" : "",
             forced && *forced ? forced : "", forced && *forced ? ")" : "");
}

const char *cellsam_system_info(void) {
    cs_cpu_init();
    pthread_once(&info_once, describe_int8);
    return system_info;
}
