"""Every code block of README.md and docs/*.md runs as written and prints what the page shows.

The conventions are documented for contributors in docs/docs-tests.md. In short: a ```python block runs; the
blocks of one page share a namespace, in page order; what the blocks print since the previous shown output is
compared with the next ```text (or ```console) block before the next ```python block, or, in a block without
one, with the block's ``# -> expected`` comments; a block that shows no output must print nothing. HTML comments
right before a fence change that: ``<!-- docs-test: skip REASON -->``, ``<!-- docs-test: script NAME.py -->``
(run the block as a file with ``python -m gradwise run NAME.py``), ``<!-- docs-test: file NAME.py -->`` (run it
as ``python NAME.py``, a fresh process: for process-wide counters), ``<!-- docs-test: command CMD -->`` (run CMD
from the repository root). Numbers are compared with a tolerance (``_same_text``); a line ``...`` in the shown
output stands for any number of lines.

The API reference (docs/api.md, mkdocs.yml) is built with ``mkdocs build --strict``.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}

_FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
_MARK = re.compile(r"^<!--\s*docs-test:\s*(skip|script|file|command)\b\s*(.*?)\s*-->\s*$")
_OUTPUT_LANGS = {"text", "console"}
_RUN_LANGS = {"python"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mark: tuple[str, str] | None = None  # (kind, argument) from a docs-test comment right before the fence


@dataclass
class Step:
    """What runs and what it must print: one or more python blocks (or a command) and the shown output."""
    page: Path
    blocks: list[Block] = field(default_factory=list)
    expected: Block | None = None
    arrows: str | None = None  # the expected output from ``# ->`` comments

    @property
    def id(self) -> str:
        first = self.blocks[0]
        return f"{first.page.name}:{first.line}"


def parse(page: Path) -> list[Block]:
    """The fenced blocks of a page (longer fences hide the ones inside them, so docs can show markup)."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, lang, start = m.group(1), m.group(2), i
        i += 1
        while i < len(lines) and lines[i].rstrip() != ticks:
            i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = _MARK.match(prev)
        blocks.append(Block(page, start + 1, lang, "\n".join(lines[start + 1:i]) + "\n",
                            (mark.group(1), mark.group(2)) if mark else None))
        i += 1
    return blocks


def steps(page: Path) -> tuple[list[Step], list[Block]]:
    """Group a page's blocks into steps; returns the steps and the skipped python blocks."""
    out: list[Step] = []
    skipped: list[Block] = []
    current: Step | None = None
    for block in parse(page):
        kind = block.mark[0] if block.mark else None
        if kind == "skip":
            assert block.mark[1], f"{page.name}:{block.line}: a skipped block needs a reason"
            skipped.append(block)
            continue
        if kind in ("script", "file", "command") or block.lang in _RUN_LANGS:
            if current is not None and (current.blocks[-1].mark or kind):  # scripts and commands stand alone
                current = None
            if current is None:
                current = Step(page)
                out.append(current)
            current.blocks.append(block)
            if kind is None and _arrow_comments(block.code) is not None:  # its output is written in its comments
                current.arrows, current = _arrow_comments("".join(b.code for b in current.blocks)), None
        elif block.lang in _OUTPUT_LANGS and current is not None:
            current.expected = block
            current = None
    return out, skipped


# --- comparing output ----------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _numbers_close(a: str, b: str) -> bool:
    """Printed numbers agree to the precision they are printed with, and anything below 1e-9 is round-off (a
    least-norm 1.6e-16 in one run is 3e-16 in another)."""
    x, y = float(a), float(b)
    return abs(x - y) <= 1e-9 or abs(x - y) <= 1e-3 * max(abs(x), abs(y))


def _same_line(shown: str, got: str) -> bool:
    if shown.rstrip() == got.rstrip():
        return True
    parts_s, parts_g = _NUMBER.split(shown.rstrip()), _NUMBER.split(got.rstrip())
    nums_s, nums_g = _NUMBER.findall(shown), _NUMBER.findall(got)
    return (parts_s == parts_g and len(nums_s) == len(nums_g)
            and all(_numbers_close(a, b) for a, b in zip(nums_s, nums_g, strict=True)))


def _same_text(shown: str, got: str) -> bool:
    """Line by line up to numbers (see _numbers_close); a shown line ``...`` matches any number of lines."""
    want = shown.rstrip("\n").split("\n") if shown.strip() else []
    have = got.rstrip("\n").split("\n") if got.strip() else []

    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(have)
        if want[i].strip() == "...":
            return any(match(i + 1, k) for k in range(j, len(have) + 1))
        return j < len(have) and _same_line(want[i], have[j]) and match(i + 1, j + 1)

    return match(0, 0)


def _arrow_comments(code: str) -> str | None:
    """The expected output written as ``# -> ...`` comments in the code, or None if there are none."""
    shown = [m.group(1) for m in re.finditer(r"#\s*->\s?(.*)$", code, re.M)]
    return "\n".join(shown) + "\n" if shown else None


# --- running -------------------------------------------------------------------------------------------------

def _run_python(blocks: list[Block], namespace: dict) -> str:
    """Run the blocks as lines of the page itself: tracebacks and gradwise's reports name the page's lines."""
    import linecache

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        for block in blocks:
            name = block.page.name
            text = block.page.read_text()
            linecache.cache[name] = (len(text), None, text.splitlines(keepends=True), name)
            exec(compile("\n" * block.line + block.code, name, "exec"), namespace)
    return buffer.getvalue()


# A CUDA build of torch on a machine with nvcc but no GPU logs this when inductor first looks for a compiler
# (torch 2.14.1+cu130 here): the machine's, not the page's
_NO_CUDA_RUNTIME = re.compile(r"^W\d{4} [\d:. ]+\d+ torch/utils/cpp_extension\.py:\d+\] "
                              r".*No CUDA runtime is found.*\n", re.M)


def _run_script(block: Block, tmp: Path) -> str:
    """``script``: the block as a file run by ``python -m gradwise run``; ``file``: run by ``python``."""
    kind, name = block.mark
    (tmp / name).write_text(block.code)
    runner = ["-m", "gradwise", "run"] if kind == "script" else []
    proc = subprocess.run([sys.executable, *runner, name], cwd=tmp, env=ENV, text=True,
                          capture_output=True, timeout=300)
    return proc.stdout + _NO_CUDA_RUNTIME.sub("", proc.stderr)


def _run_command(block: Block) -> str:
    """A command's stdout (``2>&1`` in the command to compare stderr too); a leading ``python`` is this one."""
    command = re.sub(r"^python\b", lambda m: sys.executable, block.mark[1])
    proc = subprocess.run(command, shell=True, cwd=ROOT, env=ENV, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, f"{block.mark[1]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _check_page(page: Path, tmp: Path) -> int:
    """Run every step of ``page`` in order in one namespace; returns how many blocks ran."""
    import torch

    page_steps, _ = steps(page)
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    torch.manual_seed(0)  # pages that draw random numbers say so with their own seed; this keeps the rest fixed
    ran = 0
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        for step in page_steps:
            kind = step.blocks[0].mark[0] if step.blocks[0].mark else None
            if kind in ("script", "file"):
                got = _run_script(step.blocks[0], tmp)
            elif kind == "command":
                got = _run_command(step.blocks[0])
            else:
                got = _run_python(step.blocks, namespace)
            ran += len(step.blocks)
            shown = step.expected.code if step.expected is not None else step.arrows or ""
            assert _same_text(shown, got), (
                f"{step.id}: the page shows\n{textwrap.indent(shown, '  | ')}\nbut it prints\n"
                f"{textwrap.indent(got, '  | ')}")
    finally:
        os.chdir(cwd)
    return ran


# packages of the optional extras a page may show (integrations.md: Lightning, transformers): a page that imports one
# not installed here is skipped, saying which (as tests/test_integrations.py skips); the test extras leave them out
_OPTIONAL = {"lightning": "lightning", "transformers": "transformers", "accelerate": "transformers"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_prints_what_it_shows(page, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            _check_page(page, tmp_path)
        except ModuleNotFoundError as e:
            top = (e.name or "").partition(".")[0]
            if top not in _OPTIONAL:
                raise
            pytest.skip(f"{page.name} imports {top}, not installed: pip install 'gradwise[{_OPTIONAL[top]}]'")


def test_every_block_is_run_or_skipped_with_a_reason():
    """Counts the blocks the page tests run (the figure in docs/docs-tests.md) and keeps skips rare."""
    ran = skipped = 0
    for page in PAGES:
        page_steps, page_skipped = steps(page)
        ran += sum(len(s.blocks) for s in page_steps)
        skipped += len(page_skipped)
        for block in parse(page):
            assert block.lang != "", f"{page.name}:{block.line}: say what the block is (```python, ```text, ```bash)"
    assert ran >= 25 and skipped <= 3, (ran, skipped)  # 25 on 2026-12-04: a floor, so no block drops out
    print(f"docs blocks run: {ran}, skipped: {skipped}")


def test_the_comparison_is_not_vacuous():
    assert _same_text("tensor([0.2325, 1.0439])\n", "tensor([0.2325, 1.0439])\n")
    assert _same_text("min_norm=1.6e-16\n", "min_norm=3.1e-16\n")
    assert _same_text("a\n...\nd\n", "a\nb\nc\nd\n") and _same_text("a\n...\nd\n", "a\nd\n")
    assert not _same_text("tensor([0.2325, 1.0439])\n", "tensor([0.2325, 1.0539])\n")
    assert not _same_text("1 contamination finding\n", "2 contamination finding\n")
    assert not _same_text("weight grad finite: True\n", "weight grad finite: False\n")
    assert not _same_text("", "something printed\n") and not _same_text("a\n", "a\nb\n")
    assert not _same_text("x\n...\nd\n", "a\nd\n")


# --- the API reference -----------------------------------------------------------------------------------------

def test_api_reference_builds(tmp_path):
    if shutil.which("mkdocs") is None and not _has_module("mkdocs"):
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    for module in ("mkdocstrings", "material"):
        if not _has_module(module):
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, env=ENV, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    api = (site / "api" / "index.html").read_text()
    for name in ("gradwise.grad", "gradwise.strong_zeros", "gradwise.trace", "gradwise.stationarity"):
        assert name in api, name
    assert "Drop-in for" in api  # a docstring's text, not only the names


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_relative_links_resolve():
    """Every relative link of a page names a file of the repository (and a heading of it, for .md#anchor)."""
    link = re.compile(r"\]\(([^)\s]+)\)")
    bad = []
    for page in PAGES:
        text = page.read_text()
        for target in link.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                bad.append(f"{page.name}: {target} (no such heading)")
    assert not bad, bad


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}
