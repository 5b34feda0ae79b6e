"""What every Core ML export records as checked: the parity and round-trip summaries, and its closing notes."""

from __future__ import annotations

from typing import Any

VERIFIED = ("converted with coremltools {ct} on {os}, Core ML itself did not run here: graph parity of the traced "
            "decoder with transformers in torch ({parity}), every stored weight read back from the package and "
            "dequantized ({weights}), the package's states/inputs/outputs/weight ops checked")


def parity_skipped(n_params: int) -> dict[str, str]:
    return {"skipped": f"{n_params / 1e9:.1f}B parameters: two fp32 copies do not fit the check's memory budget; "
                       f"the test suite checks the decoder on the fixtures"}


def combined_round_trip(trips: list[dict[str, Any]]) -> dict[str, Any]:
    """The weights round trip of a model's parts as one record."""
    return {"matrices": sum(t["matrices"] for t in trips), "min_cosine": min(t["min_cosine"] for t in trips),
            "max_relative_rms_error": max(t["max_relative_rms_error"] for t in trips)}


def record_checks(verification: dict[str, Any], rope: dict[str, Any], parity_extra: str = "") -> list[str]:
    """Add the rope choice and the one-line summary of what was checked to ``verification``; the rope's note."""
    import platform

    import coremltools as ct

    parity = verification["graph_parity"]
    verification["rope"] = rope
    verification["coreml"] = VERIFIED.format(
        ct=ct.__version__, os=platform.system(),
        parity="skipped for size" if "skipped" in parity else
        f"max logit difference {parity['max_abs_logit_diff']:.1e}, greedy identical{parity_extra}",
        weights=f"min cosine {verification['weights_round_trip']['min_cosine']:.6f} with the source")
    return [rope["note"]] if "note" in rope else []


def closing_notes(packages: list[str], part_max_params: int) -> list[str]:
    """The notes every Core ML export ends with: its parts, and that Core ML itself did not run."""
    notes = []
    if len(packages) > 1:
        notes.append(f"converted in {len(packages)} parts of whole layers (at most {part_max_params / 1e6:.0f}M "
                     f"parameters each, to bound the converter's memory): {', '.join(packages)}, run in sequence, "
                     f"each with its own state")
    notes.append("Core ML did not run on this machine (it runs on macOS 15+ / iOS 18+): the export checked the "
                 "decoder in torch and read the stored weights back; see phi-edge.json verification")
    return notes
