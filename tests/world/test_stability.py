"""What must not move when the world grows: the issue-2 families' examples and the vocabulary.

The bundled model's tokenizer was built from `vocabulary()`, and the held-out benchmark and
its regression floor were measured on these exact examples. The hashes were taken before the
world gained its KontextBench families; if one changes, old scores stop being comparable.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from incontext.bench import heldout
from incontext.world.edits import make_example
from incontext.world.language import vocabulary

PINNED = {
    "recolor": "d59ef4658ac602dc",
    "remove": "c814d28af8b780d4",
    "add": "ecaaa9bbc1a52719",
    "move": "9857e04eb405fda8",
    "background": "a8f375899611ad3d",
    "grayscale": "db701083288ec87d",
}
ISSUE_2_FAMILIES = tuple(PINNED)


def _digest(examples) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.family.encode())
        h.update(ex.instruction.encode())
        h.update(repr(sorted(ex.info.items())).encode())
        for array in (np.asarray(ex.context), np.asarray(ex.target), ex.mask):
            h.update(array.tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("family", ISSUE_2_FAMILIES)
def test_issue_2_families_draw_the_same_examples(family):
    rng = random.Random(f"pin:{family}")
    examples = [make_example(rng, family, size=size) for size in ((128, 128), (160, 96), (96, 160))]
    assert _digest(examples) == PINNED[family]


def test_held_out_examples_and_sequences_are_unchanged():
    examples = [ex for family in ISSUE_2_FAMILIES for ex in heldout.heldout_examples(family, 3)]
    assert _digest(examples) == "c3d4ffa48e2f9952"
    assert _digest([ex for seq in heldout.heldout_sequences(2, 3) for ex in seq]) == "5fe1ff5bf6681ce6"


# Words the workflow families (issue 20) brought, appended after the bundled model's 150 in
# this order: a model trained with them gives them these ids; a new word goes after them.
WORKFLOW_WORDS = ["second", "other", "copy", "objects", "emblem", "logo", "free", "spot", "empty", "where", "space",
                  "fill", "mask", "segment", "select", "show", "only", "as", "cut"]


def test_the_vocabulary_is_the_one_the_bundled_tokenizer_was_built_from():
    words = vocabulary()
    assert hashlib.sha256(" ".join(words[:150]).encode()).hexdigest()[:16] == "aa60e386f928a0eb"
    assert words[150:] == WORKFLOW_WORDS


def test_the_bundled_tokenizer_gives_every_word_the_id_the_vocabulary_gives_it():
    # The bundled model was trained with the grown vocabulary (the workflows' words after the
    # first 150), so a tokenizer built from vocabulary() today reads prompts exactly as it does.
    from incontext.models.components import build_tokenizer
    from incontext.models.registry import BUNDLED_NANO_DIR
    from transformers import PreTrainedTokenizerFast

    bundled = PreTrainedTokenizerFast.from_pretrained(BUNDLED_NANO_DIR / "tokenizer")
    assert build_tokenizer(vocabulary(), 32).get_vocab() == bundled.get_vocab()
    assert bundled.unk_token_id not in bundled("mask the emblem in the second image").input_ids