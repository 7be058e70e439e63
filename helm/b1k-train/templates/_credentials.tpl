{{/* Refusing literal credentials. Values rendered as literals end up in plain text in the RayJob (entrypoint,
     runtimeEnvYAML) and Ray echoes both into the job logs, so a credential there leaks to anyone who can read
     logs. These checks fail the render naming the key; the value itself is never printed. */}}

{{/* A name that says "secret": SECRET, PASSWORD, TOKEN, CREDENTIAL, AUTH, APIKEY as a whole word (so
     max_fast_tokens or fast_tokenizer are fine), or ending in KEY / KEYS / KEY_ID (AWS_SECRET_ACCESS_KEY,
     WANDB_API_KEY, serving api_keys). Words are separated by _ . or -. */}}
{{- define "b1k.secretNameRe" -}}
(?i)(^|[_.-])(SECRETS?|PASSWORD|PASSWD|PASSPHRASE|TOKEN|CREDENTIALS?|AUTH|APIKEY)([_.-]|$)|(?i)(^|[_.-])KEY(S|[_.-]ID)?$
{{- end -}}

{{/* user information in a URI (https://user:password@host, or a token as the user). */}}
{{- define "b1k.userinfoRe" -}}
[A-Za-z][A-Za-z0-9+.-]*://[^/\s@]+@
{{- end -}}

{{/* Values shaped like a key whatever their name: AWS key ids, GitHub/GitLab/Hugging Face/OpenAI/Slack tokens,
     JWTs and PEM private keys. */}}
{{- define "b1k.keyShapeRe" -}}
(AKIA|ASIA)[A-Z0-9]{16}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|glpat-[A-Za-z0-9_-]{20}|hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|eyJ[A-Za-z0-9_-]{10,}\.eyJ|-----BEGIN [A-Z ]*PRIVATE KEY-----
{{- end -}}

{{/* A long random-looking word (an AWS secret access key is 40 base64 characters): 32+ characters of a base64
     alphabet with upper case, lower case and digits. Lower-case hex (git SHAs, checksums) does not qualify. */}}
{{- define "b1k.isRandomWord" -}}
{{- if and (regexMatch "^[A-Za-z0-9+/=_-]{32,}$" .) (regexMatch "[A-Z]" .) (regexMatch "[a-z]" .) (regexMatch "[0-9]" .) -}}true{{- end -}}
{{- end -}}

{{/* Fail if `value` (under `name`, at `where`) looks like a literal credential.
     Call with (dict "where" "training.overrides[0]" "name" "mlflow.password" "value" "..." "fix" "..."). */}}
{{- define "b1k.refuseCredential" -}}
{{- $v := toString .value -}}
{{- $fix := default "pass it as training.env: [{name: VAR, valueFrom: {secretKeyRef: {name: SECRET, key: KEY}}}] (Ray's processes inherit the container environment)" .fix -}}
{{- $why := "" -}}
{{- if regexMatch (include "b1k.userinfoRe" .) $v -}}
{{- $why = "is a URI with user information (user:password@)" -}}
{{- else if regexMatch (include "b1k.keyShapeRe" .) $v -}}
{{- $why = "looks like a key or token" -}}
{{- else if include "b1k.isRandomWord" $v -}}
{{- $why = "looks like a key (a long random string)" -}}
{{- else if and (ne $v "") (regexMatch (include "b1k.secretNameRe" .) (toString .name)) -}}
{{- $why = printf "sets %s, whose name says it is a credential, to a literal value" .name -}}
{{- end -}}
{{- if $why -}}
{{- fail (printf "%s %s: literal credentials are rendered in plain text into the manifests and Ray's job logs; put it in a Kubernetes Secret and %s" .where $why $fix) -}}
{{- end -}}
{{- end -}}

{{/* Fail if any string inside a nested value (a map or list) looks like a credential; names are map keys. */}}
{{- define "b1k.refuseCredentialsIn" -}}
{{- $where := .where -}}
{{- if kindIs "map" .value -}}
{{- range $k, $v := .value -}}
{{- include "b1k.refuseCredentialsIn" (dict "where" (printf "%s.%s" $where $k) "name" $k "value" $v) -}}
{{- end -}}
{{- else if kindIs "slice" .value -}}
{{- range $i, $v := .value -}}
{{- include "b1k.refuseCredentialsIn" (dict "where" (printf "%s[%d]" $where $i) "name" "" "value" $v) -}}
{{- end -}}
{{- else -}}
{{- include "b1k.refuseCredential" . -}}
{{- end -}}
{{- end -}}

{{/* Fail for a list of KEY=VALUE (overrides) or --flag=value (extraArgs) strings; the name is KEY or flag. */}}
{{- define "b1k.refuseCredentialArgs" -}}
{{- $where := .where -}}
{{- range $i, $a := .value -}}
{{- $name := regexReplaceAll "^-*([^=]*)=.*$" $a "${1}" -}}
{{- $value := ternary (regexReplaceAll "^[^=]*=" $a "") "" (contains "=" $a) -}}
{{- include "b1k.refuseCredential" (dict "where" (printf "%s[%d] (%s)" $where $i $name) "name" $name "value" $value) -}}
{{- end -}}
{{- end -}}
