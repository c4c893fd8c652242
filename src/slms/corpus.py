"""Embedded default corpus: seeded, deterministic children's stories in the TinyStories manner.

The stories are generated rather than shipped so that the project can train a model with no
download at all. The language is kept simple and regular so that a tiny model learns to write
grammatical English within a few CPU minutes, while eight plot shapes with randomised details
and sentence choices make the corpus far too varied to memorise.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

EOT = "<|endoftext|>"
DEFAULT_STORIES = 6000
DEFAULT_SEED = 0

# Plain word lists are written as split strings to keep the module short.
GIRL_NAMES = tuple(
    "Lily Mia Sue Anna Emma Lucy Sara Amy Zoe Ella Kate Rose Ruby Daisy Molly Jane Lisa Nina Ivy"
    " Grace Sophie Clara Hannah Julia Kim Maya Olive Polly Tess Wendy".split()
)
BOY_NAMES = tuple(
    "Tom Ben Max Sam Tim Jack Leo Jake Bob Joe Dan Finn Noah Luke Ollie Pete Roy Ned Eli Mark"
    " Adam Billy Charlie Danny Henry Kevin Oscar Ryan Toby Will".split()
)
PET_NAMES = tuple(
    "Spot Buddy Fluffy Coco Pip Rex Milo Sunny Patch Tweet Hoppy Bubbles Ginger Pepper"
    " Rusty Snowy Bingo Dot Fuzzy Lucky Socks Peanut Biscuit Button Cookie Honey".split()
)
ANIMALS = tuple(
    "dog cat bird bunny bear duck fox frog mouse puppy kitten owl pig lamb squirrel turtle"
    " monkey".split()
)
HERO_ADJS = tuple("little small kind happy curious playful sweet funny shy cheerful gentle".split())
TOY_ADJS = tuple("red blue green yellow pink purple orange big little shiny new".split())
TOYS = (
    "ball", "kite", "hat", "boat", "car", "doll", "book", "drum", "cup", "box", "bell", "blanket",
    "balloon", "bucket", "scarf", "teddy bear", "toy train", "umbrella", "whistle", "crayon",
    "truck", "puzzle", "robot", "jump rope", "music box", "spinning top",
)
HOBBIES = (
    "sing songs", "dance", "draw pictures", "run in the grass", "read books",
    "look at the stars", "dig in the dirt", "chase butterflies", "jump in puddles",
    "climb trees", "help in the garden", "splash in the water", "play games", "build with blocks",
    "pick flowers", "watch the clouds", "listen to stories", "play with {his} friends",
)
DAYS = ("One day", "One sunny day", "One morning", "One warm afternoon", "One bright day",
        "One cold morning", "One windy day", "One fine day")
# Where play happens, with its preposition, since "in", "on", "at" and "by" vary per place.
PLACES = (
    "in the park", "in the garden", "in the forest", "on the beach", "in the yard",
    "in the meadow", "on the farm", "in the woods", "at the playground", "at Grandma's house",
    "on the big hill", "by the pond", "by the river", "in the school yard",
)
HOMES = (
    "in a small house", "near a big forest", "in a little town", "by the sea", "on a farm",
    "in a cozy home", "near a quiet lake", "in a house with a red door", "in a busy city",
    "at the edge of the woods", "on a quiet street", "near a green field",
)
SPOTS = ("under the big tree", "behind a bush", "next to the bench", "in the tall grass",
         "under a pile of leaves", "near the swings", "behind an old log", "beside a flower pot",
         "under a big rock", "by the gate")
PARENTS = ("mom", "dad", "grandma", "grandpa")
SAD = ("sad", "upset", "worried")
HAPPY = ("happy", "glad", "excited")
# (fear, the brave act that overcomes it, in the past tense)
FEARS = (
    ("the big slide", "climbed up the big slide and slid all the way down"),
    ("the dark", "turned off the light and closed {his} eyes"),
    ("the deep water", "jumped into the water and swam"),
    ("the big dog next door", "walked up to the dog and said hello"),
    ("the loud thunder", "sat by the window and watched the storm"),
    ("the tall tree", "climbed up the tree, one branch at a time"),
    ("the big waves", "ran into the waves and splashed"),
    ("the noisy vacuum", "stood next to the vacuum while it went round and round"),
    ("riding a bike", "got on the bike and rode all the way down the path"),
    ("the old bridge", "walked across the bridge, step by step"),
)
# (trouble, how the hero fixes it)
TROUBLES = (
    ("{fname}'s kite was stuck up in a tall tree",
     "found a long stick and gently pushed the kite down"),
    ("{fname} had fallen down and hurt {fhis} knee",
     "helped {fhim} up and walked with {fhim} slowly to get a bandage"),
    ("{fname} could not reach the apples on the tree",
     "found a box for {fname} to stand on, and soon {fhe} had a big red apple"),
    ("{fname} was stuck in the mud", "pulled and pulled until {fname} was free"),
    ("{fname}'s ball had rolled into the pond",
     "used a long stick to pull the ball out of the water"),
    ("{fname} was lost and could not find the way home",
     "walked with {fname} all the way home, because {he} knew the way"),
    ("{fname} had dropped all {fhis} berries on the ground",
     "helped {fhim} pick up every berry and put them back in the basket"),
    ("{fname} was cold because {fhe} had lost {fhis} scarf",
     "gave {fname} {his} own warm scarf"),
)
# (destination, three things to do there)
TRIPS = (
    ("the beach", ("built a big sand castle", "found pretty shells", "splashed in the waves")),
    ("the zoo", ("saw a tall giraffe", "watched the monkeys play", "heard a lion roar")),
    ("the farm", ("fed the cows", "saw some little pigs", "rode on a big tractor")),
    ("the lake", ("fed the ducks", "went out in a small boat", "threw stones into the water")),
    ("the fair", ("rode on a big wheel", "ate pink candy", "won a little prize")),
    ("the city", ("saw tall buildings", "rode on a red bus", "ate ice cream in the square")),
    ("the mountains", ("climbed a steep path", "saw a big eagle", "had a picnic by a stream")),
    ("the library", ("read a book about dinosaurs", "listened to a story", "drew a picture")),
    ("the museum", ("saw a giant dinosaur", "looked at old paintings", "touched a shiny rock")),
)
TRAVELS = ("They went in the car.", "They took a big bus.", "They rode on a train.",
           "They walked there together.")
# (warning, disobedient act, what went wrong, what the hero learned)
LESSONS = (
    ("Do not run near the pond", "ran fast near the pond",
     "slipped and fell into the cold water", "to be careful near water"),
    ("Do not eat too many cookies", "ate one cookie, then another, and then another",
     "had a big tummy ache", "not to eat too many sweets"),
    ("Do not play ball in the house", "kicked {his} ball in the house",
     "knocked over a cup and broke it", "to play ball outside"),
    ("Stay close to me", "ran off to look at a pretty butterfly",
     "could not find {his} {parent} anywhere", "to stay close"),
    ("Put on your coat", "went out without {his} coat",
     "got very cold and started to shiver", "to listen when someone is trying to help"),
    ("Do not climb the fence", "climbed up the fence anyway",
     "fell down and scraped {his} knee", "that rules keep us safe"),
    ("Wait for me before you cross the street", "ran to the street all alone",
     "saw a big car go by very fast", "to always wait and hold hands"),
    ("Do not leave your toys on the stairs", "left {his} {obj} on the stairs",
     "tripped over it and bumped {his} head", "to put {his} toys away"),
)
# (what to make, the thing made, what went wrong, how it was fixed)
PROJECTS = (
    ("build a tall tower", "tower", "the tower fell down with a big crash",
     "put the blocks back one by one, slowly and carefully"),
    ("bake a cake", "cake", "the flour spilled all over the floor",
     "cleaned it up and started again"),
    ("build a sand castle", "castle", "a big wave came and washed it away",
     "built it again, a little farther from the water"),
    ("paint a picture", "picture", "the paint spilled on the paper",
     "turned the spot into a big yellow sun"),
    ("plant a little garden", "garden", "the seeds did not grow",
     "watered them every day until little green leaves came up"),
    ("make a card for {his} {parent}", "card", "the card tore in half",
     "used some tape to put it back together"),
    ("make a bird house", "bird house", "the roof kept falling off",
     "used a little more glue and held it until it was dry"),
    ("make a paper boat", "boat", "the boat got wet and fell apart",
     "folded a new one from thick paper, and this one could float"),
)
GAMES = ("hide and seek", "tag", "catch", "with blocks", "in the sand", "with a ball",
         "with toy cars", "house", "jump rope")


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _character(rng: random.Random, prefix: str, avoid: str = "") -> dict[str, str]:
    """Draw a named character; pronoun keys carry `prefix` so hero and friend can share a story."""
    # Children and animals are equally common heroes in TinyStories, so neither may dominate.
    roll = rng.random()
    if roll < 0.3:
        kind, names, male = "girl", GIRL_NAMES, False
    elif roll < 0.6:
        kind, names, male = "boy", BOY_NAMES, True
    else:
        kind, names, male = rng.choice(ANIMALS), PET_NAMES, rng.random() < 0.5
    name = rng.choice(names)
    while name == avoid:
        name = rng.choice(names)
    adj = rng.choice(HERO_ADJS) + " " if rng.random() < 0.8 else ""
    he, him, his = ("he", "him", "his") if male else ("she", "her", "her")
    keys = {"name": name, "kind": kind, "a_hero": _a(adj + kind), "he": he, "him": him,
            "his": his, "He": he.capitalize(), "His": his.capitalize()}
    return {prefix + k: v for k, v in keys.items()}


class _Teller:
    """Picks sentences for one story and fills them from the story's shared details."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        ctx = _character(rng, "")
        ctx.update(_character(rng, "f", avoid=ctx["name"]))
        parent, at_place = rng.choice(PARENTS), rng.choice(PLACES)
        obj = rng.choice(TOYS)
        if rng.random() < 0.6:
            obj = f"{rng.choice(TOY_ADJS)} {obj}"
        ctx.update(parent=parent, Parent=parent.capitalize(), at_place=at_place,
                   to_place="to " + at_place.split(" ", 1)[1], obj=obj, a_obj=_a(obj),
                   home=rng.choice(HOMES), sad=rng.choice(SAD), happy=rng.choice(HAPPY),
                   day=rng.choice(DAYS), hobby=rng.choice(HOBBIES).format_map(ctx))
        if rng.random() < 0.5:
            ctx.update(helper=f"{ctx['his']} {parent}", Helper=f"{ctx['His']} {parent}",
                       helper_name=ctx["Parent"])
        else:
            ctx.update(helper=f"{ctx['his']} friend {ctx['fname']}", helper_name=ctx["fname"],
                       Helper=f"{ctx['His']} friend {ctx['fname']}")
        self.ctx = ctx

    def say(self, *options: str) -> str:
        return self.rng.choice(options).format_map(self.ctx)

    def maybe(self, p: float, *options: str) -> str:
        # Always make both draws so the random stream does not depend on the outcome.
        keep = self.rng.random() < p
        text = self.say(*options)
        return text if keep else ""

    def fill(self, **fields: str) -> None:
        """Add story-specific details, formatting each against what is already known."""
        for key, value in fields.items():
            self.ctx[key] = value.format_map(self.ctx)


Paragraphs = list[list[str]]


def _opening(t: _Teller) -> str:
    hobby = t.maybe(0.5, " {He} loved to {hobby}.", " {He} liked to {hobby} every day.",
                    " Most of all, {he} liked to {hobby}.")
    return t.say(
        "Once upon a time, there was {a_hero} named {name}.",
        "Once upon a time, {a_hero} named {name} lived {home}.",
        "There once was {a_hero} named {name}.",
        "{name} was {a_hero} who lived {home}.",
        "Once upon a time, in a small town, there lived {a_hero} named {name}.",
        "Once upon a time, there was {a_hero}. {His} name was {name}.",
    ) + hobby


def _lost_object(t: _Teller) -> Paragraphs:
    p1 = [_opening(t), t.say("{He} had {a_obj} that {he} loved very much.",
                             "{His} favorite toy was {a_obj}.",
                             "{He} loved {his} {obj} more than anything."),
          t.maybe(0.6, "{He} took it with {him} everywhere {he} went.",
                  "{He} played with it every day.",
                  "Every night, {he} put it next to {his} bed.")]
    p2 = [t.say("{day}, {name} took {his} {obj} {to_place}.",
                "{day}, {name} went to play {at_place} with {his} {obj}."),
          t.say("{He} played and played until the sun began to go down.",
                "{He} ran and jumped and had lots of fun."),
          t.say("When it was time to go home, {name} could not find {his} {obj}.",
                "But when {he} looked around, {his} {obj} was gone!",
                "{He} put it down to look at a butterfly, and when {he} came back, it was gone!"),
          t.say("{He} felt very {sad}.", "{name} was very {sad}.", "{His} eyes filled with tears."),
          t.say('"Oh no! Where is my {obj}?" {name} cried.', '"My {obj} is lost!" {he} said.',
                '{name} said, "I lost my {obj}. What will I do?"')]
    near, far, found = t.rng.sample(SPOTS, 3)
    p3 = [t.say("{Helper} saw {him} and came to help.", "Just then, {helper} came by."),
          t.say('"Do not worry," said {helper_name}. "We will find it together."',
                '"I will help you look," said {helper_name}.'),
          f"They looked {near} and {far}.",
          t.say("At last, {name} saw it! The {obj} was " + found + ".",
                "Then {helper_name} found the {obj} " + found + "."),
          t.say('{name} hugged {his} {obj} and said, "Thank you so much, {helper_name}!"',
                '"Thank you!" said {name}, and {he} gave {helper_name} a big hug.'),
          t.say("{He} was so happy.", "{name} felt happy again.", "")]
    p4 = [t.maybe(0.5, "From that day on, {name} always took good care of {his} {obj}.",
                  "{name} learned to keep {his} things close.",
                  "That night, {name} went to sleep with the {obj} right next to {him}.")]
    return [p1, p2, p3, p4]


def _sharing(t: _Teller) -> Paragraphs:
    p1 = [_opening(t), t.say("{He} had {a_obj}.", "{His} {parent} gave {him} {a_obj}."),
          t.say("It was {his} favorite toy.", "{He} loved it very much.", "")]
    p2 = [t.say("{day}, {name} was playing with {his} {obj} {at_place}.",
                "{day}, {name} took {his} {obj} {to_place}."),
          t.say("Then {fa_hero} named {fname} came by.", "{His} friend {fname} came to play."),
          t.say('"Can I play with your {obj} too?" asked {fname}.',
                '{fname} looked at the {obj} and said, "Wow! Can I have a turn?"'),
          t.say('But {name} did not want to share. "No, it is mine!" {he} said.',
                '{name} held the {obj} tight. "No, it is my {obj}," {he} said.'),
          t.say("{fname} felt sad and walked away.", "{fname} looked down and sat alone.")]
    p3 = [t.say("{name} played alone, but it was not fun anymore.",
                "Soon {name} felt bad inside."),
          t.say("{He} saw how sad {fname} was.", "{He} thought about {fname}."),
          t.say('{He} went to {fname} and said, "I am sorry. Let\'s play with it together."',
                '{He} ran to {fname} and said, "Here, you can have a turn."'),
          t.say("{fname} smiled a big smile.", "{fname} was very {happy}."),
          t.say("They took turns and played all day.", "They had so much fun together.")]
    p4 = [t.say("{name} learned that sharing makes playing more fun.",
                '"Sharing is fun!" said {name}.', "Sharing made them both happy."),
          t.maybe(0.4, "From that day on, {name} and {fname} were best friends.")]
    return [p1, p2, p3, p4]


def _brave(t: _Teller) -> Paragraphs:
    fear, act = t.rng.choice(FEARS)
    t.fill(fear=fear, act=act)
    p1 = [_opening(t), t.say("{He} was scared of {fear}.", "{name} was afraid of {fear}."),
          t.say("Every time {he} thought about {fear}, {his} tummy felt funny.",
                "{He} did not even like to think about it.",
                "It made {him} want to run and hide.")]
    p2 = [t.say("{day}, {his} {parent} sat down next to {him}.",
                "{day}, {name} told {his} {parent} how {he} felt."),
          t.say('"You are braver than you think," said {his} {parent}.',
                '"Everyone gets scared sometimes," said {his} {parent}.'),
          t.say('"I will be right here with you."', '"Let\'s try it together."'),
          t.say("{name} took a deep breath.", "{name} held {his} {parent}'s hand."),
          t.say("{He} was still a little scared, but {he} {act}.",
                "Slowly, {name} {act}.")]
    p3 = [t.say("It was not so bad after all!", "It was easier than {he} thought!"),
          t.say('"I did it!" {name} shouted.', '"Look at me!" {he} said with a big smile.'),
          t.say("{name} felt very proud.", "{His} {parent} gave {him} a big hug."),
          t.say("From that day on, {name} was not scared of {fear} anymore.",
                "Now {name} knew that {he} could be brave.")]
    return [p1, p2, p3]


def _helping(t: _Teller) -> Paragraphs:
    trouble, fix = t.rng.choice(TROUBLES)
    t.fill(trouble=trouble, fix=fix)
    p1 = [_opening(t), t.say("{He} had a good friend named {fname}.",
                             "{His} best friend was {fa_hero} named {fname}."),
          t.say("They liked to play {at_place}.", "They played together every day.")]
    p2 = [t.say("{day}, {name} heard someone crying.", "{day}, {name} saw {fname} crying."),
          t.say('"What is wrong, {fname}?" {he} asked.', '{He} ran over and said, "Are you okay?"'),
          t.say("{trouble}."),
          t.say('"Can you help me?" asked {fname}.', '"Please help me," said {fname}.')]
    p3 = [t.say("{name} wanted to help.", '"I will help you!" said {name}.'),
          t.say("{He} thought and thought.", "{He} looked around.", ""),
          t.say("Then {name} {fix}.", "So {name} {fix}."),
          t.say('"Thank you, {name}!" said {fname}. "You are a good friend."',
                '{fname} smiled and said, "Thank you for helping me!"'),
          t.say("{name} felt warm inside.", "Helping {fname} made {name} feel good.")]
    p4 = [t.maybe(0.5, "Good friends always help each other.",
                  "From that day on, they helped each other every day.")]
    return [p1, p2, p3, p4]


def _trip(t: _Teller) -> Paragraphs:
    dest, things = t.rng.choice(TRIPS)
    first, second, third = t.rng.sample(things, 3)
    t.fill(dest=dest)
    p1 = [_opening(t), t.say("{He} had never been to {dest}.", "{He} loved going on trips."),
          t.say('One morning, {his} {parent} said, "Today we are going to {dest}!"',
                '"We are going to {dest} today," said {his} {parent} one morning.'),
          t.say("{name} was so excited that {he} jumped up and down.",
                "{name} clapped {his} hands. {He} was very {happy}.")]
    p2 = [t.rng.choice(TRAVELS),
          t.say("At {dest}, {name} " + first + ".", "First, they " + first + "."),
          t.say("Then they " + second + ".", "After that, {name} " + second + "."),
          t.say("But then it started to rain.", "Soon {name} felt very tired.",
                "Then {name} dropped {his} snack on the ground."),
          t.say('"Don\'t worry," said {his} {parent}. "We can still have fun."',
                '{His} {parent} smiled and said, "It is okay."')]
    p3 = [t.say("Later, they " + third + ".", "Before they went home, they " + third + "."),
          t.say('"This is the best day ever!" said {name}.', '"I love {dest}!" {name} said.'),
          t.say("When they got home, {name} fell asleep right away.",
                "That night, {name} dreamed about {dest}.")]
    return [p1, p2, p3]


def _lesson(t: _Teller) -> Paragraphs:
    warning, act, oops, learned = t.rng.choice(LESSONS)
    t.fill(warning=warning, act=act, oops=oops, learned=learned)
    p1 = [_opening(t), t.say("{He} liked to do things {his} own way.",
                             "{He} was full of energy and loved to play."),
          t.say('One day, {his} {parent} said, "{warning}, {name}."',
                '"{warning}," said {his} {parent} one day.'),
          t.say("But {name} did not listen.", "{name} nodded, but {he} was not listening.")]
    p2 = [t.say("Soon, {name} {act}.", "When no one was looking, {name} {act}."),
          t.say("Then {he} {oops}.", "Oh no! {He} {oops}."),
          t.say("{name} felt {sad} and began to cry.", "{name} felt very {sad}.")]
    p3 = [t.say("{His} {parent} came and gave {him} a hug.", "{His} {parent} came running."),
          t.say('"I am sorry," said {name}. "I should have listened."',
                '"I did not listen," {name} said. "I am sorry."'),
          t.say('"It is okay," said {his} {parent}. "We all make mistakes."',
                '{His} {parent} said, "I am glad you are okay."'),
          t.say("That day, {name} learned {learned}.", "{name} learned {learned}.")]
    p4 = [t.maybe(0.6, "From that day on, {name} always listened to {his} {parent}.",
                  "After that, {name} always remembered what {his} {parent} said.")]
    return [p1, p2, p3, p4]


def _making(t: _Teller) -> Paragraphs:
    goal, thing, oops, fix = t.rng.choice(PROJECTS)
    t.fill(goal=goal, thing=thing, oops=oops, fix=fix)
    p1 = [_opening(t), t.say("{day}, {name} wanted to {goal}.",
                             "{day}, {name} decided to {goal}."),
          t.say('"I will make the best {thing} ever!" {he} said.',
                '"This will be fun!" said {name}.')]
    p2 = [t.say("{He} worked very hard.", "{He} worked and worked.", "{He} started right away."),
          t.say("But then {oops}.", "Then, all of a sudden, {oops}."),
          t.say("{name} felt {sad}.", "{name} wanted to give up."),
          t.say('"Oh no!" {he} said.', '"It is all wrong!" {he} cried.'),
          t.say('"It is okay," said {his} {parent}. "Let\'s try again."',
                '{His} {parent} said, "Don\'t give up. You can do it."')]
    p3 = [t.say("So {name} {fix}.", "{name} did not give up. {He} {fix}."),
          t.say("This time, it worked!", "At last, it was done."),
          t.say("The {thing} was beautiful.", "The {thing} looked great."),
          t.say("{name} felt very proud.", '"I did it!" {name} said with a big smile.'),
          t.maybe(0.5, "{He} learned that trying again is the way to do hard things.")]
    return [p1, p2, p3]


def _new_friend(t: _Teller) -> Paragraphs:
    game = t.rng.choice(GAMES)
    p1 = [_opening(t), t.say("{He} often played alone {at_place}.",
                             "{He} did not have many friends."),
          t.say("Sometimes {he} felt a little lonely.", "{He} wished for a friend.")]
    p2 = [t.say("{day}, {name} saw {fa_hero} named {fname} {at_place}.",
                "{day}, a new {fkind} came {to_place}. {fHis} name was {fname}."),
          t.say("{fHe} was sitting all alone.", "{fname} looked shy too."),
          t.say("{name} felt shy, but {he} walked over and said hello.",
                "{name} took a deep breath and walked over."),
          t.say('"Hi, I am {name}. Do you want to play?" {he} asked.',
                '"Hello! Would you like to play with me?" asked {name}.'),
          t.say('"Yes, please!" said {fname}.', '{fname} smiled and said, "I would love to!"')]
    p3 = ["They played " + game + ".",
          t.say("They laughed and ran until the sun went down.", "They had so much fun."),
          t.say('"See you tomorrow!" said {fname}.', '"Let\'s play again soon," said {fname}.'),
          t.say("From that day on, {name} and {fname} were best friends.",
                "{name} was not lonely anymore.")]
    return [p1, p2, p3]


TEMPLATES: tuple[Callable[[_Teller], Paragraphs], ...] = (
    _lost_object, _sharing, _brave, _helping, _trip, _lesson, _making, _new_friend,
)


def story_with_facts(rng: random.Random) -> tuple[str, dict[str, str]]:
    """`generate_story`'s story and its name, kind, object, place and plot (template name)."""
    template, teller = rng.choice(TEMPLATES), _Teller(rng)  # in this order, as always
    paragraphs = [q for q in ([s for s in p if s] for p in template(teller)) if q]
    # Merging two middle paragraphs now and then keeps paragraph breaks from being predictable.
    if len(paragraphs) >= 3 and rng.random() < 0.2:
        paragraphs[1:3] = [paragraphs[1] + paragraphs[2]]
    keys = {"name": "name", "kind": "kind", "object": "obj", "place": "at_place"}
    return "\n\n".join(" ".join(p) for p in paragraphs), {
        k: teller.ctx[v] for k, v in keys.items()} | {"plot": template.__name__.lstrip("_")}


def generate_story(rng: random.Random) -> str:
    """One story (2-4 paragraphs separated by a blank line, no trailing newline)."""
    return story_with_facts(rng)[0]


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """Generate `n` distinct stories, deterministically for a given `seed`.

    A duplicate is dropped and the same random stream simply continues, so the result is still a
    pure function of (n, seed).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}; pass the number of stories to generate.")
    rng = random.Random(seed)
    stories: list[str] = []
    seen: set[str] = set()
    for _ in range(20 * n + 100):
        if len(stories) == n:
            break
        story = generate_story(rng)
        if story not in seen:
            seen.add(story)
            stories.append(story)
    if len(stories) < n:
        raise RuntimeError(f"could only make {len(stories)} distinct stories out of {n} asked")
    return stories


def format_stories(stories: Iterable[str]) -> str:
    """Join stories as TinyStories-train.txt does: each story, then a line holding only EOT."""
    return "".join(f"{story}\n{EOT}\n" for story in stories)


def corpus_splits(n_stories: int = DEFAULT_STORIES, seed: int = DEFAULT_SEED,
                  val_fraction: float = 0.05) -> dict[str, list[str]]:
    """{'train': [...], 'val': [...]}: the last round(n_stories * val_fraction) stories
    (at least 1) are the validation split."""
    if n_stories < 2:
        raise ValueError(f"n_stories must be at least 2 (one for train, one for val), "
                         f"got {n_stories}; pass a larger n_stories.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}; "
                         f"use e.g. 0.05 for 5% validation stories.")
    stories = generate_stories(n_stories, seed)
    n_val = min(max(1, round(n_stories * val_fraction)), n_stories - 1)
    return {"train": stories[:-n_val], "val": stories[-n_val:]}


def write_corpus(out_dir: str | Path, n_stories: int = DEFAULT_STORIES, seed: int = DEFAULT_SEED,
                 val_fraction: float = 0.05) -> tuple[Path, Path]:
    """Generate `n_stories` stories and write them to `out_dir`/train.txt and `out_dir`/val.txt.

    The last round(n_stories * val_fraction) stories (at least 1) go to val.txt. Returns the
    (train, val) paths.
    """
    splits = corpus_splits(n_stories, seed, val_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_path, val_path = out / "train.txt", out / "val.txt"
    # newline="\n" so the files are byte-identical on Windows too.
    train_path.write_text(format_stories(splits["train"]), encoding="ascii", newline="\n")
    val_path.write_text(format_stories(splits["val"]), encoding="ascii", newline="\n")
    return train_path, val_path
