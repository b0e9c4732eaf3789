"""Java and Maven for the parts of the stack fetched from Maven Central (broker, registry).

One place finds a recent enough ``java``, runs ``mvn`` on a project pom with its output
forwarded as progress lines, and turns a failure into one sentence naming the cause.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import deque
from collections.abc import Callable
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BOILERPLATE = ("->", "[Help", "To see", "Re-run", "For more")


def java(min_version: int, what: str, error: type[Exception]) -> str:
    """Path of a ``java`` of ``min_version`` or newer, else ``error`` saying what to install."""
    path = shutil.which("java")
    if path is None:
        raise error(f"Java is not installed: {what} needs Java {min_version} or newer "
                    "(apt-get install openjdk-17-jre-headless)")
    out = subprocess.run([path, "-version"], capture_output=True, text=True, check=False).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if match is None:
        raise error(f"cannot tell the version of {path}: {out.strip()!r}")
    major = int(match[2]) if match[1] == "1" else int(match[1])
    if major < min_version:
        raise error(f"{path} is Java {major}; {what} needs Java {min_version}+")
    return path


def cause(lines: deque[str] | list[str]) -> str:
    """The first meaningful [ERROR] line of Maven's output (else its last line)."""
    for line in lines:
        text = line.removeprefix("[ERROR]").strip()
        if line.startswith("[ERROR]") and text and not text.startswith(_BOILERPLATE):
            return text.removesuffix("-> [Help 1]").strip()
    return lines[-1] if lines else "no output"


def run(pom: Path, args: list[str], cwd: Path, what: str, progress: Callable[[str], None],
        error: type[Exception]) -> None:
    """Run ``mvn -f pom args`` in ``cwd``; progress gets its lines (downloads counted by 100)."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise error(f"Maven (mvn) is not installed; it {what} from Maven Central "
                    "(apt-get install maven)")
    cmd = [mvn, "-B", "-Dstyle.color=never", "-f", str(pom), *args]
    tail: deque[str] = deque(maxlen=40)
    downloads = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL, cwd=cwd) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = _ANSI.sub("", raw).strip()
            if not line.removeprefix("[INFO]").strip():
                continue
            tail.append(line)
            if line.startswith("[INFO] Downloaded from"):
                downloads += 1
                if downloads % 100 == 0:
                    progress(f"{downloads} files downloaded")
            elif not line.startswith("[INFO] Downloading from"):
                progress(line.removeprefix("[INFO] "))
    if proc.returncode != 0:
        raise error(f"Maven failed while it {what} (exit {proc.returncode}): {cause(tail)}")
