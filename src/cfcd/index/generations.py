"""Generations of an index directory: the files a commit names, the commit itself, and the clean-up
of what older generations and killed jobs left behind.

Every build, add and remove writes the files it changes under the next generation's names
(``index-gG.faiss``, ``images-gG.txt``, ...), then ``index.json`` (atomically: the switch), then
deletes every generation file the new ``index.json`` does not name. A reader that opened an older
generation keeps its files open or memory-mapped, so deleting them is safe (POSIX: the space is
freed when the last map goes) and a commit never breaks a search in flight.

Test hook: the environment variable ``CFCD_INDEX_KILL_AT`` naming a phase (``encode``, ``merge``,
``tune``, ``commit``) makes a build or an add SIGKILL itself at that point (:func:`kill_point`),
so tests can check that a rerun resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

from cfcd.errors import InputError
from cfcd.index.base import BUILD_DIR, INDEX_META
from cfcd.utils.io import atomic_open, atomic_write_json, make_temp_file

logger = logging.getLogger(__name__)

# the names a generation's files take: anything of this form that index.json does not name is garbage
_GENERATION_FILE = re.compile(r"^(index|trained|images|removed|descriptors)-g\d+\.(faiss|ivfdata|txt|npy)$")
KILL_ENV = "CFCD_INDEX_KILL_AT"


def kill_point(phase: str) -> None:
    """The test hook: SIGKILL this process when ``CFCD_INDEX_KILL_AT`` names ``phase``."""
    if os.environ.get(KILL_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def read_info(path: Path) -> dict | None:
    """The committed ``index.json`` of ``path`` (None when there is none)."""
    meta = Path(path) / INDEX_META
    try:
        text = meta.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise InputError(f"{meta}: not valid UTF-8: {exc}") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{meta}: not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise InputError(f"{meta}: expected a JSON object")
    return info


def generation(path: str | os.PathLike) -> str:
    """A token of the committed index in ``path``: it changes at every commit (build, add, remove).

    Cheap (one ``stat`` of ``index.json``: its inode and modification time, both new at each atomic
    replace), so a server can poll it and reopen the index when it differs from
    ``Index.generation``. A store searched directly gets the token of its ``meta.json`` (or .npy).
    """
    path = Path(path)
    for name in (INDEX_META, "meta.json"):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            return _token(os.stat(path / name))
    try:
        return _token(os.stat(path))
    except FileNotFoundError:
        raise InputError(f"{path}: index directory not found") from None


def _token(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_mtime_ns}"


def referenced(info: dict | None) -> set[str]:
    """The file names that ``info`` (an index.json) names."""
    if not info:
        return set()
    files = info.get("files") or {}
    names = {files.get("index"), files.get("ivfdata"), files.get("ids"), files.get("removed"), files.get("trained")}
    names.update(files.get("vectors") or [])
    return {n for n in names if n}


def commit(out: Path, info: dict) -> None:
    """Write ``index.json`` (the switch to the new generation), then delete what it does not name."""
    atomic_write_json(out / INDEX_META, info)
    kill_point("commit")
    collect_garbage(out, info)


def collect_garbage(out: Path, info: dict) -> None:
    """Delete the generation files that ``info`` does not name, the temporary files of killed writes,
    and a finished job's work folder. Readers that mapped a deleted file keep it until they close."""
    keep = referenced(info)
    for entry in out.iterdir():
        name = entry.name
        if name in keep:
            continue
        if _GENERATION_FILE.match(name) or (name.startswith(".") and name.endswith(".tmp")):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    shutil.rmtree(out / BUILD_DIR, ignore_errors=True)


def write_faiss(index, path: Path) -> None:
    """``faiss.write_index`` to a temporary file, renamed into place."""
    import faiss

    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_id_file(path: Path, parts: list) -> None:
    """Concatenate id files (Paths, copied in blocks) and id lists into one id file, atomically."""
    with atomic_open(path, "wb") as handle:
        for part in parts:
            if isinstance(part, Path):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, handle, 16 << 20)
            else:
                handle.write("".join(f"{i}\n" for i in part).encode("utf-8"))


def resume_or_start(work: Path, plan: dict) -> Path:
    """A job's work folder: kept when its ``plan.json`` matches (a resumed job), else started over."""
    plan_path = work / "plan.json"
    if plan_path.is_file():
        try:
            found = json.loads(plan_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            found = None
        if found != plan:
            committed = isinstance(found, dict) and found.get("generation", -1) < plan.get("generation", -1)
            if not committed:  # a job killed after its commit left its work folder: nothing to say
                logger.warning("%s: an unfinished job with other settings was found; starting over", work.parent)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not plan_path.is_file():
        atomic_write_json(plan_path, plan)
    return work


def next_generation(old: dict | None) -> int:
    return int(old.get("generation", 0)) + 1 if old else 0
