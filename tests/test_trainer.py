"""Trainer and TrainerConfig on CPU with the `tiny` preset: the loss, dropouts, optimizers and schedules, NaN steps,
precision, compile, EMA, sample grids."""

from __future__ import annotations

import math
import time
from datetime import timedelta

import pytest
import torch
from PIL import Image
from torch import nn
from torch._dynamo.testing import CompileCounter

from tests.trainer_helpers import (
    TEXT_LEN,
    TINY,
    SyntheticCache,
    collate,
    config,
    eval_loss,
    first_batch,
    forward_kwargs,
    make_trainer,
    params,
    perturb,
)
from tinyflux.cache.format import T_BUCKETS
from tinyflux.cache.loaders import CachedDataset, collate_fn
from tinyflux.cache.memory import (
    DatasetCache,
    EncodingCache,
    LuneFeatureCache,
    MultiSourceCache,
    SolFeatureCache,
    interpolate_buckets,
)
from tinyflux.model.model import TinyFluxDeep, pack_latents
from tinyflux.trainer.batch import BatchMismatchError
from tinyflux.trainer.config import TrainerConfig, TrainerConfigError
from tinyflux.trainer.engines import Engine
from tinyflux.trainer.optim import (
    OptimizerUnavailableError,
    build_optimizer,
    build_scheduler,
    clip_in_fused_step,
    torch_optimizer,
)
from tinyflux.trainer.runtime import check_compile_mode, compile_model, make_accelerator
from tinyflux.trainer.trainer import Trainer
from tinyflux.trainer.training_loader import EpochLoader
from tinyflux.trainer.validation import Validator

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_config_contradictions_fail_with_the_field_names():
    with pytest.raises(TrainerConfigError) as e:
        TrainerConfig(save_every_steps=0, lune_weight=-1.0, text_dropout=1.5, optimizer="sgd", min_lr=1.0)
    for name in ("save_every_steps", "lune_weight", "text_dropout", "optimizer", "min_lr"):
        assert name in str(e.value)
    with pytest.raises(TrainerConfigError, match="hf_repo_id"):
        TrainerConfig(upload_every_steps=10)
    assert TrainerConfig(dtype="float16").mixed_precision == "fp16"
    assert TrainerConfig(dtype="float32").dtype is torch.float32
    assert TrainerConfig().mixed_precision == "bf16" and TrainerConfig().gradient_accumulation == 4


def test_short_run_lowers_the_loss_and_logs_every_part(tmp_path):
    data = SyntheticCache(16)
    trainer = make_trainer(tmp_path, data, total_steps=24, log_with="tensorboard", peak_tflops=1.0, log_every=4)
    before = eval_loss(trainer.model, data)
    trainer.train(epochs=None)
    after = eval_loss(trainer.model, data)
    assert after < 0.8 * before, (before, after)
    assert trainer.current_step == 24

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss", "loss/main", "loss/lune", "loss/sol", "grad_norm", "lr", "samples_per_sec", "mfu"}
    assert expected <= tags
    assert [e.step for e in events.Scalars("loss")] == [4, 8, 12, 16, 20, 24]
    assert all(math.isfinite(e.value) for tag in expected for e in events.Scalars(tag))
    assert all(e.value > 0 for tag in ("loss/main", "loss/lune", "loss/sol", "mfu") for e in events.Scalars(tag))


def test_distillation_losses_are_non_zero_and_reach_the_expert_heads(tmp_path):
    trainer = make_trainer(tmp_path)
    parts = trainer.train_step(first_batch())
    assert parts["lune"].item() > 1e-3 and parts["sol"].item() > 1e-3
    torch.testing.assert_close(parts["loss"], parts["main"] + 0.1 * parts["lune"] + 0.05 * parts["sol"])
    parts["loss"].backward()
    for prefix in ("lune_predictor.", "sol_prior."):
        grads = [p.grad for n, p in trainer.model.named_parameters() if n.startswith(prefix) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), prefix


def test_loss_weight_warmups_ramp_the_expert_terms(tmp_path):
    trainer = make_trainer(tmp_path, lune_warmup_steps=4, sol_warmup_steps=8)
    trainer.progress.step = 2
    parts = trainer.train_step(first_batch())
    torch.testing.assert_close(parts["loss"], parts["main"] + 0.05 * parts["lune"] + 0.0125 * parts["sol"])


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_teacher_dropout_really_hides_the_teacher(tmp_path, p):
    trainer = make_trainer(tmp_path, lune_dropout=p, sol_dropout=p)
    perturb(trainer.model)
    batch = first_batch()
    seen = forward_kwargs(trainer, batch)
    assert seen["lune_mask"].tolist() == [p == 0.0] * 4 and seen["sol_mask"].tolist() == [p == 0.0] * 4
    other = dict(
        batch, lune=batch["lune"] * -3 + 1, sol_stats=1 - batch["sol_stats"], sol_spatial=batch["sol_spatial"].flip(-1)
    )
    main_a, main_b = trainer.train_step(batch)["main"], trainer.train_step(other)["main"]
    # Dropped teachers cannot change the prediction; kept ones do. The distillation loss counts either way.
    assert torch.equal(main_a, main_b) == (p == 1.0)


def test_teacher_dropout_rate_per_sample(tmp_path):
    trainer = make_trainer(tmp_path, lune_dropout=0.5, sol_dropout=0.25, text_dropout=0.1)
    kept = {"lune": 0.0, "sol": 0.0, "text": 0.0}
    latents = torch.zeros(400, 16, 1, 1)
    for micro_step in range(10):
        trainer.progress.micro_step = micro_step
        _, _, keep = trainer._draws(latents)
        for name in kept:
            kept[name] += keep[name].float().mean().item() / 10
    assert abs(kept["lune"] - 0.5) < 0.05 and abs(kept["sol"] - 0.75) < 0.05 and abs(kept["text"] - 0.9) < 0.03


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_text_dropout_gives_the_null_conditioning(tmp_path, p):
    from tinyflux.sampling.sampler import null_text

    trainer = make_trainer(tmp_path, text_dropout=p)
    batch = first_batch()
    seen = forward_kwargs(trainer, batch)
    t5, pooled = seen["args"][1], seen["args"][2]
    mask = seen["encoder_attention_mask"]
    assert t5.shape[1] == mask.shape[1] == TEXT_LEN  # eager: unpadded (text_buckets pad compiled blocks' text only)
    if p == 1.0:
        null = null_text(4, TEXT_LEN, (TINY.num_t5_layers, TINY.t5_hidden_size), TINY.pooled_projection_dim)
        assert torch.equal(t5, null.t5) and torch.equal(pooled, null.pooled) and torch.equal(mask, null.mask)
    else:
        assert torch.equal(t5[:, :TEXT_LEN], batch["t5_embeds"]) and torch.equal(mask[:, :TEXT_LEN], batch["t5_mask"])
        assert not t5[:, TEXT_LEN:].any() and not mask[:, TEXT_LEN:].any()


def test_spatial_weighting_changes_the_main_loss(tmp_path):
    plain = make_trainer(tmp_path / "a").train_step(first_batch())["main"]
    weighted = make_trainer(tmp_path / "b", use_spatial_weighting=True).train_step(first_batch())["main"]
    assert not torch.isclose(plain, weighted)
    # A uniform Sol map weighs every token 1 (weights have mean 1): exactly the plain loss.
    uniform = first_batch()
    uniform["sol_spatial"] = torch.full_like(uniform["sol_spatial"], 1 / 64)
    flat = make_trainer(tmp_path / "c", use_spatial_weighting=True).train_step(uniform)["main"]
    torch.testing.assert_close(flat, plain)


def test_a_cache_that_does_not_fit_the_model_fails_clearly(tmp_path):
    trainer = make_trainer(tmp_path)
    batch = first_batch()
    batch["t5_embeds"] = batch["t5_embeds"][:, :, :1]
    batch["lune"] = batch["lune"][..., :32]
    trainer.dataloader = EpochLoader([batch], lambda: trainer.progress)
    with pytest.raises(BatchMismatchError) as e:
        trainer.train()
    assert "t5_layers" in str(e.value) and "lune_expert_dim" in str(e.value) and "Rebuild the cache" in str(e.value)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "adafactor"])
def test_each_optimizer_trains(tmp_path, name):
    data = SyntheticCache(8)
    trainer = make_trainer(tmp_path, data, optimizer=name, total_steps=6, learning_rate=3e-3, warmup_steps=0)
    before = eval_loss(trainer.model, data)
    trainer.train(epochs=None)
    assert eval_loss(trainer.model, data) < before
    assert len(trainer.optimizer.state_dict()["state"]) > 0


def test_adamw_8bit_without_bitsandbytes_says_what_to_do(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(OptimizerUnavailableError, match="pip install .*bitsandbytes.*or use optimizer='adamw'"):
        build_optimizer(TinyFluxDeep(TINY).parameters(), config(tmp_path, optimizer="adamw_8bit"))


@pytest.mark.parametrize(
    ("scheduler", "warmup_type", "expected"),
    [
        ("cosine", "linear", {0: 0.0, 2: 0.5, 4: 1.0, 14: 0.55, 24: 0.1}),
        ("linear", "linear", {0: 0.0, 4: 1.0, 14: 0.55, 24: 0.1}),
        ("constant", "cosine", {0: 0.0, 1: 0.5 * (1 - math.cos(math.pi / 4)), 4: 1.0, 24: 1.0}),
    ],
)
def test_each_lr_schedule_and_warmup(tmp_path, scheduler, warmup_type, expected):
    cfg = config(tmp_path, lr_scheduler=scheduler, warmup_type=warmup_type, warmup_steps=4, total_steps=24, min_lr=2e-4)
    optimizer = build_optimizer(TinyFluxDeep(TINY).parameters(), cfg)
    schedule = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(25):
        lrs.append(schedule.get_last_lr()[0] / cfg.learning_rate)
        optimizer.step()
        schedule.step()
    for step, value in expected.items():
        assert lrs[step] == pytest.approx(value, abs=1e-6), step


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    grads = []
    for flag in (False, True):
        trainer = make_trainer(tmp_path / str(flag), gradient_checkpointing=flag)
        assert trainer.model.gradient_checkpointing is flag
        trainer.train_step(first_batch())["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_compile_mode_compiles_each_block_in_place(tmp_path):
    trainer = make_trainer(tmp_path, compile_mode="default")
    blocks = [*trainer.model.double_blocks, *trainer.model.single_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert trainer.model._compiled_call_impl is None  # regional: the model itself stays eager
    assert trainer.model._compiled_prologue is not None  # its once-per-forward prologue is one more region
    assert "double_blocks.0.attn.img_qkv.weight" in trainer.model.state_dict()  # names unchanged


def test_compile_scope_model_compiles_the_whole_forward_as_one_region(tmp_path):
    trainer = make_trainer(tmp_path, compile_mode="default", compile_scope="model")
    assert trainer.model._compiled_call_impl is not None
    blocks = [*trainer.model.double_blocks, *trainer.model.single_blocks]
    assert all(block._compiled_call_impl is None for block in blocks)
    assert trainer.model._compiled_prologue is None  # traced inside the one graph
    assert "double_blocks.0.attn.img_qkv.weight" in trainer.model.state_dict()  # names unchanged
    with pytest.raises(TrainerConfigError, match=r"compile_scope='fast': choose one of \['blocks', 'model'\]"):
        config(tmp_path, compile_mode="default", compile_scope="fast")
    with pytest.raises(TrainerConfigError, match="compile_scope='model' without compile_mode"):
        config(tmp_path, compile_scope="model")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_model_compiled_whole_computes_the_eager_losses_and_gradients(tmp_path, checkpointing):
    """One graph for the whole forward (compile_scope="model"), through AOTAutograd (aot_eager: the graphs inductor
    would compile, run by eager kernels, so no C++ build), with text padded to a bucket, teacher dropout and masks."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = TinyFluxDeep(TINY)
        perturb(model)
        if compiled:
            assert compile_model(model, "default", "model", backend="aot_eager") == 1
        trainer = Trainer(model, config(tmp_path / str(compiled), gradient_checkpointing=checkpointing))
        trainer.setup(torch.utils.data.DataLoader(SyntheticCache(), batch_size=4, collate_fn=collate))
        parts = trainer.train_step(first_batch())
        parts["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in parts.items()}, grads))
    (eager, eager_grads), (whole, whole_grads) = results
    assert eager.keys() == {"loss", "main", "lune", "sol"} and whole == pytest.approx(eager, rel=1e-5)
    assert eager_grads.keys() == whole_grads.keys() and len(eager_grads) > 100
    for name, grad in eager_grads.items():
        torch.testing.assert_close(whole_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_backend_reaches_the_model_and_flex_is_refused_on_the_cpu(tmp_path):
    assert make_trainer(tmp_path / "sdpa").model.attention_backend == "sdpa"
    with pytest.raises(TrainerConfigError, match="attention_backend='flex' cannot train on the CPU"):
        make_trainer(tmp_path / "flex", attention_backend="flex")
    with pytest.raises(TrainerConfigError, match="attention_backend='flash'"):
        config(tmp_path, attention_backend="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no CPU backward")
def test_flex_attention_trains_like_sdpa_on_a_gpu(tmp_path):
    weights = {}
    for backend in ("sdpa", "flex"):
        trainer = make_trainer(tmp_path / backend, attention_backend=backend, total_steps=2)
        trainer.train(epochs=None)
        weights[backend] = params(trainer.model)
    for name, value in weights["sdpa"].items():
        torch.testing.assert_close(weights["flex"][name], value, atol=1e-4, rtol=1e-3)


def test_bf16_mixed_precision_on_cpu_trains(tmp_path):
    trainer = make_trainer(tmp_path, dtype="bfloat16", total_steps=2)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train(epochs=None)
    assert trainer.progress.nan_steps == 0
    assert next(trainer.model.parameters()).dtype == torch.float32  # float32 master weights


def test_sample_grids_every_n_steps_from_the_ema(tmp_path, tiny_zoo):
    from tinyflux.sampling.sampler import Sampler

    trainer = make_trainer(
        tmp_path,
        total_steps=4,
        sample_every=2,
        sample_prompts=["a red cube", "a blue sphere"],
        sample_steps=2,
        sample_size=4,
        sample_dir=str(tmp_path / "samples"),
        log_with="tensorboard",
    )
    trainer.sampler = Sampler(tiny_zoo, trainer.model, trainer.ema, device="cpu", dtype=torch.float32)
    trainer.train(epochs=None)
    grids = sorted(p.name for p in (tmp_path / "samples").glob("grid_*.png"))
    assert grids == ["grid_step0000002.png", "grid_step0000004.png"]
    assert Image.open(next((tmp_path / "samples").glob("step0000004_000_*.png"))).size == (32, 32)  # 8 x sample_size
    assert trainer.model.training  # back in train mode, with the training weights (not the EMA) in place
    assert any(not torch.equal(trainer.ema.shadow[n], p) for n, p in trainer.model.named_parameters())


def test_a_forward_that_cannot_be_one_graph_names_the_setting_and_the_way_out(tmp_path):
    model = TinyFluxDeep(TINY)
    model.register_forward_pre_hook(lambda *_: time.perf_counter())  # a builtin dynamo cannot put in a graph
    compile_model(model, "default", "model", backend=CompileCounter())
    trainer = Trainer(model, config(tmp_path))
    trainer.setup(torch.utils.data.DataLoader(SyntheticCache(), batch_size=4, collate_fn=collate))
    with pytest.raises(TrainerConfigError, match=r"compile_scope='model' needs the whole forward as one graph.*"
                       r"Use compile_scope='blocks'") as caught:  # fmt: skip
        trainer.train_step(first_batch())
    assert isinstance(caught.value.__cause__, torch._dynamo.exc.Unsupported)
    # the validation pass, which a run takes first (step 0), says the same
    samples = [{**SyntheticCache()[i], "caption": "", "key": f"s{i}"} for i in range(2)]  # as read_samples gives
    validator = Validator(samples, batch_size=2, timesteps=1)
    with pytest.raises(TrainerConfigError, match=r"compile_scope='model' needs the whole forward as one graph"):
        validator.evaluate(trainer)


def test_a_model_compiled_whole_draws_its_sample_grids_eager(tmp_path, tiny_zoo):
    """Each sample shape and CFG batch would be a new whole-model graph (minutes at `deep`): the grids run eager, so
    the run compiles only its training graph. The counting backend: dynamo's graphs, no inductor build."""
    from tinyflux.sampling.sampler import Sampler

    trainer = make_trainer(tmp_path, total_steps=4, sample_every=2, sample_steps=2, sample_size=4,
                           sample_dir=str(tmp_path / "samples"))  # fmt: skip
    counter = CompileCounter()
    compile_model(trainer.model, "default", "model", backend=counter)  # in place: the prepared model is the model
    trainer.sampler = Sampler(tiny_zoo, trainer.model, trainer.ema, device="cpu", dtype=torch.float32)
    trainer.train(epochs=None)
    assert len(list((tmp_path / "samples").glob("grid_*.png"))) == 2
    assert counter.frame_count == 1  # the training step's graph; the grids' no_grad, CFG-sized calls compiled none


def _dataset_cache(data: SyntheticCache, teachers: bool) -> DatasetCache:
    encodings = EncodingCache(data.latents, data.t5, data.pooled, torch.float32)
    if not teachers:
        return DatasetCache(encodings)
    lune = LuneFeatureCache(data.lune, T_BUCKETS, torch.float32)
    return DatasetCache(encodings, lune, SolFeatureCache(data.sol_stats, data.sol_spatial, T_BUCKETS, torch.float32))


@pytest.mark.parametrize("source", ["multi_source_cache", "mixed_batch"])
def test_rows_without_teacher_features_are_neither_forced_nor_distilled(tmp_path, source):
    """Two datasets, one with Lune / Sol features and one without: the teacher features come from the batch (the
    collate of mixed samples marks the real rows) or from a MultiSourceCache given to setup."""
    with_teachers, without = SyntheticCache(4, seed=1), SyntheticCache(4, seed=2, teachers=False)
    trainer = make_trainer(tmp_path, lune_dropout=0.0, sol_dropout=0.0, use_spatial_weighting=True)
    samples = [CachedDataset(_dataset_cache(with_teachers, True), 0)[i] for i in (0, 1)]
    samples += [CachedDataset(_dataset_cache(without, False), 1)[i] for i in (0, 1)]
    if source == "multi_source_cache":
        samples = [{k: v for k, v in s.items() if k not in ("lune", "sol_stats", "sol_spatial")} for s in samples]
        trainer.cache = MultiSourceCache().add(_dataset_cache(with_teachers, True), 0)
        trainer.cache.add(_dataset_cache(without, False), 1)
    batch = collate_fn(samples)
    assert ("lune_mask" in batch) == (source == "mixed_batch")
    seen = forward_kwargs(trainer, batch)
    assert seen["lune_mask"].tolist() == [True, True, False, False] == seen["sol_mask"].tolist()
    t = seen["args"][3]
    expected = interpolate_buckets(with_teachers.lune[:2], T_BUCKETS, t[:2])
    torch.testing.assert_close(seen["lune_features"][:2], expected)
    parts = trainer.train_step(batch)
    assert parts["lune"] > 0 and parts["sol"] > 0 and torch.isfinite(parts["main"])


def test_the_main_loss_is_the_configured_one(tmp_path):
    """v target = data - noise at x_t = (1-t) noise + t data, with the draws the trainer made; Huber / MSE and min-SNR
    as configured; lune_mode picks the Lune loss."""
    import torch.nn.functional as F

    from tinyflux.trainer.batch import step_draws
    from tinyflux.trainer.losses import min_snr_weight

    batch = first_batch()
    for huber, snr, mode in [(False, False, "mse"), (True, True, "cosine")]:
        trainer = make_trainer(
            tmp_path / f"{huber}", use_huber_loss=huber, use_snr_weighting=snr, huber_delta=0.2, snr_gamma=2.0,
            lune_mode=mode, lune_dropout=0.0,
        )  # fmt: skip
        perturb(trainer.model)
        outputs: dict = {}
        handle = trainer.model.register_forward_hook(lambda m, a, out, into=outputs: into.update(v=out[0], e=out[1]))
        parts = trainer.train_step(batch)
        handle.remove()
        t, noise, _ = step_draws(batch["latents"], trainer.config, micro_step=0)
        error = outputs["v"] - pack_latents(batch["latents"] - noise)  # (B, N, C)
        per_sample = F.huber_loss(error, torch.zeros_like(error), delta=0.2, reduction="none") if huber else error**2
        per_sample = per_sample.mean((1, 2)) * (min_snr_weight(t, 2.0) if snr else 1.0)
        torch.testing.assert_close(parts["main"], per_sample.mean())
        teacher = interpolate_buckets(batch["lune"], T_BUCKETS, t)
        pred = outputs["e"]["lune_pred"]
        lune = (pred - teacher).square().mean() if mode == "mse" else (1 - F.cosine_similarity(pred, teacher)).mean()
        torch.testing.assert_close(parts["lune"], lune)


def test_disabled_teachers_are_not_used(tmp_path):
    trainer = make_trainer(tmp_path, enable_lune=False, enable_sol=False)
    seen = forward_kwargs(trainer, first_batch())
    assert seen["lune_features"] is None and seen["sol_stats"] is None and seen["sol_spatial"] is None
    assert set(trainer.train_step(first_batch())) == {"loss", "main"}


def test_timestep_draws_follow_shift_logit_normal_and_seed(tmp_path):
    from tinyflux.trainer.batch import step_draws

    latents = torch.zeros(4000, 1, 1, 1)

    def mean_t(**overrides) -> float:
        return step_draws(latents, config(tmp_path, **overrides), micro_step=0)[0].mean().item()

    uniform = mean_t(logit_normal_sampling=False, shift=1.0)
    assert abs(uniform - 0.5) < 0.02
    assert mean_t(logit_normal_sampling=False, shift=3.0) < uniform - 0.1  # shift > 1: more samples near noise
    assert abs(mean_t(shift=1.0) - 0.5) < 0.02 and mean_t(shift=1.0, logit_mean=1.0) < 0.4  # sigma = sigmoid(N(m, s))
    narrow = step_draws(latents, config(tmp_path, shift=1.0, logit_std=0.1), micro_step=0)[0]
    assert narrow.std() < 0.05
    t0 = step_draws(latents[:8], config(tmp_path), micro_step=0)[0]
    assert not torch.equal(t0, step_draws(latents[:8], config(tmp_path, seed=1), micro_step=0)[0])
    assert not torch.equal(t0, step_draws(latents[:8], config(tmp_path), micro_step=1)[0])
    # two processes with 4 rows each draw what one process with 8 rows draws
    halves = [step_draws(latents[:4], config(tmp_path), 0, rank=r, world_size=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), t0)


def test_ema_follows_decay_every_and_warmup(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=4, ema_decay=0.5, ema_every=2, ema_warmup=True)
    before = {n: s.clone() for n, s in trainer.ema.shadow.items()}
    trainer.train(epochs=None, max_steps=2)
    assert trainer.ema.num_updates == 1 and trainer.ema.warmup
    decay = min(0.5, 1 / 10)  # warmup: min(ema_decay, (1 + n) / (10 + n)) at update n = 0
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(trainer.ema.shadow[name], decay * before[name] + (1 - decay) * p.detach())
    trainer.train(epochs=None)
    assert trainer.ema.num_updates == 2


@pytest.mark.parametrize("clip", [1e-3, 0.0])
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_grad_clip_bounds_the_gradient_norm(tmp_path, optimizer, clip):
    """adamw: the fused step clips as it reads the gradients (clip_in_fused_step), leaving them clipped in place;
    adafactor: accelerate's clip_grad_norm_ before the step. Either way the step uses gradients of norm grad_clip."""
    trainer = make_trainer(tmp_path, total_steps=2, grad_clip=clip, optimizer=optimizer)
    assert trainer._verdicts.deferred == (optimizer == "adamw")
    params = trainer.model.get_trainable_parameters()
    norms = []

    def grad_norm() -> float:
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()

    inner = torch_optimizer(trainer.optimizer)
    inner.register_step_pre_hook(lambda *_: norms.append([grad_norm()]))
    inner.register_step_post_hook(lambda *_: norms[-1].append(grad_norm()))
    trainer.train(epochs=None)
    assert not hasattr(inner, "grad_scale") and not hasattr(inner, "found_inf")  # no scale outlives train()
    assert len(norms) == 2
    for before, after in norms:
        if not clip:
            assert after == pytest.approx(before, rel=1e-6) and after > 1e-3
        elif optimizer == "adamw":  # raw before the step, clipped by it
            assert before > clip and after == pytest.approx(clip, rel=1e-3)
        else:  # clipped before the step
            assert before == pytest.approx(clip, rel=1e-3)


def test_clip_in_fused_step_runs_where_the_device_has_no_foreach_kernels():
    """MPS has fused AdamW but no foreach kernels (nor has `meta`, which stands in for it here): the norm falls back to
    one norm a tensor, as clip_grad_norm_ does, instead of raising."""
    param = nn.Parameter(torch.ones(3, device="meta"))
    param.grad = torch.ones(3, device="meta")
    optimizer = torch.optim.AdamW([param], fused=True)
    norm = clip_in_fused_step(optimizer, [param], 1.0)
    assert norm.shape == () and norm.device.type == "meta" and optimizer.grad_scale.shape == ()


def test_clip_in_fused_step_updates_as_clip_grad_norm_does():
    torch.manual_seed(0)
    for max_norm in (0.5, 1e3, None):
        a, b = (nn.Linear(8, 4) for _ in range(2))
        b.load_state_dict(a.state_dict())
        opt_a, opt_b = (torch.optim.AdamW(m.parameters(), lr=0.1, fused=True) for m in (a, b))
        for _ in range(3):
            x = torch.randn(16, 8)
            for m in (a, b):
                m.zero_grad()
                m(x).square().sum().backward()
            expected = torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm or math.inf)
            opt_a.step()
            norm = clip_in_fused_step(opt_b, list(b.parameters()), max_norm)
            opt_b.step()
            torch.testing.assert_close(norm, expected)
            for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
                torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=1e-8)  # clipped in place by the step
        assert max_norm is None or (expected > max_norm) == (max_norm == 0.5)


def test_optimizer_gets_lr_betas_and_decays_matrices_only(tmp_path):
    cfg = config(tmp_path, betas=(0.8, 0.95), weight_decay=0.05)
    optimizer = build_optimizer(TinyFluxDeep(TINY).parameters(), cfg)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in plain["params"])
    assert decayed["betas"] == (0.8, 0.95) and decayed["lr"] == cfg.learning_rate


def test_float16_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("float16 runs on this machine's GPU")
    with pytest.raises(TrainerConfigError, match="float16 needs a CUDA GPU"):
        Trainer(TinyFluxDeep(TINY), config(tmp_path, dtype="float16"))


def test_flops_and_mfu_arithmetic():
    from tinyflux.trainer.metrics import flops_per_sample, mfu

    # 6 * P * S + 12 * layers * hidden * S^2 with P=100, S=3+1, 2 layers of width 8
    assert flops_per_sample(100, 3, 1, 2, 8) == 6 * 100 * 4 + 12 * 2 * 8 * 16
    assert mfu(1e12, 2.0, 2, 1.0) == pytest.approx(1.0)  # 2 TFLOP/s over 2 devices of 1 TFLOP/s peak


def test_cuda_graph_compile_modes_are_refused_where_parameters_move_every_step(caplog):
    with pytest.raises(TrainerConfigError, match="'reduce-overhead' records CUDA graphs.* fsdp2 gathers"):
        check_compile_mode("reduce-overhead", Engine("fsdp2"))
    with pytest.raises(TrainerConfigError, match="'max-autotune-no-cudagraphs'"):
        check_compile_mode("max-autotune", Engine("deepspeed", zero_stage=3))
    with caplog.at_level("WARNING", logger="tinyflux.trainer.runtime"):
        check_compile_mode("max-autotune-no-cudagraphs", Engine("fsdp2"))  # no graphs
        check_compile_mode("default", Engine("deepspeed", zero_stage=3))
        assert not caplog.records
        check_compile_mode("reduce-overhead", Engine("ddp"))
    assert "each new length records new graphs" in caplog.text


def test_the_whole_model_scope_is_refused_where_an_engine_hooks_each_block():
    for engine in (Engine("fsdp2"), Engine("deepspeed", zero_stage=2), Engine("deepspeed", zero_stage=3)):
        with pytest.raises(TrainerConfigError, match="compile_scope='model' compiles the whole forward as one graph"):
            check_compile_mode("default", engine, "model")
    for engine in (Engine("single"), Engine("ddp")):
        check_compile_mode("default", engine, "model")


def test_the_accelerator_gets_the_collective_timeout_non_blocking_batches_and_no_cudnn_attention():
    torch.backends.cuda.enable_cudnn_sdp(True)
    accelerator = make_accelerator(TrainerConfig(dtype="float32", log_with="none", ddp_timeout=2400))
    assert accelerator.init_handler.timeout == timedelta(seconds=2400)
    assert accelerator.dataloader_config.non_blocking
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(TrainerConfigError, match="ddp_timeout=0 must be >= 1"):
        TrainerConfig(ddp_timeout=0)
