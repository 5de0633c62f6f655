"""Trackers through accelerate: TensorBoard, W&B (offline: it writes its run directory, nothing goes to a network) or
both ("all"); the scalars and the captioned sample grid reach each."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.trainer_helpers import make_trainer
from tinyflux.trainer import runtime
from tinyflux.trainer.config import TrainerConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def wandb_records(path: Path) -> list[Any]:
    """The protobuf Records of an offline W&B run file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    chunks (32 KiB blocks; per chunk a crc32, a length and a type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, records = path.read_bytes(), 7, [], []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record())
            records[-1].ParseFromString(b"".join(chunks))
            chunks = []
    return records


def wandb_history(path: Path, timeout: float = 60) -> list[dict]:
    """The history rows of an offline run, once W&B's service has written the run's exit record (finish() returns
    before its writer is done)."""
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in record.history.item:
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                target = row
                for name in parents:
                    target = target.setdefault(name, {})
                target[leaf] = json.loads(item.value_json)
            rows.append(row)
    return rows


def test_log_with_all_sends_scalars_and_the_sample_grid_to_tensorboard_and_wandb(tmp_path, tiny_zoo, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tinyflux.sampling.sampler import Sampler

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written to WANDB_DIR only
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing under $HOME
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    trainer = make_trainer(
        tmp_path,
        total_steps=4,
        log_every=2,
        sample_every=4,
        sample_prompts=["a red cube", "a blue sphere"],
        sample_steps=2,
        sample_size=4,
        sample_dir=str(tmp_path / "samples"),
        log_with="all",
    )
    assert sorted(t.name for t in trainer.accelerator.trackers) == ["tensorboard", "wandb"]
    trainer.sampler = Sampler(tiny_zoo, trainer.model, trainer.ema, device="cpu", dtype=torch.float32)
    try:
        trainer.train(epochs=None)
        trainer.finish()
    finally:
        import wandb

        wandb.teardown()  # W&B's service process, which would otherwise live until the suite's exit
    grid = Image.open(tmp_path / "samples" / "grid_step0000004.png")

    (run,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")  # offline: nothing was sent
    history = {row["_step"]: row for row in wandb_history(next(run.glob("run-*.wandb")))}
    assert sorted(history) == [2, 4] and history[4]["loss"] > 0 and "lr" in history[2]
    assert history[4]["samples"]["_type"] == "images/separated" and history[4]["samples"]["count"] == 1
    (image,) = (run / "files" / "media" / "images").glob("samples_4_*.png")
    assert Image.open(image).size == grid.size  # the captioned grid, as written to sample_dir

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    (logged,) = events.Images("samples")
    assert (logged.step, logged.width, logged.height) == (4, *grid.size)


def test_wandb_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(runtime, "is_wandb_available", lambda: False)
    with pytest.raises(TrainerConfigError, match="pip install wandb"):
        runtime.trackers("wandb")
    assert runtime.trackers("all") == ["tensorboard"]  # "all": the trackers that are installed
    assert runtime.trackers("none") is None
