"""MkDocs hook: serves the stored experiment results (``experiments/results/*.png`` and ``*.md``)
as ``results/NAME`` in the site, so pages show the figures and link the tables where they live,
without copies in ``docs/``."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


def on_files(files: Files, config) -> Files:
    for path in sorted([*RESULTS.glob("*.png"), *RESULTS.glob("*.md")]):
        files.append(
            File.generated(
                config,
                f"results/{path.name}",
                abs_src_path=str(path),
                # Tables are pages reached from the results page, not from the navigation.
                inclusion=InclusionLevel.NOT_IN_NAV,
            )
        )
    return files
