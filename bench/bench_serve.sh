#!/bin/sh
# Prompt round-trip benchmark of `cellsam serve` (loopback only; never run by CI).
#
# usage: sh bench/bench_serve.sh CELLSAM_BINARY CKPT [CONFIG_JSON|-] [IMAGE] [N]
#
# Starts the server on a temporary root holding IMAGE (default samples/nuclei_img2d.png),
# opens it, waits for the embedding (one encoder run: about a minute for the full
# ViT-B model on 2 cores), then sends N (default 50) box prompts one after the other,
# each at a different place, and prints the median and 90th percentile of
#   round trip: curl's time_total (HTTP on 127.0.0.1, JSON in and out, mask RLE)
#   decoder:    the server's decode_ms (prompt encoder + mask decoder only)
# for single-mask and multimask (3 candidates) prompts.
# A full-size random-weight checkpoint for timing can be made with bench/make_checkpoint
# from ../shared/testdata/official_keys.tsv (its masks are noise, so the answers are
# larger than real masks would give).
CLI=$1
CKPT=$2
CONFIG=${3:--}
IMAGE=${4:-$(dirname "$0")/../samples/nuclei_img2d.png}
N=${5:-50}
if [ -z "$CLI" ] || [ -z "$CKPT" ]; then
    echo "usage: sh bench/bench_serve.sh CELLSAM_BINARY CKPT [CONFIG_JSON|-] [IMAGE] [N]" >&2
    exit 2
fi
TMP=$(mktemp -d "${TMPDIR:-/tmp}/cellsam-bench-serve-XXXXXX") || exit 1
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null; rm -rf "$TMP"' EXIT
trap 'exit 1' INT TERM HUP PIPE
mkdir "$TMP/root"
cp "$IMAGE" "$TMP/root/image.${IMAGE##*.}"
set -- serve --root "$TMP/root" --port 0 -m "$CKPT"
[ "$CONFIG" != - ] && set -- "$@" --config "$CONFIG"
"$CLI" "$@" >"$TMP/out" 2>"$TMP/err" &
PID=$!
t=0
while ! grep -q '^cellsam serve: http' "$TMP/out" 2>/dev/null; do
    kill -0 $PID 2>/dev/null || { cat "$TMP/err"; exit 1; }
    sleep 0.2
    t=$((t + 1))
    [ $t -lt 1500 ] || { echo "server did not start" >&2; exit 1; }
done
URL=$(sed -n '1s#^cellsam serve: \(http://[^/]*\)/$#\1#p' "$TMP/out")
curl -s -X POST -d "{\"path\":\"image.${IMAGE##*.}\"}" "$URL/api/open" >"$TMP/open.json"
ID=$(sed -n 's/.*"id":"\([a-z0-9]*\)".*/\1/p' "$TMP/open.json")
W=$(sed -n 's/.*"width":\([0-9]*\).*/\1/p' "$TMP/open.json")
H=$(sed -n 's/.*"height":\([0-9]*\).*/\1/p' "$TMP/open.json")
[ -n "$ID" ] || { echo "open failed: $(cat "$TMP/open.json")" >&2; exit 1; }
t0=$(date +%s)
until curl -s "$URL/api/images/$ID" | grep -q '"embedding":{"state":"ready"'; do
    if curl -s "$URL/api/images/$ID" | grep -q '"state":"error"'; then echo "embedding failed" >&2; exit 1; fi
    sleep 0.5
done
echo "image ${W}x${H}, embedding $(($(date +%s) - t0)) s"

run() { # run LABEL EXTRA_JSON
    : >"$TMP/rt"
    : >"$TMP/dec"
    i=0
    while [ $i -le "$N" ]; do
        # boxes of about 1/16 of the image, walking over it
        x=$(((i * 37) % (W * 3 / 4)))
        y=$(((i * 53) % (H * 3 / 4)))
        body="{\"box\":[$x,$y,$((x + W / 16 + 4)),$((y + H / 16 + 4))]$2}"
        rt=$(curl -s -o "$TMP/resp" -w '%{time_total}' -X POST -d "$body" "$URL/api/images/$ID/prompt")
        if [ $i -gt 0 ]; then # the first request warms the context up
            echo "$rt" >>"$TMP/rt"
            echo "$(sed -n 's/.*"decode_ms":\([0-9.]*\).*/\1/p' "$TMP/resp")" >>"$TMP/dec"
        fi
        i=$((i + 1))
    done
    [ -n "$BENCH_RAW" ] && paste "$TMP/rt" "$TMP/dec"
    bytes=$(wc -c <"$TMP/resp" | tr -d ' ')
    rt=$(sort -n "$TMP/rt" | awk '{v[NR]=$1*1000} END {printf "median %.1f ms, p90 %.1f ms", v[int((NR+1)/2)], v[int(NR*0.9+0.5)]}')
    dec=$(sort -n "$TMP/dec" | awk '{v[NR]=$1} END {printf "median %.1f ms", v[int((NR+1)/2)]}')
    echo "$1: round trip $rt; decoder $dec ($N prompts, last answer $bytes bytes)"
}
run "box prompt         " ""
run "box, 3 candidates  " ',"multimask":true'
run "box + 2 points     " ",\"points\":[[$((W / 2)),$((H / 2)),1],[$((W / 3)),$((H / 3)),0]]"
