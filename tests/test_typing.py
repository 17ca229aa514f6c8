"""PEP 561: fastbind ships py.typed as package data, and the public API is completely annotated
(every parameter and the return value of every function exported by ``fastbind`` and of the loss
modules' constructors and ``forward``), with annotations that resolve."""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path

import pytest
import torch

import fastbind as fb

ROOT = Path(__file__).resolve().parents[1]
LOSS_MODULES = [fb.nn.GramLoss, fb.nn.InfoNCELoss, fb.nn.CentroBindLoss]


def _public_functions():
    return [(name, getattr(fb, name)) for name in fb.__all__ if inspect.isfunction(getattr(fb, name))]


VQ_METHODS = ("__init__", "forward", "freeze", "initialize", "set_dim_weight", "apply_toc", "statistics")


def _module_methods():
    losses = [(f"{cls.__name__}.{m}", getattr(cls, m)) for cls in LOSS_MODULES for m in ("__init__", "forward")]
    return losses + [(f"VectorQuantizer.{m}", getattr(fb.nn.VectorQuantizer, m)) for m in VQ_METHODS]


def test_py_typed_is_package_data():
    assert (ROOT / "fastbind" / "py.typed").is_file()
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")  # the file check above still ran
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["fastbind"]


@pytest.mark.parametrize(
    "name,fn", _public_functions() + _module_methods(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_public_api_is_annotated(name, fn):
    signature = inspect.signature(fn)
    missing = [
        p.name for p in signature.parameters.values() if p.name != "self" and p.annotation is inspect.Parameter.empty
    ]
    assert not missing, f"{name}: parameters without a type hint: {missing}"
    assert signature.return_annotation is not inspect.Signature.empty, f"{name}: no return type hint"
    # the hints resolve (ProcessGroup is imported for type checkers only)
    hints = typing.get_type_hints(fn, localns={"ProcessGroup": torch.distributed.ProcessGroup})
    assert "return" in hints
