"""Tests for infformer, grouped by the sections of infformer.py, then the two scripts.

Every numerical test compares against an independent computation: a direct formula,
numerical integration, a float64 least-squares solve, or a brute-force reference.
Run with:  python -m pytest -q
"""
import contextlib
import io
import math

import numpy as np
import pytest
import torch

import infformer
from infformer import (Config, ContinuousAttention, InfFormer, InfiniMemory, Memory, UnboundedMemory, basis_at,
                       basis_functions, gaussian_expectation, gaussian_kl, midpoints, ridge_matrix, sticky_positions)

KINDS = list(infformer.MEMORY_KINDS)  # xl, compressive, infinite, sticky, infini


# ----------------------------------------------------------------------------- 1. basis


def test_basis_functions_pair_every_centre_with_every_width():
    centers, widths = basis_functions(8, (0.1, 0.3))
    assert centers.shape == widths.shape == (8,)
    pairs = sorted(zip(centers.tolist(), widths.tolist()))
    expected = sorted((c, w) for c in np.linspace(0, 1, 4) for w in (0.1, 0.3))
    np.testing.assert_allclose(pairs, expected, rtol=1e-6)


def test_basis_at_is_the_normal_density():
    centers, widths = basis_functions(16, (0.05, 0.2), torch.float64)
    t = torch.linspace(-0.2, 1.2, 57, dtype=torch.float64)
    psi = basis_at(t, centers, widths)
    assert psi.shape == (57, 16) and psi.dtype == torch.float64
    for i in (0, 13, 56):
        for j in (0, 5, 15):
            c, w, x = centers[j].item(), widths[j].item(), t[i].item()
            direct = math.exp(-((x - c) ** 2) / (2 * w * w)) / math.sqrt(2 * math.pi * w * w)
            assert psi[i, j].item() == pytest.approx(direct, rel=1e-12)


# ----------------------------------------------------------------------------- 2. ridge


def test_ridge_matrix_equals_a_float64_least_squares_solve():
    centers, widths = basis_functions(20, (0.05, 0.2), torch.float64)
    t, lam = midpoints(50), 0.5
    X = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = ridge_matrix(t, centers, widths, lam)
    assert G.shape == (50, 20)
    # Ridge as ordinary least squares on an augmented system: [Fᵀ; √λ I] B = [X; 0].
    Ft = np.exp(-((t.numpy()[:, None] - centers.numpy()) ** 2) / (2 * widths.numpy() ** 2))
    Ft /= np.sqrt(2 * np.pi) * widths.numpy()
    A = np.vstack([Ft, np.sqrt(lam) * np.eye(20)])
    b = np.vstack([X.numpy(), np.zeros((20, 3))])
    B_lstsq = np.linalg.lstsq(A, b, rcond=None)[0]
    np.testing.assert_allclose((G.T @ X).numpy(), B_lstsq, rtol=1e-7, atol=1e-9)


def test_ridge_fit_is_a_low_pass_filter():
    centers, widths = basis_functions(64, (0.04, 0.2), torch.float64)
    t = midpoints(512)
    psi, G = basis_at(t, centers, widths), ridge_matrix(t, centers, widths, 1.0)
    smooth = torch.stack([torch.sin(2 * math.pi * t), 0.5 * torch.cos(6 * math.pi * t) + t], 1)
    noise = torch.randn(512, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rel = lambda X: ((psi @ (G.T @ X) - X).norm() / X.norm()).item()
    assert rel(smooth) < 0.02  # a smooth signal comes back within a few percent
    assert rel(noise) > 0.8  # white noise does not


# ----------------------------------------------------------------------------- 3. continuous attention


def test_gaussian_expectation_equals_numerical_integration():
    centers, widths = basis_functions(12, (0.03, 0.15), torch.float64)  # the 12 pairs, in order
    mu = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    var = torch.tensor([0.01, 0.0004, 0.09], dtype=torch.float64)
    r = gaussian_expectation(mu, var, torch.linspace(0, 1, 6, dtype=torch.float64),
                             torch.tensor([0.03, 0.15], dtype=torch.float64))  # its 6 centres and 2 widths
    assert r.shape == (3, 12)
    t = torch.linspace(-3, 4, 400_001, dtype=torch.float64)  # the Gaussians are negligible outside
    psi = basis_at(t, centers, widths)  # (T, N)
    for i in range(3):
        p = torch.exp(-((t - mu[i]) ** 2) / (2 * var[i])) / torch.sqrt(2 * math.pi * var[i])
        integral = torch.trapezoid(p[:, None] * psi, t, dim=0)
        torch.testing.assert_close(r[i], integral, rtol=1e-6, atol=1e-9)


def test_gaussian_expectation_gradient_equals_the_integral_of_the_density_derivative():
    """∂E_p[ψ_j]/∂μ = ∫ψ_j p (t − μ)/σ² dt and ∂E_p[ψ_j]/∂σ² = ∫ψ_j p ((t − μ)²/(2σ⁴) − 1/(2σ²)) dt,
    integrated numerically: checks the formula's derivatives, not only autograd's consistency."""
    centers, widths = basis_functions(8, (0.05, 0.2), torch.float64)
    mu = torch.tensor([0.2, 0.7], dtype=torch.float64, requires_grad=True)
    var = torch.tensor([0.01, 0.05], dtype=torch.float64, requires_grad=True)
    grid, w = torch.linspace(0, 1, 4, dtype=torch.float64), torch.tensor([0.05, 0.2], dtype=torch.float64)
    d_mu, d_var = torch.autograd.functional.jacobian(lambda m, v: gaussian_expectation(m, v, grid, w),
                                                     (mu, var))  # each (2, N, 2)
    t = torch.linspace(-3, 4, 200_001, dtype=torch.float64)
    psi = basis_at(t, centers, widths)  # (T, N)
    for i in range(2):
        m, v = mu[i].detach(), var[i].detach()
        p = torch.exp(-((t - m) ** 2) / (2 * v)) / torch.sqrt(2 * math.pi * v)
        ref_mu = torch.trapezoid((p * (t - m) / v)[:, None] * psi, t, dim=0)
        ref_var = torch.trapezoid((p * ((t - m) ** 2 / (2 * v**2) - 1 / (2 * v)))[:, None] * psi, t, dim=0)
        torch.testing.assert_close(d_mu[i, :, i], ref_mu, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(d_var[i, :, i], ref_var, rtol=1e-6, atol=1e-8)


def test_gaussian_kl_equals_numerical_integration():
    """KL(N(μ, σ²) ‖ N(μ, σ₀²)) = ∫ p log(p / q) dt, integrated numerically in float64."""
    var = torch.tensor([1e-4, 0.0025, 0.01, 0.3], dtype=torch.float64)
    kl = gaussian_kl(var, 0.05)
    t = torch.linspace(-4, 5, 400_001, dtype=torch.float64)
    log_q = -((t - 0.5) ** 2) / (2 * 0.05**2) - 0.5 * math.log(2 * math.pi * 0.05**2)
    for v, value in zip(var, kl):
        log_p = -((t - 0.5) ** 2) / (2 * v) - 0.5 * torch.log(2 * math.pi * v)
        assert value.item() == pytest.approx(torch.trapezoid(log_p.exp() * (log_p - log_q), t).item(), rel=1e-6, abs=1e-9)
    assert kl[1].item() == 0.0  # σ = σ₀


def test_continuous_attention_matches_the_papers_formula():
    """The module folds w_μ, w_σ into the coefficients; compare with scores computed the paper's way. It reads
    for the last 3 of 5 queries, and gives every query's μ, σ²."""
    torch.manual_seed(0)
    cfg = Config(d_model=16, n_heads=2, num_basis=8, basis_widths=(0.1, 0.3))
    att = ContinuousAttention(cfg).double()
    q = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    coeffs = torch.randn(3, 8, 16, dtype=torch.float64)
    z, mu, var = att(q, coeffs, 3)
    K = (coeffs @ att.k.weight.T).view(3, 8, 2, 8).transpose(1, 2)  # (B, H, N, dh)
    V = (coeffs @ att.v.weight.T).view(3, 8, 2, 8).transpose(1, 2)
    s = q @ K.transpose(-2, -1) / math.sqrt(8)  # scores, one per basis function  (B, H, T, N)
    w, b = att.w_mu_var.weight, att.w_mu_var.bias
    mu_ref = torch.sigmoid(s @ w[0] + b[0])
    var_ref = torch.nn.functional.softplus(s @ w[1] + b[1]).clamp_min(1e-4)
    torch.testing.assert_close(mu, mu_ref)
    torch.testing.assert_close(var, var_ref)
    c, w = basis_functions(8, (0.1, 0.3), torch.float64)
    r = torch.exp(-((mu_ref[..., None] - c) ** 2) / (2 * (var_ref[..., None] + w**2)))
    r = r / torch.sqrt(2 * math.pi * (var_ref[..., None] + w**2))
    z_ref = (r @ V).transpose(1, 2).reshape(3, 5, 16) @ att.proj.weight.T
    torch.testing.assert_close(z, z_ref[:, -3:])


# ----------------------------------------------------------------------------- 4. unbounded memory


def test_unbounded_memory_keeps_recent_past_sharp_and_old_past_approximate():
    cfg = Config(seg_len=32, num_basis=64, num_samples=64, tau=0.75)
    write = UnboundedMemory(cfg).double()
    signal = lambda u: torch.stack([torch.sin(2 * math.pi * u / 400), torch.cos(2 * math.pi * u / 400)], -1)
    coeffs = torch.zeros(1, 0, 2, dtype=torch.float64)
    chunks = []  # (global times, where that chunk now sits in [0, 1]), tracked independently of the module
    for k in range(40):
        u = torch.arange(32 * k, 32 * (k + 1), dtype=torch.float64)
        new_at = midpoints(32) if k == 0 else midpoints(32, cfg.tau, 1.0)
        coeffs = write(coeffs, signal(u)[None])
        chunks = [(v, cfg.tau * p) for v, p in chunks] + [(u, new_at)]
        assert coeffs.shape == (1, 64, 2)  # the state never grows

    def error(age):
        u, p = chunks[-1 - age]
        x = basis_at(p, write.centers.double(), write.widths.double()) @ coeffs[0]
        return ((x - signal(u)).norm() / signal(u).norm()).item()

    assert error(0) < 0.02 and error(2) < 0.02  # the recent past: sharp
    assert error(5) < 0.05 and error(8) < 0.15  # older: approximately
    assert error(20) > 0.3  # the oldest part has lost its resolution


def test_first_write_spreads_the_vectors_over_the_whole_interval():
    cfg = Config(seg_len=16, num_basis=32, basis_widths=(0.05, 0.2))
    write = UnboundedMemory(cfg).double()
    t = midpoints(16)
    X = torch.stack([torch.sin(2 * math.pi * t), t], -1)[None]
    coeffs = write(torch.zeros(1, 0, 2, dtype=torch.float64), X)
    x_hat = basis_at(t, write.centers.double(), write.widths.double()) @ coeffs[0]
    assert ((x_hat - X[0]).norm() / X.norm()).item() < 0.05


def test_a_short_first_write_takes_only_its_share_of_the_interval():
    """4 of seg_len = 16 vectors sit in the last quarter of [0, 1] and the 12 empty cells before them
    are fitted as zeros: a later full segment must not be outweighed by them. Checked against an
    independent float64 fit of [0; X] at the 16 cell midpoints."""
    cfg = Config(seg_len=16, num_basis=32, basis_widths=(0.05, 0.2))
    write = UnboundedMemory(cfg).double()
    X = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)[None]  # (1, 4, 1)
    coeffs = write(torch.zeros(1, 0, 1, dtype=torch.float64), X)
    c, w = basis_functions(32, cfg.basis_widths, torch.float64)
    t = (torch.arange(16, dtype=torch.float64) + 0.5) / 16
    Ft = basis_at(t, c, w)
    Y = torch.cat([torch.zeros(12, 1, dtype=torch.float64), X[0]])
    expected = torch.linalg.solve(Ft.T @ Ft + cfg.ridge * torch.eye(32, dtype=torch.float64), Ft.T @ Y)
    torch.testing.assert_close(coeffs[0], expected)
    # The empty past stays empty right up to the values: fitted without the zeros, the wide basis
    # functions carried a third of the values' size back to t = 0.5..0.7.
    x_hat = basis_at(torch.linspace(0, 0.7, 15, dtype=torch.float64), c, w) @ coeffs[0]
    assert x_hat.abs().max() < 0.1
    assert abs((basis_at(torch.tensor([0.875], dtype=torch.float64), c, w) @ coeffs[0]).item() - 2.5) < 0.5


def test_a_short_update_takes_only_its_share_of_the_new_timeline():
    """5 of seg_len = 16 new vectors (a stream's short last segment) get (1 − τ)·5/16 of [0, 1], as
    they would in a full segment: the old signal goes to [0, 1 − (1 − τ)·5/16]. A write longer than
    a segment keeps τ. Both against a direct float64 ridge solve."""
    cfg = Config(seg_len=16, num_basis=32, num_samples=24, tau=0.6)
    write = UnboundedMemory(cfg).double()
    c, w = basis_functions(32, cfg.basis_widths, torch.float64)
    s = torch.arange(1, 25, dtype=torch.float64) / 24
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(2, 32, 3, dtype=torch.float64, generator=gen)
    for L, tau in ((5, 1 - 0.4 * 5 / 16), (20, 0.6)):
        X = torch.randn(2, L, 3, dtype=torch.float64, generator=gen)
        t = torch.cat([tau * s, tau + (1 - tau) * (torch.arange(L, dtype=torch.float64) + 0.5) / L])
        Y = torch.cat([basis_at(s, c, w) @ old, X], 1)  # old signal at i/M, then the new vectors
        Ft = basis_at(t, c, w)
        expected = torch.linalg.solve(Ft.T @ Ft + cfg.ridge * torch.eye(32, dtype=torch.float64), Ft.T @ Y)
        torch.testing.assert_close(write(old, X), expected)


# ----------------------------------------------------------------------------- 5. sticky memories


def test_sticky_positions_follow_the_attention_densities():
    torch.manual_seed(0)
    mu = torch.full((2, 3, 50), 0.3)
    mu[1] = 0.8
    var = torch.full((2, 3, 50), 0.03**2)
    s = sticky_positions(mu, var, num_bins=64, num_samples=2000)
    assert s.shape == (2, 2000)
    assert (s >= 0).all() and (s <= 1).all()
    assert (s[:, 1:] >= s[:, :-1]).all()  # sorted
    assert ((s[0] - 0.3).abs() < 0.1).float().mean() > 0.99
    assert ((s[1] - 0.8).abs() < 0.1).float().mean() > 0.99
    assert len(torch.unique(s)) > 1900  # a real offset inside the bins, not bin edges


@pytest.mark.parametrize("uniform", [0.0, 0.3])  # not 0.5: the two shares swapped must fail too
def test_sticky_histogram_matches_brute_force_bin_masses(uniform):
    """The bins' sampling frequencies: the normalised Φ differences, mixed with a share `uniform` of 1/D."""
    torch.manual_seed(1)
    mu = torch.tensor([[[0.2, 0.6], [0.45, 0.9]]], dtype=torch.float64)  # (1, heads, queries)
    var = torch.tensor([[[0.01, 0.002], [0.05, 0.001]]], dtype=torch.float64)
    D, M = 10, 200_000
    s = sticky_positions(mu, var, num_bins=D, num_samples=M, uniform=uniform)
    counts = torch.bincount((s[0] * D).long().clamp_max(D - 1), minlength=D).double() / M
    Phi = lambda x, m, v: 0.5 * (1 + math.erf((x - m) / math.sqrt(2 * v)))
    mass = torch.tensor([sum(Phi((b + 1) / D, m, v) - Phi(b / D, m, v) for m, v in zip(mu.flatten().tolist(),
                                                                                        var.flatten().tolist()))
                         for b in range(D)], dtype=torch.float64)
    torch.testing.assert_close(counts, (1 - uniform) * mass / mass.sum() + uniform / D, atol=4e-3, rtol=0)


def test_sticky_histogram_takes_a_rounding_below_zero_as_an_empty_bin(monkeypatch):
    """The bins' masses are differences of Φ summed over the densities: where the true mass is ~0, two rounded
    sums can differ the wrong way. Simulated here (Φ at the last edge a hair too low, as a vectorised erf's
    scalar tail could give): the bin must get no sample, not a negative weight that multinomial refuses."""
    erf = torch.erf
    monkeypatch.setattr(torch, "erf", lambda z: erf(z) - 1e-4 * (torch.arange(z.size(-1)) == z.size(-1) - 1))
    torch.manual_seed(0)
    s = sticky_positions(torch.full((2, 3, 40), 0.3), torch.full((2, 3, 40), 0.02**2), num_bins=16, num_samples=500)
    assert ((s >= 0) & (s < 15 / 16)).all()


def test_sticky_write_keeps_resolution_where_attention_went():
    """Sticky writes old(s_i) at the slots τ·i/M: with s_i dense where attention went, that region
    survives in fine detail (read back through the warp s_i -> τ·i/M); uniform sampling aliases it."""
    cfg = Config(seg_len=8, num_basis=128, basis_widths=(0.01, 0.03), num_samples=16, sticky_bins=64, tau=0.5)
    write = UnboundedMemory(cfg).double()
    c, w = write.centers.double(), write.widths.double()
    wiggly = torch.sin(2 * math.pi * 12 * midpoints(256))[None, :, None]
    old = write(torch.zeros(1, 0, 1, dtype=torch.float64), wiggly)  # a first write over [0, 1]
    mu = torch.full((1, 2, 8), 0.45, dtype=torch.float64)
    var = torch.full((1, 2, 8), 0.03**2, dtype=torch.float64)
    new = torch.randn(1, 8, 1, dtype=torch.float64)
    # The positions sticky_positions draws, drawn here from the same random stream: a bin from the brute-force
    # histogram of the 16 densities (all N(0.45, 0.03²)), then a uniform offset inside it.
    D = cfg.sticky_bins
    Phi = lambda x: 0.5 * (1 + math.erf((x - 0.45) / (0.03 * math.sqrt(2))))
    mass = torch.tensor([Phi((b + 1) / D) - Phi(b / D) for b in range(D)], dtype=torch.float64)
    torch.manual_seed(0)
    bins = torch.multinomial(mass[None], cfg.num_samples, replacement=True)
    s = ((bins + torch.rand(bins.shape, dtype=torch.float64)) / D).sort(-1).values[0]
    torch.manual_seed(0)
    sticky = write(old, new, sticky_positions(mu, var, cfg.sticky_bins, cfg.num_samples))
    uniform = write(old, new)
    # Reference: the ridge fit of old(s_i) at τ·i/M and the new vectors in (τ, 1], solved directly.
    slots = cfg.tau * torch.arange(1, 17, dtype=torch.float64) / 16
    t = torch.cat([slots, midpoints(8, cfg.tau, 1.0)])
    Y = torch.cat([basis_at(s, c, w) @ old[0], new[0]])
    Ft = basis_at(t, c, w)
    torch.testing.assert_close(sticky[0], torch.linalg.solve(Ft.T @ Ft + torch.eye(128, dtype=torch.float64), Ft.T @ Y))
    region = torch.linspace(0.43, 0.47, 30, dtype=torch.float64)  # where attention went
    truth = basis_at(region, c, w) @ old[0]
    warped = torch.from_numpy(np.interp(region.numpy(), s.numpy(), slots.numpy()))
    err = lambda coeffs, at: ((basis_at(at, c, w) @ coeffs[0] - truth).norm() / truth.norm()).item()
    assert err(sticky, warped) < 0.5 * err(uniform, cfg.tau * region)


# ----------------------------------------------------------------------------- 6. Infini-attention


def elu1_64(x):
    return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))  # σ = ELU + 1, written out


def infini_reference(q, a_dot, mem, k, v, beta):
    """The gate, retrieval and delta-rule update, head by head in float64 numpy."""
    bs, H, T, dh = q.shape
    A, new = np.zeros((bs, H, T, dh)), np.zeros_like(mem)
    for b in range(bs):
        for h in range(H):
            M, z = mem[b, h, :, :dh], mem[b, h, :, dh]
            sq, sk = elu1_64(q[b, h]), elu1_64(k[b, h])
            a_mem = (sq @ M) / (sq @ z)[:, None]  # σ(Q) M / (σ(Q) z)
            g = 1 / (1 + np.exp(-beta[h]))
            A[b, h] = g * a_mem + (1 - g) * a_dot[b, h]
            new[b, h, :, :dh] = M + sk.T @ (v[b, h] - (sk @ M) / (sk @ z)[:, None])
            new[b, h, :, dh] = z + sk.sum(0)
    return A, new


def test_infini_read_and_write_equal_a_per_head_float64_loop():
    gen = torch.Generator().manual_seed(0)
    bs, H, T, n, dh = 2, 3, 5, 7, 4
    q, a_dot = torch.randn(bs, H, T, dh, generator=gen), torch.randn(bs, H, T, dh, generator=gen)
    k, v = torch.randn(bs, H, n, dh, generator=gen), torch.randn(bs, H, n, dh, generator=gen)
    mem = torch.cat([torch.randn(bs, H, dh, dh, generator=gen), torch.rand(bs, H, dh, 1, generator=gen) + 0.5], -1)
    infini = InfiniMemory(Config(d_model=H * dh, n_heads=H))
    with torch.no_grad():
        infini.beta.copy_(torch.tensor([-1.0, 0.3, 2.0]).view(H, 1, 1))
    A_ref, new_ref = infini_reference(*(t.double().numpy() for t in (q, a_dot, mem, k, v)), [-1.0, 0.3, 2.0])
    np.testing.assert_allclose(infini(q, a_dot, mem).detach().numpy(), A_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(infini.write(mem, k, v).numpy(), new_ref, rtol=1e-5, atol=1e-5)


def test_infini_delta_rule_recalls_orthonormal_keys_exactly_and_stores_nothing_twice():
    """Keys whose σ(K) are the unit vectors (σ(0) = 1, σ(−1e4) = 0): after two writes every value comes
    back exactly; writing a pair the memory already recalls leaves M as it was (the plain update,
    M + σ(K)ᵀV, would double it) while z still counts the key."""
    dh = 4
    keys = torch.where(torch.eye(dh, dtype=torch.bool), 0.0, -1e4).view(1, 1, dh, dh)  # σ(keys) = I
    values = torch.randn(1, 1, dh, dh, generator=torch.Generator().manual_seed(0))
    infini = InfiniMemory(Config(d_model=dh, n_heads=1))
    mem = infini.write(torch.zeros(1, 1, dh, dh + 1), keys[:, :, :2], values[:, :, :2])
    mem = infini.write(mem, keys[:, :, 2:], values[:, :, 2:])
    recalled = infformer.retrieve(torch.eye(dh).view(1, 1, dh, dh), mem)
    torch.testing.assert_close(recalled, values, rtol=0, atol=1e-6)
    again = infini.write(mem, keys[:, :, :1], values[:, :, :1])
    torch.testing.assert_close(again[..., :dh], mem[..., :dh], rtol=0, atol=1e-6)
    assert again[0, 0, 0, dh].item() == pytest.approx(2.0)


def test_infini_gate_at_its_limits_is_transformer_xl_or_the_memory_alone():
    """β → −∞: the same outputs as Transformer-XL with the shared weights, over segments that fill and
    read the memory. β → +∞: no local attention is left, so a query no longer sees the tokens
    before it in its own segment (at β = 0 it does)."""
    infini, xl = tiny("infini"), tiny("xl")
    xl.load_state_dict({k: v for k, v in infini.state_dict().items() if ".infini." not in k})
    tokens = torch.randint(0, 23, (2, 40))
    for block in infini.blocks:
        block.infini.beta.data.fill_(-60.0)
    a, memory = run_segments(infini, tokens)
    assert memory.ltm[0][..., -1].sum() > 0  # the memory was written (z > 0) and read
    for x, y in zip(a, run_segments(xl, tokens)[0]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    changed = tokens.clone()
    changed[:, 34] = (changed[:, 34] + 1) % 23  # segment 4, position 2
    for beta, sees_it in ((60.0, False), (0.0, True)):
        for block in infini.blocks:
            block.infini.beta.data.fill_(beta)
        diff = (run_segments(infini, tokens)[0][4] - run_segments(infini, changed)[0][4])[:, 3:].abs().amax()
        assert (diff > 1e-4) == sees_it


def test_infini_memory_stays_float32_in_a_bfloat16_model():
    """Under model.bfloat16() the [M z] update runs in float32: recomputed in float64 from the bf16 keys
    and values the write received, it agrees to float32 precision (bf16 arithmetic: about 1e-2)."""
    model = tiny("infini").bfloat16()
    writes = []
    write = InfiniMemory.write
    def recording(self, mem, k, v, keep=None):
        new = write(self, mem, k, v, keep)
        writes.append((mem, k, v, new))
        return new
    InfiniMemory.write = recording
    try:
        _, memory = run_segments(model, torch.randint(0, 23, (2, 40)))
    finally:
        InfiniMemory.write = write
    assert memory.ltm[0].dtype == torch.float32 and len(writes) == 2 * 4
    mem, k, v, new = writes[-1]
    assert k.dtype == torch.bfloat16
    q = torch.zeros(*k.shape[:2], 1, k.size(-1))  # the read is not checked here
    _, new_ref = infini_reference(*(t.double().numpy() for t in (q, q, mem, k, v)), [0.0] * k.size(1))
    np.testing.assert_allclose(new.numpy(), new_ref, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- 7. the model


def tiny(memory, **kw):
    base = dict(vocab_size=23, d_model=32, n_layers=2, n_heads=4, d_ff=64, seg_len=8, mem_len=8, memory=memory,
                num_basis=16, basis_widths=(0.05, 0.2), num_samples=16, sticky_bins=16, cmem_len=8, compress_rate=2)
    base.update(kw)
    torch.manual_seed(0)
    return InfFormer(Config(**base)).eval()


def run_segments(model, tokens, seed=0):
    torch.manual_seed(seed)  # sticky sampling draws random numbers: same draws for compared runs
    memory, outs = model.init_memory(tokens.size(0)), []
    with torch.no_grad():
        for seg in tokens.split(model.cfg.seg_len, dim=1):
            out, memory, _ = model(seg, memory)
            outs.append(out)
    return outs, memory


def give_ltm_weights(model):
    """Untrained, the LTM's output projection is zero (it reads nothing): give it weights."""
    for block in model.blocks:
        if block.read_ltm is not None:
            torch.nn.init.normal_(block.read_ltm.proj.weight, std=0.02)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_causal_inside_a_segment(kind):
    """A change at position 5 of segment 3 (when every memory is full and read) changes nothing
    before it: neither the short-term window nor the LTM may see the current segment's future."""
    model = give_ltm_weights(tiny(kind))
    tokens = torch.randint(0, 23, (2, 32))
    a, memory = run_segments(model, tokens[:, :24])
    assert kind not in ("infinite", "sticky") or memory.ltm[0].size(1) == 16  # segment 3 reads a full LTM
    a, _ = run_segments(model, tokens)
    tokens[:, 24 + 5] = (tokens[:, 24 + 5] + 1) % 23
    b, _ = run_segments(model, tokens)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    torch.testing.assert_close(a[3][:, :5], b[3][:, :5], rtol=0, atol=1e-6)
    assert (a[3][:, 5:] - b[3][:, 5:]).abs().amax() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_memory_reach(kind):
    """A change in the first segment: xl forgets it exactly after n_layers segments, compressive
    once its compressed memory has moved on, the long-term memory does not."""
    model = give_ltm_weights(tiny(kind))
    tokens = torch.randint(0, 23, (2, 8 * 12))
    a, _ = run_segments(model, tokens)
    tokens[:, :8] = (tokens[:, :8] + 1) % 23
    b, _ = run_segments(model, tokens)
    # Layer l at segment k sees layer l-1 at segments k-1 and k, so segment 0 reaches segment n_layers.
    assert (a[2] - b[2]).abs().amax() > 1e-4
    if kind == "xl":
        for k in range(3, 12):
            assert torch.equal(a[k], b[k])
    elif kind == "compressive":  # 8 slots at rate 2 hold two segments of evicted states
        assert (a[3] - b[3]).abs().amax() > 1e-4
        assert torch.equal(a[11], b[11])
    else:  # the old signal's share shrinks by τ at every write, but never reaches zero
        assert (a[11] - b[11]).abs().amax() > 1e-5  # float32 rounding alone stays near 1e-7


def test_untrained_ltm_densities_lie_inside_the_memory():
    """Before training, every read's N(μ, σ²) must put most of its mass inside [0, 1], where the
    memory is (σ ≈ 0.83 from softplus(0) would leave half of it outside)."""
    model = give_ltm_weights(tiny("infinite"))
    reads = []
    model.blocks[1].read_ltm.register_forward_hook(lambda m, i, out: reads.append(out[1:]))
    run_segments(model, torch.randint(0, 23, (4, 32)))
    mu, var = (t.double() for t in reads[-1])
    inside = 0.5 * (torch.erf((1 - mu) / torch.sqrt(2 * var)) - torch.erf((0 - mu) / torch.sqrt(2 * var)))
    assert inside.min() > 0.9


def test_untrained_infformer_computes_exactly_what_transformer_xl_computes():
    """Z_LTM starts at zero (its output projection is zero-initialised), so before training the
    ∞-former and Transformer-XL with the same weights give identical outputs."""
    infinite, xl = tiny("infinite"), tiny("xl")
    xl.load_state_dict({k: v for k, v in infinite.state_dict().items() if ".read_ltm." not in k})
    tokens = torch.randint(0, 23, (2, 48))
    a, memory = run_segments(infinite, tokens)
    b, _ = run_segments(xl, tokens)
    assert memory.ltm[0].shape[1] == 16  # the LTM was written and read
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def concentrate_reads(model, mu, sigma):
    """Every LTM read's density becomes N(mu, sigma²), whatever the query (w_μ = w_σ = 0, biases set)."""
    with torch.no_grad():
        for block in model.blocks:
            if block.read_ltm is not None:
                block.read_ltm.w_mu_var.weight.zero_()
                block.read_ltm.w_mu_var.bias.copy_(torch.tensor([math.log(mu / (1 - mu)), math.log(math.expm1(sigma**2))]))
    return model


@pytest.mark.parametrize("uniform", [0.0, 0.5])
def test_sticky_writes_sample_the_old_signal_where_the_model_read(monkeypatch, uniform):
    """With the same weights and every read concentrated on N(0.2, 0.02²), sticky and infinite must
    compute different outputs once the LTM has been rewritten, and the positions of sticky's writes
    must follow those densities: against the brute-force bin masses of N(0.2, 0.02²), with Config's
    sticky_uniform share of them drawn uniformly."""
    sticky = concentrate_reads(give_ltm_weights(tiny("sticky", num_samples=256, sticky_uniform=uniform)), 0.2, 0.02)
    infinite = tiny("infinite", num_samples=256)
    infinite.load_state_dict(sticky.state_dict())
    drawn = []
    original = infformer.sticky_positions
    monkeypatch.setattr(infformer, "sticky_positions", lambda *a: drawn.append(original(*a)) or drawn[-1])
    tokens = torch.randint(0, 23, (2, 48))
    a, _ = run_segments(sticky, tokens)
    b, _ = run_segments(infinite, tokens)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))  # the same until an LTM is rewritten
    assert (a[-1] - b[-1]).abs().amax() > 1e-3
    # Segments 2-5 (from 0) each rewrite both layers' LTM from the reads of that segment.
    assert len(drawn) == 8 and all(d.shape == (2, 256) for d in drawn)
    D = 16
    counts = torch.bincount((torch.cat(drawn).flatten() * D).long().clamp_max(D - 1), minlength=D).double()
    Phi = lambda x: 0.5 * (1 + math.erf((x - 0.2) / (0.02 * math.sqrt(2))))
    mass = torch.tensor([Phi((k + 1) / D) - Phi(k / D) for k in range(D)], dtype=torch.float64)
    torch.testing.assert_close(counts / counts.sum(), (1 - uniform) * mass / mass.sum() + uniform / D, atol=0.03, rtol=0)


def test_the_kl_term_is_the_weighted_mean_kl_of_every_read():
    """kl = kl_weight · mean over layers of the mean KL(N(μ, σ²) ‖ N(μ, σ₀²)) over heads and queries,
    recomputed here from the σ² of every read: ½ (σ²/σ₀² − log(σ²/σ₀²) − 1)."""
    model = concentrate_reads(give_ltm_weights(tiny("infinite", kl_weight=0.5)), 0.5, 0.2)
    variances = []
    for block in model.blocks:
        block.read_ltm.register_forward_hook(lambda m, i, out: variances.append(out[2].double()))
    memory = model.init_memory(2)
    for _ in range(3):
        _, memory, kl = model(torch.randint(0, 23, (2, 8)), memory)
    assert len(variances) == 2  # segment 3 is the first to read
    r = [v / 0.05**2 for v in variances]
    expected = 0.5 * sum((0.5 * (x - torch.log(x) - 1)).mean() for x in r) / 2
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() > 1  # σ = 0.2 is far from σ₀ = 0.05


@pytest.mark.parametrize("d_model,n_heads", [(32, 4), (30, 2)])  # head sizes 8 and 15 (odd: RoPE leaves one channel)
def test_xl_in_segments_equals_the_whole_sequence_at_once(d_model, n_heads):
    model = tiny("xl", mem_len=48, d_model=d_model, n_heads=n_heads)
    tokens = torch.randint(0, 23, (3, 48))
    outs, _ = run_segments(model, tokens)
    with torch.no_grad():
        whole, _, _ = model(tokens, model.init_memory(3))
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-5, atol=1e-5)


def test_memory_state_is_bounded_detached_and_the_ltm_is_n_by_d():
    for kind in KINDS:
        model = tiny(kind).train()
        memory = model.init_memory(2)
        for _ in range(6):
            _, memory, _ = model(torch.randint(0, 23, (2, 8)), memory)
        for stm, cmem, ltm in zip(memory.stm, memory.cmem, memory.ltm):
            assert stm.shape == (2, 8, 32) and not stm.requires_grad
            assert cmem.shape == ((2, 8, 32) if kind == "compressive" else (2, 0, 32)) and not cmem.requires_grad
            shape = {"infinite": (2, 16, 32), "sticky": (2, 16, 32), "infini": (2, 4, 8, 9)}.get(kind, (2, 0, 32))
            assert ltm.shape == shape
            assert not ltm.requires_grad


def test_compressed_memory_is_the_mean_of_evicted_states():
    model = tiny("compressive", cmem_len=6, compress_rate=4)
    tokens = torch.randint(0, 23, (2, 40))
    _, memory = run_segments(model, tokens)
    # Recompute every layer-0 input directly: the embeddings of all 40 tokens (dropout is off).
    x0 = model.tok_emb(tokens).detach()
    evicted = x0[:, :32]  # everything but the last mem_len = 8
    pooled = evicted.view(2, 8, 4, 32).mean(2)  # 8 slots of 4 states; the memory keeps the last 6
    torch.testing.assert_close(memory.cmem[0], pooled[:, -6:])
    torch.testing.assert_close(memory.stm[0], x0[:, 32:])


def test_the_ltm_holds_the_ridge_fit_of_the_normalised_evicted_inputs():
    """After two segments, the first one has fallen out of the STM: layer 0's LTM must be the
    float64 ridge fit (F Fᵀ + λI)⁻¹ F X of those layer inputs, layer-normalised."""
    model = tiny("infinite")
    with torch.no_grad():  # give the LayerNorm a gain and bias, so that its use is visible
        model.blocks[0].ln1.weight.uniform_(0.5, 1.5), model.blocks[0].ln1.bias.uniform_(-0.5, 0.5)
    tokens = torch.randint(0, 23, (2, 16))
    _, memory = run_segments(model, tokens)
    x = model.tok_emb(tokens[:, :8]).detach().double().numpy()  # layer 0's inputs: the embeddings
    g, b = (p.detach().double().numpy() for p in (model.blocks[0].ln1.weight, model.blocks[0].ln1.bias))
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b
    c, w = (np.linspace(0, 1, 8).repeat(2), np.tile([0.05, 0.2], 8))  # 8 centres × 2 widths
    t = (np.arange(8) + 0.5) / 8
    F = np.exp(-0.5 * ((t[None] - c[:, None]) / w[:, None]) ** 2) / (w[:, None] * np.sqrt(2 * np.pi))  # (N, L)
    expected = np.linalg.solve(F @ F.T + np.eye(16), F @ x)  # (2, N, d)
    np.testing.assert_allclose(memory.ltm[0].numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["xl", "compressive", "infinite", "sticky"])
def test_long_range_memories_learn_what_xl_cannot_reach(kind):
    """Four sequences differ only in segment 0; segment 3 must name which one it is. Segment 0 is
    beyond Transformer-XL's reach (n_layers = 2 segments), so XL stays at the prior, ln 4; the
    compressed memory and the LTM (its read learned from a zero start) still hold it. (Infini-attention
    stores keys and values already projected, and no gradient crosses a segment, so from initial
    weights its memory holds near-equal averages here and it stays at ln 4 too: its reach is
    test_memory_reach's.)"""
    model = tiny(kind).train()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.cat([torch.randint(0, 23, (4, 8), generator=gen),
                        torch.randint(0, 23, (1, 24), generator=gen).expand(4, 24)], 1)
    labels = torch.arange(4).repeat_interleave(8)  # every position of segment 3: its sequence's number
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        memory = model.init_memory(4)
        with torch.no_grad():  # segments 0-2 only fill the memories
            for i in range(3):
                _, memory, _ = model(tokens[:, 8 * i:8 * i + 8], memory)
        logits, _, kl = model(tokens[:, 24:], memory)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels)
        opt.zero_grad()
        (loss + kl).backward()
        opt.step()
    if kind == "xl":
        assert loss.item() > math.log(4) - 0.01
    else:
        assert loss.item() < 0.05


def test_hidden_state_output_for_an_own_head_is_the_final_layer_norm():
    """With lm_head=False the output is what the built-in head reads: the last block's output
    layer-normalised (recomputed here from the final LayerNorm's input), so that an own head on it
    gives the built-in logits."""
    with_head, own = tiny("infinite"), tiny("infinite", lm_head=False)
    with torch.no_grad():
        with_head.ln_f.weight.uniform_(0.5, 1.5), with_head.ln_f.bias.uniform_(-0.5, 0.5)
    own.load_state_dict({k: v for k, v in with_head.state_dict().items() if not k.startswith("head.")})
    last_block = []
    own.blocks[-1].register_forward_hook(lambda m, i, out: last_block.append(out[0].double()))
    tokens = torch.randint(0, 23, (2, 24))
    hidden, logits = run_segments(own, tokens)[0][-1], run_segments(with_head, tokens)[0][-1]
    assert hidden.shape == (2, 8, 32) and own.head is None
    x = last_block[-1]
    normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(hidden.double(), normed * own.ln_f.weight.double() + own.ln_f.bias.double(),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden @ with_head.head.weight.T, logits)


def test_ltm_math_stays_float32_under_bf16_autocast():
    model = tiny("sticky")
    memory = model.init_memory(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            out, memory, kl = model(torch.randint(0, 23, (2, 8)), memory)
        q = torch.randn(2, 4, 8, 8)
        z, mu, var = model.blocks[0].read_ltm(q, memory.ltm[0], q.size(2))
    assert out.dtype == torch.bfloat16  # the rest runs in bf16
    assert all(t.dtype == torch.float32 for t in memory.ltm) and mu.dtype == var.dtype == torch.float32
    assert torch.isfinite(kl)


def test_a_bf16_model_keeps_the_method_constants_and_the_fit_in_float32():
    """model.bfloat16() must not round the basis, the ridge matrices or the RoPE frequencies:
    the LTM written by a bf16 model is the float32 fit of its (bf16) inputs."""
    model = tiny("sticky").bfloat16()
    assert all(buf.dtype == torch.float32 for _, buf in model.named_buffers())
    x = torch.randn(2, 8, 32).bfloat16()
    coeffs = model.write_ltm(torch.zeros(2, 0, 32), x)
    c, w = basis_functions(16, (0.05, 0.2), torch.float64)
    F = basis_at(midpoints(8), c, w).T  # (N, L)
    expected = torch.linalg.solve(F @ F.T + torch.eye(16, dtype=torch.float64), F @ x.double())
    assert ((coeffs.double() - expected).norm() / expected.norm()).item() < 1e-5  # a bf16 fit is off by ~1e-2
    outs, memory = run_segments(model, torch.randint(0, 23, (2, 32)))
    assert outs[-1].dtype == torch.bfloat16 and torch.isfinite(outs[-1].float()).all()
    assert memory.ltm[0].dtype == torch.float32
    assert tiny("infinite").double().write_ltm.G_first.dtype == torch.float64  # .double() still upgrades


def test_a_memory_for_another_batch_size_is_refused_clearly():
    model = tiny("infinite")
    with pytest.raises(ValueError, match=r"holds 2 streams but tokens has 3.*init_memory\(3\)"):
        model(torch.randint(0, 23, (3, 8)), model.init_memory(2))


def test_memory_moves_and_saves():
    model = tiny("infinite")
    _, memory = run_segments(model, torch.randint(0, 23, (2, 24)))
    moved = memory.to(torch.float64)
    assert isinstance(moved, Memory) and moved.ltm[0].dtype == torch.float64
    buf = io.BytesIO()
    torch.save(memory, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only by default: Memory is an allowed global
    assert all(torch.equal(a, b) for a, b in zip(loaded.ltm + loaded.stm, memory.ltm + memory.stm))


def segments_after(model, memory, tokens, seed):
    torch.manual_seed(seed)
    outs = []
    with torch.no_grad():
        for seg in tokens.split(model.cfg.seg_len, dim=1):
            out, memory, _ = model(seg, memory)
            outs.append(out)
    return torch.stack(outs), memory


@pytest.mark.parametrize("kind", KINDS)
def test_a_reset_stream_starts_afresh_and_the_others_go_on_untouched(kind, monkeypatch):
    """Three streams run 4 segments (STM, compressed memory and LTM full, the LTM read), then stream 1
    is reset (the memory saved, loaded and moved on the way) and all run 5 more. Stream 1 must give
    what a fresh single-stream run of its new tokens gives; streams 0 and 2 exactly what they give
    without the reset. Sticky's draws are per stream (torch.multinomial draws M numbers for each row in
    turn), so the other streams are bit-identical too; the fresh run draws other numbers than stream 1
    of the batch, so for that comparison sticky's positions are made deterministic: a stream's own
    sorted μ, which still depend on its own reads only."""
    model = give_ltm_weights(tiny(kind))
    with torch.no_grad():  # a LayerNorm bias: a zeroed state, layer-normalised, is not zero
        for block in model.blocks:
            block.ln1.bias.uniform_(-0.5, 0.5)
    before, after = torch.randint(0, 23, (3, 32)), torch.randint(0, 23, (3, 40))
    _, memory = run_segments(model, before)
    assert kind not in ("infinite", "sticky") or (memory.ltm[0].size(1) == 16 and memory.ltm[0].abs().sum() > 0)
    reset = model.reset_memory(memory, torch.tensor([False, True, False]))
    buf = io.BytesIO()
    torch.save(reset, buf)
    buf.seek(0)
    reset = torch.load(buf, weights_only=True).to(torch.float64).to(torch.float32)
    assert reset.seen.dtype == torch.long
    a, _ = segments_after(model, reset, after, seed=1)
    b, _ = segments_after(model, memory, after, seed=1)
    assert torch.equal(a[:, [0, 2]], b[:, [0, 2]])
    assert (a[:, 1] - b[:, 1]).abs().amax() > 1e-3
    monkeypatch.setattr(infformer, "sticky_positions", lambda mu, var, *_: mu.flatten(1).sort(-1).values[:, ::2])
    a, _ = segments_after(model, reset, after, seed=1)
    fresh, _ = segments_after(model, model.init_memory(1), after[1:2], seed=1)
    torch.testing.assert_close(a[:, 1], fresh[:, 0], rtol=1e-5, atol=1e-5)


def test_a_reset_stream_adds_no_kl_term_until_its_ltm_is_written():
    """Right after the reset, stream 1's LTM is empty: as in its own fresh run, its reads (of zeros) add
    nothing; the KL term is kl_weight · mean over layers of Σ_{streams 0, 2} KL / (bs·H·T), recomputed
    from the σ² of every read as ½ (σ²/σ₀² − log(σ²/σ₀²) − 1)."""
    model = concentrate_reads(give_ltm_weights(tiny("infinite", kl_weight=0.5)), 0.5, 0.2)
    _, memory = run_segments(model, torch.randint(0, 23, (3, 32)))
    variances = []
    for block in model.blocks:
        block.read_ltm.register_forward_hook(lambda m, i, out: variances.append(out[2].double()))
    _, _, kl = model(torch.randint(0, 23, (3, 8)), model.reset_memory(memory, torch.tensor([False, True, False])))
    per_layer = [0.5 * (v / 0.05**2 - torch.log(v / 0.05**2) - 1) for v in variances]
    expected = 0.5 * sum(k[[0, 2]].sum() / k.numel() for k in per_layer) / 2
    assert len(variances) == 2 and kl.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_of_the_last_positions_only_give_those_and_the_memory_of_a_full_forward(kind):
    """outputs=n (train_sort: 0 before the answers, 20 at them) computes the last layer for the last n queries only.
    It must give the full forward's last n outputs (float tolerance: other matrix shapes), and write the same
    memory to the bit, with the same KL term and sticky's same draws: over a short first chunk, the STM and every
    memory filling, then full, and one stream reset on the way."""
    model = give_ltm_weights(tiny(kind))
    chunks = torch.randint(0, 23, (3, 3 + 8 * 6)).split([3] + [8] * 6, dim=1)
    runs = {}
    for outputs in (None, 0, 5):
        torch.manual_seed(0)
        memory, outs, kls = model.init_memory(3), [], []
        with torch.no_grad():
            for i, chunk in enumerate(chunks):
                memory = model.reset_memory(memory, torch.tensor([False, True, False])) if i == 4 else memory
                out, memory, kl = model(chunk, memory, outputs=outputs)
                outs.append(out)
                kls.append(kl)
        runs[outputs] = memory, outs, torch.stack(kls)
    full, outs, kls = runs[None]
    assert kind not in ("infinite", "sticky") or full.ltm[1].abs().sum() > 0  # the top layer's LTM was written
    assert (kls[-1] > 0) == (kind in ("infinite", "sticky"))  # the reads' KL, the last layer's included
    for outputs, (memory, out, kl) in runs.items():
        for a, b in zip(full.stm + full.cmem + full.ltm + [full.seen], memory.stm + memory.cmem + memory.ltm + [memory.seen]):
            assert torch.equal(a, b)
        assert torch.equal(kl, kls)
    assert all(o is None for o in runs[0][1])
    for full_out, last in zip(outs, runs[5][1]):  # the 3-token first chunk: all 3
        torch.testing.assert_close(last, full_out[:, -5:], rtol=1e-5, atol=1e-5)


def test_reset_memory_refuses_a_bad_done_clearly():
    model = tiny("infinite")
    with pytest.raises(ValueError, match=r"done must be a \(2,\) bool tensor"):
        model.reset_memory(model.init_memory(2), torch.tensor([1, 0]))


@pytest.mark.parametrize("field,value", [("memory", "lstm"), ("tau", 0.0), ("tau", 1.0), ("num_basis", 1),
                                         ("num_basis", 7), ("basis_widths", (0.1, -0.1)), ("ridge", 0.0),
                                         ("ridge", -1.0), ("d_model", 30), ("mem_len", -1), ("seg_len", 0),
                                         ("sticky_uniform", -0.1), ("sticky_uniform", 1.5)])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})


# ----------------------------------------------------------------------------- train_sort.py

import collections  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import train_sort  # noqa: E402
import train_lm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test_streams_drift_from_p_init_to_p_final():
    streams, p_init, p_final = train_sort.sample_streams(4, 20_000, torch.Generator().manual_seed(0))
    assert streams.shape == (4, 20_000) and 0 <= streams.min() and streams.max() < 20
    freq = lambda part: torch.stack([torch.bincount(s, minlength=20) / len(s) for s in part])
    start, end = freq(streams[:, :1000]), freq(streams[:, -1000:])
    # The first 5% are drawn from ≈ p_init, the last 5% from ≈ p_final.
    assert ((start - p_init).abs().sum(1) < (start - p_final).abs().sum(1)).all()
    assert ((end - p_final).abs().sum(1) < (end - p_init).abs().sum(1)).all()
    # The mixture weight grows linearly, so the whole sequence averages the two.
    torch.testing.assert_close(freq(streams), (p_init + p_final) / 2, atol=0.015, rtol=0)
    for p in (p_init, p_final):  # integers 1..9, normalised: ratios of at most 9
        assert (p.amax(1) / p.amin(1) <= 9 + 1e-5).all()


def brute_force_order(stream):
    counts = collections.Counter(stream)
    seen = sorted(counts, key=lambda s: (-counts[s], stream.index(s)))
    return seen + [s for s in range(20) if s not in counts]


def test_sort_targets_match_a_brute_force_reference():
    gen = torch.Generator().manual_seed(0)
    for length in (1, 7, 15, 40, 300):  # short streams: many ties and unseen symbols
        streams, _, _ = train_sort.sample_streams(16, length, gen)
        targets = train_sort.sort_targets(streams)
        for stream, target in zip(streams.tolist(), targets.tolist()):
            assert target == brute_force_order(stream)


def test_batch_layout_and_segments():
    inputs, targets = train_sort.make_batch(3, 50, torch.Generator().manual_seed(0))
    assert inputs.shape == (3, 70) and targets.shape == (3, 20)
    assert (inputs[:, :50] < 20).all() and (inputs[:, 50] == train_sort.SEP).all()
    assert torch.equal(inputs[:, 51:], train_sort.ANSWER + targets[:, :19])  # the answer, teacher-forced
    chunks = train_sort.segments(inputs, 32)
    assert [c.size(1) for c in chunks] == [6, 32, 32] and torch.equal(torch.cat(chunks, 1), inputs)
    for length, sizes in ((120, [120]), (21, [21]), (128, [128]), (256, [128, 128])):  # short: one segment
        assert [c.size(1) for c in train_sort.segments(torch.zeros(2, length), 128)] == sizes


def test_target_logits_are_the_last_twenty_positions():
    """Segment by segment with memory equals the whole sequence at once (xl, memory >= length):
    so the logits scored are exactly those at the 20 answer positions."""
    cfg = Config(vocab_size=train_sort.VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, seg_len=32, mem_len=128,
                 memory="xl")
    torch.manual_seed(0)
    model = train_sort.make_model(cfg).eval()
    inputs, _ = train_sort.make_batch(2, 70, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, kl = train_sort.target_logits(model, inputs, 32, torch.autocast("cpu", enabled=False))
        whole, _, _ = model(inputs, model.init_memory(2))
    torch.testing.assert_close(logits, whole[:, 70:90], rtol=1e-5, atol=1e-5)


class SortOracle(torch.nn.Module):
    """A stand-in model that remembers every token it was fed (its memory) and, from the separator
    on, puts all its logit mass on the brute-force answer of the stream it has seen."""

    def __init__(self, carry=True):
        super().__init__()
        self.carry = carry

    def forward(self, tokens, memory, commit=True, outputs=None):  # InfFormer's signature; commit is ignored
        seen = tokens if memory is None or not self.carry else torch.cat([memory, tokens], 1)
        logits = torch.zeros(*tokens.shape, train_sort.VOCAB)
        offset = seen.size(1) - tokens.size(1)
        for b, row in enumerate(seen.tolist()):
            if train_sort.SEP in row:
                sep = row.index(train_sort.SEP)
                for i, symbol in enumerate(brute_force_order(row[:sep])):
                    if 0 <= sep + i - offset < tokens.size(1):
                        logits[b, sep + i - offset, symbol] = 1.0
        return None if outputs == 0 else logits[:, -(outputs or tokens.size(1)):], seen, torch.zeros(())


def test_evaluate_scores_the_twenty_answers_over_every_segment():
    args = train_sort.parse_args(["--batch-size", "3", "--seq-len", "100"])
    args.seg_len = 32
    inputs, targets = train_sort.make_batch(7, 100, torch.Generator().manual_seed(0))
    no_autocast = torch.autocast("cpu", enabled=False)
    assert train_sort.evaluate(SortOracle(), inputs, targets, args, no_autocast) == 1.0
    # Sanity: the same oracle without the earlier segments answers worse.
    assert train_sort.evaluate(SortOracle(carry=False), inputs, targets, args, no_autocast) < 0.9


def test_ltm_diagnostics_read_the_answer_positions():
    """μ and σ in the diagnostics are the means over the 20 answer queries of the last segment, as the LTM read
    itself (recorded by a hook) gave them; ltm_use is the accuracy lost with every LTM output projection zeroed
    (an independent way to remove Z_LTM), each computed here on its own."""
    cfg = Config(vocab_size=train_sort.VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, seg_len=32, mem_len=32,
                 num_basis=16, basis_widths=(0.05, 0.2), num_samples=16, memory="infinite")
    torch.manual_seed(3)
    model = train_sort.make_model(cfg)
    with torch.no_grad():  # answers that depend on the reads
        model.head.weight.normal_(0, 1)
        for block in model.blocks:  # and reads whose μ, σ differ from query to query
            block.read_ltm.proj.weight.normal_(0, 1)
            block.read_ltm.w_mu_var.weight.normal_(0, 300)
    reads = []
    hook = model.blocks[1].read_ltm.register_forward_hook(lambda m, i, out: reads.append(out))
    inputs, targets = train_sort.make_batch(8, 100, torch.Generator().manual_seed(0))
    args = train_sort.parse_args(["--device", "cpu"])
    args.seg_len = 32
    no_autocast = torch.autocast("cpu", enabled=False)
    diag = train_sort.ltm_diagnostics(model, inputs, targets, args, no_autocast)
    hook.remove()
    _, mu_ref, var_ref = reads[len(reads) // 2 - 1]  # the last read of the first (unablated) pass
    assert diag["mu"][1] == round(mu_ref[..., -20:].mean().item(), 3)
    assert diag["sigma"][1] == round(var_ref[..., -20:].sqrt().mean().item(), 3)
    accuracy = lambda: (train_sort.target_logits(model, inputs, 32, no_autocast)[0].argmax(-1) == targets).float().mean()
    full = accuracy().item()
    with torch.no_grad():
        for block in model.blocks:
            block.read_ltm.proj.weight.zero_()
    assert diag["ltm_use"] == round(full - accuracy().item(), 4) != 0 and diag["accuracy"] == round(full, 4)


def test_count_ranking_reference_matches_brute_force():
    inputs, targets = train_sort.make_batch(32, 300, torch.Generator().manual_seed(0))
    for window in (50, 300):
        correct = 0
        for row, target in zip(inputs[:, :300].tolist(), targets.tolist()):
            order = brute_force_order(row[-window:])
            correct += sum(next(s for s in order if s not in target[:k]) == target[k] for k in range(20))
        assert train_sort.count_ranking_accuracy(inputs, targets, window) == correct / targets.numel()
    assert train_sort.count_ranking_accuracy(inputs, targets, 300) == 1.0  # all the counts give the answer


def test_train_sort_sweeps_lengths_and_seeds_and_continues_where_it_stopped(tmp_path, capsys):
    """Every (memory, S, seed) is one row of results.json, with its own budget; rerun with one more
    length, the finished runs are reused. S = 1 and S = 100 (shorter than a segment) run."""
    argv = ["--steps", "1", "--seeds", "0", "1", "--batch-size", "2", "--eval-size", "2",
            "--memory", "all", "xl-stm", "--out", str(tmp_path), "--log-seconds", "0", "--jobs", "1"]
    train_sort.main(argv + ["--seq-len", "1", "100"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted((r["memory"], r["seq_len"], r["seed"]) for r in results) == sorted(
        (k, s, seed) for k in KINDS + ["xl-stm"] for s in (1, 100) for seed in (0, 1))
    for r in results:
        assert (r["config"]["seq_len"], r["config"]["seed"]) == (r["seq_len"], r["seed"])
        assert {"memory", "budget", "test_accuracy", "valid_accuracy", "tokens_per_second", "peak_memory_mb",
                "minutes", "config"} <= set(r)
    cfg = {r["memory"]: r["config"] for r in results}  # equal budgets: xl's STM = STM + N = STM + cmem_len
    assert cfg["xl"]["mem_len"] == cfg["infinite"]["mem_len"] + cfg["infinite"]["num_basis"]
    assert cfg["xl-stm"]["mem_len"] == cfg["infinite"]["mem_len"] and cfg["xl-stm"]["memory"] == "xl"
    assert cfg["compressive"]["cmem_len"] == cfg["infinite"]["num_basis"]
    out = capsys.readouterr().out
    assert "S = 1 (" in out and "S = 100 (" in out and f"| xl-stm | STM {cfg['infinite']['mem_len']} | 2 |" in out
    train_sort.main(argv + ["--seq-len", "1", "100", "40"])
    again = json.loads((tmp_path / "results.json").read_text())
    assert [r for r in again if r["seq_len"] != 40] == results and len(again) == len(results) + 2 * (len(KINDS) + 1)
    assert capsys.readouterr().out.count("done before") == len(results)


def test_sort_diagnostics_leave_the_training_alone(tmp_path, monkeypatch):
    """Sticky sampling draws random numbers: the diagnostics' forward passes must not shift the
    training's random stream, so step 4 looks the same however often they ran before it."""
    diags = []
    for every in (1, 4):
        monkeypatch.setattr(train_sort, "DIAG_EVERY", every)
        train_sort.main(["--memory", "sticky", "--steps", "4", "--seq-len", "400", "--batch-size", "2",
                         "--eval-size", "2", "--out", str(tmp_path / str(every)), "--log-seconds", "9"])
        diags.append(json.loads((tmp_path / str(every) / "results.json").read_text())[0]["ltm_diagnostics"])
    assert len(diags[0]) == 4 and diags[0][-1] == diags[1][-1]


def test_a_damaged_results_file_stops_the_run_and_is_kept(tmp_path, capsys):
    damaged = '[{"memory": "xl", "seq_len": 1, "seed": 0, "test_accuracy": 0.5, "config": {}},]'
    (tmp_path / "results.json").write_text(damaged)
    with pytest.raises(SystemExit) as e:
        train_sort.main(["--memory", "xl", "--steps", "1", "--seq-len", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and str(tmp_path / "results.json") in err
    assert (tmp_path / "results.json").read_text() == damaged


def test_a_finished_run_is_reused_only_with_the_same_eval_size_and_code(tmp_path, monkeypatch, capsys):
    argv = ["--memory", "xl", "--steps", "1", "--seq-len", "1", "--batch-size", "2", "--out", str(tmp_path)]
    runs = lambda *extra: (train_sort.main(argv + list(extra)), capsys.readouterr().out.count("done before"))[1]
    assert runs("--eval-size", "2") == 0
    assert runs("--eval-size", "2") == 1
    assert runs("--eval-size", "3") == 0  # another eval size: measured again
    code = hashlib.sha256(b"".join(open(os.path.join(HERE, f), "rb").read() for f in ("infformer.py", "train_sort.py")))
    assert json.loads((tmp_path / "results.json").read_text())[0]["config"]["code"] == code.hexdigest()[:16]
    monkeypatch.setattr(train_sort, "code_fingerprint", lambda: "edited")
    assert runs("--eval-size", "3") == 0  # other code: measured again
    assert len(json.loads((tmp_path / "results.json").read_text())) == 1


def test_train_sort_evaluates_on_held_out_sequences(tmp_path, monkeypatch):
    """valid_accuracy and test_accuracy are measured on the sequences of the held-out seeds 4·seed + 3
    and 4·seed + 1, none of which training saw; the test accuracy reported is the one on the test set."""
    trained, evaluated = [], []
    target_logits, evaluate = train_sort.target_logits, train_sort.evaluate

    def record_training(model, inputs, *a):
        if torch.is_grad_enabled():
            trained.append(inputs.clone())
        return target_logits(model, inputs, *a)

    def record_evaluation(model, inputs, targets, *a):
        evaluated.append((inputs, targets, evaluate(model, inputs, targets, *a)))
        return evaluated[-1][2]

    monkeypatch.setattr(train_sort, "target_logits", record_training)
    monkeypatch.setattr(train_sort, "evaluate", record_evaluation)
    train_sort.main(["--memory", "xl", "--steps", "3", "--seq-len", "30", "--seed", "2", "--batch-size", "4",
                     "--eval-size", "6", "--out", str(tmp_path), "--log-seconds", "9"])
    r = json.loads((tmp_path / "results.json").read_text())[0]
    (valid, _, valid_acc), (test, _, test_acc) = evaluated
    for inputs, seed in ((valid, 4 * 2 + 3), (test, 4 * 2 + 1)):  # drawn in batches of 4, then 2
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(inputs, torch.cat([train_sort.make_batch(4, 30, g)[0], train_sort.make_batch(2, 30, g)[0]]))
    assert len(trained) == 3 and not any((t[:, None] == h[None]).all(-1).any() for t in trained for h in (valid, test))
    assert (r["valid_accuracy"], r["test_accuracy"]) == (round(valid_acc, 4), round(test_acc, 4))


@pytest.mark.parametrize("argv,message", [(["--steps", "0"], "--steps"), (["--memory", "lstm"], "--memory"),
                                          (["--seq-len", "100", "0"], "--seq-len"),
                                          (["--device", "cuda:0"], "--device"),
                                          (["--out", HERE + "/README.md"], "--out")])
def test_train_sort_rejects_bad_arguments(argv, message, capsys):
    if argv[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        train_sort.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_jobs_train_side_by_side_and_give_the_rows_of_one_after_another(tmp_path):
    """--jobs 2 trains the runs in two worker processes of one thread each (three runs: one worker takes two,
    and they may end out of order): each run gives one row, the row that training them one after another on
    one thread gives (the same seeds and data: to the bit)."""
    argv = ["--memory", "xl", "compressive", "sticky", "--steps", "3", "--seq-len", "300", "--batch-size", "2", "--eval-size", "8",
            "--log-seconds", "0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_sort.main(argv + ["--jobs", "1", "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    train_sort.main(argv + ["--jobs", "2", "--out", str(tmp_path / "two")])
    timing = ("minutes", "tokens_per_second", "peak_memory_mb")
    rows = lambda out: sorted(({k: v for k, v in r.items() if k not in timing}
                               for r in json.loads((tmp_path / out / "results.json").read_text())), key=str)
    assert len(rows("two")) == 3 and rows("two") == rows("one")


def test_ctrl_c_stops_side_by_side_runs_in_one_line(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the workers must leave it to the parent, which
    stops them and says in one line where the finished runs are, with no traceback from any process."""
    cmd = [sys.executable, os.path.join(HERE, "train_sort.py"), "--memory", "xl", "infinite", "--steps", "100000",
           "--seq-len", "300", "--batch-size", "2", "--eval-size", "2", "--jobs", "2", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        started = 0
        while started < 2:  # both workers have begun a run
            line = proc.stdout.readline()
            assert line, proc.communicate()[1]  # it ended before: its error
            started += line.startswith("== ")
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)  # a pool closed and joined, not terminated, would wait for the runs
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever happened, nothing left behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and err.strip().startswith("interrupted; finished runs are in") and "Traceback" not in err


def test_ctrl_c_while_the_held_out_sets_are_drawn_is_one_line(tmp_path, monkeypatch):
    """Drawing 512 long held-out sequences takes a while: a Ctrl-C then is a user's too, not a traceback."""
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_sort, "held_out", interrupted)
    try:
        with pytest.raises(SystemExit, match="^\ninterrupted; finished runs are in"):
            train_sort.main(["--memory", "xl", "--out", str(tmp_path)])
    except KeyboardInterrupt:  # uncaught, it would stop the whole test session instead of failing this test
        pytest.fail("the Ctrl-C came through as a KeyboardInterrupt")


@pytest.mark.parametrize("script", [train_sort, train_lm])
def test_ddp_gets_a_timeout_longer_than_rank_zeros_evaluation(script, tmp_path, monkeypatch):
    """NCCL's default 10 minutes is shorter than a paper-preset evaluation, while the other ranks wait."""
    seen = {}

    def init_process_group(backend, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--out", str(tmp_path / "o"), "--device", "cpu"] + (["--data", str(tmp_path)] if script is train_lm else [])
    with pytest.raises(RuntimeError, match="stop here"):
        script.main(script.parse_args(argv) if script is train_lm else argv)
    assert seen["timeout"].total_seconds() >= 3600


# ----------------------------------------------------------------------------- train_lm.py


@pytest.fixture
def corpus(tmp_path):
    """A small WikiText-format corpus: Zipf-like words, headings, blank lines, 60 words seen once;
    'zebra' only outside train."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    p = 1 / np.arange(1, 41)
    p /= p.sum()

    def text(n_lines, extra=()):
        lines = [" = Title = ", ""]
        for i in range(n_lines):
            line = list(rng.choice(words, size=12, p=p)) + list(extra if i % 5 == 0 else ())
            lines.append(" " + " ".join(line) + " ")
        return "\n".join(lines) + "\n"

    d = tmp_path / "data"
    d.mkdir()
    rare = " " + " ".join(f"r{i}" for i in range(60)) + " \n"  # once each: most batches miss their cluster
    (d / "wiki.train.tokens").write_text(text(400, ["<unk>"]) + rare)
    (d / "wiki.valid.tokens").write_text(text(40, ["zebra"]))
    (d / "wiki.test.tokens").write_text(text(40, ["zebra"]))
    return d


def lm_args(corpus, out, *extra):
    return train_lm.parse_args(["--data", str(corpus), "--out", str(out), "--batch-size", "4", "--max-steps", "6",
                                "--eval-streams", "3", "--log-seconds", "0", *extra])


@pytest.fixture
def small_lm(monkeypatch):
    """train_lm's CPU preset with a smaller model, for tests in which its size plays no part (CPU time)."""
    small = dict(d_model=32, n_layers=2, d_ff=64, seg_len=16, mem_len=16, num_basis=16, num_samples=16, cmem_len=16)
    monkeypatch.setitem(train_lm.PRESETS["cpu"], "model", {**train_lm.PRESETS["cpu"]["model"], **small})


def test_adaptive_softmax_cutoffs_are_transformer_xls_at_wikitext_103_size():
    assert train_lm.scaled_cutoffs(267_735) == train_lm.scaled_cutoffs(267_736) == [20_000, 40_000, 200_000]
    assert train_lm.scaled_cutoffs(26_774) == [2_000, 4_000, 20_000]  # a tenth of the vocabulary


def test_vocabulary_eos_and_unk(corpus):
    vocab, data = train_lm.tokenize(train_lm.split_paths(str(corpus)))
    train_words = (corpus / "wiki.train.tokens").read_text().split("\n")[:-1]  # the lines, as Python reads them
    counts = collections.Counter(w for line in train_words for w in line.split() + ["<eos>"])
    assert set(vocab) == set(counts) and "zebra" not in vocab
    assert [counts[w] for w in vocab] == sorted(counts.values(), reverse=True)  # frequent words first
    assert len(data["train"]) == sum(counts.values())
    index = {w: i for i, w in enumerate(vocab)}
    valid_words = [w for line in (corpus / "wiki.valid.tokens").read_text().split("\n")[:-1]
                   for w in line.split() + ["<eos>"]]
    expected = [index.get(w, index["<unk>"]) for w in valid_words]
    assert data["valid"].tolist() == expected and valid_words.count("zebra") > 0


def untrained_perplexity(r, data, docs):
    cfg = Config(**{k: r["config"][k] for k in Config.__dataclass_fields__})
    torch.manual_seed(r["config"]["seed"])
    model = train_lm.LanguageModel(cfg)
    return train_lm.perplexity(model, data, 3, cfg.seg_len, "cpu", torch.autocast("cpu", enabled=False), docs)


@pytest.mark.parametrize("kind", KINDS)
def test_train_lm_trains_and_evaluates_on_the_held_out_splits(kind, corpus, tmp_path):
    """The reported perplexities are those of the final weights (ckpt.pt) on the valid and the test
    split, recomputed here; six steps learn the word frequencies."""
    train_lm.main(lm_args(corpus, tmp_path / "run", "--memory", kind))
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"memory", "valid_ppl", "test_ppl", "tokens_per_second", "peak_memory_mb", "minutes", "config"} <= set(r)
    assert r["memory"] == kind and r["steps"] == 6 and r["evaluated"] == "last"
    _, data = train_lm.tokenize(train_lm.split_paths(str(corpus)))
    assert r["valid_ppl"] < 0.6 * untrained_perplexity(r, data["valid"], data["valid_docs"])
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", map_location="cpu")
    cfg = Config(**{k: ckpt["run"][k] for k in Config.__dataclass_fields__})
    model = train_lm.LanguageModel(cfg)
    model.load_state_dict(ckpt["model"])
    ppl = {s: train_lm.perplexity(model, data[s][:600], 3, cfg.seg_len, "cpu", contextlib.nullcontext(),
                                  data[f"{s}_docs"]) for s in ("valid", "test", "train")}  # train: one document, cut short
    assert (r["valid_ppl"], r["test_ppl"]) == (round(ppl["valid"], 2), round(ppl["test"], 2))
    assert len({ppl["valid"], ppl["test"], ppl["train"]}) == 3  # the three splits are told apart (unrounded)


def test_the_kl_term_reaches_the_language_models_gradient(corpus, tmp_path):
    """A large --kl-weight must pull σ towards σ₀ = 0.05 (from 0.25 at the start), and otherwise
    change nothing in how the run goes: its weights differ from the run without the KL term only
    through its gradient."""
    bias = {}
    for weight in ("0", "10"):
        out = tmp_path / weight
        train_lm.main(lm_args(corpus, out, "--memory", "infinite", "--kl-weight", weight, "--lr", "0.01"))
        state = torch.load(out / "ckpt.pt", map_location="cpu")["model"]
        bias[weight] = torch.stack([state[f"body.blocks.{i}.read_ltm.w_mu_var.bias"][1] for i in range(4)])
    assert (bias["10"] < bias["0"] - 1e-3).all()  # softplus⁻¹ of σ²: lower is narrower


@pytest.mark.parametrize("kind", KINDS)
def test_lm_reports_the_valid_perplexity_without_the_ltm_read(kind, corpus, tmp_path):
    """valid_ppl_ltm_zeroed must be the valid perplexity of the trained weights with every LTM output
    projection set to zero (an independent way to remove Z_LTM), and differ from valid_ppl."""
    train_lm.main(lm_args(corpus, tmp_path / "run", "--memory", kind, "--lr", "0.01"))
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    if kind in ("xl", "compressive", "infini"):  # no Z_LTM to zero
        assert r["valid_ppl_ltm_zeroed"] is None
        return
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", map_location="cpu")
    cfg = Config(**{k: ckpt["run"][k] for k in Config.__dataclass_fields__})
    model = train_lm.LanguageModel(cfg)
    model.load_state_dict(ckpt["model"])
    _, data = train_lm.tokenize(train_lm.split_paths(str(corpus)))
    ppl = lambda: round(train_lm.perplexity(model, data["valid"], 3, cfg.seg_len, "cpu", contextlib.nullcontext(),
                                            data["valid_docs"]), 2)
    assert ppl() == r["valid_ppl"]
    for block in model.body.blocks:
        block.read_ltm.proj.weight.data.zero_()
    assert ppl() == r["valid_ppl_ltm_zeroed"] != r["valid_ppl"]


@pytest.mark.parametrize("kind", KINDS)
def test_both_scripts_train_and_evaluate_under_cpu_bf16_autocast(kind, corpus, tmp_path, monkeypatch, small_lm):
    """The bf16 path a GPU takes, on the CPU: autocast must be on (bf16 linear outputs in training and
    in evaluation), the adaptive softmax must leave it (on the CPU it fails inside it), and the
    sorting model must train and evaluate."""
    seen = set()  # (training?, dtype) of every linear layer's output: bf16 only where autocast is on

    def record(module, inputs, out):
        if isinstance(module, torch.nn.Linear):
            seen.add((module.training, out.dtype))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        train_lm.main(lm_args(corpus, tmp_path / "lm", "--memory", kind, "--max-steps", "3", "--dtype", "bf16"))
        r = json.loads((tmp_path / "lm" / "results.json").read_text())
        assert r["config"]["dtype"] == "bf16" and math.isfinite(r["valid_ppl"]) and math.isfinite(r["test_ppl"])
        assert seen >= {(True, torch.bfloat16), (False, torch.bfloat16)}  # in training and in evaluation
        seen.clear()
        monkeypatch.setattr(train_sort, "DIAG_EVERY", 1)
        train_sort.main(["--memory", kind, "--steps", "2", "--seq-len", "300", "--batch-size", "2", "--eval-size", "2",
                         "--dtype", "bf16", "--out", str(tmp_path / "sort"), "--log-seconds", "0"])
        r = json.loads((tmp_path / "sort" / "results.json").read_text())[0]
        assert r["config"]["dtype"] == "bf16" and r["config"]["memory"] == kind
        assert seen >= {(True, torch.bfloat16), (False, torch.bfloat16)}
    finally:
        hook.remove()


def test_output_layer_runs_in_float32_under_bf16_autocast(corpus):
    vocab, _ = train_lm.tokenize(train_lm.split_paths(str(corpus)))
    torch.manual_seed(0)
    cfg = Config(vocab_size=len(vocab), d_model=32, n_heads=4, d_ff=64, seg_len=8, mem_len=8, lm_head=False)
    model = train_lm.LanguageModel(cfg)
    tokens, targets = torch.randint(0, len(vocab), (2, 2, 8)).unbind(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, _, _ = model(tokens, targets, None)
        hidden, _, _ = model.body(tokens, None)
    assert nll.dtype == torch.float32
    reference = -model.softmax(hidden.float().flatten(0, 1), targets.flatten()).output  # float32, outside autocast
    torch.testing.assert_close(nll.flatten(), reference, rtol=1e-6, atol=1e-6)


def fake_nll(prev, token, target):
    """The fake model's NLL: it depends on the token, its target and the token before it (-1: none)."""
    return 1 + 0.01 * target + 0.003 * token + 0.0007 * prev


class FakeLM(torch.nn.Module):
    """Carries the last input token in its memory, so its NLL shows whether the memory was carried."""

    def forward(self, tokens, targets, memory):
        prev = torch.full((tokens.size(0), 1), -1) if memory is None else memory  # -1: a stream's start
        prev = torch.cat([prev, tokens[:, :-1]], 1)
        return fake_nll(prev.double(), tokens.double(), targets.double()), tokens[:, -1:], 0.0

    def reset_memory(self, memory, done):
        return torch.where(done[:, None], -1, memory)


def test_perplexity_counts_every_token_once_aligned_and_with_memory_carried(corpus):
    """A fake model whose NLL depends on the input token, its target and the previous input, which
    it carries in its memory across segments: the perplexity must be exp of the mean over every
    (input, next token) pair of the split, once each, with the memory reset only where a stream
    starts, whatever the number of streams and the padding."""
    _, data = train_lm.tokenize(train_lm.split_paths(str(corpus)))
    ids = data["valid"].tolist()

    n = len(ids) - 1  # (input, target) pairs
    for streams in (1, 3, 7):
        length = math.ceil(n / streams)  # stream k starts at pair k * length
        total = sum(fake_nll(-1 if i % length == 0 else ids[i - 1], ids[i], ids[i + 1]) for i in range(n))
        ppl = train_lm.perplexity(FakeLM(), data["valid"], streams, 5, "cpu", torch.autocast("cpu", enabled=False))
        assert ppl == pytest.approx(math.exp(total / n), rel=1e-12)


@pytest.mark.parametrize("kind", ["xl", "sticky"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(kind, corpus, tmp_path, monkeypatch, small_lm):
    """SIGINT at step 3 saves a checkpoint; resuming it ends exactly where the plain run ends
    (dropout and sticky sampling draw random numbers, so the RNG state must come back too), with
    the same validation history and the same best weights evaluated."""
    whole = lm_args(corpus, tmp_path / "whole", "--memory", kind, "--eval-every", "2")
    train_lm.main(whole)
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def interrupt_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return clip(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupt_at_step_3)
    with pytest.raises(SystemExit) as e:
        train_lm.main(lm_args(corpus, tmp_path / "part", "--memory", kind, "--eval-every", "2"))
    assert e.value.code == 128 + signal.SIGINT
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert torch.load(tmp_path / "part" / "ckpt.pt")["step"] == 3
    train_lm.main(lm_args(corpus, tmp_path / "part", "--memory", kind, "--eval-every", "2",
                          "--resume", str(tmp_path / "part" / "ckpt.pt")))
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "part" / "results.json").read_text())
    assert a["train_loss"] == b["train_loss"] and a["valid_ppl"] == b["valid_ppl"] and a["test_ppl"] == b["test_ppl"]
    assert a["valid_history"] == b["valid_history"] and [s for s, _ in a["valid_history"]] == [2, 4, 6]
    assert a["evaluated"] == "best" and a["evaluated_step"] == b["evaluated_step"]


def test_eval_every_keeps_and_evaluates_the_best_weights(corpus, tmp_path):
    """With the learning rate high enough to overshoot, the last weights are not the best: the
    final numbers must come from the step with the lowest valid perplexity, stored in best.pt."""
    train_lm.main(lm_args(corpus, tmp_path / "r", "--eval-every", "1", "--lr", "0.05"))
    r = json.loads((tmp_path / "r" / "results.json").read_text())
    best_step, best_ppl = min(r["valid_history"], key=lambda h: h[1])
    assert best_step != 6  # this run overshoots: otherwise the test proves nothing
    assert r["evaluated_step"] == best_step and r["valid_ppl"] == pytest.approx(best_ppl, abs=0.006)
    best = torch.load(tmp_path / "r" / "best.pt")
    assert best["step"] == best_step and (tmp_path / "r" / "ckpt.pt").exists()


def test_resume_rejects_damaged_and_mismatched_checkpoints(corpus, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(train_lm.UserError, match="damaged"):
        train_lm.main(lm_args(corpus, tmp_path / "r", "--resume", str(bad)))
    train_lm.main(lm_args(corpus, tmp_path / "r"))
    with pytest.raises(train_lm.UserError, match="another configuration: batch_size 4"):
        train_lm.main(lm_args(corpus, tmp_path / "r", "--resume", str(tmp_path / "r" / "ckpt.pt"), "--batch-size", "2"))
    # A checkpoint from before a Config field existed holds no value for it: it was run at the field's default.
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    del ckpt["run"]["sticky_uniform"]
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(train_lm.UserError, match=r"another configuration: sticky_uniform 0.0 \(now 0.8\)$"):
        train_lm.main(lm_args(corpus, tmp_path / "r", "--resume", str(tmp_path / "old.pt")))
    train_lm.main(lm_args(corpus, tmp_path / "r", "--resume", str(tmp_path / "old.pt"), "--sticky-uniform", "0"))


def test_kl_weight_and_sticky_uniform_flags_reach_the_model_and_leave_the_preset_alone(corpus, tmp_path, capsys):
    train_lm.main(lm_args(corpus, tmp_path / "run", "--memory", "sticky", "--kl-weight", "0.5", "--sticky-uniform", "0.3"))
    config = json.loads((tmp_path / "run" / "results.json").read_text())["config"]
    assert config["kl_weight"] == 0.5 and config["sticky_uniform"] == 0.3
    assert "kl_weight" not in train_lm.PRESETS["cpu"]["model"]  # a later run in this process gets the default
    assert lm_args(corpus, tmp_path / "o").model["kl_weight"] == train_lm.PRESETS["cpu"]["kl_weight"] == 1e-2
    assert lm_args(corpus, tmp_path / "o").model["sticky_uniform"] == 0.8
    assert lm_args(corpus, tmp_path / "o", "--preset", "paper").model["sticky_uniform"] == 0.0  # the paper's
    for flag, value, message in (("--kl-weight", "-1", "--kl-weight must be >= 0"),
                                  ("--sticky-uniform", "1.5", "--sticky-uniform must be in [0, 1]")):
        with pytest.raises(SystemExit):
            lm_args(corpus, tmp_path / "o", flag, value)
        assert message in capsys.readouterr().err


def test_bad_arguments_are_refused_before_the_data_is_read(corpus, tmp_path, capsys):
    """--resume naming no file, and --out naming a file, stop at the command line: the corpus (minutes
    to tokenise on WikiText-103) is never read."""
    (corpus / "wiki.train.tokens").write_bytes(b"\xff")  # reading it would fail otherwise
    for argv, message in ((["--resume", str(tmp_path / "missing.pt")], f"--resume {tmp_path / 'missing.pt'}: no such file"),
                          (["--out", str(corpus / "wiki.valid.tokens")], "a file of that name exists")):
        with pytest.raises(SystemExit) as e:
            train_lm.parse_args(["--data", str(corpus), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_data_gives_one_clear_line(corpus, tmp_path):
    (corpus / "wiki.test.tokens").unlink()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train_lm.py"), "--data", str(corpus),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"train_lm.py: error: --data {corpus}: wiki.test.tokens is missing or empty"
    (corpus / "wiki.test.tokens").write_text("")
    with pytest.raises(train_lm.UserError, match="wiki.test.tokens is missing or empty"):
        train_lm.main(lm_args(corpus, tmp_path / "o"))
    with pytest.raises(train_lm.UserError, match="no such folder"):
        train_lm.main(lm_args(tmp_path / "nowhere", tmp_path / "o"))
    (corpus / "wiki.test.tokens").write_bytes(" = Title = \n caf\xe9 \n".encode("latin-1"))
    with pytest.raises(train_lm.UserError, match=r"wiki.test.tokens, line 2: not UTF-8 text \(byte b'\\xe9'\)"):
        train_lm.main(lm_args(corpus, tmp_path / "o"))


DDP_DRIVER = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import train_lm
train_lm.PRESETS["cpu"]["model"].update(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, seg_len=8, mem_len=8)
seen, clip = [], torch.nn.utils.clip_grad_norm_
forward = train_lm.LanguageModel.forward
def record_batch(self, tokens, targets, memory):
    seen.append((tokens.clone(), targets.clone()))
    return forward(self, tokens, targets, memory)
def record_gradients(params, *a, **k):  # called after backward, before the optimizer step
    params, path = list(params), os.path.join(sys.argv[2], os.environ["RANK"] + ".pt")
    if not os.path.exists(path):  # the first step's
        torch.save({"grads": [p.grad for p in params], "batch": seen[0]}, path)
    return clip(params, *a, **k)
train_lm.LanguageModel.forward = record_batch
torch.nn.utils.clip_grad_norm_ = record_gradients
train_lm.main(train_lm.parse_args(sys.argv[3:]))
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_process_torchrun_reads_its_own_streams_averages_gradients_and_saves_both_ranks(corpus, tmp_path):
    """gloo DDP under torchrun, as on several GPUs, with sticky (its LTM is infinite's plus its sampling;
    xl's path is a part of it). Rank r must read streams 2r and 2r + 1 of the four contiguous streams
    of the training split, and after the first step both ranks must hold the gradient that one process
    computes on the two batches concatenated (averaged across ranks; the driver's model has no dropout).
    The corpus's rare words leave tail clusters of the adaptive softmax without a target in most batches:
    their parameters get no gradient on that rank. Both ranks' states go into the checkpoint, and only
    rank 0 validates and logs."""
    (tmp_path / "driver.py").write_text(DDP_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "driver.py"), HERE, str(tmp_path), "--data", str(corpus), "--memory", "sticky",
                           "--out", str(tmp_path / "ddp"), "--batch-size", "2", "--max-steps", "4", "--save-every", "2",
                           "--eval-every", "2", "--eval-streams", "2", "--device", "cpu"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert r["config"]["world_size"] == 2 and r["steps"] == 4
    ckpt = torch.load(tmp_path / "ddp" / "ckpt.pt")
    assert len(ckpt["ranks"]) == 2  # both ranks' memory, stream position and RNG are saved
    assert [s for s, _ in r["valid_history"]] == [2, 4]  # rank 0 validates while the other waits
    assert proc.stdout.count("valid ppl") == 3  # only rank 0 evaluates and logs: steps 2 and 4, the end
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    _, data = train_lm.tokenize(train_lm.split_paths(str(corpus)))
    ids, length = data["train"].long(), len(data["train"]) // 4
    for r, dump in enumerate(ranks):
        tokens, targets = dump["batch"]
        for i in range(2):
            stream = ids[(2 * r + i) * length:(2 * r + i + 1) * length]
            assert torch.equal(tokens[i], stream[:8]) and torch.equal(targets[i], stream[1:9])
    cfg = Config(**{k: ckpt["run"][k] for k in Config.__dataclass_fields__})
    torch.manual_seed(0)  # rank 0's seed: DDP starts every rank from rank 0's weights
    model = train_lm.LanguageModel(cfg)
    tokens, targets = (torch.cat(parts) for parts in zip(*(d["batch"] for d in ranks)))
    nll, _, kl = model(tokens, targets, None)
    (nll.mean() + kl).backward()
    assert sum(g is not None and g.abs().sum() > 0 for g in ranks[1]["grads"]) > 10
    for p, g0, g1 in zip(model.parameters(), ranks[0]["grads"], ranks[1]["grads"]):
        g0, g1, ref = (torch.zeros_like(p) if g is None else g for g in (g0, g1, p.grad))
        torch.testing.assert_close(g0, ref, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g1, ref, rtol=1e-4, atol=1e-7)


def documents_text(n_docs, seed):
    """WikiText-format articles: a blank line, ` = Title k = `, paragraphs and ` = = Section = = ` sub-headings."""
    rng = np.random.default_rng(seed)
    lines = []
    for k in range(n_docs):
        lines += ["", f" = Title{k} = ", ""]
        for i in range(int(rng.integers(4, 16))):  # 40 to 160 words: longer and shorter than a segment
            lines.append(" = = Section = = " if i % 3 == 2 else " " + " ".join(rng.choice(["w1", "w2", "w3", "w4"], 9)) + " ")
    return "\n".join(lines) + "\n"


def title_positions(text):
    """Independently of train_lm: the token positions (words, <eos> at each line end) of ` = Title = ` lines."""
    positions, n = [], 0
    for line in text.split("\n")[:-1]:
        if re.fullmatch(r" = [^=]+ = ", line):
            positions.append(n)
        n += len(line.split()) + 1
    return positions


def test_a_document_start_resets_that_streams_memory_in_training(corpus, tmp_path, monkeypatch):
    """Over one epoch of one stream: the memory is reset exactly at the segments whose first target is a
    title line's first word (so a document starts on a segment boundary), at every title, never at a
    sub-heading; each document takes ceil(pairs / 64) segments, and the loss is the mean NLL over its
    real pairs only (its last segment's padding masked out)."""
    text = documents_text(8, seed=0)
    (corpus / "wiki.train.tokens").write_text(text)
    vocab, data = train_lm.tokenize(train_lm.split_paths(str(corpus)))
    assert data["train_docs"].tolist() == title_positions(text)
    steps = math.ceil((len(data["train"]) - 1) / 64) + 9  # more than one epoch: padding adds < 1 segment per title
    seen, nlls, resets, losses = [], [], [], []
    forward, reset, backward = train_lm.LanguageModel.forward, InfFormer.reset_memory, torch.Tensor.backward

    def record_forward(self, x, y, m):
        out = forward(self, x, y, m)
        if self.training:
            seen.append(y.clone()), nlls.append(out[0].detach())
        return out

    monkeypatch.setattr(train_lm.LanguageModel, "forward", record_forward)
    monkeypatch.setattr(InfFormer, "reset_memory", lambda self, m, done: (self.training and resets.append((len(seen), done.clone())), reset(self, m, done))[1])
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (losses.append(self.item()), backward(self, *a, **k))[1])
    train_lm.main(lm_args(corpus, tmp_path / "r", "--memory", "xl", "--batch-size", "1", "--max-steps", str(steps)))
    epoch = next(i for i in range(1, len(seen)) if torch.equal(seen[i], seen[0]))  # the second epoch starts
    done_at = {step for step, done in resets if done.item() and step < epoch}
    word = lambda y, i: vocab[y[0, i]]
    title_at = {s for s in range(epoch) if (word(seen[s], 0), word(seen[s], 2)) == ("=", "=") and word(seen[s], 1) != "="}
    assert done_at == title_at and sorted(word(seen[s], 1) for s in title_at) == [f"Title{k}" for k in range(8)]
    titles, n = title_positions(text), len(data["train"]) - 1  # a document's pairs: those whose target is in it
    real = [min(64, pairs - i) for pairs in np.diff(titles + [n + 1]) for i in range(0, pairs, 64)]
    assert len(real) == epoch
    for s in range(epoch):  # xl: no KL term in the loss
        assert losses[s] == pytest.approx(nlls[s][0, :real[s]].mean().item(), rel=1e-6)


def test_per_document_perplexity_scores_every_token_once_from_a_fresh_memory(corpus):
    """As the test above with memory carried, with documents: the fake model's memory (the previous
    input) must be "none" at each document's first pair (its target: the title line's first word, its
    input the line end before) and carried inside a document, every pair counted once. With more streams
    than documents, no stream is padding alone."""
    text = documents_text(9, seed=1)
    (corpus / "wiki.valid.tokens").write_text(text)
    _, data = train_lm.tokenize(train_lm.split_paths(str(corpus)))
    ids, starts = data["valid"].tolist(), set(title_positions(text))


    n = len(ids) - 1
    total = sum(fake_nll(-1 if i == 0 or i + 1 in starts else ids[i - 1], ids[i], ids[i + 1]) for i in range(n))
    for streams in (1, 3, 7, 12):
        model, rows = FakeLM(), set()
        model.register_forward_hook(lambda m, args, out: rows.add(args[0].size(0)))
        ppl = train_lm.perplexity(model, data["valid"], streams, 5, "cpu", torch.autocast("cpu", enabled=False),
                                  data["valid_docs"])
        assert ppl == pytest.approx(math.exp(total / n), rel=1e-12) and rows == {min(streams, 9)}


# ----- generation


def generated(model, prompt, n, seed, **kw):
    """Tokens (bs, n) and their log-probabilities (bs, n) from model.generate, sticky seeded with seed."""
    torch.manual_seed(seed)
    tokens, log_p = zip(*model.generate(prompt, n, seed=1, **kw))
    return torch.stack(tokens, 1), torch.stack(log_p, 1)


def scored(model, text, seed):
    """log p of text[:, 1:] from the normal segment-by-segment forward over the whole text, and the memory."""
    outs, memory = run_segments(model, text, seed)
    log_p = torch.log_softmax(torch.cat(outs, 1), -1)  # (bs, n, V)
    return log_p[:, :-1].gather(2, text[:, 1:, None])[..., 0], memory, log_p


@pytest.mark.parametrize("kind", KINDS)
def test_generation_assigns_the_log_probs_that_scoring_the_same_text_gives(kind):
    """Prompt and samples, scored from a fresh memory in whole segments: every sampled token must get
    the log-probability that generation gave it. 11 + 45 tokens are 7 segments of 8: the LTM is written
    after segment 2 and read from segment 3 on, and sticky's draws must come in the same order."""
    model = give_ltm_weights(tiny(kind))
    prompt = torch.randint(0, 23, (3, 11))  # longer than a segment, not a multiple of it
    tokens, log_p = generated(model, prompt, 45, seed=5, temperature=0.8)
    text = torch.cat([prompt, tokens], 1)
    expected, memory, _ = scored(model, text, seed=5)
    assert kind not in ("infinite", "sticky") or memory.ltm[0].size(1) == 16
    torch.testing.assert_close(log_p, expected[:, 10:], rtol=0, atol=1e-5)
    if kind == "sticky":  # the test can tell sticky's draws apart
        assert (scored(model, text, seed=6)[0][:, 10:] - log_p).abs().amax() > 1e-4


def test_top_k_samples_among_the_k_most_likely_words_only():
    model = give_ltm_weights(tiny("infinite"))
    prompt = torch.randint(0, 23, (2, 3))
    for k in (1, 4):
        tokens, _ = generated(model, prompt, 30, seed=0, top_k=k)
        text = torch.cat([prompt, tokens], 1)
        _, _, log_p = scored(model, text, seed=0)
        rank = (log_p[:, 2:-1] > log_p[:, 2:-1].gather(2, tokens[..., None])).sum(-1)  # words more likely
        assert rank.max() < k and (k == 1 or rank.max() > 0)  # k = 1: the most likely word every time


def test_generate_from_a_checkpoint_alone_in_a_fresh_process(corpus, tmp_path, capsys):
    """best.pt and ckpt.pt hold the configuration and the vocabulary: with the data folder gone, a new
    process samples from them; the same seed gives the same text, another seed another."""
    train_lm.main(lm_args(corpus, tmp_path / "run", "--memory", "sticky", "--eval-every", "3"))
    vocab, _ = train_lm.tokenize(train_lm.split_paths(str(corpus)))
    shutil.rmtree(corpus)
    capsys.readouterr()
    best, last = str(tmp_path / "run" / "best.pt"), str(tmp_path / "run" / "ckpt.pt")
    model, saved_vocab = train_lm.load_model(last)  # the full checkpoint: optimizer, memories, RNG states
    assert saved_vocab == vocab and not model.training and model.body.cfg.memory == "sticky"
    argv = ["--generate", best, "--prompt", "w1 zebra w2", "--tokens", "40", "--device", "cpu"]
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train_lm.py"), *argv, "--seed", "1"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "note: not in the vocabulary, read as <unk>: zebra\n"
    text = proc.stdout[:-1]  # print's newline
    assert text.startswith("w1 <unk> w2 ") and len(text.split()) + text.count("\n") == 3 + 40  # <eos>: a line break
    assert set(text.split()) <= set(vocab) - {"<eos>"}
    assert "  " not in text and " \n" not in text and "\n " not in text  # one space between words, none at line ends
    train_lm.cli(argv + ["--seed", "1"])
    assert capsys.readouterr().out == proc.stdout
    train_lm.cli(argv + ["--seed", "2"])
    assert capsys.readouterr().out != proc.stdout
    train_lm.cli(["--generate", best, "--tokens", "8", "--device", "cpu"])  # no prompt: the text starts at once
    out = capsys.readouterr().out[:-1]
    assert len(out.split()) + out.count("\n") == 8 and not out.startswith((" ", "\n")) and "  " not in out


def test_generate_rejects_bad_input_in_one_clear_line(tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    gen = ["--generate", str(tmp_path / "foreign.pt")]
    for argv, message in [(["--generate", str(tmp_path / "none.pt")], "none.pt: no such file"),
                          (["--generate", str(tmp_path / "garbage.pt")], "not a readable checkpoint"),
                          (gen, "not a train_lm.py checkpoint with its vocabulary (no config, vocab, model)"),
                          (gen + ["--temperature", "0"], "--temperature must be positive"),
                          (gen + ["--tokens", "0"], "--tokens must be at least 1"),
                          (gen + ["--top-k", "0"], "--top-k must be at least 1"),
                          (["--out", str(tmp_path)], "--data is required to train")]:
        with pytest.raises(SystemExit) as e:
            train_lm.cli(argv)
        err = capsys.readouterr().err
        assert e.value.code != 0 and "Traceback" not in err
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("train_lm.py: error: ") and message in errors[0], err


# ----- the compiled path (--compile)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_model_equals_eager_and_stops_compiling_once_the_memories_are_full(kind):
    """torch.compile must give eager's outputs, memories' reads and gradients over segments that take
    every memory shape (a short first chunk into empty memories, a filling STM, a first long-term write,
    then full memories), and compile nothing new once the memories are full: a bounded number of graphs.
    Each value of outputs is a graph of its own, and tracing one is the suite's slowest step, so each kind
    takes one value throughout: the last 5 (train_sort's call) where the LTM read has its own path for
    them (densities of every query, a read for the last 5), every output (train_lm's call) elsewhere.
    Dynamo's tracing runs on its eager backend here, to keep the suite fast: inductor's kernels are
    PyTorch's to test."""
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    tokens = torch.randint(0, 23, (2, 3 + 8 * 6), generator=torch.Generator().manual_seed(0))
    results, graphs = [], []
    for compile_ in (False, True):
        model = give_ltm_weights(tiny(kind, n_layers=1, cmem_len=4))  # 4 slots: full after 2 evictions, fewer shapes
        run = torch.compile(model, backend="eager") if compile_ else model
        torch.manual_seed(0)  # sticky draws its samples: the same draws in both runs
        memory, outs = model.init_memory(2), []
        for seg in [tokens[:, :3], *tokens[:, 3:].split(8, 1)]:
            out, memory, kl = run(seg, memory, outputs=5 if kind in ("infinite", "sticky") else None)
            (out.square().mean() + kl).backward()
            outs.append(out.detach())
            graphs.append(counters["stats"]["unique_graphs"])
        results.append(outs + [p.grad for p in model.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    compiled_graphs = graphs[7:]
    assert 1 <= compiled_graphs[-1] <= 4 and compiled_graphs[-2] == compiled_graphs[-1], compiled_graphs


def test_compile_falls_back_to_eager_in_one_line_where_it_cannot_compile(monkeypatch, capsys):
    """No C++ compiler (CPU) or no Triton (CUDA) surfaces when the first compiled call runs: the
    probe call must catch it, print one line that says why, and hand back the eager model."""
    def no_compiler(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in cpp_builder\n(details)")
        return call
    model = tiny("infinite")
    assert train_sort.compiled(model, False, torch.device("cpu")) is model
    monkeypatch.setattr(torch, "compile", no_compiler)
    assert train_sort.compiled(model, True, torch.device("cpu")) is model
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "No working C++ compiler" in out and "running eagerly" in out, out


def test_compile_flag_hands_the_training_forward_to_torch_compile_in_both_scripts(corpus, tmp_path, monkeypatch):
    """--compile must train through torch.compile's result (a fake here, which counts the calls) and
    evaluate eagerly; without the flag, on a CPU, it is off."""
    calls = collections.Counter()

    def fake_compile(fn, **kwargs):
        def counted(*args, **kwargs):
            calls[type(fn).__name__] += 1
            return fn(*args, **kwargs)
        return counted
    monkeypatch.setattr(torch, "compile", fake_compile)
    sort = ["--memory", "infinite", "--steps", "2", "--seq-len", "300", "--eval-size", "2", "--log-seconds", "0"]
    assert train_sort.parse_args(["--device", "cpu"]).compile is False and lm_args(corpus, tmp_path).compile is False
    train_sort.main(sort + ["--out", str(tmp_path / "sort"), "--compile"])
    assert calls == {"function": 1, "InfFormer": 2 * 5}  # the probe; 2 steps of 320 tokens: 5 segments of 64
    train_lm.main(lm_args(corpus, tmp_path / "lm", "--compile"))
    assert calls["LanguageModel"] == 6 and calls["function"] == 2  # a call per training step
