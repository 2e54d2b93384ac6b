"""cuBLAS (through PyTorch) on Llama-2-7B decode shapes: one fused matrix vs a batched pair
or triple vs separate products, each timed with CUDA events, L2 flushed before every run.

    python3 bench/gemm_shapes.py [--tokens 16,32,64] [--runs 20]

Prints JSON: for each token count and layout, microseconds per layer-group and the weight
bytes over that time as a fraction of the device's copy bandwidth (measured here).
"""
import argparse, json

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", default="16,32,64")
ap.add_argument("--runs", type=int, default=20)
a = ap.parse_args()
dev = torch.device("cuda")
flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)


def timed(fn):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(a.runs):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


copy_us = timed(lambda: dst.copy_(src))
bw = 2 * src.numel() / (copy_us * 1e-6)
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
       "copy_bandwidth_bytes_per_s": bw, "rows": []}
D, F = 4096, 11008
g = torch.Generator(device=dev).manual_seed(0)
def w(r, c):
    return (torch.randn(r, c, device=dev, generator=g) * 0.02).to(torch.bfloat16)
groups = {
    "qkv": [w(D, D) for _ in range(3)],
    "gate_up": [w(F, D) for _ in range(2)],
    "o": [w(D, D)],
    "down": [w(D, F)],
}
fused = {k: torch.cat(v, 0).contiguous() for k, v in groups.items() if len(v) > 1}
stacked = {k: torch.stack(v, 0).contiguous() for k, v in groups.items() if len(v) > 1}
for n in [int(t) for t in a.tokens.split(",")]:
    for k, ws in groups.items():
        cols = ws[0].shape[1]
        x = (torch.randn(n, cols, device=dev, generator=g)).to(torch.bfloat16)
        nbytes = sum(t.numel() * 2 for t in ws)
        cases = {"separate": lambda: [x @ t.t() for t in ws]}
        if k in fused:
            f, s = fused[k], stacked[k]
            xb = x.unsqueeze(0).expand(len(ws), n, cols)
            cases["fused"] = lambda: x @ f.t()
            cases["batched"] = lambda: torch.bmm(xb, s.transpose(1, 2))
        for name, fn in cases.items():
            us = timed(fn)
            out["rows"].append({"tokens": n, "group": k, "layout": name, "us": us,
                                "fraction_of_copy_bandwidth": nbytes / (us * 1e-6) / bw})
            print(f"{n:3d} {k:8s} {name:9s} {us:8.1f} us {100 * nbytes / (us * 1e-6) / bw:5.1f} %", flush=True)
print(json.dumps(out))
