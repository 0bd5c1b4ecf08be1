"""Import timm robustly.

timm imports torchvision at import time. On CPU-only machines pip may pair the CPU
build of torch with a CUDA build of torchvision whose ``_C`` extension cannot load;
torchvision then dies in ``_meta_registrations`` (``operator torchvision::nms does not
exist``) although its pure-Python parts, the only ones timm uses for our models, are
fine. We retry that import with the two unguarded ``register_fake`` calls made
tolerant, so timm works; torchvision's C++ ops (nms, roi_align) stay unavailable,
which cfcd never needs.
"""

from __future__ import annotations

import sys
from types import ModuleType

_TIMM: ModuleType | None = None


def _import_torchvision_without_ops() -> None:
    import torch
    import torch.library

    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # timm will report it
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    original = torch.library.register_fake

    def tolerant_register_fake(op, *args, **kwargs):
        decorator = original(op, *args, **kwargs)
        if not (isinstance(op, str) and op.startswith("torchvision::")) or not callable(decorator):
            return decorator

        def register(fn):
            try:
                return decorator(fn)
            except RuntimeError:  # the operator does not exist because _C did not load
                return fn

        return register

    torch.library.register_fake = tolerant_register_fake
    try:
        import torchvision  # noqa: F401,F811
    finally:
        torch.library.register_fake = original


def import_timm() -> ModuleType:
    """Return the ``timm`` module, working around a torchvision build without its C++ ops."""
    global _TIMM
    if _TIMM is None:
        _import_torchvision_without_ops()
        import timm

        _TIMM = timm
    return _TIMM
