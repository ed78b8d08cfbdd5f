"""Building the parts of a Kontext model directory from small configs (the nano model, test models).

Everything is a stock diffusers/transformers class, so the directory loads with
`FluxKontextPipeline.from_pretrained` as well as with our own loader:
- tokenizer / tokenizer_2: one word-level tokenizer over the world's vocabulary (built offline);
- text_encoder: a tiny `CLIPTextModel` (its pooled output conditions the modulation);
- text_encoder_2: a tiny `T5EncoderModel` (its token states are the text sequence);
- vae: a small `AutoencoderKL`; transformer: a `FluxTransformer2DModel` with guidance embedding;
- scheduler: `FlowMatchEulerDiscreteScheduler` with Flux's resolution-dependent shift.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


@dataclass
class NanoConfig:
    """Sizes of every part. Defaults are the bundled nano model; `tiny()` is for tests."""

    text_dim: int = 128  # T5 d_model = transformer joint_attention_dim
    text_layers: int = 2
    clip_dim: int = 64  # CLIP hidden = transformer pooled_projection_dim
    clip_layers: int = 1
    max_text_tokens: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)  # 4 levels: 8x downsampling, like FLUX's VAE
    # One normalisation group: per-channel GroupNorm erases the absolute colour of flat
    # regions (a flat image normalises to zero), which is most of this world.
    vae_groups: int = 1
    vae_layers: int = 1  # ResNet blocks a level in the encoder (the decoder has one more)
    latent_channels: int = 16
    heads: int = 4
    head_dim: int = 64  # hidden = heads * head_dim
    rope_axes: tuple[int, int, int] = (16, 24, 24)  # (image index, row, column); sums to head_dim
    double_layers: int = 2
    single_layers: int = 4
    # Scheduler shift: FLUX's mu grows with the token count; these anchor it at our sizes.
    base_image_seq_len: int = 64
    max_image_seq_len: int = 1024
    base_shift: float = 0.5
    max_shift: float = 1.15
    vocab: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> "NanoConfig":
        """The config a checkpoint stored (`asdict`), its tuples back from JSON-style lists."""
        return cls(**{k: tuple(v) if isinstance(v, list) and k != "vocab" else v for k, v in data.items()})

    @classmethod
    def tiny(cls, vocab: list[str]) -> "NanoConfig":
        return cls(
            text_dim=32, text_layers=1, clip_dim=32, clip_layers=1, vae_channels=(8, 16, 16, 16), vae_groups=1,
            latent_channels=4, heads=2, head_dim=16, rope_axes=(4, 6, 6), double_layers=1, single_layers=1, vocab=vocab,
        )

    def __post_init__(self) -> None:
        if sum(self.rope_axes) != self.head_dim:
            raise ValueError(f"rope axes {self.rope_axes} must sum to head_dim {self.head_dim}")
        if any(c % self.vae_groups for c in self.vae_channels):
            raise ValueError(f"vae channels {self.vae_channels} must be divisible by vae_groups {self.vae_groups}")


def build_tokenizer(vocab: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """Word-level, lower-cased; unknown words map to <unk>. Appends </s> like T5."""
    words = [PAD, EOS, UNK] + [w for w in vocab if w not in (PAD, EOS, UNK)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=max_length,
        padding_side="right", truncation_side="right",
    )


def build_text_encoders(cfg: NanoConfig, vocab_size: int) -> tuple[CLIPTextModel, T5EncoderModel]:
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=cfg.clip_dim, intermediate_size=cfg.clip_dim * 4,
            num_hidden_layers=cfg.clip_layers, num_attention_heads=max(1, cfg.clip_dim // 32),
            max_position_embeddings=cfg.max_text_tokens, pad_token_id=0, eos_token_id=1, bos_token_id=1,
            projection_dim=cfg.clip_dim,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size, d_model=cfg.text_dim, d_kv=32, d_ff=cfg.text_dim * 2, num_layers=cfg.text_layers,
            num_heads=max(1, cfg.text_dim // 32), relative_attention_num_buckets=16, relative_attention_max_distance=32,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
            is_encoder_decoder=False, use_cache=False,
        )
    )
    return clip, t5


def build_vae(cfg: NanoConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=cfg.vae_layers, latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_groups, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
        scaling_factor=1.0, shift_factor=0.0,
    )


def build_transformer(cfg: NanoConfig) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.latent_channels * 4, out_channels=None, num_layers=cfg.double_layers,
        num_single_layers=cfg.single_layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_dim, pooled_projection_dim=cfg.clip_dim, guidance_embeds=True,
        axes_dims_rope=cfg.rope_axes,
    )


def build_scheduler(cfg: NanoConfig) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=cfg.base_shift,
        max_shift=cfg.max_shift, base_image_seq_len=cfg.base_image_seq_len, max_image_seq_len=cfg.max_image_seq_len,
    )


@dataclass
class Components:
    tokenizer: PreTrainedTokenizerFast
    text_encoder: CLIPTextModel
    text_encoder_2: T5EncoderModel
    vae: AutoencoderKL
    transformer: FluxTransformer2DModel
    scheduler: FlowMatchEulerDiscreteScheduler


def build_components(cfg: NanoConfig, seed: int = 0) -> Components:
    torch.manual_seed(seed)
    tok = build_tokenizer(cfg.vocab, cfg.max_text_tokens)
    clip, t5 = build_text_encoders(cfg, len(tok))
    return Components(tok, clip, t5, build_vae(cfg), build_transformer(cfg), build_scheduler(cfg))


def forget_source(config: Path) -> None:
    # A module loaded with from_pretrained records where it came from (`_name_or_path`, an
    # absolute path of the machine that exported it); a shipped model must not carry that.
    data = json.loads(config.read_text())
    if data.pop("_name_or_path", None) is not None:
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_model_dir(c: Components, path: Path, *, dtype: torch.dtype | None = None, preset: dict | None = None) -> Path:
    """Write the FluxKontextPipeline layout. `dtype` (fp16/bf16) halves the bundled size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("text_encoder", "text_encoder_2", "vae", "transformer"):
        module = getattr(c, name)
        if dtype is not None:
            module = _copy_to(module, dtype)
        # Shards of at most 15 MB: every file fits the 16 MiB that a GPU run can send back.
        module.save_pretrained(path / name, safe_serialization=True, max_shard_size="15MB")
        forget_source(path / name / "config.json")
    c.tokenizer.save_pretrained(path / "tokenizer")
    c.tokenizer.save_pretrained(path / "tokenizer_2")
    c.scheduler.save_pretrained(path / "scheduler")
    index = {
        "_class_name": "FluxKontextPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if preset is not None:
        (path / "incontext.json").write_text(json.dumps(preset, indent=2) + "\n")
    return path


def _copy_to(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).to(dtype)


def config_dict(cfg: NanoConfig) -> dict:
    return asdict(cfg)
