"""A tiny chat loop on any phi-edge artifact: python examples/chat.py ARTIFACT"""

import sys

from phi_edge.runtimes import load

rt = load(sys.argv[1])
messages = [{"role": "system", "content": "You are a helpful assistant on a small device."}]
while (line := input("you> ").strip()):
    messages.append({"role": "user", "content": line})
    reply = []
    for piece in rt.chat(messages, stream=True, max_new_tokens=128):
        print(piece, end="", flush=True)
        reply.append(piece)
    print()
    messages.append({"role": "assistant", "content": "".join(reply)})
