"""train_tinyflux.py --images DIR: one command caches a folder (the build_cache builder, tiny zoo) and fine-tunes on
it; an unchanged folder reuses its cache, a changed one gets a new cache; prompts.txt captions; --repeats."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.trainer_helpers import accelerate_launch
from tinyflux.cache.format import load_manifest
from tinyflux.cache.inputs import BuildError, folder_items
from tinyflux.tools.demo_images import write_demo_images
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer.args import ArgsError, parse_args
from tinyflux.trainer.folder import CACHE_SUBDIR
from tinyflux.trainer.main import run_training

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "accelerate_configs" / "cpu_2proc.yaml"


def folder_argv(images: Path, zoo: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--images", str(images), "--zoo", str(zoo), "--model", "tiny", "--resolution", "64", "--dtype", "float32",
        "--batch_size", "2", "--gradient_accumulation", "1", "--warmup_steps", "1", "--learning_rate", "2e-3",
        "--num_workers", "0", "--log_every", "2", "--save_every_steps", "none", "--log_with", "none",
        "--sample_every", "none", "--checkpoint_dir", str(out / "checkpoints"), "--tensorboard_dir", str(out / "logs"),
        *extra,
    ]  # fmt: skip


def test_one_command_caches_a_folder_and_fine_tunes_then_reuses_or_rebuilds(tmp_path, tiny_zoo_path, caplog):
    images = tmp_path / "shapes"
    write_demo_images(images, n=8, size=64, seed=0)
    caplog.set_level(logging.INFO)
    argv = folder_argv(images, tiny_zoo_path, tmp_path / "run1", "--total_steps", "4", "--validation_fraction", "0.25")
    trainer = run_training(parse_args(argv + ["--validation_every", "4"]))
    (cache,) = (images / CACHE_SUBDIR).glob("64px-*")
    manifest = load_manifest(cache)
    assert manifest.num_samples == 8 and manifest.t5_layers == [2, 4] and manifest.has_lune and manifest.has_sol
    assert ckpt.is_complete(trainer.last_checkpoint) and trainer.current_step == 4
    assert len(trainer.validator) == 2 and trainer.progress.best_val_step in (0, 4)  # 2 of 8 held out
    assert any("shards written" in r.getMessage() for r in caplog.records)  # built by run_build
    shards = {p: p.stat().st_mtime_ns for p in cache.rglob("*.tar")}

    caplog.clear()
    again = run_training(parse_args(folder_argv(images, tiny_zoo_path, tmp_path / "run2", "--total_steps", "2")))
    assert again.current_step == 2
    assert any("reusing the cache" in r.getMessage() for r in caplog.records)
    assert not any("shards written" in r.getMessage() for r in caplog.records)  # run_build never ran
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.tar")} == shards  # not rebuilt

    (images / "00003.txt").write_text("a caption edited after the first build")
    caplog.clear()
    run_training(parse_args(folder_argv(images, tiny_zoo_path, tmp_path / "run3", "--total_steps", "1")))
    assert any("changed since its cache was built" in r.getMessage() for r in caplog.records)
    new = next(d for d in (images / CACHE_SUBDIR).glob("64px-*") if d != cache)
    assert load_manifest(new).num_samples == 8 and cache.is_dir()  # the older cache stays

    import sample  # folder -> train -> sample, as the README's fine-tuning section runs it

    argv = ["--model", str(trainer.last_checkpoint), "--zoo", str(tiny_zoo_path), "--prompt", "a red circle"]
    assert (
        sample.cli([*argv, "--num_steps", "2", "--height", "64", "--width", "64", "--output", str(tmp_path / "s")]) == 0
    )
    assert Image.open(tmp_path / "s" / "grid.png").width == 64


def test_prompts_txt_captions_the_images_without_a_txt(tmp_path):
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"img{i}.png")
    (tmp_path / "img1.txt").write_text("its own caption")
    (tmp_path / "prompts.txt").write_text("a photo of sks\n")
    assert [item.load()[1] for item in folder_items(tmp_path)] == [
        "a photo of sks",
        "its own caption",
        "a photo of sks",
    ]
    (tmp_path / "prompts.txt").write_text("first\nsecond\nthird\n")  # one per image, in sorted name order
    assert [item.load()[1] for item in folder_items(tmp_path)] == ["first", "its own caption", "third"]
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    with pytest.raises(BuildError, match="2 captions for 3 images"):
        folder_items(tmp_path)


def test_repeats_show_each_image_that_often_per_epoch(tmp_path, tiny_zoo_path):
    images = tmp_path / "shapes"
    write_demo_images(images, n=4, size=64, seed=1)
    argv = folder_argv(images, tiny_zoo_path, tmp_path / "run", "--repeats", "3", "--total_steps", "100")
    trainer = run_training(parse_args(argv + ["--epochs", "1"]))
    assert trainer.progress.epoch == 1 and trainer.progress.samples_seen == 12 and trainer.current_step == 6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cache", "x"], "not both"),
        (["--repeats", "0"], "--repeats 0 must be >= 1"),
        (["--resolution", "60"], "multiple of 8"),
        (["--validation_fraction", "1.5"], r"must lie in \(0, 1\)"),
    ],
)
def test_bad_folder_flags_fail_at_parse_time(tmp_path, extra, message):
    with pytest.raises(ArgsError, match=message):
        parse_args(["--images", str(tmp_path), "--model", "tiny", *extra])


@pytest.mark.slow
def test_two_processes_build_the_folder_cache_together_and_agree_on_the_validation_loss(tmp_path, tiny_zoo_path):
    """Every process joins the build (each its shards, rank 0 the manifest); each evaluates its share of the held-out
    batches (3 samples on 2 processes: one pads) and gather_for_metrics joins them: the figure of one process."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = tmp_path / "shapes"
    write_demo_images(images, n=8, size=64, seed=2)
    common = ["--total_steps", "2", "--validation_fraction", "0.375", "--log_with", "tensorboard"]
    launch = accelerate_launch(CPU_2PROC)
    argv = folder_argv(images, tiny_zoo_path, tmp_path / "two", *common, "--cache_dir", str(tmp_path / "caches"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [*launch, str(ROOT / "train_tinyflux.py"), *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: 1 shards written" in result.stderr and "8 samples in 1 shards" in result.stderr
    one = run_training(
        parse_args(
            folder_argv(images, tiny_zoo_path, tmp_path / "one", *common, "--cache_dir", str(tmp_path / "caches"))
        )
    )
    assert len(one.validator) == 3

    def val_loss_at_0(out: Path) -> float:
        events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
        events.Reload()
        return next(e.value for e in events.Scalars("val/loss") if e.step == 0)

    assert val_loss_at_0(tmp_path / "two") == pytest.approx(val_loss_at_0(tmp_path / "one"), rel=1e-6)


def test_a_folder_fine_tunes_on_aspect_buckets_with_lora(tmp_path, tiny_zoo_path):
    images = tmp_path / "photos"
    images.mkdir()
    for name, size in (("square", (64, 64)), ("wide", (96, 64)), ("tall", (64, 96))):  # (width, height)
        for i in range(2):
            Image.new("RGB", size, (40 * i, 120, 200)).save(images / f"{name}{i}.png")
            (images / f"{name}{i}.txt").write_text(f"a {name} photo of sks")
    argv = folder_argv(images, tiny_zoo_path, tmp_path / "run", "--total_steps", "3", "--lora_rank", "4")
    trainer = run_training(parse_args([*argv, "--buckets", "auto"]))
    (cache,) = (images / CACHE_SUBDIR).glob("64px-*")
    counts = {f"{b['height']}x{b['width']}": b["count"] for b in load_manifest(cache).buckets if b["count"]}
    assert counts == {"64x64": 2, "48x80": 2, "80x48": 2}  # each picture in the bucket of its aspect
    assert trainer.dataloader.bucket_shapes == [(6, 10), (8, 8), (10, 6)]  # streamed, one bucket a batch
    assert trainer.lora is not None and trainer.current_step == 3
    # without --buckets the same folder is cached square, in its own directory
    run_training(parse_args(folder_argv(images, tiny_zoo_path, tmp_path / "square", "--total_steps", "1")))
    assert len(list((images / CACHE_SUBDIR).glob("64px-*"))) == 2
    with pytest.raises(ArgsError, match=r"--buckets entry '50,64': both sides must be positive multiples of 16"):
        parse_args([*argv, "--buckets", "50,64"])
    with pytest.raises(ArgsError, match="--buckets belongs to --images DIR"):
        parse_args(["--cache", str(cache), "--buckets", "auto"])
