"""Velocity loss weighting, Huber, min-SNR closed forms, and the Lune / Sol distillation losses."""

import pytest
import torch
import torch.nn.functional as F

from tinyflux.trainer.losses import (
    compute_lune_loss,
    compute_main_loss,
    compute_sol_loss,
    huber_loss,
    min_snr_weight,
    spatial_token_weights,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_huber_closed_form_and_smooth():
    pred = torch.tensor([0.0, 0.05, 0.3, -1.0])
    target = torch.zeros(4)
    expected = torch.tensor([0.0, 0.5 * 0.05**2, 0.1 * (0.3 - 0.05), 0.1 * (1.0 - 0.05)])
    torch.testing.assert_close(huber_loss(pred, target, 0.1, reduction="none"), expected)
    torch.testing.assert_close(huber_loss(pred, target, 0.1), expected.mean())
    smooth = huber_loss(pred, target, 0.1, smooth=True, reduction="none")
    torch.testing.assert_close(smooth, 0.01 * (torch.sqrt(1 + (pred / 0.1) ** 2) - 1))
    with pytest.raises(ValueError, match="delta"):
        huber_loss(pred, target, 0.0)


def test_main_loss_plain_mse_and_huber():
    pred, target = rand(2, 16, 4), rand(2, 16, 4, seed=1)
    torch.testing.assert_close(compute_main_loss(pred, target, use_huber=False), F.mse_loss(pred, target))
    torch.testing.assert_close(compute_main_loss(pred, target, huber_delta=0.2), F.huber_loss(pred, target, delta=0.2))
    per = compute_main_loss(pred, target, use_huber=False, reduction="none")
    assert per.shape == (2,)
    torch.testing.assert_close(per, (pred - target).square().mean(dim=(1, 2)))


def test_main_loss_mask_weights_fg_and_bg():
    pred, target = torch.zeros(1, 4, 2), torch.ones(1, 4, 2)  # squared error 1 everywhere
    mask = torch.tensor([[[True, False], [False, False]]])
    loss = compute_main_loss(pred, target, mask=mask, use_huber=False, fg_weight=2.0, bg_weight=0.5)
    torch.testing.assert_close(loss, torch.tensor((2.0 + 3 * 0.5) / 4))
    # the mask is on the token grid: token 0 is (y=0, x=0)
    target2 = torch.ones(1, 4, 2)
    target2[0, 1:] = 0
    only_fg = compute_main_loss(pred, target2, mask=mask, use_huber=False)
    torch.testing.assert_close(only_fg, torch.tensor(2.0 / 4))
    with pytest.raises(ValueError, match="token grid"):
        compute_main_loss(pred, target, mask=torch.ones(1, 3, 3, dtype=torch.bool))


def test_spatial_weights_mean_one_and_uniform_is_identity():
    spatial = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    spatial = spatial / spatial.sum(dim=(1, 2), keepdim=True)
    w = spatial_token_weights(spatial, (16, 16))
    assert w.shape == (3, 256)
    torch.testing.assert_close(w.mean(dim=1), torch.ones(3))
    pred, target = rand(3, 256, 4), rand(3, 256, 4, seed=1)
    uniform = torch.full((3, 8, 8), 1 / 64)
    torch.testing.assert_close(
        compute_main_loss(pred, target, spatial_weights=uniform), compute_main_loss(pred, target)
    )
    # weight on one corner: the loss follows that corner's token errors
    corner = torch.zeros(1, 8, 8)
    corner[0, 0, 0] = 1.0
    err = torch.zeros(1, 64, 1)
    err[0, 0] = 1.0
    weighted = compute_main_loss(err, torch.zeros_like(err), spatial_weights=corner, use_huber=False, grid_size=(8, 8))
    assert weighted.item() == pytest.approx(1.0)


def test_snr_weights_scale_per_sample():
    pred, target = rand(2, 9, 3), rand(2, 9, 3, seed=1)
    base = compute_main_loss(pred, target, reduction="none")
    w = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(compute_main_loss(pred, target, snr_weights=w, reduction="none"), base * w)
    torch.testing.assert_close(compute_main_loss(pred, target, snr_weights=w), (base * w).mean())


@pytest.mark.parametrize(
    ("t", "gamma", "expected"),
    [
        (0.5, 5.0, 1.0),  # SNR 1 <= gamma: full weight
        (0.25, 5.0, 1.0),  # SNR 1/9
        (0.9, 5.0, 5 / 81),  # SNR 81 > gamma: gamma / SNR
        (0.75, 5.0, 5 / 9),  # SNR 9
        (0.75, 20.0, 1.0),
        (0.0, 5.0, 1.0),  # pure noise: full weight, so the shift toward noise is not undone
        (1.0, 5.0, 0.0),
    ],
)
def test_min_snr_weight_closed_forms(t, gamma, expected):
    assert min_snr_weight(torch.tensor([t]), gamma).item() == pytest.approx(expected, abs=1e-6)


def test_min_snr_weight_matches_definition_and_is_finite():
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    snr = (t / (1 - t)) ** 2
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    torch.testing.assert_close(min_snr_weight(t, 5.0), expected.float())
    assert torch.isfinite(min_snr_weight(torch.tensor([0.0, 1.0]))).all()
    # Full weight up to t = sqrt(gamma) / (1 + sqrt(gamma)), then decreasing toward data.
    knee = 5**0.5 / (1 + 5**0.5)
    assert min_snr_weight(torch.tensor([knee - 1e-3]), 5.0).item() == 1.0
    assert min_snr_weight(torch.tensor([knee + 0.05]), 5.0).item() < 1.0


def test_lune_loss_modes():
    pred, target = rand(3, 64), rand(3, 64, seed=1)
    cos = F.cosine_similarity(pred, target, dim=1)
    torch.testing.assert_close(compute_lune_loss(pred, target), (1 - cos).mean())
    assert compute_lune_loss(2.5 * target, target).item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(compute_lune_loss(pred, target, "mse"), F.mse_loss(pred, target))
    torch.testing.assert_close(compute_lune_loss(pred, target, "huber"), F.huber_loss(pred, target, delta=1.0))
    assert compute_lune_loss(pred, target, reduction="none").shape == (3,)
    with pytest.raises(ValueError, match="unknown lune loss mode 'l1'.*cosine"):
        compute_lune_loss(pred, target, "l1")


def test_sol_loss_terms_and_scale():
    stats, spatial = torch.rand(2, 4), torch.full((2, 8, 8), 1 / 64)
    assert compute_sol_loss(stats, spatial, stats, spatial).item() == 0.0
    target_stats = stats + 0.1
    only_stats = compute_sol_loss(stats, spatial, target_stats, spatial)
    assert only_stats.item() == pytest.approx(0.01, rel=1e-4)
    peaked = torch.zeros(2, 8, 8)
    peaked[:, 0, 0] = 1.0
    # relative to uniform (x64): one cell at 64 vs 1, 63 cells at 0 vs 1 -> (63^2 + 63) / 64 = 63
    only_spatial = compute_sol_loss(stats, peaked, stats, spatial)
    assert only_spatial.item() == pytest.approx(63.0, rel=1e-4)
    weighted = compute_sol_loss(stats, peaked, target_stats, spatial, weights={"stats": 2.0, "spatial": 0.5})
    assert weighted.item() == pytest.approx(2 * 0.01 + 0.5 * 63.0, rel=1e-4)
    assert compute_sol_loss(stats, peaked, target_stats, spatial, reduction="none").shape == (2,)
    with pytest.raises(ValueError, match="unknown Sol loss weight"):
        compute_sol_loss(stats, spatial, stats, spatial, weights={"map": 1.0})


def test_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        compute_main_loss(rand(1, 4, 2), rand(1, 4, 2), reduction="sum")
