"""Cost of generation against the length of the text (numbers for the README, not a test).

OMP_NUM_THREADS=1 python .ci/bench_generate.py      # one thread

Times InfFormer.generate on the CPU preset's model of train_lm.py (4 layers, d_model 128, 4 heads,
d_ff 512, segment = STM = 64, N = M = 64) with books' vocabulary size (31,540 words, adaptive
softmax, tied), batch 1, float32, one thread: ms per token over the first and the last 1,000
tokens, and the peak RSS. The models: the ∞-former (infinite); Transformer-XL with the same STM
(it forgets); Transformer-XL whose STM is as long as the text (mem_len = the number of tokens: its
context grows). Each model runs in a process of its own, so that the peak RSS is its own; it
generates the longest text once, and a shorter length is read off at its last token (the first n
tokens of a longer run are a run of n tokens: same seed, same work). Untrained weights: the cost
does not depend on them.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_lm  # noqa: E402
from infformer import Config  # noqa: E402

VOCAB = 31_540  # the books corpus


def one(memory, mem_len, lengths):
    """Generate max(lengths) tokens after one <eos>; for each length n, print as JSON the ms per token over
    tokens 1-1,000 and n-999..n, and the peak RSS when token n was out (what a run of n tokens would peak at)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Config(**{**train_lm.PRESETS["cpu"]["model"], "mem_len": mem_len, "dropout": 0.0},
                 vocab_size=VOCAB, memory=memory, lm_head=False)
    model = train_lm.LanguageModel(cfg, tie=True).eval()
    times, rss = [time.perf_counter()], {}
    for _ in model.body.generate(torch.zeros(1, 1, dtype=torch.long), max(lengths), model.softmax.log_prob):
        times.append(time.perf_counter())
        if len(times) - 1 in lengths:
            rss[len(times) - 1] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB
    ms = lambda a, b: 1000 * (times[b] - times[a]) / (b - a)
    print(json.dumps([{"n": n, "first": ms(0, 1000), "last": ms(n - 1000, n), "rss": rss[n]} for n in lengths]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[5_000, 20_000], help="text lengths (STM 64)")
    p.add_argument("--grow-tokens", type=int, default=5_000, help="text length for xl with mem_len = the text")
    p.add_argument("--one", nargs="+", metavar="ARG", help=argparse.SUPPRESS)  # MEMORY MEM_LEN LENGTH...
    args = p.parse_args()
    if args.one:
        return one(args.one[0], int(args.one[1]), [int(n) for n in args.one[2:]])
    print(f"torch {torch.__version__}, 1 thread, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    runs = [("infinite", 64, args.tokens), ("xl", 64, args.tokens), ("xl", args.grow_tokens, [args.grow_tokens])]
    print("| model | STM | tokens | ms per token, first 1,000 | ms per token, last 1,000 | peak RSS (MB) |\n"
          "|---|---|---|---|---|---|")
    for memory, mem_len, lengths in runs:  # one process per model; its lengths are prefixes of one text
        out = subprocess.run([sys.executable, __file__, "--one", memory, str(mem_len), *map(str, lengths)],
                             capture_output=True, text=True, check=True).stdout
        for r in json.loads(out):
            print(f"| {memory} | {mem_len:,} | {r['n']:,} | {r['first']:.2f} | {r['last']:.2f} | {r['rss']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
