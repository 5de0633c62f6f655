"""LoRA on peft: the flags and the JSON file become peft's per-module settings and the optimizer's groups; the base
stays frozen with no optimizer state; the EMA, the checkpoints and the resume hold the adapter only; the adapter files
load with peft's own PeftModel; gradient checkpointing and block compile train it as eager does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from tests.trainer_helpers import TINY, SyntheticCache, config, first_batch, loader
from tinyflux.model.loader import save_model
from tinyflux.model.model import TinyFluxDeep, pack_latents
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer.args import ArgsError, parse_args
from tinyflux.trainer.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    LoraConfigError,
    LoraSpec,
    expand_ranges,
)
from tinyflux.trainer.trainer import Trainer
from tinyflux.trainer.trainer_checkpointing import LORA_EMA_DIR

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
LATE_ATTENTION = r"single_blocks\.[0-1]\.attn\.(qkv|out_proj)"


def base_model(seed: int = 0) -> TinyFluxDeep:
    """The tiny preset with every weight moved off its init: a fresh model's zero gates and zero output layer would
    give every adapter a zero gradient (a LoRA fine-tunes a trained network, never a fresh one)."""
    torch.manual_seed(seed)
    model = TinyFluxDeep(TINY)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def lora_trainer(tmp_path: Path, seed: int = 0, **overrides) -> Trainer:
    values = {"lora_rank": 4, "weight_decay": 0.0, **overrides}
    trainer = Trainer(base_model(seed), config(tmp_path, **values))
    trainer.setup(loader(SyntheticCache(), shuffle=False))
    return trainer


def forward(model: torch.nn.Module, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = pack_latents(torch.randn(2, TINY.in_channels, 8, 8, generator=g))
    t5 = torch.randn(2, 6, TINY.num_t5_layers, TINY.t5_hidden_size, generator=g)
    pooled = torch.randn(2, TINY.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return model(x, t5, pooled, torch.tensor([0.3, 0.8]), TinyFluxDeep.create_img_ids(2, 8, 8))


def write_json(path: Path, values: dict) -> str:
    path.write_text(json.dumps(values))
    return str(path)


def test_json_config_maps_to_peft_patterns_dropout_and_optimizer_groups(tmp_path):
    lora_json = write_json(
        tmp_path / "lora.json",
        {
            "defaults": {"rank": 4, "alpha": 8, "dropout": 0.0, "lr_scale": 1.0},
            "targets": LATE_ATTENTION,
            "patterns": {
                r"single_blocks\.1\.attn\..*": {"rank": 8, "alpha": 4, "lr_scale": 3.0, "dropout": 0.25},
                r"single_blocks\.0\.attn\.out_proj": {"enabled": False},
            },
        },
    )
    trainer = lora_trainer(tmp_path, lora_rank=None, lora_config=lora_json, learning_rate=1e-3, warmup_steps=0)
    model = trainer.model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == ["single_blocks.0.attn.qkv", "single_blocks.1.attn.out_proj", "single_blocks.1.attn.qkv"]
    qkv0, qkv1 = layers["single_blocks.0.attn.qkv"], layers["single_blocks.1.attn.qkv"]
    assert qkv0.lora_A["default"].weight.shape[0] == 4 and qkv0.scaling["default"] == 8 / 4
    assert qkv1.lora_A["default"].weight.shape[0] == 8 and qkv1.scaling["default"] == 4 / 8
    assert isinstance(qkv0.lora_dropout["default"], torch.nn.Identity)
    assert qkv1.lora_dropout["default"].p == 0.25
    peft_config = model.peft_config["default"]
    assert peft_config.r == 4 and peft_config.lora_alpha == 8
    assert set(peft_config.rank_pattern.values()) == {8} and len(peft_config.rank_pattern) == 2
    # Only the adapters train; the layer-1 ones at 3x the learning rate, in groups of their own.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    lrs = sorted((g["lr"], len(g["params"])) for g in trainer.optimizer.param_groups if g["params"])
    assert lrs == [(pytest.approx(1e-3), 2), (pytest.approx(3e-3), 4)]


def test_numeric_ranges_and_bad_specs_fail_with_what_to_fix(tmp_path):
    late = re_full(expand_ranges(r"single_blocks\.[20-24]\.attn\.qkv"))
    assert late("single_blocks.20.attn.qkv") and late("single_blocks.24.attn.qkv")
    assert not late("single_blocks.3.attn.qkv") and not late("single_blocks.25.attn.qkv")

    def spec(**values) -> LoraSpec:
        return LoraSpec.from_trainer_config(config(tmp_path, lora_config=write_json(tmp_path / "l.json", values)))

    with pytest.raises(LoraConfigError, match=r"unknown key\(s\) \['rnak'\]"):
        spec(defaults={"rnak": 4})
    with pytest.raises(LoraConfigError, match="rank=0 must be an integer >= 1"):
        spec(defaults={"rank": 0})
    with pytest.raises(LoraConfigError, match="not a valid regular expression"):
        spec(targets="single_blocks.(")
    with pytest.raises(LoraConfigError, match="fully match no nn.Linear"):
        spec(targets=r"single_blocks\.7\.attn\.qkv").resolve(TinyFluxDeep(TINY))
    with pytest.raises(LoraConfigError, match="fully matches none of the 4 targeted layers"):
        spec(targets=LATE_ATTENTION, patterns={"double_blocks.*": {"rank": 2}}).resolve(TinyFluxDeep(TINY))
    with pytest.raises(LoraConfigError, match="every targeted layer is disabled"):
        spec(targets=LATE_ATTENTION, patterns={".*": {"enabled": False}}).resolve(TinyFluxDeep(TINY))
    with pytest.raises(ArgsError, match="lora_alpha set without lora_rank or lora_config"):
        parse_args(["--cache", str(tmp_path), "--model", "tiny", "--lora_alpha", "4"])
    args = parse_args(["--model", "tiny", "--lora_rank", "4", "--lora_targets", LATE_ATTENTION, "--lora_alpha", "2"])
    assert (args.trainer.lora_rank, args.trainer.lora_alpha, args.trainer.lora_targets) == (4, 2.0, LATE_ATTENTION)


def re_full(pattern: str):
    import re

    return lambda name: re.fullmatch(pattern, name) is not None


def test_base_stays_frozen_ema_and_checkpoint_hold_the_adapter_and_peft_loads_it(tmp_path):
    trainer = lora_trainer(tmp_path, total_steps=4, save_every_steps=2)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train(epochs=None)
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)
    adapters = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(p.abs().sum() > 0 for p in adapters)  # lora_B (zero-init) moved too
    # Optimizer state exists for the adapter parameters only; the EMA shadows them and nothing else.
    assert {id(p) for p in trainer.optimizer.state} == {id(p) for p in adapters}
    assert set(trainer.ema.shadow) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainer.ema.buffers == {}

    final = trainer.last_checkpoint
    files = {p.name for p in final.iterdir()}
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, ckpt.EMA_WEIGHTS, "optimizer.bin", LORA_EMA_DIR} <= files
    assert "model.safetensors" not in files  # no base weights in a LoRA checkpoint
    full = save_model(base_model(), tmp_path / "full").stat().st_size
    adapter_bytes = (
        sum(p.stat().st_size for p in final.rglob("*.safetensors")) + (final / "optimizer.bin").stat().st_size
    )
    assert adapter_bytes < 0.5 * full  # adapter + its EMA (x2) + Adam moments: 4 small copies
    assert all(k.startswith(PEFT_PREFIX) for k in load_file(str(final / ADAPTER_WEIGHTS)))

    # peft loads the adapter as it is and computes what the trained model computes ...
    trained = forward(trainer.model.eval())
    loaded = PeftModel.from_pretrained(base_model(), str(final))
    torch.testing.assert_close(forward(loaded), trained, rtol=0, atol=1e-6)
    # ... and so does set_peft_model_state_dict into a freshly wrapped base
    fresh = PeftModel.from_pretrained(base_model(), str(tmp_path / "checkpoints" / "step_0000002"))
    set_peft_model_state_dict(fresh, load_file(str(final / ADAPTER_WEIGHTS)))
    torch.testing.assert_close(forward(fresh), trained, rtol=0, atol=1e-6)
    # the EMA adapter (peft's format too) is the trainer's EMA, not the raw weights
    ema_model = PeftModel.from_pretrained(base_model(), str(final / LORA_EMA_DIR))
    trainer.ema.apply_shadow(trainer.model)
    torch.testing.assert_close(forward(ema_model), forward(trainer.model), rtol=0, atol=1e-6)
    trainer.ema.restore(trainer.model)
    assert not torch.allclose(forward(ema_model), trained)


def test_resume_restores_adapter_optimizer_and_ema_exactly(tmp_path):
    straight = lora_trainer(tmp_path / "straight", total_steps=4, save_every_steps=2)
    straight.train(epochs=None)
    half = tmp_path / "straight" / "checkpoints" / "step_0000002"
    resumed = lora_trainer(tmp_path / "resumed", total_steps=4, resume=str(half))
    assert resumed.current_step == 2
    resumed.train(epochs=None)
    for name, p in straight.model.named_parameters():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[name], p, rtol=0, atol=0)
    for name, shadow in straight.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[name], shadow, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_adapter_the_same_gradients(tmp_path):
    grads = []
    for flag in (False, True):
        trainer = lora_trainer(tmp_path / str(flag), gradient_checkpointing=flag)
        trainer.train_step(first_batch())["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.slow
def test_block_compile_trains_the_adapter_as_eager_does(tmp_path):
    """Each block compiled with its LoRA layers in it (regional compile after injection): the same losses and
    adapter weights as eager over two steps."""
    runs = {}
    for mode in (None, "default"):
        trainer = lora_trainer(tmp_path / str(mode), compile_mode=mode, total_steps=2)
        trainer.train(epochs=None)
        runs[mode] = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    blocks = [*trainer.model.double_blocks, *trainer.model.single_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    for name, value in runs[None].items():
        torch.testing.assert_close(runs["default"][name], value, rtol=1e-4, atol=1e-6)
