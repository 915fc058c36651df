"""A real uvicorn server: inferences queue per model, /health answers while one runs, a full queue says 503."""

from __future__ import annotations

import threading

import httpx
import pytest

from conftest import LiveServer

from normdino.serving.app import create_app
from normdino.serving.models import load_models
from normdino.serving.settings import ServeSettings


class Gate:
    """Wraps run_prediction: counts concurrent runs and holds each one until released."""

    def __init__(self, real):
        self.real = real
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.active = self.peak = 0

    def __call__(self, *args):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        self.started.release()
        try:
            assert self.release.wait(30)
            return self.real(*args)
        finally:
            with self.lock:
                self.active -= 1


def _wait_for(predicate, timeout=10.0):
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        done.wait(0.01)
    return False


def test_requests_queue_per_model_and_health_stays_responsive(served_model, samples, monkeypatch):
    import normdino.serving.app as app_module

    gate = Gate(app_module.run_prediction)
    monkeypatch.setattr(app_module, "run_prediction", gate)
    app = create_app(load_models([str(served_model)]), ServeSettings(concurrency=1, max_queue=1))
    volume = samples["nifti_gz"].read_bytes()
    results: list[httpx.Response] = []
    with LiveServer(app) as server:
        def send():
            results.append(httpx.post(f"{server.url}/predict", files={"file": ("v", volume)}, timeout=60))

        senders = [threading.Thread(target=send) for _ in range(2)]
        for thread in senders:
            thread.start()
        assert gate.started.acquire(timeout=30)  # the first volume is being processed
        health = httpx.get(f"{server.url}/health", timeout=2)
        assert health.status_code == 200
        assert _wait_for(lambda: httpx.get(f"{server.url}/health", timeout=2).json()["models"]["brain"]
                         == {"running": 1, "waiting": 1})
        third = httpx.post(f"{server.url}/predict", files={"file": ("v", volume)}, timeout=10)
        assert third.status_code == 503 and "busy" in third.json()["error"]
        gate.release.set()
        for thread in senders:
            thread.join(60)
        assert [r.status_code for r in results] == [200, 200]
        assert gate.peak == 1  # one inference at a time on the model
        assert httpx.get(f"{server.url}/health", timeout=2).json()["models"]["brain"] == {"running": 0, "waiting": 0}


@pytest.mark.parametrize("chunked", [False, True])
def test_a_live_upload_over_the_limit_is_refused_without_reading_it_all(served_model, chunked):
    app = create_app(load_models([str(served_model)]), ServeSettings(max_upload_bytes=64 * 1024))
    body = b"\x89PNG\r\n\x1a\n" + bytes(4 * 2**20)
    with LiveServer(app) as server:
        if chunked:  # no Content-Length: counted while it streams in
            form = (b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
                    b"Content-Type: image/png\r\n\r\n" + body + b"\r\n--x--\r\n")

            def stream():
                for start in range(0, len(form), 65536):
                    yield form[start:start + 65536]

            response = httpx.post(f"{server.url}/predict", content=stream(), timeout=30,
                                  headers={"Content-Type": "multipart/form-data; boundary=x"})
        else:
            files = {"file": ("big.png", body)}
            response = httpx.post(f"{server.url}/predict", files=files, timeout=30)
        assert response.status_code == 413, response.text
        assert "limit" in response.json()["error"]
        assert httpx.get(f"{server.url}/health", timeout=2).status_code == 200
