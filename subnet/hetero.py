"""Heterogeneous Llama-family models: per-layer heads, KV heads and MLP width.

transformers 5.23 stores per-layer overrides in ``config.per_layer_config`` but the stock
``*ForCausalLM`` classes build every layer from the global config. The subclasses here build
layer i from ``config.per_layer_config[i]``. They are registered with the Auto classes under
their own model types on import, so a saved heterogeneous model reloads with
``AutoModelForCausalLM.from_pretrained`` once ``subnet`` is imported (no remote code).
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralForCausalLM
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM

PER_LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _hetero_classes(family, config_cls, model_cls, layer_cls):
    model_type = f"packager_hetero_{family}"

    def validate_architecture(self):
        # head_dim is explicit and fixed, so the stock "hidden_size % num_attention_heads" check does not apply
        for layer in self.per_layer_config:
            if layer.num_attention_heads % layer.num_key_value_heads:
                raise ValueError(
                    f"{layer.num_attention_heads} query heads do not split into {layer.num_key_value_heads} KV groups"
                )

    def validate(self):
        # the parent's strict-dataclass validators, with validate_architecture replaced by the one above
        for check in config_cls.__class_validators__:
            (validate_architecture if check.__name__ == "validate_architecture" else check)(self)

    cfg = type(
        f"Hetero{config_cls.__name__}",
        (config_cls,),
        {
            "model_type": model_type,
            "base_model_type": family,
            "validate_architecture": validate_architecture,
            "validate": validate,
            "__doc__": f"{family} config with per-layer sizes and a free hidden size.",
        },
    )

    def __init__(self, config):
        if not config.is_heterogeneous:
            model_cls.__init__(self, config)
            return
        n = config.num_hidden_layers
        config.num_hidden_layers = 0  # the stock init would build every layer from the global sizes
        try:
            model_cls.__init__(self, config)
        finally:
            config.num_hidden_layers = n
        self.model.layers = nn.ModuleList([layer_cls(config.per_layer_config[i], i) for i in range(n)])
        self.post_init()

    model = type(
        f"Hetero{model_cls.__name__}",
        (model_cls,),
        {"config_class": cfg, "__init__": __init__, "__doc__": f"{family} causal LM with per-layer sizes."},
    )
    AutoConfig.register(model_type, cfg, exist_ok=True)
    AutoModelForCausalLM.register(cfg, model, exist_ok=True)
    return cfg, model


HETERO = {
    "llama": _hetero_classes("llama", LlamaConfig, LlamaForCausalLM, LlamaDecoderLayer),
    "mistral": _hetero_classes("mistral", MistralConfig, MistralForCausalLM, MistralDecoderLayer),
    "qwen2": _hetero_classes("qwen2", Qwen2Config, Qwen2ForCausalLM, Qwen2DecoderLayer),
}


def hetero_config(family: str, base_dict: dict, per_layer: list[dict]):
    """A heterogeneous config of ``family`` from a base config dict and one override dict per layer."""
    cfg_cls, _ = HETERO[family]
    d = {k: v for k, v in base_dict.items() if k not in ("model_type", "architectures", "per_layer_config")}
    d["num_hidden_layers"] = len(per_layer)
    for key in PER_LAYER_KEYS:  # global values: the first layer's (the per-layer entries override them)
        d[key] = per_layer[0][key]
    config = cfg_cls(**d, per_layer_config={i: dict(p) for i, p in enumerate(per_layer)})
    config.architectures = [HETERO[family][1].__name__]
    return config


def model_class(config):
    """The causal-LM class that builds ``config`` (heterogeneous subclass where needed)."""
    for cfg_cls, model in HETERO.values():
        if isinstance(config, cfg_cls):
            return model
    return AutoModelForCausalLM._model_mapping[type(config)]
