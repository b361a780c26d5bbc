"""The joint architecture x weight-format search space, derived from a base model and a runtime.

A candidate is a vector of integer choices (one per variable), which every strategy shares:
NSGA-II/LINAS/random sample and mutate it, the differentiable search puts a probability on each
choice, and ``decode`` turns it into a SubnetSpec. Depth keeps the top-k blocks of the importance
ranking; widths are prefixes of the importance-sorted units. Grids are aligned to what the formats
need: every format offered can hold every row length the grid can produce.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from subnet.arch import ATTN_LINEARS, MLP_LINEARS, ArchInfo
from subnet.formats import FORMATS, LLAMA_CPP, ONNXRUNTIME, TENSORRT, get_format
from subnet.spec import LayerSpec, SubnetSpec

# Formats offered per runtime by default (each later filtered by what the grid's rows can hold).
DEFAULT_FORMATS = {
    # widest first. iq4_nl (4.5 bits, a non-linear grid in 32-wide blocks) rounds far closer than q4_0
    # and decodes nearly as fast; its block scales are searched once per base weight (subnet.supernet)
    LLAMA_CPP: ["q8_0", "q5_0", "iq4_nl", "q4_0"],
    # "int8" (quantize_dynamic) also quantizes activations per tensor, which SmolLM2's outliers do not
    # survive (top-1 ~0.7 in ORT): offered only when asked for
    ONNXRUNTIME: ["f32", "int8_b32", "int4_b32"],
    TENSORRT: ["f16", "int8", "int4_b128"],
}
DEFAULT_EMBED_FORMATS = {LLAMA_CPP: ["q8_0", "iq4_nl", "q4_0"], ONNXRUNTIME: ["f32"], TENSORRT: ["f16"]}
# finer near 1.0, where the last few (most rounding-sensitive) blocks decide whether a 4-bit model meets the floor
DEFAULT_FORMAT_SHARES = [1.0, 0.95, 0.9, 0.8, 0.6, 0.4]
FORMAT_SHARE = "format_share"  # uniform-mode variable: the share of kept blocks that take the chosen formats


def is_format_var(var) -> bool:
    """Whether a variable picks a weight format (embed_format, attn_format[.i], mlp_format[.i])."""
    return var.name.split(".")[0].endswith("_format")


class SpaceError(ValueError):
    pass


def least_sensitive(quant_rank: list[int] | None, kept: list[int], share: float) -> set[int]:
    """The ``share`` of ``kept`` blocks first in ``quant_rank`` (least sensitive to rounding first; all of
    them at share 1.0): the blocks a format share narrows."""
    if share >= 1.0:
        return set(kept)
    order = [b for b in quant_rank if b in set(kept)]
    return set(order[: int(round(share * len(kept)))])


@dataclass
class SpaceConfig:
    """Choice grids. Empty lists are filled from the base model and runtime by ``SearchSpace``."""

    mode: str = "uniform"  # "uniform": one value for all layers; "hetero": per-layer values
    depth: list[int] = field(default_factory=list)
    kv_heads: list[int] = field(default_factory=list)
    group_heads: list[int] = field(default_factory=list)
    mlp: list[int] = field(default_factory=list)
    hidden: list[int] = field(default_factory=list)
    attn_formats: list[str] = field(default_factory=list)
    mlp_formats: list[str] = field(default_factory=list)
    embed_formats: list[str] = field(default_factory=list)
    # uniform mode with a quantization ranking: the share of kept blocks (least sensitive first) that take
    # the chosen attention / MLP formats, the others keeping the widest ones
    format_shares: list[float] = field(default_factory=list)
    min_depth_fraction: float = 0.7
    mlp_fractions: tuple[float, ...] = (1.0, 0.875, 0.75, 0.625, 0.5)


@dataclass(frozen=True)
class Var:
    name: str
    choices: tuple

    @property
    def size(self) -> int:
        return len(self.choices)


def _align(x: float, step: int, hi: int) -> int:
    return max(step, min(hi, int(round(x / step)) * step))


class SearchSpace:
    """Integer-encoded joint space of (depth, heads, MLP width, hidden size, per-layer formats)."""

    def __init__(self, arch: ArchInfo, runtime: str = LLAMA_CPP, config: SpaceConfig | None = None, layer_rank=None,
                 quant_rank=None):  # fmt: skip
        self.arch, self.runtime = arch, runtime
        c = SpaceConfig(**asdict(config)) if config else SpaceConfig()
        if c.mode not in ("uniform", "hetero"):
            raise SpaceError(f"unknown space mode {c.mode!r}: use 'uniform' or 'hetero'")
        self.layer_rank = list(layer_rank) if layer_rank is not None else None
        self.quant_rank = list(quant_rank) if quant_rank is not None else None
        if not c.format_shares:
            c.format_shares = list(DEFAULT_FORMAT_SHARES) if self.quant_rank and c.mode == "uniform" else [1.0]
        if c.format_shares != [1.0] and (self.quant_rank is None or c.mode != "uniform"):
            raise SpaceError("format shares below 1.0 need uniform mode and a quantization ranking of the blocks "
                             "(search.importance.quantization_rank)")  # fmt: skip
        if c.format_shares[0] != 1.0 or not all(0 < f <= 1 for f in c.format_shares):
            raise SpaceError(f"format shares {c.format_shares} must lie in (0, 1] and start at 1.0")
        L = arch.num_layers
        if not c.depth:
            lo = max(1, int(round(L * c.min_depth_fraction)))
            c.depth = list(range(L, lo - 1, -1)) if self.layer_rank else [L]
        if max(c.depth) < L and self.layer_rank is None:
            raise SpaceError("depth choices below the base depth need an importance ranking of the blocks (sort first)")
        c.kv_heads = c.kv_heads or list(range(arch.num_kv_heads, 0, -1))
        c.group_heads = c.group_heads or [arch.group_size]
        c.hidden = c.hidden or [arch.hidden_size]
        c.attn_formats = c.attn_formats or list(DEFAULT_FORMATS.get(runtime, ["f32"]))
        c.mlp_formats = c.mlp_formats or list(DEFAULT_FORMATS.get(runtime, ["f32"]))
        c.embed_formats = c.embed_formats or list(DEFAULT_EMBED_FORMATS.get(runtime, ["f32"]))
        for name in c.attn_formats + c.mlp_formats + c.embed_formats:
            f = get_format(name)
            if runtime not in f.runtimes:
                raise SpaceError(f"format {name} is not held by {runtime}; it holds {', '.join(_held(runtime))}")
        step = self._row_step(c.mlp_formats)
        c.mlp = c.mlp or sorted({_align(arch.intermediate_size * f, step, arch.intermediate_size)
                                 for f in c.mlp_fractions}, reverse=True)
        self._check_rows(c)
        self.config = c
        self.vars = self._variables()
        self._index = {v.name: i for i, v in enumerate(self.vars)}

    # ---- grid construction ----------------------------------------------------------------
    @staticmethod
    def _row_step(formats) -> int:
        step = 32
        for name in formats:
            step = max(step, get_format(name).block)
        return step

    def _check_rows(self, c: SpaceConfig) -> None:
        hd = self.arch.head_dim
        head_rows = {kv * g * hd for kv in c.kv_heads for g in c.group_heads}
        rows = {"attention": set(c.hidden) | head_rows, "MLP": set(c.hidden) | set(c.mlp), "embedding": set(c.hidden)}
        for what, fmts in (("attention", c.attn_formats), ("MLP", c.mlp_formats), ("embedding", c.embed_formats)):
            for name in fmts:
                bad = sorted(r for r in rows[what] if not get_format(name).fits(r))
                if bad:
                    raise SpaceError(
                        f"{what} format {name} needs rows that are multiples of {get_format(name).block}, but the grid "
                        f"has row lengths {bad}: drop the format or align the grid"
                    )

    def _variables(self) -> list[Var]:
        c = self.config
        attn = tuple((kv, g) for kv in c.kv_heads for g in c.group_heads)
        glob = [Var("depth", tuple(c.depth)), Var("hidden", tuple(c.hidden)), Var("embed_format", tuple(c.embed_formats))]
        per = [Var("attn", attn), Var("mlp", tuple(c.mlp)), Var("attn_format", tuple(c.attn_formats)),
               Var("mlp_format", tuple(c.mlp_formats))]  # fmt: skip
        if c.mode == "uniform":
            return glob + per + ([Var(FORMAT_SHARE, tuple(c.format_shares))] if len(c.format_shares) > 1 else [])
        return glob + [Var(f"{v.name}.{i}", v.choices) for i in range(self.arch.num_layers) for v in per]

    # ---- encoding -------------------------------------------------------------------------
    @property
    def n_var(self) -> int:
        return len(self.vars)

    @property
    def formats(self) -> list[str]:
        """Every weight format the space offers (attention, MLP, embedding), each once."""
        c = self.config
        return list(dict.fromkeys(c.attn_formats + c.mlp_formats + c.embed_formats))

    @property
    def sizes(self) -> list[int]:
        return [v.size for v in self.vars]

    def _layer_value(self, x, name: str, base_layer: int):
        key = name if self.config.mode == "uniform" else f"{name}.{base_layer}"
        i = self._index[key]
        return self.vars[i].choices[x[i]]

    def decode(self, x) -> SubnetSpec:
        """The SubnetSpec of an integer choice vector."""
        x = [int(v) for v in x]
        for i, (v, xi) in enumerate(zip(self.vars, x)):
            if not 0 <= xi < v.size:
                raise SpaceError(f"choice {xi} of variable {v.name} is outside 0..{v.size - 1}")
        g = {v.name: v.choices[x[i]] for i, v in enumerate(self.vars[:3])}
        depth = g["depth"]
        kept = sorted(self.layer_rank[:depth]) if depth < self.arch.num_layers else list(range(self.arch.num_layers))
        j = self._index.get(FORMAT_SHARE)
        share = 1.0 if j is None else self.vars[j].choices[x[j]]
        narrow = self.narrow_blocks(kept, share)
        c = self.config
        layers = []
        for b in kept:
            kv, per = self._layer_value(x, "attn", b)
            af, mf = self._layer_value(x, "attn_format", b), self._layer_value(x, "mlp_format", b)
            if b not in narrow:
                af, mf = c.attn_formats[0], c.mlp_formats[0]
            fmts = {n: af for n in ATTN_LINEARS} | {n: mf for n in MLP_LINEARS}
            layers.append(LayerSpec(b, kv * per, kv, self._layer_value(x, "mlp", b), fmts))
        spec = SubnetSpec(self.arch, g["hidden"], layers, g["embed_format"], g["embed_format"])
        return spec.validate()

    def widened(self, x) -> list[int] | None:
        """``x`` at the next lower format share: its most rounding-sensitive narrowed blocks back at the
        widest formats (28 of 30 narrowed instead of 30). None where ``x`` is at the lowest share, or the
        space has no format shares."""
        j = self._index.get(FORMAT_SHARE)
        if j is None or int(x[j]) + 1 >= self.vars[j].size:
            return None
        return [int(v) + (i == j) for i, v in enumerate(x)]

    def narrow_blocks(self, kept: list[int], share: float) -> set[int]:
        """The ``share`` of ``kept`` blocks least sensitive to rounding (all of them at share 1.0)."""
        return least_sensitive(self.quant_rank, kept, share)

    def encode(self, spec: SubnetSpec) -> list[int]:
        """The choice vector of a spec that lies in the space (nearest choice per variable otherwise)."""

        def near(var: Var, value):
            if value in var.choices:
                return var.choices.index(value)
            if isinstance(value, (int, float)):
                return min(range(var.size), key=lambda i: abs(var.choices[i] - value))
            if isinstance(value, tuple):
                return min(range(var.size), key=lambda i: sum(abs(a - b) for a, b in zip(var.choices[i], value)))
            return min(range(var.size), key=lambda i: abs(get_format(var.choices[i]).bits - get_format(value).bits))

        by_base = {ly.index: ly for ly in spec.layers}
        c = self.config
        wide = {n: c.attn_formats[0] for n in ATTN_LINEARS} | {n: c.mlp_formats[0] for n in MLP_LINEARS}
        narrowed = [ly for ly in spec.layers if ly.formats != wide]
        first = narrowed[0] if narrowed and c.mode == "uniform" else spec.layers[0]  # a block with the chosen formats
        x = []
        for v in self.vars:
            name, _, layer = v.name.partition(".")
            ly = by_base.get(int(layer), first) if layer else first
            value = {
                "depth": len(spec.layers),
                "hidden": spec.hidden_size,
                "embed_format": spec.embed_format,
                "attn": (ly.kv_heads, ly.heads // ly.kv_heads),
                "mlp": ly.mlp,
                "attn_format": ly.formats["q_proj"],
                "mlp_format": ly.formats["gate_proj"],
                FORMAT_SHARE: len(narrowed) / len(spec.layers) if narrowed else 1.0,
            }[name]
            x.append(near(v, value))
        return x

    def largest(self, fmt_index: int = 0) -> list[int]:
        """The base-sized candidate with each format variable at ``fmt_index`` (0 = the widest format;
        a variable with fewer choices takes its last)."""
        return [min(fmt_index, v.size - 1) if is_format_var(v) else 0 for v in self.vars]

    @property
    def n_formats(self) -> int:
        """The most choices any format variable has."""
        return max((v.size for v in self.vars if is_format_var(v)), default=1)

    def smallest(self) -> list[int]:
        """The smallest candidate: every choice at its last (smallest) value, every block narrow (share 1.0)."""
        return [0 if v.name == FORMAT_SHARE else v.size - 1 for v in self.vars]

    def describe(self) -> dict:
        shown = self.vars if self.config.mode == "uniform" else self.vars[:7]
        return {"mode": self.config.mode, "runtime": self.runtime, "n_var": self.n_var,
                "variables": {v.name: list(v.choices) for v in shown}}  # fmt: skip


def _held(runtime: str) -> list[str]:
    return [f.name for f in FORMATS.values() if runtime in f.runtimes]

