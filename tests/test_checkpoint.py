"""Checkpoints: round trips per family, part subsets, integrity, atomic writes."""
from __future__ import annotations

import json

import pytest
import torch

from mmopt import checkpoint, registry
from mmopt.core import ModelSpec, Shapes
from mmopt.errors import IntegrityError, UserError


def save_and_reload(source, tmp_path, parts=None, **kw):
    adapter = registry.adapter_for(source)
    model = adapter.load(ModelSpec(source=source, **kw))
    out = tmp_path / "ckpt"
    with checkpoint.atomic_folder(out, force=False) as tmp:
        checkpoint.write_checkpoint(model, adapter, tmp, {"source": source, **kw}, [])
    return adapter, model, out, checkpoint.load_model(out, parts=parts)


def same_outputs(adapter, a, b, part, shapes=Shapes(batch_size=2)):
    inputs = adapter.example_inputs(a, part, shapes)
    with torch.inference_mode():
        return torch.allclose(adapter.run(a, part, inputs), adapter.run(b, part, inputs), atol=1e-6)


def test_open_clip_round_trip_one_file_per_part(tiny_clip_name, tmp_path):
    adapter, model, out, back = save_and_reload("open_clip", tmp_path, name=tiny_clip_name)
    manifest = json.loads((out / "mmopt.json").read_text())
    assert set(manifest["files"]) == {"visual", "text", "shared"}
    assert (out / "visual.safetensors").is_file() and (out / "text.safetensors").is_file()
    assert manifest["random_weights"] is True and back.random_weights
    for part in ("visual", "text"):
        assert same_outputs(adapter, model, back, part)


def test_loading_one_part_reads_only_its_file(tiny_clip_name, tmp_path):
    adapter, model, out, _ = save_and_reload("open_clip", tmp_path, name=tiny_clip_name)
    (out / "text.safetensors").write_bytes(b"corrupt")     # never read when only visual is asked for
    back = checkpoint.load_model(out, parts=["visual"])
    assert back.parts == ["visual"] and back.module.transformer is None
    assert same_outputs(adapter, model, back, "visual")
    with pytest.raises(IntegrityError, match="text.safetensors does not match its sha256"):
        checkpoint.load_model(out)


def test_hf_single_part_output_is_a_stock_folder(tiny_bert_dir, tmp_path):
    from transformers import AutoModel

    adapter, model, out, back = save_and_reload("hf", tmp_path, path=str(tiny_bert_dir))
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    stock = AutoModel.from_pretrained(str(out))
    ids = torch.randint(0, 1000, (2, 8))
    with torch.inference_mode():
        assert torch.allclose(stock(input_ids=ids).last_hidden_state, model.module(input_ids=ids).last_hidden_state)
    assert same_outputs(adapter, model, back, "text", Shapes(batch_size=2, seq_len=8))


def test_hf_clip_and_torchvision_round_trip(tiny_hf_clip_dir, tmp_path):
    adapter, model, _, back = save_and_reload("hf", tmp_path / "a", path=str(tiny_hf_clip_dir))
    assert same_outputs(adapter, model, back, "visual") and same_outputs(adapter, model, back, "text",
                                                                           Shapes(batch_size=2, seq_len=8))
    adapter, model, _, back = save_and_reload("torchvision", tmp_path / "b", name="resnet18")
    assert same_outputs(adapter, model, back, "visual", Shapes(batch_size=2, image_size=64))


def test_tampered_weights_are_refused(tmp_path):
    _, _, out, _ = save_and_reload("torchvision", tmp_path, name="resnet18")
    data = bytearray((out / "visual.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "visual.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        checkpoint.load_model(out)


def test_every_file_a_loader_reads_is_hashed_and_verified(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    import sys

    from mmopt import api, cli

    _, _, out, _ = save_and_reload("hf", tmp_path, path=str(tiny_bert_dir))
    manifest = json.loads((out / "mmopt.json").read_text())
    listed = {entry["file"] for entry in manifest["files"].values()} | set(manifest["assets"])
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"mmopt.json"}
    assert listed == on_disk and {"config.json", "tokenizer.json", "1_Pooling/config.json"} <= listed
    assert set(api.verify(out)) == listed

    def verify_cli() -> tuple:
        monkeypatch.setattr(sys, "argv", ["mmopt", "verify", str(out)])
        with pytest.raises(SystemExit) as info:
            cli.main()
        return info.value.code, *capsys.readouterr()

    code, stdout, _ = verify_cli()
    assert code == 0 and stdout.startswith(f"ok: {len(listed)} files match mmopt.json")
    pooling = out / "1_Pooling" / "config.json"
    pooling.write_text(pooling.read_text().replace("true", "false", 1))
    code, stdout, stderr = verify_cli()
    assert code == 2 and stdout == ""
    assert stderr.splitlines()[0] == ("error: 1_Pooling/config.json does not match its sha256 in mmopt.json: "
                                      "the file was changed or corrupted")
    with pytest.raises(IntegrityError, match="1_Pooling/config.json does not match"):
        checkpoint.load_model(out)
    pooling.unlink()
    with pytest.raises(IntegrityError, match="checkpoint file missing: .*1_Pooling/config.json"):
        api.verify(out)


def test_atomic_folder_leaves_nothing_on_failure_and_keeps_previous_output(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_folder(target, force=False) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with checkpoint.atomic_folder(target, force=False) as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(UserError, match="already exists"):
        with checkpoint.atomic_folder(target, force=False):
            pass
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.atomic_folder(target, force=True) as tmp:
            (tmp / "v2").write_text("2")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "v1").is_file()
    with checkpoint.atomic_folder(target, force=True) as tmp:
        (tmp / "v2").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["v2"]


def test_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="output path is a file"):
        checkpoint.check_output(tmp_path / "f", force=True)


def test_interrupted_first_run_leaves_no_empty_parent_folder(tmp_path):
    target = tmp_path / "out" / "deeper" / "x"
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.atomic_folder(target, force=False) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()             # a parent that existed before the run stays
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_folder(tmp_path / "kept" / "x", force=False):
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_files_follow_the_umask(tmp_path, umask):
    """safetensors writes its files 0600; a server running as another user must read them under umask 022."""
    import os
    import stat

    old = os.umask(umask)
    try:
        _, _, out, _ = save_and_reload("torchvision", tmp_path, name="resnet18")
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
