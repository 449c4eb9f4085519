"""Every model siso downloads by default, by role: the one place a Hub id is written.

Knob declarations (``siso.config``, the benchmark's settings) take their defaults from here, and
each id's licence is in the README's models table.
"""

from __future__ import annotations

GENERATION_MODEL = "stabilityai/sdxl-turbo"
EDITING_MODEL = "stabilityai/sd-turbo"  # the paper's editing backbone
DINO_MODEL = "facebook/dinov2-large"
#: names the subject and the replaced object when editing (zero-shot); CLIP-I and CLIP-T in the benchmark
CLIP_MODEL = "openai/clip-vit-large-patch14"
CMMD_MODEL = "openai/clip-vit-large-patch14-336"  # CMMD (Jayasumana et al. 2024)
#: finds the object to replace when editing (the reference's choice; grounding-dino-base is the larger one)
DETECTOR_MODEL = "IDEA-Research/grounding-dino-tiny"
#: crops images to the subject for the benchmark's identity metrics: the larger detector, for the measurement
CROP_MODEL = "IDEA-Research/grounding-dino-base"
SEGMENTER_MODEL = "facebook/sam-vit-base"
#: the IR model is not on the Hub: a Kaggle dataset, converted once by ``siso convert-ir --download``
IR_KAGGLE_DATASET = "louieshao/guieweights0732"
