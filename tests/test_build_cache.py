"""build_cache.py on the tiny zoo: sharding, the bad-input report, resume, multi-process builds, other input kinds."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load as load_tensors
from transformers import HfArgumentParser

from build_cache import main as build_cache_main
from tests.fixtures_cache import TINY, BuiltCache
from tests.trainer_helpers import free_port
from tinyflux.cache.build import BuildCacheArgs, BuildError, _make_zoo, build_settings, run_build
from tinyflux.cache.encode import prepare_image
from tinyflux.cache.format import T_BUCKETS, CacheMismatchError, check_compatible, load_manifest
from tinyflux.cache.loaders import make_stream_loader

REPO = Path(__file__).resolve().parents[1]


def _shard_keys(output: Path) -> list[list[str]]:
    manifest = load_manifest(output)
    keys = []
    for shard in manifest.shards:
        with tarfile.open(output / shard["name"]) as tar:
            keys.append(sorted({m.name.split(".")[0] for m in tar.getmembers()}))
    return keys


def _shard_bytes(output: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((output / "shards").glob("*.tar"))}


def test_every_good_image_is_in_one_shard_and_bad_inputs_are_reported(built_cache: BuiltCache) -> None:
    manifest = built_cache.manifest
    keys = [k for shard in _shard_keys(built_cache.output) for k in shard]
    assert sorted(keys) == built_cache.good_keys  # each good image exactly once
    assert manifest.num_samples == 11 and manifest.num_inputs == 16 and manifest.num_skipped == 5
    assert [s["count"] for s in manifest.shards] == [4, 4, 2, 1]
    report = json.loads((built_cache.output / "report.json").read_text())
    assert {item["key"]: item["reason"] for item in report["skipped"]} == built_cache.bad
    assert report["by_reason"]["too_small"] == 1
    text = (built_cache.output / "report.txt").read_text()
    assert "16 inputs, 11 cached, 5 skipped" in text and "small.png" in text
    assert manifest.t5_layers == list(TINY.t5_layers) and manifest.resolution == 64
    assert manifest.fields["latents"].shape == [16, 8, 8] and manifest.fields["sol_spatial"].shape == [10, 8, 8]


def test_shards_read_back_with_plain_webdataset_tar_and_the_stream(built_cache: BuiltCache) -> None:
    urls = [str(built_cache.output / s["name"]) for s in built_cache.manifest.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 11 and {"safetensors", "txt", "json"} <= set(samples[0])
    tensors = load_tensors(samples[0]["safetensors"])
    meta = json.loads(samples[0]["json"])
    assert tensors["t5_embeds"].shape == (meta["t5_length"], 2, 64) and tensors["latents"].dtype == torch.float16
    assert tensors["lune"].shape == (10, TINY.lune_expert_dim) and tensors["sol_stats"].shape == (10, 4)
    with tarfile.open(urls[0]) as tar:
        member = tar.getmember("00000.txt")
        assert tar.extractfile(member).read().decode() == (built_cache.images / "00000.txt").read_text().strip()
        assert member.mtime == 0 and member.uname == "tinyflux"

    batch = next(iter(make_stream_loader(built_cache.output, batch_size=3, model_config=TINY, rank=0, world_size=1)))
    assert batch["latents"].shape == (3, 16, 8, 8) and batch["t5_mask"].any(1).all()
    assert torch.equal(batch["t_buckets"], T_BUCKETS)


def test_cached_features_are_the_zoo_features_of_each_sample(built_cache: BuiltCache, tiny_zoo, one_thread) -> None:  # noqa: ANN001
    raw = next(
        s
        for s in wds.WebDataset([str(built_cache.output / "shards/shard-000001.tar")], shardshuffle=False)
        if s["__key__"] == "00006"
    )
    cached, caption = load_tensors(raw["safetensors"]), raw["txt"].decode()
    image = prepare_image(Image.open(built_cache.images / "00006.png"), 64)
    close = dict(atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(cached["latents"].float(), tiny_zoo.encode_image(image), **close)
    torch.testing.assert_close(
        cached["lune"][6].float(), tiny_zoo.extract_lune([caption], float(T_BUCKETS[6]))[0], **close
    )
    stats, spatial = tiny_zoo.extract_sol([caption], float(T_BUCKETS[2]))
    torch.testing.assert_close(cached["sol_spatial"][2].float(), spatial[0], **close)
    t5, _, lengths = tiny_zoo.encode_prompts_batched([caption], return_lengths=True)
    torch.testing.assert_close(cached["t5_embeds"].float(), t5[0, : lengths[0]], **close)


def test_a_killed_build_resumes_to_the_same_shards(built_cache: BuiltCache, tmp_path: Path, one_thread) -> None:  # noqa: ANN001
    output = tmp_path / "cache"
    assert run_build(BuildCacheArgs(output=str(output), stop_after_shards=1, **built_cache.build_kwargs())) is None
    assert not (output / "manifest.json").exists() and [p.name for p in (output / "shards").glob("*.tar")] == [
        "shard-000000.tar"
    ]
    first = (output / "shards/shard-000000.tar").stat()
    (output / "shards/shard-000001.tar.tmp").write_bytes(b"half a shard, cut off by the kill")
    with pytest.raises(Exception, match="no manifest"):
        load_manifest(output)

    manifest = run_build(BuildCacheArgs(output=str(output), **built_cache.build_kwargs()))
    assert (output / "shards/shard-000000.tar").stat().st_mtime_ns == first.st_mtime_ns  # kept, not rebuilt
    assert _shard_bytes(output) == _shard_bytes(built_cache.output)
    assert manifest.to_dict() == built_cache.manifest.to_dict()
    assert not list((output / "shards").glob("*.tmp"))


def test_other_feature_settings_do_not_mix_into_an_existing_cache(built_cache: BuiltCache) -> None:
    with pytest.raises(BuildError, match="seed: 0 -> 1.*new --output"):
        run_build(BuildCacheArgs(output=str(built_cache.output), **{**built_cache.build_kwargs(), "seed": 1}))
    assert (built_cache.output / "manifest.json").is_file()  # refused before touching anything


def test_manifest_mismatch_fails_with_its_message(built_cache: BuiltCache) -> None:
    check_compatible(built_cache.manifest, TINY)
    with pytest.raises(
        CacheMismatchError, match=r"t5_layers: .* has \(2, 4\), the model expects \(4,\).*--t5_layers 4"
    ):
        make_stream_loader(built_cache.output, model_config=TINY.replace(t5_layers=(4,)), rank=0, world_size=1)


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_build_the_same_cache(built_cache: BuiltCache, tmp_path: Path) -> None:
    output = tmp_path / "cache"
    flags = [f"--{k}={v}" for k, v in built_cache.build_kwargs().items()]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(free_port()), str(REPO / "build_cache.py"), f"--output={output}", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1: 2 shards written" in done.stderr and "rank 0: 2 shards written" in done.stderr
    assert _shard_bytes(output) == _shard_bytes(built_cache.output)
    assert load_manifest(output).to_dict() == built_cache.manifest.to_dict()


def _png(color: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_datasets_and_webdataset_inputs(tmp_path: Path, tiny_zoo_path: Path, one_thread) -> None:  # noqa: ANN001
    import datasets

    rows = {"image": [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")], "text": ["red", "", "blue"]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    common = dict(zoo=str(tiny_zoo_path), model_preset="tiny", resolution=64, shard_size=2, no_lune=True, no_sol=True)
    manifest = run_build(BuildCacheArgs(output=str(tmp_path / "from_ds"), dataset=str(tmp_path / "ds"), **common))
    assert manifest.num_samples == 2 and not manifest.has_lune and not manifest.has_sol
    report = json.loads((tmp_path / "from_ds/report.json").read_text())
    assert [(s["key"], s["reason"]) for s in report["skipped"]] == [("00000001", "empty_caption")]

    with wds.TarWriter(str(tmp_path / "in-000.tar")) as sink:
        sink.write({"__key__": "a", "png": _png("red"), "txt": "a red square"})
        sink.write({"__key__": "b", "png": b"broken", "txt": "broken"})
        sink.write({"__key__": "c", "png": _png("blue", (128, 64)), "txt": "a blue rectangle"})
    manifest = run_build(
        BuildCacheArgs(output=str(tmp_path / "from_wds"), wds=[str(tmp_path / "in-000.tar")], **common)
    )
    assert manifest.num_samples == 2 and _shard_keys(tmp_path / "from_wds") == [["a"], ["c"]]
    assert load_manifest(tmp_path / "from_wds").num_skipped == 1


def test_the_script_explains_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert build_cache_main(["--output", str(tmp_path / "x"), "--resolution", "100"]) == 2
    err = capsys.readouterr().err
    assert "give exactly one input: --images, --dataset or --wds" in err and "multiple of 8" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--wds", "nothere.tar"], "--wds: nothere.tar does not exist"),
        (["--dataset", "./nothere"], "--dataset ./nothere: could not load it"),
        (["--images", "{images}", "--zoo", "{tmp}/nozoo"], "is not a tiny zoo .* make-tiny"),
    ],
)
def test_bad_sources_exit_2_with_a_message(tmp_path, capsys, extra, message):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"junk")
    (images / "a.txt").write_text("a caption")
    argv = [a.format(images=images, tmp=tmp_path) for a in extra]
    assert build_cache_main([*argv, "--output", str(tmp_path / "out"), "--model_preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "build_cache.py: error:" in err
    assert re.search(message, err), err


def test_teacher_base_reaches_the_zoo_and_the_feature_settings(tmp_path: Path, tiny_zoo_path: Path) -> None:
    (tmp_path / "images").mkdir()
    argv = ["--images", str(tmp_path / "images"), "--output", str(tmp_path / "out"), "--zoo", str(tiny_zoo_path)]

    def settings(*extra: str) -> tuple[str, dict]:
        (args,) = HfArgumentParser(BuildCacheArgs).parse_args_into_dataclasses([*argv, *extra])
        zoo = _make_zoo(args, torch.device("cpu"), torch.float32)
        return zoo.teacher_base, build_settings(args, zoo, torch.float32)["sources"]

    base, sources = settings()
    assert base == str(tiny_zoo_path / "teacher_base") and "teacher_base" not in sources  # old caches keep their hash
    base, sources = settings("--teacher_base", "some/base")
    assert base == sources["teacher_base"] == "some/base"


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "afile").write_text("x")
    assert build_cache_main(["--images", str(tmp_path / "images"), "--output", str(tmp_path / "afile")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_all_inputs_bad_fails_and_still_writes_the_report(tmp_path, capsys, tiny_zoo_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"junk")
    (images / "a.txt").write_text("a caption")
    Image.new("RGB", (64, 64)).save(images / "b.png")  # no caption
    argv = ["--images", str(images), "--output", str(tmp_path / "out"), "--zoo", str(tiny_zoo_path)]
    assert build_cache_main([*argv, "--model_preset", "tiny", "--resolution", "64"]) == 2
    assert "no input in" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["num_inputs"], report["num_samples"], report["num_skipped"]) == (2, 0, 2)
    assert sorted(item["reason"] for item in report["skipped"]) == ["corrupt_image", "missing_caption"]
    assert not (tmp_path / "out" / "manifest.json").exists()
