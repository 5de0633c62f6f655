"""The inputs of a cache build: listing them in shard order, loading and preparing them ahead of the models.

Folders (sorted keys), `datasets` datasets (row order; with --streaming streamed and split by process) and webdataset
tars (tar order; local, URLs, pipe: commands) become InputItems, whose load() gives (image, caption) or raises
SkippedInput with the reason the report lists. Loading runs in threads, a batch ahead of the models (load_ahead). The
build itself: tinyflux.cache.build.
"""

from __future__ import annotations

import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from itertools import count, islice
from pathlib import Path
from typing import Any, Protocol

import webdataset as wds
from PIL import Image

from tinyflux.cache.buckets import Bucket
from tinyflux.cache.encode import (
    MISSING_CAPTION,
    MISSING_IMAGE,
    OUTSIDE_IMAGES,
    SkippedInput,
    check_caption,
    load_image,
    prepare_bucket_image,
    prepare_image,
)
from tinyflux.cache.source import RETRIED, is_remote, open_url, tar_samples
from tinyflux.errors import TinyFluxError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# In an --images folder: captions for the images without a same-stem .txt, one line for all or one line per image.
PROMPTS_FILE = "prompts.txt"


class InputArgs(Protocol):
    """Where a build's inputs come from: the fields of build_cache.py's arguments (BuildCacheArgs) read here."""

    images: str | None
    follow_symlinks: bool
    dataset: str | None
    dataset_config: str | None
    split: str
    streaming: bool
    wds: list[str] | None
    image_column: str | None
    caption_column: str | None


class BuildError(TinyFluxError, ValueError):
    """A cache build that cannot start: bad arguments, or an output directory built with other settings."""


@dataclass
class InputItem:
    """One input: its sample key, where it came from (for the report), and how to load (image, caption)."""

    key: str
    source: str
    load: Callable[[], tuple[Image.Image, str]]  # raises SkippedInput


def sample_key(name: str) -> str:
    """A tar-safe key: webdataset splits member names at the first '.', so dots become '_'."""
    return name.replace("\\", "/").replace(".", "_")


def _check_inside(path: Path, root: Path | None) -> None:
    """SkippedInput(OUTSIDE_IMAGES) when `path` resolves (through symlinks) outside `root`; root None = anywhere."""
    if root is not None and not path.resolve().is_relative_to(root):
        raise SkippedInput(
            OUTSIDE_IMAGES,
            f"{path} resolves to {path.resolve()}, outside --images (a symlink); pass --follow_symlinks to read it",
        )


def _load_file(image_path: Path, root: Path | None = None, prompt: str | None = None) -> tuple[Image.Image, str]:
    """(image, caption) of an image file and its same-stem .txt (else `prompt`, its prompts.txt line), both inside
    `root` (resolved) unless root is None."""
    caption_path = image_path.with_suffix(".txt")
    if not caption_path.is_file() and prompt is None:
        raise SkippedInput(MISSING_CAPTION, f"no {caption_path.name} beside the image, and no {PROMPTS_FILE} line")
    _check_inside(image_path, root)
    if caption_path.is_file():
        _check_inside(caption_path, root)
    # bytes: a caption that is not UTF-8 is skipped, not altered
    caption = check_caption(caption_path.read_bytes() if caption_path.is_file() else prompt.encode())
    return load_image(image_path), caption


def folder_prompts(root: Path, count: int) -> list[str | None]:
    """The prompts.txt caption of each of `count` images in key order: one line for all, or one line per image;
    None for each when the folder has no prompts.txt."""
    path = root / PROMPTS_FILE
    if not path.is_file():
        return [None] * count
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise BuildError(
            f"{path} has {len(lines)} captions for {count} images: write one line for every image, or one line per "
            "image in the order of their sorted file names"
        )
    return list(lines)


def folder_items(root: str | Path, follow_symlinks: bool = False) -> list[InputItem]:
    """Images under `root` (recursively), sorted by key = relative path without extension. Unless `follow_symlinks`,
    an image or caption that resolves outside `root` is skipped (OUTSIDE_IMAGES): a symlink must not copy a file from
    elsewhere into a shard that may be shared."""
    root = Path(root)
    inside = None if follow_symlinks else root.resolve()
    paths = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    paths.sort(key=lambda p: (sample_key(p.relative_to(root).with_suffix("").as_posix()), str(p)))
    return [
        InputItem(
            sample_key(p.relative_to(root).with_suffix("").as_posix()),
            str(p),
            partial(_load_file, p, root=inside, prompt=prompt),
        )
        for p, prompt in zip(paths, folder_prompts(root, len(paths)), strict=True)
    ]


def _load_row(ds: Any, i: int, image_column: str, caption_column: str) -> tuple[Image.Image, str]:
    row = ds[i]
    caption = check_caption(row.get(caption_column))
    value = row.get(image_column)
    if value is None:
        raise SkippedInput(MISSING_IMAGE, f"column {image_column!r} is empty")
    if isinstance(value, Image.Image):
        return value, caption
    if isinstance(value, dict):  # datasets' Image(decode=False): {"bytes", "path"}
        value = value.get("bytes") or value.get("path")
    return load_image(value), caption


def dataset_items(args: InputArgs) -> list[InputItem]:
    """Rows of a `datasets` dataset in row order, keys = zero-padded row numbers."""
    import datasets

    image_column, caption_column = args.image_column or "image", args.caption_column or "text"
    path = Path(args.dataset)
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            ds = ds[args.split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
    except Exception as e:  # datasets raises many types (HFValidationError, FileNotFoundError, DatasetNotFoundError..)
        raise BuildError(
            f"--dataset {args.dataset}: could not load it ({type(e).__name__}: {e}). Pass a Hub dataset name, a "
            "folder written by save_to_disk, or a data folder; for a gated or private Hub dataset set HF_TOKEN"
        ) from e
    missing = [c for c in (image_column, caption_column) if c not in ds.column_names]
    if missing:
        raise BuildError(
            f"--dataset {args.dataset} has no column(s) {missing}; its columns are {ds.column_names}: "
            "pick them with --image_column / --caption_column"
        )
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # decode ourselves: corrupt files are skipped
    width = max(8, len(str(len(ds))))
    load = partial(_load_row, ds, image_column=image_column, caption_column=caption_column)
    return [InputItem(f"{i:0{width}d}", f"{args.dataset}[{i}]", partial(load, i=i)) for i in range(len(ds))]


class StreamedRows:
    """--dataset --streaming: the rows of process `rank` of `world`, streamed in order (nothing downloaded whole).

    datasets.distributed.split_dataset_by_node gives each process its part: whole data files when their number is a
    multiple of `world`, else every world-th row. Keys are `RRRRR_NNNNNNNNN` (rank, row in that part), so a process's
    chunk c is shard c * world + rank. state_dict() is datasets' own resumable position in the part; a re-run that
    loads the one saved after its last complete shard continues there (docs/CACHE_FORMAT.md, "Streamed inputs")."""

    def __init__(self, args: InputArgs, rank: int, world: int):
        import datasets
        from datasets.distributed import split_dataset_by_node

        self.name, self.rank, self.world = args.dataset, rank, world
        self.image_column, self.caption_column = args.image_column or "image", args.caption_column or "text"
        try:
            ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split, streaming=True)
        except Exception as e:  # as in dataset_items: datasets raises many types
            raise BuildError(
                f"--dataset {args.dataset} --streaming: could not open it ({type(e).__name__}: {e}). Pass a Hub "
                "dataset name or a data folder (parquet, json, image folders); for a gated or private Hub dataset "
                "set HF_TOKEN"
            ) from e
        columns = list(ds.features or {})
        missing = [c for c in (self.image_column, self.caption_column) if columns and c not in columns]
        if missing:
            raise BuildError(
                f"--dataset {args.dataset} has no column(s) {missing}; its columns are {columns}: "
                "pick them with --image_column / --caption_column"
            )
        if ds.features and isinstance(ds.features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))  # corrupt files are skipped, not fatal
        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        self.start = 0  # the part's row the iteration starts at

    def key(self, row: int) -> str:
        return f"{self.rank:05d}_{row:09d}"

    def state_dict(self) -> dict[str, Any]:
        return self.ds.state_dict()

    def resume(self, state: dict[str, Any], row: int) -> None:
        """Start the next iteration at `row`, from datasets' state saved there (it skips whole files unread)."""
        self.ds.load_state_dict(state)
        self.start = row

    def __iter__(self) -> Iterator[InputItem]:
        for i, row in enumerate(self.ds, start=self.start):
            load = partial(_load_row, [row], 0, image_column=self.image_column, caption_column=self.caption_column)
            yield InputItem(self.key(i), f"{self.name}[rank {self.rank} of {self.world}, row {i}]", load)


def _load_tar_sample(raw: dict[str, Any], image_exts: list[str], caption_ext: str) -> tuple[Image.Image, str]:
    caption = check_caption(raw.get(caption_ext))
    data = next((raw[ext] for ext in image_exts if ext in raw), None)
    if data is None:
        raise SkippedInput(MISSING_IMAGE, f"no member with extension {image_exts}")
    return load_image(data), caption


def wds_urls(specs: Iterable[str]) -> list[str]:
    """The tars of --wds, in order: each spec brace-expanded (`data/{000..099}.tar`, `https://host/{0..9}.tar`), and
    a local folder (img2dataset's output: NNNNN.tar beside NNNNN.parquet and NNNNN_stats.json) as its sorted .tar
    files."""
    urls = []
    for spec in specs:
        if not is_remote(spec) and Path(spec).is_dir():
            urls += sorted(str(p) for p in Path(spec).glob("*.tar"))
        else:
            urls += wds.shardlists.expand_urls(spec)
    return urls


def _not_downloaded(status: str, error: str | None) -> tuple[Image.Image, str]:
    raise SkippedInput(MISSING_IMAGE, f"img2dataset: {status} ({error or 'no error message'})")


def _img2dataset_index(tar: str) -> list[dict[str, Any]] | None:
    """The rows of img2dataset's parquet beside a local tar (NNNNN.parquet: one row per URL, with its `status`), as
    {"key", "status", "error_message"}; None when there is none (or it is another tool's)."""
    parquet = Path(tar).with_suffix(".parquet")
    if is_remote(tar) or not parquet.is_file():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    if not {"key", "status"} <= set(table.column_names):
        return None
    return table.select([c for c in ("key", "status", "error_message") if c in table.column_names]).to_pylist()


def _img2dataset_failures(tar: str, rows: list[dict[str, Any]], found: set[str]) -> Iterator[InputItem]:
    """The parquet rows of inputs that did not make it into the tar: inputs the report lists as missing_image with
    img2dataset's reason."""
    for row in rows:
        key = sample_key(str(row["key"]))
        if row["status"] != "success" and key not in found:
            load = partial(_not_downloaded, str(row["status"]), row.get("error_message"))
            yield InputItem(key, f"{Path(tar).with_suffix('.parquet')}:{row['key']}", load)


def _tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """The raw samples of one input tar, streamed (opening retried; see tinyflux.cache.source); a tar that
    cannot be read is a BuildError naming it."""
    stream = open_url(url)
    try:
        yield from tar_samples(url, stream)
        stream.close()  # a pipe: command's exit status is checked here
    except (tarfile.TarError, *RETRIED) as e:
        why = f"{type(e).__name__}: {e.args[0] if e.args else e}"  # webdataset appends the stream's repr to args
        try:
            stream.close()
        except RETRIED as failed:  # a pipe: command that failed: its exit status is the cause, the tar error follows
            why = str(failed)
        raise BuildError(
            f"--wds {url}: reading stopped ({why}). Re-run the same command: the complete shards are kept"
        ) from e
    finally:
        with suppress(Exception):  # left early: the status of a command cut off says nothing
            stream.close()


def _tar_inputs(url: str, load: Callable[[dict[str, Any]], tuple[Image.Image, str]]) -> Iterator[InputItem]:
    """The samples of one input tar in tar order, then (beside a local tar) the inputs img2dataset could not
    download, from its parquet."""
    found = set()
    for raw in _tar_samples(url):
        found.add(sample_key(raw["__key__"]))
        yield InputItem(sample_key(raw["__key__"]), f"{url}:{raw['__key__']}", partial(load, raw))
    yield from _img2dataset_failures(url, _img2dataset_index(url) or [], found)


class _TarCache:
    """Whole input tars by URL, the last two read (a shard's inputs span at most two when shards are smaller than
    tars): an input listed from img2dataset's parquet is loaded from its tar, which is read once, when first needed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tars: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()

    def sample(self, url: str, key: str) -> dict[str, Any]:
        with self.lock:  # the loader threads of one batch wait for the one that reads the tar
            if url not in self.tars:
                self.tars[url] = {sample_key(raw["__key__"]): raw for raw in _tar_samples(url)}
                while len(self.tars) > 2:
                    self.tars.popitem(last=False)
            samples = self.tars[url]
        if key not in samples:
            raise SkippedInput(MISSING_IMAGE, f"not in {url}, although img2dataset's parquet says it downloaded it")
        return samples[key]


def _load_indexed(
    tars: _TarCache, url: str, key: str, load: Callable[[dict[str, Any]], tuple[Image.Image, str]]
) -> tuple[Image.Image, str]:
    return load(tars.sample(url, key))


def wds_items(args: InputArgs) -> Iterator[InputItem]:
    """Samples of webdataset tars (local, http(s)://, pipe:, s3:// / gs:// through fsspec) in tar order, streamed:
    each process reads them all and decodes only its own shards' images.

    When every tar is local with img2dataset's parquet beside it, the inputs are listed from the parquets instead (the
    successes in the parquet's order, which is img2dataset's tar order, then the failures): a process then reads only
    the tars that hold inputs of the shards it builds, and a re-run none of a complete shard's."""
    image_exts = (args.image_column or "jpg;jpeg;png;webp").split(";")
    caption_ext = args.caption_column or "txt"
    load = partial(_load_tar_sample, image_exts=image_exts, caption_ext=caption_ext)
    urls = wds_urls(args.wds or ())
    indexes = [_img2dataset_index(url) for url in urls]
    if not urls or any(rows is None for rows in indexes):
        for url in urls:
            yield from _tar_inputs(url, load)
        return
    tars = _TarCache()
    for url, rows in zip(urls, indexes, strict=True):
        for row in rows:
            if row["status"] == "success":
                key = sample_key(str(row["key"]))
                yield InputItem(key, f"{url}:{row['key']}", partial(_load_indexed, tars, url, key, load))
        yield from _img2dataset_failures(url, rows, set())


def list_inputs(args: InputArgs, rank: int = 0, world: int = 1) -> tuple[Iterable[InputItem], int | None]:
    """The inputs in shard order, and how many there are when known without reading them all. With --streaming,
    process `rank` of `world`'s own part of the dataset (StreamedRows)."""
    if args.images:
        items = folder_items(args.images, follow_symlinks=args.follow_symlinks)
        return items, len(items)
    if args.dataset and args.streaming:
        return StreamedRows(args, rank, world), None
    if args.dataset:
        items = dataset_items(args)
        return items, len(items)
    return wds_items(args), None


def shard_chunks(items: Iterable[InputItem], size: int, first: int = 0) -> Iterator[tuple[int, list[InputItem]]]:
    """(j, the inputs of shard j) in order from j = first (`items` starting at that chunk), reading a streamed input
    list one shard at a time."""
    it = iter(items)
    for j in count(first):
        chunk = list(islice(it, size))
        if not chunk:
            return
        yield j, chunk


def prepare_input(
    item: InputItem, resolution: int, min_size: int | None, buckets: Sequence[Bucket] | None = None
) -> tuple[Image.Image, str] | SkippedInput:
    """(prepared image, caption), or the SkippedInput saying why not: returned, not raised, from the loader threads.
    With `buckets`, the image is cropped to the bucket of its aspect (its size says which)."""
    try:
        image, caption = item.load()
        if buckets:
            return prepare_bucket_image(image, buckets, resolution, min_size)[0], caption
        return prepare_image(image, resolution, min_size), caption
    except SkippedInput as skip:
        return skip


def load_ahead(
    pool: ThreadPoolExecutor, items: list[InputItem], batch_size: int, load: Callable[[InputItem], Any]
) -> Iterator[tuple[list[InputItem], list[Any]]]:
    """Input batches with their loaded results; the next batch loads in the threads while this one is encoded."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    pending: list[Future] = [pool.submit(load, item) for item in batches[0]] if batches else []
    for k, batch in enumerate(batches):
        ahead = [pool.submit(load, item) for item in batches[k + 1]] if k + 1 < len(batches) else []
        yield batch, [f.result() for f in pending]
        pending = ahead
