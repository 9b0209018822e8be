"""How the agent looks at a system: commands it runs and files it reads, both injectable.

Collectors never call subprocess or open files themselves: they get a `Probe`, so the same code
reads this machine in production and recorded output from a macOS or Windows machine in tests.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

COMMAND_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class Output:
    """What one command printed. `code` 127: not installed; 124: timed out."""

    code: int
    stdout: str
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def missing(self) -> bool:
        return self.code == 127

    @property
    def denied(self) -> bool:
        text = (self.stderr + self.stdout).lower()
        return self.code != 0 and (
            "permission denied" in text
            or "operation not permitted" in text
            or "must be root" in text
            or "you need to be root" in text
        )


Runner = Callable[[Sequence[str]], Output]


def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> Output:
    """Run a system command with the C locale (parsers read English), no stdin, a timeout."""
    exe = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0])
    if exe is None or not os.path.exists(exe):
        return Output(127, "", f"{argv[0]}: not installed")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Output(124, "", f"{argv[0]}: timed out after {timeout:g} s")
    except OSError as exc:
        return Output(126, "", f"{argv[0]}: {exc.strerror or exc}")
    return Output(proc.returncode, proc.stdout, proc.stderr)


@dataclass(frozen=True, slots=True)
class Probe:
    """Commands and files of the system being described. `root` prefixes every file path."""

    run: Runner = run_command
    root: Path = Path("/")
    uid: int = field(default_factory=lambda: os.getuid() if hasattr(os, "getuid") else -1)

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def read(self, absolute: str) -> str | None:
        """A text file's content, decompressing .gz and .xz logs; None when absent or unreadable."""
        path = self.path(absolute)
        try:
            if path.suffix == ".gz":
                with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                    return f.read()
            if path.suffix == ".xz":
                with lzma.open(path, "rt", encoding="utf-8", errors="replace") as f:
                    return f.read()
            return path.read_text(encoding="utf-8", errors="replace")
        except (OSError, EOFError, lzma.LZMAError):
            return None

    def check(
        self, argv: Sequence[str], parse: Callable[[str], Finding], unknown: bool | str
    ) -> Finding:
        """`parse` over what a command printed (stdout and stderr: some tools answer on
        stderr); `unknown`, with the reason, when it printed nothing."""
        out = self.run(argv)
        if out.missing or (not out.ok and not (out.stdout.strip() or out.stderr.strip())):
            return Finding(unknown, describe_failure(out, Path(argv[0]).name))
        return parse(out.stdout + out.stderr)

    def glob(self, directory: str, pattern: str) -> list[str]:
        """Absolute (root-relative) paths matching `pattern` in `directory`, sorted."""
        base = self.path(directory)
        try:
            found = sorted(base.glob(pattern))
        except OSError:
            return []
        return ["/" + str(p.relative_to(self.root)) for p in found]


@dataclass(frozen=True, slots=True)
class Finding:
    """One report field's value and what it was read from."""

    value: bool | str
    evidence: str


@dataclass(slots=True)
class Collected:
    """A platform collector's result: the report fields, their evidence, the OS's names."""

    fields: dict[str, bool | str] = field(default_factory=dict)
    evidence: dict[str, str] = field(default_factory=dict)
    os_name: str = ""
    kernel: str = ""

    def set(self, name: str, finding: Finding) -> None:
        self.fields[name] = finding.value
        self.evidence[name] = finding.evidence[:500]


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def describe_failure(out: Output, what: str) -> str:
    """Why a command told us nothing: not installed, not allowed, or its own words."""
    if out.missing:
        return f"{what}: not installed"
    if out.denied:
        return f"{what}: not allowed (run the agent as root or with the capability it needs)"
    return f"{what}: exit {out.code}: {first_line(out.stderr or out.stdout)[:120]}"
