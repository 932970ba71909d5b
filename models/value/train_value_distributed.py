"""Train one value model data-parallel: `torchrun --nproc_per_node N -m models.value.train_value_distributed ...`.

    torchrun --nproc_per_node 2 -m models.value.train_value_distributed --rollouts data/rollouts \\
        --base data/base_model --init data/reward_models/positivity --attribute positivity \\
        --out /tmp/vm --steps 100

Every rank reads the same rollouts (rollouts.parquet, reward_stats.json), as the value_models
asset does, and runs train_value_model, which splits each step's rows over the ranks (DDP: gloo on
CPU, nccl on CUDA, each rank on its LOCAL_RANK GPU). Rank 0 saves the model with ValueModel.save
and its metrics as train_metrics.json. Without torchrun it is one process, the same training.
Settings are ValueTrainConfig's defaults (params.yaml's default profile) unless given here.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from models.value import distributed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollouts", type=Path, required=True, help="folder with rollouts.parquet and reward_stats.json")
    parser.add_argument("--base", type=Path, required=True, help="the base_model folder (its manifest names the weights)")
    parser.add_argument("--init", type=Path, help="backbone to start from (e.g. a reward model); default: the base model")
    parser.add_argument("--attribute", required=True, help="reward to fit: column learned_<attribute>")
    parser.add_argument("--out", type=Path, required=True, help="where rank 0 saves the value model")
    parser.add_argument("--parameterization", default=None, help="scalar, qhead, distributional, distributional_qhead")
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--batch-size", type=int, default=None, help="global rows per step, split over the processes")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward within a process")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="checkpoint here; a re-run resumes from it")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    from models.value.value_training import ValueTrainConfig

    overrides = {"parameterization": args.parameterization, "train_steps": args.steps, "batch_size": args.batch_size,
                 "micro_batch_size": args.micro_batch_size, "learning_rate": args.learning_rate, "seed": args.seed}
    return ValueTrainConfig(**{k: v for k, v in overrides.items() if v is not None})


def main(argv=None) -> None:
    import pandas as pd
    from transformers import AutoTokenizer

    from models.data.rollouts import training_rollouts
    from models.lm.lm import base_model_dir
    from models.value.value_training import train_value_model

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING,
                        format="%(asctime)s %(message)s")
    device = distributed.init_from_env(args.device)
    try:
        model_dir = base_model_dir(args.base)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        stats = json.loads((args.rollouts / "reward_stats.json").read_text())
        if args.attribute not in stats:
            raise SystemExit(f"no reward stats for {args.attribute!r} in {args.rollouts}; known: {', '.join(sorted(stats))}")
        df = pd.read_parquet(args.rollouts / "rollouts.parquet")
        data = training_rollouts(df, f"learned_{args.attribute}", tokenizer.eos_token_id, stats[args.attribute])
        model, metrics = train_value_model(data, args.init or model_dir, config_from_args(args),
                                           pad_id=tokenizer.pad_token_id, device=str(device),
                                           checkpoint_dir=args.checkpoint_dir, progress=logging.getLogger(__name__).info)
        if distributed.is_main():
            model.save(args.out)
            metrics["world_size"] = distributed.world_size()
            (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            print(f"value model saved to {args.out}")
        distributed.barrier()       # no rank tears the group down while rank 0 still uses it
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
