"""Converting the original TinyFlux's caches (both layouts) into shards, read back exactly; unsafe files refused."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from tinyflux.cache.convert import convert_original_cache, main
from tinyflux.cache.format import (
    T_BUCKETS,
    CacheFormatError,
    CacheMismatchError,
    check_compatible,
    load_manifest,
)
from tinyflux.cache.loaders import make_stream_loader
from tinyflux.cache.memory import DatasetCache
from tinyflux.model.config import TinyFluxConfig

# The original's buckets, as its get_t_buckets made them (not bit-equal to our linspace)
ORIGINAL_BUCKETS = torch.tensor([0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95])
DEEP = TinyFluxConfig.preset("deep")


class Payload:
    """An arbitrary class: a file that pickles one must not be loaded (unpickling could run its code)."""


def original_tensors(n: int, seed: int) -> dict[str, dict]:
    """One part of an original cache at the released widths (8x8 latents = 64 px), fp16 as the original stored it."""
    g = torch.Generator().manual_seed(seed)
    spatial = torch.rand(n, 10, 8, 8, generator=g)
    return {
        "encodings": {
            "latents": torch.randn(n, 16, 8, 8, generator=g).half(),
            "t5_embeds": torch.randn(n, 128, 768, generator=g).half(),
            "clip_pooled": torch.randn(n, 768, generator=g).half(),
            "prompts": [f"prompt {seed} {i}" for i in range(n)],
            "dtype": torch.float16,
        },
        "lune": {
            "features": torch.randn(n, 10, 1280, generator=g).half(),
            "t_buckets": ORIGINAL_BUCKETS.clone(),
            "dtype": torch.float16,
        },
        "sol": {
            "stats": torch.rand(n, 10, 3, generator=g).half(),
            "spatial": (spatial / spatial.sum(dim=(-2, -1), keepdim=True)).half(),
            "t_buckets": ORIGINAL_BUCKETS.clone(),
            "dtype": torch.float16,
        },
    }


def write_single(root: Path, n: int = 5) -> dict[str, dict]:
    """The original's DatasetCache.save layout: encodings.pt, lune.pt, sol.pt, meta.pt."""
    root.mkdir(parents=True)
    parts = original_tensors(n, seed=0)
    for kind, data in parts.items():
        torch.save(data, root / f"{kind}.pt")
    torch.save({"name": "portraits"}, root / "meta.pt")
    return parts


def write_incremental(root: Path, sizes: tuple[int, ...] = (3, 2), completed: list[int] | None = None) -> list[dict]:
    """The original's build_incremental layout: state.json + encodings/ lune/ sol/ shard_NNNN.pt (shard_size 3)."""
    parts = [original_tensors(n, seed=10 + j) for j, n in enumerate(sizes)]
    for j, part in enumerate(parts):
        for kind, data in part.items():
            (root / kind).mkdir(parents=True, exist_ok=True)
            torch.save(data, root / kind / f"shard_{j:04d}.pt")
    state = {
        "name": "incr",
        "n_samples": sum(sizes),
        "shard_size": sizes[0],
        "build_lune": True,
        "build_sol": True,
        "completed_shards": list(range(len(sizes))) if completed is None else completed,
    }
    (root / "state.json").write_text(json.dumps(state))
    return parts


def concat(parts: list[dict], kind: str, key: str) -> torch.Tensor:
    return torch.cat([p[kind][key] for p in parts])


def test_single_layout_converts_every_tensor_exactly_with_the_buckets_reversed(tmp_path: Path) -> None:
    orig = write_single(tmp_path / "orig")
    manifest = convert_original_cache(tmp_path / "orig", tmp_path / "out", shard_size=2)

    assert (manifest.name, manifest.num_samples, len(manifest.shards)) == ("portraits", 5, 3)
    assert manifest.text_regime == "padded" and manifest.settings["text_regime"] == "padded"
    assert manifest.sol_stats_names == ["locality", "entropy", "clustering"]
    assert manifest.t5_layers == [12] and manifest.fields["t5_embeds"].shape == [None, 1, 768]
    assert manifest.fields["sol_stats"].shape == [10, 3] and manifest.fields["latents"].dtype == "float16"
    assert manifest.t_buckets == T_BUCKETS.tolist()  # 1 - reversed original buckets, snapped to ours
    assert manifest.resolution == 64 and manifest.t5_length_max == 128
    assert manifest.settings["latent_convention"].endswith("shift_factor not subtracted")
    assert manifest.settings["teacher_timestep"] == "(1 - t) * 1000"
    assert load_manifest(tmp_path / "out") == manifest

    cache = DatasetCache.from_shards(tmp_path / "out")
    enc, lune, sol = orig["encodings"], orig["lune"], orig["sol"]
    assert torch.equal(cache.encodings.latents, enc["latents"])
    assert torch.equal(cache.encodings.t5_embeds, enc["t5_embeds"].unsqueeze(2))  # (N, 128, K=1, 768), pads kept
    assert cache.encodings.t5_lengths.tolist() == [128] * 5
    assert torch.equal(cache.encodings.clip_pooled, enc["clip_pooled"])
    assert cache.encodings.captions == enc["prompts"]
    assert cache.encodings.keys == [f"{i:08d}" for i in range(5)]
    # our bucket i (t = 0.05 + 0.1 i) is the original's bucket 9 - i (teacher level (1 - t) * 1000 = its t_b * 1000)
    assert torch.equal(cache.lune.features, lune["features"].flip(1))
    assert torch.equal(cache.sol.stats, sol["stats"].flip(1))
    assert torch.equal(cache.sol.spatial, sol["spatial"].flip(1))
    assert torch.equal(cache.t_buckets, T_BUCKETS)

    check_compatible(manifest, DEEP)  # the released preset reads exactly this


def test_original_pairing_keeps_the_bucket_order(tmp_path: Path) -> None:
    orig = write_single(tmp_path / "orig", n=2)
    manifest = convert_original_cache(tmp_path / "orig", tmp_path / "out", pairing="original")
    cache = DatasetCache.from_shards(tmp_path / "out")
    assert torch.equal(cache.lune.features, orig["lune"]["features"])
    assert torch.equal(cache.sol.stats, orig["sol"]["stats"])
    assert torch.equal(cache.sol.spatial, orig["sol"]["spatial"])
    assert manifest.settings["teacher_timestep"] == "t * 1000 (the original's pairing)"
    assert manifest.t_buckets == T_BUCKETS.tolist()


def test_incremental_layout_streams_back_exactly(tmp_path: Path) -> None:
    parts = write_incremental(tmp_path / "orig")
    manifest = convert_original_cache(tmp_path / "orig", tmp_path / "out", shard_size=2)
    assert (manifest.name, manifest.num_samples, len(manifest.shards)) == ("incr", 5, 3)
    assert manifest.text_regime == "padded" and manifest.sol_stats_names == ["locality", "entropy", "clustering"]

    loader = make_stream_loader(
        tmp_path / "out", batch_size=5, seed=0, rank=0, world_size=1, model_config=DEEP, dtype=torch.float16
    )
    (batch,) = list(loader)
    order = [int(k) for k in batch["key"]]
    assert sorted(order) == list(range(5))
    assert torch.equal(batch["latents"], concat(parts, "encodings", "latents")[order])
    assert torch.equal(batch["t5_embeds"], concat(parts, "encodings", "t5_embeds")[order].unsqueeze(2))
    assert bool(batch["t5_mask"].all()) and batch["t5_mask"].shape == (5, 128)
    assert torch.equal(batch["clip_pooled"], concat(parts, "encodings", "clip_pooled")[order])
    assert torch.equal(batch["lune"], concat(parts, "lune", "features")[order].flip(1))
    assert torch.equal(batch["sol_stats"], concat(parts, "sol", "stats")[order].flip(1))
    assert torch.equal(batch["sol_spatial"], concat(parts, "sol", "spatial")[order].flip(1))
    prompts = [p for part in parts for p in part["encodings"]["prompts"]]
    assert batch["caption"] == [prompts[i] for i in order]
    assert torch.equal(batch["t_buckets"], T_BUCKETS)


def test_unfinished_incremental_build_is_refused_unless_partial(tmp_path: Path) -> None:
    parts = write_incremental(tmp_path / "orig", completed=[0])
    with pytest.raises(CacheFormatError, match=r"completed 1 of 2 shards \(missing \[1\]\).*--partial"):
        convert_original_cache(tmp_path / "orig", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    manifest = convert_original_cache(tmp_path / "orig", tmp_path / "out", partial=True)
    assert manifest.num_samples == 3
    cache = DatasetCache.from_shards(tmp_path / "out")
    assert torch.equal(cache.encodings.latents, parts[0]["encodings"]["latents"])


def test_pickled_objects_and_corrupt_files_are_refused_without_unpickling(tmp_path: Path) -> None:
    write_single(tmp_path / "evil")
    data = torch.load(tmp_path / "evil" / "sol.pt", weights_only=True)
    torch.save({**data, "extra": Payload()}, tmp_path / "evil" / "sol.pt")
    with pytest.raises(
        CacheFormatError,
        match=r"sol\.pt holds a tests\.test_cache_convert\.Payload object, which weights_only loading refuses",
    ):
        convert_original_cache(tmp_path / "evil", tmp_path / "out1")
    assert not (tmp_path / "out1").exists()

    write_single(tmp_path / "trunc")
    raw = (tmp_path / "trunc" / "encodings.pt").read_bytes()
    (tmp_path / "trunc" / "encodings.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CacheFormatError, match=r"encodings\.pt is truncated or corrupt") as err:
        convert_original_cache(tmp_path / "trunc", tmp_path / "out2")
    assert "\n" not in str(err.value)

    (tmp_path / "odd").mkdir()
    torch.save(OrderedDict(latents=torch.zeros(2, 16, 8, 8)), tmp_path / "odd" / "encodings.pt")
    with pytest.raises(CacheFormatError, match=r"lacks the tensors \['t5_embeds', 'clip_pooled'\]"):
        convert_original_cache(tmp_path / "odd", tmp_path / "out3")
    with pytest.raises(CacheFormatError, match="neither encodings.pt .* nor state.json"):
        convert_original_cache(tmp_path / "out3", tmp_path / "out4")


def test_check_compatible_refuses_more_sol_columns_and_another_text_regime(tmp_path: Path) -> None:
    write_single(tmp_path / "orig", n=2)
    manifest = convert_original_cache(tmp_path / "orig", tmp_path / "out")
    with pytest.raises(CacheMismatchError, match=r"sol_num_stats: .*expects 4; use a model with sol_num_stats=3 or"):
        check_compatible(manifest, DEEP.replace(sol_num_stats=4))
    check_compatible(manifest, DEEP.replace(sol_num_stats=2))  # the first 2 columns are there
    check_compatible(manifest, DEEP.replace(sol_num_stats=4, use_sol_prior=False))  # no Sol prior: nothing to read
    with pytest.raises(CacheMismatchError, match=r"text_regime: .*has padded.*use a model with text_regime='padded'"):
        check_compatible(manifest, DEEP.replace(text_regime="masked"))
    masked = dataclasses.replace(
        manifest, text_regime="masked", sol_stats_names=["locality", "entropy", "clustering", "sparsity"]
    )
    with pytest.raises(CacheMismatchError, match=r"text_regime: .*rebuild the cache with --text_regime padded"):
        check_compatible(masked, DEEP)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_single(tmp_path / "orig", n=3)
    assert main([str(tmp_path / "orig"), str(tmp_path / "out"), "--name", "renamed", "--shard_size", "2"]) == 0
    assert load_manifest(tmp_path / "out").name == "renamed"
    assert "3 samples in 2 shards" in capsys.readouterr().out
    assert main([str(tmp_path / "orig"), str(tmp_path / "out")]) == 1  # the output is not empty
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not empty" in err and err.count("\n") == 1


def test_caches_of_another_pairing_or_latent_convention_are_not_mixed(tmp_path: Path) -> None:
    write_single(tmp_path / "orig", n=2)
    convert_original_cache(tmp_path / "orig", tmp_path / "ours")
    convert_original_cache(tmp_path / "orig", tmp_path / "theirs", pairing="original")
    make_stream_loader([tmp_path / "ours", tmp_path / "ours"], batch_size=2, rank=0, world_size=1)  # same: fine
    with pytest.raises(
        CacheFormatError, match=r"cannot be mixed with .*: teacher_timestep .t \* 1000 \(the original's pairing\). vs"
    ):
        make_stream_loader([tmp_path / "ours", tmp_path / "theirs"], batch_size=2, rank=0, world_size=1)


def test_incremental_part_of_another_size_than_state_json_says_is_refused(tmp_path: Path) -> None:
    write_incremental(tmp_path / "orig", sizes=(3, 3))
    state = json.loads((tmp_path / "orig" / "state.json").read_text())
    (tmp_path / "orig" / "state.json").write_text(json.dumps({**state, "n_samples": 5}))  # shard 1 should hold 2
    with pytest.raises(CacheFormatError, match=r"shard_0001\.pt holds 3 samples, state\.json implies 2"):
        convert_original_cache(tmp_path / "orig", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_sol_file_with_four_statistics_or_other_buckets_is_refused(tmp_path: Path) -> None:
    write_single(tmp_path / "orig", n=2)
    sol = torch.load(tmp_path / "orig" / "sol.pt", weights_only=True)
    torch.save({**sol, "stats": torch.rand(2, 10, 4).half()}, tmp_path / "orig" / "sol.pt")
    with pytest.raises(CacheFormatError, match=r"sol stats should be \(N, T, 3\)"):
        convert_original_cache(tmp_path / "orig", tmp_path / "out")
    lune = torch.load(tmp_path / "orig" / "lune.pt", weights_only=True)
    torch.save({**sol}, tmp_path / "orig" / "sol.pt")
    torch.save({**lune, "t_buckets": torch.linspace(0.1, 0.9, 9)}, tmp_path / "orig" / "lune.pt")
    with pytest.raises(CacheFormatError, match=r"lune features should be \(N, T, F\)"):
        convert_original_cache(tmp_path / "orig", tmp_path / "out")
