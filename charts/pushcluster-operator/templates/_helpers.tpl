{{- define "pco.name" -}}{{ .Release.Name }}-pushcluster-operator{{- end -}}
{{- define "pco.labels" -}}
app.kubernetes.io/name: pushcluster-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "pco.selector" -}}
app.kubernetes.io/name: pushcluster-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
