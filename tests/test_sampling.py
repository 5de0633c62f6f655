"""Sampler and sample.py on the tiny zoo with a random tiny model: shapes, seeds, batching, CFG, EMA, files."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from tinyflux.frozen.zoo import ModelZoo
from tinyflux.model.config import TinyFluxConfig
from tinyflux.model.loader import save_model
from tinyflux.model.model import TinyFluxDeep, pack_latents, unpack_latents
from tinyflux.sampling.sampler import Sampler, drop_text, null_text
from tinyflux.trainer.ema import EMA
from tinyflux.trainer.schedules import get_schedule

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red car on a street", "a cat", "a small boat at sunset"]
STEPS = 3
SIDE = 8  # latent side: 64 px images


def random_model(seed: int = 0) -> TinyFluxDeep:
    """The tiny preset with every weight perturbed: the zero-initialised output layers would make v = 0 everywhere."""
    torch.manual_seed(seed)
    model = TinyFluxDeep(TinyFluxConfig.preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def zoo(tiny_zoo_path):
    zoo = ModelZoo(
        device="cpu", dtype=torch.float32, zoo=tiny_zoo_path, t5_layers=TinyFluxConfig.preset("tiny").t5_layers
    )
    yield zoo
    zoo.unload_all()


@pytest.fixture(scope="module")
def sampler(zoo):
    return Sampler(zoo, random_model(), device="cpu", dtype=torch.float32)


def gen(sampler, prompts=PROMPTS, **kw):
    kw = {"num_steps": STEPS, "height": SIDE, "width": SIDE, "seed": 0, **kw}
    return sampler.generate(prompts, **kw)


def test_images_shape_range_and_no_teacher(sampler, zoo):
    images = gen(sampler, height=SIDE, width=2 * SIDE)
    assert images.shape == (3, 3, 8 * SIDE, 16 * SIDE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01
    assert "lune" not in zoo.loaded and "sol" not in zoo.loaded


def test_latents_when_asked_decode_to_the_images(sampler, zoo):
    latents = gen(sampler, return_latents=True)
    assert latents.shape == (3, 16, SIDE, SIDE)
    torch.testing.assert_close(zoo.decode_latents(latents), gen(sampler))


def test_seed_reproducibility(sampler):
    a, b = gen(sampler, seed=7, return_latents=True), gen(sampler, seed=7, return_latents=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - gen(sampler, seed=8, return_latents=True)).abs().max() > 0.1
    gen(sampler, seed=None, num_steps=1)
    assert isinstance(sampler.last_seed, int)


def test_batch_equals_one_by_one(sampler):
    batch = gen(sampler, seed=5, return_latents=True)
    singles = torch.cat([gen(sampler, [p], seed=5 + i, return_latents=True) for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(batch, singles, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gen(sampler, seed=5, return_latents=True, batch_size=2), batch, rtol=1e-4, atol=1e-4)


def test_guidance_one_is_plain_euler_on_the_conditional_velocity(sampler, zoo):
    """Reference: x from seeded noise, x += (t_next - t) * v_cond over get_schedule, written out here."""
    model, prompt, seed = sampler.model, PROMPTS[0], 3
    t5, pooled, lengths = zoo.encode_prompts_batched([prompt], return_lengths=True)
    mask = torch.arange(t5.shape[1])[None] < lengths[:, None]
    noise = torch.randn(16, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))[None]
    x = pack_latents(noise)
    ids = TinyFluxDeep.create_img_ids(1, SIDE, SIDE)
    schedule = get_schedule(STEPS)
    with torch.no_grad():
        for t, t_next in zip(schedule[:-1], schedule[1:], strict=True):
            x = x + (t_next - t) * model(x, t5, pooled, t.view(1), ids, encoder_attention_mask=mask)
    expected = unpack_latents(x, SIDE, SIDE)
    got = gen(sampler, [prompt], seed=seed, guidance_scale=1.0, negative_prompt="anything", return_latents=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_cfg_contrasts_with_the_negative_prompt(sampler):
    plain = gen(sampler, guidance_scale=1.0, return_latents=True)
    # when the negative prompt is the prompt itself, every scale gives the conditional-only result
    same = torch.cat(
        [
            gen(sampler, [p], seed=i, guidance_scale=4.0, negative_prompt=p, return_latents=True)
            for i, p in enumerate(PROMPTS)
        ]
    )
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-4)
    guided = gen(sampler, guidance_scale=4.0, negative_prompt="blurry", return_latents=True)
    null = gen(sampler, guidance_scale=4.0, negative_prompt="", return_latents=True)
    assert (guided - plain).abs().max() > 1e-2 and (null - guided).abs().max() > 1e-2
    torch.testing.assert_close(gen(sampler, guidance_scale=4.0, negative_prompt=None, return_latents=True), null)


def test_null_text_and_drop_text_agree():
    null = null_text(2, 5, (2, 4), 3)
    assert null.mask.tolist() == [[True, False, False, False, False]] * 2
    assert null.t5.abs().sum() == 0 and null.pooled.abs().sum() == 0
    t5, mask, pooled = torch.ones(2, 5, 2, 4), torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 3)
    t5, mask, pooled = drop_text(t5, mask, pooled, torch.tensor([True, False]))
    torch.testing.assert_close(t5[0], null.t5[0])
    assert mask[0].tolist() == null.mask[0].tolist() and mask[1].all()
    assert pooled[0].abs().sum() == 0 and (pooled[1] == 1).all() and (t5[1] == 1).all()


def test_ema_weights_change_the_output_and_are_restored(zoo):
    model = random_model(seed=1)
    ema = EMA(random_model(seed=2), decay=0.5)  # a shadow far from the live weights
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    s = Sampler(zoo, model, ema=ema, device="cpu", dtype=torch.float32)
    with_ema = gen(s, use_ema=True, return_latents=True)
    without = gen(s, use_ema=False, return_latents=True)
    assert (with_ema - without).abs().max() > 1e-2
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), live[n], rtol=0, atol=0)
    assert model.training and ema.backup is None
    ema.copy_to(model)
    torch.testing.assert_close(gen(s, use_ema=False, return_latents=True), with_ema)


def test_weights_restored_after_an_error(zoo, monkeypatch):
    model = random_model(seed=1)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(random_model(seed=2))
    s = Sampler(zoo, model, ema=ema, device="cpu", dtype=torch.float32)

    def fail(*args, **kwargs):
        raise RuntimeError("encoder failed")

    monkeypatch.setattr(s, "encode_text", fail)
    with pytest.raises(RuntimeError, match="encoder failed"):
        gen(s)
    assert ema.backup is None
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), live[n], rtol=0, atol=0)


def test_bad_arguments(sampler, tiny_zoo_path):
    with pytest.raises(ValueError, match="non-empty list"):
        sampler.generate([])
    with pytest.raises(ValueError, match="latent sizes"):
        sampler.generate(["a cat"], height=0)
    other = ModelZoo(device="cpu", dtype=torch.float32, zoo=tiny_zoo_path, t5_layers=(4,))
    with pytest.raises(ValueError, match="t5_layers"):
        Sampler(other, sampler.model, device="cpu", dtype=torch.float32)


def test_save_samples_writes_grid_and_singles(sampler, tmp_path):
    images = torch.rand(3, 3, 64, 48)
    grid = sampler.save_samples(images, PROMPTS, str(tmp_path / "out"), step=12)
    assert grid == str(tmp_path / "out" / "grid_step0000012.png")
    with Image.open(grid) as g:
        assert g.size[0] == 2 * 48 and g.size[1] > 2 * 64  # 2 x 2 tiles, captions below each row
    singles = sorted((tmp_path / "out").glob("step0000012_*.png"))
    assert [p.name for p in singles][0] == "step0000012_000_a_red_car_on_a_street.png"
    assert len(singles) == 3
    with Image.open(singles[1]) as im:
        assert im.size == (48, 64)
        expected = (images[1].permute(1, 2, 0) * 255).round().to(torch.uint8)
        assert torch.equal(torch.from_numpy(np.array(im)), expected)
    with pytest.raises(ValueError, match="one prompt per image"):
        sampler.save_samples(images, PROMPTS[:2], str(tmp_path))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    model = random_model()
    save_model(model, directory)
    EMA(model).save(str(directory / "ema.safetensors"))
    return directory


def test_sample_py_end_to_end(saved_model, tiny_zoo_path, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a cat\n\na dog in the snow\n")
    out = tmp_path / "samples"
    cmd = [sys.executable, "sample.py", "--model", str(saved_model), "--prompt", "a red car", "--prompts_file"]
    cmd += [str(prompts_file), "--zoo", str(tiny_zoo_path), "--num_steps", "2", "--height", "64", "--width", "48"]
    cmd += ["--output", str(out), "--seed", "1", "--ema", str(saved_model / "ema.safetensors")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines() if line.endswith(".png")]
    assert paths[0] == out / "grid.png" and len(paths) == 4
    assert [p.name for p in paths[1:]] == ["000_a_red_car.png", "001_a_cat.png", "002_a_dog_in_the_snow.png"]
    for path in paths[1:]:
        with Image.open(path) as im:
            assert im.size == (48, 64)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "/no/such/model", "--prompt", "a cat"], "neither an existing file"),
        (["--prompt", " "], "no prompts"),
        (["--prompt", "a cat", "--height", "60"], "multiple of 8"),
        (["--prompt", "a cat", "--prompts_file", "/no/such/file"], "does not exist"),
    ],
)
def test_sample_py_bad_input_exits_2(saved_model, tiny_zoo_path, argv, message, capsys):
    if "--model" not in argv:
        argv = ["--model", str(saved_model), *argv]
    assert sample.cli([*argv, "--zoo", str(tiny_zoo_path), "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


class ExactVelocity(TinyFluxDeep):
    """An oracle network: the exact rectified-flow velocity toward one fixed data latent, (data - x_t) / (1 - t).

    If the sampler's schedule direction, time convention or Euler update disagreed with the training target
    (x_t = (1-t) noise + t data, v = data - noise), it would not land on the data.
    """

    def __init__(self, data: torch.Tensor):
        super().__init__(TinyFluxConfig.preset("tiny"))
        self.data = pack_latents(data[None], 1)  # (1, N, C)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, **kw):
        return (self.data - hidden_states) / (1 - timestep).clamp(min=1e-6)[:, None, None]


def test_sampler_and_training_target_share_one_convention(zoo):
    from tinyflux.util.predictions import flow_velocity, flow_x_t

    data = torch.randn(16, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    oracle = ExactVelocity(data)
    # The oracle's velocity at a training pair is the training target.
    noise, t = torch.randn(2, 16, SIDE, SIDE), torch.tensor([0.3, 0.8])
    x_t = pack_latents(flow_x_t(data[None], noise, t[:, None, None, None]), 1)
    target = pack_latents(flow_velocity(data[None].expand(2, -1, -1, -1), noise), 1)
    torch.testing.assert_close(oracle(x_t, None, None, t, None), target)
    # Euler over the shifted schedule, CFG on (both branches agree), lands on the data from any seed.
    sampler = Sampler(zoo, oracle, device="cpu", dtype=torch.float32)
    out = sampler.generate(["a cat", "a dog"], num_steps=5, height=SIDE, width=SIDE, seed=3, return_latents=True)
    torch.testing.assert_close(out, data[None].expand(2, -1, -1, -1), atol=1e-4, rtol=1e-4)


def test_sample_py_uses_the_training_shift_unless_told(tmp_path):
    (tmp_path / "trainer_config.json").write_text('{"shift": 1.5}')
    assert sample.training_shift(sample.SampleArgs(model=str(tmp_path))) == 1.5
    assert sample.training_shift(sample.SampleArgs(model=str(tmp_path / "model.safetensors"))) == 1.5
    assert sample.training_shift(sample.SampleArgs(model=str(tmp_path), shift=4.0)) == 4.0
    (tmp_path / "other").mkdir()
    assert sample.training_shift(sample.SampleArgs(model=str(tmp_path / "other"))) == sample.DEFAULT_SHIFT
