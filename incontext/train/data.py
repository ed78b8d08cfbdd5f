"""Training data for the transformer: world examples encoded once into latent chunks.

Encoding images on the fly made each transformer step several times slower, so examples
are rendered and VAE-encoded in bulk into `out/data/chunk_XXXXX.pt` files (one bucket of
sizes each). The trainer picks up new chunks while it runs, so a producer can keep adding.

    incontext train data --out runs/nano --chunks 12
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from incontext.world.edits import FAMILIES, TRAIN_SIZES, make_example

log = logging.getLogger(__name__)

CHUNK = 1024  # examples per chunk file
HELD_OUT_SEED = 987_654_321  # the quality benchmark draws from this stream; training never does


def chunk_seed(index: int) -> int:
    return 1_000_003 * (index + 1)


def _render_chunk(index: int, size: tuple[int, int], n: int, cache: Path | None = None,
                  families: tuple[str, ...] = FAMILIES) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Render a chunk's examples (from `cache` if it was rendered before the VAE was ready)."""
    if cache is not None and cache.exists():
        z = np.load(cache, allow_pickle=False)
        return z["context"], z["target"], list(z["prompts"]), list(z["families"])
    rng = random.Random(chunk_seed(index))
    ctx, tgt, prompts, fams = [], [], [], []
    for _ in range(n):
        ex = make_example(rng, size=size, families=families)
        ctx.append(np.asarray(ex.context))
        tgt.append(np.asarray(ex.target))
        prompts.append(ex.instruction)
        fams.append(ex.family)
    return np.stack(ctx), np.stack(tgt), prompts, fams


def render_chunks(out: Path, start: int, count: int, chunk_size: int = CHUNK, families: tuple[str, ...] = FAMILIES) -> None:
    """Render chunks' images ahead of encoding: this needs no VAE, so it can run while one trains."""
    images = Path(out) / "images"
    images.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        path = images / f"chunk_{index:05d}.npz"
        if path.exists() or (Path(out) / "data" / f"chunk_{index:05d}.pt").exists():
            continue
        ctx, tgt, prompts, fams = _render_chunk(index, size_for_chunk(index), chunk_size, families=families)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, context=ctx, target=tgt, prompts=np.array(prompts), families=np.array(fams))
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


def produce_chunks(out: Path, vae, start: int, count: int, chunk_size: int = CHUNK, families: tuple[str, ...] = FAMILIES) -> None:
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
        ctx, tgt, prompts, fams = _render_chunk(index, size, chunk_size, cache, families=families)
        blob = {"size": size, "context": _encode(vae, ctx), "target": _encode(vae, tgt), "prompts": prompts, "families": fams}
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
            z = np.load(cache, allow_pickle=False)
            ctx, tgt = z["context"], z["target"]
            blob = {"size": (ctx.shape[2], ctx.shape[1]), "context": _encode(vae, ctx, batch), "target": _encode(vae, tgt, batch),
                    "prompts": list(z["prompts"]), "families": list(z["families"])}
            tmp = path.with_suffix(".tmp")
            torch.save(blob, tmp)
            tmp.rename(path)
            cache.unlink()
            written += 1
            log.info("wrote %s (%dx%d)", path.name, *blob["size"])
        if not follow:
            return written
        time.sleep(poll_seconds)


class LatentChunks:
    """All chunks on disk, grouped by size; `sample` draws a batch from one size bucket."""

    def __init__(self, out: Path):
        self.dir = Path(out) / "data"
        self.loaded: set[str] = set()
        self.buckets: dict[tuple[int, int], dict] = {}
        self.refresh()

    def refresh(self) -> int:
        new = 0
        for path in sorted(self.dir.glob("chunk_*.pt")):
            if path.name in self.loaded:
                continue
            blob = torch.load(path, weights_only=False)
            b = self.buckets.setdefault(tuple(blob["size"]), {"context": [], "target": [], "prompts": [], "families": []})
            for k in ("context", "target"):
                b[k].append(blob[k])
            b["prompts"] += blob["prompts"]
            b["families"] += blob["families"]
            self.loaded.add(path.name)
            new += 1
        for b in self.buckets.values():
            for k in ("context", "target"):
                if isinstance(b[k], list) and b[k]:
                    b[k] = [torch.cat(b[k])]
        return new

    def __len__(self) -> int:
        return sum(len(b["prompts"]) for b in self.buckets.values())

    def sample(self, batch: int, rng: random.Random) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor, list[str]]:
        if not self.buckets:
            raise FileNotFoundError(f"no latent chunks in {self.dir}: run `incontext train data` first")
        sizes = list(self.buckets)
        weights = [len(self.buckets[s]["prompts"]) for s in sizes]
        size = rng.choices(sizes, weights)[0]
        b = self.buckets[size]
        idx = [rng.randrange(len(b["prompts"])) for _ in range(batch)]
        t = torch.tensor(idx)
        return size, b["context"][0][t].float(), b["target"][0][t].float(), [b["prompts"][i] for i in idx]
