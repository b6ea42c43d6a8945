{{/* Names: at most 63 characters, as Kubernetes names and label values must be. */}}
{{- define "llm-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-proxy.fullname" -}}
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

{{- define "llm-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-proxy.labels" -}}
helm.sh/chart: {{ include "llm-proxy.chart" . }}
{{ include "llm-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llm-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The proxy pods: what the Service and the PodDisruptionBudget select. */}}
{{- define "llm-proxy.proxySelectorLabels" -}}
{{ include "llm-proxy.selectorLabels" . }}
app.kubernetes.io/component: proxy
{{- end }}

{{- define "llm-proxy.dispatcherSelectorLabels" -}}
{{ include "llm-proxy.selectorLabels" . }}
app.kubernetes.io/component: dispatcher
{{- end }}

{{- define "llm-proxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "llm-proxy.configMapName" -}}
{{- printf "%s-config" (include "llm-proxy.fullname" .) }}
{{- end }}

{{/*
The Secret every pod reads its shared secrets from: the operator's own, or the chart's. Without
either, rendering stops here with the value to set, rather than pods crash-looping later.
*/}}
{{- define "llm-proxy.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- include "llm-proxy.fullname" . }}
{{- end }}
{{- end }}

{{/* The keys of the Secret, each the variable it fills, comma-separated: what every proxy pod
must be given (its REQUIRED_SETTINGS), for one left empty would be generated or defaulted per pod. */}}
{{- define "llm-proxy.secretKeys" -}}
DATABASE_URL,REDIS_URL,MANAGEMENT_TOKEN,ENCRYPTION_KEY,ADMIN_PASSWORD
{{- end }}

{{/* The variables the server and `llm-proxy migrate` read alike (the database and the secrets). */}}
{{- define "llm-proxy.sharedEnv" -}}
{{- $secret := include "llm-proxy.secretName" . }}
{{- range splitList "," (include "llm-proxy.secretKeys" .) }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ . }}
{{- end }}
- name: ADMIN_USER
  value: {{ .Values.adminUser | quote }}
- name: LLM_PROXY_EVENT_BUS
  value: redis
- name: DATA_DIR
  value: /app/data
- name: LOG_LEVEL
  value: {{ .Values.proxy.logLevel | quote }}
- name: LOG_FORMAT
  value: json
{{- end }}

{{/* The pod-level settings every pod of the chart shares. */}}
{{- define "llm-proxy.podSpecCommon" -}}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* The files of the ConfigMap, name to content, as JSON: the values' config.files, and the
chart's copy of the repository's prices.yaml unless the values give their own. */}}
{{- define "llm-proxy.configFiles" -}}
{{- $files := deepCopy .Values.config.files }}
{{- if not (hasKey $files "prices.yaml") }}
{{- $_ := set $files "prices.yaml" (.Files.Get "files/prices.yaml") }}
{{- end }}
{{- toJson $files }}
{{- end }}
