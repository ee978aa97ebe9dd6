"""harvest.lm: the site reader returns the right activations and never runs the blocks above."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from harvest import lm


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layer", [0, 2])
def test_resid_post_equals_hidden_states(model_dir, layer):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    got = lm.SiteReader(model, layer, "resid_post")(ids)
    torch.testing.assert_close(got, hidden[layer + 1], rtol=1e-5, atol=1e-5)


def test_attn_and_mlp_outputs_sum_to_the_block_update(model_dir):
    """resid_post(l) - resid_post(l-1) = attn_out(l) + mlp_out(l) in both layouts."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    attn = lm.SiteReader(model, 2, "attn_out")(ids)
    mlp = lm.SiteReader(model, 2, "mlp_out")(ids)
    torch.testing.assert_close(attn + mlp, hidden[3] - hidden[2], rtol=1e-4, atol=1e-5)
    assert attn.abs().sum() > 0 and mlp.abs().sum() > 0


def test_nothing_above_the_hooked_site_runs(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    calls: list[str] = []
    blocks = lm.blocks(model)
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *a, i=i: calls.append(f"block{i}"))
        lm.site_module(model, i, "mlp_out").register_forward_hook(lambda *a, i=i: calls.append(f"mlp{i}"))
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("unembed"))
    lm.SiteReader(model, 1, "resid_post")(_ids(model.config.vocab_size))
    assert calls == ["mlp0", "block0", "mlp1", "block1"]
    calls.clear()
    lm.SiteReader(model, 2, "attn_out")(_ids(model.config.vocab_size))
    assert calls == ["mlp0", "block0", "mlp1", "block1"]  # stopped inside block 2, before its MLP


def test_load_lm_drops_the_blocks_above(tiny_llama):
    model, tokenizer = lm.load_lm(str(tiny_llama), torch.device("cpu"), keep_layers=2)
    assert len(lm.blocks(model)) == 2
    assert tokenizer.eos_token == "<|endoftext|>"



def test_one_pass_reads_several_sites_as_single_readers_do(model_dir):
    """SitesReader returns each (layer, site) as its own SiteReader does, in the order given, and
    stops once the last of them has run (the blocks above the deepest never run)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = _ids(model.config.vocab_size)
    sites = [(2, "mlp_out"), (0, "resid_post"), (2, "attn_out"), (1, "resid_post")]
    ran = []
    handle = lm.blocks(model)[3].register_forward_hook(lambda *a: ran.append(3))
    got = lm.SitesReader(model, sites)(ids)
    assert not ran  # block 3 is above the deepest site (block 2's MLP)
    handle.remove()
    for (layer, site), acts in zip(sites, got, strict=True):
        torch.testing.assert_close(acts, lm.SiteReader(model, layer, site)(ids), rtol=0, atol=0)
