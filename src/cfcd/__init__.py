"""cfcd: single-stage image retrieval (CFCD, DOLG, GeM baselines) with the exact revisitop protocol.

The package follows the data: images (``cfcd.data``) -> models (``cfcd.models``) ->
descriptors (``cfcd.store``, ``cfcd.extract``) -> post-processing (``cfcd.postprocess``)
-> index and search (``cfcd.index``) or evaluation (``cfcd.evaluation``).
Nothing heavy (torch) is imported here, so ``cfcd --help`` and ``cfcd evaluate`` start fast.
"""

__version__ = "0.1.0"
