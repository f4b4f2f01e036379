#!/usr/bin/env bash
# Bring RabbitMQ (+ MQTT and management plugins) and PostgreSQL to the state rnr-gateway
# needs. Idempotent: safe to run on every `make run` / `make test`.
#
#   deploy/setup.sh [ENV_FILE]     (default .env, created from the example when missing)
#
# Needs root (or sudo) for the broker configuration; prints the exact command for
# anything it cannot do itself. PG_ADMIN_URL (environment or env file), when set, is the
# PostgreSQL superuser connection used to create the role and database.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
env_file=${1:-${ENV_FILE:-$root/.env}}
python=${PYTHON:-$root/.venv/bin/python}

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

if [ ! -f "$env_file" ]; then
  cp "$here/rnr-gateway.env.example" "$env_file"
  say "created $env_file from deploy/rnr-gateway.env.example (change its passwords for production)"
else
  # An env file made from an older example lacks the settings added since: append them.
  # A key already in the file, even commented out, is left alone; so is API_TOKENS (a
  # file without it keeps its tokens elsewhere, and the example's placeholders must not
  # become valid ones).
  added=$("$python" - "$here/rnr-gateway.env.example" "$env_file" <<'PY'
import re, sys
from pathlib import Path

example, target = Path(sys.argv[1]), Path(sys.argv[2])
key = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")
text = target.read_text()
present = {m[1] for m in (key.match(line.strip().lstrip("#")) for line in text.splitlines()) if m}
lines: list[str] = []
names: list[str] = []
comments: list[str] = []
for line in example.read_text().splitlines():
    m = key.match(line)
    if m and m[1] not in present and m[1] != "API_TOKENS":
        lines += comments + [line]
        names.append(m[1])
    is_note = line.startswith("#") and not line.startswith("# ---")
    comments = comments + [line] if is_note and not key.match(line.lstrip("#")) else []
if lines:
    with target.open("a") as f:
        f.write(("" if text.endswith("\n") or not text else "\n") + "\n")
        f.write("# added by deploy/setup.sh from deploy/rnr-gateway.env.example\n")
        f.write("\n".join(lines) + "\n")
print(" ".join(names))
PY
  )
  [ -z "$added" ] || say "added to $env_file from deploy/rnr-gateway.env.example: $added"
fi
set -a
# shellcheck source=/dev/null
. "$env_file"
set +a

# --- split the URLs once, with Python's parser rather than sed ---------------------------
eval "$("$python" - <<'PY'
import os, shlex
from urllib.parse import urlsplit, unquote
a = urlsplit(os.environ["RABBITMQ_URL"]); d = urlsplit(os.environ["DATABASE_URL"])
out = {
  "AMQP_USER": unquote(a.username or ""), "AMQP_PASS": unquote(a.password or ""),
  "AMQP_VHOST": unquote(a.path[1:]) if len(a.path) > 1 else "/",
  "DB_USER": unquote(d.username or ""), "DB_PASS": unquote(d.password or ""),
  "DB_NAME": d.path.lstrip("/"), "DB_PORT": str(d.port or 5432),
}
for k, v in out.items():
    print(f"{k}={shlex.quote(v)}")
PY
)"
MQTT_PORT=${MQTT_BROKER_PORT:-1884}
if [ -z "$AMQP_USER" ] || [ -z "$AMQP_PASS" ]; then die "RABBITMQ_URL must carry a user and password"; fi
if [ -z "$DB_USER" ] || [ -z "$DB_NAME" ]; then die "DATABASE_URL must name a user and a database"; fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "needs root: $*"; fi; }
have_systemd() { [ -d /run/systemd/system ]; }

apt_updated=
install_hint() {
  local pkg=$1
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing $pkg with apt-get"
    if [ -z "$apt_updated" ]; then DEBIAN_FRONTEND=noninteractive apt-get update -q; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg"
  else
    die "$pkg is not installed; run: sudo apt-get update && sudo apt-get install -y $pkg"
  fi
}

# --- RabbitMQ ---------------------------------------------------------------------------
# Debian puts rabbitmqctl and its siblings in /usr/sbin, not on a normal user's PATH.
rabbit_bin() {
  local d found
  found=$(command -v rabbitmqctl 2>/dev/null || true)
  for d in ${found:+"$(dirname "$found")"} /usr/sbin /usr/lib/rabbitmq/bin; do
    if [ -x "$d/rabbitmqctl" ]; then printf '%s\n' "$d"; return 0; fi
  done
  return 1
}
if ! rmq=$(rabbit_bin); then
  install_hint rabbitmq-server
  rmq=$(rabbit_bin) || die "rabbitmqctl not found after installing rabbitmq-server"
fi
rabbitmqctl=$rmq/rabbitmqctl
rabbitmq_plugins=$rmq/rabbitmq-plugins
rabbitmq_diagnostics=$rmq/rabbitmq-diagnostics
broker_running() { as_root "$rabbitmq_diagnostics" -q check_running >/dev/null 2>&1; }

# RabbitMQ refuses to boot with mqtt.* or management.* keys in rabbitmq.conf while those
# plugins are disabled: a stopped broker gets them enabled in its plugins file before the
# keys are written and it is started. A running one is handled below, without a restart.
if ! broker_running; then
  say "enabling rabbitmq_mqtt and rabbitmq_management for the broker's next start"
  as_root "$rabbitmq_plugins" -q enable --offline rabbitmq_mqtt rabbitmq_management >/dev/null
fi

conf=/etc/rabbitmq/rabbitmq.conf
defs=/etc/rabbitmq/rnr-gateway-definitions.json
envconf=/etc/rabbitmq/rabbitmq-env.conf
block=$(cat <<CONF
# BEGIN rnr-gateway (managed by deploy/setup.sh)
mqtt.listeners.tcp.default = 127.0.0.1:$MQTT_PORT
mqtt.vhost = $AMQP_VHOST
mqtt.exchange = amq.topic
mqtt.allow_anonymous = false
management.tcp.ip = 127.0.0.1
management.tcp.port = 15672
load_definitions = $defs
# END rnr-gateway
CONF
)
tmp=$(mktemp)
"$python" -m rnr_gateway definitions --vhost "$AMQP_VHOST" > "$tmp"
if ! as_root cmp -s "$tmp" "$defs" 2>/dev/null; then
  as_root install -m 0644 "$tmp" "$defs"; say "wrote $defs"
fi
rm -f "$tmp"
current=$(as_root cat "$conf" 2>/dev/null || true)
stripped=$(printf '%s\n' "$current" | sed '/^# BEGIN rnr-gateway/,/^# END rnr-gateway/d')
wanted=$(printf '%s\n%s\n' "$stripped" "$block" | sed '/./,$!d')
if [ "$current" != "$wanted" ]; then
  printf '%s\n' "$wanted" | as_root tee "$conf" >/dev/null; say "updated $conf"
fi
# Debian's broker starts with 1024 open files: too few for a fleet of MQTT nodes.
if ! as_root grep -q 'rnr-gateway' "$envconf" 2>/dev/null; then
  # shellcheck disable=SC2016  # written for the broker's start script to expand
  printf '%s\n' '# rnr-gateway: room for 1000+ MQTT connections' \
    'ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"' | as_root tee -a "$envconf" >/dev/null
  say "raised the broker's open-files limit in $envconf (applies at its next start)"
fi

if ! broker_running; then
  say "starting RabbitMQ"
  if have_systemd; then as_root systemctl start rabbitmq-server; else as_root "$rmq/rabbitmq-server" -detached; fi
  as_root "$rabbitmqctl" -q await_startup --timeout 120 >/dev/null 2>&1 \
    || as_root "$rabbitmqctl" -q wait --timeout 120 /var/lib/rabbitmq/mnesia/*.pid >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do broker_running && break; sleep 1; done
fi
broker_running || die "RabbitMQ does not run; see /var/log/rabbitmq/"

listeners=$(as_root "$rabbitmq_diagnostics" -q listeners 2>/dev/null || true)
mqtt_ok=$(printf '%s\n' "$listeners" | grep -c "port: $MQTT_PORT, protocol: mqtt" || true)
plugins=$(as_root "$rabbitmq_plugins" -q list -E -m 2>/dev/null || true)
if [ "$mqtt_ok" = 0 ]; then
  say "putting RabbitMQ's MQTT listener on 127.0.0.1:$MQTT_PORT (vhost $AMQP_VHOST)"
  if printf '%s\n' "$plugins" | grep -qx rabbitmq_mqtt; then
    as_root "$rabbitmq_plugins" -q disable rabbitmq_mqtt >/dev/null
  fi
  as_root "$rabbitmqctl" -q eval "application:load(rabbitmq_mqtt),
    application:set_env(rabbitmq_mqtt, tcp_listeners, [{\"127.0.0.1\", $MQTT_PORT}]),
    application:set_env(rabbitmq_mqtt, vhost, <<\"$AMQP_VHOST\">>),
    application:set_env(rabbitmq_mqtt, exchange, <<\"amq.topic\">>),
    application:set_env(rabbitmq_mqtt, allow_anonymous, false)." >/dev/null
  as_root "$rabbitmq_plugins" -q enable rabbitmq_mqtt >/dev/null
fi
if ! printf '%s\n' "$plugins" | grep -qx rabbitmq_management; then
  say "enabling rabbitmq_management on 127.0.0.1:15672"
  as_root "$rabbitmqctl" -q eval 'application:load(rabbitmq_management),
    application:set_env(rabbitmq_management, tcp_config, [{port, 15672}, {ip, "127.0.0.1"}]).' >/dev/null
  as_root "$rabbitmq_plugins" -q enable rabbitmq_management >/dev/null
fi
as_root "$rabbitmq_diagnostics" -q listeners | grep -q "port: $MQTT_PORT, protocol: mqtt" \
  || die "RabbitMQ's MQTT listener is not on port $MQTT_PORT (is the port taken? ss -ltnp 'sport = :$MQTT_PORT')"

as_root "$rabbitmqctl" -q add_vhost "$AMQP_VHOST" >/dev/null
if as_root "$rabbitmqctl" -q list_users | awk '{print $1}' | grep -qx "$AMQP_USER"; then
  as_root "$rabbitmqctl" -q change_password "$AMQP_USER" "$AMQP_PASS" >/dev/null
else
  as_root "$rabbitmqctl" -q add_user "$AMQP_USER" "$AMQP_PASS" >/dev/null; say "created broker user $AMQP_USER"
fi
# management tag: lets the user read its vhost's queue figures over the HTTP API
as_root "$rabbitmqctl" -q set_user_tags "$AMQP_USER" management >/dev/null
as_root "$rabbitmqctl" -q set_permissions -p "$AMQP_VHOST" "$AMQP_USER" '.*' '.*' '.*' >/dev/null
as_root "$rabbitmqctl" -q import_definitions "$defs" >/dev/null
say "RabbitMQ ready: vhost $AMQP_VHOST, user $AMQP_USER, MQTT on 127.0.0.1:$MQTT_PORT, topology loaded"

# --- PostgreSQL -------------------------------------------------------------------------
command -v psql >/dev/null || install_hint postgresql
if ! pg_isready -q -h 127.0.0.1 -p "$DB_PORT"; then
  say "starting PostgreSQL"
  # shellcheck disable=SC2012  # cluster versions are plain numbers
  if have_systemd; then as_root systemctl start postgresql
  else as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start; fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p "$DB_PORT" && break; sleep 1; done
fi
pg_isready -q -h 127.0.0.1 -p "$DB_PORT" || die "PostgreSQL does not answer on 127.0.0.1:$DB_PORT"

# The superuser connection that creates the role and the database. Debian's postgres role
# logs in by peer authentication on the local socket only, so a normal user reaches it
# through sudo when a password-less TCP login is not set up (~/.pgpass, trust).
if [ -n "${PG_ADMIN_URL:-}" ]; then
  pg_admin=(psql "$PG_ADMIN_URL")
elif [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
  pg_admin=(runuser -u postgres -- psql -p "$DB_PORT")
elif psql -w -h 127.0.0.1 -p "$DB_PORT" -U postgres -d postgres -qAtc 'SELECT 1' >/dev/null 2>&1; then
  pg_admin=(psql -w -h 127.0.0.1 -p "$DB_PORT" -U postgres -d postgres)
elif command -v sudo >/dev/null && sudo -n -u postgres true 2>/dev/null; then
  pg_admin=(sudo -n -u postgres psql -p "$DB_PORT")
else
  die "cannot act as PostgreSQL's superuser (no password-less login as postgres on 127.0.0.1:$DB_PORT, and sudo -n -u postgres is refused); run: sudo make setup ENV_FILE=$env_file   or: PG_ADMIN_URL=postgresql://postgres:PASSWORD@127.0.0.1:$DB_PORT/postgres make setup ENV_FILE=$env_file"
fi
psql_admin() { "${pg_admin[@]}" -v ON_ERROR_STOP=1 -qAt "$@"; }
psql_admin -v u="$DB_USER" -v p="$DB_PASS" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'u') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'u') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'u', :'p') \gexec
SQL
psql_admin -v u="$DB_USER" -v d="$DB_NAME" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'d', :'u') WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'d') \gexec
SQL
say "PostgreSQL ready: database $DB_NAME owned by $DB_USER"

"$python" -m rnr_gateway --env-file "$env_file" migrate
