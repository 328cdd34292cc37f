"""Before/after runs: the scratch worktree of the baseline commit, the options, the proxy/baseline report."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.benchmarks import checkout, figures
from tests.benchmarks.__main__ import parse_args, runs_phase
from tests.benchmarks.figures import HIT_WORKLOADS, ratios
from tests.benchmarks.report import markdown
from tests.benchmarks.test_report import ENVIRONMENT, _wrk_run

BASELINE = {"ref": "HEAD~1", "commit": "0ab4a81", "subject": "Earlier change"}


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=checkout.git_env()
    )
    return done.stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with two commits: ``proxy/v.txt`` reads "1", then "2"."""
    root = tmp_path / "repo"
    (root / "proxy").mkdir(parents=True)
    _git(root, "init", "-q")
    for version in ("1", "2"):
        (root / "proxy" / "v.txt").write_text(version)
        _git(root, "add", ".")
        _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", f"version {version}")
    return root


def test_worktree_holds_the_old_commit_and_is_removed_when_the_block_ends(repo: Path, tmp_path: Path) -> None:
    commit = checkout.resolve(repo, "HEAD~1")
    assert checkout.describe(repo, commit)["subject"] == "version 1"
    with checkout.worktree(repo, commit, tmp_path / "scratch" / "baseline") as src:
        assert (src / "proxy" / "v.txt").read_text() == "1"
        assert str(src) in _git(repo, "worktree", "list")
    assert not src.exists()
    assert str(src) not in _git(repo, "worktree", "list")


def test_worktree_is_removed_when_the_run_is_interrupted(repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "baseline"
    with pytest.raises(KeyboardInterrupt), checkout.worktree(repo, checkout.resolve(repo, "HEAD"), src):
        (src / "proxy" / "__pycache__").mkdir()
        raise KeyboardInterrupt
    assert not src.exists()
    assert _git(repo, "worktree", "list").count("\n") == 1


def test_unknown_ref_is_refused_when_resolving(repo: Path) -> None:
    with pytest.raises(checkout.CheckoutError, match="names no commit"):
        checkout.resolve(repo, "no-such-branch")


def test_only_lists_the_phases_to_run_when_given() -> None:
    args = parse_args(["--only", "hits,misses", "--baseline", "HEAD~3"])
    assert (args.only, args.baseline) == (["hits", "misses"], "HEAD~3")
    assert [runs_phase(args, name) for name in ("hits", "ttfb", "profile")] == [True, False, False]
    everything = parse_args([])
    assert [runs_phase(everything, name) for name in ("hits", "scaling", "profile")] == [True, True, False]
    with pytest.raises(SystemExit):
        parse_args(["--only", "hits,nonsense"])


def _before_after_results() -> dict[str, Any]:
    """Three rounds in which the machine drifts while the proxy serves 0.9, 1.0 and 1.1 of the baseline's hits."""
    speeds = {"proxy": (900.0, 2000.0, 1650.0), "nginx": (3000.0, 6000.0, 4500.0), "baseline": (1000.0, 2000.0, 1500.0)}
    hits: dict[str, Any] = {}
    for workload in HIT_WORKLOADS:
        for conns in (64, 1):
            for name, rps in speeds.items():
                runs = [_wrk_run(name, r, 1.0, 4.0) for r in rps]
                hits[f"{workload}/{conns}/{name}"] = figures.summarize(runs, body_identical_to_upstream=True)
    environment = {**ENVIRONMENT, "rounds": 3, "baseline": BASELINE}
    return {"environment": environment, "servers": {"hits": list(speeds), "misses": list(speeds)}, "hits": hits}


def test_before_after_shows_per_round_ratios_when_a_baseline_ran() -> None:
    results = _before_after_results()
    by_round = ratios(results)["hit/64"]["proxy/baseline"]
    assert by_round["rounds"] == pytest.approx([0.9, 1.0, 1.1])
    text = markdown(results)
    assert "## Before/after: this checkout over HEAD~1 (0ab4a81 Earlier change)" in text
    assert "| hit | 64 | 1650 (900-2000) | 1500 (1000-2000) | 1.00 (0.90-1.10) | 0.90 1.00 1.10 |" in text
    assert "Baseline: HEAD~1 = 0ab4a81." in text


def test_before_after_is_left_out_when_no_baseline_ran() -> None:
    results = _before_after_results()
    del results["environment"]["baseline"]
    assert "Before/after" not in markdown(results)


def test_git_commands_stay_in_their_repository_when_git_variables_are_inherited(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere.git"
    monkeypatch.setenv("GIT_DIR", str(elsewhere))
    monkeypatch.setenv("GIT_WORK_TREE", str(tmp_path))
    assert checkout.resolve(repo, "HEAD") == _git(repo, "rev-parse", "HEAD").strip()
    assert not elsewhere.exists()
