"""The inputs of a cache build: listing them in shard order, loading and preparing them ahead of the models.

Folders (sorted keys), `datasets` datasets (row order) and webdataset tars (tar order) become InputItems, whose load()
gives (image, caption) or raises SkippedInput with the reason the report lists. Loading runs in threads, a batch ahead
of the models (load_ahead). The build itself: tinyflux.trainer.cache_build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import count, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import webdataset as wds
from PIL import Image

from tinyflux.errors import TinyFluxError
from tinyflux.trainer.cache_encode import (
    MISSING_CAPTION,
    MISSING_IMAGE,
    OUTSIDE_IMAGES,
    SkippedInput,
    check_caption,
    load_image,
    prepare_image,
)

if TYPE_CHECKING:
    from tinyflux.trainer.cache_build import BuildCacheArgs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# In an --images folder: captions for the images without a same-stem .txt, one line for all or one line per image.
PROMPTS_FILE = "prompts.txt"


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


def dataset_items(args: BuildCacheArgs) -> list[InputItem]:
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


def _load_tar_sample(raw: dict[str, Any], image_exts: list[str], caption_ext: str) -> tuple[Image.Image, str]:
    caption = check_caption(raw.get(caption_ext))
    data = next((raw[ext] for ext in image_exts if ext in raw), None)
    if data is None:
        raise SkippedInput(MISSING_IMAGE, f"no member with extension {image_exts}")
    return load_image(data), caption


def wds_items(args: BuildCacheArgs) -> Iterator[InputItem]:
    """Samples of webdataset tars in tar order, streamed (each process reads them all, decodes only its own)."""
    urls = [url for spec in args.wds for url in wds.shardlists.expand_urls(spec)]
    image_exts = (args.image_column or "jpg;jpeg;png;webp").split(";")
    caption_ext = args.caption_column or "txt"
    load = partial(_load_tar_sample, image_exts=image_exts, caption_ext=caption_ext)
    for raw in wds.tarfile_samples([{"url": url} for url in urls]):
        yield InputItem(sample_key(raw["__key__"]), f"{raw['__url__']}:{raw['__key__']}", partial(load, raw))


def list_inputs(args: BuildCacheArgs) -> tuple[Iterable[InputItem], int | None]:
    """The inputs in shard order, and how many there are when known without reading them all."""
    if args.images:
        items = folder_items(args.images, follow_symlinks=args.follow_symlinks)
        return items, len(items)
    if args.dataset:
        items = dataset_items(args)
        return items, len(items)
    return wds_items(args), None


def shard_chunks(items: Iterable[InputItem], size: int) -> Iterator[tuple[int, list[InputItem]]]:
    """(j, the inputs of shard j) in order, reading a streamed input list one shard at a time."""
    it = iter(items)
    for j in count():
        chunk = list(islice(it, size))
        if not chunk:
            return
        yield j, chunk


def prepare_input(item: InputItem, resolution: int, min_size: int | None) -> tuple[Image.Image, str] | SkippedInput:
    """(prepared image, caption), or the SkippedInput saying why not: returned, not raised, from the loader threads."""
    try:
        image, caption = item.load()
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
