"""One export, start to finish: checkpoint → checks → format tool → manifest → smoke test → folder.

This is what ``phi-export MODEL --target T`` runs. Format modules only write model files; this
module does the parts every format shares, so every artifact gets them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi_edge.runtimes.errors import BackendUnavailableError, PhiEdgeError
from phi_edge.targets import get_target

from . import checkpoint as checkpoints
from . import source_tokenizer as source_tokenizers
from .artifact import build_manifest, check_output, staging, stop_token_ids
from .formats import ExportOptions, check_options, copy_into, format_module, tool_versions
from .plan import choose_context
from .progress import Steps, tool_output_to_log
from .worker import run_in_worker

SMOKE_PROMPT = "Hello! What can you do on a Raspberry Pi?"
# From this size the model files are written in a worker process (:mod:`.worker`), so that torch and the
# tool's heap are gone when the artifact is loaded for its checks (Phi-3-medium int4: 12.2 -> 11 GiB peak).
WORKER_FROM_PARAMS = 1_000_000_000


@dataclass
class ExportReport:
    output: str
    target: str
    format: str
    precision: str
    family: str
    source: str
    context_length: int
    size_bytes: int
    estimated_runtime_bytes: int
    quantization: dict[str, Any]
    step_times_s: dict[str, float] = field(default_factory=dict)
    sample: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def resolve_precision(target, precision: str | None) -> str:
    precision = precision or target.precision
    if precision not in target.precisions:
        raise PhiEdgeError(f"target '{target.name}' does not take precision {precision}; "
                           f"it takes {', '.join(target.precisions)}")
    return precision


def check_moe(ckpt, target, precision: str) -> None:
    if not ckpt.is_moe:
        return
    if not target.moe:
        raise PhiEdgeError(f"Phi-3.5-MoE does not run on target '{target.name}': {target.moe_note}")
    if target.moe_precisions and precision not in target.moe_precisions:
        raise PhiEdgeError(f"Phi-3.5-MoE on target '{target.name}' exports at {', '.join(target.moe_precisions)} "
                           f"only ({target.moe_note}); pass --precision {target.moe_precisions[0]}")


def run_export(model: str | None, target_name: str, output: str | Path, precision: str | None = None,
               context_length: int = 0, quant: dict[str, Any] | None = None, force: bool = False,
               revision: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
               smoke_test: bool = True, steps: Steps | None = None, fmt: str | None = None,
               worker: bool | None = None) -> ExportReport:
    """``fmt``: another format the target offers (``--format``, e.g. gguf for rpi5); None: its default.
    ``worker``: write the model files in a worker process (None: from :data:`WORKER_FROM_PARAMS` up)."""
    steps = steps or Steps(enabled=False)
    target = get_target(target_name, fmt)
    precision = resolve_precision(target, precision)
    module = format_module(target.format)
    opts = ExportOptions(precision=precision, context_length=context_length, quant=dict(quant or {}), force=force)
    check_options(module, opts, target.name)
    out = Path(output)
    check_output(out, force)

    name = model or checkpoints.DEFAULT_MODEL
    with tool_output_to_log(f"the export of {name} for target '{target.name}'", step=lambda: steps.current,
                            hint="try another --precision or target, and please report it with the tool log"):
        return _export(model, target, module, opts, out, revision, allow_pickle, trust_remote_code, smoke_test,
                       steps, worker)


class TokenizerMismatchError(PhiEdgeError):
    """The artifact's own tokenizer encodes a probe differently from the source checkpoint's."""


def _export(model, target, module, opts, out, revision, allow_pickle, trust_remote_code, smoke_test,
            steps, worker) -> ExportReport:
    from .sizing import param_counts

    precision = opts.precision
    with steps.step("Checking the checkpoint"):
        ckpt = checkpoints.resolve(model, revision=revision, allow_pickle=allow_pickle,
                                   trust_remote_code=trust_remote_code)
        source_tok = source_tokenizers.SourceTokenizer(ckpt.path)
        if worker is None:
            worker = param_counts(ckpt.config).total >= WORKER_FROM_PARAMS
        transformers_check = None if worker else _transformers_check(source_tok, trust_remote_code)
    check_moe(ckpt, target, precision)
    from .formats import vision

    why = vision.format_refusal(ckpt.config, module.FORMAT)
    if why:
        raise PhiEdgeError(why)
    opts_context_given = bool(opts.context_length)
    plan = choose_context(ckpt.config, target, precision, opts.context_length, opts.quant,
                          extra_bytes=ckpt.tokenizer_bytes)
    context = opts.context_length = plan.context_length
    if not plan.fits and not opts.force:
        raise PhiEdgeError(plan.refusal())
    if not plan.export_fits and not opts.force:
        raise PhiEdgeError(plan.export_refusal())
    module.check(ckpt, target, opts)

    notes: list[str] = [plan.context_note] if not opts_context_given else []
    notes += [f"tokenizer: {n}" for n in source_tok.changes_for_artifact()]
    with staging(out, opts.force) as tmp:
        if worker:
            result, transformers_check = run_in_worker(_write_model, module.__name__, ckpt, target, opts, tmp,
                                                       trust_remote_code, steps=steps)
        else:
            result = module.export(ckpt, target, opts, tmp, steps)
        if not transformers_check.startswith("transformers' AutoTokenizer agrees"):
            notes.append(f"tokenizer: {transformers_check}")
        notes += result.notes
        context = result.context_length or context
        copy_into(ckpt.path, tmp, checkpoints.TOKENIZER_FILES)
        source_tokenizers.write_artifact_files(source_tok, tmp)
        stops = stop_token_ids(ckpt, ckpt.generation_config())
        if hasattr(module, "finalize"):
            module.finalize(tmp, context, stops)
        weights = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        memory = {"weights_bytes": weights, "kv_cache_bytes": plan.kv_cache_bytes,
                  "kv_cache_dtype_bytes": plan.kv_cache_dtype_bytes, "kv_allocation": plan.kv_allocation,
                  "estimated_runtime_bytes": plan.runtime_bytes_for(weights),
                  "device_ram_bytes": target.ram_bytes, "context_choice": plan.context_note}
        manifest = build_manifest(tmp, ckpt=ckpt, target=target, precision=precision, fmt=module.FORMAT,
                                  context_length=context, quantization=result.quantization,
                                  runtime={"device": target.device, **target.runtime, **result.runtime},
                                  tools=tool_versions(("phi-edge",) + tuple(module.TOOLS)), memory=memory,
                                  verification=result.verification,
                                  tokenizer=source_tokenizers.manifest_entry(source_tok, transformers_check))
        engine_options, load_note = module.check_load(weights) if hasattr(module, "check_load") else ({}, None)
        with steps.step("Checking the artifact's tokenizer against the source"):
            rt = _load_staged(tmp, module, target, notes, engine_options)
            manifest.verification["tokenizer"] = check_tokenizer(rt, tmp, manifest, source_tok)
            if load_note and rt is not None:
                notes.append(load_note)
                manifest.verification["artifact_check"] = load_note
            manifest.write(tmp)
        sample = None
        if smoke_test and rt is not None:
            with steps.step("Generating a sample with the artifact"):
                sample = _smoke_test(rt, 1 if engine_options else 16)
    return ExportReport(output=str(out), target=target.name, format=module.FORMAT, precision=precision,
                        family=ckpt.family, source=ckpt.source, context_length=context,
                        size_bytes=manifest.total_bytes, estimated_runtime_bytes=memory["estimated_runtime_bytes"],
                        quantization=result.quantization, step_times_s=steps.times, sample=sample, notes=notes)


def _transformers_check(source_tok, trust_remote_code: bool) -> str:
    """How transformers' AutoTokenizer agrees with the checkpoint's tokenizer files (imports torch)."""
    return source_tokenizers.describe_differences(source_tokenizers.transformers_differences(source_tok,
                                                                                             trust_remote_code))


def _write_model(module_name: str, ckpt, target, opts, folder: Path, trust_remote_code: bool, *, steps):
    """The format tool's part of an export, as a worker process runs it: (FormatResult, transformers check)."""
    import importlib

    check = _transformers_check(source_tokenizers.SourceTokenizer(ckpt.path), trust_remote_code)
    return importlib.import_module(module_name).export(ckpt, target, opts, folder, steps), check


def _load_staged(folder: Path, module, target, notes: list[str], engine_options: dict | None = None):
    """The staged artifact loaded by its own runtime, or None (with a note) where this machine lacks
    the device or the runtime."""
    from phi_edge.runtimes import load

    device = module.smoke_device(target) if hasattr(module, "smoke_device") else target.device
    if device is None:
        notes.append(f"not test-loaded: this machine has no {target.device} device for target '{target.name}'")
        return None
    if device.lower() != str(target.device).lower():
        notes.append(f"test-loaded on {device}: this machine has no {target.device}")
    try:
        return load(folder, device=device, engine_options=engine_options)
    except BackendUnavailableError as e:
        notes.append(f"not test-loaded: {e}")
        return None


def check_tokenizer(rt, folder: Path, manifest, source_tok) -> str:
    """Encode the probe set with the artifact's own tokenizer and with the source's; any difference
    refuses the export. Without a loaded runtime, the artifact's tokenizer.json is checked with the
    manifest's special tokens (what the qnn and mlx runtimes run; the others' engines are not)."""
    if rt is not None:
        encode, how = rt.encode, f"the artifact's own {manifest.format} runtime tokenizer on {rt.device}"
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        entry = manifest.tokenizer

        def encode(text: str) -> list[int]:
            return entry["prefix_ids"] + tok.encode(text, add_special_tokens=False).ids + entry["suffix_ids"]

        how = "the artifact's tokenizer.json (its runtime could not be loaded on this machine)"
    bad = source_tokenizers.first_mismatch(encode, source_tok)
    if bad:
        text, got, want = bad
        raise TokenizerMismatchError(
            f"the artifact's tokenizer encodes {text!r} as {got} but the source checkpoint's tokenizer gives "
            f"{want}; nothing was written. The artifact would feed the model other tokens than it was trained "
            f"on: please report this with the checkpoint's tokenizer files")
    return f"all {len(source_tokenizers.PROBES)} probe texts encode exactly like the source ({how})"


def _smoke_test(rt, tokens: int = 16) -> dict[str, Any]:
    """Generate a few tokens with the staged artifact, so a broken export never lands."""
    result = rt.generate(SMOKE_PROMPT, max_new_tokens=tokens)
    return {"prompt": SMOKE_PROMPT, "text": result.text, "tokens": len(result.token_ids),
            "device": rt.device, "decode_tokens_per_s": round(result.timings.decode_tokens_per_s, 1)}
