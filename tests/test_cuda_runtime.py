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
