"""Train the nano model's transformer and text encoders on latent chunks (stage 2 of the recipe).

    incontext train transformer --out runs/nano --minutes 90

Rectified flow as in FLUX: x_t = (1−t)·x0 + t·x1, the model predicts v = x1 − x0 from
[x_t ; context tokens], the text and t. x1 is noise (FLUX) or, with `flow_start="context"`,
the context latents plus σ·noise: then a token the edit does not touch has velocity σ·noise
only, and the model spends its capacity on the edit instead of redrawing the picture. t is logit-normal, shifted like the sampling
schedule at this token count. Instructions are dropped 15% of the time and those rows are
trained to return the context unchanged, so the model also
learns the instruction-free velocity (which copies the context).

Tokens the edit changes weigh `edit_weight` more in the loss, so local edits are not
drowned by the copying of everything else.

Guidance is distilled into the guidance embedding, as FLUX.1 Kontext [dev] does, but
online from the model itself (model-guidance training): for rows fed guidance g > 1 the
target is v + (λ(g) − 1)·sg(v̂(c) − v̂(∅)), where v̂ are the model's own predictions at the
neutral g = 3.5. So guidance_scale g behaves like classifier-free guidance of strength
λ(g) = 1 + (g − 3.5)/8 in one pass: the default 3.5 is the plain conditional model, 20 is
CFG ≈ 3, and 1 (λ ≈ 0.7) leans towards the input unchanged.

Everything the sampler does (packing, RoPE ids, text encoding, the forward pass) is imported
from `incontext.sampler`, so training and serving cannot drift apart. Resumes from
`out/transformer.pt`. bf16 autocast where the CPU has bf16 units (4× faster there, 4×
slower on CPUs without them, so it is chosen per machine).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from incontext import sampler
from incontext.models.device import cpu_has_fast_bf16
from incontext.models.components import NanoConfig, build_scheduler, build_text_encoders, build_tokenizer, build_transformer
from incontext.train.checkpoint import load_checkpoint, save_checkpoint
from incontext.train.data import LatentChunks
from incontext.train.text_context import TextContextHead, attend_to_neighbours, text_context_loss

log = logging.getLogger(__name__)


# The guidance_scale that stands for the plain conditional model (λ = 1): the API's default.
# Run 3d measured the default 3.5 as CFG 1.6 (the first mapping, λ = 1 + (g − 1)/4) at half
# the success of the plain conditional model: guidance pushed away from "unchanged" and with
# it the objects the edit should keep. So the default is now the conditional model; lower
# values lean towards returning the input, higher ones follow the instruction harder.
NEUTRAL_GUIDANCE = 3.5


def guidance_strength(g: torch.Tensor) -> torch.Tensor:
    """λ(g): the classifier-free guidance strength a guidance_scale g stands for
    (g = 1 → 0.69, 3.5 → 1, 20 → 3.06)."""
    return 1.0 + (g - NEUTRAL_GUIDANCE) / 8.0


@dataclass
class TransformerTrainConfig:
    minutes: float = 90.0
    batch: int = 24
    lr: float = 4e-4
    final_lr_frac: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.01
    prompt_dropout: float = 0.15
    # Rows without an instruction learn to return the context unchanged (see _step).
    dropped_rows_copy: bool = True
    edit_weight: float = 2.0  # extra loss weight on tokens the edit changes (see _weights)
    # Rows whose t is drawn uniformly over the sampling schedule instead of logit-normal (see _timesteps).
    uniform_t: float = 0.5
    guided_fraction: float = 0.3  # rows trained with g > 1 once guidance training starts
    guidance_start: float = 0.25  # fraction of the run before guidance training starts
    max_guidance: float = 20.0
    ema: float = 0.999
    seed: int = 0
    log_every: int = 50
    save_every_minutes: float = 5.0
    bf16: bool = field(default_factory=cpu_has_fast_bf16)  # autocast only where bf16 is fast
    device: str = "cpu"  # "cuda" on a GPU machine (scripts/train_gpu.sh), with bf16 on
    # Where the flow starts at t = 1 (see sampler.FlowStart): "noise" as in FLUX, or
    # "context" (the context latents plus start_noise·noise), so untouched tokens barely move.
    flow_start: str = "noise"
    start_noise: float = 0.3
    # Weight of the T5 outputs' neighbour-naming loss (train/text_context.py); 0: none, as
    # every run before session 14 trained.
    text_context: float = 0.0
    # Point two heads of the T5's first layer at each word's neighbours when a run starts
    # (train/text_context.py), so its outputs carry the words' order.
    neighbour_heads: bool = False


TRAINED = ("transformer", "text_encoder", "text_encoder_2")


def _build(model_cfg: NanoConfig):
    tok = build_tokenizer(model_cfg.vocab, model_cfg.max_text_tokens)
    clip, t5 = build_text_encoders(model_cfg, len(tok))
    return tok, clip, t5, build_transformer(model_cfg)


def run_config(out: Path, init_from: Path | None, vocab: list[str], *, double_layers: int | None = None,
               single_layers: int | None = None) -> NanoConfig:
    """The model config a run trains: a resumed run's own (its checkpoint's depth); otherwise
    the depth asked for, else `init_from`'s, else the default. A depth above `init_from`'s
    grows it (`_start_new_blocks_as_identity`); below it is refused, as it would drop trained blocks."""
    ckpt = Path(out) / "transformer.pt"
    if ckpt.exists():
        stored = NanoConfig.from_dict(load_checkpoint(ckpt)["model_config"])
        return dataclasses.replace(NanoConfig(vocab=vocab), double_layers=stored.double_layers, single_layers=stored.single_layers)
    depth = {}
    if init_from is not None:
        config = json.loads((Path(init_from) / "transformer" / "config.json").read_text())
        depth = {"double_layers": config["num_layers"], "single_layers": config["num_single_layers"]}
    for name, asked in (("double_layers", double_layers), ("single_layers", single_layers)):
        if asked is not None:
            if asked < depth.get(name, 0):
                raise ValueError(f"{name}={asked} is fewer than the {depth[name]} of {init_from}: a run can grow a model, not cut it")
            depth[name] = asked
    return dataclasses.replace(NanoConfig(vocab=vocab), **depth)


def train_transformer(out: Path, model_cfg: NanoConfig, cfg: TransformerTrainConfig, vae, init_from: Path | None = None) -> Path:
    """Train (or resume from `out/transformer.pt`). With no checkpoint, `init_from` (a model
    directory, e.g. the bundled one) provides starting weights: a fresh machine can continue
    from the committed model, since optimizer state is disposable."""
    out = Path(out)
    ckpt_path = out / "transformer.pt"
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tok, clip, t5, transformer = _build(model_cfg)
    device = torch.device(cfg.device)
    m = sampler.Models(
        tokenizer=tok, tokenizer_2=tok, text_encoder=clip, text_encoder_2=t5, vae=vae, transformer=transformer,
        scheduler_config=dict(build_scheduler(model_cfg).config), max_sequence_length=model_cfg.max_text_tokens, device=device,
    )
    modules = {"transformer": transformer, "text_encoder": clip, "text_encoder_2": t5}
    params = [p for mod in modules.values() for p in mod.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = {k: copy.deepcopy(v).requires_grad_(False) for k, v in modules.items()}
    # Its own optimizer, so a checkpoint resumes with the objective on or off.
    head = TextContextHead(t5.config.d_model, len(tok)) if cfg.text_context > 0 else None
    head_opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.99)) if head is not None else None
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        for k, mod in modules.items():
            mod.load_state_dict(ck["weights"][k])
            ema[k].load_state_dict(ck["extra"]["ema"][k])
        if ck.get("optimizer"):
            opt.load_state_dict(ck["optimizer"])
        if head is not None and "text_context" in ck["extra"]:
            head.load_state_dict(ck["extra"]["text_context"]["head"])
            head_opt.load_state_dict(ck["extra"]["text_context"]["optimizer"])
        step, elapsed = ck["step"], ck["extra"].get("elapsed", 0.0)
        log.info("resumed transformer from step %d (%.1f min)", step, elapsed / 60)
    elif init_from is not None:
        _load_from_model_dir(Path(init_from), modules, ema, tokenizer=tok)
        log.info("initialised from %s", init_from)
    if not ckpt_path.exists() and cfg.neighbour_heads:
        for encoder in (t5, ema["text_encoder_2"]):
            attend_to_neighbours(encoder)
        log.info("T5 heads 0 and 1 of the first layer now read the word before and after each word")
    for k in modules:  # after loading: optimizer state and EMA follow their parameters' device
        modules[k].to(device)
        ema[k].to(device)
    if head is not None:
        head.to(device)
    if ckpt_path.exists():
        opt.load_state_dict(opt.state_dict())  # moves resumed moment buffers to the parameters' device
        if head_opt is not None:
            head_opt.load_state_dict(head_opt.state_dict())

    data = LatentChunks(out)
    log.info("training on %d examples", len(data))
    total = max(cfg.minutes * 60, 1e-9)  # minutes=0: no steps, not a division by zero
    start, last_save, t_log, losses, aux_losses = time.time() - elapsed, time.time(), time.time(), [], []
    for mod in modules.values():
        mod.train()

    def save() -> None:
        extra = {"ema": {k: v.state_dict() for k, v in ema.items()}, "elapsed": time.time() - start}
        if head is not None:
            extra["text_context"] = {"head": head.state_dict(), "optimizer": head_opt.state_dict()}
        save_checkpoint(
            ckpt_path, step=step, model_config=asdict(model_cfg), train_config=asdict(cfg),
            weights={k: v.state_dict() for k, v in modules.items()}, optimizer=opt, extra=extra,
        )

    while (frac := (time.time() - start) / total) < 1.0:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        lr *= cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in [*opt.param_groups, *(head_opt.param_groups if head_opt else [])]:
            g["lr"] = lr
        loss, aux = _step(m, data, cfg, rng, guided=frac >= cfg.guidance_start, text_head=head)
        opt.zero_grad(set_to_none=True)
        if head_opt is not None:
            head_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if head_opt is not None:
            head_opt.step()
        step += 1
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))  # short runs: don't average in the random init
            for k, mod in modules.items():
                torch._foreach_lerp_(list(ema[k].parameters()), list(mod.parameters()), 1 - decay)
        losses.append(loss.item())
        aux_losses.append(aux.item())
        if step % cfg.log_every == 0:
            log.info("step %d  loss %.4f  lr %.2e  %.2fs/step  %.1f/%.0f min%s", step, sum(losses) / len(losses), lr,
                     (time.time() - t_log) / cfg.log_every, (time.time() - start) / 60, cfg.minutes,
                     f"  text context {sum(aux_losses) / len(aux_losses):.3f} nats" if head is not None else "")
            t_log, losses, aux_losses = time.time(), [], []
        if time.time() - last_save > cfg.save_every_minutes * 60:
            save()
            last_save = time.time()
            if data.refresh():
                log.info("now training on %d examples", len(data))
    save()
    return ckpt_path


def _step(m: sampler.Models, data: LatentChunks, cfg: TransformerTrainConfig, rng: random.Random, guided: bool,
          text_head: TextContextHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's loss, and the text-context loss inside it (unweighted; 0 without a head)."""
    batch = data.sample(cfg.batch, rng)
    (w, h), prompts = batch.size, batch.prompts
    dev = m.device
    ctx, tgt = batch.context.to(dev, non_blocking=True), batch.target.to(dev, non_blocking=True)
    b = len(prompts)
    dropped = torch.tensor([rng.random() < cfg.prompt_dropout for _ in range(b)], device=dev)
    prompts = ["" if d else p for p, d in zip(prompts, dropped)]
    x0, cond = sampler.pack(tgt), sampler.pack(ctx)
    if cfg.dropped_rows_copy and dropped.any():
        # No instruction, no edit: these rows' target is the context itself. The first runs
        # (dropped rows kept their edited target) never learnt to carry the context's objects
        # over at high noise (x0 error 0.2 at t = 0.95, where copying the context scores
        # 0.01–0.09), so untouched objects vanished. This supervises the copy directly, and
        # makes guidance push away from "unchanged" towards the instruction.
        x0 = torch.where(dropped.view(-1, 1, 1), cond, x0)
    start = sampler.flow_start_latents(sampler.FlowStart(cfg.flow_start, cfg.start_noise), cond, torch.randn_like(x0))
    t = _timesteps(b, math.exp(sampler.shift_mu(x0.shape[1], m.scheduler_config)), cfg.uniform_t).to(dev)
    xt = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * start
    target = start - x0
    # A second image follows the context in the sequence with RoPE index 2, as the sampler and
    # the engine append a request's references; the flow's start, the copy target of dropped
    # rows and the loss weights stay the context's alone.
    images = [cond] if batch.reference is None else [cond, sampler.pack(batch.reference.to(dev, non_blocking=True))]
    img_cond = torch.cat(images, dim=1)
    img_ids, txt_ids = (ids.to(dev) for ids in sampler.kontext_ids(h, w, m.vae_scale_factor, m.max_sequence_length, len(images)))
    guidance = torch.full((b,), NEUTRAL_GUIDANCE, device=dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        if guided:
            rows = torch.tensor([(not d) and rng.random() < cfg.guided_fraction for d in dropped.tolist()], device=dev)
            if rows.any():
                g = torch.exp(torch.empty(int(rows.sum()), device=dev).uniform_(0, math.log(cfg.max_guidance)))
                guidance[rows] = g
                with torch.no_grad():
                    n = int(rows.sum())
                    txt_c, vec_c = sampler.encode_text(m, [p for p, r in zip(prompts, rows) if r] + [""] * n)
                    v = sampler.predict_velocity(
                        m, img=xt[rows].repeat(2, 1, 1), img_cond=img_cond[rows].repeat(2, 1, 1), txt=txt_c, vec=vec_c,
                        timesteps=(t[rows] * 1000).repeat(2), guidance=torch.full((2 * n,), NEUTRAL_GUIDANCE, device=dev), img_ids=img_ids, txt_ids=txt_ids,
                    ).float()
                    target[rows] += (guidance_strength(g) - 1).view(-1, 1, 1) * (v[:n] - v[n:])
        txt, vec = sampler.encode_text(m, prompts)
        pred = sampler.predict_velocity(
            m, img=xt, img_cond=img_cond, txt=txt, vec=vec, timesteps=t * 1000, guidance=guidance, img_ids=img_ids, txt_ids=txt_ids,
        )
    err = ((pred.float() - target) ** 2).mean(-1)
    w = _weights(x0, cond, cfg.edit_weight)
    loss = ((w * err).sum(1) / w.sum(1)).mean()
    if text_head is None:
        return loss, loss.detach() * 0.0
    aux = text_context_loss(text_head, txt, sampler.t5_ids(m, prompts), m.tokenizer_2.pad_token_id)
    return loss + cfg.text_context * aux, aux.detach()


def _timesteps(b: int, shift: float, uniform_t: float) -> torch.Tensor:
    """t for a batch: logit-normal (most rows) or uniform, then shifted as the sampling schedule is.

    Logit-normal alone puts 4.5 % of rows at t > 0.9, where the sampler spends 4 of its 20
    steps and where the layout is decided: there the first models did not carry the context's
    objects over. A uniform share gives those steps about 15 %."""
    s = torch.where(torch.rand(b) < uniform_t, torch.rand(b), torch.sigmoid(torch.randn(b)))
    return shift * s / (1 + (shift - 1) * s)


def _weights(x0: torch.Tensor, cond: torch.Tensor, edit_weight: float) -> torch.Tensor:
    """Per-token loss weights: 1 + edit_weight where the target differs from the context.

    A local edit changes a few of 64 tokens; unweighted, the loss is mostly about copying
    the rest, and the first run learnt to copy long before it learnt to recolour or remove.
    Each row's weights are normalised, so a global edit (all tokens change) keeps its scale."""
    changed = (x0 - cond).abs().mean(-1) > 0.1  # latents are scaled to unit variance
    return 1.0 + edit_weight * changed.float()


# New words' embedding rows, as a fraction of the old rows' spread: small, so a word the
# model has never seen starts near nothing rather than as a random strong signal.
NEW_WORD_SCALE = 0.01


def _check_tokenizer_prefix(path: Path, tokenizer) -> int:
    """The directory's vocabulary size, after checking each of its words has the same id in
    `tokenizer` (words are only ever appended): else its embedding rows mean other words."""
    from transformers import PreTrainedTokenizerFast

    stored = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer").get_vocab()
    ours = tokenizer.get_vocab()
    moved = [w for w, i in stored.items() if ours.get(w) != i]
    if moved:
        raise ValueError(f"{path}: its tokenizer gives {len(moved)} words other ids than ours (e.g. {moved[:5]}); "
                         "new words must be appended to the vocabulary, not sorted in")
    return len(stored)


def _grow_embeddings(state: dict, mod: torch.nn.Module, name: str, generator: torch.Generator) -> dict:
    """`state` with its token-embedding table grown to `mod`'s vocabulary: the stored rows
    first (their ids are unchanged), new words' rows small around zero."""
    table = mod.get_input_embeddings().weight
    own = mod.state_dict()
    out = dict(state)
    for k, v in state.items():
        if k not in own or own[k].shape == v.shape:
            continue
        if own[k].data_ptr() != table.data_ptr() or v.shape[1:] != own[k].shape[1:] or v.shape[0] > own[k].shape[0]:
            raise ValueError(f"{name}.{k}: stored shape {tuple(v.shape)} does not fit {tuple(own[k].shape)}")
        new = torch.randn(own[k].shape[0] - v.shape[0], *v.shape[1:], generator=generator) * (NEW_WORD_SCALE * v.float().std())
        out[k] = torch.cat([v.float(), new])
        log.info("%s.%s: %d new words' rows added to the %d stored", name, k, len(new), v.shape[0])
    return out


def _load_from_model_dir(path: Path, modules: dict, ema: dict, tokenizer=None) -> None:
    """Load a model directory's weights; with `tokenizer` (ours, possibly with words appended
    since the directory was made), grow its text embeddings to our vocabulary."""
    from safetensors.torch import load_file

    if tokenizer is not None and (path / "tokenizer").is_dir():
        _check_tokenizer_prefix(path, tokenizer)
    generator = torch.Generator().manual_seed(0)
    for name, mod in modules.items():
        files = sorted((path / name).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path / name} has no safetensors weights")
        state = {}
        for f in files:
            state.update(load_file(f))
        if name != "transformer":
            state = _grow_embeddings(state, mod, name, generator)
        missing, unexpected = mod.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        # safetensors stores a tied weight once (T5's embed_tokens is `shared`): not missing
        own = mod.state_dict()
        loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
        missing = [k for k in missing if "position_ids" not in k and own[k].data_ptr() not in loaded_ptrs]
        if name == "transformer":
            grown = _start_new_blocks_as_identity(mod, state)
            missing = [k for k in missing if not k.startswith(grown)]
        if unexpected or missing:
            raise ValueError(f"{name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        ema[name].load_state_dict(mod.state_dict())


BLOCK_STACKS = ("transformer_blocks", "single_transformer_blocks")  # FluxTransformer2DModel's double and single blocks


def _start_new_blocks_as_identity(transformer: torch.nn.Module, state: dict) -> tuple[str, ...]:
    """Grow a deeper transformer from a shallower one's `state`: the key prefixes of the blocks
    `state` lacks (each stack's last ones), which are set to start as the identity. A Flux block
    adds its output to the residual stream times a gate that its AdaLayerNorm computes from the
    timestep embedding (adaLN-Zero, as in DiT): zero rows for those gates make the block add
    nothing, so the grown model computes what the stored one did, and the gates' gradients
    are not zero, so the new blocks start learning at the first step."""
    prefixes = []
    for stack in BLOCK_STACKS:
        stored = {int(k.split(".")[1]) for k in state if k.startswith(stack + ".")}
        for i, block in enumerate(getattr(transformer, stack)):
            if i in stored:
                continue
            prefixes.append(f"{stack}.{i}.")
            norms = [block.norm] if stack == "single_transformer_blocks" else [block.norm1, block.norm1_context]
            for norm in norms:  # chunks: (shift, scale, gate) single; (shift, scale, gate, shift, scale, gate) double
                linear, chunks = norm.linear, 3 if stack == "single_transformer_blocks" else 6
                d = linear.out_features // chunks
                with torch.no_grad():
                    for gate in range(2, chunks, 3):
                        linear.weight[gate * d:(gate + 1) * d].zero_()
                        linear.bias[gate * d:(gate + 1) * d].zero_()
    if prefixes:
        log.info("grown: %d new blocks start as the identity (%s)", len(prefixes), ", ".join(prefixes))
    return tuple(prefixes)


def load_trained(ckpt_path: Path, use_ema: bool = True):
    """(model config, {name: module}) from a transformer checkpoint."""
    ck = load_checkpoint(ckpt_path)
    model_cfg = NanoConfig.from_dict(ck["model_config"])
    tok, clip, t5, transformer = _build(model_cfg)
    weights = ck["extra"]["ema"] if use_ema else ck["weights"]
    modules = {"transformer": transformer, "text_encoder": clip, "text_encoder_2": t5}
    for k, mod in modules.items():
        mod.load_state_dict(weights[k])
        mod.eval()
    return model_cfg, tok, modules, ck["step"]
