"""Several resolutions in one run: caches of two resolutions mixed by weight (one shape a batch), and
--resolution_schedule moving a run from one cache set to the next at given steps, the LR schedule untouched, resumable
across the switch."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures_cache import make_synthetic_cache
from tests.test_train_script import ROOT, assert_same_weights, run_argv
from tinyflux.cache.bucket_loader import BucketLoader
from tinyflux.cache.loaders import make_stream_loader
from tinyflux.trainer.args import ArgsError, RunArgs, parse_args
from tinyflux.trainer.main import build_dataloader, main, run_training
from tinyflux.trainer.resolution_schedule import ScheduledLoader
from tinyflux.trainer.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def loader_of(args: RunArgs) -> Any:
    """The loader run_training builds from these arguments: every loader flag of the command line passed on."""
    script = args.script
    return build_dataloader(
        script.cache,
        args.model_config,
        args.trainer,
        in_memory=script.in_memory,
        weights=script.cache_weights,
        bucket_batch=script.bucket_batch,
        resolution_schedule=script.resolution_schedule,
    )


@pytest.fixture(scope="module")
def two_resolutions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`low`: 12 synthetic samples with 4x4 latents (a 32 px cache); `high`: 12 with 8x8 latents (64 px)."""
    root = tmp_path_factory.mktemp("resolutions")
    for name, side, seed in (("low", 4, 1), ("high", 8, 2)):
        cache = make_synthetic_cache(12, seed=seed, name=name)
        cache.encodings.latents = torch.randn(12, 16, side, side, generator=torch.Generator().manual_seed(seed))
        cache.to_shards(root / name, shard_size=5)
    return root / "low", root / "high"


def both(low: Path, high: Path, out: Path, *extra: str) -> list[str]:
    """The test script's command line on --cache LOW HIGH."""
    argv = run_argv(low, out, *extra)
    argv.insert(argv.index("--cache") + 2, str(high))
    return argv


def test_caches_of_two_resolutions_mix_by_weight_one_shape_a_batch(two_resolutions: tuple[Path, Path]) -> None:
    low, high = two_resolutions
    loader = make_stream_loader([low, high], [1.0, 3.0], batch_size=4, seed=0, rank=0, world_size=1)
    assert loader.bucket_shapes == [(4, 4), (8, 8)]
    batches = [b for _ in range(20) for b in loader]  # 20 passes of 24 draws
    counts = {(4, 4): 0, (8, 8): 0}
    for b in batches:
        assert set(b["dataset_id"].tolist()) == {0 if b["latents"].shape[-1] == 4 else 1}  # one cache, one shape
        counts[tuple(b["latents"].shape[-2:])] += len(b["key"])
    assert sum(counts.values()) == 20 * 24 and 0.2 < counts[(4, 4)] / (20 * 24) < 0.3  # weight 1 of 4
    # --in_memory batches them shape by shape too (each sample once an epoch)
    args = parse_args(both(low, high, Path("unused"), "--in_memory"))
    in_memory = loader_of(args)
    assert isinstance(in_memory, BucketLoader) and in_memory.bucket_shapes == [(4, 4), (8, 8)]
    assert sorted(len(b["key"]) for b in in_memory) == [4, 4, 4, 4, 4, 4]


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, tuple[int, int], float]]:
    """(step, latent shape, learning rate) of every micro-batch any Trainer trains from now on."""
    seen: list[tuple[int, tuple[int, int], float]] = []
    original = Trainer.train_step

    def step(self: Trainer, batch: dict) -> dict:
        lr = self.scheduler.get_last_lr()[0]
        seen.append((self.progress.step, tuple(batch["latents"].shape[-2:]), lr))
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step)
    return seen


def test_the_schedule_switches_shape_at_its_step_leaves_the_lr_alone_and_resumes_across_the_switch(
    two_resolutions: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    low, high = two_resolutions
    common = ["--gradient_accumulation", "1", "--total_steps", "9", "--lr_scheduler", "cosine"]

    def argv(out: str, *extra: str) -> list[str]:
        return both(low, high, tmp_path / out, *common, *extra)

    seen = _record(monkeypatch)
    schedule = ["--resolution_schedule", "0:low,5:high"]
    straight = run_training(parse_args(argv("a", *schedule, "--save_every_steps", "5")))
    assert isinstance(straight.dataloader, ScheduledLoader)
    assert [shape for _, shape, _ in seen] == [(4, 4)] * 5 + [(8, 8)] * 4
    assert [step for step, _, _ in seen] == list(range(9))
    # a pass of either set is 3 batches. Epochs: steps 0-2 (low), 3-4 (low, ended by the switch), 5-7 (high), 8
    assert (straight.progress.epoch, straight.progress.batches_in_epoch) == (3, 1)
    scheduled_lr = [lr for _, _, lr in seen]
    seen.clear()
    run_training(parse_args([*run_argv(high, tmp_path / "plain", *common)]))
    assert [lr for _, _, lr in seen] == scheduled_lr and len(set(scheduled_lr)) > 5  # the LR schedule knows no switch
    # stopped at a pass's end (step 3), at the switch once it was made (--epochs 2 ends at step 5) and before it was
    # made (the straight run's step-5 checkpoint), then resumed: bit-identical to the run that never stopped
    for leg, first in (("b", ["--epochs", "1"]), ("c", ["--epochs", "2"]), ("d", None)):
        if first is None:
            resume = str(tmp_path / "a" / "checkpoints" / "step_0000005")
        else:
            run_training(parse_args([*argv(leg, *schedule), *first]))
            resume = "latest"
        seen.clear()
        resumed = run_training(parse_args(argv(leg, *schedule, "--resume", resume)))
        assert [shape for _, shape, _ in seen] == ([(4, 4)] * 5 + [(8, 8)] * 4)[-len(seen) :]
        assert len(seen) == {"b": 6, "c": 4, "d": 4}[leg]
        assert resumed.progress == straight.progress
        assert_same_weights(straight.last_checkpoint, resumed.last_checkpoint, atol=0)


@pytest.mark.parametrize(
    ("schedule", "extra", "message"),
    [
        ("0:low,5:mid", [], "'mid' is no --cache set"),
        ("0:low,5:high,5:low", [], "its steps [0, 5, 5] must increase"),
        ("3:low,5:high", [], "must start at step 0"),
        ("0:low", [], "never trains on --cache"),
        ("0:low,five:high", [], "'five:high' is not STEP:CACHE"),
        ("0:low,5:high", ["--in_memory"], "drop --in_memory"),
        ("0:low,5:high", ["--cache_weights", "1", "2"], "drop --cache_weights"),
    ],
)
def test_a_bad_schedule_is_refused_with_one_line(
    two_resolutions: tuple[Path, Path], tmp_path: Path, schedule: str, extra: list[str], message: str, capsys
) -> None:
    low, high = two_resolutions
    argv = both(low, high, tmp_path, "--resolution_schedule", schedule, *extra)
    with pytest.raises(ArgsError) as e:
        parse_args(argv)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_documented_schedule_example_parses_and_switches_at_its_step(
    two_resolutions: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = (ROOT / "docs" / "CACHE_FORMAT.md").read_text()
    block = doc[doc.index("## Several resolutions in one run") :].split("```bash\n", 1)[1].split("```", 1)[0]
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == ["python", "train_tinyflux.py"]
    (tmp_path / "caches").mkdir()
    (tmp_path / "caches" / "mine-256").symlink_to(two_resolutions[0])
    (tmp_path / "caches" / "mine-512").symlink_to(two_resolutions[1])
    monkeypatch.chdir(tmp_path)
    args = parse_args([*argv[2:], "--model", "tiny"])  # the synthetic caches are the tiny preset's
    loader = loader_of(args)
    assert isinstance(loader, ScheduledLoader) and loader.schedule == [(0, 0), (20000, 1)]
    assert [loader.set_at(s) for s in (0, 19999, 20000, 29999)] == [0, 0, 1, 1]
    readme = (ROOT / "README.md").read_text()  # the README's mixing example: both caches, weights 3 and 1
    mixing = re.search(r"`(--cache caches/mine-256[^`]*)`", readme).group(1)
    args = parse_args([*shlex.split(mixing), "--model", "tiny"])
    mixed = loader_of(args)
    assert mixed.dataset.weights == [3.0, 1.0] and mixed.bucket_shapes == [(4, 4), (8, 8)]
