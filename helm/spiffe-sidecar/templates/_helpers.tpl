{{/* Chart name, truncated to 63 characters (DNS label). */}}
{{- define "spiffe-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name; also the Service name, so the webhook cert's SAN is <fullname>.<ns>.svc. */}}
{{- define "spiffe-sidecar.fullname" -}}
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

{{- define "spiffe-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "spiffe-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "spiffe-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spiffe-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: injector
{{- end -}}

{{- define "spiffe-sidecar.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "spiffe-sidecar.tlsSecret" -}}
{{- printf "%s-tls" (include "spiffe-sidecar.fullname" .) -}}
{{- end -}}

{{/* Namespaces never injected: the webhook's own (no self-deadlock) and the excluded ones. */}}
{{- define "spiffe-sidecar.excludedNamespaces" -}}
{{- $list := list .Release.Namespace -}}
{{- range .Values.webhook.excludedNamespaces -}}
{{- if not (has . $list) -}}{{- $list = append $list . -}}{{- end -}}
{{- end -}}
{{- toJson $list -}}
{{- end -}}
