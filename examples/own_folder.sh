#!/usr/bin/env bash
# Train on a folder of images with same-stem .txt captions (photos/cat.jpg + photos/cat.txt).
# Usage: examples/own_folder.sh PHOTOS_DIR [RUN_DIR]
set -euo pipefail
photos=${1:?usage: $0 PHOTOS_DIR [RUN_DIR]}
run=${2:-runs/own-folder}
dalle build-shards "$photos" --run "$run" --size 128
dalle tokenize --run "$run"
dalle train-dvae --run "$run" --preset small-vq
dalle encode --run "$run"
dalle encode --run "$run" --preview 16          # look at DIR/dvae/preview/grid.png
dalle train-prior --run "$run" --preset small --schedule cosine
dalle train-clip --run "$run"
dalle sample "a photo of a cat" --run "$run" --n 16 --rerank 4 --guidance 2
