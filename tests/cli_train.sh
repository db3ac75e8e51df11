#!/bin/sh
# cellsam train / finetune end to end on three real training pairs: a tiny model
# trains, its checkpoint loads and segments, resume continues the step count,
# fine-tuning starts from the trained file, over-fitting one image lowers the
# loss, and bad arguments exit with one error line.
# usage: sh cli_train.sh CELLSAM_BINARY TESTDATA_DIR DATA_DIR
CLI=$1
DATA=$3
TRAIN=$DATA/../train/dsb2018_stage1_train
TMP=$(mktemp -d "${TMPDIR:-/tmp}/cellsam-cli-train-XXXXXX") || exit 1
trap 'rm -rf "$TMP"' EXIT
PASS=0
fail() {
    echo "cli_train: FAIL: $*"
    exit 1
}
ok() {
    PASS=$((PASS + 1))
    echo "cli_train: ok: $*"
}

mkdir -p "$TMP/data"
for n in 0280fa8f60f6bcae0f97d93c28f60be194f9309ff610dc5845e60455b0f87c21 \
    03398329ced0c23b9ac3fac84dd53a87d9ffe4d9d10f1b5fe8df8fac12380776 \
    003cee89357d9fe13516167fd67b609a164651b21934585648c740d2c3d86dc1; do
    cp "$TRAIN/${n}_img.png" "$TRAIN/${n}_masks.png" "$TMP/data/" || fail "training pair $n missing"
done

# from scratch: 2 steps of 1 image, validation on the held-out third
"$CLI" train --data "$TMP/data" --arch tiny --steps 2 --batch 1 --prompts 2 --val-fraction 0.34 \
    --threads 2 --out "$TMP/m.safetensors" 2>"$TMP/log" || fail "train exited non-zero: $(tail -3 "$TMP/log")"
[ -s "$TMP/m.safetensors" ] && [ -s "$TMP/m.safetensors.state" ] || fail "no model or state written"
grep -q "step 2/2 loss" "$TMP/log" || fail "no progress line for step 2: $(cat "$TMP/log")"
grep -q "validation F1@0.5" "$TMP/log" || fail "no validation line: $(cat "$TMP/log")"
ok "train --arch tiny: 2 steps, model + optimiser state, progress and validation lines"
"$CLI" info "$TMP/m.safetensors" | grep -q "^box NMS       0\.2 " || fail "a dense-target model does not record its box NMS"
ok "the model trained with dense targets records box NMS 0.2 in its metadata"

"$CLI" segment -m "$TMP/m.safetensors" "$TMP/data/0280fa8f60f6bcae0f97d93c28f60be194f9309ff610dc5845e60455b0f87c21_img.png" \
    -o "$TMP/pred.png" --quiet 2>"$TMP/err" || fail "segment with the trained model failed: $(cat "$TMP/err")"
[ -s "$TMP/pred.png" ] || fail "no label image"
ok "the trained checkpoint loads (head counts from its metadata) and segments"

"$CLI" train --data "$TMP/data" --arch tiny --steps 3 --batch 1 --prompts 2 --val-fraction 0.34 --threads 2 \
    --out "$TMP/m.safetensors" --resume 2>"$TMP/log2" || fail "resume failed: $(tail -3 "$TMP/log2")"
grep -q "resuming .* at step 2" "$TMP/log2" || fail "resume did not start at step 2: $(head -3 "$TMP/log2")"
grep -q "step 3/3 loss" "$TMP/log2" || fail "resume did not reach step 3"
grep -q "step 1/3 loss" "$TMP/log2" && fail "resume repeated step 1"
ok "--resume continues at the saved step"

# samples at cell size: the model then records that cell diameter and sizing per image
"$CLI" info "$TMP/m.safetensors" | grep -q "^cell sizing   per image" && fail "the tiny model already sizes cells"
"$CLI" finetune -m "$TMP/m.safetensors" --data "$TMP/data" --steps 1 --batch 1 --val-fraction 0 --no-decoder \
    --cell-diameter 80 --threads 2 --out "$TMP/z.safetensors" 2>"$TMP/logz" ||
    fail "finetune --cell-diameter failed: $(tail -3 "$TMP/logz")"
"$CLI" info "$TMP/z.safetensors" | grep -q "^cell diameter 80 px" || fail "--cell-diameter 80 not recorded"
"$CLI" info "$TMP/z.safetensors" | grep -q "^cell sizing   per image" || fail "--cell-diameter did not record sizing"
"$CLI" finetune -m "$TMP/m.safetensors" --data "$TMP/data" --steps 1 --cell-diameter 3 \
    --out "$TMP/y.safetensors" 2>"$TMP/e"
[ $? = 2 ] && [ "$(wc -l <"$TMP/e")" = 1 ] && grep -q "cell-diameter" "$TMP/e" || fail "--cell-diameter 3: $(cat "$TMP/e")"
ok "finetune --cell-diameter records the cell size and sizing; 3 px is refused in one line"

# fine-tuning from the trained file (given whole-image and cell-size hints first):
# frozen encoders, cached features
"$CLI" convert "$TMP/m.safetensors" "$TMP/m.safetensors.tmp" --whole-image-max-side 1024 --cell-diameter 48 \
    --diameter auto \
    2>/dev/null && mv "$TMP/m.safetensors.tmp" "$TMP/m.safetensors" || fail "convert with hints failed"
"$CLI" convert "$TMP/m.safetensors" "$TMP/bad.safetensors" --cell-diameter 2 2>"$TMP/err" && fail "--cell-diameter 2 accepted"
grep -q "cell-diameter" "$TMP/err" || fail "--cell-diameter 2: no message naming the option"
"$CLI" finetune -m "$TMP/m.safetensors" --data "$TMP/data" --steps 2 --batch 1 --prompts 2 --val-fraction 0.34 \
    --threads 2 --out "$TMP/f.safetensors" 2>"$TMP/log3" || fail "finetune failed: $(tail -3 "$TMP/log3")"
grep -q "step 2/2 loss" "$TMP/log3" || fail "finetune made no steps"
ok "finetune -m CKPT runs with frozen encoders"
"$CLI" info "$TMP/f.safetensors" | grep -q "^box NMS       0\.2 " || fail "finetuning lost the detector's box NMS hint"
ok "finetuning keeps the detector's box NMS hint"

# finetune's detector targets follow the starting model: those recorded in its metadata
# (cellsam.detector_targets, written by every run that trains the detector); else dense for a
# model that recommends a box NMS (the bundled model, trained one-to-many before the record
# existed) and Hungarian for one that does not (the official checkpoint: the testdata one).
# The first step's detector loss equals that of the explicit choice, and differs between them.
SRC=$(cd "$(dirname "$0")/.." && pwd)
cp "$SRC/models/cellsam-small.safetensors" "$TMP/b.safetensors" || fail "no bundled model"
# (without its config.json the tiny testdata model loads with 1 ViT head instead of 2: a
# different function, but as good a model without metadata for choosing the targets)
cp "$2/checkpoint.safetensors" "$TMP/official.safetensors" || fail "no testdata checkpoint"
"$CLI" convert "$TMP/m.safetensors" "$TMP/h.safetensors" --box-nms 0 2>/dev/null || fail "convert --box-nms 0 failed"
finetune_1() { # SRC MATCHING: one detector step from $TMP/SRC.safetensors to $TMP/t_SRCMATCHING
    "$CLI" finetune -m "$TMP/$1.safetensors" --data "$TMP/data" --steps 1 --batch 1 --val-fraction 0 --no-decoder \
        --seed 5 --matching "$2" --threads 2 --out "$TMP/t_$1$2.safetensors" 2>"$TMP/t_$1$2.log" ||
        fail "finetune --matching $2 from $1 failed: $(tail -3 "$TMP/t_$1$2.log")"
}
for run in m:model m:dense m:hungarian h:model official:model official:hungarian b:model; do finetune_1 "${run%%:*}" "${run##*:}"; done
cp "$TMP/t_mhungarian.safetensors" "$TMP/r.safetensors" # a Hungarian fine-tune of a box-NMS model
finetune_1 r model
expect_log() { grep -q "detector targets: $2, as the starting model's ($3" "$TMP/t_$1.log" ||
    fail "$1: expected \"$2 ($3\": $(head -3 "$TMP/t_$1.log")"; }
expect_log mmodel dense "recorded in its metadata"
expect_log hmodel dense "recorded in its metadata" # the record wins over a changed NMS hint
expect_log rmodel hungarian "recorded in its metadata"
expect_log bmodel dense "box NMS 0.15"
expect_log officialmodel hungarian "box NMS none"
"$CLI" info "$TMP/t_rmodel.safetensors" >"$TMP/info_r" || fail "the twice fine-tuned model does not load"
grep -q "^trained with  hungarian detector targets" "$TMP/info_r" || fail "info does not show the record: $(cat "$TMP/info_r")"
"$CLI" info "$TMP/b.safetensors" | grep -q "^trained with" && fail "info shows a record the bundled model lacks"
det_loss() { sed -n 's/.*step 1\/1 loss .* det \([0-9.]*\)).*/\1/p' "$TMP/t_$1.log"; }
[ -n "$(det_loss mmodel)" ] && [ "$(det_loss mmodel)" = "$(det_loss mdense)" ] ||
    fail "default targets of a dense-trained model: det loss $(det_loss mmodel), dense $(det_loss mdense)"
[ "$(det_loss mdense)" != "$(det_loss mhungarian)" ] || fail "dense and Hungarian targets gave the same loss"
[ -n "$(det_loss officialmodel)" ] && [ "$(det_loss officialmodel)" = "$(det_loss officialhungarian)" ] ||
    fail "default targets of the official checkpoint: det loss $(det_loss officialmodel), Hungarian $(det_loss officialhungarian)"
ok "finetune's default detector targets follow the starting model (its record; else dense with box NMS, else Hungarian)"
"$CLI" info "$TMP/f.safetensors" | grep -q "^whole image   up to 1024 px" || fail "finetuning lost the whole-image hint"
ok "finetuning keeps the model's whole-image hint"
"$CLI" info "$TMP/f.safetensors" | grep -q "^cell diameter 48 px" || fail "finetuning lost the cell-diameter hint"
ok "finetuning keeps the model's cell diameter"
"$CLI" info "$TMP/f.safetensors" | grep -q "^cell sizing   per image" || fail "finetuning lost the cell-sizing hint"
ok "finetuning keeps the model's cell sizing"

# more anchors: a fresh grid, every other tensor of the head kept
"$CLI" finetune -m "$TMP/m.safetensors" --data "$TMP/data" --steps 1 --batch 1 --val-fraction 0 --threads 2 \
    --no-decoder --matching dense --queries 144 --lr 1e-9 --out "$TMP/q.safetensors" 2>"$TMP/logq" ||
    fail "finetune --queries failed: $(tail -3 "$TMP/logq")"
"$CLI" info "$TMP/q.safetensors" | grep -q "cellfinder    144 queries" || fail "--queries 144 not applied"
"$CLI" info "$TMP/m.safetensors" | grep -q "cellfinder    144 queries" && fail "the tiny test model already had 144 queries"
ok "finetune --queries re-lays the anchors"

# a fresh detector head on a trunk started from the SAM encoder, detector only
"$CLI" finetune -m "$TMP/m.safetensors" --data "$TMP/data" --steps 1 --batch 1 --val-fraction 0 --threads 2 \
    --no-decoder --train-encoders --reset-detector-head --trunk-from-sam --matching anchor \
    --out "$TMP/d.safetensors" 2>"$TMP/log5" || fail "detector re-training failed: $(tail -3 "$TMP/log5")"
grep -q "trunk initialised from the SAM encoder (.* tensors)" "$TMP/log5" || fail "trunk not copied: $(head -2 "$TMP/log5")"
grep -q "mask 0.0000 iou 0.0000 det" "$TMP/log5" || fail "--no-decoder still trained the decoder"
"$CLI" info "$TMP/d.safetensors" >/dev/null 2>&1 || fail "the re-trained detector checkpoint does not load"
ok "finetune --reset-detector-head --trunk-from-sam --no-decoder"

# the CellFinder of one run joined to the SAM branch of another
"$CLI" finetune -m "$TMP/f.safetensors" --detector-from "$TMP/d.safetensors" --data "$TMP/data" --steps 1 --batch 1 \
    --prompts 2 --val-fraction 0 --no-detector --threads 2 --out "$TMP/c.safetensors" 2>"$TMP/log6" ||
    fail "--detector-from failed: $(tail -3 "$TMP/log6")"
grep -q "CellFinder taken from .*d.safetensors ([0-9]* tensors)" "$TMP/log6" || fail "detector not taken: $(head -3 "$TMP/log6")"
"$CLI" finetune -m "$TMP/f.safetensors" --detector-from "$2/checkpoint.safetensors" --data "$TMP/data" --steps 1 \
    --out "$TMP/y.safetensors" 2>"$TMP/e"
[ $? = 1 ] && [ "$(wc -l <"$TMP/e")" = 1 ] && grep -q "detector-from.*\(shape\|heads\)" "$TMP/e" ||
    fail "--detector-from with other shapes: $(cat "$TMP/e")"
[ -e "$TMP/y.safetensors" ] && fail "an output was written after the error"
# ... and trains that CellFinder on its own trunk's features: the first detector loss equals that
# of a run started from the same CellFinder directly (d's trunk differs from f's)
for run in direct joined; do
    if [ $run = direct ]; then src="-m $TMP/d.safetensors"; else src="-m $TMP/f.safetensors --detector-from $TMP/d.safetensors"; fi
    # shellcheck disable=SC2086
    "$CLI" finetune $src --data "$TMP/data" --steps 1 --batch 1 --val-fraction 0 --no-decoder --seed 5 \
        --threads 2 --out "$TMP/$run.safetensors" 2>"$TMP/$run.log" || fail "$run detector run failed: $(tail -3 "$TMP/$run.log")"
done
l_direct=$(sed -n 's/.*step 1\/1 loss .* det \([0-9.]*\)).*/\1/p' "$TMP/direct.log")
l_joined=$(sed -n 's/.*step 1\/1 loss .* det \([0-9.]*\)).*/\1/p' "$TMP/joined.log")
[ -n "$l_direct" ] && [ "$l_direct" = "$l_joined" ] || fail "--detector-from trained on other features: det loss $l_joined, direct $l_direct"
ok "finetune --detector-from joins branches; mismatched shapes are one error line"

# a widened CellFinder trunk (convert --widen-trunk: twice the width, the same function) loads,
# fine-tunes with its trunk trained, and segments; the factor is checked
"$CLI" convert "$TMP/m.safetensors" "$TMP/w.safetensors" --widen-trunk 2 2>"$TMP/e" ||
    fail "convert --widen-trunk 2: $(cat "$TMP/e")"
"$CLI" info "$TMP/m.safetensors" | grep -q "^cellfinder .*; trunk dim 32, mlp 128$" || fail "info: $("$CLI" info "$TMP/m.safetensors")"
"$CLI" info "$TMP/w.safetensors" | grep -q "^cellfinder .*; trunk dim 64, mlp 256$" || fail "info: $("$CLI" info "$TMP/w.safetensors")"
"$CLI" finetune -m "$TMP/w.safetensors" --data "$TMP/data" --steps 1 --batch 1 --val-fraction 0 --no-decoder \
    --train-encoders --threads 2 --out "$TMP/w2.safetensors" 2>"$TMP/logw" ||
    fail "finetune of a widened trunk: $(tail -3 "$TMP/logw")"
n_params() { sed -n 's/^training \([0-9]*\) parameters.*/\1/p' "$1"; }
[ -n "$(n_params "$TMP/logw")" ] && [ "$(n_params "$TMP/logw")" -gt "$(n_params "$TMP/t_mmodel.log")" ] ||
    fail "the widened model has $(n_params "$TMP/logw") parameters, the narrow one $(n_params "$TMP/t_mmodel.log")"
"$CLI" segment -m "$TMP/w2.safetensors" "$TMP/data/0280fa8f60f6bcae0f97d93c28f60be194f9309ff610dc5845e60455b0f87c21_img.png" \
    -o "$TMP/w2.png" --quiet 2>"$TMP/e" || fail "segment with the widened model: $(cat "$TMP/e")"
"$CLI" finetune -m "$TMP/w.safetensors" --data "$TMP/data" --steps 1 --matching dense --trunk-from-sam --out "$TMP/w3.safetensors" 2>"$TMP/e"
[ $? = 1 ] && [ "$(wc -l <"$TMP/e")" = 1 ] && grep -q "trunk-from-sam" "$TMP/e" && [ ! -e "$TMP/w3.safetensors" ] ||
    fail "--trunk-from-sam on a widened trunk: $(cat "$TMP/e")"
# a widened detector joined to a narrow model's SAM branch: the shapes come from the detector file
"$CLI" finetune -m "$TMP/m.safetensors" --detector-from "$TMP/w2.safetensors" --data "$TMP/data" --steps 1 --batch 1 \
    --val-fraction 0 --no-decoder --threads 2 --out "$TMP/wj.safetensors" 2>"$TMP/logwj" ||
    fail "finetune --detector-from a widened detector: $(tail -3 "$TMP/logwj")"
"$CLI" info "$TMP/wj.safetensors" | grep -q "^image encoder ViT dim 32,.*" && "$CLI" info "$TMP/wj.safetensors" |
    grep -q "^cellfinder .*; trunk dim 64, mlp 256$" || fail "joined model: $("$CLI" info "$TMP/wj.safetensors")"
"$CLI" segment -m "$TMP/wj.safetensors" "$TMP/data/0280fa8f60f6bcae0f97d93c28f60be194f9309ff610dc5845e60455b0f87c21_img.png" \
    -o "$TMP/wj.png" --quiet 2>"$TMP/e" || fail "segment with the joined model: $(cat "$TMP/e")"
"$CLI" convert "$TMP/m.safetensors" "$TMP/w5.safetensors" --widen-trunk 5 2>"$TMP/e"
[ $? = 2 ] && [ "$(wc -l <"$TMP/e")" = 1 ] && grep -q "widen-trunk" "$TMP/e" && [ ! -e "$TMP/w5.safetensors" ] ||
    fail "--widen-trunk 5: $(cat "$TMP/e")"
ok "convert --widen-trunk 2: a wider CellFinder trunk fine-tunes, joins a narrow SAM branch and segments ($(n_params "$TMP/logw") parameters)"

# over-fitting one image with the decoder alone lowers its loss
mkdir "$TMP/one"
cp "$TMP/data/0280fa8f60f6bcae0f97d93c28f60be194f9309ff610dc5845e60455b0f87c21_"* "$TMP/one/"
"$CLI" finetune -m "$TMP/m.safetensors" --data "$TMP/one" --val-fraction 0 --no-detector --steps 25 \
    --batch 1 --prompts 8 --lr 3e-3 --warmup 0 --seed 3 --threads 2 --out "$TMP/o.safetensors" 2>"$TMP/log4" ||
    fail "over-fit run failed: $(tail -3 "$TMP/log4")"
first=$(grep " loss " "$TMP/log4" | head -1 | sed 's/.* loss \([0-9.]*\).*/\1/')
last=$(grep " loss " "$TMP/log4" | tail -3 | sed 's/.* loss \([0-9.]*\).*/\1/' | sort -n | head -1)
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < 0.8 * a) }' ||
    fail "loss did not fall by 20% over 25 steps on one image ($first -> $last)"
ok "over-fitting one image: loss $first -> $last"

# the box prompt noise reaches the decoder: one step from the same seed, with exact boxes and with
# the default noise, gives two mask losses; out of range is a usage error
for jit in 0 0.1; do
    "$CLI" finetune -m "$TMP/m.safetensors" --data "$TMP/one" --val-fraction 0 --no-detector --steps 1 --batch 1 \
        --prompts 8 --seed 3 --box-jitter $jit --threads 2 --out "$TMP/j$jit.safetensors" 2>"$TMP/j$jit.log" ||
        fail "--box-jitter $jit: $(tail -3 "$TMP/j$jit.log")"
done
m0=$(sed -n 's/.*step 1\/1 loss .*(mask \([0-9.]*\) .*/\1/p' "$TMP/j0.log")
m1=$(sed -n 's/.*step 1\/1 loss .*(mask \([0-9.]*\) .*/\1/p' "$TMP/j0.1.log")
[ -n "$m0" ] && [ -n "$m1" ] && [ "$m0" != "$m1" ] || fail "--box-jitter 0 and 0.1 gave the same mask loss ($m0, $m1)"
"$CLI" finetune -m "$TMP/m.safetensors" --data "$TMP/one" --box-jitter 0.6 --out "$TMP/x.safetensors" 2>"$TMP/e"
[ $? = 2 ] && [ "$(wc -l <"$TMP/e")" = 1 ] && grep -q "box-jitter" "$TMP/e" || fail "--box-jitter 0.6: $(cat "$TMP/e")"
ok "--box-jitter reaches the decoder's prompts (mask loss $m0 exact, $m1 jittered); 0.6 is refused"

# errors: one line, non-zero exit
"$CLI" train --arch tiny --out "$TMP/x.safetensors" >/dev/null 2>"$TMP/e"
[ $? = 2 ] || fail "train without --data should exit 2"
"$CLI" train --data "$TMP/absent" --out "$TMP/x.safetensors" 2>"$TMP/e"
[ $? = 1 ] && [ "$(wc -l <"$TMP/e")" = 1 ] || fail "missing data folder: $(cat "$TMP/e")"
"$CLI" train --data "$TMP/data" --arch huge --out "$TMP/x.safetensors" 2>"$TMP/e"
[ $? = 1 ] && grep -q "unknown architecture" "$TMP/e" || fail "unknown arch: $(cat "$TMP/e")"
printf 'not a checkpoint' >"$TMP/bad.safetensors"
"$CLI" finetune -m "$TMP/bad.safetensors" --data "$TMP/data" --out "$TMP/x.safetensors" 2>"$TMP/e"
[ $? = 1 ] && [ "$(wc -l <"$TMP/e")" = 1 ] || fail "corrupt checkpoint: $(cat "$TMP/e")"
mkdir "$TMP/nomask" && cp "$TMP/data/0280fa8f60f6bcae0f97d93c28f60be194f9309ff610dc5845e60455b0f87c21_img.png" "$TMP/nomask/"
"$CLI" train --data "$TMP/nomask" --out "$TMP/x.safetensors" 2>"$TMP/e"
[ $? = 1 ] && [ "$(wc -l <"$TMP/e")" = 1 ] || fail "folder without pairs: $(cat "$TMP/e")"
[ -e "$TMP/x.safetensors" ] && fail "a failed run left an output file"
ok "bad arguments and inputs: exit codes and one-line errors, no output left"

echo "cli_train: $PASS passed, 0 failed"
