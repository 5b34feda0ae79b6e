"""``phi-run``: the device command. Streams a completion, runs an interactive chat, or checks an
artifact. Imports only the artifact's own backend (never torch or transformers)."""

from __future__ import annotations

import json
import sys

import click

from .errors import PhiEdgeError


def _fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path())
@click.argument("prompt", required=False)
@click.option("--chat", is_flag=True, help="Interactive chat with the artifact's chat template.")
@click.option("--system", help="System message for --chat (and for PROMPT with --template).")
@click.option("--template", is_flag=True, help="Wrap PROMPT in the chat template as a user message.")
@click.option("-n", "--max-new-tokens", type=int, help="Tokens to generate at most (default: the manifest's).")
@click.option("--temperature", type=float, help="0 is greedy (default).")
@click.option("--top-p", type=float)
@click.option("--top-k", type=int)
@click.option("--repetition-penalty", type=float)
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--device", help="Override the manifest's device (e.g. cpu, CPU, GPU, NPU).")
@click.option("--verify", "verify_only", is_flag=True, help="Check every file's sha256, load, and generate a few tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result instead of streaming text.")
@click.version_option(package_name="phi-edge")
def main(artifact, prompt, chat, system, template, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
         stop, seed, device, verify_only, as_json):
    """Run an exported Phi artifact: phi-run ARTIFACT "prompt"."""
    from . import load

    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, stop=list(stop) or None, seed=seed)
    try:
        rt = load(artifact, device=device, verify=verify_only)
        if verify_only:
            return _verify(rt, as_json)
        if chat:
            return _chat(rt, system, sampling)
        if prompt is None:
            if sys.stdin.isatty():
                _fail("pass a PROMPT, or --chat for an interactive chat", 2)
            prompt = sys.stdin.read()
        if template:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            prompt = rt.chat_prompt(messages)
        if as_json:
            result = rt.generate(prompt, **sampling)
            click.echo(json.dumps({**result.to_dict(), "artifact": str(artifact), "device": rt.device,
                                   "load_s": round(rt.load_s, 3)}, indent=2))
            return
        result = rt.new_result()
        for piece in rt.stream(prompt, result=result, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        t = result.timings
        if sys.stderr.isatty():
            click.echo(f"[{t.generated_tokens} tokens, first after {t.time_to_first_token_s * 1000:.0f} ms, "
                       f"{t.decode_tokens_per_s:.1f} tokens/s, {result.finish_reason}]", err=True)
    except PhiEdgeError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        sys.exit(130)


def _verify(rt, as_json: bool) -> None:
    m = rt.manifest
    result = rt.generate("Hello", max_new_tokens=8)
    report = {"artifact": str(rt.folder), "checksums": "ok", "files": len(m.files), "format": m.format,
              "target": m.target, "device": rt.device, "load_s": round(rt.load_s, 3),
              "generated_tokens": len(result.token_ids), "text": result.text,
              "decode_tokens_per_s": round(result.timings.decode_tokens_per_s, 2), "ok": True}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"ok: {len(m.files)} files match their sha256; {m.format} loaded on {rt.device} in "
                   f"{rt.load_s:.2f}s; generated {len(result.token_ids)} tokens: {result.text!r}")


def _chat(rt, system: str | None, sampling: dict) -> None:
    messages = [{"role": "system", "content": system}] if system else []
    click.echo("Chat with the model; an empty line or Ctrl-D ends it.", err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in rt.chat(messages, stream=True, **sampling):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


if __name__ == "__main__":
    main()
