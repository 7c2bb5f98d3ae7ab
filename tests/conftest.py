import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import chromium_path, open_browser  # noqa: E402
from support import tiny_yaml  # noqa: E402
from tiny_llama import build as build_tiny_llama  # noqa: E402
from tiny_world import build as build_tiny_world  # noqa: E402


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A tiny local GPT-2, its BPE tokenizer and a generated corpus (model/, corpus.jsonl, corpus.txt)."""
    return build_tiny_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture(scope="session")
def tiny_suite_onnx(tiny_world, tmp_path_factory) -> Path:
    """The tiny world's model and a suite of stand-in SAEs (test_export.SUITE: three layers, a width
    family at one) exported to an onnx/ folder; shared by test_export and test_browser_analyser."""
    from support import export_tiny, suite_saes

    from atlas.model import load_model

    d_model = load_model(str(tiny_world / "model")).d_model
    return export_tiny(tiny_world, tmp_path_factory.mktemp("suite-onnx"), saes=suite_saes(d_model))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny Llama as a Q4_1 GGUF file (tiny_llama.GGUF_NAME) and as transformers weights (reference/)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Models converted from GGUF go to a fresh cache, never the user's (subprocesses inherit it)."""
    import os

    os.environ["ATLAS_CACHE"] = str(tmp_path_factory.mktemp("atlas-cache"))


@pytest.fixture
def one_thread():
    """Small matrices: one torch thread is faster, and immune to a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def browser():
    if chromium_path() is None:
        pytest.skip("browser tests skipped: Debian's chromium is not installed (apt-get install chromium)")
    with open_browser() as b:
        yield b


def pytest_report_header(config):
    if chromium_path() is None:
        return "NOTICE: chromium not found; browser tests will be skipped (apt-get install chromium to run them)"


@pytest.fixture
def tiny_config(tiny_world, tmp_path, monkeypatch):
    """configs/tiny.yaml in a fresh folder, pointing at the tiny world; the test runs in that folder,
    so runs land in tmp_path/runs/tiny/. Override values with the CLI's `--set`."""
    monkeypatch.chdir(tmp_path)
    return tiny_yaml(tiny_world, tmp_path)
