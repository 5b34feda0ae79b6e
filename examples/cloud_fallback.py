"""Answer with the on-device model when it fits, with a hosted Phi endpoint otherwise.

    GITHUB_TOKEN=... python examples/cloud_fallback.py out "Why is the sky blue?"

The artifact at ``out`` is used when it loads and its RAM estimate (phi-edge.json) fits the memory
available now; otherwise GitHub Models' Phi-4-mini answers, through the same API.
"""

import sys

from phi_edge.runtimes import PhiEdgeError, load

folder = sys.argv[1] if len(sys.argv) > 1 else "out"
question = sys.argv[2] if len(sys.argv) > 2 else "Why is the sky blue?"

try:
    rt = load(folder, fallback=True, provider="github", model="microsoft/Phi-4-mini-instruct")
except PhiEdgeError as e:  # e.g. no artifact and no GITHUB_TOKEN
    sys.exit(f"error: {e}")
print(f"[answered by the {rt.source} model" + (f": {rt.fallback_reason}]" if rt.fallback_reason else "]"),
      file=sys.stderr)
for piece in rt.chat([{"role": "user", "content": question}], stream=True, max_new_tokens=200):
    print(piece, end="", flush=True)
print()
