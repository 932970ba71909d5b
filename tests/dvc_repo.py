"""A throwaway git + DVC repository for the tests that run DVC itself (tests/test_retrain_lineage.py,
tests/test_fault_injection.py): a copy of the project's code with a data folder of the test's choice
as its data/, and `sh` to run git and dvc in it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from models.profiles import PROJECT_ROOT

DVC = str(Path(sys.executable).with_name("dvc"))
CODE = ["models", "assets", "orchestration", "params.yaml", "dvc.yaml", ".gitignore"]


def sh(repo, *args) -> str:
    """Run a command in repo (no analytics, a test identity for git); its stdout, or fail with its output."""
    proc = subprocess.run(list(args), cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test",
                               "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
                               "GIT_COMMITTER_EMAIL": "test@example.com"})
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dvc_repo(repo: Path, data: Path) -> Path:
    """repo with the project's code and a copy of data as data/, under `git init` and `dvc init`."""
    for name in CODE:
        src = PROJECT_ROOT / name
        shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() \
            else shutil.copy(src, repo / name)
    shutil.copytree(data, repo / "data")
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    return repo
