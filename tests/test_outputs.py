"""What predict leaves on disk: unique traceable names, no lost results, skipped bad inputs with their reason,
an index.html to browse, colour ranges for scores of any sign, and bounded memory per pixel (issue 11)."""

import csv
import dataclasses
import json
import shutil
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from normdino.cli import main
from normdino.errors import InputError, OutputError
from normdino.io import rendering
from normdino.io.phantoms import write_phantom_dataset
from normdino.io.results_folder import BYTES_PER_PIXEL, check_image_sizes, output_names, prepare_results_folder
from normdino.io.writing import FIXED_BYTES, PredictionWriter


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("out-data"), n_train=8, n_valid=6,
                                 n_test_normal=2, n_test_anomalous=2, size=48, seed=3)


@pytest.fixture(scope="module")
def model(data, tiny_dinov2_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("out-model") / "model.normdino"
    assert main(["fit", str(data / "train" / "good"), "-o", str(path), "--val", str(data / "valid" / "good" / "img"),
                 "--backbone", str(tiny_dinov2_dir), "--image-size", "56", "--epochs", "1", "--components", "8",
                 "--no-cache", "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def detector(model):
    from normdino.detector import AnomalyDetector

    return AnomalyDetector.load(model, progress=False)


def _rows(folder):
    with (folder / "scores.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _test_images(data):
    return sorted((data / "test" / "good" / "img").glob("*.png")) + sorted((data / "test" / "Ungood" / "img").glob("*.png"))


# ---------------------------------------------------------------------- names


def test_output_names_are_unique_and_traceable(tmp_path):
    paths = [tmp_path / "scan" / "img.png", tmp_path / "scan" / "img.jpg", tmp_path / "a" / "x" / "img.png",
             tmp_path / "b" / "x" / "img.png", tmp_path / "p1" / "flair.nii.gz", tmp_path / "p2" / "flair.nii.gz",
             tmp_path / "solo.png"]
    names = output_names(paths)
    assert names == ["img_png", "img_jpg", "a__x__img", "b__x__img", "p1__flair", "p2__flair", "solo"]
    # case-insensitive disks: A and a collide, so both get their folder
    assert output_names([tmp_path / "A.png", tmp_path / "sub" / "a.png"]) == [f"{tmp_path.name}__A", "sub__a"]
    assert output_names([tmp_path / "d" / "solo.png"], taken=["solo"]) == ["d__solo"]


def test_colliding_images_keep_every_output_and_record_their_input(detector, data, tmp_path):
    source = _test_images(data)
    inputs = []
    for folder, src, suffix in (("a/x", source[0], ".png"), ("b/x", source[1], ".png"), ("scan", source[2], ".png"),
                                ("scan", source[3], ".jpg")):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        target = tmp_path / folder / f"img{suffix}"
        Image.open(src).convert("L").save(target)
        inputs.append(target)
    writer = PredictionWriter(detector, tmp_path / "out", progress=False)
    writer.write_images(inputs)
    writer.finish()
    rows = _rows(tmp_path / "out")
    assert [r["input"] for r in rows] == [str(p) for p in inputs]
    maps = [r["anomaly_map"] for r in rows]
    assert len(set(maps)) == 4 and all((tmp_path / "out" / m).is_file() for m in maps)
    for row, path in zip(rows, inputs):  # each map is its own input's: compare with a direct prediction
        expected = detector.predict([path])[0].pixel_map
        np.testing.assert_allclose(np.load(tmp_path / "out" / row["anomaly_npy"]), expected, atol=1e-6)


def test_volumes_with_one_file_name_get_distinct_outputs(detector, tmp_path):
    nib = pytest.importorskip("nibabel")
    from normdino.io.slicing import SliceOptions

    rng = np.random.default_rng(0)
    paths = []
    for patient in ("p1", "p2"):
        (tmp_path / patient).mkdir()
        paths.append(tmp_path / patient / "flair.nii.gz")
        nib.save(nib.Nifti1Image((rng.random((40, 40, 4)) * 1000).astype(np.int16), np.eye(4)), paths[-1])
    writer = PredictionWriter(detector, tmp_path / "out", progress=False)
    writer.assign_names(paths)
    for path in paths:
        writer.write_volume(path, SliceOptions())
    writer.finish()
    rows = _rows(tmp_path / "out")
    assert [r["anomaly_map"] for r in rows] == ["p1__flair_anomaly.nii.gz", "p2__flair_anomaly.nii.gz"]
    assert [r["input"] for r in rows] == [str(p) for p in paths]
    strip = Image.open(tmp_path / "out" / rows[0]["top_slices"])  # a strip of the top-scoring slices
    assert strip.mode == "RGB" and strip.width > strip.height
    maps = [np.asarray(nib.load(tmp_path / "out" / r["anomaly_map"]).dataobj) for r in rows]
    assert not np.allclose(maps[0], maps[1])


# ---------------------------------------------------------------------- never lose results


def test_a_second_predict_into_the_same_folder_is_refused_without_overwrite(model, data, tmp_path, capsys):
    out = tmp_path / "results"
    test = data / "test"
    assert main(["predict", str(model), str(test / "Ungood" / "img"), "-o", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["predict", str(model), str(test / "good" / "img"), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "already holds" in err and "--overwrite" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    assert main(["predict", str(model), str(test / "good" / "img"), "-o", str(out), "--overwrite", "--quiet"]) == 0
    rows = _rows(out)
    listed = {r[c] for r in rows for c in ("anomaly_map", "anomaly_npy", "mask", "overlay") if r[c]}
    left = {p.name for p in out.iterdir()} - listed - {"scores.csv", "summary.json", "index.html"}
    assert left == {"notes.txt"}  # the earlier run's maps are gone (no orphans), the user's file is kept
    assert [r["input"] for r in rows] == [str(p) for p in sorted((test / "good" / "img").glob("*.png"))]


def test_writer_refuses_a_folder_holding_files(detector, tmp_path):
    (tmp_path / "scores.csv").write_text("input\n")
    with pytest.raises(OutputError, match="already holds 1 files from an earlier predict"):
        PredictionWriter(detector, tmp_path, progress=False)


# ---------------------------------------------------------------------- bad inputs


def _folder_with_a_bad_file(data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, src in enumerate(_test_images(data)):
        shutil.copy(src, folder / f"{i}_{'b' if i == 1 else 'ok'}.png")
    whole = (folder / "1_b.png").read_bytes()
    (folder / "1_b.png").write_bytes(whole[: len(whole) // 2])  # a readable header, truncated pixels, in the middle
    return folder


def test_a_bad_file_in_the_middle_is_skipped_with_a_row(model, data, tmp_path, capsys):
    folder = _folder_with_a_bad_file(data, tmp_path)
    out = tmp_path / "out"
    assert main(["predict", str(model), str(folder), "-o", str(out), "--batch-size", "2"]) == 0
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["ok", "skipped", "ok", "ok"]
    assert "1_b.png" in rows[1]["message"] and rows[1]["anomaly_map"] == ""
    assert not list(out.glob("1_b_*"))
    assert "skipped" in capsys.readouterr().err
    for row in rows:
        if row["status"] == "ok":
            assert all((out / row[c]).is_file() for c in ("anomaly_map", "anomaly_npy", "mask", "overlay"))


def test_strict_stops_at_the_first_bad_file_and_keeps_the_rows_before(model, data, tmp_path, capsys):
    folder = _folder_with_a_bad_file(data, tmp_path)
    out = tmp_path / "out"
    assert main(["predict", str(model), str(folder), "-o", str(out), "--strict", "--batch-size", "1"]) == 1
    err = capsys.readouterr().err
    assert "--strict" in err and "1_b.png" in err and "Traceback" not in err
    error_line = next(line for line in err.splitlines() if "error:" in line)
    assert error_line.startswith("normdino predict: error:")  # not printed on a progress bar's line
    assert err.rstrip().endswith(error_line.split("\r")[-1].rstrip())  # and no bar redrawn after it
    rows = _rows(out)
    assert [r["input"] for r in rows] == [str(folder / "0_ok.png")]
    written = {p.name for p in out.iterdir()} - {"scores.csv", "summary.json", "index.html"}
    assert written == {rows[0][c] for c in ("anomaly_map", "anomaly_npy", "mask", "overlay")}


def test_an_input_that_fails_half_written_leaves_no_orphans(detector, data, tmp_path, monkeypatch):
    images = _test_images(data)
    real = rendering.overlay_image
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError
        return real(*args, **kwargs)

    monkeypatch.setattr(rendering, "overlay_image", fail_second)
    writer = PredictionWriter(detector, tmp_path / "out", progress=False)
    writer.write_images(images)
    writer.finish()
    rows = _rows(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok", "skipped", "ok", "ok"]
    assert "memory" in rows[1]["message"]
    assert not list((tmp_path / "out").glob(f"{images[1].stem}_*"))  # its map, .npy and mask were removed


def test_a_batch_short_of_memory_is_predicted_image_by_image(detector, data, tmp_path, monkeypatch):
    """The model runs out of memory on the batch of 4 and on the third image alone: that image gets a skipped
    row saying so, and the others get their maps, equal to predicting each alone."""
    import torch

    images = _test_images(data)
    expected = {p.name: detector.predict([p])[0].pixel_map for p in images}
    real = detector._embed
    poisoned = detector.backbone_.preprocess(np.asarray(Image.open(images[2]), dtype=np.float32) / 255.0)

    def short_of_memory(pixels):
        if len(pixels) > 1 or torch.equal(pixels[0], poisoned):
            raise MemoryError
        return real(pixels)

    monkeypatch.setattr(detector, "_embed", short_of_memory)
    monkeypatch.setattr(detector, "batch_size", 4)
    writer = PredictionWriter(detector, tmp_path / "out", progress=False)
    writer.write_images(images)
    writer.finish()
    rows = _rows(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "ok"]
    assert "memory" in rows[2]["message"] and not list((tmp_path / "out").glob(f"{images[2].stem}_*"))
    for path, row in zip(images, rows):
        if row["status"] == "ok":
            np.testing.assert_array_equal(np.load(tmp_path / "out" / row["anomaly_npy"]), expected[path.name])


def test_images_held_ahead_of_the_model_stay_within_stream_pixels(detector, data, tmp_path, monkeypatch):
    """The CLI's stream through the detector ends every STREAM_PIXELS: at most that many pixels, the next two
    batches read ahead and the writes in flight are between reading and settling, never the whole folder; the
    rows and maps are those of one stream over everything."""
    import normdino.io.writing as writing

    folder = tmp_path / "in"
    folder.mkdir()
    sources = _test_images(data)
    for k in range(40):
        shutil.copy(sources[k % len(sources)], folder / f"{k:02d}.png")
    images = sorted(folder.glob("*.png"))
    pixels = int(np.prod(Image.open(images[0]).size))
    monkeypatch.setattr(detector, "batch_size", 2)
    real_read = writing._read_or_error
    counts = {"read": 0, "settled": 0, "most": 0}

    def counting_read(path):
        counts["read"] += 1
        counts["most"] = max(counts["most"], counts["read"] - counts["settled"])
        return real_read(path)

    def settled(*_):
        counts["settled"] += 1

    monkeypatch.setattr(writing, "_read_or_error", counting_read)
    outputs = {}
    for name, stream_pixels in (("whole", 10**9), ("segments", 2 * pixels)):
        monkeypatch.setattr(writing, "STREAM_PIXELS", stream_pixels)
        counts.update(read=0, settled=0, most=0)
        writer = PredictionWriter(detector, tmp_path / name, progress=False)
        writer.write_images(images, on_image=settled)
        writer.finish()
        outputs[name] = (_rows(tmp_path / name), counts["most"])
    (whole, most_whole), (segments, most_segments) = outputs["whole"], outputs["segments"]
    in_flight = 2  # writes: 2 x one writer thread beside a CPU model
    assert most_segments <= 2 + 2 * 2 + in_flight < most_whole  # one batch's pixels, two batches read ahead
    assert [r["input"] for r in segments] == [str(p) for p in images] and len(whole) == len(segments) == 40
    for a, b in zip(whole, segments):
        assert a["score"] == b["score"]
        np.testing.assert_array_equal(np.load(tmp_path / "whole" / a["anomaly_npy"]),
                                      np.load(tmp_path / "segments" / b["anomaly_npy"]))


@pytest.mark.parametrize("writers", [1, 4])
def test_disk_full_during_predict_is_one_sentence(model, data, tmp_path, monkeypatch, capsys, writers):
    import errno
    import threading

    import normdino.io.writing as writing

    monkeypatch.setattr(writing, "default_workers", lambda device="cpu": writers)  # 4: as beside a GPU
    real = rendering.save_png
    calls, lock = [], threading.Lock()

    def full_disk(path, array):
        with lock:
            calls.append(path)
            fail = len(calls) >= 4
        if fail:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, array)

    monkeypatch.setattr(rendering, "save_png", full_disk)
    out = tmp_path / "out"
    assert main(["predict", str(model), str(data / "test" / "Ungood" / "img"), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    rows = _rows(out)
    listed = {r[c] for r in rows for c in ("anomaly_map", "anomaly_npy", "mask", "overlay")}
    outputs = {p.name for p in out.iterdir()} - {"scores.csv", "summary.json", "index.html"}
    assert outputs <= listed  # nothing half-written: every file left belongs to a listed input
    if writers == 1:  # serially, the first image (mask + overlay = 2 PNGs) is complete and listed; the second removed
        assert len(rows) == 1 and {p.name for p in out.glob("*_anomaly.npy")} == {rows[0]["anomaly_npy"]}
    else:  # in threads, at most the first image finished
        assert len(rows) <= 1


# ---------------------------------------------------------------------- what a person browses


def test_index_html_shows_every_input_and_the_random_weights_flag(model, data, tmp_path):
    folder = _folder_with_a_bad_file(data, tmp_path)
    out = tmp_path / "out"
    assert main(["predict", str(model), str(folder), "-o", str(out), "--quiet"]) == 0
    rows = _rows(out)
    page = (out / "index.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    for row in rows:
        assert row["input"] in page and row["random_weights"] == "1"
        if row["status"] == "ok":
            assert f'src="{row["overlay"]}"' in page and f"{float(row['score']):.4f}" in page
    assert "RANDOM weights" in page and summary["random_weights"] is True and "RANDOM" in summary["warning"]
    assert page.count(">anomalous<") == sum(r["anomalous"] == "1" for r in rows)
    assert page.count(">skipped<") == 1 and summary["n_skipped"] == 1 and summary["n_written"] == 3
    assert "Image score" in page and "Anomalous area" in page and "overflow-x:auto" in page
    ok = [r for r in rows if r["status"] == "ok"]  # most anomalous first
    positions = [page.index(f'src="{r["overlay"]}"') for r in sorted(ok, key=lambda r: -float(r["score"]))]
    assert positions == sorted(positions)


# ---------------------------------------------------------------------- scores of any sign


class _NegativeScores:
    """A detector whose scores and thresholds are all shifted below zero, as a likelihood score is at D=384."""

    method_ = SimpleNamespace(score_range=None)  # unbounded scores, as a likelihood's
    score = "likelihood"  # what the pre-method-interface writer looked at

    def __init__(self, detector, shift=-100.0):
        self._detector, self._shift = detector, shift

    def __getattr__(self, name):
        return getattr(self._detector, name)

    def pixel_threshold(self, fpr):
        return self._detector.pixel_threshold(fpr) + self._shift

    def image_threshold(self, fpr):
        return self._detector.image_threshold(fpr) + self._shift

    def _shifted(self, p):
        return dataclasses.replace(p, pixel_map=p.pixel_map + np.float32(self._shift), score=p.score + self._shift,
                                   threshold=p.threshold + self._shift)

    def predict(self, images, fpr=None):
        return [self._shifted(p) for p in self._detector.predict(images, fpr=fpr)]

    def predict_batches(self, batches, fpr=None, retry=True):
        for outcomes in self._detector.predict_batches(batches, fpr=fpr, retry=retry):
            yield [self._shifted(p) for p in outcomes]


def test_negative_scores_get_a_valid_colour_range_and_exact_png_maps(detector, data, tmp_path):
    writer = PredictionWriter(_NegativeScores(detector), tmp_path / "out", progress=False)
    writer.write_images(_test_images(data))
    writer.finish()
    assert writer.vmin < writer.vmax < 0
    for row in _rows(tmp_path / "out"):
        exact = np.load(tmp_path / "out" / row["anomaly_npy"])
        decoded, lo, hi = rendering.read_map_png16(tmp_path / "out" / row["anomaly_map"])
        assert lo < exact.min() and exact.max() < hi  # the 16-bit map keeps negative scores unclipped
        np.testing.assert_allclose(decoded, exact, atol=(hi - lo) / 65535)


@pytest.mark.parametrize("typical, high", [(-5.0, -4.0), (-5.0, -6.0), (0.2, 0.2), (3.0, 10.0)])
def test_score_color_range_works_for_any_sign(typical, high):
    vmin, vmax = rendering.score_color_range(typical, high)
    assert vmin == typical and vmax > vmin and vmax == max(high, vmax)


# ---------------------------------------------------------------------- memory


def test_an_image_above_the_megapixel_limit_is_refused_before_the_model_loads(model, data, tmp_path, capsys,
                                                                              monkeypatch):
    from normdino.detector import AnomalyDetector

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load before the inputs are checked")

    monkeypatch.setattr(AnomalyDetector, "load", no_load)
    image = data / "test" / "good" / "img"
    out = tmp_path / "out"
    assert main(["predict", str(model), str(image), "-o", str(out), "--max-megapixels", "0.001", "--strict"]) == 1
    err = capsys.readouterr().err
    assert "megapixels" in err and "above the limit of 0.001" in err and "bytes per pixel" in err
    assert not out.exists()


def test_image_sizes_come_from_headers_and_name_the_limit(data, tmp_path):
    images = _test_images(data)
    sizes = check_image_sizes(images, max_megapixels=0.001)
    assert all(isinstance(v, str) and "0.0 megapixels" not in v and "48x48" in v for v in sizes.values())
    assert check_image_sizes(images) == {p: (48, 48) for p in images}
    with pytest.raises(InputError, match="above the limit"):
        check_image_sizes(images, max_megapixels=0.001, strict=True)


class _FullSizeMaps:
    """A detector stand-in whose prediction is a full-size random map, so only reading and writing are measured."""

    def __init__(self, detector):
        self._detector = detector

    def __getattr__(self, name):
        return getattr(self._detector, name)

    def predict(self, images, fpr=None):
        template = self._detector.predict([np.zeros((28, 28), np.float32)], fpr=fpr)[0]
        preds = []
        for image in images:
            pixel_map = np.random.default_rng(0).random(image.shape[:2], dtype=np.float32) * 0.5
            preds.append(dataclasses.replace(template, pixel_map=pixel_map, mask=pixel_map > template.threshold,
                                             score=float(pixel_map.max())))
        return preds

    def predict_batches(self, batches, fpr=None, retry=True):
        for images in batches:
            yield self.predict(images, fpr=fpr)


def _numpy_peak_of_predicting(detector, folder, size):
    path = folder / f"big{size}.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    writer = PredictionWriter(_FullSizeMaps(detector), folder / f"out{size}", progress=False)
    tracemalloc.start()
    try:
        writer.write_images([path])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert _rows(folder / f"out{size}")[0]["status"] == "ok"
    return peak


def test_predicting_a_large_image_stays_within_the_stated_bytes_per_pixel(detector, tmp_path):
    """Read + map + mask + every output; the old full-size float64 overlay alone grew by ~150 B per pixel."""
    small, large = 1000, 2000
    peak_small = _numpy_peak_of_predicting(detector, tmp_path, small)
    peak_large = _numpy_peak_of_predicting(detector, tmp_path, large)
    per_pixel = (peak_large - peak_small) / (large**2 - small**2)
    assert per_pixel < BYTES_PER_PIXEL / 2  # numpy's share; scoring (torch) fits in the other half
    assert peak_small < BYTES_PER_PIXEL / 2 * small**2 + FIXED_BYTES  # the overlay is drawn at a bounded size


def test_results_folder_checks_need_no_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="lies under the file"):
        prepare_results_folder(tmp_path / "file" / "out")
    with pytest.raises(OutputError, match="is a file"):
        prepare_results_folder(tmp_path / "file")
    with pytest.raises(OutputError, match="not writable"):
        prepare_results_folder("/proc/normdino-results")
    prepare_results_folder(tmp_path / "new" / "deeper", check_only=True)
    assert not (tmp_path / "new").exists()  # checking creates nothing


# ---------------------------------------------------------------------- report tables


def test_report_tables_have_human_headers_one_number_format_per_column_and_never_overflow():
    import xml.etree.ElementTree as ET

    from normdino.io.report import html_table

    rows = [{"method": "dpmm", "pixel_auroc": 0.9, "ms_per_sample": 12.3456, "setting": "x"},
            {"method": "anomalydino", "pixel_auroc": 0.91234, "ms_per_sample": 7.0,
             "setting": "/a/very/long/path/to/a/data/set/that/would/run/off/the/page/train/good"}]
    table = html_table(rows, list(rows[0]), headers={"pixel_auroc": "AUROC", "ms_per_sample": "ms/sample"})
    root = ET.fromstring(table)
    assert root.tag == "div" and root.get("class") == "table-wrap"  # scrolls sideways instead of overflowing
    assert [th.text for th in root.iter("th")] == ["method", "AUROC", "ms/sample", "setting"]
    cells = [[td.text for td in tr.iter("td")] for tr in root.iter("tr")][1:]
    assert [c[1] for c in cells] == ["0.9000", "0.9123"] and [c[2] for c in cells] == ["12.35", "7.00"]
    wrapped = [td for td in root.iter("td") if td.get("class") == "wrap"]
    assert [td.text for td in wrapped] == [rows[1]["setting"]]



# ---------------------------------------------------------------------- threads around the model


@pytest.fixture
def four_writers(monkeypatch):
    """Four reader/writer threads, as beside a GPU (a CPU model gets one)."""
    import normdino.io.writing as writing

    monkeypatch.setattr(writing, "default_workers", lambda device="cpu": 4)


def test_writer_threads_give_the_serial_rows_in_input_order(model, data, tmp_path, monkeypatch):
    folder = _folder_with_a_bad_file(data, tmp_path)
    for extra in _test_images(data):
        (folder / f"9_{extra.name}").write_bytes(extra.read_bytes())
    assert main(["predict", str(model), str(folder), "-o", str(tmp_path / "serial"), "--batch-size", "2", "-q"]) == 0
    import normdino.io.writing as writing

    monkeypatch.setattr(writing, "default_workers", lambda device="cpu": 4)
    assert main(["predict", str(model), str(folder), "-o", str(tmp_path / "threads"), "--batch-size", "2", "-q"]) == 0
    serial, threads = _rows(tmp_path / "serial"), _rows(tmp_path / "threads")
    assert len(serial) == 8 and [r["status"] for r in serial].count("skipped") == 1
    assert threads == serial
    for name in {r["anomaly_npy"] for r in serial} - {""}:
        np.testing.assert_array_equal(np.load(tmp_path / "threads" / name), np.load(tmp_path / "serial" / name))


def test_an_unwritable_scores_csv_stops_with_one_sentence_and_removes_that_inputs_files(detector, data, tmp_path,
                                                                                       monkeypatch, four_writers):
    import errno

    from normdino.errors import OutputError

    images = _test_images(data)
    writer = PredictionWriter(detector, tmp_path / "out", progress=False)
    real = PredictionWriter._append

    def full_after_two(self, row):
        if len(self.rows) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.csv_path))
        real(self, row)

    monkeypatch.setattr(PredictionWriter, "_append", full_after_two)
    with pytest.raises(OutputError, match=r"cannot write .*scores.csv: the disk holding .* is full \(No space left on device\)"):
        writer.write_images(images)
    rows = _rows(tmp_path / "out")
    assert [r["input"] for r in rows] == [str(p) for p in images[:2]]
    listed = {r[c] for r in rows for c in ("anomaly_map", "anomaly_npy", "mask", "overlay")}
    assert {p.name for p in (tmp_path / "out").iterdir()} - {"scores.csv"} == listed


# ---------------------------------------------------------------------- early stops are marked (issue 21)
def _stop_after_two_rows(monkeypatch, stop):
    """Call ``stop()`` in the main thread as the third input's row is about to be recorded."""
    real = PredictionWriter._append

    def append(self, row):
        if len(self.rows) == 2:
            stop()
        real(self, row)

    monkeypatch.setattr(PredictionWriter, "_append", append)


def _assert_partial_and_clean(out, reason):
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and reason in summary["stopped"]
    rows = _rows(out)
    assert summary["n_inputs"] == len(rows) == 2
    listed = {r[c] for r in rows for c in ("anomaly_map", "anomaly_npy", "mask", "overlay")}
    left = {p.name for p in out.iterdir()} - {"scores.csv", "summary.json", "index.html"}
    assert left == listed  # no map without its row, and no hidden .tmp
    assert (out / "index.html").is_file()


@pytest.mark.parametrize("signal_name, code, reason", [("SIGTERM", 143, "stopped by SIGTERM"),
                                                       ("SIGINT", 130, "interrupted (SIGINT")])
def test_a_signal_during_predict_leaves_a_summary_marked_partial(signal_name, code, reason, model, data, tmp_path,
                                                                 monkeypatch, capsys):
    import os
    import signal

    _stop_after_two_rows(monkeypatch, lambda: os.kill(os.getpid(), getattr(signal, signal_name)))
    # Ctrl-C as an interactive shell gives it: a process started in the background of a script inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "out"
    try:
        assert main(["predict", str(model), *map(str, _test_images(data)), "-o", str(out), "-q"]) == code
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    assert capsys.readouterr().err.strip().splitlines()[-1] in ("normdino: stopped by SIGTERM", "normdino: interrupted")
    _assert_partial_and_clean(out, reason)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handler is gone after the run


def test_a_full_disk_is_named_and_the_summary_marked_partial(model, data, tmp_path, monkeypatch, capsys):
    import numpy as np

    real = np.save
    calls = []

    def short_write(file, array, *args, **kwargs):  # what numpy says when the disk fills under it
        calls.append(file)
        if len(calls) > 2:
            raise OSError("65536 requested and 23520 written")
        return real(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", short_write)
    import normdino.io.writing as writing

    monkeypatch.setattr(writing, "default_workers", lambda device="cpu": 1)
    out = tmp_path / "out"
    assert main(["predict", str(model), *map(str, _test_images(data)), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the disk holding {out} is full (65536 requested and 23520 written)" in err[0]
    _assert_partial_and_clean(out, "is full")


def test_a_complete_run_says_so(model, data, tmp_path):
    import json

    assert main(["predict", str(model), *map(str, _test_images(data)), "-o", str(tmp_path / "out"), "-q"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] is True and summary["stopped"] is None


def _tree_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("threads", [1, 4])
def test_writer_processes_write_the_serial_bytes_and_rows_in_input_order(detector, data, tmp_path, monkeypatch,
                                                                         threads):
    """Files encoded in worker processes (as beside a GPU) are byte for byte the serial run's, and scores.csv lists
    the same rows in input order, the unreadable file in the middle included (issue 22)."""
    import normdino.io.writing as writing

    folder = _folder_with_a_bad_file(data, tmp_path)
    for extra in _test_images(data):
        (folder / f"9_{extra.name}").write_bytes(extra.read_bytes())
    images = sorted(folder.iterdir())
    monkeypatch.setattr(writing, "default_workers", lambda device="cpu": 0)  # reads and writes in this thread
    serial = PredictionWriter(detector, tmp_path / "serial", progress=False, writer_processes=0)
    serial.write_images(images)
    serial.finish()
    monkeypatch.setattr(writing, "default_workers", lambda device="cpu": threads)
    pooled = PredictionWriter(detector, tmp_path / "processes", progress=False, writer_processes=2)
    pooled.write_images(images)
    pooled.finish()
    rows = _rows(tmp_path / "serial")
    assert [r["input"] for r in rows] == [str(p) for p in images]
    assert [r["status"] for r in rows].count("skipped") == 1 and rows[1]["status"] == "skipped"
    expected = _tree_bytes(tmp_path / "serial")
    assert len(expected) == 3 + 4 * 7  # the report files, and 4 files for each of the 7 readable images
    assert _tree_bytes(tmp_path / "processes") == expected


def test_a_write_failing_in_a_worker_process_stops_with_the_rows_before_it_and_no_orphans(detector, data, tmp_path):
    """An output file a worker process cannot create stops the run with one sentence; the inputs before it keep
    their rows and files, nothing of the later ones is left (as with threads)."""
    images = _test_images(data)
    writer = PredictionWriter(detector, tmp_path / "out", progress=False, writer_processes=2)
    writer.assign_names(images)
    (tmp_path / "out" / f"{writer.names[images[1]]}_anomaly.npy").mkdir()  # a folder where its .npy must go
    with pytest.raises(OutputError, match="cannot write .*_anomaly.npy"):
        writer.write_images(images)
    rows = _rows(tmp_path / "out")
    assert [r["input"] for r in rows] == [str(images[0])]
    listed = {r[c] for r in rows for c in ("anomaly_map", "anomaly_npy", "mask", "overlay")}
    assert {p.name for p in (tmp_path / "out").iterdir() if p.is_file()} - {"scores.csv"} == listed


def test_a_signal_while_waiting_for_an_images_files_removes_them(model, data, tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM lands while the main thread waits for the writer thread of the third image, whose files are
    complete but whose row is not recorded: those files go too (they stayed before: maps without a row)."""
    from concurrent.futures import ThreadPoolExecutor

    import normdino.io.writing as writing

    submitted = []

    class InterruptedWait(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            future = super().submit(fn, *args, **kwargs)
            submitted.append(future)
            if len(submitted) == 3:
                real, raised = future.result, []

                def result(timeout=None):
                    value = real(timeout)  # the files are written...
                    if not raised:  # ...and the signal arrives as the main thread gets them, once
                        raised.append(True)
                        raise KeyboardInterrupt
                    return value

                future.result = result
            return future

    monkeypatch.setattr(writing, "ThreadPoolExecutor", InterruptedWait)
    monkeypatch.setattr(writing, "default_workers", lambda device="cpu": 1)
    out = tmp_path / "out"
    assert main(["predict", str(model), *map(str, _test_images(data)), "-o", str(out), "-q", "--batch-size", "1"]) == 130
    _assert_partial_and_clean(out, "interrupted (SIGINT")
