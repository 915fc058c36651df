"""Where an evaluation report goes and which statistics it carries: the options ``evaluate`` and ``bench`` share.

Statistics: 95 % bootstrap intervals over images (``n_bootstrap``), paired permutation tests of method pairs
(``compare``), and metrics also inside the foreground (``foreground``: "auto" intensity rule, "none", or a folder
of masks). See :func:`normdino.evaluation.protocol.evaluate_methods` and :func:`normdino.evaluation.assess.compare_methods`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from normdino.files import check_writable_file, check_writable_folder


@dataclass(frozen=True)
class ReportOptions:
    """The report folder (results.json, results.md, report.html), an optional JSON path instead of
    ``output/results.json``, the timing and subset sizes, and the statistics to compute."""

    output: Path = Path("normdino-evaluation")
    json_path: Path | None = None
    timing_images: int = 10
    max_eval: int | None = None
    foreground: str = "auto"
    n_bootstrap: int = 1000
    compare: tuple[tuple[str, str], ...] = ()
    n_permutations: int = 10_000
    progress: bool = True

    def check_outputs(self) -> None:
        """Before any work: the report folder and the JSON file can be written (one sentence if not)."""
        check_writable_folder(self.output, "report folder")
        if self.json_path:
            check_writable_file(self.json_path, "JSON results file")

    def statistics(self, seed: int) -> dict:
        """The statistics keywords of :func:`normdino.evaluation.protocol.evaluate_methods`."""
        from normdino.evaluation.foreground import foreground_from_option

        return {"foreground": foreground_from_option(self.foreground), "n_bootstrap": self.n_bootstrap, "seed": seed,
                "progress": self.progress}

    def comparisons(self, results: Sequence, seed: int) -> list[dict] | None:
        """Paired permutation tests of the ``compare`` pairs on ``results`` (None when none are asked for)."""
        if not self.compare:
            return None
        from normdino.evaluation.assess import compare_methods

        return compare_methods(results, self.compare, self.n_permutations, seed)
