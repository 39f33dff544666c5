"""The ``mmopt`` command: parse, make one API call, render. Heavy imports happen inside the commands."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Shrink CLIP, BERT-family and ResNet-family models; see where their memory goes.")
_state = {"debug": False}


def _consoles():
    from rich.console import Console

    return Console(), Console(stderr=True)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    _state["debug"] = debug


@app.command()
def optimize(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    json_: bool = typer.Option(False, "--json", help="Print the report as one JSON document on stdout."),
    check: bool = typer.Option(False, "--check", help="Only evaluate the gates on the existing output."),
) -> None:
    """Apply RECIPE: load the model, run its passes, write the checkpoint and the before/after report."""
    from mmopt import api, report

    out, err = _consoles()
    if check:
        result = api.check(recipe)
    else:
        result = api.optimize(recipe, force=force, progress=report.progress_for(err))
    if json_:
        _print_json(result)
    elif check:
        report.show_gates(result, out)
    else:
        report.show(result, out)
    if not result["passed"]:
        raise typer.Exit(1)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="The recipe YAML file.")) -> None:
    """Check RECIPE (schema, pass options, calibration data) without loading a model."""
    from mmopt import api

    parsed = api.validate(recipe)
    names = ", ".join(p.name for p in parsed.passes) or "no passes"
    typer.echo(f"ok: {recipe} ({parsed.model.source} model; {names}; output {parsed.output_path})")


@app.command()
def profile(
    model: str = typer.Argument(..., help="open_clip:ARCH, hf:PATH, torchvision:NAME, or a folder."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Local weights for open_clip / torchvision."),
    part: Optional[str] = typer.Option(None, "--part", help="Only this part (visual, text)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help="Image side (default: the model's)."),
    seq_len: int = typer.Option(128, "--seq-len", min=1, help="Token sequence length."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16."),
    train: bool = typer.Option(False, "--train", help="Estimate a training step (2 optimizer steps) instead."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | sgd (with --train)."),
    amp: Optional[str] = typer.Option(None, "--amp", help="bf16 | fp16: autocast the forward."),
    grad_ckpt: bool = typer.Option(False, "--grad-ckpt", help="The model's own gradient checkpointing (--train)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="A memory budget (8GiB): find the largest batch."),
    offload: Optional[str] = typer.Option(None, "--offload", help="cpu: weights in CPU memory, moved per block."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Video frames through the image part ..."),
    window: Optional[int] = typer.Option(None, "--window", help="... encoded this many at a time."),
    what_if: bool = typer.Option(False, "--what-if", help="Table of techniques and the memory each reaches."),
    measure: bool = typer.Option(False, "--measure", help="Also measure on CUDA, beside the estimate."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Show where MODEL's memory goes: per part and module, and the inference (or training) peak."""
    from mmopt import api, report

    out, _ = _consoles()
    result = api.profile(model, weights=weights, part=part, batch_size=batch, image_size=image_size,
                         seq_len=seq_len, dtype=dtype, train=train, optimizer=optimizer, amp=amp,
                         grad_ckpt=grad_ckpt, budget=budget, offload=offload, frames=frames, window=window,
                         what_if=what_if, measure=measure)
    if json_:
        _print_json(result)
    else:
        report.show_profile(result, out)


def _print_json(data: dict) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _raise_interrupt(signum, frame) -> None:
    from mmopt.checkpoint import INTERRUPTED

    INTERRUPTED.set()
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: runs the app and turns every error into one line and a fixed exit code."""
    import click

    from mmopt.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USER_ERROR, MmoptError, describe_foreign, first_line

    # SIGTERM unwinds like Ctrl-C, so temporary output is removed; SIGINT is re-armed because a shell starts
    # background jobs with it ignored.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    debug = "--debug" in sys.argv[1:]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")      # nothing is downloaded, ever
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        code = app(standalone_mode=False)
        if code == EXIT_INTERRUPTED:           # typer turns KeyboardInterrupt into Exit(130) by itself
            _fail("interrupted; no partial output was left", None)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _fail("interrupted; no partial output was left", None)
        code = EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        code = EXIT_USER_ERROR if exc.exit_code == 2 else exc.exit_code
    except MmoptError as exc:
        if debug:
            raise
        _fail(exc.message, exc.hint)
        code = exc.exit_code
    except Exception as exc:  # the one place unexpected errors become a single line
        if debug:
            raise
        mapped = describe_foreign(exc)
        if mapped is not None:
            _fail(mapped.message, mapped.hint)
            code = mapped.exit_code
        else:
            _fail(f"internal error: {type(exc).__name__}: {first_line(exc)}",
                  "run with --debug for the traceback")
            code = EXIT_INTERNAL
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, hint: Optional[str]) -> None:
    sys.stderr.write(f"error: {message}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")


if __name__ == "__main__":
    main()
