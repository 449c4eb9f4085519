"""A LoRA that carries its card: lora/README.md (the Hub's model-card convention, read back with
huggingface_hub), the best image beside it, ModelSpec's metadata in the kohya file (its hash computed
independently here), and `siso push` against a loopback server that speaks the Hub's API."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import RESOLUTION
from helpers import PROMPT
from huggingface_hub import ModelCard
from safetensors import safe_open

from siso.lora import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME
from siso.model_card import card_data
from siso.model_ids import FAMILY_CHECKPOINTS


@pytest.fixture(scope="module")
def generated(tmp_path_factory, sd_dir, dino_dir, subject_photo) -> Path:
    from siso.config import GenerateConfig
    from siso.generation import run_generation

    out = tmp_path_factory.mktemp("card") / "run"
    config = GenerateConfig(subjects=(subject_photo,), prompt=PROMPT, model=str(sd_dir), dino_model=str(dino_dir),
                            ir_model=None, resolution=RESOLUTION, max_steps=3, learning_rate=5e-3, device="cpu")
    run_generation(config, out)
    return out


def test_the_card_is_true_to_run_json(generated):
    record = json.loads((generated / "run.json").read_text())
    card = ModelCard.load(generated / "lora" / "README.md")
    data = card.data
    assert data.library_name == "diffusers" and data.instance_prompt == record["config"]["prompt"] == PROMPT
    assert data.widget == [{"text": PROMPT, "output": {"url": "best.png"}}]
    assert (generated / "lora" / "best.png").read_bytes() == (generated / "best.png").read_bytes()
    # A local directory is no Hub id: no base_model, and the licence is the base model's own.
    assert data.base_model is None and data.license == "other" and data.license_name == "same-as-base-model"
    assert {"lora", "diffusers", "siso", record["preset"]["family"]} <= set(data.tags)
    body = card.text
    best = record["lora_step"]
    best_loss = next(entry["total"] for entry in record["losses"] if entry["step"] == best)
    assert f"{len(record['losses'])} (the best: {best}, loss {best_loss:.4f})" in body
    assert f"num_inference_steps={record['preset']['render_steps']}" in body and "load_lora_weights" in body
    assert f"`{KOHYA_WEIGHT_NAME}` into `ComfyUI/models/loras/`" in body and "<lora:siso_lora_kohya:1>" in body
    assert f"| resolution, seed | {record['config']['resolution']} px, {record['config']['seed']} |" in body


def test_a_reference_checkpoint_names_its_licence(generated):
    """For a family's reference checkpoint on the Hub the card names it as base_model, with its licence."""
    record = json.loads((generated / "run.json").read_text())
    for family, checkpoint in FAMILY_CHECKPOINTS.items():
        data = card_data({**record, "config": {**record["config"], "model": checkpoint.repo_id},
                          "preset": {**record["preset"], "family": family}})
        assert data.base_model == checkpoint.repo_id and data.license == checkpoint.license
        assert data.license_name == checkpoint.license_name and data.license_link == checkpoint.license_link
    other = card_data({**record, "config": {**record["config"], "model": "someone/a-finetune"}})
    assert (other.base_model, other.license, other.license_link) == (
        "someone/a-finetune", "other", "https://huggingface.co/someone/a-finetune")


def test_the_kohya_file_carries_modelspec(generated):
    record = json.loads((generated / "run.json").read_text())
    path = generated / "lora" / KOHYA_WEIGHT_NAME
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["modelspec.title"] == f"siso LoRA: {record['config']['prompt']}"
    assert metadata["modelspec.resolution"] == f"{RESOLUTION}x{RESOLUTION}"
    assert metadata["modelspec.architecture"].endswith("/lora") and metadata["ss_network_dim"] == "4"
    written = datetime.fromisoformat(metadata["modelspec.date"])
    assert timedelta(0) <= datetime.now(timezone.utc) - written < timedelta(hours=1)
    raw = path.read_bytes()  # the spec: a hash of all tensor content, the header excluded
    header = int.from_bytes(raw[:8], "little")
    assert metadata["modelspec.hash_sha256"] == "0x" + hashlib.sha256(raw[8 + header:]).hexdigest()


def test_an_edit_carries_its_card(run_siso, sd_dir, dino_dir, subject_photo, scene_photo, tmp_path):
    from PIL import Image

    mask = tmp_path / "mask.png"
    width, height = Image.open(scene_photo).size
    picture = Image.new("L", (width, height), 0)
    picture.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    picture.save(mask)
    out = tmp_path / "edit"
    code, text = run_siso("edit", "--subject", subject_photo, "--input", scene_photo, "--subject-class", "dog",
                          "--input-class", "cat", "--mask", mask, "--out", out, "--model", sd_dir, "--dino-model",
                          dino_dir, "--resolution", RESOLUTION, "--device", "cpu", "--max-steps", "1")
    assert code == 0, text
    record = json.loads((out / "run.json").read_text())
    card = ModelCard.load(out / "lora" / "README.md")
    assert card.data.instance_prompt == record["prompts"]["edit"] and "| task | edit |" in card.text
    with safe_open(out / "lora" / KOHYA_WEIGHT_NAME, framework="pt") as handle:
        assert handle.metadata()["modelspec.title"] == f"siso edit LoRA: {record['prompts']['edit']}"


# -- siso push --------------------------------------------------------------------------------------------


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The part of the Hub's HTTP API that create_repo and upload_folder use, answering as the Hub does;
    ``refuse`` answers every call with that status instead."""

    refuse: int | None = None
    commits: list[list[dict]] = []
    created: list[dict] = []
    validated: list[dict] = []

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:
            self.send_header("X-Error-Message", "refused by the fake Hub")
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.refuse:
            return self._json(self.refuse, {"error": "refused by the fake Hub"})
        if self.path == "/api/repos/create":
            FakeHub.created.append(json.loads(body))
            return self._json(200, {"url": f"http://{self.headers['Host']}/someone/dog-lora"})
        if self.path == "/api/validate-yaml":  # the Hub checks a README's front matter before the commit
            import yaml

            content = json.loads(body)["content"]
            FakeHub.validated.append(yaml.safe_load(content.split("---")[1]))
            return self._json(200, {"warnings": []})
        if self.path.endswith("/preupload/main"):
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if "/commit/main" in self.path:
            FakeHub.commits.append([json.loads(line) for line in body.decode().splitlines() if line.strip()])
            return self._json(200, {"commitUrl": f"http://{self.headers['Host']}/someone/dog-lora/commit/abc",
                                    "commitOid": "a" * 40, "success": True})
        return self._json(404, {"error": f"no route {self.path}"})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeHub.refuse, FakeHub.commits, FakeHub.created, FakeHub.validated = None, [], [], []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_loopback_hub")
    yield FakeHub
    server.shutdown()


def listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_push_uploads_the_lora_folder_in_one_commit(run_siso, generated, fake_hub):
    before = listing(generated)
    code, text = run_siso("push", generated, "someone/dog-lora", "--private")
    assert code == 0, text
    assert "Pushed" in text and "someone/dog-lora/commit/abc" in text
    assert fake_hub.created[0]["name"] == "dog-lora" and fake_hub.created[0]["visibility"] == "private"
    [commit] = fake_hub.commits
    files = {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in commit if op["key"] == "file"}
    assert set(files) == {DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, "README.md", "best.png"}
    assert all(files[name] == (generated / "lora" / name).read_bytes() for name in files)
    assert fake_hub.validated[0]["library_name"] == "diffusers"  # the front matter went through the Hub's check
    assert listing(generated) == before  # nothing local changed


@pytest.mark.parametrize("status,advice", [(401, "log in first"), (403, "may not write to someone/dog-lora")])
def test_push_refused_says_what_to_do_and_changes_nothing(run_siso, generated, fake_hub, status, advice):
    fake_hub.refuse = status
    before = listing(generated)
    code, text = run_siso("push", generated, "someone/dog-lora")
    assert code == 2 and advice in text and "Nothing was changed locally" in text
    assert listing(generated) == before


def test_push_offline_or_of_no_run_is_one_message(run_siso, generated, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = listing(generated)
    code, text = run_siso("push", generated, "someone/dog-lora")
    assert code == 2 and "HF_HUB_OFFLINE is set" in text and listing(generated) == before
    code, text = run_siso("push", tmp_path, "someone/dog-lora")
    assert code == 2 and "is not a siso run directory" in text
    code, text = run_siso("push", generated, "dog-lora")
    assert code == 2 and "OWNER/NAME" in text
