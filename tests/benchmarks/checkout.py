"""A scratch git worktree of an earlier commit, so that its proxy can be measured beside this checkout's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .processes import BenchmarkError


class CheckoutError(BenchmarkError):
    """The ref names no commit, or git could not check it out; the message says which."""


def git_env() -> dict[str, str]:
    """This environment without git's own variables: run from a hook or ``git rebase --exec``, an inherited
    ``GIT_DIR`` would point every command at that repository instead of the one named with ``-C``."""
    return {name: value for name, value in os.environ.items() if not name.startswith("GIT_")}


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60, env=git_env())


def resolve(repo: Path, ref: str) -> str:
    """The full id of the commit *ref* names in *repo*; CheckoutError when it names none."""
    done = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if done.returncode != 0:
        raise CheckoutError(f"{ref!r} names no commit in {repo}")
    return done.stdout.strip()


def describe(repo: Path, commit: str) -> dict[str, str]:
    """Short id and subject line of *commit*, for the report's heading."""
    done = _git(repo, "log", "-1", "--format=%h%x00%s", commit)
    short, _, subject = done.stdout.strip().partition("\0")
    return {"commit": short or commit[:7], "subject": subject}


@contextmanager
def worktree(repo: Path, commit: str, path: Path) -> Iterator[Path]:
    """Check *commit* out, detached, at *path* and yield *path*; the worktree is removed when the block ends,
    by an exception or Ctrl-C too, so that no stale entry is left in the repository's worktree list.

    Raises CheckoutError when git cannot check it out.
    """
    try:
        done = _git(repo, "worktree", "add", "--detach", "--quiet", str(path), commit)
        if done.returncode != 0:
            raise CheckoutError(f"git worktree add {commit[:12]} failed: {done.stderr.strip()}")
        yield path
    finally:
        remove(repo, path)


def remove(repo: Path, path: Path) -> None:
    """Remove the worktree at *path*, whatever state an interrupted ``worktree add`` left it in."""
    # Twice --force: a locked or dirty (bytecode, logs) worktree goes too.
    _git(repo, "worktree", "remove", "--force", "--force", str(path))
    shutil.rmtree(path, ignore_errors=True)
    _git(repo, "worktree", "prune")


def proxy_source(source: Path, env: dict[str, str]) -> str:
    """Where ``import proxy`` resolves for a child with *env* (expected under *source*), or why it failed."""
    done = subprocess.run(
        [sys.executable, "-c", "import proxy; print(proxy.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=source.parent,
        timeout=30,
    )
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[-1] if lines else "?"
