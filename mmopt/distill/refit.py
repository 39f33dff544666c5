"""Least-squares refits, no gradients. Pruned feed-forward blocks (``refit_ffn``): each FFN's output Linear (weights
and bias) re-solved so the pruned block reproduces what the original block computes from the same inputs, one solve
per block. A student's projection after its distillation: ``ProjectionRefit``.

Why: pruning 30% of MiniLM's FFN units leaves the output layers summing over units that are gone; re-solving
them on teacher targets closes most of that gap before any training. In the issue-13 research (400 docstring
sentences, judged on everyday development sentences no run saw) the refit on the fit sentences plus 1000
augmented variations raised the cosine to the original from 0.819 to 0.918 *before* recovery; on the fit
sentences alone 0.840 (tokens of one domain pin down too few directions), hence the augmented texts.

Family-agnostic: a block is a pair (fc1, fc2) of Linear module names (``PruneLayout.ffn``), present in both the
pruned student and the original teacher; whatever elementwise activation sits between them is run, not named.
For block i, in order (later blocks see the earlier refits), the student runs up to block i's fc2 and yields
the block input h (fc1's input) and the kept units x (fc2's input); the teacher's own fc1, activation and fc2 map
the same h to y. The forward stops there. Then fc2 <- argmin |x W^T + b - y|^2 + ridge, over every real token
(padding masked out) of every batch.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    import torch

    from mmopt.core import Model

RIDGE = 1e-3          # relative to the mean variance of the kept units; 1e-1 was worse in the research (0.797)
# Fewer tokens than this many per kept unit: no block is refitted. The research's good fit had 25 (27,216 tokens,
# 1,075 units: 0.918 on everyday text); 16 calibration texts (under 1 token per unit) made MiniLM worse
# (0.81 -> 0.72 after recovery, tests/passes/test_prune.py's end-to-end run before this guard).
MIN_TOKENS_PER_UNIT = 10


class _Stop(Exception):
    """Raised by a hook once a forward has produced what the refit needs: the rest of the model is not run."""


def refit_ffn(student: Model, teacher: Model, blocks: list[tuple[str, str]], batches: Callable[[], Iterable[tuple]],
              run: Callable[[Model, tuple], Any], ridge: float = RIDGE,
              on_block: Callable[[], None] | None = None) -> dict:
    """Re-solve every block's fc2 of ``student`` (module names relative to the root) so it maps the kept units to
    the teacher block's output on the student's own block inputs. ``batches()`` yields input tuples (called once
    per block); ``run(model, inputs)`` runs the part. Returns {"blocks", "tokens", "error_before", "error_after",
    "seconds"}: the relative squared error of the blocks' outputs on the fit data, summed over blocks."""
    import torch

    started = time.perf_counter()
    err_before = err_after = total = 0.0
    tokens, refitted = 0, 0
    with torch.no_grad():
        for fc1, fc2 in blocks:
            stats = _accumulate(student, teacher, fc1, fc2, batches(), run)
            out = student.module.get_submodule(fc2)
            tokens = stats["n"]
            if tokens < MIN_TOKENS_PER_UNIT * out.in_features:
                break                       # the same tokens feed every block: none has enough
            w, b = _solve(stats, ridge)
            err_before += _error(stats, out.weight.double(), out.bias.double() if out.bias is not None else None)
            if out.bias is None:            # no bias to absorb the mean: solve without one
                w, b = _solve(stats, ridge, centred=False), None
            err_after += _error(stats, w, b)
            total += float(stats["yy"])
            out.weight.copy_(w.to(out.weight.dtype))
            if b is not None:
                out.bias.copy_(b.to(out.bias.dtype))
            refitted += 1
            if on_block is not None:
                on_block()
    return {"blocks": refitted, "tokens": tokens, "error_before": round(err_before / max(total, 1e-12), 5),
            "error_after": round(err_after / max(total, 1e-12), 5), "seconds": round(time.perf_counter() - started, 2)}


def _accumulate(student: Model, teacher: Model, fc1: str, fc2: str, batches: Iterable[tuple],
                run: Callable[[Model, tuple], Any]) -> dict:
    """Sufficient statistics (x^T x, x^T y, sums, y.y, count) of one block over every real token.

    One partial forward of the student per batch: its fc1 returns its own kept units and, beside them, the
    teacher's fc1 on the same input, so the activation between runs on both at once; the teacher's fc2 then reads
    its half. Running the teacher from its first layer instead, as before, took 1.65x as long (MiniLM FFN
    -30 %: 253 s against 153 s)."""
    import torch

    s1, s2 = student.module.get_submodule(fc1), student.module.get_submodule(fc2)
    t1, t2 = teacher.module.get_submodule(fc1), teacher.module.get_submodule(fc2)
    stats: dict = {"n": 0}
    for inputs in batches:
        seen: dict[str, torch.Tensor] = {}

        def both(_m, args, output):
            seen["kept"] = output.shape[-1]
            return torch.cat([output, t1(args[0])], dim=-1)

        def grab(_m, args):
            seen["x"] = args[0]
            raise _Stop

        _run_until(student, inputs, run, (s1.register_forward_hook(both), s2.register_forward_pre_hook(grab)))
        x, kept = seen["x"], seen["kept"]
        if x.shape[-1] != kept + t1.out_features:
            raise ValueError(f"{fc1} -> {fc2}: the refit needs an elementwise activation between them")
        keep = token_mask(inputs, x)
        rows = x.reshape(-1, x.shape[-1])[keep]
        _add_rows(stats, rows[:, :kept], t2(rows[:, kept:]))
    if not stats["n"]:
        raise ValueError("the refit got no tokens")
    return stats


def _add_rows(stats: dict, x: torch.Tensor, y: torch.Tensor) -> None:
    """Add rows (x, y) to the sufficient statistics of a least-squares fit, in float64."""
    x, y = x.double(), y.double()
    for key, value in (("xx", x.T @ x), ("xy", x.T @ y), ("xs", x.sum(0)), ("ys", y.sum(0)), ("yy", (y * y).sum())):
        stats[key] = stats[key] + value if key in stats else value
    stats["n"] += x.shape[0]


def _run_until(model: Model, inputs: tuple, run: Callable[[Model, tuple], Any], hooks: tuple) -> None:
    try:
        run(model, inputs)
    except _Stop:
        pass
    finally:
        for hook in hooks:
            hook.remove()


def token_mask(inputs: tuple, x: torch.Tensor) -> torch.Tensor:
    """Real tokens: where the inputs carry an attention mask shaped like the block's (batch, tokens), its ones;
    otherwise every position (images, and text families whose padding the model sees anyway)."""
    import torch

    lead = tuple(x.shape[:-1])
    for t in inputs[1:]:
        if isinstance(t, torch.Tensor) and tuple(t.shape) == lead and not t.is_floating_point():
            return t.reshape(-1).bool()
    return torch.ones(int(torch.tensor(lead).prod()), dtype=torch.bool, device=x.device)


def _solve(stats: dict, ridge: float, centred: bool = True) -> Any:
    """Ridge least squares on the accumulated statistics; centred: (W, b) with b absorbing the means."""
    import torch

    n = stats["n"]
    if centred:
        xm, ym = stats["xs"] / n, stats["ys"] / n
        cxx = stats["xx"] / n - torch.outer(xm, xm)
        cxy = stats["xy"] / n - torch.outer(xm, ym)
    else:
        cxx, cxy = stats["xx"] / n, stats["xy"] / n
    lam = ridge * cxx.diagonal().mean()
    w = torch.linalg.solve(cxx + lam * torch.eye(cxx.shape[0], dtype=cxx.dtype, device=cxx.device), cxy).T
    return (w, ym - w @ xm) if centred else w


def _error(stats: dict, w: Any, b: Any) -> float:
    """sum |x W^T + b - y|^2 over the accumulated tokens, from the statistics alone."""
    n = stats["n"]
    w = w.to(stats["xx"])
    quad = (w @ stats["xx"] * w).sum() - 2 * (w * stats["xy"].T).sum()
    if b is not None:
        b = b.to(stats["xx"])
        quad = quad + 2 * b @ (w @ stats["xs"]) - 2 * b @ stats["ys"] + n * (b @ b)
    return float(quad + stats["yy"])


class ProjectionRefit:
    """Least-squares refit of a student's projection (the Linear from its sentence embedding to the original's
    width) on what the training already computed: the student's embeddings and the teacher's labels of every
    training batch. No forward pass is added; the rows are summed into a fit's moments as they come.

    Why: the projection is first fitted on the calibration texts and 1000 variations, then moves by small
    gradient steps; the training's batches are thousands more texts, half of them general English sentences.
    all-mpnet-base-v2 -> all-MiniLM-L6-v2, 400 steps, everyday development sentences: 0.538 as trained, 0.573
    re-solved on the second half's batches, 0.586 on all of them (docs/distillation.md). The student moves
    little meanwhile, so its early embeddings are not stale enough to hurt.

    Use: pass it as the engine's ``distill(..., refit=)``; the engine feeds ``observe`` and, after training, calls
    ``apply`` with its held-out score, which keeps the refit only when that score agrees.
    """

    name = "projection_refit"     # the report's key

    def __init__(self, projection: torch.nn.Linear, ridge: float):
        self.projection, self.ridge = projection, ridge
        self.stats: dict = {"n": 0}
        self._latest = None
        self._hook = projection.register_forward_pre_hook(self._grab)

    def _grab(self, _module: Any, args: tuple) -> None:
        self._latest = args[0]

    def observe(self, target: torch.Tensor) -> None:
        """One training step's teacher outputs; the student's embeddings are those of the step's forward."""
        if self._latest is not None:
            _add_rows(self.stats, self._latest.detach(), target.detach())

    def apply(self, score: Callable[[], float]) -> dict:
        """Solve on every process's rows; keep the new weights when ``score`` (held out) is higher with them."""
        import torch

        from mmopt.distill import parallel

        self._hook.remove()
        started = time.perf_counter()
        if not self.stats["n"]:
            return {"samples": 0, "kept": False}
        device = self.stats["xs"].device
        stats = parallel.summed({k: torch.as_tensor(v, dtype=torch.float64, device=device)
                                 for k, v in self.stats.items()})
        samples = int(stats["n"])
        if samples <= stats["xs"].numel():       # fewer rows than features: the first fit stands
            return {"samples": samples, "kept": False}
        before = score()
        old = [p.detach().clone() for p in (self.projection.weight, self.projection.bias)]
        weight, bias = _solve(stats, self.ridge)
        with torch.no_grad():
            self.projection.weight.copy_(weight)
            self.projection.bias.copy_(bias)
            after = score()
            if after <= before:
                self.projection.weight.copy_(old[0])
                self.projection.bias.copy_(old[1])
        return {"samples": samples, "held_out_before": round(before, 5), "held_out_after": round(after, 5),
                "kept": after > before, "seconds": round(time.perf_counter() - started, 2)}
