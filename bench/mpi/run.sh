#!/usr/bin/env bash
# Data parallel over MPI (#19): the seed's LoRA reward job (SmolLM2-135M-Instruct, r 16,
# SEQ_CLS, max_length 128, lr 1e-4, STEPS steps, global batch 4, no evaluation) as 2 ranks × 1
# thread (per_device_train_batch_size 2 each) against 1 process × 2 threads (batch 4), on the
# same machine, one after the other; rank 0 logs the all-reduce's time per step.
#   bench/mpi/run.sh W [STEPS]
# W: a scratch folder with W/prefs (../shared/bench/make_prefs.py). Needs Open MPI
# (libopenmpi-dev openmpi-bin libclang-dev) and models/smollm2-135m-instruct.
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:?usage: run.sh W [STEPS]}; STEPS=${2:-30}
[ -f "$W/prefs/train.jsonl" ] || python3 ../shared/bench/make_prefs.py "$W/prefs"
cargo build --release --quiet -p rlhf --features mpi
lscpu | grep -E "Model name" >&2
conf() {
cat > "$W/mpi-bench-$1.toml" <<TOML
model = "$PWD/models/smollm2-135m-instruct"
train_file = "$W/prefs/train.jsonl"
output_dir = "$W/mpi-bench-$1"
overwrite_output_dir = true
max_steps = $STEPS
per_device_train_batch_size = $2
learning_rate = 1e-4
lr_scheduler_type = "linear"
logging_steps = 10
save_steps = 0
report_to = ["jsonl"]
max_length = 128
seed = 0
[lora]
r = 16
lora_alpha = 16
task_type = "SEQ_CLS"
modules_to_save = ["score"]
TOML
}
conf one 4; conf two 2
echo "== 1 process × 2 threads, batch 4" >&2
RAYON_NUM_THREADS=2 target/release/rlhf reward --config "$W/mpi-bench-one.toml" | python3 -c "import json,sys; s=json.loads(sys.stdin.read()); print(json.dumps({'run':'1 process x 2 threads','train_runtime':round(s['train_runtime'],2),'pairs_per_s':round($STEPS*4/s['train_runtime'],2),'train_loss':s['train_loss']}))"
echo "== 2 ranks × 1 thread, batch 2 each" >&2
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -np 2 \
  -x RAYON_NUM_THREADS=1 --bind-to core target/release/rlhf reward --config "$W/mpi-bench-two.toml" \
  | python3 -c "import json,sys; s=json.loads(sys.stdin.read()); print(json.dumps({'run':'2 ranks x 1 thread','train_runtime':round(s['train_runtime'],2),'pairs_per_s':round($STEPS*4/s['train_runtime'],2),'train_loss':s['train_loss']}))"
echo "== the all-reduce alone (922,176 floats, the job's LoRA gradients): shared memory, then TCP" >&2
for btl in self,vader self,tcp; do
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -np 2 \
    --mca btl $btl -x RAYON_NUM_THREADS=1 target/release/rlhf bench all-reduce
done
