import json

import pytest

from models.artifacts import atomic_path, dir_md5, dvc_md5, file_md5


def test_file_md5_is_plain_md5_of_bytes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"hello\n")
    assert file_md5(path) == "b1946ac92492d2347c6235b4d2611184"


def test_dir_md5_matches_dvc(tmp_path):
    """Our directory hash is the one DVC itself computes (and writes to dvc.lock)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"a": 1}))
    (root / "sub" / "w.bin").write_bytes(bytes(range(256)) * 10)
    (root / "b.txt").write_text("line\r\nother\n")
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(tmp_path / "cache"))
    _, _, obj = build(odb, str(root), fs, "md5")
    assert dir_md5(root) == obj.hash_info.value
    assert dvc_md5(root).endswith(".dir")


def test_dvc_md5_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        dvc_md5(tmp_path / "nope")


def test_atomic_path_keeps_old_artifact_when_writer_fails(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "w").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "w").write_text("half")
            raise RuntimeError("killed")
    assert (target / "w").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind


def test_atomic_path_replaces_directory(tmp_path):
    target = tmp_path / "model"
    for version in ("v1", "v2"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "w").write_text(version)
    assert (target / "w").read_text() == "v2"
    assert len(list(tmp_path.iterdir())) == 1


def test_dir_md5_changes_with_any_file(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.json").write_text("{}")
    before = dir_md5(tmp_path)
    (tmp_path / "b.json").write_text('{"k": 1}')
    assert dir_md5(tmp_path) != before
