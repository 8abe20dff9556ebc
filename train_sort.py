"""
The sorting task of the ∞-former paper (§5.1), comparing the four memory kinds.

A sequence of S symbols is drawn from a distribution that drifts from p_init to p_final;
the model must then output the 20 symbols ordered by how often they occurred in the whole
sequence. The recent tokens alone give the wrong order, so a model that sees only its last
segment and short-term memory fails as S grows; one that remembers everything can succeed.

  python train_sort.py                          # all four memories, CPU preset
  python train_sort.py --memory infinite        # one memory kind
  python train_sort.py --preset paper --seq-len 8000          # the paper's setting, one GPU
  torchrun --nproc_per_node=4 train_sort.py --preset paper    # several GPUs (DDP)
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from infformer import Config, InfFormer

# Vocabulary: symbols 0..19 and the separator. The answer is fed back as 21 + symbol, which
# SymbolEmbedding turns into the symbol's embedding plus a learned "answering" vector.
N_SYMBOLS, SEP, ANSWER = 20, 20, 21
VOCAB = SEP + 1
KINDS = ["xl", "compressive", "infinite", "sticky"]

PRESETS = {
    # A compact model that learns the task on a laptop CPU in minutes per memory kind.
    "cpu": dict(seq_len=1024, steps=2500, batch_size=16, lr=3e-3, warmup=30, clip=1.0, eval_size=512,
                model=dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, dropout=0.0, seg_len=128, mem_len=128,
                           num_basis=128, basis_widths=(0.04, 0.2), num_samples=128, tau=0.75,
                           cmem_len=128, compress_rate=8)),
    # The paper's setting (the authors' sorting code: N = 512, widths {0.01, 0.05}, M = 512).
    "paper": dict(seq_len=4000, steps=20000, batch_size=8, lr=2e-4, warmup=0, clip=0.25, eval_size=512,
                  model=dict(d_model=300, n_layers=3, n_heads=6, d_ff=300, dropout=0.1, seg_len=1024, mem_len=1024,
                             num_basis=512, basis_widths=(0.01, 0.05), num_samples=512, tau=0.75,
                             cmem_len=512, compress_rate=4)),
}


# -----------------------------------------------------------------------------
# The data (DESIGN.md §4.1)


def sample_streams(batch, seq_len, gen):
    """Token j = 1..S drawn from (1 − j/S)·p_init + (j/S)·p_final; p from integers 1..9, normalised.

    Returns the streams (B, S) and p_init, p_final (B, 20).
    """
    p_init, p_final = (torch.randint(1, 10, (2, batch, N_SYMBOLS), generator=gen).float()).unbind(0)
    p_init, p_final = p_init / p_init.sum(-1, keepdim=True), p_final / p_final.sum(-1, keepdim=True)
    j = (torch.arange(1, seq_len + 1) / seq_len)[None, :, None]  # (1, S, 1)
    probs = (1 - j) * p_init[:, None] + j * p_final[:, None]  # (B, S, 20)
    streams = torch.multinomial(probs.flatten(0, 1), 1, generator=gen).view(batch, seq_len)
    return streams, p_init, p_final


def sort_targets(streams):
    """The 20 symbols by decreasing count (ties: first occurrence first), unseen ones ascending."""
    B, S = streams.shape
    counts = F.one_hot(streams, N_SYMBOLS).sum(1)  # (B, 20)
    positions = torch.arange(S).expand(B, S)
    first = torch.full((B, N_SYMBOLS), S).scatter_reduce(1, streams, positions, "amin")  # S if unseen
    symbols = torch.arange(N_SYMBOLS)
    key = (-counts * (S + 1) + first) * N_SYMBOLS + symbols  # lexicographic (−count, first, symbol)
    return key.argsort(1)


def make_batch(batch, seq_len, gen):
    """Inputs (B, S + 20): stream, separator, the answer teacher-forced; targets (B, 20) for the last 20 positions."""
    streams, _, _ = sample_streams(batch, seq_len, gen)
    targets = sort_targets(streams)
    inputs = torch.cat([streams, torch.full((batch, 1), SEP), ANSWER + targets[:, :-1]], 1)
    return inputs, targets


def segments(inputs, seg_len):
    """Split from the end, so the last segment ends with the 20 target positions."""
    first = inputs.size(1) % seg_len
    return ([inputs[:, :first]] if first else []) + list(inputs[:, first:].split(seg_len, 1))


def target_logits(model, inputs, seg_len, autocast):
    """Logits at the 20 target positions (B, 20, V) and the KL term. Only the last segment,
    which holds the targets, builds a graph; the earlier ones only fill the memories."""
    chunks = segments(inputs, seg_len)
    memory = None
    with torch.no_grad(), autocast:
        for chunk in chunks[:-1]:
            _, memory, _ = model(chunk, memory)
    with autocast:
        logits, _, kl = model(chunks[-1], memory)
    return logits[:, -N_SYMBOLS:].float(), kl


class SymbolEmbedding(torch.nn.Module):
    """The model's embedding, with answer tokens (21 + s) read as symbol s plus an "answering"
    vector: the model must know it is answering, and which symbols it has already given."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding
        self.answering = torch.nn.Parameter(torch.zeros(embedding.embedding_dim))

    def forward(self, tokens):
        answer = tokens >= ANSWER
        return self.embedding(torch.where(answer, tokens - ANSWER, tokens)) + answer.unsqueeze(-1) * self.answering


def make_model(cfg):
    model = InfFormer(cfg)
    model.tok_emb = SymbolEmbedding(model.tok_emb)
    return model


# -----------------------------------------------------------------------------
# Training one memory kind


@torch.no_grad()
def evaluate(model, test_inputs, test_targets, args, autocast):
    model.eval()
    correct = 0
    for i in range(0, len(test_inputs), args.batch_size):
        logits, _ = target_logits(model, test_inputs[i:i + args.batch_size].to(args.device), args.seg_len, autocast)
        correct += (logits.argmax(-1).cpu() == test_targets[i:i + args.batch_size]).sum().item()
    model.train()
    return correct / test_targets.numel()


@torch.no_grad()
def ltm_densities(model, inputs, args, autocast, grid):
    """Where the LTM's Gaussians put their mass over [0, 1] on a test batch: per layer, the mean
    of N(t; μ, σ²) over batch, heads and the 20 target queries."""
    reads = []
    hooks = [b.ltm.register_forward_hook(lambda m, i, out: reads.append(out[1:])) for b in model.blocks]
    model.eval()
    target_logits(model, inputs.to(args.device), args.seg_len, autocast)
    model.train()
    for h in hooks:
        h.remove()
    densities = []
    for mu, var in reads[-len(model.blocks):]:  # the last segment's reads, one per layer
        mu, var = mu[..., -N_SYMBOLS:, None].float().cpu(), var[..., -N_SYMBOLS:, None].float().cpu()
        densities.append((torch.exp(-(grid - mu) ** 2 / (2 * var)) / torch.sqrt(2 * math.pi * var)).mean((0, 1, 2)))
    return densities


def lr_at(step, args):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def budget(cfg):
    stm = f"STM {cfg.mem_len}"
    return {"xl": stm, "compressive": f"{stm} + CM {cfg.cmem_len}×{cfg.compress_rate}",
            "infinite": f"{stm} + LTM N={cfg.num_basis}", "sticky": f"{stm} + LTM N={cfg.num_basis}"}[cfg.memory]


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):  # Linux: restart the peak-RSS count at the current size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mb(device):
    """Peak GPU memory allocated on CUDA; on CPU the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(kind, args, test_set, rank, world):
    device = args.device
    cfg = Config(vocab_size=VOCAB, memory=kind, **args.model)
    torch.manual_seed(args.seed)
    model = make_model(cfg).to(device)
    ddp = model
    if world > 1:  # the LTM's parameters are unused while its memory is still empty
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=kind in ("infinite", "sticky"))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2 * (args.seed * 1000 + rank))  # even seeds train, odd seeds test
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    tokens_per_step = args.batch_size * (args.seq_len + N_SYMBOLS) * world
    reset_peak_memory(device)
    if rank == 0:
        print(f"== {kind} ({budget(cfg)}): {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{args.steps} steps of {args.batch_size}×{world} sequences of {args.seq_len}", flush=True)
    start = last_log = time.time()
    window = []  # (loss, accuracy) since the last progress line
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        inputs, targets = make_batch(args.batch_size, args.seq_len, gen)
        logits, kl = target_logits(ddp, inputs.to(device), args.seg_len, autocast)
        targets = targets.to(device)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        (loss + kl).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        window.append((loss.item(), (logits.argmax(-1) == targets).float().mean().item()))
        now = time.time()
        if rank == 0 and (now - last_log >= args.log_seconds or step == args.steps - 1):
            elapsed = now - start
            loss_avg, acc_avg = (sum(v) / len(window) for v in zip(*window))
            print(f"{kind} step {step + 1}/{args.steps} | loss {loss_avg:.3f} | acc {acc_avg:.3f} | "
                  f"{tokens_per_step * (step + 1) / elapsed:,.0f} tok/s | "
                  f"ETA {elapsed / (step + 1) * (args.steps - step - 1) / 60:.1f} min", flush=True)
            window, last_log = [], now
    train_seconds = time.time() - start
    result = None
    if rank == 0:
        accuracy = evaluate(model, *test_set, args, autocast)
        result = {"memory": kind, "budget": budget(cfg), "test_accuracy": round(accuracy, 4),
                  "tokens_per_second": round(tokens_per_step * args.steps / train_seconds),
                  "peak_memory_mb": round(peak_memory_mb(device), 1), "minutes": round((time.time() - start) / 60, 2),
                  "config": {**vars(cfg), "seq_len": args.seq_len, "steps": args.steps, "batch_size": args.batch_size,
                             "world_size": world, "lr": args.lr, "seed": args.seed, "device": str(device)}}
        print(f"{kind}: test accuracy {accuracy:.3f} on {len(test_set[0])} held-out sequences", flush=True)
        if kind in ("infinite", "sticky"):
            grid = torch.linspace(0, 1, 201)
            result["densities"] = ltm_densities(model, test_set[0][:args.batch_size], args, autocast, grid)
    return result


# -----------------------------------------------------------------------------
# Reporting


def table(results):
    lines = ["| memory | budget | test accuracy | tokens/s | peak memory (MB) | minutes |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['memory']} | {r['budget']} | {r['test_accuracy']:.3f} | {r['tokens_per_second']:,} | "
                     f"{r['peak_memory_mb']:,.0f} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def save_results(results, out):
    """results.json, written atomically so an interruption never leaves half a file."""
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "densities"} for r in results], f, indent=2)
    os.replace(tmp, os.path.join(out, "results.json"))


def plot(results, out):
    """Accuracy per memory kind, and where the LTM's attention went (the paper's Figure on sticky memories)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plot skipped (pip install matplotlib to get sort.png)")
        return
    with_ltm = [r for r in results if "densities" in r]
    fig, axes = plt.subplots(1, 1 + len(with_ltm), figsize=(4.5 * (1 + len(with_ltm)), 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.bar([r["memory"] for r in results], [r["test_accuracy"] for r in results], color="tab:blue")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"sorting, S = {results[0]['config']['seq_len']}")
    grid = torch.linspace(0, 1, 201)
    for ax, r in zip(axes[0, 1:], with_ltm):
        for layer, density in enumerate(r["densities"]):
            ax.plot(grid, density, label=f"layer {layer + 1}")
        ax.set_xlabel("t (0: oldest, 1: newest)")
        ax.set_ylabel("mean attention density")
        ax.set_title(f"{r['memory']}: LTM attention on a test batch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "sort.png")
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


# -----------------------------------------------------------------------------


def device(name):
    """argparse type for --device: an unknown name becomes a usage error, not a traceback."""
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(name) from e


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", choices=KINDS + ["all"], default="all", help="memory kind to train (default: all four)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model and training setting (default: cpu)")
    p.add_argument("--seq-len", type=int, help="sequence length S (preset: cpu 1024, paper 4000)")
    p.add_argument("--steps", type=int, help="training steps (preset: cpu 2500, paper 20000)")
    p.add_argument("--batch-size", type=int, help="sequences per step and process (preset: cpu 16, paper 8)")
    p.add_argument("--lr", type=float, help="peak learning rate (preset: cpu 3e-3, paper 2e-4)")
    p.add_argument("--eval-size", type=int, help="held-out test sequences (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the training data (default 0)")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--out", default="runs/sort", help="folder for results.json and sort.png (default runs/sort)")
    p.add_argument("--log-seconds", type=float, default=5.0, help="seconds between progress lines (default 5)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("seq_len", "steps", "batch_size", "lr", "eval_size"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.warmup, args.clip, args.model = min(preset["warmup"], args.steps), preset["clip"], preset["model"]
    args.seg_len = args.model["seg_len"]
    for key in ("seq_len", "steps", "batch_size", "eval_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        p.error("--lr must be positive")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # launched by torchrun: one process per GPU (nccl), or per CPU worker (gloo)
        if args.device.type == "cuda":
            args.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(args.device)
        torch.distributed.init_process_group("nccl" if args.device.type == "cuda" else "gloo")
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(2 * args.seed + 1)  # a held-out set: odd seeds never train
    chunks = [make_batch(min(args.batch_size, args.eval_size - i), args.seq_len, gen)
              for i in range(0, args.eval_size, args.batch_size)]
    test_set = tuple(torch.cat(parts) for parts in zip(*chunks))
    kinds = KINDS if args.memory == "all" else [args.memory]
    results = []
    try:
        for kind in kinds:
            result = train(kind, args, test_set, rank, world)
            if rank == 0:
                results.append(result)
                save_results(results, args.out)  # after every kind: an interruption loses at most one
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\ninterrupted; finished kinds are in {os.path.join(args.out, 'results.json')}", file=sys.stderr)
        sys.exit(130)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"\nSorting, S = {args.seq_len}, {args.steps} steps, batch {args.batch_size}×{world}, "
              f"preset {args.preset}, seed {args.seed}, device {args.device}\n")
        print(table(results))
        plot(results, args.out)


if __name__ == "__main__":
    main()
