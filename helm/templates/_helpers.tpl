{{/*
Expand the name of the chart.
*/}}
{{- define "llm-cache-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "llm-cache-proxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "llm-cache-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The main workload's component: the proxy itself, or the application it sits beside.
*/}}
{{- define "llm-cache-proxy.component" -}}
{{- if eq .Values.mode "sidecar" }}app{{ else }}proxy{{ end }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "llm-cache-proxy.labels" -}}
helm.sh/chart: {{ include "llm-cache-proxy.chart" . }}
{{ include "llm-cache-proxy.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels. The component keeps the bundled Redis pods out of the main Service and PodDisruptionBudget.
*/}}
{{- define "llm-cache-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-cache-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ include "llm-cache-proxy.component" . }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "llm-cache-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-cache-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Names of the bundled Redis objects and of the Secret the chart creates.
*/}}
{{- define "llm-cache-proxy.redisName" -}}
{{- printf "%s-redis" (include "llm-cache-proxy.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "llm-cache-proxy.secretName" -}}
{{- include "llm-cache-proxy.fullname" . }}
{{- end }}

{{/*
Non-empty when the chart has to create its Secret, i.e. a secret value was given without an existingSecret.
*/}}
{{/* The Sentinels' own password comes from the chart's Secret (sentinel mode, a value, no existing key). */}}
{{- define "llm-cache-proxy.chartSentinelPassword" -}}
{{- $redis := .Values.redis }}
{{- if and (eq $redis.mode "sentinel") $redis.sentinelPassword (not (and $redis.existingSecret $redis.existingSecretSentinelPasswordKey)) -}}
true
{{- end }}
{{- end }}

{{- define "llm-cache-proxy.createSecret" -}}
{{- $values := .Values }}
{{- $given := list
  (and $values.upstream.apiKey (not $values.upstream.existingSecret))
  (and $values.redis.password (not $values.redis.existingSecret))
  (include "llm-cache-proxy.chartSentinelPassword" .)
  (and $values.auth.proxyApiKeys (not $values.auth.existingSecret))
  (and $values.encryption.key (not $values.encryption.existingSecret))
  (and $values.encryption.oldKeys.keys (not $values.encryption.oldKeys.existingSecret))
  (and $values.cacheKeySecret.value (not $values.cacheKeySecret.existingSecret)) }}
{{- if compact $given -}}
true
{{- end }}
{{- end }}

{{/*
Where one secret comes from, as the name and key of a secretKeyRef: existingSecret when set, else the chart's Secret
when the value is given; nothing when neither is. Arguments (a list): root, the group of values with existingSecret
and existingSecretKey, the value itself, and its key in the chart's Secret.
*/}}
{{- define "llm-cache-proxy.secretRef" -}}
{{- $group := index . 1 }}
{{- if $group.existingSecret -}}
name: {{ $group.existingSecret }}
key: {{ $group.existingSecretKey }}
{{- else if index . 2 -}}
name: {{ include "llm-cache-proxy.secretName" (index . 0) }}
key: {{ index . 3 }}
{{- end }}
{{- end }}

{{- define "llm-cache-proxy.encryptionKeyRef" -}}
{{- include "llm-cache-proxy.secretRef" (list . .Values.encryption .Values.encryption.key "encryption-key") }}
{{- end }}

{{/*
The cache backend: config.cache.backend when set, else redis when a Redis is configured, else memory.
*/}}
{{- define "llm-cache-proxy.cacheBackend" -}}
{{- if .Values.config.cache.backend }}
{{- .Values.config.cache.backend }}
{{- else if or .Values.redis.url .Values.redis.bundled.enabled }}
{{- "redis" }}
{{- else }}
{{- "memory" }}
{{- end }}
{{- end }}

{{- define "llm-cache-proxy.redisUrl" -}}
{{- if .Values.redis.bundled.enabled }}
{{- printf "redis://%s:6379/0" (include "llm-cache-proxy.redisName" .) }}
{{- else }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/*
Non-empty when the proxy reaches Redis over TLS with certificates from redis.tls.existingSecret.
*/}}
{{- define "llm-cache-proxy.redisTls" -}}
{{- if and (eq (include "llm-cache-proxy.cacheBackend" .) "redis") .Values.redis.tls.existingSecret -}}
true
{{- end }}
{{- end }}

{{/*
Combinations the schema cannot express. Included by every template that depends on them.
*/}}
{{- define "llm-cache-proxy.validate" -}}
{{- if and .Values.redis.url .Values.redis.bundled.enabled }}
{{- fail "set either redis.url (external Redis) or redis.bundled.enabled, not both" }}
{{- end }}
{{- include "llm-cache-proxy.validateRedisMode" . }}
{{- if and (eq (include "llm-cache-proxy.cacheBackend" .) "redis") (not (include "llm-cache-proxy.redisUrl" .)) }}
{{- fail "config.cache.backend is redis: set redis.url, or redis.bundled.enabled=true" }}
{{- end }}
{{- if and (include "llm-cache-proxy.redisTls" .) (not (hasPrefix "rediss://" (include "llm-cache-proxy.redisUrl" .))) }}
{{- fail "redis.tls.existingSecret needs a rediss:// redis.url (the bundled Redis has no TLS)" }}
{{- end }}
{{- if and (or .Values.encryption.oldKeys.existingSecret .Values.encryption.oldKeys.keys) (not (include "llm-cache-proxy.encryptionKeyRef" .)) }}
{{- fail "encryption.oldKeys only serve to read entries after a rotation: set encryption.key or encryption.existingSecret too" }}
{{- end }}
{{- $names := list }}
{{- $hashes := list }}
{{- range .Values.auth.clientKeys }}
{{- $names = append $names .name }}
{{- $hashes = append $hashes (lower .keySha256) }}
{{- end }}
{{- if ne (len $names) (len (uniq $names)) }}
{{- fail "auth.clientKeys: every name must be different" }}
{{- end }}
{{- if ne (len $hashes) (len (uniq $hashes)) }}
{{- fail "auth.clientKeys: every keySha256 must be different" }}
{{- end }}
{{- if regexMatch "^[a-z]+://[^/@]*:[^/@]*@" .Values.redis.url }}
{{- fail "redis.url must not carry a password: set redis.password or redis.existingSecret instead" }}
{{- end }}
{{- if and (eq .Values.mode "sidecar") .Values.sidecar.native (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) }}
{{- /* Before 1.29 the API server drops restartPolicy from init containers: the pod would never leave Init. */}}
{{- fail "sidecar.native needs Kubernetes 1.29 or later; set sidecar.native=false on this cluster" }}
{{- end }}
{{- if and (eq .Values.mode "sidecar") .Values.metrics.serviceMonitor.enabled }}
{{- fail "metrics.serviceMonitor needs mode=standalone: in sidecar mode the proxy listens on 127.0.0.1 only" }}
{{- end }}
{{- if and (eq .Values.mode "sidecar") .Values.ingress.enabled }}
{{- fail "ingress needs mode=standalone; expose your application with its own Ingress" }}
{{- end }}
{{- if .Values.ingress.enabled }}
{{- range .Values.ingress.hosts }}
{{- if contains "*" .host }}
{{- $domain := trimPrefix "*" .host }}
{{- $named := false }}
{{- range $.Values.server.allowedHosts }}
{{- if hasSuffix $domain . }}{{ $named = true }}{{ end }}
{{- end }}
{{- if not $named }}
{{- fail (printf "ingress host %s is a wildcard, which the proxy cannot match: list the names clients use under it in server.allowedHosts" .host) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Redis deployments other than a single server: what each needs, and lists given for another mode.
*/}}
{{- define "llm-cache-proxy.validateRedisMode" -}}
{{- $redis := .Values.redis }}
{{- if ne $redis.mode "standalone" }}
{{- if $redis.bundled.enabled }}
{{- fail (printf "redis.mode=%s needs an external Redis: the bundled Redis is a single server; set redis.url instead of redis.bundled.enabled" $redis.mode) }}
{{- end }}
{{- if not (regexMatch "^rediss?://" $redis.url) }}
{{- if eq $redis.mode "cluster" }}
{{- fail "redis.mode=cluster needs a redis:// or rediss:// redis.url naming one node of the cluster" }}
{{- else }}
{{- fail "redis.mode=sentinel needs a redis:// or rediss:// redis.url for TLS and the database, e.g. redis://sentinel/0 (its host is ignored)" }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq $redis.mode "cluster") (not (regexMatch "^rediss?://[^/?#]*(/0?)?([?#].*)?$" $redis.url)) }}
{{- fail "redis.mode=cluster: Redis Cluster has database 0 only; end redis.url with /0" }}
{{- end }}
{{- if and (eq $redis.mode "sentinel") (not $redis.sentinels) }}
{{- fail "redis.mode=sentinel needs redis.sentinels, the host:port of each Sentinel" }}
{{- end }}
{{- if and $redis.sentinels (ne $redis.mode "sentinel") }}
{{- fail "redis.sentinels are only used with redis.mode=sentinel" }}
{{- end }}
{{- if and $redis.clusterNodes (ne $redis.mode "cluster") }}
{{- fail "redis.clusterNodes are only used with redis.mode=cluster" }}
{{- end }}
{{- end }}

{{/*
proxy.yaml as mounted into the pod. It is built from .Values.config and the hashes of auth.clientKeys only: the
listen address, the Redis URL and every secret reach the proxy as environment variables or files of Secrets, so
nothing secret can end up in the ConfigMap.
*/}}
{{- define "llm-cache-proxy.proxyConfig" -}}
{{- $config := deepCopy .Values.config }}
{{- $_ := set $config.cache "backend" (include "llm-cache-proxy.cacheBackend" .) }}
{{- if and (eq .Values.redis.mode "cluster") .Values.redis.clusterNodes }}
{{- /* File-only in the proxy: no variable takes the further nodes. */}}
{{- $redis := $config.redis | default dict }}
{{- $_ := set $redis "cluster_nodes" .Values.redis.clusterNodes }}
{{- $_ := set $config "redis" $redis }}
{{- end }}
{{- with .Values.auth.clientKeys }}
{{- $keys := list }}
{{- range . }}
{{- $key := dict "name" .name "key" (printf "sha256:%s" (lower .keySha256)) }}
{{- with .namespace }}
{{- $_ := set $key "namespace" . }}
{{- end }}
{{- $keys = append $keys $key }}
{{- end }}
{{- $_ := set $config "auth" (dict "client_keys" $keys) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Host names the proxy answers besides localhost and IP addresses (PROXY_ALLOWED_HOSTS), comma-separated. Standalone:
the Service's names, every ingress host without a wildcard, then server.allowedHosts; bound to 0.0.0.0, the proxy
checks Host names only once this list is set. Sidecar: server.allowedHosts only, since the proxy listens on
127.0.0.1, where it checks Host names anyway and its application calls it by address.
*/}}
{{- define "llm-cache-proxy.allowedHosts" -}}
{{- $hosts := list }}
{{- if ne .Values.mode "sidecar" }}
{{- $service := include "llm-cache-proxy.fullname" . }}
{{- $namespaced := printf "%s.%s" $service .Release.Namespace }}
{{- $hosts = list $service $namespaced (printf "%s.svc" $namespaced) (printf "%s.svc.%s" $namespaced .Values.clusterDomain) }}
{{- if .Values.ingress.enabled }}
{{- range .Values.ingress.hosts }}
{{- if and .host (not (contains "*" .host)) }}
{{- $hosts = append $hosts .host }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- concat $hosts .Values.server.allowedHosts | uniq | join "," }}
{{- end }}

{{- define "llm-cache-proxy.listenHost" -}}
{{- if eq .Values.mode "sidecar" }}127.0.0.1{{ else }}0.0.0.0{{ end }}
{{- end }}

{{/*
One probe of the proxy. In standalone mode the kubelet calls the port; in sidecar mode the proxy listens on the
pod's loopback, which the kubelet cannot reach, so the check runs inside the container (the image has no curl).
Arguments: root, path, timing (periodSeconds, timeoutSeconds, failureThreshold).
*/}}
{{- define "llm-cache-proxy.probe" -}}
{{- if eq .root.Values.mode "sidecar" -}}
exec:
  command:
    - python
    - -c
    - "import os, sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['PROXY_PORT'] + sys.argv[1], timeout=3)"
    - {{ .path }}
{{- else -}}
httpGet:
  path: {{ .path }}
  port: http
{{- end }}
{{ toYaml .timing }}
{{- end }}

{{/*
The proxy container, defined once. Used as the standalone Deployment's container, as a native sidecar
(initContainers entry with restartPolicy: Always) and as a plain extra container for clusters before 1.29.
Arguments: root, native (bool).
*/}}
{{- define "llm-cache-proxy.proxyContainer" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $backend := include "llm-cache-proxy.cacheBackend" $root -}}
- name: llm-cache-proxy
  image: "{{ $values.image.repository }}:{{ $values.image.tag | default $root.Chart.AppVersion }}"
  imagePullPolicy: {{ $values.image.pullPolicy }}
  {{- if .native }}
  # A native sidecar: started before the application containers, stopped after them.
  restartPolicy: Always
  {{- end }}
  {{- with $values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    - name: PROXY_HOST
      value: {{ include "llm-cache-proxy.listenHost" $root | quote }}
    - name: PROXY_PORT
      value: {{ $values.containerPort | quote }}
    - name: PROXY_CONFIG
      value: /etc/llm-cache-proxy/proxy.yaml
    {{- with include "llm-cache-proxy.allowedHosts" $root }}
    - name: PROXY_ALLOWED_HOSTS
      value: {{ . | quote }}
    {{- end }}
    {{- with $values.server.allowedOrigins }}
    - name: PROXY_ALLOWED_ORIGINS
      value: {{ join "," . | quote }}
    {{- end }}
    {{- if or $values.upstream.existingSecret $values.upstream.apiKey }}
    - name: OPENAI_API_KEY
      valueFrom:
        secretKeyRef:
          {{- if $values.upstream.existingSecret }}
          name: {{ $values.upstream.existingSecret }}
          key: {{ $values.upstream.existingSecretKey }}
          {{- else }}
          name: {{ include "llm-cache-proxy.secretName" $root }}
          key: openai-api-key
          {{- end }}
    {{- end }}
    {{- if eq $backend "redis" }}
    - name: REDIS_MODE
      value: {{ $values.redis.mode | quote }}
    - name: REDIS_URL
      value: {{ include "llm-cache-proxy.redisUrl" $root | quote }}
    {{- if eq $values.redis.mode "sentinel" }}
    - name: REDIS_SENTINELS
      value: {{ join "," $values.redis.sentinels | quote }}
    - name: REDIS_SENTINEL_MASTER
      value: {{ $values.redis.sentinelMaster | quote }}
    {{- end }}
    {{- with $values.redis.username }}
    - name: REDIS_USERNAME
      value: {{ . | quote }}
    {{- end }}
    {{- if not $values.redis.tls.checkHostname }}
    - name: REDIS_TLS_CHECK_HOSTNAME
      value: "false"
    {{- end }}
    {{- end }}
    {{- if include "llm-cache-proxy.redisTls" $root }}
    {{- with $values.redis.tls }}
    {{- if .caKey }}
    - name: REDIS_TLS_CA_FILE
      value: /etc/redis-tls/{{ .caKey }}
    {{- end }}
    {{- if .clientCertificate }}
    - name: REDIS_TLS_CERT_FILE
      value: /etc/redis-tls/{{ .certKey }}
    - name: REDIS_TLS_KEY_FILE
      value: /etc/redis-tls/{{ .keyKey }}
    {{- end }}
    {{- end }}
    {{- end }}
    {{- if or $values.redis.existingSecret $values.redis.password }}
    - name: REDIS_PASSWORD
      valueFrom:
        secretKeyRef:
          {{- if $values.redis.existingSecret }}
          name: {{ $values.redis.existingSecret }}
          key: {{ $values.redis.existingSecretPasswordKey }}
          {{- else }}
          name: {{ include "llm-cache-proxy.secretName" $root }}
          key: redis-password
          {{- end }}
    {{- end }}
    {{- if eq $values.redis.mode "sentinel" }}
    {{- if and $values.redis.existingSecret $values.redis.existingSecretSentinelPasswordKey }}
    - name: REDIS_SENTINEL_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ $values.redis.existingSecret }}
          key: {{ $values.redis.existingSecretSentinelPasswordKey }}
    {{- else if include "llm-cache-proxy.chartSentinelPassword" $root }}
    - name: REDIS_SENTINEL_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ include "llm-cache-proxy.secretName" $root }}
          key: redis-sentinel-password
    {{- end }}
    {{- end }}
    {{- if or $values.auth.existingSecret $values.auth.proxyApiKeys }}
    - name: PROXY_API_KEYS
      valueFrom:
        secretKeyRef:
          {{- if $values.auth.existingSecret }}
          name: {{ $values.auth.existingSecret }}
          key: {{ $values.auth.existingSecretKey }}
          {{- else }}
          name: {{ include "llm-cache-proxy.secretName" $root }}
          key: proxy-api-keys
          {{- end }}
    {{- end }}
    {{- if include "llm-cache-proxy.encryptionKeyRef" $root }}
    # Read from the mounted Secret below, so that the key stays out of the environment.
    - name: CACHE_ENCRYPTION_KEY_FILE
      value: /etc/cache-encryption/key
    {{- end }}
    {{- with include "llm-cache-proxy.secretRef" (list $root $values.encryption.oldKeys $values.encryption.oldKeys.keys "encryption-old-keys") }}
    - name: CACHE_ENCRYPTION_OLD_KEYS
      valueFrom:
        secretKeyRef:
          {{- . | nindent 10 }}
    {{- end }}
    {{- with include "llm-cache-proxy.secretRef" (list $root $values.cacheKeySecret $values.cacheKeySecret.value "cache-key-secret") }}
    - name: CACHE_KEY_SECRET
      valueFrom:
        secretKeyRef:
          {{- . | nindent 10 }}
    {{- end }}
    {{- with $values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $values.extraEnvFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if ne $values.mode "sidecar" }}
  ports:
    - name: http
      containerPort: {{ $values.containerPort }}
      protocol: TCP
  {{- end }}
  startupProbe:
    {{- include "llm-cache-proxy.probe" (dict "root" $root "path" "/readyz" "timing" $values.probes.startup) | nindent 4 }}
  livenessProbe:
    {{- include "llm-cache-proxy.probe" (dict "root" $root "path" "/healthz" "timing" $values.probes.liveness) | nindent 4 }}
  readinessProbe:
    {{- include "llm-cache-proxy.probe" (dict "root" $root "path" "/readyz" "timing" $values.probes.readiness) | nindent 4 }}
  {{- if and (eq $values.mode "sidecar") (not .native) $values.sidecar.preStopSleepS }}
  lifecycle:
    # A plain container gets SIGTERM together with the application: keep serving its last calls for a while.
    preStop:
      exec:
        command: ["python", "-c", "import time; time.sleep({{ $values.sidecar.preStopSleepS }})"]
  {{- end }}
  {{- with $values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: llm-cache-proxy-config
      mountPath: /etc/llm-cache-proxy
      readOnly: true
    - name: llm-cache-proxy-tmp
      mountPath: /tmp
    {{- if include "llm-cache-proxy.redisTls" $root }}
    - name: llm-cache-proxy-redis-tls
      mountPath: /etc/redis-tls
      readOnly: true
    {{- end }}
    {{- if include "llm-cache-proxy.encryptionKeyRef" $root }}
    - name: llm-cache-proxy-encryption
      mountPath: /etc/cache-encryption
      readOnly: true
    {{- end }}
    {{- with $values.volumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
Labels of the bundled Redis.
*/}}
{{- define "llm-cache-proxy.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-cache-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "llm-cache-proxy.redisLabels" -}}
helm.sh/chart: {{ include "llm-cache-proxy.chart" . }}
{{ include "llm-cache-proxy.redisSelectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
