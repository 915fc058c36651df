"""Candidate fast CPU runtimes for the backbone that normdino does not offer, measured against torch fp32 in one
process (issue 15's search for 2x): OpenVINO + NNCF post-training INT8, OpenVINO weight-only INT8, ONNX Runtime
transformer-optimised graph before dynamic INT8, ONNX Runtime MatMulNBits 4-bit weights, spinning threads.

    python benchmarks/bench_int8_candidates.py --threads 1 --clock cpu     # robust to other load on a shared machine
    python benchmarks/bench_int8_candidates.py --threads 2 --rounds 5      # wall clock, medians of 5 rounds

Needs `pip install nncf onnx_ir` besides normdino[fast]; a candidate whose package is missing is skipped.
Weights are RANDOM (none can be downloaded here): timings are honest, the cosines only a proxy for DINOv2's.
NNCF calibrates on --n-cal train/good lgg-flair slices preprocessed by Backbone.preprocess; fidelity is measured
on --n-fid valid slices (other images). Each row: ms/image (median over rounds), speed-up over torch fp32 timed
in the same rounds, mean and 1st-percentile cosine of every token (CLS included) to torch fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtimes import DATA, slice_paths  # noqa: E402  (the same slice choice as the runtimes benchmark)

Runner = Callable[[torch.Tensor], torch.Tensor]


def ort_runner(path: Path, threads: int, spin: bool = False) -> Runner:
    """ONNX Runtime CPU session with every graph optimisation, ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: np.ascontiguousarray(x.numpy())})[0])


def ov_runner(model, threads: int, hint: str = "LATENCY") -> Runner:
    """OpenVINO CPU compiled model; THROUGHPUT runs one image per infer request, requests in parallel streams."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads})
    if hint == "THROUGHPUT":
        queue = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        results: dict[int, np.ndarray] = {}
        queue.set_callback(lambda request, i: results.__setitem__(i, np.array(request.get_output_tensor(0).data)))

        def run(x: torch.Tensor) -> torch.Tensor:
            results.clear()
            for i in range(len(x)):
                queue.start_async({0: x[i : i + 1].numpy()}, i)
            queue.wait_all()
            return torch.from_numpy(np.concatenate([results[i] for i in range(len(x))]))

        return run
    request = compiled.create_infer_request()
    return lambda x: torch.from_numpy(np.array(request.infer({0: np.ascontiguousarray(x.numpy())})[compiled.output(0)]))


@contextlib.contextmanager
def quiet() -> None:
    """Quantisers log per tensor and warn a lot: keep the table readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            root.setLevel(level)


def build_candidates(fp32: Path, int8: Path, calibration: np.ndarray, folder: Path, threads: int) -> dict[str, Callable[[], Runner]]:
    """name -> builder of each candidate runner (files produced here, in ``folder``)."""
    from normdino.features.runtimes import onnx_runner

    out: dict[str, Callable[[], Runner]] = {
        "onnx fp32": lambda: ort_runner(fp32, threads),
        "onnx int8 (offered: image-parallel)": lambda: onnx_runner(int8, threads),
        "onnx int8, one session": lambda: ort_runner(int8, threads),
        "onnx int8, one session, spinning": lambda: ort_runner(int8, threads, spin=True),
    }
    with quiet():
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.transformers import optimizer

        fused = folder / "fused.onnx"
        optimizer.optimize_model(str(fp32), model_type="vit", num_heads=6, hidden_size=384, opt_level=0
                                 ).save_model_to_file(str(fused))
        fused_int8 = folder / "fused_int8.onnx"
        import onnx

        quantize_dynamic(str(fused), str(fused_int8), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul"], extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        out["onnx fused (vit optimizer) + int8"] = lambda: ort_runner(fused_int8, threads)
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)

            nbits = folder / "nbits4.onnx"
            quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=DefaultWeightOnlyQuantConfig(
                block_size=32, is_symmetric=True, accuracy_level=4, bits=4))
            quantizer.process()
            quantizer.model.save_model_to_file(str(nbits), False)
            out["onnx MatMulNBits 4-bit, int8 compute"] = lambda: ort_runner(nbits, threads)
        except ImportError as err:
            print(f"skipped MatMulNBits: {err}")
    try:
        import nncf
        import openvino as ov
    except ImportError as err:
        print(f"skipped OpenVINO/NNCF candidates: {err}")
        return out
    core = ov.Core()
    out["openvino fp32 latency"] = lambda: ov_runner(str(fp32), threads)
    out["openvino fp32 throughput"] = lambda: ov_runner(str(fp32), threads, "THROUGHPUT")
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    with quiet():
        for preset in ("MIXED", "PERFORMANCE"):
            quantized = nncf.quantize(core.read_model(str(fp32)), dataset, model_type=nncf.ModelType.TRANSFORMER,
                                      preset=getattr(nncf.QuantizationPreset, preset), subset_size=len(calibration))
            out[f"openvino nncf int8 {preset.lower()}"] = (lambda m: lambda: ov_runner(m, threads))(quantized)
        compressed = nncf.compress_weights(core.read_model(str(fp32)))
        out["openvino nncf weight-only int8"] = lambda: ov_runner(compressed, threads)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="dinov2_vits14")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--n-time", type=int, default=4, help="images timed per configuration, batch and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-cal", type=int, default=32, help="train/good slices NNCF calibrates on")
    parser.add_argument("--n-fid", type=int, default=16, help="valid slices the cosines are measured on")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (use with --threads 1)")
    parser.add_argument("--only", default="", help="comma-separated substrings: time only matching candidates")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NORMDINO_RUNTIME_CACHE", tempfile.mkdtemp(prefix="normdino-runtimes-"))

    from normdino.features.backbone import Backbone
    from normdino.features.runtimes import exported_onnx, hidden_tokens, token_cosines
    from normdino.io.reading import read_image

    backbone = Backbone.random(args.arch, image_size=args.size)
    fp32 = exported_onnx(backbone.model, backbone.weights_digest, backbone.image_size, backbone.layers, "fp32")
    int8 = exported_onnx(backbone.model, backbone.weights_digest, backbone.image_size, backbone.layers, "int8")

    def load(folder: Path, n: int) -> torch.Tensor:
        return torch.stack([backbone.preprocess(read_image(p)) for p in slice_paths(folder, n)])

    calibration = load(DATA / "train" / "good", args.n_cal).numpy()
    fidelity = load(DATA / "valid" / "Ungood" / "img", args.n_fid)

    def torch_fp32(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return hidden_tokens(backbone.model, x, backbone.layers).float()

    with tempfile.TemporaryDirectory() as tmp:
        builders = build_candidates(fp32, int8, calibration, Path(tmp), args.threads)
        wanted = [s for s in args.only.split(",") if s]
        runners: dict[str, Runner] = {"torch fp32": torch_fp32}
        runners.update({name: build() for name, build in builders.items() if not wanted or any(w in name for w in wanted)})
        reference = torch.cat([torch_fp32(fidelity[i : i + 4]) for i in range(0, len(fidelity), 4)])
        cosines = {}
        for name, runner in runners.items():
            c = token_cosines(reference, torch.cat([runner(fidelity[i : i + 4]) for i in range(0, len(fidelity), 4)]))
            cosines[name] = (float(c.mean()), float(torch.quantile(c.float(), 0.01)))
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        timed = fidelity[: args.n_time]
        print(f"{args.arch} at {backbone.image_size} px, RANDOM weights (cosines a proxy), {args.threads} threads, "
              f"{args.clock} clock, {len(timed)} images x {args.rounds} rounds, median ms/image")
        print(f"{'candidate':<40}{'batch':>6}{'ms/img':>8}{'speed-up':>9}{'cos mean':>10}{'cos p1':>9}")
        for batch in (int(b) for b in args.batches.split(",")):
            chunks = [timed[i : i + batch] for i in range(0, len(timed), batch)]
            times: dict[str, list[float]] = {name: [] for name in runners}
            for runner in runners.values():
                runner(chunks[0])  # warm-up
            for _ in range(args.rounds):
                for name, runner in runners.items():
                    start = clock()
                    for chunk in chunks:
                        runner(chunk)
                    times[name].append(1000 * (clock() - start) / len(timed))
            ref = statistics.median(times["torch fp32"])
            for name, values in times.items():
                ms = statistics.median(values)
                print(f"{name:<40}{batch:>6}{ms:>8.0f}{ref / ms:>9.2f}{cosines[name][0]:>10.5f}{cosines[name][1]:>9.5f}")


if __name__ == "__main__":
    main()
