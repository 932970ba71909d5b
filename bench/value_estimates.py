"""Which value estimate ranks pi0's candidates? Candidate value models side by side on one world.

On a materialized data folder (`vas run` first), every candidate is measured on the same held-out
states, the same Monte-Carlo continuations and the same decoding prompts and seeds:

    python bench/value_estimates.py --data-dir data-real --profile real --steps 300 --betas 1 2 4

Candidates (--candidates picks some):
- head: the saved primary value model (value_models/<attribute>), today's default;
- args: the reward model read at every prefix (models/decoding/reward_guidance.py), no training;
- reward_mc: a scalar value model that starts as the reward model (its body and score layer, in the
  rollouts' standardized units) and is fitted on every prefix of the rollouts to Monte-Carlo
  targets (lambda 1), as PARGS fine-tunes the reward model on prefixes;
- reward_td: the same fitted by TD(lambda) (the profile's lambda);
- reward_body: the reward model's body with a zero scalar head (value_models.backbone_init:
  reward_model), fitted by TD(lambda): what the head learns without the reward's own view;
- reward_mc_more: reward_mc on the rollouts plus --extra-samples pi0 samples of each of
  --extra-prompts more openings (human snippets no prompt uses, from prompts/human_snippets.parquet;
  never an eval prompt's): more distinct prompts;
- reward_mc_human: reward_mc on the rollouts plus the human continuations of --human-snippets
  snippets no eval prompt was cut from (models/data/human_continuations.py): every prefix of a
  human-written review labelled by the learned reward of the whole text, off-policy Monte-Carlo
  targets as RAD trains its prefix scorer; thousands of distinct openings at no sampling cost;
- scalar: the saved scalar value model (value_models/<attribute>.scalar), the profile's choice;
- distilled: a factorized per-token head on the frozen base's hidden states, fitted to that scalar's
  values (or, with reward_mc among the candidates, to that reward_mc's) of pi0's top-k at every
  state of the rollouts (models/value/distill.py; --distill-* options; --distill-teacher picks which
  trained candidate teaches): one forward per token instead of
  the scalar's k + 1 value forwards. --distill-human N adds the states along N human continuations.

--seeds 0 1 2 trains every trained candidate once per seed on the same rollouts and measures each on
the same states, continuations and decoding prompts and seed: the spread across training seeds.
With distilled among them, distilled_mean is one more student, fitted to the mean of the seeds'
teachers' values at the same states.

Value error (models/evaluation/value_error.py): Spearman over pi0's top candidates against MC means, mse, at
n_prompts x prefix lengths states. Decode: mean-value VAS at each --betas on the eval prompts:
gold and learned reward, exact KL, distinct-2, the 4-gram repeat share, and base-model forwards per
token (models.evaluation.evaluation.forwards_per_token). Writes <data-dir>/bench/value_estimates.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CANDIDATES = ("head", "args", "reward_mc", "reward_td", "reward_body", "reward_mc_more", "reward_mc_human", "scalar",
              "distilled")


def reward_start(world, trainable: bool):
    """The reward model as a scalar value model in standardized units (a trainable copy when trainable)."""
    from models.decoding.reward_guidance import reward_as_value, reward_value_start

    if trainable:
        return reward_value_start(world.scorer, world.stats, world.base.config.vocab_size)
    return reward_as_value(world.scorer, scale=world.stats["std"], offset=world.stats["mean"],
                           vocab_size=world.base.config.vocab_size)


def extra_rollouts(world, n_prompts: int, samples: int):
    """Scored pi0 rollouts of n_prompts openings of human snippets that no prompt uses (seeded pick)."""
    import pandas as pd

    from models.data.rollouts import RolloutConfig, sample_rollouts

    snippets = pd.read_parquet(world.data / "prompts" / "human_snippets.parquet")
    unused = snippets[snippets.split == ""].sample(frac=1.0, random_state=world.profile["seed"]).head(n_prompts)
    prompts = pd.DataFrame({"prompt_id": "extra-" + unused.snippet_id.astype(str), "prompt": unused.opening})
    prompts = prompts.reset_index(drop=True)
    config = RolloutConfig(samples_per_prompt=samples, batch_size=128, seed=world.profile["seed"],
                           max_new_tokens=world.profile["rollouts"]["max_new_tokens"])
    start = time.perf_counter()
    # Positions after the train split's, so no (position, sample) numbers repeat the rollouts'.
    offset = len(world.train_prompts)
    df = sample_rollouts(world.base, world.tokenizer, prompts, config, positions=range(offset, offset + len(prompts)))
    df[f"learned_{world.attribute}"] = world.scorer(df.prompt.tolist(), df.completion.tolist())
    print(f"  {len(df)} extra rollouts of {len(prompts)} openings in {(time.perf_counter() - start) / 60:.1f} min",
          flush=True)
    return df


def human_rollouts(world, n: int | None):
    """Scored human continuations (models/data/human_continuations.py) of snippets no eval prompt uses."""
    import pandas as pd

    from models.data.human_continuations import scored_human_continuations

    snippets = pd.read_parquet(world.data / "prompts" / "human_snippets.parquet")
    start = time.perf_counter()
    df = scored_human_continuations(snippets, world.tokenizer, world.profile["rollouts"]["max_new_tokens"],
                                    {world.attribute: world.scorer}, n=n, seed=world.profile["seed"])
    print(f"  {len(df)} human continuations scored in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return df


def rollouts_with(world, extra=None):
    """The world's rollouts, with `extra` rows (scored rollout-shaped rows) appended in their columns."""
    import pandas as pd

    df = pd.read_parquet(world.data / "rollouts" / "rollouts.parquet")
    if extra is None:
        return df
    return pd.concat([df, extra[[c for c in df.columns if c in extra.columns]]], ignore_index=True)


def train_scalar(world, args, lam: float, seed: int, init_model=None, init_dir=None, extra=None, steps=None):
    """A scalar value model fitted on the world's rollouts (and extra ones) with training seed
    `seed`; (model, seconds)."""

    from models.data.rollouts import training_rollouts
    from models.profiles import config_from
    from models.value.value_store import VALUE_MODELS_OWN_KEYS
    from models.value.value_training import ValueTrainConfig, train_value_model

    params = {k: v for k, v in world.profile["value_models"].items() if k != "freeze_backbone"}
    config = config_from(ValueTrainConfig, {**params, "seed": seed}, "value_models",
                         ignore=VALUE_MODELS_OWN_KEYS, parameterization="scalar", train_steps=steps or args.steps,
                         learning_rate=args.lr, lam=lam, batch_size=args.batch_size,
                         micro_batch_size=args.batch_size, freeze_backbone=False)
    df = rollouts_with(world, extra)
    data = training_rollouts(df, f"learned_{world.attribute}", world.tokenizer.eos_token_id, world.stats)
    start = time.perf_counter()
    model, result = train_value_model(data, init_dir or world.data / "reward_models" / world.attribute, config,
                                      pad_id=world.tokenizer.pad_token_id, device="cpu",
                                      progress=lambda m: print("  " + m, flush=True), init_model=init_model)
    return model.eval(), time.perf_counter() - start


def build(world, name: str, args, seed: int, built: dict, targets: list):
    """(value model, training seconds) of a candidate, trained with seed `seed`; `built` holds this
    seed's candidates built so far (distilled takes reward_mc as its teacher when it is there), and
    distilled appends its teacher's targets to `targets`."""
    from models.value.value_model import ValueModel
    from models.value.value_store import value_model_folder

    if name == "head":
        head = value_model_folder(world.data / "value_models", world.attribute,
                                  world.profile["value_models"]["parameterization"])
        return ValueModel.load(head, base_model=world.base), 0.0
    if name == "args":
        return reward_start(world, trainable=False), 0.0
    if name == "reward_mc":
        return train_scalar(world, args, lam=1.0, seed=seed, init_model=reward_start(world, trainable=True))
    if name == "reward_td":
        return train_scalar(world, args, lam=world.profile["value_models"]["lam"], seed=seed,
                            init_model=reward_start(world, trainable=True))
    if name == "reward_body":
        return train_scalar(world, args, lam=world.profile["value_models"]["lam"], seed=seed)
    if name == "reward_mc_more":
        extra = extra_rollouts(world, args.extra_prompts, args.extra_samples)
        return train_scalar(world, args, lam=1.0, seed=seed, init_model=reward_start(world, trainable=True),
                            extra=extra)
    if name == "reward_mc_human":
        return train_scalar(world, args, lam=1.0, seed=seed, init_model=reward_start(world, trainable=True),
                            extra=human_rollouts(world, args.human_snippets or None), steps=args.human_steps)
    if name == "scalar":
        return ValueModel.load(value_model_folder(world.data / "value_models", world.attribute, "scalar")), 0.0
    if name == "distilled":
        return distilled(world, args, seed, targets, teacher=built.get(args.distill_teacher))
    raise ValueError(f"unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")


def distill_config(world, args, seed: int):
    from models.value.distill import DistillConfig

    ev = world.profile["evaluation"]
    return DistillConfig(top_k=args.top_k or ev["top_k"], min_p=ev["min_p"], rank=args.distill_rank,
                         train_steps=args.distill_steps, max_rollouts=args.distill_rollouts, seed=seed)


def fit(world, args, seed: int, targets) -> tuple:
    """A student fitted to teacher targets with seed `seed`, its fit printed; (model, seconds)."""
    from models.value.distill import fit_student

    start = time.perf_counter()
    model, metrics = fit_student(world.base, targets, distill_config(world, args, seed),
                                 progress=lambda m: print("  " + m, flush=True))
    print("  " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
    return model.eval(), time.perf_counter() - start


def distilled(world, args, seed: int, kept: list, teacher=None):
    """The per-token head distilled from `teacher` (None: the saved scalar) on the rollouts' states,
    fitted with seed `seed`; (model, seconds, collection included). The teacher's targets are
    appended to `kept`."""

    from models.data.rollouts import training_rollouts
    from models.value.distill import collect_targets
    from models.value.value_model import ValueModel
    from models.value.value_store import value_model_folder

    if teacher is None:
        teacher = ValueModel.load(value_model_folder(world.data / "value_models", world.attribute, "scalar"))
    # With --distill-human, the teacher's values on pi0's candidates along human-written text as well:
    # states of thousands of openings the rollouts never reach (the teacher trained on them).
    df = rollouts_with(world, human_rollouts(world, args.distill_human) if args.distill_human else None)
    data = training_rollouts(df, f"learned_{world.attribute}", world.tokenizer.eos_token_id, world.stats)
    start = time.perf_counter()
    targets = collect_targets(world.base, teacher, data, distill_config(world, args, seed),
                              world.tokenizer.pad_token_id, progress=lambda m: print("  " + m, flush=True))
    kept.append(targets)
    model, _ = fit(world, args, seed, targets)
    return model, time.perf_counter() - start


def distilled_from_mean(world, args, seed: int, targets: list) -> tuple:
    """One student fitted to the mean of several teachers' values at the same states (each seed's
    reward_mc): their seed-to-seed noise averages out, at the student's one forward per token."""
    import dataclasses

    import torch

    first = targets[0]
    for other in targets[1:]:
        if not torch.equal(other.candidates, first.candidates):
            raise ValueError("the teachers' targets are not of the same states and candidates")
    return fit(world, args, seed, dataclasses.replace(first, values=torch.stack([t.values for t in targets]).mean(0)))


def decode(world, model, beta: float, top_k: int) -> dict:
    """Mean-value VAS at beta on the eval prompts, with the evaluation's seed and budget."""
    import numpy as np

    from models.decoding.vas import VASConfig, vas_sample
    from models.evaluation.evaluation import distinct_n, forwards_per_token, repeat_share
    from models.lm.sampling import SamplingConfig
    from models.rewards.rewards import score_gold

    ev = world.profile["evaluation"]
    config = SamplingConfig(max_new_tokens=ev["max_new_tokens"], seed=world.profile["seed"], batch_size=ev["batch_size"])
    start = time.perf_counter()
    gen = vas_sample(world.base, world.tokenizer, world.eval_prompts, {"r": model}, {"r": beta}, config,
                     VASConfig(top_k=top_k, min_p=ev["min_p"], soft=False))
    seconds = time.perf_counter() - start
    return {"beta": beta, "gold": float(np.mean(score_gold(gen.texts, [world.attribute])[world.attribute])),
            "learned": float(np.mean(world.scorer(world.eval_prompts, gen.texts))),
            "kl_nats": float(np.mean(gen.kl_nats)), "distinct_2": distinct_n(gen.texts),
            "repeat_share": repeat_share(gen.texts), "mean_tokens": float(np.mean(gen.n_tokens)),
            "forwards_per_token": forwards_per_token([model], world.base, top_k),
            "s_per_sample": seconds / len(gen.texts)}


def across_seeds(rows: list[dict], points: list[dict], candidate_of: dict) -> dict:
    """Mean and sd across training seeds of each candidate's value error and, per beta, its decode;
    printed and returned as {"value_error_across_seeds": [...], "decode_across_seeds": [...]}."""
    import pandas as pd

    from bench.frontier import table

    def summarize(frame: pd.DataFrame, by: list[str], columns: list[str]) -> list[dict]:
        out = []
        for key, group in frame.groupby(by, sort=False):
            row = dict(zip(by, key if isinstance(key, tuple) else (key,)), seeds=len(group))
            for column in columns:
                spread = f" ± {group[column].std(ddof=1):.3f}" if len(group) > 1 else ""
                row[column] = f"{group[column].mean():.3f}{spread}"
            out.append(row)
        return out

    errors = pd.DataFrame(rows).assign(candidate=lambda f: f.candidate.map(candidate_of))
    summary = {"value_error_across_seeds": summarize(errors, ["candidate"], ["spearman", "mse", "train_min"])}
    print("\nAcross training seeds (mean ± sd)\n")
    print(table(summary["value_error_across_seeds"], ["candidate", "seeds", "spearman", "mse", "train_min"]))
    if points:
        decoded = pd.DataFrame(points).assign(candidate=lambda f: f.candidate.map(candidate_of))
        columns = ["gold", "learned", "kl_nats", "distinct_2", "repeat_share"]
        summary["decode_across_seeds"] = summarize(decoded, ["candidate", "beta"], columns)
        print()
        print(table(summary["decode_across_seeds"], ["candidate", "beta", "seeds", *columns]))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data-real")
    parser.add_argument("--profile", default="real")
    parser.add_argument("--attribute", default="positivity")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the trained candidates")
    parser.add_argument("--lr", type=float, default=1e-4, help="their learning rate (the whole body trains)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts whose completions give the states")
    parser.add_argument("--prefix-lengths", type=int, nargs="+", default=[0, 8])
    parser.add_argument("--candidates-per-state", type=int, default=8)
    parser.add_argument("--continuations", type=int, default=16)
    parser.add_argument("--extra-prompts", type=int, default=768, help="reward_mc_more: openings added")
    parser.add_argument("--extra-samples", type=int, default=2, help="reward_mc_more: pi0 samples of each")
    parser.add_argument("--human-snippets", type=int, default=0,
                        help="reward_mc_human: human continuations added (0: every snippet no eval prompt uses)")
    parser.add_argument("--human-steps", type=int, default=None, help="reward_mc_human: training steps (default --steps)")
    parser.add_argument("--distill-teacher", default="reward_mc", choices=CANDIDATES,
                        help="distilled: the trained candidate it is fitted to (the saved scalar when not built)")
    parser.add_argument("--betas", type=float, nargs="*", default=[], help="decode each candidate at these betas")
    parser.add_argument("--decode-candidates", nargs="+", default=None, choices=CANDIDATES,
                        help="decode only these candidates at --betas (default: every one)")
    parser.add_argument("--top-k", type=int, default=None, help="decoding top-k (default: the profile's)")
    parser.add_argument("--distill-rank", type=int, default=64, help="distilled: rank of the head")
    parser.add_argument("--distill-steps", type=int, default=2000, help="distilled: fitting steps")
    parser.add_argument("--distill-rollouts", type=int, default=0, help="distilled: rollouts used (0: all)")
    parser.add_argument("--distill-human", type=int, default=0,
                        help="distilled: also the states along this many human continuations (0: none)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds of the trained candidates (default: the profile's seed); with "
                             "several, each candidate is trained once per seed, decoded and measured on the same "
                             "prompts, states and continuations, and summarized as mean and sd across seeds")
    args = parser.parse_args(argv)

    import pandas as pd
    import torch

    from bench.frontier import World, table
    from models.artifacts import write_json
    from models.evaluation.value_error import ScoredModel, ValueErrorConfig, evaluate_value_error
    from models.profiles import project_path

    torch.set_num_threads(2)
    data = project_path(args.data_dir)
    world = World(data, args.attribute, args.profile)
    prompts = pd.read_parquet(data / "prompts" / "prompts.parquet")
    prompts = prompts[prompts.split == "eval"].reset_index(drop=True)
    top_k = args.top_k or world.profile["evaluation"]["top_k"]

    seeds = args.seeds or [world.profile["seed"]]
    models, seconds, seed_of, candidate_of, kept_targets = {}, {}, {}, {}, []
    for seed in seeds:
        built = {}
        for name in sorted(args.candidates, key=lambda n: n == "distilled"):     # after its teacher
            key = name if len(seeds) == 1 else f"{name}@{seed}"
            print(f"building {key}", flush=True)
            built[name], seconds[key] = build(world, name, args, seed, built, kept_targets)
            models[key], seed_of[key], candidate_of[key] = built[name], seed, name
    if len(seeds) > 1 and "distilled" in args.candidates:
        print("building distilled_mean (one student on the mean of the seeds' teachers)", flush=True)
        key = "distilled_mean"
        models[key], seconds[key] = distilled_from_mean(world, args, seeds[0], kept_targets)
        seed_of[key], candidate_of[key] = seeds[0], key
        del kept_targets
    config = ValueErrorConfig(n_prompts=args.prompts, prefix_lengths=tuple(args.prefix_lengths),
                              n_candidates=args.candidates_per_state, n_continuations=args.continuations,
                              betas=(2.0,), max_new_tokens=world.profile["rollouts"]["max_new_tokens"],
                              seed=world.profile["seed"], batch_size=256)
    scored = [ScoredModel(name, model, args.attribute, model.parameterization, world.stats)
              for name, model in models.items()]
    start = time.perf_counter()
    metrics, _ = evaluate_value_error(world.base, world.tokenizer, prompts, {args.attribute: world.scorer}, scored,
                                      config)
    mc_seconds = time.perf_counter() - start
    means = metrics[metrics.target == "mean"].set_index("model")
    rows = [{"candidate": name, "seed": seed_of[name], "spearman": float(means.loc[name, "spearman"]),
             "mse": float(means.loc[name, "mse"]),
             "mc_noise_mse": float(means.loc[name, "mc_noise_mse"]), "target_var": float(means.loc[name, "target_var"]),
             "spearman_ceiling": float(means.loc[name, "spearman_ceiling"]),
             "states": int(means.loc[name, "n_ranked_states"]), "train_min": seconds[name] / 60}
            for name in models]
    print(f"\nValue error ({config.n_prompts} prompts x prefix lengths {list(config.prefix_lengths)}, "
          f"{config.n_candidates} candidates x {config.n_continuations} continuations; MC in {mc_seconds / 60:.1f} min)\n")
    print(table(rows, ["candidate", "spearman", "spearman_ceiling", "mse", "mc_noise_mse", "target_var", "states",
                       "train_min"]))
    points = []
    for name, model in models.items():
        if args.decode_candidates and candidate_of[name] not in args.decode_candidates:
            continue
        for beta in args.betas:
            points.append({"candidate": name, "seed": seed_of[name], **decode(world, model, beta, top_k)})
            print(f"decoded {name} beta {beta}: {points[-1]}", flush=True)
    if points:
        print(f"\nMean-value VAS on {len(world.eval_prompts)} eval prompts, top-k {top_k}\n")
        print(table(points, ["candidate", "beta", "gold", "learned", "kl_nats", "distinct_2", "repeat_share",
                             "forwards_per_token", "s_per_sample"]))
    across = across_seeds(rows, points, candidate_of) if len(seeds) > 1 else {}
    out = data / "bench" / "value_estimates.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json({"args": vars(args), "value_error": rows, "decode": points, **across}, out)
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
