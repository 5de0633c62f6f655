"""TinyFluxConfig: the one typed description of a student architecture, with named presets.

`tinyflux.model.model` re-exports it, so `from tinyflux.model.model import TinyFluxConfig` is the documented import.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

from tinyflux.errors import TinyFluxError


class ConfigError(TinyFluxError, ValueError):
    """A TinyFluxConfig whose fields contradict each other or are out of range."""


TEXT_REGIMES = ("masked", "padded")
# Attention kernels the model can run (TinyFluxDeep.set_attention_backend); a runtime choice, not architecture.
ATTENTION_BACKENDS = ("sdpa", "flex")
# The released v4.2 Sol prior predicts 3 statistics; caches hold 4 (docs/EXPERT_CACHE.md), in this order.
SOL_STATS = ("locality", "entropy", "clustering", "sparsity")
SOL_SPATIAL_SIZE = 8  # side of the Sol map: the released prior's, and the one every cache stores


def default_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes (index, y, x) for a head dim when none are given: 16 index dims from 64 up (a quarter below), the
    rest split evenly between y and x. 64 -> (16, 24, 24), 128 -> (16, 56, 56) (the released), 32 -> (8, 12, 12)."""
    index = 16 if head_dim >= 64 else head_dim // 4 // 2 * 2
    side = (head_dim - index) // 2
    if side % 2 or index + 2 * side != head_dim:
        raise ConfigError(
            f"attention_head_dim={head_dim}: no even (index, y, x) RoPE split derives from it; "
            f"give axes_dims_rope explicitly (three even numbers summing to {head_dim})"
        )
    return index, side, side


@dataclass
class TinyFluxConfig:
    """Architecture of a TinyFlux student. Every field is documented once, here."""

    # Core architecture
    hidden_size: int = 1536  # transformer width; must equal num_attention_heads * attention_head_dim
    num_attention_heads: int = 24  # attention heads per block
    attention_head_dim: int = 64  # width of one head; the RoPE axes must sum to it
    num_double_layers: int = 4  # double-stream (MMDiT joint attention) blocks
    num_single_layers: int = 8  # single-stream blocks over the concatenated text + image tokens
    mlp_ratio: float = 4.0  # MLP hidden width = hidden_size * mlp_ratio
    in_channels: int = 16  # VAE latent channels (16 for the Flux VAE)
    latent_shift: bool = True  # latents = (z - VAE shift) * scale; False: z * scale, as released v4.2 was trained
    patch_size: int = 1  # latent pixels per token side: 1 (unpatchified, as released) or 2

    # Expert modules
    use_lune_expert: bool = True  # Lune predictor: trajectory feature from (t, pooled text), added to the conditioning
    lune_expert_dim: int = 1280  # teacher feature width: SD1.5 mid-block channels
    lune_hidden_dim: int = 512  # Lune predictor MLP width
    lune_predictor_dropout: float = 0.1  # dropout in the Lune predictor MLP (the original's lune_dropout)
    freeze_lune: bool = False  # exclude the Lune predictor from get_trainable_parameters()
    use_sol_prior: bool = True  # Sol prior: attention temperature + 8x8 spatial map that scales image q/k
    sol_spatial_size: int = SOL_SPATIAL_SIZE  # side of the Sol spatial importance map
    sol_hidden_dim: int = 256  # Sol prior MLP width
    sol_num_stats: int = 4  # statistics the Sol prior predicts: the first n of SOL_STATS (released: 3)
    sol_geometric_weight: float = 0.7  # initial weight of the geometric prior against the learned one, in [0, 1]
    freeze_sol: bool = False  # exclude the Sol prior from get_trainable_parameters()

    # Text encoding
    t5_layers: tuple[int, ...] = (0, 4, 8, 12)  # T5 hidden-state indices mixed by learned softmax weights (12 = last)
    t5_hidden_size: int = 768  # T5 width (flan-t5-base: 768)
    pooled_projection_dim: int = 768  # CLIP pooled width (ViT-L/14 text: 768)
    use_cross_attention_sharing: bool = True  # one text-stream qkv/out projection shared by all double blocks
    use_t5_vec: bool = True  # blend a pooled T5 vector (softmax over tokens) with CLIP's into the conditioning
    text_regime: str = "masked"  # "masked": real T5 tokens + key mask; "padded": all max_text_tokens states, no mask
    max_text_tokens: int = 128  # T5 tokenizer length; in the "padded" regime the model reads exactly this many states

    # Position encoding
    axes_dims_rope: Optional[tuple[int, ...]] = None  # RoPE dims of (index, y, x), sum = head dim; None: derived
    theta: int = 10000  # RoPE base frequency

    def __post_init__(self) -> None:
        self.t5_layers = tuple(int(i) for i in self.t5_layers)
        if self.axes_dims_rope is None:
            self.axes_dims_rope = default_rope_axes(self.attention_head_dim)
        self.axes_dims_rope = tuple(int(d) for d in self.axes_dims_rope)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field and the fix when fields contradict each other."""
        errors = []
        if self.hidden_size != self.num_attention_heads * self.attention_head_dim:
            errors.append(
                f"hidden_size={self.hidden_size} must equal num_attention_heads * attention_head_dim = "
                f"{self.num_attention_heads} * {self.attention_head_dim} = {self.num_attention_heads * self.attention_head_dim}"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            errors.append(
                f"axes_dims_rope={self.axes_dims_rope} sums to {sum(self.axes_dims_rope)}, "
                f"but must sum to attention_head_dim={self.attention_head_dim}"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            errors.append(
                f"axes_dims_rope={self.axes_dims_rope}: every axis needs an even number of dims (cos/sin pairs)"
            )
        if len(self.axes_dims_rope) != 3:
            errors.append(f"axes_dims_rope={self.axes_dims_rope}: three axes are expected (index, y, x)")
        if not 0.0 <= self.sol_geometric_weight <= 1.0:
            errors.append(f"sol_geometric_weight={self.sol_geometric_weight} must lie in [0, 1]")
        if self.patch_size not in (1, 2):
            errors.append(f"patch_size={self.patch_size} must be 1 or 2")
        if not self.t5_layers:
            errors.append("t5_layers is empty: list at least one T5 hidden-state index, e.g. (12,)")
        if any(i < 0 for i in self.t5_layers) or len(set(self.t5_layers)) != len(self.t5_layers):
            errors.append(f"t5_layers={self.t5_layers} must be distinct non-negative hidden-state indices")
        for name in ("num_double_layers", "num_single_layers"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("hidden_size", "num_attention_heads", "attention_head_dim", "in_channels", "t5_hidden_size"):
            if getattr(self, name) <= 0:
                errors.append(f"{name}={getattr(self, name)} must be > 0")
        if self.mlp_ratio <= 0:
            errors.append(f"mlp_ratio={self.mlp_ratio} must be > 0")
        if not 1 <= self.sol_num_stats <= len(SOL_STATS):
            errors.append(
                f"sol_num_stats={self.sol_num_stats} must lie in [1, {len(SOL_STATS)}] ({', '.join(SOL_STATS)})"
            )
        if self.text_regime not in TEXT_REGIMES:
            errors.append(f"text_regime={self.text_regime!r} must be one of {TEXT_REGIMES}")
        if self.max_text_tokens <= 0:
            errors.append(f"max_text_tokens={self.max_text_tokens} must be > 0")
        if not 0.0 <= self.lune_predictor_dropout < 1.0:
            errors.append(f"lune_predictor_dropout={self.lune_predictor_dropout} must lie in [0, 1)")
        if self.sol_spatial_size <= 0:
            errors.append(f"sol_spatial_size={self.sol_spatial_size} must be > 0")
        if errors:
            raise ConfigError("invalid TinyFluxConfig:\n  - " + "\n  - ".join(errors))

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_t5_layers(self) -> int:
        return len(self.t5_layers)

    @property
    def token_channels(self) -> int:
        """Channels of one packed image token: in_channels * patch_size^2."""
        return self.in_channels * self.patch_size**2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["t5_layers"] = list(self.t5_layers)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TinyFluxConfig:
        """Our config.json, or the original project's (recognised by its `joint_attention_dim`: see from_original)."""
        if ORIGINAL_ONLY_FIELDS & set(d):
            return cls.from_original(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown TinyFluxConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_original(cls, d: dict[str, Any]) -> TinyFluxConfig:
        """The original TinyFlux-Deep v4.2 config.json (its TinyFluxConfig fields) as the network it describes.

        It names the T5 width `joint_attention_dim` and the Lune predictor's dropout `lune_dropout`, and has no
        t5_layers: its network reads T5's last hidden state
        (t5_layers=(12,)), shares no text projections, predicts 3 Sol statistics, saw all 128 padded T5 states
        without a mask, and its latents were z * scale without the VAE's shift factor. Keys starting with "_" (its `_metadata`) are ignored; any other unknown key is refused.
        """
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        for original, ours in ORIGINAL_FIELD_NAMES.items():
            if original in d:
                d[ours] = d.pop(original)
        released = {k: v for k, v in RELEASED_TEXT_AND_EXPERTS.items() if k not in d}
        return cls.from_dict({**released, **d})

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> TinyFluxConfig:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> TinyFluxConfig:
        return replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TinyFluxConfig:
        """A named architecture (see PRESETS), with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# What the original's config.json leaves implicit: the released network's values of our extra fields.
RELEASED_TEXT_AND_EXPERTS: dict[str, Any] = dict(
    t5_layers=(12,),
    use_cross_attention_sharing=False,
    sol_num_stats=3,
    text_regime="padded",
    max_text_tokens=128,
    latent_shift=False,
)
# The original's names of our fields; `joint_attention_dim` is only ever in its config.json, so it marks one.
ORIGINAL_FIELD_NAMES = {"joint_attention_dim": "t5_hidden_size", "lune_dropout": "lune_predictor_dropout"}
ORIGINAL_ONLY_FIELDS = frozenset({"joint_attention_dim"})

# Named presets. `deep` is the released TinyFlux-Deep v4.2 (245,347,234 parameters): 512 = 4 x 128, 15 double + 25
# single, axes (16, 56, 56), T5 last hidden state only, no shared text projections, 3 Sol statistics, padded text. `tiny` (< 2M parameters) matches the offline
# tiny zoo (tinyflux.frozen.zoo.make_tiny_zoo): its T5 is 64 wide with 4 layers, its CLIP 64 wide, its UNet mid block
# 64 channels. `default` is the dataclass defaults of the spec.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "deep": dict(
        hidden_size=512,
        num_attention_heads=4,
        attention_head_dim=128,
        num_double_layers=15,
        num_single_layers=25,
        axes_dims_rope=(16, 56, 56),
        **RELEASED_TEXT_AND_EXPERTS,
    ),
    "tiny": dict(
        hidden_size=64,
        num_attention_heads=2,
        attention_head_dim=32,
        num_double_layers=2,
        num_single_layers=2,
        axes_dims_rope=(8, 12, 12),
        lune_expert_dim=64,
        lune_hidden_dim=64,
        sol_hidden_dim=32,
        lune_predictor_dropout=0.0,  # no random draws in the forward: runs on 1 and on N processes log equal losses
        t5_layers=(2, 4),
        t5_hidden_size=64,
        pooled_projection_dim=64,
        use_cross_attention_sharing=False,
    ),
}
