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
  security context, selectors that must match, metric names of alerts/dashboard; probes on
  /startupz, /readyz, /healthz with the start-up window from startupSeconds; the driver-version
  node affinity of GPU pools; NVIDIA_VISIBLE_DEVICES=void on containers without GPUs; a model
  cache claim the chart creates has a writable access mode and a writer, workers mount it
  read-only; with lora.enabled the scheduler and every worker name the registry, an s3:// one
  with the result store's S3 settings and Secret credentials, a file:// one on a mounted volume,
  and the adapter cache on an emptyDir larger than its bound).
* k8s/: k8s/base is exactly what deploy-tests/render_k8s_base.py produces from the
  chart; `kubectl kustomize` of k8s/base and k8s/overlays/dev is validated the same way.
* the model cache: the populate Job's and the verify-model init container's commands as
  rendered, run with the real ditfleet-worker (built by `make test`; skipped, and said so,
  without it) against a local cache and a local HTTP model source: an empty claim is filled
  once, a worker then starts without hashing, damage is refused and repaired, a corrupt
  download publishes nothing.
* docker/Dockerfile.*: hadolint (Docker itself is not available here); OCI labels on both
  images; the worker runtime on a plain (non-CUDA) base, NVIDIA_VISIBLE_DEVICES not `all`,
  and the CUDA headers (nvidia-cuda-crt) installed in its builder.
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
        self.skipped: list[str] = []
        self.quiet = quiet

    def ok(self, what: str) -> None:
        self.passed.append(what)
        if not self.quiet:
            print(f"  ok    {what}")

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        if not self.quiet:
            print(f"  SKIP  {what}: {why}")

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


WORKER_BIN = "/usr/local/bin/ditfleet-worker"


def mounts_of(container: dict) -> dict[str, dict]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def model_cache_pod(dname: str, pod: dict, merged: dict, problems: list[str]) -> None:
    """A flux pod reads the cache read-only; only fetch-model may write it; verify-model is the
    worker's own subcommand and checks the directory the worker loads."""
    mc = merged["modelCache"]
    main = pod["containers"][0]
    inits = {c["name"]: c for c in pod.get("initContainers", [])}
    if not mounts_of(main).get("model-cache", {}).get("readOnly"):
        problems.append(f"{dname}: the worker mounts the model cache writable")
    verify = inits.get("verify-model")
    if mc["verify"]["enabled"]:
        if verify is None:
            problems.append(f"{dname}: flux pool without the verify-model init container")
            return
        if verify.get("command") != [WORKER_BIN, "verify-model"]:
            problems.append(f"{dname}: verify-model runs {verify.get('command')}, not `ditfleet-worker verify-model`")
        if not mounts_of(verify).get("model-cache", {}).get("readOnly"):
            problems.append(f"{dname}: verify-model mounts the model cache writable")
        if env_of(verify).get("FLUX_MODEL_DIR") != env_of(main).get("FLUX_MODEL_DIR"):
            problems.append(f"{dname}: verify-model checks another directory than the worker loads")
        args = verify.get("args", [])
        wait = int(args[args.index("--wait-seconds") + 1]) if "--wait-seconds" in args else 0
        mode = (mc.get("populate") or {}).get("mode", "none")
        jobs_fill = mode == "job" or (mode == "auto" and mc["type"] == "pvc" and not mc["pvc"]["existingClaim"])
        if jobs_fill and wait <= 0:
            problems.append(f"{dname}: verify-model does not wait for the populate Job")
    fetch = inits.get("fetch-model")
    if fetch is not None:
        if fetch.get("command") != [WORKER_BIN, "fetch-model"]:
            problems.append(f"{dname}: fetch-model runs {fetch.get('command')}")
        if mounts_of(fetch).get("model-cache", {}).get("readOnly"):
            problems.append(f"{dname}: fetch-model cannot write the model cache")
        order = list(inits)
        if "verify-model" in inits and order.index("fetch-model") > order.index("verify-model"):
            problems.append(f"{dname}: fetch-model runs after verify-model")
        vol = next(v for v in pod["volumes"] if v["name"] == "model-cache")
        if vol.get("persistentVolumeClaim", {}).get("readOnly"):
            problems.append(f"{dname}: fetch-model's claim is attached read-only")


def quantity_bytes(q: object) -> int:
    """A Kubernetes memory/storage quantity (`10737418240`, `8Gi`, `500M`) in bytes."""
    m = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?", str(q))
    if not m:
        raise Failure(f"quantity {q!r} not understood")
    mult = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}[m.group(2)]
    return int(m.group(1)) * mult


def lora_pods(deployments: dict, merged: dict, problems: list[str]) -> None:
    """With lora.enabled the scheduler and every worker name the one registry (workers would fall
    back to file://<model root> without it, the scheduler would reject every job naming adapters);
    an s3:// registry reaches the scheduler with the result store's S3 settings and credentials
    from the Secret; a file:// registry lies on a volume mounted in each pod; a worker's adapter
    downloads go to an emptyDir of their own whose size limit exceeds the cache's bound."""
    lora = merged.get("lora") or {}
    if not lora.get("enabled"):
        return
    registry = lora["registry"]
    results = merged["results"]
    for dname, dep in deployments.items():
        component = dep["metadata"]["labels"].get("app.kubernetes.io/component")
        if component not in ("scheduler", "worker"):
            continue
        pod = dep["spec"]["template"]["spec"]
        main = pod["containers"][0]
        env = env_of(main)

        def value(var: str) -> str | None:
            return env.get(var, {}).get("value")

        if value("DITFLEET_LORA_REGISTRY") != registry:
            problems.append(f"{dname}: DITFLEET_LORA_REGISTRY is {value('DITFLEET_LORA_REGISTRY')!r}, not lora.registry {registry!r}")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in main.get("volumeMounts", [])}
        if registry.startswith("s3://"):
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                if "secretKeyRef" not in env.get(var, {}).get("valueFrom", {}):
                    problems.append(f"{dname}: s3:// LoRA registry but {var} does not come from a Secret")
            if value("AWS_REGION") != results["region"]:
                problems.append(f"{dname}: AWS_REGION {value('AWS_REGION')!r} is not results.region")
            if value("AWS_ENDPOINT_URL") != (results["endpointUrl"] or None):
                problems.append(f"{dname}: AWS_ENDPOINT_URL {value('AWS_ENDPOINT_URL')!r} is not results.endpointUrl")
            if (results["endpointUrl"] or "").startswith("http://") and value("AWS_ALLOW_HTTP") != "true":
                problems.append(f"{dname}: plain-HTTP S3 endpoint without AWS_ALLOW_HTTP=true")
        else:
            folder = registry.removeprefix("file://").rstrip("/")
            holder = next((m for m in mounts if folder == m or folder.startswith(m + "/")), None)
            if holder is None or mounts[holder] not in vols:
                problems.append(f"{dname}: the LoRA registry {folder} is on no mounted volume")
        if component == "scheduler":
            if value("DITFLEET_LORA_MANIFEST_CACHE_MS") != str(int(lora["manifestCacheMs"])) or \
                    value("DITFLEET_AFFINITY_WAIT_MS") != str(int(lora["affinityWaitMs"])):
                problems.append(f"{dname}: DITFLEET_LORA_MANIFEST_CACHE_MS / DITFLEET_AFFINITY_WAIT_MS differ from lora.*")
            continue
        cache = lora["diskCache"]
        if value("DITFLEET_LORA_DISK_CACHE_BYTES") != str(int(cache["bytes"])) or \
                value("DITFLEET_LORA_CACHE_BYTES") != str(int(lora["hostCacheBytes"])) or \
                value("DITFLEET_LORA_DEVICE_CACHE_BYTES") != str(int(lora["deviceCacheBytes"])) or \
                value("DITFLEET_AFFINITY_POLL_MS") != str(int(lora["affinityPollMs"])):
            problems.append(f"{dname}: DITFLEET_LORA_DISK_CACHE_BYTES / DITFLEET_LORA_CACHE_BYTES / DITFLEET_LORA_DEVICE_CACHE_BYTES / DITFLEET_AFFINITY_POLL_MS differ from lora.*")
        cache_dir = (value("DITFLEET_LORA_CACHE_DIR") or "").rstrip("/")
        vol = vols.get(mounts.get(cache_dir, ""), {})
        if "emptyDir" not in vol:
            problems.append(f"{dname}: DITFLEET_LORA_CACHE_DIR {cache_dir!r} is not the mount of an emptyDir of its own")
        elif quantity_bytes(vol["emptyDir"].get("sizeLimit", "0")) <= int(cache["bytes"]):
            problems.append(f"{dname}: the adapter cache's emptyDir sizeLimit {vol['emptyDir'].get('sizeLimit')} leaves no room above "
                            f"DITFLEET_LORA_DISK_CACHE_BYTES {cache['bytes']} (over it the kubelet evicts the pod)")


def model_cache_fill(by_kind: dict, merged: dict, problems: list[str]) -> None:
    """A claim the chart creates starts empty: something must be able to fill it (a writable access
    mode, and a populate Job or fetch-model init containers that write it)."""
    claims = {c["metadata"]["name"]: c for c in by_kind.get("PersistentVolumeClaim", [])}
    for name, claim in claims.items():
        if claim["metadata"]["labels"].get("app.kubernetes.io/component") != "model-cache":
            continue
        modes = set(claim["spec"]["accessModes"])
        if not modes & {"ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"}:
            problems.append(f"PVC {name}: access modes {sorted(modes)} let nothing fill it")
        writers = []
        for work in by_kind.get("Job", []) + by_kind.get("Deployment", []):
            pod = work["spec"]["template"]["spec"]
            vols = {v["name"] for v in pod.get("volumes", [])
                    if v.get("persistentVolumeClaim", {}).get("claimName") == name}
            for c in pod.get("initContainers", []) + pod["containers"]:
                if c.get("command") == [WORKER_BIN, "fetch-model"] and any(
                        m["name"] in vols and not m.get("readOnly") for m in c.get("volumeMounts", [])):
                    writers.append(f"{work['kind']}/{work['metadata']['name']}")
        if not writers:
            problems.append(f"PVC {name} is created empty and nothing fills it (no populate Job, no fetch-model)")
    for job in by_kind.get("Job", []):
        pod = job["spec"]["template"]["spec"]
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append(f"Job {job['metadata']['name']}: restartPolicy {pod.get('restartPolicy')}")


def invariants(objects: list[tuple[str, dict]], values: dict, report: Report, label: str) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        merged = chart.merge_values(values)
    problems: list[str] = []
    objs = [o for _, o in objects]
    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    jobs = {j["metadata"]["name"]: j for j in by_kind.get("Job", [])}
    secret_names = {s["metadata"]["name"] for s in by_kind.get("Secret", [])}

    # Secrets: only the dev-credentials Secret, only when explicitly asked for.
    for name in secret_names:
        if not (merged["secrets"]["devCredentials"]["enabled"] and name.endswith("-dev-credentials")):
            problems.append(f"Secret {name} rendered without secrets.devCredentials.enabled")

    for name, work in {**deployments, **jobs}.items():
        pod = work["spec"]["template"]["spec"]
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
        # The NVIDIA runtime hands a container every GPU of the node when NVIDIA_VISIBLE_DEVICES
        # is `all` (the CUDA images' default) or unset in a CUDA image: containers that request no
        # GPU say `void`; those that do leave the variable to the device plugin. (Sidecars are the
        # operator's: only the chart's own containers are checked.)
        chart_containers = pod.get("initContainers", []) + pod["containers"][:1 if work["kind"] == "Deployment" else None]
        for c in chart_containers:
            gpus = (c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu")
            visible = env_of(c).get("NVIDIA_VISIBLE_DEVICES", {}).get("value")
            if gpus and visible is not None:
                problems.append(f"{name}/{c['name']}: sets NVIDIA_VISIBLE_DEVICES={visible!r} over the device plugin's")
            if not gpus and visible != "void":
                problems.append(f"{name}/{c['name']}: requests no GPU but NVIDIA_VISIBLE_DEVICES is {visible!r}, not 'void'")
        if work["kind"] == "Job":
            continue
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
        # Workers: start-up on "models loaded" (/startupz), not on "process up" (/healthz, which is
        # 200 from the first second and would let liveness kill a pod that is still loading).
        if work["metadata"]["labels"].get("app.kubernetes.io/component") == "worker" and \
                main.get("startupProbe", {}).get("httpGet", {}).get("path") != "/startupz":
            problems.append(f"{name}: worker start-up probe not on /startupz")

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
        if flux and "FLUX_MODEL_DIR" not in env:
            problems.append(f"{dname}: flux pool without FLUX_MODEL_DIR")
        # Flux pools say their precision (bf16 by default); the simulated engine has none.
        precision = env.get("DITFLEET_PRECISION", {}).get("value")
        if flux and precision != pool.get("precision", "bf16"):
            problems.append(f"{dname}: DITFLEET_PRECISION {precision!r} != pool precision {pool.get('precision', 'bf16')!r}")
        if not flux and precision is not None:
            problems.append(f"{dname}: DITFLEET_PRECISION set on a {pool['engine']} pool")
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
        # The start-up probe allows the pool's start-up budget, rounded up to whole periods.
        probe = main.get("startupProbe", {})
        window = int(probe.get("periodSeconds", 10)) * int(probe.get("failureThreshold", 3))
        startup = pool.get("startupSeconds")
        if startup is None:
            problems.append(f"{dname}: the pool has no start-up budget (startupSeconds) for its start-up probe")
        elif not int(startup) <= window < int(startup) + int(probe.get("periodSeconds", 10)):
            problems.append(f"{dname}: start-up probe window {window} s is not the pool's startupSeconds {startup}")
        # A rollout replaces a pod: the old one drains, the new one pulls, verifies (waiting for a
        # populate Job to publish the version) and loads.
        job_wait = 0
        if flux and merged["modelCache"]["verify"]["enabled"] and any(
                j["metadata"]["labels"].get("app.kubernetes.io/component") == "model-populate" for j in jobs.values()):
            job_wait = int(merged["modelCache"]["verify"].get("waitSeconds", 0))
        budget = want + int(pool["pullAndVerifySeconds"]) + job_wait + window
        if int(dep["spec"].get("progressDeadlineSeconds", 600)) < budget:
            problems.append(f"{dname}: progressDeadlineSeconds {dep['spec'].get('progressDeadlineSeconds', 600)}"
                            f" < start-up budget {budget} s")
        # GPU pods only where the driver runs the image's CUDA 13 (R580+): every required node
        # selector term carries the driver-version expression.
        driver = {"minMajor": 580, "label": "nvidia.com/cuda.driver-version.major",
                  **(defaults.get("driver") or {}), **(raw.get("driver") or {})}
        if gpus and int(driver["minMajor"]) > 0:
            want_expr = {"key": driver["label"], "operator": "Gt", "values": [str(int(driver["minMajor"]) - 1)]}
            terms = (((pod.get("affinity") or {}).get("nodeAffinity") or {})
                     .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
            if not terms or any(want_expr not in t.get("matchExpressions", []) for t in terms):
                problems.append(f"{dname}: not every required node selector term requires driver >= {driver['minMajor']} ({driver['label']})")
        if flux:
            model_cache_pod(dname, pod, merged, problems)
        if multi and pool.get("planCacheHostPath"):
            vol = next(v for v in pod["volumes"] if v["name"] == "plan-cache")
            if vol["hostPath"].get("type") != "DirectoryOrCreate":
                problems.append(f"{dname}: plan-cache hostPath is not created when missing")
            if pool.get("planCacheHostPathPrepare", True) and "prepare-plan-cache" not in inits:
                problems.append(f"{dname}: nothing makes the plan-cache hostPath writable for the worker's user")

    model_cache_fill(by_kind, merged, problems)
    lora_pods(deployments, merged, problems)

    # Selectors of PDBs, Services, ScaledObjects, ServiceMonitors must hit something.
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in [*deployments.values(), *jobs.values()]]

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
    # KEDA: a private CA reaches the scaler (with tls=enable, which it reads from the
    # authentication only), and a pool at zero is not left there while its scaler fails.
    for ta in by_kind.get("TriggerAuthentication", []):
        params = {r["parameter"] for r in ta["spec"].get("secretTargetRef", [])}
        params |= {r["parameter"] for r in ta["spec"].get("configMapTargetRef", [])}
        if merged["tls"]["caSecret"] and not {"ca", "tls"} <= params:
            problems.append(f"TriggerAuthentication {ta['metadata']['name']}: tls.caSecret set but no ca/tls parameters")
        for ref in ta["spec"].get("configMapTargetRef", []):
            cms = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
            if ref["key"] not in (cms.get(ref["name"], {}).get("data") or {}):
                problems.append(f"TriggerAuthentication {ta['metadata']['name']}: ConfigMap {ref['name']} lacks {ref['key']}")
    for so in by_kind.get("ScaledObject", []):
        spec = so["spec"]
        if spec.get("minReplicaCount", 0) == 0 and "fallback" not in spec:
            problems.append(f"ScaledObject {so['metadata']['name']}: minReplicaCount 0 without a fallback")
        if spec.get("minReplicaCount", 0) > spec["maxReplicaCount"]:
            problems.append(f"ScaledObject {so['metadata']['name']}: minReplicaCount > maxReplicaCount")
    # NetworkPolicy egress reaches the ports of the endpoints configured as URLs.
    from urllib.parse import urlparse
    for np_ in by_kind.get("NetworkPolicy", []):
        ports = {p["port"] for rule in np_["spec"].get("egress", []) for p in rule.get("ports", [])}
        component = np_["metadata"]["labels"].get("app.kubernetes.io/component")
        urls = [merged["config"]["otlpEndpoint"]] if component in ("scheduler", "worker") else []
        lora = merged.get("lora") or {}
        if component == "worker" or (component == "scheduler" and lora.get("enabled")
                                     and lora["registry"].startswith("s3://")):
            urls.append(merged["results"]["endpointUrl"])
        # Where fetch-model downloads from (the populate Job, or workers with fetch-model inits).
        fetchers = {j["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
                    for j in by_kind.get("Job", [])}
        if any(c["name"] == "fetch-model" for d in deployments.values()
               for c in d["spec"]["template"]["spec"].get("initContainers", [])):
            fetchers.add("worker")
        if component in fetchers:
            pop = merged["modelCache"].get("populate") or {}
            urls.append(pop["source"] if not pop["source"].startswith("s3://")
                        else (pop["endpointUrl"] or merged["results"]["endpointUrl"] or "https://s3.amazonaws.com"))
        for url in filter(None, urls):
            u = urlparse(url)
            port = u.port or (443 if u.scheme == "https" else 80)
            if port not in ports:
                problems.append(f"NetworkPolicy {np_['metadata']['name']}: no egress to port {port} of {url}")
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


def notes_warn_of_shared_classes(values: dict, report: Report, label: str) -> None:
    """The install notes warn exactly when two autoscaled pools scale on one class's queues."""
    with helm.Chart.load(str(CHART)) as chart:
        merged = chart.merge_values(values)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    notes = next((t for k, t in manifests.items() if k.endswith("NOTES.txt")), "")
    seen: dict[str, str] = {}
    shared = []
    for pool in merged["workerPools"]:
        if not (pool.get("autoscaling") or {}).get("enabled"):
            continue
        for c in pool["classes"]:
            if c in seen:
                shared.append((seen[c], pool["name"], c))
            seen.setdefault(c, pool["name"])
    missing = [s for s in shared if f"pools {s[0]} and {s[1]} both autoscale on the queues of class {s[2]}" not in notes]
    if missing or (not shared and "WARNING: pools" in notes):
        report.fail(f"{label}: install notes", f"shared classes {shared}, notes:\n{notes}")
    else:
        report.ok(f"{label}: install notes warn of {len(shared)} shared autoscaled class(es)")


# ------------------------------------------------------------------- kustomize


def kustomize(path: Path) -> list[tuple[str, dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise Failure("kubectl (with its built-in kustomize) not found")
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Failure(f"kubectl kustomize {path.relative_to(ROOT)}: {proc.stderr.strip()}")
    return [(str(path.relative_to(ROOT)), d) for d in yaml.safe_load_all(proc.stdout) if d]


# ------------------------------------------------------------------- model cache


def worker_binary() -> Path | None:
    """The ditfleet-worker that `make test` built (DITFLEET_WORKER_BIN overrides)."""
    if os.environ.get("DITFLEET_WORKER_BIN"):
        return Path(os.environ["DITFLEET_WORKER_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    for profile in ("debug", "release"):
        if (target / profile / "ditfleet-worker").is_file():
            return target / profile / "ditfleet-worker"
    return None


def model_cache_commands(report: Report, work: Path) -> None:
    """Run the populate Job's and the verify-model init container's commands exactly as the chart
    renders them, with the real ditfleet-worker, against a local cache directory and a local HTTP
    model source: the defaults fill an empty claim once, a worker then starts without hashing,
    damage is refused, and a corrupt download publishes nothing."""
    import hashlib
    import http.server
    import threading
    from functools import partial

    binary = worker_binary()
    if binary is None:
        report.skip("model cache commands", "no ditfleet-worker binary (cargo build -p ditfleet-worker, "
                    "or DITFLEET_WORKER_BIN); `make test` builds it first")
        return
    files = {"model_index.json": b"{}\n", "transformer/part-00001.safetensors": b"\x00" * 300_000,
             "vae/diffusion_pytorch_model.safetensors": b"vae"}
    sums = {p: hashlib.sha256(b).hexdigest() for p, b in files.items()}
    source = work / "model-source" / "FLUX.1-dev"
    for rel, data in files.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(data)
    (source / "SHA256SUMS").write_text("".join(f"{h}  {p}\n" for p, h in sums.items()))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(source.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/FLUX.1-dev"

    def containers(extra: dict) -> tuple[dict, dict, str]:
        values = {"modelCache": {"populate": {"source": base}, **extra}}
        objs = [o for _, o in render(values)]
        job = next(o for o in objs if o["kind"] == "Job")
        dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-l40x1"))
        verify = next(c for c in dep["spec"]["template"]["spec"]["initContainers"] if c["name"] == "verify-model")
        cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("model-checksums"))
        return job["spec"]["template"]["spec"]["containers"][0], verify, cm["data"]["SHA256SUMS"]

    def run(container: dict, case: str, listed: str, wait: str | None = None) -> subprocess.CompletedProcess:
        root = work / "cache-cases" / case
        cache, cm = root / "models", root / "checksums"
        cache.mkdir(parents=True, exist_ok=True)
        cm.mkdir(parents=True, exist_ok=True)
        (cm / "SHA256SUMS").write_text(listed)

        def local(v: str) -> str:
            v = v.replace("/etc/ditfleet/model-checksums", str(cm))
            return str(cache) + v[len("/models"):] if v == "/models" or v.startswith("/models/") else v

        args = [local(a) for a in container.get("args", [])]
        if wait is not None:
            args[args.index("--wait-seconds") + 1] = wait
        env = {e["name"]: local(e["value"]) for e in container.get("env", []) if "value" in e}
        env |= {"PATH": os.environ["PATH"], "HOME": str(root), "DITFLEET_LOG_FORMAT": "text"}
        return subprocess.run([str(binary), *container["command"][1:], *args], env=env,
                              capture_output=True, text=True, timeout=300)

    def check(what: str, proc: subprocess.CompletedProcess, ok: bool, expect: str = "") -> None:
        out = proc.stdout + proc.stderr
        if (proc.returncode == 0) == ok and expect in out:
            report.ok(f"model cache: {what} -> exit {proc.returncode}")
        else:
            report.fail(f"model cache: {what}", f"exit {proc.returncode}, wanted {'0' if ok else 'non-zero'}"
                        f"{f' and {expect!r}' if expect else ''}:\n{out[-1500:]}")

    try:
        fetch, verify, listed = containers({})
        version = work / "cache-cases" / "defaults" / "models" / "FLUX.1-dev"
        check("defaults: verify-model refuses an empty cache (wait cut to 1 s)",
              run(verify, "defaults", listed, wait="1"), False, "does not exist")
        check("defaults: the populate Job fills the empty claim", run(fetch, "defaults", listed), True,
              "downloaded, verified and published")
        if not (version / ".ditfleet-verified").is_file() or (version / "transformer/part-00001.safetensors").read_bytes() != files["transformer/part-00001.safetensors"]:
            report.fail("model cache: populate result", f"{version} lacks the files or the verification record")
        check("defaults: a worker's verify-model trusts the record, hashes nothing",
              run(verify, "defaults", listed), True, "(3 trusted from the record, 0 hashed)")
        check("defaults: the Job run again keeps the verified copy", run(fetch, "defaults", listed), True,
              "present and verified")
        (version / "vae/diffusion_pytorch_model.safetensors").write_bytes(b"VAE")
        check("defaults: verify-model refuses a changed file",
              run(verify, "defaults", listed), False, "vae/diffusion_pytorch_model.safetensors: sha256")
        check("defaults: the Job replaces the damaged copy", run(fetch, "defaults", listed), True,
              "downloaded, verified and published")
        check("defaults: verify-model passes after the repair", run(verify, "defaults", listed), True, "0 hashed")

        wrong = {**sums, "vae/diffusion_pytorch_model.safetensors": "0" * 64}
        fetch, verify, listed = containers({"verify": {"checksums": wrong}})
        check("pinned checksums: a download that does not match publishes nothing",
              run(fetch, "pinned", listed), False, "is corrupt")
        if (work / "cache-cases" / "pinned" / "models" / "FLUX.1-dev").exists():
            report.fail("model cache: pinned checksums", "a corrupt download was published")
    finally:
        server.shutdown()


# ------------------------------------------------------------------- Dockerfiles

OCI_LABELS = {"title", "description", "source", "licenses", "version", "revision"}


def dockerfile_stages(path: Path) -> list[dict]:
    """Stages of a Dockerfile: base image (global ARG defaults substituted), LABEL keys, ENV
    values and RUN text. Continuation lines are joined; comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines()
                                        if not l.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: list[dict] = []
    for line in text.splitlines():
        m = re.match(r"\s*(\w+)\s+(.*)", line)
        if not m:
            continue
        op, rest = m.group(1).upper(), m.group(2).strip()
        if op == "ARG" and not stages and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
        elif op == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda a: args.get(a.group(1), ""), rest.split()[0])
            stages.append({"from": image, "labels": {}, "env": {}, "run": ""})
        elif stages and op in ("LABEL", "ENV"):
            for k, v in re.findall(r'([\w.\-]+)=("[^"]*"|\S+)', rest):
                stages[-1]["labels" if op == "LABEL" else "env"][k] = v.strip('"')
        elif stages and op == "RUN":
            stages[-1]["run"] += rest + "\n"
    return stages


def dockerfile_checks(report: Report) -> None:
    """What hadolint does not know: OCI labels on both images; the worker's runtime on a plain
    base (the torch wheel's nvidia-* libraries are the only CUDA copy), no GPUs for containers
    that request none, and the CUDA headers the engine build requires."""
    for path in sorted((ROOT / "docker").glob("Dockerfile.*")):
        if path.name.endswith(".dockerignore"):
            continue
        final = dockerfile_stages(path)[-1]
        keys = {k.removeprefix("org.opencontainers.image.") for k in final["labels"]
                if k.startswith("org.opencontainers.image.")}
        missing = OCI_LABELS - keys
        if missing:
            report.fail(f"{path.name}: OCI labels", f"final stage lacks org.opencontainers.image.{{{','.join(sorted(missing))}}}")
        else:
            report.ok(f"{path.name}: OCI labels {', '.join(sorted(OCI_LABELS))}")
    worker = dockerfile_stages(ROOT / "docker" / "Dockerfile.worker")
    base = worker[-1]["from"]
    if re.search(r"cuda", base, re.I):
        report.fail("Dockerfile.worker: runtime base", f"{base} is a CUDA image: the torch wheel's libraries would be carried twice")
    else:
        report.ok(f"Dockerfile.worker: runtime base {base} carries no CUDA of its own")
    visible = worker[-1]["env"].get("NVIDIA_VISIBLE_DEVICES")
    if visible in (None, "all"):
        report.fail("Dockerfile.worker: NVIDIA_VISIBLE_DEVICES", f"{visible!r}: containers requesting no GPU would see every GPU")
    else:
        report.ok(f"Dockerfile.worker: NVIDIA_VISIBLE_DEVICES={visible} unless the device plugin sets it")
    if not any("nvidia-cuda-crt" in st["run"] for st in worker[:-1]):
        report.fail("Dockerfile.worker: CUDA headers", "the builder does not install nvidia-cuda-crt; the engine build refuses a CUDA libtorch without crt/ headers")
    else:
        report.ok("Dockerfile.worker: the builder installs the CUDA headers the engine build requires")
    if not any("nvidia-cudnn-frontend" in st["run"] for st in worker[:-1]):
        report.fail("Dockerfile.worker: cuDNN frontend headers", "the builder does not install nvidia-cudnn-frontend; the engine would build without the fp8 precision's FP8 attention")
    else:
        report.ok("Dockerfile.worker: the builder installs the cuDNN frontend headers the FP8 attention is built with")


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
            notes_warn_of_shared_classes(values, report, label)

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

        print("== model cache: populate Job and verify-model with the real ditfleet-worker")
        model_cache_commands(report, work)

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
        dockerfile_checks(report)
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

    print(f"\nSUMMARY: {len(report.passed)} passed, {len(report.failed)} failed, {len(report.skipped)} skipped")
    for s in report.skipped:
        print(f"  ~ {s}")
    for f in report.failed:
        print(f"  - {f}")
    return 0 if not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())
