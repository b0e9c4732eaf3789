"""Socket inode -> owning process, from the /proc/<pid>/fd links, kept between snapshots.

Reading every link of every process costs about 5 µs per descriptor, half a second for 100,000
sockets; most of them are the same at the next snapshot. So a read takes only the descriptors
that are new, and those that held a socket closed since (the number may have been reused); a
process listing the same descriptors as before, none of them holding a socket closed, is taken
whole. A process read for the first time is read without a listing if its descriptors are 0
to n - 1 (most are). What is kept of a process is its listing and an array of inodes: about 14
bytes per descriptor.

A descriptor taken whole may hold another socket than when it was read, though no socket we
know of closed: it held no socket then, or one the dump does not show (a Unix socket, say), or
one that lives on in another descriptor (a server that forks per connection closes its copy and
accepts the next one on the same number). When a socket has no owner after a read, those
descriptors, and only those, are read again (``complete``).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
    descriptor reused since), with the inodes of every socket the dump found.
    """

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self.rechecks = 0
        self._processes: dict[int, _Fds] = {}
        self._gone: set[int] = set()  # sockets closed since the last read
        self._ownerless: set[int] = set()  # sockets no readable process held at a recheck

    def read(self) -> dict[int, int]:
        """The owners of the sockets in /proc now."""
        return self._read()[0]

    def closed(self, inodes: Iterable[int]) -> None:
        """Sockets gone: the next read reads again the descriptors that held them."""
        self._gone.update(inodes)
        self._ownerless.difference_update(self._gone)

    def complete(self, unknown: set[int], alive: Collection[int]) -> dict[int, int]:
        """The owners in /proc now, read again for the ``unknown`` sockets (``alive``: the
        inodes of the sockets dumped). A socket still unknown after that takes a recheck, once
        (a socket no process holds, a kernel one say, does not cost one at every snapshot)."""
        owners, unread = self._read()
        missing = unknown - owners.keys() - self._ownerless
        if missing and unread:
            self.rechecks += 1
            owners = self._recheck(np.fromiter(alive, np.uint64, len(alive)))
        self._ownerless.update(missing - owners.keys())
        return owners

    def owned(self, inode: int, owners: dict[int, int]) -> bool:
        """Whether ``inode`` has an owner in ``owners`` or had none at a recheck."""
        return inode in owners or inode in self._ownerless

    def _read(self) -> tuple[dict[int, int], int]:
        """The owners, and how many descriptors were taken from the previous read unread.
        Processes are read from the highest pid down: a socket's last (lowest) pid wins."""
        owners: dict[int, int] = {}
        processes: dict[int, _Fds] = {}
        gone, self._gone = self._gone, set()
        unread = 0
        for pid in sorted((int(name) for name in os.listdir(self.proc) if name.isdigit()),
                          reverse=True):
            read = self._read_process(pid, self._processes.get(pid), gone)
            if read is not None:
                processes[pid], taken = read
                owners.update(dict.fromkeys(filter(None, processes[pid].inodes), pid))
                unread += taken
        self._processes = processes
        return owners, unread

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


    def _recheck(self, alive: np.ndarray) -> dict[int, int]:
        """The owners after the descriptors of the last read that may hold another socket
        than it found are read again: those that held no socket, or one not ``alive``, or one
        another descriptor holds too (see the module's docstring)."""
        processes = sorted(self._processes.items(), reverse=True)
        inodes = np.concatenate([np.frombuffer(fds.inodes, np.uint64) for _, fds in processes]
                                or [np.zeros(0, np.uint64)])
        values, counts = np.unique(inodes, return_counts=True)
        suspect = (inodes == 0) | np.isin(inodes, values[counts > 1]) \
            | np.isin(inodes, alive, invert=True)
        owners: dict[int, int] = {}
        at = 0
        for pid, fds in processes:
            count = len(fds.inodes)
            indexes = np.flatnonzero(suspect[at:at + count]).tolist()
            at += count
            if indexes and not self._read_again(pid, fds, indexes):
                del self._processes[pid]
                continue
            owners.update(dict.fromkeys(filter(None, fds.inodes), pid))
        return owners

    def _read_again(self, pid: int, fds: _Fds, indexes: list[int]) -> bool:
        """Reads the descriptors at ``indexes`` of ``fds`` again; False if process ``pid``
        exited (or its pid is another process's now)."""
        base = f"{self.proc}/{pid}"
        try:
            if _start_time(base) != fds.start:
                return False
            directory = os.open(f"{base}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            names = fds.listing.split("\0")
            for index in indexes:
                try:
                    fds.inodes[index] = _socket_inode(os.readlink(names[index],
                                                                  dir_fd=directory))
                except OSError:  # closed since
                    fds.inodes[index] = 0
        finally:
            os.close(directory)
        return True


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
