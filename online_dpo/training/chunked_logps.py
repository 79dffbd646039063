"""Token log-probs through the LM head in vocabulary chunks, recomputed in the backward pass.

log p(y | h) = h·w_y + b_y - logsumexp_v(h·w_v + b_v). Computed whole, that needs a (K x V)
float32 logits tensor, a temporary of the same size inside logsumexp and, under autograd, its
gradient: at 4 pairs x 2,048 completion tokens and Qwen2.5's V = 152k, over 25 GB. Here the
logsumexp runs online over chunks of `chunk` vocabulary entries, so a forward holds one
(K x chunk) block at a time and keeps only the (K,) log-normaliser for the backward pass, which
recomputes each block's logits to form its softmax. The cost is one more head matmul per trained
micro-batch; frozen scoring (no autograd) pays nothing extra.

The function is called from inside the model's own forward (online_dpo/training/packing.py
swaps the head's forward for the duration of one call), so DDP's and FSDP2's hooks see an
ordinary forward and the head's gradient is all-reduced like every other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Vocabulary entries per block: at K = 16k scored tokens a float32 block is 512 MB, against
# 10 GB for V = 152k whole. On SmolLM2 (V = 49k) it is 6 blocks.
VOCAB_CHUNK = 8192


def _accumulation_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for gradcheck


def _block_logits(hidden, weight, bias, start: int, end: int) -> torch.Tensor:
    logits = F.linear(hidden, weight[start:end], None if bias is None else bias[start:end])
    return logits.to(_accumulation_dtype(hidden))


class ChunkedTokenLogps(torch.autograd.Function):
    """(hidden (K, H), weight (V, H), bias (V,) or None, labels (K,)) -> log-probs (K,), float32."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # the backward recomputes under the forward's autocast
    def forward(ctx, hidden, weight, bias, labels, chunk: int):
        vocab = weight.shape[0]
        acc = _accumulation_dtype(hidden)
        log_norm = torch.full(labels.shape, float("-inf"), dtype=acc, device=hidden.device)
        target = torch.zeros(labels.shape, dtype=acc, device=hidden.device)
        for start in range(0, vocab, chunk):
            end = min(start + chunk, vocab)
            logits = _block_logits(hidden, weight, bias, start, end)
            log_norm = torch.logaddexp(log_norm, torch.logsumexp(logits, dim=-1))
            inside = (labels >= start) & (labels < end)
            picked = logits.gather(1, (labels - start).clamp(0, end - start - 1).unsqueeze(1)).squeeze(1)
            target = torch.where(inside, picked, target)
            del logits
        ctx.save_for_backward(hidden, weight, bias, labels, log_norm)
        ctx.chunk = chunk
        return target - log_norm

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, log_norm = ctx.saved_tensors
        vocab, chunk = weight.shape[0], ctx.chunk
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros(hidden.shape, dtype=log_norm.dtype, device=hidden.device) if want_hidden else None
        grad_weight = torch.empty_like(weight) if want_weight else None
        grad_bias = torch.empty_like(bias) if want_bias else None
        rows = torch.arange(labels.shape[0], device=labels.device)
        for start in range(0, vocab, chunk):
            end = min(start + chunk, vocab)
            # d logp_k / d logit_kv = [v = y_k] - softmax_kv
            grad_logits = torch.exp(_block_logits(hidden, weight, bias, start, end) - log_norm.unsqueeze(1))
            grad_logits.mul_(-grad_out.unsqueeze(1))
            inside = (labels >= start) & (labels < end)
            grad_logits[rows[inside], labels[inside] - start] += grad_out[inside]
            if want_bias:
                grad_bias[start:end] = grad_logits.sum(0).to(bias.dtype)
            # The matmuls run in the dtype the forward's head ran in (bf16 under CUDA autocast).
            grad_logits = grad_logits.to(hidden.dtype)
            if want_hidden:
                grad_hidden += grad_logits @ weight[start:end].to(hidden.dtype)
            if want_weight:
                grad_weight[start:end] = (grad_logits.T @ hidden).to(weight.dtype)
            del grad_logits
        if want_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def chunked_token_logps(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor,
                        chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """log p(labels[k] | hidden[k]) under the linear LM head, never holding a (K x V) block."""
    return ChunkedTokenLogps.apply(hidden, head.weight, head.bias, labels, chunk)
