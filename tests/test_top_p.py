"""Top-p without a full sort keeps exactly the tokens vLLM's sorting implementation keeps."""

import pytest
import torch

from online_dpo.sampling import top_p

sampler = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")


def vllm_top_p(logits, p):
    return sampler.apply_top_k_top_p_pytorch(logits.clone(), None, p)


def near_boundary(logits, p, tolerance=1e-5):
    """Tokens whose mass-above is within `tolerance` of p: float rounding may decide those."""
    probs = logits.softmax(-1)
    values, index = probs.sort(dim=-1, descending=True)
    mass_above = values.cumsum(-1) - values
    close = (mass_above - p.unsqueeze(-1)).abs() < tolerance
    return torch.zeros_like(close).scatter_(-1, index, close)


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])  # flat (nucleus > 1024 tokens: full sort) to peaked
def test_same_nucleus_as_vllm(scale):
    gen = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(16, 49152, generator=gen) * scale
    logits[3, :100] = float("-inf")  # tokens another processor already removed
    p = torch.tensor([0.95, 0.9, 0.5, 0.99, 1.0, 0.1, 0.7, 0.95] * 2)
    ours = top_p.top_p_mask(logits.clone(), p, lambda rows, p_rows: vllm_top_p(rows, p_rows))
    theirs = vllm_top_p(logits, p)
    differ = torch.isfinite(ours) != torch.isfinite(theirs)
    assert not (differ & ~near_boundary(logits, p)).any()
    assert differ.sum() <= 2  # rounding at the boundary only
    kept = torch.isfinite(ours)
    assert torch.equal(ours[kept], logits[kept])  # kept logits untouched
    assert torch.equal(ours[4], logits[4])  # p = 1 leaves the row alone
    assert kept.gather(1, logits.argmax(-1, keepdim=True)).all()  # the top token always stays


def test_rows_with_wide_nuclei_fall_back_to_the_full_sort():
    logits = torch.zeros(2, 5000)
    logits[1, 0] = 20.0  # one row peaked, one flat (nucleus of 4750 tokens)
    calls = []

    def full_sort(rows, p_rows):
        calls.append(len(rows))
        return vllm_top_p(rows, p_rows)

    out = top_p.top_p_mask(logits.clone(), torch.tensor([0.95, 0.95]), full_sort)
    assert calls == [1]  # only the flat row was sorted
    assert torch.isfinite(out[0]).sum() == 4750 and torch.isfinite(out[1]).sum() == 1


def test_install_routes_top_p_alone_and_leaves_top_k_to_vllm(monkeypatch):
    searches = []
    real_mask = top_p.top_p_mask
    monkeypatch.setattr(top_p, "top_p_mask", lambda *args: searches.append(1) or real_mask(*args))
    before = sampler.apply_top_k_top_p
    original = getattr(before, "vllm_original", before)  # vLLM's own, even if an earlier engine installed ours
    try:
        assert top_p.install() and top_p.install()  # twice: still one layer over vLLM's function
        patched = sampler.apply_top_k_top_p
        assert patched.vllm_original is original
        logits = torch.randn(4, 3000)
        k = torch.tensor([5, 5, 5, 5])
        assert torch.equal(patched(logits.clone(), k, None), original(logits.clone(), k, None))
        assert patched(logits.clone(), k, torch.tensor([0.9] * 4)).isfinite().sum() <= 4 * 5
        assert searches == []  # any top-k: vLLM's own function
        p = torch.tensor([0.9, 0.8, 1.0, 0.5])
        assert torch.equal(torch.isfinite(patched(logits.clone(), None, p)),
                           torch.isfinite(original(logits.clone(), None, p)))
        assert searches == [1]  # top-p alone: the search
    finally:
        top_p.uninstall()
    assert sampler.apply_top_k_top_p is original
    sampler.apply_top_k_top_p = before  # as this test found it
