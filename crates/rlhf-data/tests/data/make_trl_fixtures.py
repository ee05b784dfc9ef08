"""Record what TRL's trainers make of a few rows, for tests/trl_parity.rs.

Writes trl_cases.json: for each case the rows given to a TRL trainer and the token columns its
dataset preparation produced (reward: chosen_ids/rejected_ids; sft: input_ids/labels; dpo:
prompt_ids/chosen_ids/rejected_ids). The tokenizer is shared/fixtures/models/gpt2's with a
small chat template (with {% generation %} markers) and, for the "bos" variant, a
post-processor that prepends BOS, so that add_special_tokens matters.
Run: /work/scratch/venv/bin/python make_trl_fixtures.py SHARED_FIXTURES_MODELS OUT.json
(trl 1.16.0, transformers 5.23.0, CPU).
"""
import json, os, sys, tempfile, shutil, logging
import torch
import transformers, trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

MODELS, OUT = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
logging.disable(logging.WARNING)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'][0] + ': ' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'a: ' }}{% endif %}"
)
BOS_POST_PROCESSOR = {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
             {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
}


def make_dir(tmp, variant):
    """gpt2's tokenizer with the chat template (and BOS post-processor for "bos"), plus its model."""
    d = os.path.join(tmp, variant)
    src = os.path.join(MODELS, "gpt2")
    shutil.copytree(src, d)
    shutil.copy(os.path.join(MODELS, "gpt2-reward", "model.safetensors"), os.path.join(d, "reward.safetensors"))
    tj = json.load(open(os.path.join(d, "tokenizer.json")))
    if variant == "bos":
        tj["post_processor"] = BOS_POST_PROCESSOR
    json.dump(tj, open(os.path.join(d, "tokenizer.json"), "w"))
    cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
    cfg["chat_template"] = CHAT_TEMPLATE
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"))
    return d


def common(out):
    return dict(output_dir=out, per_device_train_batch_size=2, report_to="none", use_cpu=True, save_strategy="no")


def msg(role, content):
    return {"role": role, "content": content}


CASES = [
    ("reward", "bos", {}, [
        {"prompt": "Hi?", "chosen": " Hello!", "rejected": " Go."},
        {"prompt": "2+2?", "chosen": " 4<|endoftext|>", "rejected": " 5"},
    ]),
    ("reward", "plain", {}, [
        {"prompt": [msg("user", "Hi?")], "chosen": [msg("assistant", "Hello!")], "rejected": [msg("assistant", "Go.")]},
        {"prompt": [msg("system", "Be kind."), msg("user", "2+2?")], "chosen": [msg("assistant", "4")],
         "rejected": [msg("assistant", "5")]},
    ]),
    ("reward", "bos", {}, [
        {"chosen": [msg("user", "Hi?"), msg("assistant", "Hello!")], "rejected": [msg("user", "Hi?"), msg("assistant", "Go.")]},
    ]),
    ("reward", "bos", {}, [{"chosen": "Hi? Hello!", "rejected": "Hi? Go.<|endoftext|>"}]),
    ("sft", "bos", {}, [
        {"prompt": "Hi?", "completion": " Hello!"},
        {"prompt": "Say it:", "completion": "ok<|endoftext|>"},
    ]),
    ("sft", "bos", {}, [{"text": "Plain text row."}]),
    ("sft", "plain", {}, [
        {"prompt": [msg("user", "Hi?")], "completion": [msg("assistant", "Hello!")]},
    ]),
    ("sft", "plain", {"assistant_only_loss": True}, [
        {"messages": [msg("system", "Be kind."), msg("user", "Hi?"), msg("assistant", "Hello!"), msg("user", "2+2?"),
                      msg("assistant", "4")]},
    ]),
    ("dpo", "plain", {}, [
        {"prompt": [msg("user", "Hi?")], "chosen": [msg("assistant", "Hello!")], "rejected": [msg("assistant", "Go.")]},
    ]),
    ("dpo", "bos", {}, [
        {"chosen": "Hi? Hello!", "rejected": "Hi? Go."},
    ]),
]


def run(kind, d, extra, rows):
    tok = AutoTokenizer.from_pretrained(d)
    with tempfile.TemporaryDirectory() as out:
        ds = Dataset.from_list(rows)
        if kind == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(os.path.join(MODELS, "gpt2-reward"), num_labels=1)
            t = RewardTrainer(model=model, args=RewardConfig(**common(out), max_length=None, **extra),
                              processing_class=tok, train_dataset=ds)
            cols = ["chosen_ids", "rejected_ids"]
        elif kind == "sft":
            model = AutoModelForCausalLM.from_pretrained(d)
            t = SFTTrainer(model=model, args=SFTConfig(**common(out), max_length=None, **extra),
                           processing_class=tok, train_dataset=ds)
            cols = ["input_ids", "labels"]
        else:
            model = AutoModelForCausalLM.from_pretrained(d)
            t = DPOTrainer(model=model, args=DPOConfig(**common(out), max_length=None, **extra),
                           processing_class=tok, train_dataset=ds)
            cols = ["prompt_ids", "chosen_ids", "rejected_ids"]
        prepared = t.train_dataset
        return {c: [list(x) for x in prepared[c]] for c in cols}


def main():
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {v: make_dir(tmp, v) for v in ("plain", "bos")}
        for kind, variant, extra, rows in CASES:
            cases.append({"trainer": kind, "tokenizer": variant, "config": extra, "rows": rows,
                          "expected": run(kind, dirs[variant], extra, rows)})
    doc = {"reference": f"trl {trl.__version__}, transformers {transformers.__version__}",
           "made_by": "make_trl_fixtures.py", "base_tokenizer": "gpt2", "chat_template": CHAT_TEMPLATE,
           "bos_post_processor": BOS_POST_PROCESSOR, "cases": cases}
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
