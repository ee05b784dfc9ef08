"""References for `bf16 = true` (issue #20): what torch's CPU autocast computes.

For the tiny checkpoints in ../shared/fixtures/models, the logits of each golden batch under
`torch.autocast("cpu", dtype=torch.bfloat16)` (the products in bf16, as transformers'
`bf16=True` runs them on a CPU), and how far they are from the fp32 logits. For llama-gqa, what
TRL's RewardTrainer and DPOTrainer log over 3 steps with `bf16=True` (the settings of the
shared trl/ fixtures otherwise).

Run from the repository root:
    python crates/rlhf-model/tests/data/make_bf16_fixtures.py ../shared/fixtures \
        crates/rlhf-model/tests/data crates/rlhf-train/tests/data
(torch 2.15, transformers 5.25, TRL 1.16, CPU.) Writes bf16_autocast.json into the first
directory and bf16_trl.json into the second.
"""
import json, os, sys, tempfile

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, TrainerCallback)
import transformers
import trl
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

FIXTURES, OUT, OUT_TRAIN = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(2)
torch.manual_seed(0)


def logits_case(arch):
    g = json.load(open(os.path.join(FIXTURES, "models", arch, "golden.json")))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "models", arch)).eval()
    ids = torch.tensor(g["input_ids"])
    mask = torch.tensor(g["attention_mask"])
    with torch.no_grad():
        f32 = model(input_ids=ids, attention_mask=mask).logits.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ac = model(input_ids=ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    gap = (ac - f32).abs()[keep].max().item()
    return {"logits_autocast": [[[round(v, 6) for v in row] for row in seq] for seq in ac.tolist()],
            "max_abs_autocast_vs_f32": gap}


def long_case(arch):
    """One 80-token sequence (random ids, seed 0): attention's products then have more than 64
    rows. The logits of positions 64..80 under autocast, and their spread from fp32."""
    model = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "models", arch)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f32 = model(input_ids=ids).logits.float()[:, 64:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ac = model(input_ids=ids).logits.float()[:, 64:]
    # One training step's gradients (full fine-tuning, next-token loss), autocast against
    # fp32: their relative L2 distance over all weights.
    def grads(autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    g32, g16 = grads(False), grads(True)
    grad_rel = ((g16 - g32).norm() / g32.norm()).item()
    return {"input_ids": ids.tolist(), "from": 64, "grad_rel_autocast_vs_f32": grad_rel,
            "logits_autocast": [[[round(v, 6) for v in row] for row in seq] for seq in ac.tolist()],
            "max_abs_autocast_vs_f32": (ac - f32).abs().max().item()}


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.logs.append({"step": state.global_step, **{k: float(v) for k, v in logs.items()}})


def settings(out, bf16):
    return dict(output_dir=out, per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none", seed=0,
                gradient_checkpointing=False, train_sampling_strategy="sequential", use_cpu=True,
                disable_tqdm=True, bf16=bf16)


def trainer_case(kind, bf16):
    shared = json.load(open(os.path.join(FIXTURES, "trl", f"{kind}-llama-gqa.json"
                                         if kind == "reward" else "dpo-llama-gqa-sigmoid.json")))
    rows = shared["pairs"]
    rec = Recorder()
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "reward":
            d = os.path.join(FIXTURES, "models", "llama-gqa-reward")
            model = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1)
            args = RewardConfig(**settings(tmp, bf16), max_length=64)
            t = RewardTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(d),
                              train_dataset=Dataset.from_list(rows), callbacks=[rec])
        else:
            d = os.path.join(FIXTURES, "models", "llama-gqa")
            model = AutoModelForCausalLM.from_pretrained(d)
            args = DPOConfig(**settings(tmp, bf16), beta=0.1, loss_type="sigmoid", max_length=64)
            t = DPOTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(d),
                           train_dataset=Dataset.from_list(rows), callbacks=[rec])
        t.train()
    return rec.logs


def main():
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(OUT_TRAIN, exist_ok=True)
    ref = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    logits = {"reference": ref, "archs": {a: logits_case(a) for a in ["llama-gqa", "qwen2", "gpt2", "opt"]}}
    logits["long"] = {a: long_case(a) for a in ["llama-gqa", "gpt2"]}
    for a, c in list(logits["archs"].items()) + list(logits["long"].items()):
        print(a, "autocast vs f32:", c["max_abs_autocast_vs_f32"], c.get("grad_rel_autocast_vs_f32", ""))
    json.dump(logits, open(os.path.join(OUT, "bf16_autocast.json"), "w"))
    runs = {"reference": ref, "settings": {k: v for k, v in settings("x", True).items() if k != "output_dir"}}
    for kind in ["reward", "dpo"]:
        runs[kind] = {"bf16": trainer_case(kind, True), "fp32": trainer_case(kind, False)}
        print(kind, "bf16", [round(s["loss"], 6) for s in runs[kind]["bf16"]],
              "fp32", [round(s["loss"], 6) for s in runs[kind]["fp32"]])
    json.dump(runs, open(os.path.join(OUT_TRAIN, "bf16_trl.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
