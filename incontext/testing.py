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


# A Qwen-style chat template, as much of it as Flux2KleinPipeline uses (one user turn).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_klein_dir(path: Path, seed: int = 0, *, distilled: bool = False) -> Path:
    """Write a tiny random FLUX.2 [klein] directory (Flux2KleinPipeline's layout, saved by the
    pipeline itself) at `path` and return it. `distilled=False` is the base model, which runs
    true classifier-free guidance."""
    import json

    import torch  # only here
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
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
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              is_distilled=distilled)
    path = Path(path)
    pipe.save_pretrained(path)
    preset = {"num_inference_steps": 4, "guidance_scale": 4.0, "max_sequence_length": 64, "target_area": 64 * 64, "multiple": 16,
              "text_encoder_out_layers": list(out_layers)}
    (path / "incontext.json").write_text(json.dumps(preset, indent=2) + "\n")
    return path
