"""Integration: the docs' "Bring your own model" block (docs/profiles.md), run as written with its paths filled in:
a tiny random Llama written locally and a prompts CSV, with the real profile's choices (reward
models on the base's first layer, value heads on its frozen hidden states, DPO skipped). The
project folder it runs in has the smoke profile's sizes as `default`, so the user's profile runs in
a minute."""

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from models.data.corpus import CorpusConfig, generate_corpus, generate_openings
from models.lm.lm import save_pretrained, train_tokenizer, weights_sha256
from models.profiles import PROJECT_ROOT, load_profile

pytestmark = pytest.mark.integration


def docs_block() -> str:
    text = (PROJECT_ROOT / "docs" / "profiles.md").read_text()
    section = re.search(r"<!-- byo:start.*?-->\n```bash\n(.*?)```\n<!-- byo:end -->", text, re.S)
    assert section, "docs/profiles.md lost its bring-your-own-model block (byo:start / byo:end)"
    return section.group(1)


def test_the_docs_bring_your_own_model_block_runs_as_written(tmp_path, tiny_llama):
    tokenizer = train_tokenizer(generate_corpus(CorpusConfig(n_reviews=300, seed=3)).text.tolist(), 300)
    ids = dict(eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    base = tmp_path / "models" / "my-llama"
    save_pretrained(tiny_llama(len(tokenizer), seed=0, **ids), tokenizer, base)
    prompts = tmp_path / "data" / "my-prompts.csv"
    prompts.parent.mkdir()
    pd.DataFrame({"prompt": generate_openings(24, 4)}).to_csv(prompts, index=False)

    work = tmp_path / "project"          # stands in for the project root the docs' commands run in
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump({"default": load_profile("smoke")}))
    script = docs_block()
    for placeholder, path in (("/models/my-llama", base),
                              ("/data/my-prompts.csv", prompts), ("my-params.yaml", work / "my-params.yaml"),
                              ("data-mine", tmp_path / "data-mine"), (".venv/bin/", os.path.dirname(sys.executable) + "/")):
        assert placeholder in script, placeholder
        script = script.replace(placeholder, str(path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAS_")}
    env.update(DAGSTER_HOME=str(tmp_path / "dagster_home"), VAS_DEVICE="cpu")
    (tmp_path / "dagster_home").mkdir()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    data = tmp_path / "data-mine"
    manifest = json.loads((data / "base_model" / "vas_manifest.json").read_text())
    assert manifest["embedded"] is False and manifest["weights_sha256"] == weights_sha256(base)
    value_config = json.loads((data / "value_models" / "positivity" / "value_config.json").read_text())
    assert value_config["init_weights_sha256"] == weights_sha256(base) and value_config["backbone_frozen"]
    assert value_config["token_factors"] == "embedding"
    assert json.loads((data / "reward_models" / "positivity" / "config.json").read_text())["num_hidden_layers"] == 1
    assert (data / "dpo_model" / "SKIPPED.json").is_file() and "DPO baseline skipped" in \
        (data / "report" / "report.md").read_text()
    assert set(pd.read_parquet(data / "prompts" / "prompts.parquet").prompt) == set(pd.read_csv(prompts).prompt)
    assert (data / "report" / "report.md").is_file()
    assert not (PROJECT_ROOT / "my-params.yaml").exists()          # nothing written into the real project
    out = proc.stdout
    assert "wall time" in out and out.count("The hotel was") >= 2    # vas run's summary; two completions
    assert "value_models" in out.split("wall time", 1)[1]            # vas lineage names the chain
