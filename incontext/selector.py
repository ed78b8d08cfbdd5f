"""A mask of the thing a phrase names, picked among a drawing's flat segments.

Issue 20 lets segmentation be "an in-context edit or a dedicated head, whichever measures
better". The bundled model's own drawing of a mask marks every thing that shares a word with
the one named (asked for "the pink heart", it marks the pink square too), and a removal errs
the same way. This head reads the phrase with the model's own text encoders (T5 states and
CLIP's pooled vector, as the transformer does) and scores each flat segment of the input
(segments.labels) by its colour, its outline and where it lies; the segments it scores over
even odds are the mask. It works where the input is a drawing (flat segments); elsewhere, or
for a model directory without one, the model draws the mask itself.

A model directory ships it as `selector/` (config.json, model.safetensors), which stock
diffusers ignores (model_index.json does not list it); `train selector` trains it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from incontext import segments
from incontext.regions import MIN_REGION_SHARE

SHAPE = 16  # a segment's outline, fitted into a SHAPE × SHAPE square
GEOMETRY = 6  # area share, box centre x and y, box width and height, touches the border
FEATURES = 3 + GEOMETRY + SHAPE * SHAPE
MAX_SEGMENTS = 48  # the largest ones; a drawing has a few things and their rims
# Neighbouring pixels of one segment differ by at most this (per RGB channel): an object's
# antialiased rim steps by more than this from its inside, so at segments.TOLERANCE (24) an
# object whose colour is near the background's joins it through the rim.
TOLERANCE = 8
THRESHOLD = 0.5  # a segment is the thing where the head gives it even odds or more
DIRNAME = "selector"


@dataclass(frozen=True)
class Candidates:
    labels: np.ndarray  # (h, w) segment ids (segments.labels)
    ids: np.ndarray  # (S,) the segments scored, largest first
    features: np.ndarray  # (S, FEATURES) float32


def candidates(image: Image.Image) -> Candidates | None:
    """The segments of `image` worth scoring and their features; None where it is not a
    drawing (too many runs for segments.labels) or has no segment of a thing's size."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    labels = segments.labels(image, TOLERANCE)
    if labels is None:
        return None
    h, w = labels.shape
    counts = np.bincount(labels.ravel())
    ids = np.argsort(-counts, kind="stable")[:MAX_SEGMENTS]
    ids = ids[counts[ids] >= max(4, MIN_REGION_SHARE * h * w)]
    if not len(ids):
        return None
    flat = labels.ravel()
    colour = np.stack([np.bincount(flat, weights=rgb[..., c].ravel(), minlength=len(counts)) for c in range(3)], axis=1)
    colour = colour[ids] / counts[ids, None]
    rows = np.zeros((len(ids), FEATURES), dtype=np.float32)
    for k, sid in enumerate(ids.tolist()):
        ys, xs = np.nonzero(labels == sid)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        touches = float(y0 == 0 or x0 == 0 or y1 == h or x1 == w)
        geometry = [counts[sid] / (h * w), (x0 + x1) / (2 * w), (y0 + y1) / (2 * h), (x1 - x0) / w, (y1 - y0) / h, touches]
        rows[k, :3] = colour[k]
        rows[k, 3 : 3 + GEOMETRY] = geometry
        rows[k, 3 + GEOMETRY :] = _outline(labels[y0:y1, x0:x1] == sid)
    return Candidates(labels, ids, rows)


def _outline(crop: np.ndarray) -> np.ndarray:
    """A segment's pixels in its box, centred in a square (its aspect kept) and resized."""
    side = max(crop.shape)
    square = np.zeros((side, side), dtype=np.uint8)
    oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop * 255
    small = Image.fromarray(square).resize((SHAPE, SHAPE), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32).ravel() / 255.0


@dataclass(frozen=True)
class SelectorConfig:
    text_dim: int  # T5's d_model
    pooled_dim: int  # CLIP's hidden size
    hidden: int = 128
    heads: int = 4  # learned queries that pool the T5 states


class Selector(nn.Module):
    """Scores (B, S) of S segments' features against a phrase's T5 states and pooled vector."""

    def __init__(self, config: SelectorConfig):
        super().__init__()
        self.config = config
        c = config
        self.pool = nn.Linear(c.text_dim, c.heads)
        self.text = nn.Sequential(nn.Linear(c.heads * c.text_dim + c.pooled_dim, c.hidden), nn.GELU(), nn.Linear(c.hidden, c.hidden))
        self.segment = nn.Sequential(nn.Linear(FEATURES, c.hidden), nn.GELU(), nn.Linear(c.hidden, c.hidden))
        self.score = nn.Sequential(nn.Linear(3 * c.hidden, c.hidden), nn.GELU(), nn.Linear(c.hidden, 1))

    def forward(self, txt: torch.Tensor, vec: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        weights = self.pool(txt).softmax(dim=1)  # (B, L, heads): where each query reads
        pooled = torch.einsum("blh,bld->bhd", weights, txt).flatten(1)
        t = self.text(torch.cat([pooled, vec], dim=-1))[:, None].expand(-1, features.shape[1], -1)
        s = self.segment(features)
        return self.score(torch.cat([s, t, s * t], dim=-1)).squeeze(-1)

    @torch.no_grad()
    def mask(self, txt: torch.Tensor, vec: torch.Tensor, image: Image.Image) -> Image.Image | None:
        """The thing (white) on black at `image`'s size, from the phrase's encoding (txt (1, L, D),
        vec (1, P)); None where `image` is not a drawing. Black where no segment is the thing."""
        found = candidates(image)
        if found is None:
            return None
        logits = self(txt.float(), vec.float(), torch.from_numpy(found.features)[None])[0]
        picked = found.ids[(logits.sigmoid() >= THRESHOLD).numpy()]
        return Image.fromarray(np.where(np.isin(found.labels, picked), 255, 0).astype(np.uint8), mode="L")


def draw(m, prompt: str, image: Image.Image) -> Image.Image | None:
    """The mask of what `prompt` names in `image` (RGB, white on black, as the model would draw
    it) by the selector of `m` (a loaded Kontext `sampler.Models`); None where `m` ships no
    selector or `image` is not a drawing: the model must draw it then."""
    from incontext import sampler

    if getattr(m, "selector", None) is None:
        return None
    txt, vec = sampler.encode_text(m, [prompt])
    mask = m.selector.mask(txt, vec, image)
    return None if mask is None else mask.convert("RGB")


def save(selector: Selector, model_dir: Path) -> Path:
    from safetensors.torch import save_file

    out = Path(model_dir) / DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(selector.config), indent=2) + "\n")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in selector.state_dict().items()}, str(out / "model.safetensors"))
    return out


def load(model_dir: Path) -> Selector | None:
    """The model directory's selector (computing in fp32), or None when it ships none."""
    from safetensors.torch import load_file

    folder = Path(model_dir) / DIRNAME
    if not (folder / "model.safetensors").is_file():
        return None
    selector = Selector(SelectorConfig(**json.loads((folder / "config.json").read_text())))
    selector.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
    return selector.eval().requires_grad_(False)
