{{/* Names, labels and the pieces every pod shares (image, security, environment, scratch volumes). */}}

{{- define "b1k.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "b1k.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Object names of the parts; kept short enough for KubeRay's generated names (<= 40 characters). */}}
{{- define "b1k.mlflowName" -}}{{ include "b1k.fullname" . | trunc 40 | trimSuffix "-" }}-mlflow{{- end -}}
{{- define "b1k.serverName" -}}{{ include "b1k.fullname" . | trunc 40 | trimSuffix "-" }}-policy{{- end -}}
{{- define "b1k.rayName" -}}
{{- if .Values.training.jobName -}}{{ .Values.training.jobName }}{{- else -}}
{{ include "b1k.fullname" . | trunc 40 | trimSuffix "-" }}-ray{{- end -}}
{{- end -}}

{{- define "b1k.selectorLabels" -}}
app.kubernetes.io/name: {{ include "b1k.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Call with (dict "root" $ "component" "policy-server"). */}}
{{- define "b1k.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "b1k.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: b1k-train
{{- end -}}

{{- define "b1k.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "b1k.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "b1k.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* The tracking URI every pod gets: the bundled server's Service, or the external one. */}}
{{- define "b1k.mlflowUri" -}}
{{- if .Values.mlflow.enabled -}}
http://{{ include "b1k.mlflowName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.mlflow.port }}
{{- else -}}
{{- required "mlflow.externalUri: set the tracking URI of your MLflow server when mlflow.enabled is false" .Values.mlflow.externalUri -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by training and serving: storage endpoint and credentials (from a Secret only), MLflow,
     and writable locations under the emptyDir $HOME (the root filesystem is read-only). */}}
{{- define "b1k.commonEnv" -}}
- name: HOME
  value: /home/b1k
- name: B1K_MODEL_CACHE
  value: /home/b1k/.cache/b1k-train/models
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: MLFLOW_TRACKING_URI
  value: {{ include "b1k.mlflowUri" . | quote }}
{{- with .Values.mlflow.tokenSecret.name }}
- name: MLFLOW_TRACKING_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.mlflow.tokenSecret.key }}
{{- end }}
{{- with .Values.mlflow.credentialsSecret.name }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.mlflow.credentialsSecret.usernameKey }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.mlflow.credentialsSecret.passwordKey }}
{{- end }}
- name: AWS_REGION
  value: {{ .Values.storage.s3.region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.storage.s3.region | quote }}
{{- with .Values.storage.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- include "b1k.s3CredentialsEnv" . }}
{{- end -}}

{{- define "b1k.s3CredentialsEnv" -}}
{{- with .Values.storage.s3.credentialsSecret.name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.storage.s3.credentialsSecret.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.storage.s3.credentialsSecret.secretAccessKeyKey }}
{{- end }}
{{- end -}}

{{- define "b1k.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end -}}

{{- define "b1k.containerSecurityContext" -}}
{{ toYaml .Values.containerSecurityContext }}
{{- end -}}

{{/* Writable scratch on a read-only root: /tmp and $HOME. Call with the size limit. */}}
{{- define "b1k.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ . }}
- name: home
  emptyDir:
    sizeLimit: {{ . }}
{{- end -}}

{{- define "b1k.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/b1k
{{- end -}}

{{/* Resources with the GPU count added to requests and limits. Call with (dict "resources" R "gpus" N). */}}
{{- define "b1k.resourcesWithGpus" -}}
{{- $r := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $r "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $r.limits)) -}}
{{- $_ := set $r "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $r.requests)) -}}
{{- end -}}
{{ toYaml $r }}
{{- end -}}
