"""Subject-driven editing: swap the object in a photo for the subject, keep everything else.

``task`` is the edit the session template runs (the same loop as generation, from an inverted
latent, with a background loss); ``inversion`` is ReNoise; ``masks`` finds the object (Grounding
DINO + SAM, or the user's drawing); ``labels`` names the subject and the object (the user's words,
or zero-shot CLIP).
"""

from .task import EditLoss, EditTask, background_mse, edit, prepare_edit, run_edit, start_edit

__all__ = ["EditLoss", "EditTask", "background_mse", "edit", "prepare_edit", "run_edit", "start_edit"]
