"""Socket inode -> owning process, from the /proc/<pid>/fd links, kept between snapshots.

Reading every link of every process costs about 5 µs per descriptor, half a second for 100,000
sockets; most of them are the same at the next snapshot. So a read takes only the descriptors
that are new, and those that held a socket closed since (the number may have been reused); a
process listing the same descriptors as before, none of them holding a socket closed, is taken
whole. A process read for the first time is read without a listing if its descriptors are 0
to n - 1 (most are). What is kept of a process is its listing and an array of inodes: about 14
bytes per descriptor.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _Fds:
    """What was read of one process: its start time (a reused pid has another one), its
    descriptors as listed (joined by NUL) and the inode of each one's socket (0: not a socket)."""

    start: str
    listing: str
    inodes: array[int]


class SocketOwners:
    """Socket inode -> the lowest pid holding it in a descriptor, for readable /proc/<pid>/fd.

    A snapshot calls ``read`` before it dumps the sockets, ``closed`` with the sockets it found
    gone, and ``complete`` for the sockets ``read`` did not know (opened since, or on a
    descriptor reused since).
    """

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self.full_reads = 0
        self._processes: dict[int, _Fds] = {}
        self._gone: set[int] = set()  # sockets closed since the last read
        self._trusted = 0  # descriptors the last ``read`` took from the one before, unread
        self._ownerless: set[int] = set()  # sockets no readable process held at a full read

    def read(self) -> dict[int, int]:
        """The owners of the sockets in /proc now."""
        owners, self._trusted = self._read(full=False)
        return owners

    def closed(self, inodes: Iterable[int]) -> None:
        """Sockets gone: the next read reads again the descriptors that held them."""
        self._gone.update(inodes)
        self._ownerless.difference_update(self._gone)

    def complete(self, unknown: set[int]) -> dict[int, int]:
        """The owners in /proc now, read again for the ``unknown`` sockets: a socket still
        unknown after that takes a full read, once (a socket no process holds, a kernel one
        say, does not cost a full read at every snapshot), unless ``read`` took nothing unread
        (a first read, or after a full one: what it read cannot be stale)."""
        owners, _ = self._read(full=False)
        missing = unknown - owners.keys() - self._ownerless
        if missing and self._trusted:
            self.full_reads += 1
            owners, _ = self._read(full=True)
        self._ownerless.update(missing - owners.keys())
        return owners

    def owned(self, inode: int, owners: dict[int, int]) -> bool:
        """Whether ``inode`` has an owner in ``owners`` or had none at a full read."""
        return inode in owners or inode in self._ownerless

    def _read(self, full: bool) -> tuple[dict[int, int], int]:
        """The owners, and how many descriptors were taken from the previous read unread.
        Processes are read from the highest pid down: a socket's last (lowest) pid wins."""
        owners: dict[int, int] = {}
        processes: dict[int, _Fds] = {}
        gone, self._gone = self._gone, set()
        trusted = 0
        for pid in sorted((int(name) for name in os.listdir(self.proc) if name.isdigit()),
                          reverse=True):
            read = self._read_process(pid, None if full else self._processes.get(pid), gone)
            if read is not None:
                processes[pid], unread = read
                owners.update(dict.fromkeys(filter(None, processes[pid].inodes), pid))
                trusted += unread
        self._processes = processes
        return owners, trusted

    def _read_process(self, pid: int, known: _Fds | None, gone: set[int]
                      ) -> tuple[_Fds, int] | None:
        """What process ``pid`` holds, and how many of its descriptors were taken unread from
        ``known`` (its previous read): all of them if it lists the same descriptors and none
        held a socket ``gone``. None if the process exited or is not ours to read."""
        base = f"{self.proc}/{pid}"
        try:
            start = _start_time(base)
            directory = os.open(f"{base}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fresh = known is None or known.start != start
            if fresh:
                names, inodes, whole = _read_dense(directory)
                if whole:
                    return _Fds(start, "\0".join(names), inodes), 0
                cached = dict(zip(names, inodes, strict=True))  # read now: not counted unread
                listed = os.listdir(directory)
            else:
                listed = os.listdir(directory)
                if known.listing == "\0".join(listed) and gone.isdisjoint(known.inodes):
                    return known, len(listed)
                cached = dict(zip(known.listing.split("\0") if known.listing else [],
                                  known.inodes, strict=True))
            names, inodes = [], array("Q")
            unread = 0
            for fd in listed:
                inode = cached.get(fd)
                if inode is None or inode in gone:
                    try:
                        target = os.readlink(fd, dir_fd=directory)
                    except OSError:  # closed meanwhile
                        continue
                    inode = _socket_inode(target)
                elif not fresh:
                    unread += 1
                names.append(fd)
                inodes.append(inode)
        except OSError:
            return None
        finally:
            os.close(directory)
        return _Fds(start, "\0".join(names), inodes), unread


def _read_dense(directory: int) -> tuple[list[str], array[int], bool]:
    """The descriptors 0, 1, ... of the /proc/<pid>/fd ``directory`` and their socket inodes,
    read without listing the directory (a listing costs a quarter of reading every link): up
    to the count of open descriptors that the kernel gives as the directory's size (Linux 6.2
    and later; 0 before), or to the first descriptor not open; and whether they were all its
    descriptors (the count was reached)."""
    count = os.fstat(directory).st_size
    names: list[str] = []
    inodes = array("Q")
    for fd in range(count):
        name = str(fd)
        try:
            target = os.readlink(name, dir_fd=directory)
        except OSError:  # not open: the descriptors have gaps (or it was closed meanwhile)
            return names, inodes, False
        names.append(name)
        inodes.append(_socket_inode(target))
    return names, inodes, count > 0


def _socket_inode(target: str) -> int:
    """The socket inode of a descriptor's link, 0 if it is not a socket."""
    return int(target[8:-1]) if target.startswith("socket:[") else 0


def _start_time(base: str) -> str:
    """Field 22 of /proc/<pid>/stat (after the command name, which may hold spaces)."""
    with open(f"{base}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[19].decode()
