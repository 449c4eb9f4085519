"""Tiny models for the benchmark's metrics: a random CLIP (CLIP-I/T, CMMD) and a random Grounding DINO
that crops images to the subject (its own word-level vocabulary; the editing kit's detector scores
every box 0.5 instead, see ``tiny.editing``)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import diffusion


def clip_dir(directory: Path) -> Path:
    """A tiny random CLIP with the local character-level tokenizer, saved like a Hub checkpoint."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    tokenizer = diffusion.clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="gelu",
        ).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                       image_size=32, patch_size=8, hidden_act="gelu").to_dict(),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def grounding_dino_dir(directory: Path) -> Path:
    """A tiny random Grounding DINO (Swin + BERT) with a local word-level BERT vocabulary."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", *"bcdefghijklmnopqrstuvwxyz", "dog", "cat"]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 1],
                                   window_size=2, out_features=["stage1", "stage2", "stage3"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, max_position_embeddings=64),
        num_queries=10, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, num_feature_levels=3, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32,
    )
    GroundingDinoForObjectDetection(config).save_pretrained(directory)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 32}),
        tokenizer=BertTokenizer(str(directory / "vocab.txt")),
    )
    processor.save_pretrained(directory)
    return directory
