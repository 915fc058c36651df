"""What an upload is, told from its bytes (never its name), and checked before any inference runs.

Kinds: PNG, JPEG and TIFF images; NIfTI volumes (.nii or gzip-compressed); zip archives of one DICOM series.
Checks: a size limit while the bytes arrive, decoded sizes from headers before decoding (decompression bombs:
a tiny PNG or gzip that claims gigapixels, a zip whose members inflate a thousandfold), and a full decode or
header read so that truncated files fail here, with one sentence, and not halfway through a volume.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from normdino.errors import InputError
from normdino.serving.settings import MB, ServeSettings

log = logging.getLogger(__name__)

_CHUNK = 1 * MB
_NIFTI1_HEADER, _NIFTI2_HEADER = 348, 540
_DICOM_MAGIC_OFFSET = 128
_SMALL_ZIP = 16 * MB  # zips inflating to less than this are never called bombs
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is zlib-deflated
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SUPPORTED = "PNG, JPEG or TIFF images, NIfTI volumes (.nii, .nii.gz) or a zip of one DICOM series"


class UploadError(InputError):
    """An upload refused before any work, with the HTTP status that says why (400, 413 or 415)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """A checked upload: ``kind`` is "image" or "volume"; ``path`` a file or a DICOM series folder."""

    kind: str
    format: str
    path: Path
    shape: tuple[int, ...]


def copy_limited(source: BinaryIO, target: Path, max_bytes: int) -> int:
    """Copy a stream to ``target``, refusing it (413) as soon as it passes ``max_bytes``; returns the size."""
    size = 0
    with open(target, "wb") as out:
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise UploadError(f"The upload is larger than the server's limit of {max_bytes / MB:g} MB.", 413)
            out.write(chunk)
    if size == 0:
        raise UploadError("The uploaded file is empty.")
    return size


def sniff(head: bytes) -> str | None:
    """The format of a file from its first bytes: png, jpeg, tiff, nifti, gzip, zip, dicom, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if _nifti_header_size(head):
        return "nifti"
    if head[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    return None


def _nifti_header_size(head: bytes) -> int:
    """348 or 540 when ``head`` starts a NIfTI-1 or NIfTI-2 header (size field and magic agree), else 0."""
    if len(head) >= _NIFTI1_HEADER and head[344:347] in (b"n+1", b"ni1"):
        if _NIFTI1_HEADER in struct.unpack("<i", head[:4]) + struct.unpack(">i", head[:4]):
            return _NIFTI1_HEADER
    if len(head) >= 12 and head[4:7] in (b"n+2", b"ni2"):
        if _NIFTI2_HEADER in struct.unpack("<i", head[:4]) + struct.unpack(">i", head[:4]):
            return _NIFTI2_HEADER
    return 0


def check_upload(raw: Path, folder: Path, settings: ServeSettings) -> Upload:
    """Identify the upload at ``raw`` from its content, check it, and place it in ``folder`` under a neutral name."""
    with open(raw, "rb") as f:
        head = f.read(1024)
    kind = sniff(head)
    if kind in ("png", "jpeg", "tiff"):
        path = raw.rename(folder / f"image.{'tif' if kind == 'tiff' else kind}")
        return Upload("image", kind, path, _check_image(path, settings.max_image_pixels, settings.max_tiff_frames))
    if kind == "nifti":
        path = raw.rename(folder / "volume.nii")
        return Upload("volume", "nifti", path, _check_nifti(path, False, settings.max_volume_voxels))
    if kind == "gzip":
        path = raw.rename(folder / "volume.nii.gz")
        return Upload("volume", "nifti", path, _check_nifti(path, True, settings.max_volume_voxels))
    if kind == "zip":
        series = folder / "series"
        _extract_dicom_zip(raw, series, settings)
        raw.unlink()
        return Upload("volume", "dicom", series, _check_volume(series, settings.max_volume_voxels))
    if kind == "dicom":
        raise UploadError("A single DICOM file is one slice: upload a zip of the whole series.", 415)
    raise UploadError(f"The upload is not a supported file: send {_SUPPORTED}.", 415)


def _check_image(path: Path, max_pixels: int, max_frames: int) -> tuple[int, int]:
    """(H, W) of an image whose header is sane and whose pixels decode completely."""
    from PIL import Image, UnidentifiedImageError

    from normdino.io.reading import read_image

    if path.suffix == ".tif":
        pages = tiff_page_count(path, max_frames)
        if pages > max_frames:
            raise UploadError(f"The uploaded TIFF holds more than {max_frames} pages, more than the server's limit; "
                              f"send the one image to score.", 413)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise UploadError("The uploaded image claims more pixels than Pillow will decode; it was refused as a "
                          "decompression bomb.", 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UploadError(f"The uploaded image has an unreadable header ({err}).") from None
    if width * height > max_pixels:
        raise UploadError(f"The uploaded image is {width}x{height} pixels, more than the server's limit of "
                          f"{max_pixels / 1e6:g} megapixels.", 413)
    read_image(path)  # decodes fully: truncated or corrupt pixel data fails here, before any work
    return height, width


def tiff_page_count(path: Path, limit: int) -> int:
    """The pages (IFDs) of a TIFF or BigTIFF, counted along its IFD chain without decoding, up to ``limit + 1``.

    Pillow counts pages by seeking through every one (tens of seconds for a small file of 60 000 pages);
    this stops as soon as the count passes the limit, and refuses a chain that loops or leaves the file.
    """
    with open(path, "rb") as f:
        head = f.read(16)
        order = "<" if head[:2] == b"II" else ">"
        try:
            big = struct.unpack(order + "H", head[2:4])[0] == 43
            offset = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
            count_format, entry_size, next_format = ("Q", 20, "Q") if big else ("H", 12, "I")
            count_size, next_size = struct.calcsize(count_format), struct.calcsize(next_format)
            size = path.stat().st_size
            seen: set[int] = set()
            pages = 0
            while offset and pages <= limit:
                if offset in seen or offset + count_size > size:
                    raise UploadError("The uploaded TIFF is corrupt: its chain of pages loops or points outside "
                                      "the file.")
                seen.add(offset)
                f.seek(offset)
                entries = struct.unpack(order + count_format, f.read(count_size))[0]
                f.seek(offset + count_size + entries * entry_size)
                pages += 1
                offset = struct.unpack(order + next_format, f.read(next_size))[0]
        except struct.error:
            raise UploadError("The uploaded TIFF is truncated: its chain of pages ends inside the file.") from None
    return pages


def _read_head(path: Path, compressed: bool, size: int) -> bytes:
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            return f.read(size)
    except (OSError, EOFError, zlib.error) as err:
        raise UploadError(f"The uploaded file is gzip-compressed but its stream is corrupt or truncated "
                          f"({err}).") from None


def _check_nifti(path: Path, compressed: bool, max_voxels: int) -> tuple[int, ...]:
    """Shape of a NIfTI upload, refusing bombs (decoded size from the header) and truncated data."""
    head = _read_head(path, compressed, _NIFTI2_HEADER + 4)
    header_size = _nifti_header_size(head)
    if not header_size:
        what = "gzip-compressed file" if compressed else "file"
        raise UploadError(f"The uploaded {what} is not a NIfTI volume: send {_SUPPORTED}.", 415)
    expected = _nifti_data_end(head, header_size)
    voxels = expected[1]
    if voxels > max_voxels:
        raise UploadError(f"The uploaded volume holds {voxels:,} voxels, more than the server's limit of "
                          f"{max_voxels:,}.", 413)
    if compressed:
        _check_gzip_length(path, expected[0])
    return _check_volume(path, max_voxels)


def _nifti_data_end(head: bytes, header_size: int) -> tuple[int, int]:
    """(bytes up to the end of the image data, voxel count) from a NIfTI-1/2 header, either byte order."""
    import nibabel as nib

    cls = nib.Nifti1Header if header_size == _NIFTI1_HEADER else nib.Nifti2Header
    try:
        header = cls.from_fileobj(_BytesReader(head), check=False)
        shape = header.get_data_shape()
        itemsize = np.dtype(header.get_data_dtype()).itemsize
        offset = int(header.get("vox_offset", header_size + 4))
    except Exception as err:  # nibabel raises several types for nonsense headers
        raise UploadError(f"The uploaded NIfTI header is unreadable ({err}).") from None
    voxels = int(np.prod([int(s) for s in shape], dtype=np.float64)) if shape else 0
    if voxels <= 0:
        raise UploadError("The uploaded NIfTI header describes an empty volume.")
    return max(offset, header_size) + voxels * itemsize, voxels


class _BytesReader:
    """The read() that nibabel's header parser needs, over bytes."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        out = self.data[self.pos:] if n < 0 else self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def _check_gzip_length(path: Path, expected: int) -> None:
    """Decompress once, counting: refuse a stream that ends before the header's data or inflates far past it."""
    limit = expected + 16 * MB
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(4 * MB):
                total += len(chunk)
                if total > limit:
                    raise UploadError("The uploaded volume decompresses to far more data than its header "
                                      "describes; it was refused as a decompression bomb.", 413)
    except (OSError, EOFError, zlib.error) as err:
        raise UploadError(f"The uploaded volume is truncated or corrupt ({err}).") from None
    if total < expected:
        raise UploadError("The uploaded volume is truncated: its header promises more image data than it holds.")


def _check_volume(path: Path, max_voxels: int) -> tuple[int, ...]:
    """Open the volume's headers with normdino's reader (one series, geometry, completeness); its shape."""
    from normdino.io.volumes import Volume

    with Volume.open(path) as volume:
        shape = tuple(int(s) for s in volume.shape)
        affine = np.asarray(volume.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise UploadError("The uploaded volume's geometry (voxel sizes, orientation or position) holds NaN or "
                          "infinite values; fix the header (pixdim, qform/sform, or the DICOM position tags).")
    if int(np.prod(shape, dtype=np.float64)) > max_voxels:
        raise UploadError(f"The uploaded volume holds {int(np.prod(shape)):,} voxels, more than the server's limit "
                          f"of {max_voxels:,}.", 413)
    return shape


def dicom_inflated_size(path: Path, limit: int) -> int:
    """The bytes a DICOM file's dataset takes once read: its size, or for the deflated transfer syntax its
    inflated size, counted in bounded chunks and refused (413) past ``limit``.

    pydicom inflates a deflated dataset whole in memory (even to read only its header), so a 400 KB file can
    cost gigabytes; this measures it first without holding more than one chunk.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        meta = _file_meta(f)
        if meta is None or meta[0] != _DEFLATED:
            if size > limit:
                raise UploadError(f"A DICOM file in the uploaded zip is {size / MB:,.0f} MB, more than the server's "
                                  f"limit of {limit / MB:g} MB per file.", 413)
            return size
        f.seek(meta[1])
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = meta[1]
        try:
            while not inflater.eof:
                chunk = inflater.unconsumed_tail or f.read(_CHUNK)
                if not chunk:  # a truncated stream: the reader says so later
                    break
                total += len(inflater.decompress(chunk, _CHUNK))  # at most one chunk out per call
                if total > limit:
                    raise UploadError(f"A deflated DICOM file in the uploaded zip inflates to more than the "
                                      f"server's limit of {limit / MB:g} MB per file; it was refused as a "
                                      f"decompression bomb.", 413)
        except zlib.error:
            raise UploadError("A deflated DICOM file in the uploaded zip is corrupt or truncated.") from None
    return total


def _file_meta(f: BinaryIO) -> tuple[str, int] | None:
    """(transfer syntax UID, offset where the dataset starts) of a DICOM Part 10 file, or None when it has no
    readable file meta group (its group length and transfer syntax, explicit VR little endian)."""
    f.seek(_DICOM_MAGIC_OFFSET)
    if f.read(4) != b"DICM":
        return None
    first = f.read(12)  # (0002,0000) UL, length 4: the group's length
    if len(first) < 12 or first[:6] != b"\x02\x00\x00\x00UL":
        return None
    end = _DICOM_MAGIC_OFFSET + 4 + 12 + struct.unpack("<I", first[8:12])[0]
    group = f.read(min(end - f.tell(), 64 * 1024))
    pos, syntax = 0, None
    while pos + 8 <= len(group):
        tag, vr = group[pos:pos + 4], group[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length, start = struct.unpack("<I", group[pos + 8:pos + 12])[0], pos + 12
        else:
            length, start = struct.unpack("<H", group[pos + 6:pos + 8])[0], pos + 8
        if tag == b"\x02\x00\x10\x00":  # (0002,0010) TransferSyntaxUID
            syntax = group[start:start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    return (syntax, end) if syntax else None


def _looks_like_dicom(name: str, head: bytes) -> bool:
    base = name.rsplit("/", 1)[-1]
    if base.upper() == "DICOMDIR" or base.startswith("."):
        return False
    return base.lower().endswith(".dcm") or head[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _extract_dicom_zip(raw: Path, target: Path, settings: ServeSettings) -> int:
    """Extract the DICOM files of a zip flat into ``target`` under neutral names; returns how many.

    Member names are never used as paths (no traversal); declared sizes are checked before extraction
    (count, total, compression ratio) and zipfile stops each member at its declared size and checks its CRC.
    """
    try:
        archive = zipfile.ZipFile(raw)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise UploadError(f"The uploaded zip is corrupt or truncated ({err}).") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir() and "__MACOSX" not in m.filename]
        if len(members) > settings.max_zip_files:
            raise UploadError(f"The uploaded zip holds {len(members)} files, more than the server's limit of "
                              f"{settings.max_zip_files}.", 413)
        total = sum(m.file_size for m in members)
        max_total = 4 * settings.max_volume_voxels
        if total > max_total:
            raise UploadError(f"The uploaded zip unpacks to {total / MB:,.0f} MB, more than the server's limit "
                              f"of {max_total / MB:,.0f} MB.", 413)
        packed = max(1, raw.stat().st_size)
        if total > _SMALL_ZIP and total > settings.max_zip_ratio * packed:
            raise UploadError(f"The uploaded zip inflates {total / packed:,.0f} times in all, more than the "
                              f"server's limit of {settings.max_zip_ratio:g}; it was refused as a decompression "
                              f"bomb.", 413)
        for m in members:
            if m.flag_bits & 0x1:
                raise UploadError("The uploaded zip is encrypted: send an unencrypted zip of the DICOM series.")
            if m.file_size > MB and m.file_size > settings.max_zip_ratio * max(1, m.compress_size):
                raise UploadError("A file in the uploaded zip inflates more than "
                                  f"{settings.max_zip_ratio:g} times; it was refused as a decompression bomb.", 413)
        target.mkdir()
        count = inflated = 0
        try:
            for m in members:
                with archive.open(m) as source:
                    head = source.read(_DICOM_MAGIC_OFFSET + 4)
                    if not _looks_like_dicom(m.filename, head):
                        continue
                    count += 1
                    extracted = target / f"{count:05d}.dcm"
                    with open(extracted, "wb") as out:
                        out.write(head)
                        shutil.copyfileobj(source, out, _CHUNK)
                inflated += dicom_inflated_size(extracted, settings.max_dicom_file_bytes)
                if inflated > max_total:
                    raise UploadError(f"The DICOM files of the uploaded zip inflate to more than the server's "
                                      f"limit of {max_total / MB:,.0f} MB.", 413)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as err:
            raise UploadError(f"The uploaded zip is corrupt or truncated ({err}).") from None
    if not count:
        raise UploadError("The uploaded zip holds no DICOM files: zip the folder of one DICOM series.", 415)
    return count
