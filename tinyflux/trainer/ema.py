"""Exponential moving average of a model's weights, kept in float32, updated with one fused foreach call per step."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tinyflux.model.loader import clean_name
from tinyflux.model.model import released_shapes

__all__ = ["EMA", "clean_name"]

# Wrappers add these path components to parameter names: DDP ("module."), torch.compile ("_orig_mod.").
FORMAT = "tinyflux-ema"


@dataclass
class _Bound:
    """A model's tensors in shadow order, looked up once per model so that a step does no name lookups."""

    model: weakref.ref
    params: list[Tensor]
    buffers: list[Tensor]
    same_device: bool  # every parameter on the shadow's device
    fused: bool  # and float32 too: one _foreach_lerp_ does the update


def _named_floats(model: nn.Module, trainable_only: bool = False) -> tuple[dict[str, nn.Parameter], dict[str, Tensor]]:
    """Floating parameters and persistent buffers of model, by clean name; with trainable_only, the parameters that
    train (a LoRA run's adapters) and no buffer."""
    params = {clean_name(n): p for n, p in model.named_parameters() if p.is_floating_point()}
    if trainable_only:
        return {n: p for n, p in params.items() if p.requires_grad}, {}
    state_keys = {clean_name(k) for k in model.state_dict()}
    buffers = {clean_name(n): b for n, b in model.named_buffers() if clean_name(n) in state_keys}
    return params, buffers


class EMA:
    """Float32 shadow of every floating parameter of a model, trainable or frozen.

    Frozen parameters are shadowed too (their average is themselves), so the shadow is always a complete set of
    weights; with trainable_only=True (a LoRA run: the base is frozen) only the parameters that train are shadowed,
    so the EMA and its file are the adapter's size. Persistent buffers are not averaged but copied at each update, so that save() writes a full state dict.
    Names are the model's state-dict names with DDP ("module.") and torch.compile ("_orig_mod.") components
    stripped, so an EMA built on a wrapped model applies to the bare one and the reverse.

    update: shadow <- decay * shadow + (1 - decay) * param, done as torch._foreach_lerp_ over all tensors at once.
    With warmup=True the decay of update n (0-based count of previous updates) is min(decay, (1 + n) / (10 + n)),
    so early averages are not dominated by the random init; off by default, as in the spec.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False, trainable_only: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay={decay} must lie in [0, 1]")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.trainable_only = trainable_only
        params, buffers = _named_floats(model, trainable_only)
        self.shadow: dict[str, Tensor] = {n: p.detach().float().clone() for n, p in params.items()}
        self.buffers: dict[str, Tensor] = {n: b.detach().clone() for n, b in buffers.items()}
        self.backup: list[Tensor] | None = None
        self._bound: _Bound | None = None

    def _bind(self, model: nn.Module) -> _Bound:
        """model's tensors in shadow order, cached for the last model seen; to() clears the cache."""
        if self._bound is not None and self._bound.model() is model:
            return self._bound
        params, buffers = _named_floats(model, self.trainable_only)
        missing = sorted((set(self.shadow) - set(params)) | (set(self.buffers) - set(buffers)))
        extra = sorted((set(params) - set(self.shadow)) | (set(buffers) - set(self.buffers)))
        if missing or extra:
            raise ValueError(
                f"model does not match this EMA: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}; build the EMA from this model's architecture"
            )
        p_list = [params[n] for n in self.shadow]
        b_list = [buffers[n] for n in self.buffers]
        same_device = all(p.device == t.device for p, t in zip(p_list, self.shadow.values(), strict=True))
        fused = same_device and all(p.dtype == torch.float32 for p in p_list)
        self._bound = _Bound(weakref.ref(model), p_list, b_list, same_device, fused)
        return self._bound

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, skip: bool = False) -> None:
        """Move the shadow toward the model's current weights by (1 - decay); copy persistent buffers.

        skip: this update changes nothing but still counts (warm-up follows the step count)."""
        bound = self._bind(model)
        if not bound.same_device:
            device = bound.params[0].device
            raise ValueError(
                f"EMA shadow is on {next(iter(self.shadow.values())).device} but the model is on {device}; "
                f"call ema.to({str(device)!r}) after moving the model"
            )
        if skip:
            self.num_updates += 1
            return
        weight = 1.0 - self.current_decay()
        shadow = list(self.shadow.values())
        if bound.fused:
            torch._foreach_lerp_(shadow, bound.params, weight)
        else:
            # Low-precision (bf16) weights: lerp needs matching dtypes, mul + add promotes to the fp32 shadow.
            torch._foreach_mul_(shadow, 1.0 - weight)
            torch._foreach_add_(shadow, bound.params, alpha=weight)
        if bound.buffers:
            torch._foreach_copy_(list(self.buffers.values()), bound.buffers)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow into the model's parameters (cast to their dtype); permanent."""
        bound = self._bind(model)
        torch._foreach_copy_(bound.params, list(self.shadow.values()))
        if bound.buffers:
            torch._foreach_copy_(bound.buffers, list(self.buffers.values()))

    @torch.no_grad()
    def apply_shadow(self, model: nn.Module) -> None:
        """Swap the EMA weights into the model, keeping a copy of its own to put back with restore()."""
        if self.backup is not None:
            raise RuntimeError("EMA weights are already applied; call restore(model) before apply_shadow again")
        params = self._bind(model).params
        self.backup = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, list(self.shadow.values()))

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the weights that apply_shadow() replaced."""
        if self.backup is None:
            raise RuntimeError("nothing to restore: call apply_shadow(model) first")
        torch._foreach_copy_(self._bind(model).params, self.backup)
        self.backup = None

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow (e.g. next to the model after it moved, so updates take the fused same-device path)."""
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        self.buffers = {n: t.to(device) for n, t in self.buffers.items()}
        self._bound = None
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """Flat dict of tensors (safetensors-friendly): "shadow.<name>", "buffer.<name>", "decay", "num_updates"."""
        state = {f"shadow.{n}": t for n, t in self.shadow.items()}
        state.update({f"buffer.{n}": t for n, t in self.buffers.items()})
        state["decay"] = torch.tensor(self.decay, dtype=torch.float64)
        state["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what state_dict() wrote; the names must match this EMA's model."""
        shadow = {k.removeprefix("shadow."): v for k, v in state.items() if k.startswith("shadow.")}
        buffers = {k.removeprefix("buffer."): v for k, v in state.items() if k.startswith("buffer.")}
        self._load_tensors(shadow, buffers, source="state dict")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])

    def _load_tensors(self, shadow: dict[str, Tensor], buffers: dict[str, Tensor], source: str) -> None:
        missing = sorted((set(self.shadow) - set(shadow)) | (set(self.buffers) - set(buffers)))
        extra = sorted((set(shadow) - set(self.shadow)) | (set(buffers) - set(self.buffers)))
        if missing or extra:
            raise ValueError(f"EMA {source} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, t in shadow.items():
            if t.dim() == 0 and self.shadow[n].shape == (1,):  # a released 0-dim scalar (model.SCALAR_PARAMETERS)
                t = t.reshape(1)
            if t.shape != self.shadow[n].shape:
                raise ValueError(
                    f"EMA {source}: {n} has shape {tuple(t.shape)}, model has {tuple(self.shadow[n].shape)}"
                )
            self.shadow[n].copy_(t)
        for n, t in buffers.items():
            self.buffers[n].copy_(t)

    def save(self, path: str, dtype: torch.dtype = torch.bfloat16) -> None:
        """Write the EMA weights as a model state dict (keys = the bare model's names) to a safetensors file.

        Floating tensors are cast to dtype; decay and num_updates go into the file's metadata. The file loads like
        any model checkpoint (tinyflux.model.loader.load_model) or back into an EMA with EMA.load.
        """
        tensors = {n: t.detach().to(dtype).cpu().contiguous() for n, t in self.shadow.items()}
        for n, b in self.buffers.items():
            b = b.to(dtype) if b.is_floating_point() else b
            tensors[n] = b.detach().cpu().contiguous()
        released_shapes(tensors)  # the released checkpoints' 0-dim scalars: the original's loader reads the file too
        metadata = {"format": FORMAT, "decay": repr(self.decay), "num_updates": str(self.num_updates)}
        if self.trainable_only:
            metadata["trainable_only"] = "true"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str, model: nn.Module) -> EMA:
        """An EMA for model whose shadow is read from a file written by save() (or any matching model checkpoint).

        decay, num_updates and trainable_only come from the file's metadata when present (else decay 0.9999, 0
        updates, every parameter). The shadow
        is float32 again, but holds only the precision the file was saved with.
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"EMA file {path} not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            raw = load_file(str(path))
        except SafetensorError as e:
            raise ValueError(
                f"EMA file {path} is not a readable safetensors file ({e}); re-save or re-download it"
            ) from e
        trainable_only = metadata.get("trainable_only") == "true"
        ema = cls(model, decay=float(metadata.get("decay", 0.9999)), trainable_only=trainable_only)
        tensors = {clean_name(k): v for k, v in raw.items()}
        shadow = {n: t for n, t in tensors.items() if n in ema.shadow}
        buffers = {n: t for n, t in tensors.items() if n not in ema.shadow}
        ema._load_tensors(shadow, buffers, source=f"file {path}")
        ema.num_updates = int(metadata.get("num_updates", 0))
        return ema
