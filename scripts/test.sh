#!/usr/bin/env bash
# Build with warnings as errors and run every test (CTest). Reference data are read
# from ../shared (override with CELLSAM_TESTDATA / CELLSAM_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCELLSAM_WERROR=ON >/dev/null
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j"$(nproc)"
