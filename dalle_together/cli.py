"""The ``dalle-together`` command line: thin wrappers that build configs and call the library.

Every failure the user can fix is a :class:`UserError`, printed as one ``error:`` line with exit
status 2; nothing the user typed should ever produce a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dalle_together.config import RunConfig, preset, with_image_size
from dalle_together.errors import UserError

app = typer.Typer(
    name="dalle-together",
    help="Train a DALL-E-style text-to-image transformer, alone or together over the Internet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
log = logging.getLogger("dalle_together")

PresetOpt = Annotated[str, typer.Option("--preset", help="Model size: tiny, small or full.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
ImageSizeOpt = Annotated[
    int | None, typer.Option("--image-size", help="Image side in pixels (default: the preset's).")
]


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA GPU is available here")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    return device


def _build_config(preset_name: str, image_size: int | None) -> RunConfig:
    cfg = preset(preset_name)
    return with_image_size(cfg, image_size) if image_size is not None else cfg


def _time_limit_options(steps: int | None, minutes: float | None) -> None:
    if steps is not None and steps <= 0:
        raise UserError("--steps must be a positive number")
    if minutes is not None and minutes <= 0:
        raise UserError("--minutes must be positive")


@app.command("train-vqvae")
def train_vqvae_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory to write the image tokenizer to.")],
    preset_name: PresetOpt = "tiny",
    minutes: Annotated[float | None, typer.Option(help="Training time (default: the preset's).")] = None,
    steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    image_size: ImageSizeOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Train the image tokenizer (a VQ-VAE) on shapes and report its reconstruction PSNR."""
    from dalle_together.tokenizers.vqvae import save_vqvae, train_vqvae

    cfg = _build_config(preset_name, image_size)
    _time_limit_options(steps, minutes)
    with _progress() as progress:
        total = (minutes or cfg.vq.train_minutes) * 60
        task = progress.add_task("VQ-VAE", total=total, info="")
        started = time.monotonic()

        def on_step(step: int, metrics: dict[str, float]) -> None:
            progress.update(
                task, completed=time.monotonic() - started, info=f"step {step} loss {metrics['loss']:.4f}"
            )

        model, metrics = train_vqvae(
            cfg.vq, seed=cfg.data.seed, minutes=minutes, steps=steps, device=device, on_step=on_step
        )
    save_vqvae(model, out)
    console.print(f"held-out reconstruction PSNR: {metrics['psnr']:.2f} dB")
    print(out / "vqvae.safetensors")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="Run directory: tokenizers and checkpoints go here.")],
    preset_name: PresetOpt = "tiny",
    steps: Annotated[int | None, typer.Option(help="Train until this global step.")] = None,
    minutes: Annotated[
        float | None, typer.Option(help="Wall-clock budget of this call, tokenizer training included.")
    ] = None,
    image_size: ImageSizeOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Train tokenizers (or reuse them) and the transformer on shapes; resumes from OUT."""
    from dalle_together.train import TrainState
    from dalle_together.train import train as run_training

    cfg = _build_config(preset_name, image_size)
    _time_limit_options(steps, minutes)
    _check_device(device)
    with _progress() as progress:
        if steps is not None:
            task = progress.add_task("train", total=steps, info="")
        else:
            task = progress.add_task("train", total=minutes * 60, info="")
        started = time.monotonic()
        last_step, last_time, rate = 0, started, 0.0

        def on_progress(state: TrainState, metrics: dict[str, float]) -> None:
            nonlocal last_step, last_time, rate
            now = time.monotonic()
            if now - last_time >= 2.0:
                rate = (state.step - last_step) * cfg.optim.batch_size / (now - last_time)
                last_step, last_time = state.step, now
            done = state.step if steps is not None else now - started
            progress.update(
                task, completed=done, info=f"step {state.step} loss {state.loss:.3f} {rate:.0f} samples/s"
            )

        result = run_training(cfg, out, steps=steps, minutes=minutes, device=device, on_progress=on_progress)
    console.print(
        f"trained to step {result.state.step}, loss {result.state.loss:.3f}, "
        f"{result.samples_per_second:.0f} samples/s; checkpoint in {out}"
    )


PromptsArg = Annotated[list[str], typer.Argument(help="Captions, e.g. 'a small red circle in the center'.")]


@app.command()
def generate(
    prompts: PromptsArg,
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Run directory or checkpoint directory.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the PNG files.")],
    num_images: Annotated[int, typer.Option("--num-images", help="Images per prompt.")] = 4,
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.5,
    top_k: Annotated[int | None, typer.Option("--top-k")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p")] = None,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = off).")] = 1.0,
    scale: Annotated[int, typer.Option(help="Enlargement of the grid image.")] = 4,
    device: DeviceOpt = "cpu",
) -> None:
    """Draw images for each prompt; prints the path of every PNG written, one per line."""
    from dalle_together.inference import SamplingOptions, generate_images, load_bundle, make_grid, save_png

    if num_images <= 0:
        raise UserError("--num-images must be positive")
    if temperature <= 0:
        raise UserError("--temperature must be positive")
    bundle = load_bundle(checkpoint, _check_device(device))
    prompts = [_check_prompt(p, bundle.text_tokenizer) for p in prompts]
    options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance)
    requests = [p for p in prompts for _ in range(num_images)]
    images = generate_images(bundle, requests, seed=seed, options=options)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        prompt_index, image_index = divmod(i, num_images)
        print(save_png(image, out / f"prompt{prompt_index:02d}_{image_index:02d}.png"), flush=True)
    print(save_png(make_grid(images, columns=num_images), out / "grid.png", scale=scale), flush=True)


def _check_prompt(prompt: str, text_tokenizer: object) -> str:
    prompt = prompt.strip()
    if not prompt:
        raise UserError("empty prompt: describe the image, e.g. 'a large blue square in the top left'")
    n = text_tokenizer.num_tokens(prompt)  # type: ignore[attr-defined]
    limit = text_tokenizer.text_len - 1  # type: ignore[attr-defined]
    if n > limit:
        console.print(f"warning: prompt {prompt!r} is {n} tokens; only the first {limit} are used")
    return prompt


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Run directory or checkpoint directory.")],
    num_captions: Annotated[int, typer.Option(help="Captions per split (seen and hold-out).")] = 40,
    seed: Annotated[int, typer.Option()] = 0,
    temperature: Annotated[float, typer.Option()] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    grid: Annotated[
        Path | None, typer.Option(help="Also write a PNG grid of the seen-caption images.")
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Judge generated images with a pixel reader: per-attribute accuracy, seen vs hold-out."""
    from dalle_together.evaluate import ATTRIBUTES
    from dalle_together.evaluate import evaluate as run_evaluation
    from dalle_together.inference import SamplingOptions, load_bundle, make_grid, save_png

    if num_captions <= 0:
        raise UserError("--num-captions must be positive")
    bundle = load_bundle(checkpoint, _check_device(device))
    report = run_evaluation(
        bundle, num_captions=num_captions, seed=seed, options=SamplingOptions(temperature=temperature)
    )
    if grid is not None:
        save_png(make_grid(report.images["seen"], columns=8), grid, scale=4)
    result = {"checkpoint": str(bundle.path), "step": bundle.state.get("step"), **report.as_dict()}
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{bundle.path} (step {bundle.state.get('step')})")
    table.add_column("captions")
    for a in ATTRIBUTES:
        table.add_column(a, justify="right")
    for split in ("seen", "holdout"):
        row = result[split]
        table.add_row(f"{split} ({row['n']})", *(f"{row[a]:.0%}" for a in ATTRIBUTES))
    Console().print(table)
    print(f"VQ-VAE reconstruction PSNR: {report.vqvae_psnr_db:.2f} dB")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
