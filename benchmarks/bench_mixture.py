"""Dirichlet process mixture benchmark: EM step and full fit at the paper's size, time and peak RSS, and init choice.

    python benchmarks/bench_mixture.py                 # all cases, each in a fresh subprocess (peak RSS per case)
    python benchmarks/bench_mixture.py --quick         # 3-epoch fit, full covariance with K=50: a short run
    python benchmarks/bench_mixture.py --case step-diag --threads 1

Tokens are synthetic 384-d unit vectors around random centres (float16 cache, as the detector keeps them).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

D = 384
TOKENS_PER_IMAGE = 1024
PAPER_BATCH = 12 * TOKENS_PER_IMAGE


def synthetic_tokens(n: int, n_centres: int = 300, spread: float = 0.04, seed: int = 0) -> np.ndarray:
    """(n, D) float16 unit vectors around n_centres random directions, per-centre spread varying 0.5-2x."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_centres, D, generator=g), dim=1)
    scale = spread * (0.5 + 1.5 * torch.rand(n_centres, generator=g))
    labels = torch.randint(n_centres, (n,), generator=g)
    out = np.empty((n, D), dtype=np.float16)
    for start in range(0, n, 65536):
        lab = labels[start : start + 65536]
        x = centres[lab] + scale[lab, None] * torch.randn(len(lab), D, generator=g)
        out[start : start + len(lab)] = torch.nn.functional.normalize(x, dim=1).numpy()
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or the last reset_peak_rss(), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> float:
    """Reset the peak RSS to the current RSS (Linux /proc/self/clear_refs), so a case's peak excludes data set-up."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak_rss_mb()


def case_step(cov_type: str, k: int, repeats: int) -> dict:
    from normdino.methods.mixture import DirichletProcessMixture

    x = torch.from_numpy(synthetic_tokens(PAPER_BATCH).astype(np.float32))
    rss_before = reset_peak_rss()
    model = DirichletProcessMixture(n_components=k, covariance_type=cov_type)
    t0 = time.perf_counter()
    model.partial_fit(x)  # includes initialisation (k-means++)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.partial_fit(x)
        times.append(time.perf_counter() - t0)
    return {"case": f"EM step {cov_type}, N={PAPER_BATCH} D={D} K={k}", "seconds": statistics.median(times),
            "detail": f"first step incl. init {first:.2f} s; median of {repeats}; {int(model.active_.sum())} active",
            "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb()}


def case_init(k: int) -> dict:
    from normdino.methods.mixture import DirichletProcessMixture

    x = torch.from_numpy(synthetic_tokens(PAPER_BATCH).astype(np.float32))
    rss_before = reset_peak_rss()
    out = {}
    for init in ("kmeans++", "random"):
        model = DirichletProcessMixture(n_components=k, init=init)
        t0 = time.perf_counter()
        model._check_params()
        model._initialise(model._as_batch(x))
        out[init] = time.perf_counter() - t0
    return {"case": f"initialisation, N={PAPER_BATCH} D={D} K={k}", "seconds": out["kmeans++"],
            "detail": f"k-means++ {out['kmeans++']:.2f} s, random rows {out['random']:.3f} s", "rss_before_mb": rss_before,
            "peak_rss_mb": peak_rss_mb()}


def case_fit(images: int, epochs: int, k: int) -> dict:
    from normdino.methods.mixture import DirichletProcessMixture

    tokens = synthetic_tokens(images * TOKENS_PER_IMAGE)
    rss_before = reset_peak_rss()
    model = DirichletProcessMixture(n_components=k)
    t0 = time.perf_counter()
    model.fit(tokens, epochs=epochs, batch_size=PAPER_BATCH)
    seconds = time.perf_counter() - t0
    return {"case": f"fit {epochs} epochs, {images} images = {len(tokens)} tokens, K={k} diag", "seconds": seconds,
            "detail": f"{model.n_iter_} steps, {seconds / model.n_iter_:.3f} s/step, {int(model.active_.sum())} active, "
                      f"alpha {model.alpha_:.3g}",
            "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb()}


def case_recovery(seeds: int) -> dict:
    """Random rows vs k-means++ on the synthetic recovery problem (30 clusters, D=64, K=100)."""
    from normdino.methods.mixture import DirichletProcessMixture

    rows = []
    rss_before = reset_peak_rss()
    for init in ("kmeans++", "random"):
        found, active, heavy, ll = [], [], [], []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(100 + seed)
            centres = torch.nn.functional.normalize(torch.randn(30, 64, generator=g), dim=1)
            x = torch.nn.functional.normalize(centres[torch.randint(30, (12000,), generator=g)]
                                              + 0.02 * torch.randn(12000, 64, generator=g), dim=1)
            model = DirichletProcessMixture(n_components=100, init=init, seed=seed).fit(x, epochs=15, batch_size=2000)
            cos = torch.nn.functional.normalize(model.prototypes(), dim=1) @ centres.T
            found.append(int((cos.max(0).values > 0.99).sum()))
            active.append(int(model.active_.sum()))
            heavy.append(int((model.weights_[model.active_] > 1e-3).sum()))
            ll.append(model.score(x))
        rows.append(f"30 clusters D=64 K=100, {init}: centres found {np.mean(found):.1f}/30 (min {min(found)}), active {np.mean(active):.1f}, "
                    f"weight>1e-3 {np.mean(heavy):.1f}, loglik {np.mean(ll):.2f}")
    g = torch.Generator().manual_seed(7)
    centres = torch.nn.functional.normalize(torch.randn(400, D, generator=g), dim=1)
    x = torch.nn.functional.normalize(centres.repeat_interleave(15, 0) + 0.01 * torch.randn(6000, D, generator=g), dim=1)
    for init in ("kmeans++", "random"):
        model = DirichletProcessMixture(n_components=500, init=init).fit(x, epochs=5, batch_size=6000)
        cos = torch.nn.functional.normalize(model.prototypes(), dim=1) @ centres.T
        rows.append(f"K=500 on 400 clusters D={D}, {init}: centres found {int((cos.max(0).values > 0.99).sum())}/400, "
                    f"active {int(model.active_.sum())} ({int(model.active_[220:].sum())} past index 220)")
    return {"case": f"init on 30-cluster recovery ({seeds} seeds), 400-cluster", "seconds": float("nan"), "detail": "\n      ".join(rows),
            "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb()}


def run_case(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.case == "step-diag":
        return case_step("diag", 500, args.repeats)
    if args.case == "step-spherical":
        return case_step("spherical", 500, args.repeats)
    if args.case == "step-full":
        return case_step("full", args.full_components, 1)
    if args.case == "init":
        return case_init(500)
    if args.case == "fit":
        return case_fit(args.images, args.epochs, 500)
    if args.case == "recovery":
        return case_recovery(args.seeds)
    raise SystemExit(f"unknown case {args.case}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help="run one case in this process and print it as JSON")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--full-components", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 epochs, full covariance with K=50, 1 recovery seed")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    if args.quick:
        args.epochs, args.full_components, args.seeds = 3, 50, 1
    cases = ["step-diag", "step-spherical", "init", "step-full", "fit", "recovery"]
    print(f"torch {torch.__version__}, {args.threads} thread(s); each case in a fresh process")
    print(f"{'case':62s} {'seconds':>8s} {'RSS before':>10s} {'peak RSS':>9s}  detail")
    for case in cases:
        cmd = [sys.executable, __file__, "--case", case, "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--images", str(args.images), "--epochs", str(args.epochs), "--full-components", str(args.full_components),
               "--seeds", str(args.seeds)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{case:62s} FAILED: {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['case']:62s} {r['seconds']:8.3f} {r['rss_before_mb']:8.0f}MB {r['peak_rss_mb']:7.0f}MB  {r['detail']}",
              flush=True)


if __name__ == "__main__":
    main()
