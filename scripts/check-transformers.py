#!/usr/bin/env python3
"""Load a directory written by `switchyard transform` in PyTorch + transformers and print the
greedy continuation of a prompt (compare it with `switchyard generate` on the same directory).

usage: check-transformers.py MODEL_DIR [--prompt TEXT] [--max-tokens N] [--chat]
Needs torch and transformers (not part of the test suite: a venv with
`pip install torch transformers` does).
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--prompt", default="")
ap.add_argument("--max-tokens", type=int, default=32)
ap.add_argument("--chat", action="store_true", help="render the prompt as a user message")
a = ap.parse_args()

t0 = time.time()
tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
model.eval()
load_s = time.time() - t0
if a.chat:
    ids = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                                  return_tensors="pt")
    if not torch.is_tensor(ids):
        ids = ids["input_ids"]
else:
    ids = tok(a.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        ids = torch.tensor([[tok.bos_token_id]])
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=a.max_tokens, do_sample=False)
new = out[0, ids.shape[1]:]
print(json.dumps({
    "layers": model.config.num_hidden_layers,
    "params": sum(p.numel() for p in model.parameters()),
    "load_seconds": load_s,
    "prompt_ids": ids[0].tolist(),
    "generated_ids": new.tolist(),
    "text": tok.decode(new, skip_special_tokens=True),
}))
