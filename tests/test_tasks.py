"""Tasks and relation sets: templates, positions, corruptions, the MAPS single-token filter."""

import contextlib
import re
import signal
import zlib

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
from circuitlib.tasks.ioi import fill
from circuitlib.toy.corpus import build_tokenizer, generate
from circuitlib.types import TaskBatch


@pytest.fixture(scope="module", params=["toy", "gpt2"])
def tokenizer(request):
    return build_tokenizer() if request.param == "toy" else gpt2_tokenizer()


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging) when a builder loops forever."""
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def wang_abba(template: str) -> str:
    """Wang et al.'s ABBA construction as in their ioi_dataset.py: scan the BABA template character by
    character, turn the first clause's "[B]" into "[A]" and its first "[A]" into "[B]", then stop."""
    chars, first_clause = list(template), True
    for j in range(1, len(chars) - 1):
        if "".join(chars[j - 1 : j + 2]) == "[B]" and first_clause:
            chars[j] = "A"
        elif "".join(chars[j - 1 : j + 2]) == "[A]" and first_clause:
            first_clause = False
            chars[j] = "B"
    return "".join(chars)


def test_wang_templates():
    # Wang et al. 2022 (ioi_dataset.py): 15 BABA templates; hand-copied examples below.
    assert len(BABA_TEMPLATES) == len(ABBA_TEMPLATES) == 15 and len(set(BABA_TEMPLATES)) == 15
    assert BABA_TEMPLATES[0] == "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]"
    assert BABA_TEMPLATES[13] == "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]"
    assert BABA_TEMPLATES[14] == "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]"
    # ABBA = BABA with the first [B] and [A] swapped, written out by hand ...
    assert ABBA_TEMPLATES[0] == "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to [A]"
    assert ABBA_TEMPLATES[13] == "The [PLACE] [A] and [B] went to had a [OBJECT]. [B] gave it to [A]"
    # ... and for all 15 by Wang et al.'s own character-level construction
    assert ABBA_TEMPLATES == [wang_abba(t) for t in BABA_TEMPLATES]
    # a filled prompt, by hand: ABBA order, the final IO name cut off
    assert fill(ABBA_TEMPLATES[6], "Mary", "John", "store", "drink") == (
        "When Mary and John got a drink at the store, John decided to give it to")


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


@pytest.mark.parametrize("split", ["any", "heldout"])
def test_ioi_uses_every_template_and_alternates_baba_abba(tokenizer, split):
    b = ioi_batch(tokenizer, 60, split=split)
    abba = (b.positions["IO"] < b.positions["S1"]).tolist()  # read off token positions, not template ids
    for i in range(len(b) - 7):  # every batch of 8 consecutive prompts holds both orders
        assert 0 < sum(abba[i : i + 8]) < 8, f"prompts {i}..{i + 7} are all {'ABBA' if abba[i] else 'BABA'}"
    assert sum(abba) == 30
    # each prompt is its template filled in (checked by a regex over the template text) ...
    for prompt, template in zip(b.prompts, b.template):
        pattern = re.escape(template.rsplit(" [A]", 1)[0])
        for slot in ("A", "B", "PLACE", "OBJECT"):
            pattern = pattern.replace(re.escape(f"[{slot}]"), r"\w+")
        assert re.fullmatch(pattern, prompt), (template, prompt)
    # ... and all 30 templates are used, each twice
    assert sorted(b.template) == sorted(2 * (BABA_TEMPLATES + ABBA_TEMPLATES))


def _crc_heldout(key: str) -> bool:
    return zlib.crc32(key.encode()) % 5 == 0  # the split's definition (one combination in five)


def test_ioi_split_that_cannot_be_met_is_one_clear_error():
    """Three names, none held out with some template: used to loop forever."""
    tok = build_tokenizer()
    names = ["John", "Mary", "Anna"]
    template = next(t for t in BABA_TEMPLATES + ABBA_TEMPLATES
                    if not any(_crc_heldout(f"ioi:{t}:{a}") for a in names))
    with time_limit(20), pytest.raises(ValueError, match="0 of the 3 single-token names") as info:
        ioi_batch(tok, 8, names=names, templates=[template], split="heldout")
    assert template in str(info.value) and "split='any'" in str(info.value)
    assert len(ioi_batch(tok, 8, names=names, templates=[template], split="any")) == 8


@pytest.mark.bad_input
def test_unknown_ioi_split_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown split"):
        ioi_batch(build_tokenizer(), 8, split="test")


def test_capital_split_that_cannot_be_met_is_one_clear_error(monkeypatch):
    """Countries whose held-out template is not the one asked for: used to loop forever."""
    import circuitlib.tasks.capitals as capitals

    tok = build_tokenizer()
    template = CAPITAL_TEMPLATES[0]
    own = lambda c: CAPITAL_TEMPLATES[zlib.crc32(f"capital:{c}".encode()) % 5]  # noqa: E731
    pairs = [(c, cap) for c, cap in capitals.country_capital_pairs() if own(c) != template][:3]
    assert len(capital_batch(tok, 4, split="heldout", templates=[template])) == 4  # all pairs: fine
    monkeypatch.setattr(capitals, "country_capital_pairs", lambda: pairs)
    with time_limit(20), pytest.raises(ValueError, match="0 of the 3 single-token country/capital pairs") as info:
        capital_batch(tok, 4, split="heldout", templates=[template])
    assert template in str(info.value)
    assert len(capital_batch(tok, 4, split="train", templates=[template])) == 4


def test_bounded_draws_end_in_a_named_error():
    from circuitlib.tasks._common import MAX_DRAWS, draw_until

    calls = []
    with pytest.raises(ValueError, match=f"the constraint .no match in {MAX_DRAWS} random draws"):
        draw_until(lambda: calls.append(1), lambda x: False, error="the constraint")
    assert len(calls) == MAX_DRAWS


def _filler_positions(tokenizer, row: torch.Tensor, end: int, words: set[str]) -> list[int]:
    return [p for p in range(end + 1) if tokenizer.decode([int(row[p])]).strip() in words]


@pytest.mark.parametrize("task", ["ioi", "colored_objects", "capitals", "copying"])
def test_prompts_sharing_a_template_id_line_up_position_by_position(tokenizer, task):
    """What per-position template means need: prompts with one template id have the same token count,
    their slot fillers (names, places, objects, countries) at the same positions, as many as the
    template text has slots, and identical tokens everywhere else (clean and corrupt prompts)."""
    from circuitlib.tasks.capitals import country_capital_pairs
    from circuitlib.tasks.colored_objects import COLORS, ITEMS, SURFACES
    from circuitlib.tasks.copying import copy_names
    from circuitlib.tasks.ioi import NAMES, OBJECTS, PLACES

    b = task_batch(task, tokenizer, 60, seed=4)
    words = {"ioi": set(NAMES) | set(PLACES) | set(OBJECTS), "capitals": {c for c, _ in country_capital_pairs()},
             "copying": set(copy_names()), "colored_objects": set(COLORS) | set(ITEMS) | set(SURFACES)}[task]
    assert b.template is not None and len(b.template) == len(b)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(b.template):
        groups.setdefault(t, []).append(i)
    assert max(len(g) for g in groups.values()) >= 2  # there is something to compare
    for template, rows in groups.items():
        n_slots = len(re.findall(r"\[[A-Z0-9]+\]", template)) - (1 if task == "ioi" else 0)  # IOI: last [A] cut
        ends = {int(b.end[i]) for i in rows}
        assert len(ends) == 1, template
        end = ends.pop()
        slots = {tuple(_filler_positions(tokenizer, m[i], end, words)) for m in (b.clean, b.corrupt) for i in rows}
        assert len(slots) == 1, template
        slots = list(slots.pop())
        assert len(slots) == n_slots, (template, slots)
        keep = [p for p in range(end + 1) if p not in slots]
        tokens = torch.cat([b.clean[rows][:, keep], b.corrupt[rows][:, keep]])
        assert (tokens == tokens[0]).all(), template
        # Colored Objects: the queried object's colour and place in the list (COLOR, OBJ) move with the
        # queried slot by design; every other named position is fixed by the template
        fixed = [n for n in b.positions if not (task == "colored_objects" and n in ("COLOR", "OBJ"))]
        for name in fixed:
            assert len({int(b.positions[name][i]) for i in rows}) == 1, (template, name)


def test_template_ids_survive_sub_batches_and_must_match_the_prompts():
    import dataclasses

    b = ioi_batch(build_tokenizer(), 10)
    sub = b[[7, 2]]
    assert sub.template == [b.template[7], b.template[2]] and sub.prompts == [b.prompts[7], b.prompts[2]]
    assert b[2:4].template == b.template[2:4]
    with pytest.raises(ValueError, match="one id per prompt"):
        dataclasses.replace(b, template=b.template[:-1])


def test_capital_batch(tokenizer):
    b = capital_batch(tokenizer, 40, seed=2)
    rows = torch.arange(len(b))
    assert (b.clean[rows, b.positions["COUNTRY"]] != b.corrupt[rows, b.positions["COUNTRY"]]).all()
    assert ((b.clean != b.corrupt).sum(1) == 1).all()
    assert (b.answer != b.wrong).all()
    # prompt i is template i % 5 with its country filled in (countries read back from the text)
    for i, (prompt, country) in enumerate(zip(b.prompts, _countries(b))):
        assert prompt == CAPITAL_TEMPLATES[i % 5].replace("[C]", country) and b.template[i] == CAPITAL_TEMPLATES[i % 5]


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
    # the split is on (template, IO name): no training sentence fills a held-out prompt's template with its IO
    # name, whatever the other slots (read off the corpus text with one regex per template)
    seen = _ioi_template_io_pairs(s.text for s in generate(20000, seed=0) if s.kind == "ioi")
    assert len(seen) > 3000  # the corpus covers most trainable combinations (30 templates x 244 names x 4/5)
    rows = torch.arange(len(ioi))
    io_names = [tok.decode([int(t)]).strip() for t in ioi.answer]
    assert io_names == [tok.decode([int(t)]).strip() for t in ioi.clean[rows, ioi.positions["IO"]]]
    assert not {(t, a) for t, a in zip(ioi.template, io_names)} & seen
    train = ioi_batch(tok, 60, split="train")
    train_names = [tok.decode([int(t)]).strip() for t in train.answer]
    assert sum((t, a) in seen for t, a in zip(train.template, train_names)) >= 30  # the check can see a seen pair


def _ioi_template_io_pairs(texts) -> set[tuple[str, str]]:
    """(template, IO name) of every IOI sentence, matched against the 30 templates written as regexes
    ([A] / [B]: a name, the same name at each mention; [PLACE] / [OBJECT]: a word)."""
    patterns = []
    for t in BABA_TEMPLATES + ABBA_TEMPLATES:
        rx, used = "", set()
        for part in re.split(r"(\[[A-Z]+\])", t):
            slot = part[1:-1] if part.startswith("[") else None
            if slot is None:
                rx += re.escape(part)
            elif slot in used:
                rx += f"(?P={slot})"
            else:
                used.add(slot)
                rx += f"(?P<{slot}>\\w+)"
        patterns.append((t, re.compile(rx)))
    out = set()
    for text in texts:
        hits = [(t, m["A"]) for t, rx in patterns if (m := rx.fullmatch(text))]
        assert len(hits) == 1, text
        out.add(hits[0])
    return out


def test_task_batch_dispatch_and_errors(tokenizer):
    assert task_batch("ioi", tokenizer, 4).task == "ioi"
    assert task_batch("capitals", tokenizer, 4).task == "capitals"
    assert task_batch("colored_objects", tokenizer, 4).task == "colored_objects"
    with pytest.raises(ValueError, match="unknown task"):
        task_batch("colored_shapes", tokenizer)


@pytest.mark.bad_input
def test_unknown_ioi_corruption_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="unknown IOI corruption"):
        ioi_batch(tokenizer, 4, corruption="XYZ")


@pytest.mark.bad_input
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


def test_capital_templates():
    # written out by hand: five templates, one [C] slot each, the answer follows the last word
    assert CAPITAL_TEMPLATES == [
        "The capital of [C] is",
        "The capital city of [C] is",
        "In [C], the capital is",
        "Q: What is the capital of [C]? A:",
        "The government of [C] sits in",
    ]
    assert CAPITAL_TEMPLATES[3].replace("[C]", "France") == "Q: What is the capital of France? A:"


def test_copying_batch_repeats_a_name_list(tokenizer):
    b = copying_batch(tokenizer, 40, seed=2)
    assert b.task == "copying" and len(b) == 40
    rows = torch.arange(len(b))
    # the answer's first mention sits at FIRST; the corrupt prompt swaps exactly that token for the wrong name
    assert (b.clean[rows, b.positions["FIRST"]] == b.answer).all()
    diff = b.clean != b.corrupt
    assert (diff.sum(1) == 1).all() and diff[rows, b.positions["FIRST"]].all()
    assert (b.corrupt[rows, b.positions["FIRST"]] == b.wrong).all()
    comma = tokenizer.encode(" ,", add_special_tokens=False)
    for i, prompt in enumerate(b.prompts):
        first, second = prompt.split(" , ")
        names = first.split()
        assert names[:-1] == second.split()  # the list is cut right before its last name
        assert tokenizer.decode([int(b.wrong[i])]).strip() not in prompt.split()
        # every name, the first one too, is its single " name" token at both mentions (GPT-2 used to
        # encode the text-initial name as another token, or two)
        ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in names]
        expected = [tokenizer.bos_token_id] + sum(ids, []) + comma + sum(ids[:-1], [])
        assert b.clean[i, : int(b.end[i]) + 1].tolist() == expected, prompt
    assert {len(p.split(" , ")[0].split()) for p in b.prompts} == {2, 3, 4, 5}
    assert task_batch("copying", tokenizer, 4).task == "copying"
    with pytest.raises(ValueError, match="lengths"):
        copying_batch(tokenizer, 4, lengths=(3, 2))


# ---- MAPS's causal-check prompts ---------------------------------------------------------------

#: Hand-copied from the MAPS authors' experiment2_causal.py (SETUPS), a few of the 13.
AUTHORS_TEMPLATES = {
    "country_to_capital_wikidata": "The capital of <X> is",
    "name_copying": " John-> John; Donna-> Donna; <X>->",
    "verb_past_tense": " hike->hiked; purchase-> purchased; <X>->",
    "entity_to_pronoun": " mother-> she; father-> he; tribe-> they; actress-> she; apartment-> it; <X>->",
}


@pytest.mark.parametrize("relation", sorted(AUTHORS_TEMPLATES))
def test_maps_causal_prompts_are_the_authors_input_ids_on_gpt2(relation):
    """As the authors' MAPS.calc_causal_effects builds them: every pair kept by MAPS's filter, in file order,
    ``template.replace("<X>", src)`` tokenized as one batch by GPT-2's tokenizer (no BOS), the target the
    single token of " " + target; the corrupted prompt is another pair's, with another target."""
    from circuitlib.tasks.maps_prompts import MAPS_CAUSAL_TEMPLATES, relation_prompt_batch

    tok = gpt2_tokenizer()
    template = AUTHORS_TEMPLATES[relation]
    assert MAPS_CAUSAL_TEMPLATES[relation] == template
    raw = read_relation(relation)
    one = lambda w: len(tok.encode(" " + w, add_special_tokens=False)) == 1  # noqa: E731
    kept = [(s, t) for s, t in raw if one(s) and one(t)]
    prompts = [template.replace("<X>", s) for s, _ in kept]
    ids = tok(prompts).input_ids
    b = relation_prompt_batch(relation, tok, bos=False)
    assert b.clean.tolist() == ids and b.prompts == prompts
    assert b.answer.tolist() == [tok.encode(" " + t, add_special_tokens=False)[0] for _, t in kept]
    assert (b.end == len(ids[0]) - 1).all()
    assert (b.clean[torch.arange(len(b)), b.positions["SRC"]]
            == torch.tensor([tok.encode(" " + s, add_special_tokens=False)[0] for s, _ in kept])).all()
    # the corrupted prompt is another pair's prompt, whose target is the wrong answer and differs from the answer
    where = {p: i for i, p in enumerate(prompts)}
    for j, cp in enumerate(b.corrupt_prompts):
        i = where[cp]
        assert b.corrupt[j].tolist() == ids[i] and int(b.wrong[j]) == int(b.answer[i]) != int(b.answer[j])
    with_bos = relation_prompt_batch(relation, tok, bos=True)
    assert with_bos.clean.tolist() == [[tok.eos_token_id] + row for row in ids]
