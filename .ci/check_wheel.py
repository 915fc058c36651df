"""CI: normdino as a user installs a release. Run with the python of a fresh venv holding only the built wheel.

Fits a tiny random-weight model on phantoms, starts ``normdino serve`` on it, and fetches the viewer (``/``)
and every asset it links, the API's model list and one prediction. Exits non-zero with one line on any failure.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]


def fail(message: str) -> None:
    sys.exit(f"check_wheel: {message}")


def tiny_model(root: Path) -> Path:
    """A tiny DPMM model (random 2-block DINOv2, 112 px) fitted on 64-px phantoms: no weights to download."""
    from normdino import AnomalyDetector
    from normdino.features.loading import save_random_backbone
    from normdino.io.phantoms import write_phantom_dataset

    backbone = save_random_backbone(root / "backbone", arch="dinov2_vits14", seed=0, tiny=True)
    data = write_phantom_dataset(root / "data", n_train=8, n_valid=4, n_test_normal=1, n_test_anomalous=1,
                                 size=64, seed=0)
    detector = AnomalyDetector(backbone=str(backbone), image_size=112, n_components=8, epochs=2,
                               batch_images=4, progress=False, seed=0, cache_dir=None)
    detector.fit(sorted((data / "train" / "good").glob("*.png")),
                 sorted((data / "valid" / "good" / "img").glob("*.png")))
    return detector.save(root / "tiny.normdino")


def get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def post_file(url: str, path: Path) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import normdino

    installed = Path(normdino.__file__).resolve()
    if SOURCE in installed.parents:
        fail(f"normdino was imported from the source tree ({installed}), not from the installed wheel")
    licences = [str(f) for f in importlib.metadata.distribution("normdino").files or () if "licenses" in str(f)]
    for name in ("LICENSE", "NOTICE"):
        if not any(f.endswith(name) for f in licences):
            fail(f"the wheel's metadata lacks {name} (found: {licences})")
    with tempfile.TemporaryDirectory(prefix="normdino-wheel-") as tmp:
        root = Path(tmp)
        model = tiny_model(root)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        normdino_cli = Path(sys.executable).with_name("normdino")
        server = subprocess.Popen([str(normdino_cli), "serve", str(model), "--port", str(port), "-q"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for _ in range(600):
                if server.poll() is not None:
                    fail(f"normdino serve exited with {server.returncode}: {server.stdout.read()[-2000:]}")
                try:
                    if get(base + "/health")[0] == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            else:
                fail("normdino serve did not answer /health within 60 s")
            status, page, headers = get(base + "/")
            if status != 200 or b"<html" not in page.lower():
                fail(f"GET / answered {status}")
            assets = sorted(set(re.findall(r'(?:src|href)="(/static/[^"]+)"', page.decode())))
            if not assets:
                fail("the viewer page links no /static/ assets")
            for asset in assets:
                status, content, _ = get(base + asset)
                if status != 200 or not content:
                    fail(f"GET {asset} answered {status} ({len(content)} bytes)")
            status, body, _ = get(base + "/models")
            if status != 200 or json.loads(body)["models"][0]["name"] != "tiny":
                fail(f"GET /models answered {status}: {body[:200]!r}")
            image = next((root / "data" / "test").rglob("*.png"))
            status, answer = post_file(base + "/predict", image)
            if status != 200 or "score" not in answer:
                fail(f"POST /predict answered {status}: {answer}")
            for url in answer["files"].values():
                if get(base + url)[0] != 200:
                    fail(f"GET {url} failed")
            print(f"check_wheel: ok: normdino {normdino.__version__} from {installed.parent}; "
                  f"/ and {len(assets)} assets ({', '.join(assets)}), /models, /predict and "
                  f"{len(answer['files'])} result files served")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
