"""Everything people read: the before/after table, report.json / report.md, progress bars, profile tables.

With cli.py the only code that prints; all output goes to the console it is given (stderr for progress).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mmopt.units import format_bytes

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from mmopt.progress import Progress

METHOD_WORDS = {"estimated": "estimated for CUDA (fake-tensor trace, no GPU here)",
                "measured-cuda": "measured on CUDA"}


def write(report: dict, folder: Path) -> None:
    """report.json, report.md and (with matplotlib) report.png; a skipped picture is noted in the report."""
    from mmopt.report_plot import write_png

    note = write_png(report, folder)
    report["artifacts"] = ["report.json", "report.md"] + ([] if note else ["report.png"])
    if note:
        report.setdefault("notes", []).append(note)
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    (folder / "report.md").write_text(markdown(report))


# --- rows shared by the terminal table and markdown -------------------------------------------------------

def _ratio(before: Any, after: Any) -> str:
    if not before or after is None:
        return ""
    return f"{after / before:.2f}x"


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return format_bytes(value)
    if kind == "params":
        return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value:,}"
    if kind == "ms":
        return f"{value:.1f} ms"
    return str(value)


def _cell4(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


ROWS = [("params", "params"), ("weight_bytes", "bytes"), ("checkpoint_bytes", "bytes"),
        ("peak_activation_bytes", "bytes"), ("latency_ms", "ms")]
LABELS = {"params": "params", "weight_bytes": "weights in memory", "checkpoint_bytes": "checkpoint on disk",
          "peak_activation_bytes": "peak activation", "latency_ms": "latency / batch"}


def pass_metrics(report: dict, part: str, name: str) -> list[dict]:
    """What each pass called ``name`` reported about ``part``, in recipe order (``passes[i].metrics.<part>``)."""
    return [row["metrics"][part] for row in report["passes"] if row["name"] == name and part in row["metrics"]]


def _brief(row: dict, metrics: dict) -> str:
    """A pass's metrics for one part in one cell, in the pass's own words (report.json has all of them)."""
    from mmopt import registry

    return registry.make_pass(row["name"], row["config"]).brief(metrics)


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for part, data in report["parts"].items():
        b, a = data["before"], data["after"]
        for key, kind in ROWS:
            after = "removed" if a.get("removed") and key not in ("params", "weight_bytes", "checkpoint_bytes") \
                else _cell(a.get(key), kind)
            rows.append([part, LABELS[key], _cell(b.get(key), kind), after, _ratio(b.get(key), a.get(key))])
        fid = data.get("fidelity")
        if fid:
            # "before" is the reference itself: no figure to show there
            rows.append([part, "cosine to original, mean / min", "-",
                         f"{_cell4(fid['mean_cosine'])} / {_cell4(fid['min_cosine'])}", ""])
            for key, label in (("top1_agreement", "top-1 agreement"), ("sign_agreement", "sign agreement"),
                               ("neighbor_agreement", "same nearest neighbour")):
                if key in fid:
                    rows.append([part, label, "-", f"{fid[key]:.1%}", ""])
            for side, problem in (fid.get("degenerate") or {}).items():
                rows.append([part, f"DEGENERATE {side} outputs", "", problem, ""])
        for row in report.get("passes", []):
            metrics = row.get("metrics", {}).get(part)
            if metrics:
                rows.append([part, row["name"], "", _brief(row, metrics), ""])
    return rows


def headline(report: dict) -> str:
    t = report["totals"]
    ratio = _ratio(t["before"]["checkpoint_bytes"], t["after"]["checkpoint_bytes"])
    words = (f"{format_bytes(t['before']['checkpoint_bytes'])} -> {format_bytes(t['after']['checkpoint_bytes'])} "
             f"on disk ({ratio})")
    verdict = "all gates passed" if report.get("passed", True) else "GATE FAILED"
    if not report.get("gates"):
        verdict = "no gates"
    return f"{words}; {verdict}"


def latency_words(report: dict) -> str:
    """How the latency row was obtained: measured at the batch, or a batch-1 run scaled (a CPU without --latency)."""
    hows = {data[side].get("latency_how") for data in report["parts"].values() for side in ("before", "after")}
    if any(how and how.startswith("estimated") for how in hows):
        return (f"latency on {report['device']} estimated from a batch-1 run times the batch "
                "(`--latency` measures at the batch)")
    return f"latency measured on {report['device']}"


def notes(report: dict) -> list[str]:
    out = []
    if report.get("random_weights"):
        out.append("RANDOM WEIGHTS: the source model had no trained weights; fidelity says nothing about quality.")
    out.append(f"Peak activation memory: {METHOD_WORDS.get(report['memory_method'], report['memory_method'])}, "
               f"batch {report['shapes']['batch_size']}; {latency_words(report)}.")
    for part, data in report["parts"].items():
        fid = data.get("fidelity")
        if fid:
            out.append(f"Fidelity of {part}: on {fid['inputs']}" + (f"; {fid['compute']}." if fid.get("compute")
                                                                      else "."))
        for side in ("before", "after"):
            if data[side].get("note"):
                out.append(f"{side}: {data[side]['note']}.")
            if data[side].get("memory_how") == "CPU trace":
                out.append(f"Peak activation of {part} {side}: traced from a real CPU run (these kernels have no "
                           "fake-tensor version), so it is the CPU allocator's figure, not a CUDA one.")
    for gate in report.get("gates", []):
        if gate.get("note") and not gate["passed"]:
            out.append(f"Gate {gate['gate']} ({gate['part']}) failed: {gate['note']}.")
    return out + list(report.get("notes", []))


def markdown(report: dict) -> str:
    lines = [f"## mmopt: {headline(report)}", ""]
    lines += [f"> {n}" for n in notes(report)] + [""]
    lines += ["| part | measure | before | after | ratio |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    if report.get("gates"):
        lines += ["", "### Gates", "", "| gate | part | value | threshold | result |", "|---|---|---|---|---|"]
        for g in report["gates"]:
            lines.append(f"| {g['gate']} | {g['part']} | {_gate_value(g)} | {g['op']} {_gate_threshold(g)} | "
                         f"{'pass' if g['passed'] else '**FAIL**'} |")
    lines += ["", "### Passes", ""]
    for p in report.get("passes", []):
        lines.append(f"- `{p['name']}` {json.dumps(p['config'])}: {len(p['changed'])} changed, "
                     f"{len(p['skipped'])} skipped")
        for s in p["skipped"][:20]:
            lines.append(f"  - skipped `{s['module']}`: {s['reason']}")
    return "\n".join(lines) + "\n"


def _gate_value(g: dict) -> str:
    v = g["value"]
    if v is None:
        return "n/a"
    return format_bytes(v) if g["gate"].endswith("_bytes") else f"{v:.4g}"


def _gate_threshold(g: dict) -> str:
    t = g["threshold"]
    return format_bytes(t) if g["gate"].endswith("_bytes") else str(t)


# --- terminal ---------------------------------------------------------------------------------------------

def show(report: dict, console: Console) -> None:
    from rich.table import Table

    if report.get("random_weights"):
        console.print("[bold yellow]RANDOM WEIGHTS[/] - the source model had no trained weights")
    table = Table(title=f"mmopt: {report['model'].get('name') or report['model'].get('path')}", title_justify="left")
    for col, justify in (("part", "left"), ("measure", "left"), ("before", "right"), ("after", "right"),
                         ("ratio", "right")):
        table.add_column(col, justify=justify)
    last = None
    for row in table_rows(report):
        if last is not None and row[0] != last:
            table.add_section()
        last = row[0]
        table.add_row(*row)
    console.print(table)
    show_gates(report, console, verdict=False)
    for n in notes(report):
        console.print(f"[dim]{n}[/]")
    console.print(f"wrote {report['output']}  ({headline(report)})")


def show_gates(report: dict, console: Console, verdict: bool = True) -> None:
    """The gate table (and, alone, a verdict line): what `optimize --check` prints."""
    from rich.table import Table

    if report.get("gates"):
        table = Table(title="gates", title_justify="left")
        for col in ("gate", "part", "value", "threshold", "result"):
            table.add_column(col)
        for g in report["gates"]:
            table.add_row(g["gate"], g["part"], _gate_value(g), f"{g['op']} {_gate_threshold(g)}",
                          "[green]pass[/]" if g["passed"] else "[bold red]FAIL[/]")
        console.print(table)
    if verdict:
        failed = sum(not g["passed"] for g in report.get("gates", []))
        console.print(f"{report['output']}: " + ("no gates" if not report.get("gates") else
                      ("all gates passed" if not failed else f"{failed} gate(s) FAILED")))


def show_plan(plan: dict, console: Console) -> None:
    """What ``optimize --dry-run`` prints: the model before any pass, the passes, the output; nothing written."""
    from rich.table import Table

    if plan.get("random_weights"):
        console.print("[bold yellow]RANDOM WEIGHTS[/] - the source model had no trained weights")
    source = plan["model"]
    table = Table(title=f"plan: {source.get('name') or source.get('path')} (dry run: nothing is written)",
                  title_justify="left")
    for col, justify in (("part", "left"), ("params", "right"), ("weights", "right"), ("peak activation", "right"),
                         ("calibration", "left")):
        table.add_column(col, justify=justify)
    for part, data in plan["parts"].items():
        table.add_row(part, _cell(data.get("params"), "params"), format_bytes(data.get("weight_bytes")),
                      format_bytes(data.get("peak_activation_bytes")), data["calibration"])
    console.print(table)
    for i, p in enumerate(plan["passes"]):
        options = ", ".join(f"{k}: {json.dumps(v)}" for k, v in p["config"].items() if v not in (None, [], {}))
        learns = " (learns from calibration data: fidelity on held-out samples)" if p["learns_from_calibration"] \
            else ""
        console.print(f"{i + 1}. {p['name']} {{{options}}}{learns}")
    gates = ", ".join(f"{k} {v}" for k, v in plan["gates"].items()) or "none"
    exists = " (exists: --force replaces it)" if plan["output_exists"] else ""
    console.print(f"gates: {gates}\noutput: {plan['output']}{exists}")
    console.print(f"[dim]Peak activation: {METHOD_WORDS.get(plan['memory_method'], plan['memory_method'])}, "
                  f"batch {plan['shapes']['batch_size']}.[/]")


def show_passes(catalog: list[dict], console: Console) -> None:
    """What ``mmopt passes`` prints: each pass, one line, then its options with type, default and meaning."""
    from rich.table import Table

    for entry in catalog:
        table = Table(title=f"[bold]{entry['name']}[/]: {entry['summary']}", title_justify="left")
        for col in ("option", "type", "default", "meaning"):
            table.add_column(col, overflow="fold")
        for row in entry["options"]:
            table.add_row(row["option"], row["type"], row["default"], row["description"])
        console.print(table)


def show_profile(result: dict, console: Console) -> None:
    from rich.table import Table

    if result.get("random_weights"):
        console.print("[bold yellow]RANDOM WEIGHTS[/] - figures depend only on the architecture")
    shapes = result["shapes"]
    mode = result.get("mode", "inference")
    train = result.get("train")
    extra = (f"; training step, {train['optimizer']}, amp {train['amp'] or 'off'}, "
             f"grad-ckpt {'on' if train['grad_ckpt'] else 'off'}") if train else ""
    inputs = ", ".join(f"{part} {words}" for part, words in result.get("inputs", {}).items())
    console.print(f"[bold]{result['model']}[/]  dtype {result['dtype']}, batch {shapes['batch_size']}"
                  f"{', ' + inputs if inputs else ''}{extra}")
    table = Table(title_justify="left")
    for col in ("part / module", "params", "weights", "activation peak", "act. share"):
        table.add_column(col, justify="left" if col.startswith("part") else "right")
    for part, data in result["parts"].items():
        table.add_row(f"[bold]{part}[/]", _cell(data["params"], "params"), format_bytes(data["weights_bytes"]),
                      format_bytes(data["peak_activation_bytes"]), "100%", end_section=False)
        _tree_rows(table, data["tree"], depth=1)
        table.add_row(f"  [italic]inputs[/]", "", "", format_bytes(data["input_bytes"]), "", end_section=True)
    console.print(table)
    kind = "training step peak" if mode == "train" else "inference peak"
    several = len(result["parts"]) > 1
    which = f" (all weights + running {result['peak_part']}, the larger part; parts run one at a time)" \
        if several and result.get("peak_part") else ""
    console.print(f"weights {format_bytes(result['weights_bytes'])}; peak activation "
                  f"{format_bytes(result['peak_activation_bytes'])} "
                  f"({METHOD_WORDS.get(result['method'], result['method'])}); "
                  f"{kind} {format_bytes(result.get('peak_total_bytes'))} with weights and inputs{which}")
    if several:
        per_part = "; ".join(f"{part} alone {format_bytes(data['peak_total_bytes'])}"
                             for part, data in result["parts"].items())
        both = result.get("peak_total_all_parts_at_once_bytes")
        console.print(f"each part loaded alone: {per_part}" +
                      (f"; all parts running at once {format_bytes(both)}" if both else ""))
    for once in result.get("one_time", []):
        console.print(f"once per process, on top: {once['what']} {format_bytes(once['bytes'])} "
                      f"({once['method']}: {once['how']})")
    for part, data in result["parts"].items():
        _profile_extras(part, data, console)


def _tree_rows(table: Table, rows: list[dict], depth: int, limit: int = 10) -> None:
    for row in rows[:limit]:
        share = row.get("activation_share")
        label = row["module"] if depth == 1 or row["module"].startswith("(") else row["module"].split(".")[-1]
        table.add_row("  " * depth + label,
                      _cell(row["params"], "params"), format_bytes(row["weights_bytes"]),
                      format_bytes(row["activation_bytes"]) if row.get("activation_bytes") is not None else "",
                      f"{share:.0%}" if share else "")
        if depth < 2 and row.get("children"):
            _tree_rows(table, row["children"], depth + 1, limit=4)
    if len(rows) > limit:
        table.add_row("  " * depth + f"... {len(rows) - limit} more", "", "", "", "")


def _profile_extras(part: str, data: dict, console: Console) -> None:
    from rich.table import Table

    train = data.get("train")
    if train:
        b = train["breakdown"]
        parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in b.items() if v)
        console.print(f"[bold]{part}[/] training step peak {format_bytes(train['peak_total_bytes'])} "
                      f"({parts}){'; checkpointing: ' + train['grad_ckpt'] if train.get('grad_ckpt') else ''}")
    measured = data.get("measured")
    if measured:
        key = "peak_total_bytes" if "peak_total_bytes" in measured else "peak_activation_bytes"
        est = measured[f"estimated_{key}"]
        console.print(f"[bold]{part}[/] {key.replace('_', ' ')}: estimated {format_bytes(est)}, measured on CUDA "
                      f"{format_bytes(measured[key])} ({measured['relative_error']:+.1%})")
    off = data.get("offload")
    if off:
        console.print(f"[bold]{part}[/] offload to CPU: GPU peak {format_bytes(off['gpu_peak_bytes'])} instead of "
                      f"{format_bytes(off['without_offload_bytes'])}; largest block {off['largest_block']} "
                      f"({format_bytes(off['largest_block_bytes'])}), {off['blocks']} blocks, "
                      f"{format_bytes(off['resident_bytes'])} resident")
        console.print(f"  model: {off['model']}")
    fr = data.get("frames")
    if fr:
        console.print(f"[bold]{part}[/] {fr['frames']} frames at once: {format_bytes(fr['all_at_once_bytes'])}; "
                      f"{fr['windows']} windows of {fr['window']}: {format_bytes(fr['windowed_bytes'])}")
    bud = data.get("budget")
    if bud:
        mib = lambda n: "-" if n is None else f"{n / 2**20:,.1f} MiB"  # noqa: E731 - close to the budget: MiB
        console.print(f"[bold]{part}[/] budget {format_bytes(bud['budget_bytes'])}: largest batch "
                      f"{bud['batch_size']} ({mib(bud['peak_total_bytes'])}; batch {bud['batch_size'] + 1} "
                      f"needs {mib(bud['next_batch_bytes'])})")
    rows = data.get("what_if")
    if rows:
        table = Table(title=f"what if ({part})", title_justify="left")
        for col in ("technique", "peak", "saving", "how", "note"):
            table.add_column(col, justify="right" if col in ("peak", "saving") else "left")
        for r in rows:
            saving = "" if r["saving_bytes"] in (None, 0) else \
                f"{format_bytes(r['saving_bytes'])} ({r['saving_share']:.0%})"
            table.add_row(r["technique"], format_bytes(r["peak_total_bytes"]), saving, r["how"], r["note"])
        console.print(table)


def progress_for(console: Console) -> Progress:
    """Live bars on a terminal; in logs and pipes, where redrawn bars are noise, a plain line at intervals."""
    return RichProgress(console) if console.is_terminal else PlainProgress(console.file)


class PlainProgress:
    """Progress for logs: a line such as ``[02:10] distilling text: step 120/400, loss 0.0123`` at most every
    ``interval`` seconds, none in a run's first ``interval`` seconds (a quick run, or a quick error, prints
    nothing but its result)."""

    def __init__(self, stream: Any, interval: float = 30.0) -> None:
        import time

        self.stream, self.interval = stream, interval
        self.started = self.last = time.monotonic()
        self.stack: list[dict] = []

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        state = {"description": description, "total": total, "done": 0, "fields": {}}
        self.stack.append(state)
        outer = self

        class _Task:
            def advance(self, n: int = 1, **fields: Any) -> None:
                state["done"] += n
                state["fields"].update(fields)
                outer._maybe_print()

        try:
            self._maybe_print()
            yield _Task()
        finally:
            self.stack.remove(state)

    def _maybe_print(self) -> None:
        import time

        now = time.monotonic()
        if now - self.last < self.interval or not self.stack:
            return
        self.last = now
        elapsed = int(now - self.started)
        words = " > ".join(s["description"] for s in self.stack)
        top = self.stack[-1]
        if top["total"]:
            words += f": {top['done']}/{top['total']}"
        fields = ", ".join(f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                           for k, v in top["fields"].items())
        self.stream.write(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {words}{', ' + fields if fields else ''}\n")
        self.stream.flush()


class RichProgress:
    """Progress bars on a (stderr) console; nested tasks share one live display."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar = None
        self._depth = 0

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        if self._bar is None:
            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 console=self.console, transient=True)
            self._bar.start()
        bar = self._bar
        self._depth += 1
        task_id = bar.add_task(description, total=total, info="")

        class _Task:
            def advance(self, n: int = 1, **fields: Any) -> None:
                info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
                bar.update(task_id, advance=n, info=info)

        try:
            yield _Task()
        finally:
            bar.remove_task(task_id)
            self._depth -= 1
            if self._depth == 0:
                bar.stop()
                self._bar = None
