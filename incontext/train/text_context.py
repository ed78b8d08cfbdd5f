"""An auxiliary objective for the T5 encoder: each token's output predicts its neighbours.

Trained only through the transformer, the nano T5's outputs read as a bag of words: a probe
(docs/training.md, "What the text encoder says") finds from them which colour of "turn the
red star orange" is the object's and which the new one at chance, while the same probe reads
both from the input embeddings once it is told each token's place. FLUX gives text tokens no
position in the joint attention (their RoPE ids are all zero), so what the encoder's outputs
do not carry, the transformer cannot see. Asking each output to name the word before and the
word after it makes it carry its place among the words: "red" after "the" and before "star",
"orange" after "star". The head is trained beside the model and is not part of the export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
