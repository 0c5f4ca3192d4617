"""The PyTorch reference's default thread count: the cores other work leaves idle, not one per core.

Issue 24: the Tour ran torch on 2 threads on a 2-core machine busy with other jobs, where `--threads 1` was up to
8x faster (OpenMP's spinning threads fight the other work). Measured for this change: `ddpm-deploy eval --checkpoint
digits -n 2`, 57 s with --threads 1; with --threads 2 still running after 13.5 min (stopped), load average 8.3-8.6."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("load,want", [(50.0, 1), (1.2, 1), (0.0, None)])
def test_default_threads_follow_the_idle_cores(load, want, tiny_ckpt, monkeypatch, restore_threads):
    from ddpm_deploy.nn.torch_backend import TorchBackend

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    torch.set_num_threads(cores)  # torch's own default: one per core
    TorchBackend(tiny_ckpt)
    assert torch.get_num_threads() == (want or cores)


def test_explicit_threads_win(tiny_ckpt, monkeypatch, restore_threads):
    from ddpm_deploy.nn.torch_backend import TorchBackend

    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    TorchBackend(tiny_ckpt, threads=2)
    assert torch.get_num_threads() == 2
