"""The official OpenAI Python client against a running Switchyard gateway.

usage: python openai_client.py BASE_URL   (the gateway serves models "smol" and "stories")
"""
import sys

import openai

base = sys.argv[1].rstrip("/")
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

# Models list.
ids = [m.id for m in client.models.list()]
assert ids == ["stories", "smol"], ids

# Chat.
msgs = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model="smol", messages=msgs, temperature=0, max_tokens=20)
answer = r.choices[0].message.content
assert "Paris" in answer, answer
assert r.choices[0].message.role == "assistant"
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

# Streaming chat with usage: the same text as the non-streaming answer.
chunks = list(client.chat.completions.create(
    model="smol", messages=msgs, temperature=0, max_tokens=20, stream=True,
    stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == answer, (text, answer)
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finish == [r.choices[0].finish_reason], finish

# Sampling with a seed, max_completion_tokens, stop.
a = client.chat.completions.create(model="smol", messages=msgs, temperature=0.8, seed=7,
                                   max_completion_tokens=16)
b = client.chat.completions.create(model="smol", messages=msgs, temperature=0.8, seed=7,
                                   max_completion_tokens=16)
assert a.choices[0].message.content == b.choices[0].message.content

# Logprobs.
lp = client.chat.completions.create(model="smol", messages=msgs, temperature=0, max_tokens=5,
                                    logprobs=True, top_logprobs=2)
assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens
assert len(lp.choices[0].logprobs.content[0].top_logprobs) == 2

# Completions, plain and streaming.
c = client.completions.create(model="stories", prompt="Once upon a time", temperature=0, max_tokens=12)
assert c.choices[0].text.startswith(", there was a little girl named Lily."), c.choices[0].text
s = "".join(x.choices[0].text for x in client.completions.create(
    model="stories", prompt="Once upon a time", temperature=0, max_tokens=12, stream=True) if x.choices)
assert s == c.choices[0].text, (s, c.choices[0].text)

# Errors map onto the client's exception classes.
try:
    client.chat.completions.create(model="nope", messages=msgs)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    client.chat.completions.create(model="smol", messages=msgs, temperature=-1)
    raise AssertionError("negative temperature accepted")
except openai.UnprocessableEntityError as e:
    assert "temperature" in str(e)

print("openai client: all checks passed (openai", openai.__version__ + ")")
