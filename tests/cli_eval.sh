#!/bin/sh
# cellsam eval end to end: every ground-truth label image of the shared data
# scored against itself, folder pairing by prediction name, and error exits.
# usage: sh cli_eval.sh CELLSAM_BINARY TESTDATA_DIR DATA_DIR
CLI=$1
DATA=$3
TMP=$(mktemp -d "${TMPDIR:-/tmp}/cellsam-cli-eval-XXXXXX") || exit 1
trap 'rm -rf "$TMP"' EXIT

fail() {
    echo "cli_eval: FAIL: $*"
    exit 1
}

# GT vs GT: F1 = 1 for every image that has cells. baby_brightfield holds one
# empty trap (evolve_testC) that scores 0 under the paper's NaN -> 0 rule, so
# its mean over 6 images is 5/6.
for d in dsb2018_stage1_test usiigaci_phase stardist_example baby_brightfield; do
    "$CLI" eval "$DATA/$d" "$DATA/$d" --json >"$TMP/out.json" 2>"$TMP/err.txt" ||
        fail "eval $d vs itself exited non-zero: $(cat "$TMP/err.txt")"
    [ -s "$TMP/err.txt" ] && fail "eval $d vs itself wrote to stderr: $(cat "$TMP/err.txt")"
    n=$(grep -c '"f1"' "$TMP/out.json")
    case $d in
    baby_brightfield)
        grep -q '"mean_f1": 0.8333333333' "$TMP/out.json" || fail "$d: mean_f1 is not 5/6"
        [ "$(grep -c '"f1": 1.0' "$TMP/out.json")" = 5 ] || fail "$d: expected 5 images with F1 1"
        ;;
    *)
        grep -q '"mean_f1": 1.0,' "$TMP/out.json" || fail "$d: mean_f1 is not 1"
        grep -q '"mean_ap": 1.0,' "$TMP/out.json" || fail "$d: mean_ap is not 1"
        ;;
    esac
    echo "cli_eval: $d: $n images scored against themselves"
done

# Pairing: three predictions named NAME_cp_masks.png; the other GT files of the
# folder have none and are reported on stderr.
DSB=$DATA/dsb2018_stage1_test
mkdir "$TMP/pred"
set --
for f in "$DSB"/*_masks.png; do
    [ $# -lt 3 ] || break
    [ -f "$f" ] && set -- "$@" "${f##*/}"
done
[ $# = 3 ] || fail "expected at least 3 masks in $DSB"
for f in "$@"; do cp "$DSB/$f" "$TMP/pred/${f%_masks.png}_cp_masks.png"; done
"$CLI" eval "$DSB" "$TMP/pred" >"$TMP/out.txt" 2>"$TMP/err.txt" || fail "pairing run exited non-zero"
grep -q 'mean F1 1.0000  mean AP 1.0000  over 3 images' "$TMP/out.txt" || fail "pairing: $(tail -1 "$TMP/out.txt")"
grep -q 'no prediction for GT' "$TMP/err.txt" || fail "unpaired GT files not reported"

# A wrong prediction of the right size scores below 1 (0/1 first two masks swapped).
cp "$DSB/$1" "$TMP/pred/${2%_masks.png}_cp_masks.png"
"$CLI" eval "$DSB/$2" "$TMP/pred" --json >"$TMP/out.json" 2>"$TMP/err.txt" || fail "swapped run exited non-zero"
grep -q '"mean_f1": 1.0,' "$TMP/out.json" && fail "a different image's mask scored F1 1"
grep -q '"n_images": 1' "$TMP/out.json" || fail "GT file + PRED folder did not pair one image"

# Errors: exit 1, one line on stderr, nothing on stdout.
expect_error() {
    want=$1
    shift
    "$CLI" eval "$@" >"$TMP/out.txt" 2>"$TMP/err.txt"
    rc=$?
    [ $rc = 1 ] || fail "eval $*: exit $rc, wanted 1"
    [ -s "$TMP/out.txt" ] && fail "eval $*: wrote to stdout on error"
    grep -q "$want" "$TMP/err.txt" || fail "eval $*: stderr lacks '$want': $(cat "$TMP/err.txt")"
    [ "$(wc -l <"$TMP/err.txt")" = 1 ] || fail "eval $*: error is not one line"
}
expect_error 'size mismatch' "$DSB/$1" "$DATA/usiigaci_phase/set01_masks.png"
expect_error 'cannot open' "$DSB/$1" "$TMP/missing.png"
expect_error 'not a PNG, TIFF or .npy' "$DSB/$1" "$DATA/README.md"
mkdir "$TMP/empty"
"$CLI" eval "$DSB" "$TMP/empty" >"$TMP/out.txt" 2>"$TMP/err.txt" && fail "nothing paired but exit 0"
[ -s "$TMP/out.txt" ] && fail "nothing paired but output on stdout"
grep -q 'error: no GT file in .* has a prediction' "$TMP/err.txt" || fail "nothing paired: no error line"

"$CLI" eval a >/dev/null 2>&1
[ $? = 2 ] || fail "missing PRED is not a usage error (2)"
"$CLI" eval --help | grep -q 'NAME_cp_masks' || fail "--help lacks the pairing rule"

echo "cli_eval: ok"
