#!/usr/bin/env python
"""Generate the bundled demo's synthetic data (seeded, reproducible, no network).

The demo needs a task on which a tiny Mamba trained on a CPU in minutes reaches a high
LAMBADA-style accuracy, so that quantizing its Conv1D+SiLU step has something to move.

The data: a fixed little world of 40 people. Each person has a gender and four fixed facts:
a home city, a pet, a job and a favourite colour (drawn once from ``WORLD_SEED``). A passage
(30-80 words, one per line) tells a short story about one person, the *protagonist*:

* an opening sentence that names the protagonist (the first name in the passage);
* in random order: a sentence stating the protagonist's fact that the passage will ask for
  (by name or by pronoun, never in a sentence that names anybody else), sometimes sentences
  stating the protagonist's other facts, 2-5 filler sentences (no fact words in them), and
  often a sentence about another person that states one of *their* facts (a distractor, very
  often of the same kind as the one asked for; it always names that other person);
* a final sentence about the protagonist (by name or pronoun) that contains a cue word
  (``city``, ``pet``, ``job``/``work``, ``color``) and ends with the asked-for fact, without
  a final full stop. That last word is the target, as in ``lambada_openai``.

So the last word is predictable from the context in two ways: it is stated earlier in the
passage (in-context retrieval, with a same-kind distractor to get wrong) and, since the world
is fixed, it is a fact about the named protagonist (memorisation). Names are capitalised;
every other word except sentence starts and city names is lower case.

Held-out text: each (protagonist, final template) pair is either a training pair or a
held-out pair (a fixed one in six are held out). Training passages use training pairs only;
the task and calibration passages use held-out pairs only, so every evaluation passage ends
with a template never seen with that person in training. The three sets are also disjoint as
strings. Vocabulary: about 300 words.

Outputs (``--out``, default ``examples/demo``):
  train.txt                   training corpus (``--n-train`` passages; not committed, large)
  calib.txt                   600 calibration passages
  task/demo_lambada.jsonl     500 task passages, ``{"text": ...}`` per line
  model/ (tokenizer files)    word-level tokenizer (tokenizer.json, tokenizer_config.json, ...)

Usage:  python scripts/make_demo_data.py [--out examples/demo] [--n-train 60000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

WORLD_SEED = 20250611
TRAIN_SEED = 1
TASK_SEED = 2
CALIB_SEED = 3
N_TASK = 500
N_CALIB = 600
N_TRAIN = 60000
MIN_WORDS, MAX_WORDS = 30, 80
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<unk>"]

FEMALE = ["Anna", "Bella", "Clara", "Diana", "Emma", "Fiona", "Grace", "Hanna", "Iris", "Julia",
          "Kate", "Laura", "Maria", "Nora", "Olga", "Paula", "Rosa", "Sara", "Tina", "Vera"]
MALE = ["Adam", "Ben", "Carl", "David", "Eric", "Frank", "George", "Henry", "Ivan", "Jack",
        "Karl", "Leo", "Mark", "Nick", "Oscar", "Peter", "Robert", "Sam", "Tom", "Victor"]

RELATIONS = ("city", "pet", "job", "color")
VALUES = {
    "city": ["Paris", "Rome", "Oslo", "Cairo", "Lima", "Tokyo", "Dublin", "Madrid", "Berlin",
             "Vienna", "Prague", "Lisbon"],
    "pet": ["cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "pony", "ferret",
            "lizard"],
    "job": ["baker", "doctor", "teacher", "farmer", "pilot", "painter", "nurse", "sailor",
            "lawyer", "chef", "miner", "tailor"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink",
              "brown"],
}

# Placeholders: {P} the protagonist's name, {X} name or pronoun (chosen per sentence),
# {pro} she/he, {obj} her/him, {pos} her/his, {v} the value. Sentence starts are capitalised
# afterwards.
FACT_TEMPLATES = {
    "city": ["{X} lives in {v}.", "{X} has lived in {v} for many years.",
             "{X} rents a small flat in {v}.", "{X} was born and raised in {v}.",
             "these days {X} lives in {v}.", "the home of {X} is in {v}."],
    "pet": ["{X} has a pet {v}.", "{X} owns a {v}.", "{X} takes good care of a little {v}.",
            "at home, {X} keeps a {v}.", "{X} lives with a {v}.", "{X} once adopted a {v}."],
    "job": ["{X} works as a {v}.", "{X} is a {v}.", "by trade, {X} is a {v}.",
            "{X} has been a {v} for ten years.", "{X} earns a living as a {v}.",
            "{X} trained for years to become a {v}."],
    "color": ["{X} loves the color {v}.", "{X} likes to wear {v}.",
              "the favorite color of {X} is {v}.", "{X} always picks {v} if {pro} can.",
              "{X} thinks {v} is the most beautiful color.", "{X} has always liked {v}."],
}
# Clause about the distractor {Q}, used inside DISTRACTOR_TEMPLATES as {clause}.
DISTRACTOR_CLAUSES = {
    "city": ["who lives in {v}", "who has a flat in {v}", "who was born in {v}"],
    "pet": ["who has a pet {v}", "who owns a {v}", "who keeps a {v}"],
    "job": ["who works as a {v}", "who is a {v}", "who has been a {v} for years"],
    "color": ["who loves the color {v}", "who likes to wear {v}", "who always picks {v}"],
}
DISTRACTOR_TEMPLATES = [
    "{pos} friend {Q}, {clause}, called {obj}.",
    "later, {pro} met {Q}, {clause}.",
    "{Q}, {clause}, sent {obj} a long letter.",
    "{pro} had lunch with {Q}, {clause}.",
    "an old friend, {Q}, {clause}, came to visit.",
    "{pro} waved at {Q}, {clause}.",
]
INTRO_TEMPLATES = [
    "{P} woke up early on a {adj} morning.",
    "it was a {adj} day, and {P} was in a good mood.",
    "{P} had a long week.",
    "one {time}, {P} sat by the window.",
    "this is a story about {P}.",
    "{P} came back from a long walk.",
    "on a {adj} {time}, {P} stayed at home.",
    "{P} opened the door and looked outside.",
]
FILLERS = [
    "{pro} made a cup of tea.", "{pro} read the news for a while.", "the weather was {adj}.",
    "{pro} called an old friend.", "{pos} phone rang twice, but {pro} did not answer.",
    "{pro} cleaned the kitchen and opened the window.", "{pro} ate some bread with cheese.",
    "outside, the rain did not stop.", "{pro} wrote a short letter.",
    "{pro} watered the plants.", "for lunch, {pro} had {food}.", "{pro} listened to the radio.",
    "the streets were quiet.", "{pro} took a short nap.",
    "{pro} went to the market to buy {food}.", "the neighbors were very loud.",
    "{pro} found an old photo in a drawer.", "{pro} sang a song while cooking {food}.",
    "a cold wind was blowing.", "{pro} fixed a broken chair.", "{pro} counted the coins in {pos} pocket.",
    "the clock on the wall was slow.", "{pro} did not feel like going out.",
    "{pro} walked to the park and back.", "{pro} smiled for no reason.",
    "the bus was late again.", "{pro} wrote a list of things to do.",
    "{pro} looked at the sky for a long time.", "{pos} tea was getting cold.",
    "{pro} thought about the summer.",
]
ADJS = ["cold", "warm", "quiet", "windy", "sunny", "grey", "bright", "rainy"]
TIMES = ["morning", "evening", "afternoon", "night"]
FOODS = ["soup", "apples", "rice", "fish", "eggs", "bread", "pasta", "beans"]

FINAL_TEMPLATES = {
    "city": [
        "at the end of the day, {X} took the train back to {pos} home city of {v}",
        "{X} bought a ticket home, back to the city of {v}",
        "when people ask about {pos} home city, {X} always says {v}",
        "that night, {X} dreamed of the lights of {pos} home city, {v}",
        "after the trip, {X} was happy to return to {pos} city, {v}",
        "there is no city {X} loves more than {v}",
    ],
    "pet": [
        "before bed, {X} fed {pos} pet, a {v}",
        "{X} spent the evening playing with {pos} pet {v}",
        "{X} loves {pos} pet more than anything, and it is a small {v}",
        "{X} bought some food for {pos} pet, a hungry {v}",
        "on the way home, {X} thought about {pos} pet, a lazy {v}",
        "everyone in the street knows that the pet of {X} is a {v}",
    ],
    "job": [
        "the next day, {X} went back to {pos} job as a {v}",
        "at work, everyone knows {X} as a good {v}",
        "{X} is proud of {pos} job, because {pro} is a {v}",
        "{X} loves {pos} work as a {v}",
        "soon {X} will start work again as a {v}",
        "in {pos} job, {X} is a very careful {v}",
    ],
    "color": [
        "{X} painted the walls of {pos} room in {pos} favorite color, {v}",
        "for {pos} birthday, {X} asked for a coat in {pos} favorite color, {v}",
        "the color that {X} likes best is {v}",
        "{X} bought flowers in {pos} favorite color, {v}",
        "{X} wore a scarf in the color {pro} likes most, {v}",
        "of every color in the shop, {X} chose {v}",
    ],
}
HOLDOUT_EVERY = 6  # one in six (person, final template) pairs is held out of training


def build_world(seed: int = WORLD_SEED) -> dict:
    """name -> {"gender": "f"/"m", "city": ..., "pet": ..., "job": ..., "color": ...}."""
    rng = random.Random(seed)
    world = {}
    for name in FEMALE + MALE:
        facts = {rel: rng.choice(VALUES[rel]) for rel in RELATIONS}
        facts["gender"] = "f" if name in FEMALE else "m"
        world[name] = facts
    return world


def final_keys() -> list[tuple[str, int]]:
    return [(rel, i) for rel in RELATIONS for i in range(len(FINAL_TEMPLATES[rel]))]


def is_heldout(name: str, rel: str, idx: int) -> bool:
    """Fixed split of (person, final template) pairs: 1 in HOLDOUT_EVERY is held out.

    Balanced so that every person and every final template has both kinds of pair.
    """
    names = FEMALE + MALE
    keys = final_keys()
    return (names.index(name) + keys.index((rel, idx))) % HOLDOUT_EVERY == 0


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _fill(template: str, rng: random.Random, who: dict, name: str, use_name: bool,
          **extra) -> str:
    pro, obj, pos = ("she", "her", "her") if who["gender"] == "f" else ("he", "him", "his")
    x = name if use_name else pro
    return template.format(P=name, X=x, pro=pro, obj=obj, pos=pos,
                           adj=rng.choice(ADJS), time=rng.choice(TIMES), food=rng.choice(FOODS),
                           **extra)


def make_passage(rng: random.Random, world: dict, heldout: bool) -> str:
    names = FEMALE + MALE
    while True:
        name = rng.choice(names)
        rel, idx = rng.choice(final_keys())
        if is_heldout(name, rel, idx) == heldout:
            break
    who = world[name]

    intro = _fill(rng.choice(INTRO_TEMPLATES), rng, who, name, True)
    middle = []
    # the asked-for fact, by name or pronoun
    middle.append(_fill(rng.choice(FACT_TEMPLATES[rel]), rng, who, name, rng.random() < 0.5,
                        v=who[rel]))
    for other in RELATIONS:
        if other != rel and rng.random() < 0.3:
            middle.append(_fill(rng.choice(FACT_TEMPLATES[other]), rng, who, name,
                                rng.random() < 0.3, v=who[other]))
    for filler in rng.sample(FILLERS, rng.randint(2, 5)):
        middle.append(_fill(filler, rng, who, name, False))
    if rng.random() < 0.7:
        q = rng.choice([n for n in names if n != name])
        qrel = rel if rng.random() < 0.7 else rng.choice(RELATIONS)
        clause = rng.choice(DISTRACTOR_CLAUSES[qrel]).format(v=world[q][qrel])
        middle.append(_fill(rng.choice(DISTRACTOR_TEMPLATES), rng, who, name, False,
                            Q=q, clause=clause))
    rng.shuffle(middle)
    final = _fill(FINAL_TEMPLATES[rel][idx], rng, who, name, rng.random() < 0.4, v=who[rel])
    return " ".join(_capitalize(s) for s in [intro, *middle, final])


def generate(n: int, seed: int, heldout: bool, world: dict | None = None,
             exclude: set | None = None) -> list[str]:
    """``n`` distinct passages of 30-80 words, none of them in ``exclude``."""
    world = world or build_world()
    rng = random.Random(seed)
    exclude = exclude or set()
    out, seen = [], set()
    while len(out) < n:
        text = make_passage(rng, world, heldout)
        if not MIN_WORDS <= len(text.split(" ")) <= MAX_WORDS:
            continue
        if text in seen or text in exclude:
            continue
        seen.add(text)
        out.append(text)
    return out


def make_splits(n_train: int = N_TRAIN) -> dict[str, list[str]]:
    world = build_world()
    task = generate(N_TASK, TASK_SEED, heldout=True, world=world)
    calib = generate(N_CALIB, CALIB_SEED, heldout=True, world=world, exclude=set(task))
    # training pairs never equal held-out pairs, so train is disjoint from task/calib anyway
    train = generate(n_train, TRAIN_SEED, heldout=False, world=world)
    return {"train": train, "task": task, "calib": calib}


def all_words() -> list[str]:
    """Every word the generator can write, sorted (the tokenizer's vocabulary, independent of
    how many passages are generated)."""
    texts = []
    for group in (FACT_TEMPLATES, DISTRACTOR_CLAUSES, FINAL_TEMPLATES):
        for templates in group.values():
            texts += templates
    texts += DISTRACTOR_TEMPLATES + INTRO_TEMPLATES + FILLERS
    texts = [re.sub(r"\{[a-zA-Z]+\}", " ", t) for t in texts]
    texts += [_capitalize(t.strip()) for t in texts]  # sentence-initial forms
    texts += FEMALE + MALE + ADJS + TIMES + FOODS
    texts += ["she", "he", "her", "him", "his", "She", "He", "Her", "His"]
    for rel in RELATIONS:
        texts += VALUES[rel]
    words = set()
    for t in texts:
        words.update(re.findall(r"\w+|[^\w\s]+", t))
    return sorted(words)


def build_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|endoftext|>",
        bos_token="<|endoftext|>", model_max_length=2048, clean_up_tokenization_spaces=False,
    )


def check_tokenizer(tokenizer, texts: list[str]) -> None:
    unk = tokenizer.unk_token_id
    for text in texts:
        ctx, last = text.rsplit(" ", 1)
        whole = tokenizer(ctx + " " + last, add_special_tokens=False)["input_ids"]
        head = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        if unk in whole:
            raise SystemExit(f"unknown word in {text!r}")
        if whole[: len(head)] != head or len(whole) != len(head) + 1:
            raise SystemExit(f"last word is not one token after the context: {text!r}")


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "examples" / "demo"))
    ap.add_argument("--n-train", type=int, default=N_TRAIN)
    ap.add_argument("--no-tokenizer", action="store_true", help="do not (re)write model/ tokenizer files")
    args = ap.parse_args(argv)
    out = Path(args.out)

    splits = make_splits(args.n_train)
    write_lines(out / "train.txt", splits["train"])
    write_lines(out / "calib.txt", splits["calib"])
    write_lines(out / "task" / "demo_lambada.jsonl",
                [json.dumps({"text": t}, ensure_ascii=False) for t in splits["task"]])
    if not args.no_tokenizer:
        tokenizer = build_tokenizer(all_words())
        check_tokenizer(tokenizer, splits["task"] + splits["calib"] + splits["train"][:2000])
        (out / "model").mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out / "model"))
        print(f"tokenizer: {len(tokenizer)} tokens -> {out / 'model'}")
    n_words = sum(len(t.split(" ")) for t in splits["train"])
    print(f"train: {len(splits['train'])} passages ({n_words} words), calib: {len(splits['calib'])}, "
          f"task: {len(splits['task'])} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
