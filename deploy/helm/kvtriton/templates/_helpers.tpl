{{/* Names and labels, as `helm create` makes them. */}}
{{- define "kvtriton.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvtriton.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "kvtriton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvtriton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvtriton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kvtriton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The container's resources, with the GPU count added to limits (the device plugin takes limits). */}}
{{- define "kvtriton.resources" -}}
{{- $resources := deepCopy (.resources | default dict) }}
{{- if gt (int .gpu.count) 0 }}
{{- $limits := $resources.limits | default dict }}
{{- $_ := set $limits .gpu.resourceName (int .gpu.count) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}
