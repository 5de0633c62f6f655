"""The random zoo: the real architectures at their published sizes (counted on the meta device), fitting the `deep`
preset, and the writer end to end at the `tiny` preset's widths (SMALL_SPEC), loaded by ModelZoo as any zoo is."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tinyflux.frozen.sources import LUNE_FILENAME, SD15_UNET_CONFIG, SOL_FILENAME
from tinyflux.frozen.zoo import ModelZoo, main
from tinyflux.model.config import TinyFluxConfig
from tinyflux.tools.random_zoo import (
    FULL_SPEC,
    MARKER,
    SMALL_SPEC,
    check_fits,
    ensure_random_zoo,
    make_random_zoo,
    meta_models,
    parameter_count,
)
from tinyflux.tools.tiny_zoo import CAPTION_CORPUS

DEEP = TinyFluxConfig.preset("deep")
TINY = TinyFluxConfig.preset("tiny")

# Published sizes. VAE: diffusers' AutoencoderKL for FLUX.1-dev, 83,819,683 (SD's 4-channel VAE with quant convs is
# 83,653,863; 16 latent channels add 110,616 + 55,296 to conv_out / conv_in, no quant convs take 92 away). T5:
# flan-t5-base's encoder, 109.6M with the shared embedding once. CLIP: ViT-L/14's text model, 123.06M. UNet: SD1.5,
# 859,520,964.
PUBLISHED = {"vae": 83_819_683, "t5": 109_628_544, "clip": 123_060_480, "unet": 859_520_964}


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_zoo(tmp_path_factory.mktemp("random_zoo_small"), seed=0, spec=SMALL_SPEC)


def test_full_architectures_have_the_published_parameter_counts() -> None:
    models = meta_models(FULL_SPEC)
    assert {name: parameter_count(model) for name, model in models.items()} == PUBLISHED
    assert all(p.is_meta for model in models.values() for p in model.parameters())  # nothing was allocated
    assert dict(models["unet"].config) | dict(SD15_UNET_CONFIG) == dict(models["unet"].config)  # SD1.5's own config


def test_full_architectures_fit_the_deep_preset() -> None:
    assert check_fits(FULL_SPEC) == DEEP
    models = meta_models(FULL_SPEC)
    vae, t5, clip, unet = (models[k] for k in ("vae", "t5", "clip", "unet"))
    assert (vae.config.latent_channels, vae.config.scaling_factor, vae.config.shift_factor) == (16, 0.3611, 0.1159)
    assert not (vae.config.use_quant_conv or vae.config.use_post_quant_conv)
    assert (t5.config.d_model, t5.config.num_layers) == (DEEP.t5_hidden_size, max(DEEP.t5_layers))
    assert clip.config.hidden_size == DEEP.pooled_projection_dim
    assert (unet.config.block_out_channels[-1], unet.config.cross_attention_dim) == (DEEP.lune_expert_dim, 768)
    # On the meta device the forwards give the shapes the cache stores, without memory or time.
    with torch.no_grad():
        latent = vae.encode(torch.empty(1, 3, 256, 256, device="meta")).latent_dist.mode()
        hidden = t5(input_ids=torch.zeros(1, 128, dtype=torch.long, device="meta")).last_hidden_state
        pooled = clip(input_ids=torch.zeros(1, 77, dtype=torch.long, device="meta")).pooler_output
    assert (latent.shape, hidden.shape, pooled.shape) == ((1, 16, 32, 32), (1, 128, 768), (1, 768))


def test_a_spec_that_does_not_fit_its_preset_is_refused(tmp_path: Path) -> None:
    wrong = replace(FULL_SPEC, preset="tiny")
    with pytest.raises(ValueError, match="T5 d_model 768 != t5_hidden_size.*UNet mid block 1280 wide"):
        check_fits(wrong)
    shallow = replace(SMALL_SPEC, t5={**SMALL_SPEC.t5, "num_layers": 3})
    with pytest.raises(ValueError, match=r"T5 has 3 layers < max\(t5_layers\)"):
        make_random_zoo(tmp_path / "zoo", spec=shallow)
    assert not (tmp_path / "zoo").exists()  # refused before anything is written


def test_small_zoo_is_written_in_bfloat16_with_its_marker(small_zoo: Path) -> None:
    marker = json.loads((small_zoo / MARKER).read_text())
    assert (marker["seed"], marker["size"], marker["preset"], marker["dtype"]) == (0, "small", "tiny", "bfloat16")
    assert marker["parameters"]["lune"] == marker["parameters"]["sol"] > 0
    files = [small_zoo / "vae" / "diffusion_pytorch_model.safetensors", small_zoo / "t5" / "model.safetensors"]
    files += [
        small_zoo / "clip" / "model.safetensors",
        *(small_zoo / "experts" / f for f in (LUNE_FILENAME, SOL_FILENAME)),
    ]
    for path in files:
        with safe_open(path, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, path
    # The real vocabularies, the tiny tokenizers' ids inside them.
    t5 = json.loads((small_zoo / "t5" / "config.json").read_text())
    assert (t5["vocab_size"], t5["d_model"], t5["num_layers"]) == (32128, TINY.t5_hidden_size, 4)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path, small_zoo: Path) -> None:
    def lune(root: Path) -> dict[str, torch.Tensor]:
        with safe_open(root / "experts" / LUNE_FILENAME, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    reference = lune(small_zoo)
    again = lune(make_random_zoo(tmp_path / "same", 0, spec=SMALL_SPEC))
    main(["make-random", str(tmp_path / "other"), "--size", "small", "--seed", "1"])
    other = lune(tmp_path / "other")
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    assert not all(torch.equal(reference[k], other[k]) for k in reference)
    # The draws have the default inits' scale: norms at 1, a conv's std at 1 / sqrt(fan_in).
    conv = reference["conv_in.weight"].float()  # (32, 4, 3, 3): fan_in 36
    assert torch.all(reference["conv_norm_out.weight"] == 1)
    assert abs(conv.std().item() - 36**-0.5) < 0.03


def test_ensure_reuses_a_whole_zoo_and_rewrites_another(tmp_path: Path) -> None:
    root = ensure_random_zoo(tmp_path / "zoo", 0, spec=SMALL_SPEC)
    weights = root / "experts" / LUNE_FILENAME
    stamp = weights.stat().st_mtime_ns
    assert ensure_random_zoo(root, 0, spec=SMALL_SPEC) == root and weights.stat().st_mtime_ns == stamp
    ensure_random_zoo(root, 1, spec=SMALL_SPEC)  # another seed: rewritten
    assert json.loads((root / MARKER).read_text())["seed"] == 1 and weights.stat().st_mtime_ns != stamp
    (root / MARKER).unlink()  # an interrupted write leaves no marker: never taken for a whole zoo
    ensure_random_zoo(root, 1, spec=SMALL_SPEC)
    assert (root / MARKER).is_file()


def test_model_zoo_encodes_and_extracts_from_a_random_zoo(small_zoo: Path) -> None:
    zoo = ModelZoo(device="cpu", dtype=torch.float32, zoo=small_zoo, t5_layers=TINY.t5_layers)
    prompts = list(CAPTION_CORPUS[:3])
    t5, pooled, lengths = zoo.encode_prompts_batched(prompts, return_lengths=True)
    assert (t5.shape, pooled.shape) == ((3, 128, 2, TINY.t5_hidden_size), (3, TINY.pooled_projection_dim))
    assert torch.all(t5[0, lengths[0] :] == 0) and t5[0, : lengths[0]].abs().amin(dim=-1).gt(0).all()
    lune = zoo.extract_lune(prompts, torch.tensor([0.1, 0.5, 0.9]))
    stats, spatial = zoo.extract_sol(prompts, 0.5)
    assert lune.shape == (3, TINY.lune_expert_dim) and lune.isfinite().all()
    assert stats.shape == (3, 4) and ((stats >= 0) & (stats <= 1)).all()
    assert torch.allclose(spatial.sum(dim=(-1, -2)), torch.ones(3), atol=1e-5)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    latent = zoo.encode_image(Image.fromarray(pixels))
    assert latent.shape == (TINY.in_channels, 8, 8) and latent.isfinite().all()
    assert zoo.decode_latents(latent[None]).shape == (1, 3, 64, 64)
    zoo.unload_all()
