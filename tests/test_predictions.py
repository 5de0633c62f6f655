"""Flow, v- and eps-prediction math: round trips and closed forms."""

import pytest
import torch

from tinyflux.util import predictions as P


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    return data, noise


def test_flow_endpoints(tensors):
    data, noise = tensors
    torch.testing.assert_close(P.flow_x_t(data, noise, 0.0), noise)
    torch.testing.assert_close(P.flow_x_t(data, noise, 1.0), data)
    torch.testing.assert_close(P.flow_x_t(data, noise, 0.25), 0.75 * noise + 0.25 * data)
    torch.testing.assert_close(P.flow_velocity(data, noise), data - noise)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)])
def test_flow_round_trip(tensors, t):
    data, noise = tensors
    x_t = P.flow_x_t(data, noise, t)
    v = P.flow_velocity(data, noise)
    torch.testing.assert_close(P.flow_data_from_velocity(x_t, v, t), data)
    torch.testing.assert_close(P.flow_noise_from_velocity(x_t, v, t), noise)


def test_per_sample_t_broadcasts_over_batch(tensors):
    data, noise = tensors
    t = torch.tensor([0.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    x_t = P.flow_x_t(data, noise, t)
    torch.testing.assert_close(x_t[0], noise[0])
    torch.testing.assert_close(x_t[1], data[1])
    torch.testing.assert_close(x_t[2], 0.5 * (data[2] + noise[2]))


@pytest.mark.parametrize("alpha", [0.05, 0.5, 0.97, torch.tensor([0.01, 0.3, 0.7, 0.999], dtype=torch.float64)])
def test_vpred_and_eps_round_trips(tensors, alpha):
    data, noise = tensors
    x_t = P.vpred_x_t(data, noise, alpha)
    torch.testing.assert_close(P.eps_x_t(data, noise, alpha), x_t)
    v = P.vpred_velocity(data, noise, alpha)
    torch.testing.assert_close(P.vpred_data_from_velocity(x_t, v, alpha), data)
    torch.testing.assert_close(P.vpred_noise_from_velocity(x_t, v, alpha), noise)
    torch.testing.assert_close(P.eps_target(noise), noise)
    torch.testing.assert_close(P.eps_data_from_noise(x_t, noise, alpha), data)
    torch.testing.assert_close(P.eps_to_vpred(noise, x_t, alpha), v)
    torch.testing.assert_close(P.vpred_to_eps(v, x_t, alpha), noise)
    torch.testing.assert_close(P.eps_to_vpred(P.vpred_to_eps(v, x_t, alpha), x_t, alpha), v)


def test_vp_closed_form_at_alpha_quarter(tensors):
    data, noise = tensors
    torch.testing.assert_close(P.vpred_x_t(data, noise, 0.25), 0.5 * data + 0.75**0.5 * noise)
    torch.testing.assert_close(P.vpred_velocity(data, noise, 0.25), 0.5 * noise - 0.75**0.5 * data)


def test_flow_t_to_alpha_matches_snr(tensors):
    data, noise = tensors
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    alpha = P.flow_t_to_alpha(t)
    torch.testing.assert_close(alpha / (1 - alpha), (t / (1 - t)) ** 2)
    # the rectified-flow x_t is the VP x_t at that alpha scaled by sqrt(t^2 + (1-t)^2)
    scale = (t**2 + (1 - t) ** 2).sqrt()
    torch.testing.assert_close(
        P.flow_x_t(data[:3], noise[:3], t), scale.view(-1, 1, 1, 1) * P.vpred_x_t(data[:3], noise[:3], alpha)
    )
    assert P.flow_t_to_alpha(0.5) == pytest.approx(0.5)
