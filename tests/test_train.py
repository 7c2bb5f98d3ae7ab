"""The training loop: checkpoints and resume, NaN handling, schedules, data streaming."""

import json
import math

import pytest
import torch

from atlas.config import SAEConfig, TrainConfig
from atlas.errors import AtlasError
from atlas.train.data import RowStream, tensor_stream
from atlas.train.trainer import CKPT_FILE, LOG_FILE, geometric_median, lr_at, train_sae
from support import TRAIN_CFG as TC, TRAIN_SAE as SAE, train_data as data


pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    x = data()
    full, _ = train_sae(SAE, TC, tensor_stream(x), ckpt_dir=tmp_path / "a", fp="f", progress=False)
    # "killed" after 30 steps: the checkpoint at step 20 survives, steps 21..30 are lost
    part, summary = train_sae(SAE, TC, tensor_stream(x), ckpt_dir=tmp_path / "b", fp="f", progress=False, max_steps=30)
    assert not summary["finished"]
    ckpt = torch.load(tmp_path / "b" / CKPT_FILE, weights_only=True)
    assert ckpt["step"] == 20
    resumed, summary = train_sae(SAE, TC, tensor_stream(x), ckpt_dir=tmp_path / "b", fp="f", progress=False)
    assert summary["finished"] and summary["steps"] == 60
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(resumed, name), getattr(full, name), atol=1e-5), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / LOG_FILE).read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # no duplicated log lines after resuming


def test_checkpoint_of_another_config_is_ignored(tmp_path):
    x = data()
    train_sae(SAE, TC, tensor_stream(x), ckpt_dir=tmp_path, fp="one", progress=False, max_steps=25)
    _, summary = train_sae(SAE, TC, tensor_stream(x), ckpt_dir=tmp_path, fp="two", progress=False, max_steps=5)
    assert summary["steps"] == 5


class PoisonedStream(RowStream):
    """Batch number `bad_step` carries a NaN."""

    bad_step = 45

    def batches(self, batch_size, start_step=0):
        for step, batch in enumerate(super().batches(batch_size, start_step), start_step):
            if step == self.bad_step:
                batch = batch.clone()
                batch[3, 2] = float("nan")
            yield batch


def test_nan_stops_with_one_line_and_keeps_last_checkpoint(tmp_path):
    x = data()
    stream = PoisonedStream(lambda a, b: x[a:b], len(x), chunk_rows=4096, buffer_rows=len(x))
    with pytest.raises(AtlasError) as e:
        train_sae(SAE, TC, stream, ckpt_dir=tmp_path, fp="f", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "nan" in msg.lower() and "step 45" in msg and "step 40" in msg
    ckpt = torch.load(tmp_path / CKPT_FILE, weights_only=True)
    assert ckpt["step"] == 40
    assert all(torch.isfinite(v).all() for v in ckpt["sae"].values())


def test_metrics_log_fields(tmp_path):
    train_sae(SAE, TC, tensor_stream(data()), ckpt_dir=tmp_path, fp="f", progress=False)
    rows = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert set(rows[-1]) == {"step", "tokens", "loss", "mse", "fvu", "l0", "dead_fraction", "lr"}
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    assert rows[-1]["l0"] == pytest.approx(4.0)


def test_saved_sae_takes_raw_inputs():
    """Training scales inputs to E|x| = sqrt(d_in); the returned SAE has the scale folded in."""
    x = data() * 50
    sae, summary = train_sae(SAE, TC, tensor_stream(x), progress=False)
    assert summary["input_scale"] == pytest.approx(math.sqrt(16) / x[:2000].norm(dim=1).mean().item(), rel=0.2)
    fvu = (sae.reconstruct(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu < 0.5


def test_lr_schedule():
    tc = TrainConfig(lr=1.0, warmup_steps=10, decay_fraction=0.2)
    assert lr_at(0, 100, tc) == pytest.approx(0.1)
    assert lr_at(50, 100, tc) == 1.0
    assert lr_at(90, 100, tc) == pytest.approx(0.5)
    assert lr_at(99, 100, tc) == pytest.approx(0.05)


def test_geometric_median_resists_outliers():
    x = torch.zeros(101, 3)
    x[:100] = torch.randn(100, 3) * 0.01
    x[100] = 1000.0
    assert geometric_median(x).norm() < 0.1
    assert x.mean(0).norm() > 5


def test_row_stream_streams_chunks_and_resumes_anywhere():
    rows = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 2)
    keep = lambda ids: ids % 10 != 0  # noqa: E731  (e.g. leave out BOS positions)
    stream = RowStream(lambda a, b: rows[a:b], 1000, chunk_rows=64, buffer_rows=256, keep=keep, seed=3)
    batches = [b for _, b in zip(range(20), stream.batches(50))]
    first_epoch = torch.cat(batches[:18])[:, 0]
    assert len(set(first_epoch.tolist())) == 900 and (first_epoch % 10 != 0).all()
    assert not torch.equal(first_epoch, first_epoch.sort().values)  # shuffled
    later = [b for _, b in zip(range(5), stream.batches(50, start_step=13))]
    for a, b in zip(batches[13:18], later):
        assert torch.equal(a, b)


def test_per_parameter_learning_rates(tmp_path):
    """TopK's decoder and biases step at lr_scales x lr; the checkpoint keeps one group per parameter."""
    from atlas.saes import build_sae

    groups = build_sae(SAE, 16).optimizer_groups()
    assert sorted(g["name"] for g in groups) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    scales = {g["name"]: g["lr_scale"] for g in groups}
    assert scales == {"W_enc": 1.0, "W_dec": 10.0, "b_enc": 10.0, "b_dec": 10.0}  # TopK's defaults
    train_sae(SAE, TC, tensor_stream(data()), ckpt_dir=tmp_path, fp="f", progress=False, max_steps=20)
    ckpt = torch.load(tmp_path / CKPT_FILE, weights_only=True)
    assert [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]] == [1, 1, 1, 1]
    got = sorted(g["lr"] / g["lr_scale"] for g in ckpt["optimizer"]["param_groups"])
    assert got[0] == pytest.approx(got[-1])  # one schedule, scaled per parameter


def test_checkpoint_with_other_optimizer_groups_starts_over(tmp_path, capsys):
    x = data()
    train_sae(SAE, TC, tensor_stream(x), ckpt_dir=tmp_path, fp="f", progress=False, max_steps=20)
    ckpt = torch.load(tmp_path / CKPT_FILE, weights_only=True)
    opt = ckpt["optimizer"]  # as an older trainer wrote it: one group holding every parameter
    opt["param_groups"] = [{**opt["param_groups"][0], "params": [0, 1, 2, 3]}]
    torch.save(ckpt, tmp_path / CKPT_FILE)
    _, summary = train_sae(SAE, TC, tensor_stream(x), ckpt_dir=tmp_path, fp="f", progress=False, max_steps=5)
    assert summary["steps"] == 5 and "older trainer" in capsys.readouterr().out
