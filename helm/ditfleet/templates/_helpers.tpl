{{/* Chart name, truncated to the 63-character DNS label limit. */}}
{{- define "ditfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name. Pool names are appended, so keep room for them. */}}
{{- define "ditfleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ditfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "ditfleet.labels" -}}
helm.sh/chart: {{ include "ditfleet.chart" . }}
{{ include "ditfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ditfleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ditfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ditfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ditfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ditfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* image reference: (dict "root" $ "image" <images.x or pool override>) */}}
{{- define "ditfleet.image" -}}
{{- $img := .image -}}
{{- $repo := $img.repository -}}
{{- if .root.Values.images.registry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .root.Values.images.registry) $img.repository -}}
{{- end -}}
{{- $tag := default .root.Chart.AppVersion $img.tag -}}
{{- if $img.digest -}}
{{- printf "%s:%s@%s" $repo $tag $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* Name of the dev credentials Secret. */}}
{{- define "ditfleet.devSecretName" -}}
{{- printf "%s-dev-credentials" (include "ditfleet.fullname" .) -}}
{{- end -}}

{{/* Secret name for one credential: (dict "root" $ "ref" .Values.secrets.x) */}}
{{- define "ditfleet.secretName" -}}
{{- if .root.Values.secrets.devCredentials.enabled -}}
{{- include "ditfleet.devSecretName" .root -}}
{{- else -}}
{{- required "secrets.*.existingSecret must name a Secret (or enable secrets.devCredentials for dev clusters)" .ref.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* A pool merged over workerDefaults, as YAML: (dict "root" $ "pool" .) */}}
{{- define "ditfleet.pool" -}}
{{- $merged := mergeOverwrite (deepCopy .root.Values.workerDefaults) (deepCopy .pool) -}}
{{- toYaml $merged -}}
{{- end -}}

{{- define "ditfleet.poolFullname" -}}
{{- printf "%s-worker-%s" (include "ditfleet.fullname" .root) .pool.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Queue names of a pool's classes. */}}
{{- define "ditfleet.poolQueues" -}}
{{- $ns := .root.Values.config.namespace -}}
{{- $q := list -}}
{{- range .pool.classes -}}
{{- $q = append $q (printf "%s.work.%s" $ns .) -}}
{{- end -}}
{{- join "," $q -}}
{{- end -}}

{{/* Environment shared by every ditfleet container: dict "root" $ "component" scheduler|worker.
The AMQP URL comes from the component's own key when set (least-privilege RabbitMQ users). */}}
{{- define "ditfleet.commonEnv" -}}
{{- $c := .component -}}
{{- with .root -}}
{{- $amqpKey := .Values.secrets.amqp.key -}}
{{- if and (eq $c "scheduler") .Values.secrets.amqp.schedulerKey }}{{ $amqpKey = .Values.secrets.amqp.schedulerKey }}{{ end -}}
{{- if and (eq $c "worker") .Values.secrets.amqp.workerKey }}{{ $amqpKey = .Values.secrets.amqp.workerKey }}{{ end -}}
- name: DITFLEET_AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ditfleet.secretName" (dict "root" . "ref" .Values.secrets.amqp) }}
      key: {{ $amqpKey }}
- name: DITFLEET_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ditfleet.secretName" (dict "root" . "ref" .Values.secrets.redis) }}
      key: {{ .Values.secrets.redis.key }}
- name: DITFLEET_NAMESPACE
  value: {{ .Values.config.namespace | quote }}
- name: DITFLEET_LOG
  value: {{ .Values.config.log | quote }}
- name: DITFLEET_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
- name: DITFLEET_JOB_TTL_S
  value: {{ .Values.config.jobTtlSeconds | int64 | quote }}
- name: DITFLEET_HTTP_ADDR
  value: {{ printf "0.0.0.0:%d" (int .Values.config.httpPort) | quote }}
{{- with .Values.config.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "ditfleet-%s" $c | quote }}
{{- end }}
{{- if .Values.tls.caSecret }}
- name: DITFLEET_AMQP_CA_FILE
  value: /etc/ditfleet/tls/ca.crt
- name: DITFLEET_REDIS_CA_FILE
  value: /etc/ditfleet/tls/ca.crt
{{- end }}
{{- end -}}
{{- end -}}

{{/* Liveness and readiness on the health/metrics HTTP server. /healthz: the process runs and its
main loop is not wedged (a failure restarts the container). /readyz: it can take work now (a
worker: models loaded, consuming, not draining or reconnecting, capacity above zero); a failure
only takes it out of the ready count. The worker's start-up probe (/startupz) is set per pool. */}}
{{- define "ditfleet.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: http-metrics
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: http-metrics
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
{{- end -}}

{{/* How the model cache is filled: job | initContainer | none. `auto` = a Job when the chart
creates the claim (an empty claim nothing else would fill), none otherwise (an existing claim or a
hostPath the operator seeds). */}}
{{- define "ditfleet.populateMode" -}}
{{- $mc := .Values.modelCache -}}
{{- $mode := $mc.populate.mode -}}
{{- if eq $mode "auto" -}}
{{- $mode = ternary "job" "none" (and (eq $mc.type "pvc") (not $mc.pvc.existingClaim) $mc.pvc.create) -}}
{{- end -}}
{{- $mode -}}
{{- end -}}

{{/* Environment of `ditfleet-worker fetch-model` (populate Job and init container). It needs no
GPU: NVIDIA_VISIBLE_DEVICES=void keeps the NVIDIA runtime from giving it every GPU of the node. */}}
{{- define "ditfleet.populateEnv" -}}
{{- $p := .Values.modelCache.populate -}}
{{- $source := required "modelCache.populate.source is required to fill the model cache (s3://bucket/prefix or https://host/path), or set modelCache.populate.mode=none and fill it yourself" $p.source -}}
- name: DITFLEET_MODEL_SOURCE
  value: {{ $source | quote }}
- name: NVIDIA_VISIBLE_DEVICES
  value: void
- name: DITFLEET_LOG
  value: {{ .Values.config.log | quote }}
- name: DITFLEET_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
{{- if hasPrefix "s3://" $source }}
{{- $endpoint := default .Values.results.endpointUrl $p.endpointUrl }}
{{- with $endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- if hasPrefix "http://" . }}
- name: AWS_ALLOW_HTTP
  value: "true"
{{- end }}
{{- end }}
- name: AWS_REGION
  value: {{ default .Values.results.region $p.region | quote }}
{{- $secret := $p.credentialsSecret | default (include "ditfleet.secretName" (dict "root" . "ref" .Values.secrets.s3)) }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secrets.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.secrets.s3.secretAccessKeyKey }}
{{- else if $p.tokenSecret.name }}
- name: DITFLEET_MODEL_SOURCE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $p.tokenSecret.name }}
      key: {{ $p.tokenSecret.key }}
{{- end }}
{{- end -}}

{{/* fetch-model arguments (dict "root" $): the version lands in <mountPath>/<modelSubPath>. */}}
{{- define "ditfleet.populateArgs" -}}
{{- $mc := .Values.modelCache -}}
- --cache-dir
- {{ $mc.mountPath | quote }}
- --version
- {{ $mc.modelSubPath | quote }}
- --checksums
- /etc/ditfleet/model-checksums/SHA256SUMS
- --list-name
- {{ $mc.verify.manifestFile | quote }}
- --parallel
- {{ $mc.populate.parallel | int | quote }}
{{- end -}}

{{/* S3 client settings (AWS_*) of the result store: results.endpointUrl (AWS_ALLOW_HTTP=true for a
plain-HTTP one), results.region and the secrets.s3 credentials. The workers get them for results
and an s3:// LoRA registry, the scheduler for an s3:// LoRA registry. */}}
{{- define "ditfleet.s3Env" -}}
{{- with .Values.results.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- if hasPrefix "http://" . }}
- name: AWS_ALLOW_HTTP
  value: "true"
{{- end }}
{{- end }}
- name: AWS_REGION
  value: {{ .Values.results.region | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "ditfleet.secretName" (dict "root" . "ref" .Values.secrets.s3) }}
      key: {{ .Values.secrets.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "ditfleet.secretName" (dict "root" . "ref" .Values.secrets.s3) }}
      key: {{ .Values.secrets.s3.secretAccessKeyKey }}
{{- end -}}

{{/* The LoRA registry (DITFLEET_LORA_REGISTRY) when lora.enabled, else "". */}}
{{- define "ditfleet.loraRegistry" -}}
{{- if .Values.lora.enabled -}}
{{- required "lora.enabled needs lora.registry: s3://bucket[/prefix], file:///dir or /dir" .Values.lora.registry -}}
{{- end -}}
{{- end -}}

{{/* The folder of a file:///dir or /dir LoRA registry (no trailing slash); "" for s3:// or off. */}}
{{- define "ditfleet.loraDir" -}}
{{- $r := include "ditfleet.loraRegistry" . -}}
{{- if and $r (not (hasPrefix "s3://" $r)) -}}
{{- trimPrefix "file://" $r | trimSuffix "/" -}}
{{- end -}}
{{- end -}}

{{/* "true" when .path is one of the directories .mounts (a list of paths) or lies below one;
with "both" also when one of them lies below .path (two mounts that would nest). */}}
{{- define "ditfleet.under" -}}
{{- $p := trimSuffix "/" .path -}}
{{- $both := .both -}}
{{- range .mounts -}}
{{- $m := trimSuffix "/" . -}}
{{- if or (eq $p $m) (hasPrefix (printf "%s/" $m) $p) (and $both (hasPrefix (printf "%s/" $p) $m)) }}true{{ end -}}
{{- end -}}
{{- end -}}

{{/* The model cache claim a pod outside the flux pools mounts to read a file:// LoRA registry in
it: modelCache.pvc.existingClaim, else the claim the chart creates (only with a flux pool). */}}
{{- define "ditfleet.loraModelClaim" -}}
{{- $mc := .Values.modelCache -}}
{{- $flux := false -}}
{{- range .Values.workerPools -}}
{{- $pool := include "ditfleet.pool" (dict "root" $ "pool" .) | fromYaml -}}
{{- if eq $pool.engine "flux" }}{{ $flux = true }}{{ end -}}
{{- end -}}
{{- if $mc.pvc.existingClaim -}}
{{- $mc.pvc.existingClaim -}}
{{- else if and $mc.pvc.create $flux -}}
{{- printf "%s-model-cache" (include "ditfleet.fullname" .) -}}
{{- else -}}
{{- fail (printf "lora.registry %s lies in the model cache, but no claim holds it (the chart creates the model cache claim only for flux pools): set modelCache.pvc.existingClaim, or use an s3:// registry" .Values.lora.registry) -}}
{{- end -}}
{{- end -}}

{{/* LoRA settings of one component (dict "root" $ "component" "scheduler"|"worker"); nothing when
lora is off. Worker: the download cache is the lora-cache volume at lora.diskCache.mountPath. */}}
{{- define "ditfleet.loraEnv" -}}
{{- $c := .component -}}
{{- with .root -}}
{{- $l := .Values.lora -}}
{{- with include "ditfleet.loraRegistry" . }}
- name: DITFLEET_LORA_REGISTRY
  value: {{ . | quote }}
{{- if eq $c "scheduler" }}
- name: DITFLEET_LORA_MANIFEST_CACHE_MS
  value: {{ $l.manifestCacheMs | int64 | quote }}
- name: DITFLEET_AFFINITY_WAIT_MS
  value: {{ $l.affinityWaitMs | int64 | quote }}
{{- else }}
- name: DITFLEET_LORA_CACHE_DIR
  value: {{ $l.diskCache.mountPath | quote }}
- name: DITFLEET_LORA_DISK_CACHE_BYTES
  value: {{ $l.diskCache.bytes | int64 | quote }}
- name: DITFLEET_LORA_CACHE_BYTES
  value: {{ $l.hostCacheBytes | int64 | quote }}
- name: DITFLEET_LORA_DEVICE_CACHE_BYTES
  value: {{ $l.deviceCacheBytes | int64 | quote }}
- name: DITFLEET_AFFINITY_POLL_MS
  value: {{ $l.affinityPollMs | int64 | quote }}
{{- end }}
{{- end }}
{{- end -}}
{{- end -}}
