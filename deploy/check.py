#!/usr/bin/env python3
"""Static checks of deploy/ (run by gateway/cli/tests/deploy.rs; needs PyYAML and
kubernetes-validate, which scripts/fetch-test-data.sh installs into .cache/venv):

- every Kubernetes manifest validates strictly (unknown fields are errors) against the
  Kubernetes 1.29 and 1.31 OpenAPI schemas (kubernetes-validate); the GPU overlay is merged
  onto the base Deployment (strategic merge of containers by name) and validated too;
- the ServiceMonitor (a CRD, not in those schemas) against the fields the Prometheus Operator
  requires, checked here;
- cross-references: selectors match the pod labels, probes and the ServiceMonitor use named
  ports that exist, volumes name ConfigMaps that exist, the HPA targets the Deployment, the
  grace period covers preStop + the gateway's shutdown timeout;
- the committed dashboard is what grafana/make_dashboard.py generates;
- compose.yaml: the files it mounts exist, Prometheus scrapes the gateway service's port,
  Grafana's datasource points at the Prometheus service and its dashboard provider at the
  mounted dashboards.

Prints one line per problem and exits 1 if there is any.
"""
import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml
import kubernetes_validate
from kubernetes_validate.utils import ValidationError, SchemaNotFoundError

HERE = os.path.dirname(os.path.abspath(__file__))
K8S = os.path.join(HERE, "k8s")
problems = []


def problem(msg):
    problems.append(msg)
    print(f"FAIL {msg}")


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def validate(doc, where):
    for version in ("1.29", "1.31"):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as e:
            problem(f"{where}: {doc['kind']}/{doc['metadata']['name']} against {version}: {e.message}")
        except SchemaNotFoundError:
            problem(f"{where}: no schema for {doc['apiVersion']} {doc['kind']}")


def strategic_merge(base, patch):
    """Merge `patch` into `base`: maps recursively, lists of named maps by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v) if k in base else v
        return out
    if (isinstance(base, list) and isinstance(patch, list)
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        for p in patch:
            for i, b in enumerate(out):
                if b["name"] == p["name"]:
                    out[i] = strategic_merge(b, p)
                    break
            else:
                out.append(p)
        return out
    return patch


# -- Kubernetes ---------------------------------------------------------------------------
base_dir = os.path.join(K8S, "base")
kust = yaml.safe_load(open(os.path.join(base_dir, "kustomization.yaml")))
listed = set(kust["resources"])
on_disk = {f for f in os.listdir(base_dir) if f.endswith(".yaml") and f != "kustomization.yaml"}
if listed != on_disk:
    problem(f"k8s/base/kustomization.yaml lists {sorted(listed)}, the folder has {sorted(on_disk)}")

docs = {}
for f in sorted(listed):
    for d in load_all(os.path.join(base_dir, f)):
        docs[(d["kind"], d["metadata"]["name"])] = d
        if d["kind"] == "ServiceMonitor":
            continue
        validate(d, f"k8s/base/{f}")
for d in load_all(os.path.join(K8S, "prometheus-adapter.yaml")):
    validate(d, "k8s/prometheus-adapter.yaml")
    rules = yaml.safe_load(d["data"]["config.yaml"])["rules"]
    if not any("switchyard_requests_waiting" in r["seriesQuery"] for r in rules):
        problem("prometheus-adapter.yaml: no rule for switchyard_requests_waiting")

dep = docs[("Deployment", "switchyard")]
svc = docs[("Service", "switchyard")]
pod = dep["spec"]["template"]
labels = pod["metadata"]["labels"]


def selects(sel):
    return all(labels.get(k) == v for k, v in sel.items())


if not selects(dep["spec"]["selector"]["matchLabels"]):
    problem("Deployment selector does not match its pod labels")
if not selects(svc["spec"]["selector"]):
    problem("Service selector does not match the pod labels")
if not selects(docs[("PodDisruptionBudget", "switchyard")]["spec"]["selector"]["matchLabels"]):
    problem("PodDisruptionBudget selector does not match the pod labels")
hpa = docs[("HorizontalPodAutoscaler", "switchyard")]
ref = hpa["spec"]["scaleTargetRef"]
if (ref["kind"], ref["name"]) != ("Deployment", dep["metadata"]["name"]):
    problem(f"HPA targets {ref}, not the Deployment")
if hpa["spec"]["minReplicas"] < 2:
    problem("HPA minReplicas < 2: a PodDisruptionBudget of maxUnavailable 1 would block drains")

c = pod["spec"]["containers"][0]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    p = c.get(probe)
    if not p:
        problem(f"the gateway container has no {probe}")
        continue
    if p["httpGet"]["port"] not in ports:
        problem(f"{probe} uses port {p['httpGet']['port']!r}, not a container port")
if c["readinessProbe"]["httpGet"]["path"] != "/health":
    problem("readiness must be /health (ready only when every model is loaded)")
for sp in svc["spec"]["ports"]:
    if sp["targetPort"] not in ports:
        problem(f"Service targetPort {sp['targetPort']!r} is not a container port")
cm_names = {n for (k, n) in docs if k == "ConfigMap"}
for v in pod["spec"]["volumes"]:
    if "configMap" in v and v["configMap"]["name"] not in cm_names:
        problem(f"volume {v['name']} names ConfigMap {v['configMap']['name']}, not defined")
mounts = {m["name"] for m in c["volumeMounts"]}
for v in pod["spec"]["volumes"]:
    if v["name"] not in mounts:
        problem(f"volume {v['name']} is not mounted")
if not c.get("resources", {}).get("requests"):
    problem("the gateway container has no resource requests")

gw_toml = docs[("ConfigMap", "switchyard-config")]["data"]["gateway.toml"]
m = re.search(r"shutdown_timeout_secs\s*=\s*(\d+)", gw_toml)
shutdown = int(m.group(1)) if m else 30
pre = c["lifecycle"]["preStop"]["exec"]["command"]
pre_sleep = int(pre[1]) if pre[0] == "sleep" else 0
grace = pod["spec"]["terminationGracePeriodSeconds"]
if grace <= pre_sleep + shutdown:
    problem(f"terminationGracePeriodSeconds {grace} <= preStop {pre_sleep} + shutdown {shutdown}")
m = re.search(r"^port\s*=\s*(\d+)", gw_toml, re.M)
if not m or int(m.group(1)) != ports["http"]:
    problem("gateway.toml's port is not the container's http port")

sm = docs[("ServiceMonitor", "switchyard")]
if sm["apiVersion"] != "monitoring.coreos.com/v1":
    problem(f"ServiceMonitor apiVersion {sm['apiVersion']}")
allowed = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels",
           "podTargetLabels", "sampleLimit"}
for k in sm["spec"]:
    if k not in allowed:
        problem(f"ServiceMonitor spec has unknown field {k}")
if sm["spec"]["selector"]["matchLabels"].items() - svc["metadata"]["labels"].items():
    problem("ServiceMonitor selector does not match the Service's labels")
svc_ports = {p["name"] for p in svc["spec"]["ports"]}
for e in sm["spec"]["endpoints"]:
    if e.get("port") not in svc_ports:
        problem(f"ServiceMonitor endpoint port {e.get('port')!r} is not a Service port name")
    if e.get("path", "/metrics") != "/metrics":
        problem("ServiceMonitor path is not /metrics")
    for k in e:
        if k not in {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                     "relabelings", "metricRelabelings"}:
            problem(f"ServiceMonitor endpoint has unknown field {k}")

gpu_dir = os.path.join(K8S, "gpu")
gk = yaml.safe_load(open(os.path.join(gpu_dir, "kustomization.yaml")))
if gk["resources"] != ["../base"]:
    problem("the GPU overlay must build on ../base")
for p in gk["patches"]:
    patch = yaml.safe_load(open(os.path.join(gpu_dir, p["path"])))
    merged = strategic_merge(docs[(patch["kind"], patch["metadata"]["name"])], patch)
    validate(merged, f"k8s/gpu/{p['path']} merged onto base")
    gc = merged["spec"]["template"]["spec"]["containers"][0]
    if gc["resources"]["limits"].get("nvidia.com/gpu") != 1:
        problem("the GPU variant does not limit nvidia.com/gpu to 1")
    if gc["ports"] != c["ports"] or "readinessProbe" not in gc:
        problem("the GPU variant lost the base container's ports or probes")

# -- compose ------------------------------------------------------------------------------
compose = yaml.safe_load(open(os.path.join(HERE, "compose.yaml")))
services = compose["services"]
for name in ("gateway", "prometheus", "grafana"):
    if name not in services:
        problem(f"compose.yaml has no {name} service")
for name, s in services.items():
    for v in s.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("."):
            if not os.path.exists(os.path.join(HERE, src)):
                problem(f"compose.yaml: {name} mounts {src}, which does not exist")
        elif src not in compose.get("volumes", {}):
            problem(f"compose.yaml: {name} uses volume {src}, not declared")
    for d in s.get("depends_on", []):
        if d not in services:
            problem(f"compose.yaml: {name} depends on unknown service {d}")
b = services["gateway"]["build"]
if not os.path.exists(os.path.join(HERE, b["context"], b["dockerfile"])):
    problem("compose.yaml: the gateway's Dockerfile is not where build points")
prom = yaml.safe_load(open(os.path.join(HERE, "prometheus/prometheus.yml")))
gw_port = services["gateway"]["ports"][0].split(":")[1]
targets = [t for sc in prom["scrape_configs"] for st in sc["static_configs"] for t in st["targets"]]
if f"gateway:{gw_port}" not in targets:
    problem(f"prometheus.yml does not scrape gateway:{gw_port} (it scrapes {targets})")
mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
for rf in prom.get("rule_files", []):
    if rf not in mounted:
        problem(f"prometheus.yml loads {rf}, which compose does not mount")
ds = yaml.safe_load(open(os.path.join(HERE, "grafana/provisioning/datasources/prometheus.yml")))
url = ds["datasources"][0]["url"]
if url != "http://prometheus:9090":
    problem(f"the Grafana datasource points at {url}")
uid = ds["datasources"][0]["uid"]
dash_text = open(os.path.join(HERE, "grafana/dashboards/switchyard.json")).read()
for u in set(re.findall(r'"uid":\s*"([^"]+)"', dash_text)) - {"switchyard"}:
    if u != uid:
        problem(f"the dashboard uses datasource uid {u}, the provisioned one is {uid}")
# The committed dashboard is what its generator writes.
with tempfile.TemporaryDirectory() as t:
    fresh = os.path.join(t, "d.json")
    subprocess.run([sys.executable, os.path.join(HERE, "grafana/make_dashboard.py"), "--out", fresh],
                   check=True, capture_output=True)
    if open(fresh).read() != dash_text:
        problem("grafana/dashboards/switchyard.json is not what make_dashboard.py writes: rerun it")
# Panels do not overlap on the grid.
occupied = {}
for p in json.loads(dash_text)["panels"]:
    g = p["gridPos"]
    for x in range(g["x"], g["x"] + g["w"]):
        for y in range(g["y"], g["y"] + g["h"]):
            if (x, y) in occupied:
                problem(f"dashboard panels {occupied[(x, y)]!r} and {p['title']!r} overlap")
            occupied[(x, y)] = p["title"]
    if g["x"] + g["w"] > 24:
        problem(f"dashboard panel {p['title']!r} is wider than the grid")
dp = yaml.safe_load(open(os.path.join(HERE, "grafana/provisioning/dashboards/switchyard.yml")))
gmounts = {v.split(":")[1] for v in services["grafana"]["volumes"]}
if dp["providers"][0]["options"]["path"] not in gmounts:
    problem("the Grafana dashboard provider reads a folder compose does not mount")

if problems:
    print(f"{len(problems)} problem(s)")
    sys.exit(1)
print("deploy/: all checks passed")
