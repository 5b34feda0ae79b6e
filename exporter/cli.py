"""``phi-export``: the workstation command. ``phi-export MODEL --target T`` exports; the other
subcommands list targets, plan, verify and build demo checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from phi_edge.runtimes.errors import PhiEdgeError

from .checkpoint import DEFAULT_MODEL
from .console import emit, run_guarded


class DefaultToExport(click.Group):
    """``phi-export MODEL ...`` and ``phi-export --target ...`` mean ``phi-export export ...``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["export", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToExport, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="phi-edge")
@click.pass_context
def main(ctx):
    """Export Phi models for edge devices.

    \b
      phi-export demo --target rpi5 --int4 -o out       # the built-in tiny model
      phi-export microsoft/Phi-3.5-mini-instruct --target rpi --int4 -o out
      phi-export targets                                # the device profiles
    """
    from .progress import private_tempdir

    ctx.with_resource(private_tempdir())  # the tools' temp files (torch, MLX kernels) go, success or not



def _default_output(model: str | None, target: str, precision: str | None) -> str:
    name = (model or DEFAULT_MODEL).rstrip("/").split("/")[-1].replace(":", "-")
    return f"{name}-{target}" + (f"-{precision}" if precision else "")


@main.command("export")
@click.argument("model", required=False)
@click.option("-t", "--target", required=True, help="Device profile (see 'phi-export targets'), e.g. rpi5, android, cpu, cuda.")
@click.option("-f", "--format", "fmt", help="Another format the target offers, e.g. gguf for rpi5, android, cpu (default: the target's own; see 'phi-export targets').")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Artifact folder to write (default: MODEL-TARGET-PRECISION).")
@click.option("-p", "--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), help="Weight precision (default: the target's).")
@click.option("--int4", "precision", flag_value="int4", help="Short for --precision int4.")
@click.option("--int8", "precision", flag_value="int8", help="Short for --precision int8.")
@click.option("--context-length", type=int, default=0, help="Context window to plan and export for (default: the target's cap or the model's).")
@click.option("--block-size", type=int, help="[onnx-genai, qnn] Weights per quantization block.")
@click.option("--group-size", type=int, help="[openvino, mlx] Weights per quantization group (-1: per channel).")
@click.option("--sym/--asym", "symmetric", default=None, help="[onnx-genai, openvino] Symmetric or asymmetric quantization.")
@click.option("--accuracy-level", type=int, help="[onnx-genai] MatMulNBits accuracy level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (the targets' default).")
@click.option("--algorithm", type=click.Choice(["rtn", "k_quant"]), help="[onnx-genai] Weight-only quantization algorithm.")
@click.option("--lm-head", type=click.Choice(["int4", "int8", "fp"]), help="[onnx-genai, mlx] Precision of the lm_head (mixed precision).")
@click.option("--embeddings", type=click.Choice(["fp", "int4", "int8"]), help="[onnx-genai, mlx] Precision of the token embeddings.")
@click.option("--int8-layers", help="[mlx] Comma-separated module names kept at 8 bits, e.g. down_proj.")
@click.option("--ratio", type=float, help="[openvino] Share of layers at the main precision (the rest at the backup precision).")
@click.option("--backup-precision", type=click.Choice(["int8_asym", "int8_sym", "none"]), help="[openvino] Precision of the layers outside --ratio.")
@click.option("--awq", is_flag=True, default=None, help="[openvino, onnx-genai int4] Data-aware AWQ (needs --calibration-text).")
@click.option("--scale-estimation", is_flag=True, default=None, help="[openvino] Data-aware scale estimation (needs --calibration-text).")
@click.option("--gptq", is_flag=True, default=None, help="[openvino, onnx-genai int4] Data-aware GPTQ (needs --calibration-text).")
@click.option("--calibration-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="[openvino, qnn, onnx-genai] Local text file for calibration.")
@click.option("--soc", help="[qnn] Snapdragon SoC to compile for (see 'phi-export targets').")
@click.option("--prefill-chunk", type=int, help="[qnn, apple-ane] Tokens per prefill step of the static graph.")
@click.option("--compile/--no-compile", "compile_", default=None, help="[qnn] Ship compiled context binaries (default) or only the QDQ model.")
@click.option("--quant", help="[gguf] llama.cpp quantization mix: Q4_K_M (the --int4 default), Q4_K_S, Q5_K_M, Q6_K, Q4_0, Q8_0. "
              "[apple-ane] int4-per-channel (default) or palettize4.")
@click.option("--revision", help="Hub revision (branch, tag or commit).")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle (.bin) weights. Only for checkpoints you trust.")
@click.option("--trust-remote-code", is_flag=True, help="Run the checkpoint repository's own Python code. Only for repositories you trust.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder; export even if the plan says it will not fit.")
@click.option("--no-smoke-test", is_flag=True, help="Skip loading the artifact and generating a sample after the export.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
def export_cmd(model, target, output, precision, context_length, block_size, group_size, symmetric, accuracy_level,
               algorithm, lm_head, embeddings, int8_layers, ratio, backup_precision, awq, scale_estimation, gptq,
               calibration_text, soc, prefill_chunk, compile_, quant, revision, allow_pickle, trust_remote_code, force,
               no_smoke_test, as_json, fmt=None):
    """Export MODEL (a hub id, a local folder, or 'demo[:family]') for a device target.

    With no MODEL, microsoft/Phi-3.5-mini-instruct from the local Hugging Face cache or the hub.
    """
    from phi_edge.targets import get_target

    from .export import run_export
    from .progress import Steps

    given = {"block_size": block_size, "group_size": group_size, "symmetric": symmetric,
             "accuracy_level": accuracy_level, "algorithm": algorithm, "lm_head": lm_head, "embeddings": embeddings,
             "int8_layers": int8_layers, "ratio": ratio, "backup_precision": backup_precision, "awq": awq,
             "scale_estimation": scale_estimation, "gptq": gptq,
             "calibration_text": str(calibration_text) if calibration_text else None, "soc": soc,
             "prefill_chunk": prefill_chunk, "compile": compile_, "quant": quant}
    quant = {k: v for k, v in given.items() if v is not None}
    base = run_guarded(get_target, target)
    profile = run_guarded(base.with_format, fmt)
    name = base.name if profile is base else f"{base.name}-{profile.format}"  # e.g. Phi-3.5-mini-instruct-rpi5-gguf-int4
    output = output or Path(_default_output(model, name, precision or profile.precision))
    steps = Steps(enabled=None if not as_json else False)
    report = run_guarded(run_export, model, target, output, precision=precision, context_length=context_length,
                         quant=quant, force=force, revision=revision, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code, smoke_test=not no_smoke_test, steps=steps, fmt=fmt)
    emit(report.__dict__, as_json, _print_export)


def _print_export(r: dict) -> None:
    from .sizing import human

    click.echo(f"Exported {r['source']} ({r['family']}) for {r['target']} as {r['format']} {r['precision']} "
               f"-> {r['output']}")
    click.echo(f"  size {human(r['size_bytes'])}, context {r['context_length']} tokens, "
               f"runtime RAM about {human(r['estimated_runtime_bytes'])}")
    if r.get("sample"):
        s = r["sample"]
        click.echo(f"  sample ({s['device']}, {s['decode_tokens_per_s']} tokens/s): {s['prompt']!r} -> {s['text']!r}")
    for n in r.get("notes", []):
        click.echo(f"  note: {n}")
    click.echo(f"Run it: phi-run {r['output']} \"Hello\"")


@main.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def targets_cmd(as_json):
    """List the device profiles."""
    from phi_edge.targets import all_socs, all_targets

    rows = [{"name": t.name, "aliases": list(t.aliases), "format": t.format, "device": t.device,
             "precision": t.precision, "precisions": list(t.precisions), "ram_gb": t.ram_gb,
             "extra": f"phi-edge[{t.extra}]", "moe": "yes" if t.moe else "no", "moe_note": t.moe_note,
             "moe_precisions": list(t.moe_precisions),
             "quantization": t.quantization, "runtime": t.runtime, "description": t.description,
             "formats": {f: _alternative_row(t.with_format(f)) for f in t.formats[1:]}}
            for t in all_targets()]
    socs = [s.__dict__ for s in all_socs()]
    if as_json:
        click.echo(json.dumps({"targets": rows, "socs": socs}, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="phi-edge targets")
    for col in ("target", "format", "device", "default", "precisions", "RAM", "install on device", "Phi-3.5-MoE"):
        table.add_column(col)
    for r in rows:
        moe = r["moe"] + (f" ({', '.join(r['moe_precisions'])} only)" if r["moe_precisions"] else "")
        table.add_row(r["name"] + (f"\n[dim]{', '.join(r['aliases'])}[/]" if r["aliases"] else ""), r["format"],
                      r["device"], r["precision"], ", ".join(r["precisions"]), f"{r['ram_gb']:g} GB",
                      escape(r["extra"]), moe)
        for f, a in r["formats"].items():  # the same device in another format: --format F
            table.add_row(f"[dim]  --format {f}[/]", f, a["device"], a["precision"], ", ".join(a["precisions"]),
                          f"{r['ram_gb']:g} GB", escape(a["extra"]), a["moe"])
    console = Console(width=max(Console().width, 120))
    console.print(table)
    notes = {r["moe_note"] for r in rows if r["moe"] == "no" and r["moe_note"]}
    for n in sorted(notes):
        console.print(f"[dim]MoE: {n}[/]")
    console.print("[dim]Snapdragon SoCs for qualcomm-npu --soc: "
                  + ", ".join(f"{s['key']} ({s['name']}, v{s['htp_arch']})" for s in socs) + "[/]")


def _alternative_row(t) -> dict:
    return {"device": t.device, "precision": t.precision, "precisions": list(t.precisions),
            "extra": f"phi-edge[{t.extra}]", "moe": "yes" if t.moe else "no", "moe_note": t.moe_note,
            "quantization": t.quantization, "runtime": t.runtime, "description": t.description}


@main.command("plan")
@click.argument("model", required=False)
@click.option("-t", "--target", required=True, help="Device profile.")
@click.option("-f", "--format", "fmt", help="Another format the target offers (e.g. gguf for rpi5).")
@click.option("-p", "--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]))
@click.option("--int4", "precision", flag_value="int4")
@click.option("--int8", "precision", flag_value="int8")
@click.option("--context-length", type=int, default=0)
@click.option("--block-size", type=int)
@click.option("--group-size", type=int)
@click.option("--lm-head", type=click.Choice(["int4", "int8", "fp"]))
@click.option("--embeddings", type=click.Choice(["fp", "int4", "int8"]))
@click.option("--quant", help="[gguf] llama.cpp quantization mix, e.g. Q4_K_S.")
@click.option("--revision")
@click.option("--json", "as_json", is_flag=True)
def plan_cmd(model, target, precision, context_length, block_size, group_size, lm_head, embeddings, revision, as_json,
             fmt=None, quant=None):
    """Size, RAM and fit of MODEL on a target, from its config alone (no weights are loaded)."""
    from phi_edge.targets import get_target

    from types import SimpleNamespace

    from .checkpoint import family_of, read_config
    from .export import check_moe, resolve_precision
    from .plan import choose_context

    quant = {k: v for k, v in {"block_size": block_size, "group_size": group_size, "lm_head": lm_head,
                               "embeddings": embeddings, "quant": quant}.items() if v is not None}

    def go():
        from .formats import ExportOptions, check_options, format_module

        t = get_target(target, fmt)
        p = resolve_precision(t, precision)
        check_options(format_module(t.format), ExportOptions(precision=p, quant=quant), t.name)
        source, config, tokenizer_bytes = read_config(model, revision=revision)
        ckpt = SimpleNamespace(source=source, config=config, family=family_of(config),
                               max_context=int(config.get("max_position_embeddings", 4096)),
                               is_moe=family_of(config) == "phimoe")
        plan = choose_context(config, t, p, context_length, quant, extra_bytes=tokenizer_bytes)
        d = {"model": source, "family": ckpt.family, **plan.to_dict()}
        try:
            check_moe(ckpt, t, p)
        except PhiEdgeError as e:
            d["refused"] = str(e)
        if not plan.fits and "refused" not in d:
            d["refused"] = plan.refusal()
        return d

    d = run_guarded(go)
    emit(d, as_json, _print_plan)
    if d.get("refused"):
        sys.exit(1)


def _print_plan(d: dict) -> None:
    from .sizing import human

    click.echo(f"{d['model']} ({d['family']}, {d['parameters'] / 1e6:.1f}M parameters) on {d['target']} "
               f"as {d['format']} {d['precision']}:")
    click.echo(f"  artifact on disk  {human(d['artifact_bytes'])}")
    click.echo(f"  context           {d['context_note']}")
    click.echo(f"  KV cache          {human(d['kv_cache_bytes'])} at {d['context_length']} tokens "
               f"({d['kv_cache_dtype_bytes']} bytes per value; {d['kv_allocation']})")
    click.echo(f"  runtime RAM       {human(d['runtime_bytes'])} of {human(d['device_ram_bytes'])} "
               f"-> {'fits' if d['fits'] else 'does NOT fit'}")
    click.echo(f"  Phi-3.5-MoE       {d['moe']}")
    if d.get("export_peak_bytes"):
        ok = d["export_peak_bytes"] <= d["workstation_ram_bytes"]
        click.echo(f"  export RAM        {human(d['export_peak_bytes'])} of this machine's "
                   f"{human(d['workstation_ram_bytes'])} ({d['export_route']}) -> {'fits' if ok else 'does NOT fit'}")
    if d.get("refused"):
        click.echo(f"error: {d['refused']}", err=True)


@main.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--against", help="Reference checkpoint (folder, hub id or demo[:family]) to compare with.")
@click.option("--prompt", default=None, help="Prompt for the comparison.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--device", help="Override the manifest's device.")
@click.option("--min-cosine", type=float, help="Lowest acceptable mean logit cosine (default: by precision, printed).")
@click.option("--min-top1", type=float, help="Lowest acceptable top-1 agreement, 0-1 (default: by precision, printed).")
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(artifact, against, prompt, max_new_tokens, device, min_cosine, min_top1, as_json):
    """Check an artifact's files, load it, generate; with --against, compare with transformers.

    Exits non-zero when the tokenizer disagrees with the source, greedy generation differs at
    fp32/fp16, or the logit cosine or top-1 agreement falls below the printed thresholds."""
    from .verify import VERIFY_PROMPT, verify

    report = run_guarded(verify, artifact, against=against, prompt=prompt or VERIFY_PROMPT,
                         max_new_tokens=max_new_tokens, device=device, min_cosine=min_cosine, min_top1=min_top1)
    emit(report, as_json, _print_verify)
    if not report["passed"]:
        sys.exit(1)


def _print_verify(r: dict) -> None:
    g = r["generation"]
    click.echo(f"{r['artifact']}: {r['format']} {r['precision']} for {r['target']} on {r['device']}")
    click.echo(f"  checksums  {r['checksums']}; loaded in {r['load_s']}s")
    click.echo(f"  generated  {len(g['token_ids'])} tokens at {g['decode_tokens_per_s']:.1f} tokens/s "
               f"(first token {g['time_to_first_token_s'] * 1000:.0f} ms): {g['text']!r}")
    a = r.get("against")
    if not a:
        return
    t = a["thresholds"]
    click.echo(f"  against    {a['reference']}")
    click.echo(f"  tokenizer  {'agrees' if a['tokenizer_agrees'] else 'DISAGREES on ' + repr(a['tokenizer_mismatches'])}")
    same = a["greedy_tokens_equal"] and a["greedy_text_equal"]
    click.echo(f"  greedy     {'identical' if same else 'differs'} through text "
               f"({a['greedy_matching_prefix']}/{a['greedy_compared']} tokens match before the first difference"
               f"{'; decoded text differs' if a['greedy_tokens_equal'] and not a['greedy_text_equal'] else ''})"
               f"{' [must match at this precision]' if t['greedy_must_match'] else ''}")
    click.echo(f"  top-1      {a['top1_agreement'] * 100:.1f}% agreement over {a['positions']} positions "
               f"(threshold {t['min_top1_agreement'] * 100:.0f}%)")
    click.echo(f"  cosine     {a['logit_cosine_mean']:.6f} mean, {a['logit_cosine_min']:.6f} min (next-token logits "
               f"on {a['logits_on']}; threshold {t['min_logit_cosine_mean']} mean)")
    for f in a["failures"]:
        click.echo(f"FAILED: {f}", err=True)
    if not a["failures"]:
        click.echo("  verdict    passed")


@main.command("demo-checkpoint")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--family", type=click.Choice(["phi3", "phi3-128k", "phimoe", "phi4-mini"]), default="phi3", show_default=True)
@click.option("--seed", type=int, default=None, help="Weight seed (default: the fixed demo seed).")
def demo_checkpoint_cmd(folder, family, seed):
    """Write a tiny random-weight Phi checkpoint shaped like FAMILY (for demos and tests)."""
    from .artifact import check_output
    from .fixtures import SEED, write_checkpoint
    from .progress import tool_output_to_log

    def go():
        check_output(folder, False)
        with tool_output_to_log("writing the checkpoint"):
            write_checkpoint(folder, family, seed=SEED if seed is None else seed)

    run_guarded(go)
    click.echo(f"wrote a tiny {family} checkpoint to {folder}")


@main.command("eval")
@click.argument("artifact")
@click.option("--against", required=True, help="Reference checkpoint (folder, hub id or demo[:family]).")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), help="Local text file (default: a small built-in text).")
@click.option("--window", default=128, show_default=True, help="Tokens per scoring window.")
@click.option("--stride", default=64, show_default=True, help="New tokens scored per window.")
@click.option("--max-tokens", default=2048, show_default=True, help="Score at most this many tokens of the text.")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(artifact, against, text_file, window, stride, max_tokens, as_json):
    """Quality of ARTIFACT against the source checkpoint: perplexity, ratio, KL and top-1 agreement.

    ARTIFACT may also be a checkpoint (e.g. the reference itself, as a sanity check)."""
    from .evaluate import evaluate

    report = run_guarded(evaluate, artifact, against, text_file, window=window, stride=stride, max_tokens=max_tokens)
    emit(report.to_dict(), as_json, _print_eval)


def _print_eval(r: dict) -> None:
    click.echo(f"{r['artifact']} against {r['reference']} on {r['text']} "
               f"({r['tokens_scored']} tokens, {r['windows']} windows of {r['window']}, stride {r['stride']})")
    click.echo(f"  perplexity      {r['perplexity']:.4f} (reference {r['reference_perplexity']:.4f}, "
               f"ratio {r['perplexity_ratio']:.4f})")
    click.echo(f"  mean KL         {r['mean_kl']:.6f} nats")
    click.echo(f"  top-1 agreement {r['top1_agreement'] * 100:.2f}%")
    if r.get("logits"):
        click.echo(f"  logits          {r['logits']}")


@main.command("bench")
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--prompt-tokens", default=128, show_default=True)
@click.option("--gen-tokens", default=64, show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--device", help="Override the manifests' device.")
@click.option("--against", help="Also measure quality (perplexity ratio) against this checkpoint for the plot.")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False), help="Local text for --against (default: eval's built-in text).")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help="Draw the artifacts side by side into this PNG.")
@click.option("--json", "as_json", is_flag=True)
def bench_cmd(artifacts, prompt_tokens, gen_tokens, warmup, repeats, device, against, plot_file, as_json,
              text_file=None):
    """Time to first token, prefill and decode tokens/s, load time and peak RSS of each ARTIFACT.

    With several artifacts (e.g. the rpi5 ONNX int4 and GGUF Q4_K_M exports of one checkpoint) a table puts
    them side by side; --against adds the perplexity ratio ("n/a: why" where eval cannot score one)."""
    from phi_edge.runtimes.bench import bench, plot

    def go():
        results = []
        reference = None
        if against:
            from .evaluate import open_scorer

            reference = open_scorer(against)  # a bad --against is an error; an artifact eval cannot score is n/a
        for a in artifacts:
            r = bench(a, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, warmup=warmup, repeats=repeats,
                      device=device)
            if against:
                from .evaluate import evaluate

                try:
                    r["quality"] = evaluate(a, against, text_file, reference=reference).to_dict()
                except PhiEdgeError as e:
                    r["quality"] = {"perplexity_ratio": None, "error": f"n/a: {e}"}
            results.append(r)
        if plot_file:
            plot(results, plot_file)
        return results

    results = run_guarded(go)
    emit(results if len(results) > 1 else results[0], as_json, lambda _: [_print_bench(r) for r in results])
    if len(results) > 1 and not as_json:
        from phi_edge.runtimes.bench import format_table, side_by_side

        click.echo("\nSide by side (medians):\n" + format_table(side_by_side(results)))
    if plot_file and not as_json:
        click.echo(f"plot written to {plot_file}")


def _print_bench(r: dict) -> None:
    from .sizing import human

    def s(d, scale=1.0, fmt="{:.1f}"):
        return f"{fmt.format(d['median'] * scale)} (min {fmt.format(d['min'] * scale)}, max {fmt.format(d['max'] * scale)})"

    click.echo(f"{r['artifact']}: {r['format']} {r['precision']} on {r['device']}, {human(r['size_bytes'])}, "
               f"{r['prompt_tokens']} prompt + {r['gen_tokens']} generated tokens, {r['repeats']} runs")
    click.echo(f"  load              {r['load_s'] * 1000:.0f} ms")
    click.echo(f"  first token       {s(r['time_to_first_token_s'], 1000, '{:.1f}')} ms")
    click.echo(f"  prefill           {s(r['prefill_tokens_per_s'])} tokens/s")
    click.echo(f"  decode            {s(r['decode_tokens_per_s'])} tokens/s")
    click.echo(f"  peak RSS          {human(r['peak_rss_bytes'])}")
    if "quality" in r:
        from phi_edge.runtimes.bench import quality_cell

        click.echo(f"  perplexity ratio  {quality_cell(r)}")


from .deploy.command import push_cmd  # noqa: E402
main.add_command(push_cmd)

if __name__ == "__main__":
    main()
