"""Recovery fine-tuning: LoRA adapters on an extracted sub-network, distilled from its base model.

The student is the extracted sub-network with peft LoRA adapters on every linear of every block; the
teacher is the base model it was cut from. The loss is the forward KL between the teacher's and the
student's next-token distributions at temperature T (times T^2), optionally plus ``ce_weight`` x the
LM cross-entropy. With ``qat`` the student's forward sees the spec's simulated weight formats: each
linear uses fake_quantize(W + BA) with a straight-through estimator, so the adapters learn to
compensate the rounding the runtime will apply (iq4_nl keeps the block scales ggml picks for W, see
``subnet.quant.TrainingRounder``, or those GPTQ rounded W at, ``subnet.gptq``; the result carries
them, the final perplexity is scored at them and the GGUF exporter writes the weights with them).
Training evaluates held-out perplexity every ``eval_every`` steps, keeps the best adapters, stops
early, writes resumable checkpoints, and finally merges the adapters into the weights
(``merge_and_unload``): the result is a plain HF model of the
sub-network's class and shapes, ready for quantization and export.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import time
import types
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from search.evaluate import perplexity
from subnet.arch import LINEARS, linear_of
from subnet.quant import TrainingRounder, fake_quantize, fake_quantize_model, input_quantizer
from subnet.spec import SubnetSpec
from targets.backend import atomic_output

STOP_REASONS = ("converged", "early stop", "diverged", "max steps")
_DTYPE_FORMAT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class RecoveryError(ValueError):
    """A recovery run that cannot start (or resume), with the reason and the fix in one line."""


@dataclass
class RecoveryConfig:
    """Hyper-parameters of a recovery run (defaults measured on SmolLM2 sub-networks, 2 CPU cores)."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = LINEARS
    lr: float = 1e-3  # measured: 60 steps at 2x128 closed 50% of the ppl gap of a 26%-smaller SmolLM2 in 84 s
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    grad_clip: float = 1.0
    seq_len: int = 128
    batch_size: int = 2
    max_steps: int = 200  # ~3 s/step on 2 idle cores for SmolLM2 sub-networks; early stopping ends sooner
    temperature: float = 1.0
    ce_weight: float = 0.0  # alpha of the optional LM cross-entropy term
    qat: bool = False
    eval_every: int = 20
    patience: int = 2  # evaluations without progress before stopping
    # ... or this share of the run's evaluations, if more: a long run is not cut short by the patience of a short one
    patience_share: float = 0.25
    min_improvement: float = 0.002  # relative val-ppl gain below which an evaluation counts as flat
    diverge_factor: float = 3.0  # val ppl above best x this, or mean train loss above the first x this = diverged
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    min_calib_windows: int = 8  # calibration must give at least this many seq_len windows
    eval_batch_size: int = 4
    seed: int = 0

    def check(self) -> RecoveryConfig:
        bad = [k for k in ("rank", "alpha", "seq_len", "batch_size", "max_steps", "eval_every", "checkpoint_every")
               if getattr(self, k) < 1]  # fmt: skip
        if bad:
            raise RecoveryError(f"recovery config: {', '.join(bad)} must be >= 1")
        if self.seq_len < 2:
            raise RecoveryError("recovery config: seq_len must be >= 2 (a window predicts seq_len - 1 tokens)")
        unknown = set(self.targets) - set(LINEARS)
        if unknown:
            raise RecoveryError(f"recovery config: unknown LoRA targets {sorted(unknown)}; choose from {LINEARS}")
        if not self.lr > 0 or self.temperature <= 0:
            raise RecoveryError("recovery config: lr and temperature must be > 0")
        if not 0 <= self.patience_share <= 1:
            raise RecoveryError(f"recovery config: patience_share {self.patience_share} must lie in [0, 1]")
        return self

    @property
    def evaluations_patience(self) -> int:
        """Evaluations without progress that end the run: ``patience``, or ``patience_share`` of the
        run's evaluations when that is more (the default 2 for every run up to 8 evaluations; stop 30
        measured a 600-step run still improving at step 600 that patience 2 would have ended at 160)."""
        return max(self.patience, math.ceil(self.patience_share * self.max_steps / self.eval_every))


@dataclass
class RecoveryResult:
    """The recovered (merged) model and how the run went."""

    model: torch.nn.Module
    ppl_before: float
    ppl_after: float
    best_step: int
    steps_run: int
    wall_s: float
    stopped_reason: str
    history: list[dict] = field(default_factory=list)
    # module name -> the block scales QAT rounded a kept-scale weight at (export it with them)
    block_scales: dict[str, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "history", "block_scales")}


# ---- checks ---------------------------------------------------------------------------------
def base_format(model) -> str:
    """The weight format the base model's float weights are in (f32, f16 or bf16)."""
    return _DTYPE_FORMAT.get(next(model.parameters()).dtype, "f32")


def keeps_whole_base(spec: SubnetSpec) -> bool:
    """True when ``spec`` keeps every layer, head, KV head, MLP channel and hidden channel of its base."""
    b = spec.base
    return (
        len(spec.layers) == b.num_layers
        and spec.hidden_size == b.hidden_size
        and all(ly.heads == b.num_heads and ly.kv_heads == b.num_kv_heads and ly.mlp == b.intermediate_size
                for ly in spec.layers)
    )  # fmt: skip


def nothing_to_recover(spec: SubnetSpec, base_fmt: str, qat: bool) -> str | None:
    """Why recovering ``spec`` would train nothing (the student equals its teacher); None otherwise."""
    if not keeps_whole_base(spec):
        return None
    if spec.formats_used() <= {base_fmt, "f32"}:
        return (f"spec keeps the whole base model at its base format ({base_fmt}): nothing to recover; "
                "recover a pruned spec, or a quantized one with qat=True")  # fmt: skip
    if not qat:
        return ("spec keeps the whole base model and only changes weight formats: without qat the student equals "
                "the teacher, nothing to recover; pass qat=True to recover quantization error")  # fmt: skip
    return None


def check_recoverable(spec: SubnetSpec, base_fmt: str, qat: bool) -> None:
    """Raise RecoveryError when the sub-network equals its teacher (nothing to recover)."""
    why = nothing_to_recover(spec, base_fmt, qat)
    if why:
        raise RecoveryError(why)


def calibration_windows(blocks: torch.Tensor, seq_len: int, need: int) -> torch.Tensor:
    """Cut calibration blocks [n, L] into non-overlapping windows [m, seq_len]; error if fewer than ``need``."""
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype != torch.long:
        raise RecoveryError("calibration blocks must be a LongTensor [n_blocks, seq_len] (search.text.token_blocks)")
    per = blocks.shape[1] // seq_len
    windows = blocks[:, : per * seq_len].reshape(-1, seq_len) if per else blocks[:, :0].reshape(0, seq_len)
    if windows.shape[0] < need:
        raise RecoveryError(
            f"too little calibration text: {blocks.numel()} tokens in blocks of {blocks.shape[1]} give "
            f"{windows.shape[0]} windows of {seq_len}; recovery needs at least {need} "
            f"({need * seq_len} tokens): pass more calibration blocks or lower seq_len/min_calib_windows"
        )
    return windows


# ---- losses ---------------------------------------------------------------------------------
def kd_loss(student_logits, teacher_logits, temperature: float = 1.0, labels=None, ce_weight: float = 0.0):
    """T^2 * KL(teacher || student) at temperature T per predicted token (+ ce_weight * LM cross-entropy)."""
    s = student_logits[:, :-1].float().flatten(0, 1)
    t = teacher_logits[:, :-1].float().flatten(0, 1)
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    loss = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2
    if ce_weight and labels is not None:
        loss = loss + ce_weight * F.cross_entropy(s, labels[:, 1:].flatten())
    return loss


# ---- quantization-aware forward -------------------------------------------------------------
def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``q``, the gradient of ``x``."""
    return x + (q - x).detach()


def _qat_forward(self, x, *args, **kwargs):
    """A peft lora.Linear forward on W + scale * B @ A rounded through the spec format (its
    ``TrainingRounder``), with straight-through gradients."""
    base = self.base_layer
    w = base.weight
    for name in self.active_adapters:
        if name in self.lora_A:
            w = w + (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
    w = _ste(w, self._packager_round(w))
    if self._packager_act is not None:  # runtimes that also quantize the input (ORT int8, accuracy_level 4)
        x = _ste(x, self._packager_act(x))
    return F.linear(x, w.to(x.dtype), base.bias)


def _enable_qat(peft_model, spec: SubnetSpec, scales: dict[str, torch.Tensor] | None = None
                ) -> tuple[dict, dict[str, torch.Tensor]]:  # fmt: skip
    """Route every LoRA linear through _qat_forward with its spec format; fake-quantize the (frozen)
    embedding / lm_head in place. Returns the original embedding weights to restore before merging,
    and the block scales the kept-scale linears are rounded at (by module name): ``scales`` where
    given (GPTQ's), else ggml's search on the starting weight."""
    scales = scales or {}
    inner = peft_model.get_base_model()
    names = {id(m): n for n, m in inner.named_modules()}
    saved, kept = {}, {}
    for layer, ly in zip(inner.model.layers, spec.layers):
        for name in LINEARS:
            mod = linear_of(layer, name)
            fmt = ly.formats[name]
            if fmt == "f32":
                continue
            if not hasattr(mod, "lora_A"):  # a linear without an adapter: round its (frozen) weight in place
                saved[mod] = mod.weight.data.clone()
                mod.weight.data.copy_(fake_quantize(mod.weight.data, fmt))
                continue
            mod._packager_fmt, mod._packager_act = fmt, input_quantizer(fmt, 4)
            mod._packager_round = TrainingRounder(mod.base_layer.weight, fmt, scales.get(names[id(mod)]))
            if mod._packager_round.scales is not None:
                kept[names[id(mod)]] = mod._packager_round.scales
            mod.forward = types.MethodType(_qat_forward, mod)
    embed, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    pairs = [(embed, spec.embed_format)]
    if head is not None and head.weight is not embed.weight:
        pairs.append((head, spec.lm_head_format))
    for mod, fmt in pairs:
        if fmt != "f32":
            saved[mod] = mod.weight.data.clone()
            mod.weight.data.copy_(fake_quantize(mod.weight.data, fmt))
    return saved, kept


def _disable_qat(peft_model, saved: dict) -> None:
    for mod in peft_model.get_base_model().modules():
        if hasattr(mod, "_packager_fmt"):
            del mod.forward, mod._packager_fmt, mod._packager_act, mod._packager_round
    for mod, w in saved.items():
        mod.weight.data.copy_(w)


# ---- adapters and checkpoints ---------------------------------------------------------------
def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def _run_key(config: RecoveryConfig, spec: SubnetSpec, windows: torch.Tensor, val_blocks: torch.Tensor,
             block_scales: dict[str, torch.Tensor]) -> str:  # fmt: skip
    """Fingerprint of what a checkpoint may be resumed into (config, spec, data, the scales it starts on);
    the spec's ``meta`` (how it was chosen) does not change what is trained, so it is left out."""
    h = hashlib.sha256(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    h.update(replace(spec, meta={}).to_json(indent=None).encode())
    h.update(windows.numpy().tobytes())
    h.update(val_blocks.numpy().tobytes())
    for name in sorted(block_scales):
        h.update(name.encode() + block_scales[name].numpy().tobytes())
    return h.hexdigest()[:16]


def _checkpoints(out_dir: Path) -> list[Path]:
    found = [p for p in out_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _save_checkpoint(out_dir: Path, keep: int, model, best: dict, state: dict) -> None:
    from safetensors.torch import save_file

    with atomic_output(out_dir / f"checkpoint-{state['step']}", force=True) as tmp:
        save_file(_adapter_state(model), str(tmp / "adapter.safetensors"))
        save_file(best, str(tmp / "best_adapter.safetensors"))
        torch.save(state, tmp / "trainer_state.pt")
    for old in _checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path):
    from safetensors.torch import load_file

    state = torch.load(path / "trainer_state.pt", weights_only=True)
    return load_file(str(path / "adapter.safetensors")), load_file(str(path / "best_adapter.safetensors")), state


def _lr_lambda(config: RecoveryConfig):
    total, floor = config.max_steps, config.min_lr_ratio
    warm = min(config.warmup_steps, max(1, total // 10))  # short runs keep most of their steps at full lr

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return fn


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  val ppl {task.fields[ppl]:.2f} (best {task.fields[best]:.2f})"),
        TimeElapsedColumn(), disable=not enabled, transient=False,
    )  # fmt: skip


# ---- the run --------------------------------------------------------------------------------
def recover(
    base_model,
    sub_model,
    spec: SubnetSpec,
    calib_blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    config: RecoveryConfig | None = None,
    out_dir=None,
    resume: bool = False,
    progress: bool = True,
    block_scales: dict[str, torch.Tensor] | None = None,
) -> RecoveryResult:
    """Recover ``sub_model`` (extracted from ``base_model`` by ``spec``) with LoRA + KD; return it merged.

    ``sub_model`` is not modified (a copy is trained). Checkpoints go to ``out_dir/checkpoint-<step>``
    every ``config.checkpoint_every`` steps; ``resume`` continues from the latest one exactly (same
    data order, optimizer, schedule and RNG). Perplexities are measured on ``val_blocks``, under the
    spec's simulated formats when ``config.qat``. ``block_scales`` (module name -> scales): the scales to
    round ``sub_model``'s kept-scale weights at (GPTQ's, ``subnet.gptq.gptq_round``) instead of ggml's
    search on them; QAT keeps them.
    """
    from peft import LoraConfig, get_peft_model

    config = (config or RecoveryConfig()).check()
    t0 = time.perf_counter()
    if len(sub_model.model.layers) != len(spec.layers):
        raise RecoveryError(
            f"sub_model has {len(sub_model.model.layers)} layers but the spec keeps {len(spec.layers)}: "
            "pass the model extract(base_model, spec) returned"
        )
    check_recoverable(spec, base_format(base_model), config.qat)
    windows = calibration_windows(calib_blocks, config.seq_len, max(config.min_calib_windows, config.batch_size))
    if not isinstance(val_blocks, torch.Tensor) or val_blocks.dim() != 2 or val_blocks.shape[0] < 1:
        raise RecoveryError("val_blocks must be a non-empty LongTensor [n_blocks, seq_len] of held-out text")
    out_dir = Path(out_dir) if out_dir is not None else None
    if resume and out_dir is None:
        raise RecoveryError("resume=True needs the out_dir the interrupted run wrote its checkpoints to")
    block_scales = block_scales or {}
    key = _run_key(config, spec, windows, val_blocks, block_scales)

    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.targets), bias="none")  # fmt: skip
    student = get_peft_model(copy.deepcopy(sub_model), lora)
    teacher = base_model.eval()
    saved_embed, kept_scales = _enable_qat(student, spec, block_scales) if config.qat else ({}, {})
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
    gen = torch.Generator().manual_seed(config.seed)

    def val_ppl() -> float:
        student.eval()
        try:
            return perplexity(student, val_blocks, batch_size=config.eval_batch_size)
        finally:
            student.train()

    state = None
    found = _checkpoints(out_dir) if (resume and out_dir and out_dir.exists()) else []
    if found:
        current, best_adapter, state = _load_checkpoint(found[-1])
        if state["key"] != key:
            raise RecoveryError(
                f"checkpoint {found[-1]} belongs to a different run (config, spec or data changed): "
                "resume with the same inputs, or start fresh in another out_dir"
            )
        _load_adapter_state(student, current)
        t0 -= state.get("wall_s", 0.0)  # the interrupted run's time counts too
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["py_rng"])
    else:
        ppl0 = val_ppl()
        best_adapter = _adapter_state(student)
        state = {
            "key": key, "step": 0, "ppl_before": ppl0, "best_ppl": ppl0, "best_step": 0, "bad": 0, "flat": 0,
            "order": torch.randperm(windows.shape[0], generator=gen), "pos": 0,
            "history": [{"step": 0, "val_ppl": ppl0}], "losses": [],
        }  # fmt: skip

    reason = "max steps"
    student.train()
    with _progress(progress) as bar:
        task = bar.add_task("recovery", total=config.max_steps, completed=state["step"],
                            loss=float("nan"), ppl=state["history"][-1]["val_ppl"], best=state["best_ppl"])  # fmt: skip
        while state["step"] < config.max_steps:
            if state["pos"] + config.batch_size > windows.shape[0]:  # next epoch, fresh order
                state["order"], state["pos"] = torch.randperm(windows.shape[0], generator=gen), 0
            ids = windows[state["order"][state["pos"] : state["pos"] + config.batch_size]]
            state["pos"] += config.batch_size
            with torch.inference_mode():
                t_logits = teacher(input_ids=ids, use_cache=False).logits
            s_logits = student(input_ids=ids, use_cache=False).logits
            loss = kd_loss(s_logits, t_logits.clone(), config.temperature, ids, config.ce_weight)
            state["step"] += 1
            step = state["step"]
            if not torch.isfinite(loss):
                state["history"].append({"step": step, "loss": loss.item()})
                reason = "diverged"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            sched.step()
            state["losses"].append(loss.item())
            bar.update(task, advance=1, loss=state["losses"][-1])
            if step % config.eval_every == 0 or step == config.max_steps:
                ppl = val_ppl()
                mean_loss = sum(state["losses"][-config.eval_every :]) / len(state["losses"][-config.eval_every :])
                state["history"].append({"step": step, "loss": mean_loss, "val_ppl": ppl})
                best = state["best_ppl"]
                loss0 = state["losses"][0]  # the KD gap of the un-adapted sub-network
                if not math.isfinite(ppl) or ppl > best * config.diverge_factor or mean_loss > loss0 * config.diverge_factor:
                    reason = "diverged"
                elif ppl < best:
                    state["flat"] = state["flat"] + 1 if ppl > best * (1 - config.min_improvement) else 0
                    state["bad"] = 0
                    state.update(best_ppl=ppl, best_step=step)
                    best_adapter = _adapter_state(student)
                else:
                    state["bad"] += 1
                bar.update(task, ppl=ppl, best=state["best_ppl"])
                if reason == "diverged":
                    break
                if step < config.max_steps and state["bad"] >= config.evaluations_patience:  # (the last step ends it anyway)
                    reason = "early stop"
                    break
                if step < config.max_steps and state["flat"] >= config.evaluations_patience:
                    reason = "converged"
                    break
            if out_dir is not None and step % config.checkpoint_every == 0:
                state.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(), generator=gen.get_state(),
                             torch_rng=torch.get_rng_state(), py_rng=random.getstate(),
                             wall_s=time.perf_counter() - t0)  # fmt: skip
                _save_checkpoint(out_dir, config.keep_checkpoints, student, best_adapter, state)

    _load_adapter_state(student, best_adapter)
    _disable_qat(student, saved_embed)
    merged = student.merge_and_unload().eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    scored = fake_quantize_model(merged, spec, block_scales=kept_scales) if config.qat else merged
    ppl_after = perplexity(scored, val_blocks, batch_size=config.eval_batch_size)
    return RecoveryResult(
        model=merged,
        ppl_before=state["ppl_before"],
        ppl_after=ppl_after,
        best_step=state["best_step"],
        steps_run=state["step"],
        wall_s=time.perf_counter() - t0,
        stopped_reason=reason,
        history=state["history"],
        block_scales=kept_scales,
    )
