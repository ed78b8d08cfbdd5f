"""Word order in the T5 encoder's outputs: two attention heads that read each word's
neighbours, and an auxiliary objective that has each output name them.

Trained only through the transformer, the nano T5's outputs read as a bag of words: a probe
(docs/training.md, "What the text encoder says") finds from them which colour of "turn the
red star orange" is the object's and which the new one at chance, while the same probe reads
both from the input embeddings once it is told each token's place. FLUX gives text tokens no
position in the joint attention (their RoPE ids are all zero), so what the encoder's outputs
do not carry, the transformer cannot see. Asking each output to name the word before and the
word after it makes it carry its place among the words: "red" after "the" and before "star",
"orange" after "star". The head is trained beside the model and is not part of the export.

That loss alone did not teach the bundled T5 the order: in its first layer the words'
contents set attention logits far larger than the relative position bias that could tell
"before" from "after", so the softmax never feels the bias, nor passes it a gradient.
`attend_to_neighbours` sets that bias outright: one head of the first layer reads the word
before, one the word after, and the outputs say at once which colour is the object's and
which the new one (docs/training.md has the figures).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.t5.modeling_t5 import T5Attention

# Larger than any content logit of the bundled T5's first layer, so the two heads read their
# neighbour whatever the words are.
NEIGHBOUR_BIAS = 60.0


def attend_to_neighbours(t5, strength: float = NEIGHBOUR_BIAS) -> None:
    """Point heads 0 and 1 of `t5`'s first layer (a transformers T5 encoder; the layer whose
    relative position bias every layer shares) at the word before and the word after each
    word. A stock T5 still: only the bias table's values change."""
    att = t5.encoder.block[0].layer[0].SelfAttention
    if att.n_heads < 2:
        raise ValueError(f"the T5 has {att.n_heads} attention head; reading both neighbours takes two")
    before, after = T5Attention._relative_position_bucket(
        torch.tensor([-1, 1]), bidirectional=True, num_buckets=att.relative_attention_num_buckets,
        max_distance=att.relative_attention_max_distance,
    ).tolist()
    with torch.no_grad():
        table = att.relative_attention_bias.weight  # (buckets, heads)
        table[:, :2] = 0.0
        table[before, 0] = strength
        table[after, 1] = strength


class TextContextHead(torch.nn.Module):
    """Two linear read-outs of a T5 output token: the word before it, the word after it."""

    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.before = torch.nn.Linear(width, vocab)
        self.after = torch.nn.Linear(width, vocab)


def text_context_loss(head: TextContextHead, txt: torch.Tensor, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Cross-entropy of naming each word's neighbours from its output (`txt`: (B, T, D) T5
    outputs of `ids`: (B, T)), over the pairs of adjacent words that are not padding. 0 for a
    batch without any (every instruction dropped)."""
    ids = ids.to(txt.device)
    real = ids != pad_id
    pairs = real[:, 1:] & real[:, :-1]  # positions i, i + 1 both words
    if not pairs.any():
        return txt.sum() * 0.0
    before = F.cross_entropy(head.before(txt[:, 1:][pairs].float()), ids[:, :-1][pairs])
    after = F.cross_entropy(head.after(txt[:, :-1][pairs].float()), ids[:, 1:][pairs])
    return (before + after) / 2
