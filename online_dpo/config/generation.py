"""The recipe's `generation` section: the sampling engine, and the separate `vllm serve` that
generation.backend: vllm_server drives (online_dpo/sampling/vllm_server.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from online_dpo.config.base import Bool, Float, Int, Section, Str


class ServerLaunchConfig(Section):
    port: Int = Field(0, ge=0, lt=65536)
    """Port of the `vllm serve` that online-dpo starts; 0: a free one."""
    host: Str = "127.0.0.1"
    devices: Str | Int | None = None
    """CUDA_VISIBLE_DEVICES for the server (e.g. 7, or "6,7"): the sampler's own GPUs; None: inherited."""
    args: list[Str] = Field(default_factory=list)
    """Extra `vllm serve` arguments, e.g. ["--tensor-parallel-size", "2"]."""
    startup_timeout_s: Float = Field(600, gt=0)
    """Stop with an error if the server is not healthy after this long."""


class ServerConfig(Section):
    url: Str | None = None
    """Base URL of a running `vllm serve` (started with VLLM_SERVER_DEV_MODE=1, --enable-scale-out
    and --weight-transfer-config '{"backend": "safetensors_file"}'), e.g. http://10.0.0.7:8000."""
    launch: ServerLaunchConfig | None = None
    """Or: online-dpo starts `vllm serve` of the recipe's model itself, and stops it at the end."""
    timeout_s: Float = Field(300, gt=0)
    """Give up on one request (sampling, a weight update, the probe) after this many seconds."""
    transfer_dir: Str | None = None
    """Where the trainer writes the weights the server reads (safetensors files): a folder both see.
    None: /dev/shm/online-dpo/<run> for a local server, else <run dir>/weight_transfer."""

    @model_validator(mode="after")
    def _one_server(self):
        if (self.url is None) == (self.launch is None):
            raise PydanticCustomError("server", "give exactly one of url (a running server) and launch (start one)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise PydanticCustomError("server", "url must start with http:// or https://, got {url}", {"url": self.url})
        return self


class GenerationConfig(Section):
    RENAMED: ClassVar[dict[str, str]] = {"n": "generation.samples_per_prompt"}

    backend: Literal["vllm", "transformers", "vllm_server"] = "vllm"
    """Sampling engine: vLLM in the training process, plain transformers, or a separate `vllm
    serve` (generation.server). Chosen explicitly; there is no silent fallback."""
    server: ServerConfig | None = None
    """generation.backend: vllm_server: which server, and how weights reach it."""
    sleep: Bool = False
    """CUDA, in-process vLLM: put the engine to sleep while the trainer trains (its KV cache and
    weights are released; the weights are synced anyway) and wake it before sampling."""
    engines: Literal["process0", "every_process"] = "process0"
    """process0: one engine, on process 0; every_process: one per process (online_dpo/sampling/samplers.py)."""
    max_staleness: Int = Field(0, ge=0)
    """Asynchronous online DPO: round k samples from the policy of round max(0, k - 1 - s), so the
    sampler draws round k + 1 + s while round k trains (online_dpo/pipeline/draw_ahead.py). 0: each
    round samples the policy it trains. The schedule is fixed, so results do not depend on timing.
    The draws overlap training with generation.backend: vllm_server; elsewhere they run in turn."""
    samples_per_prompt: Int = Field(4, ge=2)
    """Completions sampled per prompt (at least 2 to form a pair)."""
    temperature: Float = Field(1.0, gt=0)
    top_p: Float = Field(1.0, gt=0, le=1)
    max_tokens: Int = Field(64, gt=0)
    """Completion length cap; a completion that hits it counts as not ending in EOS."""
    max_model_len: Int = Field(2048, gt=1)
    """Prompt plus completion tokens the sampler holds per sequence (vLLM's max_model_len), for the
    in-process engine and a launched `vllm serve`; it sizes the KV cache vLLM must reserve. Prompts
    longer than max_model_len - max_tokens are dropped at load (data.max_prompt_tokens)."""
    probe_tolerance: Float | None = Field(None, gt=0)
    """Max |sampler - trainer| per-token log-prob on the probe after each weight sync. None: 2e-3
    when both are float32, 0.1 when either is bfloat16 (a bf16 sampler, a LoRA run's bf16 base)."""
    kv_cache_gib: Int = Field(1, gt=0)
    """vLLM CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: Float = Field(0.4, gt=0, le=1)
    """vLLM GPU memory share, leaving room for the trainer on the same device."""
    tensor_parallel_size: Int = Field(1, gt=0)
    """vLLM tensor parallelism: shard the sampler over this many GPUs of the node (CUDA only)."""
    cpu_top_p_without_sort: Bool = True
    """vllm-cpu: find each row's top-p nucleus among its largest probabilities instead of sorting
    the whole vocabulary every decode step (online_dpo/sampling/top_p.py); false: vLLM's sort."""
