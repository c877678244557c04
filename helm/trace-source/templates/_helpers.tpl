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

{{/*
Kafka client security (kafka.security), the same for every component: TRACE_SOURCE_KAFKA_* variables (every
command reads them, the assembler included), the SASL password by secretKeyRef (never a literal in the pod spec), and
the CA, client certificate and OAUTHBEARER token as files from Secrets, mounted without subPath so that a rotated
Secret reaches the pod. Rendering fails when the settings cannot work.
*/}}
{{- define "trace-source.kafkaSecurityDir" -}}
/etc/trace-source/kafka
{{- end }}

{{- define "trace-source.validateKafkaSecurity" -}}
{{- $s := .Values.kafka.security }}
{{- $sasl := has $s.protocol (list "SASL_PLAINTEXT" "SASL_SSL") }}
{{- $tls := has $s.protocol (list "SSL" "SASL_SSL") }}
{{- if $sasl }}
{{- if eq $s.sasl.mechanism "OAUTHBEARER" }}
{{- if not $s.sasl.oauthTokenSecret.name }}
{{- fail "kafka.security.sasl.mechanism=OAUTHBEARER needs kafka.security.sasl.oauthTokenSecret.name: a Secret holding the bearer token (kept fresh by whoever issues it; it is re-read for every new connection)" }}
{{- end }}
{{- else }}
{{- if not (or $s.sasl.username $s.sasl.usernameSecret.name) }}
{{- fail (printf "kafka.security.protocol=%s needs kafka.security.sasl.username (or sasl.usernameSecret)" $s.protocol) }}
{{- end }}
{{- if not $s.sasl.passwordSecret.name }}
{{- fail (printf "kafka.security.protocol=%s needs kafka.security.sasl.passwordSecret.name: the Secret holding the SASL password (key sasl.passwordSecret.key), e.g.\n  kubectl create secret generic kafka-sasl --from-literal=password='...'" $s.protocol) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (not $tls) (or $s.tls.caSecret.name $s.tls.clientCertSecret.name) }}
{{- fail (printf "kafka.security.tls.* is set but kafka.security.protocol is %s: use SSL or SASL_SSL" $s.protocol) }}
{{- end }}
{{- end }}

{{- define "trace-source.kafkaSecurityEnv" -}}
{{- include "trace-source.validateKafkaSecurity" . }}
{{- $s := .Values.kafka.security }}
{{- $dir := include "trace-source.kafkaSecurityDir" . }}
{{- if ne $s.protocol "PLAINTEXT" }}
- name: TRACE_SOURCE_KAFKA_SECURITY_PROTOCOL
  value: {{ $s.protocol | quote }}
{{- end }}
{{- if has $s.protocol (list "SASL_PLAINTEXT" "SASL_SSL") }}
- name: TRACE_SOURCE_KAFKA_SASL_MECHANISM
  value: {{ $s.sasl.mechanism | quote }}
{{- if eq $s.sasl.mechanism "OAUTHBEARER" }}
- name: TRACE_SOURCE_KAFKA_SASL_OAUTH_TOKEN_FILE
  value: {{ printf "%s/oauth/%s" $dir $s.sasl.oauthTokenSecret.key | quote }}
{{- else }}
- name: TRACE_SOURCE_KAFKA_SASL_USERNAME
{{- if $s.sasl.usernameSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ $s.sasl.usernameSecret.name }}
      key: {{ $s.sasl.usernameSecret.key }}
{{- else }}
  value: {{ $s.sasl.username | quote }}
{{- end }}
- name: TRACE_SOURCE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $s.sasl.passwordSecret.name }}
      key: {{ $s.sasl.passwordSecret.key }}
{{- end }}
{{- end }}
{{- if $s.tls.caSecret.name }}
- name: TRACE_SOURCE_KAFKA_SSL_CA_FILE
  value: {{ printf "%s/ca/%s" $dir $s.tls.caSecret.key | quote }}
{{- end }}
{{- if $s.tls.clientCertSecret.name }}
- name: TRACE_SOURCE_KAFKA_SSL_CERT_FILE
  value: {{ printf "%s/client/%s" $dir $s.tls.clientCertSecret.certKey | quote }}
- name: TRACE_SOURCE_KAFKA_SSL_KEY_FILE
  value: {{ printf "%s/client/%s" $dir $s.tls.clientCertSecret.keyKey | quote }}
{{- end }}
{{- if and (has $s.protocol (list "SSL" "SASL_SSL")) (not $s.tls.checkHostname) }}
- name: TRACE_SOURCE_KAFKA_SSL_CHECK_HOSTNAME
  value: "false"
{{- end }}
{{- end }}

{{- define "trace-source.kafkaSecurityVolumeMounts" -}}
{{- $s := .Values.kafka.security }}
{{- $dir := include "trace-source.kafkaSecurityDir" . }}
{{- if $s.tls.caSecret.name }}
- name: kafka-ca
  mountPath: {{ $dir }}/ca
  readOnly: true
{{- end }}
{{- if $s.tls.clientCertSecret.name }}
- name: kafka-client-cert
  mountPath: {{ $dir }}/client
  readOnly: true
{{- end }}
{{- if and (has $s.protocol (list "SASL_PLAINTEXT" "SASL_SSL")) (eq $s.sasl.mechanism "OAUTHBEARER") }}
- name: kafka-oauth-token
  mountPath: {{ $dir }}/oauth
  readOnly: true
{{- end }}
{{- end }}

{{- define "trace-source.kafkaSecurityVolumes" -}}
{{- $s := .Values.kafka.security }}
{{- if $s.tls.caSecret.name }}
- name: kafka-ca
  secret:
    secretName: {{ $s.tls.caSecret.name }}
    items:
      - {key: {{ $s.tls.caSecret.key | quote }}, path: {{ $s.tls.caSecret.key | quote }}}
{{- end }}
{{- if $s.tls.clientCertSecret.name }}
- name: kafka-client-cert
  secret:
    secretName: {{ $s.tls.clientCertSecret.name }}
    # The key stays readable by the pod's user only (fsGroup), never by others.
    defaultMode: 0440
    items:
      - {key: {{ $s.tls.clientCertSecret.certKey | quote }}, path: {{ $s.tls.clientCertSecret.certKey | quote }}}
      - {key: {{ $s.tls.clientCertSecret.keyKey | quote }}, path: {{ $s.tls.clientCertSecret.keyKey | quote }}}
{{- end }}
{{- if and (has $s.protocol (list "SASL_PLAINTEXT" "SASL_SSL")) (eq $s.sasl.mechanism "OAUTHBEARER") }}
- name: kafka-oauth-token
  secret:
    secretName: {{ $s.sasl.oauthTokenSecret.name }}
    defaultMode: 0440
    items:
      - {key: {{ $s.sasl.oauthTokenSecret.key | quote }}, path: {{ $s.sasl.oauthTokenSecret.key | quote }}}
{{- end }}
{{- end }}

{{/*
OTLP TLS of the receiver (receiver.tls): the Secret (kubernetes.io/tls, e.g. written by a cert-manager Certificate)
mounted as a directory, so that renewals reach the pod and `serve` reloads them.
*/}}
{{- define "trace-source.receiverTlsDir" -}}
/etc/trace-source/tls
{{- end }}
