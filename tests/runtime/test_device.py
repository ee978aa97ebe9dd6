"""runtime.device: device and precision choice, refused in one ToolkitError."""

import pytest
import torch

from runtime.device import autocast, pick_device, pick_dtype
from runtime.errors import ToolkitError


def test_pick_dtype_resolves_auto_on_cpu():
    assert pick_dtype("auto", torch.device("cpu")) in ("float32", "bfloat16")
    assert pick_dtype("float16", torch.device("cpu")) == "float16"


def test_pick_device_auto_and_explicit():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")


@pytest.mark.parametrize("name", ["tpu9", "not a device"])
def test_pick_device_refuses_unknown_names(name):
    with pytest.raises(ToolkitError, match="unknown device"):
        pick_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pick_device_refuses_cuda_where_there_is_none():
    with pytest.raises(ToolkitError, match="CUDA is not available"):
        pick_device("cuda")


def test_autocast_is_a_no_op_for_float32_only():
    x = torch.randn(4, 4)
    with autocast(torch.device("cpu"), torch.float32):
        assert (x @ x).dtype == torch.float32
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16


def test_pick_device_refuses_a_gpu_index_the_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ToolkitError, match=r"'cuda:2' requested but this machine has 2 CUDA device\(s\), cuda:0..cuda:1"):
        pick_device("cuda:2")
