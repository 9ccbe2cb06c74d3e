{{/*
Chart name, overridable with nameOverride. Truncated to 63 characters (DNS label).
*/}}
{{- define "workbroker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: "<release>-<chart name>", or the release name alone
when it already contains the chart name. Truncated so that suffixed names
("-headless", "-migrate") still fit 63 characters.
*/}}
{{- define "workbroker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "workbroker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels (Kubernetes recommended labels), without component.
*/}}
{{- define "workbroker.labels" -}}
helm.sh/chart: {{ include "workbroker.chart" . }}
app.kubernetes.io/name: {{ include "workbroker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: workbroker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of the broker (server) resources.
*/}}
{{- define "workbroker.brokerLabels" -}}
{{ include "workbroker.labels" . }}
app.kubernetes.io/component: broker
{{- end }}

{{/*
Selector labels of the broker pods. Immutable once installed.
*/}}
{{- define "workbroker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "workbroker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end }}

{{/*
Name of the ServiceAccount of the broker pods.
*/}}
{{- define "workbroker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "workbroker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image reference: repository@digest when a digest is set, else repository:tag
(tag defaulting to the chart's appVersion).
*/}}
{{- define "workbroker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
Name of the existing Secret; fails with a clear message when it is not set.
*/}}
{{- define "workbroker.secretName" -}}
{{- required "existingSecret.name is required: the name of an existing Secret in the release namespace holding the PostgreSQL URL (key existingSecret.databaseUrlKey, default DATABASE_URL)" .Values.existingSecret.name }}
{{- end }}

{{/*
Whether etcd is configured at all (endpoints in values or in the Secret).
*/}}
{{- define "workbroker.etcdConfigured" -}}
{{- if or .Values.etcd.endpoints .Values.existingSecret.etcdEndpointsKey }}true{{- end }}
{{- end }}

{{/*
Checks of value combinations that the JSON schema cannot express.
Included once by the Deployment; renders nothing.
*/}}
{{- define "workbroker.validate" -}}
{{- if and .Values.etcd.endpoints .Values.existingSecret.etcdEndpointsKey }}
{{- fail "set the etcd endpoints either in etcd.endpoints or through existingSecret.etcdEndpointsKey, not both" }}
{{- end }}
{{- if and .Values.existingSecret.etcdPasswordKey (not .Values.existingSecret.etcdUsernameKey) }}
{{- fail "existingSecret.etcdPasswordKey is set without existingSecret.etcdUsernameKey" }}
{{- end }}
{{- if and .Values.existingSecret.etcdUsernameKey (not .Values.existingSecret.etcdPasswordKey) }}
{{- fail "existingSecret.etcdUsernameKey is set without existingSecret.etcdPasswordKey" }}
{{- end }}
{{- if and (or .Values.existingSecret.etcdUsernameKey .Values.existingSecret.etcdPasswordKey) (not (include "workbroker.etcdConfigured" .)) }}
{{- fail "etcd credentials are configured but no etcd endpoint: set etcd.endpoints or existingSecret.etcdEndpointsKey" }}
{{- end }}
{{- $needed := add (.Values.config.shutdownGraceSeconds | ceil) .Values.lifecycle.preStopSleepSeconds }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be longer than config.shutdownGraceSeconds + lifecycle.preStopSleepSeconds (%v)" .Values.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.admin.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs admin.enabled: the metrics are served on the admin port" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must not be lower than autoscaling.minReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.targetCPUUtilizationPercentage .Values.autoscaling.targetMemoryUtilizationPercentage)) }}
{{- fail "autoscaling.enabled needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- end }}

{{/*
Environment variables taken from the existing Secret (shared by the Deployment
and the migration Job).
*/}}
{{- define "workbroker.secretEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "workbroker.secretName" . }}
      key: {{ .Values.existingSecret.databaseUrlKey }}
{{- end }}

{{/*
etcd environment variables taken from the existing Secret (Deployment only).
*/}}
{{- define "workbroker.etcdSecretEnv" -}}
{{- with .Values.existingSecret.etcdEndpointsKey }}
- name: ETCD_ENDPOINTS
  valueFrom:
    secretKeyRef:
      name: {{ include "workbroker.secretName" $ }}
      key: {{ . }}
{{- end }}
{{- with .Values.existingSecret.etcdUsernameKey }}
- name: ETCD_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "workbroker.secretName" $ }}
      key: {{ . }}
{{- end }}
{{- with .Values.existingSecret.etcdPasswordKey }}
- name: ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "workbroker.secretName" $ }}
      key: {{ . }}
{{- end }}
{{- end }}

{{/*
PromQL label matchers selecting this release's series (without braces).
*/}}
{{- define "workbroker.promSelector" -}}
{{- if .Values.metrics.prometheusRule.selector }}
{{- .Values.metrics.prometheusRule.selector }}
{{- else }}
{{- printf "namespace=%q,service=%q" .Release.Namespace (include "workbroker.fullname" .) }}
{{- end }}
{{- end }}
