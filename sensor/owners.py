"""Socket inode -> owning process, from the /proc/<pid>/fd links, kept between snapshots.

Reading every link of every process costs about 5 µs per descriptor, half a second for 100,000
sockets; most of them are the same at the next snapshot. So a read takes only the descriptors
that are new, and those that held a socket closed since (the number may have been reused); a
process listing the same descriptors as before, none of them holding a socket closed, is taken
whole. A process read for the first time is read without a listing if its descriptors are 0
to n - 1 (most are). What is kept of a process is its listing and an array of inodes: about 14
bytes per descriptor. The owners a read gives are sorted arrays (``Owners``), 12 bytes per
socket where a dict took about 80, looked up a batch at a time; ``complete`` takes the sockets
to look for as arrays too (a burst of new connections makes them 100,000).

A descriptor taken whole may hold another socket than when it was read, though no socket we
know of closed: it held no socket then, or one the dump does not show (a Unix socket, say), or
one that lives on in another descriptor (a server that forks per connection closes its copy and
accepts the next one on the same number). When a socket has no owner after a read, those
descriptors, and only those, are read again (``complete``).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
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


class Owners(Mapping[int, int]):
    """Socket inode -> the lowest pid holding it, as two arrays sorted by inode."""

    def __init__(self, processes: Iterable[tuple[int, _Fds]] = ()) -> None:
        """The owners of the sockets that ``processes`` hold (pid, what was read of it)."""
        listed = list(processes)
        held = _held(listed)
        holders = np.repeat(np.array([pid for pid, _ in listed], np.int64),
                            [len(fds.inodes) for _, fds in listed])
        sockets = held != 0
        held, holders = held[sockets], holders[sockets]
        order = np.lexsort((holders, held))  # by inode, then pid: the lowest pid first
        held, holders = held[order], holders[order]
        first = np.ones(len(held), bool)
        first[1:] = held[1:] != held[:-1]
        self._inodes, self._pids = held[first], holders[first].astype(np.int32)

    def pids(self, inodes: Sequence[int]) -> list[int]:
        """The owner of each of ``inodes`` (-1: none)."""
        return self.owners(np.array(inodes, np.uint64)).tolist()

    def owners(self, inodes: np.ndarray) -> np.ndarray:
        """``pids`` of an array of inodes, as an array."""
        if not len(self._inodes):
            return np.full(len(inodes), -1, np.int32)
        at = np.minimum(np.searchsorted(self._inodes, inodes), len(self._inodes) - 1)
        return np.where(self._inodes[at] == inodes, self._pids[at], -1)

    def __getitem__(self, inode: int) -> int:
        pid = self.pids([inode])[0]
        if pid < 0:
            raise KeyError(inode)
        return pid

    def __iter__(self) -> Iterator[int]:
        return iter(self._inodes.tolist())

    def __len__(self) -> int:
        return len(self._inodes)


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

    def read(self) -> Owners:
        """The owners of the sockets in /proc now."""
        return self._read()[0]

    def closed(self, inodes: Iterable[int]) -> None:
        """Sockets gone: the next read reads again the descriptors that held them."""
        self._gone.update(inodes)
        self._ownerless.difference_update(self._gone)

    def complete(self, unknown: Collection[int], alive: Collection[int]) -> Owners:
        """The owners in /proc now, read again for the ``unknown`` sockets (``alive``: the
        inodes of the sockets dumped). A socket still unknown after that takes a recheck, once
        (a socket no process holds, a kernel one say, does not cost one at every snapshot).
        Both may be arrays of inodes: a burst of new sockets makes them 100,000 long, which
        as sets of ints took 15 MB of small objects while the snapshot ran."""
        owners, unread = self._read()
        wanted = _inodes(unknown)
        if self._ownerless:
            wanted = wanted[np.isin(wanted, _inodes(self._ownerless), invert=True)]
        missing = wanted[owners.owners(wanted) < 0]
        if len(missing) and unread:
            self.rechecks += 1
            owners = self._recheck(_inodes(alive))
        self._ownerless.update(missing[owners.owners(missing) < 0].tolist())
        return owners

    def ownerless(self, inode: int) -> bool:
        """Whether ``inode`` had no owner at a recheck (and is not known closed since)."""
        return inode in self._ownerless

    def _read(self) -> tuple[Owners, int]:
        """The owners, and how many descriptors were taken from the previous read unread."""
        processes: dict[int, _Fds] = {}
        gone, self._gone = self._gone, set()
        unread = 0
        for pid in (int(name) for name in os.listdir(self.proc) if name.isdigit()):
            read = self._read_process(pid, self._processes.get(pid), gone)
            if read is not None:
                processes[pid], taken = read
                unread += taken
        self._processes = processes
        return Owners(processes.items()), unread

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

    def _recheck(self, alive: np.ndarray) -> Owners:
        """The owners after the descriptors of the last read that may hold another socket
        than it found are read again: those that held no socket, or one not ``alive``, or one
        another descriptor holds too (see the module's docstring)."""
        processes = list(self._processes.items())
        inodes = _held(processes)
        values, counts = np.unique(inodes, return_counts=True)
        suspect = (inodes == 0) | np.isin(inodes, values[counts > 1]) \
            | np.isin(inodes, alive, invert=True)
        at = 0
        for pid, fds in processes:
            count = len(fds.inodes)
            indexes = np.flatnonzero(suspect[at:at + count]).tolist()
            at += count
            if indexes and not self._read_again(pid, fds, indexes):
                del self._processes[pid]
        return Owners(self._processes.items())

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


def _held(processes: list[tuple[int, _Fds]]) -> np.ndarray:
    """The inodes of the descriptors of ``processes`` one after the other (0: not a socket)."""
    return np.concatenate([np.frombuffer(fds.inodes, np.uint64) for _, fds in processes]
                          or [np.zeros(0, np.uint64)])


def _inodes(values: Collection[int]) -> np.ndarray:
    """``values`` as an array of inodes (an array as it is)."""
    if isinstance(values, np.ndarray):
        return values.astype(np.uint64, copy=False)
    return np.fromiter(values, np.uint64, len(values))


def _read_dense(directory: int) -> tuple[list[str], array[int], bool]:
    """The descriptors 0, 1, ... of the /proc/<pid>/fd ``directory`` and their socket inodes,
    read without listing the directory (a listing costs a quarter of reading every link): up
    to the count of open descriptors that the kernel gives as the directory's size (Linux 6.2
    and later; 0 before), or to the first descriptor not open; and whether they were all its
    descriptors (the count was reached)."""
    count = os.fstat(directory).st_size
    readlink = os.readlink
    targets: list[str] = []
    for fd in range(count):
        try:
            targets.append(readlink(str(fd), dir_fd=directory))
        except OSError:  # not open: the descriptors have gaps (or it was closed meanwhile)
            break
    names = list(map(str, range(len(targets))))
    return names, _socket_inodes(targets), 0 < len(targets) == count


def _socket_inodes(targets: list[str]) -> array[int]:
    """The socket inode of each of the descriptors' links ``targets``, 0 if not a socket."""
    return array("Q", [int(target[8:-1]) if target.startswith("socket:[") else 0
                       for target in targets])


def _socket_inode(target: str) -> int:
    """``_socket_inodes`` of one link (a descriptor read apart: one readlink costs more)."""
    return _socket_inodes([target])[0]


def _start_time(base: str) -> str:
    """Field 22 of /proc/<pid>/stat (after the command name, which may hold spaces)."""
    with open(f"{base}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[19].decode()
