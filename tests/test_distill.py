"""The distillation engine: held-out split, rate by range test, best weights kept, early stop, augmentation."""
from __future__ import annotations

import copy

import pytest
import torch

from mmopt import registry
from mmopt.calibration import Calibration
from mmopt.core import ModelSpec
from mmopt.distill import Training, describe_run, distill
from mmopt.distill.augment import TextAugmenter, augment_images, general_sentences, vocab_words
from mmopt.distill.data import TensorData, for_part, split
from mmopt.distill.schedule import LR_CEILING, LR_FLOOR, suggest_lr, warmup_cosine

TEXTS = [f"sentence number {i} about topic {i % 3} and a few more words" for i in range(20)]


@pytest.fixture
def bert(tiny_bert_dir):
    adapter = registry.adapter_for("hf")
    teacher = adapter.load(ModelSpec(source="hf", path=str(tiny_bert_dir)))
    return adapter, teacher


def student_of(adapter, teacher):
    student = copy.deepcopy(teacher)
    adapter.keep_layers(student, "text", [0])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():                      # a random BERT's pooled outputs barely depend on its layers
        for p in student.module.encoder.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return student


def data_for(adapter, teacher, augment="off", texts=TEXTS, batch_size=8, general_text=0.5):
    options = Training(augment=augment, batch_size=batch_size, general_text=general_text)
    return for_part(teacher, adapter, "text", _texts(texts), 16, 0, options, "cpu")


_FILES = {}


def _texts(texts):
    import tempfile
    from pathlib import Path

    key = tuple(texts)
    if key not in _FILES:
        path = Path(tempfile.mkdtemp()) / "t.txt"
        path.write_text("\n".join(texts) + "\n")
        _FILES[key] = path
    return Calibration(texts_file=_FILES[key], num_samples=len(texts), num_workers=0)


class Recorder:
    """Records each task's description and the fields of every step."""

    def __init__(self):
        self.tasks, self.fields = [], []

    def task(self, description, total=None):
        recorder = self
        recorder.tasks.append((description, total))

        class _Task:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def advance(self, n=1, **fields):
                recorder.fields.append(fields)

        return _Task()


def test_held_out_split_is_every_fifth_sample_and_never_trained_on(bert):
    fit, held, really = split(list(range(12)))
    assert held == [4, 9] and fit == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11] and really
    assert split([1, 2, 3]) == ([1, 2, 3], [1, 2, 3], False)      # too few: scored on themselves, and said so
    adapter, teacher = bert
    data = data_for(adapter, teacher)
    assert set(data.held).isdisjoint(data.fit) and len(data.held) == 4 and data.augmenter is None


def test_a_given_rate_trains_deterministically_and_keeps_the_best_weights(bert):
    adapter, teacher = bert

    def run_once():
        student = student_of(adapter, teacher)
        progress = Recorder()
        stats = distill(student, teacher, adapter, "text", data_for(adapter, teacher),
                        Training(steps=8, lr=3e-3, eval_every=4, patience=None), seed=1, progress=progress)
        return student, stats, progress

    (a, stats_a, progress), (b, stats_b, _) = run_once(), run_once()
    assert stats_a == {**stats_b, "seconds": stats_a["seconds"]}
    assert all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))
    assert stats_a["lr_source"] == "given" and stats_a["lr"] == 3e-3 and stats_a["range_test"] is None
    assert [s for s, _ in stats_a["curve"]] == [0, 4, 8] and stats_a["steps"] == 8
    assert stats_a["held_out_best"] == max(score for _, score in stats_a["curve"]) > stats_a["held_out_before"]
    assert stats_a["held_out"]["samples"] == 4
    # Progress reports each step's loss and the latest held-out score.
    assert ("distilling text", 8) in progress.tasks and len(progress.fields) == 8
    assert progress.fields[-1]["held_out"] == round(stats_a["curve"][-1][1], 4)


def test_no_rate_given_runs_a_range_test_and_reports_it(bert):
    adapter, teacher = bert
    stats = distill(student_of(adapter, teacher), teacher, adapter, "text", data_for(adapter, teacher),
                    Training(steps=4, eval_every=2), progress=Recorder())
    assert stats["lr_source"] == "range test" and LR_FLOOR <= stats["lr"] <= LR_CEILING
    assert len(stats["range_test"]) > 5 and stats["range_test"][0][0] == pytest.approx(1e-6)


def test_no_gain_on_the_held_out_split_stops_early(bert):
    adapter, teacher = bert
    stats = distill(student_of(adapter, teacher), teacher, adapter, "text", data_for(adapter, teacher),
                    Training(steps=50, lr=1e-12, eval_every=1, patience=2))
    assert stats["stopped_early"] and stats["steps"] == 2 and stats["best_step"] == 0


def test_training_that_makes_things_worse_keeps_the_weights_from_before(bert, monkeypatch):
    from mmopt.distill import engine

    adapter, teacher = bert
    real = engine.loss_fn
    # The loss negated: every step climbs away from the teacher, so no step beats the weights from before.
    monkeypatch.setattr(engine, "loss_fn", lambda kind, tokens: (lambda out, ref: -real(kind, tokens)(out, ref)))
    student = student_of(adapter, teacher)
    before = {k: v.clone() for k, v in student.module.state_dict().items()}
    stats = distill(student, teacher, adapter, "text", data_for(adapter, teacher),
                    Training(steps=3, lr=1e-2, eval_every=1, patience=None))
    assert stats["reverted"] and max(s for _, s in stats["curve"][1:]) < stats["held_out_before"]
    assert all(torch.equal(v, before[k]) for k, v in student.module.state_dict().items())


def test_text_augmentation_varies_the_fit_texts_only_when_the_set_is_small(bert, tiny_bert_dir):
    adapter, teacher = bert
    data = data_for(adapter, teacher, augment="auto")
    assert data.augmenter is not None and data.describe_augmentation().startswith("text: crops, shuffles")
    drawn = data.augmenter.batch(200)
    assert any(t not in TEXTS for t in drawn) and any(t in data.fit for t in drawn)
    assert not any(t in data.held for t in drawn if t in TEXTS)
    words = vocab_words(adapter._tokenizer(teacher))
    assert words[:3] == ["the", "of", "and"] and all(w.isalpha() for w in words[:1000])
    one, two = TextAugmenter(TEXTS, words, seed=3), TextAugmenter(TEXTS, words, seed=3)
    assert one.batch(20) == two.batch(20)
    assert data_for(adapter, teacher, augment="off").augmenter is None
    assert "general English sentences (50%)" in data.describe_augmentation()
    assert data_for(adapter, teacher, augment="on", general_text=0).augmenter.general_ratio == 0.0


def test_general_sentences_fill_their_share_of_each_batch_and_stay_clear_of_the_benchmark_sets():
    from tests.conftest import script

    general = general_sentences()
    assert len(general) == len(set(general)) == 12000
    drawn = TextAugmenter(TEXTS, ["word"], seed=0, general=general, general_ratio=0.5).batch(1000)
    share = sum(t in general for t in drawn) / len(drawn)
    assert abs(share - 0.5) < 0.05 and sum(t in TEXTS for t in drawn) > 150
    maker = script("make_general_text")
    references = maker.benchmark_word_sets()
    assert len(references) > 1000
    assert not any(maker.too_close(s, references) for s in general[::40])   # 300 of them: the rule held when written


def test_image_augmentation_crops_flips_jitters_and_mixes():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 16, 16)
    out = augment_images(images, gen, ratio=1.0)
    assert out.shape == images.shape and not torch.allclose(out, images)
    assert torch.equal(augment_images(images, torch.Generator().manual_seed(0), ratio=0.0), images)
    data = TensorData([(images[:3],), (images[3:],)], batch_size=4, augment=True, device="cpu")
    assert data.augment and data.held[0].shape[0] == 1 and data.next_batch()[0].shape == (4, 3, 16, 16)
    tokens = TensorData([(torch.ones(6, 5, dtype=torch.long),)], batch_size=4, augment=True, device="cpu")
    assert not tokens.augment and tokens.describe_augmentation() is None


def test_schedule_warms_up_then_decays_and_the_rate_rule_is_bounded():
    values = [warmup_cosine(s, 100) for s in range(100)]
    assert values[0] < values[5] == 1.0 and values[-1] < 0.01 and max(values) == 1.0
    curve = {"lrs": [1e-5, 1e-4, 1e-3, 1e-2], "losses": [1.0, 0.5, 0.4, 3.0]}
    assert suggest_lr(curve) == pytest.approx(1e-4)
    # flat and noisy until it climbs: the noise's lowest point (1e-6) must not decide, the climb does
    flat = {"lrs": [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, float("nan")], "losses": [0.23, 0.25, 0.24, 0.26, 0.8, float("inf")]}
    assert suggest_lr(flat) == pytest.approx(1e-4)
    assert suggest_lr({"lrs": [1e-6, 1e-5], "losses": [0.1, 0.2]}) == LR_FLOOR


def test_teacher_labels_follow_the_hardware_unless_given(monkeypatch):
    from mmopt.distill import precision

    assert precision.resolve("float32", "cpu") == "float32"
    assert precision.resolve("bfloat16", "cpu") == "bfloat16"
    for amx, avx512_bf16, expected in ((True, False, "bfloat16"), (False, True, "bfloat16"),
                                       (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert precision.resolve("auto", "cpu") == expected
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert precision.resolve("auto", "cpu") == "float32"          # a torch without the probes: no
    assert precision.resolve("auto", "mps") == "float32"


def test_bfloat16_labels_train_like_float32_ones_and_are_reported(bert):
    """The teacher labels in bfloat16 under autocast: the labels change in the third digit, the run barely."""
    adapter, teacher = bert
    runs = {}
    for dtype in ("float32", "bfloat16"):
        stats = distill(student_of(adapter, teacher), teacher, adapter, "text", data_for(adapter, teacher),
                        Training(steps=8, lr=3e-3, eval_every=4, patience=None, teacher_labels=dtype,
                                 train_precision="float32"), seed=1)
        assert stats["teacher_labels"] == dtype
        runs[dtype] = stats
    assert runs["bfloat16"]["held_out_best"] > runs["bfloat16"]["held_out_before"]
    assert runs["bfloat16"]["held_out_best"] == pytest.approx(runs["float32"]["held_out_best"], abs=0.02)
    assert runs["bfloat16"]["final_loss"] != runs["float32"]["final_loss"]        # the labels did change
    assert describe_run(runs["bfloat16"]).endswith(", teacher labels in bfloat16")
    assert "bfloat16" not in describe_run(runs["float32"])


def test_a_bfloat16_student_runs_its_matmuls_in_bfloat16_keeps_float32_weights_and_trains(bert):
    """Mixed precision: autocast for the student's forward (and so its backward); weights, gradients and AdamW's
    states stay float32, and the held-out scores the best weights are chosen by are float32 forwards."""
    adapter, teacher = bert
    runs = {}
    for dtype in ("float32", "bfloat16"):
        student = student_of(adapter, teacher)
        seen = []
        linear = next(m for m in student.module.modules() if isinstance(m, torch.nn.Linear))
        hook = linear.register_forward_hook(lambda _m, _i, out: seen.append((torch.is_grad_enabled(), out.dtype)))
        stats = distill(student, teacher, adapter, "text", data_for(adapter, teacher),
                        Training(steps=8, lr=3e-3, eval_every=4, patience=None, teacher_labels="float32",
                                 train_precision=dtype), seed=1)
        hook.remove()
        assert stats["train_precision"] == dtype
        assert {dt for grad, dt in seen if grad} == {getattr(torch, dtype)}       # the training steps' forwards
        assert {dt for grad, dt in seen if not grad} == {torch.float32}            # the held-out scores
        assert all(p.dtype == torch.float32 for p in student.module.parameters())
        runs[dtype] = stats
    assert runs["bfloat16"]["held_out_best"] > runs["bfloat16"]["held_out_before"]
    assert runs["bfloat16"]["held_out_best"] == pytest.approx(runs["float32"]["held_out_best"], abs=0.02)
    assert describe_run(runs["bfloat16"]).endswith(", student in bfloat16")
    both = describe_run({**runs["bfloat16"], "teacher_labels": "bfloat16"})
    assert both.endswith(", teacher labels and student in bfloat16")
