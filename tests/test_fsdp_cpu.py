"""FSDP2 on a CPU machine: two gloo processes run the Trainer's FSDP2 path (fully_shard, sharded EMA, sharded save with
torch.distributed.checkpoint, consolidated export, resharding resume) for real.

accelerate (1.15) turns an FSDP launch into DDP without CUDA (tests/test_scale.py's FSDP_NEEDS_A_GPU says where), so
these launches set TINYFLUX_ENGINE_ON_CPU=1, the test-only switch in tinyflux.trainer.runtime.keep_fsdp_on_cpu that keeps
accelerate's FSDP2 plugin on a CPU launch. Everything past that switch is the code a GPU run executes."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from tests.test_scale import argv, assert_same_export, launch, synthetic_cache
from tests.trainer_helpers import PROCESS_COUNT_ATOL
from tinyflux.model.config import TinyFluxConfig
from tinyflux.model.model import TinyFluxDeep, pack_latents
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer.args import parse_args
from tinyflux.trainer.engines import fsdp_mixed_precision
from tinyflux.trainer.main import run_training
from tinyflux.trainer.runtime import ENGINE_ON_CPU_ENV

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
RANK_SHARDS = {".metadata", "__0_0.distcp", "__1_0.distcp"}  # torch.distributed.checkpoint: one file per rank


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_cache")
    synthetic_cache(TinyFluxConfig.preset("tiny"), n=16, side=8, text_len=6).to_shards(path, shard_size=8)
    return path


def fsdp(cache: Path, out: Path, processes: int, *args: str) -> str:
    """fsdp.yaml launched on `processes` CPU processes, FSDP kept on; the global batch is 4 samples whatever the count."""
    batch = ["--batch_size", str(4 // processes), "--keep_last_n_steps", "10"]
    output = launch(
        "fsdp.yaml",
        *argv(cache, out, *batch, *args),
        num_processes=processes,
        cpu=True,
        env={ENGINE_ON_CPU_ENV: "1", "TINYFLUX_LOG_ALL_RANKS": "1"},  # each rank logs its EMA share
    )
    assert f"engine: fsdp2, {processes} process(es)" in output
    return output


def ema_shares(output: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"this process keeps (\d+) of the EMA's (\d+) values", output)]


def resume_from(checkpoint: Path, out: Path) -> None:
    """A fresh checkpoint_dir holding only `checkpoint`, so that --resume latest picks it."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)


@pytest.mark.slow
def test_fsdp2_on_cpu_saves_sharded_resumes_on_two_and_one_processes_and_exports_what_one_process_reaches(
    cache, tmp_path
):
    straight = tmp_path / "two" / "checkpoints"
    output = fsdp(cache, tmp_path / "two", 2, "--total_steps", "4", "--save_every_steps", "2")
    # Each process keeps only its shard of the EMA, and the two shards make the whole.
    (a, whole), (b, whole_b) = ema_shares(output)
    assert whole == whole_b and a + b == whole and 0 < a < whole

    half = straight / "step_0000002"
    files = {p.name for p in half.iterdir()}
    assert {"model.safetensors", ckpt.EMA_WEIGHTS, "random_states_0.pkl", "random_states_1.pkl", ckpt.MARKER} <= files
    assert "optimizer.bin" not in files  # the optimizer state stays sharded, never gathered on one rank
    for state in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {p.name for p in (half / state).iterdir()} == RANK_SHARDS
    # Every rank wrote its half of the weights (plus metadata), not a gathered copy.
    export = (half / "model.safetensors").stat().st_size
    assert all((half / "pytorch_model_fsdp_0" / f"__{r}_0.distcp").stat().st_size < 0.75 * export for r in (0, 1))

    # Two processes resume exactly where the straight run was at step 2: bit for bit the same reductions.
    resume_from(half, tmp_path / "again")
    output = fsdp(cache, tmp_path / "again", 2, "--total_steps", "4", "--resume")
    assert f"resumed from {tmp_path / 'again' / 'checkpoints' / 'step_0000002'} at step 2" in output
    final = straight / "step_0000004"
    again = tmp_path / "again" / "checkpoints" / "step_0000004"
    assert ckpt.read_progress(again) == ckpt.read_progress(final)
    assert_same_export(final, again, atol=0)

    # One process resumes the two-process shards (torch.distributed.checkpoint reshards; the EMA file is whole).
    resume_from(half, tmp_path / "one")
    output = fsdp(cache, tmp_path / "one", 1, "--total_steps", "4", "--resume")
    assert f"resumed from {tmp_path / 'one' / 'checkpoints' / 'step_0000002'} at step 2" in output
    assert ema_shares(output) == [(whole, whole)]  # one process keeps it whole
    resumed_on_one = tmp_path / "one" / "checkpoints" / "step_0000004"
    assert ckpt.read_progress(resumed_on_one) == ckpt.read_progress(final)
    assert_same_export(final, resumed_on_one, atol=PROCESS_COUNT_ATOL)

    # A plain process (no FSDP) cannot load FSDP2's sharded state: it says so and what to do instead.
    resume_from(half, tmp_path / "plain_resume")
    plain_resume = argv(cache, tmp_path / "plain_resume", "--batch_size", "4", "--total_steps", "4", "--resume")
    with pytest.raises(ckpt.CheckpointError, match=r"holds the training state of FSDP2 .* --model "):
        run_training(parse_args(plain_resume))

    # The reference: one plain process (no FSDP, run in this one) with the same global batch reaches the same weights
    # and EMA.
    plain = argv(cache, tmp_path / "plain", "--batch_size", "4", "--total_steps", "4")
    reference = run_training(parse_args(plain)).last_checkpoint
    assert ckpt.read_progress(reference) == ckpt.read_progress(final)
    assert_same_export(reference, final, atol=PROCESS_COUNT_ATOL)


def test_fsdp2_bf16_policy_keeps_the_timestep_and_rope_angles_as_the_model_made_them(tmp_path):
    """The Trainer's FSDP2 policy for a bf16 run, on one gloo process: the sharded model under accelerate's bf16
    autocast computes what the plain model computes under the same autocast (DDP's path) up to bf16 rounding, and the
    timestep reaches the network in float32. FSDP2's default input cast would round it (0.99931 -> 1.0) to bf16."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        config = TinyFluxConfig.preset("tiny")
        torch.manual_seed(0)
        plain = TinyFluxDeep(config)
        with torch.no_grad():  # random everywhere: the zero-initialised gates and final layer would hide any error
            for p in plain.parameters():
                p.normal_(0, 0.1)
        g = torch.Generator().manual_seed(1)
        inputs = (
            pack_latents(torch.randn(4, config.in_channels, 8, 8, generator=g), config.patch_size),
            torch.randn(4, 6, config.num_t5_layers, config.t5_hidden_size, generator=g),
            torch.randn(4, config.pooled_projection_dim, generator=g),
            torch.tensor([0.9012, 0.5037, 0.2511, 0.99931]),
            TinyFluxDeep.create_img_ids(4, 8, 8),
        )

        def forward(model: TinyFluxDeep) -> torch.Tensor:
            with torch.autocast("cpu", torch.bfloat16):
                return model(*inputs, img_shape=(8, 8)).float()

        def sharded(policy: MixedPrecisionPolicy) -> tuple[torch.Tensor, torch.dtype]:
            model = copy.deepcopy(plain)
            for block in [*model.double_blocks, *model.single_blocks]:
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            seen = []
            model.register_forward_pre_hook(lambda module, args: seen.append(args[3].dtype))  # the timestep
            return forward(model), seen[0]

        reference = forward(plain)
        ours, t_dtype = sharded(fsdp_mixed_precision(torch.bfloat16))
        assert (ours - reference).abs().mean() < 0.015 * reference.abs().mean()  # measured 0.8%
        assert t_dtype == torch.float32
        assert sharded(MixedPrecisionPolicy(param_dtype=torch.bfloat16))[1] == torch.bfloat16  # the default casts it
    finally:
        dist.destroy_process_group()


def logged_losses(out: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((out / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars("loss")})
    return values


def test_fsdp2_in_bf16_trains_what_one_bf16_process_trains(cache, tmp_path):
    """accelerate wraps no autocast around an FSDP2 model (its policy only gathers bf16 parameters): the Trainer runs
    the forward under the run's autocast, and the policy leaves the inputs as given. Two FSDP2 processes then log the
    losses of one plain bf16 process with the same global batch, up to bf16 rounding of the parameters FSDP2 gathers
    in bf16 (the released network's scalar gates enter elementwise: measured within 1.7e-5 on 2026-12-05, 4e-7 for
    the network before it; without the autocast, the first matmul fails on float32 x bf16)."""
    common = ("--log_with", "tensorboard", "--total_steps", "3")
    launch(None, *argv(cache, tmp_path / "one", "--batch_size", "4", *common, dtype="bfloat16"), cpu=True)
    two = fsdp(cache, tmp_path / "two", 2, *common, "--dtype", "bfloat16")
    assert "FSDP on CPU over gloo" in two
    one, fsdp2 = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert sorted(one) == sorted(fsdp2) == [1, 2, 3]
    for step, loss in one.items():
        assert abs(fsdp2[step] - loss) <= 5e-5 * abs(loss), (step, fsdp2[step], loss)
