"""Multi-scale global descriptor extraction: batched, sharded over ranks, resumable.

* :mod:`cfcd.extract.scales`: the multi-scale recipes (``cfcd``, ``cirtorch``, ``dirtorch``, ``single``).
* :mod:`cfcd.extract.describe`: the fast batched path and the reference (naive) path.
* :mod:`cfcd.extract.engine`: :class:`Extractor` (decode in workers, bucket by size) and
  :func:`extract_to_store` (a whole job into a descriptor store, under ``torchrun`` if asked).
"""

from cfcd.extract.describe import describe_batch, describe_reference, reference_resize, resize_on_device
from cfcd.extract.engine import (
    Batch,
    ExtractOptions,
    Extractor,
    ExtractSummary,
    extract_to_store,
)
from cfcd.extract.scales import PRESETS, MultiScale, parse_scales

__all__ = [
    "PRESETS",
    "Batch",
    "ExtractOptions",
    "ExtractSummary",
    "Extractor",
    "MultiScale",
    "describe_batch",
    "describe_reference",
    "extract_to_store",
    "parse_scales",
    "reference_resize",
    "resize_on_device",
]
