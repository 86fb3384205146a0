#!/usr/bin/env bash
# Multi-GPU training through Accelerate: one process per GPU on this node, or several nodes.
# Usage: examples/multi_gpu.sh RUN_DIR [GPUS] [NODES NODE_RANK MAIN_ADDRESS]
# RUN_DIR needs shards and a tokenizer first (dalle build-shards, dalle tokenize: see README). The last step
# samples the captions of ./prompts.txt (one per line; PROMPTS=FILE for another file).
set -euo pipefail
run=${1:?usage: $0 RUN_DIR [GPUS] [NODES NODE_RANK MAIN_ADDRESS]}
gpus=${2:-8}
if [ $# -ge 5 ]; then
    multi=(--nodes "$3" --node-rank "$4" --main-address "$5")   # run the same line on every node
else
    multi=()
fi
dalle train-dvae --run "$run" --preset paper --gpus "$gpus" "${multi[@]}"
dalle encode --run "$run" --gpus "$gpus"
dalle train-prior --run "$run" --preset base --gpus "$gpus" "${multi[@]}" --global-batch 512 --precision bf16
dalle train-clip --run "$run" --gpus "$gpus" "${multi[@]}"   # the reranker of the next step
dalle sample --prompts "${PROMPTS:-prompts.txt}" --run "$run" --n 64 --rerank 8 --gpus "$gpus"
