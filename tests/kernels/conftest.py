"""Fixtures of the compiled-kernel tests."""
from __future__ import annotations

import pytest


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
