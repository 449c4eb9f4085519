"""Tiny SD and SDXL pipelines in the real on-disk layouts, built the way diffusers' tests build theirs.

Each component is created from a config after ``torch.manual_seed(0)`` and written with
``save_pretrained``, so siso loads them through exactly the code path it uses for Hub models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

# Single characters (and their end-of-word forms) are a complete CLIP BPE vocabulary with no merges.
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?{}"


def clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _CHARS:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(tokenizer: CLIPTokenizer, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=77, hidden_act="gelu", **extra,
    )


def _scheduler() -> EulerDiscreteScheduler:
    # SD-Turbo's and SDXL-Turbo's scheduler configuration.
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1,
    )


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=4,
        sample_size=32,
    )


def sd_pipeline() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )
    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    return StableDiffusionPipeline(
        unet=unet, scheduler=_scheduler(), vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=4,
    )
    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, projection_dim=32))
    return StableDiffusionXLPipeline(
        unet=unet, scheduler=_scheduler(), vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(), add_watermarker=False,
    )


def save(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def sd15_comfyui_pipeline() -> StableDiffusionPipeline:
    """The smallest SD 1.5 that ComfyUI's model detection takes for SD 1.5 (tests/test_comfyui_nodes.py):
    its UNet has SD 1.5's 320 channels and 768-wide cross-attention but two levels of one block each, and the
    text encoder and VAE are full CLIP-L and SD's VAE (ComfyUI builds those at their fixed sizes)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(320, 640), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=768, intermediate_size=3072, layer_norm_eps=1e-5,
        num_attention_heads=12, num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=768,
    ))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
        norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    )
    return StableDiffusionPipeline(
        unet=unet, scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
