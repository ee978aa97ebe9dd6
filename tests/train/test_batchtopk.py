"""train.saes.batchtopk: the batch rule and the threshold rule against direct re-derivations, the
estimate of theta, its save/load and resume, and a known sparse dictionary learnt."""

import json

import pytest
import torch

from harvest.held_out import HeldOut
from harvest.store import ActivationStore
from tests.train.test_loop import _resume_equals_straight, make_cfg, synthetic_store
from train.loop import train
from train.saes import build, load, save
from train.saes.base import Codes
from train.saes.kernels import decode_rows

D, M, K, B = 8, 32, 4, 24


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is faster (and on one thread a resumed run is bit-identical)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(seed: int = 0, **kw):
    """A batchtopk SAE with non-zero biases, and a batch x [B, d]."""
    torch.manual_seed(seed)
    sae = build("batchtopk", d=D, width=M, k=K, theta_decay=kw.pop("theta_decay", 0.99), **kw)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_pre.normal_()
    return sae, torch.randn(B, D, generator=torch.Generator().manual_seed(seed + 1)) * 3 + 1


def pre_activations(sae, x):
    return (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc  # [B, M]


def batch_rule(sae, x):
    """The paper's training rule: the B*k largest of the flattened [B*M] ReLU pre-activations."""
    a = pre_activations(sae, x).relu().flatten()
    top = a.topk(len(x) * sae.k)
    return torch.zeros_like(a).scatter(0, top.indices, top.values).view(len(x), -1)


def dense(codes: Codes, n_latents: int):
    """The [B, M] code the padded idx, vals [B, kmax] stand for."""
    return torch.zeros(len(codes.vals), n_latents).scatter_add(1, codes.idx, codes.vals)


@pytest.mark.parametrize("kernels", ["auto", "sparse", "dense", "reference"])
def test_training_rule_equals_the_direct_derivation(kernels):
    sae, x = make()
    sae.kernels = kernels
    z = batch_rule(sae, x)
    assert (z > 0).sum() == B * K  # no ties at 0 among the kept values: the rule picks a unique set
    out = sae(x)
    torch.testing.assert_close(dense(out.codes, M), z)
    torch.testing.assert_close(out.recon, z @ sae.W_dec + sae.b_pre)
    torch.testing.assert_close(out.losses["mse"], (x - out.recon).pow(2).sum(-1).mean())
    active = out.codes.active().sum(1)
    assert active.float().mean() == K and active.max() == out.codes.vals.shape[1] and len(set(active.tolist())) > 1
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recon)  # encode/decode compose to forward
    # the padded codes work with the generic TopK-style paths as they are
    torch.testing.assert_close(decode_rows(out.codes.idx, out.codes.vals, sae.W_dec) + sae.b_pre, out.recon)
    r, j, v = out.codes.nonzero()
    assert torch.equal(torch.stack([r, j]), z.nonzero().T) and torch.equal(v, z[r, j])
    assert torch.equal(out.codes.fired(M), (z > 0).any(0))


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_fast_backwards_equal_plain_autograd(kernels):
    grads = {}
    for mode in (kernels, "reference"):
        sae, x = make()
        sae.kernels = mode
        sae(x).losses["loss"].backward()
        grads[mode] = {name: p.grad for name, p in sae.named_parameters()}
    assert sae.sparse_codes and grads["reference"]["W_enc"].abs().sum() > 0
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads[kernels][name], g, msg=name)


def test_inference_rule_is_one_threshold_and_differs_from_training():
    sae, x = make()
    a = pre_activations(sae, x)
    theta = a[a > 0].median()
    with torch.no_grad():
        sae.theta.fill_(theta)
        sae.theta_steps.fill_(7)
    with torch.no_grad():
        train_out = sae(x)
    sae.eval()
    out = sae(x)
    z = torch.where(a > theta, a, 0.0)
    torch.testing.assert_close(dense(out.codes, M), z)
    torch.testing.assert_close(out.recon, z @ sae.W_dec + sae.b_pre)
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recon)
    assert (out.codes.active().sum() != B * K) and not torch.allclose(out.recon, train_out.recon)
    # each token's code depends on that token alone
    torch.testing.assert_close(sae(x[:3]).recon, out.recon[:3])
    assert sae.theta == theta and sae.theta_steps == 7  # eval mode estimates nothing
    with torch.no_grad():  # no threshold above everything: no codes, recon b_pre
        sae.theta.fill_(a.max() + 1)
    empty = sae(x)
    assert empty.codes.vals.shape == (B, 0) and torch.equal(empty.recon, sae.b_pre.expand(B, D))


def test_theta_moves_to_the_smallest_kept_value(one_thread):
    sae, x = make(theta_decay=0.9)
    x2 = x.flip(0) * 0.5
    smallest = [batch_rule(sae, xb).flatten().sort().values[-B * K] for xb in (x, x2)]
    assert sae.theta == 0 and sae.theta_steps == 0
    sae(x)
    assert sae.theta == smallest[0] and sae.theta_steps == 1  # theta_1 = m_1
    with torch.no_grad():
        sae(x2)  # not a training step
    sae.encode(x2)  # nor is encode alone
    assert sae.theta == smallest[0] and sae.theta_steps == 1
    sae(x2)
    w = 0.1 / (1 - 0.9**2)  # the bias-corrected moving average's weight of step 2
    torch.testing.assert_close(sae.theta, smallest[0] + w * (smallest[1] - smallest[0]))
    for _ in range(100):  # the same batch again and again: theta converges to its smallest kept value
        sae(x2)
    torch.testing.assert_close(sae.theta, smallest[1])
    plain, _ = make(theta_decay=1.0)  # the paper's plain mean over steps
    plain(x)
    plain(x2)
    torch.testing.assert_close(plain.theta, (smallest[0] + smallest[1]) / 2)


def test_save_load_round_trip_keeps_theta(tmp_path):
    sae, x = make()
    sae(x)
    sae(x * 2)
    save(sae, tmp_path / "sae")
    again = load(tmp_path / "sae")
    assert again.theta == sae.theta > 0 and again.theta_steps == 2 and again.config() == sae.config()
    sae.eval()
    again.eval()
    x = torch.randn(50, D) * 3
    a, b = sae(x), again(x)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.codes.idx, b.codes.idx)


def test_cost_and_config_checks():
    from train.saes.flops import cost

    assert cost("batchtopk", D, width=M, k=K) == cost("topk", D, width=M, k=K)
    assert cost("batchtopk", D, width=M, k=K, sparse_backward=True).train == 2 * D * M + 10 * K * D
    cls = type(make()[0])
    with pytest.raises(ValueError, match="model.k=33 is larger than model.width=32"):
        cls.check_model({"width": 32, "k": 33, "theta_decay": 0.99, "aux_k": 0, "aux_coeff": 0.0, "skip": False})
    with pytest.raises(ValueError, match=r"model.theta_decay must be a number in \[0, 1\], got 1.5"):
        cls.check_model({"width": 32, "k": 4, "theta_decay": 1.5, "aux_k": 0, "aux_coeff": 0.0, "skip": False})
    with pytest.raises(ValueError, match="k=0 must be between 1 and the width"):
        build("batchtopk", d=D, width=M, k=0, theta_decay=0.99)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("syn") / "s")


def test_learns_a_known_sparse_dictionary_with_either_rule(store, tmp_path, one_thread):
    sae_dir = train(make_cfg(store, "model=batchtopk", "model.width=64", "model.k=4", "budget=steps:300"),
                    tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["l0"] == 4 for r in lines)  # k per token on average, every step
    acts = ActivationStore(store)
    x = torch.cat(list(HeldOut.of(acts, 0.1, None).rows()))
    sae = load(sae_dir)
    assert sae.theta_steps == 300 and 1 < sae.theta < 10
    for training in (True, False):
        sae.train(training)
        with torch.no_grad():
            out = sae(x)
        fve = 1 - ((x - out.recon).var(0).sum() / x.var(0).sum()).item()
        assert fve > 0.9, (training, fve)
        l0 = out.codes.active().sum(1).float().mean().item()
        assert l0 == 4 if training else 3 < l0 < 5  # theta calibrated to about k per token


def test_resumed_run_ends_with_the_same_weights_and_theta(store, tmp_path, monkeypatch, one_thread):
    # bit-identical on one thread; assert_same_weights compares the state dicts, theta and theta_steps included
    _resume_equals_straight(store, tmp_path, monkeypatch, ["model=batchtopk", "model.width=64", "model.k=4"])
    assert load(tmp_path / "killed" / "sae").theta_steps == 60


def test_the_two_stage_selection_equals_one_top_k_over_the_whole_batch():
    """batch_topk (per-row candidates first) selects exactly what a top-k over all B*M values does,
    also when one row holds more than its candidates above the cut (the fallback)."""
    from train.saes.batchtopk import batch_topk

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 512, generator=g)
    skewed = pre.clone()
    skewed[3] += 10  # row 3 alone holds far more than 4k of the batch's largest values
    for x in (pre, skewed):
        vals, flat = batch_topk(x, 64 * 8, per_row=32)
        ref_vals, ref_flat = x.view(-1).topk(64 * 8, sorted=False)
        assert sorted(flat.tolist()) == sorted(ref_flat.tolist())
        torch.testing.assert_close(vals.sort().values, ref_vals.sort().values)
        assert torch.equal(x.view(-1)[flat], vals)
