"""What an exported ONNX model folder holds, as ``targets.onnx_export`` writes it and ``targets.onnxrt``
runs it. Standard library only: ONNX Runtime's measuring subprocess imports it."""

MODEL_FILE = "model.onnx"
# model metadata (key, value) of a graph whose KV cache may be one buffer per tensor, past = present
# (its GroupQueryAttention takes the total length from the mask: targets.onnx_attention)
KV_CACHE = ("packager.kv_cache", "shared-buffer")
# what the export can store the embedding table (and a tied lm_head) in: float, or q8_0's / q4_0's exact
# twins (GatherBlockQuantized + MatMulNBits)
EMBED_FORMATS = ("f32", "f16", "int8s_b32", "int4s_b32")
