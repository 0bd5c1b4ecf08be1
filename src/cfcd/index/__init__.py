"""Indexes over a descriptor store: one directory layout and one lifecycle for every type
(``docs/index-format.md``).

* :mod:`~cfcd.index.exact` - exact inner-product top-k (chunked torch matmul);
* :mod:`~cfcd.index.base` - the :class:`Index` contract, the exact index, id tables;
* :mod:`~cfcd.index.faiss_index` - a FAISS index opened for search (removed labels, re-ranking);
* :mod:`~cfcd.index.choose` - the budgeted choice, size estimates, the presets as factory strings;
* :mod:`~cfcd.index.rows` - descriptor rows by plain reads, the source of a build or an add;
* :mod:`~cfcd.index.train`, :mod:`~cfcd.index.shards`, :mod:`~cfcd.index.tune` - the build's steps;
* :mod:`~cfcd.index.build` - :func:`build_index` (every type), resumable after ``kill -9``;
* :mod:`~cfcd.index.grow` - :func:`add` and :func:`remove` (every type);
* :mod:`~cfcd.index.generations` - commits, :func:`generation`, clean-up of old generations;
* :mod:`~cfcd.index.directory` - :func:`open_index`, :func:`check_compatible`.

Following an index that changes (a server): ``index = open_index(path)`` holds the files of the
generation it opened (open or memory-mapped), so later commits, which delete those files, never
break a search in flight; ``generation(path)`` is cheap (one ``stat``) and differs from
``index.generation`` once a newer build, add or remove is committed: open the index again then.
"""

from cfcd.index.base import ExactIndex, IdTable, Index, RowSegments
from cfcd.index.build import INDEX_TYPES, build, build_index
from cfcd.index.choose import choose_index, parse_size
from cfcd.index.directory import check_compatible, open_index
from cfcd.index.exact import SearchResult, exact_search, recall_at_k
from cfcd.index.faiss_index import FaissIndex, faiss_threads
from cfcd.index.generations import generation
from cfcd.index.grow import add, read_id_file, remove

__all__ = ["INDEX_TYPES", "ExactIndex", "FaissIndex", "IdTable", "Index", "RowSegments", "SearchResult", "add",
           "build", "build_index", "check_compatible", "choose_index", "exact_search", "faiss_threads",
           "generation", "open_index", "parse_size", "read_id_file", "recall_at_k", "remove"]
