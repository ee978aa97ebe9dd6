"""runtime.errors: every CLI turns any of the project's errors into one line and exit code 2, even
one raised by shared code (here: the device choice, before any work)."""

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import ToolkitError, reraise_as

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("app, args, message", [
    ("train", ["device=cuda", "data.store=/nonexistent"], "device 'cuda' requested but CUDA is not available"),
    ("harvest", ["preset=demo", "device=cuda", "store=/nonexistent/s"], "device 'cuda' requested but CUDA"),
    ("eval", ["run=/nonexistent", "device=mps"], "device 'mps' requested but MPS is not available"),
])
def test_shared_code_errors_are_one_line(app, args, message, tmp_path):
    import torch

    if torch.cuda.is_available() and "cuda" in message:
        pytest.skip("this machine has CUDA")
    if torch.backends.mps.is_available() and "MPS" in message:
        pytest.skip("this machine has MPS")
    out = subprocess.run([sys.executable, "-m", app, *args, f"hydra.run.dir={tmp_path / 'r'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"{app}: error: ") and message in out.stderr


def test_reraise_as_keeps_the_message_and_names_the_app():
    class AppError(ToolkitError):
        pass

    with pytest.raises(AppError, match="^disk on fire$"):
        with reraise_as(AppError):
            raise ToolkitError("disk on fire")
    with pytest.raises(ValueError):  # not one of ours: untouched
        with reraise_as(AppError):
            raise ValueError("bug")


def test_every_error_the_toolkit_defines_is_a_toolkit_error():
    """An error class of ours outside ToolkitError would escape `one_line_errors` as a traceback (private
    ones, such as harvest.lm's _Stop that ends a forward pass early, never leave their module)."""
    import importlib
    import inspect
    import pkgutil

    from tests.conftest import ROOT

    mine = []
    for package in ("runtime", "harvest", "train", "eval", "interop", "pipeline", "bench"):
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            mine += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                     if issubclass(cls, BaseException) and cls.__module__ == info.name and not cls.__name__.startswith("_")]
    assert len(mine) > 10
    assert [cls.__qualname__ for cls in mine if not issubclass(cls, ToolkitError)] == []
