"""Atomic artifact writes and DVC-compatible content hashes.

Artifacts are written to a temporary sibling and renamed into place, so a killed run never
leaves a half-written file or model directory. Hashes follow DVC 3 exactly (plain md5 of a
file's bytes; for a directory, md5 of DVC's sorted JSON listing plus ".dir"), so the data
version Dagster records is the md5 that dvc.lock pins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pandas as pd

_CHUNK = 1 << 20


def file_md5(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dir_md5(path: str | Path) -> str:
    """DVC's directory hash: md5 of the sorted [{"md5", "relpath"}] JSON listing, plus ".dir"."""
    root = Path(path)
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(root).as_posix()}
        for p in root.rglob("*")
        if p.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC records for an output: a file's or a directory's."""
    path = Path(path)
    if path.is_dir():
        return dir_md5(path)
    if path.is_file():
        return file_md5(path)
    raise FileNotFoundError(f"cannot hash {path}: it does not exist")


def visible_subfolders(root: str | Path) -> list[Path]:
    """The subfolders of root, by name, without hidden ones (atomic_path's half-written
    temporaries, `.name.tmp-*`); [] when root is not a folder."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or a directory into; rename it on success.

    On an exception the temporary path is removed and the old artifact stays untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        _replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _replace(src: Path, dst: Path) -> None:
    if src.is_dir():
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        old = None
        if dst.exists():
            old = _tmp_sibling(dst)
            os.replace(dst, old)
        os.replace(src, dst)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def write_json(obj, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return Path(path)


def write_folder(path: str | Path, files: dict[str, "pd.DataFrame | dict | list"]) -> Path:
    """Write a folder of parquet tables and JSON documents as one atomic artifact.

    The folder is replaced whole, so no file of an older version lingers inside it.
    """
    with atomic_path(path) as tmp:
        tmp.mkdir()
        for name, content in files.items():
            if isinstance(content, pd.DataFrame):
                content.to_parquet(tmp / name, index=False)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True, default=str) + "\n",
                                        encoding="utf-8")
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)



def keep_version(path: str | Path, versions_dir: str | Path, record: dict) -> Path:
    """Copy the artifact at path to versions_dir/<its DVC md5>, beside the versions kept before,
    and list it in versions_dir/versions.json; a version already kept is left as it is.

    `path` is the current version (what DVC tracks and the pipeline reads); the copies keep
    every earlier one at hand, so a retrain never overwrites the model it replaces.
    """
    path, versions_dir = Path(path), Path(versions_dir)
    md5 = dvc_md5(path)
    target = versions_dir / md5.removesuffix(".dir")
    if not target.exists():
        with atomic_path(target) as tmp:
            if path.is_dir():
                shutil.copytree(path, tmp)
            else:
                shutil.copy2(path, tmp)
    index = versions_dir / "versions.json"
    versions = json.loads(index.read_text()) if index.exists() else []
    if not any(v["md5"] == md5 for v in versions):
        write_json(versions + [{**record, "md5": md5, "path": target.name}], index)
    return target
