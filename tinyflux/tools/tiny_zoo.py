"""The offline tiny zoo: small random-weight stand-ins for every model ModelZoo loads, in the real on-disk formats.

`make_tiny_zoo(PATH)` (or `python -m tinyflux.frozen.zoo make-tiny PATH`) writes, in seconds on a CPU:

    PATH/vae/      AutoencoderKL, 3 -> 16 latent channels, 8x downsampling, Flux's scaling and shift factors
    PATH/t5/       T5EncoderModel + T5 tokenizer (Unigram, <pad>/</s>/<unk>) counted on CAPTION_CORPUS
    PATH/clip/     CLIPTextModel + CLIP tokenizer (byte-level BPE learned on CAPTION_CORPUS), 77 tokens
    PATH/experts/  Lune and Sol UNet2DConditionModel weights (.safetensors, the real file names) + their config.json
    PATH/teacher_base/unet/  a base UNet of the same config (save_pretrained), in SD1.5's repo layout: what a teacher
                   file holding part of a UNet is laid over (teacher_files.py)
    PATH/tiny_zoo.json  what wrote it, with the seed

Widths come from the `tiny` TinyFluxConfig preset, so a tiny student fits the tiny zoo's outputs. `ModelZoo(zoo=PATH)`
loads it through the very code paths that load the real Hub models.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast, T5Config, T5EncoderModel, T5TokenizerFast

from tinyflux.frozen import sources as layout
from tinyflux.model.config import TinyFluxConfig

_STYLES = (
    "a photo of",
    "a watercolor painting of",
    "an oil painting of",
    "a pencil sketch of",
    "a 3d render of",
    "pixel art of",
    "a close-up photograph of",
    "an illustration of",
    "a vintage postcard of",
    "a minimalist poster of",
)
_ADJECTIVES = (
    "small",
    "giant",
    "fluffy",
    "ancient",
    "shiny",
    "colorful",
    "sleepy",
    "wooden",
    "glass",
    "golden",
    "rusty",
    "tiny",
    "majestic",
    "curious",
    "snowy",
    "misty",
)
_SUBJECTS = (
    "cat",
    "dog",
    "fox",
    "horse",
    "owl",
    "rabbit",
    "tiger",
    "whale",
    "robot",
    "castle",
    "lighthouse",
    "bicycle",
    "sailboat",
    "teapot",
    "violin",
    "mushroom",
    "cactus",
    "dragon",
    "astronaut",
    "knight",
    "bowl of ramen",
    "red car",
    "old tree",
    "mountain",
    "waterfall",
    "village",
    "bridge",
    "cottage",
    "forest path",
    "garden",
)
_ACTIONS = (
    "sitting",
    "sleeping",
    "running",
    "standing",
    "floating",
    "glowing",
    "reading a book",
    "looking at the sky",
)
_PLACES = (
    "on a beach",
    "in a forest",
    "under the stars",
    "on a wooden table",
    "in the rain",
    "at sunset",
    "in a snowy field",
    "on a city street",
    "in a desert",
    "by a lake",
    "in a kitchen",
    "on a mountain top",
    "in outer space",
    "in a library",
    "on a rooftop",
    "in a meadow of flowers",
)
_LIGHTS = (
    "soft light",
    "dramatic lighting",
    "golden hour",
    "high contrast",
    "pastel colors",
    "morning fog",
    "neon lights",
    "black and white",
)
_WORDS = {
    "style": _STYLES,
    "adj": _ADJECTIVES,
    "subject": _SUBJECTS,
    "action": _ACTIONS,
    "place": _PLACES,
    "light": _LIGHTS,
}
_TEMPLATES = (
    "{style} a {adj} {subject} {place}",
    "a {adj} {subject} {action} {place}, {light}",
    "{style} a {subject} {action}",
    "a {subject} {place}, {light}",
    "{style} a {adj} {subject}, {light}",
)


def _build_corpus(size: int, seed: int = 0) -> tuple[str, ...]:
    rng = random.Random(seed)  # Random(int).choice is reproducible across Python versions
    captions: dict[str, None] = {}
    while len(captions) < size:
        words = {name: rng.choice(options) for name, options in _WORDS.items()}
        caption = rng.choice(_TEMPLATES).format(**words)
        captions[re.sub(r"\ba ([aeiou])", r"an \1", caption)] = None
    return tuple(captions)


CAPTION_CORPUS: tuple[str, ...] = _build_corpus(320)
"""A few hundred short, varied, deterministic captions: the tiny tokenizers' training text and the demo's prompts."""

T5_VOCAB_SIZE = 600  # Unigram cap: the corpus has ~160 distinct words and ~30 characters, so all of them fit
CHAR_PENALTY = 10.0  # extra negative log-likelihood of a single-character T5 piece (nats)
CLIP_VOCAB_SIZE = 1000  # byte-level BPE: 256 bytes + their end-of-word forms + merges
VAE_CHANNELS = (16, 16, 32, 32)  # four blocks = three 2x downsamplings = 8x, as in the Flux VAE
UNET_CHANNELS_TOP = (32, 32, 64)  # first three UNet levels; the last (and the mid block) is lune_expert_dim wide
UNET_SAMPLE_SIZE = 16  # teacher latents 4 x 16 x 16: self-attention on 16x16, 8x8, 4x4 and a 2x2 mid block
ATTENTION_SHARPNESS = 4.0  # scales the random q/k weights of the teachers' self-attention, see _write_teacher


def make_tiny_zoo(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny zoo to `path` (created if needed; files in it are overwritten) and return it as a Path.

    Random weights from `seed`: the same seed writes the same weights.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file; make_tiny_zoo needs a directory to write the tiny zoo into")
    tiny = TinyFluxConfig.preset("tiny")
    _write_vae(root / layout.ZOO_SUBFOLDERS["vae"], seed, tiny)
    _write_t5(root / layout.ZOO_SUBFOLDERS["t5"], seed + 1, tiny, layout.T5_MAX_LENGTH)
    _write_clip(root / layout.ZOO_SUBFOLDERS["clip"], seed + 2, tiny, layout.CLIP_MAX_LENGTH)
    experts = root / layout.ZOO_SUBFOLDERS["experts"]
    unet_config = _tiny_unet_config(layout.SD15_UNET_CONFIG, tiny)
    _write_teacher(experts / layout.LUNE_FILENAME, unet_config, seed + 3).save_config(experts)
    _write_teacher(experts / layout.SOL_FILENAME, unet_config, seed + 4)
    base = _seeded(seed + 5, lambda: UNet2DConditionModel.from_config(unet_config))
    base.save_pretrained(root / layout.ZOO_TEACHER_BASE / layout.TEACHER_BASE_SUBFOLDER)
    info = {"written_by": "tinyflux.frozen.zoo make-tiny", "seed": seed, "preset": "tiny"}
    (root / "tiny_zoo.json").write_text(json.dumps(info, indent=2) + "\n")
    return root


def _seeded(seed: int, build):
    """Build a module under a private RNG seeded with `seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _write_vae(out: Path, seed: int, tiny: TinyFluxConfig) -> None:
    vae = _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=tiny.in_channels,
            down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
            block_out_channels=VAE_CHANNELS,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.3611,  # FLUX.1-dev's VAE config: the tiny zoo exercises the same shift + scale code
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    )
    vae.save_pretrained(out)


# The tokenizers library's trainers break ties by hash order and learn another vocabulary in every process, so the
# tiny vocabularies are counted here instead, ties broken by the pieces themselves: one corpus, one vocabulary.
def train_t5_tokenizer(max_length: int) -> T5TokenizerFast:
    """A Unigram (sentencepiece-like) T5 tokenizer: every corpus word is one piece, scored by its log frequency; single
    characters, far less likely, spell out the rest; what no character covers is <unk>."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    words = Counter(piece for caption in CAPTION_CORPUS for piece, _ in metaspace.pre_tokenize_str(caption))
    chars = Counter()
    for word, n in words.items():
        for ch in word:
            chars[ch] += n
    total, char_total = sum(words.values()), sum(chars.values())
    by_count = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[: T5_VOCAB_SIZE - 3 - len(chars)]
    # T5's ids: <pad> = 0, </s> = 1, <unk> = 2.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(word, math.log(n / total)) for word, n in by_count]
    # A character costs more than any word, so known words stay whole.
    vocab += [(ch, math.log(n / char_total) - CHAR_PENALTY) for ch, n in sorted(chars.items(), key=lambda kv: kv[0])]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def train_clip_tokenizer(max_length: int) -> CLIPTokenizerFast:
    """A byte-level BPE CLIP tokenizer learned on CAPTION_CORPUS: the most frequent adjacent pair merges first (ties:
    the smaller pair), until CLIP_VOCAB_SIZE entries or every word is one token."""
    # The normaliser and pre-tokeniser of CLIPTokenizerFast itself, so the merges are learned on the pieces it will see.
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    counts = Counter(
        piece
        for caption in CAPTION_CORPUS
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption))
    )
    splits = {word: [*word[:-1], word[-1] + "</w>"] for word in counts}  # end-of-word marked on the last symbol
    vocab = ["<|startoftext|>", "<|endoftext|>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    vocab += sorted({symbol for split in splits.values() for symbol in split} - set(vocab))
    merges: list[tuple[str, str]] = []
    while len(vocab) < CLIP_VOCAB_SIZE:
        pairs = Counter()
        for word, split in splits.items():
            for pair in zip(split, split[1:], strict=False):
                pairs[pair] += counts[word]
        if not pairs:
            break
        a, b = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append((a, b))
        vocab.append(a + b)
        for split in splits.values():
            i = 0
            while i < len(split) - 1:
                if split[i] == a and split[i + 1] == b:
                    split[i : i + 2] = [a + b]
                i += 1
    return CLIPTokenizerFast(
        vocab={token: i for i, token in enumerate(vocab)}, merges=merges, model_max_length=max_length
    )


def _write_t5(out: Path, seed: int, tiny: TinyFluxConfig, max_length: int) -> None:
    tokenizer = train_t5_tokenizer(max_length)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=tiny.t5_hidden_size,
        d_kv=16,
        d_ff=2 * tiny.t5_hidden_size,
        num_layers=max(tiny.t5_layers),  # the tiny preset reads the last hidden state, index num_layers
        num_heads=tiny.t5_hidden_size // 16,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # flan-t5's feed-forward
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    _seeded(seed, lambda: T5EncoderModel(config)).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_clip(out: Path, seed: int, tiny: TinyFluxConfig, max_length: int) -> None:
    tokenizer = train_clip_tokenizer(max_length)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.pooled_projection_dim,
        intermediate_size=2 * tiny.pooled_projection_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=tiny.pooled_projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _seeded(seed, lambda: CLIPTextModel(config)).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tiny_unet_config(sd15: dict, tiny: TinyFluxConfig) -> dict:
    """SD1.5's block structure (3 cross-attention down blocks + 1 plain, mirrored up, a cross-attention mid block),
    narrower and shallower, with the mid block lune_expert_dim wide and cross-attention over the CLIP width."""
    return {
        **sd15,
        "block_out_channels": (*UNET_CHANNELS_TOP, tiny.lune_expert_dim),
        "layers_per_block": 1,
        "attention_head_dim": 2,  # a head count in SD1.5's config convention
        "norm_num_groups": 8,
        "cross_attention_dim": tiny.pooled_projection_dim,
        "sample_size": UNET_SAMPLE_SIZE,
    }


def _write_teacher(out: Path, unet_config: dict, seed: int) -> UNet2DConditionModel:
    def build() -> UNet2DConditionModel:
        unet = UNet2DConditionModel.from_config(unet_config)
        # With default init, q.k logits have a std of ~0.3 and self-attention is nearly uniform; a trained UNet's is
        # peaked. Sharper random q/k spread the Sol statistics over their range, so tests and the demo see structure.
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith("attn1"):
                    module.to_q.weight.mul_(ATTENTION_SHARPNESS)
                    module.to_k.weight.mul_(ATTENTION_SHARPNESS)
        return unet

    out.parent.mkdir(parents=True, exist_ok=True)
    unet = _seeded(seed, build)
    save_file(unet.state_dict(), out)
    return unet
