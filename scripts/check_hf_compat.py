"""Loads what rlhf-rs saved (crates/rlhf-model/examples/export_check.rs) with transformers and
PEFT and compares their outputs with rlhf-rs's own.

    cargo run --release -p rlhf-model --example export_check -- /tmp/rlhf-export
    PY/bin/python scripts/check_hf_compat.py /tmp/rlhf-export     # PY: a venv with torch, transformers, peft
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

out = sys.argv[1]
expected = json.load(open(f"{out}/expected.json"))
worst = 0.0
for arch, e in expected.items():
    ids = torch.tensor(e["input_ids"])
    mask = torch.tensor(e["attention_mask"])
    # 1. base checkpoint + our PEFT adapter (LoRA + score head in modules_to_save)
    base = AutoModelForSequenceClassification.from_pretrained(e["base"], num_labels=1)
    peft = PeftModel.from_pretrained(base, f"{out}/{arch}/adapter").eval()
    with torch.no_grad():
        s_peft = peft(input_ids=ids, attention_mask=mask).logits[:, 0]
    # 2. our merged reward model as AutoModelForSequenceClassification
    merged = AutoModelForSequenceClassification.from_pretrained(f"{out}/{arch}/merged-rm").eval()
    with torch.no_grad():
        s_merged = merged(input_ids=ids, attention_mask=mask).logits[:, 0]
    # 3. our fully fine-tuned LM as AutoModelForCausalLM, tokenizer too
    lm = AutoModelForCausalLM.from_pretrained(f"{out}/{arch}/full-lm").eval()
    AutoTokenizer.from_pretrained(f"{out}/{arch}/full-lm")
    with torch.no_grad():
        first = lm(input_ids=ids, attention_mask=mask).logits[:, 0].flatten()
    want = torch.tensor(e["scores"])
    d = [
        (s_peft - want).abs().max().item(),
        (s_merged - want).abs().max().item(),
        (first - torch.tensor(e["first_logits"])).abs().max().item(),
    ]
    worst = max(worst, *d)
    print(f"{arch}: peft adapter {d[0]:.2e}  merged reward model {d[1]:.2e}  full LM logits {d[2]:.2e}")
print("max abs diff", worst)
sys.exit(0 if worst < 1e-4 else 1)
