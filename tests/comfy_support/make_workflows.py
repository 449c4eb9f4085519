"""Write the node pack's UI-format example workflows from its API-format ones (``api_to_ui``), with the
node descriptions of a real ComfyUI that has the pack installed.

    python tests/comfy_support/make_workflows.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfy_support import ComfyServer  # noqa: E402
from comfy_support.workflows import api_to_ui  # noqa: E402

PACK = Path(__file__).resolve().parents[2] / "comfyui-siso"


def main() -> None:
    with tempfile.TemporaryDirectory() as base, ComfyServer(Path(base), {PACK.name: PACK}) as server:
        info = server.get("/object_info")
    for name in ("personalize", "edit"):
        api = json.loads((PACK / "workflows" / f"{name}_api.json").read_text())
        (PACK / "workflows" / f"{name}.json").write_text(json.dumps(api_to_ui(api, info), indent=1) + "\n")
        print(f"wrote {PACK / 'workflows' / f'{name}.json'}")


if __name__ == "__main__":
    main()
