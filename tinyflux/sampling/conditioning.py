"""The text conditioning the student reads, and its null: what classifier-free guidance contrasts with at sampling and
what text dropout swaps in during training (both import it from here, so they agree by construction)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NULL_TEXT_TOKENS = 1  # the null conditioning: this many all-zero T5 tokens (mask True), zero CLIP pooled


@dataclass
class TextConditioning:
    """What the model reads of a prompt: T5 states (B, L, K, D), their mask (B, L) (True = real), CLIP pooled (B, P)."""

    t5: Tensor
    mask: Tensor
    pooled: Tensor


def null_text(batch_size: int, length: int, t5_shape: tuple[int, int], pooled_dim: int) -> TextConditioning:
    """The null conditioning that CFG contrasts with: zero T5 states (only the first NULL_TEXT_TOKENS marked real),
    zero CLIP pooled. The trainer's text dropout must produce the same thing (see drop_text)."""
    mask = torch.zeros(batch_size, length, dtype=torch.bool)
    mask[:, :NULL_TEXT_TOKENS] = True
    t5 = torch.zeros(batch_size, length, *t5_shape)
    return TextConditioning(t5, mask, torch.zeros(batch_size, pooled_dim))


def drop_text(t5: Tensor, mask: Tensor, pooled: Tensor, drop: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Text dropout for CFG training: replace the samples where drop (B,) is True by the null conditioning.

    t5 (B, L, K, D) or (B, L, D), mask (B, L) bool, pooled (B, P) -> the same shapes; L must be >= NULL_TEXT_TOKENS.
    """
    d = drop.bool()
    t5 = torch.where(d.view(-1, *[1] * (t5.dim() - 1)), 0.0, t5)
    null_mask = torch.zeros_like(mask, dtype=torch.bool)
    null_mask[:, :NULL_TEXT_TOKENS] = True
    mask = torch.where(d[:, None], null_mask, mask.bool())
    pooled = torch.where(d[:, None], 0.0, pooled)
    return t5, mask, pooled
