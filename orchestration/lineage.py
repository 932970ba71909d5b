"""`vas lineage`: which data, params and code produced an artifact, and what it scored.

Answers from DuckDB's lineage table (one row per materialization: inputs' md5s, output md5,
params, git sha, run id) and checks each md5 against dvc.lock and the files on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import yaml

from models.artifacts import dvc_md5
from models.profiles import PROJECT_ROOT
from models.stages import STAGES


def _rows(conn, sql: str, args: list) -> list[dict]:
    cursor = conn.execute(sql, args)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


VERSIONS = {s.versions: name for name, s in STAGES.items() if s.versions}  # folders of kept versions -> their asset


def artifact_of_path(path: Path, data_dir: Path) -> tuple[str, Path]:
    """The asset whose output holds path (the output itself or a file inside it), and that
    output's folder or file: the current one, or a kept version (value_model_versions/<md5>)."""
    try:
        rel = path.resolve().relative_to(data_dir.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not inside the data folder {data_dir}") from None
    parts = rel.split("/")
    if parts[0] in VERSIONS and len(parts) >= 2:
        return VERSIONS[parts[0]], data_dir / parts[0] / parts[1]
    for asset, stage in STAGES.items():
        out = stage.output
        if rel == out or rel.startswith(out + "/"):
            return asset, data_dir / out
    raise ValueError(f"{path} is not inside any asset's output under {data_dir}")


def dvc_lock_md5s(lock_file: Path = PROJECT_ROOT / "dvc.lock") -> dict[str, str]:
    """out path -> md5, from dvc.lock."""
    if not lock_file.exists():
        return {}
    stages = yaml.safe_load(lock_file.read_text()).get("stages", {})
    return {o["path"]: o["md5"] for stage in stages.values() for o in stage.get("outs", [])}


def chain(conn, asset: str, md5: str | None = None, run_id: str | None = None,
          seen: set | None = None) -> list[dict]:
    """The lineage row of (asset, md5 or run) and, recursively, of every input it read; each
    (asset, md5) once, though the graph is a diamond (base_model feeds several stages)."""
    seen = set() if seen is None else seen
    where, args = ["asset = ?"], [asset]
    if md5:
        where.append("output_md5 = ?"), args.append(md5)
    if run_id:
        where.append("run_id = ?"), args.append(run_id)
    rows = _rows(conn, f"SELECT * FROM lineage WHERE {' AND '.join(where)} ORDER BY created_at DESC LIMIT 1", args)
    if not rows:
        return [{"asset": asset, "output_md5": md5, "missing": "no recorded materialization"}]
    row = rows[0]
    if (asset, row["output_md5"]) in seen:
        return []
    seen.add((asset, row["output_md5"]))
    row["inputs"] = json.loads(row["inputs"])
    row["params"] = json.loads(row["params"])
    row["created_at"] = str(row["created_at"])
    out = [row]
    for name, input_md5 in row["inputs"].items():
        if not name.startswith("source:"):
            out += chain(conn, name, md5=input_md5, seen=seen)
    return out


def scored(conn, value_models_md5: str) -> list[dict]:
    """Headline evaluation metrics of the runs that evaluated these value models."""
    evals = [r for r in _rows(conn, "SELECT run_id, inputs FROM lineage WHERE asset = 'evaluation'", [])
             if json.loads(r["inputs"]).get("value_models") == value_models_md5]
    if not evals:
        return []
    return _rows(conn, "SELECT run_id, metric, value FROM metrics WHERE asset = 'evaluation' AND method IS NULL "
                       f"AND run_id IN ({', '.join('?' * len(evals))}) ORDER BY metric", [e["run_id"] for e in evals])


def lineage(target: str, data_dir: Path) -> dict:
    conn = duckdb.connect(str(data_dir / "metrics.duckdb"), read_only=True)
    try:
        path = Path(target)
        if path.exists():
            asset, artifact = artifact_of_path(path, data_dir)
            rows = chain(conn, asset, md5=dvc_md5(artifact))
        else:
            found = _rows(conn, "SELECT asset FROM lineage WHERE run_id = ? ORDER BY created_at DESC", [target])
            if not found:
                raise ValueError(f"{target!r} is neither an existing path nor a run id in {data_dir / 'metrics.duckdb'}")
            # The most downstream asset of the run: the one no other asset of the run lists as an input.
            names = [f["asset"] for f in found]
            inputs = {k for a in names for k in chain(conn, a, run_id=target)[0]["inputs"]}
            asset = next((a for a in names if a not in inputs), names[0])
            rows = chain(conn, asset, run_id=target)
        lock = dvc_lock_md5s()
        for row in rows:
            out = STAGES[row["asset"]].output if row["asset"] in STAGES else None
            on_disk = data_dir / out if out else None
            row["md5_on_disk"] = dvc_md5(on_disk) if on_disk is not None and on_disk.exists() else None
            row["md5_dvc_lock"] = lock.get(f"data/{out}") if data_dir.resolve() == (PROJECT_ROOT / "data").resolve() else None
        value_row = next((r for r in rows if r["asset"] == "value_models" and "missing" not in r), None)
        metrics = scored(conn, value_row["output_md5"]) if value_row else []
        return {"target": target, "asset": rows[0]["asset"], "chain": rows, "evaluation": metrics}
    finally:
        conn.close()


def print_lineage(result: dict) -> None:
    print(f"{result['target']}: produced by asset {result['asset']}")
    for row in result["chain"]:
        if "missing" in row:
            print(f"  {row['asset']:18s} md5 {row['output_md5']}  ({row['missing']})")
            continue
        flags = []
        if row["md5_on_disk"] is not None:
            flags.append("on disk: " + ("same" if row["md5_on_disk"] == row["output_md5"] else "CHANGED since"))
        if row["md5_dvc_lock"] is not None:
            flags.append("dvc.lock: " + ("same" if row["md5_dvc_lock"] == row["output_md5"] else "differs"))
        print(f"  {row['asset']:18s} md5 {row['output_md5']}  run {row['run_id']}  git {row['git_sha'][:12]}  "
              f"{row['created_at']}  [{', '.join(flags)}]")
        print(f"  {'':18s} params {json.dumps(row['params'], sort_keys=True)}")
    if result["evaluation"]:
        print("  scored (evaluation):")
        for m in result["evaluation"]:
            print(f"    {m['metric']:40s} {m['value']:.4f}  (run {m['run_id']})")


def diff_runs(run_a: str, run_b: str, data_dir: Path) -> dict:
    """What changed between two runs: per asset the md5, params and code, then the metrics."""
    conn = duckdb.connect(str(data_dir / "metrics.duckdb"), read_only=True)
    try:
        runs = {}
        for run in (run_a, run_b):
            rows = _rows(conn, "SELECT * FROM lineage WHERE run_id = ?", [run])
            if not rows:
                raise ValueError(f"run {run!r} has no lineage rows in {data_dir / 'metrics.duckdb'}")
            state = {r["asset"]: {**r, "role": "reused" if r.get("reused_from") else "materialized"} for r in rows}
            # What the run read without materializing it (an upstream asset outside its job)
            # belongs to its state too: the diff then shows those as unchanged or changed inputs.
            seen: set = set()
            for r in rows:
                for name, md5 in json.loads(r["inputs"]).items():
                    if name.startswith("source:"):
                        continue
                    for up in chain(conn, name, md5=md5, seen=seen):
                        if up["asset"] not in state and "missing" not in up:
                            state[up["asset"]] = {**up, "params": json.dumps(up["params"], sort_keys=True),
                                                  "role": "input"}
            runs[run] = state
        metrics = {run: {r["metric"]: r["value"] for r in _rows(
            conn, "SELECT metric, value FROM metrics WHERE run_id = ? AND asset = 'evaluation' AND method IS NULL",
            [run])} for run in (run_a, run_b)}
    finally:
        conn.close()
    assets = []
    for asset in sorted(set(runs[run_a]) | set(runs[run_b])):
        a, b = runs[run_a].get(asset), runs[run_b].get(asset)
        entry = {"asset": asset, "md5_a": a and a["output_md5"], "md5_b": b and b["output_md5"],
                 "role_a": a and a["role"], "role_b": b and b["role"]}
        entry["data"] = "only in one run" if not (a and b) else (
            "unchanged" if a["output_md5"] == b["output_md5"] else "changed")
        if a and b:
            pa, pb = json.loads(a["params"]), json.loads(b["params"])
            entry["params"] = {k: [pa.get(k), pb.get(k)] for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)}
            # Code is the asset's code version (a hash of the sources its stage lists in
            # models/stages.py); the git commit also moves with docs, tests and other assets'
            # code, so it is shown beside it, not instead of it.
            ca, cb = a.get("code_version"), b.get("code_version")
            entry["code"] = ("unchanged" if ca == cb else f"{ca} -> {cb}") if ca and cb else "unknown"
            entry["git"] = "same" if a["git_sha"] == b["git_sha"] else f"{a['git_sha'][:12]} -> {b['git_sha'][:12]}"
        assets.append(entry)
    shared = sorted(set(metrics[run_a]) & set(metrics[run_b]))
    changes = {m: [metrics[run_a][m], metrics[run_b][m]] for m in shared if metrics[run_a][m] != metrics[run_b][m]}
    return {"run_a": run_a, "run_b": run_b, "assets": assets, "metrics": changes}


def print_diff(result: dict) -> None:
    print(f"{result['run_a']} -> {result['run_b']}")
    for e in result["assets"]:
        line = (f"  {e['asset']:20s} data {e['data']:9s} md5 {e['md5_a']} -> {e['md5_b']}"
                f"  ({e['role_a'] or '-'} / {e['role_b'] or '-'})")
        if e.get("code"):
            line += f"  code {e['code']}, git {e['git']}"
        print(line)
        for k, (x, y) in (e.get("params") or {}).items():
            print(f"  {'':18s} param {k}: {x} -> {y}")
    for m, (x, y) in result["metrics"].items():
        print(f"  metric {m:36s} {x:.4f} -> {y:.4f}")
