"""ONNX Runtime backend: export (graph + tokenizer + parity), a KV-cache runner, and measurement.

The runner reads everything it needs (layers, KV heads, head_dim) from the graph's inputs, so an
exported folder runs without the spec. ``measure`` runs in a fresh subprocess so that its peak RSS
is the runtime's own.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from targets.backend import Artifact, ExportError, Measurement, Workload, atomic_output, fingerprint

if TYPE_CHECKING:
    from subnet.spec import SubnetSpec

# no torch/transformers/subnet at import time: the measuring subprocess imports only this module
RUNTIME = "onnxruntime"  # == subnet.formats.ONNXRUNTIME
MODEL_FILE = "model.onnx"  # == targets.onnx_export.MODEL_FILE
EMBED_FORMATS = ("f32", "f16")  # what the ONNX export can store the embedding table (and a tied lm_head) in

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


class OnnxRunner:
    """Greedy generation and logits through an exported KV-cache graph (batch 1 unless asked)."""

    def __init__(self, path: Path, threads: int | None = None, graph_opt: str = "all"):
        import onnxruntime as ort

        levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = levels[graph_opt]
        self.path = path
        self.threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.kv = [tuple(i.shape[1::2]) for i in self.session.get_inputs() if i.name in self.past_names]  # (heads, hd)
        self.vocab = self.session.get_outputs()[0].shape[-1]

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), dtype=np.float32) for h, d in self.kv]

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run new tokens ``ids`` [batch, seq] after ``past``; return logits and the new past."""
        b, s = ids.shape
        p = past[0].shape[2] if past else 0
        feed = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((b, p + s), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy(),
        }
        feed.update(zip(self.past_names, past))
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def logits(self, token_ids) -> np.ndarray:
        """Logits [n, vocab] of one sequence, processed in one pass."""
        logits, _ = self.step(np.asarray(token_ids, dtype=np.int64)[None, :], self.empty_past())
        return logits[0]

    def generate(self, token_ids, n: int) -> list[int]:
        """``n`` new tokens by greedy decoding, one token per step with the KV cache."""
        logits, past = self.step(np.asarray(token_ids, dtype=np.int64)[None, :], self.empty_past())
        out = []
        for _ in range(n):
            nxt = int(np.argmax(logits[0, -1]))
            out.append(nxt)
            if len(out) == n:
                break
            logits, past = self.step(np.array([[nxt]], dtype=np.int64), past)
        return out


def load(artifact_or_path, threads: int | None = None, graph_opt: str = "all") -> OnnxRunner:
    """A runner for an exported artifact (an Artifact, its folder, or its model.onnx).

    ``graph_opt="basic"`` skips ORT's extended fusions (which, e.g., turn a weight DequantizeLinear +
    MatMul into an int8 MatMul with dynamically quantized activations).
    """
    return OnnxRunner(_onnx_path(artifact_or_path), threads, graph_opt)


def parity_ids(tokenizer, vocab_size: int, n: int = 48) -> list[int]:
    """Token ids for parity checks: English text through ``tokenizer``, else seeded random ids."""
    if tokenizer is not None:
        ids = list(tokenizer(PARITY_TEXT)["input_ids"])
        if len(ids) >= 8:
            return ids[:n]
    return np.random.default_rng(0).integers(0, vocab_size, n).tolist()


def parity(artifact, model, spec: SubnetSpec, token_ids) -> dict:
    """ORT logits vs the torch model with the same simulated weight formats (``fake_quantize_model``)."""
    import torch

    from subnet.quant import fake_quantize_model

    ref_model = fake_quantize_model(model, spec)
    with torch.no_grad():
        ref = ref_model(torch.tensor([list(token_ids)])).logits[0].float().numpy()
    got = load(artifact).logits(token_ids)
    return {
        "max_abs_diff": float(np.abs(got - ref).max()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "n_tokens": len(token_ids),
        "reference": "torch eager with subnet.quant.fake_quantize_model(model, spec)",
    }


def export(model, tokenizer, spec: SubnetSpec, out, force: bool = False, optimize: bool = False) -> Artifact:
    """Export for ONNX Runtime: model.onnx (+ .data), tokenizer files, artifact.json with parity."""
    from targets.onnx_export import artifact_files, check_formats, write_onnx

    out = Path(out)
    check_formats(spec)
    with atomic_output(out, force=force) as tmp:
        meta = write_onnx(model, spec, tmp, optimize=optimize)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta["parity"] = parity(tmp / MODEL_FILE, model, spec, parity_ids(tokenizer, model.config.vocab_size))
        meta["size_bytes"] = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith("model.onnx"))
        art = Artifact(RUNTIME, str(out / MODEL_FILE), artifact_files(tmp, out, ["artifact.json"]), meta)
        art.write_meta(tmp / "artifact.json")
    return art


# ---- measurement ----------------------------------------------------------------------------
def _timings(path: str, prompt: int, gen: int, batch: int, threads: int, repeats: int) -> dict:
    """Prefill and decode timings of one artifact, in this process (medians over ``repeats``)."""
    runner = OnnxRunner(Path(path), threads)
    ids = np.random.default_rng(0).integers(0, runner.vocab, (batch, prompt)).astype(np.int64)
    nxt = np.zeros((batch, 1), dtype=np.int64)

    def run_once():
        t0 = time.perf_counter()
        logits, past = runner.step(ids, runner.empty_past(batch))
        t1 = time.perf_counter()
        for _ in range(gen):
            nxt[:, 0] = logits[:, -1].argmax(-1)
            logits, past = runner.step(nxt, past)
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / max(gen, 1)

    run_once()  # warm-up
    runs = [run_once() for _ in range(repeats)]
    return {
        "prefill_ms": statistics.median(r[0] for r in runs),
        "decode_ms_per_token": statistics.median(r[1] for r in runs),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (reset by exec; ru_maxrss keeps the forking parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(artifact, workload: Workload, threads: int, repeats: int = 5) -> Measurement:
    """Prefill ms and decode ms/token (KV cache) with ``threads`` threads, in a fresh subprocess."""
    import onnxruntime as ort

    path = _onnx_path(artifact)
    args = [str(path), workload.prompt_tokens, workload.gen_tokens, workload.batch, threads, repeats]
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
    )


if __name__ == "__main__":  # the measuring subprocess: python -m targets.onnxrt '[path, prompt, gen, batch, threads, n]'
    print(json.dumps(_timings(*json.loads(sys.argv[1]))))
