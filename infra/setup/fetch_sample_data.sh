#!/usr/bin/env bash
# Real sample data from the package registries (no other network is reachable):
#   - Debian's dataset-fashion-mnist: 70k real 28x28 product images in 10 categories (MIT, Zalando)
#   - npm's @vendure/create: 54 real products (name, description, facets, variants, price) with photos
set -euo pipefail
RAW=${1:-data/raw}
mkdir -p "$RAW"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

if [ ! -f "$RAW/fashion-mnist/.ready" ]; then
  if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    echo "setup: installing dataset-fashion-mnist from apt"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
  [ -L "$RAW/fashion-mnist" ] && rm "$RAW/fashion-mnist"  # an older layout linked the folder itself
  src=$(dirname "$(dpkg -L dataset-fashion-mnist | grep 'train-images-idx3-ubyte.gz$')")
  mkdir -p "$RAW/fashion-mnist"
  for f in "$src"/*.gz; do ln -sf "$f" "$RAW/fashion-mnist/$(basename "$f")"; done
  touch "$RAW/fashion-mnist/.ready"
fi

if [ ! -f "$RAW/vendure/.ready" ]; then
  echo "setup: fetching @vendure/create@3.7.3 from npm (sample products and photos)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent @vendure/create@3.7.3 >/dev/null && tar xzf vendure-create-3.7.3.tgz)
  rm -rf "$RAW/vendure" && mkdir -p "$RAW/vendure"
  cp "$tmp/package/assets/products.csv" "$RAW/vendure/products.csv"
  cp -r "$tmp/package/assets/images" "$RAW/vendure/images"
  test "$(ls "$RAW/vendure/images" | wc -l)" -ge 54
  touch "$RAW/vendure/.ready"
fi
