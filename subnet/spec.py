"""SubnetSpec: the plain-data description of a sub-network and its weight formats.

Search produces it, the cost model prices it, extraction and every exporter consume it. It is
versioned JSON and validated against the base architecture it was cut from.

Units are kept by *index lists* into the base model (KV groups, query heads within a group, MLP
channels, hidden channels). Omitted lists mean "the first n", which is what an importance-sorted
base makes the best choice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from subnet.arch import LINEARS, ArchInfo
from subnet.formats import get_format

SPEC_VERSION = 1


class SpecError(ValueError):
    """A SubnetSpec that does not fit its base model or its formats."""


@dataclass
class LayerSpec:
    """One kept decoder block of the base model."""

    index: int  # which base layer
    heads: int  # query heads kept
    kv_heads: int  # KV heads (GQA groups) kept
    mlp: int  # MLP intermediate channels kept
    formats: dict[str, str]  # linear name -> weight format
    kv_groups: list[int] | None = None  # base KV heads kept; None = the first kv_heads
    group_heads: list[int] | None = None  # query positions kept inside every group; None = first
    mlp_channels: list[int] | None = None  # base MLP channels kept; None = the first mlp

    def kv_index(self) -> list[int]:
        return list(self.kv_groups) if self.kv_groups is not None else list(range(self.kv_heads))

    def group_index(self) -> list[int]:
        per = self.heads // max(self.kv_heads, 1)
        return list(self.group_heads) if self.group_heads is not None else list(range(per))

    def head_index(self, group_size: int) -> list[int]:
        """Base query-head indices kept, grouped by KV head (the order HF's GQA expects)."""
        return [g * group_size + h for g in self.kv_index() for h in self.group_index()]

    def mlp_index(self) -> list[int]:
        return list(self.mlp_channels) if self.mlp_channels is not None else list(range(self.mlp))

    def to_dict(self) -> dict:
        d = {"index": self.index, "heads": self.heads, "kv_heads": self.kv_heads, "mlp": self.mlp}
        fmts = set(self.formats.values())
        d["formats"] = fmts.pop() if len(fmts) == 1 and set(self.formats) == set(LINEARS) else dict(self.formats)
        for k in ("kv_groups", "group_heads", "mlp_channels"):
            if getattr(self, k) is not None:
                d[k] = list(getattr(self, k))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        try:
            fmts = d.get("formats", "f32")
            if isinstance(fmts, str):
                fmts = {name: fmts for name in LINEARS}
            else:
                fmts = {name: fmts.get(name, fmts.get("default", "f32")) for name in LINEARS}
            return cls(
                index=int(d["index"]),
                heads=int(d["heads"]),
                kv_heads=int(d["kv_heads"]),
                mlp=int(d["mlp"]),
                formats=fmts,
                kv_groups=d.get("kv_groups"),
                group_heads=d.get("group_heads"),
                mlp_channels=d.get("mlp_channels"),
            )
        except KeyError as e:
            raise SpecError(f"layer entry {d!r} is missing {e.args[0]!r}") from None


@dataclass
class SubnetSpec:
    """Which layers, heads, channels and weight formats a sub-network keeps."""

    base: ArchInfo
    hidden_size: int
    layers: list[LayerSpec]
    embed_format: str = "f32"
    lm_head_format: str = "f32"
    hidden_channels: list[int] | None = None  # base hidden channels kept; None = the first hidden_size
    meta: dict = field(default_factory=dict)
    version: int = SPEC_VERSION

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def full(cls, base: ArchInfo, fmt: str = "f32") -> "SubnetSpec":
        """The whole base model, every weight in ``fmt``."""
        return cls.uniform(base, fmt=fmt)

    @classmethod
    def uniform(
        cls,
        base: ArchInfo,
        layers: list[int] | None = None,
        heads: int | None = None,
        kv_heads: int | None = None,
        mlp: int | None = None,
        hidden_size: int | None = None,
        fmt: str = "f32",
        embed_format: str | None = None,
    ) -> "SubnetSpec":
        """Every kept layer the same shape and format (defaults: the base's)."""
        kv = kv_heads if kv_heads is not None else base.num_kv_heads
        q = heads if heads is not None else kv * base.group_size
        kept = list(range(base.num_layers)) if layers is None else list(layers)
        spec = cls(
            base=base,
            hidden_size=hidden_size if hidden_size is not None else base.hidden_size,
            layers=[
                LayerSpec(i, q, kv, mlp if mlp is not None else base.intermediate_size, {n: fmt for n in LINEARS})
                for i in kept
            ],
            embed_format=embed_format or fmt,
            lm_head_format=embed_format or fmt,
        )
        return spec

    # ---- queries ------------------------------------------------------------------------
    @property
    def is_uniform(self) -> bool:
        """True when every kept layer has the same heads, KV heads and MLP width."""
        shapes = {(ly.heads, ly.kv_heads, ly.mlp) for ly in self.layers}
        return len(shapes) <= 1

    def hidden_index(self) -> list[int]:
        if self.hidden_channels is not None:
            return list(self.hidden_channels)
        return list(range(self.hidden_size))

    def linear_shapes(self, layer: LayerSpec) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear of a kept layer."""
        hd, h = self.base.head_dim, self.hidden_size
        return {
            "q_proj": (layer.heads * hd, h),
            "k_proj": (layer.kv_heads * hd, h),
            "v_proj": (layer.kv_heads * hd, h),
            "o_proj": (h, layer.heads * hd),
            "gate_proj": (layer.mlp, h),
            "up_proj": (layer.mlp, h),
            "down_proj": (h, layer.mlp),
        }

    def num_params(self) -> int:
        """Parameters of the extracted sub-network (norms and biases included)."""
        b, h = self.base, self.hidden_size
        n = b.vocab_size * h * (1 if b.tie_word_embeddings else 2) + h  # embeddings + final norm
        for ly in self.layers:
            n += sum(o * i for o, i in self.linear_shapes(ly).values()) + 2 * h
            if b.qkv_bias:
                n += (ly.heads + 2 * ly.kv_heads) * b.head_dim
        return n

    def weight_matrices(self) -> list[tuple[str, str, int, int]]:
        """(name, format, rows, row length) of every stored weight matrix: ``embed_tokens``, an untied
        ``lm_head``, and each kept block's linears as ``layers.<index>.<linear>``."""
        b, h = self.base, self.hidden_size
        out = [("embed_tokens", self.embed_format, b.vocab_size, h)]
        if not b.tie_word_embeddings:
            out.append(("lm_head", self.lm_head_format, b.vocab_size, h))
        for ly in self.layers:
            out += [(f"layers.{ly.index}.{n}", ly.formats[n], o, i) for n, (o, i) in self.linear_shapes(ly).items()]
        return out

    def weight_bytes(self) -> float:
        """Bytes of all weights stored in their formats (norms and biases in f32)."""
        b, h = self.base, self.hidden_size
        total = sum(rows * length * get_format(fmt).bits / 8 for _, fmt, rows, length in self.weight_matrices())
        total += 4 * h * (1 + 2 * len(self.layers))  # the final norm and two per block
        if b.qkv_bias:
            total += sum(4 * (ly.heads + 2 * ly.kv_heads) * b.head_dim for ly in self.layers)
        return total

    def formats_used(self) -> set[str]:
        used = {self.embed_format, self.lm_head_format}
        for ly in self.layers:
            used.update(ly.formats.values())
        return used

    # ---- validation ---------------------------------------------------------------------
    def validate(self, base: ArchInfo | None = None) -> "SubnetSpec":
        """Check the spec against its base (or ``base``); raise SpecError with a one-line reason."""
        b = base or self.base
        if base is not None and base != self.base:
            raise SpecError(
                f"spec was cut from a different base model ({self.base.family}, {self.base.num_layers} layers, "
                f"hidden {self.base.hidden_size}) than the one given ({b.family}, {b.num_layers} layers, "
                f"hidden {b.hidden_size})"
            )
        if self.version != SPEC_VERSION:
            raise SpecError(f"spec version {self.version} is not supported (this packager reads version {SPEC_VERSION})")
        if not self.layers:
            raise SpecError("spec keeps no layers; keep at least one")
        if not 1 <= self.hidden_size <= b.hidden_size:
            raise SpecError(f"hidden_size {self.hidden_size} is outside 1..{b.hidden_size} of the base")
        _check_index(self.hidden_channels, self.hidden_size, b.hidden_size, "hidden_channels")
        seen = set()
        for ly in self.layers:
            where = f"layer {ly.index}"
            if not 0 <= ly.index < b.num_layers:
                raise SpecError(f"{where}: the base has layers 0..{b.num_layers - 1}")
            if ly.index in seen:
                raise SpecError(f"{where} is listed twice")
            seen.add(ly.index)
            if not 1 <= ly.kv_heads <= b.num_kv_heads:
                raise SpecError(f"{where}: {ly.kv_heads} KV heads, the base has 1..{b.num_kv_heads}")
            if not 1 <= ly.heads <= b.num_heads:
                raise SpecError(f"{where}: {ly.heads} query heads, the base has 1..{b.num_heads}")
            if ly.heads % ly.kv_heads:
                raise SpecError(
                    f"{where}: {ly.heads} query heads do not divide into {ly.kv_heads} KV groups "
                    f"(GQA keeps the same number of query heads in every kept group)"
                )
            if ly.heads // ly.kv_heads > b.group_size:
                raise SpecError(
                    f"{where}: {ly.heads // ly.kv_heads} query heads per KV group, the base has {b.group_size}"
                )
            if not 1 <= ly.mlp <= b.intermediate_size:
                raise SpecError(f"{where}: MLP width {ly.mlp}, the base has 1..{b.intermediate_size}")
            _check_index(ly.kv_groups, ly.kv_heads, b.num_kv_heads, f"{where} kv_groups")
            _check_index(ly.group_heads, ly.heads // ly.kv_heads, b.group_size, f"{where} group_heads")
            _check_index(ly.mlp_channels, ly.mlp, b.intermediate_size, f"{where} mlp_channels")
            if set(ly.formats) != set(LINEARS):
                raise SpecError(f"{where}: formats must name each of {', '.join(LINEARS)}")
            for name, (_, row) in self.linear_shapes(ly).items():
                _check_format(ly.formats[name], row, f"{where} {name}")
        for name, fmt in (("embedding", self.embed_format), ("lm_head", self.lm_head_format)):
            _check_format(fmt, self.hidden_size, name)
        if b.tie_word_embeddings and self.embed_format != self.lm_head_format:
            raise SpecError(
                f"the base ties its embedding and lm_head, so they share one format: "
                f"embed_format {self.embed_format!r} != lm_head_format {self.lm_head_format!r}"
            )
        return self

    # ---- (de)serialization --------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "version": self.version,
            "base": self.base.to_dict(),
            "hidden_size": self.hidden_size,
            "embed_format": self.embed_format,
            "lm_head_format": self.lm_head_format,
            "layers": [ly.to_dict() for ly in self.layers],
        }
        if self.hidden_channels is not None:
            d["hidden_channels"] = list(self.hidden_channels)
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SubnetSpec":
        if not isinstance(d, dict) or "layers" not in d or "base" not in d:
            raise SpecError("not a SubnetSpec: expected a JSON object with 'version', 'base' and 'layers'")
        try:
            base = ArchInfo.from_dict(d["base"])
        except (TypeError, ValueError) as e:
            raise SpecError(f"spec 'base' is invalid: {e}") from None
        spec = cls(
            base=base,
            hidden_size=int(d.get("hidden_size", base.hidden_size)),
            layers=[LayerSpec.from_dict(x) for x in d["layers"]],
            embed_format=d.get("embed_format", "f32"),
            lm_head_format=d.get("lm_head_format", d.get("embed_format", "f32")),
            hidden_channels=d.get("hidden_channels"),
            meta=d.get("meta", {}),
            version=int(d.get("version", SPEC_VERSION)),
        )
        return spec.validate()

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "SubnetSpec":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpecError(f"spec is not valid JSON: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the spec as JSON atomically (temp file, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SubnetSpec":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SpecError(f"cannot read spec {path}: {e.strerror}") from None
        return cls.from_json(text)


def _check_index(index, count, limit, what):
    if index is None:
        return
    if len(index) != count:
        raise SpecError(f"{what}: {len(index)} indices listed but the count is {count}")
    if len(set(index)) != len(index) or any(not 0 <= i < limit for i in index):
        raise SpecError(f"{what}: indices must be distinct and in 0..{limit - 1}")


def _check_format(name, row_length, what):
    try:
        fmt = get_format(name)
    except ValueError as e:
        raise SpecError(f"{what}: {e}") from None
    if not fmt.fits(row_length):
        hint = f" (llama.cpp would fall back to {fmt.fallback})" if fmt.fallback else ""
        raise SpecError(
            f"{what}: format {name} needs rows that are a multiple of {fmt.block}, this row has {row_length}{hint}"
        )


def retarget_formats(spec: SubnetSpec, allowed: list[str], embed_allowed: list[str] | None = None) -> SubnetSpec:
    """A copy of ``spec`` whose every weight format is the closest one in ``allowed`` that fits its rows
    (the embedding, and a tied lm_head, from ``embed_allowed`` when the runtime restricts them)."""
    from subnet.formats import closest_format

    out = SubnetSpec.from_dict(spec.to_dict())
    for ly in out.layers:
        shapes = out.linear_shapes(ly)
        ly.formats = {n: closest_format(f, allowed, [shapes[n][1]]) for n, f in ly.formats.items()}
    emb = list(embed_allowed) if embed_allowed else allowed
    out.embed_format = closest_format(out.embed_format, emb, [out.hidden_size])
    out.lm_head_format = out.embed_format if out.base.tie_word_embeddings else closest_format(
        out.lm_head_format, allowed, [out.hidden_size])
    return out.validate()


def swap_formats(spec: SubnetSpec, old: str, new: str) -> SubnetSpec:
    """A copy of ``spec`` with every linear stored in ``old`` stored in ``new`` where its rows fit ``new``'s blocks."""
    out = SubnetSpec.from_dict(spec.to_dict())
    fmt = get_format(new)
    for ly in out.layers:
        shapes = out.linear_shapes(ly)
        ly.formats = {n: new if f == old and fmt.fits(shapes[n][1]) else f for n, f in ly.formats.items()}
    return out.validate()


def lossy_retargets(spec: SubnetSpec, other: SubnetSpec) -> list[str]:
    """Tensors ``other`` (a retarget of ``spec``) stores in a format that is neither ``spec``'s, its
    exact twin (``same_as``), nor a float one: the weights a model recovered for ``spec`` was not
    trained to be rounded to, as ``layers.{i}.{linear} old->new`` / ``embedding`` / ``lm_head``."""

    from subnet.formats import same_weights

    pairs = [(f"layers.{i}.{n}", f, b.formats[n]) for i, (a, b) in enumerate(zip(spec.layers, other.layers))
             for n, f in a.formats.items()]  # fmt: skip
    pairs += [("embedding", spec.embed_format, other.embed_format)]
    if not spec.base.tie_word_embeddings:
        pairs += [("lm_head", spec.lm_head_format, other.lm_head_format)]
    return [f"{name} {a}->{b}" for name, a, b in pairs if not same_weights(a, b) and get_format(b).bits < 16]
