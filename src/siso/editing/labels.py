"""Class names for editing: the user's words, or a light zero-shot CLIP labeller.

The reference implementation asks LLaVA-1.5-7B "what object is in the image?"; a CLIP model
scoring "a photo of a {word}." over a fixed everyday vocabulary gives the same one- or two-word
answer at a fraction of the memory, and says how sure it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..errors import SisoError

PROMPT_TEMPLATE = "a photo of a {}."

#: Everyday objects and animals, singular, lowercase. Every DreamBooth class is here (backpack,
#: stuffed animal, bowl, can, candle, cat, clock, sneaker, dog, toy, boot, glasses, cartoon,
#: teapot, vase), with the nearby words CLIP might prefer for those photos (plush toy, sunglasses).
VOCABULARY: tuple[str, ...] = (
    # animals
    "dog", "puppy", "cat", "kitten", "bird", "parrot", "owl", "duck", "chicken", "rooster", "penguin", "eagle",
    "horse", "pony", "cow", "pig", "sheep", "goat", "donkey", "rabbit", "hamster", "guinea pig", "mouse", "rat",
    "squirrel", "fox", "wolf", "bear", "panda", "koala", "raccoon", "deer", "elephant", "giraffe", "zebra",
    "lion", "tiger", "leopard", "monkey", "gorilla", "kangaroo", "camel", "hippo", "rhino", "sloth",
    "turtle", "tortoise", "frog", "lizard", "snake", "crocodile", "fish", "goldfish", "shark", "dolphin",
    "whale", "octopus", "crab", "lobster", "butterfly", "bee", "ladybug", "spider", "snail", "hedgehog",
    # toys and figures
    "toy", "stuffed animal", "plush toy", "teddy bear", "doll", "action figure", "robot", "toy car",
    "toy robot", "rubber duck", "figurine", "puppet", "ball", "balloon", "kite", "lego", "puzzle",
    "cartoon", "cartoon character", "emoji", "monster", "dinosaur", "statue", "sculpture",
    # bags and clothing
    "backpack", "bag", "handbag", "purse", "suitcase", "wallet", "hat", "cap", "helmet", "scarf", "glove",
    "sock", "shirt", "t-shirt", "sweater", "jacket", "coat", "dress", "skirt", "pants", "jeans", "tie",
    "belt", "sneaker", "shoe", "boot", "sandal", "slipper", "high heel", "glasses", "sunglasses", "watch",
    "necklace", "ring", "bracelet", "earring", "umbrella",
    # kitchen and table
    "teapot", "kettle", "cup", "mug", "glass", "wine glass", "bottle", "water bottle", "jar", "can",
    "bowl", "plate", "dish", "pot", "pan", "spoon", "fork", "knife", "chopsticks", "cutting board",
    "toaster", "blender", "coffee maker", "microwave", "refrigerator", "oven", "lunch box", "basket",
    "tray", "napkin", "vase", "candle", "candlestick", "lamp", "lantern", "clock", "alarm clock",
    # food
    "apple", "banana", "orange", "lemon", "strawberry", "berries", "grapes", "pear", "peach", "watermelon",
    "pineapple", "cherry", "tomato", "carrot", "potato", "broccoli", "pumpkin", "mushroom", "corn",
    "bread", "cake", "cupcake", "cookie", "donut", "pizza", "sandwich", "burger", "hot dog", "ice cream",
    "chocolate", "candy", "egg", "cheese", "salad", "soup", "coffee", "tea",
    # home
    "chair", "armchair", "sofa", "couch", "bench", "stool", "table", "desk", "bed", "pillow", "cushion",
    "blanket", "rug", "carpet", "curtain", "mirror", "picture frame", "painting", "poster", "shelf",
    "bookshelf", "cabinet", "drawer", "door", "window", "fireplace", "plant", "potted plant", "flower",
    "rose", "sunflower", "tulip", "cactus", "tree", "leaf", "box", "gift box", "cardboard box", "bucket",
    "trash can", "towel", "soap", "toothbrush", "bathtub", "sink", "toilet", "fan", "heater", "radiator",
    # electronics and tools
    "phone", "smartphone", "laptop", "computer", "keyboard", "computer mouse", "monitor", "television",
    "remote control", "camera", "headphones", "speaker", "radio", "microphone", "tablet", "game controller",
    "charger", "light bulb", "flashlight", "battery", "hammer", "screwdriver", "wrench", "scissors",
    "pen", "pencil", "marker", "paintbrush", "notebook", "book", "magazine", "newspaper", "envelope",
    "calculator", "ruler", "stapler", "globe", "map", "key", "lock", "coin", "card",
    # vehicles and outdoors
    "car", "truck", "bus", "van", "motorcycle", "bicycle", "scooter", "skateboard", "train", "airplane",
    "helicopter", "boat", "ship", "canoe", "tractor", "tent", "sled", "surfboard", "snowboard", "ski",
    "tennis racket", "baseball bat", "football", "basketball", "soccer ball", "golf ball", "frisbee",
    "guitar", "violin", "piano", "drum", "trumpet", "flute", "fountain", "mailbox", "bird house",
    "rock", "stone", "shell", "house", "castle", "bridge", "tower", "snowman", "person", "man", "woman",
    "child", "baby",
)


@dataclass(frozen=True)
class Label:
    """A class name for the subject or the scene's object, and where it came from."""

    text: str
    source: str  # "user" or "auto"
    confidence: float | None = None  # the labeller's probability over its vocabulary (auto only)
    model: str | None = None

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"text": self.text, "source": self.source}
        if self.source == "auto":
            record.update(confidence=round(self.confidence, 4) if self.confidence is not None else None,
                          model=self.model)
        return record

    def describe(self) -> str:
        if self.source == "user":
            return f"{self.text} (given)"
        return f"{self.text} (recognised by CLIP, confidence {self.confidence:.0%})"


class ClipLabeller:
    """Zero-shot classification of a photo over :data:`VOCABULARY` with a transformers CLIPModel."""

    def __init__(self, model: Any, processor: Any, source: str, vocabulary: tuple[str, ...] = VOCABULARY) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.vocabulary = vocabulary
        self._text_embeddings: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, source: str, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> ClipLabeller:
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(source, dtype=dtype)
            processor = CLIPProcessor.from_pretrained(source)
        except Exception as err:  # hub errors come in many types; the message is what matters
            raise SisoError(
                f"Could not load the CLIP labeller {source!r} ({err.__class__.__name__}: {err}). Pass a CLIP Hub id "
                "or directory with --label-model, or name the classes yourself with --subject-class and "
                "--input-class (then no labeller is loaded)."
            ) from err
        return cls(model.to(device).eval().requires_grad_(False), processor, source)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def text_embeddings(self) -> torch.Tensor:
        """The vocabulary's normalised prompt embeddings, computed once."""
        if self._text_embeddings is None:
            chunks = []
            prompts = [PROMPT_TEMPLATE.format(word) for word in self.vocabulary]
            for start in range(0, len(prompts), 128):
                tokens = self.processor(text=prompts[start:start + 128], padding=True, return_tensors="pt")
                tokens = {k: v.to(self.device) for k, v in tokens.items()}
                embedded = self.model.get_text_features(**tokens).pooler_output
                chunks.append(torch.nn.functional.normalize(embedded.float(), dim=-1))
            self._text_embeddings = torch.cat(chunks)
        return self._text_embeddings

    @torch.no_grad()
    def probabilities(self, image: Image.Image) -> torch.Tensor:
        """CLIP's softmax over the vocabulary for ``image``, shape (len(vocabulary),)."""
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
        embedded = torch.nn.functional.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output
                                                 .float(), dim=-1)
        logits = self.model.logit_scale.exp().float() * embedded @ self.text_embeddings().T
        return logits.softmax(dim=-1)[0].cpu()

    def label(self, image: Image.Image) -> Label:
        probs = self.probabilities(image)
        best = int(probs.argmax())
        return Label(self.vocabulary[best], "auto", float(probs[best]), self.source)


def user_label(text: str | None) -> Label | None:
    return Label(text, "user") if text else None
