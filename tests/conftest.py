"""Shared fixtures for the winoq tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def seed() -> int:
    """Seed torch's global generator for tests that draw from it directly."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (results of threaded float sums vary with the count)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def load_file_module():
    """``load(path, name)``: import a script that is not a package module (benchmarks/, scripts/)."""
    import importlib.util

    def load(path, name):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture
def no_compiler(monkeypatch):
    """C++ extensions fail to build, as on a machine without ninja. Returns ``forget(*modules)``,
    which drops the cached build (``_STATE``) of those kernel modules so that they try again."""
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", broken)

    def forget(*modules):
        for mod in modules:
            monkeypatch.setattr(mod, "_STATE", {})

    return forget
