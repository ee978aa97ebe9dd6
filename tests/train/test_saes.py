"""train.saes: the TopK and Switch math against direct per-token re-derivations; save/load."""

import pytest
import torch

from train.saes import REGISTRY, build, load, save
from train.saes.base import Codes


def _x(b=64, d=8, seed=0):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def test_topk_equals_a_per_token_derivation():
    torch.manual_seed(0)
    sae = build("topk", d=8, width=32, k=4)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_pre.normal_()
    x = _x()
    out = sae(x)
    for b in range(len(x)):
        pre = sae.W_enc @ (x[b] - sae.b_pre) + sae.b_enc
        top = pre.topk(4).indices
        z = torch.zeros(32)
        z[top] = pre[top].relu()
        torch.testing.assert_close(out.recon[b], sae.W_dec.T @ z + sae.b_pre, rtol=1e-5, atol=1e-5)
        assert set(out.codes.idx[b].tolist()) == set(top.tolist())
    torch.testing.assert_close(out.losses["mse"], (x - out.recon).pow(2).sum(-1).mean())


def test_switch_equals_eq_3_4_per_token():
    torch.manual_seed(0)
    sae = build("switch", d=8, n_experts=4, expert_width=16, k=3, alpha=3.0)
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_router.normal_()
        sae.W_router.normal_()
    x = _x()
    out = sae(x)
    p_all = []
    for b in range(len(x)):
        p = torch.softmax(sae.W_router @ (x[b] - sae.b_router), dim=0)
        i = int(p.argmax())
        pre = sae.W_enc[i] @ (x[b] - sae.b_pre)  # no encoder bias
        top = pre.topk(3).indices
        z = torch.zeros(16)
        z[top] = pre[top].relu()
        expected = p[i] * (sae.W_dec[i].T @ z) + sae.b_pre
        torch.testing.assert_close(out.recon[b], expected, rtol=1e-5, atol=1e-5)
        assert out.codes.expert[b] == i and set(out.codes.idx[b].tolist()) == set((top + 16 * i).tolist())
        p_all.append(p)
    P = torch.stack(p_all).mean(0)
    f = torch.bincount(out.codes.expert, minlength=4).float() / len(x)
    torch.testing.assert_close(out.losses["aux"], 4 * (f * P).sum())
    torch.testing.assert_close(out.losses["loss"], out.losses["mse"] + 3.0 * 8 * out.losses["aux"])
    torch.testing.assert_close(out.stats["expert_load"], f)
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recon)  # encode/decode compose to forward


def test_switch_aux_loss_is_1_when_uniform_and_n_when_collapsed():
    n, d = 4, 4
    sae = build("switch", d=d, n_experts=n, expert_width=8, k=2, alpha=3.0)
    x = torch.eye(d).repeat(16, 1)  # 64 tokens, 16 along each axis
    with torch.no_grad():
        sae.b_router.zero_()
        sae.W_router.copy_(torch.eye(n) * 50)  # token along axis i -> expert i with p ~ 1
    assert sae(x).losses["aux"].item() == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        sae.W_router.zero_()
        sae.W_router[0] = 50.0  # every token -> expert 0 with p ~ 1
    assert sae(x).losses["aux"].item() == pytest.approx(n, abs=1e-3)


def test_switch_router_gets_gradient_through_the_gate():
    sae = build("switch", d=8, n_experts=4, expert_width=16, k=3, alpha=3.0)
    sae(_x()).losses["mse"].backward()
    assert sae.W_router.grad.abs().sum() > 0 and sae.W_enc.grad.abs().sum() > 0


def test_init_from_batch_sets_medians_and_k_is_checked():
    sae = build("switch", d=8, n_experts=2, expert_width=8, k=2, alpha=3.0)
    sae.init_from_batch(_x())
    torch.testing.assert_close(sae.b_pre.data, sae.b_router.data)
    assert sae.b_pre.abs().sum() > 0
    with pytest.raises(ValueError, match="model.k=9 is larger than an expert's width 8"):
        build("switch", d=8, n_experts=2, expert_width=8, k=9, alpha=3.0)
    with pytest.raises(ValueError, match="unknown SAE architecture 'moe'"):
        build("moe", d=8)


def test_relu_l1_penalty_and_its_warmup():
    torch.manual_seed(0)
    sae = build("relu", d=8, width=32, l1_coeff=2.0, warmup_frac=0.1)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.W_dec.mul_(torch.rand(32, 1) * 5)  # decoder norms are free in this recipe
    x = _x()
    sae.schedule(5, 100)  # half-way through the 10-step warmup
    out = sae(x)
    f = torch.relu(x @ sae.W_enc.T + sae.b_enc)
    torch.testing.assert_close(out.recon, f @ sae.W_dec + sae.b_pre)
    l1 = (f * sae.W_dec.norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(out.losses["loss"], out.losses["mse"] + 1.0 * l1)
    sae.schedule(50, 100)
    torch.testing.assert_close(sae(x).losses["loss"], out.losses["mse"] + 2.0 * l1)
    assert sae.unit_norm_decoders() == []


def test_gated_equals_its_definition_and_aux_trains_only_the_gate():
    torch.manual_seed(0)
    sae = build("gated", d=8, width=32, l1_coeff=0.5)
    with torch.no_grad():
        for p in (sae.b_gate, sae.r_mag, sae.b_mag, sae.b_pre):
            p.normal_()
    x = _x()
    out = sae(x)
    pi = (x - sae.b_pre) @ sae.W_gate.T + sae.b_gate
    mag = torch.relu((x - sae.b_pre) @ (sae.W_gate * sae.r_mag.exp()[:, None]).T + sae.b_mag)
    f = (pi > 0).float() * mag
    torch.testing.assert_close(out.recon, f @ sae.W_dec + sae.b_pre)
    torch.testing.assert_close(out.losses["l1"], torch.relu(pi).sum(1).mean())
    assert 0 < out.codes.active().float().mean() < 1
    out.losses["aux"].backward()
    assert sae.W_dec.grad is None and sae.W_gate.grad.abs().sum() > 0 and sae.r_mag.grad is None


@pytest.mark.parametrize("arch,kw", [("topk", {"width": 32, "k": 4}), ("switch", {"n_experts": 4, "expert_width": 8, "k": 2, "alpha": 3.0}),
                                     ("relu", {"width": 32, "l1_coeff": 3.0, "warmup_frac": 0.05}),
                                     ("gated", {"width": 32, "l1_coeff": 1.0}),
                                     ("batchtopk", {"width": 32, "k": 4, "theta_decay": 0.99}),
                                     ("matryoshka", {"width": 32, "k": 4, "prefixes": [0.25, 0.5]}),
                                     ("matryoshka_switch", {"n_experts": 2, "expert_width": 16, "k": 4,
                                                            "nesting": "dictionary"}),
                                     ("jumprelu", {"width": 32, "l0_coeff": 0.003, "warmup_frac": 0.05,
                                                   "bandwidth": 0.01, "threshold_init": 0.03})])
def test_save_load_round_trip(tmp_path, arch, kw):
    sae = build(arch, d=8, **kw)
    sae.init_from_batch(_x())
    save(sae, tmp_path / "sae")
    again = load(tmp_path / "sae")
    assert not again.training  # loaded for inference (BatchTopK: the threshold rule)
    x = _x(seed=1)
    torch.testing.assert_close(again(x).recon, sae.eval()(x).recon)
    assert type(again) is type(sae) and again.config() == sae.config()


def test_codes_nonzero_and_fired_of_sparse_and_dense_codes():
    sparse = Codes(idx=torch.tensor([[3, 1], [0, 2]]), vals=torch.tensor([[0.5, 0.0], [2.0, 1.0]]))
    dense = Codes(dense=torch.tensor([[0.0, 0.0, 0.0, 0.5], [2.0, 0.0, 1.0, 0.0]]))
    for codes in (sparse, dense):
        r, j, v = codes.nonzero()
        assert sorted(zip(r.tolist(), j.tolist(), v.tolist(), strict=True)) == [(0, 3, 0.5), (1, 0, 2.0), (1, 2, 1.0)]
        assert codes.fired(4).tolist() == [True, False, True, True]  # sparse: latent 1 is listed, at 0.0
        assert codes.fired(4, n_rows=1).tolist() == [False, False, False, True]
        assert codes.fired(4, n_rows=0).tolist() == [False] * 4


def test_codes_nonzero_and_fired_of_a_switch_sae():
    torch.manual_seed(0)
    sae = build("switch", d=8, n_experts=4, expert_width=16, k=3, alpha=3.0)
    x = _x()
    with torch.no_grad():
        codes = sae.encode(x)
    full = torch.zeros(len(x), 64).scatter_(1, codes.idx, codes.vals)  # every token's code, [B, M]
    r, j, v = codes.nonzero()
    assert len(r) == int((full > 0).sum()) > len(x)
    torch.testing.assert_close(v, full[r, j])
    assert torch.equal(j // 16, codes.expert[r])  # every non-zero code lies in the token's expert
    assert torch.equal(codes.fired(64), (full > 0).any(0)) and not codes.fired(64).all()
    assert torch.equal(codes.fired(64, n_rows=5), (full[:5] > 0).any(0))
    assert torch.equal(r, r.sort().values)  # ordered by row


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_an_sae_built_from_python_with_only_its_sizes_is_the_yaml_one(arch):
    """Defaults live in conf/train/model/<arch>.yaml only: a constructor requires nothing but sizes, and
    what it builds from them is what `model=<arch>` trains (TopKSAE(d, width, k) once trained with
    aux_coeff 0 where the YAML says 1/32)."""
    import inspect

    from train.saes.base import model_yaml

    cls = REGISTRY[arch]
    model = {key: value for key, value in model_yaml(arch).items() if key != "arch"}
    model.update({key: small for key, small in (("width", 64), ("k", 4), ("n_experts", 4)) if key in model})
    kwargs = cls.constructor_kwargs(model, 16)
    required = [name for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and p.default is inspect.Parameter.empty]
    assert set(required) <= {"d", *cls.size_args}, required
    from_python = cls(**{name: kwargs[name] for name in required})
    assert from_python.config() == build(arch, **kwargs).config()
    assert all(model_yaml(arch)[name] == value for name, value in cls.size_defaults.items())
