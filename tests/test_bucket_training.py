"""Training on aspect buckets, in memory and streamed: one shape per batch, each sample once per epoch, the token
budget, exact resume."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch._dynamo.testing import CompileCounter

from build_cache import main as build_cache_main
from tests.test_train_script import CPU_2PROC, ROOT, SUBPROCESS_ENV, assert_same_weights, run_argv
from tests.trainer_helpers import TINY, accelerate_launch
from tests.trainer_helpers import config as trainer_config
from tinyflux.cache.bucket_loader import BucketBatchSampler, BucketLoader
from tinyflux.cache.buckets import BucketError
from tinyflux.cache.format import CacheFormatError
from tinyflux.cache.loaders import StreamingLoader, collate_fn, make_stream_loader
from tinyflux.cache.memory import DatasetCache
from tinyflux.model.config import TinyFluxConfig
from tinyflux.model.model import TinyFluxDeep, pack_latents
from tinyflux.trainer.args import parse_args
from tinyflux.trainer.checkpoint import TRAINER_STATE
from tinyflux.trainer.main import build_dataloader, run_training
from tinyflux.trainer.runtime import compile_blocks
from tinyflux.trainer.trainer import Trainer
from tinyflux.util.predictions import flow_velocity, flow_x_t

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# 64 px auto buckets: 64x64, 48x80, 80x48, 48x96, 96x48 (height x width)
PICTURES = {"square": (64, 64), "wide": (96, 64), "tall": (64, 96), "panorama": (128, 64)}


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory: pytest.TempPathFactory, tiny_zoo_path: Path) -> Path:
    """15 pictures of four shapes (4 square, 4 at 3:2, 4 at 2:3, 3 at 2:1), a smooth pattern each, built with
    --buckets auto at 64 px on the tiny zoo."""
    images = tmp_path_factory.mktemp("mixed_images")
    for name, (w, h) in PICTURES.items():
        for i in range(3 if name == "panorama" else 4):
            x = torch.linspace(0, 1, w)[None, :, None]
            y = torch.linspace(0, 1, h)[:, None, None]
            rgb = torch.cat([x.expand(h, w, 1), y.expand(h, w, 1), (x * y * (i + 1) / 4).expand(h, w, 1)], dim=-1)
            Image.fromarray((rgb * 255).to(torch.uint8).numpy()).save(images / f"{name}{i}.png")
            (images / f"{name}{i}.txt").write_text(f"a {name} gradient number {i}")
    output = tmp_path_factory.mktemp("mixed") / "cache"
    argv = ["--images", str(images), "--output", str(output), "--zoo", str(tiny_zoo_path), "--model_preset", "tiny",
            "--resolution", "64", "--buckets", "auto", "--num_loaders", "1", "--shard_size", "8"]  # fmt: skip
    assert build_cache_main(argv) == 0
    return output


def _epoch(loader: BucketLoader) -> list[dict]:
    return list(loader)


def test_every_batch_is_one_bucket_and_every_sample_comes_once_per_epoch(mixed_cache: Path, tmp_path: Path) -> None:
    for mode, sizes in (("samples", {(8, 8): 4, (6, 10): 4, (10, 6): 4, (6, 12): 4}), ("tokens", None)):
        args = parse_args(run_argv(mixed_cache, tmp_path, "--in_memory", "--bucket_batch", mode))
        loader = build_dataloader(args.script.cache, args.model_config, args.trainer, in_memory=True, bucket_batch=mode)
        assert isinstance(loader, BucketLoader)
        if sizes is not None:
            assert loader.sampler.batch_sizes == sizes
        budget = 4 * 8 * 8  # batch_size x tokens of the 64 px square bucket (8x8 latents, the tiny preset's patch 1)
        for epoch in range(2):
            batches = _epoch(loader)
            assert len(batches) == len(loader) and loader.epoch == epoch + 1
            indices = sorted(i for b in batches for i in b["index"].tolist())
            assert indices == list(range(15))  # once each: the partial batches of the buckets are trained too
            shapes = {b["latents"].shape[-2:] for b in batches}
            assert shapes == {(8, 8), (6, 10), (10, 6), (6, 12)}
            if mode == "tokens":
                for b in batches:
                    n, _, h, w = b["latents"].shape
                    assert n * h * w <= budget
        if mode == "tokens":  # 6x12 latents hold 72 tokens: 3 per batch stay within 256, 4 would not
            assert loader.sampler.batch_sizes == {(8, 8): 4, (6, 10): 4, (10, 6): 4, (6, 12): 3}
        orders = [[b["index"].tolist() for b in _epoch(loader)] for _ in range(2)]
        assert orders[0] != orders[1]  # a new shuffle every epoch


def _bucket_loss(model: TinyFluxDeep, cache: Path, tmp_path: Path) -> float:
    """Velocity MSE at fixed noise and timesteps over every sample, one batch per bucket."""
    args = parse_args(run_argv(cache, tmp_path, "--in_memory", "--batch_size", "16"))
    g, total, count = torch.Generator().manual_seed(123), 0.0, 0
    with torch.no_grad():
        for batch in build_dataloader(args.script.cache, args.model_config, args.trainer, in_memory=True):
            data = batch["latents"].float()
            n, _, h, w = data.shape
            noise, t = torch.randn(data.shape, generator=g), torch.linspace(0.1, 0.9, n)
            v = model(
                pack_latents(flow_x_t(data, noise, t)),
                batch["t5_embeds"].float(),
                batch["clip_pooled"].float(),
                t,
                TinyFluxDeep.create_img_ids(n, h, w, None),
                encoder_attention_mask=batch["t5_mask"],
                img_shape=(h, w),
            )
            total += (v - pack_latents(flow_velocity(data, noise))).square().sum().item()
            count += v.numel()
    return total / count


def test_the_tiny_preset_learns_from_mixed_shapes_and_resumes_exactly(mixed_cache: Path, tmp_path: Path) -> None:
    common = ["--in_memory", "--bucket_batch", "tokens", "--lr_scheduler", "constant", "--gradient_accumulation", "1"]
    torch.manual_seed(0)
    before = _bucket_loss(TinyFluxDeep(TinyFluxConfig.preset("tiny")).eval(), mixed_cache, tmp_path)
    straight = run_training(parse_args(run_argv(mixed_cache, tmp_path / "a", *common, "--total_steps", "12")))
    after = _bucket_loss(straight.model.eval(), mixed_cache, tmp_path)
    assert after < 0.8 * before, (before, after)
    # stopped mid-epoch (7 steps; an epoch is 4 batches: one per bucket) or at an epoch's end, then resumed: the
    # same weights as the run that never stopped, bit for bit
    for leg, first in (("b", ["--total_steps", "7"]), ("c", ["--epochs", "1"])):
        run_training(parse_args(run_argv(mixed_cache, tmp_path / leg, *common, "--total_steps", "12", *first)))
        resumed = run_training(
            parse_args(run_argv(mixed_cache, tmp_path / leg, *common, "--total_steps", "12", "--resume"))
        )
        assert resumed.progress == straight.progress
        assert_same_weights(straight.last_checkpoint, resumed.last_checkpoint, atol=0)


def test_a_streamed_run_on_buckets_resumes_bit_identically(mixed_cache: Path, tmp_path: Path) -> None:
    common = ["--bucket_batch", "tokens", "--lr_scheduler", "constant", "--gradient_accumulation", "1"]
    straight = run_training(parse_args(run_argv(mixed_cache, tmp_path / "a", *common, "--total_steps", "12")))
    # a pass is 4 batches (one per bucket): 12 steps close two passes and end with the third's last batch
    assert (straight.progress.epoch, straight.progress.batches_in_epoch) == (2, 4)
    for leg, first in (("b", ["--total_steps", "7"]), ("c", ["--epochs", "1"])):  # mid-pass, at a pass's end
        run_training(parse_args(run_argv(mixed_cache, tmp_path / leg, *common, "--total_steps", "12", *first)))
        resumed = run_training(
            parse_args(run_argv(mixed_cache, tmp_path / leg, *common, "--total_steps", "12", "--resume"))
        )
        assert resumed.progress == straight.progress
        assert_same_weights(straight.last_checkpoint, resumed.last_checkpoint, atol=0)


def _stream(cache: Path, num_workers: int, mode: str = "samples") -> StreamingLoader:
    return make_stream_loader(
        cache, batch_size=4, num_workers=num_workers, seed=5, rank=0, world_size=1, shuffle_buffer=4, bucket_batch=mode
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_stream_batches_one_bucket_at_a_time_and_each_pass_sees_every_sample_once(
    mixed_cache: Path, num_workers: int
) -> None:
    for mode in ("samples", "tokens"):
        loader = _stream(mixed_cache, num_workers, mode)
        assert loader.bucket_shapes == [(6, 10), (6, 12), (8, 8), (10, 6)]
        passes = [list(loader) for _ in range(2)]
        for batches in passes:
            assert all(len(set(b["key"])) == len(b["key"]) for b in batches)
            indices = sorted(i for b in batches for i in b["index"].tolist())
            # one worker reads all 15 samples a pass; two read 7 each (the leftover one differs every pass, as on
            # square caches): every bucket's partial batch is trained too, none twice
            assert len(indices) == len(set(indices)) == (15 if num_workers == 0 else 14)
            assert {b["latents"].shape[-2:] for b in batches} == {(8, 8), (6, 10), (10, 6), (6, 12)}
            for b in batches:
                n, _, h, w = b["latents"].shape
                assert n <= loader.dataset.bucket_sizes[(h, w)]
                assert mode == "samples" or n * h * w <= 4 * 8 * 8  # the token budget of the 64 px square bucket
            assert len(batches) <= len(loader)
        assert [b["key"] for b in passes[0]] != [b["key"] for b in passes[1]]
        loader.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_stream_disjoint_samples_in_the_same_number_of_batches_and_share_one_state(
    mixed_cache: Path, num_workers: int
) -> None:
    ranks = [
        make_stream_loader(
            mixed_cache, batch_size=4, num_workers=num_workers, seed=5, rank=r, world_size=2, bucket_batch="tokens"
        )
        for r in range(2)
    ]
    per_rank = 7 if num_workers == 0 else 6  # 15 // 2 ranks (// 2 workers x 2)
    differ = repeated = 0
    for _ in range(3):
        passes = [[], []]
        for pair in zip(*ranks, strict=True):  # a StopIteration of one rank first would fail zip's strict check
            for r, b in enumerate(pair):
                passes[r].append(b)
            assert ranks[0].state_dict() == ranks[1].state_dict()  # rank 0's state resumes every rank
            differ += pair[0]["latents"].shape != pair[1]["latents"].shape
        mine = [{i for b in part for i in b["index"].tolist()} for part in passes]
        assert len(mine[0]) == len(mine[1]) == per_rank and not mine[0] & mine[1]  # each its own samples, all
        for part in passes:  # a rank's worker with fewer batches repeats its first ones: whole batches, none else
            keys = [tuple(b["key"]) for b in part]
            assert sum(len(k) for k in set(keys)) == per_rank
            repeated += len(keys) - len(set(keys))
    assert differ > 0  # ranks train different buckets in one step
    assert repeated > 0 or num_workers == 0  # with two workers a rank's worker is short of a batch now and then
    for loader in ranks:
        loader.close()


def test_a_bucket_cache_that_does_not_list_its_samples_buckets_streams_on_one_process_only(
    mixed_cache: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(mixed_cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["bucket_of"]  # as caches built before it was listed
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert len(list(make_stream_loader(old, batch_size=4, rank=0, world_size=1))) == 4
    with pytest.raises(BucketError, match="does not list its samples' buckets") as e:
        make_stream_loader(old, batch_size=4, rank=1, world_size=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_restored_bucket_stream_continues_with_the_same_batches(mixed_cache: Path, num_workers: int) -> None:
    reference = _stream(mixed_cache, num_workers, "tokens")
    keys = [b["key"] for b in reference] + [b["key"] for b in reference]  # two passes
    reference.close()
    per_pass = len(keys) // 2
    for stop in (1, per_pass - 1, per_pass, per_pass + 2):  # mid-pass, within the flush of partial buckets, its end
        interrupted = _stream(mixed_cache, num_workers, "tokens")
        it = itertools.chain(interrupted, interrupted)  # the second pass starts when the first has ended
        consumed = [next(it)["key"] for _ in range(stop)]
        state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint stores
        interrupted.close()
        assert consumed == keys[:stop] and "buckets" in state["layout"]
        resumed = _stream(mixed_cache, num_workers, "tokens")
        resumed.load_state_dict(state)
        assert resumed.epoch == interrupted.epoch == (stop >= per_pass)  # a pass's last batch ends its epoch
        rest = [b["key"] for b in resumed] + ([b["key"] for b in resumed] if stop < per_pass else [])
        resumed.close()
        assert rest == keys[stop:], stop


def test_samples_of_several_buckets_do_not_collate_into_one_batch(mixed_cache: Path, tmp_path: Path) -> None:
    args = parse_args(run_argv(mixed_cache, tmp_path, "--in_memory"))
    loader = build_dataloader(args.script.cache, args.model_config, args.trainer, in_memory=True)
    samples = [loader.dataset[i] for i in range(15)]
    with pytest.raises(RuntimeError):  # why every batch must be one bucket: shapes do not stack
        collate_fn(samples)


@pytest.mark.parametrize("loader", [["--in_memory"], []])  # in memory, streamed
def test_the_training_grid_shows_square_landscape_and_portrait_and_sample_py_takes_an_aspect(
    mixed_cache: Path, tmp_path: Path, tiny_zoo_path: Path, capsys, loader: list[str]
) -> None:
    import sample

    grids = ["--zoo", str(tiny_zoo_path), "--sample_every", "2", "--sample_steps", "1", "--sample_prompts", "a cat"]
    argv = run_argv(mixed_cache, tmp_path, *loader, "--total_steps", "2", *grids, "--sample_dir", str(tmp_path))
    trainer = run_training(parse_args(argv))
    singles = sorted(tmp_path.glob("step0000002_*.png"))
    # the 64 px bucket, the one nearest 3:2 (48x80) and the one nearest 2:3 (80x48), height x width, letterboxed
    assert [p.name for p in singles] == [
        "step0000002_000_a_cat_64x64.png", "step0000002_001_a_cat_48x80.png", "step0000002_002_a_cat_80x48.png"
    ]  # fmt: skip
    tiles = [Image.open(p) for p in singles]
    assert all(t.size == (80, 80) for t in tiles)  # one cell size: the largest height and width
    inked = [Image.eval(t.convert("L"), lambda v: 255 if v < 255 else 0).getbbox() for t in tiles]
    assert [(b[2] - b[0], b[3] - b[1]) for b in inked] == [(64, 64), (80, 48), (48, 80)]  # (width, height)
    assert (tmp_path / "grid_step0000002.png").is_file()
    if not loader:
        return  # sample.py's part needs one of the two

    out = tmp_path / "aspect"
    argv = ["--model", str(trainer.last_checkpoint), "--zoo", str(tiny_zoo_path), "--prompt", "a cat", "--num_steps",
            "1", "--height", "64", "--width", "64", "--aspect", "3:2", "--output", str(out)]  # fmt: skip
    assert sample.cli(argv) == 0
    assert Image.open(sorted(out.glob("000_*.png"))[0]).size == (80, 56)  # 3:2 at about 64 x 64 pixels
    assert sample.cli([*argv[:-4], "--aspect", "wide", "--output", str(out)]) == 2
    assert "--aspect 'wide' is not W:H" in capsys.readouterr().err


def test_a_held_out_split_of_a_bucket_cache_validates_bucket_by_bucket(mixed_cache: Path, tmp_path: Path) -> None:
    argv = run_argv(mixed_cache, tmp_path, "--in_memory", "--total_steps", "2", "--validation_fraction", "0.4")
    trainer = run_training(parse_args([*argv, "--validation_every", "2"]))
    assert trainer.progress.best_val_step == 2 and math.isfinite(trainer.progress.best_val_loss)
    shapes = {tuple(s["latents"].shape[1:]) for s in trainer.validator.samples}
    assert len(shapes) > 1 and len(trainer.validator.samples) == 6  # the held-out samples span buckets
    trained = [trainer.dataloader.dataset[i]["index"] for i in range(len(trainer.dataloader.dataset))]
    held = [s["index"] for s in trainer.validator.samples]
    assert sorted(trained + held) == list(range(15))  # none of them is trained on


def test_the_stacking_in_memory_cache_refuses_buckets_with_one_line(mixed_cache: Path) -> None:
    with pytest.raises(CacheFormatError, match="aspect buckets") as e:
        DatasetCache.from_shards(mixed_cache)
    assert "\n" not in str(e.value)


def test_ranks_split_an_epochs_batches_and_together_see_every_sample() -> None:
    shapes = [(8, 8)] * 7 + [(6, 10)] * 5 + [(10, 6)] * 2
    sizes = {(8, 8): 3, (6, 10): 2, (10, 6): 2}
    ranks = [BucketBatchSampler(shapes, sizes, seed=1, rank=r, world_size=2) for r in range(2)]
    mine = [r.batches(4) for r in ranks]
    assert len(mine[0]) == len(mine[1]) == len(ranks[0]) == 4  # 3 + 3 + 1 batches: 7, padded to 8
    seen = {i for part in mine for b in part for i in b}
    assert seen == set(range(14)) and all(len({shapes[i] for i in b}) == 1 for part in mine for b in part)
    assert mine == [r.batches(4) for r in ranks] and mine != [r.batches(5) for r in ranks]


@pytest.mark.slow
@pytest.mark.parametrize("loader", [["--in_memory"], ["--num_workers", "2"]])  # in memory, streamed
def test_two_processes_train_on_buckets(mixed_cache: Path, tmp_path: Path, loader: list[str]) -> None:
    launch = accelerate_launch(CPU_2PROC)
    argv = run_argv(mixed_cache, tmp_path, *loader, "--bucket_batch", "tokens", "--total_steps", "6")
    result = subprocess.run(
        [*launch, str(ROOT / "train_tinyflux.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**SUBPROCESS_ENV, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "checkpoints" / "step_0000006"
    assert (final / "model.safetensors").is_file()
    assert json.loads((final / TRAINER_STATE).read_text())["epoch"] >= 1  # the ranks crossed passes in step


def test_a_compiled_run_on_buckets_compiles_at_most_once_per_bucket_and_never_after_the_first_pass(
    mixed_cache: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = TinyFluxDeep(TINY)
    # torch's counting backend runs dynamo's graphs eagerly: whether a batch recompiles is decided by dynamo's guards
    # whatever the backend (tests/test_static_shapes.py counts text lengths the same way)
    counter = CompileCounter()
    compile_blocks(model, "default", backend=counter)
    block_types = {type(b) for blocks in model.children() if isinstance(blocks, torch.nn.ModuleList) for b in blocks}
    compiled_by_step: list[int] = []
    model.register_forward_hook(lambda *_: compiled_by_step.append(counter.frame_count))
    inputs: list[tuple[int, int]] = []  # (batch size, image tokens) of every step
    model.register_forward_pre_hook(lambda _, args: inputs.append(tuple(args[0].shape[:2])))
    cfg = trainer_config(tmp_path, total_steps=8, gradient_accumulation=1, batch_size=4, log_every=50)
    trainer = Trainer(model, cfg)
    loader = make_stream_loader(
        mixed_cache, batch_size=4, rank=0, world_size=1, bucket_batch="tokens", model_config=TINY
    )
    trainer.setup(loader)
    trainer.train(epochs=None)
    assert trainer.progress.step == 8 and len(compiled_by_step) == 8  # two passes of 4 batches
    # four buckets (8x8, 6x10, 10x6, 6x12 latents at patch 1), two batch sizes (the token budget's 4 and 3)
    assert set(inputs) == {(4, 64), (4, 60), (3, 72)} and len(loader.bucket_shapes) == 4
    assert 0 < counter.frame_count <= len(loader.bucket_shapes) * (len(block_types) + 1)  # + 1: the prologue
    warm = next(i for i, n in enumerate(compiled_by_step) if n == counter.frame_count)
    assert warm < 4 and compiled_by_step[-1] == counter.frame_count  # all within the first pass, none after
