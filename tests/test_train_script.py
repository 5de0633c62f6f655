"""train_tinyflux.py: the command line generated from the dataclasses, YAML configs, and whole runs (in-process,
under `accelerate launch` with two CPU processes, and stopped by SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_helpers import PROCESS_COUNT_ATOL, accelerate_launch, wait_for_checkpoint
from tinyflux.cache.format import T_BUCKETS
from tinyflux.cache.memory import DatasetCache, EncodingCache, LuneFeatureCache, SolFeatureCache
from tinyflux.model.config import PRESETS, TinyFluxConfig
from tinyflux.model.loader import load_model
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer.args import ArgsError, build_parser, parse_args
from tinyflux.trainer.config import TrainerConfig
from tinyflux.trainer.main import main, run_training

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "accelerate_configs" / "cpu_2proc.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_flags_come_from_the_dataclasses_with_their_comments_as_help():
    help_text = build_parser().format_help()
    for flag in ("--learning_rate", "--total_steps", "--checkpoint_dir", "--hidden_size", "--t5_layers", "--cache"):
        assert flag in help_text
    assert "peak learning rate, reached at the end of warmup" in help_text  # TrainerConfig's comment
    assert "transformer width" in help_text  # TinyFluxConfig's comment


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "learning_rate: 1.0e-3\ntotal_steps: 50\ndtype: float32\nbetas: [0.9, 0.95]\nmodel: tiny\n"
        "num_single_layers: 1\nsave_every_steps: null\nsample_prompts: [a cat, a dog]\n"
    )
    args = parse_args(["--config", str(yaml_file), "--learning_rate", "3e-4", "--num_double_layers", "1"])
    assert args.trainer.learning_rate == 3e-4  # flag beats YAML
    assert args.trainer.total_steps == 50 and args.trainer.save_every_steps is None  # YAML beats default
    assert args.trainer.dtype is torch.float32 and args.trainer.betas == (0.9, 0.95)
    assert args.trainer.sample_prompts == ["a cat", "a dog"]
    assert args.trainer.warmup_steps == TrainerConfig().warmup_steps  # default
    assert args.model_overrides == {"num_single_layers": 1, "num_double_layers": 1}  # only what was given
    assert args.model_config == TinyFluxConfig.preset("tiny", num_single_layers=1, num_double_layers=1)


def test_cli_values_none_bools_lists_and_resume():
    args = parse_args(
        ["--model", "tiny", "--save_every_steps", "none", "--no_enable_lune", "--t5_layers", "2", "4", "--resume"]
    )
    assert args.trainer.save_every_steps is None and args.trainer.enable_lune is False
    assert args.model_config.t5_layers == (2, 4) and args.trainer.resume == "latest"
    assert parse_args(["--resume", "/ckpt/step_0000010"]).trainer.resume == "/ckpt/step_0000010"
    assert parse_args([]).model_config == TinyFluxConfig.preset("default")
    assert set(PRESETS) >= {"tiny", "deep", "default"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learning_rat", "1e-3"], "unknown argument.*--learning_rat.*did you mean 'learning_rate'"),
        (["--save_every_steps", "0"], "save_every_steps=0 must be a positive interval"),
        (["--lune_weight", "-1"], "lune_weight=-1.0 must be >= 0"),
        (["--model", "huge"], "neither a preset"),
        (["--model", "tiny", "--hidden_size", "100"], "hidden_size=100 must equal"),
        (["--cache", "a", "b", "--cache_weights", "1"], "one weight per set"),
        (["--epochs", "0"], "--epochs 0 must be >= 1"),
    ],
)
def test_bad_command_lines_fail_at_parse_time(argv, message):
    with pytest.raises(ArgsError, match=message):
        parse_args(argv)


def test_unknown_yaml_keys_are_refused(tmp_path):
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("learning_rate: 1.0e-4\nlerning_rate: 3.0e-4\n")
    with pytest.raises(ArgsError, match="unknown key.*'lerning_rate'.*did you mean 'learning_rate'"):
        parse_args(["--config", str(yaml_file)])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16-sample cache in the on-disk shard format (2 shards), written by the cache code from synthetic tensors
    shaped like the tiny zoo's features: latents 16x8x8 with a learnable pattern, T5 (L, 2, 64), Lune 64, Sol 4 + 8x8."""
    n, buckets = 16, len(T_BUCKETS)
    g = torch.Generator().manual_seed(0)
    pattern = torch.linspace(-1.5, 1.5, 8)[None, :, None] * torch.linspace(1, -1, 16)[:, None, None]
    encodings = EncodingCache(
        pattern + 0.3 * torch.randn(n, 16, 8, 8, generator=g),
        torch.randn(n, 6, 2, 64, generator=g),
        torch.randn(n, 64, generator=g),
        torch.float32,
        t5_lengths=torch.tensor([3 + i % 4 for i in range(n)]),
        captions=[f"caption {i}" for i in range(n)],
    )
    lune = LuneFeatureCache(torch.randn(n, buckets, 64, generator=g), T_BUCKETS, torch.float32)
    spatial = torch.softmax(torch.randn(n, buckets, 64, generator=g), -1).view(n, buckets, 8, 8)
    sol = SolFeatureCache(torch.rand(n, buckets, 4, generator=g), spatial, T_BUCKETS, torch.float32)
    path = tmp_path_factory.mktemp("cache")
    DatasetCache(encodings, lune, sol, "synthetic", settings={"t5_layers": [2, 4]}).to_shards(path, shard_size=8)
    return path


def run_argv(cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--cache", str(cache), "--model", "tiny", "--dtype", "float32", "--batch_size", "4",
        "--gradient_accumulation", "2", "--warmup_steps", "2", "--learning_rate", "2e-3", "--num_workers", "0",
        "--ema_decay", "0.9", "--log_every", "2", "--save_every_steps", "none", "--log_with", "none",
        "--checkpoint_dir", str(out / "checkpoints"), "--tensorboard_dir", str(out / "logs"), *extra,
    ]  # fmt: skip


def weights(checkpoint: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / name))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = weights(a, name), weights(b, name)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=f"{name}:{key}")


def test_a_run_writes_a_checkpoint_that_load_model_and_sample_py_use(cache_dir, tmp_path, tiny_zoo_path):
    import sample

    grids = ["--zoo", str(tiny_zoo_path), "--sample_every", "4", "--sample_steps", "2", "--sample_size", "4"]
    grids += ["--sample_dir", str(tmp_path / "grids"), "--sample_prompts", "a cat", "a dog"]
    trainer = run_training(parse_args(run_argv(cache_dir, tmp_path, "--total_steps", "4", *grids)))
    assert (tmp_path / "grids" / "grid_step0000004.png").is_file()
    final = trainer.last_checkpoint
    assert final == tmp_path / "checkpoints" / "step_0000004" and ckpt.is_complete(final)
    model = load_model(str(final), device="cpu", dtype=torch.float32)
    assert model.config == TinyFluxConfig.preset("tiny")
    argv = ["--model", str(final), "--ema", str(final / "ema.safetensors"), "--zoo", str(tiny_zoo_path)]
    argv += [
        "--prompt",
        "a cat",
        "--num_steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--output",
        str(tmp_path / "s"),
    ]
    assert sample.cli(argv) == 0
    assert (tmp_path / "s" / "grid.png").is_file()


@pytest.mark.parametrize("first_leg", [["--total_steps", "3"], ["--epochs", "1"]])  # stop mid-pass / at a pass end
def test_streamed_run_resumes_exactly(cache_dir, tmp_path, first_leg):
    constant = ["--lr_scheduler", "constant"]  # so that a first leg with fewer total_steps has the same LR schedule
    straight = run_training(parse_args(run_argv(cache_dir, tmp_path / "a", *constant, "--total_steps", "7")))
    run_training(parse_args(run_argv(cache_dir, tmp_path / "b", *constant, "--total_steps", "7", *first_leg)))
    resumed = run_training(parse_args(run_argv(cache_dir, tmp_path / "b", *constant, "--total_steps", "7", "--resume")))
    assert resumed.progress == straight.progress
    assert_same_weights(straight.last_checkpoint, resumed.last_checkpoint, atol=1e-7)


def test_a_cache_that_does_not_fit_the_model_stops_before_training(cache_dir, tmp_path, caplog):
    code = main(run_argv(cache_dir, tmp_path, "--total_steps", "2", "--t5_layers", "4"))
    assert code == 1
    assert "t5_layers" in caplog.text and "rebuild the cache" in caplog.text
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def _script(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train_tinyflux.py"), *args]


SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_processes_give_the_same_weights_as_one_with_the_same_global_batch(cache_dir, tmp_path):
    common = ["--in_memory", "--total_steps", "4", "--gradient_accumulation", "2"]
    one = run_training(parse_args(run_argv(cache_dir, tmp_path / "one", *common, "--batch_size", "4")))
    launch = accelerate_launch(CPU_2PROC)
    argv = run_argv(cache_dir, tmp_path / "two", *common, "--batch_size", "2")
    result = subprocess.run(
        [*launch, str(ROOT / "train_tinyflux.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**SUBPROCESS_ENV, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the main process's lines only, not one per process
    assert result.stderr.count("final checkpoint: ") == 1 and result.stderr.count(" saved ") == 1
    two = tmp_path / "two" / "checkpoints" / "step_0000004"
    assert json.loads((two / ckpt.TRAINER_STATE).read_text())["samples_seen"] == one.progress.samples_seen
    assert_same_weights(one.last_checkpoint, two, atol=PROCESS_COUNT_ATOL)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(cache_dir, tmp_path):
    argv = run_argv(
        cache_dir, tmp_path, "--total_steps", "100000", "--save_every_steps", "2", "--keep_last_n_steps", "100"
    )
    process = subprocess.Popen(
        _script(*argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=SUBPROCESS_ENV
    )
    wait_for_checkpoint(process, tmp_path / "checkpoints" / "step_0000002")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM received" in output
    last = ckpt.find_latest(tmp_path / "checkpoints")
    step = ckpt.read_progress(last).step
    assert step >= 3 and last.name == f"step_{step:07d}" and f"saved {last}" in output
