"""What the server logs: requests and timings, never anything of a patient's data.

Readers' warnings can quote an upload's header values (pydicom: "Invalid value for VR UI: '1.2.840.<name>'"),
so warnings become log records whose text is withheld; result ids in URLs are bearer secrets (without a token,
an id is enough to download the input's pixels) and query strings may carry a token, so the access log shows
neither.
"""

from __future__ import annotations

import logging
import re

_SAFE_QUERY_KEYS = ("model", "fpr")
_RESULT_ID = re.compile(r"[0-9a-fA-F]{32}")
_WARNING_TEXT = re.compile(r"^(?P<file>.*?):(?P<line>\d+): (?P<category>\w+): ", re.S)
_READERS = ("pydicom", "nibabel", "PIL", "tifffile", "highdicom", "numpy")


def redact_path(path: str) -> str:
    """A request target with result ids replaced by ``<id>`` and query values other than model/fpr withheld."""
    target, sep, query = path.partition("?")
    target = _RESULT_ID.sub("<id>", target)
    if not sep:
        return target
    parts = []
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        parts.append(item if key in _SAFE_QUERY_KEYS or not eq else f"{key}=<withheld>")
    return f"{target}?{'&'.join(parts)}"


class AccessLogRedaction(logging.Filter):
    """uvicorn's access log line (client, method, path, version, status) with :func:`redact_path` applied."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_path(args[2]), *args[3:])
        return True


class WithheldText(logging.Filter):
    """A warning's or a reader's log text replaced by where it came from: it may quote the upload's data."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        found = _WARNING_TEXT.match(message)
        if found:
            origin = next((r for r in _READERS if f"/{r}/" in found["file"].replace("\\", "/")), "a library")
            what = f"{found['category']} from {origin}"
        else:
            what = f"{record.levelname.lower()} message from {record.name}"
        record.msg, record.args = "%s while reading an upload (text withheld: it may quote patient data)", (what,)
        return True


class ResultIdRedaction(logging.Filter):
    """Any record's text with result ids replaced by ``<id>`` (e.g. a writer naming the result folder it wrote)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _RESULT_ID.search(message):
            record.msg, record.args = _RESULT_ID.sub("<id>", message), None
        return True


def withhold_patient_data() -> None:
    """Install the filters (idempotent): warnings through logging with their text withheld, pydicom's own log
    likewise, the access log without result ids or query secrets, and no result id through normdino's handlers."""
    logging.captureWarnings(True)
    for name, cls in (("py.warnings", WithheldText), ("pydicom", WithheldText), ("uvicorn.access", AccessLogRedaction)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())
    for name in ("normdino", ""):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, ResultIdRedaction) for f in handler.filters):
                handler.addFilter(ResultIdRedaction())
