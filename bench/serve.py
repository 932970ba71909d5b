"""Serving throughput of `vas serve`, measured side by side in one run (`make run` first).

Starts the server in-process on a free loopback port (uvicorn, the same app `vas serve` runs) and
sends the same requests with the official openai client, 1, 4 and 16 at a time (--concurrency):
plain base sampling and VAS steering positivity; then black-box VAS: a second server steering the
first one as its upstream (`vas serve --upstream`, top-k 20 logprobs over loopback HTTP), one
request at a time. Prints completion tokens per second, upstream requests per token and the
ratios, and writes data/bench/serve.json.

    python bench/serve.py [--data-dir data] [--requests 16] [--concurrency 1 4 16] [--max-tokens 48]
    python bench/serve.py --data-dir data-real --llamacpp auto
        # also black-box VAS through a llama.cpp server on the GGUF the base model was converted from

The numbers then become the report's "Serving" section: the report asset reads data/bench/serve.json
and is refreshed here, as `vas study` refreshes it.

The server decodes one request at a time (one asyncio lock), so concurrency buys no throughput
beyond overlapping HTTP and scoring with decoding; this measures what that costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_batch(client, prompts: list[str], max_tokens: int, concurrency: int, steering: dict | None) -> dict:
    """Send one request per prompt, `concurrency` in flight; completion tokens per second."""
    def one(i: int):
        extra = {"vas": steering} if steering else None
        r = client.completions.create(model="vas", prompt=prompts[i], max_tokens=max_tokens, seed=i, extra_body=extra)
        return r.usage.completion_tokens, r.model_extra["vas"].get("upstream", {}).get("requests", 0)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        counts = list(pool.map(one, range(len(prompts))))
    seconds = time.perf_counter() - start
    tokens, upstream = sum(c for c, _ in counts), sum(u for _, u in counts)
    return {"requests": len(prompts), "concurrency": concurrency, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "requests_per_s": round(len(prompts) / seconds, 2),
            "upstream_requests_per_token": round(upstream / max(tokens, 1), 3)}


def blackbox_through_llamacpp(data: Path, args, prompts: list[str], steering: dict) -> dict:
    """Black-box VAS at concurrency 1 with llama.cpp's OpenAI-compatible server as the upstream."""
    import tempfile

    from openai import OpenAI

    from models.real_model import resolve_gguf
    from models.serving import Engine
    from models.upstream import UpstreamConfig
    from orchestration.serve import background_server

    sys.path.insert(0, str(ROOT / "tests"))
    from llamacpp import serve_gguf  # the test suite's launcher of llama-cpp-python's server

    with tempfile.TemporaryDirectory() as tmp:
        server = serve_gguf(resolve_gguf(args.llamacpp), Path(tmp), n_ctx=512)
        try:
            engine = Engine(data, device="cpu", upstream=UpstreamConfig(server.url + "/v1", "base", top_k=20))
            with background_server(engine) as front:
                client = OpenAI(base_url=front, api_key="unused", max_retries=0, timeout=3600)
                return run_batch(client, prompts, args.max_tokens, 1, steering)
        finally:
            server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16],
                        help="requests in flight, each measured (the first is the reference)")
    parser.add_argument("--max-tokens", type=int, default=48)
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
    from openai import OpenAI

    from assets.common import git_sha
    from models.artifacts import write_json
    from models.serving import Engine
    from models.upstream import UpstreamConfig
    from orchestration.serve import background_server

    data = Path(args.data_dir)
    if args.llamacpp == "auto":
        args.llamacpp = converted_from_gguf(data)
        print(f"--llamacpp auto: {args.llamacpp or 'the base model is not a converted GGUF: no llama.cpp row'}")
    prompts = pd.read_parquet(data / "prompts" / "prompts.parquet")
    prompts = prompts[prompts.split == "eval"].prompt.tolist()[: args.requests]
    rows = {}
    with background_server(Engine(data, device="cpu")) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        for name, steering in (("base", None), ("vas", {"weights": {"positivity": args.beta}})):
            for concurrency in args.concurrency:
                rows[f"{name}_c{concurrency}"] = run_batch(client, prompts, args.max_tokens, concurrency, steering)
                print(name, rows[f"{name}_c{concurrency}"], flush=True)
        # Black-box VAS: the same weights, the base model reached over HTTP through this server.
        with background_server(Engine(data, device="cpu", upstream=UpstreamConfig(url, "vas", top_k=20))) as front:
            front_client = OpenAI(base_url=front, api_key="unused", max_retries=0, timeout=600)
            steering = {"weights": {"positivity": args.beta}, "top_k": 20}
            rows["vas_c1_top20"] = run_batch(client, prompts, args.max_tokens, 1, steering)
            rows["blackbox_vas_c1"] = run_batch(front_client, prompts, args.max_tokens, 1, steering)
            print("vas top-k 20", rows["vas_c1_top20"], "\nblack-box vas", rows["blackbox_vas_c1"], flush=True)
        if args.llamacpp:
            rows["blackbox_llamacpp_vas_c1"] = blackbox_through_llamacpp(data, args, prompts, steering)
            print("black-box vas through llama.cpp", rows["blackbox_llamacpp_vas_c1"], flush=True)
    first = args.concurrency[0]
    ratios = {f"{name}_c{c}_vs_c{first}": rows[f"{name}_c{c}"]["tokens_per_s"] / rows[f"{name}_c{first}"]["tokens_per_s"]
              for name in ("base", "vas") for c in args.concurrency[1:]}
    ratios |= {f"vas_vs_base_c{first}": rows[f"vas_c{first}"]["tokens_per_s"] / rows[f"base_c{first}"]["tokens_per_s"],
              "blackbox_vs_whitebox_vas_top20_c1": rows["blackbox_vas_c1"]["tokens_per_s"]
              / rows["vas_c1_top20"]["tokens_per_s"]}
    if args.llamacpp:
        ratios["blackbox_llamacpp_vs_whitebox_vas_top20_c1"] = (rows["blackbox_llamacpp_vas_c1"]["tokens_per_s"]
                                                                / rows["vas_c1_top20"]["tokens_per_s"])
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


def converted_from_gguf(data: Path) -> str | None:
    """The GGUF file the data folder's base model was converted from (its manifest says), if any."""
    from models.lm import read_manifest

    return read_manifest(data / "base_model").get("gguf")


if __name__ == "__main__":
    sys.exit(main())
