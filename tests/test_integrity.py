"""Shard integrity: the manifest's sha256 is checked by a build re-run (a damaged shard is rebuilt) and by the training
stream (a damaged shard stops it with the shard's name and the repair, not a bare tarfile.ReadError)."""

from __future__ import annotations

import errno
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.fixtures_cache import BuiltCache
from tinyflux.cache.build import BuildCacheArgs, BuildError, run_build
from tinyflux.cache.format import CacheFormatError, load_manifest
from tinyflux.cache.loaders import StreamingLoader, make_stream_loader
from tinyflux.cache.source import plain_tar_samples, tar_samples


def _flip_byte(path: Path, offset: int = 700) -> None:
    """Same size, one byte changed (inside the first sample's tensors): what bit rot or a bad copy does."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _drain(cache: Path, num_workers: int = 0, **kwargs) -> int:  # noqa: ANN003
    loader = make_stream_loader(cache, batch_size=4, num_workers=num_workers, rank=0, world_size=1, **kwargs)
    return sum(len(batch["key"]) for batch in loader)


def test_a_build_rerun_rebuilds_a_same_size_corrupted_shard(
    built_cache: BuiltCache, tmp_path: Path, one_thread
) -> None:  # noqa: ANN001
    output = tmp_path / "cache"
    shutil.copytree(built_cache.output, output)
    shard = output / "shards/shard-000001.tar"
    good = shard.read_bytes()
    _flip_byte(shard)
    assert shard.stat().st_size == len(good)

    manifest = run_build(BuildCacheArgs(output=str(output), **built_cache.build_kwargs()))
    assert shard.read_bytes() == good  # rebuilt, identical to the first build
    assert manifest.to_dict() == built_cache.manifest.to_dict()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_the_stream_refuses_a_same_size_corrupted_shard_naming_it_and_the_repair(
    synthetic_shards: Path, tmp_path: Path, num_workers: int
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(synthetic_shards, cache)
    assert _drain(cache) == 37  # one pass reads every sample of every shard
    _flip_byte(cache / "shards/shard-000003.tar")
    with pytest.raises(CacheFormatError) as info:
        _drain(cache, num_workers=num_workers)
    text = str(info.value)
    assert "shard-000003.tar is damaged" in text and "sha256" in text and "re-run the build_cache.py command" in text
    assert _drain(cache, verify_shards=False) == 37  # trusted storage: not hashed, so this flip goes unseen


def test_a_truncated_shard_is_named_when_the_stream_opens(synthetic_shards: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(synthetic_shards, cache)
    shard = cache / "shards/shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(CacheFormatError, match=r"shard-000002.tar is damaged: it is 1500 bytes, the manifest says"):
        make_stream_loader(cache, batch_size=4, rank=0, world_size=1)


def test_an_unverified_truncated_shard_is_a_cache_format_error_not_a_read_error(
    synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(synthetic_shards, cache)
    loader = make_stream_loader(cache, batch_size=4, rank=0, world_size=1, verify_shards=False)
    for shard in (cache / "shards").glob("*.tar"):  # damaged after the sizes were checked at open
        shard.write_bytes(shard.read_bytes()[:1100])
    with pytest.raises(CacheFormatError, match=r"shard .*shard-00000\d.tar cannot be (read|decoded).*re-run the build"):
        sum(1 for _ in loader)


def test_a_full_disk_during_a_build_is_one_message_and_leaves_no_tmp(
    built_cache: BuiltCache,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_thread,  # noqa: ANN001
) -> None:
    from webdataset import TarWriter

    def full(self, obj):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TarWriter, "write", full)
    output = tmp_path / "cache"
    with pytest.raises(BuildError) as info:
        run_build(BuildCacheArgs(output=str(output), **built_cache.build_kwargs()))
    assert "[ENOSPC]" in str(info.value) and "re-run the same command" in str(info.value)
    assert not list(output.rglob("*.tmp"))
    with pytest.raises(CacheFormatError, match="no manifest"):
        load_manifest(output)


@pytest.mark.parametrize("workers", [1, 2])
def test_each_shard_is_hashed_once_per_run_not_once_per_pass(
    synthetic_shards: Path, tmp_path: Path, workers: int
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(synthetic_shards, cache)
    loader = make_stream_loader(cache, batch_size=4, num_workers=workers, rank=0, world_size=1)
    assert sum(len(b["key"]) for b in loader) == 37 - 37 % workers
    assert loader.dataset.verified == {(0, k) for k in range(8)}  # seen from the worker processes
    # after the check: neither the worker that hashed a shard nor the others (which read other shards in the next
    # pass's new order) hash it again, nor do the new workers after a close
    _flip_byte(cache / "shards/shard-000003.tar")
    assert sum(len(b["key"]) for b in loader) == 37 - 37 % workers
    loader.close()
    assert sum(len(b["key"]) for b in loader) == 37 - 37 % workers


def test_a_loader_read_in_process_then_with_workers_still_hashes(synthetic_shards: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(synthetic_shards, cache)
    loader = make_stream_loader(cache, batch_size=4, num_workers=0, rank=0, world_size=1)
    next(iter(loader))  # the hash thread now exists in this process; a forked worker would inherit it dead
    loader.dataset.num_workers = loader.dataset.layout_workers = 1
    loader.dataset.verified.clear()
    _flip_byte(cache / "shards/shard-000005.tar")
    with pytest.raises(CacheFormatError, match="shard-000005.tar is damaged"):  # and does not hang
        sum(1 for _ in StreamingLoader(loader.dataset))


def _wds_samples(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return list(tar_samples(str(path), f))


def test_the_plain_tar_reader_gives_webdataset_s_samples_and_hands_other_headers_to_tarfile(
    synthetic_shards: Path, tmp_path: Path
) -> None:
    shard = synthetic_shards / "shards/shard-000000.tar"
    expected = _wds_samples(shard)
    assert len(expected) == 5 and {"safetensors", "json"} <= expected[0].keys()
    with open(shard, "rb") as f:
        assert list(plain_tar_samples(str(shard), f)) == expected
    # The same members rewritten with pax headers (an older cache), then with the format switching after two
    # samples: tarfile reads what the plain parser does not know, and no sample is yielded twice or lost.
    members = [(f"{s['__key__']}.{ext}", s[ext]) for s in expected for ext in s if not ext.startswith("__")]
    split = sum(1 for s in expected[:2] for ext in s if not ext.startswith("__"))
    for name, pax_from in (("pax.tar", 0), ("mixed.tar", split)):
        path = tmp_path / name
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for i, (member, data) in enumerate(members):
                info = tarfile.TarInfo(member)
                info.size, info.mtime = len(data), 1.5 if i >= pax_from else 0  # a float mtime: a pax header
                tar.addfile(info, io.BytesIO(data))
        assert path.read_bytes()[156:157] == (b"x" if pax_from == 0 else b"0")  # the first header: pax or plain
        with open(path, "rb") as f:
            got = list(plain_tar_samples(str(path), f))
        assert [{k: v for k, v in s.items() if k != "__url__"} for s in got] == [
            {k: v for k, v in s.items() if k != "__url__"} for s in expected
        ]
    # Cut inside a member's data or its padding, or empty: tarfile's error type, which the stream turns into a
    # CacheFormatError (above).
    data = shard.read_bytes()
    first_size = int(data[124:136].rstrip(b"\0 "), 8)
    assert first_size % 512  # so the second cut lands inside the first member's padding
    for cut in (1100, 512 + first_size + 1):
        with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
            list(plain_tar_samples(str(shard), io.BytesIO(data[:cut])))
    with pytest.raises(tarfile.ReadError, match="empty file"):
        list(plain_tar_samples(str(shard), io.BytesIO(b"")))
