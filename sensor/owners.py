"""Socket inode -> owning process, from the /proc/<pid>/fd links, kept between snapshots.

Reading every link of every process costs about 5 µs per descriptor, half a second for 100,000
sockets; most of them are the same at the next snapshot. So a snapshot reads only the
descriptors that are new, and those whose socket has gone (the number may have been reused); a
process listing the same descriptors as before, none of them a socket gone, is taken whole.
A socket whose owner is still unknown after that triggers a full read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _Fds:
    """What was read of one process: its start time (a reused pid has another one), the inode
    of each of its descriptors' socket, in the order listed (0: not a socket), and its sockets
    (inode -> its pid)."""

    start: str
    inodes: dict[str, int]
    sockets: dict[int, int]


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
        """The owners, and how many descriptors were taken from the previous read unread.
        Processes are read from the highest pid down: a socket's last (lowest) pid wins."""
        owners: dict[int, int] = {}
        processes: dict[int, _Fds] = {}
        gone = self._sockets - sockets  # closed since the previous call
        trusted = 0
        for pid in sorted((int(name) for name in os.listdir(self.proc) if name.isdigit()),
                          reverse=True):
            read = self._read_process(pid, None if full else self._processes.get(pid), gone)
            if read is not None:
                processes[pid], unread = read
                owners.update(processes[pid].sockets)
                trusted += unread
        self._processes = processes
        return owners, trusted

    def _read_process(self, pid: int, known: _Fds | None, gone: set[int]
                      ) -> tuple[_Fds, int] | None:
        """What process ``pid`` holds, and how many of its descriptors were taken unread from
        ``known`` (its previous read): all of them if it lists the same descriptors and none
        holds a socket ``gone``. None if the process exited or is not ours to read."""
        base = f"{self.proc}/{pid}"
        try:
            start = _start_time(base)
            directory = os.open(f"{base}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            listed = os.listdir(directory)
            if known is None or known.start != start:
                cached: dict[str, int] = {}
            elif list(known.inodes) == listed and known.sockets.keys().isdisjoint(gone):
                return known, len(listed)
            else:
                cached = known.inodes
            inodes: dict[str, int] = {}
            unread = 0
            for fd in listed:
                inode = cached.get(fd)
                if inode is None or inode in gone:
                    try:
                        target = os.readlink(fd, dir_fd=directory)
                    except OSError:  # closed meanwhile
                        continue
                    inode = int(target[8:-1]) if target.startswith("socket:[") else 0
                else:
                    unread += 1
                inodes[fd] = inode
        except OSError:
            return None
        finally:
            os.close(directory)
        sockets = {inode: pid for inode in inodes.values() if inode}
        return _Fds(start, inodes, sockets), unread


def _start_time(base: str) -> str:
    """Field 22 of /proc/<pid>/stat (after the command name, which may hold spaces)."""
    with open(f"{base}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[19].decode()

