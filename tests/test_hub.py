"""Downloads from a local stand-in of the Hub: resume, checksum, no half files, progress in
/v1/models, quant tags, and `python -m server pull`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server import hub
from server.errors import ModelLoadFailed
from tests.conftest import ROOT, LiveServer
from tests.gguf_factory import write_gguf
from tests.hub_standin import Behaviour, HubStandIn

REPO = "someorg/tiny-GGUF"


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_gguf(tmp_path_factory.mktemp("hub") / "tiny.gguf", "llama").read_bytes()


@pytest.fixture
def standin(model_bytes: bytes) -> Iterator[HubStandIn]:
    hub_ = HubStandIn({f"{REPO}/tiny.Q4_0.gguf": model_bytes,
                       f"{REPO}/tiny.Q8_0.gguf": model_bytes[::-1]})
    yield hub_
    hub_.close()


def fetch(standin: HubStandIn, target: Path, name: str = "tiny.Q4_0.gguf") -> Path:
    return hub.download(REPO, name, target, endpoint=standin.url)


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path) -> None:
    # huggingface_hub writes in 10 MiB chunks: a cut past the first resumes from it.
    content = os.urandom(24 << 20)
    standin = HubStandIn({f"{REPO}/big.gguf": content}, Behaviour(cut_after=12 << 20, cuts=1))
    target = tmp_path / "big.gguf"
    reports: list[tuple[int, int | None]] = []
    try:
        hub.download(REPO, "big.gguf", target, endpoint=standin.url,
                     progress=lambda done, total: reports.append((done, total)))
    finally:
        standin.close()
    assert target.read_bytes() == content
    assert (10 << 20, len(content)) in reports and reports[-1] == (len(content), len(content))
    gets = [r for m, _, r in standin.requests if m == "GET"]
    assert gets == ["", f"bytes={10 << 20}-"]


def test_a_failing_download_leaves_no_file_that_looks_complete(
        standin: HubStandIn, tmp_path: Path) -> None:
    standin.behaviour = Behaviour(cut_after=50_000, cuts=1000)  # retried, then given up
    target = tmp_path / "tiny.Q4_0.gguf"
    with pytest.raises(ModelLoadFailed, match="retry to resume"):
        fetch(standin, target)
    assert not target.exists() and not list(tmp_path.rglob("*.gguf"))


def test_a_corrupt_download_fails_its_checksum_and_is_removed(
        standin: HubStandIn, tmp_path: Path) -> None:
    standin.behaviour = Behaviour(corrupt=True)
    target = tmp_path / "tiny.Q4_0.gguf"
    with pytest.raises(ModelLoadFailed, match="SHA-256"):
        fetch(standin, target)
    assert not target.exists()


def test_a_missing_file_is_named(standin: HubStandIn, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadFailed, match=r"has no file tiny\.Q2_K\.gguf"):
        fetch(standin, tmp_path / "x.gguf", "tiny.Q2_K.gguf")


def registry(tmp_path: Path) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(f"default: local\nmodels:\n  local:\n    path: {tmp_path / 'local.gguf'}\n"
                    f"  tiny:\n    repo: {REPO}\n    file: 'tiny.{{quant}}.gguf'\n"
                    "    quant: Q4_0\n    quants: [Q4_0, Q8_0]\n    n_ctx: 128\n")
    return path


def test_the_server_pulls_on_first_use_and_reports_progress(
        standin: HubStandIn, tmp_path: Path, model_bytes: bytes) -> None:
    write_gguf(tmp_path / "local.gguf", "llama", seed=5)
    standin.behaviour = Behaviour(chunk_delay=0.25)
    models = tmp_path / "models"
    live = LiveServer(["--models-file", str(registry(tmp_path))],
                      env={"HF_ENDPOINT": standin.url, "GGSERVE_MODELS_DIR": str(models)})
    result: dict[str, httpx.Response] = {}
    try:
        worker = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"{live.url}/v1/completions", timeout=60,
            json={"model": "tiny", "prompt": "hi", "max_tokens": 3})))
        worker.start()
        seen = []
        while worker.is_alive():
            seen.append(httpx.get(f"{live.url}/v1/models/tiny").json())
            if seen[-1]["status"] == "downloading":  # the loaded model keeps serving meanwhile
                asked = time.monotonic()
                other = httpx.post(f"{live.url}/v1/completions", timeout=60,
                                   json={"model": "local", "prompt": "hi", "max_tokens": 2})
                assert other.status_code == 200 and time.monotonic() - asked < 2
            time.sleep(0.1)
        worker.join()
        assert result["r"].status_code == 200
        progress = [m["download"] for m in seen if m["status"] == "downloading"]
        assert progress and all(p["total"] == len(model_bytes) for p in progress if p), seen
        assert httpx.get(f"{live.url}/v1/models/tiny").json()["status"] == "loaded"
        assert (models / "someorg--tiny-GGUF" / "tiny.Q4_0.gguf").read_bytes() == model_bytes
        # id:QUANT picks another published file
        standin.behaviour = Behaviour()
        other = httpx.post(f"{live.url}/v1/completions", timeout=60,
                           json={"model": "tiny:Q8_0", "prompt": "hi", "max_tokens": 1})
        assert other.status_code == 503  # its bytes are no GGUF: fetched, then refused
        assert (models / "someorg--tiny-GGUF" / "tiny.Q8_0.gguf").exists()
    finally:
        live.stop()


def test_models_say_what_is_on_disk_what_needs_a_download_and_its_size(
        standin: HubStandIn, tmp_path: Path, model_bytes: bytes) -> None:
    local = write_gguf(tmp_path / "local.gguf", "llama", seed=5)
    models_file = registry(tmp_path)
    models_file.write_text(models_file.read_text()
                           + f"  spare:\n    path: {local}\n    embedding: true\n")
    live = LiveServer(["--models-file", str(models_file)],
                      env={"HF_ENDPOINT": standin.url, "GGSERVE_MODELS_DIR": str(tmp_path / "m")})
    try:
        deadline = time.monotonic() + 10
        while True:  # the hub is asked for the size in the background, once
            listed = {m["id"]: m for m in httpx.get(f"{live.url}/v1/models").json()["data"]}
            if listed["tiny"]["size_bytes"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        size = local.stat().st_size
        assert {k: (m["status"], m["kind"], m["size_bytes"]) for k, m in listed.items()} == {
            "local": ("loaded", "chat", size), "spare": ("on_disk", "embedding", size),
            "tiny": ("not_downloaded", "chat", len(model_bytes))}
        assert listed["tiny"]["error"] is None
        heads = [r for m, r, _ in standin.requests if m == "HEAD"]
        assert len(heads) == 1, standin.requests  # asked once, not at every listing
    finally:
        live.stop()


def test_pull_downloads_ahead_of_serving(standin: HubStandIn, tmp_path: Path,
                                         model_bytes: bytes) -> None:
    (tmp_path / "local.gguf").write_bytes(model_bytes)
    env = {"HF_ENDPOINT": standin.url, "GGSERVE_MODELS_DIR": str(tmp_path / "models"),
           "PATH": "/usr/bin:/bin"}

    def pull(*models: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server", "pull", *models,
                               "--models-file", str(registry(tmp_path))], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    first = pull("tiny")
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "models" / "someorg--tiny-GGUF" / "tiny.Q4_0.gguf").read_bytes() == \
        model_bytes
    again = pull("tiny")
    assert again.returncode == 0 and "already at" in again.stderr
    unknown = pull("nope")
    assert unknown.returncode == 1 and "nope" in unknown.stderr


def test_pull_downloads_a_models_lora_adapters_too(standin: HubStandIn, tmp_path: Path,
                                                   model_bytes: bytes) -> None:
    (tmp_path / "local.gguf").write_bytes(model_bytes)
    standin.files[f"{REPO}/tiny-lora.gguf"] = b"GGUF adapter"
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  local:\n    path: {tmp_path / 'local.gguf'}\n"
                      f"    lora: [{{name: x, repo: {REPO}, file: tiny-lora.gguf}}]\n")
    done = subprocess.run(
        [sys.executable, "-m", "server", "pull", "local:x", "--models-file", str(models)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"HF_ENDPOINT": standin.url, "GGSERVE_MODELS_DIR": str(tmp_path / "models"),
             "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / "someorg--tiny-GGUF" / "tiny-lora.gguf").read_bytes() == \
        b"GGUF adapter"


def test_help_names_the_command_and_its_pull_subcommand() -> None:
    shown = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout
    assert shown.startswith("usage: ggserve ") and "ggserve pull ID[:QUANT]" in shown
    pull = subprocess.run([sys.executable, "-m", "server", "pull", "--help"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout
    assert pull.startswith("usage: ggserve pull ")
