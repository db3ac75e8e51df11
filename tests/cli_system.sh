#!/bin/sh
# `cellsam --version` describes the arithmetic in use (src/cpu.c): the BLAS kernels
# (as OPENBLAS_CORETYPE sets them, when set) and the CPU features that pick our own
# kernels, consistent with /proc/cpuinfo.
# usage: sh cli_system.sh CELLSAM_BINARY
CLI=$1
fail() {
    echo "cli_system: FAIL: $*"
    exit 1
}
out=$(OPENBLAS_CORETYPE=Haswell "$CLI" --version) || fail "--version exited non-zero"
echo "$out"
echo "$out" | head -1 | grep -q '^cellsam [0-9]' || fail "first line is not the version"
echo "$out" | grep -q "OpenBLAS Haswell kernels (OPENBLAS_CORETYPE=Haswell)" ||
    fail "the kernels OPENBLAS_CORETYPE selects are not named"
out=$(env -u OPENBLAS_CORETYPE "$CLI" --version | tail -1)
echo "$out"
echo "$out" | grep -q "OPENBLAS_CORETYPE" && fail "OPENBLAS_CORETYPE named though unset"
if grep -qw avx512_bf16 /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo; then
    echo "$out" | grep -q "AVX512-BF16 yes" || fail "/proc/cpuinfo has avx512_bf16, not reported"
else
    echo "$out" | grep -q "AVX512-BF16 no" || fail "AVX512-BF16 reported, /proc/cpuinfo lacks it"
fi
# the int8 kernel follows the CPU (VNNI, else AVX2, else portable) unless CELLSAM_INT8_KERNEL holds it back
if grep -qw avx512_vnni /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo; then want=AVX512-VNNI
elif grep -qw avx2 /proc/cpuinfo; then want=AVX2
else want=portable; fi
echo "$out" | grep -q "int8 kernel $want\(;\|\$\)" || fail "int8 kernel: expected $want"
out=$(CELLSAM_INT8_KERNEL=portable "$CLI" --version | tail -1)
echo "$out" | grep -q "int8 kernel portable (CELLSAM_INT8_KERNEL=portable)" || fail "CELLSAM_INT8_KERNEL=portable not reported"
echo "cli_system: OK"
