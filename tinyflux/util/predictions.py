"""Flow math: rectified flow (what TinyFlux trains), and v- / eps-prediction for reference and conversion.

Conventions
- Rectified flow: x_t = (1 - t) * noise + t * data, velocity v = data - noise; t = 1 is data, t = 0 is pure noise.
- v- and eps-prediction use the variance-preserving (DDPM) parameterisation with alpha = alpha_bar (the cumulative
  product, not the per-step alpha): x_t = sqrt(alpha) * data + sqrt(1 - alpha) * noise, so alpha = 1 is data.
  The v target is Salimans & Ho's v = sqrt(alpha) * noise - sqrt(1 - alpha) * data.

`t` and `alpha` may be Python floats, 0-d tensors, or per-sample tensors of shape (B,); a (B,) tensor is broadcast
over the remaining axes of the (B, ...) data. Every function is elementwise and dtype-preserving.
"""

from __future__ import annotations

from torch import Tensor

Scalar = float | Tensor


def _per_sample(s: Scalar, like: Tensor) -> Scalar:
    """A (B,) tensor becomes (B, 1, ..., 1) so that it broadcasts over a (B, ...) tensor; anything else passes."""
    if isinstance(s, Tensor) and s.ndim == 1 and like.ndim > 1:
        return s.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return s


def _sqrt(s: Scalar) -> Scalar:
    return s.sqrt() if isinstance(s, Tensor) else s**0.5


def flow_x_t(data: Tensor, noise: Tensor, t: Scalar) -> Tensor:
    """x_t = (1-t)*noise + t*data"""
    t = _per_sample(t, data)
    return (1 - t) * noise + t * data


def flow_velocity(data: Tensor, noise: Tensor) -> Tensor:
    """v = data - noise"""
    return data - noise


def flow_data_from_velocity(x_t: Tensor, v: Tensor, t: Scalar) -> Tensor:
    """data = x_t + (1-t)*v"""
    t = _per_sample(t, x_t)
    return x_t + (1 - t) * v


def flow_noise_from_velocity(x_t: Tensor, v: Tensor, t: Scalar) -> Tensor:
    """noise = x_t - t*v"""
    t = _per_sample(t, x_t)
    return x_t - t * v


def vpred_x_t(data: Tensor, noise: Tensor, alpha: Scalar) -> Tensor:
    """x_t = sqrt(alpha)*data + sqrt(1-alpha)*noise (alpha = alpha_bar; the same x_t as eps_x_t)."""
    alpha = _per_sample(alpha, data)
    return _sqrt(alpha) * data + _sqrt(1 - alpha) * noise


def vpred_velocity(data: Tensor, noise: Tensor, alpha: Scalar) -> Tensor:
    """v = sqrt(alpha)*noise - sqrt(1-alpha)*data"""
    alpha = _per_sample(alpha, data)
    return _sqrt(alpha) * noise - _sqrt(1 - alpha) * data


def vpred_data_from_velocity(x_t: Tensor, v: Tensor, alpha: Scalar) -> Tensor:
    """data = sqrt(alpha)*x_t - sqrt(1-alpha)*v (exact for any alpha, since alpha + (1-alpha) = 1)."""
    alpha = _per_sample(alpha, x_t)
    return _sqrt(alpha) * x_t - _sqrt(1 - alpha) * v


def vpred_noise_from_velocity(x_t: Tensor, v: Tensor, alpha: Scalar) -> Tensor:
    """noise = sqrt(1-alpha)*x_t + sqrt(alpha)*v"""
    alpha = _per_sample(alpha, x_t)
    return _sqrt(1 - alpha) * x_t + _sqrt(alpha) * v


def eps_x_t(data: Tensor, noise: Tensor, alpha: Scalar) -> Tensor:
    """x_t = sqrt(alpha)*data + sqrt(1-alpha)*noise (alpha = alpha_bar)."""
    return vpred_x_t(data, noise, alpha)


def eps_target(noise: Tensor) -> Tensor:
    """The eps-prediction target is the noise itself."""
    return noise


def eps_data_from_noise(x_t: Tensor, eps: Tensor, alpha: Scalar) -> Tensor:
    """data = (x_t - sqrt(1-alpha)*eps) / sqrt(alpha); undefined at alpha = 0 (pure noise)."""
    alpha = _per_sample(alpha, x_t)
    return (x_t - _sqrt(1 - alpha) * eps) / _sqrt(alpha)


def eps_to_vpred(eps: Tensor, x_t: Tensor, alpha: Scalar) -> Tensor:
    """v = (eps - sqrt(1-alpha)*x_t) / sqrt(alpha).

    From v = sqrt(a)*eps - sqrt(1-a)*data with data = (x_t - sqrt(1-a)*eps) / sqrt(a); undefined at alpha = 0.
    """
    alpha = _per_sample(alpha, x_t)
    return (eps - _sqrt(1 - alpha) * x_t) / _sqrt(alpha)


def vpred_to_eps(v: Tensor, x_t: Tensor, alpha: Scalar) -> Tensor:
    """eps = sqrt(1-alpha)*x_t + sqrt(alpha)*v (the noise recovered from v; exact for any alpha)."""
    return vpred_noise_from_velocity(x_t, v, alpha)


def flow_t_to_alpha(t: Scalar) -> Scalar:
    """The VP alpha_bar with the same signal-to-noise ratio as rectified-flow time t: t^2 / (t^2 + (1-t)^2).

    Rectified flow's x_t equals sqrt(t^2 + (1-t)^2) times the VP x_t at this alpha, so SNR = alpha / (1 - alpha)
    = (t / (1-t))^2 in both.
    """
    if isinstance(t, Tensor):
        return t.square() / (t.square() + (1 - t).square())
    return t * t / (t * t + (1 - t) * (1 - t))


__all__ = [
    "eps_data_from_noise",
    "eps_target",
    "eps_to_vpred",
    "eps_x_t",
    "flow_data_from_velocity",
    "flow_noise_from_velocity",
    "flow_t_to_alpha",
    "flow_velocity",
    "flow_x_t",
    "vpred_data_from_velocity",
    "vpred_noise_from_velocity",
    "vpred_to_eps",
    "vpred_velocity",
    "vpred_x_t",
]
