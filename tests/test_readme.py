"""The user-facing docs match the code: every ``python`` block of README.md and of the docs
pages listed below runs as written, in a fresh interpreter, and prints something; their
relative links resolve; the README stays a README (short, no lab notebook)."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Pages whose snippets are user-facing examples (the other docs pages hold derivations).
PAGES = ["README.md", "docs/performance.md", "docs/interop.md", "docs/studies.md",
         "docs/kernels.md"]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _blocks(page: str) -> list[tuple[str, int, str]]:
    path = ROOT / page
    if not path.exists():
        return []
    text = path.read_text()
    return [(page, text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


SNIPPETS = [b for page in PAGES for b in _blocks(page)]


def test_the_pages_have_snippets():
    assert any(page == "README.md" for page, _, _ in SNIPPETS)


@pytest.mark.parametrize("page,line,code", SNIPPETS,
                         ids=[f"{p}:{n}" for p, n, _ in SNIPPETS])
def test_snippet_runs_verbatim_and_prints(page, line, code, tmp_path):
    # As a user would run it: a fresh interpreter, no test-only settings (TRITON_INTERPRET is
    # set by conftest for the kernel tests), outside the repository.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                        "MASTER_PORT", "MINC_KERNELS_BACKEND")}
    env.setdefault("OMP_NUM_THREADS", "1")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    where = f"{page}, the python block at line {line}"
    assert r.returncode == 0, f"{where} failed:\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), f"{where} ran but printed nothing"


def test_quick_start_trains_and_counts_its_moment_updates(tmp_path):
    (page, line, code), = [b for b in SNIPPETS if b[0] == "README.md" and "mk.MINCLoss()" in b[2]
                           and "MomentumEncoder" in b[2] and "lightly" not in b[2]]
    ns: dict = {"__name__": "__readme__"}
    exec(compile(code, f"{page}:{line}", "exec"), ns)
    assert ns["loss"].isfinite()
    assert ns["loss_fn"].num_updates.item() == ns["steps"]
    assert ns["loss_fn"].moment.shape == (16, 16)


def test_relative_links_resolve():
    if not (ROOT / ".git").exists():
        pytest.skip("links into benchmarks/results and examples/ are checked in a checkout")
    missing = []
    for page in PAGES + ["docs/math.md", "docs/distributed.md"]:
        path = ROOT / page
        if not path.exists():
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                missing.append(f"{page}: {target}")
    assert not missing, missing


def test_readme_is_for_users():
    text = README.read_text()
    assert len(text.splitlines()) <= 210, len(text.splitlines())
    for section in ("## Where it stands on the GPU", "## Install", "## The two commands",
                    "## Quick start", "## Drop-in with lightly and timm", "## Backends",
                    "## Distributed", "## Read more"):
        assert section in text, section
    # the measured GPU standing is on the first screen
    assert text.index("## Where it stands on the GPU") < text.index("## Install")
    # no lab notebook: no commit hashes, issue numbers or machine loads
    commit = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
    prose = re.sub(r"\[[^\]]*\]\([^)]*\)", "", text)  # links name result folders, which hold a commit
    assert not commit.search(prose), commit.search(prose)
    assert not re.search(r"\bissue \d+|#\d+\b|load average", text, re.I)
    # the EMA moment is the buffer ``moment`` (there is no attribute ``M``)
    assert "`M`" not in text


def test_ci_runs_the_readme_test_command():
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip("no .ci/ (an unpacked sdist)")
    assert "make test" in ci.read_text() and "make test" in README.read_text()
