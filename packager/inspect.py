"""`packager inspect`: architecture, parameter count, per-layer shapes, dtype and size of a model."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from subnet.loading import LoadedModel


def layer_rows(model) -> list[dict]:
    """Per-layer shapes read from the modules themselves (so heterogeneous models show truly)."""
    rows = []
    for i, layer in enumerate(model.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        hd = att.head_dim
        rows.append(
            {
                "layer": i,
                "heads": att.q_proj.out_features // hd,
                "kv_heads": att.k_proj.out_features // hd,
                "head_dim": hd,
                "mlp": mlp.gate_proj.out_features,
                "hidden": att.q_proj.in_features,
            }
        )
    return rows


def summary(loaded: LoadedModel) -> dict:
    """Plain-data summary of a loaded model."""
    model = loaded.model
    params = {id(p): p for p in model.parameters()}  # tied weights counted once
    n = sum(p.numel() for p in params.values())
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params.values()})
    a = loaded.arch
    return {
        "source": loaded.source,
        "family": a.family,
        "class": type(model).__name__,
        "layers": len(model.model.layers),
        "hidden_size": model.model.embed_tokens.embedding_dim,
        "vocab_size": a.vocab_size,
        "tied_embeddings": a.tie_word_embeddings,
        "parameters": n,
        "dtype": ",".join(dtypes),
        "size_mb": nbytes / 2**20,
        "per_layer": layer_rows(model),
        "notes": loaded.notes,
    }


def print_summary(info: dict, console: Console | None = None) -> None:
    """Render the summary as a compact table: identical consecutive layers are folded into ranges."""
    console = console or Console()
    console.print(f"[bold]{info['source']}[/bold]  ({info['class']}, family {info['family']})")
    console.print(
        f"layers {info['layers']}  hidden {info['hidden_size']}  vocab {info['vocab_size']}  "
        f"tied embeddings {'yes' if info['tied_embeddings'] else 'no'}"
    )
    console.print(
        f"parameters {info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)  dtype {info['dtype']}  "
        f"size {info['size_mb']:.1f} MiB"
    )
    for note in info["notes"]:
        console.print(f"note: {note}")
    table = Table("layers", "query heads", "KV heads", "head dim", "MLP width", "hidden")
    rows = info["per_layer"]
    start = 0
    for i in range(1, len(rows) + 1):
        key = lambda r: (r["heads"], r["kv_heads"], r["head_dim"], r["mlp"], r["hidden"])  # noqa: E731
        if i == len(rows) or key(rows[i]) != key(rows[start]):
            r = rows[start]
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            table.add_row(span, str(r["heads"]), str(r["kv_heads"]), str(r["head_dim"]), str(r["mlp"]), str(r["hidden"]))
            start = i
    console.print(table)
