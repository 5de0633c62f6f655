"""Checkpoints of the Trainer: layout, keep-last-N, exact resume, incomplete ones, a full disk, stop signals and Hub
uploads in the background."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.trainer_helpers import (
    TINY,
    SyntheticCache,
    SyntheticStream,
    config,
    loader,
    make_trainer,
    params,
)
from tinyflux.model.loader import load_model
from tinyflux.model.model import TinyFluxDeep
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer import ema as ema_module
from tinyflux.trainer.hub import HubUploader
from tinyflux.trainer.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_checkpoint_is_a_model_directory_and_keeps_the_last_n(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=6, save_every_steps=1, keep_last_n_steps=2)
    trainer.train(epochs=None)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000005", "step_0000006"]
    last = root / "step_0000006"
    assert {"model.safetensors", "ema.safetensors", "config.json", "trainer_state.json", ckpt.MARKER} <= {
        p.name for p in last.iterdir()
    }
    assert json.loads((last / ckpt.TRAINER_STATE).read_text())["step"] == 6
    model = load_model(str(last), device="cpu", dtype=torch.float32)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trainer.model.state_dict()[name], rtol=0, atol=0)
    ema_model = load_model(str(last), device="cpu", dtype=torch.float32, weights_name=ckpt.EMA_WEIGHTS)
    for name, value in ema_model.named_parameters():
        torch.testing.assert_close(value, trainer.ema.shadow[name], rtol=0, atol=0)


def test_epoch_checkpoints_are_kept_apart_from_step_ones(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=100, save_every_epochs=1, keep_last_n_epochs=2, save_every_steps=3)
    trainer.train(epochs=3)  # 16 samples / batch 4 = 4 micro-batches = 2 steps per epoch
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch_0002", "epoch_0003", "step_0000003", "step_0000006"]
    assert ckpt.read_progress(tmp_path / "checkpoints" / "epoch_0003").epoch == 3


@pytest.mark.parametrize("stop_after", [3, 4])  # mid-epoch, and at an epoch boundary (2 steps per epoch)
def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, stop_after):
    straight = make_trainer(tmp_path / "a", total_steps=7)
    straight.train(epochs=None)
    first = make_trainer(tmp_path / "b", total_steps=7)
    first.train(epochs=None, max_steps=stop_after)
    resumed = make_trainer(tmp_path / "b", seed=99, total_steps=7, resume="latest")
    assert resumed.current_step == stop_after
    resumed.train(epochs=None)
    assert resumed.progress == straight.progress
    for name, value in params(straight.model).items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-7)
    for name, value in straight.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[name], value, rtol=0, atol=1e-7)
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_streaming_epochs_that_end_mid_cycle_resume_exactly(tmp_path):
    # 12 samples = 3 micro-batches per epoch with 2 per step: every other epoch ends inside an accumulation cycle, and
    # its epoch checkpoint waits for the step that closes the cycle.
    straight = make_trainer(tmp_path / "a", SyntheticStream(), total_steps=5, save_every_epochs=1)
    straight.train(epochs=None)
    first = make_trainer(tmp_path / "b", SyntheticStream(), total_steps=5, save_every_epochs=1)
    first.train(epochs=None, max_steps=2)  # stops one micro-batch into epoch 1
    assert (first.progress.epoch, first.progress.batches_in_epoch) == (1, 1)
    epoch_1 = ckpt.read_progress(tmp_path / "b" / "checkpoints" / "epoch_0001")
    assert (epoch_1.step, epoch_1.epoch, epoch_1.batches_in_epoch) == (2, 1, 1)
    resumed = make_trainer(tmp_path / "b", SyntheticStream(), total_steps=5, save_every_epochs=1, resume="latest")
    resumed.train(epochs=None)
    assert resumed.progress == straight.progress
    for name, value in params(straight.model).items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-7)


def test_resume_latest_skips_incomplete_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=3, save_every_steps=1)
    trainer.train(epochs=None)
    root = tmp_path / "checkpoints"
    broken = root / "step_0000009"
    broken.mkdir()
    (broken / ckpt.TRAINER_STATE).write_text(json.dumps({"step": 9}))  # no COMPLETE marker: interrupted save
    (root / "step_0000010.tmp").mkdir()
    assert ckpt.find_latest(root) == root / "step_0000003"
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(broken), root)
    resumed = make_trainer(tmp_path, total_steps=3, resume="latest")
    assert resumed.current_step == 3
    assert not (root / "step_0000010.tmp").exists()  # stale .tmp of an interrupted save is cleaned at setup


def test_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, caplog):
    trainer = make_trainer(tmp_path, total_steps=6, save_every_steps=1, keep_last_n_steps=10)
    trainer.train(epochs=None, max_steps=2)
    root = tmp_path / "checkpoints"
    good = root / "step_0000002"
    good_files = {p.name: p.read_bytes() for p in good.iterdir()}

    real_save, failures = ema_module.save_file, []

    def full_disk_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ema_module, "save_file", full_disk_once)
    weights = params(trainer.model)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device") as e:
        trainer.save_checkpoint(root / "step_0000099")
    assert f"the previous checkpoint ({good}) is intact" in str(e.value)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == good_files
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002"]
    assert all(torch.equal(v, trainer.model.state_dict()[n]) for n, v in weights.items())

    failures.clear()
    with caplog.at_level(logging.ERROR):
        trainer.train(epochs=None, max_steps=2)  # the periodic save at step 3 fails, training goes on
    assert trainer.current_step == 4 and trainer.save_failures == 1
    assert "No space left on device" in caplog.text and "training goes on" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002", "step_0000004"]
    assert ckpt.read_progress(root / "step_0000004").step == 4


class FakeHub:
    """Test double for huggingface_hub.HfApi (a network service): records uploads, can block or fail them."""

    def __init__(self, fail: bool = False):
        self.executor = ThreadPoolExecutor(max_workers=1)
        self.release = threading.Event()
        self.fail = fail
        self.uploads: list[tuple[str, list[str]]] = []

    def run_as_future(self, fn, *args, **kwargs) -> Future:
        return self.executor.submit(fn, *args, **kwargs)

    def create_repo(self, repo_id: str, **kwargs) -> None:
        pass

    def upload_folder(self, *, repo_id: str, folder_path: str, path_in_repo: str, run_as_future: bool = False, **kw):
        if run_as_future:
            return self.run_as_future(
                self.upload_folder, repo_id=repo_id, folder_path=folder_path, path_in_repo=path_in_repo
            )
        self.release.wait(timeout=30)
        if self.fail:
            raise ConnectionError("Hub unreachable")
        self.uploads.append((path_in_repo, sorted(p.name for p in Path(folder_path).iterdir())))


def test_hub_upload_runs_in_the_background_and_failures_do_not_stop_training(tmp_path, caplog):
    trainer = make_trainer(tmp_path, total_steps=4, save_every_steps=2, hf_repo_id="me/tiny")
    hub = FakeHub()
    trainer.uploader = HubUploader("me/tiny", tmp_path / "checkpoints", api=hub)
    trainer.train(epochs=None)  # returns although every upload is still blocked
    assert trainer.current_step == 4 and trainer.uploader.pending >= 2 and not hub.uploads
    hub.release.set()
    assert trainer.uploader.wait(timeout=30)
    assert hub.uploads == [("", ["config.json", "ema.safetensors", "model.safetensors", "trainer_state.json"])] * 2

    # upload_every_steps saves a checkpoint to upload even where save_every_steps would not
    failing = make_trainer(tmp_path / "f", total_steps=2, upload_every_steps=1, hf_repo_id="me/tiny")
    bad_hub = FakeHub(fail=True)
    bad_hub.release.set()
    failing.uploader = HubUploader("me/tiny", tmp_path / "f", api=bad_hub)
    with caplog.at_level(logging.ERROR):
        failing.train(epochs=None)
        failing.uploader.wait(timeout=30)
    assert failing.current_step == 2 and failing.uploader.failures == 2
    assert "Hub unreachable" in caplog.text


def test_upload_every_epochs(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=100, hf_repo_id="me/tiny", upload_every_epochs=1)
    hub = FakeHub()
    hub.release.set()
    trainer.uploader = HubUploader("me/tiny", tmp_path / "checkpoints", api=hub)
    trainer.train(epochs=2)
    assert trainer.uploader.wait(timeout=30) and len(hub.uploads) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch_*")) == ["epoch_0001", "epoch_0002"]


class SignalAt(SyntheticCache):
    """Sends a signal to this process when sample `at` is read (what a scheduler does mid-epoch)."""

    def __init__(self, at: int, signum: int):
        super().__init__(16)
        self.at, self.signum = at, signum

    def __getitem__(self, i: int) -> dict:
        if i == self.at:
            os.kill(os.getpid(), self.signum)
        return super().__getitem__(i)


def test_sigusr1_saves_then_stops_at_the_next_step(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(TinyFluxDeep(TINY), config(tmp_path, total_steps=100))
    trainer.setup(loader(SignalAt(at=5, signum=signal.SIGUSR1), shuffle=False))  # micro-batch 1: the first step
    trainer.train(epochs=None)
    assert trainer.stopped_by == "SIGUSR1" and trainer.current_step == 1
    assert trainer.last_checkpoint.name == "step_0000001" and ckpt.is_complete(trainer.last_checkpoint)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is removed after train()


def test_a_fresh_run_refuses_a_checkpoint_dir_of_another_run(tmp_path):
    make_trainer(tmp_path, total_steps=2, save_every_steps=1).train(epochs=None)
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints of another run.*--resume latest"):
        make_trainer(tmp_path, total_steps=2, save_every_steps=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]


def test_checkpoint_records_the_training_config(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=1, shift=2.0)
    trainer.train(epochs=None)
    saved = json.loads((trainer.last_checkpoint / ckpt.TRAINER_CONFIG).read_text())
    assert saved["shift"] == 2.0 and saved["total_steps"] == 1


@pytest.mark.parametrize("damaged", [ckpt.EMA_WEIGHTS, "model.safetensors"])
def test_resuming_a_damaged_checkpoint_is_a_checkpoint_error(tmp_path, damaged):
    make_trainer(tmp_path, total_steps=1).train(epochs=None)
    target = tmp_path / "checkpoints" / "step_0000001" / damaged
    target.write_bytes(target.read_bytes()[:64])
    with pytest.raises(ckpt.CheckpointError, match="cannot resume from .*step_0000001"):
        make_trainer(tmp_path, total_steps=2, resume="latest")
