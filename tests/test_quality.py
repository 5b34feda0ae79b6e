"""Quantization quality per backend on a tiny Phi-3 that has learned something (Python's stdlib).

Random-weight fixtures are full of near-ties, so their quality numbers say little; this one is
trained once (a few minutes, cached in the user's cache) and scored on held-out stdlib text.
Run with ``-s`` to see the table.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from phi_edge.exporter.evaluate import evaluate, open_scorer
from phi_edge.exporter.export import run_export

pytestmark = pytest.mark.slow

MAX_TOKENS, WINDOW, STRIDE = 768, 128, 64
QNN = {"context_length": 128, "prefill_chunk": 32}

# (backend, target, precision, export options, bound on the perplexity ratio vs the fp32 checkpoint)
CASES = [
    ("onnx-genai", "cpu", "int4", {}, 1.02),
    ("onnx-genai", "cpu", "int8", {}, 1.005),
    ("openvino", "intel-cpu", "int4", {}, 1.02),
    ("openvino", "intel-cpu", "int8", {}, 1.005),
    ("mlx", "apple-silicon", "int4", {}, 1.02),
    ("mlx", "apple-silicon", "int8", {}, 1.005),
    ("qnn", "qualcomm-npu", "int8", QNN, 1.01),
    ("qnn", "qualcomm-npu", "int4", QNN, 1.05),
]
ENGINES = {"onnx-genai": "onnxruntime_genai", "openvino": "openvino_genai", "mlx": "mlx_lm",
           "qnn": "onnxruntime_qnn"}


@pytest.fixture(scope="session")
def trained():
    from phi_edge.exporter.fixtures.trained import trained_checkpoint

    return trained_checkpoint()


@pytest.fixture(scope="session")
def trained_reference(trained):
    return open_scorer(str(trained))


@pytest.fixture(scope="module")
def figures():
    rows: list[dict] = []
    yield rows
    if rows:
        print("\n\n| backend | precision | perplexity ratio | mean KL | top-1 |\n| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['backend']} | {r['precision']} | {r['perplexity_ratio']:.4f} | {r['mean_kl']:.5f} "
                  f"| {r['top1_agreement']:.3f} |")


@pytest.mark.parametrize("backend,target,precision,quant,bound", CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_perplexity_ratio(trained, trained_reference, figures, tmp_path_factory, backend, target, precision, quant,
                          bound):
    if importlib.util.find_spec(ENGINES[backend]) is None:
        pytest.skip(f"{ENGINES[backend]} is not installed")
    quant = dict(quant)
    context = quant.pop("context_length", 0)
    out = tmp_path_factory.mktemp("quality") / f"{target}-{precision}"
    run_export(str(trained), target, out, precision=precision, context_length=context, quant=quant)
    scorer = open_scorer(str(out))
    report = evaluate(str(out), against=str(trained), text_file=str(trained / "eval.txt"), window=WINDOW,
                      stride=STRIDE, max_tokens=MAX_TOKENS, scorer=scorer, reference=trained_reference)
    row = {"backend": backend, "target": target, "precision": precision, **report.to_dict(),
           "note": getattr(scorer, "logits_note", "")}
    figures.append(row)
    print("\n" + json.dumps({k: row[k] for k in ("backend", "precision", "perplexity", "reference_perplexity",
                                                  "perplexity_ratio", "mean_kl", "top1_agreement",
                                                  "tokens_scored", "note")}))
    assert report.tokens_scored >= MAX_TOKENS - 1
    assert report.reference_perplexity < 100  # it has learned the text (random weights score ~32000)
    assert report.perplexity_ratio <= bound, row
