#!/usr/bin/env python3
"""PyTorch side of `rlhf bench train`: the same random-initialised Llama, batch shape, steps
and optimiser, timed the same way, printed as the same JSON line with "impl": "pytorch".

Usage: torch_train.py [--config smollm2-135m] [--batch 8] [--seq 128] [--steps 10]
                      [--warmup 2] [--threads 2] [--seed 0]
Needs torch and transformers (python3 -m venv W/venv && W/venv/bin/pip install torch transformers).
"""

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# (hidden, intermediate, layers, heads, kv heads, vocab); the same table as
# crates/rlhf/src/cmd/bench.rs `preset`.
PRESETS = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-100m": (768, 2048, 12, 12, 4, 32000),
    "llama-8m": (256, 688, 8, 8, 4, 8192),
    "tiny": (64, 172, 2, 4, 2, 512),
}


def peak_rss_mb():
    """VmHWM of this process in MiB, as the Rust side reads it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def config(name):
    h, i, l, nh, nkv, v = PRESETS[name]
    return LlamaConfig(
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=l,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        vocab_size=v,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        hidden_act="silu",
        tie_word_embeddings=True,
        initializer_range=0.02,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="smollm2-135m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true",
                    help="forward and loss under torch.autocast('cpu', bfloat16), as transformers' bf16=True")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = config(a.config)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed)

    fwd, bwd, upd, total = [], [], [], []
    loss_v = float("nan")
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=gen)
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        # labels=ids: transformers shifts them by one (next-token loss), like the Rust side.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss_v = loss.item()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= a.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            upd.append(t3 - t2)
            total.append(t3 - t0)
        tag = " (warm-up)" if step < a.warmup else ""
        print(f"step {step}{tag}: {t3 - t0:.3f}s (loss {loss_v:.4f})", file=sys.stderr, flush=True)

    step_s = statistics.median(total)
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "job": "train",
                "config": a.config,
                "bf16": a.bf16,
                "params": params,
                "batch": a.batch,
                "seq": a.seq,
                "steps": a.steps,
                "threads": torch.get_num_threads(),
                "step_s_median": round(step_s, 4),
                "forward_s_median": round(statistics.median(fwd), 4),
                "backward_s_median": round(statistics.median(bwd), 4),
                "optimizer_s_median": round(statistics.median(upd), 4),
                "tokens_per_s": round(a.batch * a.seq / step_s, 1),
                "loss": round(loss_v, 4),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
