"""ONNX export of a retrieval model at one scale, checked against PyTorch with onnxruntime.

The graph takes the **normalised** input (see ``model.preprocess``, recorded in the ONNX metadata)
and returns the L2-normalised descriptor. Uses the TorchScript exporter (``dynamo=False``), which
needs no extra package; GeM's clamp/pow/mean export as Clip/Pow/ReduceMean.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from cfcd.errors import CfcdError


def export_onnx(model: torch.nn.Module, out: str | Path, *, size: tuple[int, int] = (224, 224), batch: int = 1,
                dynamic: bool = False, opset: int = 17) -> Path:
    """Export ``model`` (eval mode, fp32) to ``out``; ``dynamic`` makes batch, height and width symbolic.

    R-MAC pooling depends on the map size, so a dynamic export of an R-MAC model is refused.
    """
    from cfcd.models.pooling import RMAC
    from cfcd.utils.io import atomic_open

    if dynamic and any(isinstance(m, RMAC) for m in model.modules()):
        raise CfcdError("R-MAC regions depend on the input size: export it with a fixed --size, without --dynamic")
    out = Path(out)
    model = model.eval().float()
    x = torch.randn(batch, 3, int(size[0]), int(size[1]))
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "descriptors": {0: "batch"}} if dynamic else None
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["images"], output_names=["descriptors"],
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    import onnx

    proto = onnx.load_from_string(buffer.getvalue())
    meta = {"model_config": json.dumps(getattr(model, "model_config", {}), default=str),
            "preprocess": json.dumps(model.preprocess.to_dict()) if hasattr(model, "preprocess") else "{}",
            "embedding_dim": str(getattr(model, "embedding_dim", ""))}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_open(out, "wb") as handle:
        handle.write(proto.SerializeToString())
    return out


def onnx_max_abs_diff(model: torch.nn.Module, path: str | Path, x: torch.Tensor) -> float:
    """Max absolute difference between PyTorch and onnxruntime (CPU) descriptors for input ``x``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # a default dependency, but an environment may lack it
        raise CfcdError(f"checking the export needs onnxruntime (pip install onnxruntime): {exc}") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model.eval().float()(x).numpy()
    if got.shape != ref.shape:
        raise CfcdError(f"{path}: onnxruntime output {got.shape} differs from PyTorch {ref.shape}")
    return float(abs(got - ref).max())
