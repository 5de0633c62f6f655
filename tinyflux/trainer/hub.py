"""Background uploads of checkpoints and sample grids to the Hugging Face Hub that never block or stop training.

Each upload runs on huggingface_hub's own worker thread (`run_as_future=True`); a failure (no network, no token, a
full repo) is logged and counted, never raised into the training loop. The files are first hard-linked into a staging
directory, so keep-last-N may delete the checkpoint while its upload is still running.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tinyflux.model.loader import CONFIG_NAME, EMA_WEIGHTS_NAME, WEIGHTS_NAME
from tinyflux.trainer.checkpoint import TRAINER_STATE
from tinyflux.trainer.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

logger = logging.getLogger(__name__)

# What a checkpoint upload sends: the loadable model directory (load_model("user/repo")), not the optimizer state.
# A LoRA checkpoint has the adapter's two files instead of model.safetensors: the repo is then a peft adapter repo.
MODEL_FILES = (WEIGHTS_NAME, EMA_WEIGHTS_NAME, CONFIG_NAME, TRAINER_STATE, ADAPTER_WEIGHTS, ADAPTER_CONFIG)
STAGING_DIR = ".upload"


def _stage(files: list[Path], staging: Path) -> Path:
    """Hard-link (copy where links are impossible) files into staging."""
    staging.mkdir(parents=True, exist_ok=True)
    for src in files:
        dst = staging / src.name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return staging


class HubUploader:
    """Uploads to one Hub repo in the background. `api` is a huggingface_hub.HfApi (or anything with its
    create_repo / upload_folder(run_as_future=True) / run_as_future methods)."""

    def __init__(self, repo_id: str, staging_root: str | os.PathLike, api: Any = None, private: bool = True):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self.repo_id = repo_id
        self.api = api
        self.private = private
        self.staging_root = Path(staging_root) / STAGING_DIR
        shutil.rmtree(self.staging_root, ignore_errors=True)  # leftovers of a run that stopped mid-upload
        self.finished: list[threading.Event] = []  # one per upload, set once its outcome is recorded
        self.failures = 0
        self.done = 0
        self._repo_future: Future | None = None

    def _ensure_repo(self) -> None:
        if self._repo_future is None:
            self._repo_future = self.api.run_as_future(
                self.api.create_repo, repo_id=self.repo_id, private=self.private, exist_ok=True
            )
            self._track(self._repo_future, "create repo")

    def _track(self, future: Future, what: str, staging: Path | None = None) -> None:
        event = threading.Event()

        def finished(f: Future) -> None:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            error = f.exception()
            if error is None:
                self.done += 1
                logger.info("Hub upload done: %s -> %s", what, self.repo_id)
            else:
                self.failures += 1
                logger.error("Hub upload failed (training goes on): %s -> %s: %s", what, self.repo_id, error)
            event.set()

        self.finished.append(event)
        future.add_done_callback(finished)

    def upload_checkpoint(self, checkpoint: str | os.PathLike, step: int) -> None:
        """Send the checkpoint's model files to the repo root (the newest model is what load_model(repo) gets)."""
        self._submit([Path(checkpoint) / name for name in MODEL_FILES], "", f"step {step}: {Path(checkpoint).name}")

    def upload_samples(self, grid: str | os.PathLike, step: int) -> None:
        """Send a sample grid image to samples/ in the repo."""
        self._submit([Path(grid)], "samples", f"step {step}: sample grid")

    def _submit(self, files: list[Path], path_in_repo: str, message: str) -> None:
        try:
            files = [f for f in files if f.is_file()]
            staging = _stage(files, self.staging_root / f"{len(self.finished):06d}")
            self._ensure_repo()
            future = self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=str(staging),
                path_in_repo=path_in_repo,
                commit_message=message,
                run_as_future=True,
            )
        except Exception as e:  # staging on a full disk, a broken client: still never the loop's problem
            self.failures += 1
            logger.error("Hub upload not started (training goes on): %s -> %s: %s", message, self.repo_id, e)
            return
        self._track(future, message, staging)

    @property
    def pending(self) -> int:
        """Uploads (and the repo creation) started and not finished yet."""
        return sum(not e.is_set() for e in self.finished)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the uploads started so far; True when all finished (successfully or not) within timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in list(self.finished):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not event.wait(left):
                return False
        return True
