"""Google Landmarks v2: the training set and the retrieval benchmark, in the official layout.

Sources (cvdfoundation/google-landmark, ``download-dataset.sh``): ``<base>/<split>/images_NNN.tar``
(train 000-499, index 000-099, test 000-019), each with ``<base>/md5sum/<split>/md5.images_NNN.txt``
(``<md5>  images_NNN.tar``), and the csvs under ``<base>/metadata/`` and ``<base>/ground_truth/``.
A tar holds ``a/b/c/<id>.jpg``; it is extracted into ``ROOT/<dataset>/<split>/``, so an image is
``ROOT/gldv2_train/train/a/b/c/<id>.jpg`` as in the official layout.

The download takes any subset of the tars (``parts``), several at a time (``workers``); a tar is
checked against its md5 before extraction (a mismatch is fetched again), extracted atomically per
file and recorded, then deleted. Killed at any moment, a rerun ends with exactly the files of the
chosen tars. ``docs/gldv2.md`` has the layout, the commands and the metric.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from cfcd.data.datasets.base import BenchmarkDataset, RemoteFile
from cfcd.data.datasets.install import (
    DOWNLOADS_DIR,
    FILE_LISTS_DIR,
    DownloadSummary,
    VerifyReport,
    _examples,
    _load_state,
    _now,
    _recorded_files,
    _save_state,
    _scan_images,
    _verify_readable,
    _verify_unchanged,
    download_small_files,
    start_verify,
)
from cfcd.data.datasets.registry import register_dataset
from cfcd.data.download import (
    MIRROR_ENV,
    ArchiveError,
    DownloadError,
    download_file,
    extract_archive,
    md5_file,
    remote_size,
)
from cfcd.data.gnd import GroundTruth
from cfcd.data.lists import ImageList
from cfcd.errors import CfcdError, InputError
from cfcd.utils.io import atomic_write_text, sha256_file

__all__ = ["GLDV2_BASE", "GLDv2Dataset", "GLDv2Retrieval", "Split", "download_parts", "gldv2_path", "parse_parts",
           "read_ids", "read_retrieval_solution", "verify_parts"]

GLDV2_BASE = "https://s3.amazonaws.com/google-landmark"
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")
USAGES = ("Public", "Private", "Ignored")


def gldv2_path(image_id: str) -> str:
    """``a/b/c/<id>.jpg``: where GLDv2 keeps an image inside its split."""
    if len(image_id) < 3:
        raise InputError(f"GLDv2 image id {image_id!r} is shorter than 3 characters")
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


@dataclass(frozen=True)
class Split:
    """One split of GLDv2 (``train``, ``index``, ``test``): ``count`` tars and the csv naming its images."""

    name: str
    count: int
    csv: str  # file name of the csv (column ``id``) that lists the split's images

    def archive(self, i: int) -> RemoteFile:
        return RemoteFile(f"{GLDV2_BASE}/{self.name}/images_{i:03d}.tar", "images")

    def md5_url(self, i: int) -> str:
        return f"{GLDV2_BASE}/md5sum/{self.name}/md5.images_{i:03d}.txt"

    def key(self, i: int) -> str:
        """The name a part is recorded under (``train/images_007.tar``)."""
        return f"{self.name}/images_{i:03d}.tar"


def parse_parts(specs: Sequence[str] | None, splits: Sequence[Split]) -> dict[str, list[int]]:
    """``["0-9,42"]`` (every split) or ``["index:0-1", "test:0"]`` to the tars of each split.

    Without ``specs`` every tar of every split. A split that no spec names is not downloaded.
    """
    if not specs:
        return {s.name: list(range(s.count)) for s in splits}
    by_name = {s.name: s for s in splits}
    chosen: dict[str, set[int]] = {}
    for spec in specs:
        for text in spec.split():
            name, _, ranges = text.rpartition(":")
            targets = [by_name[name]] if name in by_name else list(splits) if not name else None
            if targets is None:
                raise InputError(f"--parts {text!r}: unknown split {name!r}; choose from {', '.join(by_name)}")
            numbers: set[int] = set()
            for item in ranges.split(","):
                match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
                if match is None:
                    raise InputError(f"--parts {text!r}: expected numbers and ranges such as 0-9,42")
                first, last = int(match.group(1)), int(match.group(2) or match.group(1))
                if last < first:
                    raise InputError(f"--parts {text!r}: range {item!r} runs backwards")
                numbers.update(range(first, last + 1))
            for split in targets:
                bad = sorted(n for n in numbers if n >= split.count)
                if bad:
                    raise InputError(f"--parts {text!r}: part {bad[0]} does not exist: {split.name} has "
                                     f"{split.count} tars (0-{split.count - 1})")
                chosen.setdefault(split.name, set()).update(numbers)
    return {s.name: sorted(chosen[s.name]) for s in splits if s.name in chosen}


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputError(f"{path}: not found; run 'cfcd data download' for its dataset")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} (header: {','.join(reader.fieldnames or [])})")
        return list(reader)


def read_ids(path: Path) -> list[str]:
    """The ``id`` column of a GLDv2 csv (train.csv, index.csv, test.csv)."""
    return [row["id"] for row in _read_csv(path, ("id",))]


def read_retrieval_solution(path: str | os.PathLike) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """``retrieval_solution_v2.1.csv`` as ``(public, private, ignored)``: query id -> index ids.

    Rows ``Ignored`` or whose ``images`` is ``None`` are not scored (DELF's ``ReadSolution``
    leaves them out of the solution); any other Usage is an error naming the row.
    """
    path = Path(path)
    public: dict[str, list[str]] = {}
    private: dict[str, list[str]] = {}
    ignored: list[str] = []
    for line, row in enumerate(_read_csv(path, ("id", "images", "Usage")), start=2):
        usage, images = row["Usage"], (row["images"] or "").strip()
        if usage not in USAGES:
            raise InputError(f"{path}:{line}: Usage {usage!r} is not one of {', '.join(USAGES)}")
        if usage == "Ignored" or images in ("", "None"):
            ignored.append(row["id"])
            continue
        (public if usage == "Public" else private)[row["id"]] = images.split(" ")
    return public, private, ignored


@dataclass(frozen=True)
class GLDv2Dataset(BenchmarkDataset):
    """A GLDv2 dataset: tar parts per split into ``ROOT/<name>/<split>/``, csvs in ``ROOT/<name>/``."""

    splits: tuple[Split, ...] = ()

    def split(self, name: str) -> Split:
        return next(s for s in self.splits if s.name == name)

    def mirror_url(self, url: str, base_url: str | None) -> str:
        """A mirror replaces the official base ``https://s3.amazonaws.com/google-landmark`` (so it holds
        ``train/``, ``md5sum/``, ``metadata/``... at its top, as the official bucket does)."""
        base = base_url if base_url is not None else os.environ.get(MIRROR_ENV) or None
        if not base or not url.startswith(GLDV2_BASE):
            return url
        return base.rstrip("/") + url[len(GLDV2_BASE):]

    def image_dirs(self, root: str | os.PathLike) -> dict[Path, tuple[RemoteFile, ...]]:
        return {self.dir(root) / s.name: tuple(s.archive(i) for i in range(s.count)) for s in self.splits}

    def expected_images(self, root: str | os.PathLike) -> list[str]:
        """Every image its csvs name, as ``<split>/a/b/c/<id>.jpg``."""
        return [f"{s.name}/{gldv2_path(i)}" for s in self.splits for i in read_ids(self.dir(root) / s.csv)]

    def download(self, root: str | os.PathLike, *, parts: Sequence[str] | None = None, workers: int = 1,
                 force: bool = False, **options: Any):
        return download_parts(self, root, parse_parts(parts, self.splits), workers=max(1, int(workers)),
                              force=force, **options)

    def verify(self, root: str | os.PathLike, **options: Any):
        return verify_parts(self, root, **options)


@dataclass(frozen=True)
class GLDv2Retrieval(GLDv2Dataset):
    """The GLDv2 retrieval benchmark: queries are the scored test images, the database the index.

    The ground truth is a :class:`cfcd.data.gnd.GroundTruth` whose queries are the test images the
    solution scores (Public, then Private, in file order) with ``public``/``private`` lists of
    index positions; the setups ``public``, ``private`` and ``all`` average over the queries that
    have them, and the metrics are DELF's mAP@100 and mean precision at 100
    (:mod:`cfcd.evaluation.gldv2`).
    """

    setups: ClassVar[dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None] = {
        "public": (("public",), ()),
        "private": (("private",), ()),
        "all": (("public", "private"), ()),
    }

    # DELF's mAP@100 and precision at 100 (mPrecision@100, not revisitop's mP@k): cfcd.evaluation.gldv2
    metrics: ClassVar[tuple[str, ...] | None] = ("mAP@100", "mPrecision@100")

    def ground_truth(self, root: str | os.PathLike):
        solution_path = self.file_path(root, "gnd")
        public, private, _ = read_retrieval_solution(solution_path)
        index_path = self.dir(root) / self.split("index").csv
        imlist = read_ids(index_path)
        position = {name: i for i, name in enumerate(imlist)}
        if len(position) != len(imlist):
            raise InputError(f"{index_path}: an id is listed twice")
        qimlist, entries = [], []
        for usage, solution in (("public", public), ("private", private)):
            for query, images in solution.items():
                unknown = [x for x in images if x not in position]
                if unknown:
                    raise InputError(f"{solution_path}: query {query!r} names {unknown[0]!r}, which is not in "
                                     f"{index_path.name}")
                entry = {"bbx": None, "public": [], "private": []}
                entry[usage] = [position[x] for x in images]
                qimlist.append(query)
                entries.append(entry)
        return GroundTruth(dataset=self.name, path=Path(solution_path), sha256=sha256_file(solution_path),
                           imlist=imlist, qimlist=qimlist, gnd=entries)

    def benchmark_list(self, gnd, root: str | os.PathLike, *, queries: bool):
        """Whole images (no crop): the scored test images, or the index images."""

        split = "test" if queries else "index"
        names = list(gnd.qimlist if queries else gnd.imlist)
        directory = self.dir(root) / split
        return ImageList(ids=names, paths=[directory / gldv2_path(n) for n in names], boxes=None,
                         source=f"{gnd.path}:{'queries' if queries else 'index'}")

    def image_list(self, root: str | os.PathLike, *, queries: bool = False):
        return self.benchmark_list(self.ground_truth(root), root, queries=queries)



# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    """Bytes in GiB, or MiB/KiB below one (a subset of a few tars)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _read_md5(path: Path, archive: str) -> str:
    """The md5 in ``md5.images_NNN.txt`` (``<md5>  images_NNN.tar``)."""
    fields = path.read_text(encoding="utf-8", errors="replace").split()
    if len(fields) < 2 or not _MD5.match(fields[0]) or Path(fields[1]).name != archive:
        raise DownloadError(f"{path}: expected '<md5>  {archive}', found {' '.join(fields[:2])[:80]!r}")
    return fields[0].lower()


def download_parts(dataset: GLDv2Dataset, root: str | os.PathLike, chosen: dict[str, list[int]], *, workers: int,
                   force: bool, base_url, manifest, keep_archives: bool, log, fetch) -> DownloadSummary:
    """The csvs, then the chosen tars of each split, ``workers`` at a time (see the module docstring)."""
    ds_dir = dataset.dir(root)
    _remove_leftovers(dataset, ds_dir)
    state = _load_state(ds_dir)
    state["dataset"] = dataset.name
    summary = DownloadSummary(dataset.name, ds_dir)
    download_small_files(dataset, ds_dir, state, summary, base_url=base_url, manifest=manifest, log=log,
                         fetch=fetch)
    downloads = ds_dir / DOWNLOADS_DIR
    todo: list[tuple[Split, int]] = []
    for split in dataset.splits:
        for i in chosen.get(split.name, []):
            if state["files"].get(split.key(i), {}).get("extracted"):
                summary.skipped.append(split.key(i))
                if not keep_archives:  # killed between the record and the deletion
                    for leftover in (downloads / split.key(i), downloads / "md5sum" / split.name / f"md5.images_{i:03d}.txt"):
                        leftover.unlink(missing_ok=True)
            else:
                todo.append((split, i))
    if todo:
        _check_space(dataset, ds_dir, todo, base_url=base_url, workers=workers, keep_archives=keep_archives,
                     force=force, log=log, timeout=fetch["timeout"])
        for split in {s for s, _ in todo}:
            # every extraction merges into an existing directory: no race between workers to create it
            (ds_dir / split.name).mkdir(exist_ok=True)
        lock = threading.Lock()
        if workers > 1:
            fetch = {**fetch, "progress": False}  # several bars at once would garble the terminal
            log = _one_line_at_a_time(log)
            fetch["log"] = log

        def one(job: tuple[Split, int]) -> None:
            _download_part(dataset, ds_dir, state, summary, lock, job, base_url=base_url,
                           keep_archives=keep_archives, log=log, fetch=fetch)

        failures = []
        with ThreadPoolExecutor(workers) as pool:
            for job, future in [(job, pool.submit(one, job)) for job in todo]:
                try:
                    future.result()
                except CfcdError as exc:
                    failures.append((job[0].key(job[1]), exc))
        if failures:
            key, first = failures[0]
            raise type(first)(f"{len(failures)} of {len(todo)} tars failed, first {key}: {first}; the others are "
                              f"extracted and kept: rerun the same command to complete") from first
    if downloads.exists() and not any(p.is_file() for p in downloads.rglob("*")):
        shutil.rmtree(downloads, ignore_errors=True)
    done = {s.name: sum(bool(state["files"].get(s.key(i), {}).get("extracted")) for i in range(s.count))
            for s in dataset.splits}
    log(f"{dataset.name}: " + ", ".join(f"{n}: {k} of {dataset.split(n).count} tars extracted" for n, k in done.items()))
    return summary


def _remove_leftovers(dataset: GLDv2Dataset, ds_dir: Path) -> None:
    """What a killed run leaves and a clean exit removes: extraction dirs, atomic writes' temp files."""
    for split in dataset.splits:
        for stale in ds_dir.glob(f".{split.name}.extract-*"):
            shutil.rmtree(stale, ignore_errors=True)
    temps = [*ds_dir.glob(".*.tmp"), *(ds_dir / DOWNLOADS_DIR).rglob(".*.tmp"), *(ds_dir / FILE_LISTS_DIR).glob(".*.tmp")]
    for stale in temps:  # cfcd.utils.io.atomic_open names them .<name>.<random>.tmp
        stale.unlink(missing_ok=True)


def _one_line_at_a_time(log):
    """``log`` for several threads: print writes the text and the newline separately."""
    lock = threading.Lock()

    def locked(message: str) -> None:
        with lock:
            log(message)

    return locked


def _check_space(dataset: GLDv2Dataset, ds_dir: Path, todo: list[tuple[Split, int]], *, base_url, workers: int,
                 keep_archives: bool, force: bool, log, timeout: float) -> None:
    """Print the size to download (HEAD Content-Length) and the free disk; refuse when it cannot fit."""
    urls = [dataset.mirror_url(split.archive(i).url, base_url) for split, i in todo]
    with ThreadPoolExecutor(min(16, max(4, workers))) as pool:
        sizes = list(pool.map(lambda url: remote_size(url, timeout=timeout), urls))
    known = [s for s in sizes if s is not None]
    have = 0  # bytes of tars already (partly) downloaded by an earlier run
    for split, i in todo:
        for path in (ds_dir / DOWNLOADS_DIR / split.key(i), ds_dir / DOWNLOADS_DIR / (split.key(i) + ".part")):
            if path.is_file():
                have += path.stat().st_size
    to_download = max(0, sum(known) - have)
    # the extracted images take about the tar's size; the tars themselves stay only with --keep-archives
    in_flight = to_download if keep_archives else min(to_download, workers * max(known, default=0))
    needed = sum(known) + in_flight
    free = shutil.disk_usage(ds_dir).free
    unknown = f" ({len(sizes) - len(known)} tars of unknown size not counted)" if len(known) < len(sizes) else ""
    log(f"{dataset.name}: {len(todo)} tars to fetch, {_gib(to_download)} to download (HEAD Content-Length){unknown}; "
        f"about {_gib(needed)} needed on disk with the extracted images, {_gib(free)} free in {ds_dir}")
    if needed > free:
        message = (f"{ds_dir}: about {_gib(needed)} are needed and {_gib(free)} are free; free some space, "
                   "choose fewer tars with --parts, or pass --force to start anyway")
        if not force:
            raise CfcdError(message)
        log(f"{dataset.name}: --force: starting although {message.split(': ', 1)[1].split(';')[0]}")


def _download_part(dataset: GLDv2Dataset, ds_dir: Path, state: dict, summary: DownloadSummary, lock, job, *,
                   base_url, keep_archives: bool, log, fetch) -> None:
    """One tar: its md5, the tar (fetched again while the md5 differs), extraction, the record."""
    split, i = job
    key = split.key(i)
    name = Path(key).name
    downloads = ds_dir / DOWNLOADS_DIR
    md5_url = dataset.mirror_url(split.md5_url(i), base_url)
    md5_path = downloads / "md5sum" / split.name / f"md5.images_{i:03d}.txt"
    download_file(md5_url, md5_path, desc=md5_path.name, **fetch)
    md5 = _read_md5(md5_path, name)
    url = dataset.mirror_url(split.archive(i).url, base_url)
    archive = downloads / key
    for attempt in range(fetch["retries"] + 1):
        log(f"{dataset.name}: downloading {key} ({url})")
        result = download_file(url, archive, desc=key, **fetch)
        actual = md5_file(archive)
        if actual == md5:
            break
        archive.unlink()
        log(f"{dataset.name}: {key}: md5 {actual} differs from the published {md5} (corrupt transfer); "
            "fetching it again")
    else:
        raise DownloadError(f"{url}: md5 still differs from {md5_url} after {fetch['retries'] + 1} downloads")
    log(f"{dataset.name}: extracting {key}")
    try:
        extracted = extract_archive(archive, ds_dir / split.name, tag=key, progress=fetch["progress"])
    except ArchiveError as exc:
        corrupt = archive.with_name(archive.name + ".corrupt")
        os.replace(archive, corrupt)
        raise ArchiveError(f"{exc} (its md5 matches the published one); it was moved to {corrupt}") from exc
    listing = "".join(f"{split.name}/{f.path}\t{f.size}\t{f.sha256}\n" for f in extracted.files)
    list_path = ds_dir / FILE_LISTS_DIR / f"{split.name}.{name}.tsv"
    atomic_write_text(list_path, listing)
    with lock:
        state["files"][key] = {"url": url, "role": "images", "size": result.size, "sha256": result.sha256,
                               "md5": md5, "downloaded_at": _now(), "extracted": True, "files": len(extracted.files),
                               "file_list": f"{FILE_LISTS_DIR}/{list_path.name}", "clashes": extracted.clashes,
                               "skipped_members": extracted.skipped}
        _save_state(ds_dir, state)
        summary.downloaded.append(key)
        summary.extracted_files += len(extracted.files)
        summary.clashes.extend(extracted.clashes)
    if not keep_archives:
        archive.unlink()
        md5_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------------------


def verify_parts(dataset: GLDv2Dataset, root: str | os.PathLike, *, check_images: bool = True, decode: bool = False,
                 checksums: bool = False, strict: bool = False, workers: int = 8, examples: int = 10,
                 progress: bool = False) -> VerifyReport:
    """The csvs, the images of the extracted tars (present, unchanged, readable), and the csvs' images.

    An image its csv names but that is not here is an error once every tar of its split is
    extracted, else a warning (``--parts`` downloads a subset); ``strict`` makes it an error.
    """
    ds_dir = dataset.dir(root)
    report, state = start_verify(dataset, root, examples)
    if state is None:
        return report
    found: list[str] = []
    for split in dataset.splits:
        _verify_split(dataset, ds_dir, split, state, report, found, strict=strict)
    recorded = _recorded_files(ds_dir, state)
    found_set = set(found)
    report.missing = [p for p in recorded if p not in found_set]
    if report.missing:
        report.error(f"{len(report.missing)} images extracted from the tars are missing: "
                     f"{_examples(report.missing, examples)}")
    if dataset.file_path(root, "gnd") is not None and dataset.file_path(root, "gnd").is_file():
        try:
            gt = dataset.ground_truth(root)
            report.counts.update(queries=len(gt.qimlist), database=len(gt.imlist))
        except CfcdError as exc:
            report.error(str(exc))
    if (ds_dir / DOWNLOADS_DIR).exists():
        report.warnings.append(f"{ds_dir / DOWNLOADS_DIR} exists: an interrupted download (or --keep-archives); "
                               "rerun 'cfcd data download' to complete it")
    _verify_unchanged(ds_dir, ds_dir, state, found, report, checksums=checksums, workers=workers, progress=progress)
    if check_images:
        _verify_readable(dataset, ds_dir, found, [], report, decode=decode, strict=strict, workers=workers,
                         progress=progress)
    return report


def _verify_split(dataset: GLDv2Dataset, ds_dir: Path, split: Split, state: dict, report: VerifyReport,
                  found: list[str], *, strict: bool) -> None:
    directory = ds_dir / split.name
    parts = sum(bool(state["files"].get(split.key(i), {}).get("extracted")) for i in range(split.count))
    files = [f"{split.name}/{p}" for p in _scan_images(directory, recursive=True)] if directory.is_dir() else []
    found.extend(files)
    report.counts[f"{split.name}_tars_extracted"] = parts
    report.counts[f"{split.name}_images"] = len(files)
    if not files:
        report.error(f"{directory}: no images; run 'cfcd data download {dataset.name} --root {ds_dir.parent}' "
                     "(--parts for a subset of the tars)")
        return
    csv_path = ds_dir / split.csv
    if not csv_path.is_file():
        return  # reported by the small files' check
    try:
        named = {f"{split.name}/{gldv2_path(i)}" for i in read_ids(csv_path)}
    except CfcdError as exc:
        report.error(str(exc))
        return
    here = set(files)
    absent = len(named - here)
    extra = [x for x in files if x not in named]
    report.counts[f"{split.name}_in_csv"] = len(named)
    if extra:
        report.extra.extend(extra)
        report.warnings.append(f"{len(extra)} files in {directory} are not in {split.csv}: {_examples(extra, report.examples)}")
    if absent:
        message = (f"{absent} of the {len(named)} images in {split.csv} are not in {directory} "
                   f"({parts} of its {split.count} tars extracted)")
        if parts == split.count or strict:
            report.error(message)
        else:
            report.warnings.append(message)


def _metadata(path: str, role: str) -> RemoteFile:
    return RemoteFile(f"{GLDV2_BASE}/{path}", role)  # type: ignore[arg-type]


register_dataset(GLDv2Dataset(
    name="gldv2_train",
    description="GLDv2 training set: 500 tars (all images: train.csv; the clean subset: train_clean.csv)",
    archives=(),
    files=(_metadata("metadata/train.csv", "list"), _metadata("metadata/train_clean.csv", "list"),
           _metadata("metadata/train_label_to_category.csv", "list")),
    flatten=False,
    splits=(Split("train", 500, "train.csv"),),
))
register_dataset(GLDv2Retrieval(
    name="gldv2_retrieval",
    description="GLDv2 retrieval: index images (100 tars, the database), test images (20 tars; the queries "
                "are those retrieval_solution_v2.1.csv scores)",
    archives=(),
    files=(_metadata("metadata/index.csv", "list"), _metadata("metadata/test.csv", "list"),
           _metadata("ground_truth/retrieval_solution_v2.1.csv", "gnd")),
    flatten=False,
    splits=(Split("index", 100, "index.csv"), Split("test", 20, "test.csv")),
))
