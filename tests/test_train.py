"""The training loop: checkpoints and resume, NaN handling, schedules, data streaming."""

import json
import dataclasses
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

    def batches(self, batch_size, start_step=0, **kwargs):
        for step, batch in enumerate(super().batches(batch_size, start_step, **kwargs), start_step):
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


def test_run_health_names_the_fix():
    from atlas.train.health import RunHealth

    h = RunHealth(lr=1e-3, warmup_steps=10, total_steps=100)
    assert all(h.observe(i, fvu, 0.0) == [] for i, fvu in enumerate((1.0, 0.8, 0.6, 0.5, 0.5, 0.5)))  # falling: fine
    assert h.observe(30, 0.9, 0.0) == [] and h.observe(31, 0.5, 0.0) == []  # one noisy row is not a rise
    assert h.observe(32, 0.9, 0.0) == []  # the median of the last 5 rows: still 0.5
    rise = h.observe(33, 0.9, 0.0)  # now 0.9, over 1.5 x 0.5
    assert len(rise) == 1 and "too high" in rise[0] and "train.lr" in rise[0] and "0.000333" in rise[0]
    assert h.observe(40, 0.9, 0.0) == []  # each kind once
    dead = [h.observe(50 + i, 0.4, share) for i, share in enumerate((0.3, 0.45, 0.55, 0.65))]
    fired = sum(dead, [])
    assert dead[:2] == [[], []] and len(fired) == 1 and "dead" in fired[0] and "train.lr = 0.000333" in fired[0]
    stall = RunHealth(lr=1e-5, warmup_steps=10, total_steps=100)
    stall.observe(1, 1.0, 0.0)
    assert stall.observe(9, 0.99, 0.0) == []  # still warming up
    assert "too low" in stall.observe(12, 0.98, 0.0)[0]


def test_training_at_a_hopeless_lr_warns(capsys):
    x = data()
    tc = TrainConfig(batch_size=128, n_tokens=128 * 60, lr=1e-7, warmup_steps=5, dead_after_tokens=10_000)
    _, summary = train_sae(SAE, tc, tensor_stream(x), progress=False)
    assert any("too low" in w for w in summary["warnings"])
    _, summary = train_sae(SAE, dataclasses.replace(tc, lr=3e-3), tensor_stream(x), progress=False)
    assert "warnings" not in summary


def test_row_stream_reads_ahead_and_stops_its_reader():
    import threading

    def readers():
        return [t for t in threading.enumerate() if t.name == "atlas-rows"]

    x = data(n=2000)
    stream = RowStream(lambda a, b: x[a:b].half(), 2000, chunk_rows=100, buffer_rows=400, seed=1)
    before = set(readers())
    batches = stream.batches(64)
    first = next(batches)
    assert first.dtype == torch.float16 and first.shape == (64, 16)  # the source's dtype
    mine = set(readers()) - before
    assert len(mine) == 2  # one reads buffers, one gathers batches
    batches.close()
    for t in mine:
        t.join(timeout=2)
    assert not any(t.is_alive() for t in mine)


def test_non_finite_rows_are_named():
    """A batch's NaN/inf row is found by its row id in the store (and, through check_row, its part named)."""
    x = data(n=2000)
    x[1234, 5] = float("inf")

    def check_row(row):
        raise AtlasError(f"part-7.h5: NaN/inf activations (store row {row})")

    stream = RowStream(lambda a, b: x[a:b], 2000, chunk_rows=100, buffer_rows=400, keep=lambda ids: ids % 7 > 0,
                       seed=1, check_row=check_row)
    for step, batch in enumerate(stream.batches(64, start_step=3), 3):  # from a resumed step, and in a rank's slice
        if not torch.isfinite(batch).all():
            break
        assert stream.bad_row(batch, 64, step) is None
    with pytest.raises(AtlasError, match="store row 1234"):
        stream.bad_row(batch, 64, step)
    half = next(stream.batches(64, start_step=step, rank=1, world=2))
    if not torch.isfinite(half).all():
        with pytest.raises(AtlasError, match="store row 1234"):
            stream.bad_row(half, 64, step, rank=1, world=2)
    stream.check_row = None
    assert stream.bad_row(batch, 64, step) == 1234
