{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "petrel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The StatefulSet's name, which is also the prefix of every pod's name (pod N is
"<fullname>-N"). Kept to 52 characters so that pod names, the headless Service's name and the
controller-revision-hash label stay within Kubernetes' limits.
*/}}
{{- define "petrel.fullname" -}}
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

{{/* The headless Service: every pod's stable DNS name, used for gRPC between the nodes. */}}
{{- define "petrel.headless" -}}
{{- printf "%s-headless" (include "petrel.fullname" .) }}
{{- end }}

{{- define "petrel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "petrel.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "petrel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "petrel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "petrel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "petrel.labels" -}}
helm.sh/chart: {{ include "petrel.chart" . }}
{{ include "petrel.selectorLabels" . }}
app.kubernetes.io/version: {{ include "petrel.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: petrel
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "petrel.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString }}
{{- end }}

{{- define "petrel.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "petrel.imageTag" .) }}
{{- end }}
{{- end }}

{{/* Cluster addressing ----------------------------------------------------------------- */}}

{{/* The DNS suffix every pod's name is followed by: "<headless>.<namespace>.svc.<domain>". */}}
{{- define "petrel.podDomain" -}}
{{- printf "%s.%s.svc.%s" (include "petrel.headless" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "petrel.voters" -}}
{{- $cluster := .Values.config.cluster | default dict }}
{{- $cluster.voters | default 3 | int }}
{{- end }}

{{/*
The seed list every node gets as cluster.join: the gRPC addresses of pods 0 .. n-1 with
n = min(replicaCount, voters). With an empty data dir, a node joins through any seed already
in a cluster; if none is, the seed with the lowest id (pod 0) starts the cluster once every
seed answers. Pods past the seeds (scaling out) join through them. The list does not grow
with replicaCount past the voters, so scaling out does not change the pods that exist (no
rolling restart) and never asks a new node to wait for pods that do not exist yet.
*/}}
{{- define "petrel.seeds" -}}
{{- $n := min (int .Values.replicaCount) (int (include "petrel.voters" .)) | int }}
{{- $seeds := list }}
{{- range $i := until $n }}
{{- $seeds = append $seeds (printf "%s-%d.%s:%d" (include "petrel.fullname" $) $i (include "petrel.podDomain" $) (int $.Values.ports.grpc)) }}
{{- end }}
{{- join "," $seeds }}
{{- end }}

{{/* Config file ----------------------------------------------------------------------- */}}

{{/* Paths inside the container. */}}
{{- define "petrel.paths" -}}
config: /etc/petrel/config
tls: /etc/petrel/tls
auth: /etc/petrel/auth
data: /var/lib/petrel
{{- end }}

{{/*
The settings the chart owns (listeners, paths, cluster identity): they follow from other
values, so setting them under .Values.config is refused (see petrel.checkConfig).
*/}}
{{- define "petrel.managedConfig" -}}
{{- $p := include "petrel.paths" . | fromYaml }}
{{- $tls := .Values.tls }}
{{- $mqtt := dict "addr" (printf "0.0.0.0:%d" (int .Values.ports.mqtt)) }}
{{- $_ := set $mqtt "mqtts_addr" (ternary (printf "0.0.0.0:%d" (int .Values.ports.mqtts)) "" $tls.enabled) }}
{{- $_ := set $mqtt "ws_addr" (ternary (printf "0.0.0.0:%d" (int .Values.ports.ws)) "" .Values.websocket.enabled) }}
{{- $_ := set $mqtt "wss_addr" (ternary (printf "0.0.0.0:%d" (int .Values.ports.wss)) "" (and $tls.enabled .Values.websocket.enabled)) }}
{{- $cfg := dict "mqtt" $mqtt }}
{{- $_ := set $cfg "admin" (dict "enabled" true "addr" (printf "0.0.0.0:%d" (int .Values.ports.admin))) }}
{{- $_ := set $cfg "storage" (dict "data_dir" (printf "%s/data" $p.data)) }}
{{- $cluster := dict "grpc_addr" (printf "0.0.0.0:%d" (int .Values.ports.grpc)) }}
{{- $_ := set $cfg "cluster" $cluster }}
{{- $tlsCfg := dict }}
{{- if $tls.enabled }}
{{- $_ := set $tlsCfg "cert_file" (printf "%s/tls.crt" $p.tls) }}
{{- $_ := set $tlsCfg "key_file" (printf "%s/tls.key" $p.tls) }}
{{- if $tls.clientCA.enabled }}
{{- $_ := set $tlsCfg "client_ca_file" (printf "%s/%s" $p.tls $tls.clientCA.key) }}
{{- end }}
{{- end }}
{{- if $tlsCfg }}
{{- $_ := set $cfg "tls" $tlsCfg }}
{{- end }}
{{- $auth := dict }}
{{- if or .Values.auth.passwords.existingSecret .Values.auth.passwords.content }}
{{- $_ := set $auth "password_file" (printf "%s/passwords" $p.auth) }}
{{- end }}
{{- if .Values.auth.acl }}
{{- $_ := set $auth "acl_file" (printf "%s/acl" $p.config) }}
{{- end }}
{{- if $auth }}
{{- $_ := set $cfg "auth" $auth }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{- define "petrel.checkConfig" -}}
{{- $owned := dict
  "mqtt" (list "addr" "mqtts_addr" "ws_addr" "wss_addr")
  "admin" (list "enabled" "addr" "token")
  "storage" (list "data_dir")
  "tls" (list "cert_file" "key_file" "client_ca_file")
  "auth" (list "password_file" "acl_file")
  "cluster" (list "node_id" "grpc_addr" "advertise_addr" "join") }}
{{- range $section, $keys := $owned }}
{{- $given := index $.Values.config $section | default dict }}
{{- range $key := $keys }}
{{- if hasKey $given $key }}
{{- fail (printf "config.%s.%s is set by the chart (ports.*, tls.*, websocket.*, auth.*, adminToken.*, the pod's ordinal); remove it from config" $section $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
petrel.toml: .Values.config with the chart's own settings laid over it, as TOML. Every value
of the node's configuration is a scalar, and JSON's rendering of a scalar (a quoted, escaped
string; an integer without a decimal point; true/false) is valid TOML.
*/}}
{{- define "petrel.toml" -}}
{{- include "petrel.checkConfig" . }}
{{- $cfg := mustMergeOverwrite (deepCopy .Values.config) (include "petrel.managedConfig" . | fromYaml) }}
# petrel.toml, rendered by the Helm chart from .Values.config and the chart's own settings.
# Per pod, the node id (the pod's ordinal), the advertised gRPC address and the seed list
# come from the environment (PETREL_NODE_ID, PETREL_ADVERTISE_ADDR, PETREL_JOIN).
{{- range $section, $fields := $cfg }}

[{{ $section }}]
{{- range $key, $value := $fields }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- end }}

{{/* Secrets ----------------------------------------------------------------------------- */}}

{{- define "petrel.passwordsSecret" -}}
{{- .Values.auth.passwords.existingSecret | default (printf "%s-passwords" (include "petrel.fullname" .)) }}
{{- end }}

{{- define "petrel.adminTokenSecret" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin-token" (include "petrel.fullname" .)) }}
{{- end }}
