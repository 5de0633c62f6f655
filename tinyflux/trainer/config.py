"""TrainerConfig: every training knob, declared once with a one-line doc (the CLI's --help is built from these comments).

`tinyflux.trainer.trainer` re-exports it, so `from tinyflux.trainer.trainer import TrainerConfig` is the documented import.
Fields and defaults of the spec come first, in its order; fields users need beyond it follow under "Run".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from tinyflux.errors import TinyFluxError
from tinyflux.model.config import ATTENTION_BACKENDS
from tinyflux.trainer.schedules import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_STEPS,
    DEFAULT_SHIFT,
    LR_SCHEDULERS,
    WARMUP_TYPES,
)
from tinyflux.util import dtypes

OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor")
LUNE_MODES = ("cosine", "mse", "huber")  # the Lune distillation loss (losses.compute_lune_loss)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("blocks", "model")  # what compile_mode compiles (runtime.compile_model)
LOG_WITH = ("tensorboard", "wandb", "all", "none")

# The accelerate mixed-precision mode of each training dtype (names: tinyflux.util.dtypes).
MIXED_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}


class TrainerConfigError(TinyFluxError, ValueError):
    """A TrainerConfig whose fields contradict each other or are out of range."""


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """torch dtype from a dtype or one of the names in tinyflux.util.dtypes ("bfloat16", "bf16", "float32", ...)."""
    if isinstance(value, torch.dtype):
        if value not in MIXED_PRECISION:
            raise TrainerConfigError(f"dtype={value} is not supported; use one of bfloat16, float16, float32")
        return value
    try:
        return dtypes.parse_dtype(value)
    except ValueError as e:
        raise TrainerConfigError(f"dtype: {e}") from None


@dataclass
class TrainerConfig:
    """How a TinyFlux student trains. Every field is documented once, here."""

    # Optimization
    learning_rate: float = 1e-4  # peak learning rate, reached at the end of warmup
    optimizer: str = "adamw"  # "adamw" (torch, fused), "adamw_8bit" (bitsandbytes), "adafactor" (no momentum)
    weight_decay: float = 0.01  # decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decays (adamw, adamw_8bit); Adafactor keeps no moments
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping (the norm is still logged)
    gradient_accumulation: int = 4  # micro-batches per optimizer step (global batch = batch_size * this * processes)

    # Schedule
    total_steps: int = 100000  # optimizer steps to train for; the LR schedule decays over them
    warmup_steps: int = 1000  # optimizer steps of LR warmup from 0 to learning_rate
    lr_scheduler: str = "cosine"  # LR decay after warmup: "cosine", "linear", "constant"
    min_lr: float = 0.0  # floor of the cosine / linear decay (absolute, not a ratio)
    warmup_type: str = "linear"  # shape of the warmup ramp: "linear", "cosine"

    # Memory optimization
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% more compute
    compile_mode: Optional[str] = None  # torch.compile with this mode what compile_scope names; None = eager
    compile_scope: str = "blocks"  # with compile_mode: "blocks" (each block its own graph), "model" (one graph)
    attention_backend: str = "sdpa"  # joint-attention kernel: "sdpa", or "flex" (FlexAttention; GPU only for training)

    # Flow matching
    shift: float = DEFAULT_SHIFT  # Flux timestep shift on sigma = 1 - t; > 1 puts more training steps near noise
    logit_normal_sampling: bool = True  # draw t from a logit-normal (else uniform) before the shift
    logit_mean: float = 0.0  # mean of the logit-normal
    logit_std: float = 1.0  # std of the logit-normal

    # Loss
    use_snr_weighting: bool = True  # weight the main loss by min-SNR(t, snr_gamma)
    snr_gamma: float = 5.0  # min-SNR clamp
    use_huber_loss: bool = True  # Huber (else squared error) on the velocity
    huber_delta: float = 0.1  # Huber transition point
    use_spatial_weighting: bool = False  # weight the main loss per token by the Sol 8x8 map (teacher's, else predicted)

    # Expert distillation
    enable_lune: bool = True  # use Lune teacher features (conditioning + distillation loss) when the data has them
    lune_weight: float = 0.1  # weight of the Lune distillation loss after its warmup
    lune_warmup_steps: int = 1000  # steps over which the Lune loss weight ramps from 0 to lune_weight
    lune_dropout: float = 0.1  # per-sample probability of hiding the Lune teacher from the conditioning
    lune_mode: str = "cosine"  # Lune loss: "cosine", "mse", "huber"

    enable_sol: bool = True  # use Sol teacher features (conditioning + distillation loss) when the data has them
    sol_weight: float = 0.05  # weight of the Sol distillation loss after its warmup
    sol_warmup_steps: int = 2000  # steps over which the Sol loss weight ramps from 0 to sol_weight
    sol_dropout: float = 0.1  # per-sample probability of hiding the Sol teacher from the conditioning

    # Text
    text_dropout: float = 0.1  # per-sample probability of the null text (zero T5 states and CLIP pooled), for CFG
    text_buckets: list[int] = field(default_factory=lambda: [32, 64, 128])  # compiled blocks: pad text to first fit

    # EMA
    ema_decay: float = 0.9999  # EMA of the weights, updated every ema_every optimizer steps
    ema_warmup: bool = False  # use decay min(ema_decay, (1+n)/(10+n)) at update n, so short runs get a usable EMA

    # Checkpointing
    checkpoint_dir: str = "./checkpoints"  # where step_XXXXXXX/ and epoch_XXXX/ checkpoints go
    save_every_steps: Optional[int] = 1000  # save every N optimizer steps; None = only at the end
    save_every_epochs: Optional[int] = None  # save every N epochs; None = never per epoch
    keep_last_n_steps: int = 5  # step checkpoints kept (older ones are deleted)
    keep_last_n_epochs: int = 3  # epoch checkpoints kept

    # Logging
    log_every: int = 100  # optimizer steps between logged scalars (the only steps that read values off the device)
    tensorboard_dir: str = "./logs"  # TensorBoard event files go to TENSORBOARD_DIR/run_name

    # Sampling
    sample_every: Optional[int] = 1000  # optimizer steps between sample grids (needs a Sampler / --zoo); None = never
    sample_prompts: list[str] = field(default_factory=list)  # prompts of the sample grid
    sample_dir: str = "./samples"  # where sample grids are written

    # HuggingFace upload
    hf_repo_id: Optional[str] = None  # Hub repo to upload checkpoints (model, EMA, config) and samples to
    upload_every_steps: Optional[int] = None  # upload every N steps; None = with every saved checkpoint
    upload_every_epochs: Optional[int] = None  # upload every N epochs

    # Precision
    dtype: torch.dtype = torch.bfloat16  # autocast dtype; the one source of accelerate's mixed_precision (bf16/fp16/no)

    # Run
    seed: int = 0  # seeds model init (CLI), data order, and the per-step noise / timesteps / dropout draws
    batch_size: int = 8  # micro-batch per process
    num_workers: int = 2  # DataLoader worker processes
    shuffle_buffer: int = 1000  # samples in the streaming loader's shuffle buffer
    verify_shards: bool = True  # check each shard's sha256 against its manifest as it is opened; off = trusted disk
    max_nan_steps: int = 10  # stop after this many consecutive optimizer steps with a non-finite loss or gradient
    ema_every: int = 1  # optimizer steps between EMA updates
    ddp_timeout: int = 1800  # seconds a process waits in a collective before the run fails (rank 0 samples / exports)
    log_with: str = "tensorboard"  # trackers: "tensorboard", "wandb", "all" (TensorBoard + W&B if installed), "none"
    run_name: str = "tinyflux"  # tracker project name (TensorBoard subdirectory)
    peak_tflops: Optional[float] = None  # per-device peak dense TFLOP/s for MFU; None = look up the GPU, no MFU on CPU
    resume: Optional[str] = None  # checkpoint directory, or "latest" (newest complete one in checkpoint_dir)
    sample_steps: int = DEFAULT_NUM_STEPS  # Euler steps of the sample grid
    sample_guidance_scale: float = DEFAULT_GUIDANCE_SCALE  # CFG scale of the sample grid
    sample_size: Optional[int] = None  # latent side of sample images; None = the training latents' side
    validation_every: int = 500  # optimizer steps between validation losses (with --validation_cache / _fraction)
    validation_timesteps: int = 4  # fixed timesteps of the validation loss: the midpoints of this many bins of [0, 1]

    # LoRA (peft): adapters on a frozen base; docs/LORA.md
    lora_rank: Optional[int] = None  # train LoRA adapters of this rank on a frozen base; None = full fine-tune
    lora_alpha: Optional[float] = None  # LoRA update scale numerator (scale = alpha / rank); None = lora_rank
    lora_dropout: Optional[float] = None  # dropout on the adapters' inputs; None = lora_config's, else 0
    lora_targets: Optional[str] = None  # regex of the nn.Linear names to adapt (full match); None = blocks' attn + MLP
    lora_config: Optional[str] = None  # LoRA JSON: defaults, targets, per-pattern rank/alpha/dropout/lr_scale/enabled

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        self.betas = tuple(float(b) for b in self.betas)
        self.sample_prompts = list(self.sample_prompts)
        self.text_buckets = [int(n) for n in self.text_buckets]
        self.validate()

    @property
    def is_lora(self) -> bool:
        """The run trains LoRA adapters on a frozen base (lora_rank or lora_config set)."""
        return self.lora_rank is not None or self.lora_config is not None

    @property
    def mixed_precision(self) -> str:
        """accelerate's mixed_precision derived from dtype: "bf16", "fp16" or "no"."""
        return MIXED_PRECISION[self.dtype]

    def validate(self) -> None:
        """Raise TrainerConfigError naming every field that is out of range or contradicts another, and the fix."""
        errors = []

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                errors.append(f"{name}={getattr(self, name)!r}: choose one of {list(options)}")

        choice("optimizer", OPTIMIZERS)
        choice("lr_scheduler", LR_SCHEDULERS)
        choice("warmup_type", WARMUP_TYPES)
        choice("lune_mode", LUNE_MODES)
        choice("log_with", LOG_WITH)
        if self.compile_mode is not None:
            choice("compile_mode", COMPILE_MODES)
        choice("compile_scope", COMPILE_SCOPES)
        if self.compile_scope != "blocks" and self.compile_mode is None:
            errors.append(f"compile_scope={self.compile_scope!r} without compile_mode: set compile_mode='default'")
        choice("attention_backend", ATTENTION_BACKENDS)
        for name in ("learning_rate", "snr_gamma", "huber_delta", "logit_std", "shift"):
            if getattr(self, name) <= 0:
                errors.append(f"{name}={getattr(self, name)} must be > 0")
        for name in ("weight_decay", "min_lr", "grad_clip", "lune_weight", "sol_weight", "warmup_steps"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("lune_warmup_steps", "sol_warmup_steps", "num_workers", "shuffle_buffer", "seed"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("lune_dropout", "sol_dropout", "text_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                errors.append(f"{name}={getattr(self, name)} is a probability: it must lie in [0, 1]")
        names = ("gradient_accumulation", "total_steps", "log_every", "batch_size", "max_nan_steps", "ema_every")
        for name in (*names, "ddp_timeout"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("keep_last_n_steps", "keep_last_n_epochs", "sample_steps", "validation_every"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.validation_timesteps < 1:
            errors.append(f"validation_timesteps={self.validation_timesteps} must be >= 1")
        for name in ("save_every_steps", "save_every_epochs", "sample_every", "upload_every_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                errors.append(f"{name}={value} must be a positive interval; use None (null in YAML) to turn it off")
        for name in ("upload_every_epochs", "sample_size", "peak_tflops"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                errors.append(f"{name}={value} must be > 0, or None")
        if self.lora_rank is not None and self.lora_rank < 1:
            errors.append(f"lora_rank={self.lora_rank} must be >= 1 (or None for a full fine-tune)")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            errors.append(f"lora_alpha={self.lora_alpha} must be > 0")
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:
            errors.append(f"lora_dropout={self.lora_dropout} must lie in [0, 1)")
        given = [n for n in ("lora_alpha", "lora_dropout", "lora_targets") if getattr(self, n) is not None]
        if given and self.lora_rank is None and self.lora_config is None:
            errors.append(f"{', '.join(given)} set without lora_rank or lora_config: set --lora_rank R to train LoRA")
        if any(n < 1 for n in self.text_buckets) or self.text_buckets != sorted(set(self.text_buckets)):
            errors.append(f"text_buckets={self.text_buckets} must be increasing positive lengths (or [] for none)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            errors.append(f"betas={self.betas} must be two numbers in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            errors.append(f"ema_decay={self.ema_decay} must lie in [0, 1)")
        if self.min_lr > self.learning_rate:
            errors.append(f"min_lr={self.min_lr} exceeds learning_rate={self.learning_rate}: the decay would rise")
        if self.hf_repo_id is None and (self.upload_every_steps is not None or self.upload_every_epochs is not None):
            errors.append("upload_every_steps / upload_every_epochs are set but hf_repo_id is not: set hf_repo_id")
        if self.hf_repo_id is not None and self.hf_repo_id.count("/") != 1:
            errors.append(f"hf_repo_id={self.hf_repo_id!r} must look like 'user/repo'")
        if errors:
            raise TrainerConfigError("invalid TrainerConfig:\n  - " + "\n  - ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly values (dtype as its name, betas as a list)."""
        d = asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        d["betas"] = list(self.betas)
        return d
