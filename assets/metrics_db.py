"""The DuckDB tables: tidy metrics and lineage, written idempotently per (run, asset)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

METRICS_DDL = """
CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR, asset VARCHAR, metric VARCHAR, value DOUBLE, step BIGINT,
    split VARCHAR, method VARCHAR, params VARCHAR, data_version VARCHAR,
    model_version VARCHAR, git_sha VARCHAR, created_at TIMESTAMP
)"""
LINEAGE_DDL = """
CREATE TABLE IF NOT EXISTS lineage (
    run_id VARCHAR, asset VARCHAR, inputs VARCHAR, output_md5 VARCHAR, params VARCHAR,
    git_sha VARCHAR, created_at TIMESTAMP
)"""
# Added after the first release; ALTER keeps metrics databases made before them readable.
LINEAGE_MIGRATIONS = [
    "ALTER TABLE lineage ADD COLUMN IF NOT EXISTS code_version VARCHAR",
    "ALTER TABLE lineage ADD COLUMN IF NOT EXISTS reused_from VARCHAR",
]
LINEAGE_COLUMNS = ["run_id", "asset", "inputs", "output_md5", "params", "git_sha", "created_at",
                   "code_version", "reused_from"]
METRIC_COLUMNS = ["run_id", "asset", "metric", "value", "step", "split", "method", "params",
                  "data_version", "model_version", "git_sha", "created_at"]


def ensure_tables(conn) -> None:
    conn.execute(METRICS_DDL)
    conn.execute(LINEAGE_DDL)
    for statement in LINEAGE_MIGRATIONS:
        conn.execute(statement)


def params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def metric_row(metric: str, value: float, *, step: int | None = None, split: str | None = None,
               method: str | None = None, params: dict | None = None) -> dict:
    """One tidy metric. `params` (e.g. an evaluation method's beta) replaces the asset's params."""
    return {"metric": metric, "value": float(value), "step": step, "split": split, "method": method,
            "params": params}


def write_rows(conn, *, run_id: str, asset: str, metrics: list[dict], params: dict,
               data_version: str | None, model_version: str | None, git_sha: str,
               lineage: dict | None = None, keep_metrics: bool = False) -> int:
    """Replace this run's rows for this asset: re-running a step never duplicates them.
    keep_metrics leaves the run's metric rows as they are (only lineage is written)."""
    ensure_tables(conn)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    params_text = params_json(params)
    conn.execute("BEGIN TRANSACTION")
    try:
        if not keep_metrics:
            conn.execute("DELETE FROM metrics WHERE run_id = ? AND asset = ?", [run_id, asset])
        rows = [
            [run_id, asset, m["metric"], m["value"], m.get("step"), m.get("split"), m.get("method"),
             params_text if m.get("params") is None else json.dumps(m["params"], sort_keys=True),
             data_version, model_version, git_sha, now]
            for m in metrics
        ]
        if rows:
            conn.executemany(f"INSERT INTO metrics ({', '.join(METRIC_COLUMNS)}) VALUES "
                             f"({', '.join('?' * len(METRIC_COLUMNS))})", rows)
        if lineage is not None:
            conn.execute("DELETE FROM lineage WHERE run_id = ? AND asset = ?", [run_id, asset])
            conn.execute(
                f"INSERT INTO lineage ({', '.join(LINEAGE_COLUMNS)}) VALUES ({', '.join('?' * len(LINEAGE_COLUMNS))})",
                [run_id, asset, json.dumps(lineage["inputs"], sort_keys=True), lineage["output_md5"],
                 params_text, git_sha, now, lineage.get("code_version"), lineage.get("reused_from")],
            )
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise
    return len(rows)


def find_reusable(conn, *, asset: str, inputs: dict, params: dict, code_version: str,
                  output_md5: str) -> str | None:
    """The run whose materialization of asset read exactly these inputs with these params and
    code and wrote the output that is on disk now (output_md5); None when there is none."""
    ensure_tables(conn)
    rows = conn.execute(
        "SELECT run_id, inputs FROM lineage WHERE asset = ? AND output_md5 = ? AND params = ? "
        "AND code_version = ? ORDER BY created_at DESC",
        [asset, output_md5, params_json(params), code_version]).fetchall()
    return next((run for run, found in rows if json.loads(found) == inputs), None)


def copy_metrics(conn, *, from_run: str, to_run: str, asset: str) -> list[dict]:
    """This run's metric rows for asset become those of from_run (a re-used materialization
    scored what the original did); returns the scalar ones (no step) as metric dicts."""
    ensure_tables(conn)
    if from_run == to_run:
        raise ValueError(f"run {to_run} cannot re-use its own materialization of {asset}")
    conn.execute("DELETE FROM metrics WHERE run_id = ? AND asset = ?", [to_run, asset])
    others = [c for c in METRIC_COLUMNS if c != "run_id"]
    conn.execute(f"INSERT INTO metrics (run_id, {', '.join(others)}) SELECT ?, {', '.join(others)} "
                 "FROM metrics WHERE run_id = ? AND asset = ?", [to_run, from_run, asset])
    rows = conn.execute("SELECT metric, value FROM metrics WHERE run_id = ? AND asset = ? AND step IS NULL "
                        "AND method IS NULL ORDER BY metric", [to_run, asset]).fetchall()
    return [{"metric": m, "value": v} for m, v in rows]
