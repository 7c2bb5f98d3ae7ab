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
from support import llm_config, raw_http_server, tiny_yaml
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


# ---- issue 17: hostile input, third round -----------------------------------------------------------
# Each case checks one `error:` line (or success) and that nothing finished was touched: the stamps'
# mtimes (`written`) and the published content (`result`) are as before. They run in-process where
# they can; the finished run is only copied, never rebuilt, unless the case is a rebuild.


def untouched(root: Path, before: dict, reference: dict) -> None:
    """No output was rewritten, none is damaged, nothing landed outside runs/tiny."""
    assert written(root) == before
    nothing_falsely_finished(root)
    assert result(root) == reference
    assert not (root / "activations.h5").exists() and not (root / LOCK_FILE).exists()


LOCK_FILE = ".lock"


@pytest.mark.parametrize("name", ["...yaml", "..yaml", ".yaml", ".hidden.yaml"])
def test_config_whose_name_escapes_runs_is_refused(work, capsys, reference, name):
    before = written(work)
    Path(name).write_text(Path(CONFIG).read_text())
    failed(atlas(capsys, "train", "--config", name, "--force"), "the run folder is named after the config file", code=2)
    untouched(work, before, reference)
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["tiny"]


def _laughs(depth: int = 9) -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, depth + 1):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + f"\nbuild:\n  title: *{chr(97 + depth)}\n"


@pytest.mark.parametrize("text, needle", [
    (_laughs(), "more than 100,000 values once its aliases are expanded"),
    ("model: " + "[" * 20000 + "]" * 20000 + "\n", "nested more than 32 levels deep"),
    ("build:\n  title: a\nbuild:\n  title: b\n", "duplicate key 'build'"),
    ("build:\n  title: a\n  title: b\n", "duplicate key 'title'"),
], ids=["billion-laughs", "nested-20000", "duplicate-section", "duplicate-key"])
def test_hostile_yaml_is_one_short_line(tmp_path, monkeypatch, capsys, text, needle):
    monkeypatch.chdir(tmp_path)
    Path("hostile.yaml").write_text(text)
    t0 = time.perf_counter()
    line = failed(atlas(capsys, "all", "--config", "hostile.yaml"), "hostile.yaml", needle, code=2)
    assert time.perf_counter() - t0 < 10 and len(line) < 300
    assert not Path("runs").exists()


@pytest.mark.parametrize("setting, needle", [
    ("model.device=banana", "'model.device' = 'banana': must be auto, cpu, cuda, cuda:N or mps"),
    ("export.opset=99", "'export.opset' = 99: must be between 14 and 21"),
    ("analyze.histogram_bins=1e10", "'analyze.histogram_bins' = 10000000000: must be between 2 and 10,000"),
    ("sae.d_sae=1e30", "'sae.d_sae' = 1e+30: too large"),
    ("sae.d_sae=1e11", "'sae.d_sae' = 100000000000: must be between 1 and 2^31 - 1"),
    ("corpus.n_tokens=1e400", "'corpus.n_tokens' must be int, got float inf"),
    ("build.title=[" + "xxxxxxxx, " * 5000 + "]", "'build.title' must be str, got list ['xxxxxxxx', "),
    ("build.title=" + "[" * 5000 + "]" * 5000, "--set 'build.title=[[[[[["),
    ("analyze.explainer_base_url=localhost:11434", "'analyze.explainer_base_url'"),
], ids=["device", "opset", "histogram-bins", "d_sae-1e30", "d_sae-1e11", "n_tokens-1e400", "long-value", "deep-value",
        "llm-url"])
def test_impossible_setting_is_refused_before_any_work(tmp_path, monkeypatch, capsys, setting, needle):
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text("build:\n  title: t\n")
    line = failed(atlas(capsys, "all", "--config", "tiny.yaml", "--set", setting), needle, code=2)
    assert len(line) < 400
    assert not Path("runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_keeps_the_store(work, capsys, reference):
    before = written(work)
    failed(atlas(capsys, "collect", "--config", CONFIG, "--set", "model.device=cuda"),
           "'model.device' = 'cuda': this machine has no CUDA device", code=2)
    untouched(work, before, reference)


def test_ctx_len_beyond_the_models_positions_keeps_the_store(work, capsys, reference):
    before = written(work)
    failed(atlas(capsys, "collect", "--config", CONFIG, "--set", "corpus.ctx_len=129"),
           "'corpus.ctx_len' = 129", "has 128 positions", code=2)
    untouched(work, before, reference)


def test_store_too_large_for_the_disk_is_refused_with_the_figure(work, capsys, reference):
    before = written(work)
    line = failed(atlas(capsys, "collect", "--config", CONFIG, "--set", "corpus.n_tokens=1e13"),
                  "corpus.n_tokens = 10,000,000,000,000 needs about", "of disk")
    assert re.search(r"needs about [\d.,]+ [kMGT]?B of disk under runs/tiny, [\d.,]+ [kMGT]?B is free", line), line
    untouched(work, before, reference)


def test_batch_larger_than_the_training_split_is_refused_at_once(work, capsys, reference):
    before = written(work)
    failed(atlas(capsys, "train", "--config", CONFIG, "--set", "train.batch_size=1e10"),
           "'train.batch_size' = 10,000,000,000 exceeds the", "training tokens in the store")
    untouched(work, before, reference)


def test_sae_too_large_for_memory_is_refused_with_the_figure(work, capsys, reference):
    before = written(work)
    failed(atlas(capsys, "train", "--config", CONFIG, "--set", "sae.d_sae=2000000000", "--set", "sae.aux_k=8"),
           "sae.d_sae = 2,000,000,000 with train.batch_size = 512 needs about", "of memory")
    untouched(work, before, reference)


def test_build_without_the_export_keeps_the_site_unless_told(work, capsys, reference):
    site_stamp = work / RUN / "site" / "stamp.json"
    before = site_stamp.stat().st_mtime_ns
    shutil.rmtree(work / RUN / "onnx")
    failed(atlas(capsys, "build", "--config", CONFIG, "--force"), "runs/tiny/onnx: missing", "--no-analyser")
    assert site_stamp.stat().st_mtime_ns == before
    site = work / RUN / "site"
    assert damage(site, read_stamp(site)) is None
    assert (work / RUN / "site" / "onnx").is_dir()  # the finished site keeps its analyser
    r = succeeded(atlas(capsys, "build", "--config", CONFIG, "--no-analyser"))
    assert "build: wrote" in r.out and not (work / RUN / "site" / "onnx").exists()


def test_markdown_in_the_title_is_shown_as_text(work, capsys):
    title = "[Home](javascript:alert(1)) *bold* {: onclick=alert(2)}"
    succeeded(atlas(capsys, "build", "--config", CONFIG, "--set", f"build.title='{title}'"))
    home = (work / RUN / "site" / "index.html").read_text(encoding="utf-8")
    assert 'href="javascript' not in home and "<strong>bold" not in home and "<em>bold" not in home
    assert ' onclick="' not in home and " onclick=" not in home.replace("{: onclick=alert(2)}", "")
    heading = re.search(r"<h1[^>]*>(.*?)</h1>", home, re.S).group(1)
    assert heading.startswith(title), heading  # shown as written


def test_leftovers_of_failed_runs_go_with_the_next_successful_one(work, capsys, reference):
    run = work / RUN
    made = [run / "site.tmp", run / "features.partial", run / "sae.tmp", run / "onnx.old", run / "features.tmp"]
    for p in made:
        p.mkdir()
        (p / "junk").write_text("x")
    (run / "activations.h5.parts" / "part-00099.h5.tmp123").write_text("x")
    (run / "activations.h5.tmp").write_text("x")
    before = written(work)
    assert succeeded(atlas(capsys, "all", "--config", CONFIG)).out.count("up to date") == 5
    assert written(work) == before
    assert not [p for p in made if p.exists()]
    assert not list(run.glob("*.tmp*")) and not list((run / "activations.h5.parts").glob("*.tmp*"))


def test_a_folder_that_is_no_stage_output_is_never_replaced(work, capsys, reference):
    site = work / RUN / "site"
    shutil.rmtree(site)
    site.mkdir()
    (site / "my-notes.txt").write_text("mine")
    failed(atlas(capsys, "build", "--config", CONFIG), "runs/tiny/site: exists and is not an output of atlas")
    assert (site / "my-notes.txt").read_text() == "mine" and sorted(os.listdir(site)) == ["my-notes.txt"]


def test_unexpected_exception_is_one_line_and_a_log(work, capsys, monkeypatch):
    from atlas import build as build_stage

    def broken(*args, **kwargs):
        raise RuntimeError("something deep went wrong\nsecond line")

    monkeypatch.setattr(build_stage, "build_site", broken)
    line = failed(atlas(capsys, "build", "--config", CONFIG, "--force"),
                  "unexpected failure in build: RuntimeError: something deep went wrong",
                  "the full trace is in runs/tiny/atlas-error.log")
    assert "second line" not in line
    log = (work / RUN / "atlas-error.log").read_text()
    assert "Traceback" in log and "something deep went wrong" in log and "broken" in log
    nothing_falsely_finished(work)
    monkeypatch.setenv("ATLAS_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["build", "--config", CONFIG, "--force"])


def test_recursion_deep_in_a_library_is_one_line(work, capsys, monkeypatch):
    from atlas import build as build_stage

    def recurse(*args, **kwargs):
        return recurse()

    monkeypatch.setattr(build_stage, "build_site", recurse)
    failed(atlas(capsys, "build", "--config", CONFIG, "--force"), "unexpected failure in build: RecursionError")
    nothing_falsely_finished(work)


def test_sigterm_during_build_says_what_was_kept(work, reference):
    proc = spawn("all", "--config", CONFIG, "--set", "build.title=Another title")
    tmp = work / RUN / "site.tmp"
    deadline = time.time() + 300
    while not (tmp / "features").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "terminated" in ln]
    assert lines == ["atlas all: terminated during build; finished and kept: collect, train, analyze, links, export; "
                     "build's previous output was left as it was; run it again to resume"], err[-2000:]
    assert not tmp.exists()
    site = work / RUN / "site"
    assert damage(site, read_stamp(site)) is None


def test_run_folder_that_cannot_be_written_is_not_called_uncreatable(work, capsys, monkeypatch):
    import builtins
    import errno

    real_open = builtins.open

    def deny_lock(file, *args, **kwargs):
        if str(file).endswith("runs/tiny/.lock"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny_lock)
    line = failed(atlas(capsys, "build", "--config", CONFIG), "Permission denied")
    assert "cannot write in the run folder runs/tiny" in line


# ---- corpus files ----------------------------------------------------------------------------------


def test_corpus_text_forms(tmp_path):
    from atlas.config import CorpusConfig
    from atlas.corpus import iter_texts

    def texts(name: str, data: bytes) -> list[str]:
        (tmp_path / name).write_bytes(data)
        return list(iter_texts(CorpusConfig(dataset=str(tmp_path / name))))

    bom = "\ufeff".encode()
    assert texts("bom.jsonl", bom + b'{"text": "one"}\n{"text": "two"}\n') == ["one", "two"]
    assert texts("bom.txt", bom + b"one\n\ntwo\n") == ["one", "two"]
    assert texts("blank.jsonl", b'{"text": "  "}\n{"text": "\\n\\t"}\n{"text": "real"}\n') == ["real"]


def test_deeply_nested_jsonl_line_is_one_line(work, capsys, reference):
    before = written(work)
    Path("deep.jsonl").write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    failed(atlas(capsys, "collect", "--config", CONFIG, "--set", "corpus.dataset=deep.jsonl"),
           "deep.jsonl:2: JSON nested too deeply")
    untouched(work, before, reference)


def test_whitespace_only_corpus_builds_no_store(work, capsys, reference):
    before = written(work)
    Path("blank.jsonl").write_text('{"text": "   "}\n{"text": "\\n\\n"}\n' * 50)
    failed(atlas(capsys, "collect", "--config", CONFIG, "--set", "corpus.dataset=blank.jsonl"),
           "corpus 'blank.jsonl' yielded no text")
    untouched(work, before, reference)


def test_long_lines_are_tokenised_in_bounded_pieces(tiny_world):
    import transformers

    from atlas import corpus

    tok = transformers.AutoTokenizer.from_pretrained(tiny_world / "model")
    seen = []

    def recording(texts, **kw):
        seen.append(sum(len(t) for t in texts))
        return tok(texts, **kw)

    words = [json.loads(line)["text"] for line in (tiny_world / "corpus.jsonl").read_text().splitlines()]
    long_doc = " ".join(words)
    long_doc = (long_doc + " ") * (4 * corpus.BATCH_CHARS // len(long_doc) + 1)
    docs = ["A short one.", long_doc, "And after it."]
    got = np.concatenate(list(corpus.iter_contexts(docs, recording, 32, 0, 1)))
    assert max(seen) <= corpus.BATCH_CHARS + corpus.PIECE_CHARS
    # the cuts fall before spaces, where the tokenizer splits anyway: the same stream as uncut
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [1]
    n = len(stream) // 31
    want = np.concatenate([[0] + stream[i * 31:(i + 1) * 31] for i in range(n)])
    np.testing.assert_array_equal(got, want)


# ---- import-sae: a hostile cfg.json ----------------------------------------------------------------


def _edit_cfg(src: Path, dst: Path, text: str | bytes | None = None, **changes) -> Path:
    _saelens_copy(src, dst)
    if text is None:
        cfg = json.loads((dst / "cfg.json").read_text())
        cfg.update(changes)
        text = json.dumps(cfg)
    (dst / "cfg.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return dst


@pytest.mark.parametrize("change, needle", [
    ({"d_sae": 10**9}, "'W_enc' has shape [64, 256], but cfg.json declares d_in = 64, d_sae = 1000000000"),
    ({"metadata": [1, 2]}, "'metadata' must be a JSON object, got list"),
    ({"d_in": -3}, "'d_in' = -3: needs an integer between 1 and 2^31 - 1"),
    ("d_in_1e400", "'d_in' = inf: needs an integer"),
    ("latin1", "cfg.json: not UTF-8 text"),
    ("deep", "cfg.json: JSON nested too deeply"),
], ids=["huge-d_sae", "metadata-list", "negative-d_in", "d_in-1e400", "not-utf8", "nested-100000"])
def test_hostile_cfg_json_is_refused_before_any_allocation(work, capsys, reference, tmp_path, change, needle):
    src = work / RUN / "sae"
    if change == "d_in_1e400":
        text = (src / "cfg.json").read_text().replace('"d_in": 64', '"d_in": 1e400')
        source = _edit_cfg(src, tmp_path / "sae", text)
    elif change == "latin1":
        source = _edit_cfg(src, tmp_path / "sae", (src / "cfg.json").read_bytes().replace(b"{", b'{"x": "caf\xe9", ', 1))
    elif change == "deep":
        source = _edit_cfg(src, tmp_path / "sae", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        source = _edit_cfg(src, tmp_path / "sae", **change)
    before = written(work)
    failed(atlas(capsys, "import-sae", str(source), "--config", CONFIG), needle)
    untouched(work, before, reference)


# ---- the LLM explainer's endpoint -------------------------------------------------------------------

_OK = b'{"choices": [{"message": {"content": "Explanation: a label"}}]}'


def _trickle(conn):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(_OK))
    for byte in _OK:
        conn.sendall(bytes([byte]))
        time.sleep(0.3)


def _huge_content(conn):
    body = json.dumps({"choices": [{"message": {"content": "x" * 500_000}}]}).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


@pytest.mark.parametrize("answer, needle", [
    (_trickle, "no complete answer within 1 s after 2 tries"),
    (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + _OK),
     "the answer ended after 63 bytes, 937 short of its Content-Length"),
    (lambda c: c.sendall(b"HELLO THERE\r\n\r\n"), "a broken HTTP answer (BadStatusLine: 'HELLO THERE')"),
    (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd\xfc"), "the answer is not UTF-8"),
    (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (2 << 20)), "an answer over 1,048,576 bytes"),
    (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999\r\n\r\n"), "an answer of 9,999,999,999 bytes"),
], ids=["trickle", "short-body", "garbage-status", "not-utf8", "endless-body", "huge-length"])
def test_broken_llm_endpoint_is_one_line_within_the_deadline(answer, needle):
    from atlas.errors import AtlasError
    from atlas.labels.llm import AnswerCache, ChatClient

    with raw_http_server(answer) as url:
        client = ChatClient(llm_config(url, retries=1, timeout=1), AnswerCache(None), backoff=0.01)
        t0 = time.perf_counter()
        with pytest.raises(AtlasError) as e:
            client.complete("s", "u", 5)
    assert time.perf_counter() - t0 < 2 * 1 + 2
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_llm_answers_are_kept_bounded(tmp_path):
    from atlas.labels.llm import MAX_ANSWER, AnswerCache, ChatClient

    with raw_http_server(_huge_content) as url:
        client = ChatClient(llm_config(url, retries=0, timeout=5), AnswerCache(tmp_path))
        assert len(client.complete("s", "u", 5)) == MAX_ANSWER
    assert sum(p.stat().st_size for p in tmp_path.rglob("*.json")) < 2 * MAX_ANSWER


@pytest.mark.parametrize("key", ["n_positions", "max_position_embeddings"])
def test_ctx_len_is_checked_against_either_position_key(key):
    """GPT-2 names its positions n_positions, Llama (a GGUF's converted config too) max_position_embeddings."""
    from types import SimpleNamespace

    from atlas.errors import ConfigError
    from atlas.model import check_ctx_len

    loaded = SimpleNamespace(name="m.gguf", model=SimpleNamespace(config=SimpleNamespace(**{key: 128})))
    check_ctx_len("x.yaml", 128, loaded)
    with pytest.raises(ConfigError, match=r"'corpus.ctx_len' = 512: m.gguf has 128 positions"):
        check_ctx_len("x.yaml", 512, loaded)
