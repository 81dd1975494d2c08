"""MkDocs hook: the site's front page is the README, and BENCHMARKS.md is a page, both
from the repository root, so neither is written twice. Links are rewritten for the site
(`docs/x.md` -> `x.md`, `BENCHMARKS.md` -> `benchmarks.md`)."""

from __future__ import annotations

import os
import re

from mkdocs.structure.files import File

PAGES = {"README.md": "index.md", "BENCHMARKS.md": "benchmarks.md"}


def for_the_site(markdown: str) -> str:
    markdown = re.sub(r"\]\(docs/", "](", markdown)
    return re.sub(r"\]\(BENCHMARKS\.md", "](benchmarks.md", markdown)


def on_files(files, config):
    root = os.path.dirname(config["config_file_path"])
    for source, page in PAGES.items():
        with open(os.path.join(root, source), encoding="utf-8") as markdown:
            files.append(File.generated(config, page, content=for_the_site(markdown.read())))
    return files
