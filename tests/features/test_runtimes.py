"""Backbone runtimes (issue 15): every runtime/precision reproduces torch fp32 tokens within its stated bound."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

from normdino.errors import InputError
from normdino.features import runtimes
from normdino.features.backbone import Backbone
from normdino.features.runtimes import FIDELITY, check_supported, token_cosines

SIZE = 56  # 4x4 patches of 14, 3.5x3.5 of 16 -> 48 for DINOv3 (rounded down to its patch size)
LAYERS = (1, -1)  # an intermediate layer (final norm applied) and the last
FAST = [("torch", "int8"), ("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32")]
ARCH_DIRS = ["tiny_dinov2_dir", "tiny_dinov2_reg_dir", "tiny_dinov3_dir"]


def _needs(runtime: str) -> None:
    for module in {"onnx": ["onnxruntime", "onnx"], "openvino": ["openvino", "onnx"]}.get(runtime, []):
        pytest.importorskip(module)


@pytest.fixture(scope="module", autouse=True)
def runtime_cache(tmp_path_factory):
    """Exported graphs go to a fresh folder for this module, never to ~/.cache."""
    folder = tmp_path_factory.mktemp("runtimes")
    old = os.environ.get(runtimes.CACHE_ENV)
    os.environ[runtimes.CACHE_ENV] = str(folder)
    yield folder
    if old is None:
        os.environ.pop(runtimes.CACHE_ENV, None)
    else:
        os.environ[runtimes.CACHE_ENV] = old


def _pixels(seed: int, size: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch_dir", ARCH_DIRS)
@pytest.mark.parametrize("runtime,precision", FAST)
def test_runtime_reproduces_torch_fp32(request, arch_dir, runtime, precision):
    _needs(runtime)
    folder = request.getfixturevalue(arch_dir)
    reference = Backbone.from_pretrained(folder, image_size=SIZE, layers=LAYERS)
    fast = Backbone.from_pretrained(folder, image_size=SIZE, layers=LAYERS, runtime=runtime, precision=precision)
    assert (fast.runtime, fast.precision) == (runtime, precision)
    pixels = _pixels(1, reference.image_size)
    ref, out = reference.encode(pixels), fast.encode(pixels)
    assert out.patch_tokens.shape == ref.patch_tokens.shape and out.cls_tokens.shape == ref.cls_tokens.shape
    bound = FIDELITY[(runtime, precision)]
    for a, b in ((ref.patch_tokens, out.patch_tokens), (ref.cls_tokens, out.cls_tokens)):
        assert float(token_cosines(a, b).mean()) >= bound
    if precision == "fp32":  # the same arithmetic up to summation order
        torch.testing.assert_close(out.patch_tokens, ref.patch_tokens, atol=2e-5, rtol=0)
        torch.testing.assert_close(out.cls_tokens, ref.cls_tokens, atol=2e-5, rtol=0)
    else:  # quantised: close, but not the fp32 numbers
        assert not torch.equal(out.patch_tokens, ref.patch_tokens)
    norms = out.patch_tokens.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_reference_is_hf_output(tiny_dinov2_reg_dir):
    """The torch path (what every runtime is compared with) is transformers' own output: registers dropped."""
    backbone = Backbone.from_pretrained(tiny_dinov2_reg_dir, image_size=SIZE, layers=LAYERS, normalize=False)
    pixels = _pixels(2, SIZE, batch=2)
    with torch.inference_mode():
        out = backbone.model(pixel_values=pixels, output_hidden_states=True)
        intermediate = backbone.model.layernorm(out.hidden_states[1])
    got = backbone.encode(pixels)
    torch.testing.assert_close(got.patch_tokens[:, 0].reshape(2, -1, 32), intermediate[:, 5:])
    torch.testing.assert_close(got.patch_tokens[:, 1].reshape(2, -1, 32), out.last_hidden_state[:, 5:])
    torch.testing.assert_close(got.cls_tokens[:, 1], out.last_hidden_state[:, 0])


def test_export_happens_once(tiny_dinov2_dir, runtime_cache, monkeypatch, caplog):
    _needs("onnx")
    first = Backbone.from_pretrained(tiny_dinov2_dir, image_size=42, runtime="onnx", precision="int8")
    files = sorted(p.name for p in runtime_cache.glob("*.onnx"))
    assert len(files) >= 2  # the fp32 graph and its INT8 version

    def refuse(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(runtimes, "export_onnx", refuse)
    monkeypatch.setattr(runtimes, "quantize_onnx", refuse)
    again = Backbone.from_pretrained(tiny_dinov2_dir, image_size=42, runtime="onnx", precision="int8")
    assert sorted(p.name for p in runtime_cache.glob("*.onnx")) == files
    pixels = _pixels(3, 42)
    torch.testing.assert_close(again.encode(pixels).patch_tokens, first.encode(pixels).patch_tokens)
    # other weights (another seed) are another key: export is needed, and here refused
    with pytest.raises(AssertionError, match="exported again"):
        Backbone.random("dinov2_vits14", seed=5, tiny=True, image_size=42, runtime="onnx")


def test_identifier_differs_per_runtime_and_precision(tiny_dinov2_dir):
    _needs("onnx")
    _needs("openvino")
    pairs = [("torch", "fp32"), *FAST]
    backbones = [Backbone.from_pretrained(tiny_dinov2_dir, image_size=SIZE, runtime=r, precision=p) for r, p in pairs]
    assert len({b.identifier for b in backbones}) == len(pairs)
    assert len({b.weights_digest for b in backbones}) == 1  # the same fp32 weights behind every runtime
    for backbone, (runtime, precision) in zip(backbones, pairs):
        assert f"runtime={runtime}" in backbone.identifier and f"precision={precision}" in backbone.identifier


@pytest.mark.parametrize(
    "runtime,precision,device,message",
    [
        ("openvino", "int8", "cpu", "OpenVINO INT8 needs post-training quantisation"),
        ("onnx", "bf16", "cpu", "bf16 is offered with --runtime torch only"),
        ("torch", "int8", "cuda", "INT8 runs on the CPU only"),
        ("onnx", "fp32", "cuda", "The onnx runtime runs on the CPU only"),
        ("tensorrt", "fp32", "cpu", "Unknown runtime 'tensorrt'"),
        ("torch", "bf16", "mps", "bf16 is offered on CUDA GPUs and CPUs with bf16 instructions"),
    ],
)
def test_unsupported_combinations_are_refused(runtime, precision, device, message):
    with pytest.raises(InputError, match=message):
        check_supported(runtime, precision, torch.device(device))


def test_unknown_precision_and_cpu_bf16(tiny_dinov2_dir):
    with pytest.raises(InputError, match="Unknown precision 'fp8'"):
        Backbone.from_pretrained(tiny_dinov2_dir, image_size=SIZE, precision="fp8")
    if runtimes.cpu_has_bf16():
        assert Backbone.from_pretrained(tiny_dinov2_dir, image_size=SIZE, precision="bf16").precision == "bf16"
    else:
        with pytest.raises(InputError, match="This CPU has no bf16 instructions"):
            Backbone.from_pretrained(tiny_dinov2_dir, image_size=SIZE, precision="bf16")


def test_default_precision_is_fp32_on_cpu(tiny_dinov2_dir):
    backbone = Backbone.from_pretrained(tiny_dinov2_dir, image_size=SIZE)
    assert (backbone.runtime, backbone.precision) == ("torch", "fp32")


def test_missing_package_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(InputError, match=r"needs the Python package openvino: install it with `pip install 'normdino\[fast\]'`"):
        check_supported("openvino", "fp32", torch.device("cpu"))


def test_exported_graph_refuses_another_input_size(tiny_dinov2_dir):
    _needs("onnx")
    backbone = Backbone.from_pretrained(tiny_dinov2_dir, image_size=SIZE, runtime="onnx")
    with pytest.raises(InputError, match=r"exported for 56x56 inputs, got 70x70"):
        backbone.encode(_pixels(4, 70, batch=1))


def test_torch_int8_takes_any_input_size_like_torch_fp32(tiny_dinov2_dir):
    fp32 = Backbone.from_pretrained(tiny_dinov2_dir, image_size=SIZE)
    int8 = Backbone.from_pretrained(tiny_dinov2_dir, image_size=SIZE, precision="int8")
    pixels = _pixels(4, 70, batch=2)
    tokens, reference = int8(pixels), fp32(pixels)
    assert tokens.shape == reference.shape == (2, 5, 5, 32)
    assert float(torch.nn.functional.cosine_similarity(tokens, reference, dim=-1).mean()) > 0.99


def test_quantiser_logs_stay_quiet(tiny_dinov2_dir, caplog):
    _needs("onnx")
    with caplog.at_level(logging.INFO):
        Backbone.random("dinov2_vits14", seed=9, tiny=True, image_size=SIZE, runtime="onnx", precision="int8")
    assert not [r for r in caplog.records if r.name == "root"]


@pytest.mark.parametrize(
    "argv",
    [["fit", "normal", "-o", "m.normdino"], ["predict", "m.normdino", "x.png", "-o", "out"],
     ["evaluate", "m.normdino", "data"], ["bench", "data"]],
)
def test_cli_runtime_options(argv):
    from normdino.cli import build_parser

    parser = build_parser()
    args = parser.parse_args([*argv, "--runtime", "onnx", "--precision", "int8"])
    assert (args.runtime, args.precision) == ("onnx", "int8")
    defaults = parser.parse_args(argv)
    assert (defaults.runtime, defaults.precision) == (None, None)  # None: the default / the model file's choice
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--runtime", "tensorrt"])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnx_image_parallel_batch_equals_images_one_by_one(tiny_dinov2_dir, runtime_cache, precision):
    """A batch run image-parallel on single-threaded sessions gives each image's own tokens, in order."""
    _needs("onnx")
    backbone = Backbone.from_pretrained(tiny_dinov2_dir, image_size=SIZE, layers=LAYERS)
    path = runtimes.exported_onnx(backbone.model, backbone.weights_digest, SIZE, backbone.layers, precision, runtime_cache)
    pixels = _pixels(5, SIZE, batch=5)  # 5 images over 2 workers: an uneven share
    batched = runtimes.onnx_runner(path, threads=2)(pixels)
    alone = runtimes.onnx_runner(path, threads=1)
    one_by_one = torch.cat([alone(image[None]) for image in pixels])
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=0)
    assert batched.shape[0] == 5 and not torch.allclose(batched[0], batched[1])
    if precision == "fp32":  # and each image's tokens are the torch fp32 tokens
        reference = runtimes.hidden_tokens(backbone.model, pixels, backbone.layers)
        torch.testing.assert_close(batched, reference, atol=2e-5, rtol=0)


def test_onnx_small_batch_uses_the_multithreaded_session(tiny_dinov2_dir, runtime_cache, monkeypatch):
    """Fewer images than threads: image by image on the threads-thread session, no image-parallel runs."""
    _needs("onnx")
    backbone = Backbone.from_pretrained(tiny_dinov2_dir, image_size=SIZE, layers=LAYERS)
    path = runtimes.exported_onnx(backbone.model, backbone.weights_digest, SIZE, backbone.layers, "fp32", runtime_cache)
    made = []
    real = runtimes.onnx_session

    def recording(p, threads):
        session = real(p, threads)
        calls = []
        made.append((threads, calls))
        original = session.run
        monkeypatch.setattr(session, "run", lambda *a, **k: calls.append(len(a[1]["pixels"])) or original(*a, **k),
                            raising=False)
        return session

    monkeypatch.setattr(runtimes, "onnx_session", recording)
    run = runtimes.onnx_runner(path, threads=3)
    run(_pixels(6, SIZE, batch=2))
    run(_pixels(7, SIZE, batch=4))
    assert [(threads, calls) for threads, calls in made] == [(3, [1, 1]), (1, [1, 1, 1, 1])]


def test_onnx_int8_tokens_do_not_depend_on_the_batch(tiny_dinov2_dir, runtime_cache):
    """INT8 activation scales are per image: an image's tokens are the same alone, in a small or a large batch."""
    _needs("onnx")
    backbone = Backbone.from_pretrained(tiny_dinov2_dir, image_size=SIZE, layers=LAYERS)
    path = runtimes.exported_onnx(backbone.model, backbone.weights_digest, SIZE, backbone.layers, "int8", runtime_cache)
    pixels = _pixels(8, SIZE, batch=4)
    pixels[1:] *= 3.0  # other images with a wider range would change a batch-wide scale
    for threads in (1, 2, 8):
        run = runtimes.onnx_runner(path, threads=threads)
        alone = run(pixels[:1])
        for batch in (2, 4):
            torch.testing.assert_close(run(pixels[:batch])[:1], alone, atol=0, rtol=0)


def test_image_parallel_runs_each_image_alone_in_worker_threads():
    """One single-threaded forward per image in workers: the result of each image run alone, in order, with the
    worker's context (autocast is per thread) and the caller's thread count untouched."""
    seen: list[tuple[str, int, bool]] = []

    def run(pixels: torch.Tensor) -> torch.Tensor:
        import threading

        seen.append((threading.current_thread().name, torch.get_num_threads(), torch.is_autocast_enabled("cpu")))
        return pixels.sum(dim=(2, 3))[:, None] * torch.arange(1, 3)[None, :, None]  # (B, 2, 3)

    threads = torch.get_num_threads()
    parallel = runtimes.image_parallel_runner(run, 2, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    pixels = _pixels(0, 8, batch=5)
    out = parallel(pixels)
    assert torch.equal(out, torch.cat([run(image) for image in pixels.split(1)]))
    workers = [s for s in seen[:5]]
    assert all(name.startswith("normdino-forward") and n == 1 and autocast for name, n, autocast in workers)
    assert torch.get_num_threads() == threads
    seen.clear()
    parallel(pixels[:1])  # fewer images than workers: the calling thread, its threads, the context still entered
    assert seen == [(seen[0][0], threads, True)] and not seen[0][0].startswith("normdino-forward")

    started_later: list[int] = []  # torch's default for new threads is the caller's again, not the workers' 1

    def later() -> None:
        torch.ones(100_000).sum()  # a thread takes the process default at its first parallel operation
        started_later.append(torch.get_num_threads())

    import threading

    thread = threading.Thread(target=later)
    thread.start()
    thread.join()
    assert started_later == [threads]


def test_a_new_worker_keeps_its_single_thread_when_another_thread_sets_the_count_mid_forward():
    """torch gives a new thread its count at the thread's first parallel operation, from the process default:
    a worker that set 1 and then met another caller's restore (the default back to 2) must still run on 1
    (before the fix it ran on 2, and at some shapes its tokens changed in the last bits: a flaky test)."""
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        started, restored = threading.Barrier(3, timeout=30), threading.Event()
        counts: list[int] = []

        def run(pixels: torch.Tensor) -> torch.Tensor:
            started.wait()  # both workers have set their 1
            assert restored.wait(30)
            counts.append(torch.get_num_threads())  # this worker's first parallel operation, as in a forward
            return pixels.sum(dim=(2, 3))[:, None]

        parallel = runtimes.image_parallel_runner(run, 2)
        caller = threading.Thread(target=parallel, args=(_pixels(0, 8, batch=2),))
        caller.start()
        started.wait()
        torch.set_num_threads(2)  # another caller's batch ends meanwhile and restores the process default
        restored.set()
        caller.join()
        assert counts == [1, 1]
    finally:
        torch.set_num_threads(before)


def test_a_batch_smaller_than_the_workers_runs_on_the_process_count_in_a_new_thread():
    """A batch with fewer images than workers runs on the calling thread with the runner's thread count, also
    when that thread is new and a worker's 1 is the process default at that moment."""
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        counts: list[int] = []
        parallel = runtimes.image_parallel_runner(
            lambda pixels: (counts.append(torch.get_num_threads()), pixels.sum(dim=(2, 3))[:, None])[1], 2)
        torch.set_num_threads(1)  # a worker of another batch has just set its 1: the default for new threads
        caller = threading.Thread(target=parallel, args=(_pixels(0, 8, batch=1),))
        caller.start()
        caller.join()
        assert counts == [2]
    finally:
        torch.set_num_threads(before)


def test_cpu_tokens_do_not_depend_on_the_batch(tiny_dinov2_reg_dir):
    """torch on a CPU runs a batch one image per core: each image's tokens equal its batch-of-one tokens."""
    backbone = Backbone.from_pretrained(tiny_dinov2_reg_dir, image_size=SIZE, layers=LAYERS)
    pixels = _pixels(4, backbone.image_size, batch=5)
    alone = torch.cat([backbone.encode(image).patch_tokens for image in pixels.split(1)])
    assert torch.equal(backbone.encode(pixels).patch_tokens, alone)


def test_image_parallel_callers_at_once_leave_the_thread_count_as_it_was():
    """Two threads run batches through one runner at once (as a CPU predict does): every result is its own
    images', and afterwards the caller and threads started later have the process's thread count, not 1."""
    import threading

    threads = torch.get_num_threads()
    parallel = runtimes.image_parallel_runner(lambda pixels: pixels.sum(dim=(2, 3))[:, None], 2)
    batches = [_pixels(seed, 8, batch=3) for seed in range(6)]
    results: dict[int, torch.Tensor] = {}

    def call(k: int) -> None:
        results[k] = parallel(batches[k])

    callers = [threading.Thread(target=call, args=(k,)) for k in range(len(batches))]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    for k, batch in enumerate(batches):
        assert torch.equal(results[k], batch.sum(dim=(2, 3))[:, None])
    started_later: list[int] = []
    later = threading.Thread(target=lambda: (torch.ones(100_000).sum(), started_later.append(torch.get_num_threads())))
    later.start()
    later.join()
    assert torch.get_num_threads() == threads and started_later == [threads]
