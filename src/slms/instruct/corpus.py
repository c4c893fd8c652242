"""The embedded instruction corpus: requests that name a story's details, paired with the story.

`slms.corpus` draws each story from a name, an object, a place and a plot (`story_with_facts`);
a request names some of those that the story really contains, in one of several wordings
("Write a story about ...", "Tell me a story where ...", "Words: ..."). Everything is a pure
function of (count, seed), so the whole fine-tuning path runs offline and reproducibly.

Held out: a seeded hash of the combination (name, object, place) puts about one combination in
`HELD_OUT_SHARE` aside. Stories whose combination is held out are never fine-tuned on; the
held-out requests come from them and name all three, so every held-out request asks for a
combination that no fine-tuning conversation contains.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from slms.corpus import TOY_ADJS, story_with_facts

DEFAULT_CONVERSATIONS = 6000
HELD_OUT_SHARE = 8  # one (name, object, place) combination in 8 is held out
ELEMENTS = ("name", "object", "place", "words")
# each plot of slms.corpus (its template's name) in the words a request uses
PLOTS = {"lost_object": "losing a toy", "sharing": "sharing", "brave": "being brave",
         "helping": "helping a friend", "trip": "a trip", "lesson": "learning a lesson",
         "making": "making something", "new_friend": "making a new friend"}


@dataclass(frozen=True)
class Request:
    """A request, the story that answers it, and what the request asks for: element -> the
    phrases an answer must contain (name, object, place: one each; words: each listed word)."""

    text: str
    story: str
    wants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    combination: tuple[str, ...] = ()  # the story's (name, toy, place), named or not

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text},
                {"role": "assistant", "content": self.story}]


def place_key(place: str) -> str:
    """The words of a place that an answer must contain: "in the park" -> "park",
    "at Grandma's house" -> "Grandma's house"."""
    words = place.split(" ", 1)[1]
    return words[4:] if words.startswith("the ") else words


def contains(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words, ignoring case."""
    return re.search(r"(?<![A-Za-z])" + re.escape(phrase) + r"(?![A-Za-z])", text,
                     re.IGNORECASE) is not None


def honoured(answer: str, wants: dict[str, tuple[str, ...]]) -> dict[str, bool]:
    """element -> whether `answer` contains every phrase the request asks for there."""
    return {k: all(contains(answer, p) for p in phrases) for k, phrases in wants.items()}


def combination(facts: dict[str, str]) -> tuple[str, str, str]:
    """(name, toy, place) of a story: the object without its adjective, so that "red kite" and
    "kite" are one combination."""
    obj = facts["object"]
    toy = obj.split(" ", 1)[1] if obj.split(" ", 1)[0] in TOY_ADJS else obj
    return facts["name"], toy, facts["place"]


def held_out(facts: dict[str, str]) -> bool:
    """Whether the story's (name, toy, place) combination is held out (about 1 in
    HELD_OUT_SHARE)."""
    key = "|".join(combination(facts)).encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) % HELD_OUT_SHARE == 0


def _hero(facts: dict[str, str], rng: random.Random) -> str:
    return rng.choice([facts["name"], f"a {facts['kind']} named {facts['name']}"])


def _wording(facts: dict[str, str], named: set[str], rng: random.Random) -> str:
    """A request naming `named` (a subset of name, object, place; name always) in a random
    wording."""
    hero, name = _hero(facts, rng), facts["name"]
    obj, place = facts["object"], facts["place"]
    with_obj = f" and {'an' if obj[0] in 'aeiou' else 'a'} {obj}" if "object" in named else ""
    at = f" {place}" if "place" in named else ""
    plot = rng.random() < 0.3
    about = f" about {PLOTS[facts['plot']]}" if plot else ""
    options = [
        f"Write a story{about} about {hero}{with_obj}{at}.",
        f"Tell me a story where {name} plays{at}{with_obj.replace(' and ', ' with ')}.",
        f"Can you tell me a story{about} about {hero}{with_obj}{at}?",
        f"Please write a short story about {hero}." + (
            f" It should have {'an' if obj[0] in 'aeiou' else 'a'} {obj} in it." if "object"
            in named else "") + (f" It takes place {place}." if "place" in named else ""),
        f"I would like a story{about}. The hero is {hero}" + (
            f", there is {'an' if obj[0] in 'aeiou' else 'a'} {obj}" if "object" in named
            else "") + (f", and it happens {place}" if "place" in named else "") + ".",
    ]
    return rng.choice(options)


def _words_request(facts: dict[str, str], named: set[str], rng: random.Random
                   ) -> tuple[str, tuple[str, ...]]:
    """A TinyStoriesInstruct-style constraint request: a Words: line (and a Features: line
    now and then)."""
    words = [facts["name"]]
    if "object" in named:
        words.append(facts["object"])
    if "place" in named:
        words.append(place_key(facts["place"]))
    rng.shuffle(words)
    lines = [f"Words: {', '.join(words)}"]
    if rng.random() < 0.3:
        lines.insert(0, f"Summary: a story about {PLOTS[facts['plot']]}.")
    return "\n".join(lines), tuple(words)


def make_request(story: str, facts: dict[str, str], rng: random.Random, full: bool = False
                 ) -> Request:
    """A request for `story` naming its name and some of its object and place that the text
    contains (`full`: all three; the story must contain them)."""
    present = {"object": contains(story, facts["object"]),
               "place": contains(story, place_key(facts["place"]))}
    if full:
        named = {"name", "object", "place"}
    else:
        named = {"name"} | {k for k, here in present.items() if here and rng.random() < 0.85}
    if rng.random() < 0.25:
        text, words = _words_request(facts, named, rng)
        return Request(text, story, {"words": words}, combination(facts))
    wants: dict[str, tuple[str, ...]] = {"name": (facts["name"],)}
    if "object" in named:
        wants["object"] = (facts["object"],)
    if "place" in named:
        wants["place"] = (place_key(facts["place"]),)
    return Request(_wording(facts, named, rng), story, wants, combination(facts))


def _stories(seed: int, salt: str) -> Iterator[tuple[str, dict[str, str]]]:
    rng = random.Random(f"{salt}-{seed}")
    while True:
        yield story_with_facts(rng)


def instruction_corpus(n: int = DEFAULT_CONVERSATIONS, seed: int = 0) -> list[Request]:
    """`n` fine-tuning requests with their stories (none of a held-out combination)."""
    if n < 1:
        raise ValueError(f"the instruction corpus needs at least 1 conversation, got {n}")
    rng = random.Random(f"requests-{seed}")
    out: list[Request] = []
    for story, facts in _stories(seed, "instruct"):
        if len(out) == n:
            return out
        if not held_out(facts):
            out.append(make_request(story, facts, rng))
    raise AssertionError("unreachable")


def held_out_requests(n: int = 200, seed: int = 0) -> list[Request]:
    """`n` requests of held-out combinations naming name, object and place, each with a story
    of that combination that contains all three (its text is scored for bits per byte)."""
    if n < 1:
        raise ValueError(f"--requests must be at least 1, got {n}")
    rng = random.Random(f"held-out-{seed}")
    out: list[Request] = []
    seen: set[str] = set()
    for story, facts in _stories(seed, "held-out"):
        if len(out) == n:
            return out
        if not held_out(facts):
            continue
        req = make_request(story, facts, rng, full=True)
        if req.text in seen or not all(honoured(story, req.wants).values()):
            continue  # a plot that leaves the object or the place out; a repeated request
        seen.add(req.text)
        out.append(req)
    raise AssertionError("unreachable")
