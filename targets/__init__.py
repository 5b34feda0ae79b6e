"""Device profiles as data: what format, precision, quantization and memory each device gets.

The profiles live in ``profiles.toml`` beside this module; this module only reads them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from phi_edge.runtimes.errors import PhiEdgeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILES_FILE = Path(__file__).with_name("profiles.toml")


class UnknownTargetError(PhiEdgeError):
    pass


@dataclass(frozen=True)
class Soc:
    key: str
    name: str
    htp_arch: int
    soc_model: int


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    format: str
    device: str
    precision: str
    precisions: tuple[str, ...]
    ram_gb: float
    extra: str
    moe: bool
    moe_note: str = ""
    moe_precisions: tuple[str, ...] = ()
    context_length: int = 0
    aliases: tuple[str, ...] = ()
    quantization: dict[str, dict[str, Any]] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def ram_bytes(self) -> int:
        return int(self.ram_gb * 1024**3)

    def quantization_defaults(self, precision: str) -> dict[str, Any]:
        return dict(self.quantization.get(precision, {}))


@lru_cache(maxsize=1)
def _load() -> tuple[dict[str, TargetProfile], dict[str, Soc]]:
    data = tomllib.loads(PROFILES_FILE.read_text())
    profiles = {}
    for name, t in data["targets"].items():
        profiles[name] = TargetProfile(
            name=name,
            description=t["description"],
            format=t["format"],
            device=t["device"],
            precision=t["precision"],
            precisions=tuple(t["precisions"]),
            ram_gb=float(t["ram_gb"]),
            extra=t["extra"],
            moe=bool(t["moe"]),
            moe_note=t.get("moe_note", ""),
            moe_precisions=tuple(t.get("moe_precisions", ())),
            context_length=int(t.get("context_length", 0)),
            aliases=tuple(t.get("aliases", ())),
            quantization=t.get("quantization", {}),
            runtime=t.get("runtime", {}),
        )
    socs = {k: Soc(key=k, name=s["name"], htp_arch=s["htp_arch"], soc_model=s["soc_model"])
            for k, s in data.get("socs", {}).items()}
    return profiles, socs


def all_targets() -> list[TargetProfile]:
    return list(_load()[0].values())


def get_target(name: str) -> TargetProfile:
    """The profile named ``name`` or one of its aliases; a clear error listing the known ones."""
    profiles = _load()[0]
    key = name.strip().lower()
    if key in profiles:
        return profiles[key]
    for p in profiles.values():
        if key in p.aliases:
            return p
    raise UnknownTargetError(
        f"unknown target '{name}'; known targets: {', '.join(profiles)} "
        f"(run 'phi-export targets' to see what each one means)"
    )


def all_socs() -> list[Soc]:
    return list(_load()[1].values())


def get_soc(name: str) -> Soc:
    socs = _load()[1]
    key = name.strip().lower()
    if key not in socs:
        raise UnknownTargetError(f"unknown Snapdragon SoC '{name}'; known: {', '.join(socs)}")
    return socs[key]
