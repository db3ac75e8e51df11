#!/bin/sh
# cellsam serve: every API endpoint with curl, the error cases (path confinement,
# size limits, malformed requests), a bounded loopback load test and a clean stop.
# usage: sh cli_server.sh CELLSAM_BINARY TESTDATA_DIR DATA_DIR
# Prints one line per check and "cli_server: N passed, M failed"; exits 1 on failure.
# Only 127.0.0.1 is contacted. LOAD_SECONDS (default 5) bounds the load test.
CLI=$1
TESTDATA=$2
DATA=$3
LOAD_SECONDS=${LOAD_SECONDS:-5}
LOAD_CLIENTS=8
PASS=0
FAIL=0
TMP=$(mktemp -d "${TMPDIR:-/tmp}/cellsam-cli-server-XXXXXX") || exit 1
PID=

cleanup() {
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP PIPE

if ! command -v curl >/dev/null 2>&1; then
    echo "cli_server: curl is required (apt-get install curl)"
    exit 1
fi

if "$CLI" serve --help 2>&1 | grep -q 'not available in this build'; then
    echo "cli_server: skipped: this build has no server (libmicrohttpd missing)"
    exit 0
fi

ok() { PASS=$((PASS + 1)); echo "ok   $*"; }
bad() { FAIL=$((FAIL + 1)); echo "FAIL $*"; }
# expect NAME WANT GOT
expect() {
    if [ "$2" = "$3" ]; then ok "$1 ($3)"; else bad "$1: expected $2, got $3 $(head -c 300 "$TMP/body" 2>/dev/null)"; fi
}
# req METHOD PATH [curl options]: body to $TMP/body, headers to $TMP/hdr, prints the status
req() {
    m=$1
    p=$2
    shift 2
    curl -s --path-as-is -o "$TMP/body" -D "$TMP/hdr" -w '%{http_code}' -X "$m" "$@" "$URL$p"
}
json_field() { # first "key":value (number, string or literal) of $TMP/body
    sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\).*/\1/p" "$TMP/body" | head -1
}
body_has() { grep -q -- "$1" "$TMP/body"; }
rle_ok() { # the mask's run lengths cover its box exactly and their "on" runs add up to its area (sets BB)
    BB=$(sed -n 's/.*"bbox":\[\([0-9,]*\)\].*/\1/p' "$TMP/body" | head -1)
    CNT=$(sed -n 's/.*"counts":\[\([0-9,]*\)\].*/\1/p' "$TMP/body" | head -1)
    echo "$BB $CNT $(json_field area)" | awk '{split($1,b,","); n=split($2,c,","); t=0; on=0;
        for(i=1;i<=n;i++){t+=c[i]; if(i%2==0) on+=c[i]}
        exit !(n==0 && $3==0 || t==(b[3]-b[1])*(b[4]-b[2]) && on==$3)}'
}
# le32 N: 4 bytes little-endian (printf octal escapes; POSIX sh has no binary output otherwise)
le32() {
    n=$1
    i=0
    while [ $i -lt 4 ]; do
        printf "\\$(printf '%03o' $((n % 256)))"
        n=$((n / 256))
        i=$((i + 1))
    done
}
wait_state() { # wait_state ID FIELD STATE SECONDS
    t=0
    while [ $t -lt $(($4 * 10)) ]; do
        curl -s "$URL/api/images/$1" >"$TMP/st" 2>/dev/null
        if grep -q "\"$2\":{\"state\":\"$3\"" "$TMP/st"; then return 0; fi
        if grep -q "\"$2\":{\"state\":\"error\"" "$TMP/st"; then cat "$TMP/st"; return 1; fi
        sleep 0.1
        t=$((t + 1))
    done
    cat "$TMP/st"
    return 1
}

# ---------------------------------------------------------------- a root folder
ROOT=$TMP/root
mkdir -p "$ROOT/sub/deep" "$TMP/outside"
cp "$DATA/usiigaci_phase/set01_img.png" "$ROOT/a.png"
cp "$DATA/dsb2018_stage1_test/0114f484a16c152baa2d82fdd43740880a762c93f436c8988ac461c5c9dbe7d5_img.png" "$ROOT/sub/b.png"
cp "$DATA/baby_brightfield/evolve_testA_img.png" "$ROOT/sub/deep/c.png"
cp "$ROOT/sub/b.png" "$TMP/outside/secret.png"
ln -s ../outside/secret.png "$ROOT/link_out.png"
ln -s "$TMP/outside" "$ROOT/dir_out"
ln -s a.png "$ROOT/link_in.png"
mkdir "$ROOT/.hidden" && cp "$ROOT/sub/b.png" "$ROOT/.hidden/h.png"
echo "not an image" >"$ROOT/notes.png"
echo "text" >"$ROOT/readme.txt"

# ---------------------------------------------------------------- start
# start_server OUT ERR [serve options]: serve in the background (PID), stdout to OUT and
# stderr to ERR (fresh files per server: a stale URL line must not be read while the new
# server truncates its file); waits up to 60 s for the URL line and sets URL ("" if none)
start_server() {
    so=$1
    se=$2
    shift 2
    "$CLI" serve "$@" >"$so" 2>"$se" &
    PID=$!
    t=0
    while [ $t -lt 600 ] && ! grep -q '^cellsam serve: http' "$so" 2>/dev/null; do
        kill -0 $PID 2>/dev/null || break
        sleep 0.1
        t=$((t + 1))
    done
    URL=$(sed -n '1s#^cellsam serve: \(http://127\.0\.0\.1:[0-9]*\)/$#\1#p' "$so")
}
start_server "$TMP/out" "$TMP/err" --root "$ROOT" --port 0 --threads 2 --cache 2 --max-upload 1 \
    -m "$TESTDATA/checkpoint.safetensors" --config "$TESTDATA/config.json"
if [ -z "$URL" ]; then
    echo "cli_server: FAIL: the server did not print its URL: $(cat "$TMP/out" "$TMP/err")"
    echo "cli_server: 0 passed, 1 failed"
    exit 1
fi
ok "server listens on loopback, URL on the first stdout line ($URL)"

# usage errors of the command itself
CELLSAM_MODEL="$TMP/absent.safetensors" "$CLI" serve --root "$ROOT" --port 0 >/dev/null 2>&1
expect "serve with a missing default model (CELLSAM_MODEL) exits 1" 1 $?
"$CLI" serve -m "$TESTDATA/checkpoint.safetensors" --config "$TESTDATA/config.json" --root "$TMP/nope" --port 0 \
    >/dev/null 2>"$TMP/e2"
expect "serve with a missing root exits 1" 1 $?
"$CLI" serve -m "$TESTDATA/checkpoint.safetensors" --config "$TESTDATA/config.json" --host example.org --port 0 \
    >/dev/null 2>&1
expect "serve with a host name instead of an address exits 1" 1 $?

# fine-tuning from the page, before anything is labelled: a clear 400, no run
expect "fine-tune status before any run" 200 "$(req GET /api/finetune)"
body_has '"state":"none"' && body_has '"available":true' && ok "no run yet, fine-tuning available" ||
    bad "fine-tune status: $(cat "$TMP/body")"
expect "fine-tune with nothing labelled" 400 "$(req POST /api/finetune -d '{}')"
body_has 'no labelled images' && ok "the 400 says nothing is labelled yet" || bad "body: $(cat "$TMP/body")"

# ---------------------------------------------------------------- static files
expect "GET / serves the page" 200 "$(req GET /)"
body_has '<canvas id="view"' && ok "page has the canvas" || bad "page has no canvas"
expect "GET /app.js" 200 "$(req GET /app.js)"
grep -qi '^content-type: text/javascript' "$TMP/hdr" && ok "app.js content type" || bad "app.js content type"
expect "GET /style.css" 200 "$(req GET /style.css)"
expect "GET /missing.js" 404 "$(req GET /missing.js)"
expect "static ../ traversal" 404 "$(req GET /../../../../etc/passwd)"
expect "static %2e%2e traversal" 404 "$(req GET /%2e%2e/%2e%2e/etc/passwd)"
expect "static %2F traversal" 404 "$(req GET /..%2F..%2F..%2Fetc%2Fpasswd)"
expect "static absolute path" 404 "$(req GET //etc/passwd)"
expect "static hidden file" 404 "$(req GET /.htaccess)"
expect "POST to a static path" 405 "$(req POST /index.html -d x)"

# ---------------------------------------------------------------- info, files
expect "GET /api/info" 200 "$(req GET /api/info)"
body_has '"has_detector":true' && ok "info describes the model" || bad "info: $(cat "$TMP/body")"
body_has '"cell_diameter":64' && body_has '"auto_diameter":false' && ok "info gives the model's cell size hints" ||
    bad "info without cell size hints: $(cat "$TMP/body")"
expect "POST /api/info" 405 "$(req POST /api/info -d '{}')"
expect "unknown endpoint" 404 "$(req GET /api/nope)"
expect "GET /api/files" 200 "$(req GET /api/files)"
for f in a.png sub/b.png sub/deep/c.png link_in.png; do
    body_has "\"path\":\"$f\"" && ok "files lists $f" || bad "files does not list $f: $(cat "$TMP/body")"
done
for f in link_out.png secret.png h.png readme.txt; do
    body_has "$f" && bad "files lists $f" || ok "files hides $f"
done

# ---------------------------------------------------------------- open: confinement
open_status() { req POST /api/open -H 'Content-Type: application/json' -d "$1"; }
expect "open ../ path" 403 "$(open_status '{"path":"../outside/secret.png"}')"
body_has '"error"' && ok "errors are JSON with a message" || bad "error body: $(cat "$TMP/body")"
expect "open sub/../ path" 403 "$(open_status '{"path":"sub/../a.png"}')"
expect "open absolute path" 403 "$(open_status "{\"path\":\"$ROOT/a.png\"}")"
expect "open /etc/passwd" 403 "$(open_status '{"path":"/etc/passwd"}')"
expect "open symlink leaving the root" 403 "$(open_status '{"path":"link_out.png"}')"
expect "open through a symlinked folder leaving the root" 403 "$(open_status '{"path":"dir_out/secret.png"}')"
expect "open literal %2e%2e path" 404 "$(open_status '{"path":"%2e%2e/outside/secret.png"}')"
expect "open ..%2F path" 403 "$(open_status '{"path":"..%2Foutside%2Fsecret.png"}')"
expect "open hidden folder" 403 "$(open_status '{"path":".hidden/h.png"}')"
expect "open .cellsam store" 403 "$(open_status '{"path":".cellsam/a.png.labels.png"}')"
expect "open missing file" 404 "$(open_status '{"path":"nope.png"}')"
expect "open a folder" 404 "$(open_status '{"path":"sub"}')"
expect "open a non-image" 415 "$(open_status '{"path":"notes.png"}')"
expect "open malformed JSON" 400 "$(open_status '{"path":')"
expect "open JSON array" 400 "$(open_status '[1,2]')"
expect "open empty body" 400 "$(open_status '')"
expect "open path of wrong type" 400 "$(open_status '{"path":5}')"
expect "open nuclear of wrong type" 400 "$(open_status '{"path":"a.png","nuclear":"1"}')"
expect "open channel beyond the image" 400 "$(open_status '{"path":"a.png","cell":3}')"
expect "open grey with a channel" 400 "$(open_status '{"path":"a.png","grey":true,"nuclear":1}')"
expect "open with GET" 405 "$(req GET /api/open)"
head -c 1100000 /dev/zero | tr '\0' ' ' >"$TMP/big.json"
expect "JSON body over 1 MiB" 413 "$(req POST /api/open --data-binary @"$TMP/big.json")"

# ---------------------------------------------------------------- open, embedding, status
expect "open a.png" 200 "$(open_status '{"path":"a.png"}')"
A=$(json_field id)
body_has '"width":1024,"height":1022,"channels":1' && ok "open reports size and channels" || bad "open: $(cat "$TMP/body")"
expect "open a.png again gives the same image" "$A" "$(open_status '{"path":"a.png"}' >/dev/null; json_field id)"
wait_state "$A" embedding ready 120 && ok "embedding of a.png ready" || bad "embedding of a.png not ready"
expect "status" 200 "$(req GET "/api/images/$A")"
body_has '"segment":{"state":"none"' && ok "status shows segment state" || bad "status: $(cat "$TMP/body")"
expect "unknown image id" 404 "$(req GET /api/images/i999)"
expect "malformed image id" 404 "$(req GET '/api/images/I!x')"
expect "image id with %2F" 404 "$(req GET '/api/images/..%2F..%2Fetc/labels')"
expect "unknown image action" 404 "$(req GET "/api/images/$A/nope")"
expect "DELETE an image" 405 "$(req DELETE "/api/images/$A")"

# pixels: 1024 x 1022 x 1 channel x 2 bytes
expect "pixels" 200 "$(req GET "/api/images/$A/pixels")"
expect "pixels size" $((1024 * 1022 * 2)) "$(wc -c <"$TMP/body" | tr -d ' ')"
grep -qi '^x-cellsam-stats: ' "$TMP/hdr" && ok "pixels carry display statistics" || bad "no X-Cellsam-Stats"

# ---------------------------------------------------------------- prompts (decoder only)
prompt() { req POST "/api/images/$1/prompt" -H 'Content-Type: application/json' -d "$2"; }
expect "box prompt" 200 "$(prompt "$A" '{"box":[400,400,470,460]}')"
cp "$TMP/body" "$TMP/box1.json"
[ "$(grep -o '"counts"' "$TMP/body" | wc -l)" = 1 ] && ok "box prompt gives one mask" || bad "mask count"
AREA=$(json_field area)
rle_ok && ok "mask run lengths match its box and area ($AREA px)" || bad "mask RLE inconsistent: bbox $BB area $AREA"
REF=$(json_field ref)
expect "points prompt" 200 "$(prompt "$A" '{"points":[[430,430,1],[300,300,0]]}')"
expect "multimask prompt" 200 "$(prompt "$A" '{"box":[400,400,470,460],"multimask":true}')"
[ "$(grep -o '"counts"' "$TMP/body" | wc -l)" = 3 ] && ok "multimask gives 3 candidates" || bad "multimask count"
expect "refinement with mask_input" 200 "$(prompt "$A" "{\"box\":[400,400,470,460],\"points\":[[430,430,1]],\"mask_input\":{\"ref\":$REF,\"index\":0}}")"
body_has '"mask_input_used":true' && ok "previous logits used as mask input" || bad "mask_input not used: $(head -c 200 "$TMP/body")"
expect "box outside the image is clamped" 200 "$(prompt "$A" '{"box":[-50,-50,5000,90000]}')"
expect "box with 3 numbers" 400 "$(prompt "$A" '{"box":[1,2,3]}')"
expect "box with strings" 400 "$(prompt "$A" '{"box":["1",2,3,4]}')"
expect "box of wrong type" 400 "$(prompt "$A" '{"box":"1,2,3,4"}')"
expect "point with label 2" 400 "$(prompt "$A" '{"points":[[1,2,2]]}')"
expect "point with 2 numbers" 400 "$(prompt "$A" '{"points":[[1,2]]}')"
P65=$(awk 'BEGIN{s="["; for(i=0;i<65;i++) s=s (i?",":"") "[1,1,1]"; print s "]"}')
expect "65 points" 400 "$(prompt "$A" "{\"points\":$P65}")"
expect "no box, no points" 400 "$(prompt "$A" '{"multimask":true}')"
expect "multimask of wrong type" 400 "$(prompt "$A" '{"box":[1,1,9,9],"multimask":"yes"}')"
expect "mask_input of wrong type" 400 "$(prompt "$A" '{"box":[1,1,9,9],"mask_input":[1]}')"
expect "number out of range" 400 "$(prompt "$A" '{"box":[1e999,1,9,9]}')"
expect "prompt malformed JSON" 400 "$(prompt "$A" '{"box":[1,')"
expect "prompt with GET" 405 "$(req GET "/api/images/$A/prompt")"
expect "prompt unknown id" 404 "$(prompt i999 '{"box":[1,1,9,9]}')"
# the model recommends no cell sizing (as the official checkpoint): every box decodes in the
# whole-image input, a small one too (windows at cell size: the last section)
expect "small box, no sizing recommended" 200 "$(prompt "$A" '{"box":[500,500,510,511]}')"
body_has '"view":null' && body_has '"view_encoded":false' && ok "no window without the model's recommendation" ||
    bad "view: $(head -c 300 "$TMP/body")"

# ---------------------------------------------------------------- several images, LRU cache (--cache 2)
expect "open sub/b.png" 200 "$(open_status '{"path":"sub/b.png"}')"
B=$(json_field id)
wait_state "$B" embedding ready 120 && ok "embedding of b ready" || bad "embedding of b not ready"
expect "prompt on b" 200 "$(prompt "$B" '{"box":[100,100,150,150]}')"
expect "same box on a after b" 200 "$(prompt "$A" '{"box":[400,400,470,460]}')"
sed 's/"decode_ms".*//' "$TMP/body" >"$TMP/box2.json"
sed -i 's/"decode_ms".*//; s/"ref":[0-9]*//' "$TMP/box1.json" "$TMP/box2.json"
cmp -s "$TMP/box1.json" "$TMP/box2.json" && ok "switching images keeps each embedding (same mask again)" ||
    bad "the same prompt gave a different mask after another image"
# segment-all on a first (queued before c's embedding), so a prompt on c meets an unready embedding
expect "segment-all bad threshold" 400 "$(req POST "/api/images/$A/segment" -d '{"bbox_threshold":2}')"
expect "segment-all bad box NMS" 400 "$(req POST "/api/images/$A/segment" -d '{"box_nms_iou":1.5}')"
expect "segment-all tiled of wrong type" 400 "$(req POST "/api/images/$A/segment" -d '{"tiled":"no"}')"
expect "segment-all bad diameter" 400 "$(req POST "/api/images/$A/segment" -d '{"diameter":"big"}')"
body_has "diameter" && ok "the 400 names the diameter" || bad "bad diameter body: $(cat "$TMP/body")"
expect "segment-all negative diameter" 400 "$(req POST "/api/images/$A/segment" -d '{"diameter":-3}')"
expect "segment-all malformed JSON" 400 "$(req POST "/api/images/$A/segment" -d '{')"
expect "segment-all result before any run" 404 "$(req GET "/api/images/$A/segment")"
expect "segment-all start" 202 "$(req POST "/api/images/$A/segment" -d '{}')"
expect "open sub/deep/c.png" 200 "$(open_status '{"path":"sub/deep/c.png"}')"
C=$(json_field id)
expect "prompt before the embedding is ready" 409 "$(prompt "$C" '{"box":[10,10,40,40]}')"
body_has '"embedding":{"state":"\(queued\|running\)"' && ok "409 tells the embedding state" || bad "409 body: $(cat "$TMP/body")"
expect "segment-all result while running" 409 "$(req GET "/api/images/$A/segment")"
wait_state "$A" segment ready 240 && ok "segment-all finished" || bad "segment-all did not finish"
wait_state "$C" embedding ready 120 && ok "embedding of c ready" || bad "embedding of c not ready"
wait_state "$B" embedding none 5 && ok "LRU cache (2) dropped the oldest embedding (b)" || bad "b's embedding was not evicted"
expect "prompt on an evicted image re-queues it" 409 "$(prompt "$B" '{"box":[100,100,150,150]}')"
wait_state "$B" embedding ready 120 && ok "b's embedding computed again" || bad "b not recomputed"
expect "prompt on b again" 200 "$(prompt "$B" '{"box":[100,100,150,150]}')"

# ---------------------------------------------------------------- bounded load test (loopback only)
# on b, whose embedding is the newest in the cache (nothing else is opened meanwhile)
printf '{"box":[100,100,150,150]}' >"$TMP/load.json"
i=0
while [ $i -lt $LOAD_CLIENTS ]; do
    (
        trap - EXIT
        set --
        k=0
        while [ $k -lt 10 ]; do set -- "$@" -o /dev/null "$URL/api/images/$B/prompt"; k=$((k + 1)); done
        end=$(($(date +%s) + LOAD_SECONDS))
        n=0
        e=0
        while [ "$(date +%s)" -lt $end ]; do
            # 10 requests on one keep-alive connection per curl call
            curl -s -w '%{http_code}\n' -X POST --data-binary @"$TMP/load.json" "$@" >"$TMP/codes.$i" 2>/dev/null
            n=$((n + $(wc -l <"$TMP/codes.$i")))
            e=$((e + $(grep -vc '^200$' "$TMP/codes.$i")))
            [ "$(wc -l <"$TMP/codes.$i")" = 10 ] || e=$((e + 1))
        done
        echo "$n $e" >"$TMP/load.$i"
    ) &
    i=$((i + 1))
done
wait_jobs=0
while [ $wait_jobs -lt $((LOAD_SECONDS * 10 + 600)) ]; do
    done_n=$(ls "$TMP"/load.[0-9]* 2>/dev/null | wc -l)
    [ "$done_n" -ge $LOAD_CLIENTS ] && break
    sleep 0.1
    wait_jobs=$((wait_jobs + 1))
done
TOTAL=$(cat "$TMP"/load.[0-9]* | awk '{n+=$1; e+=$2} END {print n+0}')
ERRS=$(cat "$TMP"/load.[0-9]* | awk '{n+=$1; e+=$2} END {print e+0}')
[ "$TOTAL" -gt 0 ] && [ "$ERRS" = 0 ] &&
    ok "load: $LOAD_CLIENTS clients x ${LOAD_SECONDS} s, $TOTAL prompts, 0 errors ($((TOTAL / LOAD_SECONDS))/s)" ||
    bad "load: $TOTAL prompts, $ERRS errors"
expect "server answers after the load" 200 "$(req GET /api/info)"

# stop: a running segment-all stops between its tiles, with no result; nothing to stop: 409
expect "stop with nothing running" 409 "$(req POST "/api/images/$C/segment/stop")"
expect "stop with GET" 405 "$(req GET "/api/images/$C/segment/stop")"
expect "a segment-all to stop" 202 "$(req POST "/api/images/$C/segment" -d '{"tiled":true,"diameter":"auto"}')"
expect "stop it" 202 "$(req POST "/api/images/$C/segment/stop")"
wait_state "$C" segment stopped 60 && ok "segment-all stopped" || bad "segment-all did not stop"
expect "no result after a stop" 409 "$(req GET "/api/images/$C/segment")"
expect "stop when already stopped" 409 "$(req POST "/api/images/$C/segment/stop")"

expect "segment-all in tiled mode, box NMS 0.3" 202 "$(req POST "/api/images/$C/segment" -d '{"tiled":true,"box_nms_iou":0.3}')"
wait_state "$C" segment ready 240 && ok "tiled segment-all finished" || bad "tiled segment-all did not finish"
expect "segment-all with --diameter auto" 202 "$(req POST "/api/images/$C/segment" -d '{"diameter":"auto"}')"
wait_state "$C" segment ready 240 && ok "segment-all with diameter auto finished" || bad "diameter auto did not finish"
expect "segment-all result" 200 "$(req GET "/api/images/$A/segment")"
[ "$(head -c 4 "$TMP/body")" = CSL1 ] && ok "result is a label container" || bad "result header"
cp "$TMP/body" "$TMP/seg.bin"

# ---------------------------------------------------------------- labels: autosave and restore
expect "labels before any save" 404 "$(req GET "/api/images/$A/labels")"
expect "export before any save" 404 "$(req GET "/api/images/$A/export?format=png")"
expect "save segment-all labels" 200 "$(req PUT "/api/images/$A/labels" --data-binary @"$TMP/seg.bin")"
[ -f "$ROOT/.cellsam/a.png.labels.png" ] && ok "stored under ROOT/.cellsam/" || bad "no .cellsam/a.png.labels.png"
[ "$(od -An -tx1 -j24 -N2 "$ROOT/.cellsam/a.png.labels.png" | tr -d ' ')" = 1000 ] &&
    ok "stored as 16-bit grey PNG" || bad "stored PNG is not 16-bit grey"
expect "restore" 200 "$(req GET "/api/images/$A/labels")"
cp "$TMP/body" "$TMP/r1.bin"
expect "save the restored labels" 200 "$(req PUT "/api/images/$A/labels" --data-binary @"$TMP/r1.bin")"
req GET "/api/images/$A/labels" >/dev/null
cmp -s "$TMP/body" "$TMP/r1.bin" && ok "save / restore round trip is exact" || bad "round trip differs"

# hand-made containers for b (256 x 256): two halves, labels 3 and 9, with cell info for 3
NPIX=$((256 * 256))
{ printf CSL1; le32 256; le32 256; le32 2; le32 $((NPIX / 2)); le32 3; le32 $((NPIX / 2)); le32 9
  printf '{"cells":{"3":[0.5,0.25]}}'; } >"$TMP/halves.bin"
expect "save hand-made labels" 200 "$(req PUT "/api/images/$B/labels" --data-binary @"$TMP/halves.bin")"
body_has '"max_label":9' && ok "save reports the largest label" || bad "save: $(cat "$TMP/body")"
expect "export CSV" 200 "$(req GET "/api/images/$B/export?format=csv")"
printf 'label,x0,y0,x1,y1,area,centroid_x,centroid_y,score,predicted_iou\n1,0,0,256,128,32768,127.500,63.500,0.500000,0.250000\n2,0,128,256,256,32768,127.500,191.500,,\n' >"$TMP/want.csv"
cmp -s "$TMP/body" "$TMP/want.csv" && ok "CSV rows computed by hand (renumbered 1..2, info kept)" ||
    bad "CSV: $(cat "$TMP/body")"
grep -qi '^content-disposition: attachment; filename="b_cells.csv"' "$TMP/hdr" && ok "CSV download name" || bad "CSV disposition"
expect "export PNG" 200 "$(req GET "/api/images/$B/export?format=png")"
[ "$(od -An -tx1 -N4 "$TMP/body" | tr -d ' ')" = 89504e47 ] && ok "PNG signature" || bad "not a PNG"
grep -qi '^x-cellsam-labels: 2' "$TMP/hdr" && ok "PNG export has 2 labels" || bad "label count header"
expect "export TIFF" 200 "$(req GET "/api/images/$B/export?format=tif")"
[ "$(head -c 2 "$TMP/body")" = II ] || [ "$(head -c 2 "$TMP/body")" = MM ] && ok "TIFF byte order mark" || bad "not a TIFF"
expect "export unknown format" 400 "$(req GET "/api/images/$B/export?format=bmp")"
expect "export with POST" 405 "$(req POST "/api/images/$B/export" -d x)"

{ printf CSL1; le32 256; le32 256; le32 1; le32 $((NPIX - 1)); le32 1; } >"$TMP/short.bin"
expect "runs short of the image" 400 "$(req PUT "/api/images/$B/labels" --data-binary @"$TMP/short.bin")"
{ printf CSL1; le32 255; le32 256; le32 1; le32 $((255 * 256)); le32 1; } >"$TMP/dims.bin"
expect "container of another size" 400 "$(req PUT "/api/images/$B/labels" --data-binary @"$TMP/dims.bin")"
{ printf CSL1; le32 256; le32 256; le32 1; le32 $NPIX; le32 70000; } >"$TMP/big.bin"
expect "label above 65535" 400 "$(req PUT "/api/images/$B/labels" --data-binary @"$TMP/big.bin")"
{ printf CSL1; le32 256; le32 256; le32 1; le32 $NPIX; le32 1; printf '{"cells":'; } >"$TMP/tail.bin"
expect "malformed cell info" 400 "$(req PUT "/api/images/$B/labels" --data-binary @"$TMP/tail.bin")"
{ printf CSL1; le32 256; le32 256; le32 100000; } >"$TMP/runs.bin"
expect "run count beyond the body" 400 "$(req PUT "/api/images/$B/labels" --data-binary @"$TMP/runs.bin")"
expect "not a container" 400 "$(req PUT "/api/images/$B/labels" --data-binary 'hello')"
head -c $((16 + NPIX * 8 + 9 * 1048576)) /dev/zero >"$TMP/huge.bin"
expect "labels body over the limit" 413 "$(req PUT "/api/images/$B/labels" --data-binary @"$TMP/huge.bin")"
# concurrent saves of one image (several tabs): every one succeeds, the file stays whole
k=0
PUTS=
while [ $k -lt 6 ]; do
    curl -s -o /dev/null -w '%{http_code}\n' -X PUT --data-binary @"$TMP/halves.bin" "$URL/api/images/$B/labels" >"$TMP/put.$k" &
    PUTS="$PUTS $!"
    k=$((k + 1))
done
# shellcheck disable=SC2086
wait $PUTS # only these: a bare wait would also wait for the server
[ "$(cat "$TMP"/put.[0-5] | grep -c '^200$')" = 6 ] && ok "6 concurrent saves all succeed" || bad "concurrent saves: $(cat "$TMP"/put.[0-5] | tr '\n' ' ')"
expect "labels with POST" 405 "$(req POST "/api/images/$B/labels" -d x)"
expect "the last good save is kept" 200 "$(req GET "/api/images/$B/export?format=csv")"
cmp -s "$TMP/body" "$TMP/want.csv" && ok "rejected saves left the stored labels alone" || bad "stored labels changed"

# ---------------------------------------------------------------- corrections are training data
# finetune --data ROOT pairs each autosaved ROOT/.cellsam/<image>.labels.png with its image
# (a.png: the segment-all result; sub/b.png: the two hand-made halves) and trains on both
"$CLI" finetune -m "$TESTDATA/checkpoint.safetensors" --data "$ROOT" --steps 1 --batch 2 --prompts 2 \
    --val-fraction 0 --threads 2 --out "$TMP/ft.safetensors" >/dev/null 2>"$TMP/ft.log"
expect "finetune on the saved corrections" 0 $?
grep -q " on 2 images, 0 held out" "$TMP/ft.log" && grep -q "step 1/1 loss" "$TMP/ft.log" &&
    ok "both saved label images paired with their images and trained on" || bad "finetune: $(head -3 "$TMP/ft.log")"
"$CLI" segment -m "$TMP/ft.safetensors" "$ROOT/sub/b.png" -o "$TMP/ft_b.png" --quiet 2>"$TMP/ft.err" &&
    ok "the fine-tuned model segments" || bad "segment with the fine-tuned model: $(cat "$TMP/ft.err")"

# ---------------------------------------------------------------- what a fine-tune would train on
# GET /api/finetune/data lists the pairs with their cell counts; where the server holds a
# segment-all result, it counts the model's cells left without a label (a.png's saved labels
# are its segment-all result: none; all-zero labels: every one, "partial")
expect "training data" 200 "$(req GET /api/finetune/data)"
body_has '"n_images":2' && body_has '{"image":"sub/b.png","cells":2}' &&
    ok "both pairs listed; sub/b.png has its 2 hand-made cells and no model result" || bad "data: $(cat "$TMP/body")"
NM=$(json_field model_cells)
[ "$NM" -ge 1 ] 2>/dev/null && body_has "{\"image\":\"a.png\",\"cells\":$NM,\"model_cells\":$NM,\"unlabelled\":0,\"partial\":false}" &&
    body_has '"partial":0}' && ok "a.png: all $NM model cells labelled" || bad "a.png: $(cat "$TMP/body")"
{ printf CSL1; le32 1024; le32 1022; le32 1; le32 $((1024 * 1022)); le32 0; } >"$TMP/zeros.bin"
expect "save all-zero labels for a" 200 "$(req PUT "/api/images/$A/labels" --data-binary @"$TMP/zeros.bin")"
expect "training data with a unlabelled" 200 "$(req GET /api/finetune/data)"
body_has "{\"image\":\"a.png\",\"cells\":0,\"model_cells\":$NM,\"unlabelled\":$NM,\"partial\":true}" &&
    body_has '"partial":1}' && ok "a.png: all $NM model cells unlabelled, flagged partial" || bad "partial: $(cat "$TMP/body")"
expect "restore a's labels" 200 "$(req PUT "/api/images/$A/labels" --data-binary @"$TMP/seg.bin")"
expect "training data with POST" 405 "$(req POST /api/finetune/data -d '{}')"

# ---------------------------------------------------------------- fine-tuning from the page
# POST /api/finetune trains the serving model on the same saved labels in the server, on its own
# thread; prompts go on meanwhile; /stop saves and stops; /use swaps the result in
ft_wait() { # ft_wait STATE SECONDS
    t=0
    while [ $t -lt $(($2 * 10)) ]; do
        curl -s "$URL/api/finetune" >"$TMP/body" 2>/dev/null
        if body_has "\"state\":\"$1\""; then return 0; fi
        if body_has '"state":"error"'; then return 1; fi
        sleep 0.1
        t=$((t + 1))
    done
    return 1
}
expect "use before any fine-tune" 409 "$(req POST /api/finetune/use)"
expect "stop when none runs" 409 "$(req POST /api/finetune/stop)"
expect "fine-tune with 0 epochs" 400 "$(req POST /api/finetune -d '{"epochs":0}')"
expect "fine-tune with a bad rate" 400 "$(req POST /api/finetune -d '{"lr":"fast"}')"
expect "fine-tune training nothing" 400 "$(req POST /api/finetune -d '{"detector":false,"decoder":false}')"
expect "fine-tune with PUT" 405 "$(req PUT /api/finetune -d '{}')"
expect "fine-tune with malformed JSON" 400 "$(req POST /api/finetune -d '{')"
expect "fine-tune start" 202 "$(req POST /api/finetune -d '{"steps":100000}')"
body_has '"state":"running"' && body_has '"model":".cellsam/finetuned-1.safetensors"' &&
    ok "running, into ROOT/.cellsam/finetuned-1.safetensors" || bad "start: $(cat "$TMP/body")"
expect "a second fine-tune while one runs" 409 "$(req POST /api/finetune -d '{}')"
expect "open b while training" 200 "$(open_status '{"path":"sub/b.png"}')"
B=$(json_field id)
wait_state "$B" embedding ready 120 && ok "embedding of b ready while training" || bad "b not embedded while training"
expect "prompt while training" 200 "$(prompt "$B" '{"box":[100,100,150,150]}')"
t=0
while [ $t -lt 600 ]; do # a few steps first, so that there is something to save
    curl -s "$URL/api/finetune" >"$TMP/body"
    [ "$(json_field step)" -ge 2 ] 2>/dev/null && break
    sleep 0.1
    t=$((t + 1))
done
body_has '"images":2' && ok "trains on the 2 saved label images ($(json_field step) steps so far)" ||
    bad "fine-tune progress: $(cat "$TMP/body")"
expect "stop" 202 "$(req POST /api/finetune/stop)"
ft_wait stopped 120 && ok "stopped after its current step, model saved" || bad "did not stop: $(cat "$TMP/body")"
STEPS=$(json_field step)
[ -s "$ROOT/.cellsam/finetuned-1.safetensors" ] && [ ! -e "$ROOT/.cellsam/finetuned-1.safetensors.state" ] &&
    [ "$STEPS" -ge 2 ] && [ "$STEPS" -lt 100000 ] && ok "model written, no optimiser state ($STEPS steps)" ||
    bad "after stop: $(ls -a "$ROOT/.cellsam"), $STEPS steps"
"$CLI" info -m "$ROOT/.cellsam/finetuned-1.safetensors" >"$TMP/ftinfo" 2>&1 && ok "the saved model loads" ||
    bad "info on the fine-tuned model: $(head -2 "$TMP/ftinfo")"
expect "use it" 200 "$(req POST /api/finetune/use)"
body_has '"in_use":true' && ok "the fine-tuned model is in use" || bad "use: $(cat "$TMP/body")"
expect "prompt with the fine-tuned model" 200 "$(prompt "$B" '{"box":[100,100,150,150]}')"
expect "segment-all with the fine-tuned model" 202 "$(req POST "/api/images/$B/segment" -d '{}')"
wait_state "$B" segment ready 240 && ok "segment-all with the fine-tuned model finished" || bad "segment-all after use"
expect "fine-tune again, from the one in use" 202 "$(req POST /api/finetune -d '{"steps":1}')"
ft_wait done 240 && body_has '"model":".cellsam/finetuned-2.safetensors"' && body_has '"in_use":false' &&
    ok "second run done into finetuned-2 (the first serves until /use)" || bad "second run: $(cat "$TMP/body")"
expect "info names fine-tuning" 200 "$(req GET /api/info)"
body_has '"finetune":true' && ok "info: finetune available" || bad "info: $(cat "$TMP/body")"

# ---------------------------------------------------------------- uploads (--max-upload 1 MB)
upload() { req POST "/api/upload?name=$1" --data-binary @"$2"; }
expect "upload" 201 "$(upload 'my%20cells.png' "$ROOT/sub/b.png")"
body_has '"path":"uploads/my_cells.png"' && ok "upload name sanitised" || bad "upload: $(cat "$TMP/body")"
expect "upload same name" 201 "$(upload 'my%20cells.png' "$ROOT/sub/b.png")"
body_has '"path":"uploads/my_cells-1.png"' && ok "upload never overwrites" || bad "upload: $(cat "$TMP/body")"
expect "upload with ../ in the name" 201 "$(upload '..%2F..%2Fescape.png' "$ROOT/sub/b.png")"
body_has '"path":"uploads/escape.png"' && [ ! -e "$TMP/escape.png" ] && ok "upload stays in uploads/" || bad "upload: $(cat "$TMP/body")"
expect "upload hidden name" 201 "$(upload '.x.png' "$ROOT/sub/b.png")"
body_has '"path":"uploads/x.png"' && ok "leading dots dropped" || bad "upload: $(cat "$TMP/body")"
expect "open the upload" 200 "$(open_status '{"path":"uploads/my_cells.png"}')"
expect "upload a non-image" 415 "$(upload 'x.png' "$ROOT/readme.txt")"
expect "upload with a non-image name" 415 "$(upload 'x.exe' "$ROOT/sub/b.png")"
expect "upload without a name" 400 "$(req POST /api/upload --data-binary @"$ROOT/sub/b.png")"
expect "upload an empty body" 400 "$(req POST '/api/upload?name=e.png' --data-binary '')"
head -c 2000000 /dev/zero >"$TMP/2mb.bin"
expect "upload over --max-upload" 413 "$(upload 'big.png' "$TMP/2mb.bin")"
expect "chunked upload over --max-upload" 413 "$(req POST '/api/upload?name=big.png' -H 'Transfer-Encoding: chunked' --data-binary @"$TMP/2mb.bin")"
expect "upload with GET" 405 "$(req GET /api/upload)"
[ "$(ls "$ROOT/uploads" | wc -l)" = 4 ] && ok "only the accepted uploads were written" || bad "uploads: $(ls "$ROOT/uploads")"

# ---------------------------------------------------------------- stop
# with a fine-tune and a tiled segment-all still running: the server stops the fine-tune (it
# saves first) and the segment-all (between its tiles), and exits cleanly
expect "a tiled segment-all left running at shutdown" 202 "$(req POST "/api/images/$A/segment" -d '{"tiled":true}')"
expect "a long fine-tune left running at shutdown" 202 "$(req POST /api/finetune -d '{"steps":100000}')"
kill -TERM $PID
t=0
while kill -0 $PID 2>/dev/null && [ $t -lt 300 ]; do sleep 0.1; t=$((t + 1)); done
wait $PID
expect "SIGTERM stops the server cleanly" 0 $?
PID=
if grep -q 'ERROR: AddressSanitizer\|runtime error:\|LeakSanitizer' "$TMP/err"; then
    bad "sanitizer report: $(grep -m3 'ERROR\|runtime error' "$TMP/err")"
else
    ok "no sanitizer reports"
fi

# ---------------------------------------------------------------- prompts at cell size
# A model that recommends cell sizing (cellsam convert --diameter auto, as the bundled one):
# a box shown at under 1/1.5 of its cell diameter (64) in the whole-image input is decoded
# in a window that shows it at the cell diameter (zoom 64 / 11, clamped to 4: 256 px)
"$CLI" convert "$TESTDATA/checkpoint.safetensors" "$TMP/auto.safetensors" --diameter auto >/dev/null 2>&1 ||
    bad "convert --diameter auto"
start_server "$TMP/out2" "$TMP/err2" --root "$ROOT" --port 0 --threads 2 -m "$TMP/auto.safetensors" \
    --config "$TESTDATA/config.json"
[ -n "$URL" ] && ok "the sizing model's server is up" || bad "the sizing model's server printed no URL: $(cat "$TMP/err2")"
expect "open a.png (sizing model)" 200 "$(open_status '{"path":"a.png"}')"
A=$(json_field id)
wait_state "$A" embedding ready 120 && ok "embedding of a.png ready (sizing model)" || bad "embedding not ready"
expect "whole-image box: no window" 200 "$(prompt "$A" '{"box":[400,400,470,460]}')"
body_has '"view":null' && ok "a box of ordinary size decodes in the whole-image input" || bad "view: $(head -c 300 "$TMP/body")"
expect "small box prompt" 200 "$(prompt "$A" '{"box":[500,500,510,511]}')"
VIEW=$(sed -n 's/.*"view":\[\([0-9,]*\)\].*/\1/p' "$TMP/body")
echo "$VIEW" | awk -F, '{exit !($3==256 && $1<=500 && $1+$3>=510 && $2<=500 && $2+$3>=511)}' &&
    ok "small box: decoded in a 256 px window around it ($VIEW)" || bad "small box view '$VIEW': $(head -c 300 "$TMP/body")"
body_has '"view_encoded":true' && ok "the window was encoded for it" || bad "window not encoded"
rle_ok && ok "window mask: run lengths match its box and area" || bad "window mask RLE inconsistent"
BBW=$(sed -n 's/.*"bbox":\[\([0-9,]*\)\].*/\1/p' "$TMP/body")
echo "$BBW $VIEW" | awk '{split($1,b,","); split($2,v,",");
    exit !(b[1]==b[3] || b[1]>=v[1] && b[2]>=v[2] && b[3]<=v[1]+v[3] && b[4]<=v[2]+v[3])}' &&
    ok "window mask lies in its window ($BBW)" || bad "window mask $BBW outside $VIEW"
sed 's/"decode_ms".*//; s/"ref":[0-9]*//' "$TMP/body" >"$TMP/win1.json"
WREF=$(json_field ref)
expect "small box again" 200 "$(prompt "$A" '{"box":[500,500,510,511]}')"
body_has '"view_encoded":false' && ok "its window is kept: no second encoding" || bad "window encoded again"
sed 's/"decode_ms".*//; s/"ref":[0-9]*//; s/"view_encoded":false/"view_encoded":true/' "$TMP/body" >"$TMP/win2.json"
cmp -s "$TMP/win1.json" "$TMP/win2.json" && ok "the kept window gives the same mask" || bad "kept window: another mask"
expect "nearby small box" 200 "$(prompt "$A" '{"box":[520,505,531,515]}')"
body_has "\"view\":\[$VIEW\]" && body_has '"view_encoded":false' && ok "a nearby cell shares the window" ||
    bad "nearby box: $(head -c 300 "$TMP/body")"
expect "refinement in the window" 200 "$(prompt "$A" "{\"box\":[500,500,510,511],\"points\":[[505,505,1]],\"mask_input\":{\"ref\":$WREF,\"index\":0}}")"
body_has '"mask_input_used":true' && body_has "\"view\":\[$VIEW\]" && ok "refinement decodes in the mask's window" ||
    bad "refinement view: $(head -c 300 "$TMP/body")"
expect "small box in the corner" 200 "$(prompt "$A" '{"box":[0,0,9,9]}')"
body_has '"view":\[0,0,256\]' && ok "a corner window starts at the image's corner" || bad "corner: $(head -c 300 "$TMP/body")"
# large cells on a small image: a 190 px box on the 256 px b.png (760 network px whole) is
# decoded at zoom 2^-1.5 in a 2897 px window, the image edge-padded; the mask stays inside
expect "open sub/b.png (sizing model)" 200 "$(open_status '{"path":"sub/b.png"}')"
B=$(json_field id)
wait_state "$B" embedding ready 120 && ok "embedding of b ready (sizing model)" || bad "embedding of b not ready"
expect "large box on a small image" 200 "$(prompt "$B" '{"box":[10,10,200,200]}')"
body_has '"view":\[0,0,2897\]' && ok "large cell: the padded image seen at its cell size" || bad "view: $(head -c 300 "$TMP/body")"
BBL=$(sed -n 's/.*"bbox":\[\([0-9,]*\)\].*/\1/p' "$TMP/body")
echo "$BBL" | awk -F, '{exit !($3<=256 && $4<=256)}' && rle_ok && ok "its mask lies in the image ($BBL)" ||
    bad "large-box mask $BBL"
kill -TERM $PID
wait $PID
expect "the sizing model's server stops cleanly" 0 $?
PID=
if grep -q 'ERROR: AddressSanitizer\|runtime error:\|LeakSanitizer' "$TMP/err2"; then
    bad "sanitizer report (sizing model): $(grep -m3 'ERROR\|runtime error' "$TMP/err2")"
fi

echo "cli_server: $PASS passed, $FAIL failed"
[ $FAIL = 0 ]
