"""Integration: the whole smoke graph on the user's own Llama-family models and data. A tiny Llama
base with its own BPE tokenizer (base_model.source), a smaller Llama value backbone of the same
vocabulary (value_models.backbone), a local Llama sequence classifier as the positivity reward
(reward_models.sources; conciseness is trained on the Llama base), imported prompts and pairs."""

import json
import re

import dagster as dg
import pandas as pd
import pytest
import yaml

from assets.resources import VasSettings, build_resources
from models.data.corpus import CorpusConfig, generate_corpus, generate_openings
from models.lm.lm import load_tokenizer, save_pretrained, train_tokenizer, weights_sha256
from models.profiles import PARAMS_FILE
from models.value.value_store import META_FILE, find_value_models, value_model_folder
from orchestration.definitions import ALL_ASSETS, ALL_CHECKS

pytestmark = pytest.mark.integration


def user_files(tmp_path, tiny_llama) -> dict:
    """The user's models and data, written locally: nothing is downloaded."""
    tokenizer = train_tokenizer(generate_corpus(CorpusConfig(n_reviews=300, seed=3)).text.tolist(), 300)
    ids = dict(eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    small = dict(hidden=16, n_layer=1, n_head=2, n_kv_head=1, intermediate=32)
    paths = {name: tmp_path / name for name in ("base", "backbone", "positivity_rm")}
    save_pretrained(tiny_llama(len(tokenizer), seed=0, **ids), tokenizer, paths["base"])
    save_pretrained(tiny_llama(len(tokenizer), seed=1, **small, **ids), tokenizer, paths["backbone"])
    save_pretrained(tiny_llama(len(tokenizer), seed=2, head="classifier", init=0.2, **small, **ids), tokenizer,
                    paths["positivity_rm"])
    paths["prompts"] = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt": generate_openings(24, 4)}).to_csv(paths["prompts"], index=False)
    pairs = [{"prompt": f"I bought this kettle {i}", "chosen": f"It is great {i}.",
              "rejected": f"It is awful and broke after a week {i}.",
              "attribute": "positivity" if i % 2 else "conciseness"} for i in range(32)]
    paths["pairs"] = tmp_path / "pairs.jsonl"
    pd.DataFrame(pairs).to_json(paths["pairs"], orient="records", lines=True)
    return paths


def test_llama_base_backbone_and_classifier_reward_through_the_smoke_graph(tmp_path, tiny_llama):
    paths = user_files(tmp_path, tiny_llama)
    params = yaml.safe_load(PARAMS_FILE.read_text())
    smoke = params["smoke"]
    smoke["base_model"]["source"] = str(paths["base"])
    smoke["prompts"]["source"] = str(paths["prompts"])
    smoke["preference_pairs"]["source"] = str(paths["pairs"])
    smoke["reward_models"]["sources"] = {"positivity": str(paths["positivity_rm"])}
    smoke["value_models"]["backbone"] = str(paths["backbone"])
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))

    data_dir = tmp_path / "data"
    settings = VasSettings(profile="smoke", data_dir=str(data_dir), device="cpu", params_file=str(params_file))

    def materialize(*selection):
        result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(settings),
                                selection=dg.AssetSelection.assets(*selection) if selection else None,
                                instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
        failures = [str(e.step_failure_data.error) for e in result.all_events if e.is_step_failure]
        assert result.success, failures
        return {e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
                for e in result.get_asset_materialization_events()}

    events = materialize()

    manifest = json.loads((data_dir / "base_model" / "vas_manifest.json").read_text())
    assert manifest["weights_sha256"] == weights_sha256(paths["base"])        # pinned, not trained
    assert events["reward_models"]["positivity/heldout_accuracy"] is not None
    assert (data_dir / "reward_models" / "conciseness" / "model.safetensors").exists()   # trained on the Llama base

    # Every value model is built on the given backbone: its hidden size, its weights' sha256.
    backbone_sha = weights_sha256(paths["backbone"])
    names = sorted(p.name for p in (data_dir / "value_models").iterdir() if (p / "value_config.json").exists())
    assert names and {"positivity", "conciseness"} <= set(names)
    for name in names:
        config = json.loads((data_dir / "value_models" / name / "value_config.json").read_text())
        if json.loads((data_dir / "value_models" / name / META_FILE).read_text())["parameterization"] == "distilled":
            # The distilled head reads the frozen base model's own hidden states, not the value backbone's.
            assert config["backbone_frozen"] and config["init_weights_sha256"] == manifest["weights_sha256"]
            continue
        assert config["hidden_size"] == 16 and config["init_weights_sha256"] == backbone_sha, name
        assert config["init_from"] == str(paths["backbone"])
        assert json.loads((data_dir / "value_models" / name / META_FILE).read_text())["base_weights_sha256"] \
            == manifest["weights_sha256"]
    value_meta = events["value_models"]
    started_from = value_meta["backbone_weights_sha256"].value
    assert {sha for name, sha in started_from.items() if not name.endswith(".distilled")} == {backbone_sha}
    assert started_from["positivity.distilled"] == manifest["weights_sha256"]
    assert value_meta["params"].value["backbone"] == str(paths["backbone"])
    assert value_meta["inputs"].value[f"source:{paths['backbone']}"] not in ("", "unhashed")

    # Evaluation ran every method on the Llama base with the Llama value models.
    summary = pd.read_parquet(data_dir / "eval" / "summary.parquet")
    assert len(summary) and summary.method.str.contains("vas").any()
    assert (data_dir / "report").exists()

    # The backbone's folder is part of the re-use key: unchanged, the value models are re-used;
    # other weights in the same folder retrain them.
    assert "reused_from_run" in materialize("value_models")["value_models"]
    tokenizer = load_tokenizer(paths["backbone"])
    other = tiny_llama(len(tokenizer), seed=5, hidden=16, n_layer=1, n_head=2, n_kv_head=1, intermediate=32)
    save_pretrained(other, tokenizer, paths["backbone"])
    retrained = materialize("value_models")["value_models"]
    assert "reused_from_run" not in retrained
    retrained_from = {sha for name, sha in retrained["backbone_weights_sha256"].value.items()
                      if not name.endswith(".distilled")}         # the distilled head stays on the base
    assert retrained_from == {weights_sha256(paths["backbone"])} != {backbone_sha}


def test_the_real_profiles_paths_through_the_smoke_graph(tmp_path, tiny_llama):
    """What `VAS_PROFILE=real` runs, on a tiny Llama: prompts cut from the human-rated snippets, a
    reward model on the base's first layer, a value backbone copied from it, value heads on the
    frozen base's own hidden states (saved by reference, sharing the base at decode time), and the
    DPO baseline skipped with its reason."""
    from models.data.human_snippets import SDIST_NAME
    from models.profiles import PROJECT_ROOT

    paths = user_files(tmp_path, tiny_llama)
    params = yaml.safe_load(PARAMS_FILE.read_text())
    smoke = params["smoke"]
    smoke["base_model"]["source"] = str(paths["base"])
    smoke["prompts"]["snippets"] = str(PROJECT_ROOT / ".cache" / "sources" / SDIST_NAME)
    smoke["preference_pairs"]["snippet_pairs"] = {"positivity": 40}
    smoke["reward_models"]["base_layers"] = 1
    smoke["value_backbone"]["base_layers"] = 1
    smoke["value_models"].update(backbone_init="base", freeze_backbone=True, default_parameterization="distilled",
                                 extra_human_continuations=30)
    smoke["dpo"]["skip"] = "too slow for this test"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    data_dir = tmp_path / "data"
    settings = VasSettings(profile="smoke", data_dir=str(data_dir), device="cpu", params_file=str(params_file))
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(settings),
                            instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert result.success, [str(e.step_failure_data.error) for e in result.all_events if e.is_step_failure]
    events = {e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
              for e in result.get_asset_materialization_events()}

    prompts = pd.read_parquet(data_dir / "prompts" / "prompts.parquet")
    assert (prompts.split == "eval").sum() == smoke["prompts"]["n_eval"] and prompts.human_rating.notna().all()
    assert set(prompts.corpus) == {"movie", "amazon"}
    assert all(s.startswith(p) for p, s in zip(prompts.prompt, prompts.snippet))
    assert 0.3 < events["prompts"]["gold_human_spearman"].value < 0.6
    # Pairs of human continuations beside the sampled ones, never from an eval prompt's snippet;
    # the reward's held-out accuracy stays the one on the base model's completion pairs.
    pairs = pd.read_parquet(data_dir / "preference_pairs" / "pairs.parquet")
    human = pairs[pairs.origin == "human_snippets"]
    assert 35 <= len(human) <= 40 and set(human.attribute) == {"positivity"}
    assert (pairs.origin == "sampled").sum() == len(pairs) - len(human)
    usable = pd.read_parquet(data_dir / "prompts" / "human_snippets.parquet")
    eval_rows = usable[usable.split == "eval"]
    assert set(eval_rows.snippet_id) == set(prompts.prompt_id[prompts.split == "eval"])
    assert not set(human.prompt_id) & set(eval_rows.snippet_id)
    assert not set(human.chosen) & set(eval_rows.rest) and not set(human.rejected) & set(eval_rows.rest)
    rewards = events["reward_models"]
    assert 0 <= rewards["positivity/heldout_accuracy_human_snippets"].value <= 1
    sampled_held = rewards["positivity/n_eval_pairs"].value
    assert 0 < sampled_held < (pairs[pairs.attribute == "positivity"].origin == "sampled").sum()
    heldout = json.loads((data_dir / "reward_models" / "heldout.json").read_text())
    assert heldout["positivity"]["pairs_by_origin"] == pairs[pairs.attribute == "positivity"].origin.value_counts().to_dict()
    assert heldout["positivity"]["heldout_accuracy"] == rewards["positivity/heldout_accuracy"].value
    assert re.search(r"Learned rewards .* positivity [01]\.\d{3} \(the gold itself: [01]\.\d{3}\), from "
                     rf"{len(human)} human-continuation and \d+ sampled pairs\.", (data_dir / "report" / "report.md").read_text())
    for folder in ("reward_models/positivity", "value_backbone"):
        assert json.loads((data_dir / folder / "config.json").read_text())["num_hidden_layers"] == 1, folder
    base_sha = weights_sha256(paths["base"])
    # positivity answers to the distilled head (default_parameterization), as in the real profile:
    # `vas generate --weight positivity=W` steers with it; the primary head keeps its own name, and
    # conciseness, which has no distilled head, answers to its primary.
    root = data_dir / "value_models"
    metas = {name: json.loads((root / name / "vas_value.json").read_text()) for name in find_value_models(root)}
    assert {name: m["parameterization"] for name, m in metas.items()} == {
        "positivity": "distilled", "positivity.distributional_qhead": "distributional_qhead",
        "positivity.scalar": "scalar", "conciseness": "distributional_qhead"}
    assert metas["positivity"]["teacher"] == "positivity.scalar"
    # The scalar teacher fits every prefix of 30 human continuations beside the rollouts; the
    # primary head fits the rollouts alone.
    assert metas["positivity.scalar"]["human_continuations"] == 30
    assert metas["positivity.distributional_qhead"]["human_continuations"] == 0
    assert value_model_folder(root, "positivity", "distributional_qhead") == root / "positivity.distributional_qhead"
    vas = pd.read_parquet(data_dir / "eval" / "summary.parquet").query("method == 'vas'")
    assert set(vas.param_parameterization) >= {"distilled", "scalar", "distributional_qhead"}
    for name in ("positivity.distributional_qhead", "conciseness", "positivity.scalar"):
        config = json.loads((root / name / "value_config.json").read_text())
        assert config["backbone_frozen"] and config["init_weights_sha256"] == base_sha, name
        assert not list((root / name).glob("model*.safetensors")), name
    assert json.loads((data_dir / "dpo_model" / "SKIPPED.json").read_text())["reason"] == "too slow for this test"
    summary = pd.read_parquet(data_dir / "eval" / "summary.parquet")
    assert "dpo" not in set(summary.method) and summary.method.str.contains("vas").any()
