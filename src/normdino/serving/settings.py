"""The server's limits and knobs, in one immutable value shared by the app and the CLI."""

from __future__ import annotations

from dataclasses import dataclass

MB = 2**20


@dataclass(frozen=True)
class ServeSettings:
    """Limits that keep one upload from taking the server down, and how requests share the backbone.

    ``max_upload_bytes`` bounds the uploaded file; ``max_image_pixels`` a 2D image's decoded size;
    ``max_volume_voxels`` a volume's decoded size (NIfTI header or DICOM series); ``max_zip_files`` the
    members of a DICOM zip. ``concurrency`` inferences run at once per model; at most ``max_queue`` more wait
    (then 503). Results stay downloadable for ``result_ttl_s`` seconds. ``token`` set: every API call needs
    ``Authorization: Bearer <token>``.
    """

    max_upload_bytes: int = 256 * MB
    max_image_pixels: int = 40_000_000
    max_volume_voxels: int = 300_000_000
    max_zip_files: int = 5000
    max_zip_ratio: float = 200.0
    concurrency: int = 1
    max_queue: int = 16
    result_ttl_s: float = 600.0
    token: str | None = None

    def __post_init__(self) -> None:
        from normdino.errors import InputError

        if self.max_upload_bytes < 1024:
            raise InputError(f"the upload limit must be at least 1 KiB, got {self.max_upload_bytes} bytes")
        if self.concurrency < 1:
            raise InputError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.max_queue < 0:
            raise InputError(f"the queue length must be 0 or more, got {self.max_queue}")
        if self.result_ttl_s <= 0:
            raise InputError(f"the result lifetime must be positive, got {self.result_ttl_s} s")
        if self.token is not None and not self.token.strip():
            raise InputError("the token is empty: give a non-empty secret or leave --token out")
