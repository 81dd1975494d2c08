"""The Python code blocks of the README and docs/, for the tests that run them.

A block that cannot run on a CPU machine without data says so in an HTML comment on the
line before its fence, which the site does not show:

    <!-- not run: needs 8 GPUs -->
    ```python
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = re.compile(r"<!--\s*not run:(.*?)-->")


@dataclass(frozen=True)
class Block:
    path: Path  # the Markdown file
    line: int  # the fence's line, 1-based
    code: str
    not_run: str | None  # the marker's reason, if it has one

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of one Markdown file, in order."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            marker = NOT_RUN.search(lines[start - 1]) if start else None
            reason = marker.group(1).strip() if marker else None
            blocks.append(Block(path, start + 1, "\n".join(body) + "\n", reason))
        i += 1
    return blocks


def all_python_blocks() -> list[Block]:
    return [block for path in documents() for block in python_blocks(path)]


def run_document(path: Path) -> None:
    """Runs the document's runnable blocks in order in one namespace, as a reader who
    pastes them one after the other would; a failure's traceback names file:line."""
    namespace = {"__name__": "__main__"}
    for block in python_blocks(path):
        if block.not_run is None:
            print(f"running {block.name}", flush=True)
            exec(compile(block.code, block.name, "exec"), namespace)


if __name__ == "__main__":
    import sys

    run_document(Path(sys.argv[1]).resolve())
