#!/usr/bin/env python3
"""Writes dashboards/switchyard.json, the Grafana dashboard of a Switchyard deployment.

Every query uses series the gateway exports (gateway/cli/tests/deploy.rs checks the names
against a live /metrics). Run `python3 deploy/grafana/make_dashboard.py` after editing.
"""
import json
import os
import sys

DS = {"type": "prometheus", "uid": "prometheus"}
SEL = 'model=~"$model", instance=~"$instance"'
panels = []
_next_id = [1]
_y = [0]


def row(title):
    panels.append({"type": "row", "title": title, "id": _next_id[0], "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": _y[0]}, "panels": []})
    _next_id[0] += 1
    _y[0] += 1


def panel(title, targets, unit="short", x=0, w=8, h=8, kind="timeseries", desc="", stack=False,
          newline=False):
    p = {
        "type": kind,
        "title": title,
        "description": desc,
        "id": _next_id[0],
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": _y[0]},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [
            {"datasource": DS, "refId": chr(ord("A") + i), "expr": e, "legendFormat": l}
            for i, (e, l) in enumerate(targets)
        ],
    }
    if kind == "timeseries" and stack:
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 30}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    _next_id[0] += 1
    panels.append(p)
    if x + w >= 24:
        _y[0] += h


def quantiles(metric, by="model"):
    return [
        (f'histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{SEL}}}[$__rate_interval])))',
         f"p{int(q * 100)} {{{{{by}}}}}")
        for q in (0.5, 0.95, 0.99)
    ]


row("Traffic")
panel("Requests per second by outcome",
      [(f"sum by (model, outcome) (rate(switchyard_requests_total{{{SEL}}}[$__rate_interval]))",
        "{{model}} {{outcome}}")], unit="reqps", stack=True,
      desc="Generation requests: ok, invalid (client errors), rejected (429), not_ready (503), "
           "cancelled (client went away), error (engine failure).")
panel("Error ratio",
      [(f'sum by (model) (rate(switchyard_requests_total{{{SEL}, outcome=~"error|rejected|not_ready"}}[$__rate_interval]))'
        f' / sum by (model) (rate(switchyard_requests_total{{{SEL}, outcome!="invalid"}}[$__rate_interval]))',
        "{{model}}")], unit="percentunit", x=8,
      desc="Same ratio as the SwitchyardHighErrorRatio alert (alerts at 5 %).")
panel("HTTP responses by status",
      [('sum by (status) (rate(switchyard_http_requests_total{instance=~"$instance"}[$__rate_interval]))',
        "{{status}}")], unit="reqps", x=16, stack=True)

row("Latency")
panel("Time to first token", quantiles("switchyard_time_to_first_token_seconds"), unit="s")
panel("Inter-token latency", quantiles("switchyard_inter_token_latency_seconds"), unit="s", x=8)
panel("End-to-end request latency", quantiles("switchyard_e2e_request_latency_seconds"), unit="s",
      x=16)
panel("Queue time (waiting for a slot)", quantiles("switchyard_queue_time_seconds"), unit="s")
panel("Scheduler step duration", quantiles("switchyard_step_seconds"), unit="s", x=8)
panel("Batch: sequences and tokens per forward pass",
      [(f"sum by (model) (rate(switchyard_batch_size_sum{{{SEL}}}[$__rate_interval])) / "
        f"sum by (model) (rate(switchyard_batch_size_count{{{SEL}}}[$__rate_interval]))",
        "sequences {{model}}"),
       (f"sum by (model) (rate(switchyard_batch_tokens_sum{{{SEL}}}[$__rate_interval])) / "
        f"sum by (model) (rate(switchyard_batch_tokens_count{{{SEL}}}[$__rate_interval]))",
        "tokens {{model}}")], x=16)

row("Tokens")
panel("Tokens per second",
      [(f"sum by (model) (rate(switchyard_prompt_tokens_total{{{SEL}}}[$__rate_interval]))",
        "prompt {{model}}"),
       (f"sum by (model) (rate(switchyard_generation_tokens_total{{{SEL}}}[$__rate_interval]))",
        "generated {{model}}")], unit="short")
panel("Tokens saved by the tokenizer patch",
      [(f"sum by (model, kind) (rate(switchyard_tokens_saved_total{{{SEL}}}[$__rate_interval]))",
        "{{model}} {{kind}}")], unit="short", x=8, stack=True,
      desc="Base-tokenizer ids minus the ids the model processed (AdaptiVocab patches).")
panel("Prompt tokens saved (share)",
      [(f'sum by (model) (rate(switchyard_tokens_saved_total{{{SEL}, kind="prompt"}}[$__rate_interval]))'
        f" / sum by (model) (rate(switchyard_prompt_tokens_total{{{SEL}}}[$__rate_interval]))",
        "{{model}}")], unit="percentunit", x=16,
      desc="Share of base prompt tokens the patched model did not have to read.")

row("Scheduler and KV cache")
panel("Running and waiting requests",
      [(f"sum by (model) (switchyard_requests_running{{{SEL}}})", "running {{model}}"),
       (f"sum by (model) (switchyard_requests_waiting{{{SEL}}})", "waiting {{model}}")])
panel("KV cache bytes: reserved, mapped, used",
      [(f"sum by (model) (switchyard_kv_cache_reserved_bytes{{{SEL}}})", "reserved {{model}}"),
       (f"sum by (model) (switchyard_kv_cache_mapped_bytes{{{SEL}}})", "mapped {{model}}"),
       (f"sum by (model) (switchyard_kv_cache_used_bytes{{{SEL}}})", "used {{model}}"),
       (f"sum by (model) (switchyard_kv_cache_capacity_bytes{{{SEL}}})", "capacity {{model}}")],
      unit="bytes", x=8,
      desc="Reserved: address space; mapped: physical memory behind it; used: live tokens; "
           "capacity: every slot at full context (a static allocator maps all of it).")
panel("KV cache usage and slots",
      [(f"max by (model) (switchyard_kv_cache_usage_ratio{{{SEL}}})", "usage {{model}}"),
       (f"sum by (model) (switchyard_kv_cache_mapped_bytes{{{SEL}}}) / "
        f"sum by (model) (switchyard_kv_cache_capacity_bytes{{{SEL}}})", "mapped/capacity {{model}}")],
      unit="percentunit", x=16)
panel("KV slots in use",
      [(f"sum by (model) (switchyard_kv_cache_slots_in_use{{{SEL}}})", "{{model}}")])
panel("Activation sparsity",
      [(f"max by (model) (switchyard_activation_sparsity_ratio{{{SEL}}})", "{{model}}")],
      unit="percentunit", x=8,
      desc="Share of linear-layer inputs the pipeline's kernels skip (0 = dense).")
panel("KV allocator call latency p99",
      [(f'histogram_quantile(0.99, sum by (plugin, op, le) (rate(switchyard_plugin_call_seconds_bucket{{{SEL}, op=~"acquire|ensure|release"}}[$__rate_interval])))',
        "{{plugin}} {{op}}")], unit="s", x=16,
      desc="ensure maps pages on the decode path (vAttention maps ahead on a background "
           "thread, so this should stay in microseconds); built-in allocators are not plugins.")
panel("KV pages mapped / unmapped per second",
      [(f"sum by (model) (rate(switchyard_kv_cache_pages_mapped_total{{{SEL}}}[$__rate_interval]))",
        "mapped {{model}}"),
       (f"sum by (model) (rate(switchyard_kv_cache_pages_unmapped_total{{{SEL}}}[$__rate_interval]))",
        "unmapped {{model}}")], unit="ops",
      desc="Paging allocators (vAttention): physical pages mapped behind growing sequences, "
           "and unmapped from idle slots at the memory budget.")
panel("KV mapping: wait per waiting call, time mapping ahead",
      [(f"sum by (model) (rate(switchyard_kv_cache_map_wait_seconds_total{{{SEL}}}[$__rate_interval])) / "
        f"sum by (model) (rate(switchyard_kv_cache_map_waits_total{{{SEL}}}[$__rate_interval]))",
        "wait latency {{model}}"),
       (f"sum by (model) (rate(switchyard_kv_cache_map_ahead_seconds_total{{{SEL}}}[$__rate_interval]))",
        "ahead s/s {{model}}")], unit="s", x=8,
      desc="Mean time a forward step waited on page mapping when it had to; seconds per second "
           "the background thread spent mapping ahead of need.")
panel("Sequences cancelled (client went away)",
      [(f"sum by (model) (rate(switchyard_sequences_cancelled_total{{{SEL}}}[$__rate_interval]))",
        "{{model}}")], unit="ops", x=16)

row("Plugins and pipelines")
panel("Plugin calls per second",
      [(f"sum by (plugin, op, outcome) (rate(switchyard_plugin_calls_total{{{SEL}}}[$__rate_interval]))",
        "{{plugin}} {{op}} {{outcome}}")], unit="ops")
panel("Plugin call duration p99",
      [(f"histogram_quantile(0.99, sum by (plugin, op, le) (rate(switchyard_plugin_call_seconds_bucket{{{SEL}}}[$__rate_interval])))",
        "{{plugin}} {{op}}")], unit="s", x=8)
panel("Plugin traps",
      [(f"sum by (model, plugin, reason) (increase(switchyard_plugin_traps_total{{{SEL}}}[$__rate_interval]))",
        "{{model}} {{plugin}} {{reason}}")], unit="short", x=16,
      desc="Calls that trapped, ran past their deadline or their memory limit.")
panel("Pipeline swaps",
      [(f"sum by (model, result) (increase(switchyard_pipeline_swaps_total{{{SEL}}}[$__rate_interval]))",
        "{{model}} {{result}}")], unit="short")
panel("Swap latency", quantiles("switchyard_pipeline_swap_seconds"), unit="s", x=8)
panel("Pipeline generations",
      [(f"max by (model) (switchyard_pipeline_generation{{{SEL}}})", "current {{model}}"),
       (f"max by (model) (switchyard_pipeline_generations_active{{{SEL}}})", "active {{model}}")],
      x=16, desc="The generation new requests go to, and generations still finishing requests.")

row("Process")
panel("Models ready", [(f"switchyard_model_ready{{{SEL}}}", "{{model}} {{instance}}")],
      kind="stat", w=6)
panel("Model load time", [(f"switchyard_model_load_seconds{{{SEL}}}", "{{model}} {{instance}}")],
      kind="stat", unit="s", x=6, w=6)
panel("Resident memory", [('process_resident_memory_bytes{job="switchyard", instance=~"$instance"}',
                           "{{instance}}")], unit="bytes", x=12, w=6)
panel("CPU", [('rate(process_cpu_seconds_total{job="switchyard", instance=~"$instance"}[$__rate_interval])',
               "{{instance}}")], unit="percentunit", x=18, w=6)


def var(name, query, label):
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": "V"}, "definition": query, "refresh": 2,
        "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"text": "All", "value": "$__all"}, "sort": 1,
    }


dashboard = {
    "uid": "switchyard",
    "title": "Switchyard",
    "description": "Requests, latency, tokens, KV cache, plugins and pipelines of Switchyard gateways.",
    "tags": ["switchyard", "llm", "inference"],
    "timezone": "browser",
    "editable": False,
    "graphTooltip": 1,
    "refresh": "10s",
    "schemaVersion": 39,
    "version": 1,
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [
        var("model", "label_values(switchyard_model_ready, model)", "Model"),
        var("instance", "label_values(switchyard_build_info, instance)", "Instance"),
    ]},
    "panels": panels,
}

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboards", "switchyard.json")
if len(sys.argv) == 3 and sys.argv[1] == "--out":
    out = sys.argv[2]
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
print(f"wrote {out}: {len([p for p in panels if p['type'] != 'row'])} panels")
