"""LoRA mode (peft): the policy is base + adapter; the reference is the same base, adapter off.

The sampler and every checkpoint get *merged* weights (W + scale * B @ A computed on the side;
the base weights are never merged in place, so the reference stays bit-exact pi_0), which keeps
vLLM, `online-dpo eval` and a user's deployment unaware of the adapter. The adapter alone is
saved beside each checkpoint for resume.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from online_dpo.config.recipe import AdapterConfig
from online_dpo.training.distributed import whole_tensor

ADAPTER_DIR = "adapter"


def add_adapter(model, cfg: AdapterConfig):
    peft_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    return keep_inputs_in_base_dtype(get_peft_model(model, peft_config))


class _InputKeepingLinearFn(torch.autograd.Function):
    """x @ W.T computed in W's dtype, with x saved for W's gradient in its own dtype."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.input_dtype = x.dtype
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return torch.nn.functional.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_x, grad_w


class InputKeepingLinear(torch.nn.Linear):
    """An adapter's A matrix (float32, no bias) fed a lower-precision base's activations (bf16):
    the product in float32, but the input kept for the backward as it came, one tensor shared by
    every module it feeds (q, k and v read the same input). PEFT casts the input per module, and
    autograd kept each cast (q's, k's and v's): at SmolLM2's shape and 512 tokens, 292 MiB of
    float32 casts where the bf16 inputs are 79 MiB, which undid most of what a bf16 base saves in
    the train step. Under autocast (CUDA's bf16) the matmul is autocast's, fed the input itself
    rather than PEFT's float32 cast of it, so autocast keeps no bf16 copy per module either."""

    def forward(self, x):
        if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return _InputKeepingLinearFn.apply(x, self.weight)


def keep_inputs_in_base_dtype(peft_model):
    """Where the base's dtype is not the adapter's, each LoRA layer's A takes the base's activations
    as they are (`InputKeepingLinear`): the same values and gradients. Not with lora dropout, which
    makes a new tensor per module anyway (and would then run in bf16)."""
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base_dtype = module.get_base_layer().weight.dtype
        for name, a in module.lora_A.items():
            plain = isinstance(module.lora_dropout[name], torch.nn.Identity) and a.bias is None
            if type(a) is torch.nn.Linear and a.weight.dtype != base_dtype and plain:
                a.__class__ = InputKeepingLinear
                module.cast_input_dtype_enabled = False
    return peft_model


class AdapterDisabled(torch.nn.Module):
    """The base model of a peft policy as a frozen module: forward runs with the adapter off."""

    def __init__(self, peft_model):
        super().__init__()
        self._peft = [peft_model]  # a list, so the policy is not registered as a submodule

    @property
    def wrapped(self):
        return self._peft[0]

    def get_output_embeddings(self):
        return self._peft[0].get_output_embeddings()

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self._peft[0].disable_adapter():
            return self._peft[0](*args, **kwargs)


def merged_weights(peft_model, skip: frozenset[str] | set[str] = frozenset()):
    """The base model's tensors under the base names (but those in `skip`), each adapted weight with
    its delta added as it is yielded: one merged layer exists at a time, never a merged copy.
    Under FSDP2 each tensor is gathered whole (`whole_tensor`, which every process joins in the
    same order); the delta of sharded A and B is computed by DTensor and gathered the same way."""
    base = peft_model.get_base_model()
    adapted = {f"{name}.weight": module for name, module in base.named_modules()
               if isinstance(module, LoraLayer) and module.active_adapters}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer", "")
        if key in skip:
            continue
        value = whole_tensor(value)
        layer = adapted.get(key)
        if layer is not None:
            with torch.no_grad():  # float32 delta: a bf16 base's merged layer is float32
                value = value + whole_tensor(layer.get_delta_weight(layer.active_adapters[0]))
        yield key, value


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole (see `merged_weights`), under the policy's state-dict names."""
    return {key: whole_tensor(value) for key, value in peft_model.state_dict().items() if ".lora_" in key}


def save_adapter(peft_model, folder: Path, state: dict[str, torch.Tensor]) -> None:
    """`state` from `adapter_state`: gathered by every process, written by one."""
    peft_model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True, state_dict=state)


def load_adapter(peft_model, checkpoint: Path) -> None:
    path = checkpoint / ADAPTER_DIR / "adapter_model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint}: no {ADAPTER_DIR}/ to resume a LoRA run from")
    result = set_peft_model_state_dict(peft_model, load_file(path))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{path}: adapter does not fit the policy (unexpected keys {unexpected[:3]})")
