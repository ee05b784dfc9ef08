#!/usr/bin/env python3
"""PyTorch side of `rlhf bench generate`: greedy generation with transformers' `generate` on
the same Hugging Face directory, the same prompts (a fixed formula shared with the Rust side)
and the same number of new tokens, printed as the same JSON line with "impl": "pytorch".

Usage: torch_generate.py --model DIR [--prompts 8] [--batch 8] [--prompt-len 32]
                         [--max-new-tokens 64] [--threads 2]
Needs torch and transformers (python3 -m venv W/venv && W/venv/bin/pip install torch transformers).
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def peak_rss_mb():
    """VmHWM of this process in MiB, as the Rust side reads it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def bench_prompt(row, length, vocab):
    """The prompt ids of crates/rlhf/src/cmd/bench.rs `bench_prompt`."""
    return [1 + (row * 7919 + j * 104729) % (vocab - 1) for j in range(length)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    # float32 like the Rust side (its default dtype), whatever the checkpoint's dtype.
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    prompts = torch.tensor([bench_prompt(r, a.prompt_len, vocab) for r in range(a.prompts)])
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def gen(ids, n):
        # min_new_tokens = max_new_tokens: no row stops early on EOS, as with the Rust side's
        # empty eos list; every call makes exactly n tokens per row.
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=pad,
        )

    with torch.inference_mode():
        gen(prompts[: a.batch], 2)  # warm-up, as on the Rust side
        secs, first = [], []
        for s in range(0, a.prompts, a.batch):
            chunk = prompts[s : s + a.batch]
            t0 = time.perf_counter()
            out = gen(chunk, a.max_new_tokens)
            secs.append(time.perf_counter() - t0)
            assert out.shape[1] == a.prompt_len + a.max_new_tokens, out.shape
            if not first:
                first = out[0, a.prompt_len : a.prompt_len + 8].tolist()

    total = sum(secs)
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "job": "generate",
                "model": a.model,
                "prompts": a.prompts,
                "batch": a.batch,
                "prompt_len": a.prompt_len,
                "max_new_tokens": a.max_new_tokens,
                "threads": torch.get_num_threads(),
                "total_s": round(total, 4),
                "new_tokens_per_s": round(a.prompts * a.max_new_tokens / total, 1),
                "first_ids": first,
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
