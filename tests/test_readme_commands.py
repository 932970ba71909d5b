"""The README's commands run: every fenced block is `make` targets or `vas` commands that the test
runs, or is marked as needing something the suite does not start (`<!-- needs: ... -->` on the line
before the fence). `make` lines are dry-run (`make -n`: the target exists and its recipe expands;
CI runs `make lint`, `make docs` and `make test` for real); `vas` lines run in process on the
materialized smoke world, with the README's `data/` standing for that world's folder."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
NEEDS = re.compile(r"<!--\s*needs:\s*(.+?)\s*-->\s*\n$")


def readme_blocks(text: str) -> list[dict]:
    """Each fenced block: its language, its command lines (comments and blank lines dropped) and what
    it is marked as needing ("" when unmarked)."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        needs = NEEDS.search(before[-200:])
        lines = [line.split(" #")[0].strip() for line in match.group(2).splitlines()]
        blocks.append({"lang": match.group(1), "lines": [line for line in lines if line and not line.startswith("#")],
                       "needs": needs.group(1) if needs else "",
                       "line": before.count("\n") + 1})
    return blocks


def runnable(blocks: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(make targets, vas argument lists) of the unmarked blocks; an unmarked block of anything else
    fails: it must be runnable here or say what it needs."""
    targets, vas = [], []
    for block in blocks:
        if block["needs"]:
            continue
        for line in block["lines"]:
            words = shlex.split(line)
            if words[0] == "make" and len(words) == 2:
                targets.append(words[1])
            elif words[0] in ("vas", ".venv/bin/vas"):
                vas.append(words[1:])
            else:
                raise AssertionError(f"README line {block['line']}: {line!r} is neither `make <target>` nor a `vas` "
                                     "command; run it in tests/test_readme_commands.py or mark the block "
                                     "`<!-- needs: ... -->`")
    return targets, vas


README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_readme_block_is_runnable_or_says_what_it_needs():
    # Every fence line opens or closes a block the parser read: none hides (indented, or with attributes).
    fences = [line for line in README.splitlines() if line.lstrip().startswith("```")]
    assert len(fences) == 2 * len(readme_blocks(README)), fences
    targets, vas = runnable(readme_blocks(README))
    assert targets[:2] == ["run", "test"]                 # the README opens with the two commands
    assert vas, "the tour's `vas` commands are run below"


def test_the_parser_reads_markers_and_refuses_an_unmarked_foreign_block():
    text = "x\n```bash\nmake run   # all\n.venv/bin/vas lineage data/a\n```\n<!-- needs: a server -->\n```python\n" \
           "print(1)\n```\n"
    blocks = readme_blocks(text)
    assert [b["needs"] for b in blocks] == ["", "a server"]
    assert runnable(blocks) == (["run"], [["lineage", "data/a"]])
    with pytest.raises(AssertionError, match="neither"):
        runnable(readme_blocks("```bash\ncurl http://127.0.0.1:8000/health\n```\n"))


@pytest.mark.parametrize("target", runnable(readme_blocks(README))[0])
def test_readme_make_targets_exist(target):
    done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_readme_vas_commands_run_on_the_smoke_world(smoke_world, monkeypatch, capsys):
    from orchestration.cli import main

    data = smoke_world["data_dir"]
    monkeypatch.setenv("VAS_DATA_DIR", str(data))
    for argv in runnable(readme_blocks(README))[1]:
        argv = [str(data / a.removeprefix("data/")) if a.startswith("data/") else a for a in argv]
        assert main(argv) in (0, None), argv
        printed = capsys.readouterr().out
        assert printed.strip(), argv
