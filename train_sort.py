"""The sorting task of the ∞-former paper (§5.1): S symbols drawn from a distribution drifting from p_init to
p_final, then the 20 symbols by how often they occurred in the whole sequence (the recent tokens alone mislead).

  python train_sort.py                                  # all five memories, CPU preset, S = 512
  python train_sort.py --memory infinite xl --seed 3    # some memory kinds, another seed
  python train_sort.py --preset sweep --seeds 0 1 2     # accuracy against S (Figure 2), on a CPU
  torchrun --nproc_per_node=4 train_sort.py --preset paper --seeds 0 1 2   # the paper's setting, several GPUs

Each (memory, S, seed) is a row of results.json, reused while configuration and code are the same.
"""
import argparse
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.nn.functional as F

from infformer import MEMORY_KINDS, Config, InfFormer

# Vocabulary: symbols 0..19 and the separator. The answer is fed back as 21 + symbol, which
# SymbolEmbedding turns into the symbol's embedding plus a learned "answering" vector.
N_SYMBOLS, SEP, ANSWER = 20, 20, 21
VOCAB = SEP + 1
KINDS = list(MEMORY_KINDS)  # "xl": an STM as long as the others' STM + long-range memory

# A compact model that learns the task on a laptop CPU in a few minutes per memory kind. S = 512 is 1.6×
# xl's reach (segment 64 + 2 layers × STM 128) and what the compressed memory covers (64 slots × 8).
# At lr 3e-3 some seeds stalled for a thousand steps (an earlier, larger preset); 2e-3 learned with all.
CPU = dict(seq_len=[512], steps=1500, batch_size=16, lr=2e-3, warmup=30, clip=1.0,
           model=dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, dropout=0.0, seg_len=64, mem_len=64, num_basis=64,
                      basis_widths=(0.04, 0.2), num_samples=64, tau=0.75, cmem_len=64, compress_rate=8))
PRESETS = {
    "cpu": CPU,
    # The length sweep (the paper's Figure 2, scaled down): S = 128 fits inside Transformer-XL's
    # window, S = 2048 is four times what the compressed memory covers.
    "sweep": dict(CPU, seq_len=[128, 512, 2048]),
    # The paper's setting (the authors' sorting code: N = 512, widths {0.01, 0.05}, M = 512).
    "paper": dict(seq_len=[4000, 8000, 16000], steps=20000, batch_size=8, lr=2e-4, warmup=0, clip=0.25,
                  model=dict(d_model=300, n_layers=3, n_heads=6, d_ff=300, dropout=0.1, seg_len=1024, mem_len=1024,
                             num_basis=512, basis_widths=(0.01, 0.05), num_samples=512, tau=0.75, cmem_len=512,
                             compress_rate=4)),
}
RISE = 0.05  # the LTM "is used" once zeroing its reads costs 5 points of held-out accuracy
DIAG_EVERY = 100  # steps between LTM diagnostics
UNIFORM = sum(1 / k for k in range(1, N_SYMBOLS + 1)) / N_SYMBOLS  # H₂₀/20: a uniform pick among those not given


# -----------------------------------------------------------------------------
# Plumbing that train_lm.py imports too


def seeded(fn):
    """fn run with torch's RNG seeded with 0, then restored: reproducible, and the training's stream untouched."""
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
            torch.manual_seed(0)
            return fn(*args, **kwargs)
    return wrapper


def init_distributed(device):
    """(rank, world size, this process's device); under torchrun (WORLD_SIZE > 1) joins the process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # launched by torchrun: one process per GPU (nccl), or per CPU worker (gloo)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        # While rank 0 evaluates, the other ranks wait in a collective: a paper-preset evaluation
        # (sorting: 1,024 sequences of 16,000 tokens; WikiText-103's valid and test) can outlast NCCL's 10 minutes.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
        if rank > 0:  # only rank 0 prints
            sys.stdout = open(os.devnull, "w")
    return rank, world, device


def atomic_save(obj, path):
    """torch.save (json.dump for a .json) to a temporary file, then rename: an interruption never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    if path.endswith(".json"):
        pathlib.Path(tmp).write_text(json.dumps(obj, indent=1))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def ltm_hooked(model, hook):
    """Inside, hook(out) sees every LTM read that runs (Z_LTM, μ, σ²) and replaces it if it returns something."""
    hooks = [b.read_ltm.register_forward_hook(lambda m, i, out: hook(out)) for b in model.blocks if b.read_ltm is not None]
    try:
        yield len(hooks)
    finally:
        for h in hooks:
            h.remove()


def ltm_zeroed(model):
    """Inside, every layer's Z_LTM is zero: what the model loses without its long-term memory."""
    return ltm_hooked(model, lambda out: (torch.zeros_like(out[0]), *out[1:]))


def compiled(model, enabled, device):
    """torch.compile(model), or the model itself after one printed line where this platform cannot compile."""
    if enabled:
        torch._dynamo.reset()  # each run its own graphs: dynamo's recompile limit counts per function, across models
        torch._inductor.config.fallback_random = True  # random ops draw eager's numbers: the same run, compiled or not
        torch._dynamo.config.optimize_ddp = False  # its graph splitting at DDP buckets fails on this model (torch 2.13)
        try:  # a tiny function through the whole tool chain first: a C++ compiler on a CPU, Triton on CUDA
            torch.compile(lambda x: x + 1)(torch.zeros(2, device=device))
            torch._dynamo.utils.counters.clear()  # counters["stats"]["unique_graphs"]: the model's graphs from here
            return torch.compile(model)
        except Exception as e:
            print(f"--compile: {type(e).__name__} ({str(e).strip().splitlines()[0][:80]}); running eagerly", flush=True)
    return model


def lr_at(step, peak, warmup, total, floor):
    """Linear warm-up to peak, then cosine decay to floor × peak at total (peak 1: a multiplier)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def peak_memory_mb(device):
    """Peak GPU memory allocated on CUDA; on CPU the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = pathlib.Path("/proc/self/status")  # Linux; elsewhere not measured (0)
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM")), 0.0)


# -----------------------------------------------------------------------------
# The data (DESIGN.md §4.1) and the model


def sample_streams(batch, seq_len, gen):
    """Streams (B, S), token j drawn from (1 − j/S)·p_init + (j/S)·p_final, and p_init, p_final (B, 20)."""
    p = torch.randint(1, 10, (2, batch, N_SYMBOLS), generator=gen).float()  # integers 1..9, normalised
    p_init, p_final = (p / p.sum(-1, keepdim=True)).unbind(0)
    j = (torch.arange(1, seq_len + 1) / seq_len)[None, :, None]  # (1, S, 1)
    probs = (1 - j) * p_init[:, None] + j * p_final[:, None]  # (B, S, 20)
    return torch.multinomial(probs.flatten(0, 1), 1, generator=gen).view(batch, seq_len), p_init, p_final


def sort_targets(streams):
    """The 20 symbols by decreasing count (ties: first occurrence first), unseen ones ascending."""
    B, S = streams.shape
    counts = F.one_hot(streams, N_SYMBOLS).sum(1)  # (B, 20)
    first = torch.full((B, N_SYMBOLS), S).scatter_reduce(1, streams, torch.arange(S).expand(B, S), "amin")  # S: unseen
    key = (-counts * (S + 1) + first) * N_SYMBOLS + torch.arange(N_SYMBOLS)  # lexicographic (−count, first, symbol)
    return key.argsort(1)


def make_batch(batch, seq_len, gen):
    """Inputs (B, S + 20): stream, separator, the answer teacher-forced; targets (B, 20) for the last 20 positions."""
    streams, _, _ = sample_streams(batch, seq_len, gen)
    targets = sort_targets(streams)
    return torch.cat([streams, torch.full((batch, 1), SEP), ANSWER + targets[:, :-1]], 1), targets


def held_out(size, seq_len, seed, batch_size):
    """size sequences from their own (odd) seed: training draws only even seeds."""
    gen = torch.Generator().manual_seed(seed)
    chunks = [make_batch(min(batch_size, size - i), seq_len, gen) for i in range(0, size, batch_size)]
    return tuple(torch.cat(parts) for parts in zip(*chunks))


def segments(inputs, seg_len):
    """Split from the end, so the last segment ends with the 20 targets; a sequence shorter than a segment is one."""
    first = inputs.size(1) % seg_len or seg_len  # the remainder, or a whole segment
    return inputs.split([first] + [seg_len] * ((inputs.size(1) - first) // seg_len), 1)


def target_logits(model, inputs, seg_len, autocast):
    """Logits at the 20 targets (B, 20, V) and the KL term; only the last segment builds a graph."""
    chunks, memory = segments(inputs, seg_len), None
    with torch.no_grad(), autocast:
        for chunk in chunks[:-1]:
            _, memory, _ = model(chunk, memory, outputs=0)  # the memory only: no top layer
    with autocast:
        logits, _, kl = model(chunks[-1], memory, commit=False, outputs=N_SYMBOLS)  # nothing after it to remember
    return logits.float(), kl


class SymbolEmbedding(torch.nn.Module):
    """The model's embedding, with answer tokens (21 + s) read as symbol s plus a learned "answering" vector."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding
        self.answering = torch.nn.Parameter(torch.zeros(embedding.embedding_dim))

    def forward(self, tokens):
        # tokens % ANSWER: an answer 21 + s becomes s, symbols and the separator (< 21) stay
        return self.embedding(tokens % ANSWER) + (tokens >= ANSWER).unsqueeze(-1) * self.answering


def make_model(cfg):
    model = InfFormer(cfg)
    model.tok_emb = SymbolEmbedding(model.tok_emb)
    return model


def model_config(kind, args):
    """Equal budgets: the long-range memories hold num_basis = cmem_len vectors; xl gets an STM that much longer."""
    mem_len = args.model["mem_len"] + (args.model["num_basis"] if kind == "xl" else 0)
    return Config(vocab_size=VOCAB, memory="xl" if kind == "xl-stm" else kind, **{**args.model, "mem_len": mem_len})


def budget(cfg):
    dh = cfg.d_model // cfg.n_heads  # Infini-attention holds H × dh × (dh + 1) numbers per layer
    long_range = {"xl": "", "compressive": f" + CM {cfg.cmem_len}×{cfg.compress_rate}",
                  "infini": f" + Infini {cfg.n_heads}×{dh}×{dh + 1}"}
    return f"STM {cfg.mem_len}" + long_range.get(cfg.memory, f" + LTM N={cfg.num_basis}")


# -----------------------------------------------------------------------------
# Evaluation and the LTM diagnostics


@seeded
@torch.no_grad()
def evaluate(model, inputs, targets, args, autocast):
    """Accuracy over the 20 answers of every held-out sequence (argmax, teacher-forced), in eval mode (no dropout)."""
    model.eval()
    batches = [inputs[i:i + args.batch_size].to(args.device) for i in range(0, len(inputs), args.batch_size)]
    logits = torch.cat([target_logits(model, batch, args.seg_len, autocast)[0].cpu() for batch in batches])
    model.train()
    return (logits.argmax(-1) == targets).sum().item() / targets.numel()


@seeded
@torch.no_grad()
def ltm_diagnostics(model, inputs, targets, args, autocast):
    """On held-out sequences, per LTM layer the mean μ and σ of the 20 answers' reads, and ltm_use (see below)."""
    # ltm_use: the accuracy lost with every Z_LTM zeroed. None while the LTM is unread (no LTM, or a sequence of
    # under three segments).
    reads = []  # (μ, σ²) of every read, layer after layer
    model.eval()
    accuracy = lambda: (target_logits(model, inputs.to(args.device), args.seg_len, autocast)[0].argmax(-1).cpu()
                        == targets).float().mean().item()
    with ltm_hooked(model, lambda out: reads.append(out[1:])) as n_layers:  # append returns None: reads unchanged
        full = accuracy()
    with ltm_zeroed(model):
        zeroed = accuracy()
    model.train()
    if not reads:
        return None
    at_answers = lambda t: round(t[..., -N_SYMBOLS:].mean().item(), 3)  # the last 20 queries: the answers
    last = reads[-n_layers:]  # the last segment's reads: it holds the answers
    return {"mu": [at_answers(mu) for mu, _ in last], "sigma": [at_answers(var.sqrt()) for _, var in last],
            "accuracy": round(full, 4), "ltm_use": round(full - zeroed, 4)}


def count_ranking_accuracy(inputs, targets, window):
    """Accuracy of ranking by the counts of the last `window` tokens, teacher-forced: the best not yet given."""
    rank = sort_targets(inputs[:, :-N_SYMBOLS][:, -window:]).argsort(1)  # rank of every symbol  (bs, 20)
    given = targets.argsort(1)[:, None] < torch.arange(N_SYMBOLS)[:, None]  # (bs, k, 20): given before answer k
    return (rank[:, None].masked_fill(given, N_SYMBOLS).argmin(-1) == targets).sum().item() / targets.numel()


# -----------------------------------------------------------------------------
# Training one memory kind


def code_fingerprint():
    """A hash of the code that computes a result: an edit to either file makes finished runs stale."""
    code = b"".join(pathlib.Path(__file__).resolve().with_name(f).read_bytes() for f in ("infformer.py", "train_sort.py"))
    return hashlib.sha256(code).hexdigest()[:16]


def run_config(cfg, seq_len, seed, args, world):
    """What a result was measured with (as JSON stores it): a finished run with the same one is reused."""
    return json.loads(json.dumps({**vars(cfg), "seq_len": seq_len, "steps": args.steps, "batch_size": args.batch_size,
                                  "world_size": world, "lr": args.lr, "seed": seed, "dtype": args.dtype,
                                  "eval_size": args.eval_size, "code": code_fingerprint()}))


def progress(kind, step, args, window, diag, seconds, tokens_per_step):
    """A progress line: mean loss and accuracy since the last one, the latest LTM diagnostics, speed and ETA."""
    loss, acc = (sum(v) / len(window) for v in zip(*window))
    ltm = (f" | μ {' '.join(f'{m:.2f}' for m in diag['mu'])} | σ {' '.join(f'{s:.2f}' for s in diag['sigma'])} | "
           f"LTM use {100 * diag['ltm_use']:+.1f} pts" if diag else "")
    return (f"{kind} step {step}/{args.steps} | loss {loss:.3f} | acc {acc:.3f}{ltm} | "
            f"{tokens_per_step * step / seconds:,.0f} tok/s | ETA {seconds / step * (args.steps - step) / 60:.1f} min")


def train(kind, seq_len, seed, args, valid_set, test_set, rank, world):
    """One run: a fresh model trained on fresh sequences; on rank 0, scored on the held-out ones (a results row)."""
    device, cfg = args.device, model_config(kind, args)
    torch.manual_seed(seed)
    model = ddp = make_model(cfg).to(device)
    if world > 1:  # the LTM's parameters are unused while its memory is still empty
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=kind in ("infinite", "sticky"))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    run = compiled(ddp, args.compile, device)  # for training; evaluation and diagnostics run eagerly
    gen = torch.Generator().manual_seed(2 * (seed * 1000 + rank))  # even seeds train, odd seeds are held out
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    tokens_per_step = args.batch_size * (seq_len + N_SYMBOLS) * world
    if device.type == "cuda":  # restart the peak that peak_memory_mb reads at the current use
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):  # Linux: restart the peak-RSS count at the current size
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    print(f"== {kind} ({budget(cfg)}), S = {seq_len}, seed {seed}: {sum(p.numel() for p in model.parameters()):,} "
          "parameters", flush=True)
    start = last_log = time.time()
    # time spent on diagnostics (kept out of tokens/s); (loss, accuracy) since the last progress line; LTM diagnostics
    diag_seconds, window, history = 0.0, [], []
    probe = tuple(t[:32] for t in valid_set)  # a fixed held-out batch for the diagnostics
    for step in range(args.steps):
        opt.param_groups[0]["lr"] = lr_at(step, args.lr, args.warmup, args.steps, floor=0.1)  # AdamW's one group
        # fresh sequences every step (the authors: a fixed 8,000)
        inputs, targets = (t.to(device) for t in make_batch(args.batch_size, seq_len, gen))
        logits, kl = target_logits(run, inputs, args.seg_len, autocast)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        (loss + kl).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        window.append((loss.item(), (logits.argmax(-1) == targets).float().mean().item()))
        if rank == 0 and kind in ("infinite", "sticky") and ((step + 1) % DIAG_EVERY == 0 or step == 0):
            t0 = time.time()
            diag = ltm_diagnostics(model, *probe, args, autocast)
            history += [{"step": step + 1, **diag}] if diag else []
            diag_seconds += time.time() - t0
        now = time.time()
        if rank == 0 and (now - last_log >= args.log_seconds or step == args.steps - 1):
            print(progress(f"{kind} S = {seq_len} seed {seed}", step + 1, args, window, history[-1] if history else None,
                           now - start - diag_seconds, tokens_per_step), flush=True)
            window, last_log = [], now
    train_seconds = time.time() - start - diag_seconds
    if rank != 0:
        return None
    valid_accuracy, accuracy = evaluate(model, *valid_set, args, autocast), evaluate(model, *test_set, args, autocast)
    rise = next((h["step"] for h in history if h["ltm_use"] >= RISE), None)
    result = {"memory": kind, "budget": budget(cfg), "seq_len": seq_len, "seed": seed,
              "valid_accuracy": round(valid_accuracy, 4), "test_accuracy": round(accuracy, 4),
              "tokens_per_second": round(tokens_per_step * args.steps / train_seconds),
              "peak_memory_mb": round(peak_memory_mb(device), 1), "minutes": round((time.time() - start) / 60, 2),
              "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] if run is not ddp else None,
              "config": {**run_config(cfg, seq_len, seed, args, world), "device": str(device)},
              **({"ltm_rise_step": rise, "ltm_diagnostics": history} if history else {})}
    print(f"{kind}, S = {seq_len}, seed {seed}: valid accuracy {valid_accuracy:.3f}, test accuracy {accuracy:.3f}"
          + (f"; the LTM is used (+{100 * RISE:.0f} pts) from step {rise}" if rise else ""), flush=True)
    return result


# -----------------------------------------------------------------------------
# Reporting


def summary(results, args, test_sets):
    """A table per length: every kind's test accuracy, mean and min–max over seeds, and reference levels."""
    # how far back xl reaches: each layer sees its STM, so n_layers × STM + segment
    window = args.model["n_layers"] * (args.model["mem_len"] + args.model["num_basis"]) + args.seg_len
    lines = []
    for seq_len in sorted({r["seq_len"] for r in results}):
        rows = [r for r in results if r["seq_len"] == seq_len]
        counting = count_ranking_accuracy(*test_sets[seq_len], window)
        lines += [f"\nS = {seq_len} (reference levels: uniform among the symbols not yet given {UNIFORM:.3f}; "
                  f"counting the last {window} tokens, xl's reach, {counting:.3f})\n", "| memory | budget | seeds | "
                  "test accuracy (mean) | min–max | valid accuracy (mean) | minutes (mean) |", "|---|---|---|---|---|---|---|"]
        for kind in dict.fromkeys(r["memory"] for r in rows):
            runs = [r for r in rows if r["memory"] == kind]
            acc = [r["test_accuracy"] for r in runs]
            mean = lambda key: sum(r[key] for r in runs) / len(runs)
            lines.append(f"| {kind} | {runs[0]['budget']} | {len(runs)} | {mean('test_accuracy'):.3f} | "
                         f"{min(acc):.3f}–{max(acc):.3f} | {mean('valid_accuracy'):.3f} | {mean('minutes'):.1f} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------


def common_args(p, presets, out):
    """The arguments both scripts take."""
    p.add_argument("--preset", choices=sorted(presets), default="cpu", help="model and training setting (default cpu)")
    p.add_argument("--batch-size", type=int, help="sequences (streams) per step and process (default: the preset's)")
    p.add_argument("--dtype", choices=["float32", "bf16"], help="bf16: autocast, the LTM math in float32 (CUDA default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--out", default=out, help=f"folder for the results (default {out})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training step's model (default: on with CUDA, off on a CPU: see README)")
    p.add_argument("--log-seconds", type=float, default=5.0, help="seconds between progress lines (default 5)")


def parse(p, argv, presets, positive):
    """The command line, the preset filling in what it leaves out; each of positive > 0, CUDA there, --out a folder."""
    p.set_defaults(**presets[p.parse_args(argv).preset])
    args = p.parse_args(argv)
    for name in positive:
        value = getattr(args, name)
        if value is not None and not min(value if isinstance(value, list) else [value]) > 0:
            p.error(f"--{name.replace('_', '-')} must be {'at least 1' if type(value) in (int, list) else 'positive'}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device (cpu, cuda, cuda:1, ...)")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: a file of that name exists; give a folder")
    args.dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "float32")
    args.compile = args.device.type == "cuda" if args.compile is None else args.compile
    return args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", nargs="+", choices=KINDS + ["xl-stm", "all"], default=["all"], help="default: all")
    p.add_argument("--seq-len", type=int, nargs="+", help="S (preset: cpu 512, sweep 128 512 2048, paper 4000–16000)")
    p.add_argument("--seed", "--seeds", type=int, nargs="+", default=[0], help="seeds, each its own run (default 0)")
    p.add_argument("--steps", type=int, help="training steps (preset: cpu and sweep 1500, paper 20000)")
    p.add_argument("--eval-size", type=int, default=512, help="held-out sequences, valid and test each (default 512)")
    p.add_argument("--jobs", type=int, help="runs side by side on a CPU, sharing its threads (default: one per thread)")
    common_args(p, PRESETS, "runs/sort")
    args = parse(p, argv, PRESETS, ["steps", "batch_size", "eval_size", "seq_len", "jobs"])
    args.warmup, args.seg_len = min(args.warmup, args.steps), args.model["seg_len"]
    args.kinds = list(dict.fromkeys(k for m in args.memory for k in (KINDS if m == "all" else [m])))
    return args


def run_all(todo, args, world):
    """Each run's results row (None off rank 0) as it ends: one after another, or side by side in --jobs processes."""
    # They share the CPU threads: a small model's operations gain little from a second thread, a second run all.
    # one process under torchrun, whatever --jobs says: its workers would belong to no process group
    jobs = min(len(todo), 1 if world > 1 else args.jobs or (1 if args.device.type == "cuda" else torch.get_num_threads()))
    if jobs <= 1:
        yield from (train(*run) for run in todo)
        return
    # spawn: fresh interpreters (a fork would copy torch's thread pools) that leave Ctrl-C to this process,
    # which stops them as it leaves the pool
    with multiprocessing.get_context("spawn").Pool(jobs, signal.signal, (signal.SIGINT, signal.SIG_IGN)) as pool:
        yield from pool.imap_unordered(train_run, [(max(1, torch.get_num_threads() // jobs), run) for run in todo])


def train_run(job):  # in a worker: (threads, run)
    torch.set_num_threads(job[0])
    return train(*job[1])


def load_results(path):
    """The finished runs in results.json ([] if none); a damaged file stops the run before anything overwrites it."""
    try:
        return json.loads(pathlib.Path(path).read_text()) if os.path.exists(path) else []
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        print(f"train_sort.py: error: {path} is damaged ({e}); repair or move it, it was left as is", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    args = parse_args(argv)
    path = os.path.join(args.out, "results.json")
    finished = {(r["memory"], r["seq_len"], r["seed"]): r for r in load_results(path)}
    rank, world, args.device = init_distributed(args.device)
    os.makedirs(args.out, exist_ok=True)
    try:  # a Ctrl-C while the held-out sets are drawn, too
        test_sets, todo = {}, []  # per S, for the summary's reference levels; the runs not done before
        for seq_len, seed in itertools.product(args.seq_len, args.seed):
            valid_set = held_out(args.eval_size, seq_len, 4 * seed + 3, args.batch_size)
            test_sets[seq_len] = held_out(args.eval_size, seq_len, 4 * seed + 1, args.batch_size)
            for kind in args.kinds:
                old = finished.get((kind, seq_len, seed))
                cfg = run_config(model_config(kind, args), seq_len, seed, args, world)
                if old and {k: v for k, v in old["config"].items() if k != "device"} == cfg:
                    print(f"== {kind}, S = {seq_len}, seed {seed}: done before, test accuracy {old['test_accuracy']:.3f}")
                else:
                    todo.append((kind, seq_len, seed, args, valid_set, test_sets[seq_len], rank, world))
        for result in run_all(todo, args, world):
            if rank == 0:  # after every run: an interruption loses at most those running
                finished[result["memory"], result["seq_len"], result["seed"]] = result
                atomic_save(list(finished.values()), path)
    except KeyboardInterrupt:  # a user's Ctrl-C, not a bug: one line, no traceback
        sys.exit(f"\ninterrupted; finished runs are in {path}, and the same command continues")
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        wanted = [finished[key] for key in itertools.product(args.kinds, args.seq_len, args.seed) if key in finished]
        print(f"\nSorting, {args.steps} steps, batch {args.batch_size}×{world}, preset {args.preset}, "
              f"seeds {' '.join(map(str, args.seed))}, device {args.device}\n" + summary(wanted, args, test_sets))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill is a Ctrl-C: it stops --jobs' workers too
    main()
