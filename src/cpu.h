/* CPU features, detected once per process (see cpu.c). */
#ifndef CELLSAM_CPU_H
#define CELLSAM_CPU_H

void cs_cpu_init(void);
int cs_cpu_has_avx512(void);     /* AVX-512 F, CD, BW, DQ and VL */
int cs_cpu_has_avx512bf16(void); /* and the bfloat16 dot product (VDPBF16PS) */
int cs_cpu_has_avx512vnni(void); /* and the 8-bit dot product (VPDPBUSD) */
int cs_cpu_has_avx2(void);

#endif
