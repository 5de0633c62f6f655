"""What wraps the model from the outside for a run: the Accelerator, regional compilation, stop signals."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    is_wandb_available,
)
from torch import nn

from tinyflux.trainer.config import TrainerConfig, TrainerConfigError
from tinyflux.trainer.engines import Engine, check_installed, requested_engine
from tinyflux.util.workers import (  # noqa: F401  (the Trainer's and the tests' names for them)
    STOP_SIGNALS,
    WorkerInit,
    started,
    stop_signals_blocked,
    workers_ignore_stop_signals,
)

logger = logging.getLogger(__name__)
# Test-only: keep an FSDP or DeepSpeed launch on its engine on a machine without CUDA (keep_fsdp_on_cpu, and the
# DeepSpeed branch of make_accelerator). accelerate itself enables both on GPUs only.
ENGINE_ON_CPU_ENV = "TINYFLUX_ENGINE_ON_CPU"


def make_accelerator(config: TrainerConfig) -> Accelerator:
    """The run's Accelerator: device, mixed precision (from config.dtype), gradient accumulation, tracker. The engine
    (DDP, FSDP2, DeepSpeed) comes from the `accelerate launch` config; engines.configure checks it afterwards."""
    check_installed()
    if config.dtype == torch.float16 and not torch.cuda.is_available():
        raise TrainerConfigError(
            "dtype=float16 needs a CUDA GPU (fp16 autocast + loss scaling); use bfloat16 or float32"
        )
    if AcceleratorState._shared_state:
        # A second Trainer in one process (tests, notebooks, the demo), or a Trainer after the cache build of
        # --images: accelerate's state is a process-wide singleton that refuses new settings, so start it afresh.
        # The process group (PartialState) of a multi-process launch stays: only the per-Accelerator settings reset.
        AcceleratorState._reset_state()
        GradientState._reset_state()
    if not torch.cuda.is_available():
        # x86 handles subnormal floats in microcode: Adam's second moments of the zero-initialised adaLN layers go
        # subnormal early on and made CPU steps 3-10x slower at random (bench/NOTES.md). GPUs are unaffected.
        torch.set_flush_denormal(True)
    exclude_cudnn_attention()
    engine_on_cpu = os.environ.get(ENGINE_ON_CPU_ENV) == "1" and not torch.cuda.is_available()
    # DeepSpeed runs on CPU tensors over gloo when the Accelerator is not built with cpu=True (which drops it).
    deepspeed_on_cpu = engine_on_cpu and requested_engine() == "deepspeed"
    if deepspeed_on_cpu:
        logger.warning("%s=1: DeepSpeed on CPU over gloo (a test setting)", ENGINE_ON_CPU_ENV)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available() and not deepspeed_on_cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        log_with=trackers(config.log_with),
        project_config=ProjectConfiguration(project_dir=config.checkpoint_dir, logging_dir=config.tensorboard_dir),
        # Batches of a prepared (in-memory) loader reach the device without blocking the host (pinned on CUDA).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed, non_blocking=True),
        # While rank 0 alone draws a sample grid (loading the zoo on first use) or gathers an export, the others wait
        # in their next collective: NCCL's default 10 minutes can run out, e.g. when the zoo downloads from the Hub.
        kwargs_handlers=[
            InitProcessGroupKwargs(
                backend="gloo" if deepspeed_on_cpu else "nccl",  # "nccl" is the default: accelerate picks its own
                timeout=timedelta(seconds=config.ddp_timeout),
            )
        ],
        # The LR schedule counts optimizer steps; accelerate's default would step it once per process per step.
        step_scheduler_with_optimizer=False,
    )
    if engine_on_cpu:
        keep_fsdp_on_cpu(accelerator)
    return accelerator


def trackers(log_with: str) -> list[str] | None:
    """accelerate's log_with for TrainerConfig.log_with: "all" is TensorBoard and W&B (W&B where installed; not
    accelerate's every-installed-tracker, so that an unrelated installed tracker does not start); W&B by name needs
    the package."""
    if log_with == "none":
        return None
    if log_with == "all":
        return ["tensorboard", "wandb"] if is_wandb_available() else ["tensorboard"]
    if log_with == "wandb" and not is_wandb_available():
        raise TrainerConfigError(
            "log_with='wandb' needs the wandb package: pip install wandb (or log_with=tensorboard)"
        )
    return [log_with]


def log_sample_grid(accelerator: Accelerator, grid: str, step: int) -> None:
    """The captioned sample grid (a PNG save_samples wrote) as an image to every tracker that takes images."""
    from PIL import Image

    image = np.asarray(Image.open(grid).convert("RGB"))[None]  # (1, H, W, 3) uint8
    for tracker in accelerator.trackers:  # TensorBoard or W&B (trackers() starts no other)
        # TensorBoard reads the layout from dataformats; W&B makes a wandb.Image of each (H, W, 3) array
        kwargs = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
        tracker.log_images({"samples": image}, step, **kwargs)


def exclude_cudnn_attention() -> None:
    """Keep SDPA off its cuDNN backend in training (process-wide; flash, memory-efficient and math remain). On the H100s
    this project uses, the cuDNN backend failed in backward (`mha_graph.execute`, batch 64 x 384 tokens, head dim 128),
    and recent torch releases rank it first on Hopper."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def keep_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Turn a CPU (gloo) launch of an FSDP config into an FSDP run: for the CPU tests of the FSDP2 path only.

    accelerate (1.15) makes a launch FSDP only for GPU-type distributed types (AcceleratorState.__init__ switches
    MULTI_GPU, MULTI_NPU, MULTI_XPU, ... to FSDP, never MULTI_CPU) and drops the plugin otherwise, although torch's
    fully_shard runs on CPU tensors over gloo. This sets what that branch would have set, in both shared states: the
    distributed type, and the plugin read from the launch's FSDP_* variables with the run's mixed precision. Nothing
    else accelerate sets up depends on the distributed type for a CPU float32 / bf16 run (fp16 is refused above)."""
    state = accelerator.state
    if requested_engine() != "fsdp" or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    # As that branch does: every later AcceleratorState() copies PartialState's type over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.warning(
        "%s=1: FSDP on CPU over gloo (a test setting; accelerate itself enables FSDP on GPUs only)", ENGINE_ON_CPU_ENV
    )


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the compile modes that record CUDA graphs


def check_compile_mode(mode: str | None, engine: Engine, scope: str = "blocks") -> None:
    """Refuse what an engine cannot compile: CUDA-graph modes where the parameters move every step, the whole-model
    scope outside one process and DDP; warn of the CUDA-graph modes' cost elsewhere."""
    if mode is None:
        return
    if scope == "model" and engine.name not in ("single", "ddp"):
        raise TrainerConfigError(
            f"compile_scope='model' compiles the whole forward as one graph, but {engine} runs each block's weights "
            f"through its own hooks (gathering or partitioning them) between the blocks. Use compile_scope='blocks' "
            f"under FSDP2 and DeepSpeed, or train on one process or DDP"
        )
    if mode not in CUDA_GRAPH_MODES:
        return
    if engine.shards_parameters:
        raise TrainerConfigError(
            f"compile_mode={mode!r} records CUDA graphs, which replay fixed tensor addresses, but {engine} gathers "
            f"the parameters into new memory at every step. Use compile_mode='default' or "
            f"'max-autotune-no-cudagraphs'"
        )
    logger.warning(
        "compile_mode=%r records CUDA graphs per %s and per text length (one per text_buckets length in the "
        "masked text regime; text_buckets=[] pads each batch to its longest caption, a new length almost every "
        "batch): each new length records new graphs and holds their memory. 'default' is the mode the benchmarks "
        "measure",
        mode,
        "compiled region" if scope == "blocks" else "step",
    )


def compile_model(
    model: nn.Module, mode: str, scope: str = "blocks", backend: str | Callable[..., Any] = "inductor"
) -> int:
    """torch.compile the model in place (its state-dict names do not change); returns the number of compiled regions.

    scope "blocks" (regional compilation, compile_blocks): each block of a repeated block list and the prologue its
    own region; the blocks of a list share their code, so compile time is about that of one block and the prologue.
    scope "model": the whole forward as one graph (fullgraph), so one set of guards a call, no eager glue between
    regions and fusion across block boundaries, and under a CUDA-graph mode one graph for the forward and one for the
    backward; compile time grows with depth (measured in bench/NOTES.md). Under DDP the gradients then all arrive
    when the compiled backward ends, so their all-reduce cannot overlap it."""
    if scope == "model":
        model.compile(mode=None if mode == "default" else mode, backend=backend, fullgraph=True)
        return 1
    return compile_blocks(model, mode, backend) + hasattr(model, "compile_prologue")


def compile_blocks(model: nn.Module, mode: str, backend: str | Callable[..., Any] = "inductor") -> int:
    """torch.compile each block of the model's repeated block lists in place (regional compilation): the blocks of a
    list share their code, so compile time is about that of one block, and state-dict names do not change. A model
    with a prologue (TinyFluxDeep.compile_prologue) compiles it as one more region. `backend` is torch.compile's
    (another than inductor takes mode "default"). Returns the number of blocks."""
    mode_arg = None if mode == "default" else mode
    count = 0
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                block.compile(mode=mode_arg, backend=backend)
                count += 1
    if hasattr(model, "compile_prologue"):
        model.compile_prologue(mode=mode_arg, backend=backend)
    return count


@contextmanager
def whole_graph_errors() -> Iterator[None]:
    """A forward compiled whole (fullgraph) that dynamo cannot trace as one graph fails with dynamo's own report from
    deep inside torch: say which setting asked for one graph and what to do. Compiled blocks allow graph breaks, so
    they never raise this."""
    try:
        yield
    except torch._dynamo.exc.Unsupported as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainerConfigError(
            f"compile_scope='model' needs the whole forward as one graph, but dynamo cannot trace it ({first}): "
            f"something in the model (a hook, a custom layer) breaks the graph. Use compile_scope='blocks', which "
            f"compiles around such breaks, or train eager (compile_mode unset)"
        ) from e


def compiled_whole(model: nn.Module) -> bool:
    """Whether the module itself was compiled in place (nn.Module.compile): for a model, compile_model's scope
    "model"."""
    return getattr(model, "_compiled_call_impl", None) is not None


def has_compiled_blocks(model: nn.Module) -> bool:
    """Whether the model or any submodule was compiled in place (nn.Module.compile, as compile_model does)."""
    return any(compiled_whole(m) for m in model.modules())


@contextmanager
def stop_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Route SIGTERM / SIGUSR1 (a scheduler's pre-emption notice) to on_signal(signum) instead of the default exit.
    Outside the main thread signals cannot be caught and are left alone."""
    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, lambda signum, frame: on_signal(signum))
    except ValueError:
        logger.debug("not in the main thread: SIGTERM / SIGUSR1 keep their default handlers")
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def hparams(config: TrainerConfig, model_config: Any) -> dict[str, Any]:
    """Flat scalar hyper-parameters for the tracker (TensorBoard takes bool / int / float / str only)."""
    values = {**{f"model/{k}": v for k, v in model_config.to_dict().items()}, **config.to_dict()}
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in values.items()}
