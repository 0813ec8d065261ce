"""Where the tests find the acceptance case files: the project's own copies in tests/cases/ (a plain clone runs
every test), and ``../shared/cases`` beside the checkout as an extra check where it exists and its file
differs from the project's copy (an identical one would only run the same cases twice)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PROJECT = Path(__file__).resolve().parent / "cases"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "cases"


def sources(name: str) -> list[tuple[str, Path]]:
    """``[("project", tests/cases/NAME)]``, plus ``("shared", ../shared/cases/NAME)`` where that differs."""
    ours = PROJECT / name
    out = [("project", ours)]
    theirs = SHARED / name
    if theirs.is_file() and theirs.read_bytes() != ours.read_bytes():
        out.append(("shared", theirs))
    return out


def load(path: Path, prefix: str) -> ModuleType:
    """Import a case file as a fresh module (registered, so dataclasses defined in it work)."""
    spec = importlib.util.spec_from_file_location(f"{prefix}_{path.parent.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
