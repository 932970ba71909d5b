"""Value models for Value Augmented Sampling: a causal-LM body with a zero-initialized value head.

Two parameterizations share one interface:

- `scalar` (as in the paper): head Linear(H, 1) read at a prefix's last token gives V(prefix), and
  Q(s, a) = V(s·a). Decoding scores the k candidate tokens in one forward that reuses the prefix
  KV cache (or, for a backbone that refuses the 4D mask this needs, by repeating the cache).
- `qhead`: head Linear(H, vocab) read at s's last token gives Q(s, ·) for every token at once, so
  decoding costs one value forward per generated token. With token_factors "embedding" it is
  factorized instead, Q(s, a) = M(h_s) · f_a with M: Linear(H, rank) and f_a from a's embedding, as
  distributional_qhead's below: a real vocabulary's rare tokens get the values of the tokens they
  resemble, not a row of their own that training never reaches (models/value/distill.py fits one so).

- `distributional`: head Linear(H, n_bins) read like `scalar`, giving a histogram over reward
  bins for V(s·a) (models/value/distributional.py): its mean is the paper's value, its soft value
  (1/beta)·log E[exp(beta·R)] makes token-level decoding the exact sequence-level tilt.
- `distributional_qhead`: the histogram of Q(s, a) for every token from one forward, factorized
  so the head stays small for real vocabularies: logits(s, a) = M(h_s) · f_a with
  M: Linear(H, n_bins x rank) and a token factor f_a of size rank (a vocab x bins head would
  hold vocab·n_bins·H weights). Decoding costs one value forward per token, like `qhead`.

The head starts at zero, so an untrained value model changes nothing: VAS with it is base
sampling (a zero distributional head is a uniform histogram, the same for every candidate).
Dropout is off everywhere: TD targets come from the same network and must be deterministic.
Files are Hugging Face format (backbone) + `value_head.safetensors` + `value_config.json`.

A frozen backbone (value_models.freeze_backbone: only the head is trained) is saved by reference,
its folder and weights' sha256, not copied. When that backbone is the frozen base model's own body,
the loaded value model shares the base's module (`load(..., base_model=)`), and a per-token head
then reads the hidden state the base model's forward already computed: no second forward per token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.lm.lm import quiet_loading, resolve_model_dir, weights_sha256
from models.lm.train_utils import dropout_off, pad_rows, positions
from models.value.candidate_scoring import CandidateScoring
from models.value.distributional import Support, support_from, value_of

PARAMETERIZATIONS = ("scalar", "qhead", "distributional", "distributional_qhead")
DISTRIBUTIONAL = ("distributional", "distributional_qhead")
PER_TOKEN_HEADS = ("qhead", "distributional_qhead")     # Q(s, ·) for all tokens from s's hidden state
HEAD_FILE = "value_head.safetensors"
TOKEN_FACTORS = ("free", "embedding")       # f_a of the factorized heads: a vector per token, or P · e_a
CONFIG_FILE = "value_config.json"


@dataclass
class ValueDecodeState:
    """The value model's view of a left-padded batch being decoded, one prefix per row."""

    cache: object               # the backbone's KV cache over the prefixes (a transformers Cache)
    mask: torch.Tensor          # (B, T) attention mask of the prefixes, left padded
    hidden: torch.Tensor        # (B, H) last-layer hidden state at each prefix's last token


def _zero_dropout(config) -> None:
    """Set every dropout probability in a transformers config to 0 (GPT-2's *_pdrop, Llama's
    attention_dropout, ...). Some models read these floats directly instead of using nn.Dropout."""
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(config, name, 0.0)


def _load_backbone(directory: str | Path, trust_remote_code: bool):
    """The transformer body of a local HF model (a causal LM's body, or a saved value backbone).

    SDPA or eager attention are requested because candidate scoring passes a custom 4D mask,
    which both accept and flash-attention kernels do not.
    """
    from transformers import AutoConfig, AutoModel  # heavy: only when a model is built or loaded

    quiet_loading()
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=True)
    config = AutoConfig.from_pretrained(str(directory), **kwargs)
    _zero_dropout(config)
    try:
        return AutoModel.from_pretrained(str(directory), config=config, use_safetensors=True,
                                         attn_implementation="sdpa", **kwargs)
    except ValueError:   # an architecture without SDPA support
        return AutoModel.from_pretrained(str(directory), config=config, use_safetensors=True,
                                         attn_implementation="eager", **kwargs)


def _frozen_backbone_dir(directory: Path, config: dict) -> Path:
    """The folder a frozen backbone was saved by reference to, refused if its weights changed."""
    source = resolve_model_dir(config["init_from"], what=f"{directory}'s frozen backbone",
                               fix="it is saved by reference to that folder")
    if (found := weights_sha256(source)) != config["init_weights_sha256"]:
        raise RuntimeError(f"{directory}'s frozen backbone {source} changed since training "
                           f"(weights sha256 {found[:12]} != {config['init_weights_sha256'][:12]})")
    return source


class ValueModel(nn.Module):
    """V (scalar) or Q(s, ·) (qhead) of the frozen base policy, on a causal-LM backbone."""

    def __init__(self, backbone: nn.Module, parameterization: str = "scalar", support: Support | None = None,
                 rank: int = 16, token_factors: str = "free"):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; known: {', '.join(PARAMETERIZATIONS)}")
        self.parameterization = parameterization
        self.backbone = backbone
        self.init_info: dict = {}            # where the backbone's weights came from, for value_config.json
        self.frozen_backbone = False         # only the head was trained: saved by reference to init_from
        self.candidate_scoring = CandidateScoring("auto")   # V(s·a) heads: how candidates are scored
        config = backbone.config
        self.support = (support or Support()) if parameterization in DISTRIBUTIONAL else None
        if token_factors not in TOKEN_FACTORS:
            raise ValueError(f"token_factors must be one of {', '.join(TOKEN_FACTORS)}, got {token_factors!r}")
        factored = parameterization == "distributional_qhead" or (parameterization == "qhead"
                                                                  and token_factors == "embedding")
        self.rank = rank if factored else 0
        out = {"scalar": 1, "qhead": rank if self.rank else config.vocab_size,
               "distributional": self.support and self.support.n_bins,
               "distributional_qhead": self.support and self.support.n_bins * rank}[parameterization]
        # float32 head whatever the backbone dtype: values are small differences, TD needs precision.
        self.head = nn.Linear(config.hidden_size, out)
        nn.init.zeros_(self.head.weight)     # zero head: an untrained value model steers nothing
        nn.init.zeros_(self.head.bias)
        self.factor_source = token_factors if self.rank else "free"
        if self.rank:
            # Random, fixed by a seed of its own: with the zero head, gradients reach the head first.
            gen = torch.Generator().manual_seed(0)
            if self.factor_source == "free":     # one free vector per token id
                self.token_factors = nn.Parameter(torch.randn(config.vocab_size, rank, generator=gen) / math.sqrt(rank))
            else:                                # f_a = P · e_a, from the backbone's own token embedding e_a
                width = backbone.get_input_embeddings().embedding_dim
                self.factor_proj = nn.Parameter(torch.randn(rank, width, generator=gen) / math.sqrt(width * rank))
        dropout_off(self)                    # belt and braces for modules that hold their own p

    def factors(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., rank) token factors f_a of distributional_qhead for token ids (...). "embedding"
        factors are a projection of the backbone's input embeddings, scaled to unit RMS: a token
        rarely seen in training gets the factor of the tokens it resembles, not a random one (a real
        vocabulary of 50k tokens is mostly rare in a few thousand rollouts)."""
        if self.factor_source == "free":
            return self.token_factors[tokens]
        e = self.backbone.get_input_embeddings()(tokens).float()                        # (..., E)
        e = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)
        return e @ self.factor_proj.T

    @property
    def is_distributional(self) -> bool:
        return self.support is not None

    def check_calibrated(self, calibrated: bool) -> None:
        """Refuse calibrated values unless this is a distributional model with calibrated bins."""
        if calibrated and not (self.is_distributional and self.support.calibrated):
            raise ValueError(f"calibrated values need a distributional value model trained with calibrated bins "
                             f"(value_models.calibrated_bins: true); this one is {self.parameterization!r}"
                             + (" with uniform bins" if self.is_distributional else ""))

    # ------------------------------------------------------------------ construction and files

    @classmethod
    def from_base(cls, model_dir: str | Path, parameterization: str = "scalar",
                  trust_remote_code: bool = False, support: Support | None = None, rank: int = 16,
                  token_factors: str = "free") -> "ValueModel":
        """A fresh value model whose backbone starts from a local HF causal LM's weights."""
        path = resolve_model_dir(str(model_dir))
        model = cls(_load_backbone(path, trust_remote_code), parameterization, support=support, rank=rank,
                    token_factors=token_factors)
        # Recorded in value_config.json so an artifact says which weights it started from.
        model.init_info = {"init_from": str(model_dir), "init_weights_sha256": weights_sha256(path)}
        return model

    def save(self, directory: str | Path) -> None:
        """Backbone in HF format (safetensors; by reference when frozen), the head as safetensors,
        a small JSON config."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not self.frozen_backbone:
            self.backbone.save_pretrained(directory, safe_serialization=True)
        elif not self.init_info.get("init_weights_sha256"):
            raise ValueError("a frozen backbone is saved by reference to the folder it was loaded from, "
                             "and this value model does not know it (build it with ValueModel.from_base)")
        head = dict(self.head.state_dict())
        if self.rank:
            key = "token_factors" if self.factor_source == "free" else "factor_proj"
            head[key] = getattr(self, key)
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.items()},
                  str(directory / HEAD_FILE))
        config = {
            "parameterization": self.parameterization,
            "hidden_size": self.backbone.config.hidden_size,
            "vocab_size": self.vocab_size,
            "head_outputs": self.head.out_features,
            **({"support": vars(self.support)} if self.support else {}),
            **({"rank": self.rank, "token_factors": self.factor_source} if self.rank else {}),
            **self.init_info,
            **({"backbone_frozen": True} if self.frozen_backbone else {}),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             trust_remote_code: bool = False, base_model=None) -> "ValueModel":
        """Load what save() wrote: safetensors only, remote code only when asked. base_model: the
        frozen base (load_frozen_base's), whose body a frozen backbone of the same weights shares."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} is missing: {directory} is not a saved value model")
        config = json.loads(config_path.read_text())
        support = support_from(config["support"]) if "support" in config else None
        if not config.get("backbone_frozen"):
            backbone = _load_backbone(directory, trust_remote_code)
        elif base_model is not None and getattr(base_model, "weights_sha256", None) == config["init_weights_sha256"]:
            backbone = base_model.base_model          # the very module: the decoder can share its forward
        else:
            backbone = _load_backbone(_frozen_backbone_dir(directory, config), trust_remote_code)
        model = cls(backbone, config["parameterization"], support=support, rank=config.get("rank", 16),
                    token_factors=config.get("token_factors", "free"))
        model.frozen_backbone = bool(config.get("backbone_frozen"))
        head = load_file(str(directory / HEAD_FILE))
        if model.rank:
            key = "token_factors" if model.factor_source == "free" else "factor_proj"
            with torch.no_grad():
                getattr(model, key).copy_(head.pop(key))
        model.head.load_state_dict(head)
        model.init_info = {k: config[k] for k in ("init_from", "init_weights_sha256") if k in config}
        return model.to(device).eval()

    @property
    def vocab_size(self) -> int:
        return self.backbone.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # ------------------------------------------------------------------ values along paths (training)

    def _per_token(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token heads: outputs for hidden (..., H) and tokens (...) that broadcast together.

        qhead -> (...): only the head rows of the tokens asked for are used, so no (..., vocab)
        tensor is built; factorized, M(h) (rank) times f_token. distributional_qhead -> (..., n_bins):
        M(h) (n_bins x rank) times f_token.
        """
        if self.parameterization == "qhead" and not self.rank:
            rows = self.head.weight[tokens]                                           # (..., H)
            return (hidden.float() * rows).sum(-1) + self.head.bias[tokens]
        if self.parameterization == "qhead":
            return (self.head(hidden.float()) * self.factors(tokens)).sum(-1)         # (...)
        mix = self.head(hidden.float()).unflatten(-1, (self.support.n_bins, self.rank))   # (..., n_bins, rank)
        return (mix * self.factors(tokens)[..., None, :]).sum(-1)                      # (..., n_bins)

    def path_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     action_mask: torch.Tensor) -> torch.Tensor:
        """What the head says about the state reached by taking token t, 0 where action_mask is 0:
        (B, T) values for scalar and qhead, (B, T, n_bins) histogram logits for the distributional ones.

        scalar-shaped heads read h[b, t]; per-token heads read h[b, t-1] and input_ids[b, t].
        Positions count real tokens only, so left and right padding give the same outputs.
        """
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=positions(attention_mask)).last_hidden_state   # (B, T, H)
        if self.parameterization in PER_TOKEN_HEADS:
            q = self._per_token(h[:, :-1], input_ids[:, 1:])                          # (B, T-1[, n_bins])
            u = torch.cat([torch.zeros_like(q[:, :1]), q], dim=1)                     # token 0 has no state before it
        else:
            u = self.head(h.float())                                                  # (B, T, 1 | n_bins)
            if not self.is_distributional:
                u = u.squeeze(-1)
        mask = action_mask.bool().reshape(*action_mask.shape, *([1] * (u.dim() - 2)))
        # where, not a product: padding positions never leak into values or gradients.
        return torch.where(mask, u, torch.zeros_like(u))

    def path_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    action_mask: torch.Tensor, beta: float | None = None, calibrated: bool = False) -> torch.Tensor:
        """u (B, T): the value of the state reached by taking token t, 0 where action_mask is 0.
        Distributional models give the mean, or the soft value at beta when beta is given; of the
        reward, or of its normal score when calibrated (calibrated bins only)."""
        self.check_calibrated(calibrated)
        u = self.path_outputs(input_ids, attention_mask, action_mask)
        if not self.is_distributional:
            return u
        return torch.where(action_mask.bool(), value_of(u, self.support, beta, calibrated), 0.0)

    @torch.no_grad()
    def text_values(self, rows: list[list[int]], pad_id: int, beta: float | None = None,
                    calibrated: bool = False) -> torch.Tensor:
        """V of whole token sequences (each row: BOS, then a text's ids): the head at the last token
        given all before it, which for a per-token head is Q(s, a) = V(s·a) with a the last token.
        (n,) float32; mean or soft value at beta as path_values. Black-box VAS scores texts this way."""
        ids, mask = pad_rows(rows, pad_id, "right")
        ids, mask = ids.to(self.device), mask.to(self.device)
        u = self.path_values(ids, mask, mask, beta, calibrated)
        return u.gather(1, mask.sum(-1, keepdim=True) - 1).squeeze(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                action_mask: torch.Tensor) -> torch.Tensor:
        """path_outputs, so wrappers that call the module (DDP, torch.compile) train the same thing."""
        return self.path_outputs(input_ids, attention_mask, action_mask)

    # ------------------------------------------------------------------ decoding with a KV cache

    @torch.no_grad()
    def start(self, ids: torch.Tensor, mask: torch.Tensor) -> ValueDecodeState:
        """Encode a left-padded prompt batch, ids and mask (B, T)."""
        out = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        return ValueDecodeState(cache=out.cache, mask=mask, hidden=out.last_hidden_state[:, -1])

    @torch.no_grad()
    def candidate_q(self, state: ValueDecodeState, candidates: torch.Tensor, beta: float | None = None,
                    calibrated: bool = False) -> torch.Tensor:
        """Q(s, a) for candidates (B, k) token ids appended to each row's prefix -> (B, k) float32.

        Distributional models give the mean of the histogram, or the soft value Q_beta when beta
        is given (the decoder passes its weight), of the reward or (calibrated) of its normal score;
        the others ignore beta and refuse calibrated."""
        self.check_calibrated(calibrated)
        return self.candidate_values(self.candidate_outputs(state, candidates), beta, calibrated)

    @torch.no_grad()
    def candidate_outputs(self, state: ValueDecodeState, candidates: torch.Tensor) -> torch.Tensor:
        """The head's outputs for candidates (B, k): (B, k) values, or (B, k, n_bins) histogram logits
        of distributional models; what candidate_values reads (the serving scheduler runs this once
        for the rows of several requests, then reads each request's rows at its own beta)."""
        if self.parameterization in PER_TOKEN_HEADS:
            return self._per_token(state.hidden[:, None, :], candidates)              # (B, k[, n_bins])
        out = self.head(self._candidate_hidden(state, candidates).float())            # (B, k, 1 | n_bins)
        return out if self.is_distributional else out.squeeze(-1)

    def candidate_values(self, outputs: torch.Tensor, beta: float | None = None,
                         calibrated: bool = False) -> torch.Tensor:
        """candidate_outputs -> (B, k) Q: the mean, soft (beta) or calibrated value of a histogram."""
        self.check_calibrated(calibrated)
        return value_of(outputs, self.support, beta, calibrated) if self.is_distributional else outputs

    def _candidate_hidden(self, state: ValueDecodeState, candidates: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, k, H) of each candidate appended to its row's prefix: one forward over
        the shared prefix cache with a 4D mask, or by repeating the cache where the backbone cannot
        take that mask (models/value/candidate_scoring.py). The cache keeps holding just the prefixes;
        advance() adds the token actually chosen."""
        return self.candidate_scoring(self.backbone, state.cache, state.mask, candidates)

    @torch.no_grad()
    def advance(self, state: ValueDecodeState, tokens: torch.Tensor) -> None:
        """Extend every row's prefix by one token, tokens (B,)."""
        state.mask = torch.cat([state.mask, state.mask.new_ones((state.mask.shape[0], 1))], dim=1)
        pos = state.mask.sum(-1, keepdim=True) - 1                                    # (B, 1)
        out = self.backbone(input_ids=tokens[:, None], attention_mask=state.mask, position_ids=pos,
                            cache=state.cache, use_cache=True)
        state.cache = out.cache
        state.hidden = out.last_hidden_state[:, -1]


# What of a value steers, shared by the decoder (models/decoding/vas.py) and the heads fitted to its
# values (models/value/distill.py).
def centred(values: torch.Tensor, on: torch.Tensor | None) -> torch.Tensor:
    """values (B, k) minus their mean over each row's `on` candidates (all of them when on is None),
    0 off them: the part of a value that steers (a per-state offset never does)."""
    if on is None:
        return values - values.mean(-1, keepdim=True)
    mean = (values * on).sum(-1, keepdim=True) / on.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(on, values - mean, 0.0)


def steered_candidates(candidate_logits: torch.Tensor, min_p: float) -> torch.Tensor | None:
    """(B, k) bool: the candidates min_p lets the values steer, from their base logits or log-probs
    (log pi0(a) - log max pi0 is a logit difference; the likeliest candidate always qualifies).
    None when min_p is 0: all of them."""
    if min_p <= 0:
        return None
    best = candidate_logits.max(-1, keepdim=True).values
    return (candidate_logits - best) >= math.log(min_p)
