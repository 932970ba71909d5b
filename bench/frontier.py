"""What the value estimate's compute buys, and whether a second (iterated) round moves the frontier.

Two measurements on a materialized default world (`make run` first), side by side in one run:

    python bench/frontier.py compute    # rollouts x training steps x top-k -> soft-VAS frontier points
    python bench/frontier.py iterate    # round 2 fitted on soft-VAS rollouts of round 1 (IVO-style)
    python bench/frontier.py backbones --data-dir data-real --profile real --calibrated --betas 2 3 4 --steps 1800 300
        # a head on the frozen base vs the base's first layers (frozen, or trained for the last --steps)
    python bench/frontier.py iterate --states-only --control --calibrated --rollout-beta 4 --betas 3 4 5
        # round 2 on pi0 rollouts plus pi0 continuations of calibrated-VAS prefixes, against a control
    python bench/frontier.py temperature --data-dir data-real --profile real --temperatures 1 0.5 0.25 0.1 --seeds 0 1 2
        # a control with no value model: pi0 sharpened to temperature T, its gold reward at its exact KL
    python bench/frontier.py settings --data-dir data-real --profile real --top-k 20 --min-p 0.01 0.1 --betas 1.5 2
        # the pipeline's saved value model (value_models/<attribute>) under decode-time variants:
        # top-k, min_p, a bound on the bonus (--clip, nats) and a per-step factor on it (--decay)

Every point but settings' is soft VAS (calibrated VAS with --calibrated) with a distributional_qhead value model of
the steered attribute, trained with the profile's value_models settings; the eval prompts, seed and scoring are the
evaluation asset's. Results print as a markdown table and go to data/bench/frontier_<what>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class World:
    """The frozen base model, prompts, learned reward and value-training settings of a data folder."""

    def __init__(self, data: Path, attribute: str, profile: str | None = None, train_prompts: int | None = None):
        import pandas as pd

        from models.lm.lm import base_model_dir, load_frozen_base
        from models.profiles import load_profile
        from models.rewards.reward_model import load_reward_models

        self.data, self.attribute = data, attribute
        self.base, self.tokenizer, _ = load_frozen_base(data / "base_model", device="cpu")
        self.base_dir = base_model_dir(data / "base_model")
        prompts = pd.read_parquet(data / "prompts" / "prompts.parquet")
        self.train_prompts = prompts[prompts.split == "train"].reset_index(drop=True)
        self.eval_prompts = prompts[prompts.split == "eval"].prompt.tolist()
        self.scorer = load_reward_models(data / "reward_models")[attribute]
        self.stats = json.loads((data / "rollouts" / "reward_stats.json").read_text())[attribute]
        self.profile = load_profile(profile)
        if train_prompts:
            # More distinct training prompts than the prompts asset holds: the generator's openings
            # after the eval ones (the eval prompts come first, so they stay the same).
            from models.data.corpus import generate_openings

            n_eval, seed = len(self.eval_prompts), self.profile["seed"]
            openings = generate_openings(n_eval + train_prompts, seed + 1)
            assert openings[:n_eval] == self.eval_prompts, "eval prompts must not move"
            self.train_prompts = pd.DataFrame({"prompt_id": [f"p{i:05d}" for i in range(n_eval, len(openings))],
                                               "prompt": openings[n_eval:]})

    def rollouts(self, samples_per_prompt: int, steering=None):
        """Scored rollouts (DataFrame) of pi0, or of a steered policy."""
        from models.data.rollouts import RolloutConfig, sample_rollouts

        config = RolloutConfig(samples_per_prompt=samples_per_prompt, batch_size=256,
                               max_new_tokens=self.profile["rollouts"]["max_new_tokens"])
        df = sample_rollouts(self.base, self.tokenizer, self.train_prompts, config, steering=steering)
        df[f"learned_{self.attribute}"] = self.scorer(df.prompt.tolist(), df.completion.tolist())
        return df

    def train(self, df, train_steps: int, init_model=None, init_dir=None, **overrides):
        """A distributional_qhead value model of the profile's settings (overrides: ValueTrainConfig
        fields) on df's rollouts, from init_dir's backbone (None: the profile's backbone_init)."""
        from models.data.rollouts import training_rollouts
        from models.profiles import config_from
        from models.value.value_store import VALUE_MODELS_OWN_KEYS
        from models.value.value_training import ValueTrainConfig, backbone_init_dir, train_value_model

        params = self.profile["value_models"]
        config = config_from(ValueTrainConfig, {**params, "seed": self.profile["seed"]}, "value_models",
                             ignore=VALUE_MODELS_OWN_KEYS,
                             parameterization="distributional_qhead", train_steps=train_steps, **overrides)
        data = training_rollouts(df, f"learned_{self.attribute}", self.tokenizer.eos_token_id, self.stats)
        if init_dir is None:
            init_dir = backbone_init_dir(params["backbone_init"], self.base_dir,
                                         self.data / "reward_models" / self.attribute, params["backbone"],
                                         self.data / "value_backbone")
        start = time.perf_counter()
        model, _ = train_value_model(data, init_dir, config, pad_id=self.tokenizer.pad_token_id, device="cpu",
                                     progress=lambda _: None, init_model=init_model)
        return model.eval(), time.perf_counter() - start

    def point(self, model, beta: float, top_k: int, calibrated: bool = False) -> dict:
        """Soft VAS (or calibrated VAS) on the eval prompts: learned and gold reward, exact KL, distinct-2."""
        import numpy as np

        from models.decoding.vas import VASConfig, vas_sample
        from models.evaluation.evaluation import distinct_n
        from models.lm.sampling import SamplingConfig
        from models.rewards.rewards import score_gold

        config = SamplingConfig(max_new_tokens=self.profile["evaluation"]["max_new_tokens"],
                                seed=self.profile["seed"], batch_size=self.profile["evaluation"]["batch_size"])
        start = time.perf_counter()
        gen = vas_sample(self.base, self.tokenizer, self.eval_prompts, {"r": model}, {"r": beta}, config,
                         VASConfig(top_k=top_k, soft=not calibrated, calibrated=calibrated))
        seconds = time.perf_counter() - start
        return {"beta": beta, "top_k": top_k, "ms_per_token": 1000 * seconds / max(1, sum(gen.n_tokens)),
                "learned": float(np.mean(self.scorer(self.eval_prompts, gen.texts))),
                "gold": float(np.mean(score_gold(gen.texts, [self.attribute])[self.attribute])),
                "kl_nats": float(np.mean(gen.kl_nats)), "distinct_2": distinct_n(gen.texts)}


class Sharpened:
    """Steering without a value model: pi0's logits divided by T, so sampling at temperature 1
    draws from pi0 at temperature T and the sampler's KL is exactly KL(pi0_T || pi0). A control for
    any steering that spends many nats: how much of its gold reward does sharpening alone buy?"""

    def __init__(self, temperature: float):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def start(self, ids, mask) -> None:
        pass

    def adjust(self, base_logits):
        return base_logits / self.temperature

    def advance(self, tokens) -> None:
        pass


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |")
    return "\n".join(lines)


def compute(world: World, args) -> list[dict]:
    """Rollouts (samples per training prompt) x training steps, each at every top-k and beta."""
    pool = world.rollouts(max(args.samples_per_prompt))
    rows = []
    for spp in args.samples_per_prompt:
        df = pool[pool.sample_idx < spp].reset_index(drop=True)
        if args.max_rollouts:
            df = df[df.prompt_id.isin(df.prompt_id.unique()[: args.max_rollouts // spp])].reset_index(drop=True)
        for steps in args.steps:
            model, seconds = world.train(df, steps)
            for top_k in args.top_k:
                for beta in args.betas:
                    rows.append({"rollouts": len(df), "per_prompt": spp, "steps": steps,
                                 "train_s": round(seconds, 1), **world.point(model, beta, top_k, args.calibrated)})
                    print(rows[-1], flush=True)
    return rows


def backbones(world: World, args) -> list[dict]:
    """The value model of a large base, on the world's own pi0 rollouts: a head on the frozen base's
    hidden states (decoding shares the base's forward), with free or embedding token factors; the
    base's first --layers layers frozen with only the head trained; and those layers trained with
    the head (for the last --steps). Each at every beta (calibrated VAS with --calibrated), beside
    plain sampling's time per token."""
    import tempfile

    import pandas as pd

    from models.lm.lm import save_pretrained, truncated_copy
    from models.lm.sampling import SamplingConfig, sample
    from models.value.value_model import ValueModel

    df = pd.read_parquet(world.data / "rollouts" / "rollouts.parquet")
    config = SamplingConfig(max_new_tokens=world.profile["evaluation"]["max_new_tokens"], seed=world.profile["seed"],
                            batch_size=world.profile["evaluation"]["batch_size"])
    start = time.perf_counter()
    plain = sample(world.base, world.tokenizer, world.eval_prompts, config)
    plain_ms = 1000 * (time.perf_counter() - start) / sum(plain.n_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        layers = Path(tmp) / f"first_{args.layers}_layers"
        save_pretrained(truncated_copy(world.base, args.layers), world.tokenizer, layers)
        variants = [("head on the frozen base (shared forward), free token factors", world.base_dir, True,
                     args.steps[0], "free"),
                    ("head on the frozen base (shared forward)", world.base_dir, True, args.steps[0], "embedding"),
                    (f"first {args.layers} layers, frozen", layers, True, args.steps[0], "embedding"),
                    (f"first {args.layers} layers, trained", layers, False, args.steps[-1], "embedding")]
        for name, init_dir, frozen, steps, factors in variants:
            model, seconds = world.train(df, steps, init_dir=init_dir, freeze_backbone=frozen, token_factors=factors)
            if frozen and init_dir == world.base_dir:      # as the evaluation asset loads it: sharing the base
                model.save(Path(tmp) / "v")
                model = ValueModel.load(Path(tmp) / "v", base_model=world.base)
            for beta in args.betas:
                point = world.point(model, beta, args.top_k[0], args.calibrated)
                rows.append({"value model": name, "steps": steps, "train_s": round(seconds, 1), **point,
                             "cost_vs_plain": point["ms_per_token"] / plain_ms})
                print(rows[-1], flush=True)
    return rows


class SteerFirst:
    """Steers row i for its first switch[i] tokens, then samples pi0 (rows in sampling order)."""

    def __init__(self, steering, switch):
        import torch

        self.steering, self.switch, self.offset = steering, torch.as_tensor(switch), 0

    def start(self, ids, mask):
        self.limit = self.switch[self.offset : self.offset + ids.shape[0]]
        self.offset += ids.shape[0]
        self.step = 0
        self.steering.start(ids, mask)

    def adjust(self, base_logits):
        import torch

        steered = self.steering.adjust(base_logits)
        on = (self.step < self.limit).to(base_logits.device)[:, None]
        self.step += 1
        return torch.where(on, steered, base_logits)

    def advance(self, tokens):
        self.steering.advance(tokens)


def switched_rollouts(df, switch):
    """Rows whose first switch tokens were steered: those tokens move into the prompt, so only pi0's
    own actions are trained on (their TD targets are values of pi0 at states the steered policy visits)."""
    keep, prompts, completions = [], [], []
    for i, (p, c, done, n) in enumerate(zip(df.prompt_ids, df.completion_ids, df.finished, switch)):
        c = [int(t) for t in c]
        if len(c) > n or (done and len(c) == n):
            keep.append(i)
            prompts.append([int(t) for t in p] + c[:n])
            completions.append(c[n:])
    out = df.iloc[keep].reset_index(drop=True).copy()
    out["prompt_ids"], out["completion_ids"] = prompts, completions
    return out


def iterate(world: World, args) -> list[dict]:
    """Round 1 on pi0's rollouts; round 2 continues it on rollouts drawn with round 1's soft VAS,
    or (--states-only) on pi0 rollouts plus pi0 continuations of soft-VAS prefixes of random length."""
    import numpy as np
    import pandas as pd

    from models.decoding.vas import ValueGuidance, VASConfig
    from models.value.value_model import ValueModel
    from models.value.value_store import value_model_folder

    first = ValueModel.load(value_model_folder(world.data / "value_models", world.attribute,
                                               world.profile["value_models"]["parameterization"])).eval()
    decoder = VASConfig(top_k=args.top_k[0], soft=not args.calibrated, calibrated=args.calibrated)
    steering = ValueGuidance({"r": first}, {"r": args.rollout_beta}, decoder)
    pi0 = pd.read_parquet(world.data / "rollouts" / "rollouts.parquet")
    if args.states_only:
        n = len(world.train_prompts) * args.samples_per_prompt[0]
        switch = np.random.default_rng(args.switch_seed).integers(1, args.max_switch + 1, size=n)
        steered = world.rollouts(args.samples_per_prompt[0], steering=SteerFirst(steering, switch))
        df = pd.concat([pi0, switched_rollouts(steered, switch)], ignore_index=True)
        print(f"round 2 data: {len(pi0)} pi0 rollouts + {len(df) - len(pi0)} switched", flush=True)
    else:
        df = world.rollouts(args.samples_per_prompt[0], steering=steering)
    init = None if args.fresh else first
    second, seconds = world.train(df, args.steps[0], init_model=init)
    vas = "calibrated-VAS" if args.calibrated else "soft-VAS"
    label = f"{vas} states, pi0 continuations" if args.states_only else f"{vas} rollouts"
    models = [("round 1 (pi0 rollouts)", first), (f"round 2 ({label})", second)]
    if args.control:
        # As much training again on pi0's own rollouts: what round 2 buys beyond the extra steps.
        models.append(("control (round 1 + the same steps on pi0 rollouts)", world.train(pi0, args.steps[0],
                                                                                         init_model=first)[0]))
    rows = []
    for name, model in models:
        for beta in args.betas:
            rows.append({"value model": name, **world.point(model, beta, args.top_k[0], args.calibrated)})
            print(rows[-1], flush=True)
    return rows


def temperature(world: World, args) -> list[dict]:
    """pi0 sharpened to each temperature, on the eval prompts, once per seed (the sampling seed)."""
    import numpy as np

    from models.evaluation.evaluation import distinct_n
    from models.evaluation.study import mean_ci95
    from models.lm.sampling import SamplingConfig, sample
    from models.rewards.rewards import score_gold

    rows = []
    for t in args.temperatures:
        for seed in args.seeds:
            config = SamplingConfig(max_new_tokens=world.profile["evaluation"]["max_new_tokens"], seed=seed,
                                    batch_size=world.profile["evaluation"]["batch_size"])
            gen = sample(world.base, world.tokenizer, world.eval_prompts, config, steering=Sharpened(t))
            gold, gold_ci95 = mean_ci95(score_gold(gen.texts, [world.attribute])[world.attribute])
            rows.append({"temperature": t, "seed": seed, "gold": gold, "gold_ci95": gold_ci95,
                         "learned": float(np.mean(world.scorer(world.eval_prompts, gen.texts))),
                         "kl_nats": float(np.mean(gen.kl_nats)), "distinct_2": distinct_n(gen.texts)})
            print(rows[-1], flush=True)
    return rows


class ClippedGuidance:
    """Builds a ValueGuidance whose summed bonus is clipped to [-clip, clip] nats per candidate (a
    bound on the bonus, as CriticControl bounds its critic's) and multiplied by decay**step at each
    decode step (None: neither): decode-time variants of the saved value model, no retraining."""

    @staticmethod
    def make(value_models, weights, vas_config, base_body, clip: float | None, decay: float | None):
        from models.decoding.vas import ValueGuidance

        class Guidance(ValueGuidance):
            step = 0

            def start(self, ids, mask):
                self.step = 0
                super().start(ids, mask)

            def bonus(self, q_of, steered=None, states=None):
                total = super().bonus(q_of, steered, states)
                if clip is not None:
                    total = total.clamp(-clip, clip)
                if decay is not None:
                    total = total * decay ** self.step
                return total

            def advance(self, tokens):
                self.step += 1
                super().advance(tokens)

        return Guidance(value_models, weights, vas_config, base_body=base_body)


def settings(world: World, args) -> list[dict]:
    """The saved default value model of the attribute (value_models/<attribute>), decoded at each beta
    under each top-k, min_p, bonus clip and per-step decay, on the eval prompts with each seed."""
    import itertools

    import numpy as np

    from models.decoding.vas import VASConfig
    from models.evaluation.evaluation import distinct_n, repeat_share
    from models.lm.sampling import SamplingConfig, sample
    from models.rewards.rewards import score_gold
    from models.value.value_model import ValueModel

    model = ValueModel.load(world.data / "value_models" / world.attribute, device="cpu", base_model=world.base).eval()
    ev = world.profile["evaluation"]
    rows = []
    grid = itertools.product(args.seeds, args.top_k, args.min_p, args.clip, args.decay, args.betas)
    for seed, top_k, min_p, clip, decay, beta in grid:
        clip = None if clip <= 0 else clip
        decay = None if decay == 1 else decay
        config = SamplingConfig(max_new_tokens=ev["max_new_tokens"], seed=seed, batch_size=ev["batch_size"])
        guidance = ClippedGuidance.make({"r": model}, {"r": beta}, VASConfig(top_k=top_k, min_p=min_p, soft=False),
                                        getattr(world.base, "base_model", None), clip, decay)
        start = time.perf_counter()
        gen = sample(world.base, world.tokenizer, world.eval_prompts, config, steering=guidance)
        rows.append({"seed": seed, "top_k": top_k, "min_p": min_p, "clip": clip or 0.0, "decay": decay or 1.0,
                     "beta": beta, "gold": float(np.mean(score_gold(gen.texts, [world.attribute])[world.attribute])),
                     "learned": float(np.mean(world.scorer(world.eval_prompts, gen.texts))),
                     "kl_nats": float(np.mean(gen.kl_nats)), "distinct_2": distinct_n(gen.texts),
                     "repeat_share": repeat_share(gen.texts), "s": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["compute", "iterate", "backbones", "temperature", "settings"])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--attribute", default="positivity")
    parser.add_argument("--profile", default=None, help="params.yaml profile (default: $VAS_PROFILE or default)")
    parser.add_argument("--samples-per-prompt", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--steps", type=int, nargs="+", default=[450, 900, 1350])
    parser.add_argument("--top-k", type=int, nargs="+", default=[40, 10],
                        help="compute, settings: every value; iterate: the first")
    parser.add_argument("--min-p", type=float, nargs="+", default=[0.01], help="settings: min_p values")
    parser.add_argument("--clip", type=float, nargs="+", default=[0.0],
                        help="settings: bounds on the bonus in nats (0: none)")
    parser.add_argument("--decay", type=float, nargs="+", default=[1.0],
                        help="settings: per-step factors on the bonus (1: none; above 1 it grows)")
    parser.add_argument("--betas", type=float, nargs="+", default=[16.0])
    parser.add_argument("--train-prompts", type=int, default=None,
                        help="distinct training prompts (default: the prompts asset's train split)")
    parser.add_argument("--max-rollouts", type=int, default=None,
                        help="compute: keep the first max_rollouts / samples_per_prompt prompts (fixed data size)")
    parser.add_argument("--rollout-beta", type=float, default=16.0, help="iterate: beta of round 1's rollouts")
    parser.add_argument("--states-only", action="store_true",
                        help="iterate: soft VAS draws only a prefix of 1..max-switch tokens, pi0 the rest")
    parser.add_argument("--layers", type=int, default=4, help="backbones: layers of the truncated copy")
    parser.add_argument("--max-switch", type=int, default=24)
    parser.add_argument("--switch-seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="iterate: round 2 starts from a fresh head")
    parser.add_argument("--control", action="store_true",
                        help="iterate: also round 1 trained for the same steps again on pi0's own rollouts")
    parser.add_argument("--calibrated", action="store_true",
                        help="decode every point (and iterate's round-2 rollouts) with calibrated VAS instead of soft VAS")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.5, 0.25],
                        help="temperature: the temperatures pi0 is sharpened to")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="temperature, settings: sampling seeds")
    args = parser.parse_args(argv)

    import torch

    from models.artifacts import write_json

    torch.set_num_threads(max(1, torch.get_num_threads()))
    world = World(Path(args.data_dir), args.attribute, args.profile, args.train_prompts)
    started = time.perf_counter()
    rows = {"compute": compute, "iterate": iterate, "backbones": backbones, "temperature": temperature,
            "settings": settings}[args.what](
        world, args)
    columns = list(rows[0])
    print(f"\n{args.what}: {time.perf_counter() - started:.0f} s\n" + table(rows, columns))
    out = Path(args.data_dir) / "bench" / f"frontier_{args.what}.json"
    write_json({"rows": rows, "settings": vars(args)}, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
