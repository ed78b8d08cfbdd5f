"""Training the nano model (`incontext train vae|data|transformer|export`) on tiny configs.

The stages chain as the recipe does: a VAE run, latent chunks encoded with its VAE, a
transformer trained on them, an export of that. Budgets are about a second, so each run is
a few steps. A learning rate of 0 leaves weights exactly where a run started, which shows
where that was (a checkpoint, a model directory) without comparing trained values.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import shutil
from dataclasses import asdict

import pytest
import torch
from diffusers import FluxKontextPipeline
from safetensors.torch import load_file
from typer.testing import CliRunner

from incontext import sampler
from incontext.cli import app
from incontext.models.components import NanoConfig, build_components, save_model_dir
from incontext.models.loader import load_model
from incontext.train.checkpoint import load_checkpoint
from incontext.train.data import LatentChunks, chunk_seed, produce_chunks, render_chunks, size_for_chunk
from incontext.train.export import export_model, load_vae
from incontext.train.transformer import TRAINED, TransformerTrainConfig, _build, _load_from_model_dir, _step, _weights, load_trained, train_transformer
from incontext.train.vae import VaeTrainConfig, grown_config, train_vae
from incontext.world.edits import make_example
from incontext.world.language import vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")

SECOND = 1 / 60  # budgets are in minutes
CHUNK_SIZE = 4  # examples per chunk: rendering one takes ~50 ms
CHUNKS = (0, 3)  # a 128×128 and a 160×96 size bucket


def vae_config(**overrides) -> VaeTrainConfig:
    # Rendering an example takes ~50 ms: a pool of 2 images and 4 for the latent statistics.
    return VaeTrainConfig(**{"minutes": SECOND, "batch": 2, "crop": 32, "warmup": 1, "pool": 2, "latent_stats_examples": 4,
                             "log_every": 1, **overrides})


def transformer_config(**overrides) -> TransformerTrainConfig:
    return TransformerTrainConfig(**{"minutes": SECOND, "batch": 2, "warmup": 1, "log_every": 1, **overrides})


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def model_files(directory, name: str) -> dict:
    state = {}
    for f in sorted((directory / name).glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.fixture(scope="module")
def model_cfg():
    return NanoConfig.tiny(vocabulary())


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, model_cfg):
    out = tmp_path_factory.mktemp("vae_run")
    train_vae(out, model_cfg, vae_config())
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, vae_run):
    """A run directory holding the VAE and two chunks of latents encoded with it."""
    out = tmp_path_factory.mktemp("run")
    shutil.copy(vae_run / "vae.pt", out / "vae.pt")
    vae = load_vae(out, fallback=None)
    for index in CHUNKS:
        produce_chunks(out, vae, index, 1, chunk_size=CHUNK_SIZE)
    return out


@pytest.fixture(scope="module")
def trained_run(run, model_cfg):
    """`run` after a short transformer run (so with run/transformer.pt)."""
    train_transformer(run, model_cfg, transformer_config(), load_vae(run, fallback=None))
    return run


# ---------------------------------------------------------------- stage 1: VAE


def test_vae_checkpoint_describes_itself(vae_run, model_cfg):
    ck = load_checkpoint(vae_run / "vae.pt")
    assert ck["step"] > 0
    assert ck["model_config"] == asdict(model_cfg)
    assert ck["train_config"] == asdict(vae_config())
    # The latent normalisation was measured, not left at the placeholders 0 and 1.
    assert ck["extra"]["shift_factor"] != 0.0 and ck["extra"]["scaling_factor"] != 1.0

    vae = load_vae(vae_run, fallback=None)  # rebuilt from the file alone
    assert vae.config.latent_channels == model_cfg.latent_channels
    assert tuple(vae.config.block_out_channels) == model_cfg.vae_channels
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (ck["extra"]["shift_factor"], ck["extra"]["scaling_factor"])
    assert_same_weights(vae.state_dict(), ck["weights"])


def test_vae_resumes_from_its_checkpoint(vae_run, model_cfg, tmp_path):
    shutil.copy(vae_run / "vae.pt", tmp_path / "vae.pt")
    before = load_checkpoint(tmp_path / "vae.pt")
    train_vae(tmp_path, model_cfg, vae_config(lr=0.0))
    after = load_checkpoint(tmp_path / "vae.pt")
    assert after["step"] > before["step"]
    assert_same_weights(after["weights"], before["weights"])  # lr 0: still the checkpoint's, not a fresh init


def test_decoder_only_fine_tuning_keeps_the_latents(vae_run, model_cfg, tmp_path):
    shutil.copy(vae_run / "vae.pt", tmp_path / "vae.pt")
    before = load_checkpoint(tmp_path / "vae.pt")
    train_vae(tmp_path, model_cfg, vae_config(decoder_only=True))
    after = load_checkpoint(tmp_path / "vae.pt")
    assert after["step"] > before["step"]
    encoder = [k for k in before["weights"] if k.startswith("encoder.")]
    decoder = [k for k in before["weights"] if k.startswith("decoder.")]
    assert encoder and all(torch.equal(after["weights"][k], before["weights"][k]) for k in encoder)
    assert any(not torch.equal(after["weights"][k], before["weights"][k]) for k in decoder)
    assert after["extra"] == before["extra"]  # same latents, same normalisation


def test_decoder_fine_tuning_can_start_from_a_model_directory(tmp_path):
    """A fresh machine sharpens the bundled decoder: its encoder and latent normalisation,
    and so the transformer's latents, stay as they are."""
    from diffusers import AutoencoderKL

    from incontext.models.registry import BUNDLED_NANO_DIR

    bundled = AutoencoderKL.from_pretrained(BUNDLED_NANO_DIR / "vae", local_files_only=True)
    train_vae(tmp_path, grown_config(BUNDLED_NANO_DIR, NanoConfig(vocab=vocabulary())), vae_config(decoder_only=True), init_from=BUNDLED_NANO_DIR)
    vae = load_vae(tmp_path, fallback=None)
    start = bundled.state_dict()
    assert all(torch.equal(v, start[k]) for k, v in vae.state_dict().items() if k.startswith("encoder."))
    assert any(not torch.equal(v, start[k]) for k, v in vae.state_dict().items() if k.startswith("decoder."))
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (bundled.config.shift_factor, bundled.config.scaling_factor)


# ---------------------------------------------------------------- stage 2: latent chunks


def test_chunks_load_and_batches_come_from_one_size_bucket(run, model_cfg):
    files = sorted(p.name for p in (run / "data").glob("*.pt"))
    assert files == [f"chunk_{i:05d}.pt" for i in CHUNKS]
    data = LatentChunks(run)
    assert len(data) == CHUNK_SIZE * len(CHUNKS)
    sizes = {size_for_chunk(i) for i in CHUNKS}
    assert set(data.buckets) == {(size, 0) for size in sizes} and len(sizes) == 2  # no second images in these

    # Every sampled row is one example of its bucket: context, target and prompt together.
    examples = {}
    for p in sorted((run / "data").glob("*.pt")):
        blob = torch.load(p, weights_only=False)
        examples.setdefault(tuple(blob["size"]), []).extend(zip(blob["context"], blob["target"], blob["prompts"]))
    rng, seen = random.Random(0), set()
    for _ in range(20):
        batch = data.sample(4, rng)
        (w, h), ctx, tgt, prompts = batch.size, batch.context, batch.target, batch.prompts
        assert batch.reference is None
        seen.add((w, h))
        assert ctx.shape == tgt.shape == (4, model_cfg.latent_channels, h // 8, w // 8)
        assert ctx.dtype == tgt.dtype == torch.float32
        for c, t, p in zip(ctx, tgt, prompts):
            assert any(torch.equal(c, ec.float()) and torch.equal(t, et.float()) and p == ep for ec, et, ep in examples[(w, h)])
    assert seen == sizes


def test_chunk_content_is_deterministic_per_index(run, tmp_path):
    vae = load_vae(run, fallback=None)
    render_chunks(tmp_path, 3, 1, chunk_size=CHUNK_SIZE)  # the --render-only path, encoded afterwards
    produce_chunks(tmp_path, vae, 3, 1, chunk_size=CHUNK_SIZE)
    produce_chunks(tmp_path, vae, 0, 1, chunk_size=CHUNK_SIZE)
    produce_chunks(tmp_path, vae, 1, 1, chunk_size=2)
    assert not (tmp_path / "images" / "chunk_00003.npz").exists()  # the rendered images are spent

    def chunk(out, i):
        return torch.load(out / "data" / f"chunk_{i:05d}.pt", weights_only=False)

    for i in CHUNKS:
        a, b = chunk(run, i), chunk(tmp_path, i)
        assert tuple(a["size"]) == tuple(b["size"]) == size_for_chunk(i)
        assert list(a["prompts"]) == list(b["prompts"]) and list(a["families"]) == list(b["families"])
        assert torch.equal(a["context"], b["context"]) and torch.equal(a["target"], b["target"])
    assert list(chunk(tmp_path, 1)["prompts"]) != list(chunk(tmp_path, 0)["prompts"])[:2]  # another index, other examples


def test_chunks_hold_latents_as_the_sampler_encodes_images(run):
    """Training targets and served context images must be encoded the same way (shift, scale, mode)."""
    vae = load_vae(run, fallback=None)
    m = sampler.Models(tokenizer=None, tokenizer_2=None, text_encoder=None, text_encoder_2=None, vae=vae, transformer=None, scheduler_config={})
    blob = torch.load(run / "data" / "chunk_00003.pt", weights_only=False)
    w, h = blob["size"]
    ex = make_example(random.Random(chunk_seed(3)), size=(w, h))  # the chunk's first example
    assert blob["prompts"][0] == ex.instruction
    with torch.no_grad():
        for image, latents in ((ex.context, blob["context"][0]), (ex.target, blob["target"][0])):
            expected = sampler.unpack(sampler.encode_images(m, [image]), h, w, m.vae_scale_factor)[0]
            torch.testing.assert_close(latents.float(), expected, rtol=1e-2, atol=1e-2)  # stored as bf16


# ---------------------------------------------------------------- stage 3: transformer


def test_transformer_run_writes_a_self_describing_checkpoint(trained_run, model_cfg):
    ck = load_checkpoint(trained_run / "transformer.pt")
    assert ck["step"] > 0
    assert ck["model_config"] == asdict(model_cfg)
    assert ck["train_config"] == asdict(transformer_config())
    assert set(ck["weights"]) == set(ck["extra"]["ema"]) == set(TRAINED)
    assert all(torch.isfinite(v).all() for mod in ck["weights"].values() for v in mod.values())

    cfg, _, modules, step = load_trained(trained_run / "transformer.pt", use_ema=False)  # rebuilt from the file alone
    assert (cfg, step) == (model_cfg, ck["step"])
    for name in TRAINED:
        assert_same_weights(modules[name].state_dict(), ck["weights"][name])


def test_transformer_resumes_where_it_stopped(trained_run, model_cfg, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    vae = load_vae(run, fallback=None)
    before = load_checkpoint(run / "transformer.pt")

    # The budget is the whole run's: the same command again has nothing left to do.
    train_transformer(run, model_cfg, transformer_config(), vae)
    assert load_checkpoint(run / "transformer.pt")["step"] == before["step"]

    # A longer budget continues from the checkpoint (lr 0 keeps its weights; a fresh init would not).
    longer = before["extra"]["elapsed"] / 60 + SECOND
    train_transformer(run, model_cfg, transformer_config(minutes=longer, lr=0.0), vae)
    after = load_checkpoint(run / "transformer.pt")
    assert after["step"] > before["step"]
    for name in TRAINED:
        assert_same_weights(after["weights"][name], before["weights"][name])


def test_a_run_with_the_text_context_objective_keeps_its_head_and_resumes_it(run, model_cfg, tmp_path):
    run = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("transformer.pt"))
    vae = load_vae(run, fallback=None)
    train_transformer(run, model_cfg, transformer_config(text_context=0.1), vae)
    before = load_checkpoint(run / "transformer.pt")
    head = before["extra"]["text_context"]["head"]
    assert set(head) == {"before.weight", "before.bias", "after.weight", "after.bias"}
    assert head["before.weight"].shape == (len(model_cfg.vocab) + 3, model_cfg.text_dim)  # every word, with <pad>, </s>, <unk>
    assert set(before["weights"]) == set(TRAINED)  # the head is not part of the model

    longer = before["extra"]["elapsed"] / 60 + SECOND
    train_transformer(run, model_cfg, transformer_config(minutes=longer, lr=0.0, text_context=0.1), vae)
    after = load_checkpoint(run / "transformer.pt")
    assert after["step"] > before["step"]
    assert_same_weights(after["extra"]["text_context"]["head"], head)  # resumed, not drawn again


def test_a_run_with_neighbour_heads_starts_with_two_t5_heads_reading_each_words_neighbours(run, model_cfg, tmp_path):
    from incontext.train.text_context import NEIGHBOUR_BIAS

    run = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("transformer.pt"))
    with pytest.raises(ValueError, match="two"):  # the tiny T5 has one head
        train_transformer(run, model_cfg, transformer_config(neighbour_heads=True), load_vae(run, fallback=None))
    two_heads = dataclasses.replace(model_cfg, text_dim=64)
    train_transformer(run, two_heads, transformer_config(lr=0.0, neighbour_heads=True), load_vae(run, fallback=None))
    ck = load_checkpoint(run / "transformer.pt")
    for weights in (ck["weights"]["text_encoder_2"], ck["extra"]["ema"]["text_encoder_2"]):  # the export is the EMA
        table = weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        # one bucket each (the word before, the word after), and heads 2 and 3 as they were
        assert [int((table[:, h] == NEIGHBOUR_BIAS).sum()) for h in range(2)] == [1, 1]
        assert table[:, 0].argmax() != table[:, 1].argmax() and table[:, :2].abs().sum() == 2 * NEIGHBOUR_BIAS


def test_init_from_a_model_directory_starts_from_its_weights(run, model_cfg, tmp_path):
    # Stored in fp16 as the bundled model is; T5's embed_tokens is tied to `shared`, saved once.
    model = save_model_dir(build_components(model_cfg, seed=5), tmp_path / "model", dtype=torch.float16)
    stored = {name: model_files(model, name) for name in TRAINED}
    assert "shared.weight" in stored["text_encoder_2"] and "encoder.embed_tokens.weight" not in stored["text_encoder_2"]

    out = tmp_path / "run"
    shutil.copytree(run / "data", out / "data")
    train_transformer(out, model_cfg, transformer_config(lr=0.0), load_vae(run, fallback=None), init_from=model)
    ck = load_checkpoint(out / "transformer.pt")
    for name in TRAINED:
        for weights in (ck["weights"][name], ck["extra"]["ema"][name]):
            tied = {"encoder.embed_tokens.weight": "shared.weight"} if name == "text_encoder_2" else {}
            assert weights.keys() == stored[name].keys() | tied.keys()
            for k, v in weights.items():
                assert torch.equal(v, stored[name][tied.get(k, k)].float()), f"{name}.{k}"


# ---------------------------------------------------------------- second images (workflow families)

MIXED = ("recolor", "bgref", "emblem")  # one family without a second image, two with one


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, vae_run):
    """A chunk of 8 examples, some with a second image and some without."""
    out = tmp_path_factory.mktemp("mixed")
    shutil.copy(vae_run / "vae.pt", out / "vae.pt")
    produce_chunks(out, load_vae(out, fallback=None), 0, 1, chunk_size=8, families=MIXED)
    return out


def test_a_chunk_keeps_each_examples_second_image_beside_it(mixed_run, model_cfg):
    blob = torch.load(mixed_run / "data" / "chunk_00000.pt", weights_only=False)
    has = blob["has_reference"]
    assert has.any() and not has.all()
    assert list(has) == [f != "recolor" for f in blob["families"]]
    assert blob["reference"].shape == blob["context"].shape
    assert not blob["reference"][~has].any() and all(r.abs().sum() > 0 for r in blob["reference"][has])

    ex = make_example(random.Random(chunk_seed(0)), size=size_for_chunk(0), families=MIXED)  # the chunk's first example
    vae = load_vae(mixed_run, fallback=None)
    m = sampler.Models(tokenizer=None, tokenizer_2=None, text_encoder=None, text_encoder_2=None, vae=vae, transformer=None, scheduler_config={})
    w, h = blob["size"]
    if ex.reference is not None:
        with torch.no_grad():
            expected = sampler.unpack(sampler.encode_images(m, [ex.reference]), h, w, m.vae_scale_factor)[0]
        torch.testing.assert_close(blob["reference"][0].float(), expected, rtol=1e-2, atol=1e-2)

    data = LatentChunks(mixed_run)
    size = size_for_chunk(0)
    assert set(data.buckets) == {(size, 0), (size, 1)}
    assert len(data.buckets[(size, 1)]["prompts"]) == int(has.sum())
    assert set(data.buckets[(size, 1)]["families"]) <= {"bgref", "emblem"} and set(data.buckets[(size, 0)]["families"]) == {"recolor"}
    rng, kinds = random.Random(0), set()
    for _ in range(30):
        batch = data.sample(3, rng)
        kinds.add(batch.reference is not None)
        if batch.reference is not None:
            assert batch.reference.shape == batch.context.shape and batch.reference.dtype == torch.float32
    assert kinds == {True, False}


def test_training_steps_on_a_mixed_chunk_see_the_second_image_after_the_context(mixed_run, model_cfg):
    torch.manual_seed(0)
    tok, clip, t5, transformer = _build(model_cfg)
    from incontext.models.components import build_scheduler

    m = sampler.Models(tokenizer=tok, tokenizer_2=tok, text_encoder=clip, text_encoder_2=t5, vae=load_vae(mixed_run, fallback=None),
                       transformer=transformer, scheduler_config=dict(build_scheduler(model_cfg).config),
                       max_sequence_length=model_cfg.max_text_tokens)
    seen = []
    transformer.register_forward_pre_hook(lambda mod, args, kwargs: seen.append((kwargs["hidden_states"].shape[1], kwargs["img_ids"])), with_kwargs=True)
    params = [p for mod in (transformer, clip, t5) for p in mod.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    data, rng = LatentChunks(mixed_run), random.Random(1)
    w, h = size_for_chunk(0)
    n = (w // 16) * (h // 16)  # tokens of one image
    for _ in range(6):
        loss, _ = _step(m, data, transformer_config(batch=2), rng, guided=True)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Context-only rows: target + context; rows with a second image: + n more, RoPE index 2.
    assert {tokens for tokens, _ in seen} == {2 * n, 3 * n}
    for tokens, img_ids in seen:
        assert img_ids.shape == (tokens, 3)
        assert img_ids[:, 0].unique().tolist() == list(range(tokens // n))
    assert all(torch.isfinite(p).all() for p in params)


def test_init_from_a_model_of_an_older_vocabulary_grows_its_text_embeddings_for_the_new_words(tmp_path):
    """A model trained before words were added to the vocabulary (as the workflows' 19 were):
    its old words keep their rows, so its prompts encode exactly as before, and the new words
    get small ones."""
    words = vocabulary()
    older = NanoConfig.tiny(words[:-19])
    stored_dir = save_model_dir(build_components(older, seed=5), tmp_path / "older", dtype=torch.float32)
    cfg = NanoConfig.tiny(words)
    tok, clip, t5, transformer = _build(cfg)
    modules = {"transformer": transformer, "text_encoder": clip, "text_encoder_2": t5}
    ema = {k: copy.deepcopy(v) for k, v in modules.items()}
    _load_from_model_dir(stored_dir, modules, ema, tokenizer=tok)
    stored = load_model(stored_dir, dtype=torch.float32)
    old = len(stored.tokenizer)
    assert len(tok) == old + 19
    for ours, theirs in ((clip, stored.text_encoder), (t5, stored.text_encoder_2)):
        grown, kept = ours.get_input_embeddings().weight, theirs.get_input_embeddings().weight
        assert grown.shape[0] == len(tok) and torch.equal(grown[:old], kept)
        assert grown[old:].abs().max() < 0.1 * kept.abs().max()
    prompt = ["make the red circle blue"]
    with torch.no_grad():
        ids = tok(prompt, padding="max_length", max_length=cfg.max_text_tokens, return_tensors="pt").input_ids
        assert torch.equal(ids, stored.tokenizer(prompt, padding="max_length", max_length=cfg.max_text_tokens, return_tensors="pt").input_ids)
        torch.testing.assert_close(t5.eval()(ids)[0], stored.text_encoder_2(ids)[0])
        torch.testing.assert_close(clip.eval()(ids).pooler_output, stored.text_encoder(ids).pooler_output)


def test_init_from_refuses_a_tokenizer_whose_words_moved(tmp_path, model_cfg):
    from incontext.models.components import build_tokenizer

    model = save_model_dir(build_components(model_cfg, seed=5), tmp_path / "model", dtype=torch.float16)
    tok, clip, t5, transformer = _build(model_cfg)
    shuffled = build_tokenizer(list(reversed(model_cfg.vocab)), model_cfg.max_text_tokens)
    modules = {"transformer": transformer, "text_encoder": clip, "text_encoder_2": t5}
    with pytest.raises(ValueError, match="appended"):
        _load_from_model_dir(model, modules, {k: copy.deepcopy(v) for k, v in modules.items()}, tokenizer=shuffled)


def test_transformer_without_chunks_says_to_run_train_data(run, model_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="incontext train data"):
        train_transformer(tmp_path, model_cfg, transformer_config(), load_vae(run, fallback=None))


def test_edit_weights_emphasise_tokens_the_edit_changes():
    torch.manual_seed(0)
    cond = torch.randn(2, 8, 16)  # (batch, tokens, channels)
    x0 = cond.clone()
    x0[0, [1, 5]] += 1.0
    x0[1, 3] *= -1
    x0[0, 2] += 0.01  # bf16 rounding of stored latents is not an edit
    expected = torch.ones(2, 8)
    expected[0, [1, 5]] = expected[1, 3] = 7.0
    assert torch.equal(_weights(x0, cond, edit_weight=6.0), expected)
    assert torch.equal(_weights(x0, cond, edit_weight=0.0), torch.ones(2, 8))


# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    return export_model(trained_run, tmp_path_factory.mktemp("export") / "nano")


def test_export_loads_in_stock_diffusers_offline(exported):
    pipe = FluxKontextPipeline.from_pretrained(exported, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ex = make_example(random.Random(0), size=(128, 128))
    image = pipe(image=ex.context, prompt=ex.instruction, height=128, width=128, max_area=128 * 128, _auto_resize=False,
                 num_inference_steps=1, max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (128, 128)


def test_export_declares_the_bundled_sampling_three_draws_at_five_steps(exported):
    from incontext import sampler
    from incontext.models.loader import load_model
    from incontext.models.registry import preset_for_directory

    preset = preset_for_directory(exported)
    assert (preset.num_inference_steps, preset.consensus, preset.guidance_scale) == (5, 3, 3.5)
    assert load_model(exported, dtype="float32").true_cfg == sampler.TrueCfg(1.25, 0.2)


def test_export_loads_with_our_loader_and_holds_the_ema_weights(trained_run, exported, model_cfg):
    ck = load_checkpoint(trained_run / "transformer.pt")
    m = load_model(exported, dtype=torch.float32)
    assert m.max_sequence_length == model_cfg.max_text_tokens
    vae = load_checkpoint(trained_run / "vae.pt")["extra"]
    assert (m.vae.config.shift_factor, m.vae.config.scaling_factor) == (vae["shift_factor"], vae["scaling_factor"])
    ema, raw = ck["extra"]["ema"]["transformer"], ck["weights"]["transformer"]
    assert any(not torch.equal(ema[k].half(), raw[k].half()) for k in ema)  # else this test could not tell them apart
    for name in TRAINED:
        loaded = getattr(m, name).state_dict()
        for k, v in ck["extra"]["ema"][name].items():
            assert torch.equal(loaded[k], v.half().float()), f"{name}.{k}"


@pytest.mark.parametrize(
    ("args", "dtype", "source"),
    [([], torch.float16, "ema"), (["--dtype", "bfloat16"], torch.bfloat16, "ema"), (["--dtype", "float32", "--no-ema"], torch.float32, "weights")],
)
def test_cli_export_stores_the_requested_dtype(trained_run, tmp_path, args, dtype, source):
    to = tmp_path / "nano"
    r = CliRunner().invoke(app, ["train", "export", "--out", str(trained_run), "--to", str(to), *args])
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(trained_run / "transformer.pt")
    weights = ck["extra"]["ema"] if source == "ema" else ck["weights"]
    for name in TRAINED:
        stored = model_files(to, name)
        assert stored and all(v.dtype == dtype for v in stored.values())
        for k, v in stored.items():
            assert torch.equal(v, weights[name][k].to(dtype)), f"{name}.{k}"
    assert all(v.dtype == torch.float32 for v in model_files(to, "vae").values())  # the VAE stays fp32


def test_train_data_draws_only_the_families_asked_for(tmp_path):
    import numpy as np

    args = ["train", "data", "--out", str(tmp_path), "--render-only", "--chunks", "1", "--chunk-size", "12"]
    result = CliRunner().invoke(app, [*args, "--families", "remove,invert"])
    assert result.exit_code == 0, result.output
    rendered = np.load(tmp_path / "images" / "chunk_00000.npz")
    assert set(rendered["families"]) == {"remove", "invert"}
    refused = CliRunner().invoke(app, [*args, "--families", "teleport"])
    assert refused.exit_code == 1 and "INVALID_INPUT" in refused.output
