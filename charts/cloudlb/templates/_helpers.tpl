{{/* Chart name, overridable. */}}
{{- define "cloudlb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: the release name, plus the chart name unless it already holds it. */}}
{{- define "cloudlb.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 42 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cloudlb.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object; pass (dict "ctx" $ "component" "controller"). */}}
{{- define "cloudlb.labels" -}}
helm.sh/chart: {{ include "cloudlb.chart" .ctx }}
{{ include "cloudlb.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: cloudlb
{{- end }}

{{/* Labels that select one component's pods; never change them (selectors are immutable). */}}
{{- define "cloudlb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cloudlb.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cloudlb.controller.fullname" -}}
{{ include "cloudlb.fullname" . }}-controller
{{- end }}

{{- define "cloudlb.nodeProxy.fullname" -}}
{{ include "cloudlb.fullname" . }}-node-proxy
{{- end }}

{{- define "cloudlb.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (include "cloudlb.controller.fullname" .) .Values.controller.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cloudlb.nodeProxy.serviceAccountName" -}}
{{- if .Values.nodeProxy.serviceAccount.create }}
{{- default (include "cloudlb.nodeProxy.fullname" .) .Values.nodeProxy.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.nodeProxy.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the controller's leader-election Lease (`--lease-name`). */}}
{{- define "cloudlb.leaseName" -}}
{{ include "cloudlb.controller.fullname" . }}
{{- end }}

{{- define "cloudlb.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Restricted pod security: what both components run with. */}}
{{- define "cloudlb.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}
