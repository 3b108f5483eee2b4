"""The Colored Objects task (Merullo et al. 2024) and its place in the embedded model's corpus."""

import re

import pytest

from circuitlib.models import gpt2_tokenizer
from circuitlib.tasks import TASK_SPECS, colored_objects_batch, report_tasks, task_batch
import zlib
from circuitlib.tasks.colored_objects import COLORED_TEMPLATES, COLORS, ITEMS, SURFACES
from circuitlib.toy.corpus import build_tokenizer, generate


@pytest.fixture(scope="module", params=["toy", "gpt2"])
def tokenizer(request):
    return build_tokenizer() if request.param == "toy" else gpt2_tokenizer()


def _parse(template: str, text: str) -> dict[str, str] | None:
    """The slot fillers of ``text`` read with ``template`` as a regex (None if it does not match)."""
    rx = re.escape(template)
    for tag in ("S", "Q", "C1", "C2", "C3", "O1", "O2", "O3"):
        rx = rx.replace(re.escape(f"[{tag}]"), f"(?P<{tag}>\\w+)")
    m = re.fullmatch(rx + r"(?: (?P<answer>\w+))?", text)
    return m.groupdict() if m else None


def test_batch_positions_answers_and_corruption(tokenizer):
    b = colored_objects_batch(tokenizer, 40, seed=3)
    assert b.task == "colored_objects" and b.clean.shape == b.corrupt.shape and b.meta["split"] == "heldout"
    for i in range(len(b)):
        clean, corrupt = b.clean[i], b.corrupt[i]
        diff = (clean != corrupt).nonzero().flatten().tolist()
        assert diff == [int(b.positions["QOBJ"][i])]  # only the queried object changes
        assert clean[b.positions["OBJ"][i]] == clean[b.positions["QOBJ"][i]]
        assert clean[b.positions["COLOR"][i]] == b.answer[i]  # the colour is said right before its object
        assert b.positions["COLOR"][i] + 1 == b.positions["OBJ"][i]
        assert b.answer[i] != b.wrong[i] and b.wrong[i] in clean.tolist()
        # the wrong answer is the colour of the object the corrupt prompt asks about
        asked = corrupt[b.positions["QOBJ"][i]]
        where = (clean == asked).nonzero().flatten().tolist()
        assert len(where) == 1 and clean[where[0] - 1] == b.wrong[i]
        assert b.positions["END"][i] == (clean != b.pad_id).nonzero().max()
    # the answer read back from the text: the word before the queried object in the list
    for prompt, template, answer in zip(b.prompts, b.template, b.answer):
        f = _parse(template, prompt)
        q = [f["O1"], f["O2"], f["O3"]].index(f["Q"])
        assert tokenizer.decode([int(answer)]).strip() == [f["C1"], f["C2"], f["C3"]][q]
    assert task_batch("colored_objects", tokenizer, 4).task == "colored_objects"


def test_words_are_single_tokens_for_both_tokenizers(tokenizer):
    for w in COLORS + ITEMS + SURFACES:
        assert len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1, w


def test_registered_between_ioi_and_capitals_without_a_maps_relation():
    assert report_tasks() == ("ioi", "colored_objects", "capitals")
    spec = TASK_SPECS["colored_objects"]
    assert spec.in_report and spec.relation is None and spec.build is colored_objects_batch


def _held_surface(template: str) -> str:
    # the split written out by hand: one surface per template, CRC32 of the template text
    return SURFACES[zlib.crc32(template.encode()) % len(SURFACES)]


def test_heldout_surfaces_never_in_the_corpus_and_every_colour_object_pair_is_trained_in_every_position():
    tok = build_tokenizer()
    b = colored_objects_batch(tok, 40, seed=3)
    train = colored_objects_batch(tok, 40, seed=3, split="train")
    for batch, held in ((b, True), (train, False)):
        for prompt, template in zip(batch.prompts, batch.template):
            assert (_parse(template, prompt)["S"] == _held_surface(template)) == held
    # the held-out split has no position prior: every queried position occurs in it
    assert {[f["O1"], f["O2"], f["O3"]].index(f["Q"]) for f in (_parse(t, p) for p, t in zip(b.prompts, b.template))} == {0, 1, 2}
    sentences = generate(20000, seed=0)
    corpus = [s.text for s in sentences if s.kind == "colored"]
    assert len(corpus) > 3000
    triples = set()
    for text in corpus:
        (template, f), = [(t, f) for t in COLORED_TEMPLATES if (f := _parse(t, text))]
        objects, colors = [f["O1"], f["O2"], f["O3"]], [f["C1"], f["C2"], f["C3"]]
        q = objects.index(f["Q"])
        assert f["answer"] == colors[q], text
        assert f["S"] != _held_surface(template), text
        triples |= {(o, c, i) for i, (o, c) in enumerate(zip(objects, colors))}
    assert triples == {(o, c, i) for o in ITEMS for c in COLORS for i in range(3)}
    # the warm-up's list-then-answers sentences use no surface any template holds out
    held = {_held_surface(t) for t in COLORED_TEMPLATES}
    lookups = [s.text for s in sentences if s.kind == "lookup"]
    assert lookups and all(text.split()[2] not in held for text in lookups)


@pytest.mark.bad_input
def test_split_errors_are_one_clear_error(monkeypatch):
    from circuitlib.tasks import colored_objects as co

    tok = build_tokenizer()
    with pytest.raises(ValueError, match="unknown split"):
        colored_objects_batch(tok, 4, split="test")
    # one surface left: it is every template's held-out surface, so no training prompt exists
    monkeypatch.setattr(co, "SURFACES", ["desk"])
    with pytest.raises(ValueError, match=r"split='train' needs \(template, surface\) combinations"):
        colored_objects_batch(tok, 4, split="train")
    assert len(colored_objects_batch(tok, 4)) == 4
