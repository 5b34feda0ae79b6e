"""Generate once and print the timings: python examples/generate.py ARTIFACT "prompt" """

import sys

from phi_edge.runtimes import load

rt = load(sys.argv[1])
result = rt.generate(sys.argv[2] if len(sys.argv) > 2 else "Hello", max_new_tokens=64)
print(result.text)
t = result.timings
print(f"[{len(result.token_ids)} tokens, first after {t.time_to_first_token_s * 1000:.0f} ms, "
      f"{t.decode_tokens_per_s:.1f} tokens/s, finish: {result.finish_reason}]", file=sys.stderr)
