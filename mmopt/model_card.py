"""The output's model card (README.md): what mmopt did, as Hugging Face users expect to read it on a model folder.

The original card, when the source had one, is kept below mmopt's section with its metadata header (license,
tags, pipeline) carried over, so what it says about the model stays with it."""
from __future__ import annotations

import json
from pathlib import Path

from mmopt.units import format_bytes

CARD = "README.md"


def write(report: dict, manifest: dict, folder: Path) -> None:
    """Write ``folder/README.md`` from the run's ``report`` and ``manifest``, over a copied original card."""
    card = folder / CARD
    original = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    front, body = _split_front_matter(original)
    card.write_text(render(report, manifest, front, body), encoding="utf-8")


def _split_front_matter(text: str) -> tuple[list[str], str]:
    """(the lines between the leading ``---`` markers, the rest)."""
    lines = text.splitlines()
    if lines and lines[0].strip() == "---" and "---" in (line.strip() for line in lines[1:]):
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
        return lines[1:end], "\n".join(lines[end + 1:]).strip()
    return [], text.strip()


def source_words(source: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in source.items() if k in ("source", "name", "path", "weights"))


def render(report: dict, manifest: dict, front: list[str], body: str) -> str:
    from mmopt import registry

    versions = manifest.get("versions", {})
    tags = [line for line in front if not line.startswith(("library_name:",))]
    header = ["---", *tags]
    if not any(line.startswith("tags:") for line in tags):
        header.append("tags:")
    at = header.index("tags:") if "tags:" in header else None
    if at is not None:
        header.insert(at + 1, "- mmopt")
    header.append("---")
    lines = header + ["", f"# Optimized by mmopt {versions.get('mmopt') or ''}".rstrip(), "",
                      f"Made from `{source_words(manifest['source'])}` by these passes, in order:", ""]
    for step in report["passes"]:
        options = ", ".join(f"{k}: {json.dumps(v)}" for k, v in step["config"].items() if v not in (None, [], {}))
        summary = (registry.pass_class(step["name"]).__doc__ or "").strip().splitlines()[:1]
        lines.append(f"1. `{step['name']}` {{{options}}}" + (f": {summary[0]}" if summary else ""))
    if report.get("random_weights"):
        lines += ["", "**The source had no trained weights (random initialisation): the figures below say nothing "
                      "about quality.**"]
    lines += ["", "## Sizes", "", "| part | weights in memory, before | after | on disk, before | after |",
              "|---|---|---|---|---|"]
    for part, data in report["parts"].items():
        before, after = data["before"], data["after"]
        lines.append(f"| {part} | {format_bytes(before.get('weight_bytes'))} | "
                     f"{'removed' if after.get('removed') else format_bytes(after.get('weight_bytes'))} | "
                     f"{format_bytes(before.get('checkpoint_bytes'))} | {format_bytes(after.get('checkpoint_bytes'))} |")
    totals = report["totals"]
    lines.append(f"| all | {format_bytes(totals['before']['weight_bytes'])} | "
                 f"{format_bytes(totals['after']['weight_bytes'])} | "
                 f"{format_bytes(totals['before']['checkpoint_bytes'])} | "
                 f"{format_bytes(totals['after']['checkpoint_bytes'])} |")
    lines += ["", "Weights in memory and files on disk are measured (bytes of the tensors, sizes of the files).", "",
              "## Fidelity", "", "How close this model's outputs are to the original's:", "",
              "| part | cosine, mean / min | same nearest neighbour | inputs |", "|---|---|---|---|"]
    for part, data in report["parts"].items():
        fid = data.get("fidelity")
        if not fid:
            continue
        cosine = "-" if fid.get("mean_cosine") is None else f"{fid['mean_cosine']:.4f} / {fid['min_cosine']:.4f}"
        agreement = f"{fid['neighbor_agreement']:.1%}" if "neighbor_agreement" in fid else "-"
        broken = fid.get("degenerate", {}).get("optimized")
        lines.append(f"| {part} | {cosine}{' (DEGENERATE: ' + broken + ')' if broken else ''} | {agreement} | "
                     f"{fid['inputs']} |")
    if report.get("gates"):
        failed = [g for g in report["gates"] if not g["passed"]]
        lines += ["", "Gates: " + ("all passed" if not failed else
                                   "FAILED: " + ", ".join(f"{g['gate']} ({g['part']})" for g in failed)) + "."]
    lines += ["", "## Loading", "", "```python", "import mmopt", "", 'model = mmopt.load("this/folder")'
              "            # or parts=[...] for one part", "```", "",
              "`report.md` and `report.json` beside this card hold every figure; `mmopt.json` says how the folder "
              "was made (recipe hash included)."]
    if body:
        lines += ["", "## The original model card", "", body]
    return "\n".join(lines) + "\n"
