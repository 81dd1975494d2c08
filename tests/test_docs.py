"""The documentation runs: every Python block of the README and docs/ is executed (a
document's blocks in order, in one process, from a temporary folder), except a block
marked `<!-- not run: why -->`. (`make test` builds the site with `mkdocs build --strict`
before the tests.)"""

import os
import subprocess
import sys

import pytest

from tests.doc_blocks import ROOT, all_python_blocks, documents, python_blocks

RUNNABLE = [path for path in documents() if any(b.not_run is None for b in python_blocks(path))]


@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_every_python_block_of_the_document_runs(path, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.doc_blocks", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ran = done.stdout.count("running ")
    assert ran == sum(b.not_run is None for b in python_blocks(path))


def test_a_block_that_is_not_run_says_why():
    marked = [b for b in all_python_blocks() if b.not_run is not None]
    for block in marked:
        assert len(block.not_run.split()) >= 4, f"{block.name}: say why it cannot run"
    # Most of the documentation runs: a marker is the exception.
    assert len(marked) <= len(all_python_blocks()) // 4, [b.name for b in marked]


def test_the_marker_is_read(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- not run: needs eight GPUs here -->\n```python\nraise SystemExit(1)\n```\n\n"
        "```python\nx = 1\n```\n"
    )
    first, second = python_blocks(page)
    assert first.not_run == "needs eight GPUs here" and first.line == 2
    assert second.not_run is None and second.code == "x = 1\n"
