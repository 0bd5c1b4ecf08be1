"""Describe new photos the way a store (or the store an index was built from) was described.

:func:`describer_for` reads a store's meta and gives back its model (weights checked against the
recorded hashes), its extraction options (scales, size cap, crop rule, ...) and its whitening, so
that a query photo lands in the same embedding space as the stored descriptors. ``cfcd search
--queries PHOTO`` uses it; so does anything else that turns images into queries for an index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import cfcd.models
from cfcd.errors import InputError
from cfcd.extract.engine import ExtractOptions, Extractor
from cfcd.models.fingerprint import model_fingerprint
from cfcd.postprocess import load_whitening
from cfcd.store import DescriptorStore, StoreMeta


def format_scales(scales) -> str:
    """``1, 0.7071, 0.5``: 4 significant digits (a preset's 1/sqrt(2) is not printed with 16)."""
    return ", ".join(f"{float(s):.4g}" for s in scales)


def model_for(meta, *, model_name: str | None = None, weights: str | None = None, where: str = "the store"):
    """The model of a store's meta (or check that ``model_name``/``weights`` are that model).

    Refuses (:class:`InputError`) when the name, the weights' sha256, the state-dict hash or the
    preprocessing recorded at extraction differ from the model given. Returns ``(model, weights)``.
    """

    meta = StoreMeta.of(meta)
    recorded = meta.model
    name = model_name or recorded
    if not name:
        raise InputError(f"{where}: the meta names no model (not written by 'cfcd extract'?); photos cannot be "
                         "described the same way")
    if model_name and recorded and model_name != recorded:
        raise InputError(f"--model {model_name} does not match {where}: its descriptors were extracted with "
                         f"{recorded!r}")
    if weights is None and meta.weights:  # the recorded weights, unless others are given
        weights = meta.weights
        if not os.path.exists(weights):
            raise InputError(f"{where}: was extracted with weights {weights}, which is not there any more")
    model = cfcd.models.create(name, weights=weights)
    fingerprint = model_fingerprint(model, weights)
    for key, want, got in (("weights_sha256", meta.weights_sha256, fingerprint["weights_sha256"]),
                           ("state_sha256", meta.state_sha256, fingerprint["state_sha256"]),
                           ("preprocess", meta.preprocess, fingerprint["preprocess"])):
        if want is not None and got is not None and want != got:
            raise InputError(f"the model {name}{f' with weights {weights}' if weights else ''} does not match "
                             f"{where}: {key} is {str(got)[:16]}... but it was extracted with {str(want)[:16]}... "
                             "(other weights?); a query would land in another embedding space")
    return model, weights


def whitening_for(meta, whiten: str | None, where: str = "the store"):
    """The whitening a whitened store was made with (``whiten``: its file), checked against the meta."""
    recorded = StoreMeta.of(meta).whitening
    if recorded is None:
        if whiten is not None:
            raise InputError(f"--whiten {whiten}: {where} holds unwhitened descriptors; drop --whiten")
        return None
    if whiten is None:
        raise InputError(f"{where}: holds whitened descriptors ({recorded.get('kind')}, {recorded.get('dim')}-D); "
                         "pass --whiten FILE with the whitening that made them, so queries are whitened the same way")

    w = load_whitening(whiten)
    got = w.summary()
    if any(recorded.get(k) != v for k, v in got.items() if k in recorded):
        raise InputError(f"--whiten {whiten}: {got} is not the whitening of {where} ({recorded})")
    return w


@dataclass
class Describer:
    """A store's model, extraction options and whitening: :meth:`describe` gives comparable descriptors."""

    model: Any
    weights: str | None
    options: Any  # ExtractOptions
    whitening: Any
    meta: StoreMeta
    where: str

    @property
    def dim(self) -> int:
        return int(self.model.embedding_dim) if self.whitening is None else int(self.whitening.dim)

    def header(self) -> str:
        o = self.options
        return (f"{self.meta.model}{f' ({self.weights})' if self.weights else ''}, scales "
                f"{format_scales(o.scales.scales)}, max size {o.max_size or 'none'}"
                + (", whitened" if self.whitening is not None else ""))

    def describe(self, image_list) -> tuple[DescriptorStore, list[tuple[str, str]]]:
        """Descriptors of ``image_list`` as an in-memory store (the meta of the described store, so
        :func:`cfcd.index.check_compatible` accepts it) and the images that failed, with why."""

        x, failures, _ = Extractor(self.model, self.options).extract(image_list)
        good = [i for i in range(len(image_list)) if np.isfinite(x[i]).all()]
        x = x[good]
        if self.whitening is not None and len(good):
            x = np.asarray(self.whitening.transform(x), dtype=np.float32)
        ids = [image_list.ids[i] for i in good]
        return DescriptorStore(Path(image_list.source or "photos"), x, ids, dict(self.meta.raw)), failures


def describer_for(meta, *, model_name: str | None = None, weights: str | None = None, whiten: str | None = None,
                  device: str = "cpu", runtime: str = "auto", workers: int = 0, progress: bool = False,
                  where: str = "the store") -> Describer:
    """The :class:`Describer` of a store's meta (an index's: ``open_index(...).source["meta"]``)."""

    meta = StoreMeta.of(meta)
    options = ExtractOptions.from_settings(meta.extract_options, device=device, runtime=runtime, batch_size=1,
                                           workers=workers, progress=progress)
    model, weights = model_for(meta, model_name=model_name, weights=weights, where=where)
    whitening = whitening_for(meta, whiten, where)
    return Describer(model, weights, options, whitening, meta, where)
