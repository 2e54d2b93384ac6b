"""Plot bench/results/gpu-llama2-7b.json (+ the PyTorch baseline) into gpu-llama2-7b.png.

    python3 bench/plot_gpu.py [RESULTS_DIR]
"""
import json, os, sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

d = sys.argv[1] if len(sys.argv) > 1 else "bench/results"
sy = json.load(open(os.path.join(d, "gpu-llama2-7b.json")))
tp = os.path.join(d, "gpu-torch-llama2-7b.json")
torch = json.load(open(tp)) if os.path.exists(tp) else None
rows = [r for r in sy["decode"] if r.get("kernels", "engine") == "engine" and (r.get("cuda_graphs", True) or r["batch"] > 8)]
bs = [r["batch"] for r in rows]
ours = [r["tokens_per_s"] for r in rows]
roof = [r["batch"] * 1e3 / r["roofline_ms_per_step"] for r in rows]
fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
x = range(len(bs))
w = 0.27
ax[0].bar([i - w for i in x], roof, w, label="roofline (bytes or FLOPs)", color="#bbb")
ax[0].bar(list(x), ours, w, label="switchyard (CUDA)", color="#2a6")
if torch:
    tb = {r["batch"]: r["tokens_per_s"] for r in torch["decode"]}
    ax[0].bar([i + w for i in x], [tb.get(b, 0) for b in bs], w, label="transformers eager", color="#c53")
ax[0].set_xticks(list(x), [str(b) for b in bs])
ax[0].set_yscale("log")
ax[0].set_xlabel("decode batch")
ax[0].set_ylabel("tokens/s")
ax[0].set_title(f"Llama-2-7B shapes, bf16, {sy['device']}")
ax[0].legend(fontsize=8)
ax[1].bar([str(b) for b in bs], [100 * r["fraction_of_roofline"] for r in rows], color="#2a6")
for p in sy["prefill"]:
    # Older results have one prefill row per length; newer ones add the f32 attention
    # kernel side by side, which is left out of the plot (the JSON keeps it).
    if p.get("attention", "tensor cores") == "tensor cores":
        ax[1].bar(f"pp{p['tokens']}", 100 * p["fraction_of_roofline"], color="#36c")
ax[1].axhline(80, ls="--", c="k", lw=0.8)
ax[1].set_ylabel("% of roofline")
ax[1].set_title("fraction of each step's roofline")
fig.tight_layout()
out = os.path.join(d, "gpu-llama2-7b.png")
fig.savefig(out, dpi=110)
print(out)
