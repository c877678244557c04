{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "trace-source.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "trace-source.fullname" -}}
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

{{/* Name of a component's objects: <fullname>-<component>, e.g. trace-source-receiver. */}}
{{- define "trace-source.componentName" -}}
{{- printf "%s-%s" (include "trace-source.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trace-source.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trace-source.labels" -}}
helm.sh/chart: {{ include "trace-source.chart" . }}
{{ include "trace-source.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trace-source
{{- end }}

{{- define "trace-source.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trace-source.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component. Call with (dict "root" $ "component" "receiver"). */}}
{{- define "trace-source.componentLabels" -}}
{{ include "trace-source.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "trace-source.componentSelectorLabels" -}}
{{ include "trace-source.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "trace-source.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trace-source.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "trace-source.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Kafka bootstrap servers, failing the render when unset. The chart deploys stateless receiver replicas that need a
shared broker; the embedded local log of `trace-source serve` is for one machine and is not offered here.
*/}}
{{- define "trace-source.kafkaBootstrapServers" -}}
{{- $servers := .Values.kafka.bootstrapServers | default "" | trim }}
{{- if not $servers }}
{{- fail "kafka.bootstrapServers is required (e.g. --set kafka.bootstrapServers=kafka:9092): the chart runs stateless receiver replicas that publish to Kafka; the embedded local log is for a single machine (run `trace-source serve` without a broker there instead)" }}
{{- end }}
{{- $servers }}
{{- end }}

{{/*
An env var value from a values scalar/list: strings as is, lists comma-joined (the app's env format), numbers and
booleans through toJson so large integers do not turn into 6.7108864e+07.
*/}}
{{- define "trace-source.envValue" -}}
{{- if kindIs "string" . }}
{{- . | quote }}
{{- else if kindIs "slice" . }}
{{- join "," . | quote }}
{{- else }}
{{- toJson . | quote }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by every pod of the chart (service account token, pull secrets, security). */}}
{{- define "trace-source.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Name of the assembler's StatefulSet (and its Service, PDB, HPA, ScaledObject, ServiceMonitor). A StatefulSet name
must leave room for the pods' controller-revision-hash label (<name>-<10-char hash> within 63 characters), so it is
limited to 52 characters; failing beats silently truncating a name that other objects refer to.
*/}}
{{- define "trace-source.assemblerName" -}}
{{- $name := printf "%s-assembler" (include "trace-source.fullname" .) }}
{{- if gt (len $name) 52 }}
{{- fail (printf "the assembler StatefulSet name %q is longer than 52 characters; set a shorter release name or fullnameOverride (at most 42 characters)" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/* Upper replica bound of an autoscaled consumer group: the value, or topics.partitions when null. */}}
{{- define "trace-source.maxConsumers" -}}
{{- $max := .max }}
{{- if kindIs "invalid" $max }}
{{- $max = .root.Values.topics.partitions }}
{{- end }}
{{- $max }}
{{- end }}
