"""One set of defaults: params.yaml's `default` profile. The config dataclasses of models/ declare
the same values (so Python callers get what the pipeline runs), config_from refuses keys that
configure nothing, and `vas generate`'s decode defaults are the decoder's own."""

import dataclasses

import pytest

from models.data.corpus import CorpusConfig
from models.data.preferences import PairSynthesisConfig
from models.data.rollouts import RolloutConfig
from models.data.validation import ValidationRules
from models.decoding.generate import decode_configs
from models.decoding.vas import VASConfig
from models.environment import Environment, read_env
from models.evaluation.dpo import DPOTrainConfig
from models.evaluation.evaluation import EvalConfig
from models.evaluation.value_error import ValueErrorConfig
from models.lm.lm import TinyLMConfig
from models.lm.sampling import SamplingConfig
from models.profiles import config_from, load_profile
from models.rewards.reward_model import RewardTrainConfig
from models.value.value_training import ValueTrainConfig

SECTIONS = [(CorpusConfig, "corpus"), (TinyLMConfig, "base_model"), (PairSynthesisConfig, "preference_pairs"),
            (RewardTrainConfig, "reward_models"), (RolloutConfig, "rollouts"), (ValueTrainConfig, "value_models"),
            (DPOTrainConfig, "dpo"), (EvalConfig, "evaluation"), (ValueErrorConfig, "value_error"),
            (ValidationRules, "validation")]


def _default(field: dataclasses.Field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


@pytest.mark.parametrize("cls,section", SECTIONS, ids=[s for _, s in SECTIONS])
def test_dataclass_defaults_are_the_default_profile(cls, section):
    default = load_profile("default")
    params = {"seed": default["seed"], **default[section]}
    checked = 0
    for field in dataclasses.fields(cls):
        if field.name in params:
            want = params[field.name]
            want = tuple(want) if isinstance(want, list) else want
            assert _default(field) == want, f"{cls.__name__}.{field.name} != params.yaml default.{section}.{field.name}"
            checked += 1
    assert checked, f"no field of {cls.__name__} is in params.yaml's {section}"


def test_decoder_defaults_are_what_the_pipeline_evaluates():
    default = load_profile("default")
    assert VASConfig.top_k == default["evaluation"]["top_k"]
    assert VASConfig.min_p == default["evaluation"]["min_p"]
    assert SamplingConfig.max_new_tokens == default["rollouts"]["max_new_tokens"]
    assert SamplingConfig.temperature == default["rollouts"]["temperature"]
    # value_error's MC targets run episodes as long as the rollouts' (it takes rollouts.max_new_tokens)
    assert ValueErrorConfig.max_new_tokens == default["rollouts"]["max_new_tokens"]
    assert "max_new_tokens" not in default["value_error"]


def test_decode_configs_keep_the_decoders_defaults_unless_given():
    sampling, vas = decode_configs(seed=None, top_k=None, temperature=None, max_new_tokens=None, soft=None)
    assert sampling == SamplingConfig() and vas == VASConfig()
    sampling, vas = decode_configs(seed=3, top_k=5, soft=False)
    assert (sampling.seed, vas.top_k, vas.soft) == (3, 5, False)
    with pytest.raises(TypeError, match="top_kk"):
        decode_configs(top_kk=5)


def test_config_from_rejects_an_unknown_key_by_its_path():
    params = {"seed": 0, "train_steps": 7, "lerning_rate": 0.1}
    with pytest.raises(KeyError, match=r"value_models\.lerning_rate"):
        config_from(ValueTrainConfig, params, "value_models")


def test_config_from_builds_known_keys_and_skips_ignored_ones():
    params = {"seed": 2, "train_steps": 7, "prefix_lengths": [1, 3], "backbone_init": "base"}
    config = config_from(ValueTrainConfig, params, "value_models", ignore=("backbone_init",), lam=0.5)
    assert (config.seed, config.train_steps, config.prefix_lengths, config.lam) == (2, 7, (1, 3), 0.5)


def test_every_vas_variable_is_read_through_one_object(monkeypatch):
    assert read_env({}) == Environment()
    monkeypatch.setenv("VAS_PROFILE", "smoke")
    monkeypatch.setenv("VAS_INCOMING_SETTLE_SECONDS", "2.5")
    monkeypatch.setenv("VAS_REQUIRE_BROWSER", "1")
    monkeypatch.setenv("VAS_REQUIRE_LLAMACPP", "1")
    env = read_env()
    assert (env.profile, env.incoming_settle_seconds, env.require_browser, env.require_llamacpp) == \
        ("smoke", 2.5, True, True)


def test_a_profile_override_with_a_key_default_lacks_is_an_error(tmp_path):
    from models.profiles import load_profile

    params = tmp_path / "params.yaml"
    params.write_text("default:\n  seed: 0\n  prompts: {n_train: 4, n_eval: 2}\n  reward_models: {sources: {}}\n"
                      "mine:\n  prompts: {n_trian: 8}\n"
                      "ok:\n  prompts: {n_train: 8}\n  reward_models: {sources: {positivity: /models/rm}}\n")
    with pytest.raises(KeyError, match=r"prompts\.n_trian"):
        load_profile("mine", params)
    ok = load_profile("ok", params)      # free-form maps (empty in default) take any key
    assert ok["prompts"] == {"n_train": 8, "n_eval": 2}
    assert ok["reward_models"]["sources"] == {"positivity": "/models/rm"}


def test_vas_params_file_names_the_profiles_file(monkeypatch, tmp_path):
    from models.profiles import PROJECT_ROOT, active_params_file, load_profile

    assert active_params_file() == PROJECT_ROOT / "params.yaml"
    mine = tmp_path / "my-params.yaml"
    mine.write_text("default:\n  seed: 0\n  prompts: {n_train: 4, n_eval: 2}\nmine:\n  prompts: {n_train: 8}\n")
    monkeypatch.setenv("VAS_PARAMS_FILE", str(mine))
    assert active_params_file() == mine
    assert load_profile("mine")["prompts"] == {"n_train": 8, "n_eval": 2}
    monkeypatch.setenv("VAS_PARAMS_FILE", "relative/profiles.yaml")              # against the project root
    assert active_params_file() == PROJECT_ROOT / "relative" / "profiles.yaml"
    with pytest.raises(FileNotFoundError, match="params file .*relative/profiles.yaml does not exist"):
        load_profile("mine")


def test_the_real_profile_names_the_gguf_the_makefile_takes_out_of_the_pinned_wheel():
    """One file, named in three places: params.yaml's real profile, models/lm/real_model.py and the
    Makefile target that fetches it (with the hash that pins it)."""
    import re

    from models.lm.real_model import GGUF_SHA256, PINNED_GGUF
    from models.profiles import PROJECT_ROOT, load_profile

    base = load_profile("real")["base_model"]
    assert (base["source"], base["gguf_sha256"]) == (PINNED_GGUF, GGUF_SHA256)
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    sources = re.search(r"^SOURCES := (\S+)$", makefile, re.M).group(1)
    target = re.search(r"^SMOLLM2_GGUF := (\S+)$", makefile, re.M).group(1).replace("$(SOURCES)", sources)
    assert target == PINNED_GGUF
