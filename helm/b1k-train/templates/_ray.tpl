{{/* The Ray cluster shared by the RayJob (spec.rayClusterSpec) and the optional long-lived RayCluster (spec). */}}

{{- define "b1k.elastic" -}}
{{- if lt (int .Values.training.workers.minReplicas) (int .Values.training.workers.maxReplicas) -}}true{{- end -}}
{{- end -}}

{{/* `--workers` of the command: one Ray Train worker per GPU (or cpuTrainWorkersPerPod), MIN:MAX when elastic. */}}
{{- define "b1k.trainWorkers" -}}
{{- $w := .Values.training.workers -}}
{{- if .Values.training.trainWorkers -}}
{{- .Values.training.trainWorkers -}}
{{- else -}}
{{- $per := ternary (int $w.gpusPerWorker) (int $w.cpuTrainWorkersPerPod) (gt (int $w.gpusPerWorker) 0) -}}
{{- $lo := mul (int $w.minReplicas) $per -}}
{{- $hi := mul (int $w.maxReplicas) $per -}}
{{- if eq $lo $hi }}{{ $hi }}{{ else }}{{ $lo }}:{{ $hi }}{{ end -}}
{{- end -}}
{{- end -}}

{{/* The shell command the job runs on the head (`b1k-train` is the image's console script). */}}
{{- define "b1k.entrypoint" -}}
{{- $t := .Values.training -}}
b1k-train {{ $t.command }} {{ $t.recipe }} --run-name {{ $t.runName }} --storage {{ .Values.storage.url | squote }} --workers {{ include "b1k.trainWorkers" . }}
{{- range $t.overrides }} --set {{ . | squote }}{{ end }}
{{- range $t.extraArgs }} {{ . | squote }}{{ end }}
{{- end -}}

{{/* Environment of the Ray containers: shared env, the GPU choice for Ray Train, NCCL settings on GPUs only. */}}
{{- define "b1k.rayEnv" -}}
{{ include "b1k.commonEnv" . }}
- name: B1K_USE_GPU
  value: {{ ternary "1" "0" (gt (int .Values.training.workers.gpusPerWorker) 0) | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if gt (int .Values.training.workers.gpusPerWorker) 0 }}
{{- $n := .Values.training.nccl }}
- name: NCCL_DEBUG
  value: {{ $n.debug | quote }}
- name: NCCL_SOCKET_IFNAME
  value: {{ $n.socketIfname | quote }}
- name: NCCL_IB_DISABLE
  value: {{ ternary "1" "0" $n.ibDisable | quote }}
{{- range $k, $v := $n.extraEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}
{{- with .Values.training.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* One Ray pod template. Call with (dict "root" $ "role" "head"|"worker"). */}}
{{- define "b1k.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $t := $root.Values.training -}}
{{- $g := ternary $t.head $t.workers (eq .role "head") -}}
{{- $gpus := ternary 0 (int $t.workers.gpusPerWorker) (eq .role "head") -}}
metadata:
  labels:
    {{- include "b1k.labels" (dict "root" $root "component" (printf "ray-%s" .role)) | nindent 4 }}
    b1k-train/run-name: {{ $t.runName | quote }}
spec:
  serviceAccountName: {{ include "b1k.serviceAccountName" $root }}
  # Only the head's autoscaler (elastic worker groups) talks to the Kubernetes API.
  automountServiceAccountToken: {{ and (eq .role "head") (eq (include "b1k.elastic" $root) "true") }}
  securityContext:
    {{- include "b1k.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  containers:
    - name: ray-{{ .role }}
      image: {{ include "b1k.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      env:
        {{- include "b1k.rayEnv" $root | nindent 8 }}
      resources:
        {{- include "b1k.resourcesWithGpus" (dict "resources" $g.resources "gpus" $gpus) | nindent 8 }}
      securityContext:
        {{- include "b1k.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        {{- include "b1k.scratchMounts" $root | nindent 8 }}
        - name: dshm
          mountPath: /dev/shm
  volumes:
    {{- include "b1k.scratchVolumes" $t.scratchSize | nindent 4 }}
    # NCCL and the DataLoader workers exchange tensors through shared memory; the container default is 64 MiB.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $t.shmSize }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "b1k.rayClusterSpec" -}}
{{- $t := .Values.training -}}
rayVersion: {{ $t.rayVersion | quote }}
authOptions:
  mode: {{ $t.rayAuth }}
{{- if eq (include "b1k.elastic" .) "true" }}
# Elastic training: the in-tree autoscaler adds worker pods up to maxReplicas when Ray Train asks for them.
enableInTreeAutoscaling: true
autoscalerOptions:
  upscalingMode: Default
  idleTimeoutSeconds: 300
  resources:
    requests: {cpu: 200m, memory: 512Mi}
    limits: {cpu: 500m, memory: 1Gi}
  securityContext:
    {{- include "b1k.containerSecurityContext" . | nindent 4 }}
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- toYaml (default (dict) $t.head.rayStartParams) | nindent 4 }}
  template:
    {{- include "b1k.rayPodTemplate" (dict "root" . "role" "head") | nindent 4 }}
workerGroupSpecs:
  - groupName: {{ $t.workers.groupName }}
    replicas: {{ $t.workers.replicas }}
    minReplicas: {{ $t.workers.minReplicas }}
    maxReplicas: {{ $t.workers.maxReplicas }}
    rayStartParams:
      {{- toYaml (default (dict) $t.workers.rayStartParams) | nindent 6 }}
    template:
      {{- include "b1k.rayPodTemplate" (dict "root" . "role" "worker") | nindent 6 }}
{{- end -}}
