"""Training data for the transformer: world examples encoded once into latent chunks.

Encoding images on the fly made each transformer step several times slower, so examples
are rendered and VAE-encoded in bulk into `out/data/chunk_XXXXX.pt` files (one bucket of
sizes each). The trainer picks up new chunks while it runs, so a producer can keep adding.

A chunk file holds "size" (w, h), "context" and "target" latents (n, C, h/8, w/8) in bf16,
"prompts" and "families"; where any of its examples has a second image (the workflow
families), also "reference" latents (n, C, h/8, w/8; zeros where an example has none) and
"has_reference" (n,) bool. Chunks written before references existed have neither key and
load as examples without one.

    incontext train data --out runs/nano --chunks 12
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from incontext.world.edits import FAMILIES, TRAIN_SIZES, make_example

log = logging.getLogger(__name__)

CHUNK = 1024  # examples per chunk file
HELD_OUT_SEED = 987_654_321  # the quality benchmark draws from this stream; training never does


def chunk_seed(index: int) -> int:
    return 1_000_003 * (index + 1)


@dataclass
class Rendered:
    """A chunk's examples as images: (n, h, w, 3) uint8 each; `reference` is None when no
    example has a second image, else zeros where `has_reference` is False."""

    context: np.ndarray
    target: np.ndarray
    prompts: list[str]
    families: list[str]
    reference: np.ndarray | None = None
    has_reference: np.ndarray | None = None

    @classmethod
    def load(cls, path: Path) -> "Rendered":
        z = np.load(path, allow_pickle=False)
        ref = z["reference"] if "reference" in z else None
        return cls(z["context"], z["target"], list(z["prompts"]), list(z["families"]), ref,
                   z["has_reference"] if ref is not None else None)

    def save(self, path: Path) -> None:
        refs = {} if self.reference is None else {"reference": self.reference, "has_reference": self.has_reference}
        np.savez(path, context=self.context, target=self.target, prompts=np.array(self.prompts), families=np.array(self.families), **refs)

    def encode(self, vae, batch: int = 64) -> dict:
        """The chunk file's content (see the module docstring)."""
        blob = {"size": (self.context.shape[2], self.context.shape[1]), "context": _encode(vae, self.context, batch),
                "target": _encode(vae, self.target, batch), "prompts": self.prompts, "families": self.families}
        if self.reference is not None:
            has = torch.from_numpy(np.asarray(self.has_reference, dtype=bool))
            ref = torch.zeros_like(blob["context"])
            ref[has] = _encode(vae, self.reference[has.numpy()], batch)  # only the rows that have one
            blob["reference"], blob["has_reference"] = ref, has
        return blob


def _render_chunk(index: int, size: tuple[int, int], n: int, cache: Path | None = None,
                  families: tuple[str, ...] = FAMILIES, confusable: float = 0.0) -> Rendered:
    """Render a chunk's examples (from `cache` if it was rendered before the VAE was ready)."""
    if cache is not None and cache.exists():
        return Rendered.load(cache)
    rng = random.Random(chunk_seed(index))
    examples = [make_example(rng, size=size, families=families, confusable_share=confusable) for _ in range(n)]
    has_ref = np.array([ex.reference is not None for ex in examples])
    blank = np.zeros_like(np.asarray(examples[0].context))
    refs = np.stack([np.asarray(ex.reference) if ex.reference is not None else blank for ex in examples]) if has_ref.any() else None
    return Rendered(np.stack([np.asarray(ex.context) for ex in examples]), np.stack([np.asarray(ex.target) for ex in examples]),
                    [ex.instruction for ex in examples], [ex.family for ex in examples], refs, has_ref if has_ref.any() else None)


def render_chunks(out: Path, start: int, count: int, chunk_size: int = CHUNK, families: tuple[str, ...] = FAMILIES,
                  confusable: float = 0.0) -> None:
    """Render chunks' images ahead of encoding: this needs no VAE, so it can run while one trains."""
    images = Path(out) / "images"
    images.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        path = images / f"chunk_{index:05d}.npz"
        if path.exists() or (Path(out) / "data" / f"chunk_{index:05d}.pt").exists():
            continue
        rendered = _render_chunk(index, size_for_chunk(index), chunk_size, families=families, confusable=confusable)
        tmp = path.with_name(path.stem + ".tmp.npz")
        rendered.save(tmp)
        tmp.rename(path)
        log.info("rendered %s", path.name)


@torch.no_grad()
def _encode(vae, arr: np.ndarray, batch: int = 64) -> torch.Tensor:
    out = []
    dev = next(vae.parameters()).device
    for i in range(0, len(arr), batch):
        x = torch.from_numpy(arr[i : i + batch]).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z = vae.encode(x.contiguous(memory_format=torch.channels_last)).latent_dist.mode()
        out.append(((z - vae.config.shift_factor) * vae.config.scaling_factor).cpu())
    return torch.cat(out).to(torch.bfloat16)  # half the disk and memory; fine for targets


def size_for_chunk(index: int) -> tuple[int, int]:
    # Square three times out of five; the two non-square buckets share the rest.
    return TRAIN_SIZES[(0, 0, 0, 1, 2)[index % 5]]


def produce_chunks(out: Path, vae, start: int, count: int, chunk_size: int = CHUNK, families: tuple[str, ...] = FAMILIES,
                   confusable: float = 0.0) -> None:
    """Encode chunks `start`… into `out/data` (from `out/images` where they were rendered ahead)."""
    data = Path(out) / "data"
    data.mkdir(parents=True, exist_ok=True)
    vae.eval()
    for index in range(start, start + count):
        path = data / f"chunk_{index:05d}.pt"
        if path.exists():
            continue
        size = size_for_chunk(index)
        cache = Path(out) / "images" / f"chunk_{index:05d}.npz"
        blob = _render_chunk(index, size, chunk_size, cache, families=families, confusable=confusable).encode(vae)
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.rename(path)
        cache.unlink(missing_ok=True)
        log.info("wrote %s (%dx%d)", path.name, *size)


def encode_rendered(out: Path, vae, follow: bool = False, poll_seconds: float = 2.0, batch: int = 64) -> int:
    """Encode every chunk rendered ahead (`out/images`) into `out/data`; with `follow`, keep
    watching for more until killed. On a GPU machine the CPU cores only render (the slow,
    single-threaded part) and one process encodes for all of them on the GPU. Returns the
    number of chunks written."""
    images, data = Path(out) / "images", Path(out) / "data"
    data.mkdir(parents=True, exist_ok=True)
    vae.eval()
    written = 0
    while True:
        ready = sorted(p for p in images.glob("chunk_*.npz") if ".tmp" not in p.name) if images.is_dir() else []
        for cache in ready:
            path = data / (cache.stem + ".pt")
            blob = Rendered.load(cache).encode(vae, batch)
            tmp = path.with_suffix(".tmp")
            torch.save(blob, tmp)
            tmp.rename(path)
            cache.unlink()
            written += 1
            log.info("wrote %s (%dx%d)", path.name, *blob["size"])
        if not follow:
            return written
        time.sleep(poll_seconds)


@dataclass
class Batch:
    """Training rows from one bucket: latents (B, C, h/8, w/8) in fp32; `reference` None for a
    bucket of examples without a second image."""

    size: tuple[int, int]  # (w, h) in pixels
    context: torch.Tensor
    target: torch.Tensor
    prompts: list[str]
    reference: torch.Tensor | None = None


class LatentChunks:
    """All chunks on disk, grouped into buckets by size and by whether an example has a second
    image, so every batch has one sequence length; `sample` draws a batch from one bucket,
    buckets weighted by their number of examples. A bucket's key is ((w, h), k) with k the
    number of reference images (0 or 1)."""

    def __init__(self, out: Path):
        self.dir = Path(out) / "data"
        self.loaded: set[str] = set()
        self.buckets: dict[tuple[tuple[int, int], int], dict] = {}
        self.refresh()

    def refresh(self) -> int:
        new = 0
        for path in sorted(self.dir.glob("chunk_*.pt")):
            if path.name in self.loaded:
                continue
            blob = torch.load(path, weights_only=False)
            size = tuple(blob["size"])
            has_ref = blob.get("has_reference", torch.zeros(len(blob["prompts"]), dtype=torch.bool))
            for k, rows in ((0, ~has_ref), (1, has_ref)):
                if not rows.any():
                    continue
                b = self.buckets.setdefault((size, k), {"context": [], "target": [], "reference": [], "prompts": [], "families": []})
                for key in ("context", "target", *(("reference",) if k else ())):
                    b[key].append(blob[key][rows])
                picked = rows.nonzero().flatten().tolist()
                b["prompts"] += [blob["prompts"][i] for i in picked]
                b["families"] += [blob["families"][i] for i in picked]
            self.loaded.add(path.name)
            new += 1
        for b in self.buckets.values():
            for key in ("context", "target", "reference"):
                if b[key]:
                    b[key] = [torch.cat(b[key])]
        return new

    def __len__(self) -> int:
        return sum(len(b["prompts"]) for b in self.buckets.values())

    def sample(self, batch: int, rng: random.Random) -> Batch:
        if not self.buckets:
            raise FileNotFoundError(f"no latent chunks in {self.dir}: run `incontext train data` first")
        keys = list(self.buckets)
        weights = [len(self.buckets[k]["prompts"]) for k in keys]
        key = rng.choices(keys, weights)[0]
        b = self.buckets[key]
        idx = [rng.randrange(len(b["prompts"])) for _ in range(batch)]
        t = torch.tensor(idx)
        reference = b["reference"][0][t].float() if key[1] else None
        return Batch(key[0], b["context"][0][t].float(), b["target"][0][t].float(), [b["prompts"][i] for i in idx], reference)
