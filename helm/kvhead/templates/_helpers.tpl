{{/* Names, labels and the Ray pod template shared by the head and the worker groups. */}}

{{- define "kvhead.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvhead.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvhead.labels" -}}
{{ include "kvhead.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kvhead.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "kvhead.serveConfigMap" -}}
{{ include "kvhead.fullname" . }}-serve-config
{{- end -}}

{{- define "kvhead.redisName" -}}
{{ include "kvhead.fullname" . }}-redis
{{- end -}}

{{/* The Secret holding Redis's password: the operator's, or the one the chart creates. */}}
{{- define "kvhead.redisSecret" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{ .Values.redis.auth.existingSecret }}
{{- else -}}
{{ include "kvhead.redisName" . }}
{{- end -}}
{{- end -}}

{{- define "kvhead.redisSecretKey" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{ .Values.redis.auth.existingSecretKey }}
{{- else -}}
password
{{- end -}}
{{- end -}}

{{- define "kvhead.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "kvhead.redisName" . }}.{{ .Release.Namespace }}.svc:6379/0
{{- else -}}
{{ .Values.redis.externalUrl }}
{{- end -}}
{{- end -}}

{{- define "kvhead.redisConfigured" -}}
{{- if or .Values.redis.enabled .Values.redis.externalUrl -}}true{{- end -}}
{{- end -}}

{{/* Whether a password Secret exists: the operator's, or one the chart renders. */}}
{{- define "kvhead.redisHasPassword" -}}
{{- if or .Values.redis.auth.existingSecret .Values.redis.enabled .Values.redis.auth.password -}}true{{- end -}}
{{- end -}}

{{/*
A Ray pod: the Ray container (its ports, the serve config, the metrics folder, Redis's address
and password by reference) and the `kvhead metrics` sidecar sharing the metrics emptyDir and the
process namespace. Called with (dict "root" $ "component" "head"|"worker" "group" <values>).
*/}}
{{- define "kvhead.rayPod" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
metadata:
  labels:
    {{- include "kvhead.labels" $root | nindent 4 }}
    app.kubernetes.io/component: ray-{{ .component }}
  annotations:
    # A changed serving config rolls the Ray cluster: new pods read the new ConfigMap when the
    # application is built (a mounted ConfigMap updates too late for an in-place redeploy).
    kvhead.io/serve-config-sha256: {{ toYaml $values.serve | sha256sum }}
spec:
  shareProcessNamespace: true
  {{- with $values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .component }}
      image: {{ include "kvhead.image" $root }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      ports:
        {{- if eq .component "head" }}
        - name: gcs
          containerPort: {{ $values.ports.gcs }}
        - name: dashboard
          containerPort: {{ $values.ports.dashboard }}
        - name: client
          containerPort: {{ $values.ports.client }}
        {{- end }}
        - name: serve
          containerPort: {{ $values.serve.port }}
        - name: metrics
          containerPort: {{ $values.ports.metrics }}
      env:
        - name: KVHEAD_HOME
          value: {{ $values.kvheadHome | quote }}
        {{- if include "kvhead.redisConfigured" $root }}
        - name: KVHEAD_REDIS_URL
          value: {{ include "kvhead.redisUrl" $root | quote }}
        {{- end }}
        {{- if include "kvhead.redisHasPassword" $root }}
        - name: KVHEAD_REDIS_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ include "kvhead.redisSecret" $root }}
              key: {{ include "kvhead.redisSecretKey" $root }}
        {{- end }}
        {{- with $values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $resources := deepCopy (.group.resources | default dict) }}
      {{- if gt (int (.group.gpus | default 0)) 0 }}
      {{- $limits := deepCopy ($resources.limits | default dict) }}
      {{- $_ := set $limits "nvidia.com/gpu" (int .group.gpus) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: serve-config
          mountPath: /etc/kvhead
          readOnly: true
        - name: kvhead-metrics
          mountPath: {{ $values.serve.metrics_dir }}
        - name: kvhead-home
          mountPath: {{ $values.kvheadHome }}
        - name: dshm
          mountPath: /dev/shm
        {{- with $values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    - name: kvhead-metrics
      image: {{ include "kvhead.image" $root }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      command: ["kvhead", "metrics", {{ $values.serve.metrics_dir | quote }}, "--port", {{ $values.metricsSidecar.port | quote }}]
      ports:
        - name: kvhead-metrics
          containerPort: {{ $values.metricsSidecar.port }}
      readinessProbe:
        httpGet:
          path: /metrics
          port: kvhead-metrics
        periodSeconds: 10
      livenessProbe:
        httpGet:
          path: /metrics
          port: kvhead-metrics
        initialDelaySeconds: 30
        periodSeconds: 30
      {{- with $values.metricsSidecar.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: kvhead-metrics
          mountPath: {{ $values.serve.metrics_dir }}
  volumes:
    - name: serve-config
      configMap:
        name: {{ include "kvhead.serveConfigMap" $root }}
    - name: kvhead-metrics
      emptyDir: {}
    - name: kvhead-home
      {{- if $values.homeVolume }}
      {{- toYaml $values.homeVolume | nindent 6 }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    - name: dshm
      emptyDir:
        medium: Memory
    {{- with $values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
