#!/usr/bin/env bash
# Train from a CSV manifest: one row per image, a path (relative to the CSV) or an http(s) URL, and a caption.
#   image,caption
#   images/0001.jpg,a red bicycle leaning on a wall
#   https://example.org/0002.jpg,two dogs on a beach
# Usage: examples/csv_manifest.sh captions.csv [RUN_DIR]
set -euo pipefail
csv=${1:?usage: $0 MANIFEST.csv [RUN_DIR]}
run=${2:-runs/csv}
dalle build-shards "$csv" --image-column image --caption-column caption --run "$run" --size 128 \
    --timeout 10 --retries 2 --max-error-rate 0.2
cat "$run/shards/manifest.json"                 # counts per split and rejects by reason
dalle tokenize --run "$run"
dalle train-dvae --run "$run" --preset small-vq
dalle encode --run "$run"
dalle train-prior --run "$run" --preset small --schedule cosine
dalle sample "a red bicycle" --run "$run" --n 8
