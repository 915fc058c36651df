"""The server's limits and knobs, in one immutable value shared by the app and the CLI."""

from __future__ import annotations

from dataclasses import dataclass

MB = 2**20
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """Limits that keep one upload from taking the server down, and how requests share the backbone.

    ``max_upload_bytes`` bounds the uploaded file, and ``body_timeout_s`` how long its bytes may take to arrive;
    ``max_image_pixels`` a 2D image's decoded size (far below ``normdino predict``'s 64 MP: one request must not
    take gigabytes) and ``max_tiff_frames`` its pages; ``max_volume_voxels`` a volume's decoded size (NIfTI
    header or DICOM series); ``max_zip_files`` and ``max_zip_ratio`` the members of a DICOM zip and how much it
    may inflate in all, ``max_dicom_file_bytes`` what one DICOM file may inflate to (deflated transfer syntax).
    ``concurrency`` inferences run at once per model; at most ``max_queue`` more wait (then 503). Results stay
    downloadable for ``result_ttl_s`` seconds and take at most ``max_results_bytes`` in all (oldest out first).
    ``token`` set: every API call needs ``Authorization: Bearer <token>``. ``trusted_hosts``: the ``Host``
    headers answered (None: the bound address, and the loopback names when it is a loopback address);
    ``cors_origins``: other web origins allowed to call the API from a browser (none by default).
    """

    max_upload_bytes: int = 256 * MB
    max_image_pixels: int = 16_000_000
    max_tiff_frames: int = 64
    max_volume_voxels: int = 300_000_000
    max_zip_files: int = 5000
    max_zip_ratio: float = 200.0
    max_dicom_file_bytes: int = 64 * MB
    body_timeout_s: float = 300.0
    concurrency: int = 1
    max_queue: int = 16
    result_ttl_s: float = 600.0
    max_results_bytes: int = 2048 * MB
    token: str | None = None
    trusted_hosts: tuple[str, ...] | None = None
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from normdino.errors import InputError

        if self.max_upload_bytes < 1024:
            raise InputError(f"the upload limit must be at least 1 KiB, got {self.max_upload_bytes} bytes")
        if self.max_image_pixels < 1:
            raise InputError(f"the image pixel limit must be positive, got {self.max_image_pixels}")
        if self.concurrency < 1:
            raise InputError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.max_queue < 0:
            raise InputError(f"the queue length must be 0 or more, got {self.max_queue}")
        if self.result_ttl_s <= 0:
            raise InputError(f"the result lifetime must be positive, got {self.result_ttl_s} s")
        if self.body_timeout_s <= 0:
            raise InputError(f"the upload timeout must be positive, got {self.body_timeout_s} s")
        if self.max_results_bytes < 1:
            raise InputError(f"the results' size limit must be positive, got {self.max_results_bytes} bytes")
        if self.token is not None and not self.token.strip():
            raise InputError("the token is empty: give a non-empty secret or leave --token out")

    def hosts_for(self, bound: str) -> list[str]:
        """The ``Host`` names to answer when bound to ``bound``: the configured list, else that address (and
        the loopback names for a loopback address); a wildcard bind (0.0.0.0, ::) without a list answers any."""
        if self.trusted_hosts is not None:
            return list(self.trusted_hosts)
        if bound in ("0.0.0.0", "::", ""):
            return ["*"]
        hosts = [bound, f"[{bound}]"] if ":" in bound else [bound]
        return hosts + [h for h in LOOPBACK_NAMES + ("[::1]",) if bound in LOOPBACK_NAMES and h not in hosts]
