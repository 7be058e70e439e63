"""Flow-matching math for pi-behavior (pi_behavior.md §1.9, §3, §4.1): correlated noise, the Beta time
distribution, interpolation targets, the Euler time grid and soft, correlation-aware inpainting.

Everything here is pure tensor math with no trainable parameters, works on any device and dtype, and is
deterministic given a torch.Generator. Convention (openpi): t = 1 is noise and t = 0 is data,
x_t = t*eps + (1-t)*a, and the model predicts u = eps - a, so sampling integrates from t = 1 down to t = 0
with dt < 0.

Shape legend: B batch, H horizon (30), D model action dim (32), F = H*D flat chunk (960),
O = k*D kept ("observed") flat coordinates (the first k rows of the chunk), U = F - O the rest.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from data_loaders.behavior_facts import ACTION_HORIZON, MODEL_DIM

CORRELATION_BETA = 0.5  # Sigma_reg = beta*Sigma + (1-beta)*I (`correlation_beta`, §1.9)
TIME_BETA_ALPHA = 1.5  # t ~ Beta(1.5, 1): more weight near t = 1 (noisy end), §3
TIME_MIN = 0.001  # t = Beta*0.999 + 0.001 keeps t away from 0, where u = (x_t - a)/t is ill-posed
DEFAULT_NUM_STEPS = 20  # serve default, dt = -0.05 (§4.1)
INPAINT_TIME_THRESHOLD = 0.3  # pin only while t_new > 0.3: the first 70% of denoising (§4.1, §7.7)
INPAINT_MAX_CORRECTION = 1.0  # skip the U propagation if any |delta_U| in the batch exceeds this (§4.1)

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_BHD, t_B float32) -> v_BHD
InpaintFn = Callable[[Tensor, float], Tensor]  # (x_BHD after an Euler step, t_new) -> x_BHD


class CorrelatedNoise(nn.Module):
    """Sampler of eps ~ N(0, Sigma_reg) over (H, D) action chunks, Sigma_reg = beta*Sigma + (1-beta)*I.

    Sigma = L L^T is the flat (F, F) action correlation (norm_stats.json `action_correlation_cholesky`).
    Sigma_reg and its factor L_reg are computed in float64; L_reg is kept as the float32 buffer `chol_reg`.
    The buffer is non-persistent: `.to(device)` moves it with the model, but checkpoints never contain it,
    because it is derived from the norm stats the checkpoint already carries. Coordinates with identity rows
    in L (padded dims, constant dims) get identity rows in L_reg, so their noise is the i.i.d. z (scaled by
    sqrt(1 + beta*jitter) from the norm stats' diagonal jitter).
    """

    chol_reg: Tensor

    def __init__(self, chol: np.ndarray | Tensor, *, dim: int = MODEL_DIM, beta: float = CORRELATION_BETA) -> None:
        """`chol` is a square (H*D, H*D) factor of Sigma; H = size // dim. Raises ValueError on bad input."""
        super().__init__()
        chol64 = np.array(chol.detach().cpu() if isinstance(chol, Tensor) else chol, dtype=np.float64)
        if chol64.ndim != 2 or chol64.shape[0] != chol64.shape[1]:
            raise ValueError(f"correlation Cholesky factor must be square, got shape {chol64.shape}")
        if dim < 1 or chol64.shape[0] % dim:
            raise ValueError(f"factor size {chol64.shape[0]} is not a multiple of the action dim {dim}")
        if not np.all(np.isfinite(chol64)):
            raise ValueError("correlation Cholesky factor has non-finite values")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"correlation beta must be in [0, 1], got {beta}")
        self.dim = dim
        self.horizon = chol64.shape[0] // dim
        self.beta = beta
        sigma_reg = beta * (chol64 @ chol64.T) + (1.0 - beta) * np.eye(chol64.shape[0])
        try:
            self._chol_reg64 = np.linalg.cholesky(sigma_reg)
        except np.linalg.LinAlgError as e:  # only possible for beta = 1 with a singular factor
            raise ValueError(f"beta*Sigma + (1-beta)*I is not positive definite (beta={beta})") from e
        # Host float64 copies (plain attributes, not buffers): meta-device init and `.to()` never touch them,
        # so the inpainter and reset_buffers() always see the exact values.
        self._sigma_reg64 = torch.from_numpy(sigma_reg)
        self.register_buffer("chol_reg", torch.from_numpy(self._chol_reg64.astype(np.float32)), persistent=False)

    @classmethod
    def identity(cls, horizon: int = ACTION_HORIZON, dim: int = MODEL_DIM) -> CorrelatedNoise:
        """i.i.d. N(0, 1) noise, for when no correlation matrix is available."""
        return cls(np.eye(horizon * dim), dim=dim, beta=0.0)

    @classmethod
    def from_norm_stats(cls, stats: Any, *, beta: float = CORRELATION_BETA) -> CorrelatedNoise:
        """From a data_loaders.norm_stats.NormStats (its (960, 960) `action_correlation_cholesky`)."""
        return cls(stats.action_correlation_cholesky, dim=MODEL_DIM, beta=beta)

    @property
    def flat_dim(self) -> int:
        """F = horizon * dim."""
        return self.horizon * self.dim

    @property
    def covariance(self) -> Tensor:
        """Sigma_reg as a float64 CPU tensor of shape (F, F) (read it, do not modify it)."""
        return self._sigma_reg64

    def reset_buffers(self) -> None:
        """Refill `chol_reg` in place, e.g. after a meta-device build and `to_empty()` left it uninitialized."""
        with torch.no_grad():
            self.chol_reg.copy_(torch.from_numpy(self._chol_reg64.astype(np.float32)))

    def sample(self, batch_shape: Sequence[int], *, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """eps of shape (*batch_shape, H, D) on the buffer's device, cast to `dtype`.

        Draws z = torch.randn((*batch_shape, F)) from `generator` (which must live on the buffer's device),
        then eps = (z @ L_reg^T).reshape(..., H, D). The product always runs in float32: under bf16 autocast
        the 960-term sums would lose the correlation structure.
        """
        shape = tuple(batch_shape)
        device = self.chol_reg.device
        z = torch.randn((*shape, self.flat_dim), generator=generator, device=device, dtype=torch.float32)
        with torch.autocast(device_type=device.type, enabled=False):
            eps = z @ self.chol_reg.mT
        return eps.reshape(*shape, self.horizon, self.dim).to(dtype)


def sample_time(shape: Sequence[int], generator: torch.Generator | None = None, *,
                device: torch.device | str | None = None) -> Tensor:
    """Flow times t = Beta(1.5, 1)*0.999 + 0.001 in [0.001, 1], float32, shape `shape` (t = 1 is noise).

    Beta(a, 1) has CDF x^a, so the inverse-CDF draw x = u^(1/a) with u ~ U[0, 1) is exact and reproducible
    from a single torch.rand call. `device` defaults to the generator's device.
    """
    if device is None and generator is not None:
        device = generator.device
    u = torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return u.pow(1.0 / TIME_BETA_ALPHA) * (1.0 - TIME_MIN) + TIME_MIN


def flow_targets(actions: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, u) = (t*eps + (1-t)*a, eps - a) for actions and noise of shape (*batch, H, D), t of shape (*batch).

    Returns tensors in the actions' dtype; t is broadcast over the horizon and dim.
    """
    if actions.shape != noise.shape:
        raise ValueError(f"actions {tuple(actions.shape)} and noise {tuple(noise.shape)} must have one shape")
    if actions.ndim < 2 or t.shape != actions.shape[:-2]:
        raise ValueError(f"t has shape {tuple(t.shape)}, expected the batch shape {tuple(actions.shape[:-2])}")
    t_b11 = t.to(actions.dtype)[..., None, None]
    return t_b11 * noise + (1.0 - t_b11) * actions, noise - actions


def euler_step(x: Tensor, v: Tensor, t: Tensor, dt: float) -> tuple[Tensor, Tensor]:
    """One Euler step: (x + dt*v, t + dt). t stays in its own dtype (float32 in the sampler), so repeated
    steps round exactly like time_grid() and the reference's float32 loop carry."""
    return x + dt * v, t + dt


def time_grid(num_steps: int = DEFAULT_NUM_STEPS) -> tuple[Tensor, float]:
    """(times, dt): the float32 times t_0 = 1, t_{i+1} = t_i + dt of an Euler run, shape (num_steps + 1,),
    and dt = -1/num_steps.

    The times accumulate dt in float32 like the reference loop instead of being computed as 1 - i/n: the
    rounding decides the inpainting schedule. For 20 steps t_14 = 0.29999983 (not 0.3), so `t_new > 0.3`
    holds for exactly 13 steps, and the final time is about -1.6e-7, not 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dt = -1.0 / num_steps
    times = [torch.ones((), dtype=torch.float32, device="cpu")]
    for _ in range(num_steps):
        times.append(times[-1] + dt)
    return torch.stack(times), dt


@dataclasses.dataclass(frozen=True)
class InpaintState:
    """Per-request inpainting inputs, flattened and on the sampler's device/dtype (see Inpainter.start)."""

    x0_BO: Tensor  # kept normalized actions, flat (B, k*D)
    z_BO: Tensor  # the initial noise on the kept rows, flat (B, k*D)
    m_UO: Tensor  # M = Sigma_UO Sigma_OO^-1, shape (F - k*D, k*D)
    num_kept: int  # k


class Inpainter:
    """Soft, correlation-aware inpainting of the first k rows of a chunk (pi_behavior §4.1).

    After each Euler step with t_new > threshold, the kept coordinates O are set to their straight-line
    position x_des_O = (1-t_new)*x0_O + t_new*z_O, and the rest U moves by the Gaussian conditional-mean
    shift delta_U = delta_O M^T (M = Sigma_UO Sigma_OO^-1 under the noise covariance Sigma_reg), unless some
    |delta_U| in the batch exceeds max_correction. For t_new <= threshold the model runs free, so the chunk
    can settle on what the model predicts (the "soft" part).
    """

    def __init__(self, sigma_reg: np.ndarray | Tensor, *, dim: int = MODEL_DIM,
                 threshold: float = INPAINT_TIME_THRESHOLD, max_correction: float = INPAINT_MAX_CORRECTION,
                 per_sample_guard: bool = False) -> None:
        """`sigma_reg` is the (H*D, H*D) noise covariance, the same one the noise is drawn from.

        `per_sample_guard`: decide the max_correction skip per batch row instead of once for the whole batch (the
        reference's rule). A server batching unrelated clients uses it, so a client's chunk does not depend on
        who shares its batch; at batch size 1 both rules are the same.
        """
        sigma = torch.as_tensor(sigma_reg).detach().to(device="cpu", dtype=torch.float64)
        if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1] or sigma.shape[0] % dim:
            raise ValueError(f"sigma_reg must be square with a size divisible by dim={dim}, got {tuple(sigma.shape)}")
        self._sigma = sigma
        self.dim = dim
        self.horizon = sigma.shape[0] // dim
        self.threshold = threshold
        self.max_correction = max_correction
        self.per_sample_guard = per_sample_guard
        self._maps: dict[tuple[int, int], Tensor] = {}  # (k, dim) -> float64 CPU M
        self._device_maps: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def for_noise(cls, noise: CorrelatedNoise, **kwargs: Any) -> Inpainter:
        """An inpainter using `noise`'s Sigma_reg, horizon and dim (keyword args go to __init__)."""
        return cls(noise.covariance, dim=noise.dim, **kwargs)

    def conditional_map(self, num_kept: int) -> Tensor:
        """M = Sigma_UO Sigma_OO^-1 (float64, CPU, shape (F - k*D, k*D)), computed once per (k, dim).

        Sigma_OO gets eps = 1e-6*max(mean diag, 1) on the diagonal and is inverted by a Cholesky solve;
        raises ValueError if it is still not positive definite.
        """
        if not 1 <= num_kept < self.horizon:
            raise ValueError(f"number of kept rows must be in [1, {self.horizon - 1}], got {num_kept}")
        key = (num_kept, self.dim)
        if key not in self._maps:
            o = num_kept * self.dim
            s_oo, s_uo = self._sigma[:o, :o], self._sigma[o:, :o]
            eps = 1e-6 * max(float(s_oo.diagonal().mean()), 1.0)
            chol_oo, info = torch.linalg.cholesky_ex(s_oo + eps * torch.eye(o, dtype=torch.float64, device="cpu"))
            if int(info) != 0:
                raise ValueError(f"Sigma_OO for k={num_kept} is not positive definite")
            # M^T = Sigma_OO^-1 Sigma_OU (Sigma symmetric), so one solve with Sigma_UO^T as right-hand side.
            self._maps[key] = torch.cholesky_solve(s_uo.T.contiguous(), chol_oo).T.contiguous()
        return self._maps[key]

    def _device_map(self, num_kept: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (num_kept, self.dim, device, dtype)
        if key not in self._device_maps:  # one host-to-device copy per (k, device, dtype), not per request
            self._device_maps[key] = self.conditional_map(num_kept).to(device=device, dtype=dtype)
        return self._device_maps[key]

    def start(self, x0_rows: Tensor, z: Tensor) -> InpaintState:
        """Prepare a request: `x0_rows` (B, k, D) normalized kept actions, `z` (B, H, D) the initial noise
        (the sampler's x at t = 1). The state lives on z's device and dtype."""
        if z.ndim != 3 or tuple(z.shape[1:]) != (self.horizon, self.dim):
            raise ValueError(f"z must have shape (B, {self.horizon}, {self.dim}), got {tuple(z.shape)}")
        if x0_rows.ndim != 3 or x0_rows.shape[0] != z.shape[0] or x0_rows.shape[2] != self.dim:
            raise ValueError(f"x0_rows must have shape ({z.shape[0]}, k, {self.dim}), got {tuple(x0_rows.shape)}")
        b, k, _ = x0_rows.shape
        return InpaintState(
            x0_BO=x0_rows.to(device=z.device, dtype=z.dtype).reshape(b, k * self.dim),
            z_BO=z[:, :k].reshape(b, k * self.dim),
            m_UO=self._device_map(k, z.device, z.dtype),
            num_kept=k,
        )

    def apply(self, x: Tensor, t_new: float, state: InpaintState) -> Tensor:
        """x (B, H, D) after the Euler step that reached time t_new -> the inpainted x (a new tensor).

        Returns x itself when t_new <= threshold. Otherwise the kept rows equal (1-t_new)*x0 + t_new*z
        exactly, and the other rows get delta_O M^T added if max |delta_U| over the whole batch is at most
        max_correction (else they are left as they are). No host sync: the guard is a torch.where.
        """
        t_new = float(t_new)
        if t_new <= self.threshold:
            return x
        with torch.autocast(x.device.type, enabled=False):  # the conditional shift is an fp32 solve (§4.1)
            return self._apply(x, t_new, state)

    def _apply(self, x: Tensor, t_new: float, state: InpaintState) -> Tensor:
        b, o = x.shape[0], state.num_kept * self.dim
        x_BF = x.reshape(b, -1)
        x_des_BO = (1.0 - t_new) * state.x0_BO + t_new * state.z_BO
        delta_BO = x_des_BO - x_BF[:, :o]
        delta_BU = delta_BO @ state.m_UO.mT
        # One decision for the whole batch, like the reference, unless per_sample_guard; a NaN delta also fails
        # the test and is skipped.
        if self.per_sample_guard:
            ok = (delta_BU.abs().amax(dim=1, keepdim=True) <= self.max_correction)
        else:
            ok = delta_BU.abs().amax() <= self.max_correction
        x_BU = torch.where(ok, x_BF[:, o:] + delta_BU, x_BF[:, o:])
        return torch.cat([x_des_BO.to(x.dtype), x_BU.to(x.dtype)], dim=1).reshape(x.shape)


def sample_loop(velocity_fn: VelocityFn, noise: Tensor, num_steps: int = DEFAULT_NUM_STEPS,
                inpaint: InpaintFn | None = None) -> Tensor:
    """Integrate dx/dt = v from t = 1 (x = noise, shape (B, H, D)) to t ~ 0 with `num_steps` Euler steps.

    velocity_fn(x, t) gets t as a float32 tensor of shape (B,) on x's device. After each step, `inpaint`
    (e.g. `lambda x, t: inpainter.apply(x, t, state)`) is called with the new time t_new as a Python float.
    x keeps noise's dtype. Returns the final x.
    """
    times, dt = time_grid(num_steps)
    times_host = times.tolist()  # float32 values, exact in float64: the inpaint branch needs no device sync
    t = times.to(noise.device)[0]
    x = noise
    for i in range(num_steps):
        v = velocity_fn(x, t.expand(noise.shape[0]))
        x, t = euler_step(x, v.to(x.dtype), t, dt)
        if inpaint is not None:
            x = inpaint(x, times_host[i + 1])
    return x
