"""PyTorch + transformers baseline on the same weights as `switchyard bench gpu`.

    python3 bench/torch_baseline.py DIR [--batch 1,8,32,64] [--prompt 128] [--gen 128]

DIR is what `switchyard bench gpu --dummy llama2-7b --save-weights DIR` wrote (config.json +
bf16 model.safetensors). Eager attention, bf16, greedy, `generate` with the default dynamic
cache. Decode tokens/s = batch * gen / (generate time - prefill time). Prints JSON.
"""
import argparse, json, sys, time

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--batch", default="1,8,32,64")
ap.add_argument("--prompt", type=int, default=128)
ap.add_argument("--gen", type=int, default=128)
a = ap.parse_args()

t = time.time()
import os
model = AutoModelForCausalLM.from_pretrained(os.path.abspath(a.dir), torch_dtype=torch.bfloat16, attn_implementation="eager").cuda().eval()
load_s = time.time() - t
vocab = model.config.vocab_size
out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "load_secs": load_s, "decode": []}
import transformers
out["transformers"] = transformers.__version__
g = torch.Generator().manual_seed(0)
for b in [int(x) for x in a.batch.split(",")]:
    ids = torch.randint(3, vocab, (b, a.prompt), generator=g).cuda()
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        torch.cuda.synchronize()
        t = time.time()
        model(ids, attention_mask=mask)
        torch.cuda.synchronize()
        pre = time.time() - t
        t = time.time()
        r = model.generate(ids, max_new_tokens=a.gen, min_new_tokens=a.gen, **kw)
        torch.cuda.synchronize()
        total = time.time() - t
    assert r.shape[1] == a.prompt + a.gen, r.shape
    tps = b * a.gen / max(total - pre, 1e-9)
    out["decode"].append({"batch": b, "tokens_per_s": tps, "generate_secs": total, "prefill_secs": pre})
    print(f"torch batch {b}: {tps:.1f} tok/s", file=sys.stderr, flush=True)
print(json.dumps(out, indent=1))
