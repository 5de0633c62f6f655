"""Teacher files in every published layout load as the original loads them, tensor for tensor, or are refused."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file, save_file

from tinyflux.frozen.sources import LUNE_FILENAME, SOL_FILENAME
from tinyflux.frozen.teacher_files import ORIGINAL_LAYOUT, teacher_config
from tinyflux.frozen.teachers import SolAttentionRecorder
from tinyflux.frozen.zoo import ModelZoo, ZooError, main

LDM = "model.diffusion_model."
RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


@pytest.fixture(scope="module")
def teacher(tiny_zoo_path: Path) -> dict[str, torch.Tensor]:
    return load_file(tiny_zoo_path / "experts" / LUNE_FILENAME)


@pytest.fixture(scope="module")
def base(tiny_zoo_path: Path) -> dict[str, torch.Tensor]:
    return load_file(tiny_zoo_path / "teacher_base" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture
def experts(tmp_path: Path, tiny_zoo_path: Path) -> Path:
    """An empty experts folder with the tiny teachers' config.json, for files written by the test."""
    folder = tmp_path / "experts"
    folder.mkdir()
    shutil.copy(tiny_zoo_path / "experts" / "config.json", folder / "config.json")
    return folder


def ldm_prefixes(config: dict) -> dict[str, str]:
    """Diffusers module names -> original SD (ldm) names for an SD1.5-structured UNet of `config`."""
    lpb = config["layers_per_block"]
    names = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i, up_type in enumerate(config["up_block_types"]):
        for j in range(lpb):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{(lpb + 1) * i + j + 1}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{(lpb + 1) * i + j + 1}.1"
        names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(lpb + 1) * (i + 1)}.0.op"
        for j in range(lpb + 1):
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{(lpb + 1) * i + j}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{(lpb + 1) * i + j}.1"
        upsampler_index = 2 if up_type.startswith("CrossAttn") else 1  # after the attention, when there is one
        names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{(lpb + 1) * i + lpb}.{upsampler_index}.conv"
    return names


def to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in the original SD single-file layout (what diffusers' conversion undoes)."""
    prefixes = ldm_prefixes(config)
    out = {}
    for name, w in state.items():
        module = max((p for p in prefixes if name.startswith(p + ".")), key=len)
        rest = name[len(module) + 1 :]
        if ".resnets." in module:
            head, _, tail = rest.partition(".")
            rest = f"{RESNET_LDM[head]}.{tail}"
        out[f"{LDM}{prefixes[module]}.{rest}"] = w
    return out


def _config(tiny_zoo_path: Path) -> dict:
    return teacher_config(tiny_zoo_path / "experts")


def lune_zoo(experts: Path, **kwargs) -> ModelZoo:
    return ModelZoo(device="cpu", dtype=torch.float32, experts_repo=str(experts), **kwargs)


def assert_from(loaded: dict, file: dict, base: dict) -> int:
    """Every loaded tensor equals the file's, else the base's; returns how many came from the file."""
    assert set(loaded) == set(base)
    for name, w in loaded.items():
        assert torch.equal(w, file.get(name, base[name])), name
    return sum(name in file for name in loaded)


@pytest.fixture
def teacher_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="tinyflux.frozen.teacher_files")
    return caplog


def test_a_whole_unet_loads_alone_and_names_the_keys_it_ignores(experts, teacher, base, teacher_log) -> None:
    extra = {"text_model.embeddings.weight": torch.ones(2), "step": torch.zeros(1)}
    save_file({**teacher, **extra}, experts / LUNE_FILENAME)
    # A base that does not exist: a whole file must not reach for one.
    unet = lune_zoo(experts, teacher_base=str(experts / "no-base")).load_lune()
    assert assert_from(unet.state_dict(), teacher, base) == len(teacher) == len(base)
    n = len(teacher)
    assert f"Lune teacher: {n} of {n} tensors from {experts / LUNE_FILENAME}" in teacher_log.messages
    assert teacher_log.messages[-1].endswith(
        f"ignored 2 keys of {experts / LUNE_FILENAME} beyond the UNet: step, text_model.embeddings.weight"
    )


@pytest.mark.parametrize("base_folder", ["teacher_base", "teacher_base/unet"], ids=["pipeline folder", "unet folder"])
def test_part_of_a_unet_is_laid_over_the_base(experts, tiny_zoo_path, teacher, base, teacher_log, base_folder) -> None:
    part = {k: w for k, w in teacher.items() if k.startswith(("mid_block.", "up_blocks.1."))}
    save_file(part, experts / LUNE_FILENAME)
    unet = lune_zoo(experts, teacher_base=str(tiny_zoo_path / base_folder)).load_lune()
    assert assert_from(unet.state_dict(), part, base) == len(part) > 0
    base_name = tiny_zoo_path / "teacher_base" / "unet"
    k, n = len(part), len(base)
    assert f"Lune teacher: {k} from {experts / LUNE_FILENAME}, {n - k} from {base_name}" in teacher_log.messages


def test_the_tiny_zoo_is_the_default_base_of_its_own_zoo(tmp_path, tiny_zoo_path, teacher, base) -> None:
    sol = load_file(tiny_zoo_path / "experts" / SOL_FILENAME)
    part = {k: w for k, w in sol.items() if ".attn1." in k}
    shutil.copy(tiny_zoo_path / "experts" / "config.json", tmp_path / "config.json")
    save_file(part, tmp_path / SOL_FILENAME)
    zoo = ModelZoo(device="cpu", dtype=torch.float32, zoo=tiny_zoo_path)
    unet = zoo.load_sol(str(tmp_path / SOL_FILENAME))
    assert assert_from(unet.state_dict(), part, base) == len(part) > 0
    assert any(isinstance(p, SolAttentionRecorder) for p in unet.attn_processors.values())  # hooks as before


def test_diffusers_own_conversion_undoes_the_test_layout(tiny_zoo_path, teacher) -> None:
    # The check behind to_original: diffusers maps it back onto every tensor, under the same names.
    config = _config(tiny_zoo_path)
    back = convert_ldm_unet_checkpoint(to_original(teacher, config), config)
    assert set(back) == set(teacher) and all(back[k] is teacher[k] for k in teacher)


def test_the_original_sd_layout_is_converted_and_its_vae_ignored(
    experts, tiny_zoo_path, teacher, base, teacher_log
) -> None:
    original = to_original(teacher, _config(tiny_zoo_path))
    others = {"first_stage_model.encoder.conv_in.weight": torch.ones(1), "cond_stage_model.a": torch.ones(1)}
    save_file({**original, **others}, experts / LUNE_FILENAME)
    unet = lune_zoo(experts, teacher_base=str(experts / "no-base")).load_lune()
    assert assert_from(unet.state_dict(), teacher, base) == len(base)
    n = len(base)
    assert teacher_log.messages[0] == (
        f"Lune teacher: {n} of {n} tensors from {experts / LUNE_FILENAME} (original SD layout, converted by diffusers)"
    )
    assert "cond_stage_model.a, first_stage_model.encoder.conv_in.weight" in teacher_log.messages[1]


def test_part_of_an_original_file_keeps_every_block_it_holds(
    experts, tiny_zoo_path, teacher, base, teacher_log
) -> None:
    # Attention only: block indices with gaps, which diffusers' block count alone would cut short.
    part = {k: w for k, w in teacher.items() if ".attentions." in k}
    save_file(to_original(part, _config(tiny_zoo_path)), experts / LUNE_FILENAME)
    unet = lune_zoo(experts, teacher_base=str(tiny_zoo_path / "teacher_base")).load_lune()
    assert assert_from(unet.state_dict(), part, base) == len(part) > 0
    assert f"{len(part)} from {experts / LUNE_FILENAME}, {len(base) - len(part)} from" in teacher_log.messages[0]


def test_files_that_do_not_fit_are_refused_in_one_line(experts, tiny_zoo_path, teacher) -> None:
    zoo = lune_zoo(experts, teacher_base=str(tiny_zoo_path / "teacher_base"))
    save_file({**teacher, "conv_in.weight": torch.zeros(8, 4, 3, 3)}, experts / LUNE_FILENAME)
    with pytest.raises(
        ZooError,
        match=r"does not fit the UNet config: 1 of its \d+ UNet tensors have other shapes "
        r"\(e.g. conv_in.weight: \(8, 4, 3, 3\) in the file, \(32, 4, 3, 3\)",
    ) as err:
        zoo.load_lune()
    assert "\n" not in str(err.value)

    foreign = {f"lora_unet_{i}.alpha": torch.ones(1) for i in range(4)}
    save_file({"conv_in.weight": teacher["conv_in.weight"], **foreign}, experts / LUNE_FILENAME)
    with pytest.raises(ZooError, match=r"is not a UNet for this config: only 1 of its 5 diffusers keys") as err:
        zoo.load_lune()
    assert "\n" not in str(err.value)

    save_file({"conv_in.weight": teacher["conv_in.weight"]}, experts / LUNE_FILENAME)
    (experts / "empty").mkdir()
    with pytest.raises(ZooError, match=r"base UNet: no config.json in .*empty .*--teacher_base"):
        lune_zoo(experts, teacher_base=str(experts / "empty")).load_lune()


def test_check_teacher_prints_layout_counts_and_whether_it_loads(
    experts, tiny_zoo_path, teacher, capsys: pytest.CaptureFixture
) -> None:
    part = {k: w for k, w in teacher.items() if k.startswith("mid_block.")}
    save_file(to_original(part, _config(tiny_zoo_path)), experts / LUNE_FILENAME)
    base = str(tiny_zoo_path / "teacher_base")
    assert main(["check-teacher", str(experts / LUNE_FILENAME), "--teacher_base", base]) == 0
    out = capsys.readouterr().out
    assert f"({ORIGINAL_LAYOUT} layout, {len(part)} keys)" in out
    assert f"{len(part)} from {experts / LUNE_FILENAME}, {len(teacher) - len(part)} from {base}" in out
    assert out.rstrip().endswith(f"loads:  yes, with the base {base}")

    save_file({**teacher, "conv_in.weight": torch.zeros(1)}, experts / LUNE_FILENAME)
    assert main(["check-teacher", str(experts / LUNE_FILENAME)]) == 1
    assert "loads:  no: cannot load the teacher: " in capsys.readouterr().out
