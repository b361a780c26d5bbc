"""Target devices: which runtimes and weight formats each offers, its spec-sheet figures and workload.

Targets are JSON files: the shipped ones in ``targets/defs/``, a user's own in
``$PACKAGER_HOME/targets/<name>.json``, or any path. Spec-sheet figures carry their ``source``; the
host target (``laptop-cpu``) says ``"measured"`` instead, and its profile tables supply the numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from subnet.formats import LLAMA_CPP, ONNXRUNTIME, TENSORRT, formats_for
from targets.backend import Workload, read_json

DEFS_DIR = Path(__file__).with_name("defs")
RUNTIMES = (LLAMA_CPP, ONNXRUNTIME, TENSORRT)
MEASURED = "measured"


class TargetError(ValueError):
    """An unknown or malformed target or runtime, with the fix in one line."""


@dataclass
class Target:
    """A device to deploy on: runtimes (each with its weight formats), capacity, speed, workload."""

    name: str
    description: str
    runtimes: dict[str, list[str]]  # runtime -> weight formats it can run here
    default_runtime: str
    workload: Workload
    memory_gb: float | None = None  # None: measured on the host
    bandwidth_gbps: float | None = None
    compute_tflops: dict[str, float] | None = None  # compute dtype (fp32/fp16/int8) -> dense peak
    source: str = ""
    host: bool = False  # True: the machine packager runs on (can be measured here)
    launch_overhead_us: dict[str, float] = field(default_factory=dict)  # roofline assumption
    runtime_overhead_mb: float | None = None  # roofline assumption
    assumptions: str = ""
    devices: dict[str, str] = field(default_factory=dict)  # runtime -> cpu / cuda
    path: str = ""

    def formats(self, runtime: str | None = None) -> list[str]:
        """Weight formats of ``runtime`` (default runtime when None) on this target."""
        return self.runtimes[self.runtime(runtime)]

    def runtime(self, name: str | None) -> str:
        """Resolve a runtime name (None = the default); unknown names fail naming the known ones."""
        name = name or self.default_runtime
        if name not in self.runtimes:
            raise TargetError(
                f"target {self.name!r} has no runtime {name!r}; its runtimes: {', '.join(self.runtimes)}"
            )
        return name

    def memory_capacity_mb(self) -> float:
        """Memory capacity in MiB: the spec sheet's, or this host's RAM for a measured host target."""
        if self.memory_gb is not None:
            return self.memory_gb * 1e9 / 2**20
        import psutil

        return psutil.virtual_memory().total / 2**20

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "host": self.host,
            "default_runtime": self.default_runtime,
            "runtimes": {r: {"formats": f, "device": self.devices.get(r, "")} for r, f in self.runtimes.items()},
            "memory_gb": self.memory_gb if self.memory_gb is not None else MEASURED,
            "bandwidth_gbps": self.bandwidth_gbps if self.bandwidth_gbps is not None else MEASURED,
            "compute_tflops": self.compute_tflops if self.compute_tflops is not None else MEASURED,
            "source": self.source,
            "workload": vars(self.workload),
        }


def _number(value, what: str, where: str):
    if value is None or value == MEASURED:
        return None
    if isinstance(value, dict):
        return {k: float(v) for k, v in value.items()}
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TargetError(f"{where}: {what} must be a number or \"measured\", got {value!r}") from None


def target_from_dict(d: dict, where: str = "target") -> Target:
    """Build and validate a Target from its JSON object."""
    try:
        name = d["name"]
        raw_runtimes = d["runtimes"]
    except (KeyError, TypeError) as e:
        raise TargetError(f"{where}: a target needs 'name' and 'runtimes' (missing {e})") from None
    runtimes, devices = {}, {}
    for rt, conf in raw_runtimes.items():
        if rt not in RUNTIMES:
            raise TargetError(f"{where}: unknown runtime {rt!r}; known runtimes: {', '.join(RUNTIMES)}")
        conf = conf or {}
        supported = formats_for(rt)
        fmts = list(conf.get("formats", supported))
        bad = [f for f in fmts if f not in supported]
        if bad:
            raise TargetError(f"{where}: runtime {rt} cannot hold {bad}; it holds {', '.join(supported)}")
        runtimes[rt] = fmts
        devices[rt] = conf.get("device", "")
    default = d.get("default_runtime") or next(iter(runtimes), None)
    if default not in runtimes:
        raise TargetError(f"{where}: default_runtime {default!r} is not one of its runtimes {list(runtimes)}")
    wl = d.get("workload", {})
    try:
        workload = Workload(**wl)
    except TypeError:
        raise TargetError(f"{where}: workload takes prompt_tokens, gen_tokens, batch; got {sorted(wl)}") from None
    return Target(
        name=name,
        description=d.get("description", ""),
        runtimes=runtimes,
        default_runtime=default,
        workload=workload,
        memory_gb=_number(d.get("memory_gb"), "memory_gb", where),
        bandwidth_gbps=_number(d.get("bandwidth_gbps"), "bandwidth_gbps", where),
        compute_tflops=_number(d.get("compute_tflops"), "compute_tflops", where),
        source=d.get("source", ""),
        host=bool(d.get("host", False)),
        launch_overhead_us={k: float(v) for k, v in d.get("launch_overhead_us", {}).items()},
        runtime_overhead_mb=_number(d.get("runtime_overhead_mb"), "runtime_overhead_mb", where),
        assumptions=d.get("assumptions", ""),
        devices=devices,
    )


def user_targets_dir() -> Path:
    """Where users drop their own target files: $PACKAGER_HOME/targets."""
    from subnet.loading import packager_home

    return packager_home() / "targets"


def _target_files() -> dict[str, Path]:
    """name -> file; a user's file overrides a shipped one of the same name."""
    files = {p.stem: p for p in sorted(DEFS_DIR.glob("*.json"))}
    user = user_targets_dir()
    if user.is_dir():
        files.update({p.stem: p for p in sorted(user.glob("*.json"))})
    return files


def load_target_file(path: str | os.PathLike) -> Target:
    path = Path(path)
    d = read_json(path, "target file", TargetError)
    target = target_from_dict(d, where=str(path))
    target.path = str(path)
    return target


def get_target(name_or_path: str | os.PathLike | Target) -> Target:
    """A target by name (shipped or in $PACKAGER_HOME/targets) or by the path of its JSON file."""
    if isinstance(name_or_path, Target):
        return name_or_path
    key = str(name_or_path)
    files = _target_files()
    if key in files:
        return load_target_file(files[key])
    if key.endswith(".json") or os.sep in key:
        if Path(key).is_file():
            return load_target_file(key)
        raise TargetError(f"target file {key} does not exist")
    raise TargetError(
        f"unknown target {key!r}; known targets: {', '.join(files)} (or pass the path of a target JSON file, "
        f"or add one to {user_targets_dir()})"
    )


def list_targets() -> list[Target]:
    """Every known target: shipped and user-added."""
    return [load_target_file(p) for p in _target_files().values()]
