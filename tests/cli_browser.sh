#!/bin/sh
# Browser test of `cellsam serve` (tests/browser/serve.test.mjs): headless Debian
# Chromium driven by playwright-core. Skipped (exit 0) when Chromium, node or
# tests/browser/node_modules are missing: scripts/setup-browser-test.sh installs them.
# usage: sh cli_browser.sh CELLSAM_BINARY TESTDATA_DIR DATA_DIR
# Artifacts (screenshot, exported files) go to <binary's folder>/test-artifacts/;
# with CELLSAM_UPDATE_SCREENSHOT=1 the screenshot is also copied to docs/screenshot.png.
CLI=$1
TESTDATA=$2
DATA=$3
HERE=$(cd "$(dirname "$0")" && pwd)
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ] || ! command -v node >/dev/null 2>&1 ||
    [ ! -f "$HERE/browser/node_modules/playwright-core/package.json" ]; then
    echo "cli_browser: skipped: chromium or node_modules missing (run scripts/setup-browser-test.sh)"
    exit 0
fi
ART=$(cd "$(dirname "$CLI")" && pwd)/test-artifacts
mkdir -p "$ART" || exit 1
export CHROMIUM
if [ -n "$CELLSAM_UPDATE_SCREENSHOT" ]; then
    mkdir -p "$HERE/../docs"
    exec node "$HERE/browser/serve.test.mjs" "$CLI" "$TESTDATA" "$DATA" "$ART" "$HERE/../docs/screenshot.png"
fi
exec node "$HERE/browser/serve.test.mjs" "$CLI" "$TESTDATA" "$DATA" "$ART"
