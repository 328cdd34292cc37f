"""Optional sampling profile of the proxy under load with py-spy, summarised as top frames."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# "handle_request (aiohttp/web_protocol.py:480)" -> function and file, line dropped so a function sums up.
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")
# Frames on every stack of an event loop's process; as "on the stack" totals they would say nothing.
_LOOP_FRAMES = (
    "<module>",
    "_run_",
    "run_app",
    "main ",
    "_serve",
    "run_until",
    "run_forever",
    "BaseEventLoop",
    "_run_once",
    "Handle._run",
)


def executable() -> str | None:
    """The py-spy beside the running interpreter, else one on PATH, else None."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(py_spy: str, pid: int, seconds: int, out: Path, core: int) -> subprocess.Popen[bytes]:
    """Start sampling *pid* (and its children) for *seconds* into *out* in py-spy's collapsed-stack format."""
    return subprocess.Popen(
        [
            "taskset",
            "-c",
            str(core),
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--duration",
            str(seconds),
            "--format",
            "raw",
            "--nonblocking",
            "--subprocesses",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _frame(raw: str) -> str:
    match = _FRAME.match(raw.strip())
    return f"{match['func']} ({match['file']})" if match else raw.strip()


def summarize(collapsed: str, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Top functions by share of samples: ``self`` where the sample was taken, ``total`` anywhere on the stack."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not samples:
        return {"self": [], "total": []}
    return {
        "self": [(frame, n / samples) for frame, n in own.most_common(top)],
        "total": [
            (frame, n / samples) for frame, n in inclusive.most_common(top + 10) if not frame.startswith(_LOOP_FRAMES)
        ][:top],
    }
