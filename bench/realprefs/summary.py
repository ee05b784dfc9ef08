"""Print the side-by-side table of bench/realprefs/run.sh from the files it left in OUT.

Run: python3 summary.py OUT MAX_LENGTH
Accuracy = share of held-out pairs whose chosen answer scores above the rejected one.
- "all 60": TRL's models scored on each sequence's last MAX_LENGTH tokens (trl_realprefs.py);
  rlhf's from its end-of-training evaluation (truncation_mode = "keep_end", the same cut).
- "fitting": the pairs whose both sequences fit MAX_LENGTH as TRL tokenises them (no truncation),
  the set TRL's own evaluate() keeps; rlhf's from `rlhf score` of those pairs.
"""
import json, os, re, sys

out, max_length = sys.argv[1], int(sys.argv[2])
rd = lambda name: open(os.path.join(out, name)).read()
jl = lambda name: [json.loads(l) for l in open(os.path.join(out, name)) if l.strip()]

rows = []
fits = None
for kind in ("fp32", "bf16"):
    if not os.path.exists(os.path.join(out, f"trl-{kind}.json")):
        continue
    t = json.loads(rd(f"trl-{kind}.json"))
    scores = jl(f"trl-{kind}.scores.jsonl")
    fits = [s["fits"] for s in scores]
    rows.append({"side": f"TRL 1.16 RewardTrainer, {kind}", "acc_all": t["accuracy_all_keep_end"],
                 "acc_fit": t["accuracy_fitting"], "n_fit": t["fitting_pairs"],
                 "trained": f'{t["train_pairs_kept"]} of {t["train_pairs"]} ({t["epochs"]} epochs)',
                 "evaluated": f'{t["eval_pairs_kept"]} of {t["test_pairs"]} in its own eval; all 60 scored here',
                 "pairs_s": t["pairs_per_s"], "rss": int(rd(f"trl-{kind}.rss"))})

summary = jl("rlhf-reward/metrics.jsonl")[-1]
log = rd("rlhf.log")
train_report = re.search(r"train\.jsonl: (\d+) examples, longest (\d+) tokens(?:; (\d+) truncated)?"
                         r"(?:.*?; (\d+) pairs identical)?", log)
n_train = int(train_report.group(1))
n_cut = int(train_report.group(3) or 0)
n_ident = int(train_report.group(4) or 0)
# rlhf.scores.jsonl: chosen then rejected of each pair that fits (as TRL tokenises), in order.
sc = [r["score"] for r in jl("rlhf.scores.jsonl")]
pairs = list(zip(sc[0::2], sc[1::2]))
fit_idx = [i for i, f in enumerate(fits) if f]  # run.sh always runs TRL fp32 first
assert len(pairs) == len(fit_idx), (len(pairs), len(fit_idx))
acc_fit = sum(c > r for c, r in pairs) / max(len(pairs), 1)
rows.append({"side": 'rlhf-rs `rlhf reward`, fp32, truncation_mode = "keep_end"',
             "acc_all": round(summary["eval_accuracy"], 4), "acc_fit": round(acc_fit, 4), "n_fit": len(fit_idx),
             "trained": f"{n_train} of {n_train} ({n_cut} cut, {n_ident} identical after the cut)",
             "evaluated": "60 of 60", "pairs_s": round(summary["train_samples_per_second"], 3),
             "rss": int(rd("rlhf.rss"))})

n_fit = rows[-1]["n_fit"]
print(f"| run | held-out accuracy, all 60 | on the {n_fit} that fit {max_length} | pairs trained on | "
      f"pairs evaluated | pairs/s | peak RSS |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f'| {r["side"]} | {r["acc_all"]:.3f} | {r["acc_fit"]:.3f} | {r["trained"]} | {r["evaluated"]} | '
          f'{r["pairs_s"]:.2f} | {r["rss"] / 1024:.1f} GB |')
print(json.dumps(rows))
