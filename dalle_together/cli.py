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


# --- collaborative training --------------------------------------------------------------------
#
# `coordinator`, `join` and `status` only parse options and print; the swarm layer does the work.
# Long-running peers stop on SIGINT/SIGTERM through one event: the first signal asks them to leave
# cleanly (during start-up, where nothing waits on the event, it interrupts at once); a second one
# gives up waiting.

MULTI_VALUE_OPTIONS = ("--initial-peers", "--host-maddrs", "--announce-maddrs")
"""Options that take several addresses after one flag, as hivemind's tools do (``--initial-peers A B``)."""

RunIdOpt = Annotated[
    str, typer.Option("--run-id", help="Name of the collaboration (letters, digits, . _ -).")
]
InitialPeersOpt = Annotated[
    list[str],
    typer.Option(
        "--initial-peers",
        help="Multiaddrs of peers in the run, as the coordinator prints them (/ip4/.../tcp/.../p2p/...).",
    ),
]
HostMaddrsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--host-maddrs", help="Where to listen (default /ip4/0.0.0.0/tcp/0: all interfaces, any port)."
    ),
]
AnnounceMaddrsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--announce-maddrs", help="Public addresses to tell others (behind port forwarding), with ports."
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Also show hivemind's own log messages.")]


def _expand_multi_value_options(args: list[str]) -> list[str]:
    """``--initial-peers A B --run-id R`` -> ``--initial-peers A --initial-peers B --run-id R``."""
    out: list[str] = []
    flag, values = None, 0
    for arg in args:
        if flag is not None and not arg.startswith("-"):
            out += [arg] if values == 0 else [flag, arg]
            values += 1
            continue
        flag, values = (arg if arg in MULTI_VALUE_OPTIONS else None), 0
        out.append(arg)
    return out


def _swarm_peer_setup(verbose: bool) -> None:
    """What a long-running peer (coordinator, volunteer) needs before it starts any process."""
    from dalle_together.swarm.dht import detach_children_from_terminal_signals

    _swarm_logging(verbose)
    detach_children_from_terminal_signals()


def _swarm_logging(verbose: bool) -> None:
    from dalle_together.swarm.dht import configure_hivemind_logging

    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    logging.getLogger("dalle_together").setLevel(logging.INFO)
    if not verbose:  # hivemind's background event loops leave pending tasks behind at exit
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    configure_hivemind_logging(verbose=verbose)


class _Shutdown:
    """One event that SIGINT/SIGTERM set; while ``interruptible``, a signal also interrupts at once."""

    def __init__(self) -> None:
        import os
        import threading

        self.event = threading.Event()
        self.interruptible = True
        self._pid = os.getpid()

    def __enter__(self) -> _Shutdown:
        import signal

        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        import os
        import signal

        if os.getpid() != self._pid:  # a process forked from this one (hivemind's): default behaviour
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        again = self.event.is_set()
        self.event.set()
        if again or self.interruptible:
            raise KeyboardInterrupt
        console.print("stopping (press Ctrl-C again to stop at once)")


def _say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _fmt_loss(loss: float | None) -> str:
    import math

    return f"{loss:.3f}" if loss is not None and math.isfinite(loss) else "-"


def _check_run_id(run_id: str) -> str:
    from dalle_together.swarm.records import check_run_id

    return check_run_id(run_id)


@app.command()
def coordinator(
    run_id: RunIdOpt,
    checkpoint_dir: Annotated[
        Path,
        typer.Option(
            "--checkpoint-dir",
            help="The run's directory: tokenizers, identity and checkpoints (generate/evaluate read it).",
        ),
    ],
    preset_name: Annotated[
        str | None,
        typer.Option(
            "--preset", help="Model size: tiny, small or full (default: the directory's run, or tiny)."
        ),
    ] = None,
    host_maddrs: HostMaddrsOpt = None,
    announce_maddrs: AnnounceMaddrsOpt = None,
    target_batch_size: Annotated[
        int | None,
        typer.Option("--target-batch-size", help="Samples per optimizer step, summed over all volunteers."),
    ] = None,
    warmup_steps: Annotated[
        int | None, typer.Option("--warmup-steps", help="Learning-rate warm-up, in optimizer steps (epochs).")
    ] = None,
    total_steps: Annotated[
        int | None, typer.Option("--total-steps", help="Length of the cosine schedule, in optimizer steps.")
    ] = None,
    schedule_minutes: Annotated[
        float | None,
        typer.Option(
            "--schedule-minutes",
            help="End the cosine schedule this many minutes after volunteers can join (after the "
            "tokenizers are trained): the coordinator measures the swarm's pace and publishes the "
            "schedule every peer follows, refitted as the pace changes (instead of --total-steps).",
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    delayed_updates: Annotated[
        bool | None,
        typer.Option(
            "--delayed-updates/--no-delayed-updates",
            help="Average gradients and step the optimizer in the background, applying each update "
            "during the next epoch: for links where averaging takes a good part of an epoch "
            "(default: the preset's).",
        ),
    ] = None,
    local_updates: Annotated[
        bool | None,
        typer.Option(
            "--local-updates/--no-local-updates",
            help="Volunteers step their own optimizer after every local batch and average parameters "
            "every --average-state-every epochs, instead of averaging gradients into one step per "
            "epoch; --lr is then the local step's (default: the preset's, gradient averaging).",
        ),
    ] = None,
    matchmaking_time: Annotated[
        float | None,
        typer.Option("--matchmaking-time", help="Seconds peers spend forming an averaging group."),
    ] = None,
    next_chunk_timeout: Annotated[
        float | None,
        typer.Option(
            "--next-chunk-timeout",
            help="Seconds a peer may go silent in the middle of an averaging round before it is left out.",
        ),
    ] = None,
    average_state_every: Annotated[
        int | None,
        typer.Option(
            "--average-state-every",
            help="Average parameters and optimizer state every N epochs (default: the preset's).",
        ),
    ] = None,
    checkpoint_every_epochs: Annotated[
        int | None, typer.Option("--checkpoint-every-epochs", help="Save the swarm's state every K epochs.")
    ] = None,
    keep_checkpoints: Annotated[
        int | None, typer.Option("--keep-checkpoints", help="Keep the newest M checkpoints.")
    ] = None,
    tokenizer_minutes: Annotated[
        float | None,
        typer.Option(
            "--tokenizer-minutes",
            help="Image tokenizer training time if DIR has none (default: the preset's).",
        ),
    ] = None,
    status_every: Annotated[
        float, typer.Option("--status-every", help="Seconds between status lines.")
    ] = 30.0,
    verbose: VerboseOpt = False,
) -> None:
    """Start a run (or resume it): print the addresses volunteers join through, keep checkpoints."""
    from dalle_together.swarm.coordinator import CoordinatorOptions, describe_config, run_coordinator
    from dalle_together.swarm.dht import DEFAULT_HOST_MADDRS

    _swarm_peer_setup(verbose)
    if status_every <= 0:
        raise UserError("--status-every must be positive")
    if tokenizer_minutes is not None and tokenizer_minutes <= 0:
        raise UserError("--tokenizer-minutes must be positive")
    if lr is not None and lr <= 0:
        raise UserError("--lr must be positive")
    if schedule_minutes is not None and schedule_minutes <= 0:
        raise UserError("--schedule-minutes must be positive")
    if local_updates and delayed_updates is None:
        # not the preset's: there is no gradient round to run in the background (asking for both is
        # refused with the run's other options, in check_swarm_options)
        delayed_updates = False
    options = CoordinatorOptions(
        run_id=_check_run_id(run_id),
        checkpoint_dir=checkpoint_dir,
        preset_name=preset_name,
        overrides={
            "optim.target_batch_size": target_batch_size,
            "optim.warmup_steps": warmup_steps,
            "optim.total_steps": total_steps,
            "optim.lr": lr,
            "swarm.delay_optimizer_step": delayed_updates,
            "swarm.delay_grad_averaging": delayed_updates,
            "swarm.matchmaking_time_s": matchmaking_time,
            "swarm.next_chunk_timeout_s": next_chunk_timeout,
            "swarm.average_state_every": average_state_every,
            "swarm.local_updates": local_updates,
            "swarm.checkpoint_every_epochs": checkpoint_every_epochs,
            "swarm.keep_checkpoints": keep_checkpoints,
        },
        host_maddrs=tuple(host_maddrs or DEFAULT_HOST_MADDRS),
        announce_maddrs=tuple(announce_maddrs or ()),
        tokenizer_minutes=tokenizer_minutes,
        status_every_s=status_every,
        schedule_minutes=schedule_minutes,
    )

    with _Shutdown() as shutdown:

        def on_ready(ready) -> None:
            for address in ready.addresses:
                print(address, flush=True)
            described = describe_config(
                ready.cfg, schedule_minutes=schedule_minutes, schedule_end=ready.schedule_end
            )
            _say(f"run {run_id!r}: {described}")
            if ready.resumed_epoch is not None:
                _say(f"resumed from the checkpoint of epoch {ready.resumed_epoch}")
            if ready.reconnected is not None:
                answered, known = ready.reconnected
                _say(f"reconnected to {answered} of {known} peers it knew before it stopped")
            _say(
                "volunteers join with: dalle-together join --run-id "
                + run_id
                + " --initial-peers "
                + ready.addresses[0]
            )
            shutdown.interruptible = False

        def on_status(s) -> None:
            checkpoint = (
                f"epoch {s.last_checkpoint_epoch}" if s.last_checkpoint_epoch is not None else "none yet"
            )
            _say(
                f"epoch {s.epoch} | {s.samples_per_second:.1f} samples/s | {s.alive_peers} peers "
                f"({s.training_peers} training) | {s.samples_accumulated}/{s.target_batch_size} samples "
                f"| loss {_fmt_loss(s.loss)} | checkpoint {checkpoint}"
            )

        run_coordinator(options, stop=shutdown.event, on_ready=on_ready, on_status=on_status)
    _say("coordinator stopped")


@app.command()
def join(
    initial_peers: InitialPeersOpt,
    run_id: RunIdOpt,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Samples per local step (default: the run's).")
    ] = None,
    device: DeviceOpt = "cpu",
    client_mode: Annotated[
        bool, typer.Option("--client-mode", help="Accept no connections (behind NAT or a firewall).")
    ] = False,
    host_maddrs: HostMaddrsOpt = None,
    announce_maddrs: AnnounceMaddrsOpt = None,
    compression: Annotated[
        str | None,
        typer.Option(
            "--compression",
            help="What this peer sends when averaging: none, fp16 or 8bit (default: the run's).",
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch.")] = None,
    steps: Annotated[int | None, typer.Option(help="Leave after this many local steps.")] = None,
    minutes: Annotated[float | None, typer.Option(help="Leave after training this long.")] = None,
    name: Annotated[str, typer.Option("--name", help="How `status` shows you.")] = "",
    preset_name: Annotated[
        str | None, typer.Option("--preset", help="Expect this preset (an error if the run trains another).")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", help="Where to keep the run's tokenizers (default ~/.cache/dalle-together/RUN)."
        ),
    ] = None,
    report_every: Annotated[
        float, typer.Option("--report-every", help="Seconds between progress lines and metrics updates.")
    ] = 10.0,
    nice: Annotated[
        int,
        typer.Option(
            "--nice",
            help="Compute at this lower priority (0-19), so that averaging and your own programs come first.",
        ),
    ] = 10,
    verbose: VerboseOpt = False,
) -> None:
    """Volunteer: download the run's model and train it together with everybody else."""
    import os

    import torch

    from dalle_together.swarm.dht import DEFAULT_HOST_MADDRS
    from dalle_together.swarm.optimizer import averaging_compression
    from dalle_together.swarm.volunteer import VolunteerOptions, run_volunteer

    _swarm_peer_setup(verbose)
    run_id = _check_run_id(run_id)
    _time_limit_options(steps, minutes)
    _check_device(device)
    if compression is not None:
        averaging_compression(compression, 1)  # an unknown name is a UserError naming the choices
    if threads is not None:
        if threads <= 0:
            raise UserError("--threads must be positive")
        torch.set_num_threads(threads)
    if report_every <= 0:
        raise UserError("--report-every must be positive")
    if not 0 <= nice <= 19:
        raise UserError(f"--nice must be between 0 and 19, not {nice}")
    if len(name) > 64:
        raise UserError("--name is limited to 64 characters")
    if cache_dir is None:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        cache_dir = base / "dalle-together" / run_id
    options = VolunteerOptions(
        run_id=run_id,
        initial_peers=tuple(initial_peers),
        cache_dir=cache_dir,
        batch_size=batch_size,
        preset_name=preset_name,
        compression=compression,
        device=device,
        client_mode=client_mode,
        host_maddrs=tuple(host_maddrs or DEFAULT_HOST_MADDRS),
        announce_maddrs=tuple(announce_maddrs or ()),
        name=name,
        steps=steps,
        minutes=minutes,
        report_every_s=report_every,
        verbose=verbose,
        nice=nice,
    )

    with _Shutdown() as shutdown:

        def on_joined(j) -> None:
            _say(
                f"joined run {run_id!r} ({j.cfg.preset}) at epoch {j.epoch} as {j.peer_id}: "
                f"{j.batch_size} samples per step towards {j.cfg.optim.target_batch_size} per epoch"
            )
            shutdown.interruptible = False

        def on_progress(p) -> None:
            _say(
                f"epoch {p.epoch} | local {p.local_samples_per_second:.1f} samples/s | "
                f"swarm {p.swarm_samples_per_second:.1f} samples/s | {p.peers} peers | "
                f"loss {_fmt_loss(p.loss)} | contributed {p.samples_total} samples | "
                f"waiting {p.waiting_share:.0%}"
            )

        result = run_volunteer(options, stop=shutdown.event, on_joined=on_joined, on_progress=on_progress)
    _say(
        f"left run {run_id!r} at epoch {result.final_epoch} after {result.steps} steps "
        f"({result.samples_total} samples contributed; {result.waiting_share:.0%} of the time "
        "waiting for the swarm)"
    )


@app.command()
def status(
    initial_peers: InitialPeersOpt,
    run_id: RunIdOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the run's definition.")
    ] = 10.0,
) -> None:
    """Show a run as the swarm sees it: epoch, throughput, and every peer's contribution."""
    from dalle_together.swarm.status import query_status

    _swarm_logging(verbose=False)
    logging.getLogger("dalle_together").setLevel(logging.WARNING)
    report = query_status(initial_peers=initial_peers, run_id=_check_run_id(run_id), timeout_s=timeout)
    summary = report.as_dict()
    if as_json:
        print(json.dumps(summary))
        return
    print(
        f"run {summary['run_id']} ({summary['preset']}): epoch {summary['epoch']}, "
        f"{summary['samples_per_second']:.1f} samples/s, {summary['alive_peers']} peers, "
        f"{summary['samples_accumulated']}/{summary['target_batch_size']} samples towards the next epoch, "
        f"loss {_fmt_loss(summary['loss'])}"
    )
    table = Table()
    for column in ("peer", "name", "device", "epoch", "samples", "samples/s", "loss"):
        table.add_column(
            column, justify="right" if column in ("epoch", "samples", "samples/s", "loss") else "left"
        )
    for p in summary["peers"]:
        table.add_row(
            p["peer_id"],
            p["name"],
            p["device"],
            str(p["epoch"]),
            str(p["samples_total"]),
            f"{p['samples_per_second']:.1f}",
            _fmt_loss(p["loss"]),
        )
    Console(width=200).print(table)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.argv[1:] = _expand_multi_value_options(sys.argv[1:])
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
