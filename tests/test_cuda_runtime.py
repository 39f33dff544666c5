"""The one-time CUDA allocations the op trace cannot see: the cuBLAS workspace."""
from __future__ import annotations

from mmopt.memory.cuda_runtime import cublas_workspace, parse_workspace_config

MIB = 1 << 20


def test_hopper_and_no_gpu_get_torchs_32_mib_default():
    assert cublas_workspace((9, 0), env={}).bytes == 32 * MIB
    unknown = cublas_workspace(None, env={})
    assert unknown.bytes == 32 * MIB and "assumed" in unknown.how and unknown.method == "estimated"


def test_older_gpus_get_the_smaller_default():
    assert cublas_workspace((8, 0), env={}).bytes == 4096 * 1024 * 2 + 16 * 1024 * 8


def test_the_environment_setting_wins_and_a_bad_one_is_ignored():
    assert cublas_workspace((9, 0), env={"CUBLAS_WORKSPACE_CONFIG": ":16:8"}).bytes == 16 * 1024 * 8
    assert cublas_workspace((9, 0), env={"CUBLAS_WORKSPACE_CONFIG": "lots"}).bytes == 32 * MIB
    assert parse_workspace_config(":4096:2:16:8") == 4096 * 1024 * 2 + 16 * 1024 * 8
    assert parse_workspace_config("4096") is None


def test_profile_shows_the_workspace_on_its_own_line(capsys, monkeypatch):
    import json
    import sys

    from mmopt import cli

    for extra in ([], ["--json"]):
        monkeypatch.setattr(sys, "argv", ["mmopt", "profile", "torchvision:resnet18", "--batch", "2",
                                          "--image-size", "64", *extra])
        try:
            cli.main()
        except SystemExit as exc:
            assert not exc.code
        out = capsys.readouterr().out
        if extra:
            [once] = json.loads(out)["one_time"]
            assert once["what"] == "cuBLAS workspace" and once["bytes"] == 32 * MIB
        else:
            assert "once per process, on top: cuBLAS workspace 32.0 MiB (estimated" in " ".join(out.split())
