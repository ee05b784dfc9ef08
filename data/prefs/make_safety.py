#!/usr/bin/env python3
"""Writes safety.jsonl, the training set of configs/llama2.toml's safety reward model.

Llama 2 trains its safety reward model on safety preferences with some helpfulness data mixed
in (about 10%), so that it also scores ordinary answers sensibly. Here: every pair of
train.jsonl that carries "safety" labels (a refusal preferred over compliance with an unsafe
request), and every tenth other pair. Deterministic; `python3 make_safety.py` from this folder.
"""
import json
from pathlib import Path

here = Path(__file__).parent
rows = [json.loads(l) for l in (here / "train.jsonl").read_text().splitlines() if l.strip()]
safety = [r for r in rows if "safety" in r]
others = [r for r in rows if "safety" not in r][::10]
out = safety + others
(here / "safety.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
print(f"safety.jsonl: {len(safety)} safety pairs + {len(others)} helpfulness pairs")
