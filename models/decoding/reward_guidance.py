"""ARGS-style decoding (Khanov et al. 2024): the learned reward model itself scores every prefix.

The peer that needs no value training: at each step the reward model reads prefix + each of pi0's
top-k candidate tokens, and the decoder samples pi0(a|s)·exp(w·(r(s·a) - mean_k r)). That is VAS
with V(s) = r(s), so it is built as a `scalar` value model whose backbone is the reward model's
body and whose head is its score layer: the same `ValueGuidance` steers with it (top-k, min_p,
centring, the shared-cache candidate scoring, exact KL), and weight 0 is base sampling exactly.

`scale` divides the reward, so w is in standard deviations of the reward over pi0's own samples,
as a VAS beta is in standard deviations of the rollouts' rewards (value models are trained on the
standardized reward). With the rollouts' mean as `offset` and their sd as `scale` it is a value
model in the units value training fits: the start of a value model fine-tuned from the reward
model on every prefix (PARGS), rather than a zero head on its body.
"""

from __future__ import annotations

import copy

import torch

from models.value.value_model import ValueModel


def _score_layer(classifier) -> torch.nn.Linear:
    """The one-output `score` Linear of a causal LM's Hugging Face sequence classifier (GPT-2,
    Llama, Mistral, Qwen...), which reads the last token's hidden state. Encoder classifiers (BERT's
    `classifier` on a pooled [CLS]) cannot be read at a prefix's last token and are refused."""
    layer = getattr(classifier, "score", None)
    if not isinstance(layer, torch.nn.Linear) or layer.out_features != 1:
        raise ValueError(f"{type(classifier).__name__} has no one-output `score` layer on its last token's hidden "
                         "state; ARGS reads causal-LM sequence classifiers (GPT-2, Llama, ...) at every prefix")
    return layer


class PrefixReward(ValueModel):
    """The scalar value model reward_as_value builds: V(s·a) is the reward model's score of s·a read at
    its last token. Where the reward model's framing appends no EOS to a text (its EOS is its pad
    token, as SmolLM2's), a finished text is scored at its last real token, so choosing EOS is worth
    V(s), the reward of the text as it stands: `eos_id` says which candidate that is."""

    eos_id: int | None = None

    @torch.no_grad()
    def candidate_q(self, state, candidates: torch.Tensor, beta: float | None = None,
                    calibrated: bool = False) -> torch.Tensor:
        q = super().candidate_q(state, candidates, beta, calibrated)
        if self.eos_id is None:
            return q
        finished = self.head(state.hidden.float()).squeeze(-1)                      # (B,) V(s)
        return torch.where(candidates == self.eos_id, finished[:, None].to(q), q)


@torch.no_grad()
def reward_as_value(scorer, scale: float = 1.0, offset: float = 0.0, vocab_size: int | None = None) -> ValueModel:
    """A scalar ValueModel giving V(prefix) = (r(prefix) - offset) / scale, from a RewardScorer (its frozen
    classifier: the body is shared, not copied). The classifier must pool at the last token
    (GPT-2, Llama): a prefix's value is then what the reward model says of that prefix as a text,
    read at the prefix's last token, as ARGS reads it. A reward model whose framing appends EOS to a
    text (the embedded world's: EOS is not its pad token) was trained reading at that EOS, so there a
    prefix is read one position off its training (an unfinished text has no EOS yet); EOS itself is
    read where it was trained. vocab_size: the base model's, which the reward model's must equal (it
    reads the base's tokens)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    classifier = scorer.model
    layer = _score_layer(classifier)
    if vocab_size is not None and classifier.config.vocab_size != vocab_size:
        raise ValueError(f"the reward model has a vocabulary of {classifier.config.vocab_size} tokens and the base "
                         f"model {vocab_size}: ARGS feeds it the base's token ids, so they must share a tokenizer")
    value = PrefixReward(classifier.base_model, "scalar")
    tokenizer = scorer.tokenizer
    # RewardScorer's framing (models.rewards.reward_model.encode_texts): EOS is appended unless it is the pad token.
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id == tokenizer.pad_token_id:
        value.eos_id = tokenizer.eos_token_id
    value.head.weight.copy_(layer.weight.float() / scale)
    bias = layer.bias.float() if layer.bias is not None else torch.zeros(1)
    value.head.bias.copy_((bias - offset) / scale)
    return value.to(layer.weight.device).eval()


def reward_value_start(scorer, stats, vocab_size: int | None = None) -> ValueModel:
    """What a value model fitted from the reward model starts as (value_models.head_init:
    reward_model, PARGS): reward_as_value in the standardized units value training fits (stats: the
    rollouts' reward mean and std), a copy with every weight trainable, the scorer untouched."""
    value = copy.deepcopy(reward_as_value(scorer, scale=stats["std"] or 1.0, offset=stats["mean"],
                                          vocab_size=vocab_size))
    for p in value.parameters():
        p.requires_grad_(True)
    return value
