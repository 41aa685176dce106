"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is several times faster than oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _force_device_paths(monkeypatch) -> None:
    import surgical_optim._fold
    import surgical_optim.auto_rgn

    for module in (surgical_optim.auto_rgn, surgical_optim._fold):
        monkeypatch.setattr(module, "host_readable", lambda device: False)


@pytest.fixture
def device_paths(monkeypatch):
    """Run, on this CPU, the code that runs on accelerators. On the CPU a few small vectors are read
    on the host (there is no device to wait for); on a GPU nothing is, and that is what the
    no-synchronisation tests must check."""
    _force_device_paths(monkeypatch)


@pytest.fixture(params=["host_reads", "device_only"])
def both_paths(request, monkeypatch):
    """Run a test once as on the CPU and once as on an accelerator."""
    if request.param == "device_only":
        _force_device_paths(monkeypatch)
    return request.param
