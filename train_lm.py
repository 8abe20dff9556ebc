"""Word-level language modelling on WikiText-103 with memories carried across segments.

  python train_lm.py --data data/wikitext-103 --memory infinite     # CPU default (--preset paper: one GPU)
  torchrun --nproc_per_node=8 train_lm.py --data data/wikitext-103 --preset paper
  python train_lm.py --data data/wikitext-103 --resume runs/lm/ckpt.pt   # continue a run
  python train_lm.py --generate runs/lm/ckpt.pt --prompt "The" --tokens 200  # sample text from a run

Each document (a ` = Title = ` line starts one) starts from an empty memory; --no-reset carries it across, as
Transformer-XL on WikiText-103. Checkpoints hold the vocabulary: load_model(path) and --generate need no data.
"""
import argparse
import array
import itertools
import math
import os
import re
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn

from infformer import Config, InfFormer
from train_sort import (KINDS, atomic_save, common_args, compiled, init_distributed, lr_at, ltm_zeroed, parse,
                        peak_memory_mb, seeded)  # the shared plumbing

PRESETS = {
    # Trains in minutes on a laptop CPU.
    # KL weight 1e-2 and a sticky histogram 80% uniform: chosen on the books' valid text (README, "What we tried").
    "cpu": dict(batch_size=16, max_steps=1500, lr=1e-3, warmup=100, clip=0.25, kl_weight=1e-2, sticky_uniform=0.8,
                model=dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, dropout=0.1, seg_len=64, mem_len=64,
                           num_basis=64, basis_widths=(0.04, 0.2), num_samples=64, tau=0.5, cmem_len=64,
                           compress_rate=4)),
    # The paper's base model (Transformer-XL base: 16 layers, d 410, 10 heads, d_ff 2100), N = 150.
    "paper": dict(batch_size=60, max_steps=200_000, lr=2.5e-4, warmup=0, clip=0.25, kl_weight=1e-6, sticky_uniform=0.0,
                  model=dict(d_model=410, n_layers=16, n_heads=10, d_ff=2100, dropout=0.1, seg_len=150, mem_len=150,
                             num_basis=150, basis_widths=(0.01, 0.05), num_samples=150, tau=0.5, cmem_len=150,
                             compress_rate=4)),
}


class UserError(Exception):
    """A mistake in the command line or the files: reported as one line, never a traceback."""


# -----------------------------------------------------------------------------
# Data: whitespace-separated words, <eos> at every line end, vocabulary from train.


def split_paths(data_dir):
    """The three WikiText files; a missing folder, a missing or an empty file is a UserError."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data {data_dir}: no such folder")
    paths = {split: os.path.join(data_dir, f"wiki.{split}.tokens") for split in ("train", "valid", "test")}
    for path in paths.values():
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise UserError(f"--data {data_dir}: {os.path.basename(path)} is missing or empty")
    return paths


def read_ids(path, index, grow):
    """A file's token ids (grow: unseen words get new ids, else <unk>), and its title lines' positions."""
    ids, unk, starts = array.array("i"), index.get("<unk>"), []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:  # a byte that is not UTF-8: \udc80–\udcff
        for number, line in enumerate(f, 1):
            if bad := re.search("[\udc80-\udcff]", line):
                raise UserError(f"{path}, line {number}: not UTF-8 text (byte {bad[0].encode(errors='surrogateescape')!r})")
            words = line.split() + ["<eos>"]
            if len(words) >= 4 and words[0] == words[-2] == "=" and words[1] != "=":  # ` = Title = `, not ` = = `
                starts.append(len(ids))
            ids.extend([index.setdefault(w, len(index)) for w in words] if grow else [index.get(w, unk) for w in words])
    return torch.frombuffer(ids, dtype=torch.int32).clone(), torch.tensor(starts, dtype=torch.long)


def tokenize(paths):
    """Vocabulary by training frequency, ties first seen first (the adaptive softmax needs frequent words first)."""
    print(f"tokenising {os.path.dirname(paths['train'])} ...", flush=True)  # here ~1 s per million words
    index = {"<eos>": 0}
    train, train_docs = read_ids(paths["train"], index, grow=True)
    index.setdefault("<unk>", len(index))
    new_id = torch.argsort(-torch.bincount(train.long(), minlength=len(index)), stable=True).argsort()  # of each id
    vocab = [w for _, w in sorted(zip(new_id.tolist(), index))]
    data = {"train": new_id[train.long()].int(), "train_docs": train_docs}
    for split in ("valid", "test"):  # split_docs: where its documents start
        data[split], data[f"{split}_docs"] = read_ids(paths[split], {w: i for i, w in enumerate(vocab)}, grow=False)
    return vocab, data


def documents(start, end, doc_starts):
    """Pairs start..end-1 (input ids[i], target ids[i + 1]) cut where a document's first token is the target."""
    bounds = [start] + [p - 1 for p in doc_starts.tolist() if start < p - 1 < end] + [end]
    return list(zip(bounds[:-1], bounds[1:]))


def pack(ids, queues, align):
    """Inputs, targets, real-pair mask and range starts (len(queues), length): each range from a multiple of align."""
    ceil = lambda n: -(-n // align) * align
    length = max(sum(ceil(b - a) for a, b in q) for q in queues)
    # ids, targets: int32 (WikiText-103); the real-pair mask and the documents' first positions: bool
    inputs, targets, mask, first = (torch.zeros(len(queues), length, dtype=t) for t in (ids.dtype,) * 2 + (torch.bool,) * 2)
    for r, q in enumerate(queues):
        p = 0
        for a, b in q:
            inputs[r, p:p + b - a], targets[r, p:p + b - a], mask[r, p:p + b - a] = ids[a:b], ids[a + 1:b + 1], True
            first[r, p] = b > a
            p += ceil(b - a)
    return inputs, targets, mask, first


def train_streams(ids, doc_starts, n_streams, seg_len, reset):
    """n_streams contiguous streams (batchify); with reset, each document from a segment boundary (reset exactly)."""
    length = len(ids) // n_streams
    rows = [(r * length, (r + 1) * length - 1) for r in range(n_streams)]  # a row's last token only as a target
    return pack(ids, [documents(a, b, doc_starts) if reset else [(a, b)] for a, b in rows], seg_len if reset else 1)


# -----------------------------------------------------------------------------
# The model: InfFormer's hidden states into an adaptive softmax.


def scaled_cutoffs(vocab_size):
    """Transformer-XL's WikiText-103 cutoffs (of its 267,735 words), scaled down for a smaller vocabulary."""
    scale = min(1.0, vocab_size / 267_735)
    cutoffs = sorted({round(c * scale) for c in (20_000, 40_000, 200_000)})
    return [c for c in cutoffs if 0 < c < vocab_size] or [max(1, vocab_size // 2)]


class TiedEmbedding(nn.Module):
    """The input embedding as the adaptive softmax's output vectors (div_value = 1, as in Transformer-XL)."""

    def __init__(self, softmax):
        super().__init__()
        self.softmax = [softmax]  # a list, so that its weights stay registered once, in the softmax

    def forward(self, tokens):
        sm = self.softmax[0]
        tables = [sm.head.weight[:sm.shortlist_size]] + [tail[1].weight for tail in sm.tail]  # rows 0.., c_1.., ...
        out = 0  # each cluster's rows looked up in place: concatenating the (V, d) table cost more than a
        for table, start in zip(tables, [0] + sm.cutoffs[:-1]):  # whole forward of a generated token
            inside = (tokens >= start) & (tokens < start + table.size(0))
            out = out + nn.functional.embedding((tokens - start).clamp(0, len(table) - 1), table) * inside[..., None]
        return out  # (..., d)


class LanguageModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.body = InfFormer(cfg)  # cfg.lm_head is False: it returns hidden states
        # PyTorch's adaptive softmax, tied to the embedding; unlike Transformer-XL's, a projection per tail
        # cluster and no output biases.
        self.softmax = nn.AdaptiveLogSoftmaxWithLoss(cfg.d_model, cfg.vocab_size, scaled_cutoffs(cfg.vocab_size),
                                                     div_value=1.0)  # every cluster d_model wide: tied below
        self.body.tok_emb = TiedEmbedding(self.softmax)

    def reset_memory(self, memory, done):
        return self.body.reset_memory(memory, done)

    def forward(self, tokens, targets, memory):
        """Per-token negative log-likelihood (B, T), the new memory and the weighted KL term."""
        hidden, memory, kl = self.body(tokens, memory)
        with torch.autocast(hidden.device.type, enabled=False):  # the output layer in float32, even under bf16
            log_prob = self.softmax(hidden.flatten(0, 1).float(), targets.flatten()).output  # log p(target)
        return -log_prob.view(targets.shape), memory, kl


# -----------------------------------------------------------------------------
# Evaluation, checkpoints


@seeded
@torch.no_grad()
def perplexity(model, ids, n_streams, seg_len, device, autocast, doc_starts=None):
    """exp(mean NLL) over every token but the first: with doc_starts each document whole from a fresh memory, in
    up to n_streams queues (each to the shortest); without, in n_streams pieces, the memory carried across them."""
    model.eval()
    n = len(ids) - 1  # (input, target) pairs
    length = math.ceil(n / n_streams)
    pieces = documents(0, n, doc_starts) if doc_starts is not None else [(a, min(a + length, n))
                                                                         for a in range(0, n, length)]
    queues, sizes = [[] for _ in range(n_streams)], [0] * n_streams
    for a, b in pieces:  # each to the shortest queue (without documents: piece r to queue r)
        r = sizes.index(min(sizes))
        queues[r].append((a, b))
        sizes[r] += math.ceil((b - a) / seg_len)
    # fewer documents than streams: the empty queues would be padding, computed for nothing
    inputs, targets, mask, first = pack(ids, [q for q in queues if q], 1 if doc_starts is None else seg_len)
    memory, total = None, 0.0
    for i in range(0, inputs.size(1), seg_len):
        if memory is not None:  # a stream whose next document starts here (without documents: none)
            memory = model.reset_memory(memory, first[:, i])
        with autocast:
            x, y = (t[:, i:i + seg_len].long().to(device) for t in (inputs, targets))
            nll, memory, _ = model(x, y, memory)
        total += (nll.double().cpu() * mask[:, i:i + seg_len]).sum().item()
    model.train()
    return math.exp(total / n)


def split_perplexity(r, split):
    return perplexity(r.model, r.data[split], r.args.eval_streams, r.cfg.seg_len, r.device, r.autocast,
                      r.data[f"{split}_docs"] if r.args.reset else None)


def read_checkpoint(path, keys, flag=""):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain dicts, lists, tensors, Memory
    except Exception as e:
        raise UserError(f"{flag}{path}: not a readable checkpoint ({type(e).__name__}); the file may be damaged")
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{flag}{path}: not a train_lm.py checkpoint with its vocabulary (no {', '.join(missing)})")
    return ckpt


def load_model(path, device="cpu"):
    """The LanguageModel saved in best.pt or ckpt.pt (eval mode, on device) and its vocabulary, from the file alone."""
    ckpt = read_checkpoint(path, ("config", "vocab", "model"))
    model = LanguageModel(Config(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["vocab"]


def portable(r):
    """What load_model needs (configuration, vocabulary, weights), and the run's settings."""
    return {"config": vars(r.cfg), "vocab": r.vocab, "run": r.settings, "model": r.model.state_dict()}


def save_checkpoint(r, path):
    """Every rank's memory, stream position and RNG go to rank 0, which writes the file."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}  # cuda: [] without a GPU
    states = [(r.memory.to("cpu"), r.pos, rng)] * r.world  # each rank's memory, position, RNG: gathered under DDP
    if r.world > 1:
        dist.gather_object(states[0], states if r.rank == 0 else None, dst=0)
    if r.rank == 0:
        atomic_save({**portable(r), "optimizer": r.opt.state_dict(), "step": r.step, "ranks": states,
                     "history": r.history, "minutes": r.minutes_before + (time.time() - r.start) / 60}, path)


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train_lm.py", description=__doc__,  # prog: the same name under pytest
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder with wiki.{train,valid,test}.tokens")
    p.add_argument("--memory", choices=KINDS, default="xl", help="(default xl)")
    p.add_argument("--max-steps", type=int, help="steps the learning-rate schedule spans (preset: cpu 1500, paper 2e5)")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes (then evaluate)")
    p.add_argument("--lr", type=float, help="peak learning rate (preset: cpu 1e-3, paper 2.5e-4)")
    p.add_argument("--kl-weight", type=float, help="the LTM's KL term weight (preset: cpu 1e-2, paper 1e-6)")
    p.add_argument("--sticky-uniform", type=float, help="uniform share of sticky's histogram (preset: cpu 0.8, paper 0)")
    p.add_argument("--eval-streams", type=int, default=10, help="streams the valid/test text is cut into (default 10)")
    p.add_argument("--reset", action=argparse.BooleanOptionalAction, default=True, help="each document from an empty memory")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every this many steps (default 500)")
    p.add_argument("--eval-every", type=int, help="validate every this many steps; the best weights go to best.pt")
    p.add_argument("--resume", help="checkpoint to continue from (the same configuration)")
    common_args(p, PRESETS, "runs/lm")
    p.add_argument("--generate", metavar="CKPT", help="print text sampled from a saved run (best.pt or ckpt.pt)")
    p.add_argument("--prompt", default="", help="words the text starts with (default: none, as after a line end)")
    p.add_argument("--tokens", type=int, default=200, help="words to sample (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="divides the logits (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely words only (default: all)")
    args = parse(p, argv, PRESETS, ["batch_size", "max_steps", "lr", "max_minutes", "eval_streams", "save_every",
                                    "eval_every", "tokens", "temperature", "top_k"])
    if args.data is None and args.generate is None:
        p.error("--data is required to train (or --generate CKPT to sample from a saved run)")
    if not (args.kl_weight >= 0 and 0 <= args.sticky_uniform <= 1):
        p.error("--kl-weight must be >= 0" if not args.kl_weight >= 0 else "--sticky-uniform must be in [0, 1]")
    for name in ("resume", "generate"):  # before the corpus is read, which can take minutes
        if getattr(args, name) and not os.path.isfile(getattr(args, name)):
            p.error(f"--{name} {getattr(args, name)}: no such file")
    args.warmup = min(args.warmup, args.max_steps)
    args.model = {**args.model, "kl_weight": args.kl_weight, "sticky_uniform": args.sticky_uniform}
    return args


def setup(args):
    """This process's data, model, optimizer and run state (step, pos: where the next segment starts, memory...)."""
    r = SimpleNamespace(args=args, step=0, pos=0, history=[], minutes_before=0.0, eval_seconds=0.0)
    r.rank, r.world, r.device = init_distributed(args.device)
    os.makedirs(args.out, exist_ok=True)
    r.vocab, r.data = tokenize(split_paths(args.data))
    n, train = args.batch_size * r.world, r.data["train"]
    if len(train) < 2 * n:
        raise UserError(f"{args.data}: the training split has {len(train)} tokens, too few for {n} streams")
    streams = train_streams(train, r.data["train_docs"], n, args.model["seg_len"], args.reset)
    r.streams = tuple(t[r.rank * args.batch_size:(r.rank + 1) * args.batch_size] for t in streams)  # this rank's
    r.cfg = Config(vocab_size=len(r.vocab), memory=args.memory, lm_head=False, **args.model)
    r.settings = {**vars(r.cfg), "world_size": r.world, "train_tokens": len(train),  # what --resume must match
                  **{k: getattr(args, k) for k in ("batch_size", "max_steps", "lr", "warmup", "clip", "seed", "reset")}}
    ckpt = read_checkpoint(args.resume, ("run", "optimizer", "ranks"), "--resume ") if args.resume else None
    old = {**vars(Config()), **ckpt["run"]} if ckpt else {}  # a field newer than the checkpoint: Config's default
    diff = [f"{k} {old.get(k)!r} (now {v!r})" for k, v in r.settings.items() if ckpt and old.get(k) != v]
    if diff:
        raise UserError(f"--resume {args.resume} was written for another configuration: " + ", ".join(diff))
    torch.manual_seed(args.seed + r.rank)
    r.model = LanguageModel(r.cfg).to(r.device)
    # Under DDP some parameters get no gradient in a step: the adaptive softmax skips a tail cluster
    # when no target of the batch falls in it, and the LTM is unused while its memory is empty.
    r.ddp = nn.parallel.DistributedDataParallel(r.model, find_unused_parameters=True) if r.world > 1 else r.model
    r.run = compiled(r.ddp, args.compile, r.device)  # for training; evaluation and generation run eagerly
    # AdamW, weight decay 0.01 on every parameter (Transformer-XL: Adam, no weight decay).
    r.opt = torch.optim.AdamW(r.model.parameters(), lr=args.lr, weight_decay=0.01)
    r.autocast = torch.autocast(r.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    r.memory = r.model.body.init_memory(args.batch_size)
    if ckpt:
        r.model.load_state_dict(ckpt["model"])
        r.opt.load_state_dict(ckpt["optimizer"])
        r.step, r.minutes_before, r.history = ckpt["step"], ckpt["minutes"], ckpt["history"]
        memory, r.pos, rng = ckpt["ranks"][r.rank]
        r.memory = memory.to(r.device)
        torch.set_rng_state(rng["cpu"])
        torch.cuda.set_rng_state_all(rng["cuda"])
        print(f"resumed from {args.resume} at step {r.step}")
    return r


def train_step(r):
    """One segment of every stream: forward, backward, optimizer step. Returns the loss and the rate it used."""
    inputs, targets, mask, first = r.streams
    if r.pos >= inputs.size(1):  # end of the streams: a new epoch starts with an empty memory
        r.pos, r.memory = 0, r.model.body.init_memory(r.args.batch_size)
    x, y, real = (t[:, r.pos:r.pos + r.cfg.seg_len] for t in (inputs, targets, mask))
    if r.args.reset:  # a stream whose next document starts here
        r.memory = r.model.body.reset_memory(r.memory, first[:, r.pos])
    with r.autocast:
        nll, r.memory, kl = r.run(x.long().to(r.device), y.long().to(r.device), r.memory)
    # with --reset, the padding before a document is masked out of the mean
    loss = (nll * real.to(r.device)).sum() / real.sum().clamp_min(1) if r.args.reset else nll.mean()
    r.opt.zero_grad(set_to_none=True)
    (loss + kl).backward()
    nn.utils.clip_grad_norm_(r.model.parameters(), r.args.clip)
    # linear warm-up, then cosine decay to zero at max_steps (the peak times the multiplier, as LambdaLR computes it)
    lr = r.opt.param_groups[0]["lr"] = r.args.lr * lr_at(r.step, 1.0, r.args.warmup, r.args.max_steps, floor=0.0)
    r.opt.step()
    r.step, r.pos = r.step + 1, r.pos + x.size(1)
    return loss.item(), lr


def validate(r):
    """Rank 0 measures the valid perplexity and keeps the best weights in best.pt; the other ranks wait."""
    t0 = time.time()
    if r.rank == 0:
        ppl = split_perplexity(r, "valid")
        best = min((p for _, p in r.history), default=math.inf)
        r.history.append((r.step, ppl))
        if ppl < best:
            atomic_save({**portable(r), "step": r.step, "valid_ppl": ppl}, os.path.join(r.args.out, "best.pt"))
        print(f"step {r.step} | valid ppl {ppl:.2f} | best {min(ppl, best):.2f}", flush=True)
    if r.world > 1:
        dist.barrier()
    r.eval_seconds += time.time() - t0


def train(r):
    """To --max-steps or --max-minutes (SIGINT/SIGTERM: ckpt.pt, exit). The last loss, steps run, their seconds."""
    args, ckpt_path, stop = r.args, os.path.join(r.args.out, "ckpt.pt"), []  # stop: the signal, once one came
    handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"{args.memory}: {sum(p.numel() for p in r.model.parameters()):,} parameters, vocabulary {len(r.vocab):,}, "
          f"{r.world} process(es) × {args.batch_size} streams × {r.cfg.seg_len} tokens per step, device {r.device}")
    r.start = last_log = time.time()
    first_step, window, loss = r.step, [], None
    while r.step < args.max_steps:
        loss, lr = train_step(r)
        window.append(loss)
        elapsed = time.time() - r.start
        left = math.inf if args.max_minutes is None else args.max_minutes - r.minutes_before - elapsed / 60
        flags = torch.tensor([bool(stop), left <= 0], dtype=torch.float32, device=r.device)
        if r.world > 1:  # every rank must stop at the same step
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        interrupted, out_of_time = flags.tolist()
        if time.time() - last_log >= args.log_seconds or r.step == args.max_steps or interrupted or out_of_time:
            eta = min(left, (elapsed - r.eval_seconds) / (r.step - first_step) * (args.max_steps - r.step) / 60)
            mean, tokens = sum(window) / len(window), args.batch_size * r.cfg.seg_len * r.world * (r.step - first_step)
            print(f"step {r.step}/{args.max_steps} | loss {mean:.3f} | ppl {math.exp(mean):.1f} | lr {lr:.2e} | "
                  f"{tokens / (elapsed - r.eval_seconds):,.0f} tok/s | ETA {eta:.1f} min", flush=True)
            window, last_log = [], time.time()
        if args.eval_every and not interrupted and (r.step % args.eval_every == 0 or r.step == args.max_steps
                                                    or out_of_time):
            validate(r)
        if r.step % args.save_every == 0 or r.step == args.max_steps or interrupted or out_of_time:
            save_checkpoint(r, ckpt_path)
        if interrupted:
            print(f"interrupted at step {r.step}: saved {ckpt_path}; continue with --resume {ckpt_path}", flush=True)
            if r.world > 1:
                dist.destroy_process_group()
            sys.exit(128 + (stop[0] if stop else signal.SIGINT))
        if out_of_time:
            print(f"--max-minutes {args.max_minutes} reached at step {r.step}")
            break
    for s, h in handlers.items():
        signal.signal(s, h)
    return loss, r.step - first_step, time.time() - r.start - r.eval_seconds


def final_evaluation(r, train_loss, steps, seconds):
    """Rank 0: the valid and test perplexity of the best weights (of the last without --eval-every), in results.json."""
    args, evaluated, evaluated_step = r.args, "last", r.step
    if r.history:  # the best weights of the run
        best = torch.load(os.path.join(args.out, "best.pt"), map_location=r.device)
        r.model.load_state_dict(best["model"])
        evaluated, evaluated_step = "best", best["step"]
    print(f"evaluating the {evaluated} weights (step {evaluated_step}) on {len(r.data['valid']):,} valid and "
          f"{len(r.data['test']):,} test tokens ...", flush=True)
    ppl, zeroed = {s: split_perplexity(r, s) for s in ("valid", "test")}, None
    if r.cfg.memory in ("infinite", "sticky"):
        with ltm_zeroed(r.model.body):
            zeroed = split_perplexity(r, "valid")
        print(f"LTM use: with every Z_LTM zeroed the valid perplexity is {zeroed:.2f}, against "
              f"{ppl['valid']:.2f} ({100 * (zeroed / ppl['valid'] - 1):+.1f}%)")
    result = {"memory": args.memory, "valid_ppl": round(ppl["valid"], 2), "test_ppl": round(ppl["test"], 2),
              "valid_ppl_ltm_zeroed": None if zeroed is None else round(zeroed, 2),
              "tokens_per_second": round(args.batch_size * r.cfg.seg_len * r.world * steps / seconds) if steps else None,
              "peak_memory_mb": round(peak_memory_mb(r.device), 1), "steps": r.step,
              "minutes": round(r.minutes_before + (time.time() - r.start) / 60, 2), "evaluated": evaluated,
              "evaluated_step": evaluated_step, "valid_history": [[s, round(p, 2)] for s, p in r.history],
              "train_loss": train_loss, "config": {**r.settings, "device": str(r.device), "dtype": args.dtype}}
    atomic_save(result, os.path.join(args.out, "results.json"))
    print(f"{args.memory}, {evaluated} weights (step {evaluated_step}): valid ppl {ppl['valid']:.2f} | "
          f"test ppl {ppl['test']:.2f} | results in {os.path.join(args.out, 'results.json')}")


def main(args):
    r = setup(args)
    train_loss, steps, seconds = train(r)
    if r.rank == 0:
        final_evaluation(r, train_loss, steps, seconds)
    if r.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def generate(args):
    """--generate: the prompt and args.tokens sampled words on stdout, <eos> as a line break."""
    model, vocab = load_model(args.generate, args.device)
    index = {w: i for i, w in enumerate(vocab)}
    words = args.prompt.split()
    if unknown := [w for w in words if w not in index]:
        print(f"note: not in the vocabulary, read as <unk>: {' '.join(unknown)}", file=sys.stderr)
    ids = [index["<eos>"]] + [index.get(w, index["<unk>"]) for w in words]  # the text starts after a line end
    torch.manual_seed(args.seed)  # for sticky's memory writes; the words are drawn from a generator of their own
    steps = model.body.generate(torch.tensor([ids], device=args.device), args.tokens, model.softmax.log_prob,
                                args.temperature, args.top_k, seed=args.seed)
    line_start = True  # each word printed as it is drawn: the text is its own progress line
    for i in itertools.chain(ids[1:], (token.item() for token, _ in steps)):
        print("\n" if vocab[i] == "<eos>" else " " * (not line_start) + vocab[i], end="", flush=True)
        line_start = vocab[i] == "<eos>"
    print()


def cli(argv=None):
    args = parse_args(argv)
    try:
        generate(args) if args.generate else main(args)
    except UserError as e:
        print(f"train_lm.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted outside training; checkpoints, if any, are in {args.out}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
