"""Derives the pipeline's SFT demonstrations and PPO prompts from the preference pairs in
prefs/ (deterministic; rerun after make_prefs.py). Like those pairs, nothing here was written
by people: see prefs/README.md for the rule that made them.
  sft/train.jsonl   one demonstration per distinct training prompt: {"prompt", "completion"},
                    the completion being the first chosen answer for that prompt;
  ppo/train.jsonl   the distinct training prompts: {"prompt", "tags"}; prompts whose pairs carry
                    safety labels are tagged "safety" (for the Llama 2 gate);
  ppo/eval.jsonl    the distinct held-out prompts (from prefs/test.jsonl), same format,
                    in a seeded shuffled order so that every kind appears among the first.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name):
    with open(os.path.join(HERE, "prefs", name)) as f:
        return [json.loads(line) for line in f]


def prompts(rows):
    seen = {}
    for r in rows:
        p = seen.setdefault(r["prompt"], {"prompt": r["prompt"], "tags": [], "chosen": r["chosen"]})
        if "safety" in r and "safety" not in p["tags"]:
            p["tags"].append("safety")
    return list(seen.values())


def write(name, rows):
    path = os.path.join(HERE, name)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{path}: {len(rows)} rows")


train, test = prompts(read("train.jsonl")), prompts(read("test.jsonl"))
random.Random(0).shuffle(test)  # held-out prompts of every kind come first
write("sft/train.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in train])
write("ppo/train.jsonl", [{"prompt": p["prompt"], "tags": p["tags"]} for p in train])
write("ppo/eval.jsonl", [{"prompt": p["prompt"], "tags": p["tags"]} for p in test])
