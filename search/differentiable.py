"""Differentiable joint architecture x weight-format search (DNAS; METHODS.md section C, arXiv 2606.04063).

Every variable of the ``SearchSpace`` gets logits alpha and probabilities p = softmax(alpha / tau) (Gumbel
noise optional, tau annealed). The relaxed supernet computes, over the frozen importance-sorted base:

* widths by weight entanglement: one shared tensor, soft binary masks over importance-sorted prefixes
  (MLP channels before ``down_proj``; query heads before ``o_proj``, a head kept when its KV group and
  its place in the group are both kept); with a one-hot p the mask is exactly the sub-network's slice;
* depth by a gate per block: the block of importance rank r is kept with probability
  sum_{k > r} p_depth(k), and its output mixes "keep" and "skip";
* formats per linear as W + sum_f p_f dW_f with dW_f = fake_quantize(W, f) - W precomputed once
  (W is frozen, so Q_f(W) is a constant: the mixture's gradient in p is exact and no straight-through
  estimator is needed; one copy of dW per format, released as soon as a format decision freezes);
* hidden size (only when the space offers more than one) by masking the residual stream and mixing
  RMSNorms over each prefix.

Loss = KL(base || relaxed) on calibration tokens (top-k teacher distribution plus a tail bucket)
+ lambda_lat * E_p[latency] / base latency + lambda_par * relu(E_p[params] - budget) / base params. The
expectations are exact: the cost model is additive over blocks and, inside a block, over its attention
part (heads x attention format) and MLP part (width x MLP format), so tables of those joint choices
(read from ``problem.cost_of`` one block part at a time) give E_p[cost] as a multilinear form. Only
alpha is trained (Adam). A decision whose normalized entropy falls below a threshold is frozen to its
argmax and its losing branches are no longer computed. Each run returns its argmax choice vector;
a sweep of lambda values (or, under a latency budget, lambda driven to meet it) gives a front.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from rich.progress import Progress
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from search.space import FORMAT_SHARE, is_format_var
from subnet.arch import ATTN_LINEARS, MLP_LINEARS
from subnet.extract import head_rows
from subnet.quant import fake_quantize
from subnet.supernet import _bias, _compact, _rms_norm, _take

LAYER_KINDS = ("attn", "mlp", "attn_format", "mlp_format")


class DifferentiableSearchError(ValueError):
    pass


@dataclass
class DiffConfig:
    """Settings of the differentiable search (defaults: ~3 runs of a few minutes each on SmolLM2, 2 cores)."""

    steps: int = 40  # gradient steps per run
    batch: int = 2  # calibration chunks per step
    seq_len: int = 128  # calibration blocks are cut into chunks of this many tokens
    lr: float = 0.1  # Adam on the logits
    tau_start: float = 1.0
    tau_end: float = 0.1  # annealed geometrically
    gumbel: bool = False  # add Gumbel noise to the logits in the loss forward
    init_bias: float = 2.0  # logit ramp favouring the first (largest / widest) choice; 0 = uniform
    lambdas: tuple[float, ...] = (0.1, 0.5, 2.0)  # latency weights swept when there is no latency budget
    budget_fractions: tuple[float, ...] = (1.0, 0.9)  # targets (x budget) when there is a latency budget
    lambda_init: float = 0.5  # start of lambda when it is driven to a budget
    dual_lr: float = 2.0  # lambda <- lambda * exp(dual_lr * (E[lat] / target - 1)) per step, >= lambda_init
    lambda_param: float = 10.0
    param_budget: float | None = None  # parameters; None = problem.param_budget if it has one
    freeze_entropy: float = 0.05  # normalized entropy H / log K below which a decision is fixed
    snapshots: int = 2  # extra argmax candidates per run, taken in the second half of the run
    teacher_topk: int = 64
    delta_dtype: str = "float32"  # storage of the quantization errors dW ("bfloat16" halves memory)
    latency_key: str = "decode_ms"


# ---- variables ------------------------------------------------------------------------------------

def layer_vars(space) -> dict[tuple[str, int], int]:
    """(kind, base layer) -> variable index, for kinds attn, mlp, attn_format, mlp_format."""
    index = {v.name: i for i, v in enumerate(space.vars)}
    out = {}
    for layer in range(space.arch.num_layers):
        for kind in LAYER_KINDS:
            out[(kind, layer)] = index[kind] if kind in index else index[f"{kind}.{layer}"]
    return out


def _global_var(space, name: str) -> int:
    return next(i for i, v in enumerate(space.vars) if v.name == name)


def keep_probabilities(space, p_depth: torch.Tensor) -> torch.Tensor:
    """P(block kept) per base layer: the block of rank r is kept by every depth choice k > r."""
    L = space.arch.num_layers
    choices = space.vars[_global_var(space, "depth")].choices
    if space.layer_rank is None:
        return torch.ones(L, dtype=p_depth.dtype)
    rank = torch.empty(L, dtype=torch.long)
    rank[torch.tensor(space.layer_rank)] = torch.arange(L)
    kept = torch.tensor([[1.0 if r < k else 0.0 for r in rank.tolist()] for k in choices], dtype=p_depth.dtype)
    return p_depth @ kept


# ---- expected costs -------------------------------------------------------------------------------

@dataclass
class CostTables:
    """Exact E_p[cost] tables (one metric column each), per hidden choice.

    cost(x) = const_h + emb_h[e] + sum_l keep_l * (block_h[l] + attn_h[l][a, af] + mlp_h[l][m, mf]);
    layers that every depth choice keeps are folded into const_h.
    """

    metrics: list[str]
    const: torch.Tensor  # [H, M]
    emb: torch.Tensor  # [H, E, M]
    block: torch.Tensor  # [H, L, M] (0 for layers always kept)
    attn: list[list[torch.Tensor]]  # [H][L] -> [A, AF, M]
    mlp: list[list[torch.Tensor]]  # [H][L] -> [W, WF, M]

    def expected(self, space, probs: list[torch.Tensor]) -> torch.Tensor:
        """E_p[cost] per metric under independent per-variable probabilities ``probs``."""
        lv = layer_vars(space)
        keep = keep_probabilities(space, probs[_global_var(space, "depth")])
        p_h, p_e = probs[_global_var(space, "hidden")], probs[_global_var(space, "embed_format")]
        total = 0.0
        for h in range(len(self.attn)):
            c = self.const[h] + p_e @ self.emb[h] + keep @ self.block[h]
            for layer in range(space.arch.num_layers):
                pa, paf = probs[lv[("attn", layer)]], probs[lv[("attn_format", layer)]]
                pm, pmf = probs[lv[("mlp", layer)]], probs[lv[("mlp_format", layer)]]
                part = torch.einsum("a,b,abk->k", pa, paf, self.attn[h][layer])
                part = part + torch.einsum("a,b,abk->k", pm, pmf, self.mlp[h][layer])
                c = c + keep[layer] * part
            total = total + p_h[h] * c
        return total


def one_hot(space, x) -> list[torch.Tensor]:
    return [F.one_hot(torch.tensor(int(xi)), v.size).to(torch.float64) for v, xi in zip(space.vars, x)]


def build_cost_tables(space, cost_fn, metrics: list[str]) -> CostTables:
    """Tables from ``cost_fn(spec) -> list[float]`` (one value per metric), one block part at a time."""
    L = space.arch.num_layers
    lv = layer_vars(space)
    iv = {n: _global_var(space, n) for n in ("depth", "hidden", "embed_format")}
    depth_choices = space.vars[iv["depth"]].choices
    always = set(space.layer_rank[: min(depth_choices)]) if space.layer_rank is not None else set(range(L))

    def f(spec):
        return torch.tensor([float(v) for v in cost_fn(spec.validate())], dtype=torch.float64)

    const, emb, block, attn, mlp = [], [], [], [], []
    for h in range(space.vars[iv["hidden"]].size):
        x = [0] * space.n_var
        x[iv["hidden"]] = h
        x[iv["depth"]] = depth_choices.index(max(depth_choices))
        base = space.decode(x)
        c0 = f(base)
        emb.append(torch.stack([f(replace(base, embed_format=e, lm_head_format=e)) - c0
                                for e in space.vars[iv["embed_format"]].choices]))  # fmt: skip
        blk = torch.zeros(L, len(c0), dtype=torch.float64)
        at, ml = [None] * L, [None] * L
        for pos, ly in enumerate(base.layers):
            i = ly.index
            if i not in always and len(base.layers) > 1:
                blk[i] = c0 - f(replace(base, layers=base.layers[:pos] + base.layers[pos + 1 :]))

            def with_layer(new):
                return f(replace(base, layers=base.layers[:pos] + [new] + base.layers[pos + 1 :])) - c0

            a_var, af_var = space.vars[lv[("attn", i)]], space.vars[lv[("attn_format", i)]]
            m_var, mf_var = space.vars[lv[("mlp", i)]], space.vars[lv[("mlp_format", i)]]
            at[i] = torch.stack([torch.stack([
                with_layer(replace(ly, kv_heads=kv, heads=kv * g, formats=ly.formats | {n: af for n in ATTN_LINEARS}))
                for af in af_var.choices]) for kv, g in a_var.choices])  # fmt: skip
            ml[i] = torch.stack([torch.stack([
                with_layer(replace(ly, mlp=m, formats=ly.formats | {n: mf for n in MLP_LINEARS}))
                for mf in mf_var.choices]) for m in m_var.choices])  # fmt: skip
        # a layer outside the largest depth is never kept: zero tables
        zero_a = torch.zeros(space.vars[lv[("attn", 0)]].size, space.vars[lv[("attn_format", 0)]].size, len(c0))
        zero_m = torch.zeros(space.vars[lv[("mlp", 0)]].size, space.vars[lv[("mlp_format", 0)]].size, len(c0))
        at = [t if t is not None else zero_a.double() for t in at]
        ml = [t if t is not None else zero_m.double() for t in ml]
        # c0 holds each kept layer's base-choice cost; the block column holds it for droppable layers
        const.append(c0 - blk.sum(0))
        block.append(blk)
        attn.append(at)
        mlp.append(ml)
    return CostTables(metrics, torch.stack(const), torch.stack(emb), torch.stack(block), attn, mlp)


# ---- relaxed supernet -----------------------------------------------------------------------------

class RelaxedSupernet:
    """The base model as a relaxed joint supernet: logits under per-variable probabilities.

    ``probs[i]`` is a probability vector over ``space.vars[i].choices``; a variable listed in
    ``frozen`` (index -> choice) is computed as that choice alone (slices, no masks, one format).
    The model's weights are only read. Quantization errors are computed lazily and kept per
    (linear, format) until ``release`` drops the formats a frozen decision lost.
    """

    def __init__(self, model, space, delta_dtype: torch.dtype = torch.float32):
        self.model, self.space, self.arch = model, space, space.arch
        self.eps = model.config.rms_norm_eps
        self.delta_dtype = delta_dtype
        self.lv = layer_vars(space)
        self.iv = {n: _global_var(space, n) for n in ("depth", "hidden", "embed_format")}
        self.deltas: dict[tuple, torch.Tensor | None] = {}
        self.rank = None
        if space.layer_rank is not None:
            self.rank = {b: r for r, b in enumerate(space.layer_rank)}

    # -- quantization errors
    def _delta(self, key: tuple, weight: torch.Tensor, fmt: str) -> torch.Tensor | None:
        k = key + (fmt,)
        if k not in self.deltas:
            w = weight.detach().float()
            q = fake_quantize(w, fmt)
            self.deltas[k] = None if torch.equal(q, w) else (q - w).to(self.delta_dtype)
        return self.deltas[k]

    def release(self, var: int, keep: str) -> None:
        """Drop the quantization errors of every format but ``keep`` for the linears ``var`` decides."""
        name = self.space.vars[var].name.split(".")[0]
        layers = {i for (kind, i), v in self.lv.items() if v == var}
        linears = {"attn_format": ATTN_LINEARS, "mlp_format": MLP_LINEARS}.get(name)
        for k in list(self.deltas):
            if name == "embed_format" and k[0] in ("embed", "lm_head") and k[-1] != keep:
                del self.deltas[k]
            elif linears and k[0] in layers and k[1] in linears and k[-1] != keep:
                del self.deltas[k]

    def _mixed(self, key, weight, rows, cols, fmt_choices, choice) -> torch.Tensor:
        """The (rows, cols) slice of sum_f p_f Q_f(W); ``choice`` is a format name or a prob vector."""
        w = _take(_take(weight.detach(), rows, 0), cols, 1)
        if isinstance(choice, str):
            d = self._delta(key, weight, choice)
            return w if d is None else w + _take(_take(d, rows, 0), cols, 1).float()
        out = w
        for fmt, p in zip(fmt_choices, choice):
            d = self._delta(key, weight, fmt)
            if d is not None:
                out = out + p * _take(_take(d, rows, 0), cols, 1).float()
        return out

    def _choice(self, var: int, probs, frozen):
        """A frozen variable's choice value, else its probability vector."""
        if var in frozen:
            return self.space.vars[var].choices[frozen[var]]
        return probs[var]

    # -- forward
    def _norm(self, x, weight, hid, hmask):
        if hmask is None:
            return _rms_norm(x, _take(weight.detach(), hid, 0), self.eps)
        sizes, p = hmask
        cs = x.float().pow(2).cumsum(-1)
        E = x.shape[-1]
        scale = 0.0
        for h, ph in zip(sizes, p):
            r = torch.rsqrt(cs[..., h - 1 : h] / h + self.eps)
            scale = scale + ph * r * (torch.arange(E) < h).to(x.dtype)
        return weight.detach() * (x * scale)

    def hidden_states(self, ids: torch.Tensor, probs, frozen: dict[int, int]) -> torch.Tensor:
        """Final-norm hidden states [batch, seq, hidden] of the relaxed supernet."""
        m, arch, space = self.model.model, self.arch, self.space
        hd, G = arch.head_dim, arch.group_size
        hid, hmask, res_mask = self._hidden_plan(probs, frozen)
        emb = self._embedding(probs, frozen, hid)
        x = F.embedding(ids, emb)
        if res_mask is not None:
            x = x * res_mask
        bsz, seq = ids.shape
        pos = torch.arange(seq).unsqueeze(0).expand(bsz, -1)
        cos, sin = m.rotary_emb(x, pos)
        keep = self._keep(probs, frozen)
        for i, layer in enumerate(m.layers):
            if isinstance(keep[i], float) and keep[i] == 0.0:
                continue
            att, mlp = layer.self_attn, layer.mlp
            af_var, mf_var = self.lv[("attn_format", i)], self.lv[("mlp_format", i)]
            af, mf = self._choice(af_var, probs, frozen), self._choice(mf_var, probs, frozen)
            af_choices, mf_choices = space.vars[af_var].choices, space.vars[mf_var].choices
            # attention: frozen -> slice heads; else all heads and a soft mask over query heads
            a = self._choice(self.lv[("attn", i)], probs, frozen)
            if isinstance(a, tuple):
                kv, g = a
                q_rows = _compact(head_rows([j * G + h for j in range(kv) for h in range(g)], hd))
                kv_rows, nq, nkv, qmask = kv * hd, kv * g, kv, None
            else:
                q_rows, kv_rows, nq, nkv = None, None, arch.num_heads, arch.num_kv_heads
                choices = space.vars[self.lv[("attn", i)]].choices
                qmask = sum(pa * self._head_mask(kv, g) for (kv, g), pa in zip(choices, a))

            def lin(inp, mod, name, rows, cols, choices, fmt):
                return F.linear(inp, self._mixed((i, name), mod.weight, rows, cols, choices, fmt), _bias(mod, rows))

            h = self._norm(x, layer.input_layernorm.weight, hid, hmask)
            q = lin(h, att.q_proj, "q_proj", q_rows, hid, af_choices, af)
            k = lin(h, att.k_proj, "k_proj", kv_rows, hid, af_choices, af)
            v = lin(h, att.v_proj, "v_proj", kv_rows, hid, af_choices, af)
            q = q.view(bsz, seq, nq, hd).transpose(1, 2)
            k = k.view(bsz, seq, nkv, hd).transpose(1, 2)
            v = v.view(bsz, seq, nkv, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nq != nkv)
            if qmask is not None:
                o = o * qmask.view(1, nq, 1, 1)
            o = o.transpose(1, 2).reshape(bsz, seq, nq * hd)
            attn_out = lin(o, att.o_proj, "o_proj", hid, q_rows, af_choices, af)
            if res_mask is not None:
                attn_out = attn_out * res_mask
            y = x + attn_out
            # MLP: frozen -> prefix slice; else all channels and a soft channel mask
            w = self._choice(self.lv[("mlp", i)], probs, frozen)
            rows = w if isinstance(w, int) else None
            h = self._norm(y, layer.post_attention_layernorm.weight, hid, hmask)
            z = mlp.act_fn(lin(h, mlp.gate_proj, "gate_proj", rows, hid, mf_choices, mf))
            z = z * lin(h, mlp.up_proj, "up_proj", rows, hid, mf_choices, mf)
            if rows is None:
                width = torch.arange(arch.intermediate_size)
                z = z * sum(pw * (width < c).float() for c, pw in zip(space.vars[self.lv[("mlp", i)]].choices, w))
            mlp_out = lin(z, mlp.down_proj, "down_proj", hid, rows, mf_choices, mf)
            if res_mask is not None:
                mlp_out = mlp_out * res_mask
            x = y + mlp_out if isinstance(keep[i], float) else x + keep[i] * (attn_out + mlp_out)
        return self._norm(x, m.norm.weight, hid, hmask)

    def _hidden_plan(self, probs, frozen):
        """(prefix length, None, None) for a decided hidden size, else (None, (sizes, p), residual mask)."""
        hv = self.space.vars[self.iv["hidden"]]
        if self.iv["hidden"] in frozen or hv.size == 1:
            return _compact(torch.arange(hv.choices[frozen.get(self.iv["hidden"], 0)])), None, None
        p = probs[self.iv["hidden"]]
        mask = sum(ph * (torch.arange(self.arch.hidden_size) < h).float() for h, ph in zip(hv.choices, p))
        return None, (hv.choices, p), mask

    def _head_mask(self, kv: int, g: int) -> torch.Tensor:
        G = self.arch.group_size
        return torch.tensor([1.0 if j < kv and h < g else 0.0 for j in range(self.arch.num_kv_heads) for h in range(G)])

    def _keep(self, probs, frozen) -> list:
        """Per base layer: 1.0 / 0.0 when decided, else a differentiable keep probability."""
        dv = self.iv["depth"]
        L = self.arch.num_layers
        if self.rank is None:
            return [1.0] * L
        choices = self.space.vars[dv].choices
        if dv in frozen:
            k = choices[frozen[dv]]
            return [1.0 if self.rank[i] < k else 0.0 for i in range(L)]
        keep = keep_probabilities(self.space, probs[dv])
        lo = min(choices)
        return [1.0 if self.rank[i] < lo else keep[i] for i in range(L)]

    def _embedding(self, probs, frozen, hid) -> torch.Tensor:
        ev = self.iv["embed_format"]
        return self._mixed(("embed",), self.model.model.embed_tokens.weight, None, hid,
                           self.space.vars[ev].choices, self._choice(ev, probs, frozen))  # fmt: skip

    def _lm_head(self, probs, frozen, hid) -> torch.Tensor:
        if self.arch.tie_word_embeddings:
            return self._embedding(probs, frozen, hid)
        ev = self.iv["embed_format"]
        return self._mixed(("lm_head",), self.model.lm_head.weight, None, hid,
                           self.space.vars[ev].choices, self._choice(ev, probs, frozen))  # fmt: skip

    def logits(self, ids: torch.Tensor, probs, frozen: dict[int, int] | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] of the relaxed supernet."""
        frozen = frozen or {}
        hid = self._hidden_plan(probs, frozen)[0]
        return F.linear(self.hidden_states(ids, probs, frozen), self._lm_head(probs, frozen, hid))


# ---- loss pieces ----------------------------------------------------------------------------------

@torch.inference_mode()
def teacher_topk(model, chunks: torch.Tensor, k: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities and token ids of the base model on every chunk: ([n, seq, k], [n, seq, k])."""
    vals, idx = [], []
    for s in range(0, chunks.shape[0], batch):
        lp = torch.log_softmax(model(chunks[s : s + batch]).logits.float(), -1)
        v, i = lp.topk(k, dim=-1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def topk_kl(logits: torch.Tensor, t_vals: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over the teacher's top-k tokens plus one tail bucket."""
    lp = torch.log_softmax(logits.float(), -1)
    s_top = lp.gather(-1, t_idx)
    pt = t_vals.exp()
    t_tail = (1 - pt.sum(-1)).clamp_min(1e-8)
    s_tail = (1 - s_top.exp().sum(-1)).clamp_min(1e-8)
    kl = (pt * (t_vals - s_top)).sum(-1) + t_tail * (t_tail.log() - s_tail.log())
    return kl.mean()


def _entropy(p: torch.Tensor) -> float:
    if p.numel() < 2:
        return 0.0
    return float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(p.numel()))


# ---- the search -----------------------------------------------------------------------------------

@dataclass
class RunResult:
    """One relaxed optimization: its final argmax, snapshots and trace."""

    target: str  # "lambda=..." or "budget=... ms"
    x: list[int]
    snapshots: list[list[int]]
    expected_latency_ms: float
    predicted_latency_ms: float  # of the argmax, from problem.cost_of
    lam: float
    frozen_at: dict[str, int] = field(default_factory=dict)  # variable -> step it was frozen
    trace: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class DiffResult:
    candidates: list[list[int]]
    runs: list[RunResult]
    base_latency_ms: float
    table_seconds: float
    teacher_seconds: float
    peak_rss_mb: float


def _chunks(blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    n, s = blocks.shape
    if s <= seq_len:
        return blocks
    per = s // seq_len
    return blocks[:, : per * seq_len].reshape(n * per, seq_len)


def _init_logits(space, bias: float) -> list[torch.Tensor]:
    out = []
    for v in space.vars:
        ramp = torch.linspace(0.0, -bias, v.size, dtype=torch.float64) if v.size > 1 else torch.zeros(1, dtype=torch.float64)
        out.append(ramp.clone().requires_grad_(True))
    return out


def _gumbel(shape, gen) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp(1e-10, 1 - 1e-10)
    return -torch.log(-torch.log(u))


def _run(problem, net, tables, chunks, teacher, cfg, seed, lam, target_ms, base, budgets, bar, label) -> RunResult:
    space = problem.space
    gen = torch.Generator().manual_seed(seed)
    alphas = _init_logits(space, cfg.init_bias)
    opt = torch.optim.Adam(alphas, lr=cfg.lr)
    # a format share is not relaxed: every block is priced and mixed at its own chosen formats (share 1.0)
    frozen = {i: 0 for i, v in enumerate(space.vars) if v.size == 1 or v.name == FORMAT_SHARE}
    frozen_at: dict[str, int] = {}
    order = torch.randperm(chunks.shape[0], generator=gen)
    snaps, trace = [], []
    snap_steps = set()
    if cfg.snapshots > 0 and cfg.steps > 1:
        snap_steps = {int(round(cfg.steps / 2 + j * (cfg.steps / 2) / (cfg.snapshots + 1))) for j in range(1, cfg.snapshots + 1)}
    task = bar.add_task(label, total=cfg.steps) if bar is not None else None
    t0 = time.perf_counter()
    tau = cfg.tau_start
    lat = tables.expected(space, [F.one_hot(torch.tensor(c), v.size).double() for v, c in
                                  zip(space.vars, _argmax(alphas, frozen))])[0]  # fmt: skip
    for step in range(cfg.steps):
        if len(frozen) == space.n_var:  # every decision made: nothing left to learn
            break
        tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(cfg.steps - 1, 1))
        probs, noisy = [], []
        for i, a in enumerate(alphas):
            if i in frozen:
                p = F.one_hot(torch.tensor(frozen[i]), space.vars[i].size).double()
                probs.append(p)
                noisy.append(p)
                continue
            probs.append(torch.softmax(a / tau, 0))
            noise = _gumbel(a.shape, gen) if cfg.gumbel else 0.0
            noisy.append(torch.softmax((a + noise) / tau, 0) if cfg.gumbel else probs[-1])
        pos = [int(order[(step * cfg.batch + j) % len(order)]) for j in range(cfg.batch)]
        ids = chunks[pos]
        logits = net.logits(ids, [p.float() for p in noisy], frozen)
        kd = topk_kl(logits[:, :-1], teacher[0][pos][:, :-1], teacher[1][pos][:, :-1])
        exp = tables.expected(space, probs)
        lat = exp[0]
        if target_ms is None:
            loss = kd + lam * lat / base[0]
        else:  # constrained: a hinge on the target, lambda raised while it is exceeded
            loss = kd + lam * torch.relu(lat - target_ms) / base[0]
        for col, budget in budgets:
            loss = loss + cfg.lambda_param * torch.relu(exp[col] - budget) / base[col]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if target_ms is not None:
            ratio = float(lat.detach()) / target_ms - 1
            lam = float(min(1e3, max(cfg.lambda_init, lam * math.exp(cfg.dual_lr * ratio))))
        for i, p in enumerate(probs):
            if i not in frozen and _entropy(p.detach()) < cfg.freeze_entropy:
                frozen[i] = int(p.argmax())
                frozen_at[space.vars[i].name] = step
                if is_format_var(space.vars[i]):
                    net.release(i, space.vars[i].choices[frozen[i]])
        x = _argmax(alphas, frozen)
        if step in snap_steps:
            snaps.append(x)
        trace.append({"step": step, "loss": float(loss.detach()), "kl": float(kd.detach()), "expected_ms": float(lat.detach()), "lambda": lam,
                      "tau": tau, "frozen": len(frozen)})  # fmt: skip
        if bar is not None:
            bar.update(task, advance=1, description=f"{label} loss {float(loss.detach()):.3f} "
                                                    f"kl {float(kd.detach()):.3f} E[lat] {float(lat.detach()):.2f} ms frozen {len(frozen)}/{space.n_var}")  # fmt: skip
    x = _argmax(alphas, frozen)
    pred = float(problem.cost_of(space.decode(x))[cfg.latency_key])
    return RunResult(label, x, snaps, float(lat.detach()), pred, lam, frozen_at, trace, time.perf_counter() - t0)


def _argmax(alphas, frozen) -> list[int]:
    return [frozen[i] if i in frozen else int(a.detach().argmax()) for i, a in enumerate(alphas)]


def run_differentiable(problem, seed: int = 0, config: DiffConfig | None = None, progress=None) -> DiffResult:
    """All runs of the differentiable search (a lambda sweep, or lambda driven to latency targets)."""
    cfg = config or DiffConfig()
    space = problem.space
    if cfg.steps < 1 or cfg.batch < 1:
        raise DifferentiableSearchError(f"steps and batch must be >= 1 (got {cfg.steps}, {cfg.batch})")
    blocks = problem.calib_blocks
    if blocks is None or blocks.dim() != 2 or blocks.shape[1] < 2:
        raise DifferentiableSearchError("problem.calib_blocks must be a [n, seq] LongTensor of calibration tokens (seq >= 2)")
    torch.manual_seed(seed)
    param_budget = cfg.param_budget if cfg.param_budget is not None else getattr(problem, "param_budget", None)
    key = cfg.latency_key

    limits = {"params": param_budget}
    b = getattr(problem, "budgets", None)
    for name in ("memory_mb", "size_mb"):  # cost_of keys that a budget may bound
        limits[name] = getattr(b, name, None)
    metrics = [key] + [n for n, v in limits.items() if v is not None]

    def cost_fn(spec):
        cost = problem.cost_of(spec)
        return [spec.num_params() if n == "params" else cost[n] for n in metrics]

    t0 = time.perf_counter()
    tables = build_cost_tables(space, cost_fn, metrics)
    table_s = time.perf_counter() - t0
    base = cost_fn(space.decode(space.largest()))
    budgets = [(col, float(limits[n])) for col, n in enumerate(metrics) if col > 0]
    t0 = time.perf_counter()
    chunks = _chunks(blocks, cfg.seq_len)
    teacher = teacher_topk(problem.supernet.model, chunks, min(cfg.teacher_topk, space.arch.vocab_size))
    teacher_s = time.perf_counter() - t0
    net = RelaxedSupernet(problem.supernet.model, space, getattr(torch, cfg.delta_dtype))
    limit = getattr(problem, "latency_budget_ms", None)
    if limit is not None:
        settings = [(cfg.lambda_init, limit * f, f"budget={limit * f:.2f}ms") for f in cfg.budget_fractions]
    else:
        settings = [(lam, None, f"lambda={lam:g}") for lam in cfg.lambdas]
    runs = []
    own = progress is None
    bar = Progress(transient=True) if own else progress
    try:
        if own:
            bar.start()
        for lam, target, label in settings:
            net.deltas.clear()  # a fresh run needs every format's error again
            runs.append(_run(problem, net, tables, chunks, teacher, cfg, seed, lam, target, base, budgets, bar, label))
    finally:
        if own:
            bar.stop()
    cands: list[list[int]] = []
    for r in runs:
        for x in [r.x] + r.snapshots:
            if x not in cands:
                cands.append(x)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return DiffResult(cands, runs, float(base[0]), table_s, teacher_s, rss)


def differentiable_search(problem, budget: int, seed: int, progress=None, config: DiffConfig | None = None) -> list[list[int]]:
    """Candidate choice vectors (argmax of each run, then snapshots), at most ``budget`` of them.

    Gradient steps are not evaluations; the orchestrator evaluates the returned vectors for real.
    """
    if budget < 1:
        raise DifferentiableSearchError(f"budget must be >= 1 evaluation (got {budget})")
    result = run_differentiable(problem, seed, config, progress)
    finals = [r.x for r in result.runs]
    ordered = [x for x in dict.fromkeys(map(tuple, finals))] + [tuple(x) for x in result.candidates]
    return [list(x) for x in dict.fromkeys(ordered)][:budget]
