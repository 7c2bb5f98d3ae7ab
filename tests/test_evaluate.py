"""Evaluation metrics against independent reference computations (numpy)."""

import numpy as np
import pytest
import torch

from atlas.config import SAEConfig
from atlas.evaluate import downstream_scores, reconstruction_metrics
from atlas.saes import build_sae


def test_reconstruction_metrics_match_numpy():
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="relu", d_sae=32), 8).requires_grad_(False)
    with torch.no_grad():
        sae.b_enc.fill_(-0.2)
    x = torch.randn(300, 8) * 3 + 1
    got = reconstruction_metrics(sae, [x[:100], x[100:250], x[250:]], dense_threshold=0.1)

    X = x.double().numpy()
    F = sae.encode(x).double().numpy()
    R = sae.reconstruct(x).double().numpy()
    resid = ((X - R) ** 2).sum()
    total = ((X - X.mean(0)) ** 2).sum()
    density = (F > 0).mean(0)
    assert got["explained_variance"] == pytest.approx(1 - resid / total, rel=1e-6)
    assert got["mse"] == pytest.approx(((X - R) ** 2).mean(), rel=1e-6)
    assert got["l0"] == pytest.approx((F > 0).sum(1).mean(), rel=1e-9)
    assert got["dead_fraction"] == pytest.approx((density == 0).mean())
    assert got["dense_fraction"] == pytest.approx((density > 0.1).mean())
    assert got["eval_tokens"] == 300


class Identity(torch.nn.Module):
    """A stand-in SAE whose reconstruction is x * gain."""

    def __init__(self, gain):
        super().__init__()
        self.gain = gain

    def reconstruct(self, x):
        return x * self.gain


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_ce_and_kl_scores_match_reference(tiny_world):
    from atlas.model import load_model

    torch.manual_seed(0)
    model = load_model(str(tiny_world / "model"))
    ids = torch.randint(0, 200, (4, 16))
    ids[:, 0] = model.bos_token_id
    layer = 2

    def logits(fn=None):
        if fn is None:
            return model.model(input_ids=ids).logits.double().numpy()
        with model.splice(layer, fn):
            return model.model(input_ids=ids).logits.double().numpy()

    def keep_bos(fn):
        return lambda r: torch.cat([r[:, :1], fn(r)[:, 1:]], 1)

    clean = logits()
    half = logits(keep_bos(lambda r: r * 0.5))
    zero = logits(keep_bos(torch.zeros_like))

    def ce(z):
        lp = _log_softmax(z)[:, :-1]
        return -np.take_along_axis(lp, ids[:, 1:, None].numpy(), -1).mean()

    def kl(z):
        p, q = _log_softmax(clean)[:, :-1], _log_softmax(z)[:, :-1]
        return (np.exp(p) * (p - q)).sum(-1).mean()

    got = downstream_scores(model, layer, Identity(0.5), ids, keep_first=True, batch_size=3)
    assert got["ce_clean"] == pytest.approx(ce(clean), rel=1e-4)
    assert got["ce_sae"] == pytest.approx(ce(half), rel=1e-4)
    assert got["ce_zero"] == pytest.approx(ce(zero), rel=1e-4)
    assert got["ce_loss_score"] == pytest.approx((ce(zero) - ce(half)) / (ce(zero) - ce(clean)), rel=1e-3)
    assert got["kl_score"] == pytest.approx((kl(zero) - kl(half)) / kl(zero), rel=1e-3)

    perfect = downstream_scores(model, layer, Identity(1.0), ids)
    assert perfect["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["kl_score"] == pytest.approx(1.0, abs=1e-5)


def test_models_without_lm_head_get_none():
    class NoHead:
        has_lm_head = False

    got = downstream_scores(NoHead(), 0, Identity(1.0), torch.zeros(2, 4, dtype=torch.long))
    assert got["ce_loss_score"] is None and got["kl_score"] is None
