#!/bin/sh
# Installs every Debian 12 package that cellsam's build, tests and tools need.
# Run as root (or with sudo). Safe to run again.
set -eu
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential cmake pkg-config clang libclang-rt-14-dev \
  libopenblas-openmp-dev \
  libcmocka-dev \
  libjansson-dev \
  libtiff-dev libpng-dev libjpeg-dev zlib1g-dev \
  libmicrohttpd-dev \
  curl \
  >/dev/null
