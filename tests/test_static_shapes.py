"""Static shapes: text padded to a few bucket lengths (TrainerConfig.text_buckets) changes no output, and a compiled
step over captions of every length compiles once per bucket at most, and never after warm-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from tests.trainer_helpers import TINY, SyntheticCache, collate, config, first_batch, perturb
from tinyflux.cache.format import T_BUCKETS
from tinyflux.cache.loaders import make_stream_loader
from tinyflux.cache.memory import DatasetCache, EncodingCache, LuneFeatureCache, SolFeatureCache
from tinyflux.model.model import TinyFluxDeep, pack_latents
from tinyflux.trainer import trainer as trainer_module
from tinyflux.trainer.batch import pad_text
from tinyflux.trainer.config import TrainerConfigError
from tinyflux.trainer.runtime import compile_blocks, compile_model
from tinyflux.trainer.trainer import Trainer


@pytest.mark.parametrize(("length", "width"), [(6, 32), (32, 32), (33, 64), (128, 128), (129, 256), (300, 384)])
def test_text_pads_to_the_smallest_bucket_that_holds_it(length: int, width: int) -> None:
    t5, mask = torch.randn(2, length, 3, 4), torch.arange(length)[None].expand(2, -1) < torch.tensor([[length], [2]])
    padded, padded_mask = pad_text(t5, mask, [32, 64, 128])
    assert padded.shape == (2, width, 3, 4) and padded_mask.shape == (2, width)
    assert torch.equal(padded[:, :length], t5) and not padded[:, length:].any()
    assert torch.equal(padded_mask[:, :length], mask) and not padded_mask[:, length:].any()
    assert pad_text(t5, mask, []) == (t5, mask)


def test_text_buckets_must_increase(tmp_path: Path) -> None:
    with pytest.raises(TrainerConfigError, match=r"text_buckets=\[64, 32\] must be increasing"):
        config(tmp_path, text_buckets=[64, 32])


def test_padded_text_changes_neither_the_output_nor_the_losses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyFluxDeep(TINY).eval()
    perturb(model)  # zero-initialised layers would hide the text's way to the output
    batch = first_batch(n=4)
    b, t = 4, torch.tensor([0.2, 0.4, 0.6, 0.8])
    x = pack_latents(batch["latents"], TINY.patch_size)
    side = 8 // TINY.patch_size
    ids = TinyFluxDeep.create_img_ids(b, side, side, None)
    t5, mask = pad_text(batch["t5_embeds"], batch["t5_mask"], [32])
    assert t5.shape[1] == 32 and batch["t5_embeds"].shape[1] == 6
    with torch.no_grad():
        plain = model(x, batch["t5_embeds"], batch["clip_pooled"], t, ids, encoder_attention_mask=batch["t5_mask"])
        padded = model(x, t5, batch["clip_pooled"], t, ids, encoder_attention_mask=mask)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=0)
    assert (plain - padded).abs().max() < 1e-5 and plain.abs().max() > 1e-2

    losses, widths = [], []
    for buckets, compiled in (([], True), ([32], True), ([32], False)):
        torch.manual_seed(0)
        model = TinyFluxDeep(TINY)
        perturb(model)
        if compiled:  # the counting backend: dynamo's graphs run eagerly, no inductor build
            compile_blocks(model, "default", backend=CompileCounter())
        model.register_forward_pre_hook(lambda _, args: widths.append(int(args[1].shape[1])))
        trainer = Trainer(model, config(tmp_path / f"{buckets}{compiled}", text_buckets=buckets))
        trainer.setup(torch.utils.data.DataLoader(SyntheticCache(), batch_size=4, collate_fn=collate))
        losses.append({k: v.item() for k, v in trainer.train_step(batch).items()})
    assert widths == [6, 32, 6]  # padded only where blocks are compiled: eager steps gain nothing from it
    assert losses[0].keys() == losses[1].keys() == {"loss", "main", "lune", "sol"}
    for key in losses[0]:
        assert losses[1][key] == pytest.approx(losses[0][key], abs=1e-5)


def _varied_captions(out: Path, n: int) -> Path:
    """A shard cache of n tiny samples whose captions run 3..100 T5 tokens: every batch has a new longest one."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 101, (n,), generator=g)
    t5 = torch.randn(n, 100, TINY.num_t5_layers, TINY.t5_hidden_size, generator=g)
    t5[torch.arange(100)[None, :] >= lengths[:, None]] = 0
    encodings = EncodingCache(
        torch.randn(n, TINY.in_channels, 8, 8, generator=g),
        t5,
        torch.randn(n, TINY.pooled_projection_dim, generator=g),
        t5_lengths=lengths,
        captions=[f"caption {i}" for i in range(n)],
        keys=[f"s{i:04d}" for i in range(n)],
    )
    buckets = len(T_BUCKETS)
    spatial = torch.rand(n, buckets, 8, 8, generator=g)
    DatasetCache(
        encodings,
        LuneFeatureCache(torch.randn(n, buckets, TINY.lune_expert_dim, generator=g), T_BUCKETS),
        SolFeatureCache(
            torch.rand(n, buckets, 4, generator=g), spatial / spatial.sum((-1, -2), keepdim=True), T_BUCKETS
        ),
        "varied",
        settings={"t5_layers": list(TINY.t5_layers)},
    ).to_shards(out, shard_size=16)
    return out


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_a_compiled_run_over_every_caption_length_compiles_once_per_bucket_and_never_after_warm_up(
    tmp_path: Path, scope: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One caption a batch: each bucket comes up about a third of the time (with 4, nearly every batch's longest
    # would land in the largest bucket).
    steps, batch_size = 1000, 1
    torch.manual_seed(0)
    model = TinyFluxDeep(TINY)
    # torch's counting backend runs dynamo's graphs eagerly: whether a batch recompiles is decided by dynamo's guards
    # whatever the backend, and this skips inductor's C++ builds, which take minutes on a CPU
    counter = CompileCounter()
    regions = compile_model(model, "default", scope, backend=counter)
    # The probes stay outside the model: a hook on a model compiled whole would be traced into its graph.
    text_widths: set[int] = set()  # what the model (so every block) is given
    monkeypatch.setattr(trainer_module, "pad_text", lambda *a: _recorded(text_widths, pad_text(*a)))
    cfg = config(tmp_path, total_steps=steps, gradient_accumulation=1, batch_size=batch_size, log_every=50)
    trainer = Trainer(model, cfg)
    loader = make_stream_loader(_varied_captions(tmp_path / "cache", 64), batch_size=batch_size, rank=0, world_size=1)
    trainer.setup(loader)
    lengths: set[int] = set()
    compiled_by_step: list[int] = []
    original = trainer.train_step

    def step(batch: dict) -> dict:
        lengths.add(int(batch["t5_embeds"].shape[1]))
        parts = original(batch)
        compiled_by_step.append(counter.frame_count)
        return parts

    trainer.train_step = step  # records each batch's longest caption; the step itself is the Trainer's
    trainer.train(epochs=None)
    assert trainer.progress.step == steps and len(compiled_by_step) == steps
    assert len(lengths) > 40  # unpadded, most batches would be a new shape
    assert text_widths == {32, 64, 128} == {next(n for n in cfg.text_buckets if n >= length) for length in lengths}
    if scope == "blocks":
        block_types = {
            type(b) for blocks in model.children() if isinstance(blocks, torch.nn.ModuleList) for b in blocks
        }
        assert regions == len(model.double_blocks) + len(model.single_blocks) + 1  # and the prologue
        assert model._compiled_prologue is not None
        regions = len(block_types) + 1  # a list's blocks share their code: one compilation serves them all
    else:
        assert regions == 1 and model._compiled_call_impl is not None and model._compiled_prologue is None
    assert 0 < counter.frame_count <= len(cfg.text_buckets) * regions
    warm = next(i for i, n in enumerate(compiled_by_step) if n == counter.frame_count)
    assert warm < 20 and compiled_by_step[-1] == counter.frame_count  # nothing after warm-up


def _recorded(widths: set[int], padded: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    widths.add(int(padded[0].shape[1]))
    return padded
