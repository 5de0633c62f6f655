"""Non-finite steps: a bad step changes no weight, moment or EMA weight on either verdict path (read at once, or
deferred one step with torch's fused AdamW skipping on the device), both paths train the same weights, and a run of
bad steps stops with a message."""

from __future__ import annotations

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


@pytest.mark.parametrize(("optimizer", "deferred"), [("adamw", True), ("adafactor", False)])
def test_a_non_finite_step_changes_nothing_and_is_counted(tmp_path, optimizer, deferred):
    # 16 samples, batch 4, accumulation 2, no shuffle: sample 5 (micro-batch 1) is NaN -> step 1 is bad, step 2 good.
    trainer = trainer_for(tmp_path, SyntheticCache(16, nan_at=(5,)), optimizer, total_steps=3)
    assert trainer._verdicts.deferred is deferred
    before = params(trainer.model)
    shadow = {n: t.clone() for n, t in trainer.ema.shadow.items()}
    trainer.train(epochs=None, max_steps=1)
    after = params(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # no weight moved, not even by weight decay
    assert all(torch.equal(shadow[n], t) for n, t in trainer.ema.shadow.items())
    assert trainer.current_step == 1 and trainer.progress.nan_steps == 1  # settled by the step's checkpoint
    assert trainer.progress.micro_step == 2  # the step consumed its data
    state = trainer.optimizer.state
    assert all(s["step"].item() == 0 for s in state.values()) if optimizer == "adamw" else not state

    trainer.train(epochs=1)
    assert trainer.current_step == 2 and trainer.progress.nan_steps == 1 and trainer.progress.nan_streak == 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in params(trainer.model).items())


def test_the_deferred_and_the_immediate_verdict_train_the_same_weights(tmp_path, monkeypatch):
    data = SyntheticCache(16, nan_at=(5,))
    deferred = trainer_for(tmp_path / "deferred", data, "adamw", total_steps=4)
    deferred.train(epochs=2)
    monkeypatch.setattr(trainer_module, "fused_adam", lambda optimizer: False)  # same fused AdamW, verdict read at once
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
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            batch = next(iter(trainer.dataloader))
            trainer._micro_step(batch, bar=_NoBar())
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _NoBar:
    def update(self, n: int) -> None:
        pass
