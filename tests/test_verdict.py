"""Non-finite steps: a bad step changes no weight or optimizer moment on either verdict path (read at once, or deferred
one step with torch's fused AdamW skipping on the device) while the EMA takes its ordinary update, both paths train
the same weights, and a run of bad steps stops with a message. fp16's loss scaler survives a bad step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.trainer_helpers import TINY, SyntheticCache, config, loader, params
from tinyflux.model.model import TinyFluxDeep
from tinyflux.trainer import trainer as trainer_module
from tinyflux.trainer.trainer import NonFiniteLossError, Trainer
from tinyflux.trainer.verdict import Flags, StepVerdicts, fused_adam


def flags(bad: bool, stop: bool = False) -> torch.Tensor:
    return torch.tensor([float(bad), float(stop)])


def test_deferred_verdicts_arrive_one_step_late_and_gate_the_fused_optimizer():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    assert fused_adam(opt) and not fused_adam(torch.optim.AdamW([p], lr=0.1))
    verdicts = StepVerdicts(opt, torch.device("cpu"), deferred=True, num_processes=1)

    p.grad = torch.full((4,), float("nan"))
    bad = flags(True)
    verdicts.gate(bad)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4)) and opt.state[p]["step"].item() == 0  # nothing applied
    assert verdicts.push(bad) is None  # the first verdict waits for the next step

    p.grad = torch.ones(4)
    good = flags(False, stop=True)
    verdicts.gate(good)
    opt.step()
    assert (p.detach() < 1).all() and opt.state[p]["step"].item() == 1
    assert verdicts.push(good) == Flags(bad=True, stop=False)  # the previous step's
    assert verdicts.settle() == Flags(bad=False, stop=True) and verdicts.settle() is None

    immediate = StepVerdicts(opt, torch.device("cpu"), deferred=False, num_processes=1)
    assert immediate.push(flags(True)) == Flags(bad=True, stop=False) and immediate.settle() is None


def trainer_for(tmp_path, data, optimizer: str, **overrides) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(TinyFluxDeep(TINY), config(tmp_path, optimizer=optimizer, warmup_steps=0, **overrides))
    trainer.setup(loader(data, shuffle=False))
    return trainer


def optimizer_state(trainer: Trainer) -> list[torch.Tensor]:
    return [t.clone() for s in trainer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize(("optimizer", "deferred"), [("adamw", True), ("adafactor", False)])
def test_a_non_finite_step_applies_no_update_and_is_counted(tmp_path, optimizer, deferred):
    # 16 samples, batch 4, accumulation 2, no shuffle: sample 9 (micro-batch 2) is NaN -> step 1 good, step 2 bad.
    trainer = trainer_for(tmp_path, SyntheticCache(16, nan_at=(9,)), optimizer, total_steps=4)
    assert trainer._verdicts.deferred is deferred
    trainer.train(epochs=None, max_steps=1)
    before, moments = params(trainer.model), optimizer_state(trainer)
    shadow = {n: t.clone() for n, t in trainer.ema.shadow.items()}
    trainer.train(epochs=None, max_steps=1)
    after = params(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # no weight moved, not even by weight decay
    assert all(torch.equal(a, b) for a, b in zip(moments, optimizer_state(trainer), strict=True)) and moments
    # The EMA takes its ordinary update toward the unchanged weights (decay 0.9), as after a zero update.
    assert any(not torch.equal(shadow[n], before[n]) for n in shadow)
    for name, t in trainer.ema.shadow.items():
        torch.testing.assert_close(t, torch.lerp(shadow[name], before[name], 0.1), rtol=0, atol=1e-7)
    assert trainer.current_step == 2 and trainer.progress.nan_steps == 1  # settled by the step's checkpoint
    assert trainer.progress.micro_step == 4  # the step consumed its data

    trainer.train(epochs=None, max_steps=1)
    assert trainer.current_step == 3 and trainer.progress.nan_steps == 1 and trainer.progress.nan_streak == 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in params(trainer.model).items())


def test_the_deferred_and_the_immediate_verdict_train_the_same_weights(tmp_path, monkeypatch):
    data = SyntheticCache(16, nan_at=(5,))
    deferred = trainer_for(tmp_path / "deferred", data, "adamw", total_steps=4)
    deferred.train(epochs=2)
    # The same fused AdamW (clipping in its step), the verdict read at once
    monkeypatch.setattr(trainer_module, "StepVerdicts", lambda *a, deferred, **k: StepVerdicts(*a, deferred=False, **k))
    immediate = trainer_for(tmp_path / "immediate", data, "adamw", total_steps=4)
    assert deferred._verdicts.deferred and not immediate._verdicts.deferred
    immediate.train(epochs=2)
    assert deferred.progress == immediate.progress and deferred.progress.nan_steps == 2  # step 1 of each epoch
    a, b = params(deferred.model), params(immediate.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(t, immediate.ema.shadow[n]) for n, t in deferred.ema.shadow.items())
    assert deferred.ema.num_updates == immediate.ema.num_updates == 4


@pytest.mark.parametrize(("optimizer", "deferred"), [("adamw", True), ("adafactor", False)])
def test_consecutive_non_finite_steps_stop_with_advice(tmp_path, optimizer, deferred):
    bad = trainer_for(tmp_path, SyntheticCache(16, nan_at=tuple(range(16))), optimizer, max_nan_steps=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps .* at step 3") as e:
        bad.train(epochs=None)
    assert "learning_rate" in str(e.value) and bad.progress.nan_steps == 3
    assert bad.current_step == 3 + deferred  # the deferred path learns of step 3 after step 4
    assert all(torch.isfinite(p).all() for p in bad.model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the host syncs a step makes exist only there")
def test_a_cuda_step_between_logs_makes_no_host_sync(tmp_path):
    trainer = trainer_for(tmp_path, SyntheticCache(64), "adamw", total_steps=6, log_every=100)
    trainer.train(epochs=None, max_steps=2)  # warm-up: the first verdict, lazy optimizer state
    # Batches fetched and pinned first, as the streaming loader delivers them: the loader's own copies are not the step.
    batches = iter(trainer.dataloader)
    pinned = [
        {
            k: v.pin_memory() if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
            for k, v in next(batches).items()
        }
        for _ in range(3)
    ]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in pinned:
            trainer._micro_step(batch, bar=_NoBar())
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _NoBar:
    def update(self, n: int) -> None:
        pass


def test_fp16_loss_scaler_survives_a_non_finite_step(tmp_path, monkeypatch):
    """fp16 needs CUDA, so this runs accelerate's fp16 path with torch's real loss scaler on the CPU. Clipping unscales
    the gradients of a bad step too; skipping the optimizer step must still reset the scaler (and lower its scale),
    or the next step's clipping fails with 'unscale_() has already been called'."""
    make_accelerator = trainer_module.make_accelerator

    def fp16_on_cpu(cfg):
        accelerator = make_accelerator(dataclasses.replace(cfg, dtype=torch.float32))
        accelerator.native_amp, accelerator.state._mixed_precision = True, "fp16"
        accelerator.scaler = torch.amp.GradScaler("cpu")
        return accelerator

    monkeypatch.setattr(trainer_module, "make_accelerator", fp16_on_cpu)
    trainer = trainer_for(tmp_path, SyntheticCache(16, nan_at=(5,)), "adamw", dtype="float16", total_steps=2)
    assert not trainer._verdicts.deferred and trainer.optimizer.scaler is trainer.accelerator.scaler
    before = params(trainer.model)
    trainer.train(epochs=None)  # step 1 bad, step 2 good
    assert trainer.current_step == 2 and trainer.progress.nan_steps == 1 and trainer.progress.nan_streak == 0
    assert trainer.accelerator.scaler.get_scale() <= 2.0**15  # halved (at least) by the bad step
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in params(trainer.model).items())
