"""What the long-term memory of a trained train_lm.py model holds while it reads a validation document.

    python .ci/ltm_probe.py runs/books/sticky-s0/ckpt.pt --data data/books --tokens 6400
    python .ci/ltm_probe.py runs/books/{infinite,sticky}-s0/ckpt.pt --data data/books --png ltm.png

One stream reads the first --tokens tokens of the valid file's first document from a fresh memory (eval
mode, seed 0). Each point of the signal stands for a past token: a new vector for its own token, an old
sample taken at s for the token of the point nearest to s. After every write this
follows the M old samples of each layer and prints how many distinct tokens they stand for, and their
age; with --png (matplotlib), for each t in [0, 1] the token it stands for when the last segment reads
it, beside the mean attention density of that segment's queries, one column per checkpoint."""
import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import infformer  # noqa: E402
import train_lm  # noqa: E402


def probe(path, data, tokens, after):
    """Per layer: the token each anchor point t stands for after the last write (t, p) and the last reads' μ, σ²."""
    try:
        model, vocab = train_lm.load_model(path)
        ids, starts = train_lm.read_ids(os.path.join(data, "wiki.valid.tokens"), {w: i for i, w in enumerate(vocab)},
                                        False)
    except (train_lm.UserError, OSError) as e:
        sys.exit(f"ltm_probe.py: {e}")
    cfg = model.body.cfg
    L, M, tau, n_layers = cfg.seg_len, cfg.num_samples, cfg.tau, cfg.n_layers
    ids = ids[:starts[1]] if len(starts) > 1 else ids  # the first document: the models were trained with resets
    n_segments = min(tokens, len(ids) - 1) // L
    if cfg.memory not in ("infinite", "sticky") or n_segments < 3:
        sys.exit(f"ltm_probe.py: {path}: a {cfg.memory} model over {n_segments} segments of its first document; "
                 "it needs an infinite or sticky model and 3 segments (the third reads the first write)")
    drawn, reads, real = [], [[] for _ in range(n_layers)], infformer.sticky_positions
    infformer.sticky_positions = lambda *a: drawn.append(real(*a)) or drawn[-1]  # one call per layer and write
    hooks = [b.read_ltm.register_forward_hook(lambda m, i, out, k=k: reads[k].append(out[1:]))
             for k, b in enumerate(model.body.blocks)]
    torch.manual_seed(0)
    memory, nll = None, []
    try:
        with torch.no_grad():
            for i in range(0, n_segments * L, L):
                out, memory, _ = model(ids[None, i:i + L].long(), ids[None, i + 1:i + L + 1].long(), memory)
                nll.append(out)
    finally:
        infformer.sticky_positions = real
        for h in hooks:
            h.remove()
    seen = len(nll) * L
    kind = cfg.memory + (f" (sticky_uniform {cfg.sticky_uniform})" if cfg.memory == "sticky" else "")
    print(f"{path}: {kind}, valid ppl {torch.cat(nll, 1).mean().exp():.2f} "
          f"over its first {seen:,} tokens, {len(nll) - 2} writes after the first")
    layers = []
    for k in range(n_layers):
        # Write w (w = 0: the first) stores segment w, tokens [L w, L (w + 1)); sticky's positions, else s_i = i/M.
        samples = drawn[k::n_layers] or [torch.arange(1, M + 1)[None] / M] * (len(nll) - 2)
        t, p, distinct = infformer.midpoints(L).numpy(), np.arange(L) + 0.0, []
        for w, s in enumerate(samples, 1):
            before = t, p  # the layout that the last segment's queries read
            old = p[np.abs(s[0].double().numpy()[:, None] - t).argmin(1)]  # the token of the point nearest to s_i
            t = np.concatenate([tau * np.arange(1, M + 1) / M, tau + (1 - tau) * infformer.midpoints(L).numpy()])
            p = np.concatenate([old, L * w + np.arange(L)])
            distinct.append(len(set(np.round(old).astype(int))))
        ages = seen - p[:M]
        mu, sigma = reads[k][-1][0].flatten(), reads[k][-1][1].flatten().sqrt()
        shown = [w for w in after if 1 <= w <= len(distinct)] or [len(distinct)]
        print(f"  layer {k}: the {M} old samples stand for {'/'.join(str(distinct[w - 1]) for w in shown)} distinct tokens"
              f" after {'/'.join(map(str, shown))} writes; at the end ages {ages.min():.0f}–{ages.max():.0f} (median {np.median(ages):.0f}); last reads μ median"
              f" {mu.median():.2f}, σ median {sigma.median():.3f}")
        layers.append((*before, reads[k][-1]))
    return cfg.memory, seen, layers


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="+", help="train_lm.py checkpoints of infinite or sticky runs")
    p.add_argument("--data", required=True, help="the folder with wiki.valid.tokens")
    p.add_argument("--tokens", type=int, default=6400, help="tokens to read (default 6400)")
    p.add_argument("--after", type=int, nargs="+", default=[1, 2, 5, 10, 50],
                   help="report after this many writes after the first (default 1 2 5 10 50)")
    p.add_argument("--png", help="draw the memory's map and the last reads here (needs matplotlib)")
    args = p.parse_args()
    for path in args.ckpt:
        if not os.path.isfile(path):
            p.error(f"{path}: no such file")
    runs = [probe(path, args.data, args.tokens, args.after) for path in args.ckpt]
    if args.png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            sys.exit("--png needs matplotlib (pip install matplotlib); the tables above are complete")
        n_layers = len(runs[0][2])
        fig, axes = plt.subplots(n_layers, len(runs), figsize=(5 * len(runs), 2.2 * n_layers), squeeze=False)
        grid = np.linspace(0, 1, 401)
        for c, (kind, seen, layers) in enumerate(runs):
            for k, (t, pos, (mu, var)) in enumerate(layers):
                ax = axes[k, c]
                ax.plot(t, seen - pos, ".", ms=2, color="C0")
                ax.set_yscale("log")
                ax.set_ylabel(f"layer {k}: age", color="C0")
                mu, sd = mu.flatten().double().numpy()[:, None], var.flatten().double().sqrt().numpy()[:, None]
                density = (np.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))).mean(0)
                ax.twinx().plot(grid, density, color="C1", lw=1)
                ax.set_title(f"{kind}: {args.ckpt[c]}" if k == 0 else None, fontsize=8)
            axes[-1, c].set_xlabel("t, the memory's [0, 1]")
        fig.suptitle("blue: the age of the token that each point of the memory stands for; "
                     "orange: the last segment's mean read density", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
