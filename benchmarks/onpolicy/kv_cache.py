"""Generation with the key-value cache against without it, side by side in one run.

    python benchmarks/onpolicy/kv_cache.py            # prints the ratio, writes kv_cache.csv here

The built-in GPT decodes 128 new tokens for a batch of 32 prompts of 16 tokens, with its
key-value cache (models.generate: the prompt once, then one position per forward pass) and
without it (the whole prefix each token: reference_generate). Same weights, same seed, both
greedy, so the two must write the same tokens; alternating repeats, median seconds each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pandas as pd
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from online_distill.models.generate import Sampling, generate, reference_generate  # noqa: E402
from online_distill.models.gpt import gpt_small, gpt_tiny  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, build in (("gpt_tiny", gpt_tiny), ("gpt_small", gpt_small)):
        torch.manual_seed(0)
        model = build((args.prompt + args.new_tokens,), 256)
        prompts = torch.randint(1, 256, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
        s = Sampling(max_new_tokens=args.new_tokens, temperature=0)
        times, written = {"cache": [], "no_cache": []}, {}
        for _ in range(args.repeats):
            for how, fn in (("cache", generate), ("no_cache", reference_generate)):
                t0 = time.perf_counter()
                written[how] = fn(model, prompts, None, s).tokens
                times[how].append(time.perf_counter() - t0)
            assert torch.equal(written["cache"], written["no_cache"]), "the cache changed what greedy decoding writes"
        cache, plain = statistics.median(times["cache"]), statistics.median(times["no_cache"])
        rows.append({"model": name, "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
                     "threads": args.threads, "cache_s": round(cache, 4), "no_cache_s": round(plain, 4),
                     "speedup": round(plain / cache, 2), "tokens_per_s_cache": round(args.batch * args.new_tokens / cache)})
        print(f"{name}: {args.batch} x {args.new_tokens} new tokens  cache {cache:.3f} s  no cache {plain:.3f} s  "
              f"-> {plain / cache:.1f}x faster with the cache ({args.batch * args.new_tokens / cache:.0f} tokens/s)",
              flush=True)
    pd.DataFrame(rows).to_csv(os.path.join(HERE, "kv_cache.csv"), index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
