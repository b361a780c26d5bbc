"""ONNX Runtime backend: export (graph + tokenizer + parity), a KV-cache runner, and measurement.

The runner reads everything it needs (layers, KV heads, head_dim) from the graph's inputs, so an
exported folder runs without the spec. ``measure`` runs in a fresh subprocess so that its peak RSS
is the model's alone (``targets.backend.PEAK_RSS``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from targets.backend import (Artifact, ExportError, Measurement, ModelPeakRss, Workload, atomic_output,
                             drop_page_cache, fingerprint, save_tokenizer)
from targets.onnx_artifact import EMBED_FORMATS, KV_CACHE, MODEL_FILE  # noqa: F401  (EMBED_FORMATS: the backend's)

if TYPE_CHECKING:
    from subnet.spec import SubnetSpec

# no torch/transformers/subnet at import time: the measuring subprocess imports this module and the two above
RUNTIME = "onnxruntime"  # == subnet.formats.ONNXRUNTIME
# how ``measure`` loads a model: its files dropped from the page cache first (``drop_page_cache``), so the
# session reads them from disk whether they were written a moment ago (an export) or long before (a bundle)
DEPLOYMENT = {"page_cache": "dropped"}

PARITY_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
)


def _onnx_path(artifact_or_path) -> Path:
    p = Path(artifact_or_path.path if isinstance(artifact_or_path, Artifact) else artifact_or_path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise ExportError(f"{p} does not exist: pass an ONNX artifact folder or its model.onnx")
    return p


def session(model, threads: int | None = None, graph_opt: str = "all", profile: str | None = None):
    """An ONNX Runtime CPU session for ``model`` (a path or serialized bytes): ``threads`` intra-op threads
    (one inter-op), ``graph_opt`` "all" or "basic", and with ``profile`` ONNX Runtime's profiler writing
    under that prefix."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = levels[graph_opt]
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=["CPUExecutionProvider"])  # fmt: skip


class OnnxRunner:
    """Greedy generation and logits through an exported KV-cache graph (batch 1 unless asked)."""

    def __init__(self, path: Path, threads: int | None = None, graph_opt: str = "all", profile: str | None = None):
        self.path = path
        self.threads = threads
        self.session = session(path, threads, graph_opt, profile)
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.kv = [tuple(i.shape[1::2]) for i in self.session.get_inputs() if i.name in self.past_names]  # (heads, hd)
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.vocab = self.session.get_outputs()[0].shape[-1]
        self.positions = any(i.name == "position_ids" for i in self.session.get_inputs())
        meta = self.session.get_modelmeta().custom_metadata_map
        self.shared_kv = meta.get(KV_CACHE[0]) == KV_CACHE[1]

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), dtype=np.float32) for h, d in self.kv]

    def feed(self, ids: np.ndarray, past: list[np.ndarray]) -> dict:
        """The graph inputs that run new tokens ``ids`` [batch, seq] after ``past``."""
        b, s = ids.shape
        p = past[0].shape[2] if past else 0
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, p + s), dtype=np.int64)}
        if self.positions:  # a GroupQueryAttention graph derives positions from the mask
            feed["position_ids"] = np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy()
        feed.update(zip(self.past_names, past))
        return feed

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run new tokens ``ids`` [batch, seq] after ``past``; return logits and the new past."""
        out = self.session.run(None, self.feed(ids, past))
        return out[0], out[1 : 1 + len(self.past_names)]

    def logits(self, token_ids) -> np.ndarray:
        """Logits [n, vocab] of one sequence, processed in one pass."""
        logits, _ = self.step(np.asarray(token_ids, dtype=np.int64)[None, :], self.empty_past())
        return logits[0]

    def cache(self, batch: int, capacity: int, shared: bool = True) -> "PastKV | SharedKV":
        """A KV cache for one generation of up to ``capacity`` tokens: ``SharedKV`` where the graph allows
        it (written in place) unless ``shared`` is False, else ``PastKV`` (past in, present out, numpy)."""
        return SharedKV(self, batch, capacity) if shared and self.shared_kv else PastKV(self, batch)

    def generate(self, token_ids, n: int) -> list[int]:
        """``n`` new tokens by greedy decoding, one token per step with the KV cache."""
        ids = np.asarray(token_ids, dtype=np.int64)[None, :]
        cache = self.cache(1, ids.shape[1] + n)
        logits = cache.step(ids)
        out = []
        for _ in range(n):
            nxt = int(np.argmax(logits[0, -1]))
            out.append(nxt)
            if len(out) == n:
                break
            logits = cache.step(np.array([[nxt]], dtype=np.int64))
        return out


class PastKV:
    """A generation's KV cache as the graph's past inputs and present outputs (numpy, copied per step)."""

    def __init__(self, runner: OnnxRunner, batch: int):
        self.runner, self.past = runner, runner.empty_past(batch)

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Run new tokens ``ids`` [batch, seq]; their logits [batch, seq, vocab]."""
        logits, self.past = self.runner.step(ids, self.past)
        return logits


class SharedKV:
    """A generation's KV cache as one preallocated buffer per layer and tensor, bound (ORT IO binding) as
    both the past input and the present output, so GroupQueryAttention appends each step's keys and
    values in place: no copy of the cache in or out per token. Needs a graph whose kernel takes the
    total length from the mask (``KV_CACHE``)."""

    def __init__(self, runner: OnnxRunner, batch: int, capacity: int):
        import onnxruntime as ort

        self.runner, self.batch, self.capacity, self.length = runner, batch, capacity, 0
        self.io = runner.session.io_binding()
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, h, capacity, d), dtype=np.float32))
                        for h, d in runner.kv]  # fmt: skip
        for past, present, buf in zip(runner.past_names, runner.present_names, self.buffers):
            self.io.bind_ortvalue_input(past, buf)
            self.io.bind_ortvalue_output(present, buf)

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Run new tokens ``ids`` [batch, seq]; their logits [batch, seq, vocab]."""
        b, s = ids.shape
        if b != self.batch or self.length + s > self.capacity:
            raise ValueError(f"{b} x {s} new tokens do not fit a KV cache of batch {self.batch} holding "
                             f"{self.length} of {self.capacity} positions: make the cache larger")  # fmt: skip
        self.length += s
        self.inputs = (ids.astype(np.int64), np.ones((b, self.length), dtype=np.int64))  # alive until run returns
        self.io.bind_cpu_input("input_ids", self.inputs[0])
        self.io.bind_cpu_input("attention_mask", self.inputs[1])
        logits = np.empty((b, s, self.runner.vocab), dtype=np.float32)
        self.io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.runner.session.run_with_iobinding(self.io)
        return logits


def load(artifact_or_path, threads: int | None = None, graph_opt: str = "all",
         profile: str | None = None) -> OnnxRunner:  # fmt: skip
    """A runner for an exported artifact (an Artifact, its folder, or its model.onnx).

    ``graph_opt="basic"`` skips ORT's extended fusions (which, e.g., turn a weight DequantizeLinear +
    MatMul into an int8 MatMul with dynamically quantized activations). ``profile``: a prefix for
    ONNX Runtime's profile of every run (``runner.session.end_profiling()`` writes it).
    """
    return OnnxRunner(_onnx_path(artifact_or_path), threads, graph_opt, profile)


def parity_ids(tokenizer, vocab_size: int, n: int = 48) -> list[int]:
    """Token ids for parity checks: English text through ``tokenizer``, else seeded random ids."""
    if tokenizer is not None:
        ids = list(tokenizer(PARITY_TEXT)["input_ids"])
        if len(ids) >= 8:
            return ids[:n]
    return np.random.default_rng(0).integers(0, vocab_size, n).tolist()


# Parity bounds. Every linear is checked on ORT's own input (one prefill call): the simulation must
# reproduce the runtime's numerics to fp32 accumulation order. Logits are bounded only where they can be:
# int8 (quantize_dynamic) re-rounds every activation tensor at run time, so a 1e-7 difference anywhere
# (ORT's and torch's fp32 kernels differ in the last bit) flips some roundings and the flips grow layer by
# layer. Measured on SmolLM2 all-int8: torch vs itself with the embedding perturbed by 1e-7 agrees on
# top-1 for 73% of tokens, ORT vs torch 71%; so its logit top-1 is recorded, not bounded.
# MatMulNBits at accuracy_level 4 re-rounds inputs too, per token and block of 32: on SmolLM2 its linears
# agree to 2.2e-3 (an occasional input rounding differs) and logits on top-1 for 85-96% of tokens
# (full and a pruned spec, int4_b32 and int8_b32): recorded, not bounded.
PARITY_BOUNDS = {  # format class -> (max relative error of one linear, min logit top-1, max |Δlogit|; None = recorded)
    "float": (1e-4, 1.0, 1e-3),
    "block_int8_input": (5e-3, None, None),
    "dynamic_int8": (1e-4, None, None),
}


def _linear_weight_and_format(model, spec: SubnetSpec, key: str):
    """(weight, format, module name) of the linear a graph node stands for (``key``: "lm_head" or "layers.i.name")."""
    from subnet.arch import linear_module_name, linear_of

    if key == "lm_head":
        head = model.get_output_embeddings()
        tied = head.weight is model.get_input_embeddings().weight
        return head.weight, spec.embed_format if tied else spec.lm_head_format, "lm_head"
    _, i, name = key.split(".")
    layer = model.model.layers[int(i)]
    return linear_of(layer, name).weight, spec.layers[int(i)].formats[name], linear_module_name(int(i), name)


def linear_parity(artifact, model, spec: SubnetSpec, token_ids, linear_io: dict[str, list[str]],
                  block_scales: dict | None = None) -> dict:  # fmt: skip
    """Each linear's ORT output vs the simulation applied to ORT's own input of that linear.

    ``linear_io``: linear -> [input, output] tensor names, or [input, output, start, stop] for a projection
    packed with others into one node's output columns start:stop (``meta["linear_io"]`` of the export). The
    graph is run once on ``token_ids`` with those tensors as extra outputs (a probe copy of model.onnx
    that shares its weight file, removed afterwards). The reference is ``input_quantizer(fmt, 4,
    "tensor")(x) @ fake_quantize(W, fmt).T`` (int8: ``ort_int8_linear``, with this CPU's kernel
    saturation; a weight with ``block_scales`` rounded at them), i.e. what one ORT call on the whole input computes.
    Returns the worst relative error (max |diff| / max |ORT output|) and the linear it occurs at.
    """
    import onnx
    import torch
    from onnx import TensorProto, helper

    from subnet.quant import fake_quantize, input_quantizer, ort_int8_linear, round_to_scales

    path = _onnx_path(artifact)
    graph = onnx.load(str(path), load_external_data=False)
    have = {o.name for o in graph.graph.output}
    for name in dict.fromkeys(n for io in linear_io.values() for n in io[:2]):
        if name not in have:
            graph.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    probe = path.with_name(f".parity-probe-{os.getpid()}.onnx")
    try:
        onnx.save(graph, str(probe))  # its initializers still point at the artifact's own data file
        runner = OnnxRunner(probe)
        names = [o.name for o in runner.session.get_outputs()]
        ids = np.asarray(token_ids, dtype=np.int64)[None, :]
        got = dict(zip(names, runner.session.run(None, runner.feed(ids, runner.empty_past()))))
    finally:
        probe.unlink(missing_ok=True)
    errors = {}
    with torch.no_grad():
        for key, (x_name, y_name, *cols) in linear_io.items():
            weight, fmt, module = _linear_weight_and_format(model, spec, key)
            x = torch.from_numpy(got[x_name]).float()
            if fmt == "int8":
                ref = ort_int8_linear(x, weight.float(), scope="tensor")
            else:
                quant = input_quantizer(fmt, 4, "tensor")
                kept = (block_scales or {}).get(module)
                w = fake_quantize(weight.float(), fmt) if kept is None else round_to_scales(weight.float(), kept, fmt)
                ref = (quant(x) if quant else x) @ w.T
            y = got[y_name][..., slice(*cols)] if cols else got[y_name]
            errors[key] = float(np.abs(y - ref.numpy()).max() / max(float(np.abs(y).max()), 1e-30))
    worst = max(errors, key=errors.get)
    return {"max_rel_err": errors[worst], "worst": worst, "n_linears": len(errors)}


def parity(artifact, model, spec: SubnetSpec, token_ids, linear_io: dict[str, list[str]] | None = None,
           block_scales: dict | None = None) -> dict:  # fmt: skip
    """ORT vs the torch model with the same simulated formats (``fake_quantize_model``, kept-scale
    weights at ``block_scales`` where given), bounded by ``PARITY_BOUNDS``.

    Logits of one prefill call over ``token_ids`` vs the simulation with int8 ranges over the whole
    input ("tensor", what that call computes); with int8 linears also one-token-per-call decoding vs
    the default "token" simulation (``decode_*``); with ``linear_io`` (default: the artifact's
    ``meta["linear_io"]``) every linear on ORT's own input (``linear_parity``).
    """
    import torch

    from subnet.formats import NBITS_FORMATS
    from subnet.quant import fake_quantize_model

    if linear_io is None and isinstance(artifact, Artifact):
        linear_io = artifact.meta.get("linear_io")
    formats = {f for ly in spec.layers for f in ly.formats.values()} | {spec.lm_head_format}
    int8 = "int8" in formats
    blocks = bool(formats & set(NBITS_FORMATS))  # exported at accuracy_level 4
    runner = load(artifact)
    ids = list(token_ids)
    with torch.no_grad():
        ref = fake_quantize_model(model, spec, int8_scope="tensor", block_scales=block_scales)(torch.tensor([ids]))
        ref = ref.logits[0].float().numpy()
    got = runner.logits(ids)
    out = {
        "max_abs_diff": float(np.abs(got - ref).max()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "n_tokens": len(ids),
        "reference": "torch eager with subnet.quant.fake_quantize_model(model, spec)",
        "format_class": "dynamic_int8" if int8 else "block_int8_input" if blocks else "float",
    }
    if int8:
        with torch.no_grad():
            ref = fake_quantize_model(model, spec, int8_scope="token", block_scales=block_scales)(torch.tensor([ids]))
            ref = ref.logits[0].float().numpy()
        cache = runner.cache(1, len(ids))
        got = np.stack([cache.step(np.array([[t]], dtype=np.int64))[0, -1] for t in ids])
        out["decode_max_abs_diff"] = float(np.abs(got - ref).max())
        out["decode_top1_agreement"] = float((got.argmax(-1) == ref.argmax(-1)).mean())
    if linear_io:
        out["linears"] = linear_parity(artifact, model, spec, ids, linear_io, block_scales)
    out["within_bounds"] = within_bounds(out)
    return out


def within_bounds(result: dict) -> bool:
    """Whether a parity result is within ``PARITY_BOUNDS`` for its format class."""
    max_rel, top1, max_abs = PARITY_BOUNDS[result["format_class"]]
    ok = "linears" in result and result["linears"]["max_rel_err"] <= max_rel
    ok = ok and (top1 is None or result["top1_agreement"] >= top1)
    return ok and (max_abs is None or result["max_abs_diff"] <= max_abs)


def export(model, tokenizer, spec: SubnetSpec, out, force: bool = False, fused: bool = True,
           block_scales: dict | None = None) -> Artifact:  # fmt: skip
    """Export for ONNX Runtime: model.onnx (+ .data), tokenizer files, artifact.json with parity.
    ``fused``, ``block_scales``: see ``targets.onnx_export.write_onnx``; parity is checked at those scales."""
    from targets.onnx_export import artifact_files, check_formats, write_onnx

    out = Path(out)
    check_formats(spec)
    with atomic_output(out, force=force) as tmp:
        meta = write_onnx(model, spec, tmp, fused=fused, block_scales=block_scales)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        ids = parity_ids(tokenizer, model.config.vocab_size)
        meta["parity"] = parity(tmp / MODEL_FILE, model, spec, ids, meta["linear_io"], block_scales)
        meta["size_bytes"] = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith("model.onnx"))
        art = Artifact(RUNTIME, str(out / MODEL_FILE), artifact_files(tmp, out, ["artifact.json"]), meta)
        art.write_meta(tmp / "artifact.json")
    return art


# ---- measurement ----------------------------------------------------------------------------
def _timings(path: str, prompt: int, gen: int, batch: int, threads: int, repeats: int, shared_kv: bool) -> dict:
    """Prefill and decode timings of one artifact, in this process (medians over ``repeats``), and the
    model's peak RSS: what the session, its runs and the KV cache add to a process with the library loaded."""
    import onnxruntime  # noqa: F401  (the library's own memory is not the model's)

    rng = np.random.default_rng(0)
    with ModelPeakRss() as rss:
        runner = OnnxRunner(Path(path), threads)
        ids = rng.integers(0, runner.vocab, (batch, prompt)).astype(np.int64)
        nxt = np.zeros((batch, 1), dtype=np.int64)

        def run_once():
            t0 = time.perf_counter()
            cache = runner.cache(batch, prompt + gen, shared_kv)
            logits = cache.step(ids)
            t1 = time.perf_counter()
            for _ in range(gen):
                nxt[:, 0] = logits[:, -1].argmax(-1)
                logits = cache.step(nxt)
            t2 = time.perf_counter()
            return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / max(gen, 1)

        run_once()  # warm-up
        runs = [run_once() for _ in range(repeats)]
    return {
        "prefill_ms": statistics.median(r[0] for r in runs),
        "decode_ms_per_token": statistics.median(r[1] for r in runs),
        "peak_rss_mb": rss.mb,
    }


def measure(artifact, workload: Workload, threads: int, repeats: int = 5, shared_kv: bool = True) -> Measurement:
    """Prefill ms and decode ms/token (KV cache) with ``threads`` threads, in a fresh subprocess, the model's
    files read from disk (``DEPLOYMENT``) (``shared_kv=False``: the past copied in and out every step even
    where the graph could share it)."""
    import onnxruntime as ort

    path = _onnx_path(artifact)
    drop_page_cache(p for p in path.parent.iterdir() if p.name.startswith(MODEL_FILE))
    args = [str(path), workload.prompt_tokens, workload.gen_tokens, workload.batch, threads, repeats, shared_kv]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, "-m", "targets.onnxrt", json.dumps(args)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"measuring {path} failed: {tail[0]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return Measurement(
        runtime=RUNTIME,
        prefill_ms=r["prefill_ms"],
        decode_ms_per_token=r["decode_ms_per_token"],
        peak_rss_mb=r["peak_rss_mb"],
        repeats=repeats,
        workload={"prompt_tokens": workload.prompt_tokens, "gen_tokens": workload.gen_tokens, "batch": workload.batch},
        fingerprint=fingerprint("onnxruntime", ort.__version__, threads),
        settings=dict(DEPLOYMENT),
    )


if __name__ == "__main__":  # the measuring subprocess: python -m targets.onnxrt '[path, prompt, gen, batch, threads, n, shared_kv]'
    print(json.dumps(_timings(*json.loads(sys.argv[1]))))
