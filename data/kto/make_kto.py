"""Writes KTO's unpaired rows from the quickstart's preference pairs (deterministic; rerun
after prefs/make_prefs.py): train.jsonl from prefs/train.jsonl, test.jsonl from
prefs/test.jsonl. Each pair becomes two rows, {"prompt", "completion": chosen, "label": true}
and {"prompt", "completion": rejected, "label": false}, like TRL's unpair_preference_dataset;
like the pairs, no label here came from a person (prefs/README.md).

The rows are shuffled with a fixed seed. TRL's unpairing writes every chosen row before every
rejected one, so with KTO's sequential order a batch holds one kind only; shuffled, a batch
mixes desirable and undesirable rows, and the KL pairs (each prompt with the previous row's
completion in its batch) rarely put a prompt beside its own pair's other answer.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def unpair(name, seed):
    with open(os.path.join(HERE, "..", "prefs", name)) as f:
        pairs = [json.loads(line) for line in f]
    rows = []
    for p in pairs:
        rows.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        rows.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    random.Random(seed).shuffle(rows)
    path = os.path.join(HERE, name)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{path}: {len(rows)} rows ({sum(r['label'] for r in rows)} desirable)")


unpair("train.jsonl", 20261206)
unpair("test.jsonl", 20261207)
