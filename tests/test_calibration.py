"""Calibration data: texts, images and captions streamed in batches, image batches cached on disk."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmopt import calibration
from mmopt.calibration import Calibration, ImagePreprocess, image_batches, inputs_for
from mmopt.errors import DataError, EXIT_USER_ERROR

PP = ImagePreprocess(size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MMOPT_CACHE_DIR", str(folder))
    return folder


def make_images(folder: Path, n: int = 5, size: int = 24) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        pixels = (torch.rand(size, size + 4, 3, generator=gen) * 255).to(torch.uint8).numpy()
        path = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        out.append(path)
    return out


def batches(calib: Calibration, pp: ImagePreprocess = PP) -> list:
    return list(image_batches(calib.image_files(), pp, calib.batch_size, calib.cache, calib.num_workers))


def test_images_stream_in_batches_of_preprocessed_tensors(tmp_path):
    make_images(tmp_path / "imgs", n=5)
    out = batches(Calibration(images_dir=tmp_path / "imgs", batch_size=2, num_workers=0))
    assert [tuple(b.shape) for b in out] == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)]
    assert all(b.dtype == torch.float32 for b in out)


def test_worker_prefetch_gives_the_same_batches_as_in_process_loading(tmp_path):
    make_images(tmp_path / "imgs", n=5)
    in_process = batches(Calibration(images_dir=tmp_path / "imgs", batch_size=2, num_workers=0, cache=False))
    workers = batches(Calibration(images_dir=tmp_path / "imgs", batch_size=2, num_workers=2, cache=False))
    assert all(torch.equal(a, b) for a, b in zip(in_process, workers)) and len(workers) == 3


def test_second_run_reads_the_cache_without_decoding(tmp_path, monkeypatch, cache_dir):
    make_images(tmp_path / "imgs", n=4)
    calib = Calibration(images_dir=tmp_path / "imgs", batch_size=2, num_workers=0)
    first = batches(calib)
    assert len(list((cache_dir / "calibration").iterdir())) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache holds it")

    monkeypatch.setattr(calibration, "load_image", no_decoding)
    second = batches(calib)
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and len(second) == 2


def test_changed_preprocessing_or_files_invalidate_the_cache(tmp_path, monkeypatch):
    files = make_images(tmp_path / "imgs", n=3)
    calib = Calibration(images_dir=tmp_path / "imgs", batch_size=2, num_workers=0)
    batches(calib)
    decoded = []
    real = calibration.load_image
    monkeypatch.setattr(calibration, "load_image", lambda *a, **k: decoded.append(a[0]) or real(*a, **k))
    out = batches(calib, ImagePreprocess(size=12, mean=PP.mean, std=PP.std))
    assert len(decoded) == 3 and out[0].shape[-1] == 12
    decoded.clear()
    batches(calib, ImagePreprocess(size=16, mean=PP.mean, std=(0.3, 0.3, 0.3)))
    assert len(decoded) == 3
    decoded.clear()
    stat = files[0].stat()
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    batches(calib)
    assert len(decoded) == 3


def test_an_abandoned_stream_leaves_no_partial_cache(tmp_path, cache_dir):
    make_images(tmp_path / "imgs", n=4)
    calib = Calibration(images_dir=tmp_path / "imgs", batch_size=2, num_workers=0)
    stream = image_batches(calib.image_files(), PP, 2, True, 0)
    next(stream)
    stream.close()
    assert list((cache_dir / "calibration").iterdir()) == []


def test_texts_are_read_lazily_up_to_num_samples(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one\n\n two \nthree\nfour\n")
    assert Calibration(texts_file=path, num_samples=3).texts() == ["one", "two", "three"]


def test_captions_pair_images_with_texts_in_file_order(tmp_path):
    make_images(tmp_path / "imgs", n=3)
    captions = tmp_path / "captions.tsv"
    captions.write_text("img2.jpg\ta red square\nimg1.png\ta blue circle\n")
    calib = Calibration(images_dir=tmp_path / "imgs", captions_file=captions)
    calib.check()
    assert [p.name for p in calib.image_files()] == ["img2.jpg", "img1.png"]
    assert calib.captions() == ["a red square", "a blue circle"]


def test_fit_and_holdout_split_the_samples_disjointly_and_keep_captions_with_their_images(tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("".join(f"sentence {i}\n" for i in range(12)))
    calib = Calibration(texts_file=texts, num_samples=100)
    fit, holdout = calibration.fit_and_holdout(calib, ["text"])
    assert holdout.texts() == ["sentence 4", "sentence 9"]
    assert sorted(fit.texts() + holdout.texts()) == sorted(calib.texts()) and len(fit.texts()) == 10

    make_images(tmp_path / "imgs", n=6)
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"img{i}.{'png' if i % 2 else 'jpg'}\tcaption {i}\n" for i in range(6)))
    pairs = Calibration(images_dir=tmp_path / "imgs", captions_file=captions)
    fit, holdout = calibration.fit_and_holdout(pairs, ["visual", "text"])
    assert [p.name for p in holdout.image_files()] == ["img4.jpg"] and holdout.captions() == ["caption 4"]
    assert [p.stem for p in fit.image_files()] == [c.replace("caption ", "img") for c in fit.captions()]
    assert len(fit.image_files()) == 5


def test_no_holdout_when_a_part_has_fewer_samples_than_one_in_five(tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\nthree\nfour\n")
    assert calibration.fit_and_holdout(Calibration(texts_file=texts), ["text"]) is None
    assert calibration.fit_and_holdout(Calibration(num_samples=64), ["text"]) is not None     # bundled texts
    make_images(tmp_path / "imgs", n=3)
    assert calibration.fit_and_holdout(Calibration(images_dir=tmp_path / "imgs"), ["visual"]) is None


def test_synthetic_images_show_the_same_picture_at_every_size():
    big = calibration.synthetic_images(2, 64, seed=3)
    small = calibration.synthetic_images(2, 32, seed=3)
    down = torch.nn.functional.interpolate(big, size=(32, 32), mode="bilinear", antialias=True)
    cos = torch.nn.functional.cosine_similarity(down.flatten(1), small.flatten(1))
    assert cos.min() > 0.95


def test_inputs_for_texts_fall_back_to_the_bundled_sample():
    tokenized = []
    adapter = SimpleNamespace(tokenize=lambda model, texts, seq: tokenized.append(texts) or (torch.zeros(len(texts)),))
    out = list(inputs_for(None, adapter, "text", Calibration(batch_size=50)))
    assert sum(len(t) for t in tokenized[1:]) == len(calibration.bundled_texts()) and len(out) == 2


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d / "t.txt").write_text("\n \n") and Calibration(texts_file=d / "t.txt"), "no non-empty lines"),
    (lambda d: (d / "t.txt").write_bytes(b"\xff\xfe\xfa") and Calibration(texts_file=d / "t.txt"), "not UTF-8"),
    (lambda d: (d / "imgs").mkdir() or Calibration(images_dir=d / "imgs"), "no image files"),
    (lambda d: (d / "imgs").mkdir() or (d / "imgs" / "x.png").write_text("not an image")
     and Calibration(images_dir=d / "imgs"), "unreadable"),
    (lambda d: make_images(d / "imgs", 1) and (d / "c.tsv").write_text("missing.png\ta cat\n")
     and Calibration(images_dir=d / "imgs", captions_file=d / "c.tsv"), "is not in"),
    (lambda d: make_images(d / "imgs", 1) and (d / "c.tsv").write_text("img0.jpg a cat without a tab\n")
     and Calibration(images_dir=d / "imgs", captions_file=d / "c.tsv"), "expected image_file<TAB>caption"),
    (lambda d: (d / "c.tsv").write_text("a.png\tcat\n") and Calibration(captions_file=d / "c.tsv"), "need images"),
])
def test_bad_data_is_a_one_line_data_error(tmp_path, setup, message):
    calib = setup(tmp_path)
    with pytest.raises(DataError) as err:
        calib.check()
    assert message in err.value.message and "\n" not in err.value.message
    assert err.value.exit_code == EXIT_USER_ERROR
