"""Socket owners from /proc kept between snapshots (sensor/owners.py): descriptor numbers and
pids get reused, and the owners must stay right; on a /proc tree made here, then the real one."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sensor.owners import SocketOwners, _read_dense


class FakeProc:
    """A /proc with processes (stat start time, fd links) written by the test."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def process(self, pid: int, start: int, fds: dict[int, str]) -> None:
        base = self.root / str(pid)
        shutil.rmtree(base, ignore_errors=True)
        (base / "fd").mkdir(parents=True)
        fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 20
        (base / "stat").write_text(f"{pid} (a (b) c) {' '.join(fields)}\n")
        for fd, target in fds.items():
            self.link(pid, fd, target)

    def link(self, pid: int, fd: int, target: str) -> None:
        path = self.root / str(pid) / "fd" / str(fd)
        path.unlink(missing_ok=True)
        os.symlink(target, path)


def snapshot(owners: SocketOwners, sockets: set[int], closed: set[int] | None = None
             ) -> dict[int, int]:
    """The owners of ``sockets`` as a Netlink snapshot asks for them: a read before the dump,
    the sockets found closed, then another read for the sockets the first did not know."""
    found = owners.read()
    owners.closed(closed or set())
    unknown = {inode for inode in sockets if inode not in found and not owners.ownerless(inode)}
    return owners.complete(unknown, sockets) if unknown else found


def test_owners_follow_reused_descriptors_and_pids(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    proc.process(10, 500, {0: "/dev/null", 3: "socket:[100]", 4: "socket:[300]"})
    proc.process(20, 600, {5: "socket:[200]", 6: "socket:[300]"})
    proc.process(30, 700, {})
    owners = SocketOwners(tmp_path)
    # a socket no read finds (999) takes one recheck, even at the first snapshot
    assert snapshot(owners, {100, 200, 300, 999}) == {100: 10, 200: 20, 300: 10}
    assert owners.rechecks == 1
    owners.closed({999})
    found = owners.read()
    assert found == {100: 10, 200: 20, 300: 10}  # 300: the lowest of its pids
    assert found.pids([300, 999, 0, 100]) == [10, -1, -1, 10]
    # socket 100 closed and its descriptor number reused: unknown to the read before the dump
    # (same descriptors listed), read again once it is known closed; no recheck needed
    proc.link(10, 3, "socket:[101]")
    assert 101 not in owners.read()
    assert snapshot(owners, {101, 200, 300}, closed={100})[101] == 10
    assert owners.rechecks == 1
    # a descriptor reused while its old socket lives on elsewhere: the new one is unknown
    # until a recheck, which reads the descriptors of a socket held twice again, and finds
    # that pid 10 no longer holds 300
    proc.link(10, 4, "socket:[400]")
    assert snapshot(owners, {101, 200, 300, 400}) == {101: 10, 200: 20, 300: 20, 400: 10}
    assert owners.rechecks == 2
    # pid 20 exited and another process got its pid (its socket 200 lives on in pid 10):
    # nothing read of the old process is kept, no recheck needed
    proc.link(10, 7, "socket:[200]")
    proc.process(20, 900, {5: "socket:[500]"})
    assert snapshot(owners, {101, 200, 400, 500}, closed={300}) == {101: 10, 200: 10, 400: 10,
                                                                      500: 20}
    assert owners.rechecks == 2
    # a socket nobody holds (a kernel socket): one recheck, not one per snapshot, until it
    # is closed
    reads = owners.rechecks
    for _ in range(3):
        assert 999 not in snapshot(owners, {101, 200, 400, 500, 999})
    assert owners.rechecks == reads + 1
    snapshot(owners, {101, 200, 400, 500}, closed={999})
    assert 999 not in snapshot(owners, {101, 200, 400, 500, 999})
    assert owners.rechecks == reads + 2


def test_a_recheck_reads_again_what_may_hold_another_socket(tmp_path: Path,
                                                            monkeypatch: Any) -> None:
    """Descriptors listed as before may hold a new socket while the first dump runs (a shell's
    child execs a client, say): one that held a pipe, or a socket the dump does not show (a
    Unix one). A recheck reads those again, not a descriptor whose socket is still dumped."""
    proc = FakeProc(tmp_path)
    proc.process(10, 500, {0: "/dev/null", 3: "pipe:[7]", 4: "socket:[50]", 5: "socket:[60]"})
    owners = SocketOwners(tmp_path)
    assert owners.read() == {50: 10, 60: 10}
    proc.link(10, 3, "socket:[100]")
    proc.link(10, 4, "socket:[101]")
    proc.link(10, 5, "socket:[102]")
    assert not owners.ownerless(100)
    links: list[str] = []
    readlink = os.readlink

    def counted(path: str, *, dir_fd: int | None = None) -> str:
        links.append(path)
        return readlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "readlink", counted)
    # 60 is dumped and no other descriptor holds it: descriptor 5 is taken as read
    assert owners.complete({100, 101}, alive={60, 100, 101}) == {60: 10, 100: 10, 101: 10}
    assert sorted(links) == ["0", "3", "4"] and owners.rechecks == 1


def test_owner_of_a_real_socket() -> None:
    with socket.socket() as sock:
        inode = os.fstat(sock.fileno()).st_ino
        owners = SocketOwners()
        assert owners.read()[inode] == os.getpid()
        assert owners.read()[inode] == os.getpid()
    assert inode not in SocketOwners().read()


def test_a_first_read_without_a_listing_finds_what_a_listing_finds() -> None:
    """A process whose descriptors are 0 to n - 1 is read without listing its descriptors (the
    kernel gives their count); one with a gap is read through a listing; both give every
    socket its owner, and a later read takes them whole from the first."""
    script = ("import os, socket, sys; s = [socket.socket() for _ in range(6)]; "
              "os.close(s[int(sys.argv[1])].detach()); sys.stdin.read()")
    children = [subprocess.Popen([sys.executable, "-c", script, gap], stdin=subprocess.PIPE)
                for gap in ("5", "0")]  # the last socket closed: dense; the first: a gap
    try:
        deadline = time.monotonic() + 30
        while any(len(os.listdir(f"/proc/{c.pid}/fd")) != 8 for c in children):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        wholes, sockets = [], {}
        for child in children:
            directory = os.open(f"/proc/{child.pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
            try:
                names, inodes, whole = _read_dense(directory)
                wholes.append(whole)
                links = {}
                for fd in os.listdir(directory):
                    target = os.readlink(fd, dir_fd=directory)
                    links[fd] = int(target[8:-1]) if target.startswith("socket:[") else 0
                    if links[fd]:
                        sockets[links[fd]] = child.pid
                # the descriptors read before the first one not open, with their inodes
                assert names == [str(fd) for fd in range(len(names))]
                assert dict(zip(names, inodes, strict=True)) == {
                    name: links[name] for name in names}
                assert len(names) == (8 if whole else 3)  # the gap: descriptor 3
            finally:
                os.close(directory)
        assert wholes == [True, False] and len(sockets) == 10
        owners = SocketOwners()
        found = owners.read()
        assert {inode: found.get(inode) for inode in sockets} == sockets
        # what the first read kept is what a listing gives: the next read takes it whole
        for child in children:
            listing = "\0".join(os.listdir(f"/proc/{child.pid}/fd"))
            assert owners._processes[child.pid].listing == listing
        assert owners.read().items() >= sockets.items()
    finally:
        for child in children:
            child.stdin.close()
            child.wait()
