"""Every artifact encodes exactly like its source tokenizer (BOS included), chat builds transformers'
ids, and a disagreement refuses the export and fails verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi_edge.exporter.cli import main as phi_export
from phi_edge.exporter.source_tokenizer import PROBES, SourceTokenizer, transformers_differences
from phi_edge.runtimes import PhiEdgeError, load

# Phi-3-mini-4k-instruct's first template: BOS written by the template, no system branch
PHI3_MINI_FIRST = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
                   "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
                   "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}"
                   "{% endif %}{% endfor %}")
# Phi-3-mini-4k / Phi-3-medium's later template: a system branch, no BOS
PHI3_MINI = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] "
             "+ '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
             "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
             "{% endif %}")
# Phi-3.5-mini-instruct's (the demo's own template)
PHI35_MINI = (Path(__file__).resolve().parent.parent / "exporter" / "data" / "phi3_chat_template.jinja").read_text()
# Phi-4-mini-instruct's: no newlines, tools in the system turn
PHI4_MINI = ("{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
             "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
             "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
             "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
CHATS = {
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is 2+2?"}],
    "turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": " Tell me a joke about  spaces."}],
}


def tokenizer_variant(src: Path, dst: Path, config_update: dict | None = None, drop: tuple = (),
                      post_processor: bool = True, with_model: bool = True) -> Path:
    """A copy of checkpoint ``src`` whose tokenizer files are changed as named."""
    if with_model:
        shutil.copytree(src, dst)
    else:
        dst.mkdir(parents=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / f, dst / f)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    for k in drop:
        cfg.pop(k, None)
    cfg.update(config_update or {})
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if not post_processor:
        tj = json.loads((dst / "tokenizer.json").read_text())
        tj["post_processor"] = None
        (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


# ---- what the source tokenizer adds, probed from its files ---------------------------------------------

@pytest.mark.parametrize("update,drop,post,bos", [
    ({"add_bos_token": True}, (), True, True),
    ({"add_bos_token": False}, (), True, False),  # the key overrides the post-processor
    ({}, ("add_bos_token", "add_eos_token"), True, True),  # transformers 5's save_pretrained: no key
    ({}, ("add_bos_token", "add_eos_token"), False, False),
    ({"add_bos_token": True}, (), False, True),
], ids=["key-true", "key-false", "absent-with-post-processor", "absent-without", "key-true-no-post-processor"])
def test_bos_is_decided_from_what_the_files_do(checkpoint, tmp_path, update, drop, post, bos):
    folder = tokenizer_variant(checkpoint("phi3"), tmp_path / "t", update, drop, post, with_model=False)
    src = SourceTokenizer(folder)
    assert src.behaviour.add_bos is bos
    assert src.encode("Hello")[:1] == ([1] if bos else src.encode("Hello", add_special_tokens=False)[:1])
    assert src.behaviour.suffix == []


def test_phi4_mini_adds_no_bos(checkpoint):
    src = SourceTokenizer(checkpoint("phi4-mini"))
    assert src.behaviour.prefix == [] and src.behaviour.bos_token_id is not None
    assert src.encode("Hello") == src.encode("Hello", add_special_tokens=False)


def test_a_llama_declared_tokenizer_is_read_as_written(real_tokenizer, tmp_path):
    """transformers 5 rebuilds a checkpoint declared LlamaTokenizer and loses leading spaces; the
    files as written reproduce llama.cpp's vectors, and the cross-check reports the difference."""
    from conftest import real_tokenizer_vectors

    folder = tmp_path / "llama"
    folder.mkdir()
    shutil.copy(real_tokenizer / "tokenizer.json", folder / "tokenizer.json")
    cfg = json.loads((real_tokenizer / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "LlamaTokenizer"}))
    src = SourceTokenizer(folder)
    for text, ids in real_tokenizer_vectors(real_tokenizer):
        assert src.encode(text) == [1] + ids, text
    diffs = transformers_differences(src)
    assert any(d["text"].startswith(" ") for d in diffs), diffs
    assert src.normalized_config()["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_a_checkpoint_with_only_tokenizer_model_is_refused_with_the_fix(checkpoint, tmp_path):
    folder = tmp_path / "spm"
    shutil.copytree(checkpoint("phi3"), folder)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\x00")  # what the checkpoint reader accepts as a tokenizer
    out = tmp_path / "out"
    r = CliRunner().invoke(phi_export, [str(folder), "--target", "cpu", "--precision", "fp32", "-o", str(out)])
    assert r.exit_code == 1
    assert "no tokenizer.json" in r.output and "tokenizer.model" in r.output
    assert not out.exists()


# ---- every format encodes like the source, or the export is refused -----------------------------------

TARGETS = [("cpu", "fp32", {}), ("intel-cpu", "fp32", {}), ("apple-silicon", "fp32", {}),
           ("qualcomm-npu", "int8", {"context_length": 128})]


@pytest.fixture(scope="module")
def variants(checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("tokenizer-variants")
    return {
        "absent": tokenizer_variant(checkpoint("phi3"), base / "absent", drop=("add_bos_token", "add_eos_token")),
        "key-false": tokenizer_variant(checkpoint("phi3"), base / "key-false", {"add_bos_token": False}),
    }


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["absent", "key-false"])
@pytest.mark.parametrize("target,precision,extra", TARGETS, ids=[t[0] for t in TARGETS])
def test_every_format_encodes_like_the_source(variants, tmp_path, variant, target, precision, extra):
    from phi_edge.exporter.export import run_export

    ckpt = variants[variant]
    out = tmp_path / "out"
    run_export(str(ckpt), target, out, precision=precision, **extra)
    src = SourceTokenizer(ckpt)
    rt = load(out)
    for text in PROBES:
        assert rt.encode(text) == src.encode(text), text
    m = json.loads((out / "phi-edge.json").read_text())
    assert m["tokenizer"]["add_bos_token"] is (variant == "absent")
    assert "encode exactly like the source" in m["verification"]["tokenizer"]


def test_an_artifact_that_drops_bos_is_refused(checkpoint, tmp_path, monkeypatch):
    """The bug this guards against: a manifest that says 'no BOS' for a tokenizer that adds one."""
    import phi_edge.exporter.source_tokenizer as st

    real = st.manifest_entry

    def dropping_bos(src, check):
        return {**real(src, check), "add_bos_token": False, "prefix_ids": []}

    monkeypatch.setattr(st, "manifest_entry", dropping_bos)
    out = tmp_path / "out"
    r = CliRunner().invoke(phi_export, [str(checkpoint("phi3")), "--target", "cpu", "--precision", "fp32",
                                        "-o", str(out)])
    assert r.exit_code == 1, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: the artifact's tokenizer encodes 'Hello world!' as [") and "[1, " in line
    assert not out.exists() and not list(tmp_path.glob(".phi-edge-staging-*"))


# ---- verify: through text, and its exit code means something ------------------------------------------

def test_verify_passes_an_exact_artifact_and_compares_text(exported, checkpoint):
    out = exported("cpu", "fp32")
    r = CliRunner().invoke(phi_export, ["verify", str(out), "--against", str(checkpoint("phi3")), "--json"])
    assert r.exit_code == 0, r.output
    a = json.loads(r.stdout)["against"]
    assert a["greedy_tokens_equal"] and a["greedy_text_equal"] and not a["failures"]
    assert a["artifact_text"] == a["reference_text"] and a["artifact_text"].startswith(" ")


def test_verify_fails_a_mismatching_artifact(exported, checkpoint, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(exported("cpu", "fp32"), out)
    m = json.loads((out / "phi-edge.json").read_text())
    m["tokenizer"]["prefix_ids"] = []  # drops BOS, as artifacts of the old bug did
    (out / "phi-edge.json").write_text(json.dumps(m))
    r = CliRunner().invoke(phi_export, ["verify", str(out), "--against", str(checkpoint("phi3"))])
    assert r.exit_code == 1
    assert "tokenizer  DISAGREES" in r.output and "FAILED: the tokenizer encodes" in r.output


def test_verify_stops_on_the_same_tokens_as_the_artifact(exported, checkpoint, reference):
    """The reference honours EOS too: a real instruct model that ends its answer matches."""
    rt, ref = load(exported("cpu", "fp32")), reference("phi3")
    ids = ref.encode("Hello")
    first = ref.greedy(ids, 1)[0]
    rt.stop_token_ids = frozenset({first})
    assert ref.generate_text("Hello", 8, stop_token_ids=[first]).token_ids == []
    assert rt.generate("Hello", max_new_tokens=8).token_ids == []


def test_streamed_text_is_the_continuation_and_flush_keeps_the_tail(exported, reference):
    rt, ref = load(exported("cpu", "fp32")), reference("phi3")
    for prompt in ("The sky is", "Numbers 3.14 and", "日本語"):
        pieces = list(rt.stream(prompt, max_new_tokens=24, temperature=0))
        result = rt.generate(prompt, max_new_tokens=24, temperature=0)
        assert "".join(pieces) == result.text
        assert result.text == ref.continuation(ref.encode(prompt), result.token_ids)


# ---- chat: exactly apply_chat_template's ids ----------------------------------------------------------

@pytest.mark.parametrize("template", ["phi3-mini", "phi3.5-mini", "phi4-mini", "phi3-mini-first"])
@pytest.mark.parametrize("chat", list(CHATS))
def test_chat_ids_are_apply_chat_template(exported, checkpoint, template, chat):
    tpl = {"phi3-mini": PHI3_MINI, "phi3.5-mini": PHI35_MINI, "phi4-mini": PHI4_MINI,
           "phi3-mini-first": PHI3_MINI_FIRST}[template]
    rt = load(exported("cpu", "fp32"))
    rt.manifest.chat_template = tpl
    hf = SourceTokenizer(checkpoint("phi3")).as_transformers()
    hf.chat_template = tpl
    messages = CHATS[chat]
    if template == "phi3-mini-first" and chat == "system":
        with pytest.raises(PhiEdgeError, match="no system role"):
            rt.chat_ids(messages)
        return
    want = list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
                ["input_ids"])
    assert rt.chat_ids(messages) == want
    assert rt.chat_ids(messages).count(1) == (1 if template == "phi3-mini-first" else 0)  # no double BOS
    reply = rt.chat(messages, max_new_tokens=4)
    assert reply.prompt_token_ids == want


def test_phi4_mini_chat_and_encode(exported, checkpoint):
    rt = load(exported("cpu", "fp32", family="phi4-mini"))
    src = SourceTokenizer(checkpoint("phi4-mini"))
    for text in PROBES:
        assert rt.encode(text) == src.encode(text), text
    hf = src.as_transformers()
    hf.chat_template = PHI4_MINI
    rt.manifest.chat_template = PHI4_MINI
    for messages in CHATS.values():
        want = list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
                    ["input_ids"])
        assert rt.chat_ids(messages) == want
