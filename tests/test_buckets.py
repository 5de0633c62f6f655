"""Aspect-ratio buckets: build_cache.py --buckets, square builds unchanged, old caches as one square bucket."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file

from build_cache import main as build_cache_main
from tests.fixtures_cache import BuiltCache
from tinyflux.cache.bucket_loader import BucketSamples
from tinyflux.cache.buckets import Bucket, auto_buckets, manifest_buckets, nearest_bucket
from tinyflux.cache.build import BuildCacheArgs, run_build
from tinyflux.cache.encode import lune_features, prepare_bucket_image, sol_features
from tinyflux.cache.format import decode_sample, load_manifest
from tinyflux.cache.loaders import make_stream_loader
from tinyflux.frozen.sol_stats import attention_spatial_map, attention_stats
from tinyflux.tools.demo_images import write_demo_images

SNAPSHOT_DIR = Path(__file__).parent / "data" / "square_cache"
# Manifest entries that name this machine's paths or hash the tar bytes (which the tensors' comparison covers).
_MACHINE_KEYS = ("sources", "settings", "shards", "feature_hash", "tinyflux_version")


def square_build_snapshot(tmp: Path, zoo: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """A small square build with both teachers (3 demo images and an 80x64 one, cropped): its tensors by
    "key/name", every member's name with the caption and metadata, and its manifest less the machine's paths."""
    images = tmp / "square_images"
    write_demo_images(images, n=3, size=64, seed=0)
    Image.new("RGB", (80, 64), "blue").save(images / "wide.png")
    (images / "wide.txt").write_text("a blue rectangle")
    output = tmp / "square_cache"
    manifest = run_build(
        BuildCacheArgs(
            output=str(output), images=str(images), zoo=str(zoo), model_preset="tiny", resolution=64,
            shard_size=2, batch_size=2, num_loaders=1,
        )
    )  # fmt: skip
    tensors, members = {}, {}
    for shard in manifest.shards:
        with tarfile.open(output / shard["name"]) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                key, ext = member.name.split(".", 1)
                if ext == "safetensors":
                    tensors |= {f"{key}/{name}": t for name, t in load_tensors(data).items()}
                else:
                    members[member.name] = data.decode()
    d = manifest.to_dict()
    d["settings"] = {k: v for k, v in d["settings"].items() if k != "sources"}
    return tensors, members, {k: v for k, v in d.items() if k not in _MACHINE_KEYS} | {"settings": d["settings"]}


def test_a_square_build_writes_what_it_wrote_before_buckets(tiny_zoo_path: Path, tmp_path: Path, one_thread) -> None:
    tensors, members, manifest = square_build_snapshot(tmp_path, tiny_zoo_path)
    want = load_file(SNAPSHOT_DIR / "tensors.safetensors")
    assert sorted(tensors) == sorted(want)
    for name, tensor in tensors.items():
        assert tensor.dtype == want[name].dtype and tensor.shape == want[name].shape, name
        # float16 storage of float32 CPU math: another CPU may round a last bit differently, nothing more
        torch.testing.assert_close(tensor.float(), want[name].float(), rtol=2e-3, atol=2e-3, msg=name)
    assert members == json.loads((SNAPSHOT_DIR / "members.json").read_text())
    assert manifest == json.loads((SNAPSHOT_DIR / "manifest.json").read_text())
    assert "buckets" not in manifest and all(
        "latent_height" not in json.loads(m) for m in members.values() if m[0] == "{"
    )


def _picture(width: int, height: int) -> Image.Image:
    """A picture whose every pixel differs from its neighbours' (a crop shows in the numbers)."""
    x = torch.linspace(0, 255, width)[None, :].expand(height, width)
    y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    rgb = torch.stack([x, y, (x + y) / 2], dim=-1).to(torch.uint8).numpy()
    return Image.fromarray(rgb)


def _kept(width: int, height: int, bucket: Bucket) -> float:
    """Share of a width x height picture's pixels that its bucket's crop keeps."""
    scale = max(bucket.width / width, bucket.height / height)
    return (bucket.width / scale) * (bucket.height / scale) / (width * height)


@pytest.fixture(scope="module")
def bucket_cache(tmp_path_factory: pytest.TempPathFactory, tiny_zoo_path: Path) -> Path:
    """3:2, 2:3 and 9:16 pictures and a square one, built with --buckets auto at --resolution 256."""
    images = tmp_path_factory.mktemp("aspect_images")
    for name, (w, h) in SHAPES.items():
        _picture(w, h).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(f"a {name} gradient")
    output = tmp_path_factory.mktemp("aspect") / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--images", str(images), "--output", str(output), "--zoo", str(tiny_zoo_path), "--model_preset",
                "tiny", "--resolution", "256", "--buckets", "auto", "--num_loaders", "1"]  # fmt: skip
        assert build_cache_main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return output


SHAPES = {"landscape": (384, 256), "portrait": (256, 384), "phone": (288, 512), "square": (300, 300)}


def _samples(output: Path) -> dict[str, dict[str, Any]]:
    manifest = load_manifest(output)
    out = {}
    for shard in manifest.shards:
        for raw in wds.WebDataset(str(output / shard["name"]), shardshuffle=False):
            sample = decode_sample(raw)
            out[sample["key"]] = sample
    return out


def test_auto_buckets_keep_at_least_95_percent_of_each_picture(bucket_cache: Path) -> None:
    manifest = load_manifest(bucket_cache)
    buckets = [Bucket(b["height"], b["width"]) for b in manifest.buckets]
    assert buckets == auto_buckets(256) and all(b.height % 16 == 0 == b.width % 16 for b in buckets)
    assert all(0.5 <= b.width / b.height <= 2 for b in buckets) and Bucket(256, 256) in buckets
    samples, chosen = _samples(bucket_cache), {}
    for name, (w, h) in SHAPES.items():
        bucket = nearest_bucket(w, h, buckets)
        meta = samples[name]["meta"]
        assert (meta["latent_height"], meta["latent_width"]) == bucket.latent_hw
        assert samples[name]["latents"].shape[1:] == bucket.latent_hw
        assert _kept(w, h, bucket) >= 0.95, (name, bucket, _kept(w, h, bucket))
        assert _kept(w, h, Bucket(256, 256)) < 0.67 or name == "square"  # what a square crop keeps
        chosen[name] = bucket
        assert samples[name]["sol_spatial"].shape[-2:] == (8, 8)
    assert len(set(chosen.values())) == 4  # each in its own bucket
    counts = {(b["height"], b["width"]): b["count"] for b in manifest.buckets}
    assert sum(counts.values()) == 4 and all(counts[(b.height, b.width)] == 1 for b in chosen.values())
    assert manifest.fields["latents"].shape == [16, None, None]


def test_the_crop_is_the_centre_of_the_covering_resize() -> None:
    image, bucket = prepare_bucket_image(_picture(384, 256), auto_buckets(256), 256)
    assert image.size == (bucket.width, bucket.height) == (320, 208)
    cover = _picture(384, 256).resize((320, 213), Image.Resampling.LANCZOS)  # 384 * 208/256 = 312 < 320: width rules
    assert list(image.getdata()) == list(cover.crop((0, 2, 320, 210)).getdata())


def test_teachers_see_noise_of_the_buckets_grid(bucket_cache: Path, tiny_zoo) -> None:
    samples = _samples(bucket_cache)
    sample, bucket = samples["phone"], Bucket(336, 192)
    grid = bucket.teacher_grid(256, 16)  # the tiny teachers' sample_size 16 at 256 px: half the latent grid
    assert grid == (21, 12)
    caption = [sample["caption"]]
    stats, spatial = sol_features(tiny_zoo, caption, teacher_grid=grid)
    lune = lune_features(tiny_zoo, caption, batch_timesteps=True, teacher_grid=grid)
    torch.testing.assert_close(sample["sol_spatial"].float(), spatial[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(sample["sol_stats"].float(), stats[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(sample["lune"].float(), lune[0], rtol=2e-3, atol=2e-3)
    square_stats, _ = sol_features(tiny_zoo, caption)
    assert (square_stats[0] - stats[0]).abs().max() > 1e-2  # another grid, other features


def test_non_square_sol_statistics_have_their_known_answers() -> None:
    h, w = 2, 3
    uniform = torch.full((1, h * w, h * w), 1.0 / (h * w))
    identity = torch.eye(h * w)[None]
    stats = attention_stats(uniform, (h, w))[0]
    assert (
        stats[1] == pytest.approx(1.0) and stats[2] == pytest.approx(1.0) and stats[3] == pytest.approx(0.0, abs=1e-6)
    )
    stats = attention_stats(identity, (h, w))[0]
    assert (
        stats[0] == pytest.approx(1.0) and stats[2] == pytest.approx(0.0, abs=1e-6) and stats[3] == pytest.approx(1.0)
    )
    corner = torch.zeros(1, h * w, h * w)
    corner[..., h * w - 1] = 1.0  # every query on the far corner (1, 2)
    assert attention_stats(corner, (h, w))[0, 0] < 1.0
    spatial = attention_spatial_map(corner, (h, w), 8)[0]
    assert spatial.shape == (8, 8) and spatial.sum() == pytest.approx(1.0)
    assert spatial[-1, -1] == spatial.max() and spatial[:4, :4].sum() == 0  # the far corner, squeezed to the square
    # a square grid given as (s, s) is the square grid
    probs = torch.softmax(torch.randn(2, 16, 16), dim=-1)
    assert torch.equal(attention_stats(probs, (4, 4)), attention_stats(probs, 4))


def test_bad_bucket_lists_get_one_line_naming_them(
    tiny_zoo_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images = tmp_path / "images"
    write_demo_images(images, n=2, size=64, seed=0)
    common = ["--images", str(images), "--zoo", str(tiny_zoo_path), "--model_preset", "tiny", "--resolution", "64"]
    assert build_cache_main([*common, "--output", str(tmp_path / "a"), "--buckets", "64,64;48,100"]) == 2
    err = capsys.readouterr().err
    assert "'48,100'" in err and "multiples of 16" in err and "Traceback" not in err
    assert build_cache_main([*common, "--output", str(tmp_path / "b"), "--buckets", "64,64;32,128"]) == 2
    err = capsys.readouterr().err
    assert "32x128" in err and "no image went to" in err and "Traceback" not in err
    assert not (tmp_path / "b" / "manifest.json").exists()
    assert build_cache_main([*common, "--output", str(tmp_path / "c"), "--resolution", "72", "--buckets", "auto"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_old_caches_read_as_one_square_bucket_and_a_bucket_cache_lists_each_samples_bucket(
    built_cache: BuiltCache, bucket_cache: Path
) -> None:
    assert manifest_buckets(built_cache.manifest) == [{"height": 64, "width": 64, "count": 11}]
    assert make_stream_loader(built_cache.output, batch_size=2).bucket_shapes == [(8, 8)]  # one bucket: as before
    assert all("bucket_of" not in shard for shard in built_cache.manifest.shards)
    # a bucket cache's shards list each sample's bucket (what the stream plans several processes' batches with)
    manifest = load_manifest(bucket_cache)
    listed = [manifest.buckets[b] for shard in manifest.shards for b in shard["bucket_of"]]
    shapes = BucketSamples(bucket_cache).shapes
    assert [(b["height"] // 8, b["width"] // 8) for b in listed] == shapes and len(set(shapes)) > 1


def test_every_auto_bucket_goes_through_the_teachers(tiny_zoo) -> None:
    """The tiny UNets have SD1.5's block structure (3 stride-2 downsamplers, skip-connected up blocks): each auto
    bucket's teacher grid at 256 and 512 px, odd sides included, goes through both with Sol's map at 8 x 8."""
    from tinyflux.frozen.teachers import lune_from_context, sol_from_context

    lune, sol = tiny_zoo.load_lune(), tiny_zoo.load_sol()
    side = sol.config.sample_size
    context = tiny_zoo.encode_clip_context(["a cat"])
    grids = {b.teacher_grid(r, side) for r in (256, 512) for b in auto_buckets(r)}
    assert any(h % 2 for h, _ in grids) and len(grids) > 10
    t = torch.tensor([0.5])
    for grid in sorted(grids):
        stats, spatial = sol_from_context(sol, context, t, [0], torch.float32, 1, 8, grid)
        assert stats.shape == (1, 4) and spatial.shape == (1, 8, 8) and torch.isfinite(stats).all(), grid
        assert spatial.sum().item() == pytest.approx(1.0, abs=1e-4)
        assert lune_from_context(lune, context, t, [0], torch.float32, 1, grid).shape == (
            1,
            lune.config.block_out_channels[-1],
        )
