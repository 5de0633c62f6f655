"""Using LoRA adapters: the Sampler and sample.py load them with peft (stacked, each with its scale), merge-lora writes
a full checkpoint that load_model reads. Merged equals unmerged, scale 0 equals the base, a reloaded adapter equals
the model it was saved from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from tests.test_lora import base_model, forward
from tests.trainer_helpers import TINY
from tinyflux.frozen.zoo import ModelZoo
from tinyflux.model.loader import load_model, save_model
from tinyflux.sampling.sampler import Sampler
from tinyflux.trainer import lora
from tinyflux.trainer.lora import Adapter, LoraSettings, LoraSpec, apply_lora, attach, merged, save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
SAMPLE = {"num_steps": 2, "height": 8, "width": 8, "seed": 0, "return_latents": True}


def trained_adapter(directory: Path, seed: int, targets: str = lora.DEFAULT_TARGETS) -> torch.nn.Module:
    """The base with an adapter whose lora_B is random (as after training: a zero B changes nothing), saved in peft's
    format into `directory`; returns the adapted model."""
    model = base_model()
    apply_lora(model, LoraSpec(LoraSettings(rank=4, alpha=8), targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    save_adapter(model, directory)
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("adapters")
    first = trained_adapter(root / "a", seed=1)
    trained_adapter(root / "b", seed=2, targets=r"single_blocks\.\d+\.attn\.(qkv|out_proj)")
    return root / "a", root / "b", first


def test_merged_equals_unmerged_and_scale_zero_equals_the_base(adapters):
    a, b, _ = adapters
    base = forward(base_model())
    for stack in ([Adapter(str(a), 0.7)], [Adapter(str(a), 0.5), Adapter(str(b), -1.5)]):
        unmerged = forward(attach(base_model(), stack))
        assert (unmerged - base).abs().max() > 1e-3
        torch.testing.assert_close(forward(merged(base_model(), stack)), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(forward(attach(base_model(), [Adapter(str(a), 0.0)])), base, rtol=0, atol=0)


def test_stacked_adapters_add_their_scaled_updates(adapters):
    a, b, _ = adapters
    w0 = base_model().state_dict()
    delta_a = {k: v - w0[k] for k, v in merged(base_model(), [Adapter(str(a))]).state_dict().items()}
    delta_b = {k: v - w0[k] for k, v in merged(base_model(), [Adapter(str(b))]).state_dict().items()}
    stacked = merged(base_model(), [Adapter(str(a), 0.5), Adapter(str(b), -1.5)]).state_dict()
    assert sum(int(d.abs().max() > 0) for d in delta_b.values()) == 4  # b adapts the single blocks' attention only
    for key, w in stacked.items():
        torch.testing.assert_close(w, w0[key] + 0.5 * delta_a[key] - 1.5 * delta_b[key], rtol=0, atol=1e-6)


def test_sampler_with_a_reloaded_adapter_samples_what_the_adapted_model_samples(adapters, tiny_zoo_path):
    a, _, adapted = adapters
    zoo = ModelZoo(device="cpu", dtype=torch.float32, zoo=tiny_zoo_path, t5_layers=TINY.t5_layers)
    reference = Sampler(zoo, adapted, device="cpu", dtype=torch.float32).generate(["a red square"], **SAMPLE)
    with_lora = Sampler(zoo, base_model(), device="cpu", dtype=torch.float32, loras=[Adapter(str(a))])
    torch.testing.assert_close(with_lora.generate(["a red square"], **SAMPLE), reference, rtol=0, atol=1e-5)
    base = Sampler(zoo, base_model(), device="cpu", dtype=torch.float32).generate(["a red square"], **SAMPLE)
    assert (base - reference).abs().max() > 1e-3
    with pytest.raises(ValueError, match="pass an EMA or LoRA adapters, not both"):
        Sampler(zoo, base_model(), object(), device="cpu", loras=[Adapter(str(a))])


def test_sample_py_lora_scale_zero_is_the_base_and_merge_lora_reproduces_the_adapter(
    adapters, tiny_zoo_path, tmp_path, capsys
):
    a, b, _ = adapters
    base_dir = tmp_path / "base"
    save_model(base_model(), base_dir)
    common = ["--model", str(base_dir), "--prompt", "a cat", "--zoo", str(tiny_zoo_path), "--num_steps", "2"]
    common += ["--height", "64", "--width", "64", "--device", "cpu"]

    def image(out: str, *extra: str) -> np.ndarray:
        assert sample.cli([*common, "--output", str(tmp_path / out), *extra]) == 0
        with Image.open(tmp_path / out / "000_a_cat.png") as im:
            return np.asarray(im).astype(int)

    plain = image("plain")
    assert np.array_equal(image("zero", "--lora", str(a), "--lora_scale", "0"), plain)
    stacked = image("stacked", "--lora", str(a), str(b), "--lora_scale", "0.5", "-1.5")
    assert np.abs(stacked - plain).max() > 0

    # merge-lora: a full checkpoint that load_model reads and that computes what the stacked adapters compute
    out = tmp_path / "merged"
    argv = ["merge-lora", "--model", str(base_dir), "--lora", str(a), str(b), "--lora_scale", "0.5", "-1.5"]
    assert lora.main([*argv, "--output", str(out)]) == 0
    unmerged = forward(attach(base_model(), [Adapter(str(a), 0.5), Adapter(str(b), -1.5)]))
    reloaded = load_model(str(out), device="cpu", dtype=torch.float32)
    torch.testing.assert_close(forward(reloaded), unmerged, rtol=0, atol=1e-5)

    capsys.readouterr()
    assert lora.main(["merge-lora", "--model", str(base_dir), "--lora", str(tmp_path), "--output", str(out)]) == 2
    assert "no adapter_model.safetensors" in capsys.readouterr().err
    assert sample.cli([*common, "--output", str(tmp_path / "x"), "--lora", str(a), "--lora_scale", "1", "2"]) == 2
    assert "1 --lora adapters but 2 --lora_scale values" in capsys.readouterr().err
