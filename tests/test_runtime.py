"""cfcd.runtime: the one device, precision, distributed, progress and JSON vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cfcd.errors import InputError
from cfcd.runtime import (autocast, autocast_dtype, init_distributed, jsonable, precision_name, progress,
                          resolve_device)


def test_device_and_precision_vocabulary():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(InputError, match="--device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        assert resolve_device(None).type in ("cpu", "mps")
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")
    for name in ("fp32", "bf16", "fp16"):
        assert precision_name(autocast_dtype(name)) == name  # fp16 stays fp16 (the trainer hook made it fp32)
    assert autocast_dtype("none") is None and autocast_dtype(False) is None
    with pytest.raises(InputError, match="unknown precision"):
        autocast_dtype("int8")
    x = torch.randn(4, 4)
    with autocast("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (x @ x).dtype == torch.float32


def test_single_process_context_and_helpers():
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    info.barrier()
    info.close()
    bar = progress(3, enabled=False)
    bar.update(1)
    bar.close()
    plain = jsonable({"a": np.float32(0.5), "b": (1, np.arange(2)), 3: torch.tensor(2.0), "p": object()})
    assert plain["a"] == 0.5 and plain["b"] == [1, [0, 1]] and plain["3"] == 2.0 and isinstance(plain["p"], str)
    json.dumps(plain)
    # strict JSON for the page: NaN and infinities (a query without positives) become null
    strict = jsonable({"ap": float("nan"), "v": np.array([1.0, np.inf]), "p": Path("/x")}, finite=True)
    assert strict == {"ap": None, "v": [1.0, None], "p": "/x"}
    json.dumps(strict, allow_nan=False)
    assert jsonable(float("nan")) != jsonable(float("nan"))  # kept as NaN unless asked


def test_extractor_leaves_the_callers_layout_when_told():
    from cfcd.extract import ExtractOptions, Extractor

    import cfcd.models

    model = cfcd.models.create("gem_resnet18", weights="random")
    before = model.backbone.conv1.weight.is_contiguous()
    Extractor(model, ExtractOptions(device="cpu", channels_last=False, workers=0))
    assert model.backbone.conv1.weight.is_contiguous() == before
    Extractor(model, ExtractOptions(device="cpu", channels_last=True, workers=0))
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
