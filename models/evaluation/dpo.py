"""The DPO baseline (the paper's comparison): a copy of the base model fine-tuned with TRL's
DPOTrainer on the preference pairs. Its weights change; the frozen base model's never do.

Sampling it reuses the base sampler through the Steering protocol: the "steering" replaces pi0's
logits by the DPO policy's, so the sampler reports the exact path KL(pi_DPO || pi0) for free.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from models.lm.lm import load_causal_lm
from models.lm.sampling import CachedLM

log = logging.getLogger(__name__)


@dataclass
class DPOTrainConfig:
    attribute: str = "positivity"       # whose pairs to train on
    beta: float = 0.1
    learning_rate: float = 1e-4
    train_steps: int = 150
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0


def train_dpo(pairs: pd.DataFrame, model_dir, output_dir, config: DPOTrainConfig, device: str = "cpu",
              progress: Callable[[str], None] = log.info) -> dict:
    """Fine-tune a copy of the model in model_dir on pairs (prompt, chosen, rejected) with DPO and
    save it to output_dir in HF format (safetensors). Returns training metrics."""
    # datasets, transformers and TRL are heavy: imported only when DPO is trained.
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = pairs[pairs.attribute == config.attribute] if "attribute" in pairs else pairs
    if rows.empty:
        raise ValueError(f"no preference pairs for attribute {config.attribute!r} to train DPO on")
    model, tokenizer = load_causal_lm(model_dir, device="cpu")
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    # The sampler frames prompts as BOS + text, so DPO sees the same framing.
    bos = tokenizer.bos_token or ""
    data = Dataset.from_dict({"prompt": [bos + p for p in rows.prompt], "chosen": list(rows.chosen),
                              "rejected": list(rows.rejected)})
    losses: list[float] = []

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                progress(f"DPO step {state.global_step}/{config.train_steps}: loss {logs['loss']:.4f}, "
                         f"reward accuracy {logs.get('rewards/accuracies', float('nan')):.3f}")

    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="vas-dpo-") as scratch:
        args = DPOConfig(output_dir=scratch, use_cpu=not cuda, bf16=cuda, beta=config.beta,
                         learning_rate=config.learning_rate, max_steps=config.train_steps,
                         per_device_train_batch_size=config.batch_size, max_length=config.max_length,
                         logging_steps=max(1, config.train_steps // 10), save_strategy="no", report_to=[],
                         seed=config.seed, disable_tqdm=True, gradient_checkpointing=False)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Progress()])
        trainer.remove_callback(PrinterCallback)     # progress goes through our logger instead
        result = trainer.train()
    model = trainer.model.cpu().eval()
    out = Path(output_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"train_loss": float(result.training_loss), "loss_curve": losses, "n_pairs": len(rows)}


class PolicySteering:
    """Steering that samples from another policy sharing the tokenizer (e.g. the DPO model):
    adjust() ignores pi0's logits and returns the policy's own, from its own KV cache."""

    def __init__(self, policy):
        self.policy = policy
        self.lm: CachedLM | None = None

    def start(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.lm = CachedLM(self.policy, ids, mask)

    def adjust(self, base_logits: torch.Tensor) -> torch.Tensor:
        return self.lm.last_hidden_logits.float()

    def advance(self, tokens: torch.Tensor) -> None:
        self.lm.step(tokens)


