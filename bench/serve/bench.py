#!/usr/bin/env python3
"""Throughput of an OpenAI-compatible server: the same requests sent one after another, or
all at once from as many client threads, through the official `openai` client.

Each request is a chat completion of one prompt from a JSONL file (its "prompt" field as the
user's message), greedy, `--max-tokens` new tokens at most. Tokens are the server's own count
(`usage.completion_tokens`), so a request that ends at EOS counts what it generated.
Prints one JSON line: mode, requests, completion tokens, wall seconds, tokens per second.

    python bench.py --base http://127.0.0.1:8000/v1 --model NAME --prompts eval.jsonl \
        --mode concurrent|sequential [--requests 16] [--max-tokens 64] [--ignore-eos]
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--mode", choices=["concurrent", "sequential"], required=True)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="ask the server to go on past EOS (vLLM's and rlhf serve's extension)")
    a = ap.parse_args()

    with open(a.prompts) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: a.requests]
    assert len(prompts) == a.requests, f"only {len(prompts)} prompts in {a.prompts}"
    client = OpenAI(base_url=a.base, api_key=a.api_key, max_retries=0, timeout=600)
    extra = {"ignore_eos": True} if a.ignore_eos else None

    def ask(prompt):
        r = client.chat.completions.create(
            model=a.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=a.max_tokens,
            temperature=0,
            extra_body=extra,
        )
        return r.usage.completion_tokens, r.choices[0].message.content

    ask(prompts[0])  # warm-up: first-request costs (page faults, caches) out of the timing
    start = time.perf_counter()
    if a.mode == "sequential":
        results = [ask(p) for p in prompts]
    else:
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            results = list(pool.map(ask, prompts))
    wall = time.perf_counter() - start
    tokens = sum(n for n, _ in results)
    print(json.dumps({
        "mode": a.mode,
        "requests": len(prompts),
        "max_tokens": a.max_tokens,
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "texts": [t for _, t in results],
    }))


if __name__ == "__main__":
    main()
