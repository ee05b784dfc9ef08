"""Turn LLaMA-Factory's dpo_en_demo.json into the project's conversational preference pairs,
split 240 train / 60 test with a fixed seed.

Run: python3 make_split.py DPO_EN_DEMO_JSON OUT_DIR [--seed 0]
Writes OUT_DIR/train.jsonl and OUT_DIR/test.jsonl, one pair a row:
  {"prompt": [{"role": "system"|"user"|"assistant", "content": ...}, ...],
   "chosen": [{"role": "assistant", "content": ...}],
   "rejected": [{"role": "assistant", "content": ...}]}
Every row, single-turn or multi-turn, is in TRL's conversational explicit-prompt form, which
rlhf-data reads for reward training (records.rs) and TRL's RewardTrainer renders through the
chat template: one JSON schema for the whole file (a `datasets` column cannot mix text and
message lists), and the ChatML template the instruct model was tuned on instead of a made-up
"Human:/Assistant:" flattening. Prints the counts as one JSON line.
"""
import json
import os
import random
import sys

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def convert(row):
    prompt = [{"role": ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]]
    assert prompt[-1]["role"] == "user", "the last prompt turn must be the user's"
    answer = lambda a: [{"role": ROLES[a["from"]], "content": a["value"]}]
    return {"prompt": prompt, "chosen": answer(row["chosen"]), "rejected": answer(row["rejected"])}


def main():
    src, out = sys.argv[1], sys.argv[2]
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
    rows = [convert(r) for r in json.load(open(src, encoding="utf-8"))]
    assert len(rows) == 300, f"expected 300 pairs, found {len(rows)}"
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    os.makedirs(out, exist_ok=True)
    counts = {"seed": seed}
    for name, idx in (("train", order[:240]), ("test", order[240:])):
        with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for i in idx:
                f.write(json.dumps(rows[i], ensure_ascii=False) + "\n")
        multi = sum(1 for i in idx if sum(m["role"] != "system" for m in rows[i]["prompt"]) > 1)
        counts[name] = {"pairs": len(idx), "multi_turn": multi, "single_turn": len(idx) - multi}
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
