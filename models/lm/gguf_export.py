"""Export a saved Hugging Face GPT-2 folder (safetensors, byte-level BPE tokenizer) to one GGUF file
for llama.cpp.

llama.cpp's own converter identifies a tokenizer by hashing how it splits a fixed text and does not
recognise one trained here, so this writes the file directly with the `gguf` package's GGUFWriter:
architecture gpt2, the byte-level BPE vocabulary, merges and token types, pre-tokenizer `gpt-2`,
bos/eos ids and the context length. Every tensor is f32 (the models are small, and served
log-probabilities must match the Hugging Face forward pass). The folder's files are read as they are
(config.json, tokenizer.json, tokenizer_config.json, *.safetensors): no model code runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.artifacts import atomic_path

# HF GPT-2 runs its linear layers as Conv1D, whose weight is stored (in, out); GGUF/ggml, like
# nn.Linear, wants (out, in): these four are transposed.
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Buffers of older checkpoints (the causal mask), not weights.
BUFFERS = (".attn.bias", ".attn.masked_bias")
# llama.cpp's GPT-2 graph: tanh-approximated GELU, attention scaled by 1/sqrt(head size) only.
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


class GGUFExportError(ValueError):
    """The model folder is not one llama.cpp's gpt2 architecture can run as it is."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a saved Hugging Face model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def check_gpt2_config(config: dict) -> None:
    """Refuse what llama.cpp's gpt2 graph would compute differently from transformers."""
    if config.get("model_type") != "gpt2":
        raise GGUFExportError(f"GGUF export handles GPT-2 models only (model_type 'gpt2'), "
                              f"this one is {config.get('model_type')!r}")
    activation = config.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise GGUFExportError(f"activation_function {activation!r}: llama.cpp's gpt2 uses the tanh GELU "
                              f"({' or '.join(GPT2_ACTIVATIONS)})")
    for flag, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if config.get(flag, wanted) != wanted:
            raise GGUFExportError(f"{flag}={config[flag]} is not supported by llama.cpp's gpt2 (needs {wanted})")


def check_byte_level_bpe(tokenizer: dict) -> None:
    """Refuse tokenizers llama.cpp's `gpt2` vocabulary with the `gpt-2` pre-tokenizer would split differently."""
    model, pre = tokenizer.get("model") or {}, tokenizer.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model {model.get('type')!r} is not BPE")
    if pre.get("type") != "ByteLevel":
        problems.append(f"pre-tokenizer {pre.get('type')!r} is not ByteLevel")
    elif pre.get("add_prefix_space") or not pre.get("use_regex", True):
        problems.append("the ByteLevel pre-tokenizer must use GPT-2's regex and add no prefix space")
    if tokenizer.get("normalizer") is not None:
        problems.append("it has a normalizer")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("byte_fallback") \
            or model.get("ignore_merges"):
        problems.append("its BPE uses subword prefixes/suffixes, byte fallback or ignore_merges")
    if problems:
        raise GGUFExportError("GGUF export needs a GPT-2 style byte-level BPE tokenizer: " + "; ".join(problems))


def vocabulary(tokenizer: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (in byte-level form, "Ġ" for a space, as llama.cpp's gpt2 vocab expects) and
    their GGUF types; ids the embedding has beyond the tokenizer become unused [PAD<i>] tokens."""
    import gguf

    by_id = {i: token for token, i in tokenizer["model"]["vocab"].items()}
    types = {}
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if len(by_id) > vocab_size or max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)} but the model's embedding only {vocab_size} rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [int(types.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED))
                   for i in range(vocab_size)]
    return tokens, token_types


def merges(tokenizer: dict) -> list[str]:
    """BPE merges as "left right" strings (tokenizers >= 0.20 saves them as [left, right] pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]


def _adds_bos(tokenizer: dict, bos: str | None) -> bool:
    """Whether encoding puts the BOS token first (GPT-2's tokenizer does not)."""
    post = tokenizer.get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in processors:
        single = proc.get("single") or []
        if proc.get("type") == "TemplateProcessing" and single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"] == bos
    return False


def special_ids(tokenizer_config: dict, config: dict, tokens: list[str]) -> dict[str, int]:
    """bos/eos (and pad, when there is one) ids, by the tokenizer's token names, else config.json's ids."""
    ids = {}
    for role in ("bos", "eos", "pad"):
        name = tokenizer_config.get(f"{role}_token")
        name = name.get("content") if isinstance(name, dict) else name
        token_id = tokens.index(name) if name in tokens else config.get(f"{role}_token_id")
        if token_id is not None:
            ids[role] = int(token_id)
    for role in ("bos", "eos"):
        if role not in ids:
            raise GGUFExportError(f"no {role} token in tokenizer_config.json or config.json")
    return ids


def gguf_tensors(model_dir: Path, n_layer: int):
    """(GGUF name, f32 array) for every weight in the folder's safetensors files, Conv1D weights transposed."""
    import gguf
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}; only safetensors are read")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, n_layer)
    for path in files:
        with safe_open(str(path), framework="np") as f:
            for hf_name in f.keys():
                if hf_name.endswith(BUFFERS):
                    continue
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GGUFExportError(f"{path.name}: tensor {hf_name!r} has no place in llama.cpp's gpt2")
                array = f.get_tensor(hf_name).astype(np.float32)
                if hf_name.endswith(CONV1D):
                    array = array.T
                yield name, np.ascontiguousarray(array)


def export_gguf(model_dir: str | Path, out: str | Path) -> dict:
    """Write the GPT-2 in model_dir to the GGUF file out (atomically). Returns a summary of what was written."""
    import gguf

    model_dir, out = Path(model_dir), Path(out)
    config = _read_json(model_dir / "config.json")
    tokenizer = _read_json(model_dir / "tokenizer.json")
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    check_gpt2_config(config)
    check_byte_level_bpe(tokenizer)
    n_embd, n_layer = config["n_embd"], config["n_layer"]
    tokens, token_types = vocabulary(tokenizer, config["vocab_size"])
    ids = special_ids(tokenizer_config, config, tokens)
    tensors = dict(gguf_tensors(model_dir, n_layer))
    if tensors.get("output.weight") is not None and np.array_equal(tensors["output.weight"], tensors["token_embd.weight"]):
        del tensors["output.weight"]        # tied: llama.cpp's gpt2 reuses token_embd when output is absent

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        writer.add_name(model_dir.resolve().name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(config["n_positions"])
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(config.get("n_inner") or 4 * n_embd)
        writer.add_block_count(n_layer)
        writer.add_head_count(config["n_head"])
        writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(merges(tokenizer))
        writer.add_bos_token_id(ids["bos"])
        writer.add_eos_token_id(ids["eos"])
        if "pad" in ids:
            writer.add_pad_token_id(ids["pad"])
        writer.add_add_bos_token(_adds_bos(tokenizer, tokens[ids["bos"]]))
        writer.add_add_eos_token(False)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"path": str(out), "bytes": out.stat().st_size, "n_tensors": len(tensors), "n_vocab": len(tokens),
            "n_merges": len(merges(tokenizer)), "context_length": config["n_positions"], **ids}
