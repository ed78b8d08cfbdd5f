"""How people word edit instructions: templates per edit family, and the words they use.

Templates vary verbs, word order and politeness so users need not guess one phrasing.
The tokenizer's vocabulary is built from these words (plus a few common extras).
"""

from __future__ import annotations

import random
import re

from incontext.world.scene import COLORS, POSITIONS, SHAPES

# Words people use for a colour or shape that our names cover.
COLOR_SYNONYMS = {"grey": "gray", "violet": "purple", "crimson": "red", "navy": "blue", "lime": "green"}
SHAPE_SYNONYMS = {"box": "square", "ball": "circle", "dot": "circle", "disc": "circle", "rectangle": "square"}

TEMPLATES: dict[str, list[str]] = {
    "recolor": [
        "make the {obj} {color}",
        "turn the {obj} {color}",
        "change the {obj} to {color}",
        "recolor the {obj} {color}",
        "recolor the {obj} to {color}",
        "paint the {obj} {color}",
        "color the {obj} {color}",
        "change the color of the {obj} to {color}",
        "make the color of the {obj} {color}",
        "the {obj} should be {color}",
        "please make the {obj} {color}",
        "can you turn the {obj} {color}",
        "change the {obj} into a {color} one",
    ],
    "remove": [
        "remove the {obj}",
        "delete the {obj}",
        "erase the {obj}",
        "get rid of the {obj}",
        "take out the {obj}",
        "take away the {obj}",
        "please remove the {obj}",
        "remove the {obj} from the image",
        "make the {obj} disappear",
        "delete the {obj} from the picture",
    ],
    "add": [
        "add a {obj} in the {pos}",
        "add a {obj} to the {pos}",
        "put a {obj} in the {pos}",
        "place a {obj} in the {pos}",
        "draw a {obj} in the {pos}",
        "add a {obj} at the {pos}",
        "in the {pos} add a {obj}",
        "please add a {obj} in the {pos}",
        "insert a {obj} in the {pos}",
    ],
    "move": [
        "move the {obj} to the {pos}",
        "put the {obj} in the {pos}",
        "place the {obj} in the {pos}",
        "shift the {obj} to the {pos}",
        "move the {obj} over to the {pos}",
        "drag the {obj} to the {pos}",
        "the {obj} should be in the {pos}",
        "please move the {obj} to the {pos}",
    ],
    "background": [
        "change the background to {color}",
        "make the background {color}",
        "set the background to {color}",
        "turn the background {color}",
        "change the background color to {color}",
        "make the background color {color}",
        "use a {color} background",
        "give it a {color} background",
        "paint the background {color}",
        "replace the background with {color}",
    ],
    "grayscale": [
        "make it grayscale",
        "make it black and white",
        "convert to grayscale",
        "convert the image to black and white",
        "remove the color",
        "remove all color",
        "desaturate the image",
        "make the image gray scale",
        "turn it into a black and white picture",
        "grayscale",
    ],
    "resize": [
        "make the {obj} {size}",
        "the {obj} should be {size}",
        "please make the {obj} {size}",
        "can you make the {obj} {size}",
        "i want the {obj} {size}",
        "change the {obj} to be {size}",
        "make the {obj} {size} please",
        "i would like the {obj} {size}",
    ],
    "replace": [
        "replace the {obj} with a {new}",
        "turn the {obj} into a {new}",
        "change the {obj} into a {new}",
        "change the {obj} to a {new}",
        "make the {obj} a {new}",
        "the {obj} should be a {new}",
        "put a {new} instead of the {obj}",
        "use a {new} instead of the {obj}",
        "please replace the {obj} with a {new}",
        "can you turn the {obj} into a {new}",
    ],
    "invert": [
        "invert the colors",
        "invert the colours",
        "invert the image",
        "invert the picture",
        "make it a negative",
        "make it negative",
        "turn it into a negative",
        "make the colors inverted",
        "i want the colors inverted",
        "please invert the colors",
        "can you invert the image",
        "invert all colors",
    ],
    "night": [
        "make it night",
        "make it dark",
        "make it darker",
        "turn day into night",
        "change it to night",
        "turn it into night",
        "make the picture dark",
        "make the image darker",
        "change the day to night",
        "i want it at night",
        "please make it night",
        "make it dark like at night",
    ],
    "texture": [
        "make the background {color} with {pattern}",
        "give it a {color} background with {pattern}",
        "use a {color} background with {pattern}",
        "change the background to {color} with {pattern}",
        "put {pattern} on a {color} background",
        "set the background to {color} with small {pattern}",
        "replace the background with {color} and {pattern}",
        "i want a {color} background with {pattern}",
        "make the background {pattern} on {color}",
    ],
    "outline": [
        "outline style",
        "make it outline style",
        "turn it into an outline",
        "change it to an outline",
        "make an outline of the image",
        "draw the outline",
        "draw an outline of it",
        "give it an outline style",
        "convert the image to an outline",
        "convert to outline style",
        "i want an outline of the picture",
    ],
    "pixelate": [
        "make it pixelated",
        "pixelated",
        "make the image pixelated",
        "pixel style",
        "make it pixel style",
        "give it a pixel style",
        "i want it pixelated",
        "change it to a pixelated image",
        "turn it into a pixelated picture",
        "convert to pixel style",
        "please make the picture pixelated",
    ],
    "pastel": [
        "make it pastel",
        "use pastel colors",
        "pastel style",
        "make the colors pastel",
        "turn it into a pastel picture",
        "give it pastel colours",
        "change the colours to pastel",
        "please make it pastel",
        "convert to pastel colors",
        "i want pastel colors",
        "make it pastel style",
    ],
    # Text editing: recolour the written word, or write another word in its place.
    "text_color": [
        "make the text {color}",
        "turn the text {color}",
        "color the text {color}",
        "recolor the text {color}",
        "change the color of the text to {color}",
        "change the text color to {color}",
        "make the color of the word {color}",
        "the text should be {color}",
        "please make the text {color}",
        "paint the text {color}",
    ],
    "text_word": [
        "change the word {old} to {new}",
        "replace the word {old} with {new}",
        "replace the text {old} with {new}",
        "change the text from {old} to {new}",
        "change the word to {new}",
        "use the word {new} instead of {old}",
        "replace {old} with {new}",
        "the word should be {new} instead of {old}",
        "please change the word {old} to {new}",
        "put the word {new} instead of {old}",
    ],
    # Character reference: the creature (named by its body) elsewhere, on another background, or both;
    # or beside other shapes. The words are the vocabulary's own ("next to", "beside" are not in it).
    "creature_move": [
        "put the {obj} in the {pos}",
        "move the {obj} to the {pos}",
        "place the {obj} in the {pos}",
        "the {obj} should be in the {pos}",
        "i want the {obj} in the {pos}",
        "put it in the {pos}",
        "now put the {obj} at the {pos}",
    ],
    "creature_background": [
        "put the {obj} on a {color} background",
        "place the {obj} on a {color} background",
        "give the {obj} a {color} background",
        "put it on a {color} background",
        "i want the {obj} on a {color} background",
        "now put the {obj} on {color}",
        "the {obj} on a {color} background",
    ],
    "creature_both": [
        "put the {obj} in the {pos} on a {color} background",
        "place the {obj} in the {pos} of a {color} picture",
        "move the {obj} to the {pos} and make the background {color}",
        "the {obj} in the {pos} on a {color} background",
        "put it in the {pos} on a {color} background",
        "on a {color} background put the {obj} in the {pos}",
        "i want the {obj} at the {pos} on a {color} background",
    ],
    "creature_beside": [
        "put the {obj} with {things}",
        "put {things} at the side of the {obj}",
        "place {things} at the side of the {obj}",
        "add {things} at the side of the {obj}",
        "draw {things} at the side of the {obj}",
        "put it with {things} at its side",
        "give the {obj} {things} at its side",
        "i want the {obj} with {things} at its side",
        "now put the {obj} with {things}",
        "can you put {things} at the side of the {obj}",
    ],
}

# Workflow families (issue 20): a reference image ("the second image"), an emblem to place,
# an object to mask. Kept apart from TEMPLATES because their new words are appended to the
# vocabulary after the bundled model's 150 (see `vocabulary`), so its token ids stay put.
WORKFLOW_TEMPLATES: dict[str, list[str]] = {
    "bgref": [
        "use the background of the second image",
        "use the background from the second image",
        "take the background from the second image",
        "take the background of the other picture",
        "copy the background of the second image",
        "give it the background of the second picture",
        "put the objects on the background of the second image",
        "replace the background with the one from the second image",
        "change the background to the one in the second picture",
        "i want the background of the other image",
        "please use the background of the second picture",
    ],
    "emblem": [
        "put the emblem in the {pos}",
        "place the emblem in the {pos}",
        "add the emblem in the {pos}",
        "add the emblem to the {pos}",
        "put the logo in the {pos}",
        "place the logo at the {pos}",
        "put the emblem from the second image in the {pos}",
        "add the logo of the second picture at the {pos}",
        "in the {pos} put the emblem",
        "please put the emblem in the {pos}",
    ],
    "emblem_free": [
        "put the emblem in the free spot",
        "place the emblem in the free spot",
        "put the emblem in the empty spot",
        "add the emblem where there is space",
        "put the logo in the free spot",
        "fill the free spot with the emblem",
        "fill the empty spot with the logo",
        "put the emblem from the second image in the free spot",
        "please put the emblem in the empty spot",
    ],
    "segment": [
        "mask the {obj}",
        "make a mask of the {obj}",
        "segment the {obj}",
        "select the {obj}",
        "give me a mask of the {obj}",
        "show only the {obj} as a mask",
        "make a black and white mask of the {obj}",
        "i want a mask of the {obj}",
        "please mask the {obj}",
        "cut out the {obj} as a mask",
    ],
}

# Position phrases: the canonical name and a few ways to say it.
POSITION_WORDS: dict[str, list[str]] = {
    "top left": ["top left", "upper left", "top left corner"],
    "top": ["top", "top middle", "top center"],
    "top right": ["top right", "upper right", "top right corner"],
    "left": ["left", "left side", "middle left"],
    "center": ["center", "middle", "centre"],
    "right": ["right", "right side", "middle right"],
    "bottom left": ["bottom left", "lower left", "bottom left corner"],
    "bottom": ["bottom", "bottom middle", "bottom center"],
    "bottom right": ["bottom right", "lower right", "bottom right corner"],
}

EXTRA_WORDS = (
    "a an the it this that to of in on at into with and or please image picture photo "
    "color colour colors colours make turn change set put move add remove one ones object shape "
    "background foreground corner side middle top bottom left right upper lower center centre "
    "red orange yellow green blue purple pink brown white black gray grey night day dark light "
    "bright darker lighter invert inverted negative style outline pixel pixelated pastel text word "
    "letter bigger smaller larger big small large replace with instead should be can you could "
    "would like want i me my its is are was all every each there here some now"
)


def say_object(color: str, kind: str, rng: random.Random) -> str:
    """How a person names a coloured shape; occasionally with a synonym."""
    if rng.random() < 0.08:
        kind = rng.choice([k for k, v in SHAPE_SYNONYMS.items() if v == kind] or [kind])
    if rng.random() < 0.05:
        color = rng.choice([k for k, v in COLOR_SYNONYMS.items() if v == color] or [color])
    return f"{color} {kind}"


def say_things(things: list[tuple[str, str]], rng: random.Random) -> str:
    """Some (colour, kind) shapes as a person lists them: "a red circle and an orange star"."""
    named = [say_object(color, kind, rng) for color, kind in things]
    return " and ".join(f"{'an' if name[0] in 'aeiou' else 'a'} {name}" for name in named)


def phrase(family: str, rng: random.Random, **slots: str) -> str:
    templates = TEMPLATES[family] if family in TEMPLATES else WORKFLOW_TEMPLATES[family]
    return rng.choice(templates).format(**slots)


def _template_words(templates: list[str]) -> list[str]:
    """The words of some templates, slots left out, in order of first use."""
    words = [w for t in templates for w in re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", t))]
    return list(dict.fromkeys(words))


def vocabulary() -> list[str]:
    """The tokenizer's words. The first 150, sorted, are the bundled model's (its token ids);
    words the workflow families brought follow in order of first use, so every word keeps its
    id when the vocabulary grows, and a model trained on the old one can be grown from
    (train/transformer.py resizes its text embeddings)."""
    first = _bundled_vocabulary()
    known = set(first)
    added = [w for family in WORKFLOW_TEMPLATES.values() for w in _template_words(family) if w not in known]
    return first + list(dict.fromkeys(added))


def _bundled_vocabulary() -> list[str]:
    words: set[str] = set(EXTRA_WORDS.split())
    words.update(COLORS)
    words.update(SHAPES)
    words.update(s + "s" for s in SHAPES)
    words.update(COLOR_SYNONYMS)
    words.update(SHAPE_SYNONYMS)
    for name in POSITIONS:
        words.update(name.split())
    for options in POSITION_WORDS.values():
        for o in options:
            words.update(o.split())
    for templates in TEMPLATES.values():
        for t in templates:
            words.update(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", t)))
    return sorted(words)
