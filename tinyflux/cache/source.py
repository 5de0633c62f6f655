"""Where a cache or a build input lives: a local path, an `http(s)://` URL, a `pipe:` command, or any other fsspec URL
(`s3://`, `gs://`, `hf://`, ...), read with retries.

A cache location is a prefix that a member name (`manifest.json`, `shards/shard-000003.tar`) is appended to, or a
`pipe:` template whose `{name}` is replaced by it. Remote shards are fetched whole into memory (one per DataLoader
worker, plus the next one fetched ahead), checked against the manifest (byte size always, sha256 unless
verify_shards is off) and parsed from memory, so the stream reads no sample of a shard whose bytes are not the ones
the build wrote, and nothing is copied to local disk. docs/CACHE_FORMAT.md, "Remote caches".

Every remote read is retried with exponential backoff (Retry); a read that keeps failing raises SourceError naming the
URL, the attempts and the last error. Errors that another try cannot fix (HTTP 404, a missing file, an unknown
protocol) are raised at once.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import queue
import re
import select
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any, TypeVar

import webdataset as wds

from tinyflux.cache.format import (
    MANIFEST_NAME,
    CacheFormatError,
    Manifest,
    load_manifest,
    repair_hint,
    verify_shard,
)
from tinyflux.errors import TinyFluxError

logger = logging.getLogger(__name__)

T = TypeVar("T")
PIPE = "pipe:"
NAME_FIELD = "{name}"  # where a pipe: template puts the member name
# HTTP statuses worth another try: timeouts, throttling, and server-side failures (a 404 or a 403 stays one).
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
# What a failed read raises: OSError (refused or reset connections, timeouts, a pipe's exit status, fsspec's
# filesystems), and http.client's own errors (IncompleteRead: the connection closed before Content-Length bytes).
RETRIED = (OSError, http.client.HTTPException, subprocess.SubprocessError)


class SourceError(TinyFluxError, OSError):
    """A remote cache or input that cannot be read: gave up after retries, or refused for good (404, no such file)."""


class _Permanent(Exception):
    """Raised inside a read attempt: another attempt cannot help (the wrapped error says why)."""


@dataclass(frozen=True)
class Retry:
    """How remote reads are retried: `attempts` tries, waiting first_delay, 2x, 4x ... (at most max_delay) between
    them, each try given `timeout` seconds to connect and to receive each chunk. The defaults give a source up to
    5 tries over about 15 s of waits (1 + 2 + 4 + 8) before the run stops."""

    attempts: int = 5
    first_delay: float = 1.0
    max_delay: float = 30.0
    timeout: float = 60.0

    def call(self, what: str, attempt: Callable[[], T]) -> T:
        """attempt() until it returns; SourceError naming `what` when it raised _Permanent or every try failed."""
        start, last = time.monotonic(), None
        for i in range(self.attempts):
            if i:
                delay = min(self.first_delay * 2 ** (i - 1), self.max_delay)
                logger.warning(
                    "reading %s failed (%s); try %d of %d in %.1f s", what, last, i + 1, self.attempts, delay
                )
                time.sleep(delay)
            try:
                return attempt()
            except _Permanent as e:
                raise SourceError(f"cannot read {what}: {e}") from e.__cause__
            except RETRIED as e:
                last = f"{type(e).__name__}: {e}"
        raise SourceError(
            f"cannot read {what}: gave up after {self.attempts} tries over {time.monotonic() - start:.1f} s "
            f"(last error: {last}); check that the source is up and the URL is right"
        )


DEFAULT_RETRY = Retry()


def is_remote(spec: str | Path) -> bool:
    """A URL or a pipe: command rather than a local path."""
    return isinstance(spec, str) and (spec.startswith(PIPE) or "://" in spec)


def _http_open(url: str, timeout: float) -> IO[bytes]:
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code not in _RETRY_STATUS:
            raise _Permanent(f"HTTP {e.code} {e.reason}") from e
        raise OSError(f"HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLCertVerificationError):  # the same certificate next time
            raise _Permanent(f"the server's TLS certificate is not trusted ({e.reason.verify_message})") from e
        raise


def _http_read(url: str, timeout: float) -> bytes:
    with _http_open(url, timeout) as response:
        return response.read()  # http.client raises IncompleteRead when fewer bytes than Content-Length arrive


def _pipe_read(command: str, timeout: float) -> bytes:
    """The command's stdout. `timeout` bounds each wait for output, not the whole read (a large shard through a slow
    pipe takes long, a hung command is stopped), as urllib's timeout does for HTTP. stderr is drained alongside, so a
    chatty command (progress lines) cannot fill its pipe and stall."""
    with subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        out: dict[Any, list[bytes]] = {process.stdout: [], process.stderr: []}
        open_streams = list(out)
        while process.stdout in open_streams:
            ready, _, _ = select.select(open_streams, [], [], timeout)
            if not ready:
                process.kill()
                raise TimeoutError(f"no output for {timeout:g} s")
            for stream in ready:
                chunk = stream.read1(1 << 20)
                if not chunk:
                    open_streams.remove(stream)
                elif stream is process.stdout:
                    out[stream].append(chunk)
                else:  # only the end of stderr is reported: keep the last 64 KiB
                    out[stream] = [(b"".join(out[stream]) + chunk)[-(1 << 16) :]]
        if process.wait():
            tail = b"".join(out[process.stderr]).decode(errors="replace").strip().splitlines()[-1:] or ["no stderr"]
            raise OSError(f"exit status {process.returncode}: {tail[0]}")
    return b"".join(out[process.stdout])


def _fsspec_open(url: str) -> Any:
    import fsspec

    try:
        return fsspec.open(url, "rb")
    except (ImportError, ValueError) as e:  # s3fs / gcsfs not installed, or a protocol fsspec does not know
        raise _Permanent(f"{e} (install the fsspec filesystem for this protocol, e.g. `pip install s3fs gcsfs`)") from e


def _fsspec_read(url: str) -> bytes:
    try:
        with _fsspec_open(url) as f:
            return f.read()
    except FileNotFoundError as e:
        raise _Permanent(f"no such file ({e})") from e


def read_url(url: str, retry: Retry = DEFAULT_RETRY) -> bytes:
    """All bytes at `url` (a local path, http(s)://, pipe:COMMAND, or an fsspec URL), retried per `retry`."""
    if url.startswith(PIPE):
        return retry.call(url, lambda: _pipe_read(url[len(PIPE) :], retry.timeout))
    if url.startswith(("http://", "https://")):
        return retry.call(url, lambda: _http_read(url, retry.timeout))
    if "://" in url:
        return retry.call(url, lambda: _fsspec_read(url))
    return Path(url).read_bytes()


def open_url(url: str, retry: Retry = DEFAULT_RETRY) -> IO[bytes]:
    """A binary stream of `url`, read as it arrives (build inputs: tars too large to hold). Opening is retried;
    an error in the middle of the stream is raised to the reader, which names the URL."""
    if url.startswith(PIPE):
        return _CommandOutput(url[len(PIPE) :])
    if url.startswith(("http://", "https://")):
        return retry.call(url, lambda: _http_open(url, retry.timeout))
    if "://" in url:

        def open_fsspec() -> IO[bytes]:
            try:
                return _fsspec_open(url).open()
            except FileNotFoundError as e:
                raise _Permanent(f"no such file ({e})") from e

        return retry.call(url, open_fsspec)
    return open(url, "rb")


class _CommandOutput:
    """The stdout of a shell command, read as it comes; close() raises OSError when the command failed (its own
    stderr, passed through, says why)."""

    def __init__(self, command: str):
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def read(self, size: int = -1) -> bytes:
        return self.process.stdout.read(size)

    def close(self) -> None:
        self.process.stdout.close()
        if self.process.wait():
            raise OSError(f"the command exited with status {self.process.returncode}")


def tar_samples(url: str, stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """webdataset sample dicts ({"__key__", "__url__", ext: bytes}) of one tar stream, in tar order."""
    return wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": url, "stream": stream}]))


class _NotPlain(Exception):
    """A tar header that plain_tar_samples leaves to tarfile."""


_BLOCK = 512
_END = bytes(_BLOCK)  # an all-zero header block ends the archive
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members it never yields


def plain_tar_samples(url: str, stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """tar_samples' dicts, equal to them, from a seekable stream, parsing each plain ustar header (a regular file,
    no pax or GNU extension: what write_shard writes) with a few slices instead of tarfile's TarInfo, which is ~60%
    of the time a 0-worker loader spends on data (bench/NOTES.md, 2026-12-06). At the first header of another kind
    (an older cache's pax headers, say) the stream goes back to its start and tar_samples reads on, past the samples
    already yielded. Header checksums are not checked (the shard's sha256 is, on first open, unless
    verify_shards=False); a shard cut short raises tarfile.ReadError, as tarfile does."""
    start, done = stream.tell(), 0
    try:
        for sample in _plain_samples(url, stream):
            yield sample
            done += 1
    except _NotPlain:
        stream.seek(start)
        yield from islice(tar_samples(url, stream), done, None)


def _plain_samples(url: str, stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    read, sample, first = stream.read, None, True
    while True:
        header = read(_BLOCK)
        if not header and first:
            raise tarfile.ReadError(f"{url}: empty file")
        first = False
        if not header or header == _END:
            break
        if len(header) < _BLOCK:
            raise tarfile.ReadError(f"{url}: unexpected end of data in a tar header")
        if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0") or header[345:346] != b"\0":
            raise _NotPlain  # pax / GNU headers, links, directories, a name split into prefix + name
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            name = header[:100].split(b"\0", 1)[0].decode()
        except (ValueError, UnicodeDecodeError):
            raise _NotPlain from None  # a base-256 size, a non-UTF-8 name: tarfile's to judge
        data = read(size)
        if len(data) < size:
            raise tarfile.ReadError(f"{url}: unexpected end of data in member {name}")
        if len(read(-size % _BLOCK)) < -size % _BLOCK:  # the member's padding to a whole block
            raise tarfile.ReadError(f"{url}: unexpected end of data after member {name}")
        key, ext = wds.tariterators.base_plus_ext(name)
        if key is None or _META.match(name):
            continue
        ext = ext.lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {url}")
        sample[ext] = data
    if sample is not None:
        yield sample


@dataclass(frozen=True)
class CacheLocation:
    """A cache directory, a URL prefix (`https://host/cache/`, `s3://bucket/cache/`) or a `pipe:` template with
    `{name}` (`pipe:aws s3 cp s3://bucket/cache/{name} -`): where build_cache.py's output can be read from."""

    root: str
    retry: Retry = field(default=DEFAULT_RETRY, compare=False)

    @classmethod
    def of(cls, spec: str | Path | CacheLocation) -> CacheLocation:
        if isinstance(spec, CacheLocation):
            return spec
        spec = str(spec)
        if spec.startswith(PIPE) and NAME_FIELD not in spec:
            raise CacheFormatError(
                f"--cache {spec}: a pipe: cache needs {NAME_FIELD} where the member name goes, e.g. "
                f"'pipe:aws s3 cp s3://bucket/cache/{NAME_FIELD} -'"
            )
        return cls(spec)

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    def url(self, name: str) -> str:
        """Where member `name` (relative to the cache root, '/'-separated) is read from."""
        if self.root.startswith(PIPE):
            return self.root.replace(NAME_FIELD, name)
        if self.remote:
            return self.root.rstrip("/") + "/" + name
        return str(Path(self.root) / name)

    def manifest(self) -> Manifest:
        if not self.remote:
            return load_manifest(self.root)
        url = self.url(MANIFEST_NAME)
        try:
            text = read_url(url, self.retry)
        except SourceError as e:
            raise CacheFormatError(
                f"cache {self.root}: {e}. A cache URL is the prefix of build_cache.py's --output copy "
                f"(it must serve {MANIFEST_NAME} and shards/); a pipe: template has {NAME_FIELD} for the member"
            ) from e
        try:
            return Manifest.from_dict(json.loads(text), where=url)
        except json.JSONDecodeError as e:
            raise CacheFormatError(f"{url} is not valid JSON ({e}); copy the cache's {MANIFEST_NAME} again") from e

    def check_shards(self, manifest: Manifest) -> None:
        """Local shards: each exists and has its manifest size (a stat each). Remote shards are checked as fetched:
        asking a store for each size first would cost a round trip per shard before the first batch."""
        if self.remote:
            return
        paths = [self.url(s["name"]) for s in manifest.shards]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise CacheFormatError(f"{self.root}: {len(missing)} shard(s) in the manifest are missing: {missing[:3]}")
        for path, entry in zip(paths, manifest.shards, strict=True):
            verify_shard(path, entry, self.root, hash_bytes=False)

    def repair(self) -> str:
        hint = repair_hint(self.root)
        return hint + (", then copy the rebuilt shard to where this cache is served" if self.remote else "")

    def fetch_shard(self, entry: dict[str, Any], verify: bool) -> bytes | None:
        """Ready a shard for reading. Local: check its sha256 when `verify` and return None (it is read from disk as
        parsed). Remote: its bytes, checked against the manifest's size and (when `verify`) sha256."""
        url = self.url(entry["name"])
        if not self.remote:
            if verify:
                verify_shard(url, entry, self.root)
            return None
        data = read_url(url, self.retry)
        if len(data) != entry["bytes"]:
            problem = f"is {len(data)} bytes, the manifest says {entry['bytes']}"
        elif verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problem = "has the right size but not the sha256 the manifest lists (its bytes changed)"
        else:
            return data
        raise CacheFormatError(f"shard {url} is damaged: it {problem}; {self.repair()}")

    def shard_samples(self, entry: dict[str, Any], data: bytes | None) -> Iterator[dict[str, Any]]:
        """The raw samples of a shard readied by fetch_shard: parsed from `data`, or read from the local file."""
        url = self.url(entry["name"])
        if data is None:
            return _file_samples(url)
        return plain_tar_samples(url, io.BytesIO(data))


def _file_samples(path: str) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        yield from plain_tar_samples(path, f)


class ReadAhead:
    """Runs submitted calls in order on one daemon thread (the next shard's fetch or hash while this one is parsed).

    Not a ThreadPoolExecutor: a process joins those threads at exit, so a DataLoader worker told to stop while its
    fetch waits out a retry backoff would linger for the rest of the retry budget (torch gives it 5 s, then kills)."""

    def __init__(self, name: str = "tinyflux-shard-read"):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # handed to whoever waits on the future
                    future.set_exception(e)
