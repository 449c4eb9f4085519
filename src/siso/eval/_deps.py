"""The optional libraries of the benchmark, imported on first use with an actionable message."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import SisoError

_PIP_NAMES = {"torchmetrics": "torchmetrics", "ray": "ray", "torch_fidelity": "torch-fidelity",
              "torchvision": "torchvision"}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise a :class:`SisoError` saying what to install for ``purpose``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        package = _PIP_NAMES.get(top, top)
        hint = ("pip install 'siso[eval]'" if top in ("torchmetrics", "ray")
                else f"pip install {package} (a build matching your torch)")
        raise SisoError(f"{purpose} needs the {package} package, which is not installed: {hint}.") from err
