"""Bad inputs and faults through the CLI (issue #11), each against a copy of one finished tiny run.

For every case: a non-zero exit, one error line naming the file or key, no traceback, nothing
marked finished that is not, and, after the fix the message names (the command in its
backticks, run as written), the same result as the clean run. A few cases are legitimate
changes rather than faults (an edited corpus, an imported SAE, a forced rerun): there the
check is that exactly the stages downstream of the change redo their work.

Faults that need a second process (two builds at once, kill -9, a full disk) run the CLI as a
subprocess; everything else calls it in-process, which is faster and turns any traceback into a
test failure. The environment faults are made portably, and so that they also bite as root,
where chmod stops nothing:
- a full disk: RLIMIT_FSIZE in the child, so the kernel fails the write (EFBIG) where a full
  disk would fail it with ENOSPC; both are the same OSError path;
- a run folder that cannot be written: its parent `runs` is a regular file;
- a site folder that cannot be written: creating site.tmp raises the EACCES an unprivileged user
  gets (simulated in-process: the interpreter lives under /root here, so dropping to `nobody`
  is not possible).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from atlas.cli import main
from atlas.stage import damage, read_stamp, sha256_file, write_stamp

CONFIG = "tiny.yaml"
RUN = Path("runs/tiny")
OUTPUTS = ("activations.h5", "sae", "features", "onnx", "site")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- one finished run, copied for every case -------------------------------------------------


@pytest.fixture(scope="module")
def finished(tiny_world, tmp_path_factory) -> Path:
    """A folder with tiny.yaml, its own corpus and a finished runs/tiny (every stage)."""
    from conftest import tiny_yaml

    root = tmp_path_factory.mktemp("faults")
    shutil.copy(tiny_world / "corpus.jsonl", root / "corpus.jsonl")
    # a short training run, and a parity gate this small SAE passes
    tiny_yaml(tiny_world, root, corpus={"dataset": "corpus.jsonl"}, train={"n_tokens": 30000},
              export={"min_top1_agreement": 0.5, "min_topk_overlap": 0.5})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        torch.set_num_threads(1)
        assert main(["all", "--config", CONFIG]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="module")
def reference(finished) -> dict:
    return result(finished)


@pytest.fixture
def work(finished, tmp_path, monkeypatch) -> Path:
    """A private copy of the finished run; the test runs in it."""
    dst = tmp_path / "w"
    shutil.copytree(finished, dst)
    monkeypatch.chdir(dst)
    return dst


def result(root: Path) -> dict:
    """What a run produced, as content: two runs with equal results published the same thing."""
    run = root / RUN
    pages = sorted((run / "site" / "features").glob("*/index.html"), key=lambda p: int(p.parent.name))
    return {
        "store": read_stamp(run / "activations.h5")["digest"],
        "sae": sha256_file(run / "sae" / "sae_weights.safetensors"),
        "features": {p.name: sha256_file(p) for p in sorted((run / "features").glob("*.parquet"))},
        "onnx": {n: sha256_file(run / "onnx" / n) for n in ("trunk.onnx", "trunk.web.onnx", "encoder-L2.onnx", "encoder-L2.web.onnx",
                                                            "tokenizer.json")},
        "site": {"pages": len(pages), "content": [sha256_file(p) for p in pages]},
    }


# ---- running the CLI and judging what it did ---------------------------------------------------


@dataclass
class Ran:
    code: int
    out: str
    err: str


def atlas(capsys, *args: str) -> Ran:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return Ran(code, out, err)


def spawn(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "atlas", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, **kw)


def failed(r: Ran, *needles: str, code: int | None = None) -> str:
    """The one error line of a command that failed cleanly; it must contain every needle."""
    assert r.code != 0 and (code is None or r.code == code), (r.code, r.err[-2000:])
    assert "Traceback" not in r.err and "Traceback" not in r.out, r.err[-3000:]
    lines = [ln for ln in re.split(r"[\r\n]", r.err) if ": error: " in ln]
    assert len(lines) == 1, r.err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def succeeded(r: Ran) -> Ran:
    assert r.code == 0, r.err[-3000:]
    return r


def fix(capsys, line: str) -> Ran:
    """Run the command the error message names, exactly as written."""
    m = re.search(r"run `(atlas [^`]+)`", line)
    assert m, f"the message names no command to run: {line}"
    words = shlex.split(m.group(1))
    return succeeded(atlas(capsys, *words[1:]))


def nothing_falsely_finished(root: Path, damaged: tuple[str, ...] = ()) -> None:
    """Every output that says it is finished is complete; no temporary folder is left behind."""
    run = root / RUN
    for name in OUTPUTS:
        stamp = read_stamp(run / name)
        if stamp is not None and name not in damaged:
            assert damage(run / name, stamp) is None, name
    assert not [p for p in run.glob("*.tmp") if p.is_dir()]


def rerun_equals_clean(capsys, root: Path, reference: dict) -> Ran:
    """`atlas all` now succeeds and the run holds what the clean run held."""
    r = succeeded(atlas(capsys, "all", "--config", CONFIG))
    nothing_falsely_finished(root)
    assert result(root) == reference
    return r


def written(root: Path) -> dict:
    """When each output was last finished (its stamp's mtime): which stages redid their work."""
    run = root / RUN
    return {name: (run / name if name.endswith(".h5") else run / name / "stamp.json").stat().st_mtime_ns
            for name in OUTPUTS}


# ---- config -----------------------------------------------------------------------------------


def _write(name: str, data: bytes | None = None) -> str:
    if data is None:
        Path(name).mkdir()
    else:
        Path(name).write_bytes(data)
    return name


@pytest.mark.parametrize("make, needle", [
    (lambda: _write("folder.yaml"), "folder.yaml: is a folder, not a config file"),
    (lambda: _write("latin1.yaml", b"build:\n  title: caf\xe9\n"), "latin1.yaml: not UTF-8 text"),
    (lambda: "missing.yaml", "missing.yaml: no such config file"),
    (lambda: _write("broken.yaml", b"model: [1, 2\n"), "broken.yaml: not valid YAML"),
    (lambda: _write("nonsense.yaml", b"- a\n- b\n"), "nonsense.yaml: expected a mapping"),
], ids=["directory", "non-utf8", "missing", "bad-yaml", "not-a-mapping"])
def test_unreadable_config(work, capsys, reference, make, needle):
    failed(atlas(capsys, "all", "--config", make()), needle, code=2)
    nothing_falsely_finished(work)
    rerun_equals_clean(capsys, work, reference)


@pytest.mark.parametrize("setting, needle", [
    ("sae.dsae=3", "unknown key 'sae.dsae'"),
    ("train.checkpoint_every=0", "'train.checkpoint_every' = 0"),
    ("train.warmup_steps=-10", "'train.warmup_steps' = -10"),
    ("train.lr=.nan", "'train.lr' must be a finite number"),
    ("analyze.n_neighbours=-1", "'analyze.n_neighbours' = -1"),
    ("analyze.dense_threshold=2", "'analyze.dense_threshold' = 2.0"),
    ("export.parity_texts=0", "'export.parity_texts' = 0"),
    ("sae.aux_k=1000", "'sae.aux_k' = 1000"),
    ("export.top_k=1000", "'export.top_k' = 1000"),
    ("corpus.ctx_len=many", "'corpus.ctx_len' must be int"),
    ("build.site_url=javascript:alert(1)", "'build.site_url'"),
    ("corpus.dataset=[", "--set 'corpus.dataset=[': not a YAML value"),
    ("sae.d_sae", "--set 'sae.d_sae': expected section.key=value"),
    ("model.layer=14", "'model.layer' = 14: "),
])
def test_bad_setting_names_the_key(work, capsys, reference, setting, needle):
    failed(atlas(capsys, "all", "--config", CONFIG, "--set", setting), needle, code=2)
    nothing_falsely_finished(work)
    rerun_equals_clean(capsys, work, reference)


# ---- corpus and model ----------------------------------------------------------------------------


def _parquet_corpus(name: str, column) -> str:
    import pyarrow as pa

    pq.write_table(pa.table({"text": column}), name)
    return name


@pytest.mark.parametrize("make, needle", [
    (lambda: _write("binary.jsonl", b'{"text": "fine"}\n\x89PNG\r\n\x1a\n\x00\xff\xfe'), "binary.jsonl:2: not UTF-8 text"),
    (lambda: _write("corrupt.parquet", b"PAR1" + b"\x00" * 300), "corrupt.parquet: unreadable parquet"),
    (lambda: _parquet_corpus("numbers.parquet", [1, 2, 3]), "numbers.parquet: column 'text' holds int64, not text"),
    (lambda: _write("fields.jsonl", b'{"text": "fine"}\n{"txt": "no field"}\n'), "fields.jsonl:2: expected a JSON object"),
    (lambda: _write("nulls.jsonl", b'{"text": null}\n'), "nulls.jsonl:1: expected a JSON object"),
    (lambda: _write("empty.jsonl", b""), "corpus 'empty.jsonl' yielded no text"),
    (lambda: "nowhere.jsonl", "nowhere.jsonl: no such corpus file"),
], ids=["binary-jsonl", "corrupt-parquet", "parquet-not-text", "missing-field", "null-text", "empty", "missing"])
def test_bad_corpus_keeps_the_finished_store(work, capsys, reference, make, needle):
    failed(atlas(capsys, "all", "--config", CONFIG, "--set", f"corpus.dataset={make()}"), needle, code=1)
    nothing_falsely_finished(work)
    rerun_equals_clean(capsys, work, reference)


def _model_copy(tiny_world: Path, name: str) -> Path:
    dst = Path(name)
    shutil.copytree(tiny_world / "model", dst)
    return dst


def test_model_folder_without_tokenizer_files(work, capsys, reference, tiny_world):
    model = _model_copy(tiny_world, "no-tokenizer")
    for p in model.iterdir():
        if "token" in p.name or p.name in ("vocab.json", "merges.txt"):
            p.unlink()
    failed(atlas(capsys, "collect", "--config", CONFIG, "--set", f"model.name={model}"), "no-tokenizer", "tokenizer")
    nothing_falsely_finished(work)
    rerun_equals_clean(capsys, work, reference)


def test_truncated_model_weights(work, capsys, reference, tiny_world):
    model = _model_copy(tiny_world, "truncated")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    failed(atlas(capsys, "collect", "--config", CONFIG, "--set", f"model.name={model}"), "model.safetensors")
    nothing_falsely_finished(work)
    rerun_equals_clean(capsys, work, reference)


def test_missing_local_model_is_not_called_a_hub_problem(work, capsys, reference):
    line = failed(atlas(capsys, "collect", "--config", CONFIG, "--set", "model.name=./no/such/model"), "no/such/model")
    assert "hub" not in line.lower(), line
    rerun_equals_clean(capsys, work, reference)


def test_edited_corpus_reruns_every_stage(work, capsys):
    before = written(work)
    corpus = Path("corpus.jsonl")
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join([json.dumps({"text": "An edited first story about a red kite."}), *lines[1:]]) + "\n")
    r = succeeded(atlas(capsys, "all", "--config", CONFIG))
    assert "up to date" not in r.out
    after = written(work)
    assert all(after[name] != before[name] for name in OUTPUTS), (before, after)
    nothing_falsely_finished(work)
    assert succeeded(atlas(capsys, "all", "--config", CONFIG)).out.count("up to date") == 5


# ---- the activation store ----------------------------------------------------------------------


PART = RUN / "activations.h5.parts" / "part-00003.h5"


def test_deleted_part_is_recomputed_alone(work, capsys, reference):
    PART.unlink()
    line = failed(atlas(capsys, "analyze", "--config", CONFIG, "--force"), str(PART), "missing part")
    nothing_falsely_finished(work, damaged=("activations.h5",))
    r = fix(capsys, line)  # atlas collect
    assert "up to date" not in r.out and sum(1 for _ in PART.parent.glob("part-*.h5")) == 8
    rerun_equals_clean(capsys, work, reference)


def test_truncated_part_is_recomputed(work, capsys, reference):
    PART.write_bytes(PART.read_bytes()[:5000])
    line = failed(atlas(capsys, "train", "--config", CONFIG), str(PART), "truncated")
    fix(capsys, line)
    rerun_equals_clean(capsys, work, reference)


def test_deleted_store_file_is_rebuilt_from_its_parts(work, capsys, reference):
    (work / RUN / "activations.h5").unlink()
    line = failed(atlas(capsys, "analyze", "--config", CONFIG, "--force"), "activations.h5: missing or unfinished")
    fix(capsys, line)
    rerun_equals_clean(capsys, work, reference)


@pytest.mark.parametrize("value, stage", [(float("nan"), "analyze"), (float("inf"), "train")])
def test_non_finite_activations_stop_naming_the_part(work, capsys, reference, value, stage):
    with h5py.File(PART, "r+") as f:  # in place: the part keeps its size, so only reading it can tell
        f["acts"][7, 3] = value
    line = failed(atlas(capsys, stage, "--config", CONFIG, "--force"), str(PART), "NaN/inf activations")
    assert "delete it and run" in line
    nothing_falsely_finished(work)
    PART.unlink()
    fix(capsys, line)
    rerun_equals_clean(capsys, work, reference)


# ---- the SAE --------------------------------------------------------------------------------------


def _saelens_copy(src: Path, dst: Path, perm: torch.Tensor | None = None, poison: bool = False) -> Path:
    """The run's SAE as a SAELens folder elsewhere: latents permuted, or one weight made NaN."""
    dst.mkdir()
    shutil.copy(src / "cfg.json", dst / "cfg.json")
    w = load_file(str(src / "sae_weights.safetensors"))
    if perm is not None:
        w = {"W_enc": w["W_enc"][:, perm], "b_enc": w["b_enc"][perm], "W_dec": w["W_dec"][perm], "b_dec": w["b_dec"]}
    if poison:
        w["W_enc"][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in w.items()}, str(dst / "sae_weights.safetensors"))
    return dst


def _max_act(root: Path) -> np.ndarray:
    tables = [pq.read_table(p, columns=["feature_id", "max_act"]) for p in sorted((root / RUN / "features")
                                                                               .glob("features-*.parquet"))]
    return np.concatenate([t.column("max_act").to_numpy() for t in tables])


def test_import_of_a_permuted_sae_replaces_every_downstream_output(work, finished, capsys, reference, tmp_path):
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    source = _saelens_copy(finished / RUN / "sae", tmp_path / "permuted", perm=perm)
    before = written(work)
    r = succeeded(atlas(capsys, "import-sae", str(source), "--config", CONFIG))
    assert r.out.count("up to date") == 1  # collect only
    after = written(work)
    assert [n for n in OUTPUTS if after[n] != before[n]] == ["sae", "features", "onnx", "site"]
    np.testing.assert_allclose(_max_act(work), _max_act(finished)[perm.numpy()], rtol=1e-5)
    nothing_falsely_finished(work)
    # Publishing the original again gives the clean run's features, pages and encoder.
    original = _saelens_copy(finished / RUN / "sae", tmp_path / "original")
    succeeded(atlas(capsys, "import-sae", str(original), "--config", CONFIG))
    rerun_equals_clean(capsys, work, reference)


def test_import_of_non_finite_weights_is_refused(work, capsys, reference, tmp_path):
    source = _saelens_copy(work / RUN / "sae", tmp_path / "poisoned", poison=True)
    failed(atlas(capsys, "import-sae", str(source), "--config", CONFIG),
           str(source / "sae_weights.safetensors"), "NaN/inf")
    nothing_falsely_finished(work)
    rerun_equals_clean(capsys, work, reference)


def test_non_finite_weights_in_the_runs_sae_stop_analyze_and_export(work, capsys, reference):
    sae = work / RUN / "sae"
    w = load_file(str(sae / "sae_weights.safetensors"))
    w["W_dec"][5] = float("inf")
    save_file(w, str(sae / "sae_weights.safetensors"))
    stamp = read_stamp(sae)
    write_stamp(sae, stamp["fingerprint"], **{k: stamp[k] for k in ("stage", "inputs", "rerun")})  # as an old import
    line = failed(atlas(capsys, "analyze", "--config", CONFIG), "sae_weights.safetensors", "'W_dec'", "NaN/inf")
    failed(atlas(capsys, "export", "--config", CONFIG), "sae_weights.safetensors", "'W_dec'", "NaN/inf")
    nothing_falsely_finished(work)
    fix(capsys, line)  # atlas train --force
    rerun_equals_clean(capsys, work, reference)


def test_deleted_sae_file_is_regenerated(work, capsys, reference):
    (work / RUN / "sae" / "cfg.json").unlink()
    line = failed(atlas(capsys, "export", "--config", CONFIG, "--force"), "sae/cfg.json: missing", "atlas train")
    fix(capsys, line)
    rerun_equals_clean(capsys, work, reference)


# ---- features, encoder, site ------------------------------------------------------------------------


SHARD = RUN / "features" / "features-00001.parquet"


@pytest.mark.parametrize("harm, needle", [
    (lambda: SHARD.unlink(), "features-00001.parquet: missing"),
    (lambda: (RUN / "features" / "manifest.json").unlink(), "manifest.json: missing"),
    (lambda: SHARD.write_bytes(SHARD.read_bytes()[:1000]), "features-00001.parquet: changed since it was written"),
    (lambda: (RUN / "onnx" / "encoder-L2.web.onnx").unlink(), "encoder-L2.web.onnx: missing"),
], ids=["deleted-shard", "deleted-manifest", "truncated-shard", "deleted-web-encoder"])
def test_damaged_input_of_build_names_the_file_and_the_fix(work, capsys, reference, harm, needle):
    harm()
    line = failed(atlas(capsys, "build", "--config", CONFIG, "--force"), needle)
    assert (work / RUN / "site" / "stamp.json").exists()  # the finished site is kept
    fix(capsys, line)
    rerun_equals_clean(capsys, work, reference)


def test_non_finite_features_stop_the_build(work, capsys, reference):
    import pyarrow as pa

    features = work / RUN / "features"
    table = pq.read_table(features / "features-00000.parquet")
    max_act = table.column("max_act").to_numpy().copy()
    max_act[3] = np.inf
    pq.write_table(table.set_column(table.schema.get_field_index("max_act"), "max_act", pa.array(max_act)),
                   features / "features-00000.parquet", compression="zstd")
    stamp = read_stamp(features)
    write_stamp(features, stamp["fingerprint"], **{k: stamp[k] for k in ("stage", "inputs", "rerun")})
    line = failed(atlas(capsys, "build", "--config", CONFIG, "--force"), "features-00000.parquet: feature 3",
                  "max_act")
    nothing_falsely_finished(work)
    fix(capsys, line)  # atlas analyze --force
    rerun_equals_clean(capsys, work, reference)


def test_forced_analysis_rebuilds_the_site_and_nothing_else(work, capsys, reference):
    before = written(work)
    succeeded(atlas(capsys, "analyze", "--config", CONFIG, "--force"))
    r = succeeded(atlas(capsys, "all", "--config", CONFIG))
    after = written(work)
    assert [n for n in OUTPUTS if after[n] != before[n]] == ["features", "site"]
    assert r.out.count("up to date") == 4 and "build: wrote" in r.out
    assert result(work) == reference


def test_deleted_page_is_rebuilt(work, capsys, reference):
    (work / RUN / "site" / "features" / "63" / "index.html").unlink()
    assert "build: wrote" in succeeded(atlas(capsys, "build", "--config", CONFIG)).out
    rerun_equals_clean(capsys, work, reference)


def test_hostile_title_is_escaped_everywhere(work, capsys):
    title = 'T</title><script>alert(1)</script>"&'
    succeeded(atlas(capsys, "build", "--config", CONFIG, "--set", f"build.title={title}"))
    site = work / RUN / "site"
    for page in [site / "index.html", site / "explorer.html", site / "features" / "3" / "index.html"]:
        text = page.read_text(encoding="utf-8")
        assert "<script>alert(1)" not in text, page
        assert "T&lt;/title&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in text, page
        head = re.search(r"<title>(.*?)</title>", text, re.S).group(1)
        assert "<" not in head, head


# ---- writers, environment ---------------------------------------------------------------------------


def test_two_builds_at_once_take_turns(work, reference):
    procs = [spawn("build", "--config", CONFIG, "--force") for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert all("Traceback" not in e for _, e in outs)
    waited = [e for _, e in outs if "waiting for it to finish" in e]
    assert len(waited) == 1 and "runs/tiny is being written by `atlas build`" in waited[0]
    assert sum(o.count("build: wrote") for o, _ in outs) == 2
    nothing_falsely_finished(work)
    assert result(work) == reference


def test_kill_9_during_build_leaves_the_old_site(work, capsys, reference):
    proc = spawn("build", "--config", CONFIG, "--force")
    tmp = work / RUN / "site.tmp"
    deadline = time.time() + 120
    while not (tmp / "features").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert tmp.exists() and not (tmp / "stamp.json").exists()  # killed mid-build: not marked finished
    site = work / RUN / "site"
    assert damage(site, read_stamp(site)) is None  # the finished site is untouched
    assert "build: wrote" in succeeded(atlas(capsys, "build", "--config", CONFIG, "--force")).out
    rerun_equals_clean(capsys, work, reference)


def test_disk_full_during_build(work, capsys, reference):
    limit = 1 << 20  # no file over 1 MiB: the vendored wasm of the prompt analyser will not fit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = spawn("build", "--config", CONFIG, "--force", preexec_fn=small_files)
    out, err = proc.communicate(timeout=300)
    line = failed(Ran(proc.returncode, out, err), "site.tmp/", "File too large", "runs/tiny/site was left as it was")
    assert line.startswith("atlas build: error: runs/tiny/site.tmp/")
    nothing_falsely_finished(work)
    rerun_equals_clean(capsys, work, reference)


def test_run_folder_that_cannot_be_created(work, capsys):
    shutil.rmtree("runs")
    Path("runs").write_text("a file where the runs folder should be\n")
    failed(atlas(capsys, "all", "--config", CONFIG), "runs/tiny", "cannot create the run folder")
    assert Path("runs").is_file()


def test_site_folder_that_cannot_be_written(work, capsys, reference, monkeypatch):
    import errno

    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name == "site.tmp":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    failed(atlas(capsys, "build", "--config", CONFIG, "--force"), "runs/tiny/site.tmp: Permission denied")
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    nothing_falsely_finished(work)
    rerun_equals_clean(capsys, work, reference)
