"""Truncated Dirichlet process mixture of Gaussians fitted by batched EM (Kimura et al. 2013): the normative model.

Equations are those of DESIGN.md ("The Dirichlet process mixture"). Everything that scales with the data is a
matrix product over K or K x D statistics (diag, spherical) or a per-component Cholesky solve (full); nothing of
size N x D x D or N x K x D is ever built. Weights live in log space, so no component dies of float underflow.

Why this module is longer than ~500 lines: it is one scikit-learn-style estimator, and its initialisation,
E and M steps, sharded (torchrun) fit, scoring and (de)serialisation all read and write the same private
state (means, Cholesky factors, stick ratios, running statistics). Splitting the class would turn that state
into a public interface between modules; the scoring-only view (:class:`ActiveComponents`) is small and used
only here. How an epoch's batches are drawn and read from a token store lives in normdino.methods.batches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normdino import distributed as dist
from normdino.errors import InputError, ModelFileError
from normdino.files import atomic_path, read_safetensors
from normdino.methods.batches import READ_THREADS, BatchSource, batch_source, shard_layout

logger = logging.getLogger(__name__)

FORMAT_NAME = "normdino.DirichletProcessMixture"
FORMAT_VERSION = 1
CONFIG_METADATA_KEY = "normdino.methods.mixture.config"
COVARIANCE_TYPES = ("diag", "spherical", "full")
INITS = ("kmeans++", "random")
EPS = 1e-12
"""The tiny constant of the M-step and stick equations (mu = S / (N + EPS), ...)."""
RESP_FLOOR = 1e-30
"""Responsibilities below this are set to exactly zero (keeps matrix products free of subnormal numbers)."""
KMEANS_PP_MAX_ROWS = 4096
"""k-means++ seeding draws from a random subsample of at most max(this, 4 K) rows of the first batch."""
_LOG_RESP_FLOOR = math.log(RESP_FLOOR)
_LOG_2PI = math.log(2.0 * math.pi)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_FULL_CHUNK_ELEMENTS = 1 << 23
_SCORE_CHUNK_ROWS = 16384
_STATE_KEYS = ("means", "covariances", "sticks", "alpha", "stat_count", "stat_sum", "stat_square", "n_iter")


def log_weights_from_sticks(sticks: torch.Tensor) -> torch.Tensor:
    """log pi_k = log v_k + sum_{j<k} log(1 - v_j), computed in float64 and returned in the sticks' dtype."""
    v = sticks.to(torch.float64)
    log_rest = torch.log1p(-v)
    before = torch.cat([v.new_zeros(1), torch.cumsum(log_rest, 0)[:-1]])
    return (torch.log(v) + before).to(sticks.dtype)


def _generator(seed: int, *stream: int) -> torch.Generator:
    """A torch generator seeded from (seed, *stream), so independent random streams never share numbers."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of k rows of x chosen by k-means++ seeding (each next row drawn with probability ~ squared distance)."""
    n = x.shape[0]
    sq = (x * x).sum(1)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = torch.randint(n, (1,), generator=generator)
    d2 = (sq - 2.0 * (x @ x[chosen[0]]) + sq[chosen[0]]).clamp_min_(0)
    d2[chosen[0]] = 0
    for i in range(1, k):
        total = float(d2.sum())
        if total > 0 and math.isfinite(total):
            nxt = torch.multinomial(d2.cpu(), 1, generator=generator)[0]  # the seeded generator lives on the CPU
        else:
            nxt = torch.randint(n, (1,), generator=generator)[0]
        chosen[i] = nxt
        torch.minimum(d2, (sq - 2.0 * (x @ x[nxt]) + sq[nxt]).clamp_min_(0), out=d2)
        d2[nxt] = 0
    return chosen


class DirichletProcessMixture:
    """Dirichlet process mixture of Gaussians, truncated at K components, fitted by batched (EMA) EM.

    Hyper-parameters follow the paper (K=500, diagonal covariances, update rate 0.2, initial alpha 2, reg 1e-6).
    ``init`` is "kmeans++" (default, measured better on clustered data) or "random" (random rows of the first batch).
    """

    def __init__(
        self,
        n_components: int = 500,
        covariance_type: str = "diag",
        update_rate: float = 0.2,
        alpha: float = 2.0,
        alpha_fixed: bool = False,
        reg_covar: float = 1e-6,
        weight_threshold: float = 1e-6,
        init: str = "kmeans++",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.update_rate = update_rate
        self.alpha = alpha
        self.alpha_fixed = alpha_fixed
        self.reg_covar = reg_covar
        self.weight_threshold = weight_threshold
        self.init = init
        self.dtype = dtype
        self.seed = seed
        self.device = device  # where the state lives; None: the device of the first batch (not saved with the model)

    # ------------------------------------------------------------------ checks and conversion

    def _check_params(self) -> None:
        """Raise InputError naming the first hyper-parameter that is out of range."""
        if isinstance(self.n_components, bool) or not isinstance(self.n_components, (int, np.integer)) or self.n_components < 1:
            raise InputError(f"n_components must be a positive integer, got {self.n_components!r}.")
        if self.covariance_type not in COVARIANCE_TYPES:
            raise InputError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {self.covariance_type!r}.")
        if not 0.0 < float(self.update_rate) <= 1.0:
            raise InputError(f"update_rate must be in (0, 1], got {self.update_rate!r}.")
        if not (math.isfinite(float(self.alpha)) and float(self.alpha) > 0):
            raise InputError(f"alpha must be a positive number, got {self.alpha!r}.")
        if not (math.isfinite(float(self.reg_covar)) and float(self.reg_covar) > 0):
            raise InputError(f"reg_covar must be a positive number, got {self.reg_covar!r}.")
        if not 0.0 <= float(self.weight_threshold) < 1.0:
            raise InputError(f"weight_threshold must be in [0, 1), got {self.weight_threshold!r}.")
        if self.init not in INITS:
            raise InputError(f"init must be one of {INITS}, got {self.init!r}.")
        if self.dtype not in _DTYPES.values():
            raise InputError(f"dtype must be torch.float32 or torch.float64, got {self.dtype!r}.")

    def _as_batch(self, x: Any, name: str = "x", check_features: bool = True) -> torch.Tensor:
        """Validate a batch (N, D) and return it as a contiguous CPU tensor of the model's dtype."""
        if isinstance(x, torch.Tensor):
            t = x.detach()
            if t.is_complex() or t.dtype == torch.bool:
                raise InputError(f"{name} must hold real numbers, got a {t.dtype} tensor.")
        else:
            a = np.asarray(x)
            if a.dtype.kind not in "fiu":
                raise InputError(f"{name} must hold real numbers, got an array of dtype {a.dtype}.")
            t = torch.from_numpy(np.ascontiguousarray(a))
        if t.ndim != 2:
            raise InputError(f"{name} must be a 2-D array of shape (n_samples, n_features), got shape {tuple(t.shape)}.")
        n, d = t.shape
        if n == 0:
            raise InputError(f"{name} is empty (0 rows); pass at least one sample.")
        if d < 2:
            raise InputError(f"{name} has {d} feature(s); the mixture needs embeddings of at least 2 dimensions.")
        expected = getattr(self, "n_features_in_", None) if check_features else None
        if expected is not None and d != expected:
            raise InputError(f"{name} has {d} features but the mixture was fitted on {expected}; pass embeddings of the same backbone.")
        # the state lives on the device of the first batch it saw; later batches follow it there
        if getattr(self, "means_", None) is not None:
            device = self.means_.device
        else:
            device = torch.device(self.device) if self.device is not None else t.device
        t = t.to(device=device, dtype=self.dtype).contiguous()
        if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
            raise InputError(f"{name} contains NaN or infinite values (after conversion to {self.dtype}); clean the embeddings first.")
        return t

    def _require_state(self) -> None:
        if getattr(self, "means_", None) is None:
            raise InputError("the mixture has no state yet; call fit, partial_fit, set_state or load first.")

    # ------------------------------------------------------------------ state

    @property
    def log_weights_(self) -> torch.Tensor:
        """(K,) log mixture weights from the sticks; -inf marks dead components."""
        if getattr(self, "sticks_", None) is None:  # AttributeError, so hasattr() works as for any unfitted estimator
            raise AttributeError("the mixture has no state yet; call fit, partial_fit, set_state or load first.")
        return log_weights_from_sticks(self.sticks_)

    @property
    def weights_(self) -> torch.Tensor:
        """(K,) mixture weights pi_k."""
        return self.log_weights_.exp()

    @property
    def active_(self) -> torch.Tensor:
        """(K,) bool: weight above weight_threshold (compared in log space) and, once fitted, a share of the data above it.

        The second condition drops the truncation's last component, which inherits the leftover stick mass
        (v_K = 1) even when no data is assigned to it.
        """
        log_w = self.log_weights_
        threshold = float(self.weight_threshold)
        active = log_w > (math.log(threshold) if threshold > 0 else -math.inf)
        if self.n_iter_ > 0:
            count = self.stat_count_.to(torch.float64)
            active &= count > threshold * count.sum()
        return active

    def prototypes(self) -> torch.Tensor:
        """(n_active, D) means of the active components."""
        self._require_state()
        return self.means_[self.active_]

    def set_state(self, means: Any, covariances: Any, sticks: Any, alpha: float) -> "DirichletProcessMixture":
        """Start from an explicit state (as at the start of a fit: running statistics zero). The last stick is set to 1."""
        self._check_params()
        means_t = self._as_batch(means, "means", check_features=False)
        k, d = means_t.shape
        if k != self.n_components:
            raise InputError(f"means has {k} rows but n_components is {self.n_components}.")
        cov = torch.as_tensor(np.asarray(covariances) if not isinstance(covariances, torch.Tensor) else covariances)
        cov = cov.detach().to(device=means_t.device, dtype=self.dtype).clone()
        expected = {"diag": (k, d), "spherical": (k,), "full": (k, d, d)}[self.covariance_type]
        if tuple(cov.shape) != expected:
            raise InputError(f"covariances for covariance_type={self.covariance_type!r} must have shape {expected}, got {tuple(cov.shape)}.")
        if not bool(torch.isfinite(cov).all()):
            raise InputError("covariances contain NaN or infinite values.")
        if self.covariance_type == "full":
            c64 = cov.to(torch.float64)
            if not torch.allclose(c64, c64.mT, rtol=1e-5, atol=1e-12) or bool((torch.linalg.cholesky_ex(c64)[1] != 0).any()):
                raise InputError("covariances must be symmetric positive definite matrices.")
        elif bool((cov <= 0).any()):
            raise InputError("covariances (variances) must be positive.")
        v = torch.as_tensor(np.asarray(sticks) if not isinstance(sticks, torch.Tensor) else sticks)
        v = v.detach().to(device=means_t.device, dtype=self.dtype).clone()
        if tuple(v.shape) != (k,):
            raise InputError(f"sticks must have shape ({k},), got {tuple(v.shape)}.")
        if not bool(((v >= 0) & (v <= 1)).all()):
            raise InputError("sticks (stick-breaking ratios) must lie in [0, 1].")
        if not (math.isfinite(float(alpha)) and float(alpha) > 0):
            raise InputError(f"alpha must be a positive number, got {alpha!r}.")
        v[-1] = 1.0
        self._install(means_t.clone(), cov, v, float(alpha))
        return self

    def _install(self, means: torch.Tensor, cov: torch.Tensor, sticks: torch.Tensor, alpha: float) -> None:
        """Set the learned state and zero the running statistics."""
        k, d = means.shape
        self.means_ = means
        self.covariances_ = cov
        self.sticks_ = sticks
        self.alpha_ = alpha
        self.n_features_in_ = d
        self.n_iter_ = 0
        self.stat_count_ = torch.zeros(k, dtype=self.dtype, device=means.device)
        self.stat_sum_ = torch.zeros(k, d, dtype=self.dtype, device=means.device)
        self.stat_square_ = torch.zeros_like(cov)

    def _initialise(self, x: torch.Tensor) -> None:
        """Means from the whole batch (k-means++ on a subsample, or random rows), batch covariance, sticks ~ Beta(1, alpha)."""
        n, d = x.shape
        k = self.n_components
        if n < k:
            raise InputError(f"cannot initialise {k} components from a batch of {n} rows; pass a first batch of at least {k} rows or lower n_components.")
        g = _generator(self.seed, 1)
        if self.init == "kmeans++":
            m = min(n, max(KMEANS_PP_MAX_ROWS, 4 * k))
            sub = torch.randperm(n, generator=g)[:m] if m < n else torch.arange(n)
            idx = sub[kmeans_plusplus(x[sub], k, g)]
        else:
            idx = torch.randperm(n, generator=g)[:k]
        means = x[idx].clone()
        centred = x - x.mean(0)
        r = float(self.reg_covar)
        if self.covariance_type == "diag":
            cov = ((centred * centred).mean(0) + r).expand(k, d).clone()
        elif self.covariance_type == "spherical":
            cov = torch.full((k,), float((centred * centred).mean()) + r, dtype=self.dtype, device=x.device)
        else:
            c = centred.T @ centred / n
            c.diagonal().add_(r)
            cov = c.expand(k, d, d).clone()
        u = torch.rand(k, generator=g, dtype=torch.float64)
        sticks = (1.0 - u.pow(1.0 / float(self.alpha))).to(device=x.device, dtype=self.dtype)
        sticks[-1] = 1.0
        self._install(means, cov, sticks, float(self.alpha))

    # ------------------------------------------------------------------ densities

    def _reference_point(self) -> torch.Tensor:
        """A fixed point near the data (weighted mean of the means): centring on it keeps matmul distances accurate."""
        w = self.weights_
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
        return (w / w.sum().clamp_min(1e-300)) @ self.means_ if float(w.sum()) > 0 else self.means_.mean(0)

    def _cholesky(self, idx: torch.Tensor) -> torch.Tensor:
        """Cholesky factors of the selected full covariances, with growing jitter for any that fail."""
        cov = self.covariances_[idx]
        factors, info = torch.linalg.cholesky_ex(cov)
        jitter = float(self.reg_covar)
        for _ in range(8):
            if not bool((info != 0).any()):
                return factors
            bad = (info != 0).nonzero().squeeze(1)
            jitter *= 10.0
            logger.warning("covariance of %d component(s) is not positive definite; adding %.1e to its diagonal", len(bad), jitter)
            f, info_bad = torch.linalg.cholesky_ex(cov[bad] + jitter * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device))
            factors[bad] = f
            info = torch.zeros_like(info)
            info[bad] = info_bad
        if bool((info != 0).any()):
            bad = idx[(info != 0).nonzero().squeeze(1)].tolist()
            raise InputError(f"covariances of components {bad[:5]} are not positive definite even with {jitter:.1e} added; raise reg_covar.")
        return factors

    def _log_gauss(self, xc: torch.Tensor, idx: torch.Tensor, centre: torch.Tensor, chol: torch.Tensor | None = None,
                   xc2: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
        """(len(idx), N) log N(x_n | mu_k, Sigma_k) + offset_k for the components idx, from centred data xc = x - centre.

        Components along rows (a K x N product is faster than N x K, and the statistics then read it contiguously).
        Diagonal: -1/2 [1/var_k . xc^2 - 2 mc_k/var_k . xc + mc_k^2 . 1/var_k + log|Sigma_k| + D log 2 pi]: two matrix
        products, every per-component term folded into their bias column.
        """
        d = xc.shape[1]
        mc = self.means_[idx] - centre
        bias = torch.zeros(len(idx), dtype=xc.dtype, device=xc.device) if offset is None else offset.clone()
        if self.covariance_type == "diag":
            var = self.covariances_[idx]
            prec = var.reciprocal()
            bias -= 0.5 * ((mc * mc * prec).sum(1) + torch.log(var).sum(1) + d * _LOG_2PI)
            out = torch.addmm(bias.unsqueeze(1), prec, (xc * xc if xc2 is None else xc2).T, alpha=-0.5)
            return out.addmm_(mc * prec, xc.T)
        if self.covariance_type == "spherical":
            var = self.covariances_[idx]
            bias -= 0.5 * ((mc * mc).sum(1) / var + d * torch.log(var) + d * _LOG_2PI)
            out = torch.addmm(bias.unsqueeze(1), mc / var.unsqueeze(1), xc.T)
            return out.addr_(var.reciprocal(), (xc * xc).sum(1), alpha=-0.5)
        if chol is None:
            chol = self._cholesky(idx)
        n = xc.shape[0]
        out = torch.empty(len(idx), n, dtype=xc.dtype, device=xc.device)
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        step = max(1, _FULL_CHUNK_ELEMENTS // max(1, n * d))
        eye = torch.eye(d, dtype=xc.dtype, device=xc.device)
        for start in range(0, len(idx), step):
            stop = min(start + step, len(idx))
            # z_n = L^-1 (x_n - mu) = L^-1 x_n - L^-1 mu: one GEMM against the stacked inverse factors of the chunk
            inv = torch.linalg.solve_triangular(chol[start:stop], eye, upper=False)  # (c, D, D)
            shift = (inv @ mc[start:stop].unsqueeze(2)).squeeze(2)  # (c, D)
            z = (xc @ inv.mT.transpose(0, 1).reshape(d, -1)).view(n, stop - start, d)  # (N, c, D), c * N * D bounded
            out[start:stop] = (z - shift).pow_(2).sum(2).T
        return out.mul_(-0.5).add_((bias - 0.5 * (logdet + d * _LOG_2PI)).unsqueeze(1))

    def log_prob_components(self, x: Any, include_weights: bool = False) -> torch.Tensor:
        """(N, K) log N(x | mu_k, Sigma_k); log pi_k is NOT included unless include_weights (then dead ones are -inf)."""
        self._require_state()
        x = self._as_batch(x)
        idx = torch.arange(self.n_components, device=x.device)
        centre = self._reference_point()
        chol = self._cholesky(idx) if self.covariance_type == "full" else None
        offset = self.log_weights_ if include_weights else None
        return torch.cat([self._log_gauss(c - centre, idx, centre, chol, offset=offset).T for c in x.split(_SCORE_CHUNK_ROWS)])

    def score_samples(self, x: Any) -> torch.Tensor:
        """(N,) log-likelihood log sum_k pi_k N(x | mu_k, Sigma_k) of each sample under the mixture."""
        self._require_state()
        x = self._as_batch(x)
        log_w = self.log_weights_
        idx = torch.isfinite(log_w).nonzero().squeeze(1)
        centre = self._reference_point()
        chol = self._cholesky(idx) if self.covariance_type == "full" else None
        parts = []
        for c in x.split(_SCORE_CHUNK_ROWS):
            parts.append(_logsumexp_columns(self._log_gauss(c - centre, idx, centre, chol, offset=log_w[idx])))
        return torch.cat(parts)

    def score(self, x: Any) -> float:
        """Mean log-likelihood per sample."""
        return float(self.score_samples(x).mean())

    # ------------------------------------------------------------------ EM

    def _e_step(self, xc: torch.Tensor, centre: torch.Tensor, xc2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Responsibilities (K_alive, N) of the components with finite log-weight, their indices, and log p(x_n)."""
        log_w = self.log_weights_
        idx = torch.isfinite(log_w).nonzero().squeeze(1)
        resp = self._log_gauss(xc, idx, centre, xc2=xc2, offset=log_w[idx])  # log pi_k + log N(x_n | k)
        top = resp.amax(0, keepdim=True)
        # exp(a - top) clipped at e^-87 (a normal float32): exp never produces slow subnormal numbers
        resp.sub_(top).clamp_min_(-87.0).exp_()
        total = resp.sum(0, keepdim=True)
        resp.masked_fill_(resp < RESP_FLOOR * total, 0.0).div_(total)  # gamma < 1e-30 flushed to exactly 0
        return resp, idx, (top + total.log()).squeeze(0)

    def _statistic_sums(self, x: torch.Tensor, xc: torch.Tensor, centre: torch.Tensor, xc2: torch.Tensor | None,
                        resp: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch SUMS (not yet divided by n) scattered to all K: sum gamma, sum gamma x, and sum gamma x^2 (diag),
        sum gamma |x|^2 (spherical) or sum gamma x x^T (full; K x D x D). Sums of several shards add up (torchrun)."""
        resp_sum = resp.sum(1)
        count = torch.zeros_like(self.stat_count_)
        count[idx] = resp_sum
        s = torch.zeros_like(self.stat_sum_)
        q = torch.zeros_like(self.stat_square_)
        if self.covariance_type == "diag":
            # products over the centred data (shared with the E-step), moved back to the origin exactly:
            # sum g x = sum g xc + g_sum c,  sum g x^2 = sum g xc^2 + 2 c sum g xc + g_sum c^2
            sum_c = resp @ xc
            q[idx] = resp @ xc2 + 2.0 * centre * sum_c + resp_sum.unsqueeze(1) * (centre * centre)
            s[idx] = sum_c + resp_sum.unsqueeze(1) * centre
            return count, s, q
        s[idx] = resp @ x
        if self.covariance_type == "spherical":
            q[idx] = resp @ (x * x).sum(1)
            return count, s, q
        for j, k in enumerate(idx.tolist()):
            rows = (resp[j] > 0).nonzero().squeeze(1)
            if len(rows) > 0:
                xr = x[rows]
                q[k].addmm_((xr * resp[j, rows].unsqueeze(1)).T, xr)
        return count, s, q

    def _apply_sums(self, count: torch.Tensor, s: torch.Tensor, q: torch.Tensor, n: int) -> None:
        """EMA of the per-sample statistics from batch sums over n rows: stat <- (1 - rho) stat + rho sum / n."""
        rho = float(self.update_rate)
        keep = 1.0 - rho
        self.stat_count_ = keep * self.stat_count_ + rho * (count / n)
        self.stat_sum_ = keep * self.stat_sum_ + rho * (s / n)
        if self.covariance_type == "full":
            self.stat_square_.mul_(keep).add_(q, alpha=rho / n)
        else:
            self.stat_square_ = keep * self.stat_square_ + rho * (q / n)

    def _update_statistics(self, x: torch.Tensor, xc: torch.Tensor, centre: torch.Tensor, xc2: torch.Tensor | None,
                           resp: torch.Tensor, idx: torch.Tensor) -> None:
        """EMA of the per-sample statistics: N_k, S_k = mean gamma x, Q_k = mean gamma x^2 (diag) / |x|^2 / x x^T."""
        n = x.shape[0]
        if self.covariance_type != "full":
            self._apply_sums(*self._statistic_sums(x, xc, centre, xc2, resp, idx), n)
            return
        rho = float(self.update_rate)
        keep = 1.0 - rho
        resp_sum = resp.sum(1)
        count = torch.zeros_like(self.stat_count_)
        count[idx] = resp_sum / n
        self.stat_count_ = keep * self.stat_count_ + rho * count
        s = torch.zeros_like(self.stat_sum_)
        s[idx] = resp @ x / n
        self.stat_sum_ = keep * self.stat_sum_ + rho * s
        square = self.stat_square_.mul_(keep)  # K x D x D: updated in place, never copied
        for j, k in enumerate(idx.tolist()):
            rows = (resp[j] > 0).nonzero().squeeze(1)  # only the samples this component explains
            if len(rows) == 0:
                continue
            xr = x[rows]
            square[k].addmm_((xr * resp[j, rows].unsqueeze(1)).T, xr, alpha=rho / n)

    def _m_step(self, n: int) -> None:
        """Means, covariances, sticks (with the current alpha), then alpha, from the running statistics."""
        denom = self.stat_count_ + EPS
        means = self.stat_sum_ / denom.unsqueeze(1)
        r = float(self.reg_covar)
        if self.covariance_type == "diag":
            cov = (self.stat_square_ / denom.unsqueeze(1) - means * means).clamp_min_(0).add_(r)
        elif self.covariance_type == "spherical":
            d = means.shape[1]
            cov = ((self.stat_square_ / denom - (means * means).sum(1)) / d).clamp_min_(0).add_(r)
        else:
            cov = self.stat_square_ / denom.view(-1, 1, 1)
            cov.baddbmm_(means.unsqueeze(2), means.unsqueeze(1), alpha=-1.0)
            for block in cov.split(64):  # symmetrise in blocks: no second K x D x D temporary
                block.add_(block.mT.clone()).mul_(0.5)
            cov.diagonal(dim1=1, dim2=2).add_(r)
        self.means_ = means
        self.covariances_ = cov
        self.sticks_, self.alpha_ = self._sticks_and_alpha(n)

    def _sticks_and_alpha(self, n: int) -> tuple[torch.Tensor, float]:
        """v_k = N_k / (N_k + (alpha-1)/n + T_k + eps) (mode, clipped to [0, 1]), v_K = 1; alpha by the digamma fixed point."""
        count = self.stat_count_.to(torch.float64)
        suffix = torch.flip(torch.cumsum(torch.flip(count, [0]), 0), [0])
        tail = torch.cat([suffix[1:], count.new_zeros(1)])
        alpha = float(self.alpha_)
        denom = count + (alpha - 1.0) / n + tail + EPS
        ratio = count / denom.clamp_min(torch.finfo(torch.float64).tiny)
        v = torch.where(denom > 0, ratio, (count > 0).to(torch.float64)).clamp_(0.0, 1.0)
        v[-1] = 1.0
        k = len(count)
        if not self.alpha_fixed and k > 1:
            terms = torch.digamma(n * (count[:-1] + tail[:-1]) + alpha + 1.0) - torch.digamma(n * tail[:-1] + alpha)
            alpha = float((k - 1) / terms.sum())
        return v.to(self.dtype), alpha

    def partial_fit(self, x: Any, distributed: bool = False) -> "DirichletProcessMixture":
        """One EM step (E-step, EMA statistics update, M-step) on a batch (N, D); initialises from it if needed.

        ``distributed=True`` under torchrun: ``x`` is this rank's share of a global batch (it may be empty);
        see :meth:`_partial_fit_shard`. Without a process group it is the ordinary step.
        """
        self._check_params()
        if distributed and dist.is_distributed():
            return self._partial_fit_shard(x)
        batch = self._as_batch(x)
        if getattr(self, "means_", None) is None:
            self._initialise(batch)
        centre = self._reference_point()
        xc = batch - centre
        xc2 = xc * xc if self.covariance_type == "diag" else None
        resp, idx, log_norm = self._e_step(xc, centre, xc2)
        self._update_statistics(batch, xc, centre, xc2, resp, idx)
        del resp, xc, xc2
        self._m_step(batch.shape[0])
        self.n_iter_ += 1
        self.log_likelihood_ = float(log_norm.mean())
        return self

    # ------------------------------------------------------------------ EM across torchrun ranks

    def _partial_fit_shard(self, x: Any) -> "DirichletProcessMixture":
        """One EM step on this rank's share of a global batch: local E-step sums, ONE all-reduce, the same M-step.

        The all-reduced buffer (model dtype) is [rows, ranks taking part, failed ranks, log-likelihood sum,
        sum gamma (K), sum gamma x (K D), sum gamma x^2 (K D diag, K spherical, K D D full)]. A rank whose
        local work raised sends the failure flag, so every rank stops at the same step (no hang): the one that
        failed re-raises its error, the others raise DistributedError.
        """
        error: Exception | None = None
        sums: tuple[torch.Tensor, ...] | None = None
        n_local, loglik = 0, 0.0
        try:
            batch = self._as_shard(x)
        except Exception as exc:  # reported to every rank below
            error = exc
        if getattr(self, "means_", None) is None:
            if dist.global_sum(1.0 if error is not None else 0.0) > 0:
                raise error if error is not None else dist.PeerFailedError("another rank failed on its first batch; its message is above.")
            self._initialise_shard(batch)
        try:
            if error is None and batch.shape[0] > 0:
                centre = self._reference_point()
                xc = batch - centre
                xc2 = xc * xc if self.covariance_type == "diag" else None
                resp, idx, log_norm = self._e_step(xc, centre, xc2)
                sums = self._statistic_sums(batch, xc, centre, xc2, resp, idx)
                n_local, loglik = batch.shape[0], float(log_norm.double().sum())
                del resp, xc, xc2
        except dist.DistributedError:
            raise
        except Exception as exc:  # reported to every rank through the flag below
            error = exc
        header = torch.tensor([n_local, 1.0, 1.0 if error is not None else 0.0, loglik], dtype=self.dtype,
                              device=self.means_.device)
        if sums is None:
            sums = (torch.zeros_like(self.stat_count_), torch.zeros_like(self.stat_sum_), torch.zeros_like(self.stat_square_))
        buffer = dist.all_reduce_sum(torch.cat([header, *(t.reshape(-1) for t in sums)]))
        if float(buffer[1]) != dist.world_size():
            raise dist.DistributedError("the ranks hold different numbers of batches; give every rank as many batches (arrays are split evenly).")
        if float(buffer[2]) > 0:
            if error is not None:
                raise error
            raise dist.PeerFailedError("another rank failed during the EM step; its message is above.")
        n = int(round(float(buffer[0])))
        if n == 0:
            raise InputError("a global batch has no rows on any rank; give the ranks data or use fewer batches.")
        sizes = [t.numel() for t in sums]
        parts = buffer[4:].split(sizes)
        count, s, q = (part.view_as(t) for part, t in zip(parts, sums))
        self._apply_sums(count, s, q, n)
        self._m_step(n)
        self.n_iter_ += 1
        self.batch_rows_ = n
        self.log_likelihood_ = float(buffer[3]) / n
        return self

    def _as_shard(self, x: Any) -> torch.Tensor:
        """A rank's share of a batch as a tensor; unlike _as_batch it may have 0 rows (a rank with little data)."""
        if x is not None and len(x) > 0:
            return self._as_batch(x)
        d = x.shape[1] if x is not None and getattr(x, "ndim", 0) == 2 else getattr(self, "n_features_in_", 0)
        device = self.means_.device if getattr(self, "means_", None) is not None else torch.device(self.device or "cpu")
        return torch.zeros((0, d), dtype=self.dtype, device=device)

    def _initialise_shard(self, batch: torch.Tensor) -> None:
        """Initialise on rank 0 from the whole first global batch (gathered in rank order), then broadcast the state."""
        rows = dist.gather_rows(batch.cpu())
        if rows.shape[0] < self.n_components:  # decided on every rank alike, before rank 0 works alone
            raise InputError(f"cannot initialise {self.n_components} components from a first global batch of {rows.shape[0]} rows; "
                             f"pass more rows per batch or lower n_components.")
        state, failure = None, None
        if dist.is_main():
            try:
                self._initialise(rows.to(batch.device))
                state = {"means": self.means_, "covariances": self.covariances_, "sticks": self.sticks_,
                         "alpha": torch.tensor([float(self.alpha_)], dtype=torch.float64)}
            except Exception as exc:  # sent to the other ranks, so none waits for a state that never comes
                failure = exc
        message = dist.broadcast_object(None if failure is None else str(failure))
        if message is not None:
            raise failure if failure is not None else dist.PeerFailedError(f"rank 0 could not initialise the mixture: {message}")
        state = dist.broadcast_tensors(state)
        if not dist.is_main():
            self._install(state["means"].to(batch.device), state["covariances"].to(batch.device),
                          state["sticks"].to(batch.device), float(state["alpha"][0]))

    def _end_epoch_shard(self) -> None:
        """The all-reduce every rank makes after its last batch: a rank still holding batches would not match it."""
        buffer = torch.zeros(4 + self.stat_count_.numel() + self.stat_sum_.numel() + self.stat_square_.numel(),
                             dtype=self.dtype, device=self.means_.device)
        if float(dist.all_reduce_sum(buffer)[1]) != 0:
            raise dist.DistributedError("the ranks hold different numbers of batches; give every rank as many batches (arrays are split evenly).")

    def fit(
        self,
        X: Any,
        epochs: int = 40,
        batch_size: int = 12288,
        shuffle: bool = True,
        callback: Callable[[int, "DirichletProcessMixture"], bool | None] | None = None,
        distributed: bool = False,
        block_rows: int = 1,
        read_threads: int = READ_THREADS,
    ) -> "DirichletProcessMixture":
        """Run EM over X for some epochs, continuing from the current state if there is one (set_state, load, fit).

        X is an (N, D) tensor or array of any real dtype (a float16 np.memmap is read batch by batch), split into
        ceil(N / batch_size) near-equal batches of rows permuted per epoch; or a re-iterable of batches (a list is
        shuffled in batch order, other iterables are used as they come). callback(epoch, model) returning True stops.
        ``block_rows`` > 1 draws an array's rows in contiguous blocks of that many rows (the blocks are permuted,
        each batch holds about batch_size / block_rows of them, each read with one positional read of a memory
        mapped file, ``read_threads`` at a time; see normdino.methods.batches) and, as such batches are not a
        uniform sample of the rows, a new state is initialised from batch_size rows drawn from all of X.
        ``read_seconds_`` is the time the last epoch spent waiting for its batches.

        ``distributed=True`` under torchrun: X is this rank's share of the data. Arrays are split into
        ceil(N_global / batch_size) parts on every rank, so the i-th parts of all ranks form a global batch of
        about batch_size rows; lists must hold as many batches on every rank (their i-th batches form one).
        Every rank ends with the same model as one process fitting those global batches. The callback runs on
        every rank and must decide the same way on all of them (use normdino.distributed.global_mean).
        """
        self._check_params()
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
            raise InputError(f"epochs must be a positive integer, got {epochs!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        sync = distributed and dist.is_distributed()
        batches = batch_source(X, int(batch_size), shard_layout(X) if sync else None, block_rows, read_threads)
        if isinstance(batches, BatchSource) and batches.block_rows > 1 and getattr(self, "means_", None) is None:
            sample = batches.sample(int(batch_size), _generator(self.seed, 3))
            if sync:
                self._initialise_shard(self._as_shard(sample))
            else:
                self._initialise(self._as_batch(sample))
        g = _generator(self.seed, 2, int(getattr(self, "n_iter_", 0)))
        for epoch in range(epochs):
            total, rows = 0.0, 0
            self.read_seconds_ = 0.0
            epoch_batches = batches(g if shuffle else None)
            while True:
                started = time.perf_counter()
                batch = next(epoch_batches, None)
                self.read_seconds_ += time.perf_counter() - started
                if batch is None:
                    break
                self.partial_fit(batch, distributed=sync)
                n_rows = self.batch_rows_ if sync else len(batch)
                total += self.log_likelihood_ * n_rows
                rows += n_rows
            if sync:
                self._end_epoch_shard()
            if rows == 0:
                raise InputError("X yielded no batches in this epoch; pass an array, or a list (not a one-shot iterator) of batches.")
            self.epoch_log_likelihood_ = total / rows
            logger.info("epoch %d: mean log-likelihood %.4f, %d active components, alpha %.4g",
                        epoch, self.epoch_log_likelihood_, int(self.active_.sum()), self.alpha_)
            if callback is not None and callback(epoch, self):
                break
        return self

    def to(self, device: torch.device | str) -> "DirichletProcessMixture":
        """Move the learned state (and running statistics) to ``device``; later batches are scored there."""
        self.device = device
        for name in ("means_", "covariances_", "sticks_", "stat_count_", "stat_sum_", "stat_square_"):
            if getattr(self, name, None) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    # ------------------------------------------------------------------ persistence

    def get_config(self) -> dict[str, Any]:
        """JSON-able hyper-parameters and the format version."""
        dtype_name = next((name for name, dt in _DTYPES.items() if dt == self.dtype), str(self.dtype))
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "n_components": int(self.n_components),
            "covariance_type": self.covariance_type,
            "update_rate": float(self.update_rate),
            "alpha": float(self.alpha),
            "alpha_fixed": bool(self.alpha_fixed),
            "reg_covar": float(self.reg_covar),
            "weight_threshold": float(self.weight_threshold),
            "init": self.init,
            "dtype": dtype_name,
            "seed": int(self.seed),
        }

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The full learned state (alpha and running statistics included) as contiguous CPU tensors (copies)."""
        self._require_state()
        return {
            "means": self.means_.cpu().clone().contiguous(),
            "covariances": self.covariances_.cpu().clone().contiguous(),
            "sticks": self.sticks_.cpu().clone().contiguous(),
            "alpha": torch.tensor([float(self.alpha_)], dtype=torch.float64),
            "stat_count": self.stat_count_.cpu().clone().contiguous(),
            "stat_sum": self.stat_sum_.cpu().clone().contiguous(),
            "stat_square": self.stat_square_.cpu().clone().contiguous(),
            "n_iter": torch.tensor([int(self.n_iter_)], dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "DirichletProcessMixture":
        """Rebuild a mixture from to_tensors() and get_config(); ModelFileError if they do not fit together."""
        if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
            raise ModelFileError("the model state is not a normdino Dirichlet process mixture (format tag missing); save it with DirichletProcessMixture.save.")
        if config.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"the mixture was saved in format version {config.get('format_version')!r}, this normdino reads version {FORMAT_VERSION}; refit or use the matching normdino version.")
        params = {k: config[k] for k in ("n_components", "covariance_type", "update_rate", "alpha", "alpha_fixed",
                                         "reg_covar", "weight_threshold", "init", "seed") if k in config}
        if config.get("dtype") not in _DTYPES:
            raise ModelFileError(f"the mixture's dtype {config.get('dtype')!r} is not one of {tuple(_DTYPES)}.")
        model = cls(**params, dtype=_DTYPES[config["dtype"]])
        try:
            model._check_params()
        except InputError as exc:
            raise ModelFileError(f"the mixture's saved hyper-parameters are invalid: {exc}") from exc
        missing = [k for k in _STATE_KEYS if k not in tensors]
        if missing:
            raise ModelFileError(f"the mixture state lacks tensor(s) {missing}; the file is truncated or not a normdino mixture.")
        t = {k: tensors[k].detach().to("cpu") for k in _STATE_KEYS}
        if t["means"].ndim != 2:
            raise ModelFileError(f"the mixture's means have shape {tuple(t['means'].shape)}, expected (K, D).")
        k, d = t["means"].shape
        cov_shape = {"diag": (k, d), "spherical": (k,), "full": (k, d, d)}[model.covariance_type]
        expected = {"means": (model.n_components, d), "covariances": cov_shape, "sticks": (k,), "alpha": (1,),
                    "stat_count": (k,), "stat_sum": (k, d), "stat_square": cov_shape if model.covariance_type != "full" else (k, d, d),
                    "n_iter": (1,)}
        for key, shape in expected.items():
            if tuple(t[key].shape) != shape:
                raise ModelFileError(f"the mixture's tensor {key!r} has shape {tuple(t[key].shape)}, expected {shape}; the file does not match its configuration.")
            if key != "n_iter" and not bool(torch.isfinite(t[key].to(torch.float64)).all()):
                raise ModelFileError(f"the mixture's tensor {key!r} contains NaN or infinite values; the file is corrupt.")
        alpha = float(t["alpha"][0])
        if alpha <= 0 or d < 2:
            raise ModelFileError("the mixture's state is invalid (alpha must be positive, D at least 2).")
        model._install(t["means"].to(model.dtype).clone(), t["covariances"].to(model.dtype).clone(),
                       t["sticks"].to(model.dtype).clone(), alpha)
        model.stat_count_ = t["stat_count"].to(model.dtype).clone()
        model.stat_sum_ = t["stat_sum"].to(model.dtype).clone()
        model.stat_square_ = t["stat_square"].to(model.dtype).clone()
        model.n_iter_ = int(t["n_iter"][0])
        return model

    def save(self, path: str | os.PathLike) -> None:
        """Write the mixture to one .safetensors file (config JSON in its metadata), atomically."""
        from safetensors.torch import save_file

        tensors = self.to_tensors()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={CONFIG_METADATA_KEY: json.dumps(self.get_config())})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DirichletProcessMixture":
        """Read a mixture written by save(); InputError if the file is missing, ModelFileError if it is not one."""
        p = Path(path)
        if not p.is_file():
            raise InputError(f"mixture file {p} does not exist; check the path.")
        metadata, tensors = read_safetensors(p, "a normdino mixture file")
        try:
            config = json.loads(metadata[CONFIG_METADATA_KEY])
        except (KeyError, ValueError) as exc:
            raise ModelFileError(f"{p} has no normdino mixture configuration in its metadata; it was not written by DirichletProcessMixture.save.") from exc
        return cls.from_tensors(tensors, config)


class ActiveComponents(DirichletProcessMixture):
    """The active components of a fitted mixture, with their log weights frozen: all that its densities read.

    ``log_prob_components``, ``score_samples`` and ``score`` work as on the full mixture (up to float rounding:
    the centring point is the weighted mean of the active means only); the truncation's dead components, the
    stick-breaking ratios and the EM running statistics are not kept. For scoring only: it refuses to be fitted
    further or saved (keep the full mixture for that).
    """

    def __init__(self, mixture: DirichletProcessMixture) -> None:
        mixture._require_state()
        config = mixture.get_config()
        params = {k: config[k] for k in ("covariance_type", "update_rate", "alpha", "alpha_fixed", "reg_covar",
                                         "weight_threshold", "init", "seed")}
        active = mixture.active_
        super().__init__(n_components=int(active.sum()), dtype=mixture.dtype, device=mixture.device, **params)
        self.means_ = mixture.means_[active].clone()
        self.covariances_ = mixture.covariances_[active].clone()
        self.frozen_log_weights_ = mixture.log_weights_[active].clone()
        self.alpha_ = mixture.alpha_
        self.n_features_in_ = mixture.n_features_in_
        self.n_iter_ = mixture.n_iter_

    @property
    def log_weights_(self) -> torch.Tensor:
        return self.frozen_log_weights_

    @property
    def active_(self) -> torch.Tensor:
        return torch.ones(self.frozen_log_weights_.shape[0], dtype=torch.bool, device=self.frozen_log_weights_.device)

    def to(self, device: torch.device | str) -> "ActiveComponents":
        self.device = device
        self.means_, self.covariances_ = self.means_.to(device), self.covariances_.to(device)
        self.frozen_log_weights_ = self.frozen_log_weights_.to(device)
        return self

    def _scoring_only(self, *args, **kwargs):
        raise InputError("this mixture holds only the active components that scoring reads; it cannot be fitted "
                         "further or saved (keep the full mixture for that)")

    partial_fit = fit = set_state = to_tensors = save = _scoring_only


def _logsumexp_columns(a: torch.Tensor) -> torch.Tensor:
    """log sum_k exp(a_kn) per column; terms more than 87 nats below the column maximum (under 1e-38 of it) are clipped.

    The clip keeps exp() away from subnormal results, which are 10-40x slower on CPU; the error is below 1e-35.
    """
    top = a.amax(0, keepdim=True)
    return (a - top).clamp_min_(-87.0).exp_().sum(0).log_().add_(top.squeeze(0))
