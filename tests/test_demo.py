"""`make demo` end to end at a smaller size: every stage writes its files and the loss falls."""

import os
import re
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_pipeline_and_the_loss_falls(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "tinyflux.demo", "--output", str(out), "--images", "48", "--steps", "80"]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "cache" / "manifest.json").is_file()
    ckpt = out / "checkpoints" / "step_0000080"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "ema.safetensors").is_file()
    assert Image.open(out / "samples" / "grid.png").size[0] >= 2 * 64
    assert Image.open(out / "loss_curve.png").size == (640, 360)
    first, last = map(float, re.search(r"first \d+ logs ([\d.]+) -> last \d+ logs ([\d.]+)", result.stdout).groups())
    assert last < 0.8 * first
