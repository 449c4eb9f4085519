"""A pipeline directory's files checked before any weight loads: its model_index.json, a folder per
component it lists, and each folder's config, parsed and with numbers where the model's class wants
numbers. A broken or incomplete download is then named for what it is (which file, which value),
instead of surfacing as a wrong diagnosis (diffusers calls an unreadable model_index.json a failed
download) or a TypeError from deep inside the model's constructor.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from .errors import SisoError

INDEX_FILE = "model_index.json"
#: the file each kind of component folder is read from first (a tokenizer's files vary: any file will do)
_CONFIG_FILES = ("config.json", "scheduler_config.json")
_AGAIN = "the download or copy is incomplete or damaged: download the model again, or save it with save_pretrained"


def read_json(path: Path, model: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SisoError(f"{path} (of the model {model}) is not valid JSON ({err}); {_AGAIN}.") from err
    except OSError as err:
        raise SisoError(f"{path} (of the model {model}) cannot be read ({err.strerror or err}).") from err
    if not isinstance(value, dict):
        raise SisoError(f"{path} (of the model {model}) holds a JSON {type(value).__name__}, not an object; {_AGAIN}.")
    return value


def check_pipeline_folder(folder: Path, model: str) -> dict[str, Any]:
    """The model index of the pipeline directory ``folder``, once every component it lists is there
    with a readable config whose numbers are numbers."""
    index = read_json(folder / INDEX_FILE, model)
    for name, spec in index.items():
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and all(spec)):
            continue  # metadata, or an optional component the pipeline goes without (null)
        library, class_name = spec
        component = folder / name
        if not component.is_dir():
            raise SisoError(f"The model {model} has no {name}/ folder, which its {INDEX_FILE} lists ({class_name}); "
                            f"{_AGAIN}.")
        config_file = next((component / file for file in _CONFIG_FILES if (component / file).is_file()), None)
        if config_file is None:
            if not any(component.iterdir()):
                raise SisoError(f"The model {model}'s {name}/ folder is empty; {_AGAIN}.")
            continue  # a tokenizer: its own files, checked by its library
        config = read_json(config_file, model)
        if library == "diffusers":
            _check_numbers(config, class_name, config_file, model)
    return index


def _check_numbers(config: dict[str, Any], class_name: str, path: Path, model: str) -> None:
    """Each config value whose default in ``class_name``'s constructor is a number must be a number (or a
    list of them, as per-block settings are): "banana" for a width fails here, by name."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        return  # not one of diffusers' classes: nothing known to check it against
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    for key, value in config.items():
        parameter = parameters.get(key)
        if parameter is None or value is None:
            continue
        default = parameter.default
        wants_number = isinstance(default, (int, float)) and not isinstance(default, bool)
        is_number = isinstance(value, (int, float, list, tuple)) and not isinstance(value, bool)
        if wants_number and not is_number:
            raise SisoError(f"{path} (of the model {model}) sets {key} to {value!r}, but {class_name} takes a number "
                            f"there (its default is {default!r}); {_AGAIN}.")
