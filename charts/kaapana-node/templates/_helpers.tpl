{{/*
Names, labels and the values resolved from the chart's values, Kaapana's `global.*` values and
the defaults (see the precedence note at the top of values.yaml).
*/}}

{{- define "kaapana-node.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kaapana-node.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kaapana-node.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The standard labels of every object. */}}
{{- define "kaapana-node.labels" -}}
helm.sh/chart: {{ include "kaapana-node.chart" . }}
{{ include "kaapana-node.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kaapana
{{- end }}

{{/* The labels that select the node's pod. */}}
{{- define "kaapana-node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kaapana-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end }}

{{/* The namespace of every object. */}}
{{- define "kaapana-node.namespace" -}}
{{- .Values.namespaceOverride | default (.Values.global.services_namespace | toString) | default .Release.Namespace }}
{{- end }}

{{- define "kaapana-node.kubernetesExecutor" -}}
{{- if eq .Values.config.executor.kind "kubernetes" }}true{{ end }}
{{- end }}

{{- define "kaapana-node.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "kaapana-node.fullname" .) }}
{{- end }}

{{- define "kaapana-node.headlessServiceName" -}}
{{- printf "%s-headless" (include "kaapana-node.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/* The instance name. */}}
{{- define "kaapana-node.instanceName" -}}
{{- $name := .Values.nodeName | default (.Values.global.kaapana_node_name | toString) | default (.Values.global.hostname | toString) | default .Release.Name }}
{{- if gt (len $name) 128 }}
{{- fail (printf "the instance name %q is longer than 128 characters (nodeName / global.kaapana_node_name)" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/* The advertised multiaddresses, as a JSON list. */}}
{{- define "kaapana-node.advertise" -}}
{{- $list := .Values.advertise }}
{{- if and (empty $list) .Values.global.kaapana_node_advertise }}
{{- $list = list }}
{{- range (splitList "," (.Values.global.kaapana_node_advertise | toString)) }}
{{- $a := trim . }}
{{- if $a }}
{{- if not (hasPrefix "/" $a) }}
{{- fail (printf "global.kaapana_node_advertise: %q is not a multiaddress (it must start with /, e.g. /dns4/host.example.org/tcp/7400)" $a) }}
{{- end }}
{{- $list = append $list $a }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $list }}
{{- end }}

{{/* The libp2p Service's type. */}}
{{- define "kaapana-node.serviceType" -}}
{{- $type := .Values.service.type | default (.Values.global.kaapana_node_service_type | toString) | default "ClusterIP" }}
{{- if not (has $type (list "ClusterIP" "NodePort" "LoadBalancer")) }}
{{- fail (printf "global.kaapana_node_service_type: %q is not a service type: use ClusterIP, NodePort or LoadBalancer" $type) }}
{{- end }}
{{- $type }}
{{- end }}

{{/* The node's image reference. */}}
{{- define "kaapana-node.image" -}}
{{- $repo := .Values.image.repository }}
{{- if not $repo }}
{{- $registry := .Values.global.registry_url | toString | trimSuffix "/" }}
{{- $repo = ternary (printf "%s/kaapana-node" $registry) "kaapana-node" (ne $registry "") }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "kaapana-node.pullPolicy" -}}
{{- .Values.image.pullPolicy | default (.Values.global.pull_policy_images | toString) | default "IfNotPresent" }}
{{- end }}

{{/* The pod's imagePullSecrets, as a JSON list. */}}
{{- define "kaapana-node.imagePullSecrets" -}}
{{- if .Values.imagePullSecrets }}
{{- toJson .Values.imagePullSecrets }}
{{- else if .Values.global.registry_url }}
{{- toJson (list (dict "name" "registry-secret")) }}
{{- else }}
{{- toJson list }}
{{- end }}
{{- end }}

{{/* The data volume's claim: the existing one, or the StatefulSet's (template "data", pod 0). */}}
{{- define "kaapana-node.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "data-%s-0" (include "kaapana-node.fullname" .)) }}
{{- end }}

{{- define "kaapana-node.storageClass" -}}
{{- .Values.persistence.storageClass | default (.Values.global.storage_class_fast | toString) }}
{{- end }}

{{/* Paths inside the pods. */}}
{{- define "kaapana-node.volumeMountPath" -}}/var/lib/kaapana-node{{- end }}
{{/* The data directory is a sub-directory of the volume: `kaapana-node init` creates it with
mode 0700, which it could not set on the volume's root (owned by root, group fsGroup). */}}
{{- define "kaapana-node.dataSubPath" -}}data{{- end }}
{{- define "kaapana-node.dataDir" -}}{{ include "kaapana-node.volumeMountPath" . }}/{{ include "kaapana-node.dataSubPath" . }}{{- end }}
{{- define "kaapana-node.federationCaPath" -}}/etc/kaapana-node/federation-ca/ca.crt{{- end }}

{{/* The node's config.toml. Strings and lists are written with toJson: a JSON string is a
valid TOML basic string. */}}
{{- define "kaapana-node.config" -}}
{{- $port := int .Values.p2pPort -}}
# kaapana-node configuration, rendered by the Helm chart {{ include "kaapana-node.chart" . }}
# (release {{ .Release.Name }}). The init container copies it into the data directory on every
# start: change the chart's values, not this file.

[instance]
name = {{ include "kaapana-node.instanceName" . | toJson }}

[network]
listen = {{ list (printf "/ip4/0.0.0.0/tcp/%d" $port) (printf "/ip4/0.0.0.0/udp/%d/quic-v1" $port) | toJson }}
advertise = {{ include "kaapana-node.advertise" . }}

[api]
# All addresses of the pod: the kubelet's probes and Prometheus connect to the pod's IP. /v1
# needs the bearer token in the data directory's api-token file.
listen = {{ printf "0.0.0.0:%d" (int .Values.apiPort) | toJson }}

[trust]
{{- if and .Values.config.trust.federationCaSecret .Values.config.trust.federationCaFile }}
{{- fail "config.trust: set federationCaSecret or federationCaFile, not both" }}
{{- else if .Values.config.trust.federationCaSecret }}
federation_ca = {{ include "kaapana-node.federationCaPath" . | toJson }}
{{- else if .Values.config.trust.federationCaFile }}
federation_ca = {{ .Values.config.trust.federationCaFile | toJson }}
{{- else }}
# No federation CA: instances present self-signed certificates pinned by fingerprint.
{{- end }}

[executor]
kind = {{ .Values.config.executor.kind | toJson }}
pull_from = {{ .Values.config.executor.pullFrom | default list | toJson }}
insecure_registry = {{ .Values.config.executor.insecureRegistry | toJson }}
{{- if include "kaapana-node.kubernetesExecutor" . }}
{{- $k := .Values.config.executor.kubernetes }}

# The Kubernetes executor: jobs run as batch/v1 Jobs in the node's namespace; their pods mount
# the node's data claim (the data directory is its `data` folder).
[executor.kubernetes]
namespace = {{ include "kaapana-node.namespace" . | toJson }}
{{- if $k.imageRepository }}
image_repository = {{ $k.imageRepository | toJson }}
{{- end }}
image_pull_secrets = {{ $k.imagePullSecrets | default list | toJson }}
volumes = [{ local_path = {{ include "kaapana-node.dataDir" . | toJson }}, type = "persistent_volume_claim", claim_name = {{ include "kaapana-node.claimName" . | toJson }}, sub_path = {{ include "kaapana-node.dataSubPath" . | toJson }} }]
{{- with $k.runtimeClass }}
runtime_class = {{ . | toJson }}
{{- end }}
{{- with $k.nodeSelector }}
node_selector = { {{- $first := true }}{{ range $key, $value := . }}{{ if not $first }},{{ end }}{{ $first = false }} {{ $key | toJson }} = {{ $value | toString | toJson }}{{ end }} }
{{- end }}
{{- with $k.defaultLimits }}
default_limits = { cpu_millis = {{ .cpuMillis | int64 }}, memory_bytes = {{ .memoryBytes | int64 }}, gpus = {{ .gpus | int64 }} }
{{- end }}
{{- with $k.gpuResource }}
gpu_resource = {{ . | toJson }}
{{- end }}
run_as_non_root = {{ $k.runAsNonRoot | toJson }}
{{- if not (kindIs "invalid" $k.runAsUser) }}
run_as_user = {{ $k.runAsUser | int64 }}
{{- end }}
{{- if not (kindIs "invalid" $k.runAsGroup) }}
run_as_group = {{ $k.runAsGroup | int64 }}
{{- end }}
{{- if $k.tmpSizeBytes }}
tmp_size_bytes = {{ $k.tmpSizeBytes | int64 }}
{{- end }}
{{- end }}

[workflows]
runner_lost_after_secs = {{ .Values.config.workflows.runnerLostAfterSecs | int64 }}
runner_give_up_after_secs = {{ .Values.config.workflows.runnerGiveUpAfterSecs | int64 }}

[datasets]
pacs_cache_bytes = {{ .Values.config.datasets.pacsCacheBytes | int64 }}
{{- end }}
