"""Cost benchmark for infformer.py (numbers for the README, not a test).

python .ci/bench.py            # training-step time per memory kind, at equal STM
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


def time_steps(kind, n, batch=8):
    model, opt, cfg = make(kind)
    memory = model.init_memory(batch)
    data = torch.randint(0, cfg.vocab_size, (n + 5, batch, cfg.seg_len + 1))
    times = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        memory = step(model, opt, memory, data[i])
        times.append(time.perf_counter() - t0)
    return times[5:]  # the first steps fill the memories and warm up


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="timed steps per memory kind, after 5 warm-up steps")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median step of each is kept")
    p.add_argument("--long", action="store_true", help="also time 1,000 segments of 'infinite'")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    kinds = list(MEMORY_KINDS)
    medians = {k: [] for k in kinds}
    for r in range(args.rounds):  # interleave kinds so that machine noise hits all of them alike
        for k in kinds:
            medians[k].append(sorted(time_steps(k, args.steps))[args.steps // 2])
    print("| memory | ms per training step (median of rounds) | × xl |\n|---|---|---|")
    base = sorted(medians["xl"])[args.rounds // 2]
    for k in kinds:
        ms = sorted(medians[k])[args.rounds // 2]
        print(f"| {k} | {1000 * ms:.1f} | {ms / base:.2f} |")
    if args.long:
        t = time_steps("infinite", 1000)
        print("infinite, ms per segment by block of 100 segments:",
              " ".join(f"{1000 * sorted(t[i:i + 100])[50]:.1f}" for i in range(0, 1000, 100)))


if __name__ == "__main__":
    main()
