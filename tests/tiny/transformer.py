"""Tiny random-weight FLUX and Sana pipelines in their real on-disk layouts.

Built the way diffusers' own fast tests build theirs (``torch.manual_seed(0)`` before each
component), but with the real checkpoints' structure where it matters to siso: FLUX's 16-channel
VAE with shift and scaling factors, packed 2x2 latents (transformer ``in_channels`` 64), a CLIP
encoder for the pooled embedding and a T5 encoder for the sequence; Sana's deep-compression VAE,
a Gemma 2 text encoder and the flow DPM-Solver scheduler of Sana_1600M_512px. Tokenizers are
written here (no Hub access): character-level vocabularies are complete without merges.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
)
from transformers import (
    CLIPTextModel,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .diffusion import _text_config, clip_tokenizer

# Every printable ASCII character but whitespace: Sana's default "complex human instruction"
# prompt uses punctuation such as ':' and '>'.
_CHARS = [c for c in string.printable if not c.isspace()]


def t5_tokenizer() -> T5Tokenizer:
    """A Unigram (SentencePiece-style) vocabulary of single characters, T5's special tokens first."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(char, -3.0) for char in _CHARS]
    vocab += [("▁" + char, -2.5) for char in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def gemma_tokenizer() -> GemmaTokenizer:
    """Gemma's layout in miniature: its special tokens first, then one token per byte (``<0x00>`` ...
    ``<0xFF>``, which Gemma's byte fallback spells any character with), then the printable characters;
    no merges."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5, "\n": 6}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in _CHARS:
        vocab.setdefault(char, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=8192, add_bos_token=True)  # as Gemma does


def flux_scheduler(dynamic_shifting: bool = False) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-schnell's scheduler configuration; with ``dynamic_shifting``, FLUX.1-dev's."""
    if dynamic_shifting:
        return FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
            use_dynamic_shifting=True,
        )
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=1.0,
        use_dynamic_shifting=False,
    )


def flux_pipeline(guidance_embeds: bool = False, dynamic_shifting: bool = False) -> FluxPipeline:
    """FLUX.1-schnell in miniature; ``guidance_embeds``/``dynamic_shifting`` make it FLUX.1-dev-like."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=16, norm_num_groups=4,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    tokenizer_2 = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    return FluxPipeline(
        scheduler=flux_scheduler(dynamic_shifting), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def sana_components(**transformer_options) -> dict:
    """Sana's tokenizer, Gemma-2, transformer (``transformer_options`` on top of the tiny sizes) and DC-AE
    VAE in miniature: what Sana and Sana-Sprint pipelines share."""
    tokenizer = gemma_tokenizer()
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(
        head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048, pad_token_id=0,
        eos_token_id=1, bos_token_id=2, attn_implementation="eager",
    ))
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(**{
        "patch_size": 1, "in_channels": 8, "out_channels": 8, "num_layers": 2, "num_attention_heads": 2,
        "attention_head_dim": 4, "num_cross_attention_heads": 2, "cross_attention_head_dim": 4,
        "cross_attention_dim": 8, "caption_channels": 16, "sample_size": 16, **transformer_options,
    })
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=8, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "transformer": transformer, "vae": vae}


def sana_pipeline() -> SanaPipeline:
    """Sana_1600M_512px in miniature, with its flow DPM-Solver scheduler."""
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    return SanaPipeline(**sana_components(), scheduler=scheduler)
