"""The T5 encoder's neighbour-naming objective (train/text_context.py)."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch

from incontext import sampler
from incontext.models.components import NanoConfig, build_text_encoders, build_tokenizer
from incontext.models.loader import load_model
from incontext.models.registry import BUNDLED_NANO_DIR
from incontext.train.text_context import TextContextHead, attend_to_neighbours, text_context_loss
from incontext.world.language import vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"]
SHAPES = ["circle", "square", "triangle", "star", "heart"]


def _ids(tok, prompts) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids


def _word_before_each_colour(t5, head, tok, ids) -> float:
    """Share of colour words whose previous word the head names: "the" for the object's
    colour, the shape for the new one. A colour's embedding alone cannot tell the two apart."""
    with torch.no_grad():
        guess = head.before(t5.eval()(ids)[0]).argmax(-1)
    colour = torch.isin(ids, torch.tensor(tok.convert_tokens_to_ids(COLOURS)))[:, 1:]
    return float((guess[:, 1:][colour] == ids[:, :-1][colour]).float().mean())


def test_the_t5_outputs_learn_to_name_each_words_neighbours():
    torch.manual_seed(0)
    cfg = dataclasses.replace(NanoConfig.tiny(vocabulary()), text_dim=64, text_layers=2)  # two heads: one looks left, one right
    tok = build_tokenizer(cfg.vocab, cfg.max_text_tokens)
    _, t5 = build_text_encoders(cfg, len(tok))
    head = TextContextHead(t5.config.d_model, len(tok))
    prompts = [f"turn the {a} {shape} {b}" for a, b in itertools.permutations(COLOURS, 2) for shape in SHAPES]
    random.Random(0).shuffle(prompts)
    held_out, train = _ids(tok, prompts[:50]), _ids(tok, prompts[50:])  # 50 instructions never trained on
    assert _word_before_each_colour(t5, head, tok, held_out) < 0.5

    opt = torch.optim.Adam([*t5.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(200):
        t5.train()
        batch = train[torch.randint(len(train), (64,))]
        loss = text_context_loss(head, t5(batch)[0], batch, tok.pad_token_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _word_before_each_colour(t5, head, tok, held_out) > 0.95


def test_a_batch_without_words_adds_nothing():
    head = TextContextHead(8, 10)
    txt = torch.randn(2, 5, 8, requires_grad=True)
    ids = torch.zeros(2, 5, dtype=torch.long)  # every instruction dropped: padding only
    ids[:, 0] = 1  # each row's end-of-text token alone
    loss = text_context_loss(head, txt, ids, pad_id=0)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph, so the step's backward works as usual


def _role_probe(x: torch.Tensor, role: torch.Tensor) -> float:
    """Held-out accuracy of a linear probe fit on the first half of the rows."""
    n = len(role) // 2
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-6)
    lin = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x[:n]), role[:n]).backward()
        opt.step()
    return float((lin(x[n:]).argmax(1) == role[n:]).float().mean())


def test_neighbour_heads_make_the_bundled_t5_tell_the_objects_colour_from_the_new_one():
    """"turn the red star orange": from its T5 output alone, is a colour word the object's
    or the new one? Without its two neighbour heads' position bias the bundled T5 cannot say
    (its attention follows the words' contents, not their order); with them, it can."""
    torch.manual_seed(0)
    m = load_model(BUNDLED_NANO_DIR, dtype=torch.float32)
    t5 = m.text_encoder_2.eval()
    with torch.no_grad():  # the heads as every model before run t had them: no position to speak of
        t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight[:, :2] = 0.0
    prompts = [f"turn the {a} {shape} {b}" for a, b in itertools.permutations(COLOURS, 2) for shape in SHAPES]
    random.Random(0).shuffle(prompts)
    ids = sampler.t5_ids(m, prompts)
    colour = torch.isin(ids, torch.tensor(m.tokenizer_2.convert_tokens_to_ids(COLOURS)))
    role = colour.long().cumsum(1)[colour] - 1  # 0: the first colour named (the object's), 1: the new one

    def outputs() -> torch.Tensor:
        with torch.no_grad():
            return t5(ids)[0][colour]

    assert _role_probe(outputs(), role) < 0.7
    attend_to_neighbours(t5)
    assert _role_probe(outputs(), role) > 0.95
