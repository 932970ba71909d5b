"""Integration: the user's own data and models instead of the embedded world."""

import json

import dagster as dg
import pandas as pd
import pytest
import yaml

from assets.resources import VasSettings, build_resources
from assets.synthesis import BaseModelConfig, PreferencePairsConfig
from models.artifacts import file_md5
from models.profiles import PARAMS_FILE
from orchestration.cli import main as vas_main
from orchestration.definitions import ALL_ASSETS, ALL_CHECKS

pytestmark = pytest.mark.integration


def _materialize(data_dir, selection, run_config, **settings_fields):
    settings = VasSettings(profile="smoke", data_dir=str(data_dir), device="cpu", **settings_fields)
    return dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=dg.AssetSelection.assets(*selection),
                          resources=build_resources(settings), run_config=run_config,
                          instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)


def _pairs(n=12):
    rows = []
    for i in range(n):
        rows.append({"prompt": f"I bought this kettle {i}", "chosen": f"It is great {i}.",
                     "rejected": f"It is awful and broke after a week {i}.",
                     "attribute": "positivity" if i % 2 else "conciseness"})
    return pd.DataFrame(rows)


def test_malformed_preferences_fail_the_blocking_check_with_row_reasons(tmp_path):
    df = _pairs()
    df.loc[2, "rejected"] = df.loc[2, "chosen"]        # chosen == rejected: data row 3
    df.loc[5, "chosen"] = ""                            # empty text: data row 6
    raw = tmp_path / "incoming.csv"
    df.to_csv(raw, index=False)
    md5_before = file_md5(raw)

    data_dir = tmp_path / "data"
    result = _materialize(data_dir, ["preference_pairs"],
                          dg.RunConfig(ops={"preference_pairs": PreferencePairsConfig(source=str(raw))}))
    check = {c.check_name: c for c in result.get_asset_check_evaluations()}["preference_pairs_suite"]
    assert not check.passed
    table = check.metadata["problems"].value
    assert "incoming.csv" in table and "| 3 |" in table and "| 6 |" in table
    assert check.metadata["n_quarantined"].value == 2

    quarantine = list((data_dir / "quarantine").glob("incoming-*.csv"))
    assert len(quarantine) == 1
    bad = pd.read_csv(quarantine[0], keep_default_na=False)
    assert sorted(bad.source_row.tolist()) == [3, 6] and bad.reason.str.len().gt(0).all()
    kept = pd.read_parquet(data_dir / "preference_pairs" / "pairs.parquet")
    assert len(kept) == len(df) - 2                     # nothing lost: kept + quarantined = input
    assert file_md5(raw) == md5_before                  # the raw file is never modified


def test_verbatim_repeat_is_quarantined_and_fails_the_check_unless_allowed(tmp_path):
    df = _pairs(8)
    df = pd.concat([df, df.iloc[[3]]], ignore_index=True)  # data row 9 repeats row 4: 1 of 9 rows
    raw = tmp_path / "repeats.csv"
    df.to_csv(raw, index=False)
    md5_before = file_md5(raw)
    run_config = dg.RunConfig(ops={"preference_pairs": PreferencePairsConfig(source=str(raw))})

    def suite_check(data_dir, **settings_fields):
        result = _materialize(data_dir, ["preference_pairs"], run_config, **settings_fields)
        return {c.check_name: c for c in result.get_asset_check_evaluations()}["preference_pairs_suite"]

    # max_quarantined_fraction 0: the repeat is quarantined and the blocking check fails on it.
    strict = suite_check(tmp_path / "strict")
    assert not strict.passed
    assert strict.metadata["n_quarantined"].value == 1
    assert "| 9 |" in strict.metadata["problems"].value and "repeats row 4" in strict.metadata["problems"].value
    bad = pd.read_csv(next((tmp_path / "strict" / "quarantine").glob("repeats-*.csv")), keep_default_na=False)
    assert bad.source_row.tolist() == [9] and "repeats row 4" in bad.reason.item()
    kept = pd.read_parquet(tmp_path / "strict" / "preference_pairs" / "pairs.parquet")
    assert len(kept) == 8 and kept.prompt.tolist() == df.prompt.tolist()[:8]  # the first occurrence stays

    # A profile that allows one row in five to be quarantined: the check passes.
    params = yaml.safe_load(PARAMS_FILE.read_text())
    params["smoke"]["validation"]["max_quarantined_fraction"] = 0.2
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    assert suite_check(tmp_path / "allowed", params_file=str(params_file)).passed
    assert file_md5(raw) == md5_before                  # the raw file is never modified


def test_vas_validate_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    _pairs().to_csv(good, index=False)
    broken = _pairs()
    broken.loc[0, "chosen"] = broken.loc[0, "rejected"]
    broken.to_csv(bad, index=False)
    assert vas_main(["validate", str(good), "--profile", "smoke"]) == 0
    assert vas_main(["validate", str(bad), "--profile", "smoke"]) == 1
    out = capsys.readouterr().out
    assert "bad.csv" in out and "row 1" in out and "chosen" in out


def test_pinned_local_hf_model_is_hashed_not_trained(tmp_path, tiny_gpt2):
    from models.data.corpus import CorpusConfig, generate_corpus
    from models.lm.lm import train_tokenizer, weights_sha256

    texts = generate_corpus(CorpusConfig(n_reviews=200)).text.tolist()
    tokenizer = train_tokenizer(texts, 300)
    model = tiny_gpt2(len(tokenizer), n_embd=16, n_layer=1, eos=tokenizer.eos_token_id, pad=None, dropout=True)
    hf_dir = tmp_path / "my-hf-model"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)

    data_dir = tmp_path / "data"
    result = _materialize(data_dir, ["base_model"],
                          dg.RunConfig(ops={"base_model": BaseModelConfig(source=str(hf_dir))}))
    assert result.success
    manifest = json.loads((data_dir / "base_model" / "vas_manifest.json").read_text())
    assert manifest["embedded"] is False and manifest["weights_sha256"] == weights_sha256(hf_dir)
    assert not (data_dir / "base_model" / "model.safetensors").exists()   # pinned, not copied or trained
    meta = result.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
    assert "train_loss" not in meta and meta["weights_sha256"].value == manifest["weights_sha256"]


def test_missing_base_model_source_is_a_clear_error(tmp_path):
    data_dir = tmp_path / "data"
    result = _materialize(data_dir, ["base_model"],
                          dg.RunConfig(ops={"base_model": BaseModelConfig(source="no-such-org/no-such-model")}))
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert "neither a local directory nor in the Hugging Face cache" in str(failure.step_failure_data.error)
