#!/usr/bin/env python3
"""Offline validation of the ditfleet deployment artefacts.

Run through scripts/validate-deploy.sh (which prepares the virtualenv). Checks:

* helm/ditfleet: `helm lint --strict` and `helm template` (Helm v4 Go SDK through
  helm-python-sdk) with the chart defaults and every deploy-tests/values/*.yaml;
  values.schema.json validation.
* every rendered object: core kinds strictly against the Kubernetes OpenAPI schemas
  (kubernetes-validate, each version in K8S_VERSIONS); CRD kinds against the JSON
  schemas committed in deploy-tests/crd-schemas/ (check-jsonschema CLI); any other
  kind is an error.
* chart invariants the schemas cannot express (GPU limits, grace periods, secrets,
  security context, selectors that must match, metric names of alerts/dashboard).
* k8s/: k8s/base is exactly what deploy-tests/render_k8s_base.py produces from the
  chart; `kubectl kustomize` of k8s/base and k8s/overlays/dev is validated the same way.
* the verify-model init container script, run here with /bin/sh against a fake model
  directory: passes when every file matches, fails on a wrong hash, a missing file, or
  no checksum list.
* docker/Dockerfile.*: hadolint (Docker itself is not available here).
* the committed JSON schemas and values.schema.json are valid schemas (metaschema).
* negative cases: every deploy-tests/values/broken/*.yaml must be rejected, and every
  deploy-tests/broken-manifests/*.yaml must fail object validation.

Exit status 0 only if everything passed.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "ditfleet"
TESTS = ROOT / "deploy-tests"
K8S = ROOT / "k8s"
K8S_VERSIONS = ["1.30.0", "1.33.0"]
RELEASE, NAMESPACE = "ditfleet", "ditfleet"

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
}
# What the binaries export (docs/operations.md, "Health and metrics"); alerts and panels may use
# only these.
METRICS = {
    "ditfleet_queue_depth", "ditfleet_queue_consumers", "ditfleet_queue_oldest_age_seconds",
    "ditfleet_jobs_total",
    "ditfleet_job_duration_seconds_bucket", "ditfleet_job_duration_seconds_count",
    "ditfleet_job_retries_total", "ditfleet_dlq_total",
    "ditfleet_gpu_utilization_ratio", "ditfleet_gpu_memory_used_bytes",
    "ditfleet_gpu_memory_total_bytes", "ditfleet_gpu_temperature_celsius", "ditfleet_gpu_healthy",
    "ditfleet_worker_state", "ditfleet_job_gpu_seconds_total", "ditfleet_worker_gpu_seconds_total",
    "ditfleet_job_cost_token_steps_total", "ditfleet_model_loaded",
}


class Failure(Exception):
    pass


class Report:
    def __init__(self, quiet: bool = False) -> None:
        self.passed: list[str] = []
        self.failed: list[str] = []
        self.quiet = quiet

    def ok(self, what: str) -> None:
        self.passed.append(what)
        if not self.quiet:
            print(f"  ok    {what}")

    def fail(self, what: str, why: str) -> None:
        self.failed.append(f"{what}: {why}")
        if not self.quiet:
            print(f"  FAIL  {what}: {why}")


# --------------------------------------------------------------------------- helm


def load_values(path: Path | None) -> dict:
    if path is None:
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise Failure(f"{path}: values file is not a mapping")
    return data


def lint(values: dict) -> None:
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE,
                       kube_version="v" + K8S_VERSIONS[0])
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    problems += [{"error": e} for e in report.get("errors") or []]
    if problems:
        raise Failure("helm lint: " + "; ".join(str(p.get("error")) for p in problems))


def render(values: dict) -> list[tuple[str, dict]]:
    """helm template: returns (template path, object) for every rendered object."""
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE,
                                 is_install=True)
    objects = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                objects.append((template, doc))
    if not objects:
        raise Failure("render produced no objects")
    return objects


# ------------------------------------------------------------------- validation


def validate_objects(objects: list[tuple[str, dict]], label: str, crd_dir: Path,
                     report: Report) -> bool:
    """Core kinds in-process; CRD kinds written to crd_dir for one batched
    check-jsonschema run per kind. Returns True when no core object failed."""
    good = True
    for i, (origin, obj) in enumerate(objects):
        kind, api = obj.get("kind"), obj.get("apiVersion")
        name = (obj.get("metadata") or {}).get("name")
        key = (api, kind)
        where = f"{label}: {origin} {kind}/{name}"
        if key in CRD_SCHEMAS:
            out = crd_dir / CRD_SCHEMAS[key].removesuffix(".json")
            out.mkdir(parents=True, exist_ok=True)
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{label}--{i}--{kind}-{name}")
            (out / f"{safe}.json").write_text(json.dumps(obj))
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                report.fail(where, f"k8s {version} strict: {path}: {e.message}")
                good = False
                break
            except kubernetes_validate.SchemaNotFoundError:
                report.fail(where, f"no schema for {api} {kind} (neither Kubernetes nor committed CRD)")
                good = False
                break
    return good


def check_crds(crd_dir: Path, report: Report) -> bool:
    """One check-jsonschema run per CRD kind over every object written to crd_dir."""
    all_ok = True
    if not crd_dir.exists():
        return True
    for sub in sorted(p for p in crd_dir.iterdir() if p.is_dir()):
        files = sorted(str(f) for f in sub.glob("*.json"))
        schema = TESTS / "crd-schemas" / f"{sub.name}.json"
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "check-jsonschema"), "--schemafile", str(schema),
             "--output-format", "text", *files],
            capture_output=True, text=True)
        what = f"check-jsonschema {sub.name}: {len(files)} object(s)"
        if proc.returncode == 0:
            report.ok(what)
        else:
            report.fail(what, (proc.stdout + proc.stderr).strip()[-2000:])
            all_ok = False
    return all_ok


# ------------------------------------------------------------------- invariants


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def promql_metrics(expr: str) -> set[str]:
    """ditfleet_* metric names of a PromQL expression (label matchers removed first)."""
    return set(re.findall(r"\b(ditfleet_[a-z_]+)\b", re.sub(r"\{[^}]*\}", "", expr)))


def invariants(objects: list[tuple[str, dict]], values: dict, report: Report, label: str) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        merged = chart.merge_values(values)
    problems: list[str] = []
    objs = [o for _, o in objects]
    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    secret_names = {s["metadata"]["name"] for s in by_kind.get("Secret", [])}

    # Secrets: only the dev-credentials Secret, only when explicitly asked for.
    for name in secret_names:
        if not (merged["secrets"]["devCredentials"]["enabled"] and name.endswith("-dev-credentials")):
            problems.append(f"Secret {name} rendered without secrets.devCredentials.enabled")

    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: service account token is mounted")
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{name}: pod not runAsNonRoot")
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext", {})
            if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
                    and "ALL" in sc.get("capabilities", {}).get("drop", [])):
                problems.append(f"{name}/{c['name']}: securityContext not locked down")
        main = pod["containers"][0]
        env = env_of(main)
        for var in ("DITFLEET_AMQP_URL", "DITFLEET_REDIS_URL"):
            if "secretKeyRef" not in env.get(var, {}).get("valueFrom", {}):
                problems.append(f"{name}: {var} does not come from a Secret")
        port = int(env["DITFLEET_HTTP_ADDR"]["value"].rsplit(":", 1)[1])
        cport = {p["name"]: p["containerPort"] for p in main["ports"]}.get("http-metrics")
        if port != cport:
            problems.append(f"{name}: DITFLEET_HTTP_ADDR port {port} != containerPort {cport}")
        if main["livenessProbe"]["httpGet"]["path"] != "/healthz" or \
                main["readinessProbe"]["httpGet"]["path"] != "/readyz":
            problems.append(f"{name}: probes not on /healthz and /readyz")

    # One worker Deployment per pool with the pool's GPUs and grace period.
    defaults = merged["workerDefaults"]
    for raw in merged["workerPools"]:
        pool = {**defaults, **raw}
        dname = f"{RELEASE}-worker-{pool['name']}"
        dep = deployments.get(dname)
        if dep is None:
            problems.append(f"pool {pool['name']}: no Deployment {dname}")
            continue
        pod = dep["spec"]["template"]["spec"]
        main = pod["containers"][0]
        env = env_of(main)
        limits = main["resources"].get("limits", {})
        gpus = int(pool["gpusPerPod"])
        if gpus and int(limits.get("nvidia.com/gpu", -1)) != gpus:
            problems.append(f"{dname}: nvidia.com/gpu limit {limits.get('nvidia.com/gpu')} != gpusPerPod {gpus}")
        if not gpus and "nvidia.com/gpu" in limits:
            problems.append(f"{dname}: GPU limit on a pool without GPUs")
        want = int(pool["maxJobSeconds"]) + int(pool["gracePeriodMarginSeconds"])
        if pod["terminationGracePeriodSeconds"] != want:
            problems.append(f"{dname}: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} != {want}")
        if int(env["DITFLEET_SHUTDOWN_GRACE_S"]["value"]) >= pod["terminationGracePeriodSeconds"]:
            problems.append(f"{dname}: DITFLEET_SHUTDOWN_GRACE_S leaves no margin before SIGKILL")
        if env["DITFLEET_WORKER_CLASSES"]["value"] != ",".join(pool["classes"]):
            problems.append(f"{dname}: DITFLEET_WORKER_CLASSES mismatch")
        flux = pool["engine"] == "flux"
        inits = [c["name"] for c in pod.get("initContainers", [])]
        if flux and merged["modelCache"]["verify"]["enabled"] and "verify-model" not in inits:
            problems.append(f"{dname}: flux pool without the verify-model init container")
        if flux and "FLUX_MODEL_DIR" not in env:
            problems.append(f"{dname}: flux pool without FLUX_MODEL_DIR")
        # Multi-GPU flux pools pick their parallel plan (autotuned by default) and keep the
        # measured table on a mounted volume; single-GPU pools run one device and get neither.
        multi = flux and gpus > 1
        if multi and env.get("DITFLEET_PLAN", {}).get("value") != pool["plan"]:
            problems.append(f"{dname}: DITFLEET_PLAN != pool plan {pool['plan']!r}")
        if not multi and "DITFLEET_PLAN" in env:
            problems.append(f"{dname}: DITFLEET_PLAN set on a pool with {gpus} GPU(s)")
        if multi:
            cache = env.get("DITFLEET_PLAN_CACHE", {}).get("value", "")
            mounts = {m["mountPath"]: m["name"] for m in main.get("volumeMounts", [])}
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            name = mounts.get(cache.rsplit("/", 1)[0])
            if name is None or name not in vols:
                problems.append(f"{dname}: DITFLEET_PLAN_CACHE {cache!r} is not on a mounted volume")
            elif pool.get("planCacheHostPath") and vols[name].get("hostPath", {}).get("path") != pool["planCacheHostPath"]:
                problems.append(f"{dname}: plan cache not on hostPath {pool['planCacheHostPath']}")
        auto = (pool.get("autoscaling") or {}).get("enabled")
        if auto and "replicas" in dep["spec"]:
            problems.append(f"{dname}: replicas set although KEDA owns the replica count")

    # Selectors of PDBs, Services, ScaledObjects, ServiceMonitors must hit something.
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]

    def selects(sel: dict) -> bool:
        return any(all(lbl.get(k) == v for k, v in sel.items()) for lbl in pod_labels)

    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not selects(pdb["spec"]["selector"]["matchLabels"]):
            problems.append(f"PDB {pdb['metadata']['name']} selects no pods")
    for svc in by_kind.get("Service", []):
        if not selects(svc["spec"]["selector"]):
            problems.append(f"Service {svc['metadata']['name']} selects no pods")
    for np_ in by_kind.get("NetworkPolicy", []):
        if not selects(np_["spec"]["podSelector"]["matchLabels"]):
            problems.append(f"NetworkPolicy {np_['metadata']['name']} selects no pods")
    for so in by_kind.get("ScaledObject", []):
        if so["spec"]["scaleTargetRef"]["name"] not in deployments:
            problems.append(f"ScaledObject {so['metadata']['name']} targets a missing Deployment")
        auths = {t["metadata"]["name"] for t in by_kind.get("TriggerAuthentication", [])}
        for trig in so["spec"]["triggers"]:
            if trig["authenticationRef"]["name"] not in auths:
                problems.append(f"ScaledObject {so['metadata']['name']}: missing TriggerAuthentication")
            if trig["metadata"].get("protocol") != "http":
                problems.append(f"ScaledObject {so['metadata']['name']}: protocol is not http")
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"]["matchLabels"]
        if not any(all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())
                   for s in by_kind.get("Service", [])):
            problems.append(f"ServiceMonitor {sm['metadata']['name']} selects no Service")

    # Alerts and dashboard only use the metric names the services export.
    for rule_obj in by_kind.get("PrometheusRule", []):
        for group in rule_obj["spec"]["groups"]:
            for rule in group["rules"]:
                unknown = promql_metrics(str(rule["expr"])) - METRICS
                if unknown:
                    problems.append(f"alert {rule.get('alert')}: unknown metrics {sorted(unknown)}")
    for cm in by_kind.get("ConfigMap", []):
        for key, text in (cm.get("data") or {}).items():
            if key.endswith(".json"):
                dash = json.loads(text)
                exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
                if not exprs:
                    problems.append(f"dashboard {key}: no queries")
                for expr in exprs:
                    unknown = promql_metrics(expr) - METRICS
                    if unknown:
                        problems.append(f"dashboard {key}: unknown metrics {sorted(unknown)}")

    if problems:
        for p in problems:
            report.fail(f"{label}: invariants", p)
    else:
        report.ok(f"{label}: chart invariants ({len(objs)} objects)")


# ------------------------------------------------------------------- kustomize


def kustomize(path: Path) -> list[tuple[str, dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise Failure("kubectl (with its built-in kustomize) not found")
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Failure(f"kubectl kustomize {path.relative_to(ROOT)}: {proc.stderr.strip()}")
    return [(str(path.relative_to(ROOT)), d) for d in yaml.safe_load_all(proc.stdout) if d]


# ------------------------------------------------------------------- verify-model


def verify_model_script(report: Report, work: Path) -> None:
    """Run the init container's shell script from the rendered chart on a fake cache."""
    files = {"model_index.json": b"{}\n", "transformer/part-00001.safetensors": b"\x00" * 4096,
             "vae/diffusion_pytorch_model.safetensors": b"vae"}
    sums = {p: __import__("hashlib").sha256(b).hexdigest() for p, b in files.items()}
    values = {"modelCache": {"type": "pvc", "mountPath": "/models", "modelSubPath": "FLUX.1-dev",
                             "pvc": {"existingClaim": "m"},
                             "verify": {"enabled": True, "checksums": sums}}}
    objs = [o for _, o in render(values)]
    dep = next(o for o in objs if o["kind"] == "Deployment" and "worker" in o["metadata"]["name"])
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("model-checksums"))
    script = init["args"][0]
    env = {e["name"]: e["value"] for e in init["env"]}

    def run(case: str, listed: str | None, manifest: str | None, mutate=None) -> int:
        root = work / "verify" / case
        model, cmdir = root / "model", root / "cm"
        for rel, data in files.items():
            (model / rel).parent.mkdir(parents=True, exist_ok=True)
            (model / rel).write_bytes(data)
        cmdir.mkdir(parents=True)
        (cmdir / "SHA256SUMS").write_text(listed or "")
        if manifest is not None:
            (model / env["MODEL_MANIFEST"]).write_text(manifest)
        if mutate:
            mutate(model)
        proc = subprocess.run(["/bin/sh", "-ec", script.replace("/etc/ditfleet/model-checksums", str(cmdir))],
                              env={"PATH": os.environ["PATH"], "FLUX_MODEL_DIR": str(model),
                                   "MODEL_MANIFEST": env["MODEL_MANIFEST"]},
                              capture_output=True, text=True)
        return proc.returncode

    listed = cm["data"]["SHA256SUMS"]
    manifest = "".join(f"{h}  {p}\n" for p, h in sums.items())
    cases = [
        ("checksums from values, all match", run("values-ok", listed, None), True),
        ("manifest in the cache, all match", run("manifest-ok", None, manifest), True),
        ("one file changed", run("changed", listed, None,
                                 lambda m: (m / "vae/diffusion_pytorch_model.safetensors").write_bytes(b"VAE")), False),
        ("one file missing", run("missing", None, manifest,
                                 lambda m: (m / "model_index.json").unlink()), False),
        ("no checksum list at all", run("nolist", None, None), False),
    ]
    for what, rc, should_pass in cases:
        if (rc == 0) == should_pass:
            report.ok(f"verify-model script: {what} -> exit {rc}")
        else:
            report.fail(f"verify-model script: {what}", f"exit {rc}, expected {'0' if should_pass else 'non-zero'}")


# ------------------------------------------------------------------- negatives


def expected_reason(path: Path) -> str:
    """The `# expect: <text>` line of a negative case: the rejection must mention it."""
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*expect:\s*(.+?)\s*$", line)
        if m:
            return m.group(1)
    raise Failure(f"{path}: negative case without an '# expect:' line")


def check_rejection(report: Report, label: str, reason: str | None, expect: str) -> None:
    if reason is None:
        report.fail(label, "was accepted but must be rejected")
    elif expect not in reason:
        report.fail(label, f"rejected for another reason than {expect!r}: {reason[:300]}")
    else:
        report.ok(f"{label} rejected: {expect}")


# ------------------------------------------------------------------- main


def main() -> int:
    report = Report()
    work = Path(tempfile.mkdtemp(prefix="ditfleet-validate-"))
    crd_dir = work / "crd"
    try:
        print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate "
              f"{kubernetes_validate.__version__}, Kubernetes {', '.join(K8S_VERSIONS)}")

        # 1. chart with defaults and every values file
        print("== helm chart")
        cases: list[Path | None] = [None, *sorted((TESTS / "values").glob("*.yaml"))]
        for path in cases:
            label = "defaults" if path is None else str(path.relative_to(ROOT))
            try:
                values = load_values(path)
                lint(values)
                objects = render(values)
            except (Failure, helm.HelmError) as e:
                report.fail(label, str(e))
                continue
            report.ok(f"{label}: helm lint --strict, schema, template ({len(objects)} objects)")
            if validate_objects(objects, label, crd_dir, report):
                report.ok(f"{label}: core objects valid (strict) for Kubernetes {', '.join(K8S_VERSIONS)}")
            invariants(objects, values, report, label)

        # 2. plain manifests
        print("== k8s/ (kustomize)")
        gen = subprocess.run([sys.executable, str(TESTS / "render_k8s_base.py"), "--check"],
                             capture_output=True, text=True)
        if gen.returncode == 0:
            report.ok("k8s/base is in sync with helm/ditfleet (render_k8s_base.py --check)")
        else:
            report.fail("k8s/base drift", (gen.stdout + gen.stderr).strip()[-2000:])
        for kpath in (K8S / "base", K8S / "overlays" / "dev"):
            label = str(kpath.relative_to(ROOT))
            try:
                objects = kustomize(kpath)
            except Failure as e:
                report.fail(label, str(e))
                continue
            report.ok(f"{label}: kubectl kustomize ({len(objects)} objects)")
            if validate_objects(objects, label, crd_dir, report):
                report.ok(f"{label}: core objects valid (strict) for Kubernetes {', '.join(K8S_VERSIONS)}")

        print("== verify-model init container")
        verify_model_script(report, work)

        # 3. Dockerfiles and schema files
        print("== docker/ and schemas")
        bindir = Path(sys.executable).parent
        dockerfiles = sorted(str(p) for p in (ROOT / "docker").glob("Dockerfile.*")
                             if not p.name.endswith(".dockerignore"))
        proc = subprocess.run([str(bindir / "hadolint"), "--no-color", *dockerfiles],
                              capture_output=True, text=True)
        if proc.returncode == 0 and dockerfiles:
            report.ok(f"hadolint {' '.join(Path(d).name for d in dockerfiles)}")
        else:
            report.fail("hadolint", (proc.stdout + proc.stderr).strip() or "no Dockerfiles")
        schemas = [str(CHART / "values.schema.json"),
                   *sorted(str(p) for p in (TESTS / "crd-schemas").glob("*.json"))]
        proc = subprocess.run([str(bindir / "check-jsonschema"), "--check-metaschema", *schemas],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            report.ok(f"{len(schemas)} JSON schemas valid against their metaschema")
        else:
            report.fail("check-jsonschema --check-metaschema", (proc.stdout + proc.stderr).strip())

        # 4. CRD objects of every render, batched per kind
        print("== CRD objects (committed schemas)")
        check_crds(crd_dir, report)

        # 5. negative checks: the validation must be able to fail
        print("== negative checks (each must be rejected)")
        for path in sorted((TESTS / "values" / "broken").glob("*.yaml")):
            label = str(path.relative_to(ROOT))
            expect = expected_reason(path)
            reason = None
            try:
                values = load_values(path)
                try:
                    lint(values)
                    objects = render(values)
                except (Failure, helm.HelmError) as e:
                    reason = f"helm: {e}"
                else:
                    sub = Report(quiet=True)
                    if not validate_objects(objects, label, work / "crd-neg", sub):
                        reason = f"kubernetes-validate: {sub.failed[0]}"
            except Failure as e:
                reason = str(e)
            check_rejection(report, label, reason, expect)
        for path in sorted((TESTS / "broken-manifests").glob("*.yaml")):
            label = str(path.relative_to(ROOT))
            objects = [(label, d) for d in yaml.safe_load_all(path.read_text()) if d]
            own_dir, sub = work / "neg" / path.stem, Report(quiet=True)
            core_ok = validate_objects(objects, label, own_dir, sub)
            crd_ok = check_crds(own_dir, sub)
            reason = None if core_ok and crd_ok else " | ".join(sub.failed)
            check_rejection(report, label, reason, expected_reason(path))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nSUMMARY: {len(report.passed)} passed, {len(report.failed)} failed")
    for f in report.failed:
        print(f"  - {f}")
    return 0 if not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())
