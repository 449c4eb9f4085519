"""Start ComfyUI (its main.py, with our arguments) or run a script of ours where ComfyUI imports.

transformers and diffusers check for torchvision once and cache the answer: they are asked first, while it
is absent, so they keep their PIL image processing. Then ComfyUI gets a stand-in torchvision (PyPI's does
not import beside the pinned CPU torch), whose attributes fail loudly if a model path ever uses them.
"""

from __future__ import annotations

import importlib.machinery
import runpy
import sys
import types

import diffusers.utils.import_utils
import transformers.utils.import_utils

assert not transformers.utils.import_utils.is_torchvision_available()
assert not diffusers.utils.import_utils.is_torchvision_available()


class _Absent(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self.__name__}.{name}: torchvision is not installed in siso's test environment")


for module_name in ("torchvision", "torchvision.transforms", "torchvision.models"):
    module = _Absent(module_name)
    module.__spec__ = importlib.machinery.ModuleSpec(module_name, None)
    module.__path__ = []
    sys.modules[module_name] = module
sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
sys.modules["torchvision"].models = sys.modules["torchvision.models"]

if sys.argv[1:2] == ["--script"]:
    script = sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")
else:
    sys.argv = ["main.py", *sys.argv[1:]]
    runpy.run_path("main.py", run_name="__main__")
