"""Every README example marked as running against the demo does, against a real demo.

`make run`'s runner (ztgateway.dev.run: the demo app, the dev IdP and the gateway, on ports moved
by one offset) in a copy of the checkout's layout; each marked ```sh block of the README is run
by bash as a reader would paste it (ports moved like the runner's, `curl ...` expanded to the
certificate options it stands for), one bash per block so its variables carry from line to
line, blocks in README order so state carries too (alice's TOTP set up in the quick start).
Each command must exit 0 unless the README says it is refused, and the commands whose output
the README describes must print it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_devrun import Run, free_offset, start
from tests.support import Certs

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
MARK = "<!-- example: runs against the demo in tests/e2e/test_readme_examples.py -->"
PORTS = (8443, 9100, 8080, 9200)
CERT_OPTIONS = (
    "--cert certs/clients/alice-laptop.pem --key certs/clients/alice-laptop.key "
    "--cacert certs/ca.pem"
)


@dataclass
class Expect:
    """What a command the README describes must do: found by a piece of its text, in order."""

    command: str
    output: tuple[str, ...] = ()
    refused: bool = False


EXPECT = [
    Expect("-i --cert certs/clients/alice-laptop.pem", ("HTTP/1.1 401", "insufficient_user_authentication")),
    Expect("curl --cacert certs/ca.pem https://", refused=True),
    Expect("/api/echo", ('"x-forwarded-user": "alice"',)),
    Expect("/admin/echo", ("mfa-required",)),
    Expect("/.ztgw/mfa/verify", ('"mfa_verified_at"', '"user": "alice"')),
    Expect("/admin/echo", ('"x-forwarded-user": "alice"', '"x-forwarded-groups": "admins"')),
    Expect("/metrics", ("ztgw_requests_total",)),
    Expect("/readyz", ('"status": "ready"',)),
    Expect("audit tail", ("alice",)),
    Expect("policy explain", ("decision: DENY  reason: group-required", "needs one of admins")),
    Expect("policy test", ("4 passed, 0 failed",)),
    Expect("agent report --dry-run", ('"platform": "linux"',)),
    Expect("agent report --gateway", ("alice-laptop: signed report accepted",)),
    Expect("/.ztgw/posture", ('"accepted": true', '"check": "disk_encrypted"')),
]  # fmt: skip


def marked_blocks(text: str) -> list[str]:
    blocks = []
    for part in text.split(MARK)[1:]:
        match = re.match(r"\s*```sh\n(.*?)```", part, re.S)
        assert match, f"a marked example is not a sh block: {part[:80]!r}"
        blocks.append(match.group(1))
    return blocks


def commands(block: str) -> list[str]:
    """The block's commands: backslash continuations joined, a quoted string that spans lines
    kept whole, comments dropped."""
    out, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        if current.count("'") % 2:  # inside a single-quoted string: it goes on
            current += "\n"
            continue
        out.append(current.strip())
        current = ""
    return out


def as_run_here(command: str, offset: int) -> str:
    for port in PORTS:
        command = command.replace(f"127.0.0.1:{port}", f"127.0.0.1:{port + offset}")
    # The README's shorthand for "with alice's certificate, as above".
    return command.replace("curl ... ", f"curl {CERT_OPTIONS} ")


@pytest.fixture
def checkout(certs: Certs, tmp_path: Path) -> Path:
    """The checkout's layout as `make run` leaves it: config/, certs/, the venv."""
    shutil.copytree(REPO / "config", tmp_path / "config", ignore=shutil.ignore_patterns(".*"))
    shutil.copytree(certs.dir, tmp_path / "certs")
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    return tmp_path


@pytest.fixture
def demo(checkout: Path) -> Iterator[tuple[Path, int]]:
    for _ in range(3):
        # Other test runs on the machine may take a free port between the check and the bind:
        # the runner names the port it could not take, and another offset is tried.
        offset = free_offset()
        run: Run = start(checkout, "--port-offset", str(offset))
        out = run.wait_for("Ctrl-C stops all three")
        if "ztgateway is running" in out:
            break
        run.close()
        assert "cannot listen" in out or "already in use" in out, out
    try:
        yield checkout, offset
    finally:
        run.close()


def test_the_readme_marks_the_examples_that_run_against_the_demo() -> None:
    blocks = marked_blocks(README.read_text())
    assert len(blocks) >= 4
    everything = [c for b in blocks for c in commands(b)]
    for expect in EXPECT:
        assert any(expect.command in c for c in everything), expect.command


def test_the_readme_shows_the_demos_policy_cases_as_they_are() -> None:
    cases = (REPO / "config" / "policy-cases.toml").read_text()
    assert f"```toml\n{cases}```" in README.read_text()


def test_every_marked_readme_example_works_against_the_demo(demo: tuple[Path, int]) -> None:
    cwd, offset = demo
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    pending = list(EXPECT)
    for block in marked_blocks(README.read_text()):
        script = []
        for i, command in enumerate(commands(block)):
            script.append(f"echo '@@begin {i}@@'")
            script.append(as_run_here(command, offset))
            script.append(f'echo "@@end {i} rc=$?@@"')
        result = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = result.stdout
        for i, command in enumerate(commands(block)):
            match = re.search(rf"@@begin {i}@@\n(.*?)@@end {i} rc=(\d+)@@", output, re.S)
            assert match, f"{command!r} did not run:\n{output}\n{result.stderr}"
            printed, rc = match.group(1), int(match.group(2))
            expect = next((e for e in pending if e.command in command), None)
            if expect is not None:
                pending.remove(expect)
            if expect is not None and expect.refused:
                assert rc != 0 and printed == "", f"{command!r} was not refused: {printed}"
                continue
            assert rc == 0, f"{command!r} exited {rc}:\n{printed}\n{result.stderr[-2000:]}"
            for text in expect.output if expect is not None else ():
                assert text in printed, f"{command!r} did not print {text!r}:\n{printed[:3000]}"
    assert not pending, [e.command for e in pending]
