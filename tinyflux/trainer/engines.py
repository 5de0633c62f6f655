"""What differs between the engines accelerate runs TinyFlux on: one process, DDP, FSDP2, DeepSpeed ZeRO-2 / ZeRO-3.

The Trainer asks this module rather than accelerate's distributed_type:
- which engine the launch asked for and which one accelerate built (a CPU launch of fsdp.yaml gets DDP: it says so),
- the engine settings that TrainerConfig owns (DeepSpeed's clipping, micro-batch and accumulation; FSDP2's gradient
  reduction dtype), so that an accelerate config cannot silently contradict the run's config,
- the consolidated weights a checkpoint exports (model.safetensors, ema.safetensors), gathered onto the main process
  once per save while the resumable state stays sharded,
- the EMA on sharded parameters: under FSDP2 each process keeps the shard of the shadow that matches its parameter
  shards (the update is local); under ZeRO-3 the parameters are gathered for the update.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType
from torch import Tensor, nn

from tinyflux.errors import TinyFluxError
from tinyflux.trainer.config import TrainerConfig
from tinyflux.trainer.ema import EMA, clean_name

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

logger = logging.getLogger(__name__)


class EngineError(TinyFluxError, RuntimeError):
    """A launch whose engine cannot run here, or whose accelerate config contradicts the TrainerConfig."""


@dataclass(frozen=True)
class Engine:
    """The engine accelerate built for this run."""

    name: str  # "single", "ddp", "fsdp2" or "deepspeed"
    zero_stage: int = 0  # DeepSpeed's ZeRO stage (0 for the other engines)

    @property
    def shards_parameters(self) -> bool:
        """No process holds the whole model between steps (FSDP2, ZeRO-3)."""
        return self.name == "fsdp2" or self.zero_stage == 3

    @property
    def saves_model_weights(self) -> bool:
        """accelerate's save_state writes model.safetensors itself (one process, DDP); the others need an export."""
        return self.name in ("single", "ddp")

    def __str__(self) -> str:
        return f"deepspeed-zero{self.zero_stage}" if self.name == "deepspeed" else self.name


def state_format(engine: Engine) -> str:
    """The format of the accelerate state `engine` saves, as checkpoint.saved_engine names it."""
    return engine.name if engine.name in ("fsdp2", "deepspeed") else "whole"


def requested_engine() -> str | None:
    """The engine `accelerate launch` was asked for by its config file: "deepspeed", "fsdp", or None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


def check_installed() -> None:
    """Fail before accelerate does, with what to do, when the launch asks for DeepSpeed and it is not installed."""
    if requested_engine() == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise EngineError(
            "this launch uses DeepSpeed (accelerate config with distributed_type: DEEPSPEED) but the deepspeed "
            "package is not installed: pip install deepspeed (it builds against your CUDA toolkit). TinyFlux does not "
            "require it; without it, launch with accelerate_configs/fsdp.yaml (FSDP2) or multi_gpu.yaml (DDP)."
        )


def engine_of(accelerator: Accelerator) -> Engine:
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return Engine("deepspeed", int(accelerator.state.deepspeed_plugin.zero_stage))
    if kind == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise EngineError(
                "the accelerate config selects FSDP version 1; TinyFlux trains with FSDP2 (per-parameter sharding, "
                "DTensor EMA, sharded checkpoints that reshard on resume): set fsdp_version: 2 as in "
                "accelerate_configs/fsdp.yaml"
            )
        return Engine("fsdp2")
    return Engine("ddp" if accelerator.num_processes > 1 else "single")


def configure(accelerator: Accelerator, config: TrainerConfig) -> Engine:
    """Check the engine accelerate built against the one requested, and hand it the settings TrainerConfig owns.
    Call once, after the Accelerator exists and before accelerator.prepare."""
    engine = engine_of(accelerator)
    requested = requested_engine()
    if requested == "fsdp" and engine.name != "fsdp2" or requested == "deepspeed" and engine.name != "deepspeed":
        # accelerate turns FSDP / DeepSpeed on only for GPU-type launches; with cpu=True it builds MULTI_CPU (DDP).
        logger.warning(
            "the accelerate config asks for %s, but accelerate enables it only on GPUs (or other accelerators): "
            "this run on %s uses %s, and every process holds the whole model",
            requested.upper() if requested == "fsdp" else "DeepSpeed",
            accelerator.device.type,
            "DDP over gloo" if engine.name == "ddp" else "a single process",
        )
    if engine.name == "fsdp2" and config.mixed_precision != "no":
        accelerator.state.fsdp_plugin.mixed_precision_policy = fsdp_mixed_precision(config.dtype)
    if engine.name == "fsdp2":
        # The velocity comes out of nn.Linear on (B, N, D) as a view of its 2-D product. FSDP2 warns that an in-place
        # op on it would skip its pre-backward hook; the Trainer applies none (train_step only reads it).
        warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(FSDPTinyFluxDeep\) returned a view tensor")
    if engine.name == "deepspeed":
        fill_deepspeed_config(accelerator.state.deepspeed_plugin, config)
    logger.info("engine: %s, %d process(es)", engine, accelerator.num_processes)
    return engine


def fsdp_mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """FSDP2's policy for a `dtype` run: parameters gathered in `dtype`, gradients reduced in float32, inputs as given.

    accelerate's default reduces gradients in bf16; averaging over many ranks in bf16 loses bits that DDP (float32
    all-reduce) keeps, so they are reduced in float32 as torchtitan does. FSDP2 would also cast every floating input
    of every wrapped module to `dtype` (cast_forward_inputs): the timestep (0.99931 -> 1.0, which moves its sinusoidal
    embedding by up to 1) and the RoPE angles that the model keeps in float32 on purpose, as DDP's autocast and the
    sampler do. The Trainer runs the forward under the run's autocast, which casts what the matmuls need."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def fill_deepspeed_config(plugin: DeepSpeedPlugin, config: TrainerConfig) -> None:
    """Fill the DeepSpeed config's clipping, micro-batch and accumulation from TrainerConfig and refuse contradictions,
    including with its dtype (which accelerate has already turned into bf16 / fp16 "enabled" flags).

    The streaming loader is not passed to accelerator.prepare, so accelerate could not infer the micro-batch itself."""
    owned = {
        "gradient_clipping": float(config.grad_clip),  # 0 = no clipping, for DeepSpeed too
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation,
    }
    contradictions = []
    for key, value in owned.items():
        current = plugin.deepspeed_config.get(key)
        if current is None or current == "auto":
            plugin.deepspeed_config[key] = value
        elif float(current) != float(value):
            contradictions.append(f"{key}={current} (TrainerConfig: {value})")
    precision = {"bf16": config.mixed_precision == "bf16", "fp16": config.mixed_precision == "fp16"}
    for key, wanted in precision.items():
        enabled = str(plugin.deepspeed_config.get(key, {}).get("enabled", False)).lower() == "true"
        if enabled != wanted:
            contradictions.append(f"{key}.enabled={enabled} (TrainerConfig dtype: {config.dtype})")
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        contradictions.append(
            "zero_optimization.stage3_gather_16bit_weights_on_model_save=false: every checkpoint exports a whole "
            "model.safetensors, which ZeRO-3 can only gather with it set to true (zero3_save_16bit_model: true)"
        )
    if contradictions:
        raise EngineError(
            "the DeepSpeed config does not fit this run: "
            + "; ".join(contradictions)
            + ". TrainerConfig owns grad_clip, batch_size, gradient_accumulation and dtype: leave gradient_clipping, "
            "train_micro_batch_size_per_gpu, gradient_accumulation_steps and bf16 / fp16 out of the DeepSpeed / "
            "accelerate config, or set them to auto."
        )


def plain_norm(value: Any, device: torch.device) -> Tensor | None:
    """accelerator.clip_grad_norm_'s result as a plain float32 tensor: FSDP2 returns a (replicated) DTensor, DeepSpeed
    a Python float (or None)."""
    if value is None:
        return None
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            value = value.full_tensor()
    return torch.as_tensor(value, dtype=torch.float32, device=device)


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's floating inputs must have: that of its parameters. DeepSpeed converts the module to bf16
    (no autocast), the other engines keep float32 master weights and cast inside (autocast, or FSDP2's policy)."""
    return next(model.parameters()).dtype


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_ema(ema: EMA, model: nn.Module) -> None:
    """Replace the EMA's whole-tensor shadow by the local shards that match the model's FSDP2 parameters (DTensors).

    Every process computes its shard from its own copy of the whole tensor, so nothing is communicated; afterwards the
    update is a local foreach lerp between shards, and only export gathers (gathered_ema)."""
    from torch.distributed.tensor import distribute_tensor

    dtensor = _dtensor_type()
    params = {clean_name(n): p for n, p in model.named_parameters()}
    for name, shadow in ema.shadow.items():
        param = params[name]
        if isinstance(param, dtensor) and not isinstance(shadow, dtensor):
            whole = shadow.to(param.device)
            ema.shadow[name] = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
    ema.to(next(model.parameters()).device)  # forgets the tensors bound to the unsharded model
    local = sum(t.to_local().numel() if isinstance(t, dtensor) else t.numel() for t in ema.shadow.values())
    whole_count = sum(t.numel() for t in ema.shadow.values())  # a DTensor's numel is the whole tensor's
    logger.info("EMA sharded like the parameters: this process keeps %d of the EMA's %d values", local, whole_count)


def gathered_ema(ema: EMA, accelerator: Accelerator) -> EMA | None:
    """The EMA with whole tensors on the main process (None elsewhere), for EMA.save. A collective under FSDP2: every
    process calls it. Shards are gathered one tensor at a time and moved to the CPU, so no process holds two copies."""
    dtensor = _dtensor_type()
    sharded = dtensor is not None and any(isinstance(t, dtensor) for t in ema.shadow.values())
    if not sharded:
        return ema if accelerator.is_main_process else None

    def whole(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, t in tensors.items():
            full = t.full_tensor() if isinstance(t, dtensor) else t
            if accelerator.is_main_process:
                out[name] = full.cpu()
        return out

    shadow, buffers = whole(ema.shadow), whole(ema.buffers)
    if not accelerator.is_main_process:
        return None
    view = copy.copy(ema)  # same decay / counters; its own dicts, so the training EMA keeps its shards
    view.shadow, view.buffers, view.backup = shadow, buffers, None
    return view


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, Tensor] | None:
    """The whole model state on the main process (None elsewhere), with the bare model's names. A collective under
    FSDP2 and ZeRO-3: every process calls it.

    FSDP2: torch.distributed.checkpoint's get_model_state_dict(full_state_dict=True, cpu_offload=True), gathered
    tensor by tensor into the main process's CPU memory. ZeRO-3: DeepSpeed's consolidated 16-bit state dict (needs
    stage3_gather_16bit_weights_on_model_save: true). ZeRO-2: the module's (16-bit under bf16) state dict."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process or state is None:
        return None
    return {clean_name(k): v.detach().cpu() for k, v in state.items()}


@contextmanager
def whole_parameters(model: nn.Module, engine: Engine) -> Iterator[None]:
    """Parameters readable in full inside the block: a read-only ZeRO-3 gather (a collective), else nothing to do."""
    if engine.zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield
