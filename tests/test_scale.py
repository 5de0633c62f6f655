"""Scaling out. Two CPU processes (DDP over gloo) train, save, resume in another number of processes and export the
weights one process reaches; FSDP2 and DeepSpeed do the same on GPUs (skipped without, saying why; FSDP2's code path
also runs on CPU in test_fsdp_cpu.py); the SLURM scripts render a well-formed launch line from SLURM's variables and
turn the time-limit signal into save, then requeue."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env
from safetensors.torch import load_file

from tests.trainer_helpers import PROCESS_COUNT_ATOL, accelerate_launch, wait_for_checkpoint
from tinyflux.cache.format import T_BUCKETS
from tinyflux.cache.memory import DatasetCache, EncodingCache, LuneFeatureCache, SolFeatureCache
from tinyflux.model.config import TinyFluxConfig
from tinyflux.model.loader import load_model
from tinyflux.trainer import checkpoint as ckpt
from tinyflux.trainer.runtime import ENGINE_ON_CPU_ENV

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
SLURM = ROOT / "slurm"
FSDP_NEEDS_A_GPU = (
    "accelerate (1.15) turns a launch into FSDP only when it is a GPU-type one (AcceleratorState.__init__ switches "
    "MULTI_GPU, MULTI_NPU, MULTI_XPU, ... to FSDP, never MULTI_CPU): without CUDA the Trainer's Accelerator has "
    "cpu=True (gloo), and fsdp.yaml trains as DDP (test_ddp_two_processes_... checks that and the warning). The FSDP2 "
    "code path itself (sharded EMA, sharded save, export, resharding resume) runs on CPU in tests/test_fsdp_cpu.py "
    "through the test-only TINYFLUX_ENGINE_ON_CPU=1 switch; this test adds NCCL, CUDA and accelerate's own FSDP "
    "selection. Needs CUDA GPUs"
)
NO_DEEPSPEED = (
    "deepspeed is not installed (pip install deepspeed; it is no TinyFlux requirement) or no CUDA GPU. On CPU, "
    "accelerate (1.15) drops DeepSpeed as it drops FSDP (AcceleratorState.__init__: ACCELERATE_USE_DEEPSPEED and not "
    "cpu); test_deepspeed_on_cpu_... runs it there through the test-only TINYFLUX_ENGINE_ON_CPU=1 switch where "
    "deepspeed is installed"
)
DEEPSPEED_ON_CPU_NEEDS = (
    "deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed; no TinyFlux requirement, so CI skips this) or "
    "no C++ compiler: on first use deepspeed JIT-compiles its shared-memory comm op (40 s - 2 min on 2 cores)"
)
# The CPU runs here check accelerate's own engine selection; the FSDP-on-CPU switch belongs to tests/test_fsdp_cpu.py.
ENV = {**{k: v for k, v in os.environ.items() if k != ENGINE_ON_CPU_ENV}, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def synthetic_cache(config: TinyFluxConfig, n: int, side: int, text_len: int, seed: int = 0) -> DatasetCache:
    """n random samples in the cache format, shaped for `config` (latents side x side, T5 of text_len tokens)."""
    g = torch.Generator().manual_seed(seed)
    k, buckets = len(config.t5_layers), len(T_BUCKETS)
    pattern = torch.linspace(-1.5, 1.5, side)[None, :, None] * torch.linspace(1, -1, config.in_channels)[:, None, None]
    encodings = EncodingCache(
        pattern + 0.3 * torch.randn(n, config.in_channels, side, side, generator=g),
        torch.randn(n, text_len, k, config.t5_hidden_size, generator=g),
        torch.randn(n, config.pooled_projection_dim, generator=g),
        torch.float32,
        t5_lengths=torch.tensor([text_len // 2 + i % (text_len // 2) for i in range(n)]),
        captions=[f"caption {i}" for i in range(n)],
    )
    lune = LuneFeatureCache(torch.randn(n, buckets, config.lune_expert_dim, generator=g), T_BUCKETS, torch.float32)
    s = config.sol_spatial_size
    spatial = torch.softmax(torch.randn(n, buckets, s * s, generator=g), -1).view(n, buckets, s, s)
    sol = SolFeatureCache(torch.rand(n, buckets, 4, generator=g), spatial, T_BUCKETS, torch.float32)
    return DatasetCache(encodings, lune, sol, "synthetic", settings={"t5_layers": list(config.t5_layers)})


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_cache")
    synthetic_cache(TinyFluxConfig.preset("tiny"), n=16, side=8, text_len=6).to_shards(path, shard_size=8)
    return path


def argv(cache: Path, out: Path, *extra: str, model: str = "tiny", dtype: str = "float32") -> list[str]:
    """A run on the in-memory cache: accelerate shards its batches, so every process count reads the same samples
    per global batch; a constant LR, so legs with a smaller total_steps follow the straight run's schedule."""
    return [
        "--cache", str(cache), "--in_memory", "--model", model, "--dtype", dtype, "--gradient_accumulation", "2",
        "--warmup_steps", "2", "--learning_rate", "2e-3", "--lr_scheduler", "constant", "--num_workers", "0",
        "--ema_decay", "0.9", "--log_every", "1", "--save_every_steps", "none", "--sample_every", "none",
        "--checkpoint_dir", str(out / "checkpoints"), "--tensorboard_dir", str(out / "logs"), *extra,
    ]  # fmt: skip


def launch(
    config_file: str | None, *args: str, num_processes: int = 1, cpu: bool = False, env: dict[str, str] | None = None
) -> str:
    """`accelerate launch --config_file CONFIG train_tinyflux.py ARGS`, or `python train_tinyflux.py ARGS` when
    config_file is None; on the CPU only when `cpu` (a GPU machine runs the CPU tests too), with `env` added to the
    environment. Returns the output; the test fails with its tail if the run does."""
    script = [str(ROOT / "train_tinyflux.py"), *args]
    cmd = [sys.executable, *script]
    if config_file is not None:
        cmd = accelerate_launch(CONFIGS / config_file)
        cmd += ["--num_processes", str(num_processes), *script]
    env = {**ENV, **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {}), **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def assert_same_export(a: Path, b: Path, atol: float) -> None:
    for name in ("model.safetensors", ckpt.EMA_WEIGHTS):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wb[key].float(), wa[key].float(), rtol=0, atol=atol, msg=f"{name}:{key}")


def three_legs(cache: Path, out: Path, first: str, middle: str | None, last: str, cpu: bool) -> tuple[Path, str]:
    """Steps 0-2 launched with config `first` in two processes, 2-3 in one (launched with `middle`, or plain python
    when None), 3-4 with `last` in two processes again; the global batch is 4 throughout. Returns the final checkpoint
    and the last leg's output."""
    two = argv(cache, out, "--batch_size", "2")
    one = argv(cache, out, "--batch_size", "4", "--total_steps", "3", "--resume")
    launch(first, *two, "--total_steps", "2", num_processes=2, cpu=cpu)
    first_checkpoint = out / "checkpoints" / "step_0000002"
    assert {"random_states_0.pkl", "random_states_1.pkl", ckpt.MARKER} <= {p.name for p in first_checkpoint.iterdir()}
    assert f"resumed from {first_checkpoint} at step 2" in launch(middle, *one, cpu=cpu)
    output = launch(last, *two, "--total_steps", "4", "--resume", num_processes=2, cpu=cpu)
    assert f"resumed from {out / 'checkpoints' / 'step_0000003'} at step 3" in output
    return out / "checkpoints" / "step_0000004", output


def one_process(cache: Path, out: Path, cpu: bool) -> Path:
    """The reference: 4 steps in one process with the legs' global batch; returns its final checkpoint."""
    launch(None, *argv(cache, out, "--batch_size", "4", "--total_steps", "4"), cpu=cpu)
    return out / "checkpoints" / "step_0000004"


@pytest.mark.slow
def test_ddp_two_processes_save_resume_in_another_count_and_export_what_one_process_reaches(tiny_cache, tmp_path):
    straight = one_process(tiny_cache, tmp_path / "one", cpu=True)
    # The last leg launches fsdp.yaml: on a CPU machine accelerate builds DDP (FSDP_NEEDS_A_GPU says why); the run
    # must say so, and resume the DDP checkpoint exactly.
    final, output = three_legs(tiny_cache, tmp_path / "legs", "cpu_2proc.yaml", None, "fsdp.yaml", cpu=True)
    assert "asks for FSDP, but accelerate enables it only on GPUs" in output and "uses DDP over gloo" in output
    # no terminal: one plain progress line per log step from the main process; rank 1 speaks only to warn, marked
    assert output.count("step 4/4 loss=") == 1 and "\r" not in output, output[-3000:]
    assert "[rank 1] INFO" not in output and output.count("resumed from") == 1
    assert ckpt.read_progress(final) == ckpt.read_progress(straight)
    assert_same_export(straight, final, atol=PROCESS_COUNT_ATOL)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or shutil.which("c++") is None, reason=DEEPSPEED_ON_CPU_NEEDS
)
@pytest.mark.parametrize("config_file", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_on_cpu_saves_resumes_and_exports_what_one_process_reaches(tiny_cache, tmp_path, config_file):
    """DeepSpeed (float32, 2 gloo processes through TINYFLUX_ENGINE_ON_CPU=1) trains 2 steps, saves, resumes to 4 in
    the same number of processes, and exports the weights one plain process reaches with the same global batch."""
    straight = one_process(tiny_cache, tmp_path / "one", cpu=True)
    two = argv(tiny_cache, tmp_path / "ds", "--batch_size", "2")
    env = {ENGINE_ON_CPU_ENV: "1"}
    first = launch(config_file, *two, "--total_steps", "2", num_processes=2, cpu=True, env=env)
    assert f"engine: {Path(config_file).stem.replace('_', '-')}, 2 process(es)" in first
    resumed = launch(config_file, *two, "--total_steps", "4", "--resume", num_processes=2, cpu=True, env=env)
    assert f"resumed from {tmp_path / 'ds' / 'checkpoints' / 'step_0000002'} at step 2" in resumed
    final = tmp_path / "ds" / "checkpoints" / "step_0000004"
    assert ckpt.is_complete(final) and (final / "pytorch_model").is_dir() and not (final / "optimizer.bin").exists()
    assert ckpt.read_progress(final) == ckpt.read_progress(straight)
    assert_same_export(straight, final, atol=PROCESS_COUNT_ATOL)


def sbatch_exports() -> dict[str, str]:
    """The torchrun settings slurm/train.sbatch exports, with their defaults, read from the script itself."""
    text = (SLURM / "train.sbatch").read_text()
    names = ("PET_SIGNALS_TO_HANDLE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    script = "\n".join(line for line in text.splitlines() if line.startswith("export "))
    out = subprocess.run(
        ["bash", "-c", f"{script}\n" + "".join(f'echo "{n}=${n}"; ' for n in names)],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


@pytest.mark.slow
def test_usr1_to_the_launcher_makes_every_process_save_and_stop(tiny_cache, tmp_path):
    """What slurm/train.sbatch relies on: USR1 sent to `accelerate launch` (as srun forwards it) reaches every
    training process through torchrun's agent, and they stop together after writing one complete checkpoint."""
    cmd = accelerate_launch(CONFIGS / "cpu_2proc.yaml")
    cmd += [
        str(ROOT / "train_tinyflux.py"),
        *argv(tiny_cache, tmp_path, "--batch_size", "2", "--total_steps", "100000"),
    ]
    cmd += ["--save_every_steps", "2", "--keep_last_n_steps", "100", "--log_every", "100"]
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    env.update(sbatch_exports())
    # A session of its own, so that whatever happens no training process outlives the test.
    job = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        wait_for_checkpoint(job, tmp_path / "checkpoints" / "step_0000002")
        job.send_signal(signal.SIGUSR1)
        output, _ = job.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the launcher's group: also workers it might have orphaned
            os.killpg(job.pid, signal.SIGKILL)
    last = ckpt.find_latest(tmp_path / "checkpoints")
    step = ckpt.read_progress(last).step
    assert step >= 2 and last.name == f"step_{step:07d}"
    assert output.count(f"SIGUSR1 received: saved {last} at step {step}, stopping cleanly") == 2, output[-3000:]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"{FSDP_NEEDS_A_GPU}: two of them")
def test_fsdp2_two_gpus_save_sharded_resume_in_another_count_and_export_what_one_process_reaches(tiny_cache, tmp_path):
    straight = one_process(tiny_cache, tmp_path / "one", cpu=False)
    final, _ = three_legs(tiny_cache, tmp_path / "legs", "fsdp.yaml", "fsdp.yaml", "fsdp.yaml", cpu=False)
    files = {p.name for p in final.iterdir()}
    # Sharded resumable state (no optimizer gathered on one rank), plus the whole-model export.
    assert {"pytorch_model_fsdp_0", "optimizer_0", "model.safetensors", ckpt.EMA_WEIGHTS} <= files
    assert "optimizer.bin" not in files
    assert ckpt.read_progress(final) == ckpt.read_progress(straight)
    # Float32 on GPUs: reductions in another order still differ in the last bits, which Adam can amplify.
    assert_same_export(straight, final, atol=1e-4)


def deep_run(cache: Path, out: Path, *extra: str) -> list[str]:
    return argv(
        cache, out, "--batch_size", "4", "--gradient_accumulation", "1", "--log_with", "tensorboard",
        "--log_every", "5", "--learning_rate", "1e-4", *extra, model="deep", dtype="bfloat16",
    )  # fmt: skip


def figures(logs: Path) -> dict[str, float]:
    """The last logged value of each scalar in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, float] = {}
    for events in sorted(logs.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values[tag] = acc.Scalars(tag)[-1].value
    return values


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(
    ("config_file", "extra"),
    [
        ("fsdp.yaml", ["--gradient_checkpointing", "--compile_mode", "default"]),
        ("deepspeed_zero2.yaml", []),
        ("deepspeed_zero3.yaml", []),
    ],
)
def test_deep_preset_trains_saves_resumes_and_exports_on_one_gpu(config_file, extra, tmp_path, record_property):
    if not torch.cuda.is_available():
        pytest.skip(FSDP_NEEDS_A_GPU if config_file == "fsdp.yaml" else NO_DEEPSPEED)
    if config_file.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip(NO_DEEPSPEED)
    deep = TinyFluxConfig.preset("deep")
    cache = tmp_path / "cache"
    synthetic_cache(deep, n=64, side=32, text_len=32).to_shards(cache, shard_size=32)
    out = tmp_path / "run"
    launch(config_file, *deep_run(cache, out, "--total_steps", "20", *extra))
    resumed = launch(config_file, *deep_run(cache, out, "--total_steps", "40", "--resume", *extra))
    assert f"resumed from {out / 'checkpoints' / 'step_0000020'} at step 20" in resumed
    final = out / "checkpoints" / "step_0000040"
    assert ckpt.is_complete(final) and ckpt.read_progress(final).step == 40
    for weights in ("model.safetensors", ckpt.EMA_WEIGHTS):
        model = load_model(str(final), weights_name=weights, device="cpu", dtype=torch.float32)
        assert model.config == deep
        assert all(torch.isfinite(p).all() for p in model.parameters())
    values = figures(out / "logs")
    assert torch.isfinite(torch.tensor(values["loss"])) and values["memory/peak_gb"] > 0
    report = {"engine": config_file, "gpu": torch.cuda.get_device_name(), **values}
    record_property("figures", report)
    print(json.dumps(report, indent=2))
    if os.environ.get("TINYFLUX_SCALE_REPORT"):
        path = Path(os.environ["TINYFLUX_SCALE_REPORT"]) / f"{Path(config_file).stem}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """SLURM's variables for task 1 of a 2-node x 4-GPU job, and fake `scontrol` / `srun` commands that log to
    FAKE_LOG: scontrol expands the node list (and records a requeue), srun waits until USR1 or TERM."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [[ "$1 $2" == "show hostnames" ]]; then printf "node01\\nnode02\\n"; '
        'elif [[ "$1 $2" == "show node" ]]; then echo "NodeName=$3 Arch=x86_64"; echo "   NodeAddr=10.0.0.1 NodeHostName=$3"; '
        'else echo "scontrol $*" >> "$FAKE_LOG"; fi\n'
    )
    # SLURM delivers `scancel --signal=USR1 JOB` to every process of the job's steps: here, the fake srun.
    (bin_dir / "scancel").write_text(
        '#!/bin/bash\necho "scancel $*" >> "$FAKE_LOG"\nkill -"${1#--signal=}" "$(cat "$FAKE_LOG.pid")"\n'
    )
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'echo "srun $*" >> "$FAKE_LOG"\n'
        'stop() { echo "srun got $1" >> "$FAKE_LOG"; sleep 0.3; echo "srun exited" >> "$FAKE_LOG"; exit 0; }\n'
        "trap 'stop USR1' USR1\ntrap 'stop TERM' TERM\n"
        'echo $$ > "$FAKE_LOG.pid"\n'
        "for _ in $(seq 600); do sleep 0.1; done\nexit 1\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "VIRTUAL_ENV": sys.prefix,
        "FAKE_LOG": str(log),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }


def test_slurm_launch_line_is_well_formed_for_accelerate(fake_slurm):
    out = subprocess.run(
        ["bash", str(SLURM / "launch.sh"), "runs/deep.yaml", "--total_steps", "100"],
        env={**fake_slurm, "DRY_RUN": "1", "ACCELERATE_CONFIG": "accelerate_configs/fsdp.yaml"},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    assert words[:2] == ["accelerate", "launch"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(words[2:]))
    # the address SLURM has for the first node (its NodeAddr), not its name
    assert (args.num_machines, args.machine_rank, args.main_process_ip) == (2, 1, "10.0.0.1")
    assert args.main_process_port == 20000 + 4242 and args.num_processes == 2 * 4 and args.use_fsdp
    assert args.training_script == "train_tinyflux.py"
    assert args.training_script_args == ["--config", "runs/deep.yaml", "--resume", "latest", "--total_steps", "100"]
    prepare_multi_gpu_env(args)  # what accelerate hands torchrun on this node
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "4")
    assert (args.master_addr, args.master_port) == ("10.0.0.1", "24242")
    override = subprocess.run(
        ["bash", str(SLURM / "launch.sh"), "run.yaml"],
        env={**fake_slurm, "DRY_RUN": "1", "MAIN_ADDR": "192.168.7.7"},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert "--main_process_ip 192.168.7.7" in override.stdout, override.stderr

    bare = {k: v for k, v in fake_slurm.items() if k != "SLURM_NODEID"}
    refused = subprocess.run(["bash", str(SLURM / "launch.sh"), "run.yaml"], env=bare, capture_output=True, text=True)
    assert refused.returncode == 2 and "SLURM_NODEID is not set" in refused.stderr


def test_sbatch_asks_for_requeue_and_an_early_signal(fake_slurm):
    header = [
        line.split()[1] for line in (SLURM / "train.sbatch").read_text().splitlines() if line.startswith("#SBATCH")
    ]
    assert {"--requeue", "--ntasks-per-node=1"} <= set(header)
    assert any(flag.startswith("--gres=gpu:") for flag in header)
    (lead,) = [int(flag.rsplit("@", 1)[1]) for flag in header if flag.startswith("--signal=B:USR1@")]
    out = subprocess.run(
        ["bash", str(SLURM / "train.sbatch"), "runs/deep.yaml"],
        env={**fake_slurm, "DRY_RUN": "1", "SLURM_NODEID": "0"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    srun_line, launch_line = out.stdout.strip().splitlines()
    assert shlex.split(srun_line)[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--machine_rank 0" in launch_line and "--resume latest" in launch_line
    assert not Path(fake_slurm["FAKE_LOG"]).exists()  # a dry run runs nothing
    # torchrun's agent must pass USR1 on to the trainers and give them time to save before the time limit.
    exports = sbatch_exports()
    assert "SIGUSR1" in exports["PET_SIGNALS_TO_HANDLE"].split(",")
    assert 0 < int(exports["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < lead


def run_sbatch_until_signal(env: dict[str, str], signum: int, to_srun: bool) -> tuple[int, list[str]]:
    """Start train.sbatch with the fake srun, send it `signum` once srun runs (and to srun too, as SLURM does on
    pre-emption when to_srun); returns its exit code and the calls log."""
    log = Path(env["FAKE_LOG"])
    job = subprocess.Popen(["bash", str(SLURM / "train.sbatch"), "runs/deep.yaml"], env=env, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not Path(f"{log}.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the fake srun has set its traps before writing its pid; give bash a moment to be in `wait`
    job.send_signal(signum)
    if to_srun:
        os.kill(int(Path(f"{log}.pid").read_text()), signum)
    job.communicate(timeout=30)
    return job.returncode, log.read_text().splitlines()


def test_sbatch_usr1_asks_the_trainers_to_save_waits_then_requeues(fake_slurm):
    code, calls = run_sbatch_until_signal(fake_slurm, signal.SIGUSR1, to_srun=False)
    assert code == 0
    assert calls[0].startswith("srun --ntasks-per-node=1") and calls[0].endswith("slurm/launch.sh runs/deep.yaml")
    # USR1 reached every process of the step (scancel); the requeue came only after srun exited.
    assert calls[1:] == ["scancel --signal=USR1 4242", "srun got USR1", "srun exited", "scontrol requeue 4242"]


def test_sbatch_term_waits_for_the_save_and_does_not_requeue(fake_slurm):
    code, calls = run_sbatch_until_signal(fake_slurm, signal.SIGTERM, to_srun=True)
    assert code == 0  # the fake srun's clean save-and-stop
    assert calls[1:] == ["srun got TERM", "srun exited"]  # no requeue: scancel or the time limit ended the job
