"""Device profiles as data: what format, precision, quantization and memory each device gets.

The profiles live in ``profiles.toml`` beside this module; this module only reads them. A target
may offer other formats for the same device (``[targets.NAME.formats.FORMAT]``, e.g. GGUF on the Pi):
``get_target(name, fmt)`` gives the profile with that format's own settings in place of the default's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
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


class UnknownFormatError(PhiEdgeError):
    """A format the target does not offer."""


# the fields an alternative format's table may set; quantization and runtime replace the default
# format's tables whole (their keys belong to one format's tool), the rest replace single values
ALTERNATIVE_FIELDS = ("description", "device", "precision", "precisions", "extra", "moe", "moe_note",
                      "moe_precisions", "context_length", "quantization", "runtime")


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
    alternatives: dict[str, dict[str, Any]] = field(default_factory=dict)  # format -> its table

    @property
    def ram_bytes(self) -> int:
        return int(self.ram_gb * 1024**3)

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats this device profile offers, its default first."""
        return (self.format, *self.alternatives)

    def with_format(self, fmt: str | None) -> "TargetProfile":
        """This profile exporting ``fmt`` (None or the default: itself), with that format's own
        precisions, quantization defaults, extra and runtime settings; a clear error for a format the
        target does not offer."""
        key = (fmt or self.format).strip().lower()
        if key == self.format:
            return self
        if key not in self.alternatives:
            raise UnknownFormatError(
                f"target '{self.name}' does not offer format '{fmt}'; it offers "
                f"{', '.join([self.format + ' (default)', *self.alternatives])}")
        alt = self.alternatives[key]
        values = {k: alt[k] for k in ALTERNATIVE_FIELDS if k in alt}
        for k in ("precisions", "moe_precisions"):
            if k in values:
                values[k] = tuple(values[k])
        values.setdefault("quantization", {})
        values.setdefault("runtime", {})
        return replace(self, format=key, alternatives={}, **values)

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
            alternatives=_alternatives(name, t),
        )
    socs = {k: Soc(key=k, name=s["name"], htp_arch=s["htp_arch"], soc_model=s["soc_model"])
            for k, s in data.get("socs", {}).items()}
    return profiles, socs


def _alternatives(name: str, t: dict[str, Any]) -> dict[str, dict[str, Any]]:
    alts = t.get("formats", {})
    for fmt, alt in alts.items():
        unknown = set(alt) - set(ALTERNATIVE_FIELDS)
        if fmt == t["format"] or unknown:
            raise ValueError(f"profiles.toml: [targets.{name}.formats.{fmt}] "
                             + ("repeats the default format" if fmt == t["format"] else
                                f"sets {', '.join(sorted(unknown))}; it may set {', '.join(ALTERNATIVE_FIELDS)}"))
    return alts


def all_targets() -> list[TargetProfile]:
    return list(_load()[0].values())


def get_target(name: str, fmt: str | None = None) -> TargetProfile:
    """The profile named ``name`` or one of its aliases, exporting ``fmt`` (default: the target's own
    format); a clear error listing the known targets, or the formats the target offers."""
    profiles = _load()[0]
    key = name.strip().lower()
    if key in profiles:
        return profiles[key].with_format(fmt)
    for p in profiles.values():
        if key in p.aliases:
            return p.with_format(fmt)
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
