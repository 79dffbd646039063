"""vLLM plugin (entry point `vllm.general_plugins`, pyproject.toml): vLLM calls `register` in each
of its processes, so a `vllm serve` started in an environment with online-dpo installed offers the
`safetensors_file` weight-transfer backend (online_dpo/sampling/vllm_file_transfer.py) and logs
no harmless rotary warning at each sync. It must not import vLLM's heavy modules at import time."""

from __future__ import annotations

FILE_BACKEND = "safetensors_file"


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from online_dpo.sampling.vllm_engine import quiet_rotary_reload_warning

    if FILE_BACKEND not in WeightTransferEngineFactory._registry:  # vLLM may call it more than once
        WeightTransferEngineFactory.register_engine(
            FILE_BACKEND, "online_dpo.sampling.vllm_file_transfer", "SafetensorsFileEngine")
    quiet_rotary_reload_warning()
