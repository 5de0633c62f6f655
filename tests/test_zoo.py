"""ModelZoo on the offline tiny zoo: loaders, encoders, teacher features, memory management and error messages."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from huggingface_hub.errors import GatedRepoError
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from tinyflux.frozen.sources import LUNE_FILENAME, SOL_FILENAME, describe_load_error
from tinyflux.frozen.teachers import SolAttentionRecorder
from tinyflux.frozen.zoo import ModelZoo, ZooError, main, seeded_noise
from tinyflux.model.config import TinyFluxConfig
from tinyflux.tools.tiny_zoo import CAPTION_CORPUS

TINY = TinyFluxConfig.preset("tiny")
PROMPTS = list(CAPTION_CORPUS[:4])


def random_images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_tiny_zoo_layout_matches_the_tiny_preset(tiny_zoo_path: Path) -> None:
    vae = read_json(tiny_zoo_path / "vae" / "config.json")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (TINY.in_channels, 0.3611, 0.1159)
    assert len(vae["block_out_channels"]) == 4  # three downsamplings: 8x
    t5 = read_json(tiny_zoo_path / "t5" / "config.json")
    assert (t5["d_model"], t5["num_layers"]) == (TINY.t5_hidden_size, max(TINY.t5_layers))
    clip = read_json(tiny_zoo_path / "clip" / "config.json")
    assert (clip["hidden_size"], clip["max_position_embeddings"]) == (TINY.pooled_projection_dim, 77)
    unet = read_json(tiny_zoo_path / "experts" / "config.json")
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (unet["block_out_channels"][-1], unet["cross_attention_dim"], unet["in_channels"]) == (64, 64, 4)
    assert (tiny_zoo_path / "experts" / LUNE_FILENAME).is_file() and (
        tiny_zoo_path / "experts" / SOL_FILENAME
    ).is_file()
    base = read_json(
        tiny_zoo_path / "teacher_base" / "unet" / "config.json"
    )  # what a partial teacher file is laid over
    assert {k: base[k] for k in unet if not k.startswith("_")} == {
        k: v for k, v in unet.items() if not k.startswith("_")
    }

    t5_tokenizer = AutoTokenizer.from_pretrained(tiny_zoo_path / "t5")
    assert (t5_tokenizer.pad_token_id, t5_tokenizer.eos_token_id, t5_tokenizer.unk_token_id) == (0, 1, 2)
    clip_tokenizer = AutoTokenizer.from_pretrained(tiny_zoo_path / "clip")
    ids = clip_tokenizer("a red fox on a beach").input_ids
    assert (ids[0], ids[-1]) == (clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id)
    assert clip_tokenizer.unk_token_id not in ids[1:-1]  # the corpus' words are in the trained vocabulary


def test_cli_writes_a_seeded_zoo(tmp_path: Path, tiny_zoo_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["make-tiny", str(tmp_path / "same")])
    assert "experts/sd15-flow-lune-unet.safetensors" in capsys.readouterr().out
    main(["make-tiny", str(tmp_path / "other"), "--seed", "1"])
    reference = load_file(tiny_zoo_path / "experts" / LUNE_FILENAME)
    same = load_file(tmp_path / "same" / "experts" / LUNE_FILENAME)
    other = load_file(tmp_path / "other" / "experts" / LUNE_FILENAME)
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not all(torch.equal(reference[k], other[k]) for k in reference)


def test_another_process_writes_the_same_tokenizers(tmp_path: Path, tiny_zoo_path: Path) -> None:
    # The tokenizers library's trainers break ties by hash order, per process: the vocabularies are counted instead.
    other = tmp_path / "other_process"
    subprocess.run(
        [sys.executable, "-m", "tinyflux.frozen.zoo", "make-tiny", str(other)], check=True, capture_output=True
    )
    for name in ("t5/tokenizer.json", "clip/tokenizer.json"):
        assert (other / name).read_bytes() == (tiny_zoo_path / name).read_bytes(), name


def test_loaders_return_frozen_real_models(tiny_zoo: ModelZoo) -> None:
    tokenizer, t5 = tiny_zoo.load_t5()
    assert isinstance(t5, T5EncoderModel) and type(tokenizer).__name__.startswith("T5Tokenizer")
    clip_tokenizer, clip = tiny_zoo.load_clip()
    assert isinstance(clip, CLIPTextModel) and type(clip_tokenizer).__name__.startswith("CLIPTokenizer")
    modules = [tiny_zoo.load_vae(), t5, clip, tiny_zoo.load_lune(), tiny_zoo.load_sol()]
    assert tiny_zoo.loaded == ("t5", "clip", "vae", "lune", "sol")
    for module in modules:
        assert not module.training
        assert all(
            p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad for p in module.parameters()
        )
    assert tiny_zoo.load_vae() is modules[0]  # loading twice returns the loaded module


def test_per_repo_arguments_and_a_local_teacher_file(tiny_zoo: ModelZoo, tiny_zoo_path: Path) -> None:
    per_repo = ModelZoo(
        device="cpu",
        dtype=torch.float32,
        vae_repo=str(tiny_zoo_path),  # a whole-repo copy: the VAE is found in its vae/ subfolder
        t5_repo=str(tiny_zoo_path / "t5"),
        clip_repo=str(tiny_zoo_path / "clip"),
        experts_repo="AbstractPhil/tinyflux-experts",  # never reached: load_lune gets a local file below
        t5_layers=TINY.t5_layers,
    )
    per_repo.load_lune(str(tiny_zoo_path / "experts" / LUNE_FILENAME))
    assert torch.equal(per_repo.extract_lune(PROMPTS, 0.5), tiny_zoo.extract_lune(PROMPTS, 0.5))
    images = random_images(2)
    assert torch.equal(per_repo.encode_images_batched(images), tiny_zoo.encode_images_batched(images))


def test_encode_images_shifts_and_scales_the_posterior_mode(tiny_zoo: ModelZoo) -> None:
    images = random_images(3)
    latents = tiny_zoo.encode_images_batched(images, batch_size=2)
    assert latents.shape == (3, 16, 8, 8) and latents.dtype == torch.float32
    assert (tiny_zoo.vae_scale, tiny_zoo.vae_shift) == (0.3611, 0.1159)
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mode = tiny_zoo.load_vae().encode(pixels).latent_dist.mode()
    assert torch.allclose(latents, (mode - 0.1159) * 0.3611, atol=1e-5)
    assert torch.allclose(tiny_zoo.encode_image(images[1]), latents[1], atol=1e-5)


def test_decode_latents_undoes_shift_and_scale(tiny_zoo: ModelZoo) -> None:
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    images = tiny_zoo.decode_latents(latents)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        pixels = tiny_zoo.load_vae().decode(latents / 0.3611 + 0.1159).sample
    assert torch.allclose(images, ((pixels + 1) / 2).clamp(0, 1), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        tiny_zoo.decode_latents(torch.zeros(1, 4, 8, 8))


def test_images_must_share_a_size_divisible_by_8(tiny_zoo: ModelZoo) -> None:
    with pytest.raises(ValueError, match="share one size"):
        tiny_zoo.encode_images_batched(random_images(1, 64) + random_images(1, 32))
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny_zoo.encode_images_batched(random_images(1, 60))


def test_encode_prompts_selects_t5_layers_and_clip_pooled(tiny_zoo: ModelZoo) -> None:
    prompts = [PROMPTS[0], PROMPTS[1], " ".join(CAPTION_CORPUS[:40])]  # the last one is cut at 128 tokens
    t5_embeds, pooled, lengths = tiny_zoo.encode_prompts_batched(prompts, batch_size=2, return_lengths=True)
    assert t5_embeds.shape == (3, 128, 2, 64) and pooled.shape == (3, 64) and lengths.dtype == torch.long
    assert t5_embeds.dtype == pooled.dtype == torch.float32

    tokenizer, t5 = tiny_zoo.load_t5()
    tokens = tokenizer(prompts, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    assert lengths.tolist() == tokens.attention_mask.sum(dim=1).tolist() and lengths[2] == 128
    last_real = tokens.input_ids[torch.arange(3), lengths - 1]
    assert (last_real == tokenizer.eos_token_id).all()  # lengths count the EOS
    with torch.no_grad():
        out = t5(**tokens, output_hidden_states=True)
    assert torch.equal(out.hidden_states[4], out.last_hidden_state)  # index num_layers is the final, normed state
    mask = tokens.attention_mask[:, :, None].float()
    for k, layer in enumerate(TINY.t5_layers):
        assert torch.allclose(t5_embeds[:, :, k], out.hidden_states[layer] * mask, atol=1e-5)
    assert (t5_embeds[0, lengths[0] :] == 0).all()  # pads are zero

    clip_tokenizer, clip = tiny_zoo.load_clip()
    with torch.no_grad():
        clip_ids = clip_tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert torch.allclose(pooled, clip(input_ids=clip_ids.input_ids).pooler_output, atol=1e-5)
    one_t5, one_pooled = tiny_zoo.encode_prompt(prompts[1])
    assert torch.allclose(one_t5, t5_embeds[1], atol=1e-5) and torch.allclose(one_pooled, pooled[1], atol=1e-5)


def test_t5_layers_beyond_the_encoder_depth_are_refused(tiny_zoo_path: Path) -> None:
    zoo = ModelZoo(device="cpu", dtype=torch.float32, zoo=tiny_zoo_path, t5_layers=(0, 4, 8, 12))
    with pytest.raises(
        ZooError, match=r"hidden state\(s\) \[8, 12\].* has 4 layers: valid hidden-state indices are 0..4"
    ):
        zoo.load_t5()


def test_bf16_modules_still_give_float32_outputs(tiny_zoo_path: Path) -> None:
    zoo = ModelZoo(device="cpu", dtype=torch.bfloat16, zoo=tiny_zoo_path, t5_layers=TINY.t5_layers)
    t5_embeds, pooled = zoo.encode_prompts_batched(PROMPTS[:2])
    assert next(zoo.load_t5()[1].parameters()).dtype == torch.bfloat16
    assert t5_embeds.dtype == pooled.dtype == torch.float32
    assert zoo.extract_lune(PROMPTS[:2], 0.5).dtype == torch.float32
    stats, spatial = zoo.extract_sol(PROMPTS[:2], 0.5)
    assert stats.dtype == spatial.dtype == torch.float32 and ((stats >= 0) & (stats <= 1)).all()


def capture_teacher_timesteps(unet: UNet2DConditionModel) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    unet.time_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


def test_lune_feature_is_the_mid_block_mean_at_noise_level_1_minus_t(tiny_zoo: ModelZoo) -> None:
    unet = tiny_zoo.load_lune()
    seen = capture_teacher_timesteps(unet)
    mid_outputs: list[torch.Tensor] = []
    unet.mid_block.register_forward_hook(lambda module, args, out: mid_outputs.append(out))
    t = torch.tensor([0.0, 0.25, 0.9, 1.0])
    features = tiny_zoo.extract_lune(PROMPTS, t, seed=3)
    assert features.shape == (4, TINY.lune_expert_dim) and features.dtype == torch.float32
    assert torch.allclose(seen[0], torch.tensor([1000.0, 750.0, 100.0, 0.0]))  # t = 1 is data: noise level 0
    assert len(mid_outputs) == 1

    # The same teacher run to the end, by hand, on the documented inputs: seeded noise and the CLIP context.
    noise = seeded_noise([3] * 4, (4, 16, 16))
    with torch.no_grad():
        unet(noise, seen[0], encoder_hidden_states=tiny_zoo.encode_clip_context(PROMPTS))
    assert torch.allclose(features, mid_outputs[1].mean(dim=(2, 3)), atol=1e-5)


def test_lune_features_depend_only_on_prompt_t_and_seed(tiny_zoo: ModelZoo) -> None:
    features = tiny_zoo.extract_lune(PROMPTS, 0.5, seed=0)
    assert torch.equal(features, tiny_zoo.extract_lune(PROMPTS, 0.5, seed=0))
    assert torch.allclose(features, tiny_zoo.extract_lune(PROMPTS, 0.5, seed=0, batch_size=1), atol=1e-5)
    assert torch.allclose(features[2:], tiny_zoo.extract_lune(PROMPTS[2:], 0.5, seed=0), atol=1e-5)
    per_sample = tiny_zoo.extract_lune(PROMPTS[:2], 0.5, seed=[0, 7])
    assert torch.allclose(per_sample[1], tiny_zoo.extract_lune(PROMPTS[1:2], 0.5, seed=7)[0], atol=1e-5)
    assert not torch.allclose(features[:2], per_sample, atol=1e-3)  # another seed, another noise map
    assert not torch.allclose(features, tiny_zoo.extract_lune(PROMPTS, 0.2, seed=0), atol=1e-3)
    assert not torch.allclose(features[0], features[1], atol=1e-3)  # another prompt
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_zoo.extract_lune(PROMPTS, 1.5)


def test_sol_features_are_bounded_normalised_and_deterministic(tiny_zoo: ModelZoo) -> None:
    t = torch.linspace(0.1, 0.9, 4)
    stats, spatial = tiny_zoo.extract_sol(PROMPTS, t, seed=1)
    assert stats.shape == (4, 4) and spatial.shape == (4, 8, 8)
    assert ((stats >= 0) & (stats <= 1)).all() and (spatial >= 0).all()
    assert torch.allclose(spatial.sum(dim=(1, 2)), torch.ones(4))
    again_stats, again_spatial = tiny_zoo.extract_sol(PROMPTS, t, seed=1, batch_size=3)
    assert torch.allclose(stats, again_stats, atol=1e-5) and torch.allclose(spatial, again_spatial, atol=1e-6)
    other_stats, _ = tiny_zoo.extract_sol(PROMPTS, t, seed=2)
    assert not torch.allclose(stats, other_stats, atol=1e-4)


def test_sol_recorder_sits_on_self_attention_and_leaves_the_forward_unchanged(
    tiny_zoo: ModelZoo, tiny_zoo_path: Path
) -> None:
    sol = tiny_zoo.load_sol()
    processors = sol.attn_processors
    recorded = [name for name, p in processors.items() if isinstance(p, SolAttentionRecorder)]
    assert recorded and all(name.endswith("attn1.processor") for name in recorded)
    assert len(recorded) == len(processors) // 2  # every attn1, no attn2

    plain = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_zoo_path / "experts"))
    plain.load_state_dict(load_file(tiny_zoo_path / "experts" / SOL_FILENAME))
    plain.eval()
    seen = capture_teacher_timesteps(sol)
    sample, timestep, context = seeded_noise([0, 1], (4, 16, 16)), torch.tensor([300.0, 700.0]), torch.randn(2, 77, 64)
    with torch.no_grad():
        assert torch.allclose(sol(sample, timestep, context).sample, plain(sample, timestep, context).sample, atol=1e-5)
    tiny_zoo.extract_sol(PROMPTS[:2], torch.tensor([0.3, 0.7]))
    assert torch.allclose(seen[-1], torch.tensor([700.0, 300.0]))


def test_unload_really_frees_each_module(tiny_zoo: ModelZoo) -> None:
    loaders = {
        "vae": tiny_zoo.load_vae,
        "t5": lambda: tiny_zoo.load_t5()[1],
        "clip": lambda: tiny_zoo.load_clip()[1],
        "lune": tiny_zoo.load_lune,
        "sol": tiny_zoo.load_sol,
    }
    tiny_zoo.extract_sol(PROMPTS[:1], 0.5)  # a used Sol holds its recorder's state too
    for name, load in loaders.items():
        module_ref = weakref.ref(load())
        tiny_zoo.unload(name)
        gc.collect()
        assert module_ref() is None, f"{name} is still referenced after unload"
        assert not tiny_zoo.is_loaded(name)
    tiny_zoo.unload("vae")  # unloading what is not loaded is a no-op
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['unet'\]"):
        tiny_zoo.unload("unet")


def test_offload_and_reload_keep_the_models_working(tiny_zoo: ModelZoo) -> None:
    before = tiny_zoo.extract_lune(PROMPTS[:2], 0.5)
    tiny_zoo.offload()
    assert all(p.device.type == "cpu" for p in tiny_zoo.load_lune().parameters())
    assert torch.allclose(tiny_zoo.extract_lune(PROMPTS[:2], 0.5), before, atol=1e-6)
    tiny_zoo.reload()
    assert torch.allclose(tiny_zoo.extract_lune(PROMPTS[:2], 0.5), before, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_models_off_the_gpu(tiny_zoo_path: Path) -> None:
    zoo = ModelZoo(device="cuda", dtype=torch.bfloat16, zoo=tiny_zoo_path, t5_layers=TINY.t5_layers)
    zoo.load_all()
    on_gpu = torch.cuda.memory_allocated()
    zoo.offload()
    assert torch.cuda.memory_allocated() < on_gpu
    assert all(p.device.type == "cpu" for p in zoo.load_sol().parameters())
    zoo.reload()
    assert all(p.device.type == "cuda" for p in zoo.load_sol().parameters())
    stats, spatial = zoo.extract_sol(PROMPTS, 0.5)
    assert stats.device.type == "cpu" and torch.allclose(spatial.sum(dim=(1, 2)), torch.ones(4), atol=1e-4)
    zoo.unload_all()
    assert torch.cuda.memory_allocated() < on_gpu / 10


def test_missing_local_sources_name_the_path_and_the_fix(tmp_path: Path, tiny_zoo_path: Path) -> None:
    with pytest.raises(ZooError, match=r"local path '.*missing' does not exist(.|\n)*make-tiny"):
        ModelZoo(device="cpu", t5_repo=str(tmp_path / "missing")).load_t5()
    with pytest.raises(ZooError, match="is not a tiny zoo .*make-tiny"):
        ModelZoo(device="cpu", zoo=tmp_path)
    experts = ModelZoo(device="cpu", experts_repo=str(tiny_zoo_path / "experts"))
    with pytest.raises(ZooError, match=r"nope\.safetensors does not exist .*sd15-flow-lune-unet\.safetensors"):
        experts.load_lune("nope.safetensors")
    with pytest.raises(ZooError, match="local file '/no/such/lune.safetensors' does not exist"):
        experts.load_lune("/no/such/lune.safetensors")


def test_unknown_repos_offline_name_the_repo_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    zoo = ModelZoo(device="cpu", t5_repo="nobody/not-a-repo", experts_repo="nobody/no-experts")
    with pytest.raises(ZooError, match=r"T5 encoder: 'nobody/not-a-repo'(.|\n)*HF_TOKEN(.|\n)*make-tiny"):
        zoo.load_t5()
    with pytest.raises(ZooError, match=r"'sd15-flow-sol-unet.safetensors' of 'nobody/no-experts' is not in the local"):
        zoo.load_sol()


def test_gated_repos_ask_for_a_token() -> None:
    gated = GatedRepoError.__new__(GatedRepoError)  # as the Hub raises it, minus the HTTP response it carries
    Exception.__init__(gated, "401 Client Error: access to model black-forest-labs/FLUX.1-dev is restricted")
    wrapped = OSError("cannot reach the repo")
    wrapped.__cause__ = gated
    message = describe_load_error(wrapped, "VAE", "black-forest-labs/FLUX.1-dev", "vae/")
    assert "'black-forest-labs/FLUX.1-dev' is gated" in message and "HF_TOKEN" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ZooError, match="CUDA is not available.*device='cpu'"):
        ModelZoo(device="cuda")


def test_indexed_cpu_device_loads_the_teachers(tiny_zoo_path) -> None:
    # accelerate reports "cpu:0" on several CPU processes; safetensors' loader refuses that name.
    zoo = ModelZoo(device="cpu:0", dtype=torch.float32, zoo=tiny_zoo_path, t5_layers=TINY.t5_layers)
    assert zoo.device == torch.device("cpu")
    assert next(zoo.load_lune().parameters()).device == torch.device("cpu")
