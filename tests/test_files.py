"""Atomic writes: complete files under their final names, with the umask's permissions, from many threads."""

import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from normdino.files import atomic_file, atomic_path, atomic_write_text


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_threads_writing_at_once_keep_the_umask_and_get_its_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a read-by-setting umask race shows at once
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: atomic_write_text(tmp_path / f"{i}.txt", str(i)), range(400)))
    finally:
        sys.setswitchinterval(old_interval)
        after = os.umask(mask)
    assert after == mask
    modes = {stat.S_IMODE((tmp_path / f"{i}.txt").stat().st_mode) for i in range(400)}
    assert modes == {0o666 & ~mask}
    assert all((tmp_path / f"{i}.txt").read_text() == str(i) for i in range(400))


def test_a_failed_block_leaves_neither_the_file_nor_a_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("stopped half-way")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_file_appears_complete_with_the_umask_permissions_or_not_at_all(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    with atomic_file(tmp_path / "sub" / "a.bin") as f:
        f.write(b"first")
        assert not (tmp_path / "sub" / "a.bin").exists()  # not under its name before the block ends
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"first"
    assert stat.S_IMODE((tmp_path / "sub" / "a.bin").stat().st_mode) == 0o666 & ~mask
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_file(tmp_path / "sub" / "a.bin") as f:
            f.write(b"second, half")
            raise RuntimeError("stopped half-way")
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"first"  # the earlier file is untouched
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.bin"]  # no temporary file left
