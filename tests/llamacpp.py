"""A real llama.cpp server on loopback for the tests: llama-cpp-python's OpenAI-compatible server
(`python -m llama_cpp.server`) from its own venv, .venv-llamacpp (`make llamacpp`), serving a GGUF
written by models.lm.gguf_export.

Tests use the conftest fixture `llamacpp` (a factory: llamacpp(model_dir) exports that Hugging Face
GPT-2 folder and serves it, once per folder and session) or `llamacpp_gpt2` (a small random GPT-2
with a byte-level BPE tokenizer of the project's kind, already served). Without .venv-llamacpp they
skip, unless VAS_REQUIRE_LLAMACPP=1 (CI), where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from models.environment import read_env

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_VENV = ROOT / ".venv-llamacpp"
LLAMACPP_PYTHON = LLAMACPP_VENV / "bin" / "python"
START_TIMEOUT_S = 120
GGML_TYPE_F32 = 0   # llama.cpp's KV cache type ids: f32 keys and values, not the default f16


def require_llamacpp() -> None:
    """Skip without a finished .venv-llamacpp, or fail when CI said it must be there (VAS_REQUIRE_LLAMACPP=1)."""
    if LLAMACPP_PYTHON.exists() and (LLAMACPP_VENV / ".installed").exists():   # `make llamacpp` got to its end
        return
    import pytest  # here, not at the top: bench/serve.py imports this module, and `make run` installs no pytest

    reason = "llama.cpp server tests need .venv-llamacpp with llama-cpp-python[server] (build it with `make llamacpp`)"
    if read_env().require_llamacpp:
        pytest.fail(reason + "; VAS_REQUIRE_LLAMACPP=1 makes that an error", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LlamaCppServer:
    """One `python -m llama_cpp.server` process serving `model` (a GGUF file) on 127.0.0.1."""

    model: Path
    log_path: Path
    n_ctx: int
    alias: str = "base"
    seed: int = 0
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # One thread (2 shared cores; also one summation order), logits kept for every position
        # (the completions endpoint needs them for logprobs), f32 KV cache so that attention is
        # computed at the precision of the f32 weights.
        settings = {"model": self.model, "model_alias": self.alias, "host": "127.0.0.1", "port": self.port,
                    "n_ctx": self.n_ctx, "seed": self.seed, "n_threads": 1, "n_threads_batch": 1,
                    "logits_all": True, "type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32}
        return [str(LLAMACPP_PYTHON), "-m", "llama_cpp.server",
                *[arg for key, value in settings.items() for arg in (f"--{key}", str(value))]]

    def start(self) -> None:
        self.port = self.port or free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["OMP_NUM_THREADS"] = "1"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until /v1/models answers; the process exiting first is an error with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                self.get("/v1/models")
                return
            time.sleep(0.25)
        raise TimeoutError(f"llama.cpp server did not answer {self.url}/v1/models in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)   # its own session: the group id is its pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
                break
        self.proc = None

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.load(resp)

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            return json.load(resp)

    def tokenize(self, text: str) -> list[int]:
        """Token ids the served model gives text (llama-cpp-python's extra endpoint)."""
        return self.post("/extras/tokenize", {"input": text})["tokens"]


def serve_gguf(gguf_path: Path, tmp: Path, n_ctx: int, alias: str = "base") -> LlamaCppServer:
    """Start a server on gguf_path and wait until it answers (stop it with .stop())."""
    require_llamacpp()
    server = LlamaCppServer(model=gguf_path, log_path=tmp / f"llamacpp-{gguf_path.stem}.log", n_ctx=n_ctx,
                            alias=alias)
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def serve_model_dir(model_dir: Path, tmp: Path, alias: str = "base") -> LlamaCppServer:
    """Export a saved Hugging Face GPT-2 folder to GGUF in tmp and serve it over its whole context."""
    from models.lm.gguf_export import export_gguf

    require_llamacpp()
    written = export_gguf(model_dir, tmp / f"{Path(model_dir).name}.gguf")
    return serve_gguf(Path(written["path"]), tmp, n_ctx=written["context_length"], alias=alias)


# Texts the tiny tokenizer is trained on besides generated reviews, so that its vocabulary has merged
# multi-byte tokens ("é", "✓" as whole tokens) as well as the single bytes under them.
MULTIBYTE_TEXTS = ["café crème, naïve ✓", "déjà vu ✓✓", "The café was great ✓ and the crème brûlée too."] * 20


def save_tiny_bpe_gpt2(tiny_gpt2, directory: Path, seed: int = 0, init: float = 0.2) -> Path:
    """A random GPT-2 with a byte-level BPE tokenizer trained like the default world's
    (models.lm.lm.train_tokenizer) on generated reviews, saved as the base_model asset saves it.
    init 0.2 (GPT-2 uses 0.02) makes the next-token distribution peaked, so the top-k is well
    separated from the tokens below it."""
    import random

    from models.data.corpus import review
    from models.lm.lm import quiet_loading, save_pretrained, train_tokenizer

    rng = random.Random(seed)
    texts = [review(rng)[0] for _ in range(400)] + MULTIBYTE_TEXTS
    tokenizer = train_tokenizer(texts, vocab_size=400)
    model = tiny_gpt2(len(tokenizer), seed, n_positions=64, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
                      init=init)
    quiet_loading()     # no progress bar per save
    save_pretrained(model, tokenizer, directory)
    return directory
