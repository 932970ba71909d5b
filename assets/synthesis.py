"""Group `synthesis`: the embedded default world (corpus -> base_model -> prompts -> preference_pairs).

Each asset can instead import the user's data: a Hugging Face model for base_model, a file of
prompts, a file of preference pairs. Either way the outputs land under the data folder.
"""


import tempfile
from pathlib import Path
from typing import Optional

import dagster as dg
import pandas as pd

from assets.common import output_path
from assets.stage import Produced, StageRun, pipeline_asset
from models.artifacts import atomic_path, write_folder, write_parquet
from models.data.corpus import CorpusConfig as GeneratorConfig
from models.data.corpus import generate_corpus, generate_openings
from models.data.validation import ValidationRules, import_preference_file, import_prompt_file, validate_pairs, validate_prompts
from models.profiles import project_path
from models.rewards.rewards import count_words, positivity

GROUP = "synthesis"


class CorpusConfig(dg.Config):
    n_reviews: Optional[int] = None


@pipeline_asset("corpus", CorpusConfig, group_name=GROUP, kinds={"python", "parquet"},
                pool="duckdb_writer",
                description="Seeded synthetic product reviews, from harsh to glowing and terse to rambling.")
def corpus(run: StageRun) -> Produced:
    df = generate_corpus(run.config_for(GeneratorConfig))
    write_parquet(df, run.path("corpus"))
    sample = df.text.head(2000).tolist()
    pos = positivity(sample)
    words = [count_words(t) for t in df.text]
    mean_pos = sum(pos) / len(pos)
    metrics = {
        "n_reviews": len(df),
        "mean_words": sum(words) / len(words),
        "max_words": max(words),
        "positivity_mean": mean_pos,
        "positivity_std": (sum((p - mean_pos) ** 2 for p in pos) / len(pos)) ** 0.5,
        "distinct_texts": int(df.text.nunique()),
    }
    run.log.info(f"corpus: {len(df)} reviews, mean {metrics['mean_words']:.1f} words")
    return Produced(metrics, metadata={"preview": dg.MetadataValue.md(df.head(8).to_markdown(index=False))})


# base_model params this asset reads itself (a pinned model, the spread probe); the rest configure
# TinyLMConfig.
BASE_MODEL_OWN_KEYS = ("source", "gguf_sha256", "allow_download", "trust_remote_code", "probe_prompts",
                       "probe_samples", "probe_max_new_tokens")
# Where GGUF base models are converted to Hugging Face folders, once per file (models/lm/real_model.py).
GGUF_CACHE = ".cache/models"


class BaseModelConfig(dg.Config):
    source: Optional[str] = None
    train_steps: Optional[int] = None
    batch_size: Optional[int] = None
    learning_rate: Optional[float] = None


def _source(settings, params) -> str | None:
    """The user's file or model that replaces the embedded world's, if any."""
    return params["source"] or None


def _base_model_source(settings, params) -> str | None:
    """The pinned model folder, or the GGUF file it is converted from."""
    from models.lm.real_model import is_gguf_source, resolve_gguf

    if params["source"] and is_gguf_source(params["source"]):
        return str(resolve_gguf(params["source"]))
    return _source(settings, params)


@pipeline_asset("base_model", BaseModelConfig, sources=_base_model_source,
                upstream=lambda settings, params: [] if params["source"] else ["corpus"], group_name=GROUP,
                kinds={"pytorch", "huggingface"}, pool="gpu",
                description="The frozen base model pi0: a tiny GPT-2 trained on the corpus, or a pinned HF model.")
def base_model(run: StageRun) -> Produced:
    # torch, transformers and torch-backed modules load inside the assets that use them: `dagster dev`
    # loads these definitions without torch
    from models.data.probe import sample_spread
    from models.lm.lm import (
        TinyLMConfig,
        load_frozen_base,
        resolve_model_dir,
        save_pretrained,
        train_tiny_lm,
        weights_sha256,
        write_manifest,
    )
    from models.lm.real_model import converted_gguf, is_gguf_source, resolve_gguf

    params, settings = run.params, run.settings
    metrics: dict[str, float] = {}
    series: dict[str, list[float]] = {}
    with atomic_path(run.path("base_model")) as tmp:
        tmp.mkdir()
        if params["source"] and is_gguf_source(params["source"]):
            gguf = resolve_gguf(params["source"])
            run.log.info(f"converting {gguf} to a Hugging Face folder under {GGUF_CACHE} (once per file)")
            model_dir, gguf_sha = converted_gguf(gguf, project_path(GGUF_CACHE), params["gguf_sha256"])
            sha = weights_sha256(model_dir)
            run.log.info(f"pinning base model {model_dir}, converted from {gguf.name} (weights sha256 {sha[:12]})")
            write_manifest(tmp, {"embedded": False, "source": str(model_dir.resolve()), "weights_sha256": sha,
                                 "gguf": str(gguf), "gguf_sha256": gguf_sha,
                                 "trust_remote_code": False, "allow_download": False})
        elif params["source"]:
            model_dir = resolve_model_dir(params["source"], params["allow_download"])
            source = str(model_dir.resolve()) if model_dir.exists() and not params["allow_download"] else params["source"]
            sha = weights_sha256(model_dir)
            run.log.info(f"pinning base model {params['source']} (weights sha256 {sha[:12]})")
            write_manifest(tmp, {"embedded": False, "source": source, "weights_sha256": sha,
                                 "trust_remote_code": params["trust_remote_code"],
                                 "allow_download": params["allow_download"]})
        else:
            texts = pd.read_parquet(run.path("corpus")).text.tolist()
            config = run.config_for(TinyLMConfig, ignore=BASE_MODEL_OWN_KEYS)
            model, tokenizer, train = train_tiny_lm(texts, config, device=settings.device)
            save_pretrained(model, tokenizer, tmp)
            sha = weights_sha256(tmp)
            write_manifest(tmp, {"embedded": True, "source": "embedded tiny GPT-2", "weights_sha256": sha,
                                 "trust_remote_code": False, "allow_download": False})
            series["train_loss"] = train.pop("loss_curve")[::10]
            metrics.update({k: v for k, v in train.items() if isinstance(v, (int, float))})
            metrics["device_cuda"] = float(train["device"].startswith("cuda"))
        # Probe the model that was written: does it sample varied, cleanly ending reviews?
        model, tokenizer, _ = load_frozen_base(tmp)
        openings = generate_openings(params["probe_prompts"], params["seed"] + 7)
        spread = sample_spread(model, tokenizer, openings, params["probe_samples"],
                               params["probe_max_new_tokens"], params["seed"])
        metrics.update({f"sample_{k}": v for k, v in spread.items() if k != "examples"})
    run.log.info(f"base model frozen, weights sha256 {sha[:12]}; sample spread {spread}")
    return Produced(metrics, series=series, model_version=sha,
                    metadata={"weights_sha256": sha,
                              "sample_examples": dg.MetadataValue.md("\n".join(f"- {e}" for e in spread["examples"]))})


def _import_source(run: StageRun, importer, rules, what: str, path=None, **kwargs):
    """The user's file (params `source`, or path) instead of synthesis: (rows kept, validation
    report, where the bad rows went or None, metrics). The raw file is never modified."""
    df, report, quarantined = importer(path or run.params["source"], rules, run.settings.path("quarantine"),
                                       **kwargs)
    if quarantined is not None:
        run.log.warning(f"{len(report.bad_rows)} bad {what} rows quarantined to {quarantined}")
    return df, report, quarantined, {"n_quarantined": len(report.bad_rows)}


class PromptsConfig(dg.Config):
    source: Optional[str] = None
    snippets: Optional[str] = None
    n_train: Optional[int] = None
    n_eval: Optional[int] = None
    opening_words: Optional[int] = None


def _prompts_source(settings, params) -> str | None:
    return params["source"] or (str(project_path(params["snippets"])) if params["snippets"] else None)


SNIPPET_OPENINGS = "human_snippet_openings.parquet"   # the file a snippet-prompt run imports
GOLD_AGREEMENT = "gold_agreement.json"   # in the prompts folder: VADER vs the human ratings (the report's)
# In the prompts folder: every usable snippet cut into opening and rest, with its prompt split
# ("train", "eval", or "" for a snippet no prompt was cut from): preference_pairs' snippet_pairs.
HUMAN_SNIPPETS = "human_snippets.parquet"


def _snippet_prompts(run: StageRun, rules: ValidationRules, workdir: Path):
    """Openings of the human-rated snippets, imported as any prompts file is (validated, bad rows
    quarantined), with VADER's agreement with the human ratings on the held-out snippets."""
    from models.data.human_snippets import (
        SnippetPromptConfig,
        gold_agreement,
        read_snippets,
        snippet_prompts,
        usable_snippets,
    )

    params = run.params
    snippets = read_snippets(project_path(params["snippets"]))
    config = run.config_for(SnippetPromptConfig, ignore=("source", "snippets", "validation"))
    chosen = snippet_prompts(snippets, config)
    openings = workdir / SNIPPET_OPENINGS
    write_parquet(chosen[["prompt_id", "split", "prompt"]], openings)
    df, report, quarantined, metrics = _import_source(run, import_prompt_file, rules, "prompt", path=openings,
                                                      n_eval=params["n_eval"], seed=params["seed"])
    df = df.merge(chosen.drop(columns=["split", "prompt"]), on="prompt_id", how="left")
    held_out = snippets[~snippets.snippet_id.isin(df.prompt_id[df.split == "train"])]
    agreement = gold_agreement(held_out, positivity(held_out.text.tolist()))
    run.log.info(f"{len(df)} prompts from {len(snippets)} human-rated snippets; VADER vs human ratings on "
                 f"{len(held_out)} held-out snippets: Spearman {agreement['spearman']:.3f}")
    metrics.update({f"gold_human_{k}": v for k, v in agreement.items()})
    split = dict(zip(df.prompt_id, df.split))
    usable = usable_snippets(snippets, config)
    usable["split"] = [split.get(i, "") for i in usable.snippet_id]
    return df, report, quarantined, metrics, usable


@pipeline_asset("prompts", PromptsConfig, sources=_prompts_source, group_name=GROUP, kinds={"parquet"},
                pool="duckdb_writer",
                description="Train/eval prompt splits: review openings (generated, or cut from human-rated "
                            "review snippets), or the user's file of prompts.")
def prompts(run: StageRun) -> Produced:
    from transformers import AutoTokenizer

    from models.lm.lm import base_model_dir

    params, settings = run.params, run.settings
    rules = ValidationRules.from_params(params["validation"])
    prompts_path = run.path("prompts") / "prompts.parquet"
    metrics: dict[str, float] = {}
    quarantined = None
    usable = None
    if params["source"]:
        df, report, quarantined, metrics = _import_source(run, import_prompt_file, rules, "prompt",
                                                          n_eval=params["n_eval"], seed=params["seed"])
    elif params["snippets"]:
        with tempfile.TemporaryDirectory() as workdir:
            df, report, quarantined, metrics, usable = _snippet_prompts(run, rules, Path(workdir))
    else:
        openings = generate_openings(params["n_train"] + params["n_eval"], params["seed"] + 1)
        df = pd.DataFrame({
            "prompt_id": [f"p{i:05d}" for i in range(len(openings))],
            "split": ["eval"] * params["n_eval"] + ["train"] * params["n_train"],
            "prompt": openings,
        })
        report = validate_prompts(df, str(prompts_path), rules)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir(settings.path("base_model")))
    df["n_prompt_tokens"] = [len(ids) for ids in tokenizer(df.prompt.tolist(), add_special_tokens=False)["input_ids"]]
    agreement = {k.removeprefix("gold_human_"): v for k, v in metrics.items() if k.startswith("gold_human_")}
    write_folder(run.path("prompts"), {
        "prompts.parquet": df,
        "validation.json": {**report.to_dict(), "quarantine_file": str(quarantined) if quarantined else None},
        **({GOLD_AGREEMENT: agreement} if agreement else {}),
        **({HUMAN_SNIPPETS: usable} if usable is not None else {}),
    })
    metrics.update({
        "n_train": int((df.split == "train").sum()),
        "n_eval": int((df.split == "eval").sum()),
        "max_prompt_tokens": int(df.n_prompt_tokens.max()),
        "mean_prompt_tokens": float(df.n_prompt_tokens.mean()),
    })
    return Produced(metrics, metadata={"preview": dg.MetadataValue.md(df.head(8).to_markdown(index=False))})


class PreferencePairsConfig(dg.Config):
    source: Optional[str] = None
    pairs_per_attribute: Optional[int] = None
    max_new_tokens: Optional[int] = None
    snippet_pairs: Optional[dict[str, int]] = None


def _preference_pairs_upstream(settings, params) -> list[str]:
    """A user's file replaces the synthesized pairs; imported pairs are read once there are any."""
    upstream = [] if params["source"] else ["base_model", "prompts"]
    if (output_path(settings, "imported_preferences") / "pairs.parquet").exists():
        upstream.append("imported_preferences")
    return upstream


def _snippet_pairs(run: StageRun, config) -> pd.DataFrame:
    """Pairs of human continuations of human openings, from the snippets no eval prompt was cut
    from (an eval prompt's own continuation would leak into the reward its VAS steers by)."""
    from models.data.human_snippets import continuation_triples
    from models.data.preferences import snippet_pairs

    path = run.path("prompts") / HUMAN_SNIPPETS
    if not path.exists():
        raise ValueError(f"preference_pairs.snippet_pairs {config.snippet_pairs} needs prompts cut from human-rated "
                         f"snippets (prompts.snippets), and {path} does not exist")
    usable = pd.read_parquet(path)
    usable = usable[usable.split != "eval"].reset_index(drop=True)
    frames = []
    for i, (attribute, n) in enumerate(sorted(config.snippet_pairs.items())):
        if attribute not in config.attributes:
            raise ValueError(f"preference_pairs.snippet_pairs names {attribute!r}, which is not one of "
                             f"preference_pairs.attributes {list(config.attributes)}")
        triples = continuation_triples(usable, int(n), config.seed + i)
        frames.append(snippet_pairs(triples, attribute, config))
        run.log.info(f"{len(frames[-1])} {attribute} pairs of human continuations from {len(usable)} snippets")
    return pd.concat(frames, ignore_index=True)


@pipeline_asset("preference_pairs", PreferencePairsConfig, upstream=_preference_pairs_upstream,
                sources=_source, group_name=GROUP, kinds={"pytorch", "parquet"}, pool="gpu",
                description="Preference pairs per reward attribute: base-model completion pairs with noisy "
                      "Bradley-Terry labels from the gold reward, or the user's file (prompt, chosen, rejected); "
                      "plus every pair accepted from data/incoming/ (imported_preferences).")
def preference_pairs(run: StageRun) -> Produced:
    from models.data.preferences import PairSynthesisConfig, synthesize_pairs
    from models.lm.lm import load_frozen_base, pick_device

    params, settings = run.params, run.settings
    rules = ValidationRules.from_params(params["validation"])
    pairs_path = run.path("preference_pairs") / "pairs.parquet"
    metrics: dict[str, float] = {}
    quarantined = None
    if params["source"]:
        df, report, quarantined, metrics = _import_source(run, import_preference_file, rules, "pair")
    else:
        device = str(pick_device(settings.device))
        model, tokenizer, _ = load_frozen_base(settings.path("base_model"), device=device)
        train = pd.read_parquet(settings.path("prompts", "prompts.parquet"))
        train = train[train.split == "train"]
        config = run.config_for(PairSynthesisConfig, ignore=("source", "validation"))
        df = synthesize_pairs(model, tokenizer, train, config, device=device, progress=run.log.info)
        n_asked = params["pairs_per_attribute"] * len(params["attributes"])
        if config.snippet_pairs:
            human = _snippet_pairs(run, config)
            n_asked += sum(config.snippet_pairs.values())
            df = pd.concat([df, human], ignore_index=True)
        metrics["n_dropped_identical_or_empty"] = n_asked - len(df)
        metrics["gold_agreement"] = float((df.gold_chosen > df.gold_rejected).mean())
        report = validate_pairs(df, str(pairs_path), rules)
    if "imported_preferences" in run.inputs:
        imported = pd.read_parquet(run.path("imported_preferences") / "pairs.parquet")
        if len(imported):
            run.log.info(f"merging {len(imported)} imported pairs from {imported.source_md5.nunique()} file(s)")
            imported = imported.assign(origin="imported")
            df = pd.concat([df, imported[list(df.columns.intersection(imported.columns))]], ignore_index=True)
        metrics["n_imported"] = len(imported)
    write_folder(run.path("preference_pairs"), {
        "pairs.parquet": df,
        "validation.json": {**report.to_dict(), "quarantine_file": str(quarantined) if quarantined else None},
    })
    metrics["n_pairs"] = len(df)
    for attribute, group in df.groupby("attribute"):
        metrics[f"n_pairs_{attribute}"] = len(group)
        if "gold_chosen" in group:
            labelled = group.dropna(subset=["gold_chosen", "gold_rejected"])  # imported pairs carry no gold scores
            metrics[f"gold_agreement_{attribute}"] = float((labelled.gold_chosen > labelled.gold_rejected).mean())
    metrics["mean_chosen_chars"] = float(df.chosen.str.len().mean())
    metrics["mean_rejected_chars"] = float(df.rejected.str.len().mean())
    return Produced(metrics, metadata={"preview": dg.MetadataValue.md(df.head(6).to_markdown(index=False))})
