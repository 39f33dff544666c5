"""Freed host memory goes back to the system, so peak resident memory follows what is live."""
from __future__ import annotations

import platform

import pytest

from mmopt import host_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_the_fixed_threshold_and_trims():
    assert host_memory.fix_mmap_threshold() is True
    host_memory.release()


def test_release_is_safe_without_glibc(monkeypatch):
    monkeypatch.setattr(host_memory, "_libc", lambda: None)
    assert host_memory.fix_mmap_threshold() is False
    host_memory.release()
