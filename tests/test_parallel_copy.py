"""Large host copies on several threads: every byte lands where it belongs, whatever the split."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

from shared import parallel_copy
from shared.parallel_copy import MIN_SLICE, copy_many

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def copy_threads(monkeypatch):
    monkeypatch.setenv("PROMPTCAST_COPY_THREADS", "3")
    seen = set()
    copyto = np.copyto

    def spy(target, source):
        seen.add(threading.current_thread().name)
        copyto(target, source)

    monkeypatch.setattr(parallel_copy.np, "copyto", spy)
    return seen


@pytest.mark.parametrize("sizes", [[3 * MIN_SLICE + 7], [MIN_SLICE, MIN_SLICE + 1, 5], [2 * MIN_SLICE - 1], [0, 64]])
def test_every_byte_lands_in_its_place(copy_threads, sizes):
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    targets = [bytearray(n) for n in sizes]
    copy_many([(memoryview(t), memoryview(s)) for t, s in zip(targets, sources)])
    assert [bytes(t) for t in targets] == sources
    large = sum(n // MIN_SLICE for n in sizes) > 1
    assert any(name.startswith("copy") for name in copy_threads) is large  # small copies stay on the caller


@pytest.mark.parametrize("size", [0, 5, MIN_SLICE, 3 * MIN_SLICE + 7])
def test_a_crc_in_slices_is_zlibs_crc(monkeypatch, size):
    import zlib

    monkeypatch.setenv("PROMPTCAST_COPY_THREADS", "3")
    seen, crc = set(), parallel_copy._crc32

    def spy(*args):
        seen.add(threading.current_thread().name)
        return crc(*args)

    monkeypatch.setattr(parallel_copy, "_crc32", spy)
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    for start in (0, 0x1234ABCD):
        assert parallel_copy.crc32(data, start) == zlib.crc32(data.tobytes(), start)
    assert any(name.startswith("copy") for name in seen) is (size >= 2 * MIN_SLICE)


def test_a_mismatched_pair_is_an_error_before_anything_is_copied():
    target = bytearray(8)
    with pytest.raises(ValueError, match="copy of 9 bytes into 8"):
        copy_many([(memoryview(bytearray(4)), b"abcd"), (memoryview(target), b"x" * 9)])
    assert target == bytearray(8)


def test_one_thread_copies_alone(monkeypatch, copy_threads):
    monkeypatch.setenv("PROMPTCAST_COPY_THREADS", "1")
    target = bytearray(4 * MIN_SLICE)
    copy_many([(memoryview(target), b"\x01" * len(target))])
    assert target.count(1) == len(target) and copy_threads == {threading.current_thread().name}


CHILD = """
import os
from shared.parallel_copy import MIN_SLICE, copy_many
copy_many([(memoryview(bytearray(2 * MIN_SLICE)), bytes(2 * MIN_SLICE))])  # the parent's helper threads exist now
pid = os.fork()
if pid == 0:  # a DataLoader worker, say: none of the parent's threads came along
    target = bytearray(2 * MIN_SLICE)
    copy_many([(memoryview(target), b"\\x02" * len(target))])
    os._exit(0 if target.count(2) == len(target) else 1)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_copies_with_threads_of_its_own():
    done = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, "PROMPTCAST_COPY_THREADS": "2"},
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0
