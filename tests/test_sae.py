"""SAE architectures: dictionary recovery, the SAELens file format both ways, the sparse kernel."""

import json

import pytest
import torch
from safetensors.torch import save_file

from atlas.config import SAEConfig, TrainConfig
from atlas.errors import AtlasError
from atlas.saes import ARCHITECTURES, build_sae, load_sae
from atlas.saes.batchtopk import batch_topk
from atlas.saes.fused import fixed_width, sparse_decode, sparse_encode
from atlas.train.data import tensor_stream
from atlas.train.trainer import default_lr, train_sae
from planted import planted_heavy


pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n=16384, d_in=32, n_atoms=48, active=3, noise=0.01, seed=0):
    """x = sparse codes @ D + noise + offset, with unit-norm atoms D [n_atoms, d_in]."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_atoms, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(n, n_atoms).scatter(1, idx, 0.5 + torch.rand(n, active, generator=g))
    return codes @ D + noise * torch.randn(n, d_in, generator=g) + 0.3, D


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_recovers_planted_dictionary(arch):
    x, D = planted()
    cfg = SAEConfig(architecture=arch, d_sae=96, k=3, aux_k=16, l1_coefficient=1.0)
    tc = TrainConfig(batch_size=256, n_tokens=256 * 1200, lr=3e-3, warmup_steps=20, dead_after_tokens=25_600,
                     l1_warmup_steps=100)
    sae, summary = train_sae(cfg, tc, tensor_stream(x), progress=False)
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    recovered = ((D @ W.T).max(dim=1).values > 0.9).float().mean().item()
    assert recovered >= 0.9, f"{arch}: recovered {recovered:.0%} of the planted directions"
    assert summary["finished"]


LR_FACTORS = (10 ** -0.5, 1.0, 10 ** 0.5)
"""The learning rates every architecture is tested at: train.lr's default for the data
(`default_lr`) over a range of a factor of 10 around it."""
FLOOR = {"relu": 0.25, "jumprelu": 0.35}
"""What ReLU + L1 and JumpReLU find here at each of those learning rates (measured when this test
was written: ReLU 30%, 56%, 56%; JumpReLU 42%, 45%, 41%; L1 / L0 coefficient 1): a floor against
regressions, not a goal. The sparsity penalty, not the learning rate, is what holds them back: in
the session that first wrote this test no L1 coefficient in 0.3-10 or L0 coefficient in 0.1-5 did
better."""


@pytest.mark.parametrize("factor", LR_FACTORS, ids=["lr/3.2", "lr", "lr*3.2"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_recovers_rare_heavy_tailed_dictionary_over_a_10x_range_of_lr(arch, factor):
    """Rare atoms, heavy-tailed magnitudes, more atoms than dimensions, at the default learning rate
    and at a third and three times it: TopK, BatchTopK and Matryoshka find at least 90% of the
    atoms and 80% of the rarest quarter (a decoder row within cosine 0.9), and the trainer does not
    warn. Before BatchTopK's decoder stepped at the encoder's lr it found 30% here (none of the
    rarest quarter), and Matryoshka's decoder at BatchTopK's rate found 79% at lr*3.2. BatchTopK's
    inference threshold must also give about k latents per token on unseen rows."""
    x, D, p = planted_heavy(n=16384 + 4096)
    x, held = x[:16384], x[16384:]
    cfg = SAEConfig(architecture=arch, d_sae=192, k=3, aux_k=16, l1_coefficient=1.0)
    tc = TrainConfig(batch_size=256, n_tokens=256 * 1170, lr=factor * default_lr(x.shape[1]), warmup_steps=20,
                     dead_after_tokens=25_600, l1_warmup_steps=100)
    sae, summary = train_sae(cfg, tc, tensor_stream(x), progress=False)
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    found = (D @ W.T).max(dim=1).values > 0.9
    rarest = found[p.argsort()[:len(p) // 4]]
    got = f"{arch} at lr {tc.lr:.2g}: {found.float().mean():.0%} of the atoms, {rarest.float().mean():.0%} of the rarest quarter"
    if arch in FLOOR:
        assert found.float().mean() >= FLOOR[arch], got
        return
    assert found.float().mean() >= 0.9 and rarest.float().mean() >= 0.8, got
    assert "warnings" not in summary, summary.get("warnings")
    if arch in ("batchtopk", "matryoshka"):
        l0 = (sae.encode(held) > 0).sum(dim=1).float().mean().item()
        assert abs(l0 - cfg.k) <= 0.15 * cfg.k, f"held-out L0 {l0:.2f} at the inference threshold, k = {cfg.k}"


def test_a_learning_rate_far_too_high_is_warned_about():
    """Ten times the top of that range: the runs fail, and the trainer says so, naming a lower lr."""
    x, D, p = planted_heavy(n=16384)
    for arch in ("topk", "matryoshka"):
        cfg = SAEConfig(architecture=arch, d_sae=192, k=3, aux_k=16)
        tc = TrainConfig(batch_size=256, n_tokens=256 * 600, lr=30 * default_lr(x.shape[1]), warmup_steps=20,
                         dead_after_tokens=25_600)
        _, summary = train_sae(cfg, tc, tensor_stream(x), progress=False)
        assert any("too high" in w or "dead" in w for w in summary.get("warnings", [])), (arch, summary)


def _trained_like(arch, d_in=16, d_sae=64, seed=0):
    sae = build_sae(SAEConfig(architecture=arch, d_sae=d_sae, k=4), d_in, seed=seed,
                    metadata={"model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre", "context_size": 128})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        sae.W_dec.mul_(1.5)  # non-unit decoder norms exercise the folding on save
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.2)
        if arch == "jumprelu":
            sae.threshold.fill_(0.05)
    return sae.eval()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_save_load_round_trip(arch, tmp_path):
    sae = _trained_like(arch)
    x = torch.randn(50, 16)
    sae.save(tmp_path)
    back = load_sae(tmp_path)
    assert torch.allclose(back.reconstruct(x), sae.reconstruct(x), atol=1e-5)
    # the same latents fire; magnitudes may carry the decoder norm (folded on save)
    assert torch.equal(back.encode(x) > 0, sae.encode(x) > 0)
    if arch in ("relu", "jumprelu"):  # decoder norms are folded into the encoder on save
        assert torch.allclose(back.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


@pytest.mark.parametrize("arch,saelens_arch", [("relu", "standard"), ("topk", "topk"), ("batchtopk", "jumprelu"),
                                               ("jumprelu", "jumprelu"), ("matryoshka", "jumprelu")])
def test_saelens_cfg_format(arch, saelens_arch, tmp_path):
    from safetensors.torch import load_file

    _trained_like(arch).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                "reshape_activations", "metadata", "architecture"):
        assert key in cfg, key
    assert cfg["architecture"] == saelens_arch
    assert cfg["metadata"]["hook_name"] == "blocks.8.hook_resid_pre"
    assert cfg["metadata"]["model_name"] == "gpt2"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["metadata"]["training_architecture"] == arch
    if arch == "topk":
        assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    expect = {"W_enc": (16, 64), "b_enc": (64,), "W_dec": (64, 16), "b_dec": (16,)}
    if saelens_arch == "jumprelu":
        expect["threshold"] = (64,)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expect


def test_lr_scales_are_config_fields_recorded_in_cfg_json(tmp_path):
    sae = build_sae(SAEConfig(architecture="topk", d_sae=64, k=4, lr_scale_b_enc=3.0), 16)
    assert sae.lr_scales == {"W_dec": 10.0, "b_enc": 3.0, "b_dec": 10.0}  # unset fields: TopK's defaults
    assert build_sae(SAEConfig(architecture="batchtopk", d_sae=64, k=4), 16).lr_scales["W_dec"] == 1.0
    assert set(build_sae(SAEConfig(architecture="relu", d_sae=64), 16).lr_scales.values()) == {1.0}
    sae.save(tmp_path)
    recorded = json.loads((tmp_path / "cfg.json").read_text())["metadata"]["atlas_sae_config"]
    assert (recorded["lr_scale_w_dec"], recorded["lr_scale_b_enc"], recorded["k"]) == (10.0, 3.0, 4)
    back = load_sae(tmp_path)
    assert back.cfg == sae.cfg and back.lr_scales == sae.lr_scales


def test_matryoshka_groups_resolve_record_and_survive_loading(tmp_path):
    from atlas.saes.matryoshka import matryoshka_widths

    assert matryoshka_widths([0.0625, 0.25, 1.0], 1024) == [64, 256, 1024]
    assert matryoshka_widths([100.0, 300.0], 1024) == [100, 300, 1024]  # d_sae added last
    assert matryoshka_widths([], 4096) == [64, 256, 1024, 4096]
    assert matryoshka_widths([], 8) == [1, 2, 8]  # rounding collapses equal widths
    sae = _trained_like("matryoshka")  # d_sae 64, default groups: 1, 4, 16, 64
    assert sae.cfg.matryoshka_groups == [1, 4, 16, 64]
    groups = sae.latent_groups()
    assert groups.tolist() == [0] + [1] * 3 + [2] * 12 + [3] * 48
    assert _trained_like("batchtopk").latent_groups() is None
    sae.save(tmp_path)
    back = load_sae(tmp_path)  # a JumpReLU SAE, as SAELens reads it; the widths come from the metadata
    assert back.architecture == "jumprelu" and torch.equal(back.latent_groups(), groups)
    x = torch.randn(40, 16)
    assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-5)


def test_config_matryoshka_groups(tmp_path):
    from atlas.config import load_config
    from atlas.errors import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text("sae:\n  architecture: matryoshka\n  d_sae: 1024\n  matryoshka_groups: [64, 256]\n")
    assert load_config(path).sae.matryoshka_groups == [64.0, 256.0]
    assert load_config(path, ["sae.matryoshka_groups=[0.25, 1]"]).sae.matryoshka_groups == [0.25, 1.0]
    for bad in ("[256, 64]", "[64, 2048]", "[0.5, 3]", "64", "[a]"):
        with pytest.raises(ConfigError, match="sae.matryoshka_groups"):
            load_config(path, [f"sae.matryoshka_groups={bad}"])
    with pytest.raises(ConfigError, match="matryoshka only"):
        load_config(path, ["sae.architecture=topk"])


def test_config_rejects_aux_k_above_d_sae(tmp_path):
    from atlas.config import load_config
    from atlas.errors import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text("sae:\n  d_sae: 64\n  aux_k: 65\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "'sae.aux_k' = 65" in str(e.value) and "\n" not in str(e.value)
    assert load_config(path, ["sae.aux_k=64"]).sae.aux_k == 64


def _write_saelens(path, cfg, tensors):
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))


def _tensors(d_in, d_sae, seed=0, threshold=False):
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g),
         "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    if threshold:
        t["threshold"] = torch.rand(d_sae, generator=g)
    return t


def test_loads_saelens_written_folders(tmp_path):
    """Folders laid out as SAELens 6 writes them (and the pre-6.0 flat layout) load and encode
    as SAELens computes it."""
    x = torch.randn(20, 8)
    base = {"d_in": 8, "d_sae": 32, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.54.12", "model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre"}}
    t = _tensors(8, 32)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]

    _write_saelens(tmp_path / "std", {**base, "architecture": "standard"}, t)
    sae = load_sae(tmp_path / "std")
    assert sae.architecture == "relu"
    assert torch.allclose(sae.encode(x), pre.relu(), atol=1e-5)
    assert sae.metadata["hook_name"] == "blocks.8.hook_resid_pre"

    _write_saelens(tmp_path / "topk", {**base, "architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": True}, t)
    sae = load_sae(tmp_path / "topk")
    assert sae.cfg.k == 5 and sae.lr_scales == {"W_dec": 10.0, "b_enc": 10.0, "b_dec": 10.0}  # nothing recorded: defaults
    scaled = pre * t["W_dec"].norm(dim=1)
    v, i = scaled.topk(5)
    want = torch.zeros_like(pre).scatter(1, i, v.relu()) @ (t["W_dec"] / t["W_dec"].norm(dim=1, keepdim=True)) + t["b_dec"]
    assert torch.allclose(sae.reconstruct(x), want, atol=1e-4)

    tj = _tensors(8, 32, threshold=True)
    _write_saelens(tmp_path / "jr", {**base, "architecture": "jumprelu"}, tj)
    sae = load_sae(tmp_path / "jr")
    pre_j = (x - tj["b_dec"]) @ tj["W_enc"] + tj["b_enc"]
    assert torch.allclose(sae.encode(x), pre_j.relu() * (pre_j > tj["threshold"]), atol=1e-5)

    old = {"d_in": 8, "d_sae": 32, "model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre",
           "hook_point_layer": 8, "context_size": 128, "activation_fn_str": "relu", "apply_b_dec_to_input": True}
    _write_saelens(tmp_path / "old", old, t)
    sae = load_sae(tmp_path / "old")
    assert sae.architecture == "relu" and sae.metadata["hook_name"] == "blocks.8.hook_resid_pre"


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(AtlasError, match="cfg.json: missing"):
        load_sae(tmp_path)
    base = {"d_in": 8, "d_sae": 32, "architecture": "standard", "metadata": {"sae_lens_version": "6.0.0"}}
    _write_saelens(tmp_path / "shape", base, _tensors(8, 16))
    with pytest.raises(AtlasError, match="'W_enc' has shape"):
        load_sae(tmp_path / "shape")
    _write_saelens(tmp_path / "arch", {**base, "architecture": "gated"}, _tensors(8, 32))
    with pytest.raises(AtlasError, match="'gated' is not supported"):
        load_sae(tmp_path / "arch")
    _write_saelens(tmp_path / "norm", {**base, "normalize_activations": "layer_norm"}, _tensors(8, 32))
    with pytest.raises(AtlasError, match="normalize_activations"):
        load_sae(tmp_path / "norm")


def test_fused_topk_gradients_match_dense_autograd():
    torch.manual_seed(0)
    n, d, m, k, aux_k = 20, 8, 50, 4, 6
    x = torch.randn(n, d, dtype=torch.double)
    params = [torch.randn(d, m, dtype=torch.double, requires_grad=True), torch.randn(m, dtype=torch.double, requires_grad=True),
              torch.randn(d, dtype=torch.double, requires_grad=True), torch.randn(m, d, dtype=torch.double, requires_grad=True)]
    W, b, bd, Wd = params
    mask = torch.rand(m) < 0.5

    def loss(fused):
        if fused:
            main, aux_active = sparse_encode(x, W, b, bd, lambda pre: fixed_width(*pre.topk(k, dim=1)), mask, aux_k)
            out, aux = sparse_decode(main, Wd) + bd, sparse_decode(aux_active, Wd)
        else:
            pre = (x - bd) @ W + b
            v, i = pre.topk(k)
            out = torch.zeros(n, m, dtype=x.dtype).scatter(1, i, v.relu()) @ Wd + bd
            pre_aux = (x - bd.detach()) @ W + b  # AuxK does not move b_dec
            av, ai = pre_aux.masked_fill(~mask, -torch.inf).topk(aux_k)
            aux = torch.zeros(n, m, dtype=x.dtype).scatter(1, ai, av.relu()) @ Wd
        return out.pow(2).sum() + (aux * out.detach()).sum()

    grads = []
    for fused in (True, False):
        for p in params:
            p.grad = None
        loss(fused).backward()
        grads.append([p.grad.clone() for p in params])
    for a, b_ in zip(*grads):
        assert torch.allclose(a, b_, atol=1e-9)


def _reference_loss(sae, x, dead_mask):
    """TopK / BatchTopK training loss (FVU + weighted AuxK) in plain autograd over dense [n, d_sae]
    tensors, written from the papers' definitions, independently of atlas.saes.fused."""
    n, k = x.shape[0], sae.k
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.architecture in ("batchtopk", "matryoshka"):  # Bussmann et al.: ReLU, then the n*k largest of the batch
        v, i = pre.relu().flatten().topk(n * k)
        acts = torch.zeros(n * sae.d_sae, dtype=x.dtype).scatter(0, i, v).view_as(pre)
    else:
        v, i = pre.topk(k)
        acts = torch.zeros_like(pre).scatter(1, i, v.relu())
    out = acts @ sae.W_dec + sae.b_dec
    fvu = (out - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    if sae.architecture == "matryoshka":  # every inner prefix reconstructs on its own, from its latents alone
        for width in sae.cfg.matryoshka_groups[:-1]:
            inner = acts[:, :width] @ sae.W_dec[:width] + sae.b_dec
            fvu = fvu + (inner - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    residual = (x - out).detach()
    n_dead = int(dead_mask.sum())
    aux_k = min(sae.cfg.aux_k, n_dead)
    pre_aux = ((x - sae.b_dec.detach()) @ sae.W_enc + sae.b_enc).masked_fill(~dead_mask, -torch.inf)
    av, ai = pre_aux.topk(aux_k)
    aux_out = torch.zeros_like(pre).scatter(1, ai, av.relu()) @ sae.W_dec
    auxk = (aux_out - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    return fvu + sae.cfg.aux_k_coefficient * min(n_dead / sae.cfg.aux_k, 1.0) * auxk


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_training_loss_and_gradients_match_plain_autograd(arch, monkeypatch):
    """Both AuxK paths (dense products over the dead latents; fused into the sparse encoder) give
    the reference's loss and gradients, hence each other's. Rows of very different norms make
    BatchTopK's selection take its second pass (a row keeps more than its first candidates)."""
    import atlas.saes.topk as topk_module

    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 8, generator=g, dtype=torch.double) * torch.rand(24, 1, generator=g, dtype=torch.double).pow(-2)
    cfg = SAEConfig(architecture=arch, d_sae=40, k=2, aux_k=3,
                    matryoshka_groups=[5, 17] if arch == "matryoshka" else [])
    sae = build_sae(cfg, 8, seed=2).double().train()
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True  # 14 dead latents
    results = {}
    for path, factor in (("dense", 10 ** 9), ("fused", 0)):
        monkeypatch.setattr(topk_module, "DENSE_AUX_FACTOR", factor)
        sae.zero_grad()
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        results[path] = (out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()})
    sae.zero_grad()
    _reference_loss(sae, x, dead).backward()
    results["reference"] = (_reference_loss(sae, x, dead).detach(), {n: p.grad.clone() for n, p in sae.named_parameters()})
    for path in ("dense", "fused"):
        loss, grads = results[path]
        assert torch.allclose(loss, results["reference"][0], rtol=1e-10), path
        for name, grad in grads.items():
            assert torch.allclose(grad, results["reference"][1][name], rtol=1e-8, atol=1e-10), (path, name)


def test_batch_topk_keeps_exactly_the_batch_largest():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        n, d = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        k = int(torch.randint(1, d + 1, (1,), generator=g))
        pre = torch.randn(n, d, generator=g, dtype=torch.double) * torch.rand(n, 1, generator=g, dtype=torch.double).pow(-2)
        active, _, cut = batch_topk(pre, k)
        got = torch.zeros(n, d, dtype=torch.double)
        got[torch.repeat_interleave(torch.arange(n), active.offsets.diff()), active.ids] = active.values
        want = torch.zeros(n * d, dtype=torch.double)
        v, i = pre.flatten().topk(n * k)
        assert torch.equal(got.flatten(), want.scatter(0, i, v)) and cut == v[-1]


def test_encode_topk_agrees_with_encode():
    for arch in ARCHITECTURES:
        sae = _trained_like(arch)
        x = torch.randn(30, 16)
        values, indices = sae.encode_topk(x, 4)
        dense = sae.encode(x)
        assert torch.allclose(dense.gather(1, indices), values, atol=1e-6)
        assert torch.allclose(values, dense.topk(4).values, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_topk_encode_exports_to_onnx(tmp_path):
    onnx = pytest.importorskip("onnxruntime")
    sae = _trained_like("topk")

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sae = sae

        def forward(self, x):
            return self.sae.encode(x)

    x = torch.randn(5, 16)
    torch.onnx.export(Enc(), (x,), str(tmp_path / "enc.onnx"), input_names=["x"], output_names=["f"], dynamo=False)
    got = onnx.InferenceSession(str(tmp_path / "enc.onnx")).run(None, {"x": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), sae.encode(x), atol=1e-5)


def test_saved_sae_loads_in_saelens(tmp_path):
    """Runs where sae-lens is installed (the bench venv: runs/bench/saelens-venv)."""
    sae_lens = pytest.importorskip("sae_lens")
    x = torch.randn(10, 16)
    for arch in ARCHITECTURES:
        ours = _trained_like(arch)
        ours.save(tmp_path / arch)
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / arch))
        assert torch.allclose(theirs(x), ours.reconstruct(x), atol=1e-5), arch
        assert torch.allclose(theirs.encode(x), load_sae(tmp_path / arch).encode(x), atol=1e-5), arch
    # A trained Matryoshka SAE (unit-norm decoder): SAELens reads it as the JumpReLU SAE it saves its
    # own matryoshka_batchtopk as, and computes the very latents ours does.
    sae = _trained_like("matryoshka")
    sae._unit_norm_decoder()
    sae.save(tmp_path / "unit")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "unit"))
    assert type(theirs).__name__ == "JumpReLUSAE"
    assert torch.equal(theirs.encode(x) > 0, sae.encode(x) > 0)
    assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-5)
