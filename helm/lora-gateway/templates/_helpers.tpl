{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "lora-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart> (just <release> when it already contains the chart name),
truncated to 63 characters. Objects that add a suffix stay under the limit through
"lora-gateway.suffixed".
*/}}
{{- define "lora-gateway.fullname" -}}
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

{{/* fullname-suffix within 63 characters: (dict "ctx" $ "suffix" "migrate") */}}
{{- define "lora-gateway.suffixed" -}}
{{- $base := include "lora-gateway.fullname" .ctx | trunc (int (sub 62 (len .suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base .suffix }}
{{- end }}

{{- define "lora-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels, without the component. */}}
{{- define "lora-gateway.commonLabels" -}}
helm.sh/chart: {{ include "lora-gateway.chart" . }}
app.kubernetes.io/name: {{ include "lora-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lora-gateway
{{- end }}

{{/* Standard labels of the gateway's objects. */}}
{{- define "lora-gateway.labels" -}}
{{ include "lora-gateway.commonLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Labels that select the gateway pods (Service, PDB, NetworkPolicy, InferencePool). */}}
{{- define "lora-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lora-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* The fine-tuning workers' objects: their own component, so nothing of the gateway's selects them. */}}
{{- define "lora-gateway.workerLabels" -}}
{{ include "lora-gateway.commonLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "lora-gateway.workerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "lora-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "lora-gateway.workerName" -}}
{{- include "lora-gateway.suffixed" (dict "ctx" . "suffix" "worker") }}
{{- end }}

{{/* A size such as 40Gi, in MiB (rounded up). */}}
{{- define "lora-gateway.mebibytes" -}}
{{- $n := regexFind "^[0-9]+" . | int64 }}
{{- $unit := regexFind "[KMGT]i$" . }}
{{- if eq $unit "Ki" }}{{ div (add $n 1023) 1024 }}{{ else if eq $unit "Mi" }}{{ $n }}{{ else if eq $unit "Gi" }}{{ mul $n 1024 }}{{ else }}{{ mul $n 1048576 }}{{ end }}
{{- end }}

{{/* The pod's disk-backed emptyDirs' limits, summed: its ephemeral-storage request. */}}
{{- define "lora-gateway.ephemeralStorage" -}}
{{- $v := .Values }}
{{- $mib := include "lora-gateway.mebibytes" $v.tmpSizeLimit | int64 }}
{{- if ne $v.adapterCache.type "pvc" }}
{{- $mib = add $mib (mul (int64 $v.adapterCache.sizeGiB) 1024) }}
{{- end }}
{{- if eq $v.model.source "s3" }}
{{- $mib = add $mib (include "lora-gateway.mebibytes" $v.model.s3.sizeLimit | int64) }}
{{- end }}
{{- printf "%dMi" $mib }}
{{- end }}

{{/* The same for a worker pod: /tmp, the scratch folder, and the fetched base. */}}
{{- define "lora-gateway.workerEphemeralStorage" -}}
{{- $v := .Values }}
{{- $mib := add (include "lora-gateway.mebibytes" $v.tmpSizeLimit | int64) (include "lora-gateway.mebibytes" $v.worker.scratch.sizeLimit | int64) }}
{{- if eq $v.model.source "s3" }}
{{- $mib = add $mib (include "lora-gateway.mebibytes" $v.model.s3.sizeLimit | int64) }}
{{- end }}
{{- printf "%dMi" $mib }}
{{- end }}

{{- define "lora-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lora-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lora-gateway.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The gateway's image unless worker.image names another repository or tag. */}}
{{- define "lora-gateway.workerImage" -}}
{{- $tag := .Values.worker.image.tag | default .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) }}
{{- printf "%s:%s" (.Values.worker.image.repository | default .Values.image.repository) $tag }}
{{- end }}

{{/* More than one gateway can run at once: quotas then need Redis. */}}
{{- define "lora-gateway.multiReplica" -}}
{{- if or (gt (int .Values.replicaCount) 1) .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}true{{- end }}
{{- end }}

{{/* S3 is used by the registry's artifacts (always s3://) and perhaps the base checkpoint. */}}
{{- define "lora-gateway.s3Env" -}}
{{- if not .Values.secrets.s3.ambientCredentials -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.s3.existingSecret }}
      key: {{ .Values.secrets.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.s3.existingSecret }}
      key: {{ .Values.secrets.s3.secretAccessKeyKey }}
{{- end }}
{{- end }}

{{- define "lora-gateway.databaseEnv" -}}
- name: LGW_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.database.existingSecret }}
      key: {{ .Values.secrets.database.key }}
{{- end }}

{{/* disk_cache_max_bytes: 90% of the cache volume, the rest is room for downloads in progress. */}}
{{- define "lora-gateway.diskCacheMaxBytes" -}}
{{- div (mul (int64 .Values.adapterCache.sizeGiB) 1073741824 9) 10 }}
{{- end }}

{{- define "lora-gateway.terminationGracePeriodSeconds" -}}
{{- add .Values.gateway.preStopSleepSeconds .Values.gateway.drainGraceSeconds .Values.gateway.shutdownMarginSeconds }}
{{- end }}

{{/* The base checkpoint, shared by the gateway and the workers: the volume, its mount, and
(model.source s3) the init container that fetches it into that volume. */}}
{{- define "lora-gateway.baseModelVolume" -}}
- name: base-model
  {{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.s3.sizeLimit }}
  {{- end }}
{{- end }}

{{- define "lora-gateway.baseModelMount" -}}
- name: base-model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
  {{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath }}
  {{- end }}
{{- end }}

{{- define "lora-gateway.fetchBase" -}}
{{- $v := .Values -}}
- name: fetch-base
  image: {{ $v.model.s3.fetchImage }}
  imagePullPolicy: IfNotPresent
  command:
    - aws
    - s3
    - sync
    - --only-show-errors
    {{- with $v.registry.s3EndpointUrl }}
    - --endpoint-url
    - {{ . | quote }}
    {{- end }}
    - {{ $v.model.s3.uri | quote }}
    - {{ $v.model.mountPath | quote }}
  env:
    - name: HOME
      value: /tmp
    - name: AWS_DEFAULT_REGION
      value: {{ $v.registry.s3Region | quote }}
    {{- include "lora-gateway.s3Env" . | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  resources:
    requests:
      cpu: 500m
      memory: 512Mi
    limits:
      memory: 1Gi
  volumeMounts:
    - name: base-model
      mountPath: {{ $v.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/* KEDA's default count for the workers: jobs waiting or running whose template is for
model.id (what `lora-gateway worker` claims), as a SQL string literal with quotes doubled. */}}
{{- define "lora-gateway.workerJobsQuery" -}}
SELECT count(*) FROM fine_tuning_jobs j JOIN templates t ON t.template_id = j.template_id JOIN bases b ON b.id = t.base_id WHERE j.status IN ('validating_files','queued','running') AND b.model_id = '{{ replace "'" "''" .Values.model.id }}'
{{- end }}
