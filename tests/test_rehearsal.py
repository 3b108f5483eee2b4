"""The rehearsal: a random-weight model written in the hub's cache layout, then the whole report run on it
offline, by model name, in a fresh process. A GPT-2 config shrunk to 2 layers x 4 heads of width 64 (the
vocabulary stays GPT-2's 50,257) keeps it quick; the full-size run is ``python -m circuitlib.rehearsal
gpt2-medium --out DIR`` (README)."""

import json
import os
from pathlib import Path

import pytest

from circuitlib import rehearsal

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4}
PLAN = {"n_prompts": 16, "discovery_prompts": 8, "causal_prompts": 16, "causal_random": 10, "n_random": 10}


def test_hub_cache_layout(tmp_path):
    from huggingface_hub import try_to_load_from_cache
    from safetensors import safe_open

    info = rehearsal.write_hub_cache("gpt2", tmp_path, overrides=TINY)
    repo = tmp_path / "hub" / "models--gpt2"
    assert (repo / "refs" / "main").read_text() == info["commit"]
    snapshot = repo / "snapshots" / info["commit"]
    assert Path(info["snapshot"]) == snapshot
    names = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
             "generation_config.json"}
    assert names <= {p.name for p in snapshot.iterdir()}
    for name in names:  # every snapshot file is a symlink into blobs/, named as the hub names blobs
        link = snapshot / name
        assert link.is_symlink() and link.resolve().parent == (repo / "blobs").resolve()
        assert len(link.resolve().name) == (64 if name == "model.safetensors" else 40)
    # huggingface_hub's own cache lookup finds it
    found = try_to_load_from_cache("gpt2", "config.json", cache_dir=tmp_path / "hub")
    assert Path(found).parent == snapshot
    # config.json: the hub's values with the overrides
    config = json.loads((snapshot / "config.json").read_text())
    assert config == {**rehearsal.HUB_CONFIGS["gpt2"], **TINY}
    # GPT-2's tokenizer files, byte for byte
    encoder, bpe = rehearsal.gpt2_tokenizer_files()
    assert (snapshot / "vocab.json").read_bytes() == encoder.read_bytes()
    assert (snapshot / "merges.txt").read_bytes() == bpe.read_bytes()
    # weights in transformers' own format and shapes
    with safe_open(str(snapshot / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("transformer.wte.weight").get_shape() == [50257, 64]
        assert f.get_slice("transformer.h.1.attn.c_attn.weight").get_shape() == [64, 192]
    assert not any(k.startswith("transformer.h.2.") for k in keys)
    assert set(info["planted_heads"]) == {"name_copying", "country_to_capital_wikidata"}


def test_planted_heads_score_above_zero(tmp_path):
    """Without them a random model's MAPS scores are ~0 and the causal checks would have nothing to ablate."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from circuitlib import scoring
    from circuitlib.models import load_model

    info = rehearsal.write_hub_cache("gpt2", tmp_path, overrides=TINY)
    model = load_model(info["snapshot"])
    model.cfg.model_name = "gpt2"
    scores = scoring.static_scores_many(model, ["name_copying", "country_to_capital_wikidata"])
    for relation, heads in info["planted_heads"].items():
        for name in heads:
            layer, head = map(int, name.split("."))
            assert scores[relation].scores[layer, head] > 0.2, (relation, name)
    # the rest keeps transformers' initialisation
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(info["snapshot"]))
    assert torch.equal(fresh.transformer.wte.weight, model.W_E)


def test_rehearsal_runs_the_report_offline_by_name(tmp_path):
    summary = rehearsal.rehearse("gpt2", tmp_path / "out", overrides=TINY, plan=PLAN, progress=False)
    r = summary["rehearsal"]
    assert r["loaded_by"].startswith("load_model('gpt2'): found in the hub cache")
    assert r["load_model_by_name_failed"] is None
    secs = r["seconds_by_section"]
    assert list(secs) == ["write_cache", "load", "baseline", "discovery", "scoring", "overlap", "report_process",
                          "total"]
    assert all(s["wall"] >= 0 for s in secs.values())
    assert r["peak_rss_gib"] > 0.1 and r["peak_rss_gib"] == summary["peak_rss_gib"]
    assert len(r["load_average"]["before"]) == 3
    assert r["cache_kept_at"] is None and not Path(r["cache"]["snapshot"]).exists()  # temporary cache removed
    # the report ran every part, with the plan given
    assert summary["settings"]["model"]["name"] == "gpt2" and summary["settings"]["model"]["n_layers"] == 2
    assert summary["settings"]["plan"]["discovery_prompts"] == 8
    for relation in ("name_copying", "country_to_capital_wikidata"):
        part = summary["scoring"][relation]
        assert part["dynamic_with_context"] is not None and part["r_static_dynamic"] is not None
        assert "skipped" not in part["causal_check"], part["causal_check"]  # planted heads: something to ablate
    assert summary["overlap"]["table"]["rows"]
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["rehearsal"]["seconds_by_section"] == json.loads(json.dumps(secs))
    assert (tmp_path / "out" / "maps_static.png").exists() and (tmp_path / "out" / "report.md").exists()
    text = rehearsal.format_times(summary)
    assert "discovery" in text and "peak RSS" in text and "load average" in text


def test_models_without_a_stored_config_need_one(tmp_path):
    with pytest.raises(rehearsal.RehearsalError, match="--config"):
        rehearsal.hub_config("gpt2-large")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**rehearsal.HUB_CONFIGS["gpt2"], "n_layer": 36}))
    assert rehearsal.hub_config("gpt2-large", path)["n_layer"] == 36


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert rehearsal.main(["no-such-model", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rehearsal: ") and len(err.strip().splitlines()) == 1
    assert rehearsal._parse_sets(["n_layer=2", "activation_function=gelu"]) == {"n_layer": 2,
                                                                                "activation_function": "gelu"}
    assert os.environ.get("HF_HOME") != str(tmp_path)  # the rehearsal never changes this process's environment
