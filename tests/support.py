"""Helpers that several test modules share (tests never import from each other's test files).

- `tiny_yaml`: configs/tiny.yaml pointed at the tiny world; `write_sae`: a random SAELens folder;
  `interrupting`: a generator that raises KeyboardInterrupt part way; `train_data`, `TRAIN_SAE`,
  `TRAIN_CFG`: the training tests' setup; `export_tiny` (with `make_sae`, `suite_saes`, `single`,
  `tiny_cfg`, `corpus_frequency`, `SUITE`): the tiny world exported with stand-in SAEs; `built_site`: a fixture, the
  synthetic run's site; `same_values`: equality of page data with NaN and a tolerance.

- `raw_http_server`: a socket server whose every answer is written by hand, to play an endpoint
  that breaks HTTP (a trickled body, a short one, a garbage status line, invalid UTF-8).
- `llm_config`: the analyze settings of an openai-compatible explainer at a URL.
- `import_graph`, `cycles`, `imports_closing_a_cycle`: the package's imports read from its
  source with `ast` (nothing imported), for the no-cycle rule of the developers' guide.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn

import synthetic_shards
from atlas import export
from atlas.config import RunConfig, SAEConfig, TrainConfig
from atlas.model import load_model
from atlas.stage import write_stamp

ROOT = Path(__file__).resolve().parent.parent


# ---- runs and SAEs -------------------------------------------------------------------------------


def tiny_yaml(tiny_world: Path, folder: Path, **sections) -> Path:
    """Write configs/tiny.yaml pointing at the tiny world into `folder`; `sections` update its sections."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["model"]["name"] = str(tiny_world / "model")
    raw["corpus"]["dataset"] = str(tiny_world / "corpus.jsonl")
    for name, values in sections.items():
        raw[name].update(values)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def write_sae(sae_dir: Path, d_in: int, d_sae: int, k: int, seed: int = 0, architecture: str = "topk") -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec[:4] = W_dec[4:8] + 0.05 * W_dec[:4]  # some near-duplicates, so neighbours are non-trivial
    tensors = {"W_enc": W_dec.T.contiguous() * 2, "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
               "b_dec": torch.zeros(d_in)}
    tensors["b_enc"][-3:] = -1e4  # three features that never fire (dead)
    sae_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, sae_dir / "sae_weights.safetensors")
    if architecture == "standard":
        tensors["b_enc"][:-3] = -1.5  # a plain ReLU SAE, sparse enough to be interesting
    (sae_dir / "cfg.json").write_text(json.dumps({"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "k": k,
                                                  "hook_name": "blocks.2.hook_resid_pre"}))
    (sae_dir / "metrics.json").write_text(json.dumps({"fvu": 0.25, "l0": k}))
    write_stamp(sae_dir, f"sae-{seed}")


def interrupting(real, after: int):
    """Wrap a generator function so the generator raises KeyboardInterrupt after `after` items."""

    def gen(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == after:
                raise KeyboardInterrupt
            yield item

    return gen


def train_data(n=4096, d=16, seed=0):
    """Low-rank rows [n, d] with an offset: what the training tests learn."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g) + 1.0


TRAIN_SAE = SAEConfig(architecture="topk", d_sae=64, k=4, aux_k=16)
TRAIN_CFG = TrainConfig(batch_size=128, n_tokens=128 * 60, lr=3e-3, warmup_steps=5, checkpoint_every=20,
                       dead_after_tokens=2000)


# ---- the tiny world exported with a stand-in SAE ----------------------------------------------------

LAYER, D_SAE = 2, 256
SUITE = [("L1", 1, 256), ("L2-256", 2, 256), ("L2-512", 2, 512), ("L3", 3, 256)]
"""The tiny suite: (id, layer, d_sae); three layers and a width family at layer 2."""

class StandInSAE(nn.Module):
    """A ReLU SAE encoder with fixed random weights, the shape `atlas.saes` SAEs have."""

    def __init__(self, d_in: int, d_sae: int, seed: int = 0, b_dec: torch.Tensor | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        self.b_enc = nn.Parameter(torch.randn(d_sae, generator=g) * 0.1)
        self.W_dec = nn.Parameter(self.W_enc.data.T.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in) if b_dec is None else b_dec.clone())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def encode_top(self, x: torch.Tensor, k: int):
        from atlas.saes.base import top_of_dense

        return top_of_dense(self.encode(x), k)


def make_sae(d_in: int, d_sae: int = D_SAE, b_dec: torch.Tensor | None = None, seed: int = 0) -> nn.Module:
    return StandInSAE(d_in, d_sae, seed=seed, b_dec=b_dec).eval().requires_grad_(False)


def suite_saes(d_in: int, suite=SUITE) -> list[export.SaeToExport]:
    """Stand-in SAEs for `suite`, each with its own random weights."""
    return [export.SaeToExport(i, layer, f"blocks.{layer}.hook_resid_pre", make_sae(d_in, d, seed=n), "relu")
            for n, (i, layer, d) in enumerate(suite)]


def single(sae: nn.Module, layer: int = LAYER) -> list[export.SaeToExport]:
    """One SAE as a suite of one, with the id a single-SAE run gives it."""
    return [export.SaeToExport(f"L{layer}", layer, f"blocks.{layer}.hook_resid_pre", sae, "relu")]


def tiny_cfg(world: Path, quantization: str = "auto", min_top1: float = 0.97, min_overlap: float = 0.95) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name, cfg.model.layer = str(world / "model"), LAYER
    cfg.corpus.dataset = str(world / "corpus.jsonl")
    cfg.export.quantization = quantization
    cfg.export.min_top1_agreement, cfg.export.min_topk_overlap = min_top1, min_overlap
    return cfg


def export_tiny(world: Path, out: Path, quantization: str = "auto", min_top1: float = 0.97,
                min_overlap: float = 0.95, saes: list[export.SaeToExport] | None = None) -> Path:
    """Export the tiny world's model plus `saes` (default: one stand-in SAE at layer 2) into `out`; returns `out`."""
    cfg = tiny_cfg(world, quantization, min_top1, min_overlap)
    loaded = load_model(cfg.model.name)
    out.mkdir(parents=True, exist_ok=True)
    export.export_dir(out, loaded, saes or single(make_sae(loaded.d_model)), cfg, "test",
                      export.parity_contexts(cfg, loaded), corpus_frequency(world, loaded))
    return out


def corpus_frequency(world: Path, loaded) -> np.ndarray:
    """Token ids by falling frequency in the world's corpus: what a run's store gives `frequent_tokens`."""
    texts = [json.loads(line)["text"] for line in (world / "corpus.jsonl").read_text().splitlines()]
    counts = np.bincount(np.concatenate([loaded.tokenizer(t)["input_ids"] for t in texts]))
    return np.argsort(-counts, kind="stable")[:int((counts > 0).sum())]


def same_values(a, b, rel=0.0) -> bool:
    """Equal, with NaN equal to NaN or None (a null float), and floats within `rel`."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_values(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k], rel) for k in a)
    nan = lambda x: x is None or (isinstance(x, float) and x != x)  # noqa: E731
    if isinstance(a, float) or isinstance(b, float):
        return (nan(a) and nan(b)) or (not nan(a) and not nan(b) and abs(a - b) <= rel * abs(b))
    return a == b


# ---- a built site ----------------------------------------------------------------------------------

BUILT_FEATURES = 150


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> Path:
    """runs/synth/site built from a synthetic run (hostile tokens and labels included)."""
    from atlas import build

    work = tmp_path_factory.mktemp("build")
    synthetic_shards.write(work / "runs" / "synth", BUILT_FEATURES, shard_size=64, n_vocab=300)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        site = build.run(RunConfig(path="synth.yaml"), analyser=False)
    finally:
        os.chdir(cwd)
    return work / site


# ---- an endpoint that speaks broken HTTP ----------------------------------------------------------


@contextmanager
def raw_http_server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """Serve every connection with `answer(conn)` (after reading the request); yields a base URL
    ("http://127.0.0.1:PORT/v1"). The server stops when the block ends."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                try:
                    _read_request(conn)
                    answer(conn)
                except OSError:
                    pass  # the client hung up, as it should on a deadline

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}/v1"
    finally:
        stop.set()
        thread.join(5)
        srv.close()


def llm_config(url: str, **explainer):
    """AnalyzeConfig for the openai-compatible explainer at `url`; `explainer` sets explainer_* keys
    (retries=0 -> explainer_retries=0)."""
    from atlas.config import AnalyzeConfig

    return AnalyzeConfig(explainer="openai-compatible", explainer_base_url=url, explainer_model="m",
                         **{f"explainer_{k}": v for k, v in explainer.items()})


def _read_request(conn: socket.socket) -> None:
    """Read a whole request (headers, then Content-Length bytes of body): a socket closed with
    unread bytes is reset, and the client would see that instead of the answer under test."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return
        body += chunk


# ---- the import graph -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    source: str
    """The importing module, e.g. "atlas.corpus"."""
    target: str
    """The imported module of the package, e.g. "atlas.model"."""
    line: int
    in_function: bool
    """Inside a function body (run when called), not at module level."""
    type_only: bool
    """Under `if TYPE_CHECKING:`: never run."""


def modules(package_dir: Path) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    root = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(package_dir: Path) -> list[Import]:
    """Every import of one of the package's modules by another, read from the source."""
    mods = modules(package_dir)
    found = []
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, in_function, type_only in _walk(tree):
            for target in _targets(node, name, is_package, mods):
                if target != name:
                    found.append(Import(name, target, node.lineno, in_function, type_only))
    return found


def _walk(tree: ast.AST):
    """(import node, inside a function, under TYPE_CHECKING) for every import statement."""
    stack = [(tree, False, False)]
    while stack:
        node, in_function, type_only = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function, type_only
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                stack.append((child, True, type_only))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.append((child, in_function, True))
            else:
                stack.append((child, in_function, type_only))


def _targets(node, name: str, is_package: bool, mods: dict[str, Path]) -> list[str]:
    """The package modules an import statement loads (its module, or a submodule it names)."""
    if isinstance(node, ast.Import):
        return [_owner(a.name, mods) for a in node.names if _owner(a.name, mods)]
    base = node.module or ""
    if node.level:
        parts = name.split(".") if is_package else name.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    out = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        target = full if full in mods else _owner(base, mods)
        if target:
            out.append(target)
    return out


def _owner(dotted: str, mods: dict[str, Path]) -> str | None:
    """The longest package module that `dotted` is or is inside of."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in mods:
            return ".".join(parts[:n])
    return None


def cycles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _reaches(edges: list[tuple[str, str]], start: str, goal: str) -> bool:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    seen, todo = {start}, [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def imports_closing_a_cycle(graph: list[Import]) -> list[Import]:
    """Imports inside functions whose target imports its importer back (directly or through others):
    an import moved into a function to dodge a cycle."""
    edges = [(i.source, i.target) for i in graph]
    return [i for i in graph if i.in_function and _reaches(edges, i.target, i.source)]

