"""The validation loss: a fixed split, fixed timesteps and noise, so equal weights give equal figures (also after a
resume); it falls as the tiny model trains on the drawn-shapes cache; the best step is kept and named."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.trainer_helpers import TINY, config
from tinyflux.cache.loaders import make_stream_loader
from tinyflux.model.model import TinyFluxDeep
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer.trainer import Trainer
from tinyflux.trainer.validation import Validator, held_out_indices, read_samples, validation_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_the_split_is_fixed_and_sized_by_the_fraction():
    assert held_out_indices(11, 0.25) == held_out_indices(11, 0.25)
    assert len(held_out_indices(11, 0.25)) == 3 and len(held_out_indices(1000, 0.1)) == 100
    assert len(held_out_indices(5, 0.01)) == 1  # at least one
    with pytest.raises(ValueError, match="leaves none to train on"):
        held_out_indices(2, 0.9)
    torch.testing.assert_close(validation_timesteps(4), torch.tensor([0.125, 0.375, 0.625, 0.875]))


def _trainer(tmp_path, cache, held_out, **overrides) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(TinyFluxDeep(TINY), config(tmp_path, batch_size=4, gradient_accumulation=1, **overrides))
    trainer.validator = Validator(read_samples(cache, held_out, limit=8), batch_size=2, timesteps=4)
    loader = make_stream_loader(cache, batch_size=4, seed=0, shuffle_buffer=8, held_out=[held_out], infinite=True)
    trainer.setup(loader)
    return trainer


def test_held_out_samples_are_never_trained_on_and_equal_weights_give_equal_losses(built_cache, tmp_path, caplog):
    cache = built_cache.output
    held_out = held_out_indices(built_cache.manifest.num_samples, 0.25)
    loader = make_stream_loader(cache, batch_size=4, seed=0, held_out=[held_out])
    streamed = [i for batch in loader for i in batch["index"].tolist()]
    assert sorted(streamed) == sorted(set(range(built_cache.manifest.num_samples)) - set(held_out))

    caplog.set_level(logging.INFO, logger="tinyflux.trainer.validation")
    trainer = _trainer(tmp_path, cache, held_out, total_steps=4, save_every_steps=4, validation_every=2)
    trainer.train(epochs=None)
    first = trainer.validator.evaluate(trainer)
    assert trainer.validator.evaluate(trainer) == first  # deterministic: no draw, no dropout
    assert set(first) == {"val/loss", "val/loss_t0.125", "val/loss_t0.375", "val/loss_t0.625", "val/loss_t0.875"}
    assert trainer.model.training
    logged = [r.getMessage() for r in caplog.records if "validation loss" in r.getMessage()]
    assert [m.split()[1] for m in logged] == ["0", "2", "4"]  # the starting weights, then every validation_every
    best = trainer.progress.best_val_step
    assert logged[-1].endswith(f"at step {best})")  # the best step is named

    resumed = _trainer(tmp_path, cache, held_out, total_steps=4, resume="latest")
    assert resumed.progress.step == 4 and resumed.progress.best_val_step == best
    assert resumed.validator.evaluate(resumed) == first  # the same weights after a resume: the same figure


def test_the_validation_loss_falls_as_the_model_learns_the_shapes(built_cache, tmp_path):
    cache = built_cache.output
    held_out = held_out_indices(built_cache.manifest.num_samples, 0.25)
    trainer = _trainer(tmp_path, cache, held_out, total_steps=30, learning_rate=3e-3, validation_every=30)
    before = trainer.validator.evaluate(trainer)["val/loss"]
    trainer.train(epochs=None)
    after = trainer.validator.evaluate(trainer)["val/loss"]
    assert after < 0.5 * before, (before, after)
    assert trainer.progress.best_val_step == 30 and trainer.progress.best_val_loss == pytest.approx(after)
    assert ckpt.read_progress(trainer.last_checkpoint).best_val_loss == pytest.approx(after)


def test_the_split_leaves_the_in_memory_loader_too(built_cache):
    from tinyflux.trainer.args import parse_args
    from tinyflux.trainer.main import build_dataloader, build_validator, held_out_split

    args = parse_args(
        ["--cache", str(built_cache.output), "--model", "tiny", "--in_memory", "--num_workers", "0"]
        + ["--validation_fraction", "0.25", "--validation_samples", "2"]
    )
    caches, script = args.script.cache, args.script
    held_out = held_out_split(caches, script.validation_fraction)
    loader = build_dataloader(caches, args.model_config, args.trainer, in_memory=True, held_out=held_out)
    trained = sorted(int(i) for batch in loader for i in batch["index"])
    assert trained == sorted(set(range(built_cache.manifest.num_samples)) - set(held_out[0]))
    validator = build_validator(
        caches,
        args.model_config,
        args.trainer,
        validation_cache=script.validation_cache,
        max_samples=script.validation_samples,
        held_out=held_out,
    )
    assert [s["index"] for s in validator.samples] == held_out[0][:2]  # at most --validation_samples


def test_a_split_that_leaves_nothing_to_train_on_is_one_line(built_cache, capsys):
    from tinyflux.trainer.main import main

    argv = ["--cache", str(built_cache.output), "--model", "tiny", "--dtype", "float32"]
    assert main([*argv, "--validation_fraction", "0.99"]) == 2
    assert (
        "--validation_fraction: validation_fraction=0.99 of 11 samples leaves none to train on"
        in capsys.readouterr().err
    )


@pytest.mark.slow
def test_fsdp2_processes_evaluate_their_share_and_log_what_one_process_logs(tmp_path):
    """Two FSDP2 processes (the CPU test switch) hold half the weights each: every process runs the same number of
    validation forwards (accelerate pads the last batch: 3 samples, 2 per batch) and gather_for_metrics drops the
    padding, so val/loss is the single process's, at step 0 and after two steps on the same global batches (12
    training samples: no short last batch that two processes would pad)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_scale import argv, launch, synthetic_cache
    from tinyflux.trainer.runtime import ENGINE_ON_CPU_ENV

    cache = tmp_path / "cache"
    synthetic_cache(TINY, n=16, side=8, text_len=6).to_shards(cache, shard_size=8)
    common = ("--log_with", "tensorboard", "--total_steps", "2", "--validation_fraction", "0.25")
    common += ("--validation_samples", "3")
    launch(None, *argv(cache, tmp_path / "one", "--batch_size", "4", *common), cpu=True)
    two = argv(cache, tmp_path / "two", "--batch_size", "2", *common)
    output = launch("fsdp.yaml", *two, num_processes=2, cpu=True, env={ENGINE_ON_CPU_ENV: "1"})
    assert "engine: fsdp2, 2 process(es)" in output and "validation loss on 3 held-out samples" in output

    def val_losses(out) -> dict[int, float]:
        events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
        events.Reload()
        return {e.step: e.value for e in events.Scalars("val/loss")}

    one, fsdp2 = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert sorted(one) == sorted(fsdp2) == [0, 2]
    for step, loss in one.items():
        assert abs(fsdp2[step] - loss) <= 1e-5 * loss, (step, fsdp2[step], loss)
