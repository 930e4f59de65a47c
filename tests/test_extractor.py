"""The extractor keeps names exactly, gives duplicates a defined outcome, publishes all or nothing; the local
backend's `tar` can neither stall on its warnings nor drop files without a note."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keruta_prefect.artifacts import ArchiveRejected, CollectResult, extract_tar_stream, tar_complaints
from keruta_prefect.backends.base import RunHandle
from keruta_prefect.backends.local import LocalBackend
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store

MiB = 2**20
Entry = tarfile.TarInfo | tuple[str | tarfile.TarInfo, bytes]  # a special entry, or a regular file and its bytes


def directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def archive(*entries: Entry, fmt: int = tarfile.PAX_FORMAT) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
                continue
            info = entry[0] if isinstance(entry[0], tarfile.TarInfo) else tarfile.TarInfo(entry[0])
            info.size = len(entry[1])
            tar.addfile(info, io.BytesIO(entry[1]))
    buffer.seek(0)
    return buffer


def extract(stream: io.BytesIO, dest: Path, file_cap: int = MiB, total_cap: int = 10 * MiB) -> CollectResult:
    return extract_tar_stream(stream, dest, max_file_size=file_cap, max_total_size=total_cap)


def tree(root: Path) -> dict[str, bytes | None]:
    """Everything under ``root``: files with their bytes, directories as None."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        found[path.relative_to(root).as_posix()] = None if path.is_dir() else path.read_bytes()
    return found


def no_staging(dest: Path) -> bool:
    """No staging directory is left, inside ``dest`` or beside it."""
    return not [p for p in (*dest.iterdir(), *dest.parent.iterdir()) if ".incoming-" in p.name]


# -- names --------------------------------------------------------------------------------------------------


def test_names_are_kept_exactly_only_normalised(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    result = extract(archive(directory("."), ("./.env", b"env"), ("./..data", b"dd"), ("./.hidden/x", b"hx"),
                             ("a//b", b"ab"), ("./c/./d", b"cd"), ("e/", b"e"), ("back\\slash.txt", b"bs"),
                             ("...", b"dots"), ("sp ace;x", b"sp")), dest)
    expected = {".env": b"env", "..data": b"dd", ".hidden/x": b"hx", "a/b": b"ab", "c/d": b"cd", "e": b"e",
                "back\\slash.txt": b"bs", "...": b"dots", "sp ace;x": b"sp"}
    assert [f.path for f in result.files] == list(expected)
    assert {f.path: Path(f.location).read_bytes() for f in result.files} == expected
    assert {k: v for k, v in tree(dest).items() if v is not None} == expected and result.skipped == []


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (("sub/../x.txt", b"x"), "unsafe entry 'sub/../x.txt': a '..' component"),
        (("sub/..", b"x"), "unsafe entry 'sub/..': a '..' component"),
        ((".", b"x"), "unsafe entry '.': a file without a name"),
        (("./", b"x"), "unsafe entry './': a file without a name"),
        (directory("d/../.."), "unsafe entry 'd/../..'"),
        (("sub\\..\\x.txt", b"x"), "a '..' component"),
        (("..\\x.txt", b"x"), "a '..' component"),
        (("\\x.txt", b"x"), "an absolute path"),
        (link("ok/../link", "fine.txt"), "a '..' component"),
    ],
)
def test_a_dotdot_component_or_no_name_rejects_the_archive(tmp_path: Path, entry: Entry, reason: str) -> None:
    dest = tmp_path / "out"
    with pytest.raises(ArchiveRejected) as info:
        extract(archive(("fine.txt", b"fine"), entry), dest)
    assert reason in str(info.value)
    assert list(dest.iterdir()) == []


def test_a_nul_in_a_pax_name_rejects_the_archive(tmp_path: Path) -> None:
    entry = tarfile.TarInfo("placeholder")
    entry.pax_headers = {"path": "a\x00b"}
    with pytest.raises(ArchiveRejected, match="a NUL in the name"):
        extract(archive(("fine.txt", b"fine"), (entry, b"x")), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_name_that_is_not_utf8_is_skipped_with_a_note_that_is(tmp_path: Path) -> None:
    raw = b"caf\xe9.txt".decode("utf-8", "surrogateescape")  # Latin-1 bytes, as tar stores them
    result = extract(archive(("ok.txt", b"ok"), (raw, b"latin"), (f"dir-{raw}/x", b"in"), fmt=tarfile.GNU_FORMAT),
                     tmp_path / "out")
    assert [f.path for f in result.files] == ["ok.txt"]
    assert result.skipped == ["caf\\udce9.txt: the name is not valid UTF-8",
                              "dir-caf\\udce9.txt/x: the name is not valid UTF-8"]
    assert (result.note() or "").encode("utf-8")  # storable: no lone surrogates
    assert sorted(os.listdir(tmp_path / "out")) == ["ok.txt"]


def test_names_too_long_for_the_file_system_are_skipped_with_a_note(tmp_path: Path) -> None:
    long_part = "x" * 300 + ".txt"  # over NAME_MAX (255 bytes)
    long_path = "/".join(["d" * 200] * 25) + "/f.txt"  # over PATH_MAX (4096 bytes)
    result = extract(archive(("ok.txt", b"ok"), (long_part, b"a"), (long_path, b"b")), tmp_path / "out")
    assert [f.path for f in result.files] == ["ok.txt"]
    assert result.skipped == [f"{long_part}: the name is too long for the file system",
                              f"{long_path}: the name is too long for the file system"]
    assert tree(tmp_path / "out") == {"ok.txt": b"ok"}


# -- duplicates and collisions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [("a", "a"), ("a", "./a"), ("d/x", "d//x"), ("d/x", "./d/./x"), ("e", "e/")],
)
def test_a_duplicate_entry_the_last_one_wins_as_with_tar_x(tmp_path: Path, names: tuple[str, str]) -> None:
    dest = tmp_path / "out"
    result = extract(archive((names[0], b"first"), ("other.txt", b"o"), (names[1], b"second")), dest)
    name = names[0]
    assert [f.path for f in result.files] == ["other.txt", name] and result.skipped == []
    assert (dest / name).read_bytes() == b"second" and no_staging(dest)


def test_the_last_entry_decides_whether_a_name_is_kept(tmp_path: Path) -> None:
    result = extract(archive(("big", b"small"), ("big", b"y" * 200), ("gone", b"file"), link("gone", "big"),
                             link("back", "gone"), ("back", b"file again"), ("a", b"a" * 60), ("a", b"b" * 60),
                             ("b", b"c" * 40)),
                     tmp_path / "out", file_cap=100, total_cap=110)
    assert {f.path: f.size for f in result.files} == {"back": 10, "a": 60, "b": 40}  # 110: only the last a counts
    assert result.skipped == ["big: 200 bytes is over the 100-byte file cap", "gone: not a regular file"]
    assert tree(tmp_path / "out") == {"back": b"file again", "a": b"b" * 60, "b": b"c" * 40}


@pytest.mark.parametrize(
    "entries",
    [
        [("a", b"file"), ("a/b", b"under a file")],
        [("a/b", b"x"), ("a", b"file over a directory")],
        [directory("a"), ("a", b"file")],
        [("a", b"file"), directory("a/")],
        [link("a", "target"), ("a/b", b"under a link")],
        [("d/e/f", b"x"), ("./d//e", b"file")],
    ],
)
def test_a_name_both_file_and_directory_rejects_the_archive(tmp_path: Path, entries: list[Entry]) -> None:
    dest = tmp_path / "out"
    with pytest.raises(ArchiveRejected, match="is both a file and a directory"):
        extract(archive(("fine.txt", b"fine"), *entries), dest)
    assert list(dest.iterdir()) == []


# -- publishing ---------------------------------------------------------------------------------------------


def test_a_second_collection_replaces_files_of_the_first_and_keeps_the_rest(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    extract(archive(("a", b"old a"), ("keep/c", b"c"), ("sub/x", b"x")), dest)
    result = extract(archive(("a", b"new a"), ("sub/y", b"y"), ("z", b"z")), dest)
    assert [f.path for f in result.files] == ["a", "sub/y", "z"]
    assert tree(dest) == {"a": b"new a", "keep": None, "keep/c": b"c", "sub": None, "sub/x": b"x", "sub/y": b"y",
                          "z": b"z"}


@pytest.mark.parametrize(
    ("earlier", "later", "reason"),
    [
        ([("m/x", b"x")], [("m", b"a file where a directory is")], "a directory of that name is in"),
        ([("d", b"a file")], [("d/x", b"under it")], "a file of that name is in"),
        ([("s/t/u", b"x")], [("s/t", b"file")], "a directory of that name is in"),
    ],
)
def test_a_publish_that_meets_an_earlier_collection_in_the_way_keeps_dest_as_it_was(
        tmp_path: Path, earlier: list[Entry], later: list[Entry], reason: str) -> None:
    dest = tmp_path / "out"
    extract(archive(("a", b"old a"), *earlier), dest)
    before = tree(dest)
    many = [(f"f{i:02d}", b"new") for i in range(40)] + [("s/new", b"new")]  # moved before the conflict, or after
    with pytest.raises(ArchiveRejected, match=reason):
        extract(archive(("a", b"new a"), *many, *later), dest)
    assert tree(dest) == before and no_staging(dest)


@contextmanager
def failing_move(number: int) -> Iterator[list[str]]:
    """The ``number``-th rename or replace (of either) fails with ENOSPC, as a full disk would."""
    calls: list[str] = []
    originals = os.rename, os.replace

    def move(original: object) -> object:
        def wrapper(src: str, dst: str, *args: object, **kwargs: object) -> None:
            calls.append(str(dst))
            if len(calls) == number:
                raise OSError(errno.ENOSPC, "No space left on device (injected)", str(dst))
            original(src, dst, *args, **kwargs)  # type: ignore[operator]
        return wrapper

    os.rename, os.replace = move(originals[0]), move(originals[1])  # type: ignore[assignment]
    try:
        yield calls
    finally:
        os.rename, os.replace = originals


def test_a_publish_failing_midway_moves_everything_back(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    extract(archive(("a", b"old a"), ("keep", b"k")), dest)
    before = tree(dest)
    stream = archive(("a", b"new a"), ("b", b"b"), ("c", b"c"))
    with failing_move(3) as calls, pytest.raises(OSError, match="injected"):
        extract(stream, dest)
    assert tree(dest) == before and no_staging(dest)
    assert len(calls) == 5  # two moves made, the third failed, the two undone


def test_a_first_collection_is_published_in_one_rename(tmp_path: Path) -> None:
    """Into an empty destination the staged tree moves whole: one rename, whatever the number of files."""
    dest = tmp_path / "out"
    with failing_move(0) as calls:  # none fails: it counts them
        result = extract(archive(*[(f"f{i}", b"x") for i in range(20)], ("d/g", b"y")), dest)
    assert len(calls) == 1 and len(result.files) == 21
    assert tree(dest)["d/g"] == b"y" and no_staging(dest)


@pytest.mark.parametrize("fmt", ["gnu", "posix"])  # an old GNU sparse entry; a pax 1.0 sparse one
def test_a_sparse_file_is_kept_whole_with_its_holes(tmp_path: Path, fmt: str) -> None:
    source = tmp_path / "src"
    source.mkdir()
    with (source / "sparse.bin").open("wb") as f:
        f.seek(MiB)
        f.write(b"data")
        f.truncate(3 * MiB)
    made = subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", "-", "-C", str(source), "."],
                          capture_output=True, check=True)
    result = extract(io.BytesIO(made.stdout), tmp_path / "out", file_cap=4 * MiB)
    expected = (source / "sparse.bin").read_bytes()
    assert (tmp_path / "out" / "sparse.bin").read_bytes() == expected
    assert [(f.path, f.size, f.sha256) for f in result.files] == [
        ("sparse.bin", 3 * MiB, hashlib.sha256(expected).hexdigest())]


# -- archives cut short -------------------------------------------------------------------------------------


def test_an_archive_cut_between_two_entries_is_rejected(tmp_path: Path) -> None:
    whole = archive(("a.txt", b"a" * 5000), ("b.txt", b"b")).getvalue()
    first = 512 + 5120  # a.txt's PAX-free header and its data, padded to blocks
    assert whole[first + 257:first + 262] == b"ustar"  # the next header starts here
    for cut in (whole[:first], whole[:first + 100]):
        with pytest.raises(ArchiveRejected, match="cut short"):
            extract(io.BytesIO(cut), tmp_path / "cut")
        assert list((tmp_path / "cut").iterdir()) == []
    garbled = whole[:first] + b"\x07" * 512 + whole[first + 512:]
    with pytest.raises(ArchiveRejected, match="cut short"):
        extract(io.BytesIO(garbled), tmp_path / "garbled")
    assert list((tmp_path / "garbled").iterdir()) == []


# -- the local backend's tar --------------------------------------------------------------------------------


def local_artifacts(store: Store, task_id: str) -> tuple[LocalBackend, RunHandle, Path]:
    backend = LocalBackend(KerutaSettings(), store)
    handle = RunHandle(backend="local", task_id=task_id, attempt=1, name="attempt-1")
    source = backend._work_dir(task_id, 1) / ".keruta" / "artifacts"
    source.mkdir(parents=True)
    return backend, handle, source


def unix_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(path.name)  # relative: a socket path holds at most 107 bytes
    finally:
        sock.close()


def children_named(command: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == os.getpid() and stat[stat.index("(") + 1:stat.rindex(")")] == command:
            found.append(int(entry.name))
    return found


def collect_or_unstick(backend: LocalBackend, handle: RunHandle, dest: Path) -> CollectResult:
    """collect() in a thread; if it has not ended in 120 s (a stalled tar), tar is killed and the test fails."""
    done = threading.Event()
    outcome: list[CollectResult | BaseException] = []

    def run() -> None:
        try:
            outcome.append(backend.collect(handle, dest))
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    if not done.wait(120):
        for pid in children_named("tar"):
            os.kill(pid, signal.SIGKILL)
        done.wait(30)
        pytest.fail("collect() stalled: tar was stuck writing to a stderr nobody read")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def test_tar_stderr_past_64_kib_neither_stalls_nor_drops_a_file(store: Store, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    backend, handle, source = local_artifacts(store, "loud-tar")
    for i in range(50):
        (source / f"f{i:02d}.txt").write_text(f"file {i}\n")
    monkeypatch.chdir(source)
    sockets = [f"socket-{i:04d}-" + "s" * 70 for i in range(800)]
    for name in sockets:
        unix_socket(source / name)
    warnings = sum(len(f"tar: ./{name}: socket ignored\n") for name in sockets)
    assert warnings > 64 * 1024  # more than a pipe holds

    result = collect_or_unstick(backend, handle, tmp_path / "out")
    assert sorted(f.path for f in result.files) == [f"f{i:02d}.txt" for i in range(50)]
    assert sorted(result.skipped) == sorted(f"{name}: socket ignored" for name in sockets)  # each one named


@pytest.fixture
def tar_without_root_powers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, chmod 000 does not stop tar: the real tar runs without CAP_DAC_OVERRIDE/READ_SEARCH."""
    if os.geteuid() != 0:
        return
    real, setpriv = shutil.which("tar"), shutil.which("setpriv")
    if real is None or setpriv is None:
        pytest.skip("running as root and setpriv is missing: no way to make a file unreadable to tar")
    wrapper = tmp_path / "bin" / "tar"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {setpriv} --bounding-set=-dac_override,-dac_read_search {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.usefixtures("tar_without_root_powers")
def test_files_tar_cannot_read_are_named_and_its_exit_status_recorded(store: Store, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    backend, handle, source = local_artifacts(store, "unreadable")
    (source / "ok.txt").write_text("ok")
    (source / "sub").mkdir()
    (source / "sub" / "secret.txt").write_text("secret")
    (source / "sub" / "secret.txt").chmod(0)
    monkeypatch.chdir(source)
    unix_socket(source / "agent.sock")

    result = collect_or_unstick(backend, handle, tmp_path / "out")
    assert [f.path for f in result.files] == ["ok.txt"] and result.lost is None
    assert sorted(result.skipped) == sorted([
        "agent.sock: socket ignored",
        "sub/secret.txt: Cannot open: Permission denied",
        "tar: exit status 2 (Exiting with failure status due to previous errors)",
    ])
    assert "sub/secret.txt: Cannot open: Permission denied" in (result.note() or "")


def test_tar_complaints_are_named_up_to_a_limit_then_counted() -> None:
    lines = [f"tar: ./f{i}: Cannot open: Permission denied\n".encode() for i in range(30)]
    lines += [b"\n", b"tar: Exiting with failure status due to previous errors\n"]
    notes, last = tar_complaints(lines, limit=25)
    assert notes == [f"f{i}: Cannot open: Permission denied" for i in range(25)] + [
        "tar: 5 more complaints about files, not listed"]
    assert last == "Exiting with failure status due to previous errors"
    assert tar_complaints([b"/usr/bin/tar: ./s: socket ignored\n", b"bsdtar: ./t: Can't open\n"]) == (
        ["s: socket ignored", "t: Can't open"], "./t: Can't open")


@pytest.mark.parametrize("earlier", [False, True], ids=["empty", "an-earlier-collection"])
def test_a_symlinked_dest_gets_the_files_where_it_points(tmp_path: Path, earlier: bool) -> None:
    """dest may be a link to the real directory (a volume, a shared folder): the files land there, as with an
    ordinary dest, and no staging is left on either side."""
    real = tmp_path / "volume" / "collected"
    real.mkdir(parents=True)
    if earlier:
        (real / "old.txt").write_bytes(b"kept")
    dest = tmp_path / "dest"
    dest.symlink_to(real)
    result = extract(archive(("dir/new.txt", b"new"), ("top.txt", b"top")), dest)
    assert {a.path for a in result.files} == {"dir/new.txt", "top.txt"}
    kept = {"old.txt": b"kept"} if earlier else {}
    assert tree(real) == {"dir": None, "dir/new.txt": b"new", "top.txt": b"top", **kept}
    assert dest.is_symlink() and no_staging(real) and no_staging(dest)


def test_the_filter_looks_up_no_host_path_an_archive_names(tmp_path: Path) -> None:
    """A member named like a host path (here, one whose lookup would fail loudly if it were made) is checked
    by the names alone: nothing outside the staging directory is looked up."""
    import posixpath

    looked_up: list[str] = []
    real_lstat = os.lstat

    def lstat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        looked_up.append(os.fsdecode(path))  # type: ignore[arg-type]
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    dest = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(posixpath.os, "lstat", lstat)
        extract(archive(("proc/self/cwd/x.txt", b"x"), ("net/host/share/y.txt", b"y")), dest)
    assert not [p for p in looked_up if p.startswith(("/proc", "/net"))], looked_up
    assert tree(dest)["proc/self/cwd/x.txt"] == b"x"
