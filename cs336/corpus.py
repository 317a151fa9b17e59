"""The embedded default corpus: seeded, procedurally generated children's stories.

``python -m cs336.train`` with no data arguments trains on this text, so the main job needs no
download. Each story draws a hero and a friend (name, kind, pronouns), a place, a favourite
activity and one of several plots (a lost object, a storm, a new friend, a fear, a trip, a gift,
a race), and tells it in a fixed story grammar: opening, setting, plot with dialogue, resolution,
closing line. Pronouns, articles and verb forms agree throughout, so the text has the local and
long-range regularities (a name introduced early is reused, a lost object is found later) that a
small language model picks up within a few hundred steps. Stories are separated by the document
token ``<|endoftext|>``, as in the TinyStories files. The word lists and templates are this
project's own; the story shape imitates the TinyStories data set (Eldan and Li, 2023).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cs336.fileio import atomic_open

EOT = "<|endoftext|>"

GIRLS = ["Lily", "Mia", "Sara", "Emma", "Zoe", "Anna", "Lucy", "Ruby", "Ella", "Nina", "Maya", "Rosa",
         "Ivy", "Hana", "Kate", "Amy"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Omar", "Kai", "Noah", "Eli", "Raj",
        "Dan", "Luke", "Theo"]
ANIMALS = [("cat", "Whiskers"), ("dog", "Buddy"), ("bunny", "Hop"), ("bear", "Bruno"),
           ("bird", "Tweety"), ("fox", "Rusty"), ("duck", "Daisy"), ("frog", "Freddy"),
           ("mouse", "Pip"), ("owl", "Hoot"), ("turtle", "Shelly"), ("lion", "Leo"),
           ("pig", "Penny"), ("horse", "Star"), ("squirrel", "Nutty"), ("puppy", "Spot")]
ADJ_PERSON = ["little", "kind", "happy", "brave", "curious", "shy", "friendly", "clever", "cheerful",
              "gentle", "funny", "busy"]
PLACES = [("a small house", "near the woods"), ("a big farm", "by the river"),
          ("a cozy cottage", "at the edge of the forest"), ("a tall tree", "in the park"),
          ("a little town", "by the sea"), ("a green valley", "under the hills"),
          ("a busy city", "next to a big bridge"), ("a quiet village", "near the mountains")]
ACTIVITIES = ["play with a red ball", "draw pictures", "sing songs", "climb trees", "read books",
              "build sand castles", "dance in the garden", "look at the stars", "pick flowers",
              "jump in puddles", "play hide and seek", "ride a bike", "bake cookies",
              "splash in the pond", "fly a kite", "collect shiny stones"]
OBJECTS = ["a red ball", "a blue hat", "a toy car", "a teddy bear", "a shiny key", "a yellow kite",
           "a little boat", "a magic stone", "a big book", "an old map", "a silver bell",
           "a green scarf", "a wooden box", "an orange crayon", "a pretty shell", "a soft blanket"]
HIDING = ["under the bed", "behind the big tree", "in the tall grass", "next to the pond",
          "under a pile of leaves", "inside an old boot", "on top of the shelf", "by the garden gate"]
TREATS = ["a warm cookie", "a slice of cake", "a sweet apple", "some honey", "a cup of milk",
          "a big hug", "a bowl of soup", "a juicy pear"]
FEARS = [("the dark", "The dark was only the night, and the stars were there to keep watch."),
         ("loud thunder", "Thunder was only the sound of the clouds bumping into each other."),
         ("the deep water", "The water was calm, and a friend was always close."),
         ("the big dog next door", "The big dog only wanted someone to play with."),
         ("the tall slide", "The slide was fast and fun, and the ground was soft."),
         ("the first day of school", "School was full of new friends and fun games.")]
TRIPS = [("the beach", "the waves", "found a shell with pink stripes"),
         ("the zoo", "the elephants", "saw a baby giraffe eat leaves"),
         ("the market", "the fruit stands", "tasted a sweet mango"),
         ("the forest", "the tall trees", "heard a woodpecker knock on a tree"),
         ("the hill", "the windmill", "watched the clouds float by"),
         ("the lake", "the ducks", "fed bread to the little ducks")]
MORALS = ["sharing makes everyone happy", "it is good to help your friends",
          "being brave is not about having no fear", "kindness is the best gift",
          "it is important to say sorry", "patience brings good things",
          "friends make every day better", "trying again is how you learn"]
WEATHER = ["sunny", "windy", "rainy", "snowy", "cloudy", "warm"]
TIMES = ["morning", "afternoon", "evening", "day"]
FEELINGS_BAD = ["sad", "worried", "upset", "scared"]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited"]


@dataclass
class Character:
    name: str
    kind: str
    subj: str
    obj: str
    poss: str

    @property
    def intro(self) -> str:
        """How the story first names a friend: "Hop the bunny", or just "Mia"."""
        return self.name if self.kind in ("girl", "boy") else f"{self.name} the {self.kind}"

    @property
    def Subj(self) -> str:
        return self.subj.capitalize()

    @property
    def Poss(self) -> str:
        return self.poss.capitalize()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _strip_article(phrase: str) -> str:
    return phrase.split(" ", 1)[1]


def _character(rng: random.Random, avoid: str = "") -> Character:
    while True:
        roll = rng.random()
        if roll < 0.4:
            c = Character(rng.choice(GIRLS), "girl", "she", "her", "her")
        elif roll < 0.8:
            c = Character(rng.choice(BOYS), "boy", "he", "him", "his")
        else:
            kind, name = rng.choice(ANIMALS)
            pron = rng.choice([("he", "him", "his"), ("she", "her", "her")])
            c = Character(name, kind, *pron)
        if c.name != avoid:
            return c


def _say(rng: random.Random, who: Character, line: str) -> str:
    verb = rng.choice(["said", "said", "asked" if line.endswith("?") else "shouted", "whispered"])
    return f'"{line}" {verb} {who.name}.'


def _plot_lost(rng, h, f) -> list[str]:
    thing = rng.choice(OBJECTS)
    bare = _strip_article(thing)
    spot = rng.choice(HIDING)
    return [
        f"{h.name} had {thing}. {h.Subj} loved the {bare} very much.",
        f"One {rng.choice(TIMES)}, {h.name} could not find the {bare}. {h.Subj} looked everywhere, "
        f"but it was gone. {h.Subj} felt {rng.choice(FEELINGS_BAD)}.",
        _say(rng, h, f"Where is my {bare}?"),
        f"{h.Poss} friend {f.intro} came to help. \"Let's look together,\" said {f.name}.",
        f"They looked in the kitchen and in the yard. At last, {f.name} found the {bare} {spot}.",
        _say(rng, h, f"Thank you, {f.name}! You found my {bare}!"),
        f"{h.name} gave {f.name} {rng.choice(TREATS)} to say thank you.",
    ]


def _plot_storm(rng, h, f) -> list[str]:
    return [
        f"One {rng.choice(TIMES)}, the sky turned dark and the wind began to blow.",
        f"{h.name} was outside with {f.intro}. \"A storm is coming!\" said {f.name}.",
        f"They ran as fast as they could. The rain fell on {h.poss} head and on {f.poss} back.",
        f"{h.name} saw a little bird shaking in the rain. {h.Subj} picked up the bird and held it close.",
        "They all hid under a big tree until the storm was over. Then the sun came out again.",
        _say(rng, h, "Look, a rainbow!"),
        f"The little bird sang a song for {h.name}, and {h.subj} felt {rng.choice(FEELINGS_GOOD)}.",
    ]


def _plot_new_friend(rng, h, f) -> list[str]:
    act = rng.choice(ACTIVITIES)
    return [
        f"One day, {h.name} saw {_article(f.kind)} {f.kind} sitting alone. "
        f"The {f.kind} looked {rng.choice(FEELINGS_BAD)}.",
        _say(rng, h, "Hello! What is your name?"),
        f"\"My name is {f.name},\" said the {f.kind}. \"I have no friends to play with.\"",
        _say(rng, h, f"You can play with me! Do you like to {act}?"),
        f"{f.name} smiled. {f.Subj} did like to {act}. They played together all {rng.choice(TIMES)}.",
        f"When it was time to go home, {f.name} said, \"Can we play again tomorrow?\"",
        f"\"Yes!\" said {h.name}. Now {h.name} and {f.name} were best friends.",
    ]


def _plot_fear(rng, h, f) -> list[str]:
    fear, comfort = rng.choice(FEARS)
    return [
        f"{h.name} was afraid of {fear}. Every time {h.subj} thought about it, {h.subj} wanted to hide.",
        _say(rng, h, f"I do not like {fear}."),
        f"{h.Poss} friend {f.intro} sat next to {h.obj}. \"I will help you,\" said {f.name}.",
        f"{f.name} told {h.obj} a secret. {comfort}",
        f"{h.name} took a deep breath. {h.Subj} was still a little scared, but {h.subj} tried anyway.",
        f"It was not so bad after all! {h.name} laughed, and {f.name} laughed too.",
        _say(rng, h, "I am not afraid anymore!"),
    ]


def _plot_trip(rng, h, f) -> list[str]:
    place, sight, event = rng.choice(TRIPS)
    weather = rng.choice(WEATHER)
    return [
        f"One {weather} {rng.choice(TIMES)}, {h.name} and {f.intro} went to {place}.",
        f"{h.name} was very {rng.choice(FEELINGS_GOOD)}. {h.Subj} had never been to {place} before.",
        f"First they looked at {sight}. Then they {event}.",
        _say(rng, f, "This is the best day ever!"),
        f"On the way home, {h.name} was tired, so {f.name} carried {h.poss} bag.",
        f"That night, {h.name} dreamed about {place} and {sight}.",
    ]


def _plot_gift(rng, h, f) -> list[str]:
    thing = rng.choice(OBJECTS)
    bare = _strip_article(thing)
    return [
        f"It was {f.name}'s birthday. {h.name} wanted to give {f.obj} a gift, but {h.subj} had no money.",
        _say(rng, h, "What can I give my friend?"),
        f"{h.name} thought and thought. Then {h.subj} had an idea. {h.Subj} made {thing} all by "
        f"{'herself' if h.obj == 'her' else 'himself'}.",
        f"It took a long time, but at last the {bare} was ready.",
        f"{h.name} gave the {bare} to {f.name}. {f.name} opened it and smiled.",
        _say(rng, f, "I love it! It is the best gift I have ever had."),
        f"{h.name} felt warm inside. Making something for a friend was better than buying it.",
    ]


def _plot_race(rng, h, f) -> list[str]:
    return [
        f"{f.intro} said, \"Let's have a race to the big tree!\"",
        f"{h.name} ran fast, but {f.name} ran faster. Then {f.name} fell down and hurt {f.poss} knee.",
        f"{h.name} stopped running. {h.Subj} went back to help {f.obj} up.",
        _say(rng, f, "Why did you stop? You could have won!"),
        _say(rng, h, "Helping you is more important than winning."),
        "They walked to the big tree together, side by side.",
    ]


PLOTS = (_plot_lost, _plot_storm, _plot_new_friend, _plot_fear, _plot_trip, _plot_gift, _plot_race)


def story(rng: random.Random) -> str:
    """One story (a few paragraphs, about 100 to 200 words)."""
    hero = _character(rng)
    friend = _character(rng, avoid=hero.name)
    home, near = rng.choice(PLACES)
    adj = rng.choice(ADJ_PERSON)
    likes = f"{hero.Subj} loved to {rng.choice(ACTIVITIES)}."
    opening = rng.choice([
        f"Once upon a time, there was {_article(adj)} {adj} {hero.kind} named {hero.name}. "
        f"{hero.Subj} lived in {home} {near}. {likes}",
        f"Once upon a time, in {home} {near}, there lived {_article(hero.kind)} {hero.kind} named "
        f"{hero.name}. {likes}",
        f"There was once {_article(adj)} {adj} {hero.kind} called {hero.name}. "
        f"{hero.Subj} lived in {home} {near}. {likes}",
    ])
    plot = rng.choice(PLOTS)(rng, hero, friend)
    moral = rng.choice(MORALS)
    ending = rng.choice([
        f"From that day on, {hero.name} knew that {moral}.",
        f"{hero.name} learned that {moral}. And they lived happily ever after.",
        "The end.",
    ])
    split = rng.randint(2, len(plot) - 2)
    paragraphs = [opening, " ".join(plot[:split]), " ".join(plot[split:]), ending]
    return "\n\n".join(paragraphs)


def iter_stories(seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    while True:
        yield story(rng)


def _corpus_pieces(n_bytes: int, seed: int, separator: str = EOT) -> Iterator[str]:
    """Stories, each followed by ``\n<separator>\n``, up to the first story past ``n_bytes``
    (counted in characters, the separator as ``<|endoftext|>``, so every separator gives the same
    stories)."""
    size = 0
    for s in iter_stories(seed):
        yield s + f"\n{separator}\n"
        size += len(s) + len(EOT) + 1
        if size >= n_bytes:
            return


def corpus_text(n_bytes: int, seed: int, separator: str = EOT) -> str:
    """Stories joined by ``separator``, stopping at the first story past ``n_bytes``."""
    return "".join(_corpus_pieces(n_bytes, seed, separator))


def _write_stories(path: Path, n_bytes: int, seed: int, separator: str) -> None:
    """``corpus_text(n_bytes, seed, separator)`` written to ``path`` a story at a time (memory
    stays one story, whatever ``data.corpus_mb`` asks for), atomically."""
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        for piece in _corpus_pieces(n_bytes, seed, separator):
            f.write(piece)


def write_corpus(out_dir: str | Path, megabytes: float, seed: int,
                 valid_fraction: float = 0.05, separator: str = EOT) -> tuple[Path, Path]:
    """Write ``train.txt`` and ``valid.txt`` (disjoint story streams) under ``out_dir``, the
    stories separated by ``separator`` (the run's first special token).

    The validation stories come from a separate seed, so no story text is shared by construction
    except where the generator repeats itself by chance. Each file is streamed to disk, not built
    in memory first.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = int(megabytes * 1_000_000)
    train, valid = out_dir / "train.txt", out_dir / "valid.txt"
    _write_stories(train, int(total * (1 - valid_fraction)), seed, separator)
    _write_stories(valid, max(int(total * valid_fraction), 10_000), seed + 1_000_003, separator)
    return train, valid
