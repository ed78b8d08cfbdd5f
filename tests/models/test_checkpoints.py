"""Single-file transformer checkpoints (BFL layout, ComfyUI scaled fp8, GGUF) served from a model directory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from incontext.errors import ModelError
from incontext.models.checkpoints import COMFY_PREFIX, flux_bfl_to_diffusers, flux_diffusers_to_bfl
from incontext.models.loader import load_model


def original_state(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "transformer" / "diffusion_pytorch_model.safetensors"))


def with_single_file(tiny_model, tmp_path, name: str, tensors: dict[str, torch.Tensor], *, write=save_file):
    """A copy of the tiny model whose transformer folder holds only its config and `name`."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model, out)
    (out / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    write(tensors, str(out / "transformer" / name))
    return out


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_bfl_layout_loads_the_same_weights(tiny_model, tmp_path, prefix):
    original = original_state(tiny_model)
    bfl = {prefix + k: v for k, v in flux_diffusers_to_bfl(original).items()}
    assert "double_blocks.0.img_attn.qkv.weight" in flux_diffusers_to_bfl(original)
    model_dir = with_single_file(tiny_model, tmp_path, "flux1-kontext-tiny.safetensors", bfl)
    loaded = load_model(model_dir, dtype="float32").transformer.state_dict()
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key


def test_our_mapping_equals_diffusers_at_flux1_widths():
    """diffusers' converter is fixed at FLUX.1's 3072 hidden; ours takes widths from the config.
    At FLUX.1's widths they must map every value the same. Only dim 0 is ever split, so the
    tensors are narrow (2 columns): the real layout at a few MB."""
    config = dict(num_layers=2, num_single_layers=2, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in flux_diffusers_to_bfl(FluxTransformer2DModel(**config).state_dict()).items()}
    gen = torch.Generator().manual_seed(0)
    bfl = {k: torch.randn(s[0], *([2] if len(s) > 1 else []), generator=gen) for k, s in shapes.items()}
    ours = flux_bfl_to_diffusers(dict(bfl), config)
    theirs = convert_flux_transformer_checkpoint_to_diffusers({COMFY_PREFIX + k: v for k, v in bfl.items()})
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def scaled_fp8(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's layout: each matrix in float8_e4m3fn with its own scale, the rest as it was."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in bfl.items():
        if value.ndim == 2:
            scale = value.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            out[COMFY_PREFIX + key] = (value / scale).to(torch.float8_e4m3fn)
            out[COMFY_PREFIX + key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            out[COMFY_PREFIX + key] = value
    return out


def test_scaled_fp8_is_dequantized_at_load(tiny_model, tmp_path):
    original = original_state(tiny_model)
    fp8 = scaled_fp8(flux_diffusers_to_bfl(original))
    model_dir = with_single_file(tiny_model, tmp_path, "flux1-kontext-tiny-fp8_scaled.safetensors", fp8)
    m = load_model(model_dir, dtype="bfloat16")
    loaded = m.transformer.state_dict()
    q = fp8[COMFY_PREFIX + "double_blocks.0.img_attn.qkv.weight"]
    s = fp8[COMFY_PREFIX + "double_blocks.0.img_attn.qkv.scale_weight"]
    expected_q = (q.float() * s).to(torch.bfloat16)
    assert torch.equal(torch.cat([loaded[f"transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"]), expected_q)
    for key, value in original.items():
        assert loaded[key].dtype == torch.bfloat16
        # fp8 e4m3 keeps 3 mantissa bits: within 1/16 of the tensor's largest value.
        assert (loaded[key].float() - value).abs().max() <= value.abs().max() / 16 + 1e-6, key


def write_gguf(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Matrices whose rows split into 32-value blocks as Q8_0, everything else F32, as GGUF quantisers do."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(path, arch="flux")
    for key, value in tensors.items():
        data = value.float().numpy()
        if value.ndim == 2 and value.shape[1] % 32 == 0:
            writer.add_tensor(key, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_stays_quantized_and_matches(tiny_model, tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from diffusers.quantizers.gguf.utils import GGUFParameter

    original = original_state(tiny_model)
    model_dir = with_single_file(tiny_model, tmp_path, "flux1-kontext-tiny-Q8_0.gguf", flux_diffusers_to_bfl(original), write=write_gguf)
    tr = load_model(model_dir, dtype="float32").transformer
    ff = tr.transformer_blocks[0].ff.net[2]
    assert isinstance(ff.weight, GGUFParameter)  # kept as Q8_0 bytes, dequantised per forward
    # Same outputs as the unquantised model, within Q8_0's error.
    reference = FluxTransformer2DModel.from_pretrained(tiny_model / "transformer").eval()
    gen = torch.Generator().manual_seed(0)
    cfg = reference.config
    inputs = dict(hidden_states=torch.randn(1, 8, cfg.in_channels, generator=gen),
                  encoder_hidden_states=torch.randn(1, 4, cfg.joint_attention_dim, generator=gen),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(8, 3), txt_ids=torch.zeros(4, 3), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        want, got = reference(**inputs).sample, tr(**inputs).sample
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert not torch.equal(got, want)  # it did run the quantised weights


def test_incontext_json_names_the_file(tiny_model, tmp_path):
    bfl = flux_diffusers_to_bfl(original_state(tiny_model))
    model_dir = with_single_file(tiny_model, tmp_path, "unused.bin", {}, write=lambda t, p: None)
    save_file(bfl, str(tmp_path / "elsewhere.safetensors"))
    extra = json.loads((model_dir / "incontext.json").read_text())
    (model_dir / "incontext.json").write_text(json.dumps({**extra, "checkpoints": {"transformer": "../elsewhere.safetensors"}}))
    assert load_model(model_dir).transformer is not None
    extra["checkpoints"] = {"transformer": "../nowhere.safetensors"}
    (model_dir / "incontext.json").write_text(json.dumps(extra))
    with pytest.raises(ModelError, match="nowhere.safetensors"):
        load_model(model_dir)


def test_missing_and_foreign_tensors_are_named(tiny_model, tmp_path):
    bfl = flux_diffusers_to_bfl(original_state(tiny_model))
    del bfl["single_blocks.0.linear2.weight"]
    model_dir = with_single_file(tiny_model, tmp_path, "broken.safetensors", bfl)
    with pytest.raises(ModelError, match=r"missing: single_transformer_blocks\.0\.proj_out\.weight"):
        load_model(model_dir)
    bfl["single_blocks.0.linear2.weight"] = torch.zeros(1)
    bfl["lora_unet.up.weight"] = torch.zeros(1)
    save_file(bfl, str(model_dir / "transformer" / "broken.safetensors"))
    with pytest.raises(ModelError, match="unknown keys lora_unet"):
        load_model(model_dir)
