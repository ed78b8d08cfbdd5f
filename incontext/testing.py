"""Test doubles with the real code path: tiny random models (seconds on a CPU) and loopback
HTTP hosts that misbehave on purpose (for tests and `bench load`)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LoopbackHost:
    """A threaded HTTP server for `handler` on 127.0.0.1; `url` is its base, `close()` stops it."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class TrickleHost(LoopbackHost):
    """Answers every GET with a 200 and then one byte every `interval_s` (up to `total`),
    without a Content-Length: each read arrives within any per-read timeout."""

    def __init__(self, interval_s: float, total: int = 100_000):
        class Handler(QuietHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(total):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(interval_s)
                except OSError:
                    pass

        super().__init__(Handler)


def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Kontext model directory (diffusers layout) at `path` and return it."""
    from incontext.models.components import NanoConfig, build_components, save_model_dir  # torch: only here
    from incontext.world.language import vocabulary

    cfg = NanoConfig.tiny(vocabulary())
    c = build_components(cfg, seed=seed)
    # Non-trivial latent normalisation, so tests catch a missing shift/scale.
    c.vae.register_to_config(shift_factor=0.1, scaling_factor=1.5)
    preset = {"num_inference_steps": 4, "guidance_scale": 3.5, "max_sequence_length": cfg.max_text_tokens, "target_area": 64 * 64, "multiple": 16}
    return save_model_dir(c, Path(path), preset=preset)


def declaring(model: Path, path: Path, **fields) -> Path:
    """A copy of the model directory `model` at `path` whose incontext.json also declares `fields`."""
    import json
    import shutil

    shutil.copytree(model, path)
    extra_file = Path(path) / "incontext.json"
    extra = json.loads(extra_file.read_text()) if extra_file.is_file() else {}
    extra_file.write_text(json.dumps({**extra, **fields}))
    return Path(path)


# A Qwen-style chat template, as much of it as Flux2KleinPipeline uses (one user turn).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_klein_dir(path: Path, seed: int = 0, *, distilled: bool = False, kv: bool = False) -> Path:
    """Write a tiny random FLUX.2 [klein] directory (Flux2KleinPipeline's layout, saved by the
    pipeline itself) at `path` and return it. `distilled=False` is the base model, which runs
    true classifier-free guidance. `kv=True`: saved by Flux2KleinKVPipeline (the same parts
    and weights layout; its model_index.json names it), which runs no guidance."""
    import json

    import torch  # only here
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

    # Byte-level with no merges: one token per byte, built offline.
    tokenizer = Qwen2TokenizerFast(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    hidden, out_layers, latent_channels = 32, (1, 2), 4
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    ))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=latent_channels * 4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=hidden * len(out_layers), timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )
    # Non-trivial BatchNorm statistics, so tests catch a missing latent normalisation.
    vae.bn.running_mean.normal_(0.0, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    # FLUX.2 [klein]'s own scheduler settings: the shift is set per request (mu).
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe = Flux2KleinKVPipeline(**parts) if kv else Flux2KleinPipeline(**parts, is_distilled=distilled)
    path = Path(path)
    pipe.save_pretrained(path)
    preset = {"num_inference_steps": 4, "guidance_scale": 4.0, "max_sequence_length": 64, "target_area": 64 * 64, "multiple": 16,
              "text_encoder_out_layers": list(out_layers)}
    (path / "incontext.json").write_text(json.dumps(preset, indent=2) + "\n")
    return path


def qwen_vl_processor(image_processor, tokenizer):
    """Stock `Qwen2VLProcessor` for images only. transformers 5 insists on its video processor,
    which needs torchvision (not importable beside this project's CPU torch); images never
    reach it, so the type check is lifted for that one missing part."""
    from unittest import mock

    from transformers import Qwen2VLProcessor

    check = Qwen2VLProcessor.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    with mock.patch.object(Qwen2VLProcessor, "check_argument_for_proper_class", lenient):
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


def tiny_qwen_edit_dir(path: Path, seed: int = 0, *, plus: bool = True) -> Path:
    """Write a tiny random Qwen-Image-Edit-Plus directory (QwenImageEditPlusPipeline's layout,
    model_index.json from the pipeline itself; `plus=False`: the original
    QwenImageEditPipeline's, the same parts) at `path` and return it. The processor folder
    holds its tokenizer and image processor, as the hosted directories do, but no video
    processor config (`qwen_vl_processor` says why): stock diffusers loads it with
    `processor=qwen_vl_processor(...)` passed in."""
    import torch  # only here
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Byte-level with no merges: one token per byte, built offline; the special tokens the
    # pipeline's template and the processor's image placeholders use.
    tokenizer = Qwen2TokenizerFast(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[])
    special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    token = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    # At most 28·28·16 pixels per image: a 384² condition image becomes 3×3 merged vision tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    hidden, latent_channels = 32, 4
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        # head_dim 16: the text model's 3-axis M-RoPE sections sum to 16 / 2.
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=None,
                         eos_token_id=token["<|im_end|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, out_hidden_size=hidden, fullatt_block_indexes=[1]),
        image_token_id=token["<|image_pad|>"], video_token_id=token["<|video_pad|>"],
        vision_start_token_id=token["<|vision_start|>"], vision_end_token_id=token["<|vision_end|>"],
    ))
    # 8× spatial downsampling (three halvings), as the real VAE; non-trivial per-channel
    # statistics, so tests catch a missing latent normalisation.
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=latent_channels, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.5, 0.8, 1.2, 2.0])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=latent_channels * 4, out_channels=latent_channels, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=hidden,
                                              axes_dims_rope=(4, 6, 6))
    # Qwen-Image's own scheduler settings: the shift is set per request (mu).
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    processor = qwen_vl_processor(image_processor, tokenizer)
    pipeline_class = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = pipeline_class(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
                          transformer=transformer)
    path = Path(path)
    pipe.save_config(path)  # model_index.json
    for name in ("scheduler", "vae", "text_encoder", "tokenizer", "transformer"):
        getattr(pipe, name).save_pretrained(path / name)
    tokenizer.save_pretrained(path / "processor")
    image_processor.save_pretrained(path / "processor")
    return path


def two_tone(w: int = 40, h: int = 20):
    """A PIL image, left half red (255, 0, 0), right half blue (0, 0, 255): shows size, colours
    and rotation at once."""
    from PIL import Image

    img = Image.new("RGB", (w, h), (255, 0, 0))
    img.paste((0, 0, 255), (w // 2, 0, w, h))
    return img


def close(a, b, tol: int) -> bool:
    """Two colours within `tol` levels of each other in every channel."""
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))
