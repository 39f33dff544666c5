"""Gates: thresholds a recipe sets on the optimized model; each gives a row with value, threshold and verdict."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmopt.recipe import Gates

# gate name -> (report lookup on one part, comparison). Fidelity gates at the top level apply to every part;
# size gates at the top level apply to the whole model, and per part under `parts:`.
_PART_GATES = {
    "min_cosine": (lambda p: (p.get("fidelity") or {}).get("mean_cosine"), ">="),
    "min_neighbor_agreement": (lambda p: (p.get("fidelity") or {}).get("neighbor_agreement"), ">="),
    "min_top1_agreement": (lambda p: _class_agreement(p.get("fidelity") or {}), ">="),
    "max_weight_bytes": (lambda p: p["after"].get("weight_bytes"), "<="),
    "max_peak_bytes": (lambda p: _peak_total(p["after"]), "<="),
}
_TOTAL_GATES = ("max_weight_bytes", "max_peak_bytes")
_FIDELITY_GATES = ("min_cosine", "min_neighbor_agreement")


def _class_agreement(fidelity: dict) -> float | None:
    return fidelity.get("top1_agreement", fidelity.get("sign_agreement"))


def _peak_total(measures: dict) -> int | None:
    if measures.get("peak_activation_bytes") is None:
        return None
    return measures["weight_bytes"] + measures["peak_activation_bytes"]


def evaluate(gates: Gates, report: dict) -> list[dict]:
    """One row per gate and part it applies to; a missing value fails the gate (never passes silently)."""
    rows = []
    kept = {part: data for part, data in report["parts"].items() if not data["after"].get("removed")}
    for part, data in kept.items():
        overrides = gates.parts.get(part)
        for name, (lookup, op) in _PART_GATES.items():
            threshold = getattr(overrides, name, None) if overrides is not None else None
            if threshold is None and name not in _TOTAL_GATES:
                threshold = getattr(gates, name)
            if threshold is None:
                continue
            row = _row(name, part, lookup(data), threshold, op)
            broken = (data.get("fidelity") or {}).get("degenerate")
            if broken and name in _FIDELITY_GATES:
                row.update(passed=False, note="degenerate outputs: " + "; ".join(f"{k}: {v}" for k, v in broken.items()))
            rows.append(row)
    for part, data in kept.items():
        # Outputs that carry nothing fail the run even without fidelity gates: a model that returns zeros for
        # every input is broken, whatever the recipe asked about it.
        broken = (data.get("fidelity") or {}).get("degenerate", {}).get("optimized")
        if broken:
            rows.append({"gate": "usable_outputs", "part": part, "value": None, "threshold": "usable", "op": "==",
                         "passed": False, "note": broken})
    weights = sum(d["after"]["weight_bytes"] for d in kept.values())
    if gates.max_weight_bytes is not None:
        rows.append(_row("max_weight_bytes", "all", weights, gates.max_weight_bytes, "<="))
    if gates.max_peak_bytes is not None:
        # Parts run one at a time: all weights resident plus the largest part's activation peak.
        peaks = [d["after"].get("peak_activation_bytes") for d in kept.values()]
        total = None if None in peaks else weights + max(peaks, default=0)
        rows.append(_row("max_peak_bytes", "all", total, gates.max_peak_bytes, "<="))
    for part in gates.parts:
        if part not in report["parts"]:
            rows.append({"gate": "parts", "part": part, "value": None, "threshold": "present", "op": "==",
                         "passed": False, "note": "the gate names a part the output does not have"})
    if gates.max_size_ratio is not None:
        before = report["totals"]["before"]["checkpoint_bytes"]
        after = report["totals"]["after"]["checkpoint_bytes"]
        rows.append(_row("max_size_ratio", "all", round(after / before, 6) if before else None,
                         gates.max_size_ratio, "<="))
    return rows


def _row(gate: str, part: str, value: Any, threshold: Any, op: str) -> dict:
    passed = value is not None and (value >= threshold if op == ">=" else value <= threshold)
    return {"gate": gate, "part": part, "value": value, "threshold": threshold, "op": op, "passed": passed}
