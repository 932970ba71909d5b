"""MkDocs hook (mkdocs.yml `hooks:`): fills the "Latest run" page from the stored outputs.

A page asks for a generated section with an HTML comment on its own line,

    <!-- generated: KIND FOLDER -->

KIND is one of `report` (FOLDER/report/report.md, included with its headings demoted), `study`
(FOLDER/study/study.md), `decode` (FOLDER/bench/decode.json as a table), `value_estimates`
(FOLDER/bench/value_estimates*.json as tables) and `figures` (the report's PNG plots and the UI
test's screenshots, copied into the site). FOLDER is a data folder relative to the project root
(`data`, `data-real`). Every output is git-ignored (DVC's data/, other profiles' data-<profile>/),
so on a fresh clone or in CI none exists: each section then says which command fills it, and the
build never fails for a missing or unreadable file. Reads files only; imports nothing of the project.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- generated: *(\w+) +([\w.-]+) *-->$", re.M)
# Where copied figures appear in the site, relative to the docs folder.
FIGURE_DIR = "results/figures"
FIGURES = {"report": ("frontier.png", "composition.png", "cost.png"),
           "ui": ("ui_asset_graph.png", "ui_e2e.png", "ui_incoming_check.png")}
# The data folders a page may name, and the make target that writes each kind of output there.
FOLDERS = {"data": "", "data-real": "VAS_PROFILE=real "}
TARGETS = {"report": "make run", "study": "make study", "decode": "make bench", "figures": "make run"}


def _fill(kind: str, folder: str) -> str:
    prefix = FOLDERS.get(folder, f"VAS_DATA_DIR={folder} ")
    return f"`{prefix}{TARGETS.get(kind, 'make run')}`"


def _missing(path: Path, kind: str, folder: str) -> str:
    rel = path.relative_to(ROOT)
    return f"*Not in this checkout: `{rel}` is written by {_fill(kind, folder)}. Run it, then `make docs`, to fill this.*\n"


def _stamp(path: Path) -> str:
    when = _dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    return f"*From `{path.relative_to(ROOT)}`, written {when}.*\n\n"


def _demote(markdown: str, levels: int) -> str:
    """Headings of an included file pushed `levels` down (a `#` title under the page's `##`), code
    fences left alone."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def _delink(markdown: str, folder: Path) -> str:
    """Relative links of an included file would point into the docs folder: images of the report
    folder become the copies under FIGURE_DIR, other relative links plain text."""
    def image(m: re.Match) -> str:
        target = (folder / m.group(2)).resolve()
        if target.is_file() and target.parent.parent.parent == ROOT and target.parent.parent.name in FOLDERS \
                and target.name in FIGURES.get(target.parent.name, ()):
            return f"![{m.group(1)}](figures/{target.relative_to(ROOT).as_posix()})"
        return f"*({m.group(1) or 'figure'}: `{m.group(2)}`)*"

    markdown = re.sub(r"!\[([^\]]*)\]\((?!https?:)([^)\s]+)\)", image, markdown)
    return re.sub(r"(?<!!)\[([^\]]+)\]\((?!https?:|#)([^)\s]+)\)", r"\1 (`\2`)", markdown)


def _include(path: Path, kind: str, folder: str) -> str:
    if not path.is_file():
        return _missing(path, kind, folder)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return f"*`{path.relative_to(ROOT)}` could not be read: {err}.*\n"
    return _stamp(path) + _delink(_demote(text, 3), path.parent) + "\n"


def _number(value, digits: int = 3) -> str:
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return "" if value is None else str(value)


def _decode(path: Path, folder: str) -> str:
    """bench/decode.py's output: tokens per second per method and its ratio to base sampling."""
    if not path.is_file():
        return _missing(path, "decode", folder)
    try:
        data = json.loads(path.read_text())
        base = float(data["base_tokens_per_s"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"*`{path.relative_to(ROOT)}` could not be read: {err}.*\n"
    settings = data.get("settings", {})
    lines = [_stamp(path).rstrip("\n"), "",
             f"Device {data.get('device', '?')}; " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())
             + ".", "", "| measured | tokens/s | x base |", "|---|---|---|"]
    for key, value in data.items():
        if key.endswith("_tokens_per_s") and isinstance(value, (int, float)):
            lines.append(f"| {key.removesuffix('_tokens_per_s').replace('_', ' ')} | {value:,.1f} | x{value / base:.3f} |")
    return "\n".join(lines) + "\n"


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    present = [c for c in columns if any(c in row for row in rows)]
    lines = ["| " + " | ".join(c.replace("_", " ") for c in present) + " |", "|" + "---|" * len(present)]
    for row in rows:
        lines.append("| " + " | ".join(_number(row.get(c), 1 if c == "beta" else 3) for c in present) + " |")
    return lines


def _value_estimates(folder_path: Path, folder: str) -> str:
    """bench/value_estimates.py's outputs: the value error and the decode rows of every candidate."""
    paths = sorted((folder_path / "bench").glob("value_estimates*.json"))
    if not paths:
        return (f"*Not in this checkout: `{folder}/bench/value_estimates*.json` is written by "
                f"`python bench/value_estimates.py --data-dir {folder} ...` (its commands: "
                "[the real profile's results](real.md)).*\n")
    out = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            out.append(f"*`{path.relative_to(ROOT)}` could not be read: {err}.*\n")
            continue
        args = data.get("args", {})
        out += [f"#### `{path.relative_to(ROOT)}`", "", _stamp(path).rstrip("\n"), "",
                "Candidates " + ", ".join(map(str, args.get("candidates", []))) + f"; seeds {args.get('seeds') or [0]}; "
                f"{args.get('prompts', '?')} value-error prompts, {args.get('continuations', '?')} continuations "
                "per candidate.", ""]
        for key, columns in (
                ("value_error", ["candidate", "seed", "spearman", "spearman_ceiling", "mse", "mc_noise_mse", "train_min"]),
                ("value_error_across_seeds", ["candidate", "seeds", "spearman", "mse", "train_min"]),
                ("decode", ["candidate", "seed", "beta", "gold", "learned", "kl_nats", "distinct_2", "repeat_share",
                            "forwards_per_token"]),
                ("decode_across_seeds", ["candidate", "seeds", "beta", "gold", "learned", "kl_nats", "distinct_2",
                                         "repeat_share"])):
            rows = [row for row in data.get(key, []) if isinstance(row, dict)]
            if rows:
                out += [f"{key.replace('_', ' ').capitalize()}:", "", *_table(rows, columns), ""]
    return "\n".join(out) + "\n"


def _figures(folder: str) -> str:
    shown = []
    for sub, names in FIGURES.items():
        for name in names:
            path = ROOT / folder / sub / name
            if path.is_file():
                shown.append(f"![{name}](figures/{folder}/{sub}/{name})")
    if not shown:
        return (f"*No figures in this checkout: `{folder}/report/*.png` come with {_fill('figures', folder)}, "
                "`data/ui/*.png` with the browser test (`make test`).*\n")
    return "\n\n".join(shown) + "\n"


def render(kind: str, folder: str) -> str:
    folder_path = ROOT / folder
    try:
        if kind == "report":
            return _include(folder_path / "report" / "report.md", kind, folder)
        if kind == "study":
            return _include(folder_path / "study" / "study.md", kind, folder)
        if kind == "decode":
            return _decode(folder_path / "bench" / "decode.json", folder)
        if kind == "value_estimates":
            return _value_estimates(folder_path, folder)
        if kind == "figures":
            return _figures(folder)
    except Exception as err:  # a generated section never fails the docs build
        return f"*This section could not be generated from `{folder}`: {type(err).__name__}: {err}.*\n"
    return f"*Unknown generated section `{kind}`.*\n"


def on_files(files, config):
    """Copies every figure a page may show (FIGURES under `data`, `data-real`) into the site."""
    from mkdocs.structure.files import File
    for folder in FOLDERS:
        for sub, names in FIGURES.items():
            for name in names:
                path = ROOT / folder / sub / name
                if path.is_file():
                    files.append(File.generated(config, f"{FIGURE_DIR}/{folder}/{sub}/{name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if "<!-- generated:" not in markdown:
        return markdown
    return MARKER.sub(lambda m: render(m.group(1), m.group(2)), markdown)
