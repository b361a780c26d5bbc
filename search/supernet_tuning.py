"""Supernet LoRA tuning (InstaTune / LoNAS style): adapt the shared weights so sub-networks rank better.

Every base linear of an (importance-sorted) model gets a LoRA delta through
``torch.nn.utils.parametrize``: ``linear.weight`` becomes ``W + scale * B @ A`` and stays a plain,
differentiable tensor, so the ``Supernet`` view (which slices ``module.weight``) computes any
sub-network on the adapted weights; a sub-network sees the slice ``W[r, c] + scale * B[r] @ A[:, c]``,
exactly LoNAS's sliced adapters. Training follows the sandwich rule with in-place distillation: each
step backpropagates the largest network on the LM loss, then the smallest and ``n_random`` sampled
sub-networks on the KL to the largest network's (detached) distribution.

The adapter is saved in peft's layout (``adapter_model.safetensors`` + ``adapter_config.json``) with a
fingerprint of the sorted base it was trained on; ``load_supernet_adapter`` checks the fingerprint and
merges the adapter into the base before search (`packager tune-supernet` writes one, `packager search
--supernet-adapter` merges it).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
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
from torch import nn
from torch.nn.utils import parametrize

from search.recovery import RecoveryError, calibration_windows, kd_loss
from subnet.arch import ATTN_LINEARS, LINEARS, arch_of
from subnet.spec import SubnetSpec
from subnet.supernet import Supernet
from targets.backend import atomic_output

ADAPTER_FILE = "adapter_model.safetensors"


class SupernetTuningError(RecoveryError):
    """A supernet adapter that cannot be trained or applied, with the reason and the fix in one line."""


@dataclass
class SupernetTuningConfig:
    """Hyper-parameters of sandwich-rule supernet tuning."""

    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = LINEARS
    lr: float = 2e-4
    steps: int = 100
    batch_size: int = 2
    seq_len: int = 256
    n_random: int = 2  # random sub-networks per step, besides the largest and the smallest
    temperature: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0


class LoraDelta(nn.Module):
    """A parametrization ``W -> W + scale * B @ A`` (B starts at zero, so the model starts unchanged)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)  # peft's default init
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scale


def _linears(model, targets) -> dict[str, nn.Linear]:
    """peft-style module names (``model.layers.i.self_attn.q_proj``) of the targeted base linears."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for name in targets:
            part = "self_attn" if name in ATTN_LINEARS else "mlp"
            out[f"model.layers.{i}.{part}.{name}"] = getattr(getattr(layer, part), name)
    return out


def base_fingerprint(model) -> str:
    """A short hash of the first row of every linear and the embedding: changes when units are permuted."""
    h = hashlib.sha256()
    h.update(model.model.embed_tokens.weight[0].detach().float().numpy().tobytes())
    for name, lin in _linears(model, LINEARS).items():
        h.update(name.encode())
        h.update(lin.weight[0].detach().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _spec_source(specs, smallest: SubnetSpec | None):
    """(draw(rng) -> spec, smallest spec) from a spec list, a SearchSpace or a sampling function."""
    if hasattr(specs, "decode") and hasattr(specs, "smallest") and hasattr(specs, "sizes"):  # a SearchSpace
        space = specs
        return (lambda rng: space.decode([rng.randrange(n) for n in space.sizes])), (
            smallest or space.decode(space.smallest())
        )
    if callable(specs):
        if smallest is None:
            raise SupernetTuningError("pass smallest= (the smallest sub-network) with a sampling function")
        return specs, smallest
    pool = list(specs)
    if not pool:
        raise SupernetTuningError("no sub-network specs to sample: pass a non-empty list, a SearchSpace or a function")
    return (lambda rng: rng.choice(pool)), (smallest or min(pool, key=lambda s: s.num_params()))


def _logits(net: Supernet, ids: torch.Tensor) -> torch.Tensor:
    """Supernet logits with autograd (Supernet.logits runs under inference_mode)."""
    return F.linear(net.forward_hidden(ids), net.lm_head())


def tune_supernet(
    model,
    specs: Sequence[SubnetSpec] | Callable[[random.Random], SubnetSpec],
    calib_blocks: torch.Tensor,
    config: SupernetTuningConfig | None = None,
    out_dir=None,
    smallest: SubnetSpec | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Train a sandwich-rule LoRA adapter on the shared weights of ``model``; return the adapter folder.

    ``specs`` is a list of sub-network specs, a ``search.space.SearchSpace`` or a function drawing one
    spec from a ``random.Random``. ``model`` is left unchanged (the adapter is saved, not merged).
    An existing ``out_dir`` is refused unless ``force``.
    """
    c = config or SupernetTuningConfig()
    if out_dir is None:
        raise SupernetTuningError("tune_supernet needs out_dir, the folder to write the adapter to")
    if Path(out_dir).exists() and not force:
        raise SupernetTuningError(f"{out_dir} already exists: choose another output folder or pass --force")
    draw, small = _spec_source(specs, smallest)
    windows = calibration_windows(calib_blocks, c.seq_len, max(2 * c.batch_size, 2))
    arch = arch_of(model.config)
    largest = SubnetSpec.full(arch)
    rng, gen = random.Random(c.seed), torch.Generator().manual_seed(c.seed)
    torch.manual_seed(c.seed)
    fingerprint = base_fingerprint(model)

    was_grad = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    linears = _linears(model, c.targets)
    deltas = {}
    for name, lin in linears.items():
        deltas[name] = LoraDelta(lin.out_features, lin.in_features, c.rank, c.alpha)
        parametrize.register_parametrization(lin, "weight", deltas[name])
    params = [p for d in deltas.values() for p in d.parameters()]
    opt = torch.optim.AdamW(params, lr=c.lr)
    net = Supernet(model)
    net.simulate_quantization = False  # fake_quantize has no gradient; tune the structure, formats come later
    history = []
    t0 = time.perf_counter()
    try:
        with Progress(TextColumn("supernet tuning"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("full {task.fields[full]:.3f}  sub KD {task.fields[kd]:.4f}"), TimeElapsedColumn(),
                      disable=not progress) as bar:  # fmt: skip
            task = bar.add_task("tune", total=c.steps, full=float("nan"), kd=float("nan"))
            for step in range(1, c.steps + 1):
                ids = windows[torch.randint(windows.shape[0], (c.batch_size,), generator=gen)]
                opt.zero_grad(set_to_none=True)
                teacher = _logits(net.activate(largest), ids)
                full = F.cross_entropy(teacher[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                full.backward()
                teacher = teacher.detach()
                kds = []
                for spec in [small] + [draw(rng) for _ in range(c.n_random)]:
                    loss = kd_loss(_logits(net.activate(spec), ids), teacher, c.temperature)
                    loss.backward()
                    kds.append(loss.item())
                torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
                opt.step()
                history.append({"step": step, "full_ce": full.item(), "sub_kd": sum(kds) / len(kds)})
                bar.update(task, advance=1, full=full.item(), kd=history[-1]["sub_kd"])
        state = {}
        for name, d in deltas.items():
            state[f"base_model.model.{name}.lora_A.weight"] = d.lora_A.detach().clone().contiguous()
            state[f"base_model.model.{name}.lora_B.weight"] = d.lora_B.detach().clone().contiguous()
    finally:
        for lin in linears.values():
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
        for p, g in was_grad.items():
            p.requires_grad_(g)
        net.activate(largest)
    return _save_adapter(Path(out_dir), state, c, fingerprint, history, time.perf_counter() - t0)


def _save_adapter(out_dir: Path, state: dict, c: SupernetTuningConfig, fingerprint: str, history, wall_s) -> Path:
    from peft import LoraConfig
    from safetensors.torch import save_file

    meta = {"packager": "supernet_tuning", "base_fingerprint": fingerprint, "rank": str(c.rank), "alpha": str(c.alpha)}
    with atomic_output(out_dir, force=True) as tmp:
        save_file(state, str(tmp / ADAPTER_FILE), metadata=meta)
        LoraConfig(r=c.rank, lora_alpha=c.alpha, target_modules=list(c.targets), bias="none").save_pretrained(str(tmp))
        (tmp / "tuning.json").write_text(json.dumps({"config": asdict(c), "wall_s": wall_s, "history": history}))
    return out_dir


def tuning_summary(path) -> str:
    """One line on a saved tuning run: steps, wall time, and the losses over its first and last tenth."""
    info = json.loads((Path(path) / "tuning.json").read_text())
    h = info["history"]
    k = max(1, len(h) // 10)

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    return (f"tuned {len(h)} steps in {info['wall_s']:.0f} s: full-model CE {mean('full_ce', h[:k]):.3f} → "
            f"{mean('full_ce', h[-k:]):.3f}, sub-network KD {mean('sub_kd', h[:k]):.4f} → {mean('sub_kd', h[-k:]):.4f} "
            f"(means of the first and last {k} steps)")  # fmt: skip


@torch.no_grad()
def load_supernet_adapter(model, path) -> torch.nn.Module:
    """Merge a tune_supernet adapter into ``model`` in place (W += scale * B @ A) and return it.

    ``model`` must be the same importance-sorted base the adapter was trained on (checked by fingerprint).
    """
    from safetensors import safe_open

    file = Path(path) / ADAPTER_FILE
    if not file.is_file():
        raise SupernetTuningError(f"{file} not found: pass the folder tune_supernet wrote")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if meta.get("packager") != "supernet_tuning":
        raise SupernetTuningError(f"{file} is not a packager supernet adapter (no tuning metadata)")
    found = base_fingerprint(model)
    if meta["base_fingerprint"] != found:
        raise SupernetTuningError(
            f"supernet adapter {path} was tuned on a different base or importance sort (fingerprint "
            f"{meta['base_fingerprint']}, this model {found}): pass the model it was tuned on, or re-tune it on this "
            "one with `packager tune-supernet`"
        )
    scale = float(meta["alpha"]) / float(meta["rank"])
    linears = _linears(model, LINEARS)
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len("base_model.model.") : -len(".lora_A.weight")]
        b = state[key.replace(".lora_A.", ".lora_B.")]
        w = linears[name].weight
        w.add_((b.float() @ a.float()).to(w.dtype) * scale)
    return model
