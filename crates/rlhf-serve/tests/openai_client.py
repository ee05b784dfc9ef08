#!/usr/bin/env python3
"""Drives `rlhf serve` with the official `openai` client (PyPI): run by openai_client.rs.

Usage: openai_client.py BASE_URL API_KEY MODEL. Prints one JSON object with what the client
received; assertions that need only the client are made here, the rest in the Rust test.
"""

import json
import sys

import openai
from openai import OpenAI

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
out = {"openai_version": openai.__version__}

out["models"] = [m.id for m in client.models.list()]

messages = [{"role": "user", "content": "Tell me about cats."}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
out["chat"] = {
    "content": r.choices[0].message.content,
    "role": r.choices[0].message.role,
    "finish_reason": r.choices[0].finish_reason,
    "usage": r.usage.model_dump(),
}

pieces, finishes, usage = [], [], None
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finishes.append(c.finish_reason)
out["chat_stream"] = {"content": "".join(pieces), "finishes": finishes, "usage": usage,
                      "chunks": len(pieces)}

r = client.completions.create(model=model, prompt="The cat sat on", max_tokens=12, temperature=0)
out["completion"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason}
pieces = []
for chunk in client.completions.create(
    model=model, prompt="The cat sat on", max_tokens=12, temperature=0, stream=True
):
    pieces.extend(c.text for c in chunk.choices)
out["completion_stream"] = "".join(pieces)

# The RLAIF judge's request: one token, greedy, the five best with their log-probabilities.
r = client.chat.completions.create(
    model=model, messages=messages, max_tokens=1, temperature=0, logprobs=True, top_logprobs=5
)
entry = r.choices[0].logprobs.content[0]
out["judge"] = {
    "token": entry.token,
    "logprob": entry.logprob,
    "top": [[t.token, t.logprob] for t in entry.top_logprobs],
}

errors = {}
try:
    OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
except openai.AuthenticationError as e:
    errors["wrong_key"] = [e.status_code, e.code]
try:
    client.chat.completions.create(model=model, messages=messages, temperature=5)
except openai.BadRequestError as e:
    errors["bad_temperature"] = [e.status_code, e.param]
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
except openai.NotFoundError as e:
    errors["unknown_model"] = [e.status_code, e.code]
out["errors"] = errors

print(json.dumps(out))
