"""Cache builds from streams: --wds tars over HTTP (a loopback server started here) and through pipe:cat, an
img2dataset output folder as it is, and a local parquet dataset opened with --dataset --streaming. Each gives the
shards a local build gives, and a killed streamed build finishes to the same bytes."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import webdataset as wds
from PIL import Image

from tests.fixtures_remote import serve
from tests.trainer_helpers import free_port
from tinyflux.cache.build import STREAM_LOCK, BuildCacheArgs, BuildError, _fill_stream_gaps, run_build
from tinyflux.cache.format import decode_sample, load_manifest
from tinyflux.cache.inputs import StreamedRows

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white")


def _image(color: str, fmt: str = "PNG", size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def _common(zoo: Path) -> dict:
    return dict(zoo=str(zoo), model_preset="tiny", resolution=64, shard_size=2, batch_size=2, no_lune=True, no_sol=True)


def _shards(cache: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((cache / "shards").glob("*.tar"))]


def _tensors(cache: Path) -> list[dict[str, torch.Tensor]]:
    """Every sample's tensors and caption, in manifest order (keys left out: they name the input, not the features)."""
    urls = [str(cache / s["name"]) for s in load_manifest(cache).shards if s["count"]]
    samples = [decode_sample(raw) for raw in wds.tarfile_samples([{"url": u} for u in urls])]
    return [{k: v for k, v in s.items() if k not in ("key", "meta")} for s in samples]


def _write_tars(folder: Path) -> None:
    """Two input tars of 3 samples; one image is broken (skipped and reported, never fatal)."""
    folder.mkdir()
    for t in range(2):
        with wds.TarWriter(str(folder / f"in-{t:03d}.tar")) as sink:
            for i in range(3):
                color = COLORS[3 * t + i]
                png = b"broken" if (t, i) == (1, 1) else _image(color)
                sink.write({"__key__": f"{t}{i}", "png": png, "txt": f"a {color} square"})


def test_wds_over_http_and_pipe_gives_the_local_shards(tmp_path: Path, tiny_zoo_path: Path) -> None:
    _write_tars(tmp_path / "tars")
    common = _common(tiny_zoo_path)
    local = run_build(BuildCacheArgs(output=str(tmp_path / "local"), wds=[str(tmp_path / "tars/in-000.tar"),
                                                                          str(tmp_path / "tars/in-001.tar")], **common))  # fmt: skip
    assert local.num_samples == 5 and local.num_skipped == 1
    with serve(tmp_path / "tars") as server:
        over_http = run_build(BuildCacheArgs(output=str(tmp_path / "http"), wds=[server.url + "in-{000..001}.tar"],
                                             **common))  # fmt: skip
    assert server.requests["/in-000.tar"] == 1 and server.requests["/in-001.tar"] == 1
    piped = run_build(BuildCacheArgs(output=str(tmp_path / "pipe"), wds=[f"pipe:cat {tmp_path}/tars/in-00{{0..1}}.tar"],
                                     **common))  # fmt: skip
    assert _shards(tmp_path / "http") == _shards(tmp_path / "pipe") == _shards(tmp_path / "local")
    assert over_http.feature_hash == piped.feature_hash == local.feature_hash
    skipped = json.loads((tmp_path / "http/report.json").read_text())["skipped"]
    assert [(s["key"], s["reason"], s["source"]) for s in skipped] == [
        ("11", "corrupt_image", f"{server.url}in-001.tar:11")
    ]


def test_a_wds_url_that_fails_names_it(tmp_path: Path, tiny_zoo_path: Path) -> None:
    with serve(tmp_path) as server, pytest.raises(BuildError, match=r"cannot read http://.*/gone-000.tar: HTTP 404"):
        run_build(BuildCacheArgs(output=str(tmp_path / "out"), wds=[server.url + "gone-000.tar"],
                                 **_common(tiny_zoo_path)))  # fmt: skip
    with pytest.raises(BuildError, match=r"--wds pipe:cat /nowhere/x.tar: reading stopped \(the command exited with "
                                         r"status 1\). Re-run the same command"):  # fmt: skip
        run_build(BuildCacheArgs(output=str(tmp_path / "out2"), wds=["pipe:cat /nowhere/x.tar"],
                                 **_common(tiny_zoo_path)))  # fmt: skip


def test_an_img2dataset_folder_is_read_as_it_is(tmp_path: Path, tiny_zoo_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "laion"  # what `img2dataset --output_format webdataset` writes: tar + parquet + stats per shard
    out.mkdir()
    for t in range(2):
        keys = [f"{t:05d}{i:04d}" for i in range(3)]
        status = ["success", "failed_to_download", "success"]
        with wds.TarWriter(str(out / f"{t:05d}.tar")) as sink:
            for i, key in enumerate(keys):
                if status[i] == "success":
                    meta = {"url": f"https://example.com/{key}.jpg", "caption": f"photo {key}", "key": key}
                    sink.write({"__key__": key, "jpg": _image(COLORS[i + t], "JPEG"), "txt": f"photo {key}",
                                "json": json.dumps(meta).encode()})  # fmt: skip
        table = {"key": keys, "status": status, "error_message": [None, "HTTP Error 404: Not Found", None],
                 "url": [f"https://example.com/{k}.jpg" for k in keys], "caption": [f"photo {k}" for k in keys]}  # fmt: skip
        pq.write_table(pa.table(table), out / f"{t:05d}.parquet")
        (out / f"{t:05d}_stats.json").write_text(json.dumps({"count": 3, "successes": 2}))
    (out / "wandb").mkdir()  # other things img2dataset leaves are ignored

    manifest = run_build(BuildCacheArgs(output=str(tmp_path / "cache"), wds=[str(out)], **_common(tiny_zoo_path)))
    assert manifest.num_samples == 4 and manifest.num_inputs == 6
    report = json.loads((tmp_path / "cache/report.json").read_text())
    assert [(s["key"], s["reason"]) for s in report["skipped"]] == [("000000001", "missing_image"),
                                                                    ("000010001", "missing_image")]  # fmt: skip
    assert "img2dataset: failed_to_download (HTTP Error 404: Not Found)" in report["skipped"][0]["detail"]
    urls = str(tmp_path / "cache/shards/shard-{000000..000002}.tar")
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert keys == ["000000000", "000000002", "000010000", "000010002"]

    # The inputs are listed from the parquets, so a re-run reads no tar of a complete shard: killed after shard 0
    # (tar 0's two images), the build finishes with tar 0 unreadable, to the same bytes.
    args = dict(output=str(tmp_path / "resumed"), wds=[str(out)], **_common(tiny_zoo_path))
    assert run_build(BuildCacheArgs(**args, stop_after_shards=1)) is None
    (out / "00000.tar").write_bytes(b"not a tar any more")
    assert run_build(BuildCacheArgs(**args)).feature_hash == manifest.feature_hash
    assert _shards(tmp_path / "resumed") == _shards(tmp_path / "cache")


def _parquet_dataset(folder: Path, n: int) -> datasets.Dataset:
    """n rows of (image, text) in two parquet files, as a Hub dataset has several; returns them as one Dataset."""

    folder.mkdir()
    rows = {"image": [{"bytes": _image(COLORS[i % 7]), "path": None} for i in range(n)],
            "text": [f"a {COLORS[i % 7]} square {i}" for i in range(n)]}  # fmt: skip
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(rows, features=features)
    for part in range(2):
        ds.shard(2, part, contiguous=True).to_parquet(str(folder / f"train-{part:05d}-of-00002.parquet"))
    return ds


def test_a_streamed_dataset_gives_the_features_of_the_downloaded_one_and_resumes(
    tmp_path: Path, tiny_zoo_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _parquet_dataset(tmp_path / "data", 7).save_to_disk(str(tmp_path / "saved"))
    common = _common(tiny_zoo_path)
    downloaded = run_build(BuildCacheArgs(output=str(tmp_path / "whole"), dataset=str(tmp_path / "saved"), **common))
    args = dict(output=str(tmp_path / "streamed"), dataset=str(tmp_path / "data"), streaming=True, **common)
    assert run_build(BuildCacheArgs(**args, stop_after_shards=2)) is None  # killed after 2 of its 4 shards
    first = (tmp_path / "streamed/shards/shard-000000.tar").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="tinyflux.cache.build"):
        streamed = run_build(BuildCacheArgs(**args))
    assert (tmp_path / "streamed/shards/shard-000000.tar").stat().st_mtime_ns == first  # kept, not rebuilt
    # the re-run started datasets' stream at the saved position after shard 1, not at row 0
    assert "rank 0: 2 complete shards; its stream resumes at row 4" in caplog.text
    assert streamed.num_samples == downloaded.num_samples == 7
    a, b = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "whole")
    assert [x["caption"] for x in a] == [y["caption"] for y in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x if k != "caption")
    uninterrupted = run_build(BuildCacheArgs(**{**args, "output": str(tmp_path / "straight")}))
    assert _shards(tmp_path / "streamed") == _shards(tmp_path / "straight")
    assert uninterrupted.to_dict() | {"name": 0} == streamed.to_dict() | {"name": 0}

    (tmp_path / "streamed" / STREAM_LOCK).write_text(json.dumps({"world_size": 2}))
    with pytest.raises(BuildError, match="started on 2 process.*finish it on 2 .this run has 1"):
        run_build(BuildCacheArgs(**args))


def test_processes_stream_disjoint_parts_and_the_gaps_are_filled(tmp_path: Path) -> None:
    _parquet_dataset(tmp_path / "data", 7)
    args = BuildCacheArgs(output=str(tmp_path / "out"), dataset=str(tmp_path / "data"), streaming=True)
    parts = [[item.load()[1] for item in StreamedRows(args, r, 2)] for r in range(2)]
    # two data files for two processes: split_dataset_by_node gives each process one file, read by no other
    assert parts == [[f"a {COLORS[i % 7]} square {i}" for i in rows] for rows in ([0, 1, 2, 3], [4, 5, 6])]
    assert [item.key for item in StreamedRows(args, 1, 2)] == [f"00001_{i:09d}" for i in range(3)]
    # rank 0 wrote 2 chunks (shards 0, 2), rank 1 1 chunk (shard 1): 3 shards, no gap; 3 vs 1: shard 3 is empty
    (tmp_path / "out/shards").mkdir(parents=True)
    assert _fill_stream_gaps(tmp_path / "out", [2, 1], "h", write=True) == 3
    assert not list((tmp_path / "out/shards").glob("*.tar"))
    assert _fill_stream_gaps(tmp_path / "out", [3, 1], "h", write=True) == 5
    assert [p.name for p in (tmp_path / "out/shards").glob("*.tar")] == ["shard-000003.tar"]


@pytest.mark.slow
def test_two_processes_build_a_streamed_dataset_each_from_its_own_part(tmp_path: Path, tiny_zoo_path: Path) -> None:
    _parquet_dataset(tmp_path / "data", 7)
    flags = [f"--{k}={v}" for k, v in _common(tiny_zoo_path).items() if v is not True]
    flags += ["--no_lune", "--no_sol", "--streaming", f"--dataset={tmp_path / 'data'}", f"--output={tmp_path / 'out'}"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(free_port()), str(REPO / "build_cache.py"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = load_manifest(tmp_path / "out")
    # rank 0 streams file 0 (rows 0-3: chunks -> shards 0, 2), rank 1 file 1 (rows 4-6: shards 1, 3)
    assert manifest.num_samples == 7 and [s["count"] for s in manifest.shards] == [2, 2, 2, 1]
    keys = [[s["__key__"] for s in wds.WebDataset(str(tmp_path / "out" / e["name"]), shardshuffle=False)]
            for e in manifest.shards]  # fmt: skip
    assert keys == [["00000_000000000", "00000_000000001"], ["00001_000000000", "00001_000000001"],
                    ["00000_000000002", "00000_000000003"], ["00001_000000002"]]  # fmt: skip
    assert json.loads((tmp_path / "out" / STREAM_LOCK).read_text()) == {"world_size": 2}
