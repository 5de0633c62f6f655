"""The MFU numerator: the weight matmuls one token meets, against a count of every nn.Linear call of a forward; the
denominator: the peak of a GPU by its name."""

import pytest
import torch
from torch import nn

from tinyflux.model.model import TinyFluxConfig, TinyFluxDeep
from tinyflux.trainer.metrics import StreamParams, flops_per_sample, peak_bf16_tflops


def counted_macs_per_token(model: TinyFluxDeep, image_side: int, text_tokens: int) -> float:
    cfg, macs = model.config, 0

    def count(module: nn.Linear, inputs, _output) -> None:
        nonlocal macs
        rows = inputs[0].numel() // module.in_features
        macs += rows * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Linear)]
    n = image_side**2
    with torch.no_grad():
        model(
            torch.randn(1, n, cfg.token_channels),
            torch.randn(1, text_tokens, cfg.num_t5_layers, cfg.t5_hidden_size),
            torch.randn(1, cfg.pooled_projection_dim),
            torch.rand(1),
            TinyFluxDeep.create_img_ids(1, image_side, image_side),
        )
    for h in hooks:
        h.remove()
    return macs / (n + text_tokens)


@pytest.mark.parametrize("sharing", [False, True])
def test_per_token_params_match_the_linear_calls_of_a_forward(sharing):
    with torch.device("meta"):  # no memory, no compute: shapes are all the count needs
        model = TinyFluxDeep(TinyFluxConfig.preset("deep", use_cross_attention_sharing=sharing))
        counted = counted_macs_per_token(model, 32, 128)
    per_token = StreamParams.of(model).per_token(32 * 32, 128)
    # Only the once-per-sample linears (modulation, expert MLPs, embedders) are left out: < 0.1% at 1152 tokens.
    assert per_token == pytest.approx(counted, rel=1e-3)
    assert per_token < 0.6 * sum(p.numel() for p in model.parameters())  # the old count used all parameters
    # The issue's ~1.2 TFLOP per sample for `deep` at 256 px (1024 image + 128 text tokens).
    assert flops_per_sample(per_token, 1024, 128, 40, 512) == pytest.approx(1.197e12, rel=2e-3)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", None),  # not an A10, and not in the table: no MFU unless peak_tflops is set
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_the_peak_of_a_gpu_is_looked_up_by_its_whole_name(name, tflops):
    assert peak_bf16_tflops(name) == tflops
