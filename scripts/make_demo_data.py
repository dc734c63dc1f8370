#!/usr/bin/env python
"""Generate the bundled demo's synthetic data (seeded, reproducible, no network).

The demo needs a task on which a tiny Mamba (24 narrow layers) trained on 2 CPU cores in about
ten minutes reaches a LAMBADA-style accuracy well above chance and below 1, so that quantizing
its Conv1D+SiLU step has something to move. What such a model learns in a few hundred steps is
evidence that is spread over the whole passage (what the passage is about). A first design (recalling a fixed fact of the
named person, stated earlier in the passage) stayed near chance in the short runs tried, while
this one is learned in 200-300 steps. So:

A passage (30-80 words, one per line) tells what a named person (one of 40) did at one of 12
places (beach, forest, farm, harbor, library, hospital, school, kitchen, garden, mountain,
market, station):

* an opening sentence naming the person;
* in random order: 1-2 neutral filler sentences and either (3 passages in 5) 3-5 sentences
  drawn from that place's pool (sand, waves, shells... for the beach) plus, in a third of them,
  one sentence from another place's pool (a distractor, always outnumbered), or (2 in 5) 2-3
  sentences from the pools of each of two places, the place and another;
* a final sentence from a pool of templates that all fit every place, ending with the place
  word, without a final full stop: ``... it had been a long day at the beach``.

The place word itself never appears before the last word, so it cannot be copied: it has to be
inferred from the context, and the final sentence alone does not determine it (1 in 12). The
person is referred to by name or pronoun (she/he, her/his) in the other sentences. A passage
about two places ends with either of them at random, so no reader can do better than about
0.6 + 0.4 / 2 = 0.8: the demo's accuracy is not saturated, and quantization has room to move it.

Held-out text: each (place, final template) pair is either a training pair or a held-out pair
(a fixed one in five is held out). Training passages use training pairs only; the task and
calibration passages use held-out pairs only, so every evaluation passage ends with a sentence
never seen after that place's sentences in training. The three sets are also disjoint as
strings. Vocabulary: 525 words (528 tokens with the special ones).

Outputs (``--out``, default ``examples/demo``):
  train.txt                   training corpus (``--n-train`` passages; not committed, large)
  calib.txt                   600 calibration passages
  task/demo_lambada.jsonl     2000 task passages, ``{"text": ...}`` per line (enough that a
                              drop of 0.03 in accuracy is about 3 standard errors)
  model/ (tokenizer files)    word-level tokenizer (tokenizer.json, tokenizer_config.json)

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

TRAIN_SEED = 1
TASK_SEED = 2
CALIB_SEED = 3
N_TASK = 2000
N_CALIB = 600
N_TRAIN = 60000
MIN_WORDS, MAX_WORDS = 30, 80
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<unk>"]

FEMALE = ["Anna", "Bella", "Clara", "Diana", "Emma", "Fiona", "Grace", "Hanna", "Iris", "Julia",
          "Kate", "Laura", "Maria", "Nora", "Olga", "Paula", "Rosa", "Sara", "Tina", "Vera"]
MALE = ["Adam", "Ben", "Carl", "David", "Eric", "Frank", "George", "Henry", "Ivan", "Jack",
        "Karl", "Leo", "Mark", "Nick", "Oscar", "Peter", "Robert", "Sam", "Tom", "Victor"]

# Placeholders: {X} the person's name or pronoun (chosen per sentence), {pro} she/he,
# {obj} her/him, {pos} her/his, {adj}, {time}. Sentence starts are capitalised afterwards.
PLACES = {
    "beach": [
        "the sand was warm under {pos} feet.", "{X} watched the waves roll in.",
        "{X} picked up a few shells.", "a gull flew low over the water.",
        "{X} swam in the cold sea for a while.", "the smell of salt was in the air.",
        "{X} sat on a towel and read.", "children were building castles of sand.",
    ],
    "forest": [
        "tall trees stood all around {obj}.", "{X} heard an owl somewhere in the trees.",
        "the path was covered in moss and leaves.", "{X} found mushrooms under an old oak.",
        "a deer ran across the path.", "{X} followed a narrow trail between the pines.",
        "the air smelled of wood and rain.", "birds sang high in the branches.",
    ],
    "farm": [
        "the cows were waiting to be milked.", "{X} fed the chickens and the pigs.",
        "{X} drove the tractor across the field.", "the barn smelled of hay.",
        "{X} collected eggs from the hens.", "a goat tried to eat {pos} sleeve.",
        "{X} helped bring in the wheat.", "the sheep stood in the muddy field.",
    ],
    "harbor": [
        "boats were rocking on the water by the pier.", "{X} watched the fishermen unload their nets.",
        "the ropes of the ships creaked.", "{X} walked along the pier.",
        "a big ship sounded its horn.", "the smell of fish and diesel filled the air.",
        "{X} counted the sails in the bay.", "sailors were painting an old boat.",
    ],
    "library": [
        "the shelves were full of old books.", "{X} spoke only in a whisper.",
        "{X} borrowed three novels.", "the reading room was silent.",
        "{X} looked for a book about the stars.", "a clerk stamped the cards.",
        "{X} sat at a long wooden table with a pile of books.", "nobody made a sound among the shelves.",
    ],
    "hospital": [
        "nurses hurried down the white corridor.", "{X} waited for the doctor.",
        "the room smelled of soap and medicine.", "a patient was resting in the next bed.",
        "{X} read the chart at the end of the bed.", "an ambulance arrived with its lights on.",
        "{X} talked quietly with a nurse.", "the doctor listened to {pos} heart.",
    ],
    "school": [
        "the children sat at their desks.", "{X} wrote on the blackboard.",
        "the bell rang for the break.", "{X} graded a stack of tests.",
        "pupils ran through the hall.", "{X} read a story to the class.",
        "the teacher asked a hard question.", "{X} sharpened a box of pencils.",
    ],
    "kitchen": [
        "a pot of soup was boiling on the stove.", "{X} chopped onions and carrots.",
        "the oven was hot.", "{X} washed the plates in the sink.",
        "the smell of fresh bread filled the room.", "{X} stirred the sauce with a wooden spoon.",
        "a kettle whistled.", "{X} set the table for dinner.",
    ],
    "garden": [
        "{X} planted tulips along the fence.", "the roses were in full bloom.",
        "{X} pulled weeds from the beds.", "bees buzzed around the flowers.",
        "{X} watered the vegetables.", "the hedge needed cutting.",
        "{X} raked the leaves from the lawn.", "the apple tree was full of fruit.",
    ],
    "mountain": [
        "the peak was covered in snow.", "{X} climbed a steep rocky path.",
        "the air was thin and cold up high.", "{X} looked down at the valley far below.",
        "an eagle circled above the cliffs.", "{X} rested by a small lake between the rocks.",
        "{X} tightened the straps of {pos} boots before the climb.", "clouds drifted past the summit.",
    ],
    "market": [
        "the stalls were full of fruit and vegetables.", "{X} bargained with a seller.",
        "a man was shouting prices.", "{X} bought a bag of plums.",
        "the crowd moved slowly between the stands.", "{X} tasted a piece of cheese.",
        "a woman sold flowers from a cart.", "{X} paid with a few coins.",
    ],
    "station": [
        "the train was ten minutes late.", "{X} bought a ticket at the window.",
        "people hurried along the platform.", "{X} checked the big board of departures.",
        "a voice called out the next train.", "{X} sat on a bench and waited.",
        "the rails shone in the light.", "a porter carried heavy bags.",
    ],
}
INTRO_TEMPLATES = [
    "{X} woke up early on a {adj} morning.",
    "it was a {adj} day, and {X} was in a good mood.",
    "{X} had a long week behind {obj}.",
    "one {time}, {X} went out.",
    "this is a story about {X}.",
    "{X} had been looking forward to this day.",
    "on a {adj} {time}, {X} left the house.",
    "{X} did not want to stay at home.",
]
FILLERS = [
    "{X} smiled for no reason.", "{X} thought about the summer.",
    "{pos} phone rang twice, but {pro} did not answer.", "the weather was {adj}.",
    "{X} did not feel like talking.", "{X} looked at the sky for a long time.",
    "{X} counted the coins in {pos} pocket.", "{X} wrote a list of things to do.",
    "the day went by slowly.", "{X} was a little tired.", "{X} hummed an old song.",
    "time passed quickly.",
]
ADJS = ["cold", "warm", "quiet", "windy", "sunny", "grey", "bright", "rainy"]
TIMES = ["morning", "evening", "afternoon"]
# The final sentence: fits every place, ends with the place word (the target).
FINAL_TEMPLATES = [
    "it had been a long day at the {v}",
    "{X} was glad that {pro} had spent the day at the {v}",
    "tomorrow, {X} will go back to the {v}",
    "there is no place {X} likes as much as the {v}",
    "all of this happened at the {v}",
    "{X} will always remember that afternoon at the {v}",
    "when people ask where {pro} was, {X} says {pro} was at the {v}",
    "nothing is quite like a day at the {v}",
    "that is why {X} loves going to the {v}",
    "in the evening, {X} finally left the {v}",
]
HOLDOUT_EVERY = 5  # one in five (place, final template) pairs is held out of training
NAME_P = 0.3  # probability that a sentence about the person names them (else a pronoun)
DISTRACTOR_P = 0.35  # one-place passages: probability of one sentence from another place's pool
TWO_PLACES_P = 0.4  # probability that a passage describes two places, 2-3 sentences each (either ends it)


def is_heldout(place: str, idx: int) -> bool:
    """Fixed split of (place, final template) pairs: 1 in HOLDOUT_EVERY is held out.

    Balanced so that every place and every final template has both kinds of pair.
    """
    return (list(PLACES).index(place) + idx) % HOLDOUT_EVERY == 0


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _fill(template: str, rng: random.Random, name: str, use_name: bool, **extra) -> str:
    pro, obj, pos = ("she", "her", "her") if name in FEMALE else ("he", "him", "his")
    return template.format(X=name if use_name else pro, pro=pro, obj=obj, pos=pos,
                           adj=rng.choice(ADJS), time=rng.choice(TIMES), **extra)


def _described(rng: random.Random, place: str) -> list[str]:
    """The templates of the middle sentences for a passage that ends with `place`."""
    others = [p for p in PLACES if p != place]
    if rng.random() < TWO_PLACES_P:
        other = rng.choice(others)
        return rng.sample(PLACES[place], rng.randint(2, 3)) + rng.sample(PLACES[other], rng.randint(2, 3))
    templates = rng.sample(PLACES[place], rng.randint(3, 5))
    if rng.random() < DISTRACTOR_P:
        templates.append(rng.choice(PLACES[rng.choice(others)]))
    return templates


def make_passage(rng: random.Random, heldout: bool) -> str:
    while True:
        place = rng.choice(list(PLACES))
        idx = rng.randrange(len(FINAL_TEMPLATES))
        if is_heldout(place, idx) == heldout:
            break
    name = rng.choice(FEMALE + MALE)

    intro = _fill(rng.choice(INTRO_TEMPLATES), rng, name, True)
    middle = [_fill(t, rng, name, rng.random() < NAME_P) for t in _described(rng, place)]
    middle += [_fill(t, rng, name, rng.random() < NAME_P)
               for t in rng.sample(FILLERS, rng.randint(1, 2))]
    rng.shuffle(middle)
    final = _fill(FINAL_TEMPLATES[idx], rng, name, rng.random() < NAME_P, v=place)
    return " ".join(_capitalize(s) for s in [intro, *middle, final])


def generate(n: int, seed: int, heldout: bool, exclude: set | None = None) -> list[str]:
    """``n`` distinct passages of 30-80 words, none of them in ``exclude``."""
    rng = random.Random(seed)
    exclude = exclude or set()
    out, seen = [], set()
    while len(out) < n:
        text = make_passage(rng, heldout)
        if not MIN_WORDS <= len(text.split(" ")) <= MAX_WORDS:
            continue
        if text in seen or text in exclude:
            continue
        seen.add(text)
        out.append(text)
    return out


def make_splits(n_train: int = N_TRAIN) -> dict[str, list[str]]:
    task = generate(N_TASK, TASK_SEED, heldout=True)
    calib = generate(N_CALIB, CALIB_SEED, heldout=True, exclude=set(task))
    # training pairs never equal held-out pairs, so train is disjoint from task/calib anyway
    train = generate(n_train, TRAIN_SEED, heldout=False)
    return {"train": train, "task": task, "calib": calib}


def all_words() -> list[str]:
    """Every word the generator can write, sorted (the tokenizer's vocabulary, independent of
    how many passages are generated)."""
    texts = INTRO_TEMPLATES + FILLERS + FINAL_TEMPLATES
    for pool in PLACES.values():
        texts += pool
    texts = [re.sub(r"\{[a-zA-Z]+\}", " ", t) for t in texts]
    texts += [_capitalize(t.strip()) for t in texts]  # sentence-initial forms
    texts += FEMALE + MALE + ADJS + TIMES + list(PLACES)
    texts += ["she", "he", "her", "him", "his", "She", "He", "Her", "His"]
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
        # name the class that every transformers version knows (v5 writes its own backend name)
        cfg_path = out / "model" / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        print(f"tokenizer: {len(tokenizer)} tokens -> {out / 'model'}")
    n_words = sum(len(t.split(" ")) for t in splits["train"])
    print(f"train: {len(splits['train'])} passages ({n_words} words), calib: {len(splits['calib'])}, "
          f"task: {len(splits['task'])} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
