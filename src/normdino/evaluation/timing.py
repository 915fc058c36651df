"""Runtime and memory of the detection stage, as the paper defines them: every method timed at batch size 1 in
one loop, image by image, backbone and scoring apart (:data:`TIMING_NOTE`), and peak memory measured in a pass of
its own (:class:`PeakMemory`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from normdino.evaluation.scorers import Scorer
from normdino.features.tokens import Tokens
from normdino.methods import scoring
from normdino.io.reading import read_image

log = logging.getLogger(__name__)


def release_free_heap() -> None:
    """Hand memory that glibc's malloc keeps after frees back to the system (malloc_trim; a no-op elsewhere).

    Without it a block's resident-memory rise under-reads its allocations (measured for one ViT-S/14 forward at
    448 px: 12 MB seen without, 29 MB with).
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak resident memory (CPU, sampled every millisecond) or peak allocated memory (CUDA) inside a block."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.start_bytes = 0  # the reading on entering: what the block's peak adds to is peak_bytes - start_bytes

    @property
    def added_bytes(self) -> int:
        """How far the peak rose above the memory held on entering (the block's own transient memory)."""
        return max(0, self.peak_bytes - self.start_bytes)

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process's lifetime peak is the best available
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())
            self.n_samples_ += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        release_free_heap()  # so what the block allocates shows in the RSS instead of reusing kept pages unseen
        self.peak_bytes = self.start_bytes = self.rss_bytes()
        self.n_samples_ = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.rss_bytes())


def encode_image(backbone, image: np.ndarray) -> Tokens:
    """Tokens of one image array, on the backbone's device."""
    out = backbone.encode(backbone.preprocess(image)[None].to(backbone.device))
    return Tokens(out.patch_tokens, out.cls_tokens)


TIMING_NOTE = ("Runtime per sample at batch size 1, as the paper defines it (detection stage, one image at a time): "
               "every method is timed in one loop, image by image, the methods in rotating order, so load that comes "
               "and goes is shared by all. 'backbone ms': resizing and normalising the image and the backbone's "
               "forward pass to its patch tokens; 'scoring ms': the method's patch scores, their upsampling (and "
               "smoothing) to the image size and the image score; 'ms/sample': their sum. Reading the file is data "
               "loading, in neither. Peak memory is measured in a separate pass per method over the same images "
               "(backbone + scoring), so its sampler never slows the timed loop: the backbone's weights, the "
               "method's scoring state and the most one image's detection added above what the process held "
               "before the pass (resident memory on a CPU, allocated memory on a GPU), so the other methods' "
               "states and the cached tokens kept for the evaluation do not count (on a CPU, free heap memory is "
               "handed back before the pass, yet the added part stays a lower bound). 'scoring state MB': what the "
               "method's scoring reads (the DPMM's active means, a bank); 'saved state MB': the method's tensors in "
               "its model file (the DPMM's EM state of all its components).")


@dataclass
class Timing:
    """One method's batch-1 detection cost: mean backbone and scoring milliseconds per image, peak memory in MB."""

    backbone_ms: float
    scoring_ms: float
    peak_mb: float
    n_images: int

    @property
    def total_ms(self) -> float:
        """Backbone + scoring: the detection stage of one image."""
        return self.backbone_ms + self.scoring_ms

    def row(self) -> dict:
        """The table columns of this timing (ms rounded to µs, memory to 0.1 MB)."""
        return {"backbone_ms": round(self.backbone_ms, 3), "scoring_ms": round(self.scoring_ms, 3),
                "ms_per_sample": round(self.total_ms, 3), "peak_memory_mb": round(self.peak_mb, 1),
                "peak_memory_gb": round(self.peak_mb / 1024, 4), "timing_images": self.n_images}


UNTIMED = Timing(math.nan, math.nan, math.nan, 0)


def backbone_bytes(backbone, device: torch.device) -> int:
    """Bytes of the torch backbone's weights and buffers on ``device`` (0 for a stub or a graph runtime's copy)."""
    model = getattr(backbone, "model", None)
    if not isinstance(model, torch.nn.Module):
        return 0
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device.type)


def _scoring_bytes(method) -> int:
    return method.scoring_bytes() if hasattr(method, "scoring_bytes") else method.state_bytes()


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read after it includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(backbone, scorers: Sequence[Scorer], images: Sequence[Path | np.ndarray], sigma: float,
                 top_fraction: float, warmup: int = 1, clock=time.perf_counter) -> list[Timing]:
    """Batch-1 backbone and scoring time of every scorer, interleaved image by image, then each one's peak memory.

    For each image (read once, outside the clock) every scorer in turn runs the backbone and then scores; the
    order rotates by one scorer per image, so no method always comes first or last. Backbone time is each
    method's own pass (the same work for methods of one backbone, measured under the same load). The peak
    memory comes from a second pass per scorer under :class:`PeakMemory` (its 1 kHz sampling thread slowed the
    timed loop when both ran together: 6.9 -> 8.6 ms/sample for scoring, issue 11). ``images`` are files or
    arrays already read (volume slices); ``clock`` is for tests.
    """
    if not scorers:
        return []
    device = torch.device(getattr(backbone, "device", "cpu"))

    def detect(scorer: Scorer, image: np.ndarray) -> tuple[float, float]:
        started = clock()
        with torch.inference_mode():
            tokens = encode_image(backbone, image)
            _synchronize(device)
            encoded = clock()
            patch = scorer.patch_maps(tokens)[0].float().cpu()
        scoring.image_score(scoring.pixel_map(patch, image.shape[:2], sigma), top_fraction)
        return encoded - started, clock() - encoded

    arrays = [image if isinstance(image, np.ndarray) else read_image(image) for image in images]
    for image in arrays[:warmup]:
        for scorer in scorers:
            detect(scorer, image)
    spent = np.zeros((len(scorers), 2))
    for i, image in enumerate(arrays):
        for k in range(len(scorers)):
            j = (i + k) % len(scorers)
            spent[j] += detect(scorers[j], image)
    peaks, weights = [], backbone_bytes(backbone, device)
    for scorer in scorers:
        with PeakMemory(device) as memory:  # its own pass, for the peak only
            for image in arrays:
                detect(scorer, image)
        # what this method's detection holds at its peak, whatever else the process keeps (other methods' states,
        # training tokens): the backbone's weights + this method's scoring state + what one image's pass adds
        peaks.append((weights + _scoring_bytes(scorer.method) + memory.added_bytes) / 2**20)
    n = max(1, len(arrays))
    return [Timing(1000.0 * b / n, 1000.0 * s / n, peak, len(arrays)) for (b, s), peak in zip(spent, peaks)]
