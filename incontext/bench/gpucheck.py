"""The GPU check: full-size transformers with random weights, our engine against stock diffusers.

    python -m incontext.bench.gpucheck --out results/gpu          # on a CUDA machine (scripts/gpu_check.sh)
    python -m incontext.bench.gpucheck --tiny --out /tmp/gpu       # the same code path, tiny, on the CPU

Per family, no download: the tiny random directory (incontext.testing) with its transformer
replaced by one of the published full size (models/fullsize.py: layers, heads, hidden, MLP),
random, in bf16. Its text and latent input widths stay the tiny encoders' and VAE's, which
changes the FLOPs of two input projections only; the VAE downsamples 8× as the real ones do,
so a 1024² edit has the real 4096 image tokens (docs/gpu.md says what this leaves out).
Then bench/families.measure: stock one at a time, our engine alone and at 8 in flight, parity.
Writes gpu_check.json and gpu_check.md under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from incontext.bench import families
from incontext.models import fullsize

# family → (published transformer config, steps its users run, the tiny transformer's input widths kept)
FULL = {
    "kontext": (fullsize.KONTEXT_TRANSFORMER, 28, ("in_channels", "joint_attention_dim", "pooled_projection_dim")),
    "klein": (fullsize.KLEIN_4B_TRANSFORMER, 4, ("in_channels", "joint_attention_dim")),
    "qwen": (fullsize.QWEN_EDIT_TRANSFORMER, 20, ("in_channels", "out_channels", "joint_attention_dim")),
}


def full_size_dir(key: str, path: Path, device: str) -> Path:
    """The family's tiny directory with a full-size random transformer, saved in bf16."""
    directory = families.FAMILIES[key].tiny_dir(path)
    config_file = directory / "transformer" / "config.json"
    tiny = json.loads(config_file.read_text())
    published, _, kept = FULL[key]
    cls = getattr(__import__("diffusers"), tiny["_class_name"])
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 12–20B parameters: never materialise them in fp32
    try:
        with torch.device(device):
            model = cls(**{**published, **{k: tiny[k] for k in kept}})
    finally:
        torch.set_default_dtype(saved)
    shutil.rmtree(directory / "transformer")
    model.save_pretrained(directory / "transformer", max_shard_size="10GB")
    del model
    return directory


def run(out: Path, *, tiny: bool, keys: list[str], n: int, concurrency: int, stock_n: int) -> list[dict]:
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    work = out / "work"
    rows = []
    for key in keys:
        start = time.perf_counter()
        path = work / key
        directory = families.FAMILIES[key].tiny_dir(path) if tiny else full_size_dir(key, path, device)
        steps = 2 if tiny else FULL[key][1]
        row = families.measure(directory, key, n=n, concurrency=concurrency, steps=steps, size=64 if tiny else 1024, dtype=dtype,
                               device=device, stock_n=stock_n)
        cfg = json.loads((directory / "transformer" / "config.json").read_text())
        row["transformer_config"] = {k: cfg.get(k) for k in ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim")}
        row["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        row["seconds_total"] = time.perf_counter() - start
        rows.append(row)
        shutil.rmtree(path)  # 24–41 GB of random weights per family on a 64 GB disk
        (out / "gpu_check.json").write_text(json.dumps(rows, indent=2) + "\n")  # after each family: a timeout keeps what ran
        (out / "gpu_check.md").write_text(families.markdown(rows) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny transformers on the CPU: checks the code path, measures nothing real")
    parser.add_argument("--families", default="kontext,klein,qwen")
    parser.add_argument("--n", type=int, default=8, help="edits per engine configuration")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stock-n", type=int, default=2, help="edits stock runs (one at a time; its time per edit is flat)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny to check the code path on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args.out, tiny=args.tiny, keys=args.families.split(","), n=args.n, concurrency=args.concurrency, stock_n=args.stock_n)
    import sys

    sys.stdout.write(families.markdown(rows) + "\n")


if __name__ == "__main__":
    main()
