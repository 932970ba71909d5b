import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.environment import set_env  # noqa: E402 - needs the project on sys.path

os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
set_env(profile="smoke")    # every test runs on the smoke profile unless it says otherwise


def pytest_collection_modifyitems(items):
    """A test on the materialized smoke world is an integration test (`make test-fast` skips those);
    one that uses a llama.cpp server is marked llamacpp."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "smoke_world" in fixtures:
            item.add_marker(pytest.mark.integration)
        if "llamacpp" in fixtures:
            item.add_marker(pytest.mark.llamacpp)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models: one intra-op thread is as fast alone and several times faster when other
    processes share the cores (OpenMP threads then wait on each other); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_gpt2():
    """Factory of small random GPT-2 LMs (seeded, in eval mode) for unit tests that need a model but
    not a trained one. dropout=False zeroes GPT-2's dropout probabilities in the config; True keeps
    GPT-2's defaults (a test may check that the value model turns them off)."""

    def build(vocab_size: int, seed: int = 0, *, n_layer: int = 2, n_embd: int = 32, n_head: int = 2,
              n_positions: int = 64, eos: int = 0, pad: int | None = 1, init: float = 0.02, dropout: bool = False):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel  # heavy: only for tests that build a model

        torch.manual_seed(seed)
        no_dropout = {} if dropout else dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                            n_head=n_head, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
                            initializer_range=init, **no_dropout)
        return GPT2LMHeadModel(config).eval()

    return build


@pytest.fixture(scope="session")
def tiny_llama():
    """Factory of small random Llama models (seeded, in eval mode): RoPE, grouped-query attention
    (n_kv_head < n_head), the transformers DynamicCache. head="classifier" gives a one-output
    LlamaForSequenceClassification (a reward model), "causal" a LlamaForCausalLM."""

    def build(vocab_size: int, seed: int = 0, *, hidden: int = 32, n_layer: int = 2, n_head: int = 4,
              n_kv_head: int = 2, intermediate: int = 64, eos: int = 0, pad: int | None = 1, init: float = 0.02,
              head: str = "causal"):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # heavy

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layer,
                             num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                             intermediate_size=intermediate, max_position_embeddings=256, bos_token_id=eos,
                             eos_token_id=eos, pad_token_id=pad, initializer_range=init, num_labels=1)
        model_class = {"causal": LlamaForCausalLM, "classifier": LlamaForSequenceClassification}[head]
        return model_class(config).eval()

    return build


@pytest.fixture(scope="session")
def word_tokenizer():
    """Factory of whitespace word-level tokenizers over a given vocabulary (token -> id), so a
    test writes its texts as the very tokens its tiny model sees."""

    def build(vocab: dict[str, int], *, eos: str = "<eos>", pad: str = "<pad>", unk: str | None = None,
              bos: str | None = None, padding_side: str = "right"):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast  # heavy: only for tests that need it

        tok = Tokenizer(models.WordLevel(vocab, unk_token=unk or pad))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                       padding_side=padding_side)

    return build


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory):
    """The whole graph materialized once on the smoke profile into a fresh data folder."""
    import dagster as dg

    from assets.resources import VasSettings, build_resources
    from assets.rollouts import all_shards_tags
    from orchestration.definitions import ALL_ASSETS, ALL_CHECKS

    data_dir = tmp_path_factory.mktemp("smoke-data")
    settings = VasSettings(profile="smoke", data_dir=str(data_dir), device="cpu")
    resources = build_resources(settings)
    instance = dg.DagsterInstance.ephemeral()
    # As `vas run`: every shard of rollout_shards (its partitions) in one step of the run.
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=resources, instance=instance, tags=all_shards_tags())
    return {"result": result, "settings": settings, "resources": resources, "instance": instance,
            "data_dir": data_dir}


@pytest.fixture(scope="session")
def llamacpp(tmp_path_factory):
    """Factory of real llama.cpp servers on loopback (tests/llamacpp.py): llamacpp(model_dir) exports
    that saved Hugging Face GPT-2 folder to GGUF and serves it with llama-cpp-python's OpenAI-compatible
    server, llamacpp(file.gguf) serves that file as it is (a 512-token context), once per model for the
    session, and stops them all at the end. Skips without .venv-llamacpp (`make llamacpp`), fails
    instead under VAS_REQUIRE_LLAMACPP=1."""
    from llamacpp import require_llamacpp, serve_gguf, serve_model_dir

    require_llamacpp()
    servers = {}

    def serve(model, alias: str = "base"):
        key = (str(Path(model).resolve()), alias)
        if key not in servers:
            tmp = tmp_path_factory.mktemp("llamacpp")
            servers[key] = serve_gguf(Path(model), tmp, n_ctx=512, alias=alias) if str(model).endswith(".gguf") \
                else serve_model_dir(Path(model), tmp, alias)
        return servers[key]

    yield serve
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def bpe_gpt2_dir(tmp_path_factory, tiny_gpt2):
    """A small random GPT-2 with a byte-level BPE tokenizer of the project's kind (models.lm.lm), saved
    in Hugging Face format (tests/llamacpp.py: save_tiny_bpe_gpt2)."""
    from llamacpp import save_tiny_bpe_gpt2

    return save_tiny_bpe_gpt2(tiny_gpt2, tmp_path_factory.mktemp("tiny-bpe-gpt2") / "model")


@pytest.fixture(scope="session")
def llamacpp_gpt2(bpe_gpt2_dir, llamacpp):
    """bpe_gpt2_dir served by llama.cpp: {"model_dir", "server"}."""
    return {"model_dir": bpe_gpt2_dir, "server": llamacpp(bpe_gpt2_dir)}


@pytest.fixture(scope="session")
def steering_world(tiny_gpt2):
    """A tiny random base with a BPE tokenizer and value models of every kind the server steers with:
    a scalar and a distributional model on backbones of their own, and a qhead on the base's own body."""
    import copy
    import types

    from random_heads import randomized

    from models.data.corpus import CorpusConfig, generate_corpus
    from models.lm.lm import train_tokenizer
    from models.value.distributional import Support
    from models.value.value_model import ValueModel

    texts = generate_corpus(CorpusConfig(n_reviews=200, seed=0)).text.tolist()
    tokenizer = train_tokenizer(texts, 300)
    base = tiny_gpt2(len(tokenizer), seed=0, init=0.15, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    own = tiny_gpt2(len(tokenizer), seed=1, init=0.15, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    models = {
        "scalar": randomized(ValueModel(copy.deepcopy(own.transformer), "scalar"), 1),
        "dist": randomized(ValueModel(copy.deepcopy(own.transformer), "distributional",
                                      Support(v_min=-2.0, v_max=2.0, n_bins=9)), 2, std=1.0),
        "shared": randomized(ValueModel(base.transformer, "qhead"), 3),
    }
    return types.SimpleNamespace(base=base, tokenizer=tokenizer, models=models)
