"""Best-of-K sampling the way a user writes it with transformers: the anchor for
`rlhf bench best-of-n` (TRL removed its BestOfNSampler in 2025, so there is no library loop
to time). For each batch of prompts: `generate` with `num_return_sequences=K` (sampling at
temperature 1, exactly NEW_TOKENS new tokens: `min_new_tokens` suppresses EOS), decode, score
prompt + completion with the reward model in batches, keep the best per prompt.
Run: python hf_best_of_n.py MODEL_DIR REWARD_DIR PROMPTS_JSONL PROMPTS K NEW_TOKENS [--bf16]
     [--prompt-batch 4] [--score-batch 32] [--reps 3]
Prints one JSON line: the median seconds over --reps timed runs (after one untimed).
"""
import argparse, json, resource, time
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("reward"); p.add_argument("prompts_file")
p.add_argument("prompts", type=int); p.add_argument("k", type=int); p.add_argument("new_tokens", type=int)
p.add_argument("--bf16", action="store_true"); p.add_argument("--prompt-batch", type=int, default=4)
p.add_argument("--score-batch", type=int, default=32); p.add_argument("--reps", type=int, default=3)
a = p.parse_args()
torch.set_num_threads(2)
dtype = torch.bfloat16 if a.bf16 else torch.float32
tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()
rtok = AutoTokenizer.from_pretrained(a.reward)
if rtok.pad_token is None:
    rtok.pad_token = rtok.eos_token
rm = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=dtype).eval()
rm.config.pad_token_id = rtok.pad_token_id

rows = [json.loads(l) for l in open(a.prompts_file) if l.strip()][: a.prompts]
prompts = [r["prompt"] if isinstance(r["prompt"], str)
           else tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
           for r in rows]


def best_of_n(seed):
    torch.manual_seed(seed)
    best, scores_all = [], []
    with torch.no_grad():
        for i in range(0, len(prompts), a.prompt_batch):
            chunk = prompts[i:i + a.prompt_batch]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                 num_return_sequences=a.k, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            full = [chunk[j // a.k] + t for j, t in enumerate(texts)]
            scores = []
            for s in range(0, len(full), a.score_batch):
                renc = rtok(full[s:s + a.score_batch], return_tensors="pt", padding=True)
                scores.extend(rm(**renc).logits[:, 0].float().tolist())
            scores_all.extend(scores)
            for j in range(len(chunk)):
                group = scores[j * a.k:(j + 1) * a.k]
                best.append(max(range(a.k), key=lambda x: group[x]))
    return scores_all


times = []
for rep in range(a.reps + 1):
    t0 = time.time()
    scores = best_of_n(rep)
    if rep > 0:
        times.append(time.time() - t0)
times.sort()
med = times[len(times) // 2] if len(times) % 2 else (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2
n = a.prompts * a.k
print(json.dumps({"impl": "transformers" + ("-bf16" if a.bf16 else ""), "job": "best_of_n",
                  "prompts": a.prompts, "num_samples": a.k, "max_new_tokens": a.new_tokens,
                  "prompt_batch": a.prompt_batch, "median_seconds": round(med, 4),
                  "seconds": [round(t, 4) for t in times],
                  "samples_scored_per_second": round(n / med, 4),
                  "new_tokens_per_second": round(n * a.new_tokens / med, 1),
                  "mean_score": round(sum(scores) / len(scores), 4),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
