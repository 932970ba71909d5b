"""Load test of `vas serve`: throughput and latency at 1, 4, 16 and 64 requests in flight, side by
side in one run (`make run` first).

Starts `vas serve` as its own process on a free loopback port (the command users run, so the load
generator does not share its interpreter), waits for /health, then streams the same requests to it
with the official openai client (AsyncOpenAI), `c` in flight at a time for each --concurrency c:
plain base sampling, then VAS steering positivity. Each level sends max(--requests, --rounds x c)
requests (prompt i mod the held-out prompts, seed i), so every level holds its concurrency for a
while rather than measuring one wave's slowest request. Then black-box
VAS: a second `vas serve --upstream` steering the first over HTTP (top-20 logprobs), at 1 and 4 in
flight, beside white-box VAS at top-k 20.

Per level: completion tokens/s, requests/s, time to first token (the first streamed chunk) and
end-to-end latency at p50/p95/p99. Every answer is checked: a request must finish, and its text
must equal what the same request (same prompt, same seed) got at every other level. Concurrency
must not change a token. Traffic goes to loopback only; each level is bounded in requests and in
time (--max-seconds).

    python bench/serve.py [--data-dir data] [--requests 16] [--concurrency 1 4 16 64] [--max-tokens 48]
    python bench/serve.py --data-dir data-real --llamacpp auto --concurrency 1 4
        # also black-box VAS through a llama.cpp server on the GGUF the base model was converted from

Writes data/bench/serve.json, which the report's "Serving" section reads (refreshed here, as
`vas study` refreshes it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@contextmanager
def vas_serve(data: Path, *extra: str, start_timeout: float = 300.0):
    """`vas serve` on a free loopback port in a process of its own; yields its /v1 URL once /health
    says 200, and stops it (SIGTERM) on exit."""
    port = free_port()
    log = open(data / "bench" / f"serve-{port}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "serve", "--data-dir", str(data),
                                "--host", LOOPBACK, "--port", str(port), "--device", "cpu", *extra],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vas serve did not become healthy; see {log.name}") from None
                time.sleep(0.2)
        yield f"{url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        Path(log.name).unlink(missing_ok=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)] if ordered else float("nan")


async def one_level(url: str, prompts: list[str], n_requests: int, concurrency: int, max_tokens: int,
                    steering: dict | None, max_seconds: float) -> tuple[dict, list]:
    """n_requests streamed requests, `concurrency` in flight: the level's row and each answer's
    (text, finish_reason), in request order."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=max_seconds)
    gate = asyncio.Semaphore(concurrency)
    answers, ttft, latency, tokens, upstream = [None] * n_requests, [], [], [0], [0]

    async def one(i: int):
        async with gate:
            start = time.perf_counter()
            first, text, reason = None, [], None
            stream = await client.completions.create(
                model="vas", prompt=prompts[i % len(prompts)], max_tokens=max_tokens, seed=i, stream=True,
                extra_body={"vas": steering} if steering else None)
            async for chunk in stream:
                if chunk.choices:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].text or "")
                    reason = chunk.choices[0].finish_reason or reason
                    upstream[0] += ((chunk.choices[0].model_extra or {}).get("vas") or {}).get(
                        "upstream", {}).get("requests", 0)
                if chunk.usage:
                    tokens[0] += chunk.usage.completion_tokens
            ttft.append(first - start)
            latency.append(time.perf_counter() - start)
            answers[i] = ("".join(text), reason)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n_requests))), max_seconds)
    seconds = time.perf_counter() - start
    await client.close()
    lost = [i for i, a in enumerate(answers) if a is None or a[1] is None]
    if lost:
        raise RuntimeError(f"{len(lost)} of {n_requests} requests got no finished answer: {lost[:5]}")
    row = {"requests": n_requests, "concurrency": concurrency, "tokens": tokens[0], "seconds": round(seconds, 3),
           "tokens_per_s": round(tokens[0] / seconds, 1), "requests_per_s": round(n_requests / seconds, 2),
           "upstream_requests_per_token": round(upstream[0] / max(tokens[0], 1), 3)}
    for name, values in (("ttft", ttft), ("latency", latency)):
        row |= {f"{name}_p{q}_s": round(percentile(values, q), 4) for q in (50, 95, 99)}
    return row, answers


def run_levels(url: str, name: str, levels: list[int], prompts: list[str], args, steering: dict | None,
               rows: dict, reference: dict) -> None:
    """One row per level into rows; every answer must equal the reference's for its request."""
    for c in levels:
        n = max(args.requests, args.rounds * c)
        row, answers = asyncio.run(one_level(url, prompts, n, c, args.max_tokens, steering, args.max_seconds))
        mismatched = [i for i, a in enumerate(answers) if reference.setdefault(i, a) != a]
        if mismatched:
            raise RuntimeError(f"{name} at {c} in flight: requests {mismatched[:5]} were answered differently "
                               f"from the same requests at other concurrency")
        rows[f"{name}_c{c}"] = row
        print(f"{name:>10} c={c:<3} {row['tokens_per_s']:8.1f} tok/s  {row['requests_per_s']:6.2f} req/s  "
              f"ttft p50 {row['ttft_p50_s'] * 1000:6.0f} ms  latency p50/p95/p99 {row['latency_p50_s'] * 1000:.0f}/"
              f"{row['latency_p95_s'] * 1000:.0f}/{row['latency_p99_s'] * 1000:.0f} ms", flush=True)


def blackbox_through_llamacpp(data: Path, args, prompts: list[str], steering: dict, rows: dict) -> None:
    """Black-box VAS at 1 in flight with llama.cpp's OpenAI-compatible server as the upstream."""
    import tempfile

    from models.lm.real_model import resolve_gguf

    sys.path.insert(0, str(ROOT / "tests"))
    from llamacpp import serve_gguf  # the test suite's launcher of llama-cpp-python's server

    with tempfile.TemporaryDirectory() as tmp:
        server = serve_gguf(resolve_gguf(args.llamacpp), Path(tmp), n_ctx=512)
        try:
            with vas_serve(data, "--upstream", server.url + "/v1", "--upstream-model", "base",
                           "--upstream-top-k", "20") as front:
                run_levels(front, "blackbox_llamacpp_vas", [1], prompts, args, steering, rows, {})
        finally:
            server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--requests", type=int, default=16, help="held-out prompts, and the least requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="requests in flight, each measured (the first is the reference)")
    parser.add_argument("--rounds", type=int, default=4, help="requests per level: at least this many per slot in flight")
    parser.add_argument("--blackbox-concurrency", type=int, nargs="*", default=[1, 4],
                        help="black-box VAS's levels in flight (none: no black-box rows)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="bound on each level's wall time")
    parser.add_argument("--beta", type=float, default=16.0, help="VAS weight on positivity")
    parser.add_argument("--llamacpp", default=None, metavar="GGUF",
                        help="also black-box VAS with a llama.cpp server on this GGUF file (or package/file, "
                             "as base_model.source) as the upstream: the base model the data folder pinned, "
                             "served from its GGUF (needs .venv-llamacpp, `make llamacpp`); `auto`: the GGUF "
                             "the data folder's base model was converted from, none when it was not")
    parser.add_argument("--profile", default=os.environ.get("VAS_PROFILE", "default"),
                        help="the profile the data folder was made with, for refreshing its report")
    parser.add_argument("--no-report", action="store_true", help="do not refresh the report with these numbers")
    args = parser.parse_args(argv)

    import pandas as pd

    from assets.common import git_sha
    from models.artifacts import write_json

    data = Path(args.data_dir)
    (data / "bench").mkdir(parents=True, exist_ok=True)
    if args.llamacpp == "auto":
        args.llamacpp = converted_from_gguf(data)
        print(f"--llamacpp auto: {args.llamacpp or 'the base model is not a converted GGUF: no llama.cpp row'}")
    prompts = pd.read_parquet(data / "prompts" / "prompts.parquet")
    prompts = prompts[prompts.split == "eval"].prompt.tolist()[: args.requests]
    vas = {"weights": {"positivity": args.beta}}
    top20 = {**vas, "top_k": 20}
    rows = {}
    with vas_serve(data) as url:
        for name, steering in (("base", None), ("vas", vas)):
            run_levels(url, name, args.concurrency, prompts, args, steering, rows, {})
        # Black-box VAS: the same weights, the base model reached over HTTP through the first server.
        white = {}
        run_levels(url, "vas_top20", [1], prompts, args, top20, rows, white)
        rows["vas_c1_top20"] = rows.pop("vas_top20_c1")
        if args.blackbox_concurrency:
            with vas_serve(data, "--upstream", url, "--upstream-model", "vas", "--upstream-top-k", "20") as front:
                run_levels(front, "blackbox_vas", args.blackbox_concurrency, prompts, args, top20, rows, {})
        if args.llamacpp:
            blackbox_through_llamacpp(data, args, prompts, top20, rows)
    ratios = ratios_of(rows, args)
    for key, value in ratios.items():
        print(f"  {key}: x{value:.2f}")
    out = data / "bench" / "serve.json"
    write_json({"rows": rows, "ratios": ratios, "settings": vars(args), "git_sha": git_sha(),
                "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}, out)
    print(f"wrote {out}")
    if args.no_report:
        return 0
    from orchestration.cli import refresh_report

    return refresh_report(data, args.profile, "bench/serve.py")


def ratios_of(rows: dict, args) -> dict[str, float]:
    """Each level's throughput against the first level's, VAS against base, black-box against white-box."""
    def tps(key):
        return rows[key]["tokens_per_s"]

    first = args.concurrency[0]
    ratios = {f"{name}_c{c}_vs_c{first}": tps(f"{name}_c{c}") / tps(f"{name}_c{first}")
              for name in ("base", "vas") for c in args.concurrency[1:]}
    ratios[f"vas_vs_base_c{first}"] = tps(f"vas_c{first}") / tps(f"base_c{first}")
    if bb := args.blackbox_concurrency:
        ratios[f"blackbox_vs_whitebox_vas_top20_c{bb[0]}"] = tps(f"blackbox_vas_c{bb[0]}") / tps("vas_c1_top20")
        ratios |= {f"blackbox_vas_c{c}_vs_c{bb[0]}": tps(f"blackbox_vas_c{c}") / tps(f"blackbox_vas_c{bb[0]}")
                   for c in bb[1:]}
    if "blackbox_llamacpp_vas_c1" in rows:
        ratios["blackbox_llamacpp_vs_whitebox_vas_top20_c1"] = tps("blackbox_llamacpp_vas_c1") / tps("vas_c1_top20")
    return ratios


def converted_from_gguf(data: Path) -> str | None:
    """The GGUF file the data folder's base model was converted from (its manifest says), if any."""
    from models.lm.lm import read_manifest

    return read_manifest(data / "base_model").get("gguf")


if __name__ == "__main__":
    sys.exit(main())
