"""
The sorting task of the ∞-former paper (§5.1), comparing the four memory kinds.

A sequence of S symbols is drawn from a distribution that drifts from p_init to p_final;
the model must then output the 20 symbols ordered by how often they occurred in the whole
sequence. The recent tokens alone give the wrong order, so a model that sees only its last
segment and short-term memory fails as S grows; one that remembers everything can succeed.

  python train_sort.py                                  # all four memories, CPU preset, S = 1024
  python train_sort.py --memory infinite xl --seed 3    # some memory kinds, another seed
  python train_sort.py --preset sweep --seeds 0 1 2     # accuracy against S (Figure 2), on a CPU
  python train_sort.py --preset paper --seq-len 8000    # the paper's setting, one GPU
  torchrun --nproc_per_node=4 train_sort.py --preset paper --seeds 0 1 2   # Figure 2, several GPUs

Every (memory, S, seed) is one run and one row of results.json; a run already there with the
same configuration, eval size and code (a fingerprint of this file and infformer.py) is not
repeated, so an interrupted sweep continues where it stopped.

Where the training departs from the authors': every step draws fresh sequences (the authors
train on a fixed set of 8,000), so the model cannot memorise its training set, and the held-out
sets come from seeds that training never draws.
"""
import argparse
import datetime
import hashlib
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
KINDS = ["xl", "compressive", "infinite", "sticky"]  # "xl": an STM as long as the others' STM + long-range memory
EXTRA_KINDS = ["xl-stm"]  # Transformer-XL with only the others' STM

PRESETS = {
    # A compact model that learns the task on a laptop CPU in minutes per memory kind. At lr 3e-3
    # some seeds stalled for a thousand steps (the ∞-former on 2 of 3); 2e-3 learned with all of them.
    "cpu": dict(seq_len=[1024], steps=2000, batch_size=16, lr=2e-3, warmup=30, clip=1.0, eval_size=512,
                model=dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, dropout=0.0, seg_len=128, mem_len=128,
                           num_basis=128, basis_widths=(0.04, 0.2), num_samples=128, tau=0.75,
                           cmem_len=128, compress_rate=8)),
    # The length sweep on a CPU (the paper's Figure 2, scaled down): every memory half the cpu
    # preset's, so that S = 128 fits inside Transformer-XL's window and S = 2048 is four times what
    # the compressed memory covers (64 slots × 8 + STM 64 + segment 64).
    "sweep": dict(seq_len=[128, 512, 2048], steps=1500, batch_size=16, lr=2e-3, warmup=30, clip=1.0, eval_size=512,
                  model=dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, dropout=0.0, seg_len=64, mem_len=64,
                             num_basis=64, basis_widths=(0.04, 0.2), num_samples=64, tau=0.75,
                             cmem_len=64, compress_rate=8)),
    # The paper's setting (the authors' sorting code: N = 512, widths {0.01, 0.05}, M = 512).
    "paper": dict(seq_len=[4000, 8000, 16000], steps=20000, batch_size=8, lr=2e-4, warmup=0, clip=0.25, eval_size=512,
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


def held_out(size, seq_len, seed, batch_size):
    """size sequences from their own (odd) seed: training draws only even seeds."""
    gen = torch.Generator().manual_seed(seed)
    chunks = [make_batch(min(batch_size, size - i), seq_len, gen) for i in range(0, size, batch_size)]
    return tuple(torch.cat(parts) for parts in zip(*chunks))


def segments(inputs, seg_len):
    """Split from the end, so the last segment ends with the 20 target positions; a sequence
    shorter than a segment is one segment."""
    first = inputs.size(1) % seg_len
    return ([inputs[:, :first]] if first else []) + list(inputs[:, first:].split(seg_len, 1) if first < inputs.size(1) else [])


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


def seeded(fn):
    """Run fn with torch's RNG seeded and then restored: sticky sampling draws random numbers, so
    evaluations and diagnostics are reproducible and leave the training's random stream alone."""
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else []):
            torch.manual_seed(0)
            return fn(*args, **kwargs)
    return wrapper


@seeded
@torch.no_grad()
def evaluate(model, inputs, targets, args, autocast):
    """Accuracy over the 20 answers of every held-out sequence (argmax, teacher-forced)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(inputs), args.batch_size):
        logits, _ = target_logits(model, inputs[i:i + args.batch_size].to(args.device), args.seg_len, autocast)
        correct += (logits.argmax(-1).cpu() == targets[i:i + args.batch_size]).sum().item()
    model.train(was_training)
    return correct / targets.numel()


@torch.no_grad()
def ltm_reads(model, inputs, args, autocast, ablate=False):
    """The last segment's reads on a batch, per layer with an LTM, at the 20 answer positions:
    (Z_STM, Z_LTM, μ, σ²), each float32 on the CPU; Z (bs, 20, d), μ and σ² (bs, H, 20).
    With ablate, Z_LTM is replaced by zeros. Also returns the logits at the answers."""
    stm, ltm = [], []
    blocks = [b for b in model.blocks if b.ltm is not None]

    def read(module, inputs, out):
        ltm.append(out)
        return (torch.zeros_like(out[0]), *out[1:]) if ablate else out

    hooks = [b.proj.register_forward_hook(lambda m, i, out: stm.append(out)) for b in blocks]
    hooks += [b.ltm.register_forward_hook(read) for b in blocks]
    was_training = model.training
    model.eval()
    logits, _ = target_logits(model, inputs.to(args.device), args.seg_len, autocast)
    model.train(was_training)
    for h in hooks:
        h.remove()
    stm, ltm = stm[-len(blocks):], ltm[-len(blocks):]  # the last segment's, which holds the answers
    if not blocks or len(ltm) < len(blocks):  # no LTM, or never written (a sequence of under three segments)
        return [], logits.cpu()
    last = lambda t: t[..., -N_SYMBOLS:, :] if t.dim() == 3 else t[..., -N_SYMBOLS:]
    return [tuple(last(t).float().cpu() for t in (z_stm, *out)) for z_stm, out in zip(stm, ltm)], logits.cpu()


@seeded
def ltm_diagnostics(model, inputs, targets, args, autocast):
    """Per layer, on a held-out batch: how large the LTM's contribution is (‖Z_LTM‖ / ‖Z_STM‖, mean
    over answers) and where it reads (mean and spread of μ and σ over batch, heads and answers);
    and how much the model relies on it: accuracy minus accuracy with every Z_LTM set to zero."""
    reads, logits = ltm_reads(model, inputs, args, autocast)
    if not reads:
        return None
    _, ablated = ltm_reads(model, inputs, args, autocast, ablate=True)
    accuracy = lambda lg: (lg.argmax(-1) == targets).float().mean().item()
    return {"ltm_share": [round((z.norm(dim=-1).mean() / z_stm.norm(dim=-1).mean()).item(), 4)
                          for z_stm, z, _, _ in reads],
            "mu": [[round(mu.mean().item(), 3), round(mu.std().item(), 3)] for _, _, mu, _ in reads],
            "sigma": [[round(var.sqrt().mean().item(), 3), round(var.sqrt().std().item(), 3)] for *_, var in reads],
            "accuracy": round(accuracy(logits), 4), "ltm_use": round(accuracy(logits) - accuracy(ablated), 4)}


@seeded
def ltm_densities(model, inputs, args, autocast, grid):
    """Where the LTM's Gaussians put their mass over [0, 1]: per layer, the mean of N(t; μ, σ²)
    over batch, heads and the 20 answer queries."""
    reads, _ = ltm_reads(model, inputs, args, autocast)
    return [(torch.exp(-(grid - mu[..., None]) ** 2 / (2 * var[..., None])) / torch.sqrt(2 * math.pi * var[..., None]))
            .mean((0, 1, 2)) for _, _, mu, var in reads]


RISE = 0.05  # the LTM "is used" once zeroing its reads costs 5 points of held-out accuracy


def lr_at(step, args):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def model_config(kind, args):
    """Equal budgets: the long-range memories hold num_basis = cmem_len vectors each; "xl" gets an
    STM of mem_len + num_basis instead, "xl-stm" only the others' STM."""
    model = dict(args.model)
    if kind == "xl":
        model["mem_len"] += model["num_basis"]
    return Config(vocab_size=VOCAB, memory="xl" if kind == "xl-stm" else kind, **model)


def budget(cfg):
    stm = f"STM {cfg.mem_len}"
    return {"xl": stm, "compressive": f"{stm} + CM {cfg.cmem_len}×{cfg.compress_rate}",
            "infinite": f"{stm} + LTM N={cfg.num_basis}", "sticky": f"{stm} + LTM N={cfg.num_basis}"}[cfg.memory]


def code_fingerprint():
    """A hash of the code that computes a result: an edit to either file makes finished runs stale."""
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in ("infformer.py", "train_sort.py"):
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def run_config(cfg, seq_len, seed, args, world):
    """What a result was measured with (as JSON stores it): a finished run with the same one is reused."""
    return json.loads(json.dumps({**vars(cfg), "seq_len": seq_len, "steps": args.steps, "batch_size": args.batch_size,
                                  "world_size": world, "lr": args.lr, "seed": seed, "dtype": args.dtype,
                                  "eval_size": args.eval_size, "code": code_fingerprint()}))


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


def train(kind, seq_len, seed, args, valid_set, test_set, rank, world):
    device = args.device
    cfg = model_config(kind, args)
    torch.manual_seed(seed)
    model = make_model(cfg).to(device)
    ddp = model
    if world > 1:  # the LTM's parameters are unused while its memory is still empty
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=kind in ("infinite", "sticky"))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2 * (seed * 1000 + rank))  # even seeds train, odd seeds are held out
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    tokens_per_step = args.batch_size * (seq_len + N_SYMBOLS) * world
    reset_peak_memory(device)
    if rank == 0:
        print(f"== {kind} ({budget(cfg)}), S = {seq_len}, seed {seed}: {sum(p.numel() for p in model.parameters()):,} "
              f"parameters, {args.steps} steps of {args.batch_size}×{world} sequences", flush=True)
    start = last_log = time.time()
    diag_seconds = 0.0  # time spent on diagnostics, kept out of tokens/s
    window, history = [], []  # (loss, accuracy) since the last progress line; LTM diagnostics
    probe = tuple(t[:32] for t in valid_set)  # a fixed held-out batch for the diagnostics
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        inputs, targets = make_batch(args.batch_size, seq_len, gen)
        logits, kl = target_logits(ddp, inputs.to(device), args.seg_len, autocast)
        targets = targets.to(device)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        (loss + kl).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        window.append((loss.item(), (logits.argmax(-1) == targets).float().mean().item()))
        if rank == 0 and kind in ("infinite", "sticky") and ((step + 1) % args.diag_every == 0 or step == 0):
            t0 = time.time()
            diag = ltm_diagnostics(model, *probe, args, autocast)
            if diag:
                history.append({"step": step + 1, **diag})
            diag_seconds += time.time() - t0
        now = time.time()
        if rank == 0 and (now - last_log >= args.log_seconds or step == args.steps - 1):
            elapsed = now - start - diag_seconds
            loss_avg, acc_avg = (sum(v) / len(window) for v in zip(*window))
            d = history[-1] if history else None
            diag = (f" | LTM/STM {' '.join(f'{x:.2f}' for x in d['ltm_share'])} | σ "
                    f"{' '.join(f'{m:.2f}' for m, _ in d['sigma'])} | LTM use {100 * d['ltm_use']:+.1f} pts") if d else ""
            print(f"{kind} step {step + 1}/{args.steps} | loss {loss_avg:.3f} | acc {acc_avg:.3f}{diag} | "
                  f"{tokens_per_step * (step + 1) / elapsed:,.0f} tok/s | "
                  f"ETA {elapsed / (step + 1) * (args.steps - step - 1) / 60:.1f} min", flush=True)
            window, last_log = [], now
    train_seconds = time.time() - start - diag_seconds
    result = None
    if rank == 0:
        valid_accuracy = evaluate(model, *valid_set, args, autocast)
        accuracy = evaluate(model, *test_set, args, autocast)
        rise = next((h["step"] for h in history if h["ltm_use"] >= RISE), None)
        result = {"memory": kind, "budget": budget(cfg), "seq_len": seq_len, "seed": seed,
                  "valid_accuracy": round(valid_accuracy, 4), "test_accuracy": round(accuracy, 4),
                  "tokens_per_second": round(tokens_per_step * args.steps / train_seconds),
                  "peak_memory_mb": round(peak_memory_mb(device), 1), "minutes": round((time.time() - start) / 60, 2),
                  "config": {**run_config(cfg, seq_len, seed, args, world), "device": str(device)}}
        if history:
            result.update(ltm_rise_step=rise, ltm_diagnostics=history)
            grid = torch.linspace(0, 1, 201)
            result["densities"] = [d.tolist() for d in ltm_densities(model, probe[0], args, autocast, grid)]
        print(f"{kind}, S = {seq_len}, seed {seed}: valid accuracy {valid_accuracy:.3f}, test accuracy {accuracy:.3f} "
              f"({len(test_set[0])} held-out sequences each)"
              + (f"; the LTM is used (+{100 * RISE:.0f} pts) from step {rise}" if history and rise else ""), flush=True)
    return result


# -----------------------------------------------------------------------------
# Reference levels and reporting


def count_ranking_accuracy(inputs, targets, window):
    """Accuracy of ranking the symbols by their counts in the last `window` tokens of the stream,
    teacher-forced as the model is: at answer k, the best-ranked symbol not among the first k."""
    streams = inputs[:, :-N_SYMBOLS][:, -window:]
    rank = sort_targets(streams).argsort(1)  # rank of every symbol  (bs, 20)
    correct = 0
    for k in range(N_SYMBOLS):
        given = F.one_hot(targets[:, :k], N_SYMBOLS).sum(1).bool() if k else torch.zeros_like(rank, dtype=torch.bool)
        correct += (rank.masked_fill(given, N_SYMBOLS).argmin(1) == targets[:, k]).sum().item()
    return correct / targets.numel()


UNIFORM = sum(1 / k for k in range(1, N_SYMBOLS + 1)) / N_SYMBOLS  # H₂₀/20: a uniform pick among those not given


def summary(results, args, test_sets):
    """A table per length: every kind's test accuracy, mean and min–max over seeds, and reference levels."""
    lines = []
    for seq_len in sorted({r["seq_len"] for r in results}):
        rows = [r for r in results if r["seq_len"] == seq_len]
        # how far back xl reaches: each layer sees its STM, so n_layers × STM + segment
        window = args.model["n_layers"] * (args.model["mem_len"] + args.model["num_basis"]) + args.seg_len
        lines += [f"\nS = {seq_len} (reference levels: uniform among the symbols not yet given {UNIFORM:.3f}; "
                  f"counting the last {window} tokens, as far back as xl reaches, "
                  f"{count_ranking_accuracy(*test_sets[seq_len], window):.3f})\n",
                  "| memory | budget | seeds | test accuracy (mean) | min–max | valid accuracy (mean) | minutes (mean) |",
                  "|---|---|---|---|---|---|---|"]
        for kind in dict.fromkeys(r["memory"] for r in rows):
            runs = [r for r in rows if r["memory"] == kind]
            acc = [r["test_accuracy"] for r in runs]
            mean = lambda key: sum(r[key] for r in runs) / len(runs)
            lines.append(f"| {kind} | {runs[0]['budget']} | {len(runs)} | {sum(acc) / len(acc):.3f} | "
                         f"{min(acc):.3f}–{max(acc):.3f} | {mean('valid_accuracy'):.3f} | {mean('minutes'):.1f} |")
    return "\n".join(lines)


def save_results(results, out):
    """results.json, written atomically so an interruption never leaves half a file."""
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))


def plot(results, out):
    """Accuracy against S (the paper's Figure 2), with the spread over seeds shaded; how much the
    LTM was used over training; where its attention went at the longest S."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plot skipped (pip install matplotlib to get sort.png)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    lengths = sorted({r["seq_len"] for r in results})
    for kind in dict.fromkeys(r["memory"] for r in results):
        acc = [[r["test_accuracy"] for r in results if r["memory"] == kind and r["seq_len"] == S] for S in lengths]
        S = [s for s, a in zip(lengths, acc) if a]
        acc = [a for a in acc if a]
        line, = axes[0].plot(S, [sum(a) / len(a) for a in acc], "o-", label=kind)
        axes[0].fill_between(S, [min(a) for a in acc], [max(a) for a in acc], color=line.get_color(), alpha=0.2)
    axes[0].axhline(UNIFORM, color="gray", ls=":", label="uniform among those not given")
    axes[0].set(xscale="log", xlabel="sequence length S", ylabel="test accuracy", ylim=(0, 1), title="sorting")
    axes[0].set_xticks(lengths, [str(s) for s in lengths])
    axes[0].legend(fontsize=8)
    longest = [r for r in results if r["seq_len"] == lengths[-1] and r.get("ltm_diagnostics")]
    for r in longest:
        h = r["ltm_diagnostics"]
        axes[1].plot([d["step"] for d in h], [100 * d["ltm_use"] for d in h], label=f"{r['memory']} seed {r['seed']}")
    axes[1].set(xlabel="training step", ylabel="accuracy lost without the LTM (points)",
                title=f"how much the LTM is used, S = {lengths[-1]}")
    grid = torch.linspace(0, 1, 201)
    for r in longest[:2]:
        for layer, density in enumerate(r["densities"]):
            axes[2].plot(grid, density, label=f"{r['memory']} seed {r['seed']}, layer {layer + 1}")
    axes[2].set(xlabel="t (0: oldest, 1: newest)", ylabel="mean attention density", title="where the LTM reads")
    for ax in axes[1:]:
        if ax.lines:
            ax.legend(fontsize=7)
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
    p.add_argument("--memory", nargs="+", choices=KINDS + EXTRA_KINDS + ["all"], default=["all"],
                   help="memory kinds to train (default: all = " + ", ".join(KINDS) + ")")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model and training setting (default: cpu)")
    p.add_argument("--seq-len", type=int, nargs="+",
                   help="sequence lengths S (preset: cpu 1024; sweep 128 512 2048; paper 4000 8000 16000)")
    p.add_argument("--seed", "--seeds", type=int, nargs="+", default=[0],
                   help="seeds of the model and the training data; each is its own run (default 0)")
    p.add_argument("--steps", type=int, help="training steps (preset: cpu 2000, sweep 1500, paper 20000)")
    p.add_argument("--batch-size", type=int, help="sequences per step and process (preset: cpu and sweep 16, paper 8)")
    p.add_argument("--lr", type=float, help="peak learning rate (preset: cpu and sweep 2e-3, paper 2e-4)")
    p.add_argument("--eval-size", type=int, help="held-out sequences in each of valid and test (default 512)")
    p.add_argument("--dtype", choices=["float32", "bf16"], help="bf16: autocast, with the method's math in float32 "
                   "(default: bf16 on CUDA, float32 on CPU)")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--out", default="runs/sort", help="folder for results.json and sort.png (default runs/sort); "
                   "runs already in its results.json with the same configuration are not repeated")
    p.add_argument("--diag-every", type=int, default=100,
                   help="steps between LTM diagnostics on 32 held-out sequences (default 100)")
    p.add_argument("--log-seconds", type=float, default=5.0, help="seconds between progress lines (default 5)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("seq_len", "steps", "batch_size", "lr", "eval_size"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.warmup, args.clip, args.model = min(preset["warmup"], args.steps), preset["clip"], preset["model"]
    args.seg_len = args.model["seg_len"]
    args.kinds = list(dict.fromkeys(k for m in args.memory for k in (KINDS if m == "all" else [m])))
    for key in ("steps", "batch_size", "eval_size", "diag_every"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if min(args.seq_len) < 1:
        p.error("--seq-len must be at least 1")
    if not args.lr > 0:
        p.error("--lr must be positive")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: a file of that name exists; give a folder")
    args.dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "float32")
    return args


def load_results(path):
    """The finished runs in results.json ([] if there is none). A file that does not parse stops the
    run with one line, before anything can overwrite the rows it holds."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            results = json.load(f)
        keys = {"memory", "seq_len", "seed", "test_accuracy", "config"}
        if not isinstance(results, list) or not all(isinstance(r, dict) and keys <= set(r) for r in results):
            raise ValueError("not a list of runs")
        return results
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        print(f"train_sort.py: error: {path} is damaged ({e}); repair or move it, it was left as it is",
              file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    path = os.path.join(args.out, "results.json")
    results = load_results(path)
    if world > 1:  # launched by torchrun: one process per GPU (nccl), or per CPU worker (gloo)
        if args.device.type == "cuda":
            args.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(args.device)
        # While rank 0 evaluates and runs the diagnostics, the other ranks wait in a collective;
        # a paper-preset evaluation (1,024 sequences of 16,000 tokens) can outlast NCCL's 10 minutes.
        torch.distributed.init_process_group("nccl" if args.device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=2))
    os.makedirs(args.out, exist_ok=True)
    finished = {(r["memory"], r["seq_len"], r["seed"]): r for r in results}
    test_sets = {}
    try:
        for seq_len in args.seq_len:
            for seed in args.seed:
                valid_set, test_sets[seq_len] = (held_out(args.eval_size, seq_len, 4 * seed + k, args.batch_size)
                                                 for k in (3, 1))
                for kind in args.kinds:
                    old = finished.get((kind, seq_len, seed))
                    cfg = run_config(model_config(kind, args), seq_len, seed, args, world)
                    if old and {k: v for k, v in old["config"].items() if k != "device"} == cfg:
                        if rank == 0:
                            print(f"== {kind}, S = {seq_len}, seed {seed}: done before, test accuracy "
                                  f"{old['test_accuracy']:.3f} (from {path})", flush=True)
                        continue
                    result = train(kind, seq_len, seed, args, valid_set, test_sets[seq_len], rank, world)
                    if rank == 0:  # after every run: an interruption loses at most the one running
                        results = [r for r in results if (r["memory"], r["seq_len"], r["seed"]) != (kind, seq_len, seed)]
                        results.append(result)
                        save_results(results, args.out)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\ninterrupted; finished runs are in {path}, and the same command continues", file=sys.stderr)
        sys.exit(130)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        wanted = [r for r in results if r["seq_len"] in args.seq_len and r["seed"] in args.seed
                  and r["memory"] in args.kinds]
        print(f"\nSorting, {args.steps} steps, batch {args.batch_size}×{world}, preset {args.preset}, "
              f"seeds {' '.join(map(str, args.seed))}, device {args.device}")
        print(summary(wanted, args, test_sets))
        plot(wanted, args.out)


if __name__ == "__main__":
    main()
