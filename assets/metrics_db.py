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
METRIC_COLUMNS = ["run_id", "asset", "metric", "value", "step", "split", "method", "params",
                  "data_version", "model_version", "git_sha", "created_at"]


def ensure_tables(conn) -> None:
    conn.execute(METRICS_DDL)
    conn.execute(LINEAGE_DDL)


def metric_row(metric: str, value: float, *, step: int | None = None, split: str | None = None,
               method: str | None = None, params: dict | None = None) -> dict:
    """One tidy metric. `params` (e.g. an evaluation method's beta) replaces the asset's params."""
    return {"metric": metric, "value": float(value), "step": step, "split": split, "method": method,
            "params": params}


def write_rows(conn, *, run_id: str, asset: str, metrics: list[dict], params: dict,
               data_version: str | None, model_version: str | None, git_sha: str,
               lineage: dict | None = None) -> int:
    """Replace this run's rows for this asset: re-running a step never duplicates them."""
    ensure_tables(conn)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    params_json = json.dumps(params, sort_keys=True, default=str)
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute("DELETE FROM metrics WHERE run_id = ? AND asset = ?", [run_id, asset])
        rows = [
            [run_id, asset, m["metric"], m["value"], m.get("step"), m.get("split"), m.get("method"),
             params_json if m.get("params") is None else json.dumps(m["params"], sort_keys=True),
             data_version, model_version, git_sha, now]
            for m in metrics
        ]
        if rows:
            conn.executemany(f"INSERT INTO metrics ({', '.join(METRIC_COLUMNS)}) VALUES "
                             f"({', '.join('?' * len(METRIC_COLUMNS))})", rows)
        if lineage is not None:
            conn.execute("DELETE FROM lineage WHERE run_id = ? AND asset = ?", [run_id, asset])
            conn.execute(
                "INSERT INTO lineage VALUES (?, ?, ?, ?, ?, ?, ?)",
                [run_id, asset, json.dumps(lineage["inputs"], sort_keys=True), lineage["output_md5"],
                 params_json, git_sha, now],
            )
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise
    return len(rows)
