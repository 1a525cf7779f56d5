{{/*
Checks the schema cannot express; each failure says what to set. Included by every
template that renders an object depending on them, so `helm template` fails early.
*/}}
{{- define "lora-gateway.validate" -}}
{{- $v := .Values }}
{{- if not $v.model.id }}
{{- fail "lora-gateway: model.id is required: the registered base model id this gateway serves (see `lora-gateway registry add-base`)" }}
{{- end }}
{{- if not (hasPrefix "s3://" $v.registry.artifacts) }}
{{- fail "lora-gateway: registry.artifacts is required and must be s3://bucket/prefix: every replica reads the same artifact store" }}
{{- end }}
{{- if not $v.secrets.database.existingSecret }}
{{- fail "lora-gateway: secrets.database.existingSecret is required: create a Secret holding the registry's SQLAlchemy URL first (kubectl create secret generic lgw-database --from-literal=database-url=postgresql+psycopg://USER:PASSWORD@HOST:5432/DB) and set secrets.database.existingSecret=lgw-database" }}
{{- end }}
{{- if and (not $v.secrets.s3.ambientCredentials) (not $v.secrets.s3.existingSecret) }}
{{- fail "lora-gateway: secrets.s3.existingSecret is required: create a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (kubectl create secret generic lgw-s3 --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...) and set secrets.s3.existingSecret=lgw-s3, or set secrets.s3.ambientCredentials=true to use workload identity" }}
{{- end }}
{{- if and (include "lora-gateway.multiReplica" .) (not $v.secrets.redis.existingSecret) }}
{{- fail "lora-gateway: secrets.redis.existingSecret is required when more than one replica can run (replicaCount > 1 or autoscaling): quotas are enforced in Redis across replicas. Create a Secret with the Redis URL (kubectl create secret generic lgw-redis --from-literal=redis-url=redis://:PASSWORD@HOST:6379/0) and set secrets.redis.existingSecret=lgw-redis" }}
{{- end }}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.claimName) }}
{{- fail "lora-gateway: model.pvc.claimName is required when model.source is pvc: the claim holding the base checkpoint" }}
{{- end }}
{{- if and (eq $v.model.source "s3") (not (hasPrefix "s3://" $v.model.s3.uri)) }}
{{- fail "lora-gateway: model.s3.uri is required when model.source is s3, as s3://bucket/prefix/ of the checkpoint folder" }}
{{- end }}
{{- if lt (int $v.engine.maxCpuLoras) (int $v.engine.maxLoras) }}
{{- fail (printf "lora-gateway: engine.maxCpuLoras (%v) must be at least engine.maxLoras (%v): every adapter in a batch is also in engine memory" $v.engine.maxCpuLoras $v.engine.maxLoras) }}
{{- end }}
{{- if and (eq $v.image.flavor "gpu") (lt (int $v.gpu.count) 1) }}
{{- fail "lora-gateway: image.flavor gpu needs gpu.count >= 1; use image.flavor=cpu for a GPU-less cluster" }}
{{- end }}
{{- if and (eq $v.image.flavor "cpu") (gt (int $v.gpu.count) 0) }}
{{- fail "lora-gateway: image.flavor cpu cannot use GPUs: set gpu.count=0, or image.flavor=gpu" }}
{{- end }}
{{- if gt (int $v.gpu.count) 0 }}
{{- range $kind, $set := (dict "requests" $v.resources.requests "limits" $v.resources.limits) }}
{{- if and $set (hasKey $set $v.gpu.resourceName) }}
{{- fail (printf "lora-gateway: resources.%s must not name %s: set the GPUs per pod in gpu.count (it goes into both requests and limits)" $kind $v.gpu.resourceName) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $v.autoscaling.hpa.enabled $v.autoscaling.keda.enabled }}
{{- fail "lora-gateway: enable at most one of autoscaling.hpa and autoscaling.keda (KEDA manages an HPA of its own)" }}
{{- end }}
{{- if and $v.autoscaling.keda.enabled (not $v.autoscaling.keda.query) (not $v.serviceMonitor.enabled) }}
{{- fail "lora-gateway: autoscaling.keda's default query reads what the ServiceMonitor scrapes (its namespace and service labels): set serviceMonitor.enabled=true, or autoscaling.keda.query to a query over how your Prometheus scrapes the pods' metrics port" }}
{{- end }}
{{- if gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas) }}
{{- fail "lora-gateway: autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and (eq $v.adapterCache.type "pvc") (not $v.adapterCache.pvc.claimName) }}
{{- fail "lora-gateway: adapterCache.pvc.claimName is required when adapterCache.type is pvc" }}
{{- end }}
{{- if and (eq $v.adapterCache.type "pvc") (include "lora-gateway.multiReplica" .) }}
{{- fail "lora-gateway: adapterCache.type pvc serves one replica only (each gateway owns its cache folder); use emptyDir with more replicas" }}
{{- end }}
{{- if and $v.inferencePool.enabled (not $v.inferencePool.endpointPicker.serviceName) }}
{{- fail "lora-gateway: inferencePool.endpointPicker.serviceName is required when inferencePool.enabled: the Service of the endpoint picker installed for this pool" }}
{{- end }}
{{- if and $v.ingress.enabled (not $v.ingress.hosts) }}
{{- fail "lora-gateway: ingress.hosts needs at least one host when ingress.enabled" }}
{{- end }}
{{- if $v.worker.enabled }}
{{- $w := $v.worker }}
{{- if and (eq $v.image.flavor "cpu") (not $w.image.repository) (gt (int $w.gpu.count) 0) }}
{{- fail "lora-gateway: worker.gpu.count must be 0 with image.flavor cpu (the workers run the gateway's CPU image): set worker.gpu.count=0, or worker.image.repository to an image built for GPUs" }}
{{- end }}
{{- if gt (int $w.gpu.count) 0 }}
{{- range $kind, $set := (dict "requests" $w.resources.requests "limits" $w.resources.limits) }}
{{- if and $set (hasKey $set $v.gpu.resourceName) }}
{{- fail (printf "lora-gateway: worker.resources.%s must not name %s: set the GPUs per worker in worker.gpu.count (it goes into both requests and limits)" $kind $v.gpu.resourceName) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $w.keda.enabled }}
{{- if not $w.keda.connection.existingSecret }}
{{- fail "lora-gateway: worker.keda.connection.existingSecret is required when worker.keda.enabled: KEDA's postgresql scaler reads the jobs table with a libpq connection string, which the SQLAlchemy URL of secrets.database (postgresql+psycopg://...) is not. Create a Secret (kubectl create secret generic lgw-keda-database --from-literal=connection='postgresql://USER:PASSWORD@HOST:5432/DB?sslmode=require') and set worker.keda.connection.existingSecret=lgw-keda-database" }}
{{- end }}
{{- if gt (int $w.keda.minReplicaCount) (int $w.keda.maxReplicaCount) }}
{{- fail "lora-gateway: worker.keda.minReplicaCount must not exceed worker.keda.maxReplicaCount" }}
{{- end }}
{{- if and $w.keda.scaleDownOnlyWhenIdle (gt (int $w.keda.minReplicaCount) 0) }}
{{- fail "lora-gateway: worker.keda.scaleDownOnlyWhenIdle needs worker.keda.minReplicaCount=0: workers are then removed only by scaling to zero, so with a minimum they would never be removed. Set minReplicaCount=0, or scaleDownOnlyWhenIdle=false to remove workers as jobs finish (a busy one may be stopped)" }}
{{- end }}
{{- end }}
{{- end }}
{{- range $v.gateway.extraEnv }}
{{- if hasPrefix "LGW_" .name }}
{{- fail (printf "lora-gateway: gateway.extraEnv must not set %s: gateway settings go in gateway.settings (secrets in secrets.*)" .name) }}
{{- end }}
{{- if and (has .name (list "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY")) (hasKey . "value") }}
{{- fail (printf "lora-gateway: gateway.extraEnv must not carry %s in plain values: use secrets.s3.existingSecret" .name) }}
{{- end }}
{{- end }}
{{- end }}
