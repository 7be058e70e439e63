"""models/pi_behavior/flow.py: correlated noise statistics, Beta time sampling, flow targets and Euler,
the float32 time grid, and soft correlation-aware inpainting (pi_behavior §1.9, §3, §4.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.pi_behavior import flow


def _random_correlation_chol(horizon: int, dim: int, *, rank: int, constant: tuple[int, ...] = (),
                             seed: int = 0) -> np.ndarray:
    """Cholesky factor of a random unit-diagonal correlation over (horizon, dim), built like norm_stats:
    constant action dims get identity rows/cols, then 1e-6 jitter."""
    rng = np.random.default_rng(seed)
    n = horizon * dim
    w = rng.normal(size=(n, rank))
    cov = w @ w.T + 0.3 * np.eye(n)
    d = np.sqrt(np.diag(cov))
    corr = cov / d[:, None] / d[None, :]
    const = np.zeros((horizon, dim), dtype=bool)
    const[:, list(constant)] = True
    const = const.reshape(-1)
    corr[const, :] = 0.0
    corr[:, const] = 0.0
    corr[const, const] = 1.0
    return np.linalg.cholesky(corr + 1e-6 * np.eye(n))


def _cov_error_ratio(samples: np.ndarray, sigma: np.ndarray) -> float:
    """||C_hat - Sigma||_F^2 over its expectation (tr(Sigma)^2 + ||Sigma||_F^2)/n for zero-mean Gaussian
    samples; about 1 when the samples really have covariance Sigma, large when they do not."""
    n = samples.shape[0]
    c_hat = samples.T @ samples / n
    expected = (np.trace(sigma) ** 2 + np.sum(sigma**2)) / n
    return float(np.sum((c_hat - sigma) ** 2) / expected)


# --- correlated noise -------------------------------------------------------------------------------------


def test_noise_covariance_small():
    chol = _random_correlation_chol(4, 8, rank=3, constant=(6,), seed=1)
    noise = flow.CorrelatedNoise(chol, dim=8)
    sigma = chol @ chol.T
    sigma_reg = 0.5 * sigma + 0.5 * np.eye(32)
    np.testing.assert_allclose(noise.covariance.numpy(), sigma_reg, atol=1e-12)
    eps = noise.sample((20000,), generator=torch.Generator().manual_seed(0))
    assert eps.shape == (20000, 4, 8) and eps.dtype == torch.float32
    flat = eps.reshape(20000, 32).double().numpy()
    # Entrywise: sd of a sample covariance entry is <= sqrt(2/n) = 0.01; 0.05 is 5 sd.
    np.testing.assert_allclose(flat.T @ flat / 20000, sigma_reg, atol=0.05)
    assert 0.85 < _cov_error_ratio(flat, sigma_reg) < 1.15
    assert _cov_error_ratio(flat, sigma) > 3.0  # the unshrunk Sigma is clearly rejected: the check has power


def test_noise_covariance_full_size_and_constant_coords():
    horizon, dim = 30, 32
    constant = (6, *range(23, 32))  # the trunk dim and the padded dims
    chol = _random_correlation_chol(horizon, dim, rank=20, constant=constant, seed=2)
    noise = flow.CorrelatedNoise(chol)
    assert (noise.horizon, noise.dim, noise.flat_dim) == (30, 32, 960)
    n = 4000
    eps = noise.sample((2, n // 2), generator=torch.Generator().manual_seed(1))
    assert eps.shape == (2, n // 2, 30, 32)
    flat = eps.reshape(n, 960).double().numpy()
    sigma_reg = noise.covariance.numpy()
    assert 0.9 < _cov_error_ratio(flat, sigma_reg) < 1.1
    assert _cov_error_ratio(flat, chol @ chol.T) > 2.0

    # Constant coordinates: identity rows in L_reg (up to the 1e-6 jitter on the diagonal), so their noise is
    # the underlying i.i.d. z.
    const_idx = np.flatnonzero(np.isin(np.tile(np.arange(dim), horizon), constant))
    chol_reg = noise.chol_reg.numpy()
    np.testing.assert_allclose(chol_reg[const_idx], np.eye(960)[const_idx], rtol=0, atol=1e-6)
    assert np.all(chol_reg[const_idx][np.eye(960, dtype=bool)[const_idx] == 0] == 0)  # off-diagonal exactly 0
    z = torch.randn((2, n // 2, 960), generator=torch.Generator().manual_seed(1)).reshape(n, 960).numpy()
    np.testing.assert_allclose(flat[:, const_idx], z[:, const_idx], rtol=1e-6, atol=0)


def test_noise_identity_determinism_dtype_and_meta_init():
    ident = flow.CorrelatedNoise.identity(3, 4)
    eps = ident.sample((5,), generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(eps.reshape(5, 12).numpy(),
                                  torch.randn((5, 12), generator=torch.Generator().manual_seed(3)).numpy())

    chol = _random_correlation_chol(3, 4, rank=2, seed=3)
    noise = flow.CorrelatedNoise(chol, dim=4)
    a = noise.sample((7,), generator=torch.Generator().manual_seed(11))
    b = noise.sample((7,), generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert noise.sample((7,), generator=torch.Generator().manual_seed(11), dtype=torch.bfloat16).dtype \
        == torch.bfloat16
    assert noise.state_dict() == {}  # derived from norm stats: never checkpointed

    with torch.device("meta"):
        late = flow.CorrelatedNoise(chol, dim=4)
    late.to_empty(device="cpu")
    late.reset_buffers()
    torch.testing.assert_close(late.sample((7,), generator=torch.Generator().manual_seed(11)), a, rtol=0, atol=0)

    with pytest.raises(ValueError, match="multiple"):
        flow.CorrelatedNoise(np.eye(10), dim=4)
    with pytest.raises(ValueError, match="beta"):
        flow.CorrelatedNoise(np.eye(8), dim=4, beta=1.5)


# --- time sampling, targets, Euler ------------------------------------------------------------------------


def test_sample_time_beta_distribution():
    n = 20000
    t = flow.sample_time((4, n // 4), torch.Generator().manual_seed(0))
    assert t.shape == (4, n // 4) and t.dtype == torch.float32
    assert float(t.min()) >= 0.001 and float(t.max()) <= 1.0
    assert abs(float(t.mean()) - (0.6 * 0.999 + 0.001)) < 0.01  # E[Beta(1.5,1)] = 0.6; sd of mean ~0.0017
    b = np.sort(((t.double().numpy().reshape(-1) - 0.001) / 0.999).clip(0, 1))
    cdf = b**1.5
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.95 / np.sqrt(n)  # KS critical value at the 0.1% level
    torch.testing.assert_close(t, flow.sample_time((4, n // 4), torch.Generator().manual_seed(0)), rtol=0, atol=0)


def test_flow_targets_and_oracle_euler_recovers_actions():
    gen = torch.Generator().manual_seed(5)
    actions = torch.randn((3, 6, 4), generator=gen)
    eps = torch.randn((3, 6, 4), generator=gen)
    t = torch.tensor([0.001, 0.5, 1.0])
    x_t, u = flow.flow_targets(actions, eps, t)
    torch.testing.assert_close(x_t[0], 0.001 * eps[0] + 0.999 * actions[0])
    torch.testing.assert_close(x_t[2], eps[2])
    torch.testing.assert_close(u, eps - actions)
    with pytest.raises(ValueError, match="batch shape"):
        flow.flow_targets(actions, eps, t[:2])

    # With the oracle velocity v = eps - a, 20 Euler steps from x_1 = eps land on a.
    out = flow.sample_loop(lambda x, tt: eps - actions, eps, num_steps=20)
    torch.testing.assert_close(out, actions, rtol=0, atol=1e-5)
    x, tt = flow.euler_step(eps, eps - actions, torch.tensor(1.0), -0.25)
    torch.testing.assert_close(x, 0.75 * eps + 0.25 * actions)
    assert float(tt) == 0.75


def test_time_grid_float32_schedule():
    times, dt = flow.time_grid(20)
    assert dt == -0.05 and times.dtype == torch.float32 and times.shape == (21,)
    assert float(times[0]) == 1.0 and abs(float(times[-1])) < 1e-6
    assert int((times[1:] > 0.3).sum()) == 13  # t_new = 0.95 ... 0.35 pin; t_14 = 0.29999983 does not
    # The same float32 carry as euler_step, so the model's t and the inpaint schedule agree.
    t = torch.tensor(1.0)
    for i in range(20):
        _, t = flow.euler_step(torch.zeros(()), torch.zeros(()), t, dt)
        assert float(t) == float(times[i + 1])


# --- inpainting -------------------------------------------------------------------------------------------

H, D, K = 5, 4, 2  # tiny chunk: O = the first 8 flat coordinates, U = the other 12


@pytest.fixture
def noise() -> flow.CorrelatedNoise:
    return flow.CorrelatedNoise(_random_correlation_chol(H, D, rank=4, seed=7), dim=D)


def test_inpainter_matches_gaussian_conditional_mean(noise):
    inp = flow.Inpainter.for_noise(noise)
    gen = torch.Generator().manual_seed(8)
    z = noise.sample((3,), generator=gen)
    x0 = 0.3 * torch.randn((3, K, D), generator=gen)
    x = z + 0.05 * torch.randn((3, H, D), generator=gen)
    state = inp.start(x0, z)
    out = inp.apply(x, 0.8, state)

    sigma = noise.covariance.numpy()
    o = K * D
    x_des = (0.2 * x0.double() + 0.8 * z[:, :K].double()).reshape(3, o).numpy()
    delta_o = x_des - x.reshape(3, -1)[:, :o].double().numpy()
    s_oo = sigma[:o, :o] + 1e-6 * np.eye(o)
    shift_u = np.linalg.solve(s_oo, sigma[o:, :o].T).T @ delta_o.T  # Sigma_UO Sigma_OO^-1 delta_O
    np.testing.assert_allclose(out.reshape(3, -1)[:, o:].double().numpy(),
                               x.reshape(3, -1)[:, o:].double().numpy() + shift_u.T, atol=1e-5)
    np.testing.assert_allclose(out[:, :K].double().numpy(), x_des.reshape(3, K, D), atol=1e-6)

    # Caching: one float64 M per (k, dim), one device copy per (k, device, dtype).
    assert inp.conditional_map(K) is inp.conditional_map(K)
    assert inp.start(x0, z).m_UO is state.m_UO
    assert inp.conditional_map(K + 1).shape == ((H - K - 1) * D, (K + 1) * D)
    assert inp.apply(x, 0.3, state) is x  # at or below the threshold: untouched


def test_inpainter_guard_skips_propagation_for_whole_batch(noise):
    inp = flow.Inpainter.for_noise(noise)
    gen = torch.Generator().manual_seed(9)
    z = noise.sample((2,), generator=gen)
    x0 = torch.randn((2, K, D), generator=gen)
    x = z.clone()
    x[1, :K] += 50.0  # one far-off element makes some |delta_U| > 1 for the whole batch
    state = inp.start(x0, z)
    out = inp.apply(x, 0.9, state)
    torch.testing.assert_close(out[:, K:], x[:, K:], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :K], (1.0 - 0.9) * x0 + 0.9 * z[:, :K], rtol=0, atol=0)
    strict = flow.Inpainter.for_noise(noise, max_correction=1e9)
    assert not torch.equal(strict.apply(x, 0.9, strict.start(x0, z))[:, K:], x[:, K:])


def test_inpainter_per_sample_guard_decides_per_row(noise):
    """A server batching unrelated clients: one row's large correction must not switch off another row's."""
    gen = torch.Generator().manual_seed(9)
    z = noise.sample((2,), generator=gen)
    x0 = z[:, :K] + 0.01 * torch.randn((2, K, D), generator=gen)  # row 0: a small correction
    x = z.clone()
    x[1, :K] += 50.0  # row 1: far off
    per_row = flow.Inpainter.for_noise(noise, per_sample_guard=True)
    out = per_row.apply(x, 0.9, per_row.start(x0, z))
    alone = per_row.apply(x[:1], 0.9, per_row.start(x0[:1], z[:1]))
    torch.testing.assert_close(out[:1], alone, rtol=0, atol=1e-6)  # row 0 as if it were alone
    assert not torch.equal(out[0, K:], x[0, K:])  # ...so it was corrected
    torch.testing.assert_close(out[1, K:], x[1, K:], rtol=0, atol=0)  # row 1 skipped
    batch = flow.Inpainter.for_noise(noise).apply(x, 0.9, per_row.start(x0, z))
    torch.testing.assert_close(batch[0, K:], x[0, K:], rtol=0, atol=0)  # the reference rule skips both


def test_inpainting_schedule_pins_13_of_20_steps(noise):
    """Kept rows are exactly on the x0-z line after every step with t_new > 0.3 and follow the model after."""
    inp = flow.Inpainter.for_noise(noise)
    gen = torch.Generator().manual_seed(10)
    z = noise.sample((2,), generator=gen)
    x0 = torch.randn((2, K, D), generator=gen)
    state = inp.start(x0, z)
    log: list[tuple[float, torch.Tensor]] = []

    def hook(x: torch.Tensor, t_new: float) -> torch.Tensor:
        out = inp.apply(x, t_new, state)
        log.append((t_new, out[:, :K].clone()))
        return out

    # A velocity that never points along the x0-z line, so pinning is visible.
    flow.sample_loop(lambda x, t: torch.ones_like(x), z, num_steps=20, inpaint=hook)
    pinned = [t_new for t_new, _ in log if t_new > 0.3]
    assert len(log) == 20 and len(pinned) == 13
    for i, (t_new, rows) in enumerate(log):
        on_line = (1.0 - t_new) * state.x0_BO + t_new * state.z_BO
        if t_new > 0.3:
            torch.testing.assert_close(rows.reshape(2, -1), on_line, rtol=0, atol=0)
        else:  # free: the rows follow x + dt*v from the previous step
            torch.testing.assert_close(rows, log[i - 1][1] - 0.05, rtol=0, atol=1e-6)


def test_inpainting_is_a_fixed_point_for_a_model_that_knows_x0(noise):
    """Exact flow of data whose kept rows are x0 and whose other rows are Gaussian (a_U ~ N(mu_U, S_UU)).

    For such data eps_O is determined by x_O, so the exact velocity is linear with v_O = (x_O - x0_O)/t, and
    Euler keeps x_O on the straight line (1-t)*x0_O + t*z_O that inpainting pins to. Hence delta_O ~ 0 at every
    step, the U rows are never corrected, the result equals the unconditioned run, and its kept rows are x0.
    """
    inp = flow.Inpainter.for_noise(noise)
    f, o = H * D, K * D
    gen = torch.Generator().manual_seed(12)
    z = noise.sample((3,), generator=gen).double()
    x0 = torch.randn((3, K, D), generator=gen, dtype=torch.float64)
    mu = torch.cat([x0[0].reshape(-1), torch.randn(f - o, generator=gen, dtype=torch.float64)])
    x0 = mu[:o].reshape(1, K, D).expand(3, K, D)
    a = torch.randn((f - o, f - o), generator=gen, dtype=torch.float64)
    s = torch.zeros((f, f), dtype=torch.float64)
    s[o:, o:] = a @ a.T / (f - o) + 0.1 * torch.eye(f - o, dtype=torch.float64)
    sigma = noise.covariance

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # E[eps - a | x_t = x] = -mu + (t Sigma - (1-t) S) C_t^-1 (x - (1-t) mu), C_t = t^2 Sigma + (1-t)^2 S.
        tt = float(t[0])
        c_t = tt**2 * sigma + (1 - tt) ** 2 * s
        cross = tt * sigma - (1 - tt) * s
        centered = x.reshape(x.shape[0], f) - (1 - tt) * mu
        return (-mu + torch.linalg.solve(c_t, centered.T).T @ cross.T).reshape(x.shape)

    state = inp.start(x0, z)
    deltas: list[float] = []

    def hook(x: torch.Tensor, t_new: float) -> torch.Tensor:
        out = inp.apply(x, t_new, state)
        deltas.append(float((out - x).abs().max()))
        return out

    free = flow.sample_loop(velocity, z, num_steps=20)
    pinned = flow.sample_loop(velocity, z, num_steps=20, inpaint=hook)
    assert max(deltas) < 1e-6  # only the float32 rounding of t_new (vs the float64 Euler update) shows
    torch.testing.assert_close(pinned, free, rtol=0, atol=1e-5)
    torch.testing.assert_close(pinned[:, :K], x0, rtol=0, atol=1e-5)  # t ends at -1.6e-7, not exactly 0


def test_inpainter_rejects_bad_shapes(noise):
    inp = flow.Inpainter.for_noise(noise)
    z = torch.zeros((2, H, D))
    with pytest.raises(ValueError, match="x0_rows"):
        inp.start(torch.zeros((2, K, D + 1)), z)
    with pytest.raises(ValueError, match="z must"):
        inp.start(torch.zeros((2, K, D)), torch.zeros((2, H + 1, D)))
    with pytest.raises(ValueError, match="kept rows"):
        inp.start(torch.zeros((2, H, D)), z)
