"""The compute device: named, resolved on this machine, refused clearly when it is not there."""

from __future__ import annotations

import pytest
import torch

from bitalloc.quant.device import check_device_name, module_device, parse_bytes, resolve_device, to_device
from bitalloc.quant.loading import model_dtype


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda_and_cuda_asked_for_there_is_refused(no_cuda):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device '{name}' was asked for, but torch sees no CUDA device"):
            resolve_device(name)


def test_auto_is_the_first_gpu_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "CUDA", "h100", "cuda:x", ""])
def test_a_device_name_is_checked_without_the_machine(name):
    with pytest.raises(ValueError, match="choose auto, cpu, cuda or cuda:N"):
        check_device_name(name)


def test_auto_dtype_is_bf16_on_a_gpu_and_fp32_on_the_cpu():
    assert model_dtype("auto", torch.device("cuda")) == torch.bfloat16 and model_dtype("auto", "cuda:1") == torch.bfloat16
    assert model_dtype("auto", "cpu") == torch.float32 and model_dtype("fp16", "cuda") == torch.float16


@pytest.mark.parametrize("text, size", [("12345", 12345), (4096, 4096), ("512MB", 512 * 10**6), ("24GiB", 24 * 2**30),
                                        ("1.5 GiB", 3 * 2**29), ("2kib", 2048), ("3T", 3 * 10**12)])
def test_sizes_read_as_bytes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "lots", "24 GiBs", "-1", "0", "12 PB"])
def test_a_bad_size_is_refused_in_words(text):
    with pytest.raises(ValueError, match="size"):
        parse_bytes(text)


def test_inputs_follow_the_module():
    module = torch.nn.Linear(2, 2).to(torch.device("meta"))
    assert module_device(module) == torch.device("cpu")  # nothing real: the CPU
    batch = {"input_ids": torch.ones(1, 2), "flag": True, "pair": (torch.zeros(1), None)}
    moved = to_device(batch, torch.device("meta"))
    assert moved["input_ids"].is_meta and moved["pair"][0].is_meta and moved["flag"] is True and moved["pair"][1] is None
