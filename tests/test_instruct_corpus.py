"""The embedded instruction corpus (slms.instruct.corpus): deterministic, requests name what
their story holds, and the held-out requests ask for combinations no fine-tuning story has."""

from __future__ import annotations

import random

from slms.corpus import generate_story, story_with_facts
from slms.instruct.corpus import (
    contains,
    held_out,
    held_out_requests,
    honoured,
    instruction_corpus,
    place_key,
)


def test_story_with_facts_is_generate_story_from_the_same_draws():
    for seed in range(20):
        story, facts = story_with_facts(random.Random(seed))
        assert story == generate_story(random.Random(seed))
        assert facts["name"] in story
        assert set(facts) == {"name", "kind", "object", "place", "plot"}


def test_seeded_and_deterministic():
    a, b = instruction_corpus(300, seed=3), instruction_corpus(300, seed=3)
    assert a == b
    assert a != instruction_corpus(300, seed=4)
    assert held_out_requests(50, seed=1) == held_out_requests(50, seed=1)


def test_requests_name_only_what_their_story_contains_in_varied_wordings():
    reqs = instruction_corpus(600)
    for r in reqs:
        assert r.wants and all(honoured(r.story, r.wants).values()), r
    starts = {r.text.split(" ")[0] for r in reqs}
    assert {"Write", "Tell", "Words:"} <= starts | {r.text.split("\n")[-1].split(" ")[0]
                                                    for r in reqs}
    kinds = {frozenset(r.wants) for r in reqs}
    assert {frozenset({"name"}), frozenset({"name", "object", "place"}),
            frozenset({"words"})} <= kinds


def test_held_out_combinations_never_in_fine_tuning_stories():
    train = instruction_corpus(2000)
    used = {r.combination for r in train}
    held = held_out_requests(200)
    assert len({r.text for r in held}) == 200
    for r in held:
        assert r.combination not in used
        assert all(honoured(r.story, r.wants).values())
        named = r.wants.get("words") or [p for k in ("name", "object", "place")
                                         for p in r.wants[k]]
        assert len(named) == 3  # name, object and place, as phrases or as Words:


def test_held_out_is_a_share_of_combinations():
    rng = random.Random(0)
    flags = [held_out(story_with_facts(rng)[1]) for _ in range(2000)]
    assert 0.07 < sum(flags) / len(flags) < 0.2


def test_contains_is_whole_words_ignoring_case():
    assert contains("Mia had a Red Kite.", "red kite")
    assert not contains("Tomas ran.", "Tom")
    assert place_key("in the park") == "park"
    assert place_key("at Grandma's house") == "Grandma's house"
    assert honoured("Tom went to the park.", {"name": ("Tom",), "place": ("pond",)}) == {
        "name": True, "place": False}
