"""Benchmark: streamed pixel AUROC/AUPR over a whole benchmark's pixels, and memory-bank vs prototype scoring.

    python benchmarks/bench_metrics.py                      # 200 M pixels, bank of 1338 x 1024 tokens
    python benchmarks/bench_metrics.py --pixels 2e7 --bank-images 100   # quick

Part 1 streams synthetic 240 x 240 score maps (3 700 images = 213 M pixels, BraTS-like) through
PixelScoreAccumulator and compares it with scikit-learn on a random subsample (sklearn on all pixels would
need several GB). Part 2 scores one image's 1024 tokens (D = 384) against the full AnomalyDINO bank of the
lgg-flair training set (1338 images x 1024 tokens, random unit vectors) and against 150 prototypes.
Peak RSS is the process high-water mark (ru_maxrss), read after each stage.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_pixels(n_pixels: float, subsample: int, seed: int = 0) -> list[tuple[str, str]]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from normdino.evaluation.accumulator import PixelScoreAccumulator

    rng = np.random.default_rng(seed)
    side = 240
    n_images = max(1, int(round(n_pixels / side**2)))
    sub_rate = subsample / (n_images * side * side)
    rss_before = peak_rss_mb()
    full = PixelScoreAccumulator(thresholds=(0.3, 0.35, 0.4), track_regions=True)
    small = PixelScoreAccumulator()
    sub_scores, sub_labels = [], []
    generate = stream = 0.0
    yy, xx = np.mgrid[0:side, 0:side]
    for i in range(n_images):
        t0 = time.perf_counter()
        mask = None
        scores = rng.standard_normal((side, side), dtype=np.float32)
        scores *= 0.05
        scores += 0.2
        if i % 3 == 0:  # a third of the images carry a round lesion of random size
            r = rng.integers(5, 40)
            cy, cx = rng.integers(r, side - r, size=2)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            scores[mask] += 0.08
        pick = rng.random(side * side) < sub_rate
        t1 = time.perf_counter()
        full.add(scores, mask)
        t2 = time.perf_counter()
        labels = mask.ravel() if mask is not None else np.zeros(side * side, dtype=bool)
        sub_scores.append(scores.ravel()[pick])
        sub_labels.append(labels[pick])
        generate += t1 - t0
        stream += t2 - t1
    t0 = time.perf_counter()
    auroc, aupr, pro = full.auroc(), full.aupr(), full.aupro()
    dice = [full.dice_at(t) for t in full.thresholds]
    finish = time.perf_counter() - t0
    rss_stream = peak_rss_mb()

    s, y = np.concatenate(sub_scores), np.concatenate(sub_labels)
    for i in range(0, s.size, 1 << 20):
        small.add(s[i:i + (1 << 20)], y[i:i + (1 << 20)])
    t0 = time.perf_counter()
    sk_auroc, sk_aupr = roc_auc_score(y, s), average_precision_score(y, s)
    sklearn_time = time.perf_counter() - t0
    rss_sklearn = peak_rss_mb()
    total = full.n_normal_ + full.n_anomalous_
    return [
        ("pixels streamed", f"{total / 1e6:.1f} M in {n_images} maps of {side}x{side}"),
        ("stream time (add + metrics)", f"{stream + finish:.1f} s ({(stream + finish) / total * 1e9:.1f} ns/pixel; {finish:.2f} s for the metrics)"),
        ("synthetic data generation (not counted)", f"{generate:.1f} s"),
        ("AUROC / AUPR / AUPRO@0.3 (streamed)", f"{auroc:.6f} / {aupr:.6f} / {pro:.6f}"),
        ("AUROC error bound (streamed)", f"{full.auroc_error_bound():.2e}"),
        ("Dice at 0.30 / 0.35 / 0.40 (exact counts)", " / ".join(f"{d:.4f}" for d in dice)),
        ("histogram blocks in use", f"{len(full._counts)} x {full._block_size} bins ({len(full._counts) * full._block_size * 24 / 2**20:.0f} MB)"),
        ("peak RSS before / after streaming", f"{rss_before:.0f} MB / {rss_stream:.0f} MB"),
        ("sklearn subsample", f"{s.size / 1e6:.2f} M pixels, {sklearn_time:.1f} s, peak RSS {rss_sklearn:.0f} MB"),
        ("|streamed - sklearn| on the subsample", f"AUROC {abs(small.auroc() - sk_auroc):.1e}, AUPR {abs(small.aupr() - sk_aupr):.1e}"),
        ("sklearn extrapolated to all pixels", f"~{sklearn_time * total / s.size:.0f} s"),
    ]


def bench_bank(bank_images: int, n_queries: int, dim: int = 384, seed: int = 0) -> list[tuple[str, str]]:
    import torch

    from normdino.features.tokens import Tokens, TokenSet
    from normdino.methods.memory_bank import Coreset, MemoryBank

    g = torch.Generator().manual_seed(seed)
    side = 32  # 1024 tokens per image, as a 448 x 448 image with 14-pixel patches
    rows = []
    rss0 = peak_rss_mb()
    # the training tokens as the token store keeps them: float16 (N, L=1, h, w, D), one layer
    patches = np.empty((bank_images, 1, side, side, dim), dtype=np.float16)
    flat = patches.reshape(-1, dim)
    for i in range(0, flat.shape[0], 1 << 18):
        chunk = torch.randn(min(1 << 18, flat.shape[0] - i), dim, generator=g)
        flat[i:i + chunk.shape[0]] = (chunk / chunk.norm(dim=1, keepdim=True)).half().numpy()
    train = TokenSet(patches, [(side * 14, side * 14)] * bank_images)
    queries = torch.randn(n_queries, side, side, dim, generator=g)
    queries /= queries.norm(dim=-1, keepdim=True)
    batches = [Tokens(q[None]) for q in queries]  # batch 1: (1, L=1, h, w, D) float32
    rss_store = peak_rss_mb()
    t0 = time.perf_counter()
    bank = MemoryBank().fit(train)
    bank_fit_s = time.perf_counter() - t0
    rss_bank = peak_rss_mb()
    bank.patch_scores(batches[0])  # warm-up (thread pool, allocator), as for the prototypes below
    t0 = time.perf_counter()
    for tokens in batches:
        bank.patch_scores(tokens)
    bank_ms = (time.perf_counter() - t0) / n_queries * 1e3
    rss_score = peak_rss_mb()
    n_bank, bank_mb = bank.n_prototypes, bank.scoring_bytes() / 2**20
    del bank  # free the normalised float32 bank before the coreset makes its own

    t0 = time.perf_counter()
    coreset = Coreset(coreset_size="150").fit(train)
    coreset_s = time.perf_counter() - t0
    rss_coreset = peak_rss_mb()
    repeats = 50
    coreset.patch_scores(batches[0])
    t0 = time.perf_counter()
    for _ in range(repeats):
        for tokens in batches:
            coreset.patch_scores(tokens)
    proto_ms = (time.perf_counter() - t0) / (repeats * n_queries) * 1e3
    rows += [
        ("token store (float16)", f"{bank_images} images x {side * side} tokens x {dim} ({patches.nbytes / 2**20:.0f} MB)"),
        ("memory bank (MemoryBank)", f"{n_bank:,} tokens x {dim} ({bank_mb:.0f} MB float32), fit {bank_fit_s:.1f} s"),
        ("bank scoring, batch 1", f"{bank_ms:.0f} ms/image (mean of {n_queries})"),
        (f"{coreset.n_prototypes}-prototype scoring, batch 1", f"{proto_ms:.2f} ms/image (mean of {repeats * n_queries})"),
        (f"speed ratio bank / {coreset.n_prototypes} prototypes", f"{bank_ms / proto_ms:,.0f}x"),
        ("greedy coreset of 150 (Coreset, projection 128)", f"{coreset_s:.1f} s to fit (bank copy + selection), {coreset.scoring_bytes() / 2**10:.0f} KB"),
        ("peak RSS: start / store / bank fitted / after scoring / coreset fitted",
         f"{rss0:.0f} / {rss_store:.0f} / {rss_bank:.0f} / {rss_score:.0f} / {rss_coreset:.0f} MB"),
    ]
    return rows


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "-" * (width + 40))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pixels", type=float, default=2.13e8, help="pixels to stream (default 213 M = 3700 x 240 x 240)")
    parser.add_argument("--subsample", type=int, default=2_000_000, help="pixels scored by sklearn for comparison")
    parser.add_argument("--bank-images", type=int, default=1338, help="training images in the memory bank (1024 tokens each)")
    parser.add_argument("--queries", type=int, default=1, help="images scored against the full bank")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--skip-pixels", action="store_true")
    parser.add_argument("--skip-bank", action="store_true")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.skip_pixels:
        print_table("Streamed pixel metrics", bench_pixels(args.pixels, args.subsample))
    if not args.skip_bank:
        print_table("Memory bank vs prototypes (CPU, float32)", bench_bank(args.bank_images, args.queries))


if __name__ == "__main__":
    main()
