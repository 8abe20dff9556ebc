"""Cost benchmark for infformer.py (numbers for the README, not a test).

python .ci/bench.py            # training-step time and matmul FLOPs per memory kind, at equal STM
python .ci/bench.py --compile  # the same, eager and torch.compile'd side by side; compile time apart
python .ci/bench.py --long     # also: time per segment over 1,000 segments (infinite)

Configuration: d_model 128, 2 layers, 4 heads, d_ff 512, segment = STM = 128, N = 64,
M = 64, batch 8, float32, AdamW; every step is forward + backward + optimizer step on one
segment, with the memory carried from the previous step.
"""
import argparse
import os
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from infformer import MEMORY_KINDS, Config, InfFormer  # noqa: E402


def make(kind):
    torch.manual_seed(0)
    cfg = Config(vocab_size=256, d_model=128, n_layers=2, n_heads=4, d_ff=512, seg_len=128, mem_len=128,
                 memory=kind, num_basis=64, num_samples=64, cmem_len=64, compress_rate=4)
    model = InfFormer(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), cfg


def step(model, opt, memory, tokens):
    logits, memory, kl = model(tokens[:, :-1], memory)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return memory


class Contestant:
    """One memory kind, eager or compiled, trained step after step; its memory carries over between rounds."""

    def __init__(self, kind, compile_, batch=8):
        self.model, self.opt, cfg = make(kind)
        self.run = torch.compile(self.model) if compile_ else self.model
        self.memory = self.model.init_memory(batch)
        gen = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seg_len + 1), generator=gen)
        t0 = time.perf_counter()
        self.steps(5)  # fills the memories (every shape they take) and compiles each graph
        self.warmup = time.perf_counter() - t0
        if not compile_:  # the matrix products of one step, forward and backward (the same when compiled);
            # attention as SDPA's math kernel, whose products the counter sees (the fused CPU kernel it does not)
            with FlopCounterMode(display=False) as count, sdpa_kernel(SDPBackend.MATH):
                self.steps(1)
            self.gflop = count.get_total_flops() / 1e9

    def steps(self, n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.memory = step(self.run, self.opt, self.memory, self.tokens)
            times.append(time.perf_counter() - t0)
        return times


def median_ms(runs, rounds, steps):
    """ms per step of each contestant: the median over rounds of each round's median step."""
    medians = {key: [] for key in runs}
    for _ in range(rounds):  # interleave kinds so that machine noise hits all of them alike
        for key, run in runs.items():
            medians[key].append(sorted(run.steps(steps))[steps // 2])
    return {key: 1000 * sorted(v)[rounds // 2] for key, v in medians.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="timed steps per memory kind, after 5 warm-up steps")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median step of each is kept")
    p.add_argument("--compile", action="store_true", help="also time every kind under torch.compile")
    p.add_argument("--long", action="store_true", help="also time 1,000 segments of 'infinite'")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    if args.compile:  # all kinds at once: dynamo's recompile limit counts every model's graphs together
        torch._dynamo.config.cache_size_limit = 64
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    runs = {(k, m): Contestant(k, m == "compiled") for k in MEMORY_KINDS for m in modes}
    ms = median_ms(runs, args.rounds, args.steps)
    columns = ["matmul GFLOP per step | × xl"] + [f"{m} ms per step | × xl" for m in modes]
    columns += ["compile seconds"] if args.compile else []
    print("| memory | " + " | ".join(columns) + " |\n" + "|---" * (3 + 2 * len(modes) + args.compile) + "|")
    for k in MEMORY_KINDS:
        flops = runs[k, "eager"].gflop
        cells = [f"{flops:.2f} | {flops / runs['xl', 'eager'].gflop:.3f}"]
        cells += [f"{ms[k, m]:.1f} | {ms[k, m] / ms['xl', m]:.2f}" for m in modes]
        extra = f" | {runs[k, 'compiled'].warmup - runs[k, 'eager'].warmup:.0f}" if args.compile else ""
        print(f"| {k} | " + " | ".join(cells) + extra + " |")
    if args.long:
        t = Contestant("infinite", False).steps(1000)
        print("infinite, ms per segment by block of 100 segments:",
              " ".join(f"{1000 * sorted(t[i:i + 100])[50]:.1f}" for i in range(0, 1000, 100)))


if __name__ == "__main__":
    main()
