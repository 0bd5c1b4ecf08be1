"""Download, verify and describe the files of any registered benchmark under ``ROOT/<name>/``.

Downloads resume, are checked against a manifest and never leave ``jpg/`` half-filled; see
``docs/revisitop.md`` for the rules (they are the same for every benchmark) and
:mod:`cfcd.data.datasets.base` for what a benchmark provides.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from cfcd import __version__
from cfcd.data.datasets.registry import DATASETS, get_dataset
from cfcd.data.download import resolve_url

if TYPE_CHECKING:
    from cfcd.data.datasets.base import BenchmarkDataset, RemoteFile
from cfcd.data.download import ArchiveError, download_file, extract_archive
from cfcd.errors import CfcdError, InputError
from cfcd.utils.io import atomic_write_json, atomic_write_text, exclusive_lock, sha256_file

STATE_FILE = ".cfcd-download.json"
LOCK_FILE = ".cfcd-download.lock"
FILE_LISTS_DIR = ".cfcd-files"
DOWNLOADS_DIR = ".downloads"
STAGING_DIR = ".jpg.partial"


# --------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


def load_manifest(path: str | os.PathLike) -> dict[str, dict]:
    """Read a manifest JSON ``{filename or url: {"size": int|null, "sha256": str|null}}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: manifest not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON manifest ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a manifest must be a JSON object keyed by file name")
    manifest: dict[str, dict] = {}
    for key, value in data.items():
        if not isinstance(value, dict) or not set(value) <= {"size", "sha256", "url"}:
            raise InputError(f"{path}: entry {key!r} must be an object with 'size' and/or 'sha256'")
        size, sha = value.get("size"), value.get("sha256")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise InputError(f"{path}: entry {key!r}: size must be a non-negative integer or null, got {size!r}")
        if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha)):
            raise InputError(f"{path}: entry {key!r}: sha256 must be 64 hex digits or null, got {sha!r}")
        manifest[key] = {k: value[k] for k in ("size", "sha256") if k in value}
    return manifest


def expected_for(item: RemoteFile, manifest: dict[str, dict] | None) -> tuple[int | None, str | None]:
    """Expected (size, sha256) of a file: the built-in values overridden by the manifest."""
    size, sha = item.size, item.sha256
    if manifest:
        entry = manifest.get(item.url) or manifest.get(item.filename) or {}
        size = entry.get("size", size)
        sha = entry.get("sha256", sha)
    return size, (sha.lower() if sha else None)


def manifest_from_download(root: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, dict]:
    """A manifest with the size/sha256 recorded by earlier downloads under ``root``."""
    manifest: dict[str, dict] = {}
    for name in names or DATASETS:
        state = _load_state(get_dataset(name).dir(root))
        for filename, record in sorted(state.get("files", {}).items()):
            if record.get("sha256"):
                manifest[filename] = {"size": record.get("size"), "sha256": record["sha256"]}
    return manifest


# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------


def _load_state(ds_dir: Path) -> dict:
    path = ds_dir / STATE_FILE
    if not path.exists():
        return {"files": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CfcdError(f"{path}: unreadable download record ({exc}); delete it to start the download again") from None
    if not isinstance(state, dict) or not isinstance(state.get("files", {}), dict):
        raise CfcdError(f"{path}: malformed download record; delete it to start the download again")
    state.setdefault("files", {})
    return state


def _save_state(ds_dir: Path, state: dict) -> None:
    state["cfcd_version"] = __version__
    atomic_write_json(ds_dir / STATE_FILE, state)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class DownloadSummary:
    """What :func:`download_dataset` did."""

    dataset: str
    dir: Path
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    extracted_files: int = 0
    clashes: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def download_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    base_url: str | None = None,
    manifest: dict[str, dict] | None = None,
    keep_archives: bool = False,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    parts: Sequence[str] | None = None,
    workers: int = 1,
    force: bool = False,
) -> DownloadSummary:
    """Download (or complete) one dataset into ``ROOT/<name>/``; see ``docs/revisitop.md``
    (GLDv2: ``docs/gldv2.md``; ``parts``, ``workers`` and ``force`` are for its tar parts).

    Safe to rerun at any time: complete files and extracted archives are skipped, a partial
    download resumes, a partial extraction restarts from its archive.

    Raises:
        DownloadError: a file could not be downloaded or does not match its manifest entry.
        ArchiveError: an archive is corrupt (it is moved to ``<archive>.corrupt`` and the
            archives already extracted are kept; rerunning downloads it again).
    """
    dataset = get_dataset(name)
    ds_dir = dataset.dir(root)
    ds_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda message: None)
    # one `cfcd data download` per dataset directory at a time
    with exclusive_lock(ds_dir / LOCK_FILE, f"{ds_dir / LOCK_FILE}: another 'cfcd data download' is working on "
                                            f"{ds_dir}; wait for it to finish (the lock is released when it exits)"):
        return dataset.download(root, parts=parts, workers=workers, force=force, base_url=base_url,
                                manifest=manifest, keep_archives=keep_archives, log=log,
                                fetch=dict(retries=retries, backoff=backoff, timeout=timeout, progress=progress,
                                           log=log))


def download_archives(dataset: BenchmarkDataset, root, *, base_url, manifest, keep_archives, log,
                      fetch) -> DownloadSummary:
    """The download of a dataset whose archives all go into ``jpg/`` (revisitop, R1M)."""
    return _download_locked(dataset, root, dataset.dir(root), base_url=base_url, manifest=manifest,
                            keep_archives=keep_archives, log=log, fetch=fetch)


def _download_locked(dataset: BenchmarkDataset, root, ds_dir: Path, *, base_url, manifest, keep_archives,
                     log, fetch) -> DownloadSummary:
    # Extraction dirs left by a killed run (a clean exit removes its own).
    for stale in ds_dir.glob(f".{STAGING_DIR}.extract-*"):
        shutil.rmtree(stale, ignore_errors=True)
    state = _load_state(ds_dir)
    state["dataset"] = dataset.name
    summary = DownloadSummary(dataset.name, ds_dir)
    download_small_files(dataset, ds_dir, state, summary, base_url=base_url, manifest=manifest, log=log,
                         fetch=fetch)

    images_dir = dataset.images_dir(root)
    staging = ds_dir / STAGING_DIR
    downloads = ds_dir / DOWNLOADS_DIR
    if images_dir.exists():
        if not state.get("images_complete"):
            note = (f"{images_dir} exists but was not created by 'cfcd data download': its archives are "
                    "not downloaded (delete it to download them; 'cfcd data verify' checks it)")
            summary.notes.append(note)
            log(f"{dataset.name}: {note}")
        summary.skipped.extend(a.filename for a in dataset.archives)
        return summary

    if not staging.exists():
        # Nothing extracted survives (first run, or jpg/ was deleted): every archive is to do.
        for item in dataset.archives:
            state["files"].get(item.filename, {}).pop("extracted", None)
        state["images_complete"] = False
        _save_state(ds_dir, state)

    done = sum(bool(state["files"].get(a.filename, {}).get("extracted")) for a in dataset.archives)
    for index, item in enumerate(dataset.archives, 1):
        record = state["files"].get(item.filename, {})
        if record.get("extracted"):
            summary.skipped.append(item.filename)
            continue
        size, sha = expected_for(item, manifest)
        url = resolve_url(item.url, base_url)
        archive = downloads / item.filename
        log(f"{dataset.name}: [{index}/{len(dataset.archives)}] downloading {item.filename} ({url})")
        result = download_file(url, archive, expected_size=size, expected_sha256=sha, desc=item.filename, **fetch)
        record = {"url": url, "role": item.role, "size": result.size, "sha256": result.sha256,
                  "downloaded_at": _now(), "extracted": False}
        state["files"][item.filename] = record
        _save_state(ds_dir, state)

        log(f"{dataset.name}: [{index}/{len(dataset.archives)}] extracting {item.filename}")
        try:
            extracted = extract_archive(archive, staging, flatten=dataset.flatten, tag=item.filename,
                                        progress=fetch["progress"])
        except ArchiveError as exc:
            corrupt = archive.with_name(archive.name + ".corrupt")
            os.replace(archive, corrupt)
            del state["files"][item.filename]
            _save_state(ds_dir, state)
            raise ArchiveError(
                f"{exc}. It was moved to {corrupt}; rerun 'cfcd data download {dataset.name}' to fetch it "
                f"again (the {done} archive(s) already extracted are kept)"
            ) from exc
        listing = "".join(f"{f.path}\t{f.size}\t{f.sha256}\n" for f in extracted.files)
        list_path = ds_dir / FILE_LISTS_DIR / f"{item.filename}.tsv"
        atomic_write_text(list_path, listing)
        record.update(extracted=True, files=len(extracted.files), file_list=f"{FILE_LISTS_DIR}/{list_path.name}",
                      clashes=extracted.clashes, duplicates=len(extracted.duplicates),
                      skipped_members=extracted.skipped)
        _save_state(ds_dir, state)
        done += 1
        summary.extracted_files += len(extracted.files)
        summary.clashes.extend(extracted.clashes)
        summary.downloaded.append(item.filename)
        if not keep_archives:
            archive.unlink()

    staging.mkdir(exist_ok=True)
    os.rename(staging, images_dir)
    state["images_complete"] = True
    state["completed_at"] = _now()
    _save_state(ds_dir, state)
    if downloads.exists() and not any(downloads.iterdir()):
        downloads.rmdir()
    log(f"{dataset.name}: images complete in {images_dir}")
    return summary


def download_small_files(dataset: BenchmarkDataset, ds_dir: Path, state: dict, summary: DownloadSummary, *,
                         base_url, manifest, log, fetch) -> None:
    """``dataset.files`` (ground truth, lists, csvs) into ``ds_dir``, recorded in ``state``."""
    for item in dataset.files:
        dest = ds_dir / item.filename
        record = state["files"].get(item.filename, {})
        if dest.exists() and record.get("sha256"):
            summary.skipped.append(item.filename)
            continue
        size, sha = expected_for(item, manifest)
        url = dataset.mirror_url(item.url, base_url)
        log(f"{dataset.name}: {'checking' if dest.exists() else 'downloading'} {item.filename} ({url})")
        result = download_file(url, dest, expected_size=size, expected_sha256=sha, desc=item.filename, **fetch)
        state["files"][item.filename] = {"url": url, "role": item.role, "size": result.size,
                                         "sha256": result.sha256, "downloaded_at": _now()}
        _save_state(ds_dir, state)
        (summary.skipped if result.skipped else summary.downloaded).append(item.filename)


# --------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------


def check_image(path: str | os.PathLike, *, decode: bool = False) -> str | None:
    """Why an image file is unreadable, or None if Pillow opens and verifies it.

    ``decode=True`` also decodes the pixels, which catches truncated JPEG data that
    ``Image.verify`` (a header/structure check) lets through.
    """
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as image:
            image.verify()
        if decode:
            with Image.open(path) as image:
                image.load()
    except Exception as exc:  # any failure of the decoder makes the file unusable
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class VerifyReport:
    """Result of :func:`verify_dataset`; ``ok`` is False if something required is missing or broken."""

    dataset: str
    dir: str
    ok: bool = True
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)              # required images (or listed distractors)
    unreadable: list[dict] = field(default_factory=list)          # {"path", "reason"}
    changed: list[dict] = field(default_factory=list)             # {"path", "reason"} vs the download record
    extra: list[str] = field(default_factory=list)                # files found but not listed
    examples: int = 10

    def error(self, message: str) -> None:
        self.ok = False
        self.errors.append(message)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        status = "OK" if self.ok else "FAILED"
        lines = [f"{self.dataset} ({self.dir}): {status}"]
        lines += [f"  {key}: {value}" for key, value in self.counts.items()]
        for message in self.errors:
            lines.append(f"  error: {message}")
        for message in self.warnings:
            lines.append(f"  warning: {message}")
        return "\n".join(lines)


def _examples(items: list, n: int) -> str:
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _scan_images(images_dir: Path, recursive: bool) -> list[str]:
    if not recursive:
        return sorted(e.name for e in os.scandir(images_dir) if e.is_file() and not e.name.startswith("."))
    found = []
    for dirpath, dirnames, filenames in os.walk(images_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(images_dir).as_posix()
        prefix = "" if rel == "." else rel + "/"
        found.extend(prefix + f for f in filenames if not f.startswith("."))
    return sorted(found)


def _recorded_files(ds_dir: Path, state: dict) -> dict[str, tuple[int, str]]:
    recorded: dict[str, tuple[int, str]] = {}
    for record in state.get("files", {}).values():
        listing = record.get("file_list")
        if not listing or not (ds_dir / listing).exists():
            continue
        for line in (ds_dir / listing).read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit():
                recorded[parts[0]] = (int(parts[1]), parts[2])
    return recorded


def verify_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    check_images: bool = True,
    decode: bool = False,
    checksums: bool = False,
    strict: bool = False,
    workers: int = 8,
    examples: int = 10,
    progress: bool = False,
) -> VerifyReport:
    """Check ``ROOT/<name>/`` against its ground truth (or list) and the download record.

    Errors (``ok=False``): the gnd/list file or ``jpg/`` missing, a gnd or query image
    missing or unreadable, a file whose size (or sha256 with ``checksums``) differs from what
    was extracted or downloaded. For R1M the list and the tarballs are known to disagree, so
    listed-but-missing and unreadable distractors are warnings unless ``strict``. GLDv2 checks the
    tar parts it downloaded (:meth:`cfcd.data.datasets.gldv2.GLDv2Dataset.verify`).
    """
    return get_dataset(name).verify(root, check_images=check_images, decode=decode, checksums=checksums,
                                    strict=strict, workers=workers, examples=examples, progress=progress)


def start_verify(dataset: BenchmarkDataset, root, examples: int) -> tuple[VerifyReport, dict | None]:
    """The report of a verification and the download state, with the small files checked; the state
    is None when the dataset's directory is missing (the report says so)."""
    ds_dir = dataset.dir(root)
    report = VerifyReport(dataset.name, str(ds_dir), examples=examples)
    if not ds_dir.is_dir():
        report.error(f"{ds_dir} not found; run 'cfcd data download {dataset.name} --root {root}'")
        return report, None
    try:
        state = _load_state(ds_dir)
    except CfcdError as exc:
        report.warnings.append(str(exc))
        state = {"files": {}}
    _verify_small_files(dataset, ds_dir, state, report)
    return report, state


def verify_archives(dataset: BenchmarkDataset, root, *, check_images: bool = True, decode: bool = False,
                    checksums: bool = False, strict: bool = False, workers: int = 8, examples: int = 10,
                    progress: bool = False) -> VerifyReport:
    """:func:`verify_dataset` for a dataset whose archives all go into ``jpg/``."""
    ds_dir = dataset.dir(root)
    report, state = start_verify(dataset, root, examples)
    if state is None:
        return report
    images_dir = dataset.images_dir(root)
    if not images_dir.is_dir():
        report.error(f"{images_dir} is missing (required)")
        return report
    if (ds_dir / STAGING_DIR).exists():
        report.warnings.append(f"{ds_dir / STAGING_DIR} exists: an interrupted download; rerun 'cfcd data download'")
    found = _scan_images(images_dir, recursive=not dataset.flatten)
    report.counts["files_found"] = len(found)
    membership = _verify_membership(dataset, root, images_dir, found, report, strict=strict)
    if membership is None:
        return report
    required, extra = membership
    _verify_unchanged(ds_dir, images_dir, state, found, report, checksums=checksums, workers=workers,
                      progress=progress)
    if check_images:
        _verify_readable(dataset, images_dir, required, extra, report, decode=decode, strict=strict,
                         workers=workers, progress=progress)
    return report


def _verify_small_files(dataset: BenchmarkDataset, ds_dir: Path, state: dict, report: VerifyReport) -> None:
    """The small downloaded files: present, unchanged since the download (or as published)."""
    for item in dataset.files:
        path = ds_dir / item.filename
        if not path.exists():
            report.error(f"{path} is missing (required)")
            continue
        record = state["files"].get(item.filename, {})
        known = record.get("sha256") or item.sha256
        if known and sha256_file(path) != known:
            source = "the download record" if record.get("sha256") else "the published file"
            report.error(f"{path}: sha256 differs from {source} (corrupted or replaced since)")


def _verify_membership(dataset: BenchmarkDataset, root, images_dir: Path, found: list[str], report: VerifyReport,
                       *, strict: bool) -> tuple[list[str], list[str]] | None:
    """The images the benchmark names against the files found: ``(required, extra)``, or None
    when its ground truth (or list) is missing (already reported) or unreadable."""
    kind = "list" if dataset.is_distractor_set else "gnd"
    source = dataset.file_path(root, kind)
    if source is None or not source.exists():
        return None
    try:
        wanted = dataset.expected_images(root)
    except CfcdError as exc:
        report.error(str(exc))
        return None
    found_set, wanted_set = set(found), set(wanted)
    missing = [x for x in wanted if x not in found_set]
    extra = [x for x in found if x not in wanted_set]
    required = [x for x in wanted if x in found_set]
    report.missing, report.extra = missing, extra
    examples = report.examples
    if dataset.is_distractor_set:
        report.counts.update(distractors_listed=len(wanted), distractors_found=len(found),
                             listed_not_found=len(missing), found_not_listed=len(extra))
        if missing or extra:
            message = (f"the list names {len(wanted)} distractors and {len(found)} files were found: "
                       f"{len(missing)} listed but not found ({_examples(missing, examples)}), "
                       f"{len(extra)} found but not listed ({_examples(extra, examples)})")
            if strict and missing:
                report.error(message)
            else:
                report.warnings.append(message)
        return required, extra
    gt = dataset.ground_truth(root)
    report.counts.update(queries=len(gt.qimlist), database=len(gt.imlist), missing=len(missing),
                         not_in_gnd=len(extra))
    if missing:
        hint = ""
        if any(entry.is_dir() for entry in os.scandir(images_dir)):
            hint = " (jpg/ has subdirectories: the images must be directly in jpg/, as the download puts them)"
        report.error(f"{len(missing)} of the {len(wanted)} images named in {source.name} are missing "
                     f"from {images_dir}: {_examples(missing, examples)}{hint}")
    if extra:
        report.warnings.append(f"{len(extra)} files in {images_dir} are not in {source.name} "
                               f"(not used by the benchmark): {_examples(extra, examples)}")
    return required, extra


def _verify_unchanged(ds_dir: Path, images_dir: Path, state: dict, found: list[str], report: VerifyReport, *,
                      checksums: bool, workers: int, progress: bool) -> None:
    """Files changed since extraction (size always, sha256 with ``checksums``)."""
    from tqdm.auto import tqdm

    recorded = _recorded_files(ds_dir, state)
    if not recorded:
        return

    def changed(rel: str) -> dict | None:
        size, sha = recorded[rel]
        path = images_dir / rel
        actual = path.stat().st_size
        if actual != size:
            return {"path": rel, "reason": f"size {actual} != {size} extracted"}
        if checksums and sha256_file(path) != sha:
            return {"path": rel, "reason": "sha256 differs from the extracted file"}
        return None

    targets = [x for x in found if x in recorded]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(changed, targets, chunksize=64)
        report.changed = [r for r in tqdm(results, total=len(targets), desc="sizes", disable=not progress) if r]
    if report.changed:
        report.error(f"{len(report.changed)} files differ from what was extracted: "
                     f"{_examples([c['path'] for c in report.changed], report.examples)}")


def _verify_readable(dataset: BenchmarkDataset, images_dir: Path, required: list[str], extra: list[str],
                     report: VerifyReport, *, decode: bool, strict: bool, workers: int, progress: bool) -> None:
    """Every needed image (and, except for distractors, every other file) opens."""
    from tqdm.auto import tqdm

    targets = required + (extra if not dataset.is_distractor_set else [])
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = pool.map(lambda rel: check_image(images_dir / rel, decode=decode), targets, chunksize=16)
        for rel, reason in zip(targets, tqdm(reasons, total=len(targets), desc="images", disable=not progress)):
            if reason is not None:
                report.unreadable.append({"path": rel, "reason": reason})
    report.counts["checked"] = len(targets)
    report.counts["unreadable"] = len(report.unreadable)
    needed = set(required)
    bad_needed = [u for u in report.unreadable if u["path"] in needed]
    bad_other = [u for u in report.unreadable if u["path"] not in needed]
    examples = report.examples
    if bad_needed:
        text = "; ".join(f"{u['path']} ({u['reason']})" for u in bad_needed[:examples])
        message = f"{len(bad_needed)} unreadable images: {text}"
        if dataset.is_distractor_set and not strict:
            report.warnings.append(message)
        else:
            report.error(message)
    if bad_other:
        text = "; ".join(f"{u['path']} ({u['reason']})" for u in bad_other[:examples])
        report.warnings.append(f"{len(bad_other)} unreadable files outside the ground truth: {text}")


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------


def layout_report(root: str | os.PathLike, names: Iterable[str] | None = None) -> str:
    """Where every file of the datasets is expected under ``root``, and what is there now."""
    root = Path(root)
    lines = [f"benchmark data root: {root}"]
    for name in names or DATASETS:
        dataset = get_dataset(name)
        ds_dir = dataset.dir(root)
        lines.append(f"\n{dataset.name}: {dataset.description}")
        for item in dataset.files:
            path = ds_dir / item.filename
            lines.append(f"  {path}  [{'present' if path.exists() else 'missing'}]  <- {item.url}")
        for images_dir, sources in dataset.image_dirs(root).items():
            if images_dir.is_dir():
                n = len(_scan_images(images_dir, recursive=not dataset.flatten))
                status = f"present, {n} files"
            elif (ds_dir / STAGING_DIR).exists():
                status = "incomplete download in " + STAGING_DIR
            else:
                status = "missing"
            layout = "flat" if dataset.flatten else "as in the archives"
            lines.append(f"  {images_dir}/  [{status}]  ({layout})")
            if len(sources) <= 2:
                lines += [f"    <- {a.url}" for a in sources]
            else:
                lines.append(f"    <- {sources[0].url} ... {sources[-1].filename} ({len(sources)} archives)")
    return "\n".join(lines)

