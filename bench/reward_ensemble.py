"""Do reward ensembles help Best-of-N under the gold? Single reward vs conservative ensembles at equal N.

On a materialized data folder (`vas run` first):

    python bench/reward_ensemble.py --data-dir data-real --profile real --members 3 --ks 0 1 2

Members: the world's reward model (seed 0's) and --members - 1 more trained on the same pairs with
seeds 1, 2, ... (the profile's reward_models settings; each seed also draws its own held-out split).
One Best-of-N pool of max(--ns) base samples per eval prompt, with the evaluation's candidate
seeds, is scored once by every member; each objective then picks the best of the first N:
the single reward, mean - k·sd over the members for each k (k = 0: the mean), and the worst case.
Printed per (objective, N): gold and learned (seed-0 member) reward of the picks, side by side.
Writes <data-dir>/bench/reward_ensemble.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def train_members(world, n: int, steps: int | None) -> list:
    """n - 1 more reward models of the world's attribute, seeds 1 .. n - 1, as RewardScorers."""
    import pandas as pd

    from models.profiles import config_from
    from models.rewards.reward_model import RewardScorer, RewardTrainConfig, train_reward_model

    pairs = pd.read_parquet(world.data / "preference_pairs" / "pairs.parquet")
    pairs = pairs[pairs.attribute == world.attribute].reset_index(drop=True)
    params = {k: v for k, v in world.profile["reward_models"].items() if k != "sources"}
    members = []
    for seed in range(1, n):
        config = config_from(RewardTrainConfig, {**params, "seed": seed}, "reward_models",
                             **({"train_steps": steps} if steps else {}))
        start = time.perf_counter()
        model, tokenizer, metrics = train_reward_model(pairs, world.data / "base_model", config,
                                                       progress=lambda m: print("  " + m, flush=True))
        print(f"member seed {seed}: held-out accuracy {metrics['heldout_accuracy']:.3f} "
              f"in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        members.append(RewardScorer(model, tokenizer, max_length=params["max_length"]))
    return members


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data-real")
    parser.add_argument("--profile", default="real")
    parser.add_argument("--attribute", default="positivity")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="members' training steps (default: the profile's)")
    parser.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--ks", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    args = parser.parse_args(argv)
    if args.members < 2:
        parser.error("--members must be >= 2: an ensemble of one is the single reward")

    import numpy as np
    import torch

    from bench.frontier import World, table
    from models.artifacts import write_json
    from models.evaluation.evaluation import CANDIDATE_SEED_STRIDE
    from models.evaluation.study import mean_ci95
    from models.lm.sampling import SamplingConfig, sample
    from models.profiles import project_path
    from models.rewards.reward_ensemble import EnsembleScorer, combine
    from models.rewards.rewards import score_gold

    torch.set_num_threads(2)
    data = project_path(args.data_dir)
    world = World(data, args.attribute, args.profile)
    members = [world.scorer] + train_members(world, args.members, args.steps)
    ev, seed = world.profile["evaluation"], world.profile["seed"]
    prompts = world.eval_prompts
    texts, start = [], time.perf_counter()
    for k in range(max(args.ns)):
        config = SamplingConfig(max_new_tokens=ev["max_new_tokens"], temperature=ev["temperature"],
                                seed=seed + CANDIDATE_SEED_STRIDE * k, batch_size=ev["batch_size"])
        texts.append(sample(world.base, world.tokenizer, prompts, config).texts)
    print(f"pool: {max(args.ns)} x {len(prompts)} samples in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    n_max = len(texts)
    flat = [t for pool in texts for t in pool]
    ensemble = EnsembleScorer(members)
    scores = ensemble.member_scores(prompts * n_max, flat).reshape(len(members), n_max, len(prompts))
    gold = np.asarray(score_gold(flat, [args.attribute])[args.attribute]).reshape(n_max, len(prompts))

    flat_scores = scores.reshape(len(members), -1)
    objectives = {"single (seed 0)": scores[0]}
    for k in args.ks:
        objectives[f"mean - {k:g} sd"] = combine(flat_scores, k).reshape(n_max, len(prompts))
    objectives["worst case"] = combine(flat_scores, objective="worst_case").reshape(n_max, len(prompts))
    rows = []
    for name, objective in objectives.items():
        for n in args.ns:
            pick = objective[:n].argmax(0)                                          # (P,)
            chosen_gold = gold[pick, np.arange(len(prompts))]
            gold_mean, gold_ci95 = mean_ci95(chosen_gold)
            rows.append({"objective": name, "n": n, "gold": gold_mean, "gold_ci95": gold_ci95,
                         "learned_seed0": float(scores[0][pick, np.arange(len(prompts))].mean())})
    base_gold = float(gold[0].mean())
    print(f"\nBest-of-N on {len(prompts)} eval prompts, {len(members)} members; base sampling gold {base_gold:.3f}\n")
    print(table(rows, ["objective", "n", "gold", "gold_ci95", "learned_seed0"]))
    out = data / "bench" / "reward_ensemble.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json({"args": vars(args), "base_gold": base_gold, "rows": rows}, out)
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
