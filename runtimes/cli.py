"""``phi-run``: the device command. Streams a completion, runs an interactive chat, checks an
artifact, or serves it over OpenAI-compatible HTTP (``phi-run serve``). Imports only the artifact's
own backend (never torch or transformers)."""

from __future__ import annotations

import json
import os
import sys

import click

from .errors import PhiEdgeError


def _fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class DefaultToRun(click.Group):
    """``phi-run ARTIFACT "prompt"`` means ``phi-run run ARTIFACT "prompt"``; ``phi-run serve ...`` serves."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="phi-edge")
def main():
    """Run an exported Phi artifact on this device, or serve it.

    \b
      phi-run OUT "Why is the sky blue?"          # stream a completion (phi-run run OUT ...)
      phi-run OUT --chat                          # interactive chat
      phi-run OUT --image photo.jpg "What is in this picture?"   # vision artifacts
      phi-run serve OUT --port 8000               # OpenAI-compatible server on 127.0.0.1
      phi-run https://HOST/v1 --model NAME "Hi"   # an OpenAI-compatible endpoint instead of a folder
    """


@main.command("run", context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--image", "images", multiple=True, type=click.Path(),
              help="An image for the prompt (vision artifacts: Phi-4-multimodal on onnx-genai).")
@click.option("--device", help="Override the manifest's device (e.g. cpu, CPU, GPU, NPU).")
@click.option("--verify", "verify_only", is_flag=True, help="Check every file's sha256, load, and generate a few tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result instead of streaming text.")
@click.option("--model", help="[endpoint] Model name, when ARTIFACT is an http(s):// URL or a provider name.")
@click.option("--provider", type=click.Choice(["github", "azure", "nvidia", "ollama"]),
              help="[endpoint] Preset: base URL and the environment variable holding the key.")
@click.option("--api-key", envvar="PHI_EDGE_API_KEY", help="[endpoint] Key (default: the provider's variable, "
              "or PHI_EDGE_API_KEY).")
def run(artifact, prompt, chat, system, template, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
        stop, seed, images, device, verify_only, as_json, model, provider, api_key):
    """Run an exported Phi artifact (or an endpoint): phi-run ARTIFACT "prompt"."""
    from . import load
    from .remote import PROVIDERS

    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, stop=list(stop) or None, seed=seed)
    try:
        if artifact in PROVIDERS and not os.path.isdir(artifact):
            rt = load(None, model=model, api_key=api_key, provider=artifact)
        elif artifact.startswith(("http://", "https://")) or provider or model:
            rt = load(artifact, model=model, api_key=api_key, provider=provider)
        else:
            rt = load(artifact, device=device, verify=verify_only)
        if verify_only:
            if rt.manifest is None:
                _fail("--verify checks an artifact folder; an endpoint has none", 2)
            return _verify(rt, as_json)
        if images:
            if rt.manifest is None:
                _fail("--image works with an exported artifact folder, not an endpoint", 2)
            if chat:
                _fail("--image goes with a PROMPT, not --chat", 2)
            sampling["images"] = list(images)
        if chat:
            return _chat(rt, system, sampling)
        if prompt is None:
            if sys.stdin.isatty():
                _fail("pass a PROMPT, or --chat for an interactive chat", 2)
            prompt = sys.stdin.read()
        if template:
            if images:
                from .images import with_image_tags

                prompt = with_image_tags(prompt, len(images))
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            prompt = rt.chat_prompt(messages)
        if as_json:
            result = rt.generate(prompt, **sampling)
            click.echo(json.dumps({**result.to_dict(), "artifact": str(artifact), "device": rt.device,
                                   "load_s": round(rt.load_s, 3), "source": getattr(rt, "source", "local")},
                                  indent=2))
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


@main.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --api-key or --no-auth.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="PHI_EDGE_API_KEY", help="Require 'Authorization: Bearer KEY' (or set PHI_EDGE_API_KEY).")
@click.option("--no-auth", is_flag=True, help="Serve a non-loopback --host without a key (anyone who can reach it can use it).")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0, 4096),
              help="Requests that may wait behind the running one; more get 429 with Retry-After.")
@click.option("--model-name", help="Model id clients use (default: the artifact folder's name).")
@click.option("--device", help="Override the manifest's device (e.g. cpu, CPU, GPU, NPU).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve_cmd(artifact, host, port, api_key, no_auth, max_queue, model_name, device, log_level):
    """Serve ARTIFACT over OpenAI-compatible HTTP: /v1/models, /v1/chat/completions, /v1/completions."""
    from .serve import serve

    try:
        serve(artifact, host=host, port=port, api_key=api_key, no_auth=no_auth, device=device,
              max_queue=max_queue, model_id=model_name, log_level=log_level)
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
