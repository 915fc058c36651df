"""``index.html`` of a results folder: the inputs, most anomalous first, with overlay thumbnails, verdicts and
scores, in the same self-contained page as the evaluation reports (:func:`normdino.io.report.html_report`).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

INDEX_CSS = """<style>
.table-wrap { overflow-x:auto; max-width:100%; }
td.path { white-space:normal; word-break:break-all; min-width:14em; max-width:28em; }
td.why { white-space:normal; max-width:36em; }
img.thumb { display:block; max-width:420px; max-height:220px; width:auto; height:auto; border-radius:4px; }
.verdict-anomalous { color:#b3261e; font-weight:600; }
.verdict-skipped { color:#8a6d00; }
dl.setting { display:grid; grid-template-columns:max-content 1fr; gap:4px 18px; margin:0; }
dl.setting dt { color:#57606a; } dl.setting dd { margin:0; font-variant-numeric:tabular-nums; }
</style>"""


def format_score(value: float | str) -> str:
    """Scores and thresholds everywhere in the report: four decimals (e.g. 0.1234, -12.5000)."""
    return f"{float(value):.4f}"


def index_row(row: dict) -> str:
    e = html.escape
    preview_file = row.get("overlay") or row.get("top_slices")
    preview = (f'<a href="{e(preview_file, quote=True)}"><img class="thumb" loading="lazy" '
               f'src="{e(preview_file, quote=True)}" alt="overlay of {e(row["input"], quote=True)}"></a>'
               if preview_file else "&mdash;")
    if row["status"] != "ok":
        return (f"<tr><td>{preview}</td><td class=\"path\">{e(row['input'])}</td><td>{e(row['kind'])}</td>"
                f"<td class=\"verdict-skipped\">skipped</td><td class=\"num\">&mdash;</td><td class=\"num\">&mdash;</td>"
                f"<td class=\"why\">{e(row['message'])}</td></tr>")
    verdict = "anomalous" if int(row["anomalous"]) else "normal"
    links = " ".join(f'<a href="{e(row[c], quote=True)}">{label}</a>' for c, label in
                     (("anomaly_map", "map"), ("anomaly_npy", "npy"), ("mask", "mask"), ("overlay", "overlay"),
                      ("top_slices", "slices"), ("dicom_seg", "DICOM seg"), ("dicom_pmap", "DICOM pmap"))
                     if row.get(c))
    return (f"<tr><td>{preview}</td><td class=\"path\">{e(row['input'])}</td><td>{e(row['kind'])}</td>"
            f"<td class=\"verdict-{verdict}\">{verdict}</td><td class=\"num\">{format_score(row['score'])}</td>"
            f"<td class=\"num\">{float(row['anomalous_fraction']):.2%}</td><td>{links}</td></tr>")


def write_index(path: Path, rows: Sequence[dict], summary: dict) -> None:
    """``index.html``: the inputs, most anomalous first, with overlay thumbnails, verdicts and scores."""
    from normdino.io.report import html_report

    e = html.escape
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -float(r["score"]))
    ordered = ok + [r for r in rows if r["status"] != "ok"]
    head = ("<tr><th>Preview</th><th>Input</th><th>Kind</th><th>Verdict</th><th class=\"num\">Image score</th>"
            "<th class=\"num\">Anomalous area</th><th>Files / reason</th></tr>")
    table = (f"{INDEX_CSS}<div class=\"table-wrap\"><table><thead>{head}</thead><tbody>\n"
             + "\n".join(index_row(r) for r in ordered) + "\n</tbody></table></div>")
    setting = [
        ("Inputs", f"{summary['n_inputs']} ({summary['n_anomalous']} anomalous, {summary['n_skipped']} skipped)"),
        ("False-positive rate", f"{float(summary['fpr']):.1%} of healthy pixels / images"),
        ("Pixel threshold", format_score(summary["pixel_threshold"])),
        ("Image threshold", format_score(summary["image_threshold"])),
        ("Method", str(summary.get("method"))), ("Backbone", str(summary.get("backbone"))),
        ("Random weights", "yes" if summary["random_weights"] else "no"),
        *((key.replace("_", " ").capitalize(), str(summary[key])) for key in ("model",) if summary.get(key)),
    ]
    setting_html = "<dl class=\"setting\">" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in setting) + "</dl>"
    html_report(path, "normdino predictions", [("Setting", setting_html), ("Inputs, most anomalous first", table)],
                warning=summary.get("warning"),
                subtitle="Overlays: image | anomaly heat map | predicted mask contour; scores.csv has every number.")
