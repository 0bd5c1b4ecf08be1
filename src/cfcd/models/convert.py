"""Checkpoint conversion: any supported source -> ``model.safetensors`` + ``config.json`` (+ ``extra.safetensors``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfcd.models.checkpoints import LoadReport, save_weights, weights_sha256
from cfcd.models.registry import create


def convert_checkpoint(source: str | Path, model_name: str, out_dir: str | Path, *, format: str = "auto",
                       strict: bool = True, backbone_only: bool = False, **kwargs: Any) -> tuple[Any, LoadReport, Path]:
    """Load ``source`` into ``model_name`` (strictly by default) and write it to ``out_dir``.

    ``backbone_only`` converts an ImageNet backbone (pycls ``R-50-1x64d_dds_8gpu.pyth``, torchvision)
    for training: every backbone tensor must match, the heads keep their fresh initialisation.
    The config records the model name and kwargs, the source path, its sha256 and format, the
    import notes and, when not strict, what was missing or unexpected.
    """
    from cfcd.models.checkpoints import load_backbone_weights, read_checkpoint

    source = Path(source)
    if backbone_only:
        ckpt = read_checkpoint(source, format=format)
        model = create(model_name, pretrained=False, **kwargs)
        report = load_backbone_weights(model, ckpt)
        model.load_report = report
    else:
        model = create(model_name, weights=source, strict=strict, format=format, **kwargs)
        report = model.load_report
    sha = weights_sha256(source)
    meta = {"source": str(source), "source_sha256": sha, "source_format": report.format, "notes": report.notes,
            "backbone_only": backbone_only}
    if not report.complete:
        meta["incomplete_load"] = {"missing": report.missing, "unexpected": report.unexpected,
                                   "mismatched": [[k, list(a), list(b)] for k, a, b in report.mismatched]}
    out = save_weights(model, out_dir, extra=report.extra, meta=meta, only=("backbone.",) if backbone_only else None)
    written = write_stored_whitenings(report.extra, out, source=str(source))
    if written:
        report.notes.append(f"stored whitening(s) written: {', '.join(str(p) for p in written)} "
                            "(apply with --whiten NAME --whiten-power P)")
    return model, report, out


def write_stored_whitenings(extra: dict, out_dir: str | Path, *, source: str = "") -> list[Path]:
    """Write every dirtorch PCA of a checkpoint (extras ``pca.<name>.{mean,components,
    explained_variance,whiten}``) as ``out_dir/whitening/<name>.safetensors`` (+ ``.json``)."""
    from cfcd.postprocess import WHITENING_DIR, whitening_from_sklearn_pca

    names = sorted({k[len("pca."):].rsplit(".", 1)[0] for k in extra if k.startswith("pca.")})
    written = []
    for name in names:
        arrays = {a: extra.get(f"pca.{name}.{a}") for a in ("mean", "components", "explained_variance")}
        if any(v is None for v in arrays.values()):
            continue
        whiten = extra.get(f"pca.{name}.whiten")
        w = whitening_from_sklearn_pca(
            arrays["mean"].double().numpy(), arrays["components"].double().numpy(),
            arrays["explained_variance"].double().numpy(), whiten=bool(whiten) if whiten is not None else True,
            info={"source": f"{source}: pca[{name!r}] (deep-image-retrieval, sklearn PCA)", "name": name},
        )
        written.append(w.save(Path(out_dir) / WHITENING_DIR / name))
    return written
