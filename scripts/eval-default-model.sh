#!/bin/sh
# Score a model (default: the bundled models/cellsam-small.safetensors) on every
# folder of the shared evaluation data, as models/README.md reports it.
# usage: scripts/eval-default-model.sh [CELLSAM_BINARY] [DATA_DIR] [MODEL]
# Extra segment options go in $CELLSAM_SEGMENT_ARGS (e.g. "--precision bf16").
# CELLSAM_TRUE_BOXES=1 scores the mask branch alone: each image is prompted with the
# bounding boxes of its true labels (segment --boxes-from) instead of CellFinder's.
set -e
SRC=$(cd "$(dirname "$0")/.." && pwd)
CLI=${1:-$SRC/build/cellsam}
DATA=${2:-$SRC/../shared/data}
MODEL=${3:-$SRC/models/cellsam-small.safetensors}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/cellsam-eval-XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "| folder | images | F1@0.5 | AP (0.5:0.95) | seconds |"
echo "|---|---|---|---|---|"
for d in "$DATA"/*/; do
    name=$(basename "$d")
    ls "$d" | grep -q '_masks\.' || continue
    mkdir -p "$TMP/$name"
    t0=$(date +%s.%N)
    if [ -n "${CELLSAM_TRUE_BOXES:-}" ]; then
        for gt in "$d"*_masks.*; do
            stem=$(basename "$gt" | sed 's/_masks\.[^.]*$//')
            img=$(ls "$d$stem"_img.* 2>/dev/null | head -n 1)
            [ -n "$img" ] || continue
            # shellcheck disable=SC2086 # word splitting of the option list is intended
            "$CLI" segment -m "$MODEL" "$img" --boxes-from "$gt" -o "$TMP/$name/${stem}_masks.png" --quiet \
                ${CELLSAM_SEGMENT_ARGS:-}
        done
    else
        # shellcheck disable=SC2086 # word splitting of the option list is intended
        "$CLI" segment -m "$MODEL" "$d" -o "$TMP/$name" --quiet ${CELLSAM_SEGMENT_ARGS:-}
    fi
    t1=$(date +%s.%N)
    "$CLI" eval "$d" "$TMP/$name" --json >"$TMP/$name.json"
    f1=$(sed -n 's/.*"mean_f1": \([0-9.e+-]*\).*/\1/p' "$TMP/$name.json")
    ap=$(sed -n 's/.*"mean_ap": \([0-9.e+-]*\).*/\1/p' "$TMP/$name.json")
    n=$(grep -c '"f1"' "$TMP/$name.json")
    printf '| %s | %s | %.3f | %.3f | %.0f |\n' "$name" "$n" "$f1" "$ap" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
done
