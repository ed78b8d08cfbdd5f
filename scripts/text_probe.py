"""Probe a model directory's text encodings: do they say which colour of a recolor
instruction is the object's (source) and which the new one (target), and which shape?

    .venv/bin/python scripts/text_probe.py [MODEL_DIR] [--n 3000]

Each probe is fit on three quarters of the instructions and scored on the rest (accuracy).
The rows with positions give the probe each token's place too: where they score high and the
row without does not, the encodings lack the words' order. docs/training.md, "What the text
encoder says", has the bundled model's table.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from incontext import sampler
from incontext.models.loader import load_model
from incontext.world.edits import make_example
from incontext.world.scene import COLORS, SHAPES

STEPS = 300


def _linear(x: torch.Tensor, y: torch.Tensor, fit: int) -> float:
    x = (x - x[:fit].mean(0)) / (x[:fit].std(0) + 1e-6)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(lin(x[:fit]), y[:fit]).backward()
        opt.step()
    return float((lin(x[fit:]).argmax(1) == y[fit:]).float().mean())


def _attention_pooled(x: torch.Tensor, words: torch.Tensor, y: torch.Tensor, fit: int) -> float:
    """Two learned queries over the words (what one attention layer can read), then linear."""
    x = (x - x[:fit].mean((0, 1))) / (x[:fit].std((0, 1)) + 1e-6)
    query = torch.nn.Parameter(torch.randn(2, x.shape[2]) * 0.1)
    key = torch.nn.Linear(x.shape[2], x.shape[2])
    out = torch.nn.Linear(2 * x.shape[2], int(y.max()) + 1)
    opt = torch.optim.Adam([query, *key.parameters(), *out.parameters()], lr=3e-3)

    def predict(z, m):
        a = torch.einsum("btd,qd->bqt", key(z), query).masked_fill(~m[:, None, :], -1e4).softmax(-1)
        return out(torch.einsum("bqt,btd->bqd", a, z).flatten(1))

    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(predict(x[:fit], words[:fit]), y[:fit]).backward()
        opt.step()
    with torch.no_grad():
        return float((predict(x[fit:], words[fit:]).argmax(1) == y[fit:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="incontext/weights/nano", type=Path)
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    torch.manual_seed(0)
    m = load_model(args.model, dtype=torch.float32)
    rng, rows = random.Random(5), []
    while len(rows) < args.n:
        ex = make_example(rng, "recolor", size=(64, 64))  # only the instruction and its labels are used
        obj = ex.scene.objects[ex.info["index"]]
        rows.append((ex.instruction, list(COLORS).index(obj.color), SHAPES.index(obj.kind), list(COLORS).index(ex.info["color"])))
    prompts, fit = [r[0] for r in rows], args.n * 3 // 4
    labels = {"source colour": 1, "shape": 2, "target colour": 3}
    with torch.no_grad():
        txt, vec = (torch.cat(parts).float() for parts in zip(*(sampler.encode_text(m, prompts[i:i + 250]) for i in range(0, len(prompts), 250))))
        ids = sampler.t5_ids(m, prompts)
        embeddings = m.text_encoder_2.get_input_embeddings()(ids).float()
    words = ids != m.tokenizer_2.pad_token_id
    places = 3 * torch.eye(ids.shape[1]).expand(len(rows), -1, -1)
    pooled = {
        "CLIP pooled vector": vec,
        "T5 outputs, mean over the words": (txt * words[..., None]).sum(1) / words.sum(1, keepdim=True),
        "bag of words": torch.zeros(len(rows), len(m.tokenizer_2)).scatter_(1, ids, 1.0),
    }
    sequences = {
        "T5 outputs, attention-pooled": txt,
        "T5 outputs + positions, attention-pooled": torch.cat([txt, places], -1),
        "T5 input embeddings + positions, attention-pooled": torch.cat([embeddings, places], -1),
    }
    print(f"| features | {' | '.join(labels)} |\n|---|---|---|---|")
    for name, x in pooled.items():
        scores = [_linear(x, torch.tensor([r[k] for r in rows]), fit) for k in labels.values()]
        print(f"| {name} | " + " | ".join(f"{s:.0%}" for s in scores) + " |", flush=True)
    for name, x in sequences.items():
        scores = [_attention_pooled(x, words, torch.tensor([r[k] for r in rows]), fit) for k in labels.values()]
        print(f"| {name} | " + " | ".join(f"{s:.0%}" for s in scores) + " |", flush=True)


if __name__ == "__main__":
    main()
