"""Tiny random-weight SD3.5, Sana-Sprint, FLUX.2 [klein] and Z-Image pipelines in their real on-disk layouts.

Built as diffusers' own fast tests build theirs (``torch.manual_seed(0)`` before each component), with
the real checkpoints' structure where siso depends on it: SD3's three text encoders (two CLIPs with
projections, T5) and shifted VAE latents; Sana-Sprint's guidance embedding and SCM sampler; FLUX.2's
Qwen3 read at hidden layers 9/18/27 (so the tiny Qwen3 has 28 layers, each tiny), its batch-normalised,
patchified VAE latents and the distilled flag; Z-Image's Qwen3 read at its second-to-last layer. The
Qwen3 tokenizer is written here: a byte-level vocabulary (every byte a token, no merges) with the
special tokens and a chat template that knows ``enable_thinking``, as the pipelines ask for.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    SanaSprintPipeline,
    SCMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextModelWithProjection,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)

from .diffusion import _text_config, clip_tokenizer
from .transformer import sana_components, t5_tokenizer

QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
# What Qwen3's template produces for a user message and the assistant's turn, with or without thinking.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2/Qwen3-style byte-level BPE tokenizer: every byte its own token (complete without merges)."""
    vocab = {"<|endoftext|>": 0}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=list(QWEN_SPECIAL_TOKENS),
                               model_max_length=32768)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _qwen3_config(tokenizer: Qwen2Tokenizer, layers: int) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=1024, pad_token_id=0, eos_token_id=0,
        tie_word_embeddings=False, attn_implementation="eager",
    )


def _flow_vae(latent_channels: int, **extra) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=latent_channels, norm_num_groups=4,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False, **extra,
    )


def sd3_pipeline() -> StableDiffusion3Pipeline:
    """SD3.5 Large Turbo in miniature: CLIP-L and CLIP-G with projections, T5, a shifted 16-channel VAE."""
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, projection_dim=32))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=32))
    torch.manual_seed(0)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=16, qk_norm="rms_norm",
    )
    vae = _flow_vae(16, shift_factor=0.0609, scaling_factor=1.5305)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def sana_sprint_pipeline() -> SanaSprintPipeline:
    """Sana-Sprint in miniature: Sana's transformer with the guidance embedding, the SCM sampler, Gemma-2."""
    parts = sana_components(sample_size=32, guidance_embeds=True, guidance_embeds_scale=0.1,
                            qk_norm="rms_norm_across_heads")
    return SanaSprintPipeline(**parts, scheduler=SCMScheduler())


def flux2_klein_pipeline(distilled: bool = True) -> Flux2KleinPipeline:
    """FLUX.2 [klein] 4B in miniature: a 28-layer (tiny) Qwen3, the batch-normalised VAE, no guidance embedding."""
    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(_qwen3_config(tokenizer, layers=28))
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=distilled)


def z_image_pipeline() -> ZImagePipeline:
    """Z-Image-Turbo in miniature: Qwen3 (read at its second-to-last layer), the single-stream DiT."""
    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3Model(_qwen3_config(tokenizer, layers=2))
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32],
    )
    vae = _flow_vae(4, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
