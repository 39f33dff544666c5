"""The least-squares refit of pruned FFN output layers (issue 13) and the texts it fits on."""
from __future__ import annotations

import copy

import torch

from mmopt.distill.augment import general_sentences
from mmopt.distill.data import REFIT_GENERAL
from mmopt.distill.refit import ProjectionRefit, _accumulate, refit_ffn, token_mask
from tests.test_distill import TEXTS, bert, data_for  # noqa: F401  (bert is a fixture)


def _pruned(adapter, teacher):
    """The teacher with a third of every FFN's hidden units cut (rows of fc1, columns of fc2), as prune leaves it."""
    student = copy.deepcopy(teacher)
    layout = adapter.prune_layout(student, "text")
    with torch.no_grad():
        for fc1_name, fc2_name in layout.ffn:
            fc1, fc2 = student.module.get_submodule(fc1_name), student.module.get_submodule(fc2_name)
            keep = torch.arange(fc1.out_features)[fc1.out_features // 3:]
            new1 = torch.nn.Linear(fc1.in_features, len(keep))
            new1.weight.copy_(fc1.weight[keep])
            new1.bias.copy_(fc1.bias[keep])
            new2 = torch.nn.Linear(len(keep), fc2.out_features)
            new2.weight.copy_(fc2.weight[:, keep])
            new2.bias.copy_(fc2.bias)
            owner1, _, attr1 = fc1_name.rpartition(".")
            owner2, _, attr2 = fc2_name.rpartition(".")
            setattr(student.module.get_submodule(owner1), attr1, new1)
            setattr(student.module.get_submodule(owner2), attr2, new2)
    return student, layout.ffn


def _output_error(adapter, student, teacher, batches):
    with torch.no_grad():
        return sum(float((adapter.run(student, "text", b) - adapter.run(teacher, "text", b)).pow(2).sum())
                   for b in batches)


def test_refit_lowers_the_block_and_output_error_on_the_calibration_inputs(bert):
    adapter, teacher = bert
    student, ffn = _pruned(adapter, teacher)
    data = data_for(adapter, teacher, augment="on")
    batches = data.refit_batches(extra=40)
    before = _output_error(adapter, student, teacher, batches())
    stats = refit_ffn(student, teacher, ffn, batches, lambda m, b: adapter.run(m, "text", b))
    after = _output_error(adapter, student, teacher, batches())
    assert stats["blocks"] == len(ffn) == 2
    assert stats["error_after"] < stats["error_before"]
    assert after < 0.5 * before
    # Only the output layers changed: the kept units (fc1) are as pruning left them.
    fc1 = ffn[0][0]
    assert torch.equal(student.module.get_submodule(fc1).weight, _pruned(adapter, teacher)[0].module.get_submodule(
        fc1).weight)


def test_refit_targets_are_what_the_teacher_itself_computes(bert):
    """The targets come from the teacher's fc1, activation and fc2 applied to the student's block input, without
    running the teacher; in the first block both see the same input, so they are the teacher forward's own."""
    adapter, teacher = bert
    student, ffn = _pruned(adapter, teacher)
    fc1, fc2 = ffn[0]
    batches = data_for(adapter, teacher, augment="on").refit_batches(extra=20)
    run = lambda m, b: adapter.run(m, "text", b)  # noqa: E731
    with torch.no_grad():
        stats = _accumulate(student, teacher, fc1, fc2, batches(), run)
        xs, ys = [], []
        grabs = [student.module.get_submodule(fc2).register_forward_pre_hook(lambda _m, a: xs.append(a[0])),
                 teacher.module.get_submodule(fc2).register_forward_hook(lambda _m, _a, out: ys.append(out))]
        for b in batches():
            run(student, b), run(teacher, b)
            keep = token_mask(b, xs[-1])
            xs[-1], ys[-1] = xs[-1].reshape(-1, xs[-1].shape[-1])[keep], ys[-1].reshape(-1, ys[-1].shape[-1])[keep]
        for grab in grabs:
            grab.remove()
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    assert stats["n"] == x.shape[0]
    assert torch.allclose(stats["xy"], x.T @ y, rtol=1e-4, atol=1e-6)
    assert torch.allclose(stats["yy"], (y * y).sum(), rtol=1e-4)


def test_refit_of_an_unpruned_model_reproduces_it(bert):
    adapter, teacher = bert
    student = copy.deepcopy(teacher)
    ffn = adapter.prune_layout(student, "text").ffn
    data = data_for(adapter, teacher, augment="on")
    stats = refit_ffn(student, teacher, ffn, data.refit_batches(extra=60), lambda m, b: adapter.run(m, "text", b))
    assert stats["blocks"] == 2 and stats["error_before"] < 1e-9
    assert stats["error_after"] < 1e-3
    assert _output_error(adapter, student, teacher, data.refit_batches(extra=60)()) < 1e-3


def test_too_few_tokens_for_the_kept_units_leave_the_blocks_as_they_are(bert):
    adapter, teacher = bert
    student, ffn = _pruned(adapter, teacher)
    before = {n: p.clone() for n, p in student.module.named_parameters()}
    data = data_for(adapter, teacher, texts=TEXTS[:3])       # ~40 tokens for 43 kept units per block
    stats = refit_ffn(student, teacher, ffn, data.refit_batches(), lambda m, b: adapter.run(m, "text", b))
    assert stats["blocks"] == 0
    assert all(torch.equal(p, before[n]) for n, p in student.module.named_parameters())


def test_refit_texts_are_the_fit_texts_plus_seeded_variations_and_general_sentences(bert):
    adapter, teacher = bert
    texts = data_for(adapter, teacher, augment="on").refit_texts(extra=30)
    again = data_for(adapter, teacher, augment="on").refit_texts(extra=30)
    fit = data_for(adapter, teacher, augment="on").fit
    assert texts == again                                  # deterministic for a seed
    assert len(texts) == len(fit) + 30 + REFIT_GENERAL and set(fit) <= set(texts)
    assert sum(t in general_sentences() for t in texts) == REFIT_GENERAL
    assert len(data_for(adapter, teacher, augment="on", general_text=0).refit_texts(extra=30)) == len(fit) + 30
    assert len(data_for(adapter, teacher, augment="on").refit_texts(extra=30, general=7)) == len(fit) + 37
    held = data_for(adapter, teacher, augment="on").held
    assert not set(held) & set(texts)                      # the held-out split stays unseen
    assert data_for(adapter, teacher, augment="off").refit_texts() == sorted(fit, key=len)


def test_refit_variations_default_to_at_most_four_per_fit_text(bert):
    adapter, teacher = bert
    data = data_for(adapter, teacher, augment="on")
    assert len(data.refit_texts()) == len(data.fit) * 5 + REFIT_GENERAL


def _observed(refit: ProjectionRefit, true_map: torch.nn.Linear, steps: int) -> None:
    """``steps`` training steps as the engine shows them: the student's forward (through the projection), then the
    teacher's labels of the batch, here the outputs of ``true_map``."""
    torch.manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 6)
        refit.projection(x)
        refit.observe(true_map(x).detach())


def test_projection_refit_solves_on_every_step_and_keeps_what_scores_better():
    torch.manual_seed(1)
    true_map, projection = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    probe = torch.randn(32, 6)

    def score() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(projection(probe), true_map(probe), dim=-1).mean())

    refit = ProjectionRefit(projection, ridge=1e-6)
    _observed(refit, true_map, 10)
    out = refit.apply(score)
    assert out["samples"] == 10 * 8
    assert out["kept"] and out["held_out_after"] > out["held_out_before"]
    assert torch.allclose(projection.weight, true_map.weight, atol=1e-3)
    assert torch.allclose(projection.bias, true_map.bias, atol=1e-3)
    assert not projection._forward_pre_hooks                            # the hook is gone after apply


def test_projection_refit_that_scores_worse_or_lacks_rows_leaves_the_projection_as_it_was():
    torch.manual_seed(2)
    true_map, projection = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    before = [p.detach().clone() for p in projection.parameters()]
    refit = ProjectionRefit(projection, ridge=1e-6)
    _observed(refit, true_map, 4)
    scores = iter([0.9, 0.5])            # held out: before the refit, then with it
    out = refit.apply(lambda: next(scores))
    assert not out["kept"] and out["held_out_after"] < out["held_out_before"]
    assert all(torch.equal(a, b) for a, b in zip(before, projection.parameters()))

    few = ProjectionRefit(projection, ridge=1e-6)         # no training step (stopped at once): nothing to solve
    assert few.apply(lambda: 1.0) == {"samples": 0, "kept": False}
    assert all(torch.equal(a, b) for a, b in zip(before, projection.parameters()))
