"""The embedded model: held-out accuracy floors, findable structure, reproducible training."""

import re
from pathlib import Path

import pytest
import torch

from circuitlib.causal import top_vs_random
from circuitlib.metrics import accuracy, evaluate
from circuitlib.patching import act_patch_heads
from circuitlib.scoring import static_scores
from circuitlib.tasks import capital_batch, report_tasks, task_batch

N = 200
TASKS = ("ioi", "colored_objects", "capitals")  # the three floor tasks (the report's tasks)


@pytest.fixture(scope="module")
def model(toy):
    return toy


@pytest.fixture(scope="module")
def batches(model):
    return {t: task_batch(t, model.tokenizer, N, seed=11) for t in TASKS}


def test_the_floor_tasks_are_the_report_tasks():
    assert report_tasks() == TASKS


def test_heldout_accuracy_floors(model, batches):
    for task, batch in batches.items():
        assert batch.meta["split"] == "heldout"
        r = evaluate(model, batch)
        assert r["accuracy"] >= 0.95, (task, r)
        assert r["logit_diff"] > 0 and r["corrupt_logit_diff"] < r["logit_diff"]


def test_capital_accuracy_holds_in_every_template(model):
    from circuitlib.tasks import CAPITAL_TEMPLATES

    for template in CAPITAL_TEMPLATES:
        b = capital_batch(model.tokenizer, 60, templates=[template], seed=5)
        # custom template lists have no held-out split: these are mixed seen/unseen combinations
        assert accuracy(model(b.clean), b) >= 0.9, template


def _important_heads(model, batch, n: int = 3) -> list:
    """The n heads whose activation patching (noising, all positions) hurts the logit difference most."""
    return act_patch_heads(model, batch, direction="noising").top(n)  # score = 1 - normalised patched metric


def _check_ablation_floor(model, batch, *, skip: frozenset = frozenset()) -> None:
    """The embedded model's ablation floor, stated once (issue 2, kept by issues 9 and 13), with the
    library's controls (:func:`circuitlib.causal.top_vs_random`: live heads by OV weight norm):

    - the task's top-3 heads (activation patching), mean-ablated at every position (means over the
      corrupted prompts, BOS excluded), drop its top-1 accuracy by >= 0.5;
    - sets of 3 live heads from outside the top 3 cost < 0.1 top-1 and two-way accuracy on average
      (every such set when there are few);
    - after ablating the top 3, the two-way accuracy (chance 0.5) is not above chance: a one-sided
      exact binomial test does not reject 0.5 at the 0.05 level.
    """
    r = top_vs_random(model, batch, _important_heads(model, batch))
    assert r.clean["accuracy"] >= 0.95 and r.clean["top1_accuracy"] >= 0.95, r
    assert r.drop_top["top1_accuracy"] >= 0.5, r
    assert r.n_random > 0, f"no random control set could be drawn ({r.random_how}): the floor cannot be checked"
    for name in sorted({"random", "chance"} - skip):
        assert FLOOR_HOLDS[name](r), (name, r)


FLOOR_HOLDS = {  # the last two floors of _check_ablation_floor, by name
    "random": lambda r: r.drop_random["top1_accuracy"] < 0.1 and r.drop_random["accuracy"] < 0.1,
    "chance": lambda r: r.binomial_p_above_chance >= 0.05,
}
# Floors the shipped model misses (model card, "Floors"), with these controls (live heads by OV weight norm: 20;
# layer-matched random 3-sets). IOI: random 3-sets cost 0.16 top-1 accuracy (0.01 two-way): the pool holds heads
# that bring both names to END, so removing three lowers IO and S together. Colored Objects: its circuit is longer
# than its top 3, random 3-sets cost 0.11 top-1. Capitals: with its top 3 ablated, two-way accuracy stays at 0.90
# (MAPS capital heads 0.6 and 0.7 are not among them), although top-1 drops by 0.67.
MISSED = {("ioi", "random"), ("colored_objects", "random"), ("capitals", "chance")}


@pytest.mark.parametrize("task", TASKS)
def test_floor_top3_heads_matter_random_heads_do_not(model, batches, task):
    _check_ablation_floor(model, batches[task], skip=frozenset(f for t, f in MISSED if t == task))


@pytest.mark.xfail(strict=True, reason="known misses of the shipped model (model card): strict, so meeting a floor "
                   "fails this test until its entry leaves MISSED")
@pytest.mark.parametrize("task,floor", sorted(MISSED))
def test_missed_floors_are_still_missed(model, batches, task, floor):
    assert FLOOR_HOLDS[floor](top_vs_random(model, batches[task], _important_heads(model, batches[task])))


def test_a_capital_head_is_visible_to_maps(model, batches):
    """Some head scores >= 0.5 on MAPS country -> capital and is among the capital task's top heads."""
    maps = static_scores(model, "country_to_capital_wikidata")
    strong = {h for h in maps.top(maps.n_layers * maps.n_heads) if maps[h] >= 0.5}
    assert strong & set(_important_heads(model, batches["capitals"])), maps.scores


def test_shipped_checkpoint_was_trained_with_the_recipe_defaults():
    """What the slow retraining test retrains is what shipped: the recipe saved with the checkpoint equals
    the command line's defaults (a recipe without a mix used the corpus's default MIX)."""
    import json

    from circuitlib.models import TOY_DIR
    from circuitlib.toy.corpus import MIX, STAGES
    from circuitlib.toy.train import build_parser

    shipped = json.loads((TOY_DIR / "config.json").read_text())["training"]
    defaults = vars(build_parser().parse_args([]))
    defaults["mix"] = defaults["mix"] or MIX
    defaults["stages"] = STAGES if defaults["stages"] is None else json.loads(defaults["stages"])
    shipped = dict(shipped, mix=shipped.get("mix") or MIX)
    core = ("steps", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "lr", "head_l1", "l1_start", "l1_ramp", "mix",
            "stages", "threads")
    differ = {k: (shipped.get(k), defaults[k]) for k in core if shipped.get(k) != defaults[k]}
    differ |= {k: (v, defaults[k]) for k, v in shipped.items() if k in defaults and k not in ("seed", "out")
               and k not in core and v != defaults[k]}
    assert not differ, f"shipped recipe vs train.py defaults (shipped, default): {differ}"


def _naive_ablated_end_logits(model, batch, heads, means):
    """Reference for floors.ablated_many: one plain hook per layer, one head set, a Python loop over heads."""
    def hook(z, hook):
        z = z.clone()
        for l, h in heads:
            if l == hook.layer():
                z[:, 1:, h] = means[l, h]
        return z

    logits = model.run_with_hooks(batch.clean, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook) for l, _ in heads])
    return logits[torch.arange(len(batch)), batch.end]


def test_floors_ablation_matches_a_plain_hook(model):
    """floors.ablated_many (several head sets per forward pass) equals one plain hook per set; the
    means are the corrupted prompts' real non-BOS tokens (recomputed here from a cache)."""
    from circuitlib.toy import floors as fl

    b = task_batch("colored_objects", model.tokenizer, 12, seed=2)
    means = fl.head_means(model, b)
    _, cache = model.run_with_cache(b.corrupt)
    for l, h in ((0, 3), (2, 5)):
        zs = [cache[f"blocks.{l}.attn.hook_z"][i, 1 : int(b.end[i]) + 1, h] for i in range(len(b))]
        torch.testing.assert_close(means[l, h], torch.cat(zs).mean(0))
    sets = [[], [(0, 1)], [(0, 1), (1, 2), (2, 7)], [(1, 0), (1, 4)]]
    with torch.no_grad():
        got = fl.ablated_many(model, b, sets, means, chunk=3)
        for heads, g in zip(sets, got):
            torch.testing.assert_close(g, _naive_ablated_end_logits(model, b, heads, means), atol=1e-4, rtol=1e-4)
        clean = model(b.clean)[torch.arange(len(b)), b.end]
    m = fl.end_metrics(got[0], b)
    ref = evaluate(model, b)
    torch.testing.assert_close(got[0], clean, atol=1e-4, rtol=1e-4)
    assert m["accuracy"] == ref["accuracy"] and m["top1"] == ref["top1_accuracy"]
    assert abs(m["logit_diff"] - ref["logit_diff"]) < 1e-4


def test_penalty_schedule_by_hand():
    from circuitlib.toy.train import penalty_weight

    # 1000 steps, off for the first 40%, ramped in over the next 20%
    got = [penalty_weight(s, 1000, 0.02, 0.4, 0.2) for s in (0, 399, 400, 500, 600, 999)]
    assert got == pytest.approx([0.0, 0.0, 0.0, 0.01, 0.02, 0.02])
    assert penalty_weight(0, 1000, 0.02) == 0.02  # no warm-up: on from the start


def test_training_a_few_steps_lowers_the_loss():
    from circuitlib.toy.train import train

    _, losses = train(steps=30, batch_size=32, n_sentences=2000, progress=False, stages=[])
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_command_line_saves_the_whole_recipe(tmp_path):
    """A tiny run of the command line: MLPs in block 1 only (the others zeroed and frozen), a custom mix,
    a one-stage curriculum; every option lands in config.json's ``training``."""
    import json

    from circuitlib.models import load_checkpoint
    from circuitlib.toy.train import main

    argv = ["--steps", "4", "--batch-size", "8", "--n-sentences", "300", "--n-layers", "2", "--d-mlp", "64",
            "--mlp-layers", "1", "--mix", '{"colored": 1.0}', "--l1-start", "0.5", "--l1-ramp", "0.25",
            "--lr", "1e-3", "--threads", "1", "--log-every", "2", "--out", str(tmp_path),
            "--stages", '[{"mix": {"gap2": 1.0}, "gate": "gap2", "acc": 1.0, "max": 3}]']
    main(argv)
    tr = json.loads((tmp_path / "config.json").read_text())["training"]
    assert {k: tr[k] for k in ("steps", "n_layers", "d_mlp", "mlp_layers", "mix", "l1_start", "l1_ramp", "lr",
                               "threads", "batch_size", "n_sentences", "stages")} == {
        "steps": 4, "n_layers": 2, "d_mlp": 64, "mlp_layers": [1], "mix": {"colored": 1.0}, "l1_start": 0.5,
        "l1_ramp": 0.25, "lr": 1e-3, "threads": 1, "batch_size": 8, "n_sentences": 300,
        "stages": [{"mix": {"gap2": 1.0}, "gate": "gap2", "acc": 1.0, "max": 3}]}
    assert tr["command"].endswith(" ".join(argv))
    m = load_checkpoint(tmp_path)
    assert not m.cfg.attn_only
    assert all((p == 0).all() for p in m.blocks[0].mlp.parameters())
    assert any((p != 0).any() for p in m.blocks[1].mlp.parameters())


def test_each_stage_runs_until_its_gate_or_its_cap():
    """A stage whose gate is met at once (acc 0) stops at the first check (50 steps); one whose gate a
    barely trained model cannot meet (acc 1) runs its ``max`` steps; the main run follows with ``steps``."""
    from circuitlib.toy.train import train

    stages = [{"mix": {"lookup0": 1.0}, "gate": "lookup0", "acc": 0.0, "max": 500},
              {"mix": {"gap3": 1.0}, "gate": "gap3", "acc": 1.0, "max": 7}]
    _, losses = train(steps=30, batch_size=8, n_sentences=800, progress=False, stages=stages)
    assert len(losses) == 50 + 7 + 30


def test_last_token_accuracy_matches_a_prompt_by_prompt_loop(model):
    """The gate's accuracy on padded batches equals running each sentence alone (unpadded) and checking
    that the argmax at the second-to-last token is the last token. Colored Objects answers (predictable)
    and filler sentences (mostly not) give a mix of hits and misses, so a constant would not pass."""
    from circuitlib.toy.corpus import generate
    from circuitlib.toy.train import encode_corpus, last_token_accuracy

    tok = model.tokenizer
    sents = generate(40, seed=4, mix={"colored": 1.0, "filler": 1.0})
    ids, w = encode_corpus(tok, sents, model.cfg.n_ctx)
    hits = []
    with torch.no_grad():
        for s in sents:
            t = torch.tensor([[tok.bos_token_id] + tok(s.text, add_special_tokens=False)["input_ids"]])
            hits.append(model(t)[0, -2].argmax().item() == t[0, -1].item())
    assert 0 < sum(hits) < len(hits), hits
    assert last_token_accuracy(model, ids, w) == pytest.approx(sum(hits) / len(hits))


def test_gap_recalls_ask_for_the_colour_of_the_queried_object():
    """Each gap sentence lists colour-object pairs, then ``: object``, a gap of 1-3 tokens, and the colour
    that object had in the list (parsed back from the text)."""
    from circuitlib.toy.corpus import build_tokenizer, generate

    tok = build_tokenizer()
    for kind, gap in (("gap1", [":"]), ("gap2", ["Answer", ":"]), ("gap3", ["?", "Answer", ":"])):
        for s in generate(30, seed=2, mix={kind: 1.0}):
            words = s.text.split()
            cut = words.index(":")
            pairs = dict(zip(words[1:cut:2], words[0:cut:2]))  # object -> colour
            assert 2 <= len(pairs) <= 4 and cut == 2 * len(pairs)
            assert words[cut + 2:-1] == gap and words[-1] == pairs[words[cut + 1]], s.text
            assert tok.unk_token_id not in tok(s.text, add_special_tokens=False)["input_ids"], s.text


def test_question_marks_and_q_a_are_words_of_the_training_vocabulary():
    """"?" and the "Q:" / "A:" of the capital and Colored Objects templates are tokens of their own (the
    first embedded models read all three as [UNK])."""
    from circuitlib.toy.corpus import build_tokenizer

    tok = build_tokenizer()
    for text in ("Q: What is the capital of France? A:", "What color is the cup? Answer:"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert len(ids) == len(text.replace("?", " ?").replace(":", " :").split())


@pytest.mark.bad_input
@pytest.mark.parametrize("stages,match", [
    ('{"mix": {"gap1": 1}}', "give a list of stages"),
    ('[{"mix": {"gap1": 1}, "gate": "gap9", "acc": 0.9, "max": 10}]', "stage 0 .* with kinds among"),
    ('[{"mix": {"gap1": 1}, "gate": "gap1", "acc": 1.5, "max": 10}]', r"acc.*in \[0, 1\]"),
])
def test_a_malformed_curriculum_is_one_clear_error(stages, match, capsys):
    from circuitlib.toy.train import main

    with pytest.raises(SystemExit):
        main(["--steps", "4", "--stages", stages])
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err, err


def test_floors_and_card_run_end_to_end_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    """floors() on a 3-step, 2-layer checkpoint (few prompts and draws): a typed result that survives JSON,
    whose accuracies are circuitlib.metrics.evaluate's on the same batches, and a card rendered from it."""
    import json

    from circuitlib.models import load_checkpoint
    from circuitlib.toy import card
    from circuitlib.toy import floors as fl
    from circuitlib.toy.train import main

    main(["--steps", "3", "--batch-size", "8", "--n-sentences", "200", "--n-layers", "2", "--n-heads", "4",
          "--threads", "1", "--stages", "[]", "--out", str(tmp_path)])
    monkeypatch.setattr(fl, "N", 12)
    monkeypatch.setattr(fl, "N_DRAWS", 5)
    res = fl.floors(tmp_path)
    assert fl.Floors.from_dict(json.loads(res.to_json())) == res
    model = load_checkpoint(tmp_path)
    for t, b in fl.batches(model.tokenizer, 12, fl.SEED).items():
        assert res.tasks[t] == pytest.approx(evaluate(model, b)), t
    assert res.live.n == len(res.live.heads) and list(res.floors) == list(fl.FLOOR_NAMES)
    assert all(a.n_draws in (0, 5) for a in res.ablation.values())
    md = card.render(model, res.to_dict(), {"t": 1.0}, ["(no discovery)"], [res.to_dict()])
    assert f"**Live heads: {res.live.n} of 8.**" in md and md.count(f"| {res.training['seed']} | ") == 2  # the seed rows


def test_a_short_training_run_is_deterministic_for_a_seed():
    """Two runs with the same seed give bit-identical weights and losses; another seed differs; the
    global deterministic-algorithms setting is left as it was."""
    from circuitlib.toy.train import train

    before = torch.are_deterministic_algorithms_enabled()
    kw = dict(steps=8, batch_size=16, n_sentences=400, progress=False,
              stages=[{"mix": {"lookup0": 1.0}, "gate": "lookup0", "acc": 1.0, "max": 3}])
    a, la = train(seed=3, **kw)
    b, lb = train(seed=3, **kw)
    c, _ = train(seed=4, **kw)
    assert torch.are_deterministic_algorithms_enabled() == before
    assert la == lb
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


RECORDED = Path(__file__).parent.parent / "docs" / "exp13" / "floors" / "s7"  # floors of session 7's runs R17s0-2


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retraining_reproduces_the_floors(tmp_path, seed):
    """The recipe, not only the shipped checkpoint: retrain with the command line's defaults and ``seed``
    (~25 min on one core, plus ~3 min of floors), then check through :func:`circuitlib.toy.floors.floors`:

    - the CI floors on every seed (thresholds are the issue's, written here so that no module constant can
      loosen them): held-out accuracy >= 0.95 on every task, checkpoint < 10 MB, <= 30 min of CPU;
    - the floor every seed meets: heads with MAPS capital score >= 0.5 carry capitals (drop >= 0.5);
    - which of the issue's 9 floors are met equals what session 7 recorded for that seed (runs of the
      experiment code, ``docs/exp13/floors/s7/R17s<seed>.json``; the model card's seeds table): so a recipe change
      that meets another floor, or loses one, fails here;
    - seed 2 (the default) gives the shipped weights bit for bit.
    """
    import json

    from circuitlib.models import TOY_DIR
    from circuitlib.toy.floors import floors, weights_sha256
    from circuitlib.toy.train import main

    main(["--seed", str(seed), "--out", str(tmp_path)])
    res = floors(tmp_path)
    (tmp_path / "floors.json").write_text(res.to_json(indent=1))
    report = {"tasks": res.tasks, "live": res.live.heads, "ablation": res.to_dict()["ablation"], "maps": res.maps}
    assert res.size_mb < 10
    assert res.training["cpu_seconds"] <= 30 * 60, res.training
    for t in TASKS:
        assert res.tasks[t]["accuracy"] >= 0.95, (t, report)
    assert res.maps.capital_heads_causal and res.maps.causal_ablated_drop_top1 >= 0.5, report
    recorded = json.loads((RECORDED / f"R17s{seed}.json").read_text())
    assert res.floors == recorded["floors"], report
    if seed == 2:
        assert weights_sha256(tmp_path) == weights_sha256(TOY_DIR)
