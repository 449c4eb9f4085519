"""The tests' kit: tiny random-weight models in their real on-disk layouts and synthetic photos.

Every builder seeds torch first and writes with ``save_pretrained`` (or returns a pipeline that
can), so siso loads them through exactly the code path it uses for Hub models:

- ``diffusion``: SD and SDXL pipelines, the character-level CLIP tokenizer;
- ``transformer``: FLUX and Sana pipelines (T5 and Gemma tokenizers written locally);
- ``flow``: SD3.5, Sana-Sprint, FLUX.2 [klein] and Z-Image pipelines (a Qwen3 tokenizer written locally);
- ``similarity``: DINOv2 and the IR tower;
- ``editing``: Grounding DINO, SAM, a CLIP labeller made to agree on chosen photos, a unit-latent SD;
- ``metrics``: the CLIP and Grounding DINO the benchmark's metrics use;
- ``photos``: synthetic subject photos and a DreamBooth-style dataset folder.
"""

from . import diffusion, editing, flow, metrics, photos, similarity, transformer

__all__ = ["diffusion", "editing", "flow", "metrics", "photos", "similarity", "transformer"]
