"""The build's batched teacher path (one CLIP pass, all buckets in one call, chunked Sol recorder) against the
definitions it replaces: one prompt, one bucket, one sample at a time (docs/EXPERT_CACHE.md)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tinyflux.cache.encode import encode_batch
from tinyflux.cache.format import T_BUCKETS
from tinyflux.frozen.sol_stats import attention_spatial_map, attention_stats
from tinyflux.frozen.teachers import seeded_noise, sol_recorder, teacher_noise_level

PROMPTS = ["a red square on grey", "two blue circles", "an olive triangle at dusk, small"]
BUCKETS = T_BUCKETS[::3]  # 4 of the 10 buckets keep the per-prompt reference loop short
TIGHT = dict(atol=1e-5, rtol=1e-5)  # float32 rounding of other batch sizes, far below fp16 storage (~5e-4)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    # a pre-hook: Lune's forward leaves by an exception at its mid block, so a forward hook would never fire
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_encode_batch_equals_the_per_prompt_per_bucket_definitions(tiny_zoo, one_thread) -> None:  # noqa: ANN001
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "navy", "olive")]
    clip_calls = _count_calls(tiny_zoo.load_clip()[1])
    lune_calls, sol_calls = _count_calls(tiny_zoo.load_lune()), _count_calls(tiny_zoo.load_sol())
    out = encode_batch(tiny_zoo, images, PROMPTS, seed=3, t_buckets=BUCKETS)
    # One CLIP pass for the pooled vector (inside the T5 call), one for the teachers' context; one call per teacher.
    assert (clip_calls[0], lune_calls[0], sol_calls[0]) == (2, 1, 1)
    assert out["lune"].shape == (3, 4, 64) and out["sol_stats"].shape == (3, 4, 4)

    for i, prompt in enumerate(PROMPTS):
        for j, t in enumerate(BUCKETS.tolist()):
            torch.testing.assert_close(out["lune"][i, j], tiny_zoo.extract_lune([prompt], t, seed=3)[0], **TIGHT)
            stats, spatial = tiny_zoo.extract_sol([prompt], t, seed=3)
            torch.testing.assert_close(out["sol_stats"][i, j], stats[0], **TIGHT)
            torch.testing.assert_close(out["sol_spatial"][i, j], spatial[0], **TIGHT)
    t5, pooled, lengths = tiny_zoo.encode_prompts_batched(PROMPTS[1:2], return_lengths=True)
    torch.testing.assert_close(out["t5_embeds"][1, : lengths[0]], t5[0, : lengths[0]], **TIGHT)
    torch.testing.assert_close(out["clip_pooled"][1], pooled[0], **TIGHT)
    torch.testing.assert_close(out["latents"][2], tiny_zoo.encode_image(images[2]), **TIGHT)


def _sol_inputs(zoo, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    context = zoo.encode_clip_context([PROMPTS[i % 3] for i in range(n)])
    unet = zoo.load_sol()
    side = unet.config.sample_size
    return (
        seeded_noise(list(range(n)), (unet.config.in_channels, side, side)),
        teacher_noise_level(T_BUCKETS[:n]),
        context,
    )


def test_sol_recorder_chunks_give_each_sample_its_own_numbers(tiny_zoo, one_thread) -> None:  # noqa: ANN001
    unet, inputs = tiny_zoo.load_sol(), _sol_inputs(tiny_zoo, 5)
    recorder = sol_recorder(unet)
    runs = {}
    # 1 byte: one sample per chunk (the per-sample loop this replaced); 3 samples: chunks of 3 and 2; default: all 5.
    for budget in (1, 3 * 2 * 256 * 256 * 4, recorder.max_chunk_bytes):
        recorder.max_chunk_bytes, _ = budget, recorder.reset(8)
        with torch.no_grad():
            output = unet(*inputs).sample
        runs[budget] = (output, torch.stack(recorder.stats), torch.stack(recorder.maps))
    recorder.max_chunk_bytes = 1 << 30
    (ref_out, ref_stats, ref_maps), *others = runs.values()
    assert ref_stats.shape == (10, 5, 4) and ref_maps.shape == (10, 5, 8, 8)  # 10 recorded layers, 5 samples
    assert ref_stats[:, 0].std(dim=0).gt(0).all()  # layers differ: a copy of one layer would pass equality as well
    for out, stats, maps in others:
        torch.testing.assert_close(out, ref_out, **TIGHT)
        torch.testing.assert_close(stats, ref_stats, **TIGHT)
        torch.testing.assert_close(maps, ref_maps, **TIGHT)


def test_sol_recorder_layer_equals_the_statistics_of_its_attention(tiny_zoo, one_thread) -> None:  # noqa: ANN001
    """Probabilities recomputed outside the recorder, one sample at a time, through the hand-checked sol_stats."""
    unet, inputs = tiny_zoo.load_sol(), _sol_inputs(tiny_zoo, 3)
    recorder = sol_recorder(unet)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1  # the first recorded layer, 16x16 grid
    seen = []
    handle = attn.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0]), with_kwargs=True)
    recorder.reset(8)
    with torch.no_grad():
        unet(*inputs)
    handle.remove()
    hidden = seen[0]  # (B, N, C)
    for b in range(3):
        with torch.no_grad():
            q, k = (
                attn.head_to_batch_dim(attn.to_q(hidden[b : b + 1])),
                attn.head_to_batch_dim(attn.to_k(hidden[b : b + 1])),
            )
            probs = attn.get_attention_scores(q, k).mean(dim=0, keepdim=True)  # (1, N, N) head mean
        side = int(probs.shape[-1] ** 0.5)
        torch.testing.assert_close(recorder.stats[0][b], attention_stats(probs, side)[0], **TIGHT)
        torch.testing.assert_close(recorder.maps[0][b], attention_spatial_map(probs, side, 8)[0], **TIGHT)


def test_sol_recorder_is_found_only_where_installed(tiny_zoo) -> None:  # noqa: ANN001
    from tinyflux.frozen.sources import ZooError

    with pytest.raises(ZooError, match="found 0"):
        sol_recorder(tiny_zoo.load_lune())
