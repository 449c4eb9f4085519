"""Tiny random models for editing, in their real on-disk layouts: Grounding DINO (with a WordPiece
BERT tokenizer written here), SAM, a CLIP whose two towers are made to agree on chosen photos, and
an SD pipeline whose latents are unit-variance as real SD's are.

Every builder seeds torch first and writes with ``save_pretrained``, so siso loads them exactly as
it loads Hub models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import (
    BertConfig,
    BertTokenizerFast,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SamConfig,
    SamImageProcessor,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
    SwinConfig,
)

from . import diffusion

# Grounding DINO's text side: "a {class}." for the classes the tests use, plus BERT's specials.
WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "photo", "of", "dog", "cat", "teapot",
         "backpack", "vase", "toy", "stuffed", "animal", "bowl", "can", "candle", "clock", "sneaker", "boot")


def bert_tokenizer(directory: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer over :data:`WORDS`, built from a vocab.txt written here."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    return BertTokenizerFast(vocab=str(vocab))


def grounding_dino_dir(directory: Path, constant_scores: bool = True) -> Path:
    """A tiny Swin + BERT Grounding DINO with its processor.

    With ``constant_scores``, the decoder's output norm is zeroed, so every query scores exactly
    sigmoid(0) = 0.5 on every text token: the thresholds alone decide whether anything is found.
    """
    tokenizer = bert_tokenizer(directory)
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 1, 1], window_size=4,
                                   out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, max_position_embeddings=64),
        d_model=32, num_queries=4, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2,
        max_text_len=32,
    )
    model = GroundingDinoForObjectDetection(config)
    if constant_scores:
        with torch.no_grad():
            # Class logits are dot products of the normed decoder state with the text features.
            model.model.decoder.layer_norm.weight.zero_()
            model.model.decoder.layer_norm.bias.zero_()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 96, "longest_edge": 128}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def sam_dir(directory: Path) -> Path:
    """A tiny SAM whose three candidate masks agree (as a trained SAM's mostly do on a clear object).

    A random SAM's candidates are unrelated noise, and siso takes their union (as the reference
    does), which then covers nearly the whole image; copying the first candidate's mask token and
    output head onto the other two keeps the union a usable mask for end-to-end tests.
    """
    torch.manual_seed(0)
    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                                      patch_size=8, output_channels=16, global_attn_indexes=[0], mlp_dim=16,
                                      window_size=0, num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 mlp_dim=16, iou_head_hidden_dim=16),
    )
    model = SamModel(config)
    decoder = model.mask_decoder
    with torch.no_grad():
        for index in range(2, decoder.num_mask_tokens):  # token 0 is the single-mask output
            decoder.mask_tokens.weight[index].copy_(decoder.mask_tokens.weight[1])
            decoder.output_hypernetworks_mlps[index].load_state_dict(decoder.output_hypernetworks_mlps[1].state_dict())
    model.save_pretrained(directory)
    processor = SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64},
                                                               pad_size={"height": 64, "width": 64}))
    processor.save_pretrained(directory)
    return directory


def clip_processor() -> CLIPProcessor:
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPProcessor(image_processor=image_processor, tokenizer=diffusion.clip_tokenizer())


def clip_dir(directory: Path, agree: dict[str, Image.Image] | None = None) -> Path:
    """A tiny CLIP; ``agree`` maps words to photos that its image tower must embed exactly onto the
    text embedding of "a photo of a {word}." (the visual projection is solved for it).

    The two towers of a random CLIP agree on nothing; here the image of each chosen photo lands on
    its word's text direction, so zero-shot labelling has a known right answer.
    """
    tokenizer = diffusion.clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=4.6052,  # exp = 100, as trained CLIPs end up
    )
    model = CLIPModel(config).eval()
    processor = clip_processor()
    if agree:
        with torch.no_grad():
            prompts = [f"a photo of a {word}." for word in agree]
            tokens = processor(text=prompts, padding=True, return_tensors="pt")
            text = model.get_text_features(**tokens).pooler_output  # (n, projection)
            pixels = processor(images=[image.convert("RGB") for image in agree.values()],
                               return_tensors="pt")["pixel_values"]
            pooled = model.vision_model(pixel_values=pixels).pooler_output  # (n, hidden)
            # W pooled_i = text_i for each chosen photo: the minimum-norm solution W = T^T pinv(P^T).
            weight = text.T @ torch.linalg.pinv(pooled.T)
            model.visual_projection.weight.copy_(weight)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def unit_latent_sd_dir(directory: Path, photo: Image.Image) -> Path:
    """conftest's tiny SD, but with the VAE scaling factor that makes a photo's latents unit-variance.

    Real SD's 0.18215 does exactly that for its VAE; the random tiny VAE's latents would otherwise be
    ~0.05 in size, where the random UNet's prediction swamps them and no inversion is meaningful.
    """
    from siso.images import pil_to_tensor

    pipe = diffusion.sd_pipeline()
    with torch.no_grad():
        latents = pipe.vae.encode(pil_to_tensor(photo) * 2 - 1).latent_dist.mode()
    pipe.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return diffusion.save(pipe, directory)
