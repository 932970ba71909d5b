"""A seeded generator of short product reviews: the embedded default world's text.

Each review draws a latent opinion in [-1, 1], then a length (terse to rambling) and, per
sentence, an aspect whose polarity follows the opinion with some noise, so reviews range from
harsh to glowing, include mixed ones, and use negation ("not bad") and intensifiers
("extremely"). A model trained on these texts samples completions that spread across both
sentiment and length, which is what the rewards and VAS need to have something to steer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pandas as pd

ITEMS = {
    "kitchen": ["blender", "coffee maker", "toaster", "kettle", "rice cooker", "knife set", "frying pan"],
    "audio": ["headphones", "speaker", "earbuds", "soundbar", "record player"],
    "tech": ["laptop", "phone", "tablet", "keyboard", "mouse", "monitor", "smartwatch", "router"],
    "home": ["vacuum", "lamp", "desk chair", "mattress", "air purifier", "fan", "heater"],
    "outdoor": ["backpack", "tent", "water bottle", "bike helmet", "running shoes", "jacket"],
}

ASPECTS = {
    "kitchen": ["the motor", "the lid", "the handle", "the heating", "the cleanup", "the timer"],
    "audio": ["the sound", "the bass", "the battery", "the fit", "the pairing", "the volume"],
    "tech": ["the screen", "the battery", "the speed", "the keys", "the software", "the charger"],
    "home": ["the noise level", "the brightness", "the comfort", "the remote", "the filter", "the cord"],
    "outdoor": ["the zipper", "the straps", "the fabric", "the weight", "the seams", "the grip"],
}
COMMON_ASPECTS = ["the price", "the quality", "the design", "the packaging", "the shipping",
                  "the customer service", "the instructions", "the color", "the size"]

POSITIVE = ["great", "excellent", "good", "solid", "fantastic", "reliable", "lovely", "perfect",
            "impressive", "comfortable", "sturdy", "amazing", "wonderful", "nice"]
NEGATIVE = ["terrible", "awful", "bad", "poor", "flimsy", "disappointing", "cheap", "useless",
            "horrible", "weak", "annoying", "broken", "noisy", "ugly"]
INTENSIFIERS = ["really", "very", "extremely", "incredibly", "super", "truly", "quite", "so"]
HEDGES = ["a bit", "somewhat", "slightly", "kind of", "fairly"]

OPENINGS = [
    "I bought this {item} last {time}",
    "I got this {item} as a gift",
    "We have been using this {item} for {span}",
    "My new {item} arrived {when}",
    "I ordered the {item} for my {person}",
    "After {span} with this {item}",
    "This is my second {item} from this brand",
    "I was looking for a cheap {item}",
    "The {item} showed up {when}",
    "I replaced my old {item} with this one",
    "Picked up this {item} on sale",
    "So I finally tried the {item}",
]
TIMES = ["week", "month", "year", "spring", "summer", "winter"]
SPANS = ["two weeks", "a month", "three months", "a year", "a few days", "six months"]
WHENS = ["yesterday", "on time", "two days late", "early", "this morning", "last night"]
PERSONS = ["wife", "husband", "mom", "dad", "sister", "brother", "office", "kids", "roommate"]

POS_SENTENCES = [
    "{Aspect} is {int} {pos}.",
    "{Aspect} is {pos}.",
    "I love {aspect}.",
    "{Aspect} works {int} well.",
    "{Aspect} is not {neg} at all.",
    "Honestly {aspect} is {pos} for the price.",
    "{Aspect} never gives me trouble.",
    "I was {int} happy with {aspect}.",
    "{Aspect} is {pos} and {pos2}.",
    "No complaints about {aspect}.",
    "{Aspect} feels {pos}.",
]
NEG_SENTENCES = [
    "{Aspect} is {int} {neg}.",
    "{Aspect} is {neg}.",
    "I hate {aspect}.",
    "{Aspect} stopped working after {span}.",
    "{Aspect} is not {pos} at all.",
    "Honestly {aspect} is {neg} for the price.",
    "{Aspect} gives me trouble every day.",
    "I was {int} unhappy with {aspect}.",
    "{Aspect} is {neg} and {neg2}.",
    "{Aspect} feels {neg}.",
    "The worst part is {aspect}.",
]
MIXED_SENTENCES = [
    "{Aspect} is {hedge} {pos} but {aspect2} is {neg}.",
    "{Aspect} is {hedge} {neg} but {aspect2} is {pos}.",
    "{Aspect} is fine, nothing special.",
    "{Aspect} is okay I guess.",
    "{Aspect} could be better.",
]
FILLERS = [
    "I use it every day.",
    "It took a while to set up.",
    "My {person} uses it too.",
    "It came in a small box.",
    "I compared it with a few others before buying.",
    "It replaced an older model.",
    "The manual is short.",
    "I mostly use it on weekends.",
]
POS_CLOSINGS = ["Highly recommend!", "Would buy again.", "Five stars.", "Totally worth it.",
                "Love it!", "Great buy.", "Very happy with it."]
NEG_CLOSINGS = ["Returning it.", "Do not buy.", "One star.", "Waste of money.",
                "Very disappointed.", "Avoid this one.", "Never again."]
NEUTRAL_CLOSINGS = ["It does the job.", "Three stars.", "It is okay.", "Not sure yet."]


@dataclass(frozen=True)
class CorpusConfig:
    n_reviews: int = 24000
    seed: int = 0
    # Probabilities of a review being terse (1 sentence), typical, or rambling (many sentences).
    max_sentences: int = 7


def _fill(template: str, rng: random.Random, category: str, item: str) -> str:
    aspects = ASPECTS[category] + COMMON_ASPECTS
    aspect, aspect2 = rng.sample(aspects, 2)
    pos, pos2 = rng.sample(POSITIVE, 2)
    neg, neg2 = rng.sample(NEGATIVE, 2)
    values = {
        "item": item, "aspect": aspect, "aspect2": aspect2, "Aspect": aspect[0].upper() + aspect[1:],
        "pos": pos, "pos2": pos2, "neg": neg, "neg2": neg2,
        "int": rng.choice(INTENSIFIERS), "hedge": rng.choice(HEDGES),
        "time": rng.choice(TIMES), "span": rng.choice(SPANS), "when": rng.choice(WHENS),
        "person": rng.choice(PERSONS),
    }
    return template.format(**values)


def opening(rng: random.Random, category: str, item: str) -> str:
    """A sentiment-neutral review opening; prompts are drawn from the same templates."""
    return _fill(rng.choice(OPENINGS), rng, category, item)


def review(rng: random.Random, max_sentences: int = 7) -> tuple[str, float]:
    """One review and its latent opinion in [-1, 1]."""
    category = rng.choice(list(ITEMS))
    item = rng.choice(ITEMS[category])
    opinion = max(-1.0, min(1.0, rng.gauss(0.0, 0.6)))
    # Mostly short reviews with a long tail of rambling ones.
    n_body = min(max_sentences, 1 + int(rng.expovariate(0.6)))
    parts = [opening(rng, category, item) + rng.choice([".", " and", ",", "."])]
    first = True
    for _ in range(n_body):
        roll = rng.random()
        if roll < 0.12:
            template = rng.choice(FILLERS)
        elif roll < 0.25:
            template = rng.choice(MIXED_SENTENCES)
        elif rng.random() < 0.5 + 0.45 * opinion:
            template = rng.choice(POS_SENTENCES)
        else:
            template = rng.choice(NEG_SENTENCES)
        sentence = _fill(template, rng, category, item)
        if first and not parts[0].endswith("."):
            # "I bought this kettle last week and the lid is ..." reads as one sentence.
            sentence = sentence[0].lower() + sentence[1:]
        parts.append(sentence)
        first = False
    if rng.random() < 0.7:
        if opinion > 0.25:
            parts.append(rng.choice(POS_CLOSINGS))
        elif opinion < -0.25:
            parts.append(rng.choice(NEG_CLOSINGS))
        else:
            parts.append(rng.choice(NEUTRAL_CLOSINGS))
    return " ".join(parts), opinion


def generate_corpus(config: CorpusConfig) -> pd.DataFrame:
    """Columns: review_id, text, opinion (the latent sentiment the review was drawn with)."""
    rng = random.Random(config.seed)
    rows = []
    for i in range(config.n_reviews):
        text, opinion = review(rng, config.max_sentences)
        rows.append({"review_id": f"r{i:06d}", "text": text, "opinion": round(opinion, 4)})
    return pd.DataFrame(rows)


def generate_openings(n: int, seed: int) -> list[str]:
    """n distinct review openings (prompts), seeded, independent of the corpus draw."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    attempts = 0
    while len(seen) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct openings; only {len(seen)} exist")
        category = rng.choice(list(ITEMS))
        seen.setdefault(opening(rng, category, rng.choice(ITEMS[category])), None)
    return list(seen)
