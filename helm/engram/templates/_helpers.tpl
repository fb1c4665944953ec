{{/* Shared pieces of Engram's templates: names, labels, the pod spec every service uses,
and the NetworkPolicy peers. */}}

{{/* The object name of a component: <release>-<service>. */}}
{{- define "engram.name" -}}
{{- printf "%s-%s" .root.Release.Name .service | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select a component's pods (stable across upgrades). */}}
{{- define "engram.selector" -}}
app.kubernetes.io/name: {{ .service }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* Every label of a component's objects. part-of gives Prometheus job="engram". */}}
{{- define "engram.labels" -}}
{{ include "engram.selector" . }}
app.kubernetes.io/component: {{ .service }}
app.kubernetes.io/part-of: engram
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* Labels of release-wide objects. */}}
{{- define "engram.commonLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: engram
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The image of a service, pinned by digest when one is given, else by tag. */}}
{{- define "engram.image" -}}
{{- $digest := index .root.Values.image.digests .service | default "" -}}
{{- if $digest -}}
{{ printf "%s/%s@%s" .root.Values.image.registry .service $digest }}
{{- else -}}
{{ printf "%s/%s:%s" .root.Values.image.registry .service .root.Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* The gRPC URL of a service inside the namespace. */}}
{{- define "engram.url" -}}
{{- printf "https://%s:50051" (include "engram.name" .) -}}
{{- end -}}

{{/* Checks skipped on every workload, each with the reason checkov cannot see. */}}
{{- define "engram.checkovSkips" -}}
{{- $digest := index .root.Values.image.digests .service | default "" }}
{{- if not $digest }}
# CKV_K8S_43 wants a digest: set image.digests.<service> to pin by digest (the default pins a tag).
checkov.io/skip1: CKV_K8S_43=pinned by tag until image.digests is set
{{- end }}
# CKV_K8S_15 wants pullPolicy Always: with pinned tags or digests it only adds a registry round
# trip to every start, and a registry outage becomes a restart outage.
checkov.io/skip2: CKV_K8S_15=images are pinned, IfNotPresent is correct
{{- end -}}

{{/*
The pod template shared by all four services. Arguments: root, service, component values
(values), env (a list of extra env entries), volumes and mounts (lists), ports (list).
*/}}
{{- define "engram.podTemplate" -}}
{{- $root := .root -}}
{{- $service := .service -}}
{{- $tls := $root.Values.tls -}}
metadata:
  labels:
    {{- include "engram.labels" . | nindent 4 }}
  annotations:
    {{- include "engram.checkovSkips" . | nindent 4 }}
spec:
  serviceAccountName: {{ include "engram.name" . }}
  # The API token is never mounted: Vault gets a projected token for its own audience.
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    fsGroup: 65532
    seccompProfile:
      type: RuntimeDefault
  terminationGracePeriodSeconds: 40
  containers:
    - name: {{ $service }}
      image: {{ include "engram.image" . }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        privileged: false
        capabilities:
          drop: [ALL]
        seccompProfile:
          type: RuntimeDefault
      ports:
        - name: grpc
          containerPort: 50051
          protocol: TCP
        - name: admin
          containerPort: 9090
          protocol: TCP
        {{- with .ports }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      env:
        - name: ENGRAM_GRPC_ADDR
          value: 0.0.0.0:50051
        - name: ENGRAM_ADMIN_ADDR
          value: 0.0.0.0:9090
        - name: ENGRAM_LOG_LEVEL
          value: {{ $root.Values.logLevel | quote }}
        - name: ENGRAM_SECRET_SOURCE
          value: vault
        - name: ENGRAM_VAULT_ADDR
          value: {{ $root.Values.vault.address | quote }}
        - name: ENGRAM_VAULT_KV_MOUNT
          value: {{ $root.Values.vault.kvMount | quote }}
        - name: ENGRAM_SECRET_PATH
          value: {{ index $root.Values.vault.paths $service | quote }}
        {{- if or $root.Values.vault.ca.configMap $root.Values.vault.ca.secret }}
        - name: ENGRAM_VAULT_CA_FILE
          value: /var/run/engram/vault-ca/{{ $root.Values.vault.ca.key }}
        {{- end }}
        - name: ENGRAM_VAULT_AUTH
          value: {{ $root.Values.vault.auth.kind }}
        - name: ENGRAM_VAULT_AUTH_MOUNT
          value: {{ $root.Values.vault.auth.mount | quote }}
        {{- if eq $root.Values.vault.auth.kind "kubernetes" }}
        - name: ENGRAM_VAULT_K8S_ROLE
          value: {{ index $root.Values.vault.auth.roles $service | quote }}
        - name: ENGRAM_VAULT_K8S_JWT_FILE
          value: /var/run/secrets/vault/token
        {{- else }}
        - name: ENGRAM_VAULT_ROLE_ID
          value: {{ index $root.Values.vault.auth.approle.roleIds $service | quote }}
        - name: ENGRAM_VAULT_SECRET_ID_FILE
          value: /var/run/secrets/vault-approle/secret-id
        {{- end }}
        {{- if eq $tls.mode "vault" }}
        - name: ENGRAM_TLS_MODE
          value: vault
        - name: ENGRAM_TLS_PKI_MOUNT
          value: {{ $tls.vault.pkiMount | quote }}
        - name: ENGRAM_TLS_PKI_ROLE
          value: {{ $service }}
        - name: ENGRAM_TLS_CERT_TTL_SECS
          value: {{ $tls.vault.ttlSeconds | quote }}
        {{- else }}
        - name: ENGRAM_TLS_MODE
          value: file
        - name: ENGRAM_TLS_CERT_FILE
          value: /var/run/engram/tls/tls.crt
        - name: ENGRAM_TLS_KEY_FILE
          value: /var/run/engram/tls/tls.key
        - name: ENGRAM_TLS_CA_FILE
          value: /var/run/engram/tls/ca.crt
        {{- end }}
        {{- with $root.Values.otel.endpoint }}
        - name: OTEL_EXPORTER_OTLP_ENDPOINT
          value: {{ . | quote }}
        {{- end }}
        {{- with .env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- range $name, $value := .values.extraEnv }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: admin
        periodSeconds: 10
        failureThreshold: 3
      readinessProbe:
        httpGet:
          path: /readyz
          port: admin
        periodSeconds: 5
        failureThreshold: 2
      startupProbe:
        httpGet:
          path: /healthz
          port: admin
        periodSeconds: 2
        failureThreshold: 30
      resources:
        {{- toYaml (merge (deepCopy .values.resources) $root.Values.resources) | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if eq $root.Values.vault.auth.kind "kubernetes" }}
        - name: vault-token
          mountPath: /var/run/secrets/vault
          readOnly: true
        {{- else }}
        - name: vault-approle
          mountPath: /var/run/secrets/vault-approle
          readOnly: true
        {{- end }}
        {{- if ne $tls.mode "vault" }}
        - name: tls
          mountPath: /var/run/engram/tls
          readOnly: true
        {{- end }}
        {{- if or $root.Values.vault.ca.configMap $root.Values.vault.ca.secret }}
        - name: vault-ca
          mountPath: /var/run/engram/vault-ca
          readOnly: true
        {{- end }}
        {{- with .mounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 16Mi
    {{- if eq $root.Values.vault.auth.kind "kubernetes" }}
    - name: vault-token
      projected:
        sources:
          - serviceAccountToken:
              audience: {{ $root.Values.vault.auth.audience | quote }}
              expirationSeconds: 600
              path: token
    {{- else }}
    - name: vault-approle
      secret:
        secretName: {{ index $root.Values.vault.auth.approle.secretIdSecrets $service | quote }}
        defaultMode: 0400
    {{- end }}
    {{- with $root.Values.vault.ca.configMap }}
    - name: vault-ca
      configMap:
        name: {{ . | quote }}
    {{- end }}
    {{- with $root.Values.vault.ca.secret }}
    - name: vault-ca
      secret:
        secretName: {{ . | quote }}
    {{- end }}
    {{- if eq $tls.mode "cert-manager" }}
    - name: tls
      secret:
        secretName: {{ include "engram.name" . }}-tls
        defaultMode: 0400
    {{- else if eq $tls.mode "secret" }}
    - name: tls
      secret:
        secretName: {{ index $tls.secrets $service | quote }}
        defaultMode: 0400
    {{- end }}
    {{- with .volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* NetworkPolicy peers from {namespaceSelector, podSelector, cidrs}. */}}
{{- define "engram.peers" -}}
{{- if .cidrs }}
{{- range .cidrs }}
- ipBlock:
    cidr: {{ . }}
{{- end }}
{{- else if or .namespaceSelector .podSelector }}
- {{- with .namespaceSelector }}
  namespaceSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .podSelector }}
  podSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Egress every service needs: DNS, Vault, and the OTLP collector when traces are on. */}}
{{- define "engram.baseEgress" -}}
- to:
    - namespaceSelector:
        {{- toYaml .Values.dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .Values.dns.podSelector | nindent 8 }}
  ports:
    - protocol: UDP
      port: {{ .Values.dns.port }}
    - protocol: TCP
      port: {{ .Values.dns.port }}
- to:
    {{- include "engram.peers" .Values.vault.network | nindent 4 }}
  ports:
    - protocol: TCP
      port: {{ .Values.vault.network.port }}
{{- if .Values.otel.endpoint }}
- to:
    {{- include "engram.peers" .Values.otel.network | nindent 4 }}
  ports:
    - protocol: TCP
      port: {{ .Values.otel.network.port }}
{{- end }}
{{- end -}}

{{/* Egress to another Engram service's gRPC port. */}}
{{- define "engram.toService" -}}
- to:
    - podSelector:
        matchLabels:
          {{- include "engram.selector" . | nindent 10 }}
  ports:
    - protocol: TCP
      port: 50051
{{- end -}}

{{/* Ingress to this service's gRPC port from other Engram services. */}}
{{- define "engram.fromServices" -}}
- from:
    {{- range .callers }}
    - podSelector:
        matchLabels:
          {{- include "engram.selector" (dict "root" $.root "service" .) | nindent 10 }}
    {{- end }}
  ports:
    - protocol: TCP
      port: 50051
{{- end -}}

{{/* Ingress to the admin port from Prometheus. */}}
{{- define "engram.fromMonitoring" -}}
- from:
    - namespaceSelector:
        {{- toYaml .Values.monitoring.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .Values.monitoring.podSelector | nindent 8 }}
  ports:
    - protocol: TCP
      port: 9090
{{- end -}}
