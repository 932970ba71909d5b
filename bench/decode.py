"""Decode-cost benchmark: plain sampling vs VAS (scalar, distributional_qhead soft) vs Best-of-16/128, side by side,
and the decode cost of value models on the base-sized body against the small value backbone.

One process, one device, the same prompts, batch size and generation length for every method;
prints tokens per second and the ratio of each to plain base sampling, and writes
data/bench/decode.json. Needs a materialized pipeline (`make run`, or VAS_PROFILE=smoke make run).

    .venv/bin/python bench/decode.py [--prompts 64] [--batch-size 64] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


PARAMETERIZATIONS = ("scalar", "distributional_qhead")
KEYS = ("base_tokens_per_s", "vas_scalar_tokens_per_s", "vas_distributional_qhead_tokens_per_s",
        "vas_rerank4_tokens_per_s", "bon16_tokens_per_s", "bon128_tokens_per_s", "value_train_tokens_per_s")
# Decode cost by value backbone: untrained (zero) heads on the base-sized body and on the small value
# backbone (data/value_backbone), so every row samples pi0's very tokens, as base sampling does, and
# its ratio to base is the decode cost alone, not a difference in lengths.
BACKBONE_KEYS = ("cost_distributional_qhead_base_size_tokens_per_s", "cost_distributional_qhead_small_tokens_per_s",
                 "cost_scalar_k20_small_tokens_per_s")


def main(argv=None) -> int:
    import pandas as pd
    import torch

    from models.artifacts import write_json
    from models.data.rollouts import reward_stats, training_rollouts
    from models.decoding.vas import VASConfig, vas_sample
    from models.lm.lm import load_frozen_base, pick_device
    from models.lm.sampling import SamplingConfig, sample
    from models.rewards.reward_model import load_reward_model
    from models.value.value_model import ValueModel
    from models.value.value_store import value_model_folder
    from models.value.value_training import ValueTrainConfig, train_value_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--attribute", default="positivity")
    parser.add_argument("--value-train-steps", type=int, default=30)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    data = Path(args.data_dir)
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    base, tokenizer, _ = load_frozen_base(data / "base_model", device=str(device))
    prompts = pd.read_parquet(data / "prompts" / "prompts.parquet")
    prompts = prompts[prompts.split == "eval"].prompt.tolist()
    prompts = [prompts[i % len(prompts)] for i in range(args.prompts)]
    values = {p: ValueModel.load(value_model_folder(data / "value_models", args.attribute, p),
                                 device=str(device)).eval() for p in PARAMETERIZATIONS}
    scorer = load_reward_model(data / "reward_models" / args.attribute, device=str(device))
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=0)

    def tokens_per_s(gen, seconds):
        return sum(gen.n_tokens) / seconds

    sample(base, tokenizer, prompts[: args.batch_size], config, device=str(device))    # warm-up
    results = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)}
    gen, s = timed(lambda: sample(base, tokenizer, prompts, config, device=str(device)))
    results["base_tokens_per_s"] = tokens_per_s(gen, s)
    for p, model in values.items():
        gen, s = timed(lambda: vas_sample(base, tokenizer, prompts, {args.attribute: model}, {args.attribute: 2.0},
                                          config, VASConfig(top_k=args.top_k), device=str(device)))
        results[f"vas_{p}_tokens_per_s"] = tokens_per_s(gen, s)
    for key, body, parameterization, top_k in (
            ("cost_distributional_qhead_base_size", data / "base_model", "distributional_qhead", args.top_k),
            ("cost_distributional_qhead_small", data / "value_backbone", "distributional_qhead", args.top_k),
            ("cost_scalar_k20_small", data / "value_backbone", "scalar", 20)):
        if not body.exists():
            continue
        model = ValueModel.from_base(body, parameterization).to(device).eval()
        gen, s = timed(lambda: vas_sample(base, tokenizer, prompts, {args.attribute: model}, {args.attribute: 2.0},
                                          config, VASConfig(top_k=top_k), device=str(device)))
        results[f"{key}_tokens_per_s"] = tokens_per_s(gen, s)
    # VAS + rerank: 4 soft-VAS samples per prompt, the best by the reward model.
    start = time.perf_counter()
    pool = []
    for k in range(4):
        g = vas_sample(base, tokenizer, prompts, {args.attribute: values["distributional_qhead"]},
                       {args.attribute: 16.0}, SamplingConfig(**{**config.__dict__, "seed": k}), VASConfig(top_k=args.top_k),
                       device=str(device))
        pool.append((g, scorer(prompts, g.texts)))
    best = [max(range(4), key=lambda k: pool[k][1][i]) for i in range(len(prompts))]
    results["vas_rerank4_tokens_per_s"] = sum(pool[best[i]][0].n_tokens[i] for i in range(len(prompts))) / (
        time.perf_counter() - start)
    # Best-of-N: N base samples and N reward-model scores per accepted sample; tokens counted are
    # the accepted sample's.
    for n in (16, 128):
        start = time.perf_counter()
        pool = []
        for k in range(n):
            g = sample(base, tokenizer, prompts, SamplingConfig(**{**config.__dict__, "seed": k}), device=str(device))
            pool.append((g, scorer(prompts, g.texts)))
        best = [max(range(n), key=lambda k: pool[k][1][i]) for i in range(len(prompts))]
        accepted = sum(pool[best[i]][0].n_tokens[i] for i in range(len(prompts)))
        results[f"bon{n}_tokens_per_s"] = accepted / (time.perf_counter() - start)
    # Value training throughput on the stored rollouts (a short run).
    rollouts = pd.read_parquet(data / "rollouts" / "rollouts.parquet")
    column = f"learned_{args.attribute}"
    train = training_rollouts(rollouts, column, tokenizer.eos_token_id, reward_stats(rollouts, column))
    value_config = ValueTrainConfig(parameterization="scalar", learning_rate=2e-4, train_steps=args.value_train_steps)
    _, metrics = train_value_model(train, data / "base_model", value_config,
                                   pad_id=tokenizer.pad_token_id, device=str(device), progress=lambda _: None)
    results["value_train_tokens_per_s"] = metrics["train_tokens_per_s"]
    results["settings"] = {k: getattr(args, k) for k in ("prompts", "batch_size", "max_new_tokens", "top_k")}

    out = data / "bench" / "decode.json"
    write_json(results, out)
    base_tps = results["base_tokens_per_s"]
    print(f"device: {results['device']}; {args.prompts} prompts, batch {args.batch_size}, "
          f"up to {args.max_new_tokens} new tokens, top-k {args.top_k}")
    for key in KEYS:
        print(f"  {key:28s} {results[key]:10.1f}   x{results[key] / base_tps:.3f} of base")
    print("decode cost by value backbone (zero heads: pi0's tokens; cost = base tokens/s / these):")
    for key in (k for k in BACKBONE_KEYS if k in results):
        print(f"  {key:50s} {results[key]:10.1f}   cost x{base_tps / results[key]:.2f} of base")
    for p in (*PARAMETERIZATIONS, "rerank4"):
        print(f"  VAS {p} vs Best-of-128: {results[f'vas_{p}_tokens_per_s'] / results['bon128_tokens_per_s']:.1f}x faster")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
