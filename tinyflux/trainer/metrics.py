"""Throughput and model-FLOPs utilisation (MFU) estimates for the training log.

FLOPs of one training sample (forward + backward), following the PaLM / Chinchilla accounting:

    flops_per_sample = 6 * P * S + 12 * n_layers * hidden_size * S^2

P: the weight matmul parameters one token meets on average (token_matmul_params: a double block's image weights see
only image tokens, its text weights only text tokens; the modulation and expert MLPs run once per sample and are left
out); S = image tokens + text tokens (the joint sequence every block attends over); n_layers = double + single blocks.
The first term is the matmuls with the weights (2 FLOPs per multiply-add, forward, and twice that backward); the
second is attention's QK^T and AV (each 2 * S^2 * hidden per layer forward, x3 with backward). It leaves out norms,
RoPE and softmax, and the recomputation of gradient checkpointing (MFU counts useful FLOPs only).

MFU = flops_per_sample * samples_per_second / (num_processes * peak_tflops * 1e12), against the dense bf16 peak of
the device: a float32 run therefore shows a low MFU by construction.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# Dense bf16 tensor-core peak TFLOP/s (vendor datasheets, no sparsity) by a word of torch.cuda.get_device_name, the
# more specific first: "NVIDIA H100 PCIe" is not an SXM H100, "NVIDIA L40" is not an L4.
PEAK_BF16_TFLOPS = {
    "H200 NVL": 836.0,
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,  # fp16: no bf16 tensor cores
}


@dataclass(frozen=True)
class StreamParams:
    """Linear-weight parameters of a TinyFluxDeep by the tokens that pass through them."""

    image: int  # img_in, the double blocks' image attention + MLP, the final projection
    text: int  # txt_in, the double blocks' text attention (own or shared) + MLP
    joint: int  # the single blocks' attention + MLP: every token

    @classmethod
    def of(cls, model: nn.Module) -> StreamParams:
        def weights(*modules: nn.Module | None) -> int:
            return sum(
                m.weight.numel()
                for mod in modules
                if mod is not None
                for m in mod.modules()
                if isinstance(m, nn.Linear)
            )

        image = weights(model.img_in, model.final_linear)
        text = weights(model.txt_in)
        for block in model.double_blocks:
            attn = block.attn
            image += weights(attn.img_qkv, attn.img_out, block.img_mlp)
            shared = model.shared_txt_attn
            text += weights(*((shared,) if shared is not None else (attn.txt_qkv, attn.txt_out)), block.txt_mlp)
        joint = sum(weights(block.attn, block.mlp) for block in model.single_blocks)
        return cls(image, text, joint)

    def per_token(self, image_tokens: int, text_tokens: int) -> float:
        """The P of 6 * P * S: multiply-adds per token, averaged over the joint sequence."""
        return (self.image * image_tokens + self.text * text_tokens) / (image_tokens + text_tokens) + self.joint


def flops_per_sample(
    num_params: float, image_tokens: int, text_tokens: int, num_layers: int, hidden_size: int
) -> float:
    """Training FLOPs of one sample (forward + backward); see the module docstring for the formula."""
    seq = image_tokens + text_tokens
    return 6.0 * num_params * seq + 12.0 * num_layers * hidden_size * seq**2


def device_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known CUDA device, else None (no MFU on CPU or unknown GPUs unless configured)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_bf16_tflops(torch.cuda.get_device_name(device))


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (torch.cuda.get_device_name), or None when it is not in the table."""
    for fragment, tflops in PEAK_BF16_TFLOPS.items():
        if re.search(rf"\b{re.escape(fragment)}\b", device_name):
            return tflops
    return None


def mfu(flops: float, samples_per_second: float, num_processes: int, peak_tflops: float) -> float:
    """Fraction of the peak the run achieves, over all processes."""
    return flops * samples_per_second / (num_processes * peak_tflops * 1e12)


class StepMeter:
    """What happened since the last log: the loss parts of each optimizer step, samples, FLOPs, the last grad norm.
    Values stay on the device until summary(), so the steps in between never wait for it."""

    def __init__(self, samples_seen: int = 0):
        self.reset(samples_seen)

    def reset(self, samples_seen: int) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.kept: torch.Tensor | float = 0.0  # steps whose parts count in the means (finite ones)
        self.flops = 0.0
        self.grad_norm: torch.Tensor | None = None
        self.start = (time.perf_counter(), samples_seen)

    def add_batch(self, flops: float) -> None:
        self.flops += flops

    def add_step(
        self, parts: dict[str, torch.Tensor], grad_norm: torch.Tensor | None, skip: bool | torch.Tensor = False
    ) -> None:
        """One optimizer step's loss parts; a skipped (non-finite) step counts as a step but not in the means. `skip`
        may be a bool tensor on the device: it is not read here."""
        on_device = isinstance(skip, torch.Tensor)  # a Python bool is not copied to the device
        for name, value in parts.items():
            counted = torch.where(skip, 0.0, value) if on_device else torch.zeros_like(value) if skip else value
            self.sums[name] = self.sums.get(name, 0.0) + counted
        self.kept = self.kept + ((~skip).float() if on_device else float(not skip))
        self.steps += 1
        self.grad_norm = grad_norm

    def summary(self, samples_seen: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """{"loss", "loss/<part>": means over the steps (reduce averages them over processes), "grad_norm",
        "samples_per_sec", "flops_per_sample"}; {} when no step was taken."""
        if not self.steps:
            return {}
        names = sorted(self.sums)
        means = reduce(torch.stack([self.sums[n] for n in names]) / self.kept).tolist()
        values = {("loss" if n == "loss" else f"loss/{n}"): v for n, v in zip(names, means, strict=True)}
        samples = samples_seen - self.start[1]
        values["samples_per_sec"] = samples / max(time.perf_counter() - self.start[0], 1e-9)
        values["flops_per_sample"] = self.flops / max(samples, 1)
        if self.grad_norm is not None:
            values["grad_norm"] = float(self.grad_norm)
        return values
