#!/usr/bin/env bash
# Re-shard and resize img2dataset output (WebDataset tars with jpg + txt [+ json]) at the paper's 256 px.
# Usage: examples/img2dataset_shards.sh SHARD_DIR [RUN_DIR]
set -euo pipefail
shards=${1:?usage: $0 IMG2DATASET_OUTPUT_DIR [RUN_DIR]}
run=${2:-runs/img2dataset}
dalle build-shards "$shards" --source webdataset --run "$run" --size 256 --per-shard 5000 --dedup
dalle tokenize --run "$run" --vocab-size 16384
dalle train-dvae --run "$run" --preset paper
dalle encode --run "$run"
dalle train-prior --run "$run" --preset base
