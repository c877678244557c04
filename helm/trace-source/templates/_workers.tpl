{{/*
Objects every consumer-group worker gets (the assembler StatefulSet and each loop stage's Deployment): the headless
metrics Service, its ServiceMonitor, the PodDisruptionBudget and the HorizontalPodAutoscaler or KEDA ScaledObject.

Each helper takes one dict:
  root       the chart's root context ($)
  component  the app.kubernetes.io/component label, e.g. "assembler", "grader"
  name       the objects' name (the workload's name)
  path       where the component's values live, for error messages, e.g. "assembler", "stages.grade"
  values     the component's values (enabled, metricsPort, autoscaling, keda, podDisruptionBudget, ...)
  kind       the scaled workload's kind: StatefulSet or Deployment
  groupId    the consumer group (KEDA's lag source)
  topic      the group's input topic (KEDA's lag source)
and renders nothing when the feature is off.
*/}}

{{/* Headless Service of the metrics port: per-pod DNS and the endpoints Prometheus scrapes. */}}
{{- define "trace-source.worker.service" -}}
{{- $ctx := dict "root" .root "component" .component }}
# Headless Service of the {{ .component }}'s metrics port (/metrics, /healthz, /readyz). The workers receive no
# traffic, so it needs no cluster IP.
apiVersion: v1
kind: Service
metadata:
  name: {{ .name }}
  labels:
    {{- include "trace-source.componentLabels" $ctx | nindent 4 }}
spec:
  clusterIP: None
  # Scrape and resolve starting pods too.
  publishNotReadyAddresses: true
  selector:
    {{- include "trace-source.componentSelectorLabels" $ctx | nindent 4 }}
  ports:
    - name: metrics
      port: {{ .values.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end }}

{{- define "trace-source.worker.serviceMonitor" -}}
{{- $m := .root.Values.serviceMonitor }}
{{- if $m.enabled }}
{{- $ctx := dict "root" .root "component" .component }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ .name }}
  labels:
    {{- include "trace-source.componentLabels" $ctx | nindent 4 }}
    {{- with $m.extraLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "trace-source.componentSelectorLabels" $ctx | nindent 6 }}
  namespaceSelector:
    matchNames:
      - {{ .root.Release.Namespace }}
  endpoints:
    - port: metrics
      path: /metrics
      {{- with $m.interval }}
      interval: {{ . }}
      {{- end }}
      {{- with $m.scrapeTimeout }}
      scrapeTimeout: {{ . }}
      {{- end }}
      {{- with $m.relabelings }}
      relabelings:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $m.metricRelabelings }}
      metricRelabelings:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
{{- end }}

{{- define "trace-source.worker.pdb" -}}
{{- $p := .values.podDisruptionBudget }}
{{- if $p.enabled }}
{{- $ctx := dict "root" .root "component" .component }}
{{- $hasMin := not (kindIs "invalid" $p.minAvailable) }}
{{- $hasMax := not (kindIs "invalid" $p.maxUnavailable) }}
{{- if eq $hasMin $hasMax }}
{{- fail (printf "%s.podDisruptionBudget: set exactly one of minAvailable and maxUnavailable (the other to null)" .path) }}
{{- end }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  labels:
    {{- include "trace-source.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if $hasMin }}
  minAvailable: {{ $p.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $p.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "trace-source.componentSelectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- end }}

{{/*
Chart HPA and KEDA are mutually exclusive: KEDA creates its own HorizontalPodAutoscaler for a ScaledObject, and two
HPAs on one workload fight over its replica count.
*/}}
{{- define "trace-source.worker.scalingExclusive" -}}
{{- if and .values.autoscaling.enabled .values.keda.enabled }}
{{- fail (printf "%s.autoscaling.enabled and %s.keda.enabled are mutually exclusive: KEDA creates its own HorizontalPodAutoscaler for the ScaledObject, and two HPAs on one %s fight over its replica count. Enable one of them." .path .path .kind) }}
{{- end }}
{{- end }}

{{- define "trace-source.worker.hpa" -}}
{{- $h := .values.autoscaling }}
{{- if $h.enabled }}
{{- $ctx := dict "root" .root "component" .component }}
{{- if not (or $h.targetCPUUtilizationPercentage $h.targetMemoryUtilizationPercentage $h.additionalMetrics) }}
{{- fail (printf "%s.autoscaling.enabled needs at least one of targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage, additionalMetrics" .path) }}
{{- end }}
{{- $max := include "trace-source.maxConsumers" (dict "root" .root "max" $h.maxReplicas) | int }}
{{- if lt $max (int $h.minReplicas) }}
{{- fail (printf "%s.autoscaling: minReplicas (%v) exceeds maxReplicas (%v, topics.partitions when null)" .path $h.minReplicas $max) }}
{{- end }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ .name }}
  labels:
    {{- include "trace-source.componentLabels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: {{ .kind }}
    name: {{ .name }}
  minReplicas: {{ $h.minReplicas }}
  maxReplicas: {{ $max }}
  {{- with $h.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  metrics:
    {{- with $h.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
    {{- with $h.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
    {{- with $h.additionalMetrics }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}

{{- define "trace-source.worker.scaledObject" -}}
{{- $k := .values.keda }}
{{- if $k.enabled }}
{{- $ctx := dict "root" .root "component" .component }}
{{- $max := include "trace-source.maxConsumers" (dict "root" .root "max" $k.maxReplicaCount) | int }}
{{- if lt $max (int $k.minReplicaCount) }}
{{- fail (printf "%s.keda: minReplicaCount (%v) exceeds maxReplicaCount (%v, topics.partitions when null)" .path $k.minReplicaCount $max) }}
{{- end }}
# Scales the {{ .component }} on its consumer group's lag (KEDA apache-kafka scaler). Gated on values only, so it
# renders offline; the KEDA operator and its CRDs must be installed in the cluster.
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ .name }}
  labels:
    {{- include "trace-source.componentLabels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: {{ .kind }}
    name: {{ .name }}
  minReplicaCount: {{ $k.minReplicaCount }}
  maxReplicaCount: {{ $max }}
  pollingInterval: {{ $k.pollingInterval }}
  cooldownPeriod: {{ $k.cooldownPeriod }}
  {{- with $k.behavior }}
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        {{- toYaml . | nindent 8 }}
  {{- end }}
  triggers:
    - type: kafka
      metadata:
        bootstrapServers: {{ include "trace-source.kafkaBootstrapServers" .root | quote }}
        consumerGroup: {{ .groupId | quote }}
        topic: {{ .topic | quote }}
        {{- /* Trigger metadata is a map of strings; envValue keeps 1000000 from turning into "1e+06". */}}
        lagThreshold: {{ include "trace-source.envValue" $k.lagThreshold }}
        {{- if not (kindIs "invalid" $k.activationLagThreshold) }}
        activationLagThreshold: {{ include "trace-source.envValue" $k.activationLagThreshold }}
        {{- end }}
        offsetResetPolicy: {{ $k.offsetResetPolicy | quote }}
        allowIdleConsumers: {{ include "trace-source.envValue" $k.allowIdleConsumers }}
        {{- range $key, $value := $k.extraTriggerMetadata }}
        {{ $key }}: {{ include "trace-source.envValue" $value }}
        {{- end }}
      {{- with $k.authenticationRef }}
      authenticationRef:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
{{- end }}

{{/* The assembler's parameters of the helpers above (without root and values), as YAML. */}}
{{- define "trace-source.assemblerWorker" -}}
component: assembler
name: {{ include "trace-source.assemblerName" . }}
path: assembler
kind: StatefulSet
groupId: {{ .Values.assembler.groupId | quote }}
topic: {{ .Values.kafka.topic | quote }}
{{- end }}
