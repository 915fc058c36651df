"""Load test of ``normdino serve``: N concurrent clients on 127.0.0.1 send a fixed number of /predict requests.

    python benchmarks/bench_serve.py                                   # 4 clients, 32 images, ViT-S/14 at 448 px
    python benchmarks/bench_serve.py --clients 8 --requests 64 --volume   # NIfTI volumes instead of PNG slices

Every other request is one of the crafted bad uploads of the issue-21 attack (a deflated-DICOM bomb, a zip of
1144 small members, a 36 MP PNG, a TIFF of 5000 pages, a NaN-geometry NIfTI, a truncated PNG; --no-bad: good
uploads only); each must get a 4xx. The server's temporary folder is its own (TMPDIR), and the files left in
it after the load are reported.

The server runs as its own process (``python -m normdino.cli serve``), as a user would start it, with random
weights of the real architecture: honest for time and memory, meaningless for detection quality (none is
printed). Reported: p50/p95 request latency, throughput, failed requests, /health latency under load, the
server's RSS (after warm-up, peak, after the load and after its results are deleted), against a baseline
measured in the same run: the detector's own predict time per image in a fresh process, without a server.
Uploads are lgg-flair validation slices when ../shared/data is there, generated phantoms otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lgg-flair"


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images_and_model(root: Path, image_size: int, n_train: int) -> tuple[list[Path], Path, list[Path]]:
    """Upload images, a fitted model (random ViT-S/14 weights) and healthy images for the baseline."""
    from normdino import AnomalyDetector

    if (DATA / "train" / "good").is_dir():
        train = sorted((DATA / "train" / "good").glob("*.png"))[:n_train]
        val = sorted((DATA / "valid" / "good" / "img").glob("*.png"))[:4]
        uploads = sorted((DATA / "valid" / "Ungood" / "img").glob("*.png"))[:16]
    else:
        from normdino.io.phantoms import write_phantom_dataset

        data = write_phantom_dataset(root / "phantoms", n_train=n_train, n_valid=8, n_test_normal=4,
                                     n_test_anomalous=12, size=256, seed=0)
        train = sorted((data / "train" / "good").glob("*.png"))
        val = sorted((data / "valid" / "good" / "img").glob("*.png"))
        uploads = sorted((data / "test" / "Ungood" / "img").glob("*.png"))
    detector = AnomalyDetector(backbone="random", image_size=image_size, n_components=100, epochs=1,
                               progress=False, seed=0)
    detector.fit(train, val)
    return uploads, detector.save(root / "bench.normdino"), val


def volume_upload(root: Path, slices: list[Path]) -> Path:
    """A NIfTI volume stacked from the upload slices (as a scan would arrive)."""
    import nibabel as nib

    from normdino.io.reading import read_image

    volume = np.stack([read_image(p) for p in slices], axis=2)
    path = root / "volume.nii.gz"
    nib.save(nib.Nifti1Image((volume * 255).astype(np.uint8), np.diag([0.9, 0.9, 3.0, 1.0])), path)
    return path


def deflated_dicom_zip(pixel_bytes: int) -> bytes:
    """A stored zip of one DICOM file in the deflated transfer syntax: a few hundred KB inflating to ``pixel_bytes``."""
    import io
    import struct
    import zipfile
    import zlib

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Rows, ds.Columns = CTImageStorage, meta.MediaStorageSOPInstanceUID, 64, 64
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [out.getvalue(), deflate.compress(body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes))]
    parts += [deflate.compress(bytes(2**20)) for _ in range(pixel_bytes // 2**20)] + [deflate.flush()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("IM0001.dcm", b"".join(parts))
    return buffer.getvalue()


def bad_uploads() -> dict[str, bytes]:
    """The crafted uploads of the issue-21 attack: each must get a 4xx sentence, quickly, and leave nothing."""
    import io
    import struct
    import zipfile

    import nibabel as nib
    from PIL import Image

    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    members = io.BytesIO()
    with zipfile.ZipFile(members, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(1144):
            zf.writestr(f"{k:05d}.dcm", bytes(2**20))
    tiff = io.BytesIO()
    pages = [Image.new("L", (1, 1)) for _ in range(5000)]
    pages[0].save(tiff, format="TIFF", save_all=True, append_images=pages[1:])
    image = nib.Nifti1Image(np.ones((32, 32, 4), np.int16), np.eye(4))
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=0)
    nifti = bytearray(image.to_bytes())
    struct.pack_into("<f", nifti, 80, float("nan"))  # pixdim[1]
    return {"deflated DICOM (400 MB inflated)": deflated_dicom_zip(400 * 2**20),
            "zip of 1144 x 1 MiB members": members.getvalue(),
            "36 MP PNG": png(np.zeros((6000, 6000), np.uint8)),
            "TIFF of 5000 pages": tiff.getvalue(),
            "NaN-pixdim NIfTI": bytes(nifti),
            "truncated PNG": png(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8))[:20000]}


def temp_files(folder: Path) -> int:
    """Files the server left in its temporary folder (its lock file not counted)."""
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".lock"))


def in_thread(function, *args):
    """Run ``function(*args)`` in a worker thread, as the server runs inference, and return its result.

    On an oversubscribed machine, torch's OpenMP team in the main thread spins at its barriers and runs a
    ViT forward several times slower than in a worker thread; the set-up and the baseline avoid that.
    """
    out: list = []
    worker = threading.Thread(target=lambda: out.append(function(*args)))
    worker.start()
    worker.join()
    if not out:
        raise SystemExit(f"{function.__name__} failed")
    return out[0]


def direct_seconds_per_image(model: Path, images: list[Path], repeats: int) -> float:
    """Baseline: the detector's predict on one image at a time, no HTTP and no files, in a fresh process
    (like the server's: a process that has just fitted a model runs inference measurably slower)."""
    code = ("import sys, time, threading\n"
            "from normdino import AnomalyDetector\n"
            "def run(out):\n"
            "    det = AnomalyDetector.load(sys.argv[1], progress=False)\n"
            "    paths, n = sys.argv[3:], int(sys.argv[2])\n"
            "    det.predict([paths[0]])\n"
            "    t = time.perf_counter()\n"
            "    for i in range(n):\n"
            "        det.predict([paths[i % len(paths)]])\n"
            "    out.append((time.perf_counter() - t) / n)\n"
            "out = []\n"
            "worker = threading.Thread(target=run, args=(out,)); worker.start(); worker.join()\n"
            "print(out[0])\n")
    result = subprocess.run([sys.executable, "-c", code, str(model), str(repeats), *map(str, images)],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def start_server(model: Path, port: int, concurrency: int, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp)}
    process = subprocess.Popen([sys.executable, "-m", "normdino.cli", "serve", str(model), "--port", str(port),
                                "--concurrency", str(concurrency), "--max-queue", "1000", "-q"], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit("the server exited during start-up")
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not start within 120 s")


def run_load(url: str, payloads: list[bytes], clients: int, requests: int) -> dict:
    """``clients`` threads send ``requests`` uploads in total; latencies, statuses, result ids and /health times."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: list[int] = []
    ids: list[str] = []
    health: list[float] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=600) as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                started = time.perf_counter()
                name, payload = payloads[i % len(payloads)]
                response = session.post(f"{url}/predict", files={"file": ("upload", payload)})
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    statuses.append((name, response.status_code, elapsed))
                    if response.status_code == 200:
                        ids.append(response.json()["id"])

    def poll_health() -> None:
        with httpx.Client(timeout=30) as session:
            while not stop.wait(0.2):
                started = time.perf_counter()
                session.get(f"{url}/health")
                health.append(time.perf_counter() - started)

    poller = threading.Thread(target=poll_health)
    poller.start()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    stop.set()
    poller.join()
    return {"latencies": latencies, "statuses": statuses, "ids": ids, "health": health, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--concurrency", type=int, default=1, help="server inferences at once (default 1)")
    parser.add_argument("--volume", action="store_true", help="upload NIfTI volumes of 8 slices instead of PNGs")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--no-bad", action="store_true", help="good uploads only (default: every other request "
                        "is one of the crafted bad uploads of the issue-21 attack)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        uploads, model, _ = in_thread(images_and_model, root, args.image_size, 8)
        images_per_request = 8 if args.volume else 1
        good = [volume_upload(root, uploads[:8]).read_bytes()] if args.volume else [p.read_bytes() for p in uploads]
        bad = {} if args.no_bad else bad_uploads()
        payloads = [("good", g) for g in good]
        if bad:  # every other request is a bad one
            bad_items = list(bad.items())
            payloads = [item for k in range(max(len(good), len(bad_items)))
                        for item in (("good", good[k % len(good)]), bad_items[k % len(bad_items)])]
        direct_before = direct_seconds_per_image(model, uploads, 6)

        port = free_port()
        server_tmp = root / "server-tmp"
        server_tmp.mkdir()
        server = start_server(model, port, args.concurrency, server_tmp)
        url = f"http://127.0.0.1:{port}"
        try:
            warm = httpx.post(f"{url}/predict", files={"file": ("upload", good[0])}, timeout=600)
            assert warm.status_code == 200, warm.text
            httpx.delete(f"{url}/results/{warm.json()['id']}")
            baseline_rss, _ = rss_mb(server.pid)
            load = run_load(url, payloads, args.clients, args.requests)
            after_rss, peak_rss = rss_mb(server.pid)
            for result_id in load["ids"]:
                httpx.delete(f"{url}/results/{result_id}")
            time.sleep(1.0)  # let the server settle before reading its memory again
            cleaned_rss, _ = rss_mb(server.pid)
            left = httpx.get(f"{url}/health").json()["results"]
            files_left = temp_files(server_tmp)
        finally:
            server.terminate()
            server.wait(30)
        # The machine is shared: measure the baseline again after the load and use the mean of both.
        direct_after = direct_seconds_per_image(model, uploads, 6)
        direct = (direct_before + direct_after) / 2

    lat = [t for name, _, t in load["statuses"] if name == "good"]
    failed = sum(status != 200 for name, status, _ in load["statuses"] if name == "good")
    bad_rows = {}
    for name, status, elapsed in load["statuses"]:
        if name != "good":
            row = bad_rows.setdefault(name, {"statuses": [], "max_s": 0.0})
            row["statuses"].append(status)
            row["max_s"] = max(row["max_s"], elapsed)
    bad_failed = sum(not 400 <= s < 500 for row in bad_rows.values() for s in row["statuses"])
    figures = {
        "clients": args.clients, "requests": args.requests, "upload": "NIfTI volume, 8 slices" if args.volume else
        "PNG slice", "image_size": args.image_size, "server_concurrency": args.concurrency,
        "failed_requests": failed, "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
        "throughput_requests_per_s": len(lat) / load["wall"],
        "throughput_images_per_s": len(lat) * images_per_request / load["wall"],
        "baseline_direct_predict_s_per_image": direct, "baseline_before_s": direct_before,
        "baseline_after_s": direct_after,
        "server_seconds_per_image_over_baseline": (load["wall"] / (len(lat) * images_per_request)) / direct,
        "health_p50_ms": 1000 * percentile(load["health"], 50), "health_p95_ms": 1000 * percentile(load["health"], 95),
        "health_max_ms": 1000 * max(load["health"], default=float("nan")),
        "rss_after_warmup_mb": baseline_rss, "rss_peak_mb": peak_rss, "rss_after_load_mb": after_rss,
        "rss_after_results_deleted_mb": cleaned_rss, "results_left": left, "temp_files_left": files_left,
        "bad_uploads": bad_rows, "bad_uploads_not_4xx": bad_failed,
    }
    print(f"{args.clients} clients, {args.requests} requests, {len(lat)} good ({figures['upload']}, ViT-S/14 random weights at "
          f"{args.image_size} px, server concurrency {args.concurrency}); failed requests: {failed}")
    print(f"  latency p50 {figures['latency_p50_s']:.2f} s   p95 {figures['latency_p95_s']:.2f} s   "
          f"throughput {figures['throughput_requests_per_s']:.2f} req/s "
          f"({figures['throughput_images_per_s']:.2f} img/s)")
    print(f"  baseline: direct predict {direct * 1000:.0f} ms/image in a fresh process (before the load "
          f"{direct_before * 1000:.0f}, after {direct_after * 1000:.0f}); through the server "
          f"{figures['server_seconds_per_image_over_baseline']:.2f}x that per image")
    print(f"  /health under load: p50 {figures['health_p50_ms']:.1f} ms   p95 {figures['health_p95_ms']:.1f} ms   "
          f"max {figures['health_max_ms']:.1f} ms ({len(load['health'])} probes)")
    print(f"  server RSS: after warm-up {baseline_rss:.0f} MB, peak {peak_rss:.0f} MB, after load {after_rss:.0f} MB, "
          f"after deleting results {cleaned_rss:.0f} MB; results left {left}; temp files left {files_left}")
    for name, row in bad_rows.items():
        print(f"  bad upload {name}: statuses {sorted(set(row['statuses']))} x{len(row['statuses'])}, "
              f"slowest {row['max_s']:.2f} s")
    if bad_rows:
        print(f"  bad uploads answered other than 4xx: {bad_failed}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
