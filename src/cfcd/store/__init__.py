"""The descriptor store: the on-disk contract between extraction, evaluation, indexing and search.

A store is a directory (``docs/store-format.md``)::

    STORE/
      descriptors.npy     N x D float32 or float16, C order, memory-mappable
      images.txt          N image ids, one per line, row-aligned with descriptors.npy
      meta.json           written LAST: a directory without meta.json is an incomplete store
      .partial/           only while a job runs (removed by finalize_store)

* :mod:`~cfcd.store.format` - file names, :func:`open_store`, :func:`load_descriptors`;
* :mod:`~cfcd.store.meta` - the typed :class:`StoreMeta`, :func:`write_meta`, :func:`check_compatible`;
* :mod:`~cfcd.store.writer` - :class:`StoreWriter` (atomic shards, resume) and :func:`finalize_store`;
* :mod:`~cfcd.store.ops` - :func:`write_store`, :func:`transform_store`, :func:`merge_stores`, :func:`store_summary`.
"""

from cfcd.store.format import (
    DESCRIPTORS_FILE,
    IDS_FILE,
    META_FILE,
    PARTIAL_DIR,
    STORE_FORMAT,
    STORE_VERSION,
    DescriptorStore,
    is_store,
    iter_blocks,
    link_or_copy,
    load_descriptors,
    load_npy,
    open_store,
    read_ids,
    write_ids,
)
from cfcd.store.meta import PROVENANCE_KEYS, StoreMeta, check_compatible, meta_get, write_meta
from cfcd.store.ops import merge_stores, store_summary, transform_store, write_store
from cfcd.store.writer import StoreWriter, finalize_store

__all__ = [
    "DESCRIPTORS_FILE", "IDS_FILE", "META_FILE", "PARTIAL_DIR", "PROVENANCE_KEYS", "STORE_FORMAT", "STORE_VERSION",
    "DescriptorStore", "StoreMeta", "StoreWriter", "check_compatible", "finalize_store", "is_store", "iter_blocks", "link_or_copy",
    "load_descriptors", "load_npy", "merge_stores", "meta_get", "open_store", "read_ids", "store_summary",
    "transform_store", "write_ids", "write_meta", "write_store",
]
