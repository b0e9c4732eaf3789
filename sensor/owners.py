"""Socket inode -> owning process, from the /proc/<pid>/fd links, kept between snapshots.

Reading every link of every process costs about 5 µs per descriptor, half a second for 100,000
sockets; most of them are the same at the next snapshot. So a snapshot reads only the
descriptors that are new, and those whose socket has gone (the number may have been reused).
A socket whose owner is still unknown after that triggers a full read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _Fds:
    """What was read of one process: its start time (a reused pid has another one) and, per
    descriptor, the inode of its socket (0: not a socket)."""

    start: str
    inodes: dict[str, int]


class SocketOwners:
    """Socket inode -> the lowest pid holding it in a descriptor, for readable /proc/<pid>/fd."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self.full_reads = 0
        self._processes: dict[int, _Fds] = {}
        self._sockets: set[int] = set()  # the sockets of the previous call
        self._ownerless: set[int] = set()  # sockets no readable process held at a full read

    def owners(self, sockets: set[int]) -> dict[int, int]:
        """The owners of the sockets in /proc now (all of them, ``sockets`` included):
        ``sockets`` are the inodes of the TCP and UDP sockets dumped now."""
        found, trusted = self._read(sockets, full=False)
        if sockets - found.keys() - self._ownerless:
            if trusted:  # else that was a full read already
                self.full_reads += 1
                found, _ = self._read(sockets, full=True)
            self._ownerless = sockets - found.keys()
        self._sockets = sockets
        return found

    def _read(self, sockets: set[int], full: bool) -> tuple[dict[int, int], int]:
        """The owners, and how many descriptors were taken from the previous read unread."""
        owners: dict[int, int] = {}
        processes: dict[int, _Fds] = {}
        gone = self._sockets - sockets  # closed since the previous call
        trusted = 0
        for pid in sorted(int(name) for name in os.listdir(self.proc) if name.isdigit()):
            base = f"{self.proc}/{pid}"
            try:
                start = _start_time(base)
                fds = os.listdir(f"{base}/fd")
            except OSError:  # exited, or not ours to read
                continue
            known = None if full else self._processes.get(pid)
            cached = known.inodes if known is not None and known.start == start else {}
            inodes: dict[str, int] = {}
            for fd in fds:
                inode = cached.get(fd)
                if inode is None or inode in gone:
                    inode = _socket_inode(f"{base}/fd/{fd}")
                    if inode is None:
                        continue
                else:
                    trusted += 1
                inodes[fd] = inode
                if inode:
                    owners.setdefault(inode, pid)
            processes[pid] = _Fds(start, inodes)
        self._processes = processes
        return owners, trusted


def _start_time(base: str) -> str:
    """Field 22 of /proc/<pid>/stat (after the command name, which may hold spaces)."""
    with open(f"{base}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[19].decode()


def _socket_inode(link: str) -> int | None:
    """The socket inode a descriptor link names, 0 for other files, None if it is gone."""
    try:
        target = os.readlink(link)
    except OSError:
        return None
    return int(target[8:-1]) if target.startswith("socket:[") else 0
