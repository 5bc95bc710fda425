#!/bin/sh
# Entrypoint of the AniMind image (under tini): refuses to start a service with a missing, short or
# placeholder database password, then runs the command. Checked: DAGSTER_POSTGRES_PASSWORD (webserver,
# daemon, user code; set from docker/.env by compose), DAGSTER_PG_PASSWORD (what Dagster's Helm chart
# sets from its Postgres secret) and the password inside MLFLOW_BACKEND_STORE_URI (MLflow server). A variable that is not set is not checked (e.g. the SQLite/local modes).
# ANIMIND_ALLOW_WEAK_DB_PASSWORD=1 turns the check off (throw-away test stacks only).
set -eu

placeholder() {
  # lower-case, then compare with the placeholders of docs and examples
  lowered=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')
  case "$lowered" in
    change-me|changeme|change_me|changeit|password|passw0rd|postgres|dagster|mlflow|secret|example|test|admin|root|animind|xxx*|'<'*'>'|'${'*|your-*|your_*|set-me|todo)
      return 0 ;;
  esac
  return 1
}

check_password() {
  name=$1
  value=$2
  if [ -z "$value" ]; then
    echo "animind: $name is empty: set POSTGRES_PASSWORD in docker/.env (or the Kubernetes secret)" >&2
    exit 64
  fi
  if placeholder "$value"; then
    echo "animind: $name is a placeholder value: choose a real password (e.g. openssl rand -base64 24)" >&2
    exit 64
  fi
  if [ "${#value}" -lt 12 ]; then
    echo "animind: $name is shorter than 12 characters" >&2
    exit 64
  fi
}

if [ "${ANIMIND_ALLOW_WEAK_DB_PASSWORD:-0}" != "1" ]; then
  if [ -n "${DAGSTER_POSTGRES_PASSWORD+set}" ]; then
    check_password DAGSTER_POSTGRES_PASSWORD "$DAGSTER_POSTGRES_PASSWORD"
  fi
  if [ -n "${DAGSTER_PG_PASSWORD+set}" ]; then
    check_password DAGSTER_PG_PASSWORD "$DAGSTER_PG_PASSWORD"
  fi
  if [ -n "${MLFLOW_BACKEND_STORE_URI+set}" ]; then
    case "$MLFLOW_BACKEND_STORE_URI" in
      postgresql*://*:*@*)
        # scheme://user:password@host... -> password (the text between the first ':' after '//' and the last '@')
        creds=${MLFLOW_BACKEND_STORE_URI#*://}
        creds=${creds%@*}
        check_password "the password in MLFLOW_BACKEND_STORE_URI" "${creds#*:}"
        ;;
      postgresql*)
        echo "animind: MLFLOW_BACKEND_STORE_URI has no password" >&2
        exit 64
        ;;
    esac
  fi
fi
exec "$@"
