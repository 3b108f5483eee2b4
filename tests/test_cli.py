"""The command line end to end on the embedded model: outputs equal the library's own values, errors
are one line with a non-zero exit, stdout carries only the result."""

import json
import os
import subprocess
import sys

import pytest
import torch

from circuitlib.__main__ import main
from circuitlib.models import gpt2_tokenizer, load_tokenizer
from circuitlib.scoring import static_scores
from circuitlib.tasks import load_relation, relation_table


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def cli_process(*argv, env=None, **kw):
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_ENDPOINT")}
    full.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "circuitlib", *argv], capture_output=True, text=True,
                          env=full, timeout=300, **kw)


# ---------------------------------------------------------------------------------------------
# scores


@pytest.mark.parametrize("suppression", [False, True])
def test_scores_json_equals_static_scores(capsys, toy, suppression):
    argv = ["scores", "--model", "toy", "--relation", "name_copying", "--json"]
    code, out, err = run_cli(capsys, *argv, *(["--suppression"] if suppression else []))
    assert code == 0, err
    data = json.loads(out)
    ref = static_scores(toy, "name_copying", suppression=suppression)
    assert torch.allclose(torch.tensor(data["scores"]), ref.scores, atol=1e-6)
    assert (data["k"], data["method"], data["pairs_used"]) == (ref.k, ref.method, ref.meta["pairs_used"])
    assert data["layout"] == "scores[layer][head]"


def test_scores_table_is_heads_by_layers(capsys, toy):
    code, out, err = run_cli(capsys, "scores", "--model", "toy", "--relation", "country_to_capital_wikidata")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "rows: heads, columns: layers" in lines[1]
    header = lines[2].split()
    assert header[0] == "head\\layer" and header[1:] == [str(layer) for layer in range(toy.cfg.n_layers)]
    table = torch.tensor([[float(v) for v in line.split()[1:]] for line in lines[3:]])
    assert [int(line.split()[0]) for line in lines[3:]] == list(range(toy.cfg.n_heads))
    ref = static_scores(toy, "country_to_capital_wikidata").scores  # [layer, head]
    assert table.shape == (toy.cfg.n_heads, toy.cfg.n_layers)
    assert torch.allclose(table, ref.T, atol=0.005 + 1e-6)  # printed with 2 decimals


def test_scores_min_pairs(capsys, toy):
    from circuitlib.tasks import read_relation

    # pairs whose two words are each one token of the word-level vocabulary (counted here from the vocabulary)
    vocab = toy.tokenizer.get_vocab()
    pairs = read_relation("entity_to_pronoun")
    kept = sum(s in vocab and t in vocab for s, t in pairs)
    assert 0 < kept < 30  # precondition: below MAPS's 30-pair minimum
    code, out, err = run_cli(capsys, "scores", "--model", "toy", "--relation", "entity_to_pronoun")
    assert code == 2 and out == ""
    assert f"keeps {kept} of {len(pairs)} pairs" in one_error_line(err) and "pass --min-pairs N" in err
    code, out, err = run_cli(capsys, "scores", "--model", "toy", "--relation", "entity_to_pronoun",
                             "--min-pairs", str(kept), "--json")
    assert code == 0, err
    ref = static_scores(toy, load_relation("entity_to_pronoun", toy.tokenizer, min_pairs=kept))
    assert torch.allclose(torch.tensor(json.loads(out)["scores"]), ref.scores, atol=1e-6)


def test_scores_unknown_relation_is_one_line(capsys):
    code, out, err = run_cli(capsys, "scores", "--model", "toy", "--relation", "no_such_relation")
    assert code == 2 and out == ""
    assert "unknown relation 'no_such_relation'" in one_error_line(err)


# ---------------------------------------------------------------------------------------------
# relations


def test_relations_table_and_json_equal_relation_table(capsys):
    ref = relation_table(load_tokenizer("toy"), min_pairs=5)
    code, out, err = run_cli(capsys, "relations", "--model", "toy", "--min-pairs", "5")
    assert code == 0, err
    rows = out.strip().splitlines()[1:]
    parsed = []
    for line in rows:
        name, kept_total, k, valid = line.split()
        kept, total = kept_total.split("/")
        parsed.append({"relation": name, "kept": int(kept), "total": int(total), "k": int(k),
                       "valid": valid == "yes"})
    assert parsed == ref
    code, out, err = run_cli(capsys, "relations", "--model", "toy", "--min-pairs", "5", "--json")
    assert code == 0 and json.loads(out)["relations"] == ref


@pytest.mark.parametrize("model", ["gpt2-typo", "./no-such-dir"])
def test_relations_bad_model_is_one_line(capsys, model):
    code, out, err = run_cli(capsys, "relations", "--model", model)
    assert code == 2 and out == ""
    one_error_line(err)


def test_relations_folder_without_tokenizer_is_an_error(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, out, err = run_cli(capsys, "relations", "--model", str(tmp_path))
    assert code == 2 and out == ""
    assert "has no tokenizer files" in one_error_line(err)


# ---------------------------------------------------------------------------------------------
# report


def test_failed_report_leaves_no_directory(capsys, tmp_path):
    out_dir = tmp_path / "new" / "report"
    code, out, err = run_cli(capsys, "report", "--model", "gpt2-typo", "--out", str(out_dir), "--quiet")
    assert code == 2
    assert "Unknown model 'gpt2-typo'" in one_error_line(err)
    assert not (tmp_path / "new").exists()


def test_failed_report_keeps_an_existing_directory(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    code, out, err = run_cli(capsys, "report", "--model", "gpt2-typo", "--out", str(tmp_path), "--quiet")
    assert code == 2 and (tmp_path / "keep.txt").read_text() == "mine"


def test_report_out_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    code, out, err = run_cli(capsys, "report", "--model", "toy", "--out", str(tmp_path / "f"))
    assert code == 2 and "is a file" in one_error_line(err)


@pytest.mark.parametrize("argv, message", [
    (("--plan", "prompts=3"), "--plan needs KEY=N with KEY one of n_prompts"),
    (("--plan", "n_prompts=many"), "--plan n_prompts= needs a whole number"),
    (("--skip", "everything"), "cannot skip everything: skippable are discovery"),
])
def test_report_plan_and_skip_mistakes_are_one_line(capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, "report", "--model", "toy", "--out", str(tmp_path / "new"), *argv)
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "new").exists()


def test_report_plan_and_skip_reach_the_report(capsys, tmp_path, monkeypatch):
    from circuitlib import report

    seen = {}
    monkeypatch.setattr(report, "run_report", lambda model, out, **kw: seen.update(kw, model=model))
    code, _, _ = run_cli(capsys, "report", "--model", "toy", "--out", str(tmp_path), "--quiet", "--plan",
                         "discovery_prompts=8", "--plan", "screen=0", "--skip", "dynamic", "--skip", "path_patch")
    assert code == 0
    assert seen["plan"] == {"discovery_prompts": 8, "screen": 0} and seen["skip"] == ["dynamic", "path_patch"]
    assert seen["progress"] is False and seen["model"] == "toy"


def test_rehearse_subcommand_mistakes_are_one_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "rehearse", "gpt2", "--out", str(tmp_path / "r"), "--skip", "everything")
    assert code == 2 and "cannot skip ['everything']" in one_error_line(err)
    code, out, err = run_cli(capsys, "rehearse", "not-a-model", "--out", str(tmp_path / "r"))
    assert code == 2 and "'not-a-model' is not a TransformerLens model name" in one_error_line(err)


def test_rehearse_subcommand_defaults(monkeypatch):
    from circuitlib import rehearsal
    from circuitlib.__main__ import build_parser

    seen = {}
    monkeypatch.setattr(rehearsal, "rehearse", lambda name, out, **kw: seen.update(kw, name=name, out=out) or {})
    monkeypatch.setattr(rehearsal, "format_times", lambda summary: "times")
    args = build_parser().parse_args(["rehearse", "--quiet", "--plan", "max_k=0"])
    assert args.func(args) == "times"
    assert (seen["name"], seen["out"]) == ("gpt2-medium", "rehearsal-gpt2-medium")
    assert seen["progress"] is False and seen["plan"] == {"max_k": 0}


# ---------------------------------------------------------------------------------------------
# help, pipes, stdout purity, no network


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "``" not in out and ":func:" not in out
    assert "examples:" in out and "relations" in out and "report" in out
    with pytest.raises(SystemExit):
        main(["scores", "--help"])
    assert "--min-pairs N" in capsys.readouterr().out


def test_closed_pipe_is_no_traceback():
    """`python -m circuitlib relations | head`: the reader is gone before the output is written."""
    proc = subprocess.Popen([sys.executable, "-m", "circuitlib", "relations", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_json_stdout_is_pure_for_a_local_directory(tmp_path):
    """TransformerLens's "Moving model to device" / progress messages stay off stdout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=50257))
    hf.save_pretrained(tmp_path)
    gpt2_tokenizer().save_pretrained(tmp_path)
    run = cli_process("scores", "--model", str(tmp_path), "--relation", "name_copying", "--json")
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert len(data["scores"]) == 1 and len(data["scores"][0]) == 2


TIMED_MAIN = """
import sys, time
import circuitlib.models, circuitlib.scoring, transformer_lens, transformers  # imports not timed
from circuitlib.__main__ import main
t = time.time()
code = main(sys.argv[2:])
open(sys.argv[1], "w").write(str(time.time() - t))
sys.exit(code)
"""


def test_no_network_no_cache_fails_fast_in_one_line(tmp_path):
    """A fresh process with hub access on, an empty HF_HOME and an unreachable hub endpoint (a closed
    local port): one error line at once instead of the hub client's retries (~29 s before)."""
    timing = tmp_path / "seconds"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_ENDPOINT")}
    env.update({"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9",
                "HTTPS_PROXY": "", "https_proxy": "", "ALL_PROXY": "", "all_proxy": ""})
    run = subprocess.run([sys.executable, "-c", TIMED_MAIN, str(timing), "scores", "--model", "gpt2-medium",
                          "--relation", "name_copying"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    line = one_error_line(run.stderr)
    assert "not in the Hugging Face cache" in line and "127.0.0.1:9 unreachable" in line
    assert float(timing.read_text()) < 5


# ---------------------------------------------------------------------------------------------
# Installing (the Makefile's install / wheelhouse logic, as a dry run: nothing is downloaded)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_dry_run(tmp_path, target, **variables):
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "PYTHONWARNINGS")}
    argv = ["make", "-n", target, f"VENV={tmp_path / 'venv'}", *(f"{k}={v}" for k, v in variables.items())]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_make_install_default_is_unchanged(tmp_path):
    lines = make_dry_run(tmp_path, "install")
    pip = [ln for ln in lines if " -m pip install" in ln]
    assert len(pip) == 3
    assert not any("--index-url" in ln or "--no-index" in ln for ln in pip)
    assert pip[1].split()[-1] == "torch==2.13.0"  # torch before circuitlib's dependents pull another build
    assert pip[2].startswith('PYTHONWARNINGS="ignore:Editable installation"') and pip[2].endswith('-e ".[dev]"')


def test_make_install_cpu_torch_index_applies_to_torch_only(tmp_path):
    url = "https://wheels.example/cpu"
    pip = [ln for ln in make_dry_run(tmp_path, "install", TORCH_INDEX=url) if " -m pip install" in ln]
    assert [f"--index-url {url}" in ln for ln in pip] == [False, True, False]


def test_make_install_from_wheelhouse_uses_no_index(tmp_path):
    wh = tmp_path / "usb" / "wheelhouse"
    lines = make_dry_run(tmp_path, "install", WHEELHOUSE=wh, TORCH_INDEX="https://wheels.example/cpu")
    pip = [ln for ln in lines if " -m pip install" in ln]
    assert len(pip) == 3 and all(f"--no-index --find-links {wh}" in ln for ln in pip)
    assert not any("--index-url" in ln for ln in pip)


def test_make_wheelhouse_downloads_torch_then_the_rest(tmp_path):
    wh, url = tmp_path / "wh", "https://wheels.example/cpu"
    lines = make_dry_run(tmp_path, "wheelhouse", WHEELHOUSE=wh, TORCH_INDEX=url)
    downloads = [ln for ln in lines if " -m pip download" in ln]
    assert len(downloads) == 3 and all(f"-d {wh}" in ln for ln in downloads)
    assert "pip" in downloads[0].split() and '"setuptools>=68"' in downloads[0]  # for the offline editable build
    assert f"--index-url {url} torch==2.13.0" in downloads[1]
    # the project's requirements (written from pyproject.toml) with the torch just downloaded in reach
    assert f"--find-links {wh} torch==2.13.0 -r {wh}/requirements.txt" in downloads[2]
    req_line = next(ln for ln in lines if "requirements.txt" in ln and "tomllib" in ln)
    cmd = req_line.replace(f"> {wh}/requirements.txt", "")
    reqs = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True, timeout=60).stdout.split("\n")
    import tomllib

    project = tomllib.loads(open(os.path.join(REPO, "pyproject.toml")).read())["project"]
    assert [r for r in reqs if r] == project["dependencies"] + project["optional-dependencies"]["dev"]
