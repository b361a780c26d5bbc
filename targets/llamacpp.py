"""llama.cpp runtime backend (llama-cpp-python): export to GGUF, run, check parity, measure.

``python -m targets.llamacpp measure MODEL.gguf --threads 2`` measures in a fresh process (so its
peak RSS is the model's) and prints a JSON ``Measurement``; ``measure()`` runs exactly that.
This module imports neither torch nor transformers at load time, to keep that process lean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from targets.backend import Artifact, ExportError, Measurement, ModelPeakRss, Workload, fingerprint

RUNTIME = "llama.cpp"
GGML_TYPE_F32 = 0  # llama.cpp KV-cache type for parity runs (the default is F16)
# How a deployment loads the model, and so how it is measured. Weights are read into memory, not mapped
# (llama-cli's --no-mmap): llama.cpp repacks 4-bit weights (q4_0, iq4_nl) for its CPU kernels, and a
# mapped file keeps the originals resident beside the repacked copy. Measured on SmolLM2 with 28 q4_0
# blocks: peak RSS 177 MiB mapped, 124 MiB read, at the same decode speed; q8_0 (not repacked) 171 both ways.
DEPLOYMENT = {"use_mmap": False, "kv_cache": "f16"}

# Parity bounds vs the torch model with the same simulated weight quantization. llama.cpp converts
# activations to f16 for f16 matmuls and to q8_0/q8_K for quantized ones, so only f32 is exact.
# Measured on SmolLM2-135M, 64 tokens (benchmarks/bench_export_gguf.py): f32 max 8.8e-5; f16 max 3.4e-2,
# mean 5.6e-3, top-1 100%; q8_0 max 1.05, mean 0.15, top-1 98%; q4_0 max 1.8, mean 0.20, top-1 95%.
PARITY_BOUNDS = {  # format class -> (max |logit diff|, mean |logit diff|, min top-1 agreement)
    "f32": (1e-3, 1e-4, 1.0),
    "f16": (0.1, 0.02, 0.97),
    "quantized": (3.0, 0.5, 0.90),
}


class LlamaCppError(ExportError, ValueError):
    """A llama.cpp artifact, request or run that cannot go ahead, with the reason and the fix."""


def version() -> str:
    """llama-cpp-python's version."""
    import llama_cpp

    return llama_cpp.__version__


def _path(artifact_or_path) -> str:
    path = artifact_or_path.path if isinstance(artifact_or_path, Artifact) else str(artifact_or_path)
    if not Path(path).is_file():
        raise LlamaCppError(f"{path} does not exist: export the model first (targets.llamacpp.export)")
    return path


class LlamaCppRunner:
    """A GGUF loaded in llama.cpp: full logits for parity, greedy generation, timed steps."""

    def __init__(self, path: str, n_ctx: int = 512, threads: int | None = None, f32_kv: bool = True,
                 logits_all: bool = True, use_mmap: bool = True):  # fmt: skip
        from llama_cpp import Llama

        kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv else {}
        self.n_ctx = n_ctx
        self.logits_all = logits_all
        self.llm = Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            use_mmap=use_mmap,
            verbose=False,
            **kv,
        )
        self.n_vocab = self.llm.n_vocab()
        self.eos = self.llm.token_eos()

    def _check(self, n: int) -> None:
        if n > self.n_ctx:
            raise LlamaCppError(f"{n} tokens do not fit the context of {self.n_ctx}: load with a larger n_ctx")
        if n == 0:
            raise LlamaCppError("no tokens given")

    def step(self, token_ids) -> np.ndarray:
        """Append tokens to the sequence; return the logits of the last one."""
        self.llm.eval(list(token_ids))
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def reset(self) -> None:
        """Start a new sequence (the next eval overwrites the cache from position 0)."""
        self.llm.reset()

    def logits(self, token_ids) -> np.ndarray:
        """Logits [n, vocab] of every position of one sequence (starting from an empty cache)."""
        if not self.logits_all:
            raise LlamaCppError("this runner was loaded without logits_all; load(..., logits_all=True)")
        ids = list(map(int, token_ids))
        self._check(len(ids))
        self.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def generate(self, token_ids, n: int) -> list[int]:
        """Greedy continuation of ``token_ids``: up to ``n`` new tokens, stopping after EOS."""
        ids = list(map(int, token_ids))
        self._check(len(ids) + n)
        self.reset()
        out: list[int] = []
        logits = self.step(ids)
        for _ in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            if tok == self.eos or len(out) == n:
                break
            logits = self.step([tok])
        return out

    def close(self) -> None:
        self.llm.close()


def load(artifact_or_path, n_ctx: int = 512, threads: int | None = None, f32_kv: bool = True,
         logits_all: bool = True, use_mmap: bool = True) -> LlamaCppRunner:  # fmt: skip
    """Load a GGUF in llama.cpp. Defaults suit parity checks (f32 KV cache, logits of every token, the file
    mapped); ``measure_here`` loads with the ``DEPLOYMENT`` settings."""
    return LlamaCppRunner(_path(artifact_or_path), n_ctx=n_ctx, threads=threads, f32_kv=f32_kv, logits_all=logits_all,
                          use_mmap=use_mmap)


# ---- parity -----------------------------------------------------------------------------------
def parity(artifact: Artifact, model, token_ids, block_scales=None) -> dict:
    """Compare llama.cpp's logits with the torch model under the same simulated weight quantization.

    ``model`` is the extracted (unquantized) sub-network the artifact was written from; it is copied
    and fake-quantized with the formats really written (fallbacks included), at the ``block_scales``
    it was written with.
    """
    import torch

    from subnet.quant import fake_quantize_model
    from subnet.spec import SubnetSpec

    eff = SubnetSpec.from_dict(artifact.meta["effective_spec"]) if "effective_spec" in artifact.meta else None
    if eff is None:
        raise LlamaCppError(f"{artifact.path}: artifact meta has no effective_spec; re-export with targets.llamacpp")
    ids = [int(t) for t in token_ids]
    ref_model = fake_quantize_model(model, eff, inplace=False, block_scales=block_scales)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float().numpy()
    runner = load(artifact, n_ctx=max(len(ids), 16))
    try:
        got = runner.logits(ids)
    finally:
        runner.close()
    diff = np.abs(got - ref)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "n_tokens": len(ids),
        "format_class": format_class(eff),
    }


def format_class(spec) -> str:
    """'f32', 'f16' or 'quantized': the least exact kind of weight format in a spec."""
    fmts = spec.formats_used()
    if fmts <= {"f32"}:
        return "f32"
    if fmts <= {"f32", "f16", "bf16"}:
        return "f16"
    return "quantized"


def parity_ok(result: dict) -> bool:
    """Whether a parity result is within PARITY_BOUNDS for its format class."""
    max_diff, mean_diff, top1 = PARITY_BOUNDS[result["format_class"]]
    return (
        result["max_abs_diff"] <= max_diff
        and result["mean_abs_diff"] <= mean_diff
        and result["top1_agreement"] >= top1
    )


def export(model, tokenizer, spec, out, force: bool = False, parity_tokens=None, block_scales=None) -> Artifact:
    """Write the GGUF (``targets.gguf_export.write_gguf``) and record parity vs torch in meta["parity"].

    ``parity_tokens`` are the ids compared (default: the tokenizer's encoding of a fixed sentence);
    ``block_scales`` as ``write_gguf`` takes them.
    """
    from targets.gguf_export import write_gguf

    art = write_gguf(model, tokenizer, spec, out, force=force, block_scales=block_scales)
    if parity_tokens is None:
        parity_tokens = tokenizer.encode(PARITY_TEXT, add_special_tokens=False)[:64]
    art.meta["parity"] = parity(art, model, parity_tokens, block_scales)
    art.meta["parity"]["within_bounds"] = parity_ok(art.meta["parity"])
    art.meta["llama_cpp_version"] = version()
    return art


PARITY_TEXT = (
    "The capital of France is Paris. It lies on the Seine, and about two million people live in the city "
    "itself, while its wider region holds more than twelve million."
)


# ---- measurement ------------------------------------------------------------------------------
def measure_here(path: str, workload: Workload, threads: int, repeats: int = 5) -> dict:
    """Measure in this process (use ``measure`` for a clean RSS): prefill ms, decode ms/token, peak RSS.

    Deployment settings (``DEPLOYMENT``): weights read, not mapped; f16 KV cache; logits of the last token
    only; greedy decode. One warm-up run, then the median over ``repeats``. The prompt is a fixed
    pseudo-random id sequence (speed does not depend on which ids). Peak RSS is the model's: the process
    peak minus its RSS just before loading.
    """
    if workload.batch != 1:
        raise LlamaCppError(f"batch {workload.batch}: the llama.cpp backend measures single sequences (batch 1)")
    if repeats < 1 or workload.prompt_tokens < 1 or workload.gen_tokens < 1:
        raise LlamaCppError("repeats, prompt_tokens and gen_tokens must all be at least 1")
    import llama_cpp  # noqa: F401  (the library's own memory is not the model's)

    with ModelPeakRss() as rss:
        runner = load(path, n_ctx=workload.context, threads=threads, f32_kv=False, logits_all=False,
                      use_mmap=DEPLOYMENT["use_mmap"])
        rng = np.random.default_rng(0)
        prompt = rng.integers(min(1000, runner.n_vocab // 2), runner.n_vocab, workload.prompt_tokens).tolist()
        prefill, decode = [], []
        for r in range(repeats + 1):
            runner.reset()
            t0 = time.perf_counter()
            logits = runner.step(prompt)
            t1 = time.perf_counter()
            for _ in range(workload.gen_tokens):
                logits = runner.step([int(np.argmax(logits))])
            t2 = time.perf_counter()
            if r:  # run 0 is the warm-up
                prefill.append((t1 - t0) * 1e3)
                decode.append((t2 - t1) * 1e3 / workload.gen_tokens)
    runner.close()
    return Measurement(
        runtime=RUNTIME,
        prefill_ms=statistics.median(prefill),
        decode_ms_per_token=statistics.median(decode),
        peak_rss_mb=rss.mb,
        repeats=repeats,
        workload={"prompt_tokens": workload.prompt_tokens, "gen_tokens": workload.gen_tokens, "batch": 1},
        fingerprint=fingerprint(RUNTIME, version(), threads),
        settings=dict(DEPLOYMENT),
    ).to_dict()


def measure(artifact, workload: Workload, threads: int, repeats: int = 5) -> Measurement:
    """Measure a GGUF in a fresh subprocess (clean peak RSS); see ``measure_here`` for the protocol."""
    path = _path(artifact)
    cmd = [sys.executable, "-m", "targets.llamacpp", "measure", path, "--threads", str(threads),
           "--prompt", str(workload.prompt_tokens), "--gen", str(workload.gen_tokens),
           "--batch", str(workload.batch), "--repeats", str(repeats)]  # fmt: skip
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LlamaCppError(f"measuring {path} failed: {err}")
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    d.pop("tokens_per_s", None)
    return Measurement(**d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m targets.llamacpp", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="measure a GGUF and print a JSON Measurement")
    m.add_argument("gguf")
    m.add_argument("--threads", type=int, default=os.cpu_count())
    m.add_argument("--prompt", type=int, default=Workload.prompt_tokens)
    m.add_argument("--gen", type=int, default=Workload.gen_tokens)
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    try:
        res = measure_here(_path(a.gguf), Workload(a.prompt, a.gen, a.batch), a.threads, a.repeats)
    except LlamaCppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
