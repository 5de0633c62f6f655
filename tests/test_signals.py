"""Stop signals with DataLoader workers on: SIGTERM / SIGUSR1 sent to a whole process group (as `accelerate launch`
forwards them and as SLURM signals every process of a step) reach the workers too. They must not die of it: the main
process finishes its step, writes one complete checkpoint and exits 0, and the resumed run ends with the weights of
an uninterrupted one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_helpers import PROCESS_COUNT_ATOL, accelerate_launch, wait_for_checkpoint
from tinyflux.trainer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "accelerate_configs" / "cpu_2proc.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
# What slurm/train.sbatch exports for torchrun's agent: pass SIGUSR1 on to the training processes (by default the agent
# dies of it and leaves them running).
SBATCH_AGENT_ENV = {
    "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
}
TOTAL = 24  # steps of the uninterrupted reference; the signal lands a few steps after step 2

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def run_argv(cache: Path, out: Path, workers: int, total: int, *extra: str) -> list[str]:
    """A streamed run (the default loader) with `workers` DataLoader workers per process and a constant LR, so that a
    leg with another total_steps follows the reference's schedule."""
    return [
        "--cache", str(cache), "--model", "tiny", "--dtype", "float32", "--batch_size", "2",
        "--gradient_accumulation", "1", "--warmup_steps", "2", "--learning_rate", "2e-3", "--lr_scheduler", "constant",
        "--num_workers", str(workers), "--ema_decay", "0.9", "--log_every", "100", "--log_with", "none",
        "--save_every_steps", "2", "--keep_last_n_steps", "100", "--total_steps", str(total),
        "--checkpoint_dir", str(out / "checkpoints"), "--tensorboard_dir", str(out / "logs"), *extra,
    ]  # fmt: skip


def command(processes: int, argv: list[str]) -> list[str]:
    script = [str(ROOT / "train_tinyflux.py"), *argv]
    if processes == 1:
        return [sys.executable, *script]
    return accelerate_launch(CPU_2PROC, *script)


def run(processes: int, argv: list[str]) -> str:
    result = subprocess.run(command(processes, argv), capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def signal_group(processes: int, argv: list[str], checkpoints: Path, signum: int) -> tuple[int, str]:
    """Start a run in a session of its own, wait for its step-2 checkpoint, send `signum` to the whole process group
    (the launcher, or the training process and its DataLoader workers); returns the exit code and the output.

    Under `accelerate launch` the group holds only torchrun's agent (it starts each training process in a session of
    its own) and the agent forwards the signal to each of them and its workers: with SIGUSR1 it does so only when
    told to handle it, as slurm/train.sbatch tells it (PET_SIGNALS_TO_HANDLE)."""
    env = {**ENV, **(SBATCH_AGENT_ENV if processes > 1 else {})}
    job = subprocess.Popen(
        command(processes, argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    family: list[psutil.Process] = []
    try:
        wait_for_checkpoint(job, checkpoints / "step_0000002", timeout=180)
        family = psutil.Process(job.pid).children(recursive=True)
        os.killpg(job.pid, signum)
        output, _ = job.communicate(timeout=180)
    finally:
        job.kill()
        for process in family:  # nothing the run started outlives the test
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    return job.returncode, output


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", ckpt.EMA_WEIGHTS):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=PROCESS_COUNT_ATOL, msg=f"{name}:{key}")


@pytest.fixture(scope="module")
def references(synthetic_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], Path]:
    """Uninterrupted runs of TOTAL steps, by (processes, workers): their final checkpoints, computed on first use."""
    cache: dict[tuple[int, int], Path] = {}

    def get(processes: int, workers: int) -> Path:
        if (processes, workers) not in cache:
            out = tmp_path_factory.mktemp(f"straight_{processes}x{workers}")
            run(processes, run_argv(synthetic_shards, out, workers, TOTAL))
            cache[processes, workers] = out / "checkpoints" / f"step_{TOTAL:07d}"
        return cache[processes, workers]

    return get


# Both layouts with SIGTERM; SIGUSR1 takes the same path in the trainer, so the two-process layout covers it.
@pytest.mark.parametrize(
    ("processes", "workers", "signum"),
    [(1, 2, signal.SIGTERM), (2, 1, signal.SIGTERM), (2, 1, signal.SIGUSR1)],
    ids=["1proc_x_2workers-TERM", "2proc_x_1worker-TERM", "2proc_x_1worker-USR1"],
)
def test_a_signal_to_the_process_group_saves_exits_0_and_resumes_exactly(
    synthetic_shards, references, tmp_path, processes, workers, signum
):
    checkpoints = tmp_path / "checkpoints"
    code, output = signal_group(processes, run_argv(synthetic_shards, tmp_path, workers, 100_000), checkpoints, signum)
    name = signal.Signals(signum).name
    assert "is killed by signal" not in output and "Traceback" not in output, output[-4000:]
    last = ckpt.find_latest(checkpoints)
    step = ckpt.read_progress(last).step
    assert 2 <= step < TOTAL and last.name == f"step_{step:07d}", output[-4000:]
    # every training process acted on the signal at the same step boundary and wrote into the one checkpoint
    assert output.count(f"{name} received: saved {last} at step {step}, stopping cleanly") == processes, output[-4000:]
    assert not list(checkpoints.glob("*.tmp"))
    if processes == 1:
        assert code == 0, output[-4000:]
    else:
        # torchrun's agent reports the signal it was sent (128 + signum) although every training process exited 0;
        # slurm/launch.sh turns that clean save-and-stop into 0.
        assert code in (0, 128 + signum), output[-4000:]
        assert "ChildFailedError" not in output and "exitcode  : 1" not in output, output[-4000:]
    resumed = run(processes, run_argv(synthetic_shards, tmp_path, workers, TOTAL, "--resume"))
    assert f"resumed from {last} at step {step}" in resumed
    assert_same_weights(references(processes, workers), checkpoints / f"step_{TOTAL:07d}")


LEFT_BEHIND = """
import gc, sys, torch
from torch.utils.data import DataLoader
from tinyflux.trainer.runtime import WorkerInit
gc.disable()  # nothing collects the cycle below before exit, as when a traceback holds a loader's frame
loader = DataLoader(torch.arange(100), batch_size=2, num_workers=2, worker_init_fn=WorkerInit())
batches = iter(loader)
next(batches)
cycle = [batches]
cycle.append(cycle)
del batches, cycle
print("exiting", flush=True)
"""


def test_a_process_whose_loader_workers_are_still_alive_at_exit_exits():
    """The workers ignore SIGTERM, and multiprocessing's exit hook stops daemonic children with SIGTERM and then joins
    them: without runtime's own exit hook (SIGKILL first) this process waits forever (the test suite did, in CI)."""
    done = subprocess.run(
        [sys.executable, "-c", LEFT_BEHIND], env=ENV, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0 and done.stdout == "exiting\n", done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "killed by signal" not in done.stderr, done.stderr[-2000:]
