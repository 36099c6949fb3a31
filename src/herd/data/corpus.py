"""Embedded English text and user text manifests.

Two corpora ship with every CPython, so they need no download:
- `pydoc`: the pydoc topics (`pydoc_data.topics`), ~465K characters of English reference
  prose in 79 topics, as paragraph groups (~800 documents);
- `python_docs`: those plus the docstrings of the standard library's modules, classes and
  functions (read with `ast`, nothing is imported), ~1.6M characters in ~2800 documents.
Held-out splits see unseen documents on familiar subjects, and packing has many real
document boundaries to respect.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path

from herd.data.manifest import read_jsonl_manifest
from herd.data.splits import hash_split

MIN_DOC_CHARS = 400  # shorter paragraphs are merged with the next one
MIN_DOCSTRING_CHARS = 200  # one-line docstrings say little English
# Stdlib parts that are tests, tools or vendored code rather than documented API.
SKIPPED_STDLIB_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "site-packages",
    "ensurepip",
}


def pydoc_documents() -> list[str]:
    """Paragraph groups of the pydoc topics, in a fixed order."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for key in sorted(topics):
        buffer = ""
        for para in topics[key].split("\n\n"):
            para = para.strip("\n")
            if not para.strip():
                continue
            buffer = f"{buffer}\n\n{para}" if buffer else para
            if len(buffer) >= MIN_DOC_CHARS:
                docs.append(buffer)
                buffer = ""
        if buffer:
            docs.append(buffer)
    return docs


@functools.cache
def stdlib_docstrings() -> tuple[str, ...]:
    """Docstrings of at least MIN_DOCSTRING_CHARS from the standard library, in file order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(lib.rglob("*.py")):
        if SKIPPED_STDLIB_DIRS & set(path.relative_to(lib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    docs.append(doc)
    return tuple(docs)


def python_docs_documents() -> list[str]:
    return pydoc_documents() + list(stdlib_docstrings())


CORPORA = {"pydoc": pydoc_documents, "python_docs": python_docs_documents}


def split_documents(
    docs: list[str], val_fraction: float = 0.05, test_fraction: float = 0.05
) -> dict:
    """Deterministic split by a hash of each document's text (stable across runs and machines)."""
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for doc in docs:
        splits[hash_split(doc, val_fraction, test_fraction)].append(doc)
    return splits


def _text_of(record: dict, root: Path) -> str:
    text = record.get("text")
    if not isinstance(text, str):
        raise ValueError('missing a string "text" field')
    if not text.strip():
        raise ValueError('"text" is empty')
    return text


def read_text_manifest(path: str | Path, skip_bad: bool = False) -> list[str]:
    """Texts from a JSONL manifest, one `{"text": ...}` object per line (bad lines: see
    herd.data.manifest.read_jsonl_manifest)."""
    return [text for text, _ in read_jsonl_manifest(path, _text_of, skip_bad, "text samples")]
