"""Training from caches that live elsewhere: an HTTP prefix (a loopback server started here), a pipe: template, an
fsspec URL. The stream equals the local one batch for batch, a damaged served shard is refused by name, a failing
source is retried with backoff, and one that never answers is named in bounded time."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures_remote import self_signed_cert, serve
from tinyflux.cache.format import CacheFormatError
from tinyflux.cache.loaders import make_stream_loader
from tinyflux.cache.source import CacheLocation, Retry, SourceError, read_url
from tinyflux.trainer.args import parse_args
from tinyflux.trainer.main import main as train_main
from tinyflux.trainer.main import run_training

FAST = Retry(attempts=3, first_delay=0.05, max_delay=0.2, timeout=2.0)


def _batches(cache: str | Path | CacheLocation, passes: int = 1, **kwargs) -> list[dict]:  # noqa: ANN003
    loader = make_stream_loader(cache, batch_size=4, seed=5, rank=0, world_size=1, **kwargs)
    return [batch for _ in range(passes) for batch in loader]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        for name in ("latents", "t5_embeds", "clip_pooled", "lune", "sol_stats", "sol_spatial", "index"):
            assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_http_cache_streams_the_same_batches_as_the_local_one(synthetic_shards: Path, num_workers: int) -> None:
    local = _batches(synthetic_shards, passes=2, num_workers=num_workers)
    with serve(synthetic_shards) as server:
        remote = _batches(server.url, passes=2, num_workers=num_workers)
    _assert_same(remote, local)
    # each pass fetches every shard once (no local copy is kept), and the manifest is read once; workers, which live
    # for the whole run, may already have fetched the next pass's first shard when the test stops reading
    assert server.requests["/manifest.json"] == 1
    assert server.requests["/shards/shard-000000.tar"] in ((2,) if num_workers == 0 else (2, 3))


def test_an_https_cache_streams_the_same_batches(
    synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = self_signed_cert(tmp_path)
    if tls is None:
        pytest.skip("no openssl command to make a certificate")
    with serve(synthetic_shards, tls) as server:
        assert server.url.startswith("https://127.0.0.1:")
        with pytest.raises(CacheFormatError, match="TLS certificate is not trusted .*self-signed"):  # at once
            _batches(CacheLocation(server.url, Retry(attempts=5, first_delay=2.0)))
        monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))  # trust it: urllib's default context reads this
        _assert_same(_batches(server.url), _batches(synthetic_shards))


def test_pipe_and_fsspec_caches_stream_the_same_batches(synthetic_shards: Path) -> None:
    local = _batches(synthetic_shards)
    _assert_same(_batches(f"pipe:cat {synthetic_shards}/{{name}}"), local)
    _assert_same(_batches(synthetic_shards.as_uri()), local)  # file:// goes through fsspec, like s3:// and gs://


def test_a_remote_stream_resumes_exactly_mid_epoch(synthetic_shards: Path) -> None:
    """Interrupted while reading the directory, resumed from the URL: the state names the cache, not where it is."""
    with serve(synthetic_shards) as server:
        reference = _batches(server.url, passes=2, num_workers=2)
        loader = make_stream_loader(synthetic_shards, batch_size=4, seed=5, rank=0, world_size=1, num_workers=2)
        it = iter(loader)
        consumed = [next(it) for _ in range(5)]
        state = json.loads(json.dumps(loader.state_dict()))
        del it
        resumed = make_stream_loader(server.url, batch_size=4, seed=5, rank=0, world_size=1, num_workers=2)
        resumed.load_state_dict(state)
        rest = [batch for _ in range(2) for batch in resumed]
    _assert_same(consumed + rest[: len(reference) - 5], reference)


def test_a_damaged_served_shard_is_refused_by_its_url(synthetic_shards: Path, tmp_path: Path) -> None:
    cache = tmp_path / "served"
    shutil.copytree(synthetic_shards, cache)
    shard = cache / "shards/shard-000003.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, one byte of the first sample's tensors
    shard.write_bytes(bytes(data))
    with serve(cache) as server:
        with pytest.raises(CacheFormatError) as info:
            _batches(server.url)
        text = str(info.value)
        assert f"shard {server.url}shards/shard-000003.tar is damaged" in text and "sha256" in text
        assert "copy the rebuilt shard to where this cache is served" in text
        shard.write_bytes(bytes(data[:-512]))  # truncated: caught by its size even without the hash
        with pytest.raises(CacheFormatError, match=r"shard-000003.tar is damaged: it is \d+ bytes, the manifest says"):
            _batches(server.url, verify_shards=False)


def test_a_source_that_fails_twice_then_recovers_is_retried(synthetic_shards: Path) -> None:
    local = _batches(synthetic_shards)
    with serve(synthetic_shards) as server:
        server.fail_first = {"/manifest.json": 2, "/shards/shard-000004.tar": 2}
        remote = _batches(CacheLocation(server.url, FAST))
    _assert_same(remote, local)
    assert server.requests["/manifest.json"] == 3 and server.requests["/shards/shard-000004.tar"] == 3


def test_a_source_that_never_answers_is_named_in_bounded_time(synthetic_shards: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never accepts: connects, then no reply
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/cache/"
        retry = Retry(attempts=2, first_delay=0.05, timeout=0.5)
        start = time.monotonic()
        with pytest.raises(CacheFormatError) as info:
            _batches(CacheLocation(url, retry))
        assert time.monotonic() - start < 5  # 2 timeouts of 0.5 s and one wait of 0.05 s
    assert f"cannot read {url}manifest.json: gave up after 2 tries" in str(info.value)

    start = time.monotonic()  # a pipe: command that hangs is stopped after `timeout` without output
    with pytest.raises(SourceError, match=r"cannot read pipe:sleep 30: gave up after 2 tries .*no output for 0.5 s"):
        read_url("pipe:sleep 30", retry)
    assert time.monotonic() - start < 5

    with serve(synthetic_shards) as server:  # the manifest arrives, a shard never does: the worker names it
        server.stall, server.stall_s = {"/shards/shard-000002.tar"}, 3.0
        with pytest.raises(SourceError, match=r"cannot read http://127.0.0.1:\d+/shards/shard-000002.tar: gave up"):
            _batches(CacheLocation(server.url, retry))


def test_a_missing_file_fails_at_once_without_retries(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        start = time.monotonic()
        with pytest.raises(CacheFormatError, match=r"cannot read http://.*/manifest.json: HTTP 404"):
            _batches(CacheLocation(server.url, Retry(attempts=5, first_delay=2.0)))
        assert time.monotonic() - start < 1.5 and server.requests["/manifest.json"] == 1
    with pytest.raises(SourceError, match="cannot read pipe:false: gave up after 2 tries"):
        read_url("pipe:false", Retry(attempts=2, first_delay=0.01))
    with pytest.raises(CacheFormatError, match=r"needs \{name\}"):
        CacheLocation.of("pipe:cat /somewhere/manifest.json")
    with pytest.raises(SourceError, match=r"cannot read s3://bucket/x/manifest.json: .*s3fs.*pip install s3fs"):
        read_url("s3://bucket/x/manifest.json", Retry(attempts=5, first_delay=2.0))  # at once: no package, no retry


@pytest.mark.usefixtures("one_thread")
def test_training_from_an_http_cache_gives_the_weights_of_the_local_run(synthetic_shards: Path, tmp_path: Path) -> None:
    def argv(cache: str, out: Path) -> list[str]:
        return [
            "--cache", cache, "--model", "tiny", "--dtype", "float32", "--batch_size", "4",
            "--gradient_accumulation", "1", "--warmup_steps", "1", "--total_steps", "4", "--num_workers", "1",
            "--save_every_steps", "none", "--log_with", "none", "--checkpoint_dir", str(out / "checkpoints"),
            "--tensorboard_dir", str(out / "logs"),
        ]  # fmt: skip

    local = run_training(parse_args(argv(str(synthetic_shards), tmp_path / "local")))
    with serve(synthetic_shards) as server:
        remote = run_training(parse_args(argv(server.url, tmp_path / "remote")))
    assert server.requests["/shards/shard-000000.tar"] >= 1  # it did read over HTTP
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(local.last_checkpoint / name), load_file(remote.last_checkpoint / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_training_script_names_a_cache_url_it_cannot_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    argv = ["--model", "tiny", "--num_workers", "0", "--log_with", "none", "--checkpoint_dir", str(tmp_path / "c")]
    with serve(tmp_path) as server, caplog.at_level(logging.ERROR):
        assert train_main(["--cache", server.url + "caches/x/", *argv]) == 1  # no such cache there: HTTP 404
    assert f"cannot read {server.url}caches/x/manifest.json: HTTP 404" in caplog.text and "Traceback" not in caplog.text
    assert train_main(["--cache", server.url, "--in_memory", *argv]) == 2  # a usage error, before any read
