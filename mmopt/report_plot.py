"""report.png: before/after bars per part and a waterfall of what each pass saved (matplotlib, optional)."""
from __future__ import annotations

from pathlib import Path

MIB = 2**20


def waterfall(report: dict) -> list[tuple[str, float]]:
    """(step, weight MiB after it): the original, then the model after each pass."""
    steps = [("original", report["totals"]["before"]["weight_bytes"] / MIB)]
    for row in report.get("passes", []):
        steps.append((row["name"], sum(row["weight_bytes_after"].values()) / MIB))
    return steps


def write_png(report: dict, folder: Path) -> str | None:
    """Write report.png; return a note instead when matplotlib is not installed (the `plot` extra)."""
    try:
        import matplotlib
    except ImportError:
        return "report.png skipped: matplotlib is not installed (pip install 'mmopt[plot]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(report["parts"])
    fig, (bars, fall) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.2
    for i, (key, label) in enumerate((("weight_bytes", "weights"), ("peak_activation_bytes", "peak activation"))):
        # A figure that was not measured (None) draws no bar rather than a bar of 0 MiB.
        before = [_mib(report["parts"][p]["before"].get(key)) for p in parts]
        after = [_mib(report["parts"][p]["after"].get(key)) for p in parts]
        xs = [j + (2 * i - 1.5) * width for j in range(len(parts))]
        bars.bar(xs, before, width, label=f"{label} before", alpha=0.5)
        bars.bar([x + width for x in xs], after, width, label=f"{label} after")
    bars.set_xticks(range(len(parts)), parts)
    bars.set_ylabel("MiB")
    bars.set_title(f"memory per part ({report['memory_method']} activations)")
    bars.legend(fontsize=7)
    steps = waterfall(report)
    for j in range(1, len(steps)):
        low, high = sorted((steps[j][1], steps[j - 1][1]))
        fall.bar(j, high - low, bottom=low, color="tab:green" if steps[j][1] <= steps[j - 1][1] else "tab:red")
    fall.bar(0, steps[0][1], color="tab:gray")
    fall.bar(len(steps), steps[-1][1], color="tab:blue")
    fall.set_xticks(range(len(steps) + 1), [s[0] for s in steps] + ["final"], rotation=20, fontsize=8)
    fall.set_ylabel("weights, MiB")
    fall.set_title("what each pass saved")
    if report.get("random_weights"):
        fig.suptitle("RANDOM WEIGHTS", color="tab:red")
    fig.tight_layout()
    fig.savefig(folder / "report.png", dpi=100)
    plt.close(fig)
    return None


def _mib(value: int | None) -> float:
    return float("nan") if value is None else value / MIB
