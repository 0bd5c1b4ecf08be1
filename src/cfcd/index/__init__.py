"""Indexes over a descriptor store: build, open, search, grow (``docs/index-format.md``).

* :mod:`~cfcd.index.exact` - exact inner-product top-k (chunked torch matmul);
* :mod:`~cfcd.index.base` - the :class:`Index` contract, the exact index, id tables;
* :mod:`~cfcd.index.faiss_index` - FAISS indexes in memory;
* :mod:`~cfcd.index.ondisk` - budgeted, sharded builds with on-disk lists, ``add`` and ``remove``;
* :mod:`~cfcd.index.directory` - :func:`build_index`, :func:`open_index`, :func:`check_compatible`.
"""

from cfcd.index.base import ExactIndex, IdTable, Index, RowSegments
from cfcd.index.directory import INDEX_TYPES, build_index, check_compatible, open_index
from cfcd.index.exact import SearchResult, exact_search, recall_at_k
from cfcd.index.faiss_index import FaissIndex, faiss_threads

__all__ = ["INDEX_TYPES", "ExactIndex", "FaissIndex", "IdTable", "Index", "RowSegments", "SearchResult",
           "build_index", "check_compatible", "exact_search", "faiss_threads", "open_index", "recall_at_k"]
