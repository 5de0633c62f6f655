"""Faults and bad inputs of issue 13, items 5 and 6: each script answers with one line (what, where, how to fix) and
exit code 1 or 2, never a traceback. CASES is the list docs/RELIABILITY.md tabulates; test_each_case walks it."""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path

import pytest
from PIL import Image

from tinyflux.errors import TinyFluxError, message
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer.main import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _train_argv(cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--cache", str(cache), "--model", "tiny", "--dtype", "float32", "--batch_size", "4", "--warmup_steps", "1",
        "--num_workers", "0", "--save_every_steps", "none", "--log_with", "none", "--total_steps", "2",
        "--checkpoint_dir", str(out / "checkpoints"), "--tensorboard_dir", str(out / "logs"), *extra,
    ]  # fmt: skip


def _yaml(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    return ["--config", str(path)]


# (case id, train_tinyflux.py extra arguments (a function of tmp_path), exit code, regex of the one line)
CASES = [
    ("yaml-batch-size-float", lambda t: _yaml(t, "batch_size: 2.5"), 2, r"run.yaml: batch_size: 2.5 is not an integer"),
    ("yaml-t5-layers-int", lambda t: _yaml(t, "t5_layers: 3"), 2, r"run.yaml: t5_layers: 3 is not a list of integers"),
    ("yaml-lr-nan", lambda t: _yaml(t, "learning_rate: .nan"), 2, r"run.yaml: learning_rate: nan is not a finite"),
    ("yaml-lr-word", lambda t: _yaml(t, "learning_rate: fast"), 2, r"run.yaml: learning_rate: 'fast' is not a finite"),
    ("dtype-float16-cpu", lambda t: ["--dtype", "float16"], 2, r"dtype=float16 needs a CUDA GPU"),
    ("flex-attention-cpu", lambda t: ["--attention_backend", "flex"], 2, r"flex"),
]


@pytest.mark.parametrize(("case", "extra", "code", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_each_case_is_one_line_and_an_exit_code(synthetic_shards, tmp_path, capsys, case, extra, code, pattern):
    assert train_main(_train_argv(synthetic_shards, tmp_path, *extra(tmp_path))) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("train_tinyflux.py: error: ")]
    assert len(lines) == 1, err[-2000:]
    assert pytest.importorskip("re").search(pattern, lines[0]), lines[0]


def test_every_tinyflux_error_derives_from_one_root() -> None:
    from tinyflux.cache import format as cache_format
    from tinyflux.cache import inputs as cache_inputs
    from tinyflux.cache import source as cache_source
    from tinyflux.trainer import args, batch, config, engines, optim, verdict

    classes = [
        args.ArgsError, batch.BatchMismatchError, cache_format.CacheFormatError, cache_format.CacheMismatchError,
        cache_inputs.BuildError, ckpt.CheckpointError, config.TrainerConfigError, engines.EngineError,
        optim.OptimizerUnavailableError, verdict.NonFiniteLossError, cache_source.SourceError,
    ]  # fmt: skip
    assert all(issubclass(c, TinyFluxError) for c in classes)
    assert issubclass(config.TrainerConfigError, ValueError)  # old `except ValueError` callers still catch it


def test_a_dataloader_worker_error_is_printed_without_the_worker_traceback() -> None:
    from tinyflux.cache.format import CacheFormatError

    # what torch.utils.data's ExceptionWrapper.reraise builds in the main process
    wrapped = CacheFormatError(
        "Caught CacheFormatError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    g()\n'
        "tinyflux.cache.format.CacheFormatError: shard s.tar is damaged; re-run build_cache.py\n"
    )
    assert message(wrapped) == "shard s.tar is damaged; re-run build_cache.py"
    assert message(CacheFormatError("plain")) == "plain"


def test_a_zero_byte_scheduler_file_falls_back_to_the_older_checkpoint(synthetic_shards, tmp_path, caplog) -> None:
    argv = _train_argv(synthetic_shards, tmp_path, "--save_every_steps", "1", "--keep_last_n_steps", "5")
    assert train_main(argv) == 0
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_0000001", "step_0000002"]
    (root / "step_0000002" / "scheduler.bin").write_bytes(b"")
    with caplog.at_level(logging.INFO):
        assert train_main([*argv[:-2], "--total_steps", "3", "--resume", "latest"]) == 0
    assert "step_0000002 is damaged" in caplog.text and "resuming from the older" in caplog.text
    assert "resumed from " + str(root / "step_0000001") + " at step 1" in caplog.text
    assert ckpt.read_progress(ckpt.find_latest(root)).step == 3


def test_a_zero_byte_scheduler_file_without_an_older_checkpoint_is_one_line(synthetic_shards, tmp_path, caplog) -> None:
    argv = _train_argv(synthetic_shards, tmp_path, "--total_steps", "1")
    assert train_main(argv) == 0
    (tmp_path / "checkpoints" / "step_0000001" / "scheduler.bin").write_bytes(b"")
    with caplog.at_level(logging.ERROR):
        assert train_main([*argv, "--total_steps", "2", "--resume", "latest"]) == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().startswith("CheckpointError: resume=latest: no complete checkpoint")
    assert "scheduler.bin" in record.getMessage() or "cannot resume" in record.getMessage()
    assert record.exc_info is None


def test_resuming_on_another_cache_is_one_line(synthetic_shards, synthetic_shards_no_sol, tmp_path, caplog) -> None:
    assert train_main(_train_argv(synthetic_shards, tmp_path, "--total_steps", "1")) == 0
    with caplog.at_level(logging.ERROR):
        code = train_main(_train_argv(synthetic_shards_no_sol, tmp_path, "--total_steps", "2", "--resume", "latest"))
    assert code == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "CacheMismatchError" in record.getMessage() and "--cache" in record.getMessage()


def test_a_full_disk_during_a_checkpoint_shows_enospc(tmp_path) -> None:
    from tinyflux.trainer.checkpoint import CheckpointError, save_atomically

    class Accel:  # the one-process surface save_atomically uses
        num_processes, is_main_process = 1, True

        def save_state(self, path: str) -> None:  # what torch.save says on a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 3990")

    def no_space(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "ema.safetensors"))

    with pytest.raises(CheckpointError, match=r"ENOSPC"):
        save_atomically(Accel(), tmp_path / "step_0000001", lambda tmp: None)
    Accel.save_state = lambda self, path: None
    with pytest.raises(CheckpointError, match=r"\[ENOSPC\] No space left on device"):
        save_atomically(Accel(), tmp_path / "step_0000001", no_space)
    assert not list(tmp_path.iterdir())  # the .tmp is gone


def test_build_cache_on_a_full_or_read_only_disk_is_one_line(built_cache, tmp_path, capsys, monkeypatch) -> None:
    import build_cache
    from tinyflux.cache import build as cache_build

    flags = [f"--{k}={v}" for k, v in built_cache.build_kwargs().items()]

    def read_only(path, obj):  # noqa: ANN001, ANN202 (root ignores chmod, so the file system's answer is injected)
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(cache_build, "write_json_atomic", read_only)
    assert build_cache.main([f"--output={tmp_path / 'ro'}", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "build_cache.py: error: writing the cache" in err and "[EROFS] Read-only file system" in err


def test_sample_py_output_naming_a_file_and_repeated_prompts(tmp_path, capsys) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sample

    (tmp_path / "out.png").write_bytes(b"")
    code = sample.cli(["--model", "tiny", "--prompt", "A", "--prompt", "B", "--output", str(tmp_path / "out.png")])
    assert code == 2
    assert (
        capsys.readouterr().err
        == f"sample.py: error: --output {tmp_path / 'out.png'} is a file; --output names a directory for the grid and the images\n"
    )
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(sample.SampleArgs).parse_args_into_dataclasses(
        args=["--model", "m", "--prompt", "A", "--prompt", "B", "C"]
    )
    assert args.prompt == ["A", "B", "C"]


def test_a_grid_of_8_px_samples_has_room_for_its_captions() -> None:
    from tinyflux.sampling.sampler import captioned_grid

    tiles = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    grid = captioned_grid(tiles, ["a cat on a sofa", "b", "a long caption that wraps"])
    assert grid.width == 16 and grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((8, 0)) == (0, 0, 255)


def test_the_reliability_table_names_real_tests_and_the_readme_counts_its_rows() -> None:
    import re

    root = Path(__file__).resolve().parents[1]
    rows = [line for line in (root / "docs/RELIABILITY.md").read_text().splitlines() if re.match(r"^\| \d+ \|", line)]
    assert [int(row.split("|")[1]) for row in rows] == list(range(1, len(rows) + 1))
    for file, name in re.findall(r"`(test_\w+\.py)::(test_\w+)", "\n".join(rows)):
        assert f"def {name}(" in (root / "tests" / file).read_text(), f"{file}::{name} is not a test"
    assert f"docs/RELIABILITY.md): {len(rows)} faults and bad inputs" in (root / "README.md").read_text()
