import pytest

from atlas.config import load_config
from atlas.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    from support import ROOT

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem


def test_values_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  layer: 3\nsae:\n  d_sae: 1e3\n  k: 4\n"),
                      ["train.lr=0.01", "sae.architecture=relu"])
    assert cfg.model.layer == 3 and cfg.sae.d_sae == 1000 and isinstance(cfg.sae.d_sae, int)
    assert cfg.train.lr == 0.01 and cfg.sae.architecture == "relu"
    assert cfg.hook_name == "blocks.3.hook_resid_pre"
    assert cfg.run_dir.as_posix() == "runs/run"


def test_section_hash_tracks_only_named_sections(tmp_path):
    a = load_config(write(tmp_path, "sae:\n  k: 4\n"))
    b = load_config(write(tmp_path, "sae:\n  k: 4\ntrain:\n  lr: 0.5\n"))
    assert a.section_hash("sae") == b.section_hash("sae")
    assert a.section_hash("train") != b.section_hash("train")


@pytest.mark.parametrize("text, overrides, expected", [
    ("sae:\n  bogus: 1\n", [], "unknown key 'sae.bogus'"),
    ("nonsense:\n  a: 1\n", [], "unknown section 'nonsense'"),
    ("sae:\n  d_sae: many\n", [], "'sae.d_sae' must be int"),
    ("sae:\n  d_sae: 0\n", [], "'sae.d_sae' = 0"),
    ("sae:\n  k: 10\n  d_sae: 5\n", [], "'sae.k' = 10"),
    ("sae:\n  architecture: gated\n", [], "'sae.architecture' = 'gated'"),
    ("model:\n  layer: -1\n", [], "'model.layer' = -1"),
    ("model: [1, 2\n", [], "not valid YAML"),
    ("- a\n- b\n", [], "expected a mapping"),
    ("", ["sae.d_sae"], "expected section.key=value"),
    ("", ["train.lr=fast"], "'train.lr' must be float"),
])
def test_bad_configs_name_file_and_key(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    assert expected in str(e.value)
    if "--set" not in str(e.value):
        assert str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
