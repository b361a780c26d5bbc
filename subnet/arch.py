"""Family adapters: what the Llama-family architectures we support look like, read from an HF config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# model_type -> what differs from plain Llama
FAMILIES = {
    "llama": {"qkv_bias": False},
    "mistral": {"qkv_bias": False},
    "qwen2": {"qkv_bias": True},
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_LINEARS = LINEARS[:4]
MLP_LINEARS = LINEARS[4:]


def linear_of(layer, name: str):
    """The linear called ``name`` (one of ``LINEARS``) of an HF decoder layer."""
    return getattr(layer.self_attn if name in ATTN_LINEARS else layer.mlp, name)


def linear_module_name(i: int, name: str) -> str:
    """The module name of layer ``i``'s linear ``name`` in an HF causal LM, as ``named_modules`` gives it."""
    return f"model.layers.{i}.{'self_attn' if name in ATTN_LINEARS else 'mlp'}.{name}"


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class ArchInfo:
    """The shape facts of a base model that sub-networks are cut from (uniform base layers)."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ArchInfo":
        names = {f.name for f in fields(cls)}
        missing = names - set(d) - {"qkv_bias"}
        if missing:
            raise ValueError(f"base architecture is missing {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def family_of(config) -> str:
    """The supported family of an HF config, or a one-line error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type == "packager_hetero":
        model_type = config.base_model_type
    if model_type not in FAMILIES:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}: packager supports {', '.join(FAMILIES)} (Llama family)"
        )
    return model_type


def arch_of(config) -> ArchInfo:
    """ArchInfo of a uniform HF config (llama, mistral, qwen2)."""
    family = family_of(config)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv:
        raise UnsupportedArchitecture(f"{heads} query heads do not split into {kv} KV groups")
    return ArchInfo(
        family=family,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=FAMILIES[family]["qkv_bias"],
    )
