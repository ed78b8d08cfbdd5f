"""The transformer and the VAE compiled with torch.compile, made ready in the background.

At the nano model's sizes a transformer pass is mostly Python and kernel-launch overhead,
which torch.compile removes: on the 2-core CPU the docs' figures come from, a pass at batch 1
takes 37 ms eager and 22 ms compiled, a 128² VAE decode 45 ms and 18 ms (docs/engine.md).
Compiling costs about a minute per graph, though, so the engine never waits for it: it
serves eagerly from the start, while a thread compiles and runs the graphs a bucket needs
(batch 1 is specialised by dynamo; batch ≥ 2 is one graph with a dynamic batch and token
count) on dummy inputs, and then ends. Only then do requests of that bucket use the compiled
modules. A bucket first seen in a request is queued for warming and served eagerly until it
is warm, so a request never stalls on a compile. Inductor keeps its compiled code in an
on-disk cache (TORCHINDUCTOR_CACHE_DIR), which makes later starts of the engine quicker.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from types import SimpleNamespace

import torch
from PIL import Image

from incontext import sampler

log = logging.getLogger(__name__)

WARM_BATCHES = (1, 2)  # one specialised graph for a single request, one dynamic graph for more


class CompiledVae:
    """The VAE's encode (to the posterior mode) and decode, compiled; it offers what the
    sampler reads of a VAE: `config`, `dtype`, `encode(x).latent_dist.mode()` and
    `decode(z, return_dict=False)[0]`. Compiled, a 128² decode takes 18 ms instead of 45."""

    def __init__(self, vae: torch.nn.Module):
        self.config, self.dtype = vae.config, vae.dtype
        # The posterior's mode inside the graph: the distribution object is plain Python.
        self._encode = torch.compile(lambda x: vae.encode(x).latent_dist.mode(), dynamic=True)
        self._decode = torch.compile(vae.decode, dynamic=True)

    def encode(self, x: torch.Tensor):
        z = self._encode(x)
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: z))

    def decode(self, z: torch.Tensor, return_dict: bool = False):
        return self._decode(z, return_dict=False)


class CompiledModels:
    """A model's compiled twin, warmed up bucket by bucket on a background thread.

    `for_bucket(width, height)` is what the engine calls each step: the compiled models once
    that bucket is warm, the eager ones until then (or if compiling failed)."""

    def __init__(self, models: sampler.Models, buckets: list[tuple[int, int]], *, start: bool = True):
        self.eager = models
        self.compiled = dataclasses.replace(models, transformer=torch.compile(models.transformer, dynamic=True),
                                            vae=CompiledVae(models.vae))
        self.ready: set[tuple[int, int]] = set()
        self.failed: str | None = None
        self.seconds = 0.0  # spent warming, so far
        self._seen: set[tuple[int, int]] = set()
        self._todo: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._lock = threading.Lock()  # "queue empty → idle" must not interleave with a new bucket
        self._start = start
        self._warming = False  # a warm-up thread is running
        for bucket in buckets:
            self._queue(bucket)

    def for_bucket(self, width: int, height: int) -> sampler.Models:
        if (width, height) in self.ready:
            return self.compiled
        self._queue((width, height))
        return self.eager

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every bucket queued so far is warm (or compiling failed); True if so."""
        return self._idle.wait(timeout)

    def _queue(self, bucket: tuple[int, int]) -> None:
        with self._lock:
            if bucket not in self._seen and self.failed is None:
                self._seen.add(bucket)
                self._idle.clear()
                self._todo.put(bucket)
                if self._start and not self._warming:
                    self._warming = True
                    threading.Thread(target=self._warm_loop, name="incontext-compile", daemon=True).start()

    def _warm_loop(self) -> None:
        # The thread ends when there is nothing left to warm: while a thread that ran torch
        # work lives, the engine thread's every op is slower (LocalEngine.start_thread).
        while True:
            with self._lock:
                if self._todo.empty():
                    self._warming = False
                    self._idle.set()
                    return
            width, height = self._todo.get()
            t0 = time.perf_counter()
            try:
                for batch in WARM_BATCHES:
                    self._run(width, height, batch)
            except Exception as e:  # compiling is an optimisation: the eager model keeps serving
                self.failed = f"{e.__class__.__name__}: {e}"
                log.warning("torch.compile failed, serving the eager transformer: %s", self.failed)
                self._idle.set()
                return
            finally:
                self.seconds += time.perf_counter() - t0
            self.ready.add((width, height))
            log.info("compiled transformer ready for %dx%d (%.0f s of compiling so far)", width, height, self.seconds)

    @torch.no_grad()  # the engine's mode: a different grad mode would be another graph
    def _run(self, width: int, height: int, batch: int) -> None:
        m = self.compiled
        tokens = (height // m.vae_scale_factor // 2) * (width // m.vae_scale_factor // 2)
        cfg = m.transformer.config
        img = torch.zeros(batch, tokens, cfg.in_channels, dtype=m.dtype)
        txt = torch.zeros(batch, m.max_sequence_length, cfg.joint_attention_dim, dtype=m.dtype)
        vec = torch.zeros(batch, cfg.pooled_projection_dim, dtype=m.dtype)
        img_ids, txt_ids = sampler.kontext_ids(height, width, m.vae_scale_factor, m.max_sequence_length)
        sampler.predict_velocity(
            m, img=img, img_cond=img, txt=txt, vec=vec, timesteps=torch.full((batch,), 500.0),
            guidance=torch.full((batch,), 3.5), img_ids=img_ids, txt_ids=txt_ids,
        )
        # the VAE as the engine calls it: one context image in, `num_images` outputs out
        if batch == 1:
            sampler.encode_images(m, [Image.new("RGB", (width, height))])
        sampler.decode(m, img, height, width)
