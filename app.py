"""A Gradio page that samples from a TinyFlux checkpoint: a Hugging Face Space as the Spaces convention lays it out
(app.py + requirements.txt at the top level).

    python app.py --model AbstractPhil/tiny-flux-deep                                  # the released model
    python app.py --model runs/demo/checkpoints/step_0002000 --zoo runs/demo/zoo       # `make app`: the tiny demo

On a Space, name the checkpoint in the TINYFLUX_MODEL variable (a Hub id or a path in the Space) and, for a zoo
directory instead of the real encoders, TINYFLUX_ZOO. The checkpoint and the encoders load once, at start; the queue
runs one generation at a time, so two visitors never run two models at once. --model, --ema, --zoo, --config,
--device, --dtype, --lora and --lora_scale mean what they mean for sample.py; with adapters the page gains a LoRA
scale slider (a factor on every --lora_scale; 0 = the base model).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers import HfArgumentParser

import sample
from tinyflux.errors import TinyFluxError, message
from tinyflux.frozen.sources import VAE_DOWNSAMPLE
from tinyflux.frozen.zoo import ZooError
from tinyflux.model.loader import LoadError
from tinyflux.sampling import sampler as sampling
from tinyflux.sampling.sampler import Sampler
from tinyflux.trainer.lora import parse_adapters, set_scales

MAX_STEPS = 60
MAX_SIDE = 1024  # pixels: a visitor cannot ask for an image that exhausts the Space's memory


@dataclass
class AppArgs:
    model: str = field(
        default=os.environ.get("TINYFLUX_MODEL", "AbstractPhil/tiny-flux-deep"),
        metadata={"help": "checkpoint: a directory, a .safetensors file or a Hub id (env TINYFLUX_MODEL)"},
    )
    ema: Optional[str] = field(
        default=None, metadata={"help": "EMA weights (.safetensors from EMA.save) to sample with"}
    )
    zoo: Optional[str] = field(
        default=os.environ.get("TINYFLUX_ZOO"), metadata={"help": "tiny zoo directory instead of the real encoders"}
    )
    config: Optional[str] = field(default=None, metadata={"help": "model config when the weights carry none"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu), cpu, cuda"})
    dtype: str = field(default="auto", metadata={"help": "auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16"})
    lora: list[str] = field(
        default_factory=list, metadata={"help": "LoRA adapter directories (peft's format) on top of the model"}
    )
    lora_scale: list[float] = field(
        default_factory=list, metadata={"help": "factor on each --lora's update: one for all or one per adapter"}
    )
    port: Optional[int] = field(default=None, metadata={"help": "port (default: Gradio's, GRADIO_SERVER_PORT or 7860)"})


def load_sampler(args: AppArgs) -> Sampler:
    """sample.py's Sampler for the checkpoint, its EMA, adapters and zoo, with the encoders loaded now, not on the
    first visitor's click."""
    sampler = sample.load_sampler(
        sample.SampleArgs(
            model=args.model, ema=args.ema, zoo=args.zoo, config=args.config, device=args.device, dtype=args.dtype,
            lora=args.lora, lora_scale=args.lora_scale,
        )
    )  # fmt: skip
    sampler.zoo.load_t5(), sampler.zoo.load_clip(), sampler.zoo.load_vae()
    return sampler


def build_demo(sampler: Sampler, lora_scales: list[float] | None = None) -> Any:
    """The page: prompt, negative prompt, steps, guidance, seed, size (and, with adapters, a LoRA scale: a factor on
    each adapter's `lora_scales` entry) -> image; behind a queue of one at a time."""
    import gradio as gr

    multiple = VAE_DOWNSAMPLE * sampler.model.config.patch_size

    def generate(
        prompt: str,
        negative_prompt: str,
        steps: float,
        guidance: float,
        seed: float,
        height: float,
        width: float,
        lora_factor: float = 1.0,
    ) -> Any:
        if not prompt.strip():
            raise gr.Error("Type a prompt first.")
        if lora_scales:  # one request at a time (the queue), so setting the scales here cannot race another
            set_scales(sampler.model, [float(lora_factor) * s for s in lora_scales])
        try:
            images = sampler.generate(
                [prompt],
                num_steps=int(steps),
                guidance_scale=float(guidance),
                height=sample.latent_size(int(height), "height", sampler.model.config.patch_size),
                width=sample.latent_size(int(width), "width", sampler.model.config.patch_size),
                seed=int(seed),
                use_ema=sampler.ema is not None,
                negative_prompt=negative_prompt,
            )
        except (TinyFluxError, ValueError) as e:
            raise gr.Error(message(e)) from e
        return sampling.to_pil(images[0])

    with gr.Blocks(title="TinyFlux") as demo:
        gr.Markdown("# TinyFlux\nA compact Flux-style text-to-image model.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder="a lighthouse at dusk")
                negative = gr.Textbox(label="Negative prompt", placeholder="empty: the learned null conditioning")
                steps = gr.Slider(1, MAX_STEPS, value=sampling.DEFAULT_NUM_STEPS, step=1, label="Steps")
                guidance = gr.Slider(1.0, 15.0, value=sampling.DEFAULT_GUIDANCE_SCALE, step=0.5, label="Guidance")
                seed = gr.Number(value=0, precision=0, label="Seed")
                side = sampling.DEFAULT_LATENT_SIZE * VAE_DOWNSAMPLE
                height = gr.Slider(multiple, MAX_SIDE, value=side, step=multiple, label="Height (pixels)")
                width = gr.Slider(multiple, MAX_SIDE, value=side, step=multiple, label="Width (pixels)")
                inputs = [prompt, negative, steps, guidance, seed, height, width]
                if lora_scales:
                    inputs.append(gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA scale (0 = the base model)"))
                button = gr.Button("Generate", variant="primary")
            image = gr.Image(label="Image", format="png")  # lossless: the pixels the model made
        # One queue for the button and Enter: one generation at a time, whoever asks (the sampler holds one model).
        queued = {"concurrency_limit": 1, "concurrency_id": "model"}
        button.click(generate, inputs=inputs, outputs=image, api_name="generate", **queued)
        prompt.submit(generate, inputs=inputs, outputs=image, **queued)
    return demo.queue()


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(AppArgs).parse_args_into_dataclasses(args=argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("app.py: error: the page needs gradio: pip install gradio", file=sys.stderr)
        return 2
    try:
        sampler = load_sampler(args)
    except (TinyFluxError, LoadError, ZooError, FileNotFoundError, ValueError) as e:
        print(f"app.py: error: {message(e)}", file=sys.stderr)
        return 2
    lora_scales = [adapter.scale for adapter in parse_adapters(args.lora, args.lora_scale)] if args.lora else None
    build_demo(sampler, lora_scales).launch(server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
