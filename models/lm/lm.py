"""The frozen base model: a tiny GPT-2 trained on the embedded corpus, or any HF causal LM.

The embedded model gets its own byte-level BPE tokenizer. Reviews are framed as
<|endoftext|> text <|endoftext|>, so a prompt starts after the first marker and generation
stops at the second, as in GPT-2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from models.lm.train_utils import pad_rows, warmup_lr
from models.progress import progress_bar

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass
class TinyLMConfig:
    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    train_steps: int = 800
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 60
    eval_fraction: float = 0.02
    seed: int = 0
    max_grad_norm: float = 1.0


def pick_device(prefer: str = "auto") -> torch.device:
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer wrapped as a transformers fast tokenizer."""
    # tokenizers and transformers are heavy: imported where a model is built, not with the module.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )


def encode_reviews(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids framed as [eos] text [eos], cut to max_len."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [([eos] + row + [eos])[:max_len] for row in ids]


def lm_loss(model, rows: list[list[int]], pad_id: int, device) -> torch.Tensor:
    ids, mask = pad_rows(rows, pad_id, "right")
    labels = ids.masked_fill(mask == 0, -100)           # no loss on padding
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def train_tiny_lm(
    texts: Sequence[str],
    config: TinyLMConfig,
    device: str = "auto",
    progress: Callable[[str], None] = log.info,
    tokenizer=None,
    name: str = "base model",
):
    """Train a tokenizer (unless one is given: a model that must share another's vocabulary, as a
    value backbone shares the base model's) and a GPT-2 on texts. Returns (model, tokenizer, metrics)."""
    from transformers import GPT2Config, GPT2LMHeadModel  # heavy: only when training

    torch.manual_seed(config.seed)
    dev = pick_device(device)
    if tokenizer is None:
        tokenizer = train_tokenizer(texts, config.vocab_size)
    rows = encode_reviews(tokenizer, texts, config.n_positions)
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(rows), generator=gen).tolist()
    n_eval = max(1, int(len(rows) * config.eval_fraction))
    eval_rows = [rows[i] for i in order[:n_eval]]
    train_rows = [rows[i] for i in order[n_eval:]]

    gpt_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(gpt_config).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)

    progress(f"{name}: {n_params / 1e6:.2f}M parameters, {len(train_rows)} train reviews, device {dev}")
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    n_tokens = 0
    for step in progress_bar(range(config.train_steps), f"{name} training", unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(step, config.learning_rate, config.warmup_steps, config.train_steps, "cosine")
        idx = torch.randint(len(train_rows), (config.batch_size,), generator=gen).tolist()
        batch = [train_rows[i] for i in idx]
        n_tokens += sum(len(r) for r in batch)
        loss = lm_loss(model, batch, tokenizer.pad_token_id, dev)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, config.train_steps // 10) == 0 or step + 1 == config.train_steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            progress(f"{name} step {step + 1}/{config.train_steps}: loss {recent:.3f}, "
                     f"{n_tokens / (time.perf_counter() - start):.0f} tokens/s")

    eval_loss = evaluate_lm(model, eval_rows, tokenizer.pad_token_id, dev)
    model.eval()
    metrics = {
        "n_params": n_params,
        "train_loss": float(sum(losses[-50:]) / len(losses[-50:])),
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss),
        "train_seconds": time.perf_counter() - start,
        "train_tokens": n_tokens,
        "device": str(dev),
        "loss_curve": losses,
    }
    return model.cpu(), tokenizer, metrics


@torch.no_grad()
def evaluate_lm(model, rows: list[list[int]], pad_id: int, device, batch_size: int = 64) -> float:
    """Token-weighted mean cross-entropy (nats) over rows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        n = sum(len(r) - 1 for r in chunk)
        total += lm_loss(model, chunk, pad_id, device).item() * n
        count += n
    return total / max(1, count)


def save_pretrained(model, tokenizer, directory: str | Path) -> None:
    """Hugging Face format with safetensors weights."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def truncated_copy(model, n_layers: int):
    """A new model of model's class and config but only its first n_layers transformer blocks, with
    those blocks, the embeddings and the final norm copied (the head of a causal LM too): the cheap
    backbone of a large base model, reading its token ids and its first features."""
    import copy

    config = copy.deepcopy(model.config)
    total = config.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"cannot keep {n_layers} of the model's {total} layers: choose 1 to {total}")
    config.num_hidden_layers = n_layers          # GPT-2 maps it to n_layer
    if isinstance(getattr(config, "layer_types", None), list):   # per-layer attention kinds (Llama, Qwen)
        config.layer_types = config.layer_types[:n_layers]
    small = type(model)(config)
    kept = small.state_dict()
    missing, _ = small.load_state_dict({k: v for k, v in model.state_dict().items() if k in kept}, strict=False)
    if missing:
        raise RuntimeError(f"truncating to {n_layers} layers left weights without a source: {missing[:5]}")
    return small.to(next(model.parameters()).dtype)


def quiet_loading() -> None:
    """No "Loading weights" progress bars in the run logs: transformers (and the HF hub, which it
    switches off too) draw one per model loaded."""
    from transformers.utils import logging as hf_logging  # heavy: only where models are loaded

    hf_logging.disable_progress_bar()


def load_causal_lm(source: str | Path, trust_remote_code: bool = False, allow_download: bool = False,
                   device: str = "cpu", dtype: torch.dtype | None = None):
    """Load a causal LM and its tokenizer from a local HF directory or a hub id (cache only by default).

    Weights load as safetensors only; remote code runs only when the caller asks for it.
    """
    from transformers import AutoModelForCausalLM  # heavy: only when a model is loaded

    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=not allow_download)
    tokenizer = load_tokenizer(source, trust_remote_code, allow_download)
    model = AutoModelForCausalLM.from_pretrained(str(source), use_safetensors=True, dtype=dtype, **kwargs)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def load_tokenizer(source: str | Path, trust_remote_code: bool = False, allow_download: bool = False):
    """A model's tokenizer alone (left padding, EOS as pad when it has none): what the decoders expect."""
    from transformers import AutoTokenizer

    quiet_loading()
    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code,
                                              local_files_only=not allow_download)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def resolve_model_dir(source: str, allow_download: bool = False, what: str = "base model",
                      fix: str = "download it first or set base_model.allow_download: true") -> Path:
    """A local directory holding the model: the path itself, or its snapshot in the HF cache.
    what and fix name the model and the remedy in the error when it is neither."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # heavy: only for models outside data/

    try:
        return Path(snapshot_download(source, local_files_only=not allow_download))
    except Exception as err:  # noqa: BLE001 - re-raised with the fix the user needs
        raise FileNotFoundError(
            f"{what} {source!r} is neither a local directory nor in the Hugging Face cache; {fix}"
        ) from err


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_same_vocabulary(base_dir: str | Path, model_dir: str | Path, what: str = "value backbone") -> None:
    """Refuse a model that would read the base model's token ids as other tokens: its tokenizer's
    vocabulary must be the base tokenizer's, or, for a folder without a tokenizer, its config's
    vocab_size the base tokenizer's size (or the base config's, when that pads the embeddings).
    Hidden sizes and depth may differ: only the token ids are shared."""
    base = load_tokenizer(base_dir)
    if any(Path(model_dir, name).exists() for name in TOKENIZER_FILES):
        ours, theirs = base.get_vocab(), load_tokenizer(model_dir).get_vocab()
        if ours == theirs:
            return
        by_id = [{i: t for t, i in vocab.items()} for vocab in (ours, theirs)]
        first = min(i for i in set(by_id[0]) | set(by_id[1]) if by_id[0].get(i) != by_id[1].get(i))
        raise ValueError(
            f"{what} {model_dir} does not share the base model's tokenizer ({base_dir}): token id {first} is "
            f"{by_id[1].get(first)!r} there and {by_id[0].get(first)!r} in the base tokenizer "
            f"({len(theirs)} vs {len(ours)} tokens); a value model must read the base model's token ids")
    from transformers import AutoConfig  # heavy: only when a model is checked

    size = AutoConfig.from_pretrained(str(model_dir), local_files_only=True).vocab_size
    allowed = {len(base), AutoConfig.from_pretrained(str(base_dir), local_files_only=True).vocab_size}
    if size not in allowed:
        raise ValueError(
            f"{what} {model_dir} has no tokenizer and a vocab_size of {size}, but the base model's tokenizer "
            f"({base_dir}) has {len(base)} tokens; a value model must read the base model's token ids")


def hash_file(path: str | Path, digest=None):
    """A hashlib digest (sha256 unless given) updated with the file's bytes, read in 1 MiB chunks."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def weights_sha256(directory: str | Path) -> str:
    """sha256 over the safetensors weight files of a model directory, in name order."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}; only safetensors are loaded")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        hash_file(f, digest)
    return digest.hexdigest()


MANIFEST_NAME = "vas_manifest.json"


def write_manifest(directory: str | Path, manifest: dict) -> None:
    Path(directory, MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(base_dir: str | Path) -> dict:
    path = Path(base_dir, MANIFEST_NAME)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize the base_model asset first")
    return json.loads(path.read_text())


def base_model_dir(base_dir: str | Path) -> Path:
    """Where the frozen base model's weights are: the asset folder, or the pinned model."""
    manifest = read_manifest(base_dir)
    if manifest["embedded"]:
        return Path(base_dir)
    return resolve_model_dir(manifest["source"], manifest.get("allow_download", False))


def load_frozen_base(base_dir: str | Path, device: str = "cpu"):
    """Load the base model recorded by the base_model asset, refusing it if its weights changed."""
    manifest = read_manifest(base_dir)
    model_dir = base_model_dir(base_dir)
    sha = weights_sha256(model_dir)
    if sha != manifest["weights_sha256"]:
        raise RuntimeError(
            f"base model weights in {model_dir} changed since they were pinned "
            f"(sha256 {sha[:12]} != {manifest['weights_sha256'][:12]}); the base model is frozen: "
            "re-materialize base_model to pin the new weights"
        )
    model, tokenizer = load_causal_lm(model_dir, trust_remote_code=manifest.get("trust_remote_code", False),
                                      device=device)
    model.weights_sha256 = sha      # its pin: value models trained on its own body share it (ValueModel.load)
    return model, tokenizer, manifest
