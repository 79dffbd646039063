"""A quiet console: the two library messages a one-process CPU run used to print stay away.

Both are reproduced without loading a model, in a fresh interpreter (each is once-per-process):
accelerate's unwrap + save_pretrained of a tiny random model (which imported DeepSpeed, whose
import prints "Setting accelerator to CPU"), and vLLM's module scan at engine start (which trips
torch's `reduce_op` FutureWarning).
"""

import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = r'''
import sys, tempfile, warnings

import online_dpo.training.distributed  # noqa: F401  (what every training path imports)
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1))
Accelerator(cpu=True).unwrap_model(model)
with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
print("deepspeed imported:", "deepspeed" in sys.modules)

from online_dpo.sampling.vllm_engine import configure_vllm_env
try:
    from vllm.triton_utils.dispatcher import _rebind_kernels
except ImportError:
    _rebind_kernels = None
if _rebind_kernels is not None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _rebind_kernels([])  # the scan vLLM runs at engine start, here with nothing to rebind
    print("scan warns without the filter:", any("reduce_op" in str(w.message) for w in seen))
    configure_vllm_env(kv_cache_gib=1)
    _rebind_kernels([])
print("done")
'''


def test_no_deepspeed_or_reduce_op_noise():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    console = result.stdout + result.stderr
    assert result.returncode == 0 and "done" in result.stdout, console[-3000:]
    assert "deepspeed imported: False" in console and "Setting accelerator" not in console
    if "scan warns without the filter" in console:
        assert "scan warns without the filter: True" in console  # the trigger is live here
    assert "reduce_op" not in console, console[-3000:]


ENGINE_STDERR = r'''
import logging, os
os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
from online_dpo.console import engine_start_stderr, quiet_vllm_logging
quiet_vllm_logging()
with engine_start_stderr():
    os.write(2, b"kept 1\n[W1204 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory\n")
    os.write(2, b"bar  50%\rbar 100%\r")
    logging.getLogger("vllm.platforms.cpu").warning("Triton is not installed. triton-cpu is expected on x86 CPUs.")
    logging.getLogger("vllm.config").warning("kept 2: a warning that is not on the list")
    # vLLM's own check, on the variable its CPU worker sets in os.environ (inherited by children)
    os.environ["VLLM_DIST_IDENT"] = "a-previous-engine"
    from vllm.platforms.interface import Platform
    Platform.validate_environ(hard_fail=False)
os.write(2, b"after\n")
'''


def test_the_harmless_lines_go_and_every_other_line_stays():
    """C++ lines at engine start go through a filter on fd 2; vLLM's Python warnings through a
    handler that drops the listed ones alone. ONLINE_DPO_DEBUG=1 keeps everything."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ONLINE_DPO_DEBUG": "0"}
    quiet = subprocess.run([sys.executable, "-c", ENGINE_STDERR], cwd=REPO, env=env, capture_output=True,
                           timeout=120)  # bytes: text mode would turn the bars' \r into \n
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == b"kept 1\nbar  50%\rbar 100%\rkept 2: a warning that is not on the list\nafter\n"
    loud = subprocess.run([sys.executable, "-c", ENGINE_STDERR], cwd=REPO, env={**env, "ONLINE_DPO_DEBUG": "1"},
                          capture_output=True, text=True, timeout=120)
    assert "NUMA binding" in loud.stderr and "triton-cpu is expected" in loud.stderr
