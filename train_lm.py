"""
Word-level language modelling on WikiText-103 with memories carried across segments.

  python train_lm.py --data data/wikitext-103                       # small CPU default, xl
  python train_lm.py --data data/wikitext-103 --memory infinite     # the ∞-former
  python train_lm.py --data data/wikitext-103 --preset paper        # the paper's base model, one GPU
  torchrun --nproc_per_node=8 train_lm.py --data data/wikitext-103 --preset paper
  python train_lm.py --data data/wikitext-103 --resume runs/lm/ckpt.pt   # continue a run
  python train_lm.py --generate runs/lm/ckpt.pt --prompt "The" --tokens 200  # sample text from a run

--data holds wiki.{train,valid,test}.tokens (or train.txt, valid.txt, test.txt). The token ids are cached
beside the data (or under --out if that folder is read-only) and rebuilt when the files change. Each document
(a ` = Title = ` line starts one) starts from an empty memory, in training and evaluation; --no-reset carries
the memory across documents, as Transformer-XL on WikiText-103. The run ends with the valid and test perplexity
(for infinite and sticky also the valid perplexity with every Z_LTM zeroed: how much the model relies on its
LTM), and writes results.json and a checkpoint under --out. Several seeds: one run per --seed, each with its
own --out. A checkpoint (ckpt.pt, best.pt) holds the configuration and the vocabulary too: load_model(path)
gives the model and its vocabulary without the data, and --generate samples from it.

Where the training departs from Transformer-XL's: PyTorch's nn.AdaptiveLogSoftmaxWithLoss gives each tail
cluster a projection of its own (d; d / 4^i untied) and has no output biases (Transformer-XL's has biases and,
with div_val 1, shares the projections); AdamW's weight decay 0.01 applies to every parameter, LayerNorms and
embeddings included (Transformer-XL: Adam, no weight decay).
"""
import argparse
import array
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from infformer import Config, InfFormer
from train_sort import device, init_distributed, lr_at, peak_memory_mb, save_json, seeded  # the shared plumbing

SPLITS = ("train", "valid", "test")
CACHE_VERSION = 2  # 2: with the document starts

PRESETS = {
    # Trains in minutes on a laptop CPU.
    "cpu": dict(batch_size=16, max_steps=1500, lr=1e-3, warmup=100, clip=0.25,
                model=dict(d_model=128, n_layers=4, n_heads=4, d_ff=512, dropout=0.1, seg_len=64, mem_len=64,
                           num_basis=64, basis_widths=(0.04, 0.2), num_samples=64, tau=0.5,
                           cmem_len=64, compress_rate=4)),
    # The paper's base model (Transformer-XL base: 16 layers, d 410, 10 heads, d_ff 2100), N = 150.
    "paper": dict(batch_size=60, max_steps=200_000, lr=2.5e-4, warmup=0, clip=0.25,
                  model=dict(d_model=410, n_layers=16, n_heads=10, d_ff=2100, dropout=0.1, seg_len=150, mem_len=150,
                             num_basis=150, basis_widths=(0.01, 0.05), num_samples=150, tau=0.5,
                             cmem_len=150, compress_rate=4)),
}


class UserError(Exception):
    """A mistake in the command line or the files: reported as one line, never a traceback."""


# -----------------------------------------------------------------------------
# Data: whitespace-separated words, <eos> at every line end, vocabulary from train.


def split_paths(data_dir):
    """The three WikiText files, under either naming; a missing or empty one is a UserError."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data {data_dir}: no such folder")
    paths = {}
    for split in SPLITS:
        names = [f"wiki.{split}.tokens", f"{split}.txt"]
        found = [os.path.join(data_dir, n) for n in names if os.path.isfile(os.path.join(data_dir, n))]
        if not found:
            raise UserError(f"--data {data_dir}: missing {names[0]} (or {names[1]})")
        if os.path.getsize(found[0]) == 0:
            raise UserError(f"{found[0]} is empty")
        paths[split] = found[0]
    return paths


def read_ids(path, index, grow):
    """Token ids of a file, and where its documents start (the ids' positions of their title lines:
    ` = Title = `, one `=` each side; ` = = Section = = ` is a sub-heading). With grow, unseen words get
    new ids, else they map to <unk>."""
    ids, unk, starts = array.array("i"), index.get("<unk>"), []
    with open(path, encoding="utf-8") as f:
        try:
            for line in f:
                words = line.split() + ["<eos>"]
                if len(words) >= 4 and words[0] == words[-2] == "=" and words[1] != "=":
                    starts.append(len(ids))
                ids.extend([index.setdefault(w, len(index)) for w in words] if grow else
                           [index.get(w, unk) for w in words])
        except UnicodeDecodeError:  # find the line, to name it
            with open(path, "rb") as raw:
                for number, line in enumerate(raw, 1):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise UserError(f"{path}, line {number}: not UTF-8 text (byte {line[e.start:e.end]!r}); "
                                        "WikiText files are UTF-8") from None
    ids = torch.frombuffer(ids, dtype=torch.int32).clone() if len(ids) else torch.zeros(0, dtype=torch.int32)
    return ids, torch.tensor(starts, dtype=torch.long)


def tokenize(paths):
    """Vocabulary sorted by training frequency (the adaptive softmax needs frequent words first)."""
    index = {"<eos>": 0}
    train, train_docs = (t.long() for t in read_ids(paths["train"], index, grow=True))
    index.setdefault("<unk>", len(index))
    order = torch.argsort(-torch.bincount(train, minlength=len(index)), stable=True)  # ties: first seen first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    words = list(index)
    vocab = [words[i] for i in order.tolist()]
    index = {w: i for i, w in enumerate(vocab)}
    data = {"train": rank[train].int(), "train_docs": train_docs}  # split_docs: where its documents start
    for split in ("valid", "test"):
        data[split], data[f"{split}_docs"] = read_ids(paths[split], index, grow=False)
    return vocab, data


def load_corpus(data_dir, out_dir, log=print):
    """Token ids per split, from the cache when it matches the files, else tokenised and cached."""
    paths = split_paths(data_dir)
    fingerprint = [(os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths.values()]
    cache_dir = data_dir if os.access(data_dir, os.W_OK) else out_dir
    cache = os.path.join(cache_dir, "infformer-cache.pt")
    if os.path.exists(cache):
        try:
            saved = torch.load(cache)
            if saved["version"] == CACHE_VERSION and saved["fingerprint"] == fingerprint:
                log(f"token ids from {cache}", flush=True)
                return saved["vocab"], saved["data"]
        except Exception:  # unreadable: rebuild it below
            pass
    start = time.time()
    log(f"tokenising {data_dir} ...", flush=True)
    vocab, data = tokenize(paths)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save({"version": CACHE_VERSION, "fingerprint": fingerprint, "vocab": vocab, "data": data}, cache)
    log(f"tokenised in {time.time() - start:.0f} s: {len(vocab):,} words, "
          + ", ".join(f"{s} {len(data[s]):,} tokens" for s in SPLITS) + f"; cached in {cache}", flush=True)
    return vocab, data


def documents(start, end, doc_starts):
    """Pairs start..end-1 (pair i: input ids[i], target ids[i + 1]) cut into ranges [a, b) where a document
    starts: a document's first pair is the one whose target is its first token (its input, a line end)."""
    bounds = [start] + [p - 1 for p in doc_starts.tolist() if start < p - 1 < end] + [end]
    return list(zip(bounds[:-1], bounds[1:]))


def pack(ids, queues, align):
    """Streams of inputs, targets, a mask of real pairs and the flags of where a range starts, each
    (len(queues), length): each queue's pair ranges one after the other, each from a multiple of align
    (the gap before it padded and masked out)."""
    ceil = lambda n: -(-n // align) * align
    length = max(sum(ceil(b - a) for a, b in q) for q in queues)
    inputs, targets = (torch.zeros(len(queues), length, dtype=ids.dtype) for _ in range(2))  # int32: WikiText-103
    mask, first = (torch.zeros(len(queues), length, dtype=torch.bool) for _ in range(2))
    for r, q in enumerate(queues):
        p = 0
        for a, b in q:
            inputs[r, p:p + b - a], targets[r, p:p + b - a], mask[r, p:p + b - a] = ids[a:b], ids[a + 1:b + 1], True
            first[r, p] = b > a
            p += ceil(b - a)
    return inputs, targets, mask, first


def train_streams(ids, doc_starts, n_streams, seg_len, reset):
    """The training text as n_streams contiguous streams (Transformer-XL's batchify). With reset, each
    document in a stream starts on a segment boundary, after its predecessor's last segment is padded:
    a reset then falls between two segments, where reset_memory can make it exact, at the cost of half
    a segment of padding per document (about 1% on WikiText-103)."""
    length = len(ids) // n_streams
    rows = [(r * length, (r + 1) * length - 1) for r in range(n_streams)]  # a row's last token only as a target
    return pack(ids, [documents(a, b, doc_starts) if reset else [(a, b)] for a, b in rows],
                seg_len if reset else 1)


# -----------------------------------------------------------------------------
# The model: InfFormer's hidden states into an adaptive softmax.


def scaled_cutoffs(vocab_size):
    """Transformer-XL's WikiText-103 cutoffs [20000, 40000, 200000] (of its 267,735 words), exactly
    for a vocabulary that large (ours adds <eos> to the file's words) and scaled down for a smaller one."""
    scale = min(1.0, vocab_size / 267_735)
    cutoffs = sorted({round(c * scale) for c in (20_000, 40_000, 200_000)})
    return [c for c in cutoffs if 0 < c < vocab_size] or [max(1, vocab_size // 2)]


class TiedEmbedding(nn.Module):
    """An input embedding that reuses the adaptive softmax's output vectors (div_value = 1, as in
    Transformer-XL): the head's shortlist rows, then each tail cluster's output rows."""

    def __init__(self, softmax):
        super().__init__()
        self.softmax = [softmax]  # a list, so that its weights stay registered once, in the softmax

    def forward(self, tokens):
        sm = self.softmax[0]
        tables = [sm.head.weight[:sm.shortlist_size]] + [tail[1].weight for tail in sm.tail]  # rows 0.., c_1.., ...
        out = 0  # each cluster's rows looked up in place: concatenating the (V, d) table cost more than a
        for table, start in zip(tables, [0] + sm.cutoffs[:-1]):  # whole forward of a generated token
            inside = (tokens >= start) & (tokens < start + table.size(0))
            out = out + F.embedding((tokens - start).clamp(0, table.size(0) - 1), table) * inside.unsqueeze(-1)
        return out  # (..., d)


class LanguageModel(nn.Module):
    def __init__(self, cfg, tie):
        super().__init__()
        self.body = InfFormer(cfg)  # cfg.lm_head is False: it returns hidden states
        self.softmax = nn.AdaptiveLogSoftmaxWithLoss(cfg.d_model, cfg.vocab_size, scaled_cutoffs(cfg.vocab_size),
                                                     div_value=1.0 if tie else 4.0)
        if tie:
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
    """exp(token-weighted mean NLL) over every token of the split (the first excepted: it has no input).
    With doc_starts, each document is scored whole from a fresh memory, in n_streams queues of documents
    (each to the shortest so far); without, as Transformer-XL: the split is cut into n_streams pieces,
    memory carried along each across documents, the last padded. Padding is masked out. Sticky sampling
    draws from a fixed seed here, and the training RNG is left as it was."""
    model.eval()
    n = len(ids) - 1  # (input, target) pairs
    length = math.ceil(n / n_streams)
    queues = [[(min(r * length, n), min(r * length + length, n))] for r in range(n_streams)]
    if doc_starts is not None:
        queues, sizes = [[] for _ in range(n_streams)], [0] * n_streams
        for a, b in documents(0, n, doc_starts):
            r = sizes.index(min(sizes))
            queues[r].append((a, b))
            sizes[r] += math.ceil((b - a) / seg_len)
    inputs, targets, mask, first = pack(ids, queues, 1 if doc_starts is None else seg_len)
    memory, total = None, 0.0
    for i in range(0, inputs.size(1), seg_len):
        if doc_starts is not None and memory is not None:
            memory = model.reset_memory(memory, first[:, i])
        with autocast:
            x, y = (t[:, i:i + seg_len].long().to(device) for t in (inputs, targets))
            nll, memory, _ = model(x, y, memory)
        total += (nll.double().cpu() * mask[:, i:i + seg_len]).sum().item()
    model.train()
    return math.exp(total / n)


@contextlib.contextmanager
def ltm_read_zeroed(body):
    """Inside, every layer's Z_LTM is zero. The perplexity there, against the one outside, is how much
    a trained model relies on its long-term memory (which says nothing of whether it beats XL)."""
    hooks = [b.read_ltm.register_forward_hook(lambda m, i, out: (torch.zeros_like(out[0]), *out[1:]))
             for b in body.blocks if b.read_ltm is not None]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, run):
    """Read a checkpoint and check that it belongs to this configuration; UserError if not."""
    try:
        ckpt = torch.load(path, map_location="cpu")
        saved_run = ckpt["run"]
    except Exception as e:
        raise UserError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}); the file may be damaged")
    diff = [f"{k} {saved_run.get(k)!r} (now {run.get(k)!r})" for k in run if saved_run.get(k) != run.get(k)]
    if diff:
        raise UserError(f"--resume {path} was written for another configuration: " + ", ".join(diff))
    return ckpt


def load_model(path, device="cpu"):
    """The LanguageModel saved in best.pt or ckpt.pt (eval mode, on device) and its vocabulary (list of
    str), from the file alone: no data folder needed. A missing, damaged or foreign file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)  # plain dicts, lists, tensors
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}); the file may be damaged")
    missing = [k for k in ("config", "vocab", "tie", "model") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a train_lm.py checkpoint with its vocabulary (no {', '.join(missing)}); "
                        "runs saved before checkpoints carried it must be retrained")
    try:
        model = LanguageModel(Config(**ckpt["config"]), ckpt["tie"])
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        raise UserError(f"{path}: its weights do not fit its configuration ({type(e).__name__}: {e})".split("\n")[0])
    return model.to(device).eval(), ckpt["vocab"]


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train_lm.py", description=__doc__,  # prog: the same name under pytest
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder with the WikiText train/valid/test files (required to train)")
    p.add_argument("--memory", choices=["xl", "compressive", "infinite", "sticky"], default="xl", help="(default xl)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model and training setting (default cpu)")
    p.add_argument("--max-steps", type=int, help="steps the learning-rate schedule spans (preset: cpu 1500, paper 2e5)")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes (then evaluate)")
    p.add_argument("--batch-size", type=int, help="streams per process (preset: cpu 16, paper 60)")
    p.add_argument("--lr", type=float, help="peak learning rate (preset: cpu 1e-3, paper 2.5e-4)")
    p.add_argument("--kl-weight", type=float, help="weight of the KL term on the LTM's densities (default: Config's)")
    p.add_argument("--eval-streams", type=int, default=10, help="streams the valid/test text is cut into (default 10)")
    p.add_argument("--reset", action=argparse.BooleanOptionalAction, default=True, help="start each document from "
                   "an empty memory (default); --no-reset carries the memory across documents, as Transformer-XL")
    p.add_argument("--dtype", choices=["float32", "bf16"], help="bf16: autocast, the method's math and the output "
                   "layer in float32 (default: bf16 on CUDA, float32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/lm", help="folder for results.json and ckpt.pt (default runs/lm)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every this many steps (default 500)")
    p.add_argument("--eval-every", type=int, help="valid perplexity every this many steps and at the end; the best "
                   "weights go to best.pt and are the ones evaluated at the end (default: the last)")
    p.add_argument("--resume", help="checkpoint to continue from (the same configuration)")
    p.add_argument("--log-seconds", type=float, default=5.0, help="seconds between progress lines (default 5)")
    g = p.add_argument_group("generation (instead of training)")
    g.add_argument("--generate", metavar="CKPT", help="print text sampled from a saved run (best.pt or ckpt.pt)")
    g.add_argument("--prompt", default="", help="words the text starts with (default: none, as after a line end)")
    g.add_argument("--tokens", type=int, default=200, help="words to sample (default 200)")
    g.add_argument("--temperature", type=float, default=1.0, help="divides the logits (default 1.0)")
    g.add_argument("--top-k", type=int, help="sample among the k most likely words only (default: all)")
    preset = PRESETS[p.parse_known_args(argv)[0].preset]
    p.set_defaults(**{k: preset[k] for k in ("batch_size", "max_steps", "lr")})  # the preset's, unless given
    args = p.parse_args(argv)
    if args.data is None and args.generate is None:
        p.error("--data is required to train (or --generate CKPT to sample from a saved run)")
    args.warmup, args.clip, args.model = min(preset["warmup"], args.max_steps), preset["clip"], dict(preset["model"])
    if args.kl_weight is not None:
        args.model["kl_weight"] = args.kl_weight
    for key in ("batch_size", "max_steps", "eval_streams", "save_every", "eval_every", "tokens", "top_k"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if not args.lr > 0 or (args.max_minutes is not None and not args.max_minutes > 0):
        p.error("--lr and --max-minutes must be positive")
    if not args.temperature > 0:
        p.error("--temperature must be positive")
    if args.kl_weight is not None and not args.kl_weight >= 0:
        p.error("--kl-weight must be >= 0")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: a file of that name exists; give a folder")
    if args.resume and not os.path.isfile(args.resume):  # before the corpus is read, which can take minutes
        p.error(f"--resume {args.resume}: no such file")
    args.dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "float32")
    return args


@dataclasses.dataclass
class Run:
    """A training run on this process: what setup builds, and the state the loop advances (ckpt.pt saves it)."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    log: object  # print on rank 0, silent on the others
    vocab: list
    data: dict
    streams: tuple  # this rank's (inputs, targets, mask, first) of train_streams
    cfg: Config
    settings: dict  # what a checkpoint must match to be resumed; results.json's config
    model: LanguageModel
    ddp: nn.Module  # the model, wrapped for DDP when world > 1
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    autocast: torch.autocast
    memory: object
    step: int = 0
    pos: int = 0  # where the next segment starts in the streams
    minutes_before: float = 0.0  # spent in the runs this one resumes
    history: list = dataclasses.field(default_factory=list)  # (step, valid perplexity) of every --eval-every evaluation
    start: float = 0.0  # when this process's training loop started
    eval_seconds: float = 0.0  # time spent validating, kept out of tokens/s
    saved_at: int = None  # the step of the last ckpt.pt

    def portable(self):
        """What load_model needs (configuration, vocabulary, weights), and the run's settings."""
        return {"config": dataclasses.asdict(self.cfg), "vocab": self.vocab, "tie": True, "run": self.settings,
                "model": self.model.state_dict()}

    @property
    def tokens_per_step(self):
        return self.args.batch_size * self.cfg.seg_len * self.world

    def perplexity(self, split):
        """The split's perplexity: per document with --reset, else with the memory carried over."""
        return perplexity(self.model, self.data[split], self.args.eval_streams, self.cfg.seg_len, self.device,
                          self.autocast, self.data[f"{split}_docs"] if self.args.reset else None)


def setup(args):
    """This process's data, model and optimizer; with --resume, the saved state."""
    rank, world, device = init_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    os.makedirs(args.out, exist_ok=True)
    # Rank 0 tokenises (or loads the cache) first, then the others read the cache.
    if rank == 0:
        vocab, data = load_corpus(args.data, args.out)
    if world > 1:
        dist.barrier()
    if rank != 0:
        vocab, data = load_corpus(args.data, args.out, log)
    if len(data["train"]) < args.batch_size * world * 2:
        raise UserError(f"{args.data}: the training split has {len(data['train'])} tokens, too few for "
                        f"{args.batch_size * world} streams")
    streams = train_streams(data["train"], data["train_docs"], args.batch_size * world, args.model["seg_len"],
                            args.reset)
    streams = tuple(t[rank * args.batch_size:(rank + 1) * args.batch_size] for t in streams)

    cfg = Config(vocab_size=len(vocab), memory=args.memory, lm_head=False, **args.model)
    settings = {**vars(cfg), "tie": True, "batch_size": args.batch_size, "world_size": world,
                "max_steps": args.max_steps, "lr": args.lr, "warmup": args.warmup, "clip": args.clip,
                "seed": args.seed, "train_tokens": len(data["train"]), "reset": args.reset}
    ckpt = load_checkpoint(args.resume, settings) if args.resume else None
    torch.manual_seed(args.seed + rank)
    model = LanguageModel(cfg, tie=True).to(device)
    # Under DDP some parameters get no gradient in a step: the adaptive softmax skips a tail cluster
    # when no target of the batch falls in it, and the LTM is unused while its memory is empty.
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # linear warm-up, then cosine decay to zero at max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0, args.warmup, args.max_steps, floor=0.0))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    r = Run(args, rank, world, device, log, vocab, data, streams, cfg, settings, model, ddp, opt, sched, autocast,
            memory=model.body.init_memory(args.batch_size))
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        r.step, r.pos, r.minutes_before, r.history = ckpt["step"], ckpt["pos"][rank], ckpt["minutes"], ckpt["history"]
        r.memory = ckpt["memory"][rank].to(device)
        set_rng_state(ckpt["rng"][rank])
        log(f"resumed from {args.resume} at step {r.step}")
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
        nll, r.memory, kl = r.ddp(x.long().to(r.device), y.long().to(r.device), r.memory)
    real = real.to(r.device)  # with --reset, the padding before a document is masked out of the mean
    loss = (nll * real).sum() / real.sum().clamp_min(1) if r.args.reset else nll.mean()
    r.opt.zero_grad(set_to_none=True)
    (loss + kl).backward()
    nn.utils.clip_grad_norm_(r.model.parameters(), r.args.clip)
    r.opt.step()
    lr = r.sched.get_last_lr()[0]  # the rate this step used
    r.sched.step()
    r.step, r.pos = r.step + 1, r.pos + x.size(1)
    return loss.item(), lr


def save_checkpoint(r, path):
    """Every rank's memory, stream position and RNG go to rank 0, which writes the file."""
    r.saved_at = r.step
    state = (r.memory.to("cpu"), r.pos, rng_state())
    states = [state]
    if r.world > 1:
        states = [None] * r.world
        dist.gather_object(state, states if r.rank == 0 else None, dst=0)
    if r.rank == 0:
        memory, positions, rngs = zip(*states)
        atomic_save({**r.portable(), "optimizer": r.opt.state_dict(), "scheduler": r.sched.state_dict(),
                     "step": r.step, "pos": list(positions), "memory": list(memory), "rng": list(rngs),
                     "history": r.history, "minutes": r.minutes_before + (time.time() - r.start) / 60}, path)


def validate(r):
    """Rank 0 measures the valid perplexity and keeps the best weights in best.pt; the other ranks wait."""
    t0 = time.time()
    if r.rank == 0:
        ppl = r.perplexity("valid")
        best = min((p for _, p in r.history), default=math.inf)
        r.history.append((r.step, ppl))
        if ppl < best:
            atomic_save({**r.portable(), "step": r.step, "valid_ppl": ppl}, os.path.join(r.args.out, "best.pt"))
        r.log(f"step {r.step} | valid ppl {ppl:.2f} | best {min(ppl, best):.2f}", flush=True)
    if r.world > 1:
        dist.barrier()
    r.eval_seconds += time.time() - t0


def train(r):
    """The training loop, to --max-steps or --max-minutes; SIGINT/SIGTERM saves ckpt.pt and exits. Returns the
    last step's loss, the steps this process ran and their seconds (validation left out)."""
    args = r.args
    stop = {"signal": None}  # set by SIGINT/SIGTERM; the loop saves and exits at the next step boundary
    handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    r.log(f"{args.memory}: {sum(p.numel() for p in r.model.parameters()):,} parameters, vocabulary "
          f"{len(r.vocab):,}, {r.world} process(es) × {args.batch_size} streams × {r.cfg.seg_len} tokens per step, "
          f"device {r.device}", flush=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    r.start = last_log = time.time()
    first_step, window, loss = r.step, [], None
    while r.step < args.max_steps:
        loss, lr = train_step(r)
        window.append(loss)
        elapsed = time.time() - r.start
        out_of_time = args.max_minutes is not None and r.minutes_before + elapsed / 60 >= args.max_minutes
        flags = torch.tensor([stop["signal"] is not None, out_of_time], dtype=torch.float32, device=r.device)
        if r.world > 1:  # every rank must stop at the same step
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if time.time() - last_log >= args.log_seconds or r.step == args.max_steps or flags.any():
            eta = (elapsed - r.eval_seconds) / (r.step - first_step) * (args.max_steps - r.step) / 60
            if args.max_minutes is not None:
                eta = min(eta, args.max_minutes - r.minutes_before - elapsed / 60)
            mean = sum(window) / len(window)
            tokens_per_second = r.tokens_per_step * (r.step - first_step) / (elapsed - r.eval_seconds)
            r.log(f"step {r.step}/{args.max_steps} | loss {mean:.3f} | ppl {math.exp(mean):.1f} | lr {lr:.2e} | "
                  f"{tokens_per_second:,.0f} tok/s | ETA {eta:.1f} min", flush=True)
            window, last_log = [], time.time()
        if flags[0]:
            save_checkpoint(r, ckpt_path)
            r.log(f"interrupted at step {r.step}: saved {ckpt_path}; continue with --resume {ckpt_path}", flush=True)
            if r.world > 1:
                dist.destroy_process_group()
            sys.exit(128 + stop["signal"])
        if args.eval_every and (r.step % args.eval_every == 0 or r.step == args.max_steps or flags[1]):
            validate(r)
        if r.step % args.save_every == 0 or flags[1]:
            save_checkpoint(r, ckpt_path)
        if flags[1]:
            r.log(f"--max-minutes {args.max_minutes} reached at step {r.step}")
            break
    seconds = time.time() - r.start - r.eval_seconds
    if r.saved_at != r.step:
        save_checkpoint(r, ckpt_path)  # the final state
    for s, h in handlers.items():
        signal.signal(s, h)
    return loss, r.step - first_step, seconds


def final_evaluation(r, train_loss, steps, seconds):
    """Rank 0: the valid and test perplexity of the best weights (of the last without --eval-every), in results.json."""
    args, model = r.args, r.model
    evaluated, evaluated_step = "last", r.step
    if r.history:  # the best weights of the run
        best = torch.load(os.path.join(args.out, "best.pt"), map_location=r.device)
        model.load_state_dict(best["model"])
        evaluated, evaluated_step = "best", best["step"]
    r.log(f"evaluating the {evaluated} weights (step {evaluated_step}) on {len(r.data['valid']):,} valid and "
          f"{len(r.data['test']):,} test tokens ...", flush=True)
    ppl = {s: r.perplexity(s) for s in ("valid", "test")}
    ltm_zeroed = None
    if r.cfg.memory in ("infinite", "sticky"):
        with ltm_read_zeroed(model.body):
            ltm_zeroed = r.perplexity("valid")
        r.log(f"LTM use: with every Z_LTM zeroed the valid perplexity is {ltm_zeroed:.2f}, against "
              f"{ppl['valid']:.2f} ({100 * (ltm_zeroed / ppl['valid'] - 1):+.1f}%)")
    result = {"memory": args.memory, "valid_ppl": round(ppl["valid"], 2), "test_ppl": round(ppl["test"], 2),
              "valid_ppl_ltm_zeroed": None if ltm_zeroed is None else round(ltm_zeroed, 2),
              "tokens_per_second": round(r.tokens_per_step * steps / seconds) if steps else None,
              "peak_memory_mb": round(peak_memory_mb(r.device), 1),
              "minutes": round(r.minutes_before + (time.time() - r.start) / 60, 2),
              "steps": r.step, "evaluated": evaluated, "evaluated_step": evaluated_step,
              "valid_history": [[s, round(p, 2)] for s, p in r.history], "train_loss": train_loss,
              "config": {**r.settings, "device": str(r.device), "dtype": args.dtype}}
    path = os.path.join(args.out, "results.json")
    save_json(result, path, indent=2)
    r.log(f"{args.memory}, {evaluated} weights (step {evaluated_step}): valid ppl {ppl['valid']:.2f} | "
          f"test ppl {ppl['test']:.2f} | results in {path}")


def main(args):
    r = setup(args)
    train_loss, steps, seconds = train(r)
    if r.rank == 0:
        final_evaluation(r, train_loss, steps, seconds)
    if r.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def generate(args):
    """--generate: the prompt and args.tokens sampled words on stdout (<eos> as a line break), progress on stderr."""
    model, vocab = load_model(args.generate, args.device)
    index = {w: i for i, w in enumerate(vocab)}
    words = args.prompt.split()
    unknown = [w for w in words if w not in index]
    if unknown:
        print(f"note: not in the vocabulary, read as <unk>: {' '.join(unknown)}", file=sys.stderr)
    ids = [index["<eos>"]] + [index.get(w, index["<unk>"]) for w in words]  # the text starts after a line end
    torch.manual_seed(args.seed)  # for sticky's memory writes; the words are drawn from a generator of their own
    steps = model.body.generate(torch.tensor([ids], device=args.device), args.tokens, model.softmax.log_prob,
                                args.temperature, args.top_k, seed=args.seed)
    sampled, start = [], time.time()
    last_log = start  # a progress line every --log-seconds: long outputs only
    for token, _ in steps:
        sampled.append(token.item())
        if time.time() - last_log >= args.log_seconds:
            print(f"{len(sampled):,}/{args.tokens:,} words, {1000 * (time.time() - start) / len(sampled):.1f} ms "
                  "per word", file=sys.stderr, flush=True)
            last_log = time.time()
    lines = [[]]
    for w in [vocab[i] for i in ids[1:] + sampled]:
        if w == "<eos>":
            lines.append([])
        else:
            lines[-1].append(w)
    print("\n".join(" ".join(line) for line in lines))


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
