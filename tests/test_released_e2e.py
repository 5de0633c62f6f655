"""A released-format checkpoint (original key names and config.json) on the tiny zoo: it samples, fine-tunes on a
padded-text cache, keeps its key names, and the sampler feeds it what the original's sampler fed it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from build_cache import main as build_cache_main
from tinyflux.cache.format import CacheMismatchError, load_manifest
from tinyflux.model.config import TinyFluxConfig
from tinyflux.model.loader import load_model
from tinyflux.model.model import TinyFluxDeep

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
DATA = Path(__file__).parent / "data" / "tinyflux_v42"

# The original's config.json fields at the tiny zoo's widths (T5 64 wide with 4 layers: its last is layer 4, where
# flan-t5-base's is 12; the original had no t5_layers field and always read the last).
ORIGINAL_TINY = {
    **json.loads((DATA / "tiny_config.json").read_text()),
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "lune_expert_dim": 64,
    "lune_hidden_dim": 64,
    "sol_hidden_dim": 32,
    "lune_dropout": 0.0,
    "t5_layers": [4],
}


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.safetensors under the original's key names (0-dim scalars included) + the original's config.json."""
    folder = tmp_path_factory.mktemp("released")
    model = TinyFluxDeep(TinyFluxConfig.from_dict(ORIGINAL_TINY))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(ORIGINAL_TINY))
    return folder


def _images(folder: Path, n: int = 6) -> Path:
    folder.mkdir()
    for i in range(n):
        colour = (40 * i % 256, 255 - 30 * i, 90)
        Image.new("RGB", (80, 64), colour).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a picture number {i}")
    return folder


@pytest.fixture(scope="module")
def padded_cache(tmp_path_factory: pytest.TempPathFactory, tiny_zoo_path: Path) -> Path:
    root = tmp_path_factory.mktemp("padded")
    flags = ["--images", str(_images(root / "images")), "--resolution", "64", "--zoo", str(tiny_zoo_path)]
    flags += ["--model_preset", "tiny", "--t5_layers", "4", "--text_regime", "padded", "--latent_shift", "false"]
    assert build_cache_main([*flags, "--output", str(root / "cache"), "--device", "cpu"]) == 0
    return root / "cache"


def test_padded_cache_keeps_all_128_t5_states_and_unshifted_latents(padded_cache):
    manifest = load_manifest(padded_cache)
    assert manifest.text_regime == "padded" and not manifest.latent_shift
    assert manifest.fields["t5_embeds"].shape == [None, 1, 64] and manifest.t5_length_max == 128
    assert manifest.t5_length_mean == 128  # every sample stores all 128 states, T5's pad outputs included


def test_sample_py_writes_images_from_a_released_checkpoint(released_dir, tiny_zoo_path, tmp_path):
    import sample

    argv = ["--model", str(released_dir), "--zoo", str(tiny_zoo_path), "--prompt", "a cat", "--prompt", "a dog"]
    argv += ["--num_steps", "2", "--height", "64", "--width", "64", "--output", str(tmp_path / "out")]
    assert sample.cli(argv) == 0
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert "grid.png" in pngs and len(pngs) == 3
    assert Image.open(tmp_path / "out" / "grid.png").size[0] >= 128


def test_the_sampler_feeds_the_network_what_the_original_sampler_did(released_dir, tiny_zoo_path):
    """Oracle: all 128 T5 states (pads = T5's own outputs, T5 run with its attention mask), no text mask, no txt_ids,
    CLIP's pooler_output, t in [0, 1] as float32, image ids (0, y, x); the decode leaves the VAE shift out."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    from tinyflux.frozen.zoo import ModelZoo
    from tinyflux.sampling.sampler import Sampler

    model = load_model(str(released_dir), device="cpu", dtype=torch.float32)
    zoo = ModelZoo(device="cpu", dtype=torch.float32, zoo=tiny_zoo_path, t5_layers=model.config.t5_layers)
    seen: list[dict] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append({"args": args, **kwargs}), with_kwargs=True)
    decoded: list[bool] = []
    real_decode = zoo.decode_latents
    zoo.decode_latents = lambda x, **kw: decoded.append(kw.get("shift", True)) or real_decode(x, **kw)
    Sampler(zoo, model, device="cpu", dtype=torch.float32).generate(["a red car"], num_steps=2, guidance_scale=1.0)
    assert decoded == [False]
    call = seen[0]
    hidden, states, pooled, t, img_ids = call["args"]
    assert call.get("encoder_attention_mask") is None and call.get("txt_ids") is None
    assert t.dtype == torch.float32 and 0.0 <= float(t[0]) < 1.0
    assert img_ids[0, :3].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2]]

    tok = AutoTokenizer.from_pretrained(tiny_zoo_path / "t5")
    t5 = T5EncoderModel.from_pretrained(tiny_zoo_path / "t5").eval()
    ids = tok(["a red car"], padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    with torch.no_grad():
        last = t5(**ids, output_hidden_states=True).hidden_states[4]  # (1, 128, 64)
        clip_tok = CLIPTokenizer.from_pretrained(tiny_zoo_path / "clip")
        clip = CLIPTextModel.from_pretrained(tiny_zoo_path / "clip").eval()
        ref_pooled = clip(clip_tok(["a red car"], padding="max_length", max_length=77, return_tensors="pt").input_ids)
    assert states.shape[1] == 128 and int(ids.attention_mask.sum()) < 128
    torch.testing.assert_close(states.reshape(1, 128, 64), last, atol=1e-5, rtol=1e-5)
    assert states.reshape(1, 128, 64)[0, -1].abs().sum() > 0  # a pad position carries T5's output, not zero
    torch.testing.assert_close(pooled, ref_pooled.pooler_output, atol=1e-5, rtol=1e-5)


def test_fine_tuning_a_released_checkpoint_keeps_its_key_names(released_dir, padded_cache, tmp_path):
    from tinyflux.trainer.main import main as train_main

    argv = ["--model", str(released_dir), "--cache", str(padded_cache), "--dtype", "float32", "--batch_size", "2"]
    argv += ["--total_steps", "2", "--num_workers", "0", "--log_with", "none", "--save_every_steps", "none"]
    argv += ["--checkpoint_dir", str(tmp_path / "ckpt"), "--tensorboard_dir", str(tmp_path / "logs")]
    assert train_main(argv) == 0
    final = tmp_path / "ckpt" / "step_0000002"
    saved = load_file(str(final / "model.safetensors"))
    original = load_file(str(DATA / "tiny_model.safetensors"))  # the original network, 2 double + 2 single blocks
    assert saved.keys() == original.keys()
    assert all(saved[k].dim() == original[k].dim() for k in original)  # its 0-dim scalars stay 0-dim
    ema = load_file(str(final / "ema.safetensors"))
    assert ema.keys() == original.keys() and ema["text_balance"].dim() == 0
    start = load_file(str(released_dir / "model.safetensors"))
    assert any(not torch.equal(saved[k], start[k]) for k in start)  # it trained
    tuned = load_model(str(final), device="cpu", dtype=torch.float32)
    assert tuned.config == TinyFluxConfig.from_dict(ORIGINAL_TINY)


def test_a_masked_cache_is_refused_for_a_released_model_with_the_fix(released_dir, tiny_zoo_path, tmp_path):
    from tinyflux.cache.format import check_compatible

    root = tmp_path
    flags = ["--images", str(_images(root / "images", 2)), "--resolution", "64", "--zoo", str(tiny_zoo_path)]
    flags += ["--model_preset", "tiny", "--t5_layers", "4", "--no_lune", "--no_sol"]
    assert build_cache_main([*flags, "--output", str(root / "cache"), "--device", "cpu"]) == 0
    config = TinyFluxConfig.from_dict(ORIGINAL_TINY)
    with pytest.raises(CacheMismatchError) as err:
        check_compatible(load_manifest(root / "cache"), config)
    assert "--text_regime padded" in str(err.value) and "--latent_shift false" in str(err.value)
