{{/*
The loop's stage workers (grade -> seed -> reproduce -> fix): `trace-source worker <stage>`, one Deployment = one
Kafka consumer group per enabled stage under .Values.stages. Their settings are the product's LoopSettings,
read from TRACE_SOURCE_<NAME> environment variables (`trace-source worker <stage> --help` lists them).
*/}}

{{/* The stages in the loop's order. */}}
{{- define "trace-source.stageNames" -}}
[grade, seed, reproduce, fix]
{{- end }}

{{/*
Per stage (pipeline/stages/*.py): the component name of its objects, the phase the execution policy must reach, and
its input topic's key in "trace-source.loopTopics".
*/}}
{{- define "trace-source.stageDefinitions" -}}
grade: {component: grader, phase: 1, input: traces}
seed: {component: seeder, phase: 2, input: grades}
reproduce: {component: reproducer, phase: 3, input: seeds}
fix: {component: fixer, phase: 4, input: reproductions}
{{- end }}

{{/* How far each execution policy goes, in the phase numbers above (pipeline/policy.py). */}}
{{- define "trace-source.policyReach" -}}
{observe: 0, grade: 1, reproduce: 3, fix: 4}
{{- end }}

{{/* The loop's topics by short name, each mapped to its LoopSettings field. */}}
{{- define "trace-source.loopTopics" -}}
{{- $t := .Values.loop.topics }}
traces: {setting: traces_topic, topic: {{ .Values.kafka.tracesTopic | quote }}}
grades: {setting: grades_topic, topic: {{ $t.grades | quote }}}
seeds: {setting: seeds_topic, topic: {{ $t.seeds | quote }}}
reproductions: {setting: reproductions_topic, topic: {{ $t.reproductions | quote }}}
fixes: {setting: fixes_topic, topic: {{ $t.fixes | quote }}}
dlq: {setting: dlq_topic, topic: {{ .Values.kafka.dlqTopic | quote }}}
{{- end }}

{{/* Names of the enabled stages, as a YAML list. */}}
{{- define "trace-source.enabledStages" -}}
{{- $out := list }}
{{- range $name := include "trace-source.stageNames" . | fromYamlArray }}
{{- if (index $.Values.stages $name).enabled }}
{{- $out = append $out $name }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
One stage's parameters for the _workers.tpl helpers (without root and values), as YAML. Call with
(dict "root" $ "stage" "grade").
*/}}
{{- define "trace-source.stageWorker" -}}
{{- $def := index (include "trace-source.stageDefinitions" .root | fromYaml) .stage }}
{{- $topics := include "trace-source.loopTopics" .root | fromYaml }}
component: {{ $def.component }}
name: {{ include "trace-source.componentName" (dict "root" .root "component" $def.component) }}
path: stages.{{ .stage }}
kind: Deployment
groupId: {{ (index .root.Values.stages .stage).groupId | quote }}
topic: {{ (index $topics $def.input).topic | quote }}
{{- end }}

{{/*
Rendering fails, with what to set, when an enabled stage could not run: the Postgres ledger/journal Secret, an
execution policy that never reaches the stage (the worker refuses to start), the repository and the shared artifact
store the later stages work with, an image override without a tag, a shutdown grace the kubelet would cut short,
HPA and KEDA together.
Call with (dict "root" $ "stage" "grade").
*/}}
{{- define "trace-source.validateStage" -}}
{{- $root := .root }}
{{- $s := index $root.Values.stages .stage }}
{{- $loop := $root.Values.loop }}
{{- $path := printf "stages.%s" .stage }}
{{- if not $loop.database.existingSecret }}
{{- fail (printf "loop.database.existingSecret is required while %s is enabled: the stage workers keep their idempotency ledger and journal in Postgres, shared by every worker. Create a Secret holding a postgresql://user:password@host:5432/db URL under the key loop.database.key (%q), e.g.\n  kubectl create secret generic trace-source-db --from-literal=%s='postgresql://...'\nand set loop.database.existingSecret=trace-source-db; or turn the stage off (%s.enabled=false; the grade stage is on by default)." $path $loop.database.key $loop.database.key $path) }}
{{- end }}
{{- $def := index (include "trace-source.stageDefinitions" $root | fromYaml) .stage }}
{{- $reach := index (include "trace-source.policyReach" $root | fromYaml) $loop.executionPolicy }}
{{- if and (ne .stage "grade") (lt (int $reach) (int $def.phase)) }}
{{- fail (printf "%s is enabled but loop.executionPolicy=%s never reaches the %s phase (the worker would refuse to start): raise loop.executionPolicy or set %s.enabled=false" $path $loop.executionPolicy .stage $path) }}
{{- end }}
{{- if and (ne .stage "grade") (not $loop.repository) }}
{{- fail (printf "%s needs loop.repository: the agent's repository holding the contract folder (trace-source/ or archal/), as a path inside the image or a git URL the worker clones" $path) }}
{{- end }}
{{- if and (ne .stage "grade") (not $root.Values.artifacts.existingClaim) }}
{{- fail (printf "%s needs artifacts.existingClaim: from the seed stage on, each stage reads the files the stage before it wrote (grades/, seeds/, runs/ under artifacts.mountPath), so every stage worker must mount one shared ReadWriteMany PersistentVolumeClaim, the same the assembler claim-checks envelopes into" $path) }}
{{- end }}
{{- if and $s.image.repository (not (or $s.image.tag $s.image.digest)) }}
{{- fail (printf "%s.image.repository is set: give %s.image.tag or %s.image.digest too (an image built FROM trace-source has its own tags)" $path $path $path) }}
{{- end }}
{{- if le (float64 $s.terminationGracePeriodSeconds) (float64 $s.shutdownGraceSeconds) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed %s.shutdownGraceSeconds (%v): on SIGTERM work in progress gets the shutdown grace, then its claim is released and offsets committed; the kubelet's SIGKILL must not come first" $path $s.terminationGracePeriodSeconds $path $s.shutdownGraceSeconds) }}
{{- end }}
{{- include "trace-source.worker.scalingExclusive" (dict "values" $s "path" $path "kind" "Deployment") }}
{{- end }}

{{/* The stage's image: its own override (an image built FROM trace-source with the agent's runtime), else the chart's. */}}
{{- define "trace-source.stageImage" -}}
{{- $i := .image }}
{{- if not $i.repository }}
{{- include "trace-source.image" .root }}
{{- else if $i.digest }}
{{- printf "%s@%s" $i.repository $i.digest }}
{{- else }}
{{- printf "%s:%s" $i.repository $i.tag }}
{{- end }}
{{- end }}

{{/* Whether a raw EnvVar list defines `name`. Call with (dict "env" list "name" "HOME"); "true" or "". */}}
{{- define "trace-source.envHas" -}}
{{- range .env }}
{{- if eq .name $.name }}true{{ end }}
{{- end }}
{{- end }}

{{/*
The stage container's environment. Chart-managed settings first; then loop.settings merged under the stage's own
settings (the stage's win); secrets by reference only. Call with (dict "root" $ "stage" "grade").
*/}}
{{- define "trace-source.stageEnv" -}}
{{- $root := .root }}
{{- $s := index $root.Values.stages .stage }}
{{- $loop := $root.Values.loop }}
{{- $settings := merge (deepCopy ($s.settings | default dict)) ($loop.settings | default dict) }}
{{- $scratch := include "trace-source.scratchPath" $root }}
- name: TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS
  value: {{ include "trace-source.kafkaBootstrapServers" $root | quote }}
{{- include "trace-source.kafkaSecurityEnv" $root }}
- name: TRACE_SOURCE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $loop.database.existingSecret }}
      key: {{ $loop.database.key }}
- name: TRACE_SOURCE_EXECUTION_POLICY
  value: {{ $loop.executionPolicy | quote }}
- name: TRACE_SOURCE_ALLOW_EXTERNAL_EXECUTION
  value: {{ include "trace-source.envValue" $loop.allowExternalExecution }}
{{- range $short, $t := include "trace-source.loopTopics" $root | fromYaml }}
- name: TRACE_SOURCE_{{ upper $t.setting }}
  value: {{ $t.topic | quote }}
{{- end }}
- name: TRACE_SOURCE_CONSUMER_GROUP
  value: {{ $s.groupId | quote }}
- name: TRACE_SOURCE_METRICS_HOST
  value: {{ $s.listenHost | quote }}
- name: TRACE_SOURCE_METRICS_PORT
  value: {{ include "trace-source.envValue" $s.metricsPort }}
- name: TRACE_SOURCE_SHUTDOWN_GRACE_S
  value: {{ include "trace-source.envValue" $s.shutdownGraceSeconds }}
{{- /* The same store the assembler claim-checks envelopes into (envelope_store_dir defaults to it). */}}
- name: TRACE_SOURCE_ARTIFACT_DIR
  value: {{ $root.Values.artifacts.mountPath | quote }}
- name: TRACE_SOURCE_STATE_DIR
  value: {{ printf "%s/state" $scratch | quote }}
{{- if not (include "trace-source.envHas" (dict "env" $s.extraEnv "name" "HOME")) }}
{{- /* The root filesystem is read-only; git, harnesses and coding agents need a writable HOME. */}}
- name: HOME
  value: {{ $scratch | quote }}
{{- end }}
{{- with $loop.repository }}
- name: TRACE_SOURCE_REPO
  value: {{ . | quote }}
{{- end }}
{{- if and (eq .stage "grade") $loop.judge.apiKeySecret.name }}
- name: TRACE_SOURCE_JUDGE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $loop.judge.apiKeySecret.name }}
      key: {{ $loop.judge.apiKeySecret.key }}
{{- end }}
{{- if and (eq .stage "fix") $loop.forge.tokenSecret.name }}
- name: TRACE_SOURCE_FORGE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $loop.forge.tokenSecret.name }}
      key: {{ $loop.forge.tokenSecret.key }}
{{- end }}
{{- if and (has .stage (list "reproduce" "fix")) (not (hasKey $settings "otlp_endpoint")) }}
{{- /* Harness attempts export their own traces to the receiver, so the same grader grades them. */}}
- name: TRACE_SOURCE_OTLP_ENDPOINT
  value: {{ include "trace-source.receiverEndpoint" $root | quote }}
{{- end }}
{{- range $key, $value := $settings }}
{{- if not (kindIs "invalid" $value) }}
- name: {{ printf "TRACE_SOURCE_%s" (upper $key) }}
  value: {{ include "trace-source.envValue" $value }}
{{- end }}
{{- end }}
{{- with $s.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Mount point of a stage pod's scratch volume (HOME; the state dir with git clones and working copies below it). */}}
{{- define "trace-source.scratchPath" -}}
/var/lib/trace-source/scratch
{{- end }}

{{/* The receiver's in-cluster OTLP/HTTP endpoint. */}}
{{- define "trace-source.receiverEndpoint" -}}
{{- $svc := include "trace-source.componentName" (dict "root" . "component" "receiver") }}
{{- $scheme := ternary "https" "http" (not (empty .Values.receiver.tls.existingSecret)) }}
{{- printf "%s://%s.%s.svc:%v" $scheme $svc .Release.Namespace (index .Values.receiver.ports "otlp-http").servicePort }}
{{- end }}

{{/* The install notes' part about the loop's stages (NOTES.txt). */}}
{{- define "trace-source.loopNotes" -}}
{{- $stages := include "trace-source.enabledStages" . | fromYamlArray }}
{{- $loop := .Values.loop }}
{{- if $stages }}
{{- $topics := include "trace-source.loopTopics" . | fromYaml }}
{{- $defs := include "trace-source.stageDefinitions" . | fromYaml }}
{{- $outputs := dict "grade" "grades" "seed" "seeds" "reproduce" "reproductions" "fix" "fixes" }}
{{- $first := "" }}

The loop's stages (execution policy {{ $loop.executionPolicy }}), one Deployment = one consumer group each:
{{- range $stage := $stages }}
{{- $w := include "trace-source.stageWorker" (dict "root" $ "stage" $stage) | fromYaml }}
{{- if not $first }}{{ $first = $w.name }}{{ end }}
{{- $s := index $.Values.stages $stage }}
  {{ printf "%-9s" $stage }} {{ $w.name }} (group {{ $w.groupId }}): {{ $w.topic }} -> {{ (index $topics (index $outputs $stage)).topic }}
  {{- if $s.keda.enabled }}; KEDA on lag{{ else if $s.autoscaling.enabled }}; HPA{{ end }}
  {{- if $s.image.repository }}; image {{ include "trace-source.stageImage" (dict "root" $ "image" $s.image) }}{{ end }}
{{- end }}
  Ledger and journal: Postgres, URL from Secret {{ $loop.database.existingSecret }} (key {{ $loop.database.key }}).
  Dead letters: {{ .Values.kafka.dlqTopic }}. Artifacts (grades/, seeds/, runs/, fixes/) under {{ .Values.artifacts.mountPath }}.
  Where the loop stands (reads the journal):
    kubectl -n {{ .Release.Namespace }} exec deploy/{{ $first }} -- trace-source status
  Metrics, /healthz, /readyz of a stage:
    kubectl -n {{ .Release.Namespace }} port-forward deploy/{{ $first }} {{ (index .Values.stages (first $stages)).metricsPort }}
{{- if or (has "reproduce" $stages) (has "fix" $stages) }}

  The reproduce and fix workers run the repository's harness (and the fix worker its coding agent) inside their
  pods: their image must hold the agent's runtime. Build one FROM {{ include "trace-source.image" . }} and set
  stages.reproduce.image / stages.fix.image. Attempts export their traces to {{ include "trace-source.receiverEndpoint" . }}.
{{- if .Values.auth.existingSecret }}
  Receiver authentication is on: give the harness OTEL_EXPORTER_OTLP_HEADERS (extraEnvFrom + settings.pass_env),
  or the attempts' traces are refused and no attempt can be graded.
{{- end }}
{{- end }}
{{- if and (has "fix" $stages) (not $loop.allowExternalExecution) }}

  WARNING: stages.fix is enabled but loop.allowExternalExecution is false: every reproduced failure ends blocked
  ("external execution not allowed") and nothing is patched. Set loop.allowExternalExecution=true to let it run.
{{- end }}
{{- if not .Values.artifacts.existingClaim }}

  WARNING: artifacts.existingClaim is not set: the grade workers cannot read envelopes the assembler claim-checked
  into its own emptyDir (bigger than max_message_bytes); those go to the dead-letter topic.
{{- end }}
{{- else }}

No loop stage is enabled (stages.*.enabled): runs are assembled but not graded.
{{- end }}
{{- end }}
