"""
The ∞-former in one file: a Transformer with an unbounded long-term memory.

Martins, Marinho & Martins, "∞-former: Infinite Memory Transformer", ACL 2022
(arXiv 2109.00301). Read top to bottom, in the order of the paper:

  1. the RBF basis            ψ_j(t) = N(t; c_j, w_j²)
  2. closed-form ridge        Bᵀ = Xᵀ Fᵀ (F Fᵀ + λI)⁻¹
  3. continuous attention     a Gaussian N(μ, σ²) over t ∈ [0, 1], read as Bᵀ E[ψ(t)]
  4. the unbounded memory     sample the old signal, squeeze it into [0, τ], refit
  5. sticky memories          sample the old signal where attention went
  6. Infini-attention         beyond the paper: a linear-attention memory, for comparison
  7. the model                Transformer-XL short-term memory + a long-term memory; Transformer-XL
                              and the Compressive Transformer as baselines

Notation (Config's names and defaults in parentheses):
  d       width of the residual stream and of every memory vector (d_model, 128)
  H, dh   heads (n_heads, 4) and their width d / H
  T, L    tokens in a segment (seg_len, 128; forward takes any T, seg_len sizes the precomputed fits);
          L also: vectors in one write to the long-term memory, X (L × d) those vectors
  m       short-term memory: the last layer inputs kept (mem_len, 128)
  N       basis functions ψ_j of the long-term memory (num_basis, 64); c_j, w_j their centres, widths
  B       the long-term memory: N × d coefficients per layer, x(t) ≈ Bᵀψ(t) for t ∈ [0, 1]
  λ       the ridge penalty (ridge, 1.0)
  τ       the old signal is squeezed into [0, τ] at every write (tau, 0.75)
  M       samples of the old signal per write (num_samples, 64)
  D       histogram bins of sticky memories (sticky_bins, 128)
  μ, σ²   a query's Gaussian density over [0, 1]; σ₀ that of the KL regulariser (sigma_0, 0.05)
  W       the short-term attention's window, c + m + T (c: compressed slots); Z_STM, Z_LTM its two outputs
  bs      the batch size (streams), in shape comments
Where this file departs from the paper or the authors' code is listed at its end.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. The RBF basis: a signal x(t), t ∈ [0, 1], is approximated as x(t) ≈ Bᵀψ(t) with
#    N Gaussian densities ψ_j(t) = N(t; c_j, w_j²) as basis functions.


def basis_functions(num_basis, widths, dtype=torch.float32):
    """Centres evenly spaced on [0, 1], each paired with every width: (centers, widths), each (N,)."""
    # The widths should scale with the centres' spacing 1 / (N / len(widths) - 1). The authors'
    # (0.01, 0.05) suit their N = 512 (spacing 0.004); at Config's N = 64 (spacing 0.03) they would
    # leave gaps between centres, so Config uses (0.04, 0.2), about 1.2 and 6 spacings.
    grid = torch.linspace(0, 1, num_basis // len(widths), dtype=dtype), torch.tensor(widths, dtype=dtype)
    centers, widths = torch.meshgrid(*grid, indexing="ij")
    return centers.flatten(), widths.flatten()


def basis_at(t, centers, widths):
    """ψ(t): every basis density at every position, shape t.shape + (N,)."""
    return torch.exp(-0.5 * ((t.unsqueeze(-1) - centers) / widths) ** 2) / (widths * math.sqrt(2 * math.pi))


def midpoints(n, start=0.0, end=1.0):
    """n positions at the midpoints of n equal cells of [start, end]: where a chunk's vectors sit."""
    return start + (end - start) * (torch.arange(n, dtype=torch.float64) + 0.5) / n


# -----------------------------------------------------------------------------
# 2. Closed-form ridge regression. With F = [ψ(t_1), ..., ψ(t_L)] ∈ R^{N×L}, the
#    coefficients minimising ‖Bᵀ F − Xᵀ‖² + λ‖B‖² are Bᵀ = Xᵀ Fᵀ (F Fᵀ + λI)⁻¹, so
#    B = Gᵀ X with G = Fᵀ (F Fᵀ + λI)⁻¹: G depends only on positions, basis and λ.


def ridge_matrix(t, centers, widths, ridge):
    """G = Fᵀ (F Fᵀ + λI)⁻¹, shape (len(t), N); the coefficients of X (len(t), d) are G.T @ X."""
    Ft = basis_at(t, centers, widths)  # (L, N) = Fᵀ
    A = Ft.T @ Ft + ridge * torch.eye(Ft.size(1), dtype=Ft.dtype, device=Ft.device)  # F Fᵀ + λI
    return torch.linalg.solve(A, Ft.T).T  # A is symmetric, so Fᵀ A⁻¹ = (A⁻¹ F)ᵀ


# -----------------------------------------------------------------------------
# 3. Continuous attention. Each query gives a Gaussian density p = N(μ, σ²) over [0, 1]
#    and reads E_p[x(t)] = Bᵀ E_p[ψ(t)]. The product of two Gaussians integrates in closed
#    form over the real line: E_p[ψ_j] = N(μ; c_j, σ² + w_j²) (truncation to [0, 1] is
#    ignored, as by the authors).


def gaussian_expectation(mu, var, centers, widths):
    """E_{N(μ,σ²)}[ψ(t)] = N(μ; c_j, σ² + w_j²), shape mu.shape + (N,): each of C centres with each of K widths."""
    # This read is most of the ∞-former's cost over Transformer-XL, so everything but one multiply-add and
    # one exp is computed per centre or per width, not per basis function:
    # N(μ; c, σ² + w²) = exp(−½ (μ − c)² p + ½ log(p / 2π)), with p = 1 / (σ² + w²).
    p = 1 / (var.unsqueeze(-1) + widths**2)  # (..., K)
    sq = (mu.unsqueeze(-1) - centers) ** 2  # (μ − c)²  (..., C)
    log_norm = 0.5 * torch.log(p / (2 * math.pi))
    return torch.addcmul(log_norm.unsqueeze(-2), sq.unsqueeze(-1), -0.5 * p.unsqueeze(-2)).exp().flatten(-2)


VAR_MIN = 1e-4  # σ² floor: softplus underflows to 0, and a zero-width Gaussian has an infinite KL and density
SIGMA_INIT = 0.25  # σ at initialisation: N(0.5, 0.25²) puts 95% of its mass inside the memory's [0, 1]


class Float32Constants(nn.Module):
    """Buffers that are the method's constants (basis, ridge matrices, RoPE frequencies) stay float32 under
    .half() or .bfloat16() (a bf16 ridge matrix puts about 1% of error into every fit); .double() upgrades them."""

    def _apply(self, fn, recurse=True):  # what .to(), .cuda(), .half(), ... call on every module
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in kept.items():
            if torch.finfo(self._buffers[name].dtype).bits < 32:
                self._buffers[name] = old.to(self._buffers[name].device)
        return self


class ContinuousAttention(Float32Constants):
    """Multi-head attention of the current queries over the long-term memory's signal."""

    def __init__(self, cfg):
        super().__init__()
        self.k = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # K = B W_K
        self.v = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # V = B W_V
        self.w_mu_var = nn.Linear(cfg.num_basis, 2)  # rows w_μ and w_σ, shared by the heads (as the authors do)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # The basis's C centres and K widths, each centre with each width as basis_functions pairs them.
        self.register_buffer("centers", torch.linspace(0, 1, cfg.num_basis // len(cfg.basis_widths)), persistent=False)
        self.register_buffer("widths", torch.tensor(cfg.basis_widths, dtype=torch.float32), persistent=False)

    def density(self, q, coeffs):
        """Each query's Gaussian over [0, 1]: μ, σ² (bs, H, T), float32 or better, for q (bs, H, T, dh) and B."""
        bs, H, T, dh = q.shape
        with torch.autocast(q.device.type, enabled=False):  # in the buffers' dtype, whatever the model's or autocast
            q, coeffs = q.to(self.centers.dtype), coeffs.to(self.centers.dtype)
            # The scores s = K q / √dh (one per basis function) enter only through w_μᵀ s and
            # w_σᵀ s, which are linear: w_μᵀ K q = (Kᵀ w_μ)ᵀ q, and Kᵀ w_μ = W_Kᵀ Bᵀ w_μ. Folding
            # w_μ, w_σ into the coefficients first gives the same numbers without forming K or
            # the (T × N) score matrix.
            folded = self.w_mu_var.weight.to(q.dtype) @ coeffs  # [w_μ w_σ]ᵀ B   (bs, 2, d)
            k_mu_var = F.linear(folded, self.k.weight.to(q.dtype)).view(bs, 2, H, dh).transpose(1, 2)  # (bs, H, 2, dh)
            logits = q @ k_mu_var.transpose(-2, -1) / math.sqrt(dh) + self.w_mu_var.bias.to(q.dtype)  # (bs, H, T, 2)
            # μ = sigmoid(w_μᵀ s + b_μ), σ² = softplus(w_σᵀ s + b_σ)
            return torch.sigmoid(logits[..., 0]), F.softplus(logits[..., 1]).clamp_min(VAR_MIN)

    def forward(self, q, coeffs, n):
        """Z_LTM (bs, n, d) of the last n >= 1 queries q (bs, H, T, dh), all μ, σ² (bs, H, T); coeffs (bs, N, d): B."""
        bs, H, T, dh = q.shape
        mu, var = self.density(q, coeffs)
        # E_p[ψ] (bs, H, n, N), float32 under autocast too: it lowers only matmul-like operations
        r = gaussian_expectation(mu[..., -n:], var[..., -n:], self.centers, self.widths)
        # The value read and the output projection are ordinary linear maps: they run in the
        # model's dtype (bf16 under autocast), like the short-term attention's.
        v = self.v(coeffs.to(self.v.weight.dtype)).view(bs, -1, H, dh).transpose(1, 2)  # (bs, H, N, dh)
        z = r.to(v.dtype) @ v  # Vᵀ E_p[ψ] per query  (bs, H, n, dh)
        return self.proj(z.transpose(1, 2).reshape(bs, n, H * dh)), mu, var


def gaussian_kl(var, sigma_0):
    """KL(N(μ, σ²) ‖ N(μ, σ₀²)) = ½ (σ²/σ₀² − log(σ²/σ₀²) − 1): pulls σ towards σ₀, from both sides."""
    ratio = var / sigma_0**2
    return 0.5 * (ratio - torch.log(ratio) - 1)


# -----------------------------------------------------------------------------
# 4. The unbounded memory. The first write fits the L new vectors across [0, 1] (L < seg_len vectors:
#    only the last L/seg_len of it). Later writes sample the old signal at M positions, place those
#    M values at τ·i/M ∈ (0, τ], place the L new vectors in (τ, 1] and fit all M + L points:
#    the memory covers an ever longer past at the fixed cost of N×d numbers, the oldest part
#    at the lowest resolution.


class UnboundedMemory(Float32Constants):
    """Writes vectors into the long-term memory: B_new = Gᵀ [x_old(s_1..s_M); X_new]. The G of a full write and of a
    first write (sliced when short) are buffers, solved once in float64; other writes solve their own."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.basis64 = basis_functions(cfg.num_basis, cfg.basis_widths, torch.float64)  # not a buffer: stays float64
        self.register_buffer("centers", self.basis64[0].float(), persistent=False)
        self.register_buffer("widths", self.basis64[1].float(), persistent=False)
        self.register_buffer("G_first", self._first_matrix(cfg.seg_len).float(), persistent=False)  # (L, N)
        self.register_buffer("G_update", self._update_matrix(cfg.seg_len).float(), persistent=False)  # (M+L, N)
        s = torch.arange(1, cfg.num_samples + 1, dtype=torch.float64) / cfg.num_samples  # s_i = i/M
        self.register_buffer("psi_uniform", basis_at(s, *self.basis64).float(), persistent=False)  # (M, N)

    def _first_matrix(self, L):  # L >= seg_len vectors across [0, 1], in float64
        return ridge_matrix(midpoints(L), *self.basis64, self.cfg.ridge)

    def _update_matrix(self, L):  # M old samples at τ·i/M, then L new vectors in (τ, 1], in float64
        # The paper's samples s_i = i/M, i = 1..M, end at the newest point of the old signal and land
        # at τ·i/M, ending exactly where the new vectors begin. Each new vector stands for its own
        # cell of (τ, 1] and sits at the cell's midpoint, as in the first write. A short update
        # (L < seg_len) gets the (1 − τ)·L/seg_len that its vectors would hold in a full segment,
        # and the old signal keeps the rest: spread over all of (τ, 1], they would outweigh it.
        M, seg_len = self.cfg.num_samples, self.cfg.seg_len
        tau = self.cfg.tau if L >= seg_len else 1 - (1 - self.cfg.tau) * L / seg_len
        t = torch.cat([tau * torch.arange(1, M + 1, dtype=torch.float64) / M, midpoints(L, tau, 1.0)])
        return ridge_matrix(t, *self.basis64, self.cfg.ridge)

    @torch.no_grad()  # the stored coefficients are detached: no gradient flows across segments
    def forward(self, coeffs, x_new, positions=None):
        """coeffs (bs, N, d), or (bs, 0, d) when empty; x_new (bs, L, d); positions (bs, M) where to sample the
        old signal (sticky memories, section 5), by default s_i = i/M. Returns the new coefficients (bs, N, d)."""
        L, M = x_new.size(1), self.cfg.num_samples
        with torch.autocast(x_new.device.type, enabled=False):  # float32 (or better) even under autocast
            x_new, coeffs = x_new.to(self.G_first.dtype), coeffs.to(self.G_first.dtype)
            if coeffs.size(1) == 0:  # first write after a reset
                # One of L < seg_len vectors takes only the last L of the seg_len cells, so each vector
                # covers a full segment's share (spread over all of [0, 1], a short first chunk would
                # outweigh every later token), and the empty cells are fitted as zero vectors (left free,
                # the wide basis functions spread the values into them): B = G_firstᵀ [0; X] = G_first[-L:]ᵀ X.
                G = self.G_first[-L:] if L <= self.cfg.seg_len else self._first_matrix(L).to(x_new)
                return G.T @ x_new  # B = Gᵀ X
            G = self.G_update if L == self.cfg.seg_len else self._update_matrix(L).to(x_new)
            psi_old = self.psi_uniform if positions is None else basis_at(positions.to(x_new), self.centers, self.widths)
            # Bᵀ = [X_old; X_new]ᵀ G, with X_old = x_old(s_1..s_M) = ψ(s) B  (bs, M, d)
            return G[:M].T @ (psi_old @ coeffs) + G[M:].T @ x_new


# -----------------------------------------------------------------------------
# 5. Sticky memories. Instead of s_i = i/M, sample the old signal where the last read's
#    densities put their mass, so the regions that mattered keep their resolution. The
#    values still go to the slots τ·i/M: the attended regions get more of the new timeline.


def sticky_positions(mu, var, num_bins, num_samples, uniform=0.0):
    """M sorted positions in [0, 1] per stream, drawn from the histogram of the last read's densities mu, var
    (bs, ...): bin b gets Σ_heads,queries Φ((e_{b+1} − μ)/σ) − Φ((e_b − μ)/σ), normalised and mixed with a share
    `uniform` of the uniform histogram; a bin is drawn from it, then a uniform offset inside the bin."""
    edges = torch.linspace(0, 1, num_bins + 1, device=mu.device, dtype=mu.dtype)
    scale = torch.rsqrt(2 * var.flatten(1).unsqueeze(-1))  # 1 / (σ √2)  (bs, H*T, 1)
    # Φ(x) = ½ (1 + erf(z)), z = (x − μ) / (σ √2): the ½ and the 1 cancel in the differences, and summing over the
    # densities first leaves one addcmul, one erf and one sum over (bs, H*T, D+1). The difference of two rounded
    # sums can fall below zero where the true mass is ~0, which multinomial refuses: clamp it.
    z = torch.addcmul(-mu.flatten(1).unsqueeze(-1) * scale, edges, scale)  # (bs, H*T, D+1)
    mass = 0.5 * torch.erf(z).sum(1).diff(dim=-1).clamp_min(0)  # (bs, D)
    # The histogram feeds on itself: a region the reads leave is never sampled again, and the old part of the
    # memory can fill with copies of one token (README, "Language modelling"). A uniform share keeps every region sampled.
    # At 0 the line is skipped: the paper's draws, to the bit.
    mass = (1 - uniform) * mass / mass.sum(-1, keepdim=True) + uniform / num_bins if uniform > 0 else mass
    bins = torch.multinomial(mass, num_samples, replacement=True)  # (bs, M)
    return ((bins + torch.rand(bins.shape, device=mu.device, dtype=mu.dtype)) / num_bins).sort(-1).values


# -----------------------------------------------------------------------------
# 6. Beyond the paper: Infini-attention (Munkhdalai, Faruqui & Gopal 2024, arXiv 2404.07143), a recent
#    fixed-cost memory, included as a fifth memory kind. Each head keeps a linear-attention matrix M
#    (dh × dh; that paper's name, not section 4's M samples) and a normaliser z (dh), H × (dh² + dh)
#    numbers per layer, written from the same evicted states as the ∞-former's memory, with the feature
#    map φ = ELU + 1 (positive, so φ(Q) z > 0 once anything is stored):
#      retrieval  A_mem = φ(Q) M / (φ(Q) z)
#      update     M ← M + φ(K)ᵀ (V − φ(K) M / (φ(K) z)),  z ← z + Σ_t φ(K_t)   (the delta rule)
#      gate       A = sigmoid(β) ⊙ A_mem + (1 − sigmoid(β)) ⊙ A_dot, one β per head
#    Choices the paper leaves open: the queries are the short-term attention's (before RoPE: the
#    memory has no positions), the keys and values the layer's own projections of the evicted
#    states; β starts at 0 (an even mix); the delta rule is used; the memory is detached between
#    segments, like every memory here (the paper backpropagates through it over a training sequence).


def retrieve(phi_q, mem):
    """φ(Q) M / (φ(Q) z) for φ(Q) (bs, H, T, dh) and mem = [M z] (bs, H, dh, dh + 1); zeros if z = 0 (empty)."""
    num_den = phi_q @ mem.float()  # z as M's extra column: one product gives [φ(Q) M, φ(Q) z]  (bs, H, T, dh + 1)
    return num_den[..., :-1] / num_den[..., -1:].clamp_min(1e-6)  # the floor meets z = 0 and keys masked to 0


class InfiniMemory(nn.Module):
    """One layer's Infini-attention: the gate, the read and the write. The memory [M z] stays float32."""

    def __init__(self, cfg):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(cfg.n_heads, 1, 1))  # β per head

    def forward(self, q, a_dot, mem):
        """q, a_dot (bs, H, T, dh): the queries and the local attention's output per head; mem [M z]. Returns A."""
        with torch.autocast(q.device.type, enabled=False):
            a_mem = retrieve(F.elu(q.float()) + 1, mem)  # A_mem = φ(Q) M / (φ(Q) z)
            gate = torch.sigmoid(self.beta.float())
            return (gate * a_mem + (1 - gate) * a_dot.float()).to(a_dot.dtype)

    @torch.no_grad()
    def write(self, mem, k, v, keep=None):
        """k, v (bs, H, n, dh): the evicted states' keys and values; keep (bs, n, 1) or None: which of them
        a stream saw since its last reset_memory (the others write nothing). Returns the new [M z]."""
        with torch.autocast(k.device.type, enabled=False):
            phi_k = F.elu(k.float()) + 1 if keep is None else (F.elu(k.float()) + 1) * keep[:, None]
            delta = v.float() - retrieve(phi_k, mem)  # V − φ(K) M / (φ(K) z): what M does not yet recall
            # A column of ones beside the values: φ(K)ᵀ [Δ 1] = [φ(K)ᵀ Δ, Σ_t φ(K_t)] updates M and z at once.
            return mem.float() + phi_k.transpose(-2, -1) @ F.pad(delta, (0, 1), value=1.0)


# -----------------------------------------------------------------------------
# 7. The model: a pre-LayerNorm Transformer-XL whose layers also read the long-term memory.


MEMORY_KINDS = ("xl", "compressive", "infinite", "sticky", "infini")  # infinite, sticky: the ∞-former


@dataclass
class Config:
    vocab_size: int = 256  # tokens the embedding (and the output layer) knows
    d_model: int = 128  # width of the residual stream, and of every memory vector
    n_layers: int = 2
    n_heads: int = 4  # for the short-term and the long-term attention alike
    d_ff: int = 512  # hidden width of the feed-forward network
    dropout: float = 0.0
    seg_len: int = 128  # tokens per segment, the length of a long-term memory write
    mem_len: int = 128  # short-term memory: the last mem_len layer inputs (Transformer-XL)
    memory: str = "infinite"  # one of MEMORY_KINDS
    num_basis: int = 64  # N, basis functions of the long-term memory
    basis_widths: tuple = (0.04, 0.2)  # w_j, each paired with every centre; scale with the centres' spacing
    ridge: float = 1.0  # λ of the ridge regression
    tau: float = 0.75  # τ: the old signal is squeezed into [0, τ] at each write
    num_samples: int = 64  # M: samples of the old signal per write
    sticky_bins: int = 128  # D: histogram bins for sticky memories
    sticky_uniform: float = 0.0  # share of sticky's histogram that is uniform (0: the paper's)
    sigma_0: float = 0.05  # σ₀ of the KL regulariser
    kl_weight: float = 1e-6  # weight of the KL regulariser
    cmem_len: int = 64  # compressive: slots of compressed memory
    compress_rate: int = 4  # compressive: evicted states mean-pooled per slot
    lm_head: bool = True  # False: forward returns hidden states, for an output layer of your own

    def __post_init__(self):
        def check(ok, field, why):
            if not ok:
                raise ValueError(f"Config.{field} = {getattr(self, field)!r}: {why}")

        self.basis_widths = tuple(self.basis_widths)
        check(self.memory in MEMORY_KINDS, "memory", f"must be one of {', '.join(MEMORY_KINDS)}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "seg_len", "num_samples",
                     "sticky_bins", "cmem_len", "compress_rate"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be a positive integer")
        check(isinstance(self.mem_len, int) and self.mem_len >= 0, "mem_len", "must be an integer >= 0")
        check(self.d_model % self.n_heads == 0, "d_model", f"must be divisible by n_heads = {self.n_heads}")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(0 < self.tau < 1, "tau", "must be in (0, 1)")
        check(0 <= self.sticky_uniform <= 1, "sticky_uniform", "must be in [0, 1]")
        check(len(self.basis_widths) >= 1 and min(self.basis_widths) > 0, "basis_widths", "must be positive widths")
        check(self.num_basis >= 2 and self.num_basis % len(self.basis_widths) == 0, "num_basis",
              f"must be >= 2 and a multiple of len(basis_widths) = {len(self.basis_widths)}")
        for name in ("ridge", "sigma_0"):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.kl_weight >= 0, "kl_weight", "must be >= 0")


@dataclass
class Memory:
    """What one segment hands to the next, one detached tensor per layer in each list."""

    stm: list  # (bs, m, d), m <= mem_len: the last layer inputs
    cmem: list  # (bs, c, d), c <= cmem_len: compressed evicted layer inputs ("compressive")
    ltm: list  # (bs, N, d): long-term memory coefficients B, float32; (bs, 0, d) before the first write
    # and for xl, compressive ("infini": [M z] (bs, H, dh, dh + 1), float32, zeros when empty)
    # (bs,) tokens seen since each stream's reset_memory (None before any; a stream never reset gets
    # mem_len + cmem_len·compress_rate, all valid): its visible memory slots, its valid evicted states and
    # whether its next LTM write is a first write follow from it.
    seen: torch.Tensor = None

    def to(self, *args, **kwargs):
        stm, cmem, ltm = ([t.to(*args, **kwargs) for t in ts] for ts in (self.stm, self.cmem, self.ltm))
        return Memory(stm, cmem, ltm, None if self.seen is None else self.seen.to(stm[0].device))  # stays integer


torch.serialization.add_safe_globals([Memory])  # so torch.load(weights_only=True) can read a saved Memory


def compress(cmem, evicted, cfg):
    """The Compressive Transformer baseline: evicted states (bs, n, d) mean-pooled compress_rate per slot,
    appended to the compressed memory (bs, c, d), of which the last cmem_len slots are kept."""
    pooled = F.avg_pool1d(evicted.transpose(1, 2), cfg.compress_rate, ceil_mode=True).transpose(1, 2)
    return torch.cat([cmem, pooled], dim=1)[:, -cfg.cmem_len:]


def rotate(x, cos, sin):
    """RoPE: channel pairs (i, i + h) rotated by angles proportional to the position (odd head size: last kept)."""
    h = cos.size(-1)
    x1, x2, rest = x[..., :h], x[..., h:2 * h], x[..., 2 * h:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1).to(x.dtype)


class Block(Float32Constants):
    """One layer: Z = Z_STM + Z_LTM (infini: the gated mix inside Z_STM), then the feed-forward network, both
    pre-LayerNorm residual. Short-term attention sees [compressed memory; short-term memory; segment] under a
    causal mask, with RoPE over that window: it depends only on the distance between query and key, so the
    memory's keys need no stored positions and re-indexing the window from 0 in every segment changes none."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.d_head, self.dropout = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.read_ltm = ContinuousAttention(cfg) if cfg.memory in ("infinite", "sticky") else None
        self.infini = InfiniMemory(cfg) if cfg.memory == "infini" else None
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.d_head - 1, 2, dtype=torch.float32) / self.d_head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, stm, cmem, ltm, n_visible=None, n_out=None):
        """x (bs, T, d); stm (bs, m, d); cmem (bs, c, d); ltm this layer's Memory.ltm; n_visible (bs,) or None. Returns
        the output of the last n = min(n_out, T) positions (bs, n, d) (n_out None: all; 0: None), μ, σ² (bs, H, T)."""
        (bs, T, d), H, dh = x.shape, self.n_heads, self.d_head
        n = T if n_out is None else min(n_out, T)
        reads = self.read_ltm is not None and ltm.size(1) > 0  # an LTM that holds something
        if n == 0 and not reads:  # only the memory is wanted, and its writes need nothing of this layer
            return None, None, None
        h = self.ln1(torch.cat([cmem, stm, x], dim=1))  # the window  (bs, W, d)
        W = h.size(1)
        q = self.q(h[:, -T:]).view(bs, T, H, dh).transpose(1, 2)  # (bs, H, T, dh)
        if n == 0:  # of this layer, the memory needs only the read's μ, σ² (sticky's write, the KL term)
            return None, *self.read_ltm.density(q, ltm)
        k, v = self.kv(h).view(bs, W, 2, H, dh).permute(2, 0, 3, 1, 4)  # each (bs, H, W, dh)
        angles = torch.outer(torch.arange(W, device=x.device, dtype=self.inv_freq.dtype), self.inv_freq)  # (W, dh // 2)
        cos, sin = angles.cos(), angles.sin()
        causal = torch.ones(n, W, dtype=torch.bool, device=x.device).tril(W - n)  # query i sees keys <= W-n+i
        if n_visible is not None:  # after a reset_memory, stream b sees only the window's last n_visible[b] + T
            # slots (None: all), those of a fresh run's window, so RoPE gives the same distances  (bs, 1, n, W)
            causal = causal & (torch.arange(W, device=x.device) >= W - T - n_visible[:, None])[:, None, None]
        a = F.scaled_dot_product_attention(rotate(q[:, :, -n:], cos[-n:], sin[-n:]), rotate(k, cos, sin), v,
                                           attn_mask=causal, dropout_p=self.dropout if self.training else 0.0)
        if self.infini is not None:
            a = self.infini(q[:, :, -n:], a, ltm)  # A = sigmoid(β) A_mem + (1 − sigmoid(β)) A_dot
        # The LTM has no positions: position is t. μ, σ² of every query: the KL term and sticky's write use them.
        z_ltm, mu, var = self.read_ltm(q, ltm, n) if reads else (0, None, None)
        y = self.proj(a.transpose(1, 2).reshape(bs, n, d)) + z_ltm  # Z = Z_STM + Z_LTM
        x = x[:, -n:] + self.drop(y)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, mu, var


class InfFormer(nn.Module):
    """The ∞-former, or one of the baselines (Config.memory).

    model(tokens, memory) -> (output, new_memory, kl): tokens (bs, T) ids; memory from init_memory(bs) or the
    previous call (None: a fresh one); output (bs, T, vocab_size) logits (outputs=n: (bs, n, ...)), or with
    cfg.lm_head False the final hidden states (bs, T, d_model); new_memory (detached) for the next segment; kl
    the KL term, already weighted by cfg.kl_weight, to add to the loss. With seg_len = mem_len, segment 1 fills
    the STM, segment 2's evicted inputs (segment 1's) are written to the LTM at its end, and segment 3 reads them.
    Sticky sampling draws from torch's global RNG, in eval() too: seed it for reproducible evaluation."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.write_ltm = UnboundedMemory(cfg) if cfg.memory in ("infinite", "sticky") else None
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if cfg.lm_head else None
        self.apply(self._init_weights)  # no weight tying (a tied output layer starts by predicting its input)
        # Z_LTM starts at zero: the untrained model is Transformer-XL (with its shared weights) and learns how
        # much to read, instead of starting by adding a full-size average of the memory.
        for read in (block.read_ltm for block in self.blocks if block.read_ltm is not None):
            nn.init.zeros_(read.proj.weight)
            # σ² = softplus(w_σᵀ s + b) starts at SIGMA_INIT², not softplus(0) (σ ≈ 0.83, half of every
            # density beyond [0, 1], where it reads the fit's fall to zero and μ barely matters).
            nn.init.constant_(read.w_mu_var.bias[1:], math.log(math.expm1(SIGMA_INIT**2)))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def init_memory(self, batch_size):
        """A fresh, empty memory for batch_size streams, on the model's device."""
        w = self.ln_f.weight  # the device and dtype of the model
        empty = lambda: [w.new_zeros(batch_size, 0, self.cfg.d_model) for _ in self.blocks]
        ltm = ([w.new_zeros(batch_size, b.n_heads, b.d_head, b.d_head + 1, dtype=torch.float32) for b in self.blocks]
               if self.cfg.memory == "infini" else empty())  # infini: [M z], float32 whatever the model's dtype
        return Memory(empty(), empty(), ltm)

    def reset_memory(self, memory, done):
        """done (bs,) bool: the streams where it is True continue exactly as from init_memory (on a segment
        boundary; the compressed memory is exact if compress_rate divides seg_len and mem_len), the others
        untouched. Their old slots stay, hidden by Memory.seen; their LTM reads zeros until its first write."""
        bs = memory.stm[0].size(0)
        if done.shape != (bs,) or done.dtype != torch.bool:
            raise ValueError(f"reset_memory: done must be a ({bs},) bool tensor, not {done.dtype} {tuple(done.shape)}")
        if done.all() or not done.any():  # no per-stream counts needed
            return self.init_memory(bs) if done.all() else memory
        done = done.to(memory.stm[0].device)
        full = self.cfg.mem_len + self.cfg.cmem_len * self.cfg.compress_rate  # a stream never reset: all valid
        seen = torch.where(done, 0, full if memory.seen is None else memory.seen)
        ltm = [t.masked_fill(done.view(bs, *(1,) * (t.dim() - 1)), 0) for t in memory.ltm]
        return Memory(memory.stm, memory.cmem, ltm, seen)

    def forward(self, tokens, memory=None, commit=True, outputs=None):
        """commit=False reads the memory but writes nothing: it returns `memory` itself and, for sticky, draws no
        random numbers (generate runs a segment that is not yet full so). outputs=n: the output of the last n positions
        only (bs, n, ...), 0: None. The last layer's other queries feed only the head, so they are skipped there."""
        # The memory written is a full forward's, to the bit in eval() or without dropout (in training the
        # skipped dropout draws shift the later ones: another sample of the same distribution).
        cfg = self.cfg
        memory = self.init_memory(tokens.size(0)) if memory is None else memory
        if memory.stm[0].size(0) != tokens.size(0):
            raise ValueError(f"the memory holds {memory.stm[0].size(0)} streams but tokens has {tokens.size(0)}: "
                             f"start a new batch size with model.init_memory({tokens.size(0)})")
        x = self.drop(self.tok_emb(tokens))  # (bs, T, d)
        new, kl = Memory([], [], []), x.new_zeros(())
        seen, T, n_visible, keep, first = memory.seen, tokens.size(1), None, None, None
        n_evict = max(0, memory.stm[0].size(1) + T - cfg.mem_len)  # layer inputs that leave the STM in this segment
        if seen is not None:  # since a per-stream reset: what each stream may use follows from its counts
            m, rate = memory.stm[0].size(1), cfg.compress_rate
            n_pooled = ((seen - cfg.mem_len).clamp(min=0) + rate - 1) // rate  # cmem slots filled since the reset
            n_visible = seen.clamp(max=m) + n_pooled.clamp(max=memory.cmem[0].size(1))  # a suffix of [cmem; stm]
            n_valid = (seen + T - cfg.mem_len).clamp(0, n_evict)  # evicted states seen since the reset: the last ones
            keep = (torch.arange(n_evict, device=x.device) >= n_evict - n_valid[:, None])[..., None]  # (bs, n_evict, 1)
            first = seen <= cfg.mem_len  # its LTM (zeros) holds nothing since the reset: its next write is a first
            new.seen = seen + T
        for i, (block, stm, cmem, ltm) in enumerate(zip(self.blocks, memory.stm, memory.cmem, memory.ltm)):
            x_in = x.detach()  # the STM keeps detached layer inputs: no gradient crosses segments
            x, mu, var = block(x, stm, cmem, ltm, n_visible, outputs if i == cfg.n_layers - 1 else None)
            if var is not None:
                kl_read = gaussian_kl(var, cfg.sigma_0)  # (bs, H, T); none for a stream whose LTM is empty (reset)
                kl = kl + (kl_read if first is None else kl_read * ~first[:, None, None]).mean() / cfg.n_layers
            if not commit:
                continue
            # Short-term memory: keep the last mem_len layer inputs; older ones are evicted.
            window = torch.cat([stm, x_in], dim=1)  # (bs, m+T, d)
            evicted = window[:, :n_evict] if keep is None else window[:, :n_evict] * keep  # pre-reset ones: zeros
            new.stm.append(window[:, n_evict:])
            if cfg.memory == "compressive" and n_evict > 0:
                cmem = compress(cmem, evicted, cfg)
            new.cmem.append(cmem)
            if n_evict > 0 and cfg.memory in ("infinite", "sticky", "infini"):  # the evicted states go to the
                with torch.no_grad():  # long-term memory, normalised as the STM attention saw them; no graph needed
                    x_ltm = block.ln1(evicted)
                    if cfg.memory == "infini":  # as this layer's keys and values
                        k, v = block.kv(x_ltm).view(*x_ltm.shape[:2], 2, cfg.n_heads, -1).permute(2, 0, 3, 1, 4)
                        ltm = block.infini.write(ltm, k, v, keep)
                    else:
                        sticky = cfg.memory == "sticky" and mu is not None  # a first write samples nothing
                        positions = sticky_positions(mu, var, cfg.sticky_bins, cfg.num_samples, cfg.sticky_uniform) if sticky else None
                        ltm = self.write_ltm(ltm, x_ltm, positions)
                        if first is not None:  # a reset stream's first write: B = G_firstᵀ [0; X], old states zeroed
                            ltm = torch.where(first[:, None, None], self.write_ltm(ltm[:, :0], x_ltm * keep), ltm)
            new.ltm.append(ltm)
        out = x if x is None else self.ln_f(x) if self.head is None else self.head(self.ln_f(x))  # None: outputs=0
        return out, new if commit else memory, cfg.kl_weight * kl

    @torch.no_grad()
    def generate(self, prompt, num_tokens, output=None, temperature=1.0, top_k=None, seed=0):
        """Sample num_tokens tokens after prompt (bs, P >= 1) from a fresh memory (call model.eval() first);
        yields the sampled tokens (bs,) and their log-probabilities (bs,) before temperature and top-k. output
        maps the hidden states (bs, d) of a model with lm_head=False to logits (not needed with its own head)."""
        # The memory is written as scoring (forward over consecutive seg_len segments) writes it: a token
        # sees the committed memory and its segment's prefix (commit=False: nothing written, none of sticky's
        # random numbers drawn); a full segment gets the normal forward. Recomputing the prefix instead of
        # caching keys and values is simpler, exact, and bounds the cost per token by seg_len × window.
        # Tokens come from a generator of their own (seed), so torch's global RNG feeds only sticky's writes,
        # in the order that scoring draws them.
        if prompt.size(1) < 1 or not temperature > 0 or (output is None and self.head is None):
            raise ValueError("generate needs a prompt of at least one token, a positive temperature, and "
                             "output= when the model has no head of its own (lm_head=False)")
        output = nn.Identity() if output is None else output  # with its own head, the model already returns logits
        L, rng = self.cfg.seg_len, torch.Generator(prompt.device).manual_seed(seed)
        memory, seg = self.init_memory(prompt.size(0)), prompt
        while seg.size(1) > L:  # the prompt's full segments, except a last one
            _, memory, _ = self(seg[:, :L], memory, outputs=0)
            seg = seg[:, L:]
        for _ in range(num_tokens):
            commit = seg.size(1) == L  # the segment is full: write it, as scoring would
            out, new, _ = self(seg, memory, commit=commit)  # (bs, T, vocab_size) logits, or (bs, T, d) hidden states
            log_p = F.log_softmax(output(out[:, -1]).float(), dim=-1)  # (bs, vocab_size)
            logits = log_p / temperature
            if top_k is not None and top_k < logits.size(-1):
                logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], -math.inf)
            token = torch.multinomial(logits.softmax(-1), 1, generator=rng)  # (bs, 1)
            yield token[:, 0], log_p.gather(1, token)[:, 0]
            memory, seg = (new, token) if commit else (memory, torch.cat([seg, token], dim=1))


# -----------------------------------------------------------------------------
# Where this file departs from the paper or the authors' code, or decides what they leave open:
# - The fit is not padded with zeros beyond [0, 1]; G is the plain closed form.
# - No sigmoid/Conv1d gate on the LTM input (the authors' code has one; the paper does not).
# - The LTM reuses the short-term attention's query projection (as the authors do), but
#   has its own key, value and output projections.
# - w_μ and w_σ have a bias each (the authors' have none); w_σ's starts σ at SIGMA_INIT = 0.25
#   instead of about 0.83. The KL term is averaged over layers (the authors sum it).
# - The LTM stores the layer inputs that fall out of the short-term memory (as the authors'
#   sorting model does), so the two memories never hold the same positions. They are stored
#   layer-normalised, as the short-term attention saw them: the authors' post-LN
#   Transformer-XL stores normalised inputs, while our pre-LN residual stream starts near
#   0.02 per channel, too faint for the reads to be learned reliably.
# - Sticky sampling draws a real uniform offset inside each histogram bin, and can mix the histogram
#   with a uniform one (sticky_uniform; train_lm's cpu preset: 0.8), so that no region goes unsampled.
# - A first write shorter than a segment covers only the last L/seg_len of [0, 1], not all of it;
#   the rest is fitted as zero vectors. Likewise an update of L < seg_len vectors (the end of a
#   stream) takes only its share of the new timeline: the old signal is squeezed into
#   [0, 1 − (1 − τ)·L/seg_len] instead of [0, τ]. Either way each vector stands for as much of
#   [0, 1] as a full segment's does.
# - New vectors sit at their cells' midpoints, τ + (1 − τ)(i − ½)/L (the authors: τ + (1 − τ)i/L),
#   the rule of the first write's positions (i − ½)/L carried over to (τ, 1].
# - The σ² floor is VAR_MIN = 1e-4 (the authors: 1e-6). It acts only where σ < 0.01, narrower than
#   every basis function of Config's default (w_j ≥ 0.04), whose read's variance σ² + w_j² it moves
#   by at most 6.25%.
# - The LTM's output projection starts at zero: untrained, the ∞-former computes what a Transformer-XL
#   with the same shared weights computes (the same seed draws other weights: the LTM's are drawn mid-block).
# - The Transformer-XL is pre-LayerNorm with RoPE (Transformer-XL: post-LN, relative
#   position encoding), GELU (ReLU) and attention-probability dropout equal to `dropout`
#   (Transformer-XL base on WikiText-103: none).
