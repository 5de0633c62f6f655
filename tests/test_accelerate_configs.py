"""accelerate_configs/: every file loads with accelerate's own config loader and launch-argument checks, the FSDP2 one
wraps TinyFlux at the transformer-block level, the DeepSpeed ones leave the training settings to TrainerConfig, and a
launch whose engine cannot run here says so."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from torch.distributed.fsdp import CPUOffloadPolicy

from tinyflux.model.config import TinyFluxConfig
from tinyflux.model.model import TinyFluxDeep
from tinyflux.trainer import engines
from tinyflux.trainer.config import TrainerConfig
from tinyflux.trainer.runtime import make_accelerator

CONFIGS = Path(__file__).resolve().parents[1] / "accelerate_configs"
EXPECTED = {
    "single_gpu.yaml",
    "multi_gpu.yaml",
    "fsdp.yaml",
    "deepspeed_zero2.yaml",
    "deepspeed_zero3.yaml",
    "multi_node.yaml",
    "cpu_2proc.yaml",
}


def launch_args(config_file: Path, *flags: str):
    """`accelerate launch --config_file FILE [flags] train_tinyflux.py` as accelerate's launcher parses and fills it."""
    parser = launch_command_parser()
    args, defaults, _ = _validate_launch_command(
        parser.parse_args(["--config_file", str(config_file), *flags, "train_tinyflux.py"])
    )
    return args, defaults


def test_the_expected_configs_are_there():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_config_loads_with_accelerate(name):
    path = CONFIGS / name
    assert path.read_text().startswith("# "), f"{name} must open with a comment saying when to pick it"
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    # Precision is TrainerConfig.dtype's alone: the Trainer passes it to its Accelerator.
    assert config.mixed_precision == "no"
    args, _ = launch_args(path)
    assert args.num_processes == config.num_processes >= 1 and args.training_script == "train_tinyflux.py"
    assert args.use_fsdp == (name == "fsdp.yaml")
    assert args.use_deepspeed == name.startswith("deepspeed")


def _plugin_env(name: str, *flags: str) -> dict[str, str]:
    """The environment accelerate's launcher hands the training processes for this config."""
    args, defaults = launch_args(CONFIGS / name, *flags)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_fsdp_config_is_fsdp2_full_shard_wrapping_each_transformer_block():
    with mock.patch.dict(os.environ, _plugin_env("fsdp.yaml")):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full shard: parameters re-sharded after each block's forward
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    # Activation checkpointing is TrainerConfig.gradient_checkpointing's; CPU offload is off.
    assert plugin.activation_checkpointing is False and not isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    model = TinyFluxDeep(TinyFluxConfig.preset("tiny"))
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    blocks = [f"double_blocks.{i}" for i in range(len(model.double_blocks))]
    assert wrapped == blocks + [f"single_blocks.{i}" for i in range(len(model.single_blocks))]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_take_training_settings_from_the_trainer_config(stage):
    with mock.patch.dict(os.environ, _plugin_env(f"deepspeed_zero{stage}.yaml")):
        plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == stage
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
    for key in ("gradient_clipping", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert ds[key] == "auto", f"{key} must be left to TrainerConfig"
    plugin.set_mixed_precision("bf16")  # what accelerate does with the Trainer's mixed_precision
    config = TrainerConfig(grad_clip=0.5, batch_size=3, gradient_accumulation=2, dtype="bfloat16")
    engines.fill_deepspeed_config(plugin, config)
    assert (ds["gradient_clipping"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        0.5,
        3,
        2,
    )
    engines.fill_deepspeed_config(plugin, config)  # the same values again: nothing contradicts
    with pytest.raises(engines.EngineError, match=r"gradient_clipping=0.5 \(TrainerConfig: 1.0\).*dtype"):
        engines.fill_deepspeed_config(plugin, TrainerConfig(grad_clip=1.0, batch_size=3, gradient_accumulation=2))


def test_zero3_without_16bit_gather_is_refused_before_training():
    with mock.patch.dict(os.environ, _plugin_env("deepspeed_zero3.yaml", "--zero3_save_16bit_model", "false")):
        plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision("bf16")
    with pytest.raises(engines.EngineError, match="stage3_gather_16bit_weights_on_model_save"):
        engines.fill_deepspeed_config(plugin, TrainerConfig())


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_deepspeed_launch_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(engines.EngineError, match="pip install deepspeed"):
        make_accelerator(TrainerConfig(dtype="float32", log_with="none"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_fsdp_launch_without_a_gpu_says_it_trains_without_sharding(monkeypatch, caplog, tmp_path):
    for key, value in _plugin_env("fsdp.yaml", "--num_processes", "1").items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    config = TrainerConfig(dtype="float32", log_with="none", checkpoint_dir=str(tmp_path))
    accelerator = make_accelerator(config)
    with caplog.at_level(logging.WARNING):
        engine = engines.configure(accelerator, config)
    assert engine == engines.Engine("single") and not engine.shards_parameters
    assert "asks for FSDP, but accelerate enables it only on GPUs" in caplog.text
