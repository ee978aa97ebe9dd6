"""eval.ce: CE loss recovered with real (tiny) LMs: exact SAEs give exact answers."""

import pytest
import torch

from eval.ce import ce_metrics
from harvest.lm import load_lm
from tests.train.test_metrics import identity_topk
from train.saes import build


def zero_topk(d: int):
    sae = build("topk", d=d, width=16, k=4)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_pre.zero_()
    return sae


@pytest.mark.parametrize("first_pos", [0, 1])
@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_identity_recovers_everything_and_zero_recovers_nothing(request, which, first_pos):
    model, _ = load_lm(str(request.getfixturevalue(which)), torch.device("cpu"))
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (5, 16))
    out = ce_metrics(model, 2, "resid_post", {"id": identity_topk(32), "zero": zero_topk(32)}, ids, first_pos,
                     batch_size=2)
    ident, zero = out["id"], out["zero"]
    assert ident["ce_sae"] == pytest.approx(ident["ce_clean"], abs=1e-6)
    assert ident["loss_recovered"] == pytest.approx(1.0, abs=1e-5) and ident["kl"] == pytest.approx(0, abs=1e-6)
    assert zero["ce_sae"] == zero["ce_zero"] and zero["loss_recovered"] == 0.0 and zero["kl"] > 0
    assert ident["ce_tokens"] == 5 * (16 - first_pos - 1)
    # the clean CE is the model's own loss over the scored positions
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, first_pos:-1]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, first_pos + 1 :].reshape(-1))
    assert ident["ce_clean"] == pytest.approx(want.item(), rel=1e-5)
    assert zero["ce_zero"] != zero["ce_clean"]  # (a random model need not get worse without the site)


def test_rows_above_the_cut_stay_clean(tiny_gpt2):
    """With a cut below every row's norm nothing is replaced: all three passes are the clean one."""
    model, _ = load_lm(str(tiny_gpt2), torch.device("cpu"))
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    out = ce_metrics(model, 1, "resid_post", {"zero": zero_topk(32)}, ids, 1, cut=1e-6)["zero"]
    assert out["ce_zero"] == out["ce_clean"] == out["ce_sae"] and out["loss_recovered"] is None
    assert out["ce_rows_kept_clean"] == 2 * 15


class _Exact:
    """Stands in for an SAE where only the patch is under test: `reconstruct` is a given function of the
    input (a real module of the LM)."""

    def __init__(self, fn):
        self.fn = fn

    def reconstruct(self, x):
        return None, self.fn(x)


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_a_transcoder_patch_replaces_the_mlp_output_by_its_output_for_the_mlp_input(request, which):
    """Source mlp_in, site mlp_out: a "transcoder" that is the block's own MLP recovers everything, one
    that outputs zeros is the zero-ablated MLP; an autoencoder on mlp_in is patched before the MLP runs."""
    from harvest.lm import site_module

    import copy

    model, _ = load_lm(str(request.getfixturevalue(which)), torch.device("cpu"))
    mlp = copy.deepcopy(site_module(model, 1, "mlp_out"))  # a copy: the LM's own module carries the hooks
    ids = torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ce_metrics(model, 1, "mlp_out", {"mlp": _Exact(mlp), "zero": _Exact(torch.zeros_like)}, ids, 1,
                         source="mlp_in")
    assert out["mlp"]["ce_sae"] == pytest.approx(out["mlp"]["ce_clean"], abs=1e-5)
    assert out["mlp"]["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and out["mlp"]["kl"] < 1e-6
    assert out["zero"]["ce_sae"] == pytest.approx(out["zero"]["ce_zero"], abs=1e-6) and out["zero"]["kl"] > 0
    # an autoencoder on mlp_in: the identity changes nothing, zeros feed the MLP zeros (not the MLP's output)
    with torch.no_grad():
        auto = ce_metrics(model, 1, "mlp_in", {"id": _Exact(lambda x: x), "zero": _Exact(torch.zeros_like)}, ids, 1)
    assert auto["id"]["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert auto["zero"]["ce_sae"] == auto["zero"]["ce_zero"]
