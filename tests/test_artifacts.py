"""Safe, streaming, capped extraction of artifact archives (the exec/tar collection path)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from keruta_prefect.artifacts import ArchiveRejected, extract_tar_stream

MiB = 2**20


def archive(*entries: tarfile.TarInfo | tuple[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for entry in entries:
            if isinstance(entry, tuple):
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
            else:
                tar.addfile(entry)
    buffer.seek(0)
    return buffer


def special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def extract(stream: io.BytesIO, dest: Path, file_cap: int = MiB, total_cap: int = 10 * MiB) -> object:
    return extract_tar_stream(stream, dest, max_file_size=file_cap, max_total_size=total_cap)


def test_files_zero_byte_and_nested_are_kept_with_checksums(tmp_path: Path) -> None:
    files = {f"many/f{i:03d}.txt": f"file {i}\n".encode() for i in range(300)}
    files["empty.txt"] = b""
    files["deep/a/b/c.bin"] = bytes(range(256)) * 10
    result = extract(archive(*files.items()), tmp_path / "out")
    assert sorted(f.path for f in result.files) == sorted(files)
    for item in result.files:
        data = (tmp_path / "out" / item.path).read_bytes()
        assert data == files[item.path] and item.sha256 == hashlib.sha256(data).hexdigest()
    assert result.skipped == [] and [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def test_caps_skip_and_record_what_is_over_them(tmp_path: Path) -> None:
    result = extract(archive(("small.txt", b"x" * 10), ("big.bin", b"y" * 2000), ("next.txt", b"z" * 950)),
                     tmp_path / "out", file_cap=1000, total_cap=950)
    assert [f.path for f in result.files] == ["small.txt"]  # 10 + 950 would pass the total cap
    assert result.skipped == ["big.bin: 2000 bytes is over the 1000-byte file cap",
                              "next.txt: would pass the 950-byte total cap"]
    assert "not kept: big.bin" in (result.note() or "")


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (("../escape.txt", b"evil"), "unsafe entry '../escape.txt'"),
        (("sub/../../escape.txt", b"evil"), "unsafe entry 'sub/../../escape.txt'"),
        (("/etc/cron.d/evil", b"evil"), "unsafe entry '/etc/cron.d/evil': an absolute path"),
        (special("link", tarfile.SYMTYPE, "/etc/passwd"), "unsafe entry 'link'"),
        (special("link", tarfile.SYMTYPE, "../../outside"), "unsafe entry 'link'"),
        (special("hard", tarfile.LNKTYPE, "../../outside"), "unsafe entry 'hard'"),
        (special("dev", tarfile.CHRTYPE), "unsafe entry 'dev'"),
        (special("fifo", tarfile.FIFOTYPE), "unsafe entry 'fifo'"),
    ],
)
def test_hostile_archives_are_rejected_and_nothing_is_kept(tmp_path: Path, entry: object, reason: str) -> None:
    dest = tmp_path / "task" / "attempt-1"
    stream = archive(("fine.txt", b"fine"), entry)  # type: ignore[arg-type]
    with pytest.raises(ArchiveRejected) as info:
        extract(stream, dest)
    assert reason in str(info.value)
    assert list(dest.iterdir()) == []  # not even the fine file, nor the staging directory
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "task" / "escape.txt").exists()


def test_a_link_inside_is_recorded_not_followed(tmp_path: Path) -> None:
    result = extract(archive(("real.txt", b"data"), special("alias", tarfile.SYMTYPE, "real.txt")), tmp_path / "o")
    assert [f.path for f in result.files] == ["real.txt"] and result.skipped == ["alias: not a regular file"]
    assert not (tmp_path / "o" / "alias").exists()


def test_a_cut_archive_or_not_an_archive_is_rejected(tmp_path: Path) -> None:
    whole = archive(("a.txt", b"a" * 5000)).getvalue()
    with pytest.raises(ArchiveRejected, match="broken or cut short"):
        extract(io.BytesIO(whole[:1500]), tmp_path / "cut")
    assert list((tmp_path / "cut").iterdir()) == []
    with pytest.raises(ArchiveRejected, match="not a tar archive"):
        extract(io.BytesIO(b"this is not a tar archive" * 40), tmp_path / "text")


def test_a_file_count_bomb_stops_at_the_member_cap(tmp_path: Path) -> None:
    stream = archive(*[(f"f{i}", b"") for i in range(50)])
    with pytest.raises(ArchiveRejected, match="more than 20 entries"):
        extract_tar_stream(stream, tmp_path / "bomb", max_file_size=MiB, max_total_size=MiB, max_members=20)


PEAK = """
import os, sys, tarfile, threading
from pathlib import Path
size = int(sys.argv[1])
read_end, write_end = os.pipe()
def produce():  # a 'tar cf -' of one big file, written into a pipe
    with os.fdopen(write_end, "wb") as out, tarfile.open(fileobj=out, mode="w|") as tar:
        info = tarfile.TarInfo("big.bin"); info.size = size
        class Zeros:
            left = size
            def read(self, n):
                n = min(n, self.left); self.left -= n; return bytes(n)
        tar.addfile(info, Zeros())
if size:
    threading.Thread(target=produce, daemon=True).start()
    from keruta_prefect.artifacts import extract_tar_stream
    with os.fdopen(read_end, "rb") as stream:
        result = extract_tar_stream(stream, Path(sys.argv[2]), max_file_size=size, max_total_size=size)
    assert result.files[0].size == size
else:
    from keruta_prefect.artifacts import extract_tar_stream
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
"""


def test_a_200_mb_artifact_streams_with_bounded_memory(tmp_path: Path) -> None:
    def peak(size: int) -> int:
        done = subprocess.run([sys.executable, "-c", PEAK, str(size), str(tmp_path / "big")], capture_output=True,
                              text=True, check=True, env={**os.environ})
        return int(done.stdout.strip())

    baseline = peak(0)
    growth = peak(200 * MiB) - baseline
    assert (tmp_path / "big" / "big.bin").stat().st_size == 200 * MiB
    assert growth < 100 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB"
    print(f"extracting 200 MiB grew peak RSS by {growth / MiB:.1f} MiB")
