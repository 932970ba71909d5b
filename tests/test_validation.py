"""Validation of prompts and preference pairs (GX suites), quarantine and `vas validate`."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pandas as pd
import pytest

from models.artifacts import file_md5
from models.data.validation import (
    Problem,
    ValidationRules,
    detect_kind,
    import_preference_file,
    import_prompt_file,
    read_table,
    split_quarantine,
    validate_pairs,
    validate_prompts,
)
from orchestration.cli import validate_file

RULES = ValidationRules()
PAIR_COLUMNS = ["pair_id", "attribute", "prompt_id", "prompt", "chosen", "rejected"]


def good_pairs(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame({
        "pair_id": [f"pair-{i}" for i in range(n)],
        "attribute": ["positivity" if i % 2 else "conciseness" for i in range(n)],
        "prompt": [f"The blender {i} was" for i in range(n)],
        "chosen": [f"great, I love it ({i})" for i in range(n)],
        "rejected": [f"broken and loud ({i})" for i in range(n)],
    })


def good_prompts(n_train: int = 6, n_eval: int = 3) -> pd.DataFrame:
    n = n_train + n_eval
    return pd.DataFrame({
        "prompt_id": [f"p{i:05d}" for i in range(n)],
        "split": ["eval"] * n_eval + ["train"] * n_train,
        "prompt": [f"This lamp {i} is" for i in range(n)],
    })


def write_csv_bytes(path, header: list[str], rows: list[list[bytes | str]]) -> None:
    """A CSV written byte by byte, so a row can hold bytes that are not UTF-8."""
    out = io.BytesIO()
    out.write((",".join(header) + "\n").encode())
    for row in rows:
        cells = []
        for cell in row:
            cell = cell.encode() if isinstance(cell, str) else cell
            if b"," in cell or b'"' in cell:
                cell = b'"' + cell.replace(b'"', b'""') + b'"'
            cells.append(cell)
        out.write(b",".join(cells) + b"\n")
    path.write_bytes(out.getvalue())


def by_place(report) -> dict[tuple, list[str]]:
    places: dict[tuple, list[str]] = {}
    for p in report.problems:
        places.setdefault((p.row, p.column), []).append(p.reason)
    return places


# ---------------------------------------------------------------------------------------------
# Good data passes


def test_good_pairs_csv_passes(tmp_path, capsys):
    path = tmp_path / "pairs.csv"
    good_pairs().to_csv(path, index=False)
    df, read_problems = read_table(path)
    assert read_problems == []
    assert df["_row"].tolist() == list(range(1, 13))
    report = validate_pairs(df, str(path), RULES)
    assert report.success, [str(p) for p in report.problems]
    assert report.failed_expectations == []
    assert report.statistics["attribute_counts"] == {"conciseness": 6, "positivity": 6}
    assert report.statistics["evaluated_expectations"] > 10
    assert report.statistics["unsuccessful_expectations"] == 0

    assert validate_file(str(path)) == 0
    assert capsys.readouterr().out.strip() == f"{path}: OK, 12 rows"


def test_good_prompts_parquet_passes(tmp_path, capsys):
    path = tmp_path / "prompts.parquet"
    good_prompts().to_parquet(path, index=False)
    df, read_problems = read_table(path)
    assert read_problems == []
    assert detect_kind(df) == "prompts"
    report = validate_prompts(df, str(path), RULES)
    assert report.success, [str(p) for p in report.problems]
    assert report.statistics["split_counts"] == {"train": 6, "eval": 3}
    assert validate_file(str(path)) == 0
    assert "OK, 9 rows" in capsys.readouterr().out


def test_stored_frame_without_row_column_reports_index_plus_one():
    df = good_prompts()
    df.loc[4, "prompt"] = "   "
    df.loc[7, "split"] = "test"
    report = validate_prompts(df, "data/prompts/prompts.parquet", RULES)
    assert by_place(report) == {
        (5, "prompt"): ["empty text (whitespace only)"],
        (8, "split"): ["unknown split 'test' (expected one of 'train', 'eval')"],
    }
    assert report.bad_rows == {5, 8}


# ---------------------------------------------------------------------------------------------
# Malformed pairs: every problem on its row and column


@pytest.fixture
def malformed_pairs_csv(tmp_path):
    path = tmp_path / "bad_pairs.csv"
    header = ["pair_id", "attribute", "prompt", "chosen", "rejected"]
    rows = [
        ["a1", "positivity", "The kettle", "works well", "leaks"],             # 1 good
        ["a2", "positivity", "The kettle", "same text", "same text"],          # 2 chosen == rejected
        ["a3", "conciseness", "The kettle", "", "leaks"],                      # 3 empty chosen
        ["a4", "conciseness", "The kettle", b"caf\xe9 \xff good", "leaks"],    # 4 not UTF-8
        ["a5", "positivity", "The kettle", "x" * 2001, "leaks"],               # 5 over max length
        ["a1", "conciseness", "The kettle", "fine", "meh"],                    # 6 duplicate pair_id
        ["a7", "humour", "The kettle", "fine", "meh"],                         # 7 unknown attribute
        ["a8", "conciseness", "The kettle", "lovely", "awful"],                # 8 good
    ]
    write_csv_bytes(path, header, rows)
    return path


def test_malformed_pairs_each_problem_on_its_row_and_column(malformed_pairs_csv):
    df, read_problems = read_table(malformed_pairs_csv)
    assert read_problems == []
    report = validate_pairs(df, str(malformed_pairs_csv), RULES)
    assert not report.success
    places = by_place(report)
    assert places[(2, "chosen")] == ["chosen equals rejected"]
    assert places[(3, "chosen")] == ["empty text"]
    assert len(places[(4, "chosen")]) == 1 and places[(4, "chosen")][0].startswith("invalid UTF-8")
    assert "\\xff" in places[(4, "chosen")][0]  # the bad byte is shown, escaped
    assert places[(5, "chosen")] == ["too long: 2001 characters (max 2000)"]
    assert places[(1, "pair_id")] == ["duplicate pair_id 'a1' (rows 1, 6)"]
    assert places[(6, "pair_id")] == ["duplicate pair_id 'a1' (rows 1, 6)"]
    assert places[(7, "attribute")] == ["unknown attribute 'humour' (expected one of 'positivity', 'conciseness')"]
    assert set(places) == {(2, "chosen"), (3, "chosen"), (4, "chosen"), (5, "chosen"),
                           (1, "pair_id"), (6, "pair_id"), (7, "attribute")}
    assert report.bad_rows == {1, 2, 3, 4, 5, 6, 7}
    # Problems come back in row order, and each GX failure is listed with its rows.
    rows = [p.row for p in report.problems]
    assert rows == sorted(rows)
    failed = {(f["check"], tuple(f["rows"])) for f in report.failed_expectations}
    assert ("differ:chosen", (2,)) in failed
    assert ("unique:pair_id", (1, 6)) in failed
    assert ("max_length:chosen", (5,)) in failed
    assert all(f["expectation"].startswith("expect_") for f in report.failed_expectations)
    json.dumps(report.to_dict())  # serializable, undecodable bytes included


def test_cli_validate_names_file_row_and_column(malformed_pairs_csv, capsys):
    before = file_md5(malformed_pairs_csv)
    assert validate_file(str(malformed_pairs_csv)) == 1
    out = capsys.readouterr().out.splitlines()
    name = str(malformed_pairs_csv)
    assert f"{name}: row 2, column 'chosen': chosen equals rejected" in out
    assert f"{name}: row 3, column 'chosen': empty text" in out
    assert any(line.startswith(f"{name}: row 4, column 'chosen': invalid UTF-8") for line in out)
    assert f"{name}: row 7, column 'attribute': " \
           "unknown attribute 'humour' (expected one of 'positivity', 'conciseness')" in out
    assert out[-1] == f"{name}: 7 of 8 rows failed validation (7 problems)"
    assert file_md5(malformed_pairs_csv) == before


def test_missing_required_column_is_a_file_level_problem(tmp_path, capsys):
    path = tmp_path / "no_rejected.csv"
    good_pairs(4).drop(columns=["rejected"]).to_csv(path, index=False)
    df, _ = read_table(path)
    report = validate_pairs(df, str(path), RULES)
    assert [(p.row, p.column, p.reason) for p in report.problems] == [(None, "rejected", "missing required column")]
    assert str(report.problems[0]) == f"{path}: column 'rejected': missing required column"
    assert report.bad_rows == {1, 2, 3, 4}  # no row is usable without the column

    good, bad = split_quarantine(df, report)
    assert good.empty and len(bad) == 4
    assert set(bad.reason) == {"rejected: missing required column"}

    assert validate_file(str(path)) == 1
    assert f"{path}: column 'rejected': missing required column" in capsys.readouterr().out

    prompts = tmp_path / "prompts.csv"
    good_prompts().drop(columns=["prompt"]).to_csv(prompts, index=False)
    df, _ = read_table(prompts)
    report = validate_prompts(df, str(prompts), RULES)
    assert [(p.row, p.column) for p in report.problems] == [(None, "prompt")]


def test_jsonl_wrong_type_and_unparsable_line(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"prompt": "The desk", "chosen": "sturdy", "rejected": "wobbly", "attribute": "positivity"}),
        json.dumps({"prompt": "The desk", "chosen": 42, "rejected": "wobbly", "attribute": "positivity"}),
        '{"prompt": "The desk", "chosen": "ok", "rejected": ',  # cut off
        "",  # blank lines are skipped but still counted as lines
        '["not", "an", "object"]',
        json.dumps({"prompt": None, "chosen": "solid", "rejected": "flimsy", "attribute": "positivity"}),
        '{"prompt": "The desk", "chosen": NaN, "rejected": "flimsy", "attribute": "conciseness"}',
        json.dumps({"prompt": "The desk", "chosen": "fine", "rejected": "bad", "attribute": "conciseness"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    df, read_problems = read_table(path)
    assert df["_row"].tolist() == [1, 2, 3, 5, 6, 7, 8]  # JSONL rows are line numbers
    assert [(p.row, p.column) for p in read_problems] == [(3, None), (5, None)]
    assert read_problems[0].reason.startswith("invalid JSON")
    assert read_problems[1].reason == "line is a JSON array, not an object"

    report = validate_pairs(df, str(path), RULES)
    places = by_place(report)
    assert places[(2, "chosen")] == ["wrong type: expected text, got integer 42"]
    assert places[(6, "prompt")] == ["missing value"]
    assert places[(7, "chosen")] == ["missing value (null/NaN)"]

    assert validate_file(str(path)) == 1
    out = capsys.readouterr().out
    assert f"{path}: row 2, column 'chosen': wrong type: expected text, got integer 42" in out
    assert f"{path}: row 3: invalid JSON" in out
    assert f"{path}: row 5: line is a JSON array, not an object" in out
    # An unparsable line is one problem, not also one "missing value" per column.
    assert f"{path}: row 3, column" not in out
    assert out.strip().splitlines()[-1] == f"{path}: 5 of 7 rows failed validation (5 problems)"


# ---------------------------------------------------------------------------------------------
# Import and quarantine


def test_import_quarantines_bad_rows_and_keeps_raw_file(malformed_pairs_csv, tmp_path):
    quarantine_dir = tmp_path / "quarantine"
    raw_md5 = file_md5(malformed_pairs_csv)
    raw_bytes = malformed_pairs_csv.read_bytes()

    good, report, qpath = import_preference_file(malformed_pairs_csv, RULES, quarantine_dir)

    assert file_md5(malformed_pairs_csv) == raw_md5
    assert malformed_pairs_csv.read_bytes() == raw_bytes
    assert qpath == quarantine_dir / f"bad_pairs-{raw_md5[:8]}.csv"
    assert list(quarantine_dir.iterdir()) == [qpath]  # atomic write: no temporary left behind

    # Good rows come back, normalized.
    assert list(good.columns) == PAIR_COLUMNS
    assert good.pair_id.tolist() == ["a8"]
    assert good.chosen.tolist() == ["lovely"]
    assert good.prompt_id.tolist()[0].startswith("p-")

    quarantined = pd.read_csv(qpath, dtype=str, keep_default_na=False)
    assert list(quarantined.columns) == ["pair_id", "attribute", "prompt", "chosen", "rejected", "source_row", "reason"]
    assert quarantined.source_row.astype(int).tolist() == [1, 2, 3, 4, 5, 6, 7]
    reasons = dict(zip(quarantined.source_row.astype(int), quarantined.reason))
    assert reasons[2] == "chosen: chosen equals rejected"
    assert reasons[3] == "chosen: empty text"
    assert reasons[4].startswith("chosen: invalid UTF-8")
    assert reasons[7].startswith("attribute: unknown attribute 'humour'")
    # The undecodable bytes are kept visibly, as escapes, in a valid UTF-8 CSV.
    qpath.read_bytes().decode("utf-8")
    assert quarantined.loc[quarantined.source_row == "4", "chosen"].item() == "caf\\xe9 \\xff good"
    assert len(good) + len(quarantined) == report.n_rows == 8

    # The report the asset stores: JSON with the bad rows and problems.
    stored = json.loads(json.dumps(report.to_dict()))
    assert stored["bad_rows"] == [1, 2, 3, 4, 5, 6, 7]
    assert stored["n_rows"] == 8 and stored["success"] is False
    assert {"file", "row", "column", "reason"} <= set(stored["problems"][0])

    # Importing again is deterministic and still leaves the raw file alone.
    again, _, qpath2 = import_preference_file(malformed_pairs_csv, RULES, quarantine_dir)
    assert qpath2 == qpath and again.equals(good)
    assert file_md5(malformed_pairs_csv) == raw_md5


def test_cli_validate_writes_quarantine_when_asked(malformed_pairs_csv, tmp_path, capsys):
    quarantine_dir = tmp_path / "q"
    assert validate_file(str(malformed_pairs_csv), kind="pairs", quarantine_dir=str(quarantine_dir)) == 1
    files = list(quarantine_dir.glob("bad_pairs-*.csv"))
    assert len(files) == 1
    assert f"7 bad rows written to {files[0]}" in capsys.readouterr().out


def test_attribute_share_below_minimum_fails_the_dataset(tmp_path):
    df = good_pairs(20)
    df["attribute"] = ["conciseness"] + ["positivity"] * 19  # conciseness: 5% < 10%
    path = tmp_path / "unbalanced.csv"
    df.to_csv(path, index=False)

    good, report, qpath = import_preference_file(path, RULES, tmp_path / "q")
    assert not report.success
    assert [(p.row, p.column) for p in report.problems] == [(None, "attribute")]
    assert "conciseness" in report.problems[0].reason and "5.0%" in report.problems[0].reason
    assert report.bad_rows == set()
    assert qpath is None and len(good) == 20  # dataset-level problems quarantine no row
    assert report.statistics["attribute_counts"] == {"conciseness": 1, "positivity": 19}
    assert any(f["expectation"] == "expect_column_min_to_be_between" for f in report.failed_expectations)

    balanced = validate_pairs(df, str(path), ValidationRules(min_attribute_share=0.05))
    assert balanced.success


def test_missing_attribute_column_gets_default_attribute(tmp_path):
    df = good_pairs(5).drop(columns=["attribute", "pair_id"])
    path = tmp_path / "plain.csv"
    df.to_csv(path, index=False)
    rules = ValidationRules(default_attribute="conciseness")

    good, report, qpath = import_preference_file(path, rules, tmp_path / "q")
    assert report.success and qpath is None
    assert list(good.columns) == PAIR_COLUMNS
    assert good.attribute.tolist() == ["conciseness"] * 5
    assert good.pair_id.tolist() == [f"imp-{i:06d}" for i in range(1, 6)]
    assert report.statistics["filled_columns"] == {"attribute": "default_attribute 'conciseness'"}

    # A default attribute that is not known is caught like any unknown attribute.
    _, bad_report, _ = import_preference_file(path, ValidationRules(default_attribute="humour"), tmp_path / "q")
    assert bad_report.bad_rows == {1, 2, 3, 4, 5}


def test_import_prompt_file_assigns_ids_and_seeded_split(tmp_path):
    path = tmp_path / "prompts.csv"
    texts = [f"My new phone {i} is" for i in range(10)] + ["My new phone 3 is"]  # row 11 duplicates row 4
    pd.DataFrame({"prompt": texts}).to_csv(path, index=False)

    out, report, qpath = import_prompt_file(path, RULES, tmp_path / "q", n_eval=3, seed=7)
    assert list(out.columns) == ["prompt_id", "split", "prompt"]
    assert [(p.row, p.column) for p in report.problems] == [(4, "prompt"), (11, "prompt")]
    assert report.problems[0].reason == "duplicate prompt text (rows 4, 11)"
    assert len(out) == 9 and qpath is not None
    assert out.split.tolist().count("eval") == 3
    assert out.prompt_id.is_unique

    again, _, _ = import_prompt_file(path, RULES, tmp_path / "q", n_eval=3, seed=7)
    assert again.equals(out)
    other_seed, _, _ = import_prompt_file(path, RULES, tmp_path / "q", n_eval=3, seed=8)
    assert other_seed.prompt_id.tolist() == out.prompt_id.tolist()


def test_import_prompt_file_keeps_given_ids_and_split(tmp_path):
    path = tmp_path / "prompts.jsonl"
    good_prompts(2, 1).to_json(path, orient="records", lines=True)
    out, report, qpath = import_prompt_file(path, RULES, tmp_path / "q", n_eval=99, seed=0)
    assert report.success and qpath is None
    assert out.equals(good_prompts(2, 1))


# ---------------------------------------------------------------------------------------------
# Reading and small contracts


def test_csv_short_and_long_records_are_row_problems(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("prompt,chosen,rejected\nA,b,c\nA,b\nA,b,c,d\n\"multi\nline\",yes,no\n")
    df, problems = read_table(path)
    assert [(p.row, p.reason) for p in problems] == [(2, "expected 3 fields, found 2"),
                                                     (3, "expected 3 fields, found 4")]
    assert df["_row"].tolist() == [1, 2, 3, 4]  # CSV rows are data records, header excluded
    assert df.loc[3, "prompt"] == "multi\nline"


def test_parquet_nan_and_read_table_errors(tmp_path):
    path = tmp_path / "pairs.parquet"
    df = good_pairs(4)
    df["chosen"] = df["chosen"].astype(object)
    df.loc[2, "chosen"] = np.nan
    df.to_parquet(path, index=False)
    table, _ = read_table(path)
    report = validate_pairs(table, str(path), RULES)
    assert [(p.row, p.column) for p in report.problems] == [(3, "chosen")]
    assert report.problems[0].reason.startswith("missing value")

    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "pairs.txt"))):
        read_table(tmp_path / "pairs.txt")


def test_cli_validate_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    assert validate_file(str(missing)) == 1
    captured = capsys.readouterr()
    assert str(missing) in captured.err and captured.out == ""


def test_problem_str_and_rules_from_params():
    assert str(Problem("data/x.csv", 3, "chosen", "chosen equals rejected")) == \
        "data/x.csv: row 3, column 'chosen': chosen equals rejected"
    assert str(Problem("data/x.csv", None, None, "no rows")) == "data/x.csv: no rows"
    rules = ValidationRules.from_params({"min_text_chars": 2, "max_prompt_chars": "50", "min_attribute_share": 0.2,
                                         "known_attributes": ["positivity"], "max_quarantined_fraction": 0.0})
    assert rules == ValidationRules(min_text_chars=2, max_prompt_chars=50, min_attribute_share=0.2,
                                    known_attributes=("positivity",))


def test_empty_and_short_text_respects_min_text_chars():
    df = good_pairs(4)
    df.loc[1, "prompt"] = " a "
    report = validate_pairs(df, "mem", ValidationRules(min_text_chars=2))
    assert by_place(report) == {(2, "prompt"): ["too short: 1 characters after stripping whitespace (min 2)"]}
    empty = validate_pairs(df.iloc[0:0], "mem", RULES)
    assert [str(p) for p in empty.problems] == ["mem: no rows"]


# ---------------------------------------------------------------------------------------------
# Exact duplicate pairs


def test_verbatim_repeat_is_quarantined_and_the_first_kept(tmp_path, capsys):
    path = tmp_path / "repeats.csv"
    rows = [
        {"prompt": "The kettle", "chosen": "works well", "rejected": "leaks", "attribute": "positivity"},   # 1
        {"prompt": "The lamp", "chosen": "bright", "rejected": "dim", "attribute": "conciseness"},          # 2
        {"prompt": "The kettle", "chosen": "works well", "rejected": "leaks", "attribute": "positivity"},   # 3 = 1
        {"prompt": "The kettle", "chosen": "works well", "rejected": "leaks", "attribute": "conciseness"},  # 4 other attribute
        {"prompt": "The lamp", "chosen": "bright", "rejected": "dim ", "attribute": "conciseness"},         # 5 not verbatim
        {"prompt": "The kettle", "chosen": "works well", "rejected": "leaks", "attribute": "positivity"},   # 6 = 1
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    raw_md5 = file_md5(path)

    good, report, qpath = import_preference_file(path, RULES, tmp_path / "q")
    reason = "duplicate pair: repeats row 1 verbatim (same prompt, chosen, rejected and attribute)"
    assert [(p.row, p.column, p.reason) for p in report.problems] == [(3, None, reason), (6, None, reason)]
    assert report.bad_rows == {3, 6} and not report.success
    # The first occurrence stays, and the same pair for another attribute is not a repeat.
    assert good.pair_id.tolist() == ["imp-000001", "imp-000002", "imp-000004", "imp-000005"]
    assert good.attribute.tolist() == ["positivity", "conciseness", "conciseness", "conciseness"]
    quarantined = pd.read_csv(qpath, keep_default_na=False)
    assert quarantined.source_row.tolist() == [3, 6]
    assert quarantined.reason.tolist() == [reason, reason]
    assert report.statistics["n_quarantined"] == 2
    assert file_md5(path) == raw_md5  # the raw file is never modified

    assert validate_file(str(path)) == 1
    assert f"{path}: row 3: {reason}" in capsys.readouterr().out


def test_repeat_without_attribute_column_and_with_distinct_ids(tmp_path):
    # No attribute column: every row gets the default attribute, so a repeat is still one.
    # Different pair ids do not make a repeated pair a new one.
    path = tmp_path / "plain.jsonl"
    pairs = good_pairs(3).drop(columns=["attribute"])
    repeat = pairs.iloc[[1]].assign(pair_id="another-id")
    pd.concat([pairs, repeat]).to_json(path, orient="records", lines=True)

    good, report, _ = import_preference_file(path, RULES, tmp_path / "q")
    assert [(p.row, p.reason) for p in report.problems] == [
        (4, "duplicate pair: repeats row 2 verbatim (same prompt, chosen, rejected and attribute)")]
    assert good.pair_id.tolist() == ["pair-0", "pair-1", "pair-2"]


def test_stored_and_synthesized_pairs_may_repeat():
    # Two samples may agree by chance: only files being imported are held to distinct pairs.
    df = pd.concat([good_pairs(4), good_pairs(4).assign(pair_id=lambda d: d.pair_id + "b")], ignore_index=True)
    assert validate_pairs(df, "mem", RULES).success
    assert by_place(validate_pairs(df, "mem", RULES, distinct=True)) == {
        (row, None): [f"duplicate pair: repeats row {row - 4} verbatim (same prompt, chosen, rejected and attribute)"]
        for row in range(5, 9)}
