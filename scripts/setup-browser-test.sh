#!/bin/sh
# Installs what the browser test of `cellsam serve` needs (tests/cli_browser.sh):
# Debian's chromium, node and npm, curl, then playwright-core from npm (tests/browser,
# pinned by package-lock.json; the Debian chromium is used, no browser is downloaded).
# Run as root (or with sudo). Safe to run again.
set -eu
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
need=""
[ -x /usr/bin/chromium ] || need="$need chromium"
command -v node >/dev/null 2>&1 || need="$need nodejs"
command -v npm >/dev/null 2>&1 || need="$need npm"
command -v curl >/dev/null 2>&1 || need="$need curl"
if [ -n "$need" ]; then
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
# playwright-core must not fetch browsers of its own
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
echo "browser test ready: $(/usr/bin/chromium --version 2>/dev/null | head -1), node $(node --version)"
