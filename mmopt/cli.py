"""The ``mmopt`` command: parse, make one API call, render. Heavy imports happen inside the commands."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mmopt.errors import EXIT_CODES

app = typer.Typer(
    no_args_is_help=True, pretty_exceptions_enable=False,
    help="Shrink CLIP, BERT-family and ResNet-family models; see where their memory goes.",
    epilog="Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + ".")
_state = {"debug": False, "verbose": False}


def _consoles():
    from rich.console import Console

    return Console(), Console(stderr=True)


def _show_version(value: bool) -> None:
    if value:
        from mmopt import __version__

        typer.echo(f"mmopt {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    verbose: bool = typer.Option(False, "--verbose", help="Show every warning third-party libraries print."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _state["debug"] = debug
    _state["verbose"] = verbose


@app.command()
def optimize(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    json_: bool = typer.Option(False, "--json", help="Print the report as one JSON document on stdout."),
    check: bool = typer.Option(False, "--check", help="Only evaluate the gates on the existing output."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", metavar="KEY=VALUE",
        help="Override a recipe value without editing the file, e.g. passes.0.quantize.method=nf4 (repeatable; "
             "VALUE is read as YAML)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write here instead of the recipe's output "
                                                                 "(relative to the current folder)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, load the model, print the plan and the memory "
                                                          "before any pass; write nothing."),
    latency: bool = typer.Option(False, "--latency", help="On a CPU, time the forward at the recipe's batch (slow "
                                                          "for float16); by default a batch-1 run is scaled."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream",
                                          help="Cast / strip / quantize (int8) tensor by tensor from a safetensors weights file "
                                               "without loading the model (fidelity is not measured). Default: "
                                               "when the weights would not fit in memory."),
    processes: int = typer.Option(1, "--processes", min=1,
                                  help="Run the distillation data-parallel in N processes on this machine (gloo on "
                                       "CPUs, NCCL with one GPU each); the first writes the output. Or launch with "
                                       "`accelerate launch -m mmopt optimize ...`."),
) -> None:
    """Apply RECIPE: load the model, run its passes, write the checkpoint and the before/after report."""
    from mmopt import api, report
    from mmopt.distill import parallel

    out, err = _consoles()
    overrides = api.Overrides(values=list(set_ or []), output=output)
    if processes > 1:
        if dry_run or check:
            raise typer.BadParameter("--processes shares a run's training; --dry-run and --check train nothing",
                                     param_hint="--processes")
        from mmopt import processes as workers

        api.validate(recipe, overrides)          # bad input is said once, not once per process
        raise typer.Exit(workers.launch(processes, workers.strip_option(sys.argv[1:])))
    if not parallel.is_main() and (dry_run or check):
        return                                   # a launcher's other processes: rank 0 answers
    if dry_run:
        plan = api.plan(recipe, overrides=overrides, progress=report.progress_for(err))
        _print_json(plan) if json_ else report.show_plan(plan, out)
        return
    if check:
        result = api.check(recipe, overrides=overrides)
    else:
        result = api.optimize(recipe, force=force, progress=report.progress_for(err), overrides=overrides,
                              latency=latency, stream=stream)
        if result is None:                       # another process of a launched run: rank 0 reports
            return
    if json_:
        _print_json(result)
    elif check:
        report.show_gates(result, out)
    else:
        report.show(result, out)
    if not result["passed"]:
        raise typer.Exit(1)


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help="As for optimize."),
) -> None:
    """Check RECIPE (schema, pass options, paths, calibration data) without loading model weights."""
    from mmopt import api

    parsed = api.validate(recipe, overrides=api.Overrides(values=list(set_ or [])))
    names = ", ".join(p.name for p in parsed.passes) or "no passes"
    typer.echo(f"ok: {recipe} ({parsed.model.source} model; {names}; output {parsed.output_path})")


@app.command()
def passes(name: Optional[str] = typer.Argument(None, help="One pass: show its options in full.")) -> None:
    """List the passes a recipe can use, with their options and defaults."""
    from mmopt import api, report

    out, _ = _consoles()
    report.show_passes(api.pass_catalog(name), out)


@app.command()
def verify(
    output: Path = typer.Argument(..., help="An mmopt output folder."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Check every file of OUTPUT that a loader reads against its sha256 in mmopt.json.

    A missing or changed file is bad input: one line naming it, exit 2."""
    from mmopt import api

    checked = api.verify(output)
    if json_:
        _print_json({"output": str(output), "ok": True, "files": checked})
    else:
        out, _ = _consoles()
        out.print(f"ok: {len(checked)} files match mmopt.json ({', '.join(checked)})", soft_wrap=True)


@app.command()
def schema() -> None:
    """Print the JSON Schema of a recipe (for editors that check YAML as it is typed)."""
    from mmopt import api

    _print_json(api.recipe_schema())


@app.command()
def profile(
    model: str = typer.Argument(..., help="open_clip:ARCH, hf:PATH, torchvision:NAME, or a folder."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Local weights for open_clip / torchvision."),
    part: Optional[str] = typer.Option(None, "--part", help="Only this part (visual, text)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help="Image side (default: the model's)."),
    seq_len: int = typer.Option(128, "--seq-len", min=1, help="Token sequence length."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: as stored)."),
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


def _click_types() -> tuple[tuple, tuple, tuple, tuple]:
    """(usage errors, aborts, exits, no-args-help) as the installed typer raises them. typer >= 0.20 ships its
    own copy of click (``typer._click``) whose exceptions are not click's, so both are caught."""
    import importlib

    usage, aborts, exits, no_args = [], [typer.Abort], [typer.Exit], []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(module.ClickException)
        aborts += [getattr(module, "Abort")] if hasattr(module, "Abort") else []
        exits += [getattr(module, "Exit")] if hasattr(module, "Exit") else []
        no_args += [getattr(module, "NoArgsIsHelpError")] if hasattr(module, "NoArgsIsHelpError") else []
    return tuple(usage), tuple(aborts), tuple(exits), tuple(no_args)


def main() -> None:
    """Entry point: runs the app and turns every error into one line and a fixed exit code."""
    from mmopt.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USER_ERROR, MmoptError, describe_foreign
    from mmopt.warnings_filter import quiet_third_party

    # SIGTERM unwinds like Ctrl-C, so temporary output is removed; SIGINT is re-armed because a shell starts
    # background jobs with it ignored.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    args = sys.argv[1:]
    debug = "--debug" in args
    os.environ.setdefault("HF_HUB_OFFLINE", "1")      # nothing is downloaded, ever
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    usage_errors, aborts, exits, no_args_help = _click_types()
    code = 0
    try:
        with quiet_third_party(enabled=not (debug or "--verbose" in args)):
            code = app(standalone_mode=False)
        if code == EXIT_INTERRUPTED:           # typer turns KeyboardInterrupt into Exit(130) by itself
            _fail("interrupted; no partial output was left", None)
    except no_args_help:
        code = 0                                # the help was printed: asking for it is not an error
    except exits as exc:
        code = getattr(exc, "exit_code", 0)
    except (*aborts, KeyboardInterrupt):
        _fail("interrupted; no partial output was left", None)
        code = EXIT_INTERRUPTED
    except usage_errors as exc:
        exc.show()                              # click's usage line and its one-line message
        code = EXIT_USER_ERROR
    except MmoptError as exc:
        if debug:
            _traceback()
        _fail(exc.message, exc.hint)
        code = exc.exit_code
    except Exception as exc:  # the one place unexpected errors become a single line
        mapped = describe_foreign(exc)
        if debug:
            _traceback()
        if mapped is not None:
            _fail(mapped.message, mapped.hint)
            code = mapped.exit_code
        else:
            from mmopt.errors import first_line

            _fail(f"internal error: {type(exc).__name__}: {first_line(exc)}",
                  None if debug else "run with --debug for the traceback")
            code = EXIT_INTERNAL
    sys.exit(code if isinstance(code, int) else 0)


def _traceback() -> None:
    import traceback

    traceback.print_exc(file=sys.stderr)


def _fail(message: str, hint: Optional[str]) -> None:
    for line in message.splitlines() or [""]:       # several problems (a recipe's): one line each
        sys.stderr.write(f"error: {line}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")


if __name__ == "__main__":
    main()
