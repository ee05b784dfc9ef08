#!/usr/bin/env python3
"""Writes the review task's prompts (deterministic; rerun to regenerate).

"Write a short review of X." as chat messages, for 120 training things and 40 held-out ones
(no thing is in both files). The task is the classic "write a positive review" RLHF task
without saying "positive": the preference (an AI judge's, and the held-out gold rule's) is for
the more positive review; the prompt leaves the model free to write either.
"""
import json
import pathlib
import random

KINDS = ["hotel", "restaurant", "phone", "laptop", "movie", "album", "book", "café", "museum",
         "bakery", "train journey", "concert", "video game", "pair of headphones", "bicycle",
         "coffee maker", "theme park", "gym", "podcast", "board game"]
ADJ = ["new", "local", "old", "popular", "small", "famous", "cheap", "expensive",
       "family-run", "recent"]

def main():
    here = pathlib.Path(__file__).parent
    rng = random.Random(20261206)
    things = [f"the {a} {k}" for k in KINDS for a in ADJ]  # 200
    rng.shuffle(things)
    train, held = things[:120], things[120:160]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        with open(here / name, "w") as f:
            for t in rows:
                msg = [{"role": "user", "content": f"Write a short review of {t}."}]
                f.write(json.dumps({"messages": msg}) + "\n")

if __name__ == "__main__":
    main()
