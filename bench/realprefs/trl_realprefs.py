"""TRL 1.16's RewardTrainer on the real preference pairs, then every held-out pair scored.

Run: python trl_realprefs.py MODEL_DIR DATA_DIR STEPS BATCH MAX_LENGTH SCORES_JSONL [--lora] [--bf16]
Settings as ../../../shared/bench/trl_reward.py (the seed's LoRA r 16, alpha 16, SEQ_CLS, lr 1e-4,
adamw_torch, seed 0, 2 threads) with MAX_LENGTH in place of 128.

TRL drops every pair with a sequence longer than max_length, from training and from its own
evaluation; this prints how many it kept. Its own `eval_accuracy` is a mean of per-batch means
over the kept pairs, so instead of `trainer.evaluate()` the script scores each of the held-out
pairs itself (batch of one,
ids exactly as TRL tokenises them, checked against its dataset for the kept pairs) and writes
one row a pair to SCORES_JSONL: {"i", "chosen_len", "rejected_len", "fits", "chosen_score",
"rejected_score"}. Over-long pairs are scored on their last MAX_LENGTH tokens (the prompt cut
from its start, as rlhf's `truncation_mode = "keep_end"`), so the model can be compared on all
pairs and on the fitting subset. Prints one JSON line.
"""
import json, resource, sys, tempfile, time
import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer
from trl.data_utils import _tokenize

model_dir, data_dir = sys.argv[1], sys.argv[2]
steps, batch, max_length, scores_path = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
lora, bf16 = "--lora" in sys.argv, "--bf16" in sys.argv
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(model_dir)
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
model.config.pad_token_id = tok.pad_token_id
ds = load_dataset("json", data_files={"train": f"{data_dir}/train.jsonl", "test": f"{data_dir}/test.jsonl"})
peft_config = None
if lora:
    from peft import LoraConfig
    peft_config = LoraConfig(r=16, lora_alpha=16, bias="none", task_type="SEQ_CLS", modules_to_save=["score"])
with tempfile.TemporaryDirectory() as out:
    args = RewardConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                        per_device_eval_batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-4,
                        optim="adamw_torch", logging_steps=10, save_strategy="no", report_to="none",
                        eval_strategy="no", max_length=max_length, use_cpu=True, bf16=bf16,
                        gradient_checkpointing=False, disable_tqdm=True, seed=0)
    trainer = RewardTrainer(model=model, args=args, processing_class=tok, train_dataset=ds["train"],
                            eval_dataset=ds["test"], peft_config=peft_config)
    kept_train, kept_eval = len(trainer.train_dataset), len(trainer.eval_dataset)
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    tokens = trainer._total_train_tokens

    # Every held-out pair, scored one sequence at a time (no padding, so the head reads the
    # last token, as it does in a padded batch).
    net = trainer.model.eval()
    kept = iter(trainer.eval_dataset)
    rows, correct_all, correct_fit, n_fit = [], 0, 0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i, ex in enumerate(ds["test"]):
            ids = {k: _tokenize(tok, ex["prompt"] + ex[k])["input_ids"] for k in ("chosen", "rejected")}
            fits = all(len(v) <= max_length for v in ids.values())
            if fits:
                k = next(kept)
                assert k["chosen_ids"] == ids["chosen"] and k["rejected_ids"] == ids["rejected"], i
            score = {k: net(input_ids=torch.tensor([v[-max_length:]])).logits[0, 0].float().item()
                     for k, v in ids.items()}
            win = score["chosen"] > score["rejected"]
            correct_all += win
            if fits:
                n_fit += 1
                correct_fit += win
            rows.append({"i": i, "chosen_len": len(ids["chosen"]), "rejected_len": len(ids["rejected"]),
                         "fits": fits, "chosen_score": score["chosen"], "rejected_score": score["rejected"]})
with open(scores_path, "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
print(json.dumps({"trainer": "trl-reward" + ("-lora" if lora else "") + ("-bf16" if bf16 else ""),
                  "steps": steps, "batch": batch, "max_length": max_length,
                  "train_pairs": len(ds["train"]), "train_pairs_kept": kept_train,
                  "epochs": round(steps * batch / max(kept_train, 1), 2),
                  "test_pairs": len(ds["test"]), "eval_pairs_kept": kept_eval,
                  "train_seconds": round(train_s, 2), "pairs_per_s": round(steps * batch / train_s, 3),
                  "tokens_per_s": round(tokens / train_s, 1),
                  "accuracy_all_keep_end": round(correct_all / len(rows), 4),
                  "accuracy_fitting": round(correct_fit / max(n_fit, 1), 4), "fitting_pairs": n_fit,
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
