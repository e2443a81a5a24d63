#!/usr/bin/env bash
# Set up everything on a fresh machine, idempotently: a virtual environment in .venv with the CPU
# build of torch, phi4flash with every extra, and (as root on Debian) chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: chromium for the browser tests, g++ for phi4flash's optional C++ CPU kernels.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && { ! [ -x /usr/bin/chromium ] || ! command -v g++ >/dev/null; }; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium g++ >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The pinned CPU wheel first: an open range would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[demo,langchain,serve,ray,train,hf,test]"
# Build the C++ CPU kernels now (about a minute, once per machine) so that no first request waits for them;
# without a compiler this says so and phi4flash runs on its pure PyTorch path.
python -m phi4flash.native || echo "phi4flash: C++ CPU kernels not built; the pure PyTorch path will run"
