"""Faster inference runtimes for the frozen backbone: torch dynamic INT8, ONNX Runtime and OpenVINO.

A runtime turns a (B, 3, S, S) batch into the stacked tokens (B, L, T, D) of the requested layers (final
LayerNorm applied, prefix tokens kept, not yet L2-normalised), exactly what ``Backbone.encode`` computes with
torch. ONNX Runtime and OpenVINO run a graph exported once from the torch model at a fixed input size and
cached on disk under a key made of the weights digest, the geometry and the library versions, so a second
start only loads it. Every runtime/precision pair has a stated fidelity: the smallest mean token cosine to
torch fp32 that its tests accept (``FIDELITY``); the figures measured on real slices are in the benchmark.

Measured on this project's 2-core AVX2 EPYC (benchmarks/bench_runtimes.py, ViT-S/14 at 448 px, batch 1, random
weights, so the cosines are a proxy): torch fp32 570 ms/image at 2 threads (57 % of the measured fp32 FMA peak);
onnx int8 1.32x faster (1.45x in single-thread CPU time), mean token cosine 0.9998, 1st percentile 0.9995;
torch int8 1.24x (1.37x); onnx/openvino fp32 exact (cosine 1.0) and 0.96x (1.07x / 1.12x single-thread).
bf16 on a CPU without bf16 instructions is 5-25x slower than fp32, hence refused there. Batches of 4-8 run
image-parallel on single-threaded ONNX Runtime sessions: onnx int8 1.53x (batch 4) and 1.62x (batch 8) over torch
fp32 at the same batch, 1.41x over torch's best batch (1).
Not offered, measured slower or no faster here (benchmarks/bench_int8_candidates.py): OpenVINO + NNCF INT8 (0.8x;
oneDNN has no fast INT8 GEMM without VNNI), NNCF weight-only INT8, ONNX Runtime MatMulNBits, int8 attention matmuls.
No runtime tried reaches 2x on AVX2 without VNNI: attention (31 % of the FLOPs) found no kernel faster than fp32.
On 2 cores of a Xeon with AVX-512 VNNI and AMX (benchmarks/bench_cpu_precisions.py): onnx int8 2.0x, torch bf16
1.7x (batch 1) and 2.4x (batch 4), torch int8 1.2-1.6x over torch fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from normdino.errors import InputError, ModelFileError
from normdino.features.vit import implementation
from normdino.files import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx", "openvino")
PRECISIONS = ("fp32", "int8", "bf16")
EXPORT_FORMAT = "normdino-export-1"
ONNX_OPSET = 17
MAX_EXPORT_BYTES = 2**31 - 2**26  # one protobuf file: ONNX refuses more than 2 GiB
CACHE_ENV = "NORMDINO_RUNTIME_CACHE"

# Stated fidelity: the least mean cosine between this pair's tokens and torch fp32 tokens that is accepted.
# fp32 graphs differ from torch only by summation order; INT8 quantises every Linear's weights (per output
# channel) and its input rows on the fly; bf16 keeps an 8-bit mantissa through the whole network.
FIDELITY: dict[tuple[str, str], float] = {
    ("torch", "fp32"): 1.0 - 1e-6,
    ("onnx", "fp32"): 1.0 - 1e-5,
    ("openvino", "fp32"): 1.0 - 1e-5,
    ("torch", "int8"): 0.99,
    ("onnx", "int8"): 0.99,
    ("torch", "bf16"): 0.99,
}
INSTALL_HINT = "install it with `pip install 'normdino[fast]'` (onnxruntime, onnx, openvino)"


# ---------------------------------------------------------------------- choosing
#: Images per forward pass when none is given (``batch_size=None`` or ``"auto"``), by device type and runtime.
#: A table from measurement, not a constant. torch on a CPU is not in it: it runs a batch one image per core
#: (image_parallel_runner), so its batch is the number of torch threads (on 2 EPYC cores 1.16x per image over one
#: image spread across both when they are quiet, 2-2.5x when other jobs share them). ONNX Runtime runs a batch image-parallel on single-threaded sessions and gains up to
#: batch 8 (1.53x at 4, 1.62x at 8 over torch at the same batch), OpenVINO's LATENCY mode is tuned for one image;
#: on an H200 ViT-S/14 at 448 px reaches its rate (3 031 images/s in bf16) at batch 64
#: (benchmarks/bench_runtimes.py, bench_gpu.py, bench_predict.py).
#: The batch size never changes a token beyond float rounding (on a CPU not at all: each image runs alone).
AUTO_BATCH_SIZES: dict[tuple[str, str], int] = {
    ("cpu", "onnx"): 8,
    ("cpu", "openvino"): 1,
    ("cuda", "torch"): 64,
    ("mps", "torch"): 8,
}
DEFAULT_AUTO_BATCH_SIZE = 8


def auto_batch_size(device: torch.device | str, runtime: str = "torch") -> int:
    """The measured best batch size for ``device`` and ``runtime``: one image per torch thread for torch on a CPU,
    else ``AUTO_BATCH_SIZES`` (8 when untabled)."""
    kind = torch.device(device).type if not isinstance(device, torch.device) else device.type
    if (kind, str(runtime)) == ("cpu", "torch"):
        return max(1, torch.get_num_threads())
    return AUTO_BATCH_SIZES.get((kind, str(runtime)), DEFAULT_AUTO_BATCH_SIZE)


def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), the only case bf16 is faster than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """None/'auto' -> bf16 on a CUDA GPU that supports it, fp32 elsewhere; anything else is checked by name."""
    if precision is None or precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in PRECISIONS:
        raise InputError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)} (or auto).")
    return precision


def check_supported(runtime: str, precision: str, device: torch.device) -> None:
    """Raise one clear InputError for a runtime/precision/device combination that normdino does not offer."""
    if runtime not in RUNTIMES:
        raise InputError(f"Unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}.")
    if runtime != "torch" and device.type != "cpu":
        raise InputError(f"The {runtime} runtime runs on the CPU only; use --runtime torch on {device.type}.")
    if precision == "bf16":
        if runtime != "torch":
            raise InputError(f"bf16 is offered with --runtime torch only, not {runtime}.")
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError("This GPU has no bf16 support; use --precision fp32.")
        if device.type == "cpu" and not cpu_has_bf16():
            raise InputError(
                "This CPU has no bf16 instructions (AVX-512 BF16 or AMX), so bf16 would be slower than fp32; "
                "use --precision fp32 or int8."
            )
        if device.type not in ("cpu", "cuda"):
            raise InputError(f"bf16 is offered on CUDA GPUs and CPUs with bf16 instructions, not on {device.type}.")
    if precision == "int8":
        if device.type != "cpu":
            raise InputError(f"INT8 runs on the CPU only; use --precision bf16 or fp32 on {device.type}.")
        if runtime == "openvino":
            raise InputError(
                "OpenVINO INT8 needs post-training quantisation with calibration images (NNCF), which normdino "
                "does not do (measured slower than fp32 on CPUs without VNNI); use --runtime onnx --precision int8."
            )
    if runtime != "torch":
        _require(runtime)


def _require(runtime: str) -> None:
    """Import the packages a runtime needs, or say in one sentence how to install them."""
    modules = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}[runtime]
    for module in modules:
        try:
            __import__(module)
        except ImportError as err:
            raise InputError(f"--runtime {runtime} needs the Python package {module}: {INSTALL_HINT}.") from err


# ---------------------------------------------------------------------- the torch computation
def hidden_tokens(model: torch.nn.Module, pixels: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """(B, L, T, D) tokens of ``layers`` (hidden_states numbering), each after the model's final LayerNorm."""
    num_layers = int(model.config.num_hidden_layers)
    need_hidden = any(layer != num_layers for layer in layers)
    out = model(pixel_values=pixels, output_hidden_states=need_hidden)
    norm = final_norm(model)
    per_layer = [
        out.last_hidden_state if layer == num_layers else norm(out.hidden_states[layer]) for layer in layers
    ]
    return torch.stack(per_layer, dim=1)


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The model's final LayerNorm (``layernorm`` in DINOv2, ``norm`` in DINOv3)."""
    norm = getattr(model, "layernorm", None)
    if norm is None:
        norm = getattr(model, "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise ModelFileError(f"{type(model).__name__} has no final LayerNorm; is it a DINOv2/DINOv3 ViT?")
    return norm


class _TokenGraph(torch.nn.Module):
    """What gets exported: pixels -> stacked per-layer tokens, with the layers fixed."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.layers = tuple(int(layer) for layer in layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return hidden_tokens(self.model, pixels, self.layers)


@contextlib.contextmanager
def _fixed_position_embeddings(model: torch.nn.Module, image_size: int) -> Iterator[None]:
    """Replace DINOv2's position-embedding interpolation by its result at ``image_size`` while exporting.

    The interpolation (antialiased bicubic in DINOv2 with registers) has no ONNX operator, and at a fixed input
    size it is a constant anyway. DINOv3 (RoPE, no interpolation) is left alone.
    """
    embeddings = getattr(model, "embeddings", None)
    method = getattr(embeddings, "interpolate_pos_encoding", None)
    if method is None:
        yield
        return
    patch = int(model.config.patch_size)
    count = 1 + (image_size // patch) ** 2
    probe = torch.zeros(1, count, int(model.config.hidden_size))
    with torch.no_grad():
        constant = method(probe, image_size, image_size).detach().clone()
    embeddings.interpolate_pos_encoding = lambda embedded, height, width: constant.to(embedded.dtype)
    try:
        yield
    finally:
        del embeddings.interpolate_pos_encoding


# ---------------------------------------------------------------------- the on-disk cache of exported graphs
def cache_root() -> Path:
    """Where exported graphs live: $NORMDINO_RUNTIME_CACHE, else $XDG_CACHE_HOME or ~/.cache, /normdino/runtimes."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "normdino" / "runtimes"


def export_key(weights_digest: str, model_type: str, image_size: int, layers: Sequence[int], precision: str,
               forward_implementation: str) -> str:
    """Key of one exported graph: weights, geometry, precision and every library version that shapes the file."""
    versions = {"torch": torch.__version__, "forward": forward_implementation}
    for module in ("onnx", "onnxruntime"):
        with contextlib.suppress(ImportError):
            versions[module] = __import__(module).__version__
    fields = {
        "format": EXPORT_FORMAT, "weights": weights_digest, "model_type": model_type, "size": int(image_size),
        "layers": [int(x) for x in layers], "precision": precision, "opset": ONNX_OPSET, "versions": versions,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def exported_onnx(
    model: torch.nn.Module, weights_digest: str, image_size: int, layers: Sequence[int], precision: str,
    root: Path | None = None,
) -> Path:
    """Path of the ONNX graph of ``model`` at ``precision`` (fp32 or int8), exporting it once if it is not cached."""
    root = cache_root() if root is None else Path(root)
    key = export_key(weights_digest, model.config.model_type, image_size, layers, precision, implementation(model))
    target = root / f"{key}.onnx"
    if target.is_file():
        return target
    if precision == "int8":
        source = exported_onnx(model, weights_digest, image_size, layers, "fp32", root)
        logger.info("Quantising %s to INT8 (once; cached as %s)", source.name, target)
        with atomic_path(target) as tmp:
            quantize_onnx(source, tmp)
    else:
        logger.info("Exporting the backbone to ONNX at %d px (once; cached as %s)", image_size, target)
        with atomic_path(target) as tmp:
            export_onnx(model, tmp, image_size, layers)
    atomic_write_text(
        target.with_suffix(".json"),
        json.dumps({"format": EXPORT_FORMAT, "weights": weights_digest, "size": image_size,
                    "layers": list(layers), "precision": precision}, indent=1),
    )
    return target


def export_onnx(model: torch.nn.Module, path: Path, image_size: int, layers: Sequence[int]) -> None:
    """Trace ``model`` at a fixed (image_size x image_size) input with a free batch axis into an ONNX file."""
    size_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if size_bytes > MAX_EXPORT_BYTES:
        raise InputError(
            f"This backbone holds {size_bytes / 2**30:.1f} GiB of weights, more than one ONNX file can hold (2 GiB); "
            "use --runtime torch."
        )
    graph = _TokenGraph(model, layers).eval()
    example = torch.zeros(1, 3, image_size, image_size)
    try:
        with _fixed_position_embeddings(model, image_size), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, (example,), str(path), input_names=["pixels"], output_names=["tokens"],
                dynamic_axes={"pixels": {0: "batch"}, "tokens": {0: "batch"}}, opset_version=ONNX_OPSET,
                dynamo=False,
            )
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes one sentence
        raise InputError(
            f"{model.config.model_type} cannot be exported to ONNX by this torch/transformers "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); use --runtime torch."
        ) from err


def quantize_onnx(source: Path, target: Path) -> None:
    """Dynamic INT8: every MatMul with a weight gets per-channel int8 weights; activations are quantised per call.

    reduce_range keeps weights to 7 bits so that AVX2's u8*s8 pair sums (vpmaddubsw) cannot saturate on CPUs
    without VNNI, as ONNX Runtime advises.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
            op_types_to_quantize=["MatMul"], extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantiser logs one INFO line per tensor on the root logger: keep them out of the user's log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING + 1))
    try:
        yield
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------------- runners
Runner = Callable[[torch.Tensor], torch.Tensor]


def torch_int8_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose nn.Linear layers run dynamic INT8 (fbgemm/x86 kernels, int8 weights per channel)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False).eval()


def _pin_threads(count: int) -> None:
    """Run this thread's torch operations on ``count`` threads from now on, whatever other threads set later.

    torch gives a thread its count from the process default at the thread's first parallel operation, and
    ``set_num_threads`` (from any thread) changes that default: a new thread that set its count and then started
    a forward could still take another thread's count in the middle of it, which at some shapes changes the
    last bits of the tokens. Asking for the count first makes that first operation happen here, before the set.
    """
    torch.get_num_threads()  # torch's per-thread start (at::internal::lazy_init_num_threads) happens here
    torch.set_num_threads(count)


def image_parallel_runner(run: Runner, workers: int,
                          context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Runner:
    """``run`` over a batch's images side by side: ``workers`` threads, each running one image single-threaded.

    On a CPU one forward per core is faster than one forward spread over all cores: each of a ViT's many parallel
    sections waits for its slowest thread, worst when other jobs share the cores (2-core EPYC, ViT-S/14 at 448 px:
    367 against 425 ms per image quiet, 0.8 against 1.8-2.2 s under load; benchmarks/bench_predict.py). torch
    releases Python's lock in its kernels. Every image runs alone on one thread (pinned: :func:`_pin_threads`),
    so its tokens depend neither on the batch nor on what other threads do meanwhile; batches smaller than
    ``workers`` run whole on the calling thread at the runner's thread count (the same tokens for ViT-S/14 at
    448 px; at some tiny shapes a matrix product's last bits change with the thread count).
    ``context`` (e.g. bf16 autocast) is entered in the worker, as autocast and inference mode are per thread.
    Several threads may call it at once (a CPU predict keeps two batches in the model); each restores torch's
    default thread count to the one of when the runner was made, never to a worker's 1 it might have read.
    """
    workers = max(1, int(workers))
    process_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="normdino-forward") if workers > 1 else None

    def run_here(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), context():
            return run(pixels)

    def run_single_threaded(image: torch.Tensor) -> torch.Tensor:
        _pin_threads(1)  # this worker's OpenMP/MKL threads; also torch's default for threads started now
        return run_here(image)

    def run_batch(pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.split(1)
        if pool is None or len(images) < workers:
            _pin_threads(process_threads)  # the caller may be a new thread, started while a worker's 1 was the default
            return run_here(pixels)
        try:
            return torch.cat(list(pool.map(run_single_threaded, images)))
        finally:
            torch.set_num_threads(process_threads)  # the process default back as it was, for threads started later

    return run_batch


def onnx_runner(path: Path, threads: int) -> Runner:
    """ONNX Runtime CPU sessions on ``path``: (B, 3, S, S) float tensor -> (B, L, T, D) float tensor.

    Every image runs alone, so that INT8's activation scales, and hence its tokens, never depend on which images
    share a batch. A batch of at least ``threads`` images runs image-parallel: one single-threaded session run
    per image, ``threads`` at a time (ONNX Runtime releases the GIL), which on 2 AVX2 cores is 1.15x faster than
    one 2-thread run for INT8 (its small GEMMs scale poorly across threads). Smaller batches run image by image
    on one ``threads``-thread session.
    """
    threads = max(1, int(threads))
    run_whole = session_runner(onnx_session(path, threads))
    if threads == 1:
        return lambda pixels: torch.cat([run_whole(image) for image in pixels.split(1)])
    run_single = session_runner(onnx_session(path, 1))
    pool = ThreadPoolExecutor(threads, thread_name_prefix="normdino-onnx")

    def run(pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.split(1)
        if len(images) < threads:
            return torch.cat([run_whole(image) for image in images])
        return torch.cat(list(pool.map(run_single, images)))

    return run


def onnx_session(path: Path, threads: int):
    """One ONNX Runtime CPU session with every graph optimisation and ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # idle threads sleep instead of spinning: spinning steals the cores from torch (scoring, other backbones)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - a damaged cache file
        raise ModelFileError(f"{path} is not a readable ONNX graph ({err}); delete it to export again.") from err


def session_runner(session) -> Runner:
    """(B, 3, S, S) float tensor -> the session's (B, L, T, D) tokens as a float tensor."""

    def run(pixels: torch.Tensor) -> torch.Tensor:
        feed = {"pixels": np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.float32)}
        return torch.from_numpy(session.run(None, feed)[0])

    return run


def openvino_runner(path: Path, threads: int) -> Runner:
    """An OpenVINO CPU model compiled from the ONNX graph at ``path``, fp32 inference, latency hint."""
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32"}
    try:
        compiled = core.compile_model(str(path), "CPU", config)
    except Exception as err:  # noqa: BLE001 - a damaged cache file
        raise ModelFileError(f"{path} could not be compiled by OpenVINO ({err}); delete it to export again.") from err
    request = compiled.create_infer_request()

    def run(pixels: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.float32)
        result = request.infer({0: array})
        return torch.from_numpy(np.array(result[compiled.output(0)], dtype=np.float32, copy=True))

    return run


def graph_runner(
    runtime: str, precision: str, model: torch.nn.Module, weights_digest: str, image_size: int,
    layers: Sequence[int], root: Path | None = None,
) -> Runner:
    """The ONNX Runtime or OpenVINO runner of ``model`` (exported once and cached), for the CPU."""
    path = exported_onnx(model, weights_digest, image_size, layers, precision, root)
    threads = torch.get_num_threads()
    return onnx_runner(path, threads) if runtime == "onnx" else openvino_runner(path, threads)


def token_cosines(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Cosine between matching tokens (last axis = features) of two runs, flattened."""
    a = reference.reshape(-1, reference.shape[-1]).double()
    b = other.reshape(-1, other.shape[-1]).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)
