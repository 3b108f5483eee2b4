"""Tasks and relation sets: templates, positions, corruptions, the MAPS single-token filter."""

import re

import pytest
import torch

from circuitlib.models import gpt2_tokenizer
from circuitlib.tasks import (
    ABBA_TEMPLATES,
    BABA_TEMPLATES,
    CAPITAL_TEMPLATES,
    RelationError,
    capital_batch,
    copying_batch,
    default_k,
    ioi_batch,
    load_relation,
    read_relation,
    relation_names,
    relation_table,
    task_batch,
)
from circuitlib.tasks.capitals import heldout_template
from circuitlib.toy.corpus import build_tokenizer, generate
from circuitlib.types import TaskBatch


@pytest.fixture(scope="module", params=["toy", "gpt2"])
def tokenizer(request):
    return build_tokenizer() if request.param == "toy" else gpt2_tokenizer()


def test_wang_templates():
    assert len(BABA_TEMPLATES) == len(ABBA_TEMPLATES) == 15
    for baba, abba in zip(BABA_TEMPLATES, ABBA_TEMPLATES):
        # ABBA swaps the first two names; the rest of the sentence is identical.
        assert baba.index("[B]") < baba.index("[A]") and abba.index("[A]") < abba.index("[B]")
        assert baba.replace("[A]", "#").replace("[B]", "#") == abba.replace("[A]", "#").replace("[B]", "#")


@pytest.mark.parametrize("corruption", ["ABC", "flip"])
def test_ioi_positions_and_corruptions(tokenizer, corruption):
    b = ioi_batch(tokenizer, 60, corruption=corruption, seed=3)
    rows = torch.arange(len(b))
    # IO / S1 / S2 tokens sit where the positions say
    assert (b.clean[rows, b.positions["IO"]] == b.answer).all()
    assert (b.clean[rows, b.positions["S1"]] == b.wrong).all() and (b.clean[rows, b.positions["S2"]] == b.wrong).all()
    assert (b.positions["S1"] < b.positions["S2"]).all() and (b.positions["S2"] < b.end).all()
    # prompts have different lengths: END is each prompt's own last token, followed only by padding
    assert len(set(b.end.tolist())) > 1
    for i in range(len(b)):
        assert (b.clean[i, b.end[i] + 1 :] == b.pad_id).all()
    # corruption changes exactly the S2 token
    diff = b.clean != b.corrupt
    assert (diff.sum(1) == 1).all() and diff[rows, b.positions["S2"]].all()
    s2_new = b.corrupt[rows, b.positions["S2"]]
    if corruption == "flip":
        assert (s2_new == b.answer).all()
    else:
        assert ((s2_new != b.answer) & (s2_new != b.wrong)).all()
    assert (b.answer != b.wrong).all()
    assert (b.clean[:, 0] == tokenizer.bos_token_id).all()


def test_ioi_uses_every_template_and_alternates_baba_abba(tokenizer):
    b = ioi_batch(tokenizer, 60, split="any")
    io_first = (b.positions["IO"] < b.positions["S1"]).tolist()
    assert io_first[:15] == [False] * 15 and io_first[15:30] == [True] * 15


def test_capital_batch(tokenizer):
    b = capital_batch(tokenizer, 40, seed=2)
    rows = torch.arange(len(b))
    assert (b.clean[rows, b.positions["COUNTRY"]] != b.corrupt[rows, b.positions["COUNTRY"]]).all()
    assert ((b.clean != b.corrupt).sum(1) == 1).all()
    assert (b.answer != b.wrong).all()
    templates = {p.replace(w, "[C]") for p, w in zip(b.prompts, _countries(b))}
    assert len(templates) >= 3


def _countries(b: TaskBatch) -> list[str]:
    from circuitlib.tasks.capitals import country_capital_pairs

    countries = [c for c, _ in country_capital_pairs()]
    return [next(c for c in countries if c in re.findall(r"\w+", p)) for p in b.prompts]


def test_heldout_split_is_disjoint_from_training_corpus():
    tok = build_tokenizer()
    train_texts = {s.text for s in generate(20000, seed=0)}
    held = capital_batch(tok, 100, split="heldout")
    for prompt, country in zip(held.prompts, _countries(held)):
        assert heldout_template(country).replace("[C]", country) == prompt
        assert not any(t.startswith(prompt + " ") for t in train_texts if country in t)
    ioi = ioi_batch(tok, 60, split="heldout")
    assert not any(t.startswith(p + " ") for p in ioi.prompts for t in train_texts)


def test_task_batch_dispatch_and_errors(tokenizer):
    assert task_batch("ioi", tokenizer, 4).task == "ioi"
    assert task_batch("capitals", tokenizer, 4).task == "capitals"
    with pytest.raises(ValueError, match="unknown task"):
        task_batch("colored_objects", tokenizer)
    with pytest.raises(ValueError, match="unknown IOI corruption"):
        ioi_batch(tokenizer, 4, corruption="XYZ")


def test_clean_corrupt_length_mismatch_is_one_clear_error():
    b = ioi_batch(build_tokenizer(), 4)
    with pytest.raises(ValueError, match="same shape"):
        TaskBatch("ioi", b.clean, b.corrupt[:, :-1], b.answer, b.wrong, b.positions, b.prompts,
                  b.corrupt_prompts, b.pad_id)


def test_sub_batch_trims_padding():
    b = ioi_batch(build_tokenizer(), 30)
    short = int(b.end.argmin())
    sub = b[[short]]
    assert sub.clean.shape == (1, int(b.end[short]) + 1) and sub.prompts == [b.prompts[short]]


# ---- relations --------------------------------------------------------------------------------


def test_twenty_relations_with_provenance():
    from circuitlib.tasks.relations import DATA_DIR

    names = relation_names()
    assert len(names) == 20
    assert (DATA_DIR / "PROVENANCE.md").exists()
    for name in names:
        assert (DATA_DIR / f"{name}.source.txt").exists() or name == "year_to_following"
        assert all(len(p) == 2 for p in read_relation(name))


def test_maps_filter_matches_definition_on_gpt2():
    tok = gpt2_tokenizer()
    p = load_relation("country_to_capital_wikidata", tok)
    raw = read_relation("country_to_capital_wikidata")
    one = lambda w: len(tok.encode(" " + w, add_special_tokens=False)) == 1  # noqa: E731
    expected = [(s, t) for s, t in raw if one(s) and one(t)]
    assert list(zip(p.src_words, p.tgt_words)) == expected
    assert p.total == len(raw) and len(p) + len(p.dropped) == len(raw)
    assert p.src.tolist() == [tok.encode(" " + s, add_special_tokens=False)[0] for s, _ in expected]
    assert ("Argentina", "Buenos Aires") in p.dropped


def test_word_level_unknown_words_are_dropped_not_unk():
    tok = build_tokenizer()
    p = load_relation("name_copying", tok)
    assert tok.unk_token_id not in p.src.tolist()
    table = {r["relation"]: r for r in relation_table(tok)}
    assert table["country_to_capital_wikidata"]["valid"] and table["name_copying"]["valid"]
    assert not table["year_to_following"]["valid"]


def test_k_defaults():
    assert default_k("name_copying") == 1 and default_k("general_copying_english_500") == 1
    assert default_k("country_to_capital_wikidata") == 10


def test_too_few_pairs_is_one_clear_error():
    with pytest.raises(RelationError, match=r"'year_to_following' keeps 0 of 700 pairs .* fewer than the 30"):
        load_relation("year_to_following", build_tokenizer())
    with pytest.raises(RelationError, match="unknown relation 'capitals'"):
        load_relation("capitals", build_tokenizer())
    # the threshold is configurable
    assert len(load_relation("verb_past_tense", gpt2_tokenizer(), min_pairs=200, check=False)) == 112
    with pytest.raises(RelationError, match="fewer than the 200"):
        load_relation("verb_past_tense", gpt2_tokenizer(), min_pairs=200)


def test_capital_templates_count():
    assert len(CAPITAL_TEMPLATES) >= 3


def test_copying_batch_repeats_a_name_list(tokenizer):
    b = copying_batch(tokenizer, 40, seed=2)
    assert b.task == "copying" and len(b) == 40
    rows = torch.arange(len(b))
    # the answer's first mention sits at FIRST; the corrupt prompt swaps exactly that token for the wrong name
    assert (b.clean[rows, b.positions["FIRST"]] == b.answer).all()
    diff = b.clean != b.corrupt
    assert (diff.sum(1) == 1).all() and diff[rows, b.positions["FIRST"]].all()
    assert (b.corrupt[rows, b.positions["FIRST"]] == b.wrong).all()
    for i, prompt in enumerate(b.prompts):
        first, second = prompt.split(" , ")
        assert first.split()[:-1] == second.split()  # the list is cut right before its last name
        assert tokenizer.decode([int(b.wrong[i])]).strip() not in prompt.split()
    assert {len(p.split(" , ")[0].split()) for p in b.prompts} == {2, 3, 4, 5}
    assert task_batch("copying", tokenizer, 4).task == "copying"
    with pytest.raises(ValueError, match="lengths"):
        copying_batch(tokenizer, 4, lengths=(3, 2))
