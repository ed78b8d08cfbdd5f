"""The transformer and the VAE compiled ahead of time: built once per machine and model, loaded at every start.

At the nano model's sizes a transformer pass is mostly Python and kernel-launch overhead,
which a compiled graph removes (docs/engine.md has the figures). torch.compile inside the
serving process paid for that with minutes of compiling at every start, on the same cores
as the requests it was meant to speed up. Instead, AOTInductor exports the transformer once,
with a dynamic batch and token count, and the VAE's encode and decode with a dynamic image
size, compiles each to a shared library packaged as a `.pt2` file, and the engine loads them
in well under a second. The three files are one package, a directory:

- The package's name is a fingerprint of everything that makes it valid: torch's version,
  the CPU (or GPU) it was compiled for, the weights and configs of the transformer and the
  VAE, the dtype and the text length. A new torch, another machine or new weights simply
  find no package.
- With no package, the engine serves eagerly and builds one in a child process at the
  lowest CPU priority (nice 19): the kernel gives the engine's threads the cores whenever a
  request runs, and the build gets what is left. `incontext warmup` builds it in the
  foreground instead, e.g. at install time.
- The engine switches to the package between two steps once the child has written it. A
  build that fails (no C++ compiler, say) leaves the eager model serving, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from incontext import sampler

log = logging.getLogger(__name__)

# Bump when what a package holds changes (the wrapper's signature, the dynamic dimensions, the
# graph: 4 has the batch-invariant linears of invariance.py, 5 the VAE in bf16 autocast where
# the model computes in bf16).
FORMAT = 5
MAX_BATCH = 1024
MAX_TOKENS = 65536  # target and context tokens together: 1024² and its context is 8192
MAX_LATENT_SIDE = 512  # 4096 pixels at 8×
_POLL_SECONDS = 1.0  # how often the engine looks whether the build has ended


class _Forward(torch.nn.Module):
    """The transformer's forward with positional tensors only, as torch.export wants."""

    def __init__(self, transformer: torch.nn.Module, guidance: bool):
        super().__init__()
        self.transformer, self.guidance = transformer, guidance

    def forward(self, x, t, vec, txt, txt_ids, img_ids, g=None):
        return self.transformer(hidden_states=x, timestep=t, guidance=g if self.guidance else None, pooled_projections=vec,
                                encoder_hidden_states=txt, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


class AotTransformer:
    """A loaded package behind the call the sampler makes of a FluxTransformer2DModel
    (`sampler.predict_velocity`): keyword tensors in, a one-element tuple out."""

    def __init__(self, package: Path, config):
        self.config = config
        self._run = torch._inductor.aoti_load_package(str(package))

    def __call__(self, *, hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids, img_ids,
                 return_dict: bool = False):
        args = [hidden_states, timestep, pooled_projections, encoder_hidden_states, txt_ids, img_ids]
        if self.config.guidance_embeds:
            args.append(guidance)
        # The compiled code indexes its inputs as the traced (contiguous) ones were laid out:
        # a permuted view would be read in the wrong order, silently.
        return (self._run(*(a.contiguous() for a in args)),)


class _Encode(torch.nn.Module):
    """The VAE's encode to the posterior's mode (the mean: the first half of the moments)."""

    def __init__(self, m: sampler.Models):
        super().__init__()
        self.vae, self.autocast = m.vae, lambda: sampler.vae_autocast(m)  # computes as the eager model does

    def forward(self, x):
        with self.autocast():
            h = self.vae.encoder(x)
            if self.vae.quant_conv is not None:
                h = self.vae.quant_conv(h)
        return h[:, : self.vae.config.latent_channels].to(x.dtype)


class _Decode(torch.nn.Module):
    def __init__(self, m: sampler.Models):
        super().__init__()
        self.vae, self.autocast = m.vae, lambda: sampler.vae_autocast(m)

    def forward(self, z):
        with self.autocast():
            x = z
            if self.vae.post_quant_conv is not None:
                x = self.vae.post_quant_conv(x)
            x = self.vae.decoder(x)
        return x.to(z.dtype)


class AotVae:
    """Loaded packages behind what the sampler reads of a VAE: `config`, `dtype`,
    `encode(x).latent_dist.mode()` and `decode(z, return_dict=False)[0]`. The packages take
    one image at a time (dynamo cannot keep a batch of 1 and of more in one graph here), so a
    batch is a loop: an edit encodes one image and decodes one to four."""

    def __init__(self, encode: Path, decode: Path, vae):
        self.config, self.dtype = vae.config, vae.dtype
        self._encode = torch._inductor.aoti_load_package(str(encode))
        self._decode = torch._inductor.aoti_load_package(str(decode))

    def encode(self, x: torch.Tensor):
        z = torch.cat([self._encode(x[i : i + 1].contiguous()) for i in range(x.shape[0])])  # see AotTransformer
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: z))

    def decode(self, z: torch.Tensor, return_dict: bool = False):
        return (torch.cat([self._decode(z[i : i + 1].contiguous()) for i in range(z.shape[0])]),)


def fingerprint(model_dir: Path, m: sampler.Models) -> str:
    """What a package compiled from `model_dir`'s transformer and VAE, loaded as `m`, is valid for."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "torch": torch.__version__, "machine": _machine(m.device), "dtype": str(m.dtype),
                         "vae_dtype": str(m.vae.dtype), "max_sequence_length": m.max_sequence_length}, sort_keys=True).encode())
    files = [p for part in ("transformer", "vae") for p in (Path(model_dir) / part).iterdir() if p.is_file()]
    for f in sorted(files):
        h.update(f"{f.parent.name}/{f.name}".encode())
        stat = f.stat()
        if stat.st_size <= 1 << 30:  # the weights themselves where hashing them is cheap
            h.update(hashlib.sha256(f.read_bytes()).digest())
        else:  # a 12B model's shards: size and time of change stand in for their bytes
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _machine(device: torch.device) -> str:
    """The instruction sets the generated code may use: another CPU needs another package."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}:{torch.version.cuda}"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}:{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def package_path(cache_dir: Path, model_dir: Path, m: sampler.Models) -> Path:
    """The package's directory: one `.pt2` file per part."""
    return Path(cache_dir) / f"model-{fingerprint(model_dir, m)}"


@torch.no_grad()
def build(m: sampler.Models, out: Path) -> Path:
    """Export `m`'s transformer and VAE and compile them into the package `out` (minutes on
    a CPU). Written under another name and renamed, so a reader never sees half a package."""
    out = Path(out)
    partial = out.with_name(out.name + f".partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    try:
        for part, program in (("transformer", _export_transformer(m)), *_export_vae(m)):
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial / f"{part}.pt2"))
        verify(m, partial)
        try:
            os.replace(partial, out)
        except OSError:  # another build finished first: its package is as good
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


# Sizes (pixels) the compiled parts are checked at against the eager model: two shapes, so a
# dimension the compiler wrongly took as fixed shows. An exported VAE once gave wrong images
# at every size but the one it was traced at, silently: hence the check and EXPORT_SIDE.
CHECK_SIZES = ((128, 128), (160, 96))
EXPORT_SIDE = 128  # pixels of the example the VAE is traced at


@torch.no_grad()
def verify(m: sampler.Models, package: Path, tolerance: float | None = None) -> None:
    """Raise if a compiled part's outputs differ from the eager model's (relative max error).

    The default tolerance follows the dtype: fused kernels round at other points than eager
    ones, which in bf16 (8 bits of mantissa, picked on CPUs with bf16 units) moves a few
    outputs by some percent; a wrong layout or a wrong part moves them by their own size."""
    if tolerance is None:
        tolerance = 1e-3 if m.dtype == torch.float32 else 0.1
    compiled = dataclasses.replace(m, transformer=AotTransformer(package / "transformer.pt2", m.transformer.config),
                                   vae=AotVae(package / "vae_encode.pt2", package / "vae_decode.pt2", m.vae))
    g = torch.Generator().manual_seed(0)
    cfg = m.transformer.config
    for width, height in CHECK_SIZES:
        # laid out as the sampler's image tensors are (a permuted view of HWC pixels)
        x = (torch.rand(1, height, width, 3, generator=g).to(m.device, m.vae.dtype) * 2 - 1).permute(0, 3, 1, 2)
        checks = {"VAE encode": lambda mm: mm.vae.encode(x).latent_dist.mode()}
        z = m.vae.encode(x).latent_dist.mode()
        checks["VAE decode"] = lambda mm: mm.vae.decode(z, return_dict=False)[0]
        img_ids, txt_ids = sampler.kontext_ids(height, width, m.vae_scale_factor, m.max_sequence_length)
        b, n = 3, img_ids.shape[0] // 2

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(m.device, m.dtype)

        kw = dict(img=rand(b, n, cfg.in_channels), img_cond=rand(b, n, cfg.in_channels), txt=rand(b, m.max_sequence_length, cfg.joint_attention_dim),
                  vec=rand(b, cfg.pooled_projection_dim), timesteps=torch.tensor([900.0, 500.0, 100.0]), guidance=torch.tensor([1.0, 3.5, 5.0]),
                  img_ids=img_ids.to(m.device), txt_ids=txt_ids.to(m.device))
        checks["transformer"] = lambda mm: sampler.predict_velocity(mm, **kw)
        for part, run in checks.items():
            want, got = run(m).float(), run(compiled).float()
            error = float((want - got).abs().max() / want.abs().max().clamp_min(1e-6))
            if not error <= tolerance:
                raise RuntimeError(f"the compiled {part} differs from the eager one at {width}x{height} (relative error {error:.2g})")


def _export(module: torch.nn.Module, args: tuple, shapes: tuple):
    with warnings.catch_warnings():  # torch's own deprecation inside export, nothing a user can act on
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)


def _export_transformer(m: sampler.Models):
    tr = m.transformer.eval()
    cfg = tr.config
    img_ids, txt_ids = sampler.kontext_ids(64, 64, m.vae_scale_factor, m.max_sequence_length)  # any size: it is dynamic
    tokens = img_ids.shape[0]
    dev, dt, b = m.device, m.dtype, 2
    args = [torch.zeros(b, tokens, cfg.in_channels, dtype=dt, device=dev), torch.full((b,), 0.5, dtype=dt, device=dev),
            torch.zeros(b, cfg.pooled_projection_dim, dtype=dt, device=dev),
            torch.zeros(b, m.max_sequence_length, cfg.joint_attention_dim, dtype=dt, device=dev),
            txt_ids.to(dev), img_ids.to(dev)]
    batch, n = torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("tokens", min=2, max=MAX_TOKENS)
    shapes = [{0: batch, 1: n}, {0: batch}, {0: batch}, {0: batch}, None, {0: n}]
    if cfg.guidance_embeds:
        args.append(torch.full((b,), 3.5, device=dev))
        shapes.append({0: batch})
    return _export(_Forward(tr, cfg.guidance_embeds), tuple(args), tuple(shapes))


def _export_vae(m: sampler.Models):
    vae, f = m.vae.eval(), m.vae_scale_factor
    h, w = torch.export.Dim("h", min=1, max=MAX_LATENT_SIDE), torch.export.Dim("w", min=1, max=MAX_LATENT_SIDE)
    side = EXPORT_SIDE // f
    x = torch.zeros(1, 3, side * f, side * f, dtype=vae.dtype, device=m.device)
    z = torch.zeros(1, vae.config.latent_channels, side, side, dtype=vae.dtype, device=m.device)
    return (("vae_encode", _export(_Encode(m), (x,), ({2: f * h, 3: f * w},))),
            ("vae_decode", _export(_Decode(m), (z,), ({2: h, 3: w},))))


class CompiledModels:
    """A model's compiled twin. `current()` is what the engine calls each step: the models
    with the packaged transformer once it is loaded, the eager ones until then (or if the
    build failed). Only the engine's thread calls `current()`, so the package is loaded on
    the thread that runs every other torch op (LocalEngine.start_thread says why)."""

    def __init__(self, models: sampler.Models, model_dir: Path, cache_dir: Path, *, build_missing: bool = True):
        self.eager = models
        self.compiled: sampler.Models | None = None
        self.package = package_path(cache_dir, model_dir, models)
        self.failed: str | None = None
        self.build_seconds: float | None = None  # of a build this engine started, once it ended
        self.load_seconds: float | None = None
        self._model_dir = Path(model_dir)
        self._child: subprocess.Popen | None = None
        self._started = 0.0
        self._next_poll = 0.0
        if not self.package.exists() and build_missing:
            self._start_build()

    def current(self) -> sampler.Models:
        if self.compiled is not None:
            return self.compiled
        if self.failed is None and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + _POLL_SECONDS
            self._poll()
        return self.compiled or self.eager

    @property
    def building(self) -> bool:
        return self._child is not None and self._child.poll() is None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no build of this engine's runs (it ended or none was started); True if so.
        The package is loaded at the next `current()`."""
        if self._child is None:
            return True
        try:
            self._child.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._next_poll = 0.0  # the engine's next step looks at once
        return True

    def close(self) -> None:
        """Stop a build still running: a package half built is worth nothing."""
        if self.building:
            self._child.terminate()
            try:
                self._child.wait(10)
            except subprocess.TimeoutExpired:
                self._child.kill()

    def _poll(self) -> None:
        if self.building:
            return
        if self._child is not None and self.build_seconds is None:
            self.build_seconds = time.monotonic() - self._started
            if self._child.returncode != 0:
                tail = _tail(self.package.with_suffix(".log"))
                self.failed = f"the build exited with {self._child.returncode}: {tail}"
                log.warning("compiling the transformer ahead of time failed; serving it eagerly. %s", self.failed)
                return
            log.info("compiled transformer and VAE built in %.0f s: %s", self.build_seconds, self.package)
        if self.package.exists():
            try:
                t0 = time.perf_counter()
                p, e = self.package, self.eager
                self.compiled = dataclasses.replace(e, transformer=AotTransformer(p / "transformer.pt2", e.transformer.config),
                                                    vae=AotVae(p / "vae_encode.pt2", p / "vae_decode.pt2", e.vae))
                self.load_seconds = time.perf_counter() - t0
                log.info("serving the compiled transformer and VAE %s (loaded in %.2f s)", self.package.name, self.load_seconds)
            except Exception as e:  # a package that does not load is an optimisation lost, not an outage
                self.failed = f"{e.__class__.__name__}: {e}"
                log.warning("could not load %s; serving the eager transformer: %s", self.package, self.failed)

    def _start_build(self) -> None:
        self.package.parent.mkdir(parents=True, exist_ok=True)
        m = self.eager
        cmd = [sys.executable, "-m", "incontext.engine.compiled", str(self._model_dir), str(self.package),
               "--dtype", str(m.dtype).removeprefix("torch."), "--device", str(m.device),
               "--max-sequence-length", str(m.max_sequence_length)]
        with open(self.package.with_suffix(".log"), "w") as logfile:
            # In the engine's session: the scheduler shares the CPU between sessions before
            # it looks at nice values, so a build in a session of its own took half the cores.
            self._child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT)
        self._started = time.monotonic()
        log.info("building the compiled transformer in the background at the lowest priority (pid %d): %s",
                 self._child.pid, self.package.name)


def _tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> None:
    """`python -m incontext.engine.compiled MODEL_DIR PACKAGE`: what the engine's build child runs."""
    import argparse

    from incontext.engine.invariance import make_batch_invariant
    from incontext.models.loader import load_model

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("model_dir", type=Path)
    p.add_argument("package", type=Path)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-sequence-length", type=int, default=None)
    a = p.parse_args(argv)
    os.nice(19)  # the engine's requests come first; the C++ compiler processes inherit it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    m = load_model(a.model_dir, device=a.device, dtype=a.dtype, max_sequence_length=a.max_sequence_length)
    make_batch_invariant(m.transformer)  # the graph the engine's eager model runs (invariance.py)
    build(m, a.package)
    log.info("wrote %s in %.0f s", a.package, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
