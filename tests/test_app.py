"""app.py, the Gradio Space: started as a process on a tiny checkpoint and the tiny zoo, driven through gradio_client
as a visitor's browser drives it. Its image is the one sample.py makes from the same settings."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer_helpers import TINY, perturb
from tinyflux.model.loader import save_model
from tinyflux.model.model import TinyFluxDeep

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny_zoo_path):
    """One page for the module's tests (starting one takes seconds): (url, checkpoint directory)."""
    tmp_path = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    model = TinyFluxDeep(TINY)
    perturb(model)  # not the zero-initialised output layer: the image depends on the prompt
    save_model(model, tmp_path / "checkpoint")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    argv = ["--model", str(tmp_path / "checkpoint"), "--zoo", str(tiny_zoo_path), "--port", str(port)]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    try:
        assert process.poll() is None, process.communicate()[0].decode()[-3000:]
        yield url, tmp_path / "checkpoint"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_space_samples_what_sample_py_samples(app_url, tiny_zoo_path, tmp_path):
    import sample

    url, checkpoint = app_url
    client = gradio_client.Client(url, verbose=False)
    settings = ("a red circle", "", 3, 4.0, 5, 64, 48)  # prompt, negative, steps, guidance, seed, height, width
    first = np.asarray(Image.open(client.predict(*settings, api_name="/generate")))
    assert first.shape == (64, 48, 3)
    again = np.asarray(Image.open(client.predict(*settings, api_name="/generate")))
    other = np.asarray(Image.open(client.predict(*settings[:4], 6, 64, 48, api_name="/generate")))
    assert np.array_equal(first, again) and not np.array_equal(first, other)  # the seed decides

    argv = ["--model", str(checkpoint), "--zoo", str(tiny_zoo_path), "--prompt", "a red circle"]
    argv += ["--negative_prompt", "", "--num_steps", "3", "--guidance_scale", "4.0", "--seed", "5"]
    assert sample.cli([*argv, "--height", "64", "--width", "48", "--output", str(tmp_path / "s")]) == 0
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "s" / "000_a_red_circle.png")))

    jobs = [client.submit(f"a shape {i}", "", 2, 3.0, i, 32, 32, api_name="/generate") for i in range(3)]
    assert [Image.open(job.result(timeout=120)).size for job in jobs] == [(32, 32)] * 3  # queued, one at a time

    with pytest.raises(Exception, match="Type a prompt first"):
        client.predict("  ", "", 2, 3.0, 0, 32, 32, api_name="/generate")


def test_one_generation_at_a_time(tiny_zoo_path, tmp_path):
    import app

    save_model(TinyFluxDeep(TINY), tmp_path / "checkpoint")
    sampler = app.load_sampler(app.AppArgs(model=str(tmp_path / "checkpoint"), zoo=str(tiny_zoo_path), device="cpu"))
    assert set(sampler.zoo.loaded) == {"t5", "clip", "vae"}  # at start, not on the first click
    demo = app.build_demo(sampler)
    # the button and Enter in the prompt box share one queue of one
    assert [(fn.concurrency_limit, fn.concurrency_id) for fn in demo.fns.values()] == [(1, "model")] * 2


def system_chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) from the system's packages (Debian: chromium, chromium-driver), or None."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(system_chromium() is None, reason="no Chromium + chromedriver from the system's packages")
def test_a_headless_browser_types_a_prompt_and_an_image_appears(app_url):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = system_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.get(app_url[0])
        wait = WebDriverWait(driver, 120)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "textarea[placeholder='a lighthouse at dusk']"))
        box.send_keys("a red circle")
        driver.find_element(By.XPATH, "//button[normalize-space()='Generate']").click()
        image = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "img[src*='/file='], img[src*='gradio_api/file']"))
        assert wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", image)) == 512
    finally:
        driver.quit()


def test_a_lora_scale_slider_moves_between_the_base_and_the_adapted_model(tiny_zoo_path, tmp_path):
    import app
    from tests.test_lora import base_model
    from tests.test_lora_sampling import trained_adapter
    from tinyflux.frozen.zoo import ModelZoo
    from tinyflux.sampling import sampler as sampling
    from tinyflux.sampling.sampler import Sampler
    from tinyflux.trainer.lora import Adapter

    save_model(base_model(), tmp_path / "base")
    trained_adapter(tmp_path / "adapter", seed=1)
    args = app.AppArgs(
        model=str(tmp_path / "base"),
        zoo=str(tiny_zoo_path),
        device="cpu",
        dtype="float32",
        lora=[str(tmp_path / "adapter")],
        lora_scale=[0.5],
    )
    page_sampler = app.load_sampler(args)
    demo = app.build_demo(page_sampler, lora_scales=[0.5])
    generate = next(iter(demo.fns.values())).fn
    settings = ("a red circle", "", 2, 3.0, 7, 32, 32)

    def reference(scale: float | None) -> np.ndarray:
        zoo = ModelZoo(device="cpu", dtype=torch.float32, zoo=str(tiny_zoo_path), t5_layers=TINY.t5_layers)
        loras = [] if scale is None else [Adapter(str(tmp_path / "adapter"), scale)]
        shift = page_sampler.shift
        sampler = Sampler(zoo, base_model(), device="cpu", dtype=torch.float32, shift=shift, loras=loras)
        images = sampler.generate(
            ["a red circle"], num_steps=2, guidance_scale=3.0, height=4, width=4, seed=7, negative_prompt=""
        )
        return np.asarray(sampling.to_pil(images[0]))

    page = {factor: np.asarray(generate(*settings, factor)) for factor in (0.0, 2.0, 1.0)}
    assert np.array_equal(page[0.0], reference(None))  # factor 0: the base model
    assert np.array_equal(page[2.0], reference(1.0))  # factor x --lora_scale 0.5
    assert np.array_equal(page[1.0], reference(0.5)) and not np.array_equal(page[1.0], page[0.0])
