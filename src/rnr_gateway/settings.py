"""Settings: one frozen dataclass tree, built and validated once by ``Settings.from_env``.

Environment variable names from the original platform are kept (PROTOCOL §8). Every bad
value is reported, one line each, in a single ``ConfigError``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

T = TypeVar("T")
Scope = Literal["read", "command", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "command", "admin")


@dataclass(frozen=True)
class Secret:
    """A value that never shows in ``repr`` or logs."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def redact_url(url: str) -> str:
    """The URL with its password replaced, for log lines and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(malformed URL)"
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}"))


def _valid_url(url: str, schemes: tuple[str, ...]) -> bool:
    try:
        parts = urlsplit(url)
        port = parts.port  # a port that is not a number in 0..65535 raises
    except ValueError:
        return False
    return parts.scheme in schemes and bool(parts.hostname) and port != 0


@dataclass(frozen=True)
class AmqpSettings:
    url: Secret
    heartbeat_s: int = 600
    socket_timeout_s: float = 10.0
    prefetch: int = 500  # per consumer; bounds the ingest batch (docs/benchmarks.md)
    reconnect_initial_s: float = 2.0
    reconnect_max_s: float = 60.0
    publish_timeout_s: float = 10.0

    @property
    def display(self) -> str:
        return redact_url(self.url.value)

    @property
    def vhost(self) -> str:
        path = urlsplit(self.url.value).path
        return path[1:] if len(path) > 1 else "/"


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    username: str | None
    password: Secret | None
    max_retries: int = 15
    retry_delay_s: float = 2.0
    connection_timeout_s: float = 10.0
    publish_timeout_s: float = 5.0


@dataclass(frozen=True)
class DbSettings:
    url: Secret
    pool_size: int = 10
    command_timeout_s: float = 10.0
    retry_max_s: float = 10.0

    @property
    def display(self) -> str:
        return redact_url(self.url.value)


@dataclass(frozen=True)
class IngestSettings:
    batch_max: int = 500
    linger_ms: float = 2.0
    writers: int = 1


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    tokens: tuple[tuple[Scope, Secret], ...] = ()
    anonymous_scope: Scope | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 10_240
    open_probes: bool = True  # /health* and /metrics without a token
    # permessage-deflate on /ws: every client's frames are compressed separately, which
    # cost the fan-out some 40 % more CPU (docs/benchmarks.md, WebSocket fan-out)
    ws_compression: bool = False


@dataclass(frozen=True)
class PresenceSettings:
    offline_threshold_s: float = 15.0
    status_check_interval_s: float = 5.0
    new_node_threshold_s: float = 60.0  # until a node's reporting interval is known


@dataclass(frozen=True)
class CommandSettings:
    max_in_flight: int = 1  # per node
    ack_timeout_s: float = 10.0  # sent → any ack; then the node's next command may go
    exec_timeout_s: float = 60.0  # received → executed/failed
    default_ttl_s: float = 300.0
    max_bytes: int = 10_240  # the encoded command (PROTOCOL §4.1)
    sweep_interval_s: float = 1.0  # expiry, ack timeouts, retained copies
    infer_window_s: float = 30.0  # legacy: status event after a command → executed


@dataclass(frozen=True)
class RetentionSettings:
    days: float = 0.0  # rows older than this are deleted; 0 keeps everything
    interval_s: float = 3600.0  # between passes


@dataclass(frozen=True)
class Settings:
    amqp: AmqpSettings
    mqtt: MqttSettings
    db: DbSettings
    ingest: IngestSettings = IngestSettings()
    http: HttpSettings = HttpSettings()
    presence: PresenceSettings = PresenceSettings()
    commands: CommandSettings = CommandSettings()
    retention: RetentionSettings = RetentionSettings()
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    shutdown_timeout_s: float = 10.0

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = None
    ) -> Settings:
        """Environment wins over the file; the file wins over defaults."""
        values: dict[str, str] = {}
        if env_file is not None:
            values.update(read_env_file(Path(env_file)))
        values.update(os.environ if environ is None else environ)
        return _Reader(values).build()


def read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"env file {path}: {exc.strerror}"]) from None
    out: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep:
            raise ConfigError([f"env file {path}:{lineno}: expected NAME=value, got {line!r}"])
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


class _Reader:
    """Reads typed values, collecting every problem instead of stopping at the first."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.problems: list[str] = []

    def _get(self, name: str, default: T, parse: Callable[[str], T], expect: str) -> T:
        raw = self.values.get(name, "").strip()
        if raw == "":
            return default
        try:
            return parse(raw)
        except ValueError:
            self.problems.append(f"{name}={raw!r}: expected {expect}")
            return default

    def text(self, name: str, default: str = "") -> str:
        return self.values.get(name, default).strip() or default

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self._get(name, default, float, "a number")
        if not low <= value <= high:
            self.problems.append(f"{name}={value:g}: must be between {low:g} and {high:g}")
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self._get(name, default, int, "an integer")
        if not low <= value <= high:
            self.problems.append(f"{name}={value}: must be between {low} and {high}")
        return value

    def url(self, name: str, schemes: tuple[str, ...]) -> Secret:
        raw = self.text(name)
        if not raw:
            self.problems.append(f"{name} is not set: expected a {schemes[0]}:// URL")
        elif not _valid_url(raw, schemes):
            self.problems.append(
                f"{name}={redact_url(raw)!r}: expected {' or '.join(schemes)}://user:pass@host/..."
            )
        return Secret(raw)

    def choice(self, name: str, default: T, options: tuple[T, ...]) -> T:
        raw = self.text(name)
        if not raw:
            return default
        for option in options:
            if raw.lower() == str(option).lower():
                return option
        self.problems.append(f"{name}={raw!r}: expected one of {', '.join(map(str, options))}")
        return default

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name).lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        self.problems.append(f"{name}={raw!r}: expected true or false")
        return default

    def token_file(self, name: str) -> tuple[tuple[Scope, Secret], ...]:
        """One scope:token per line (comments with #), for tokens kept out of the env."""
        path = self.text(name)
        if not path:
            return ()
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            self.problems.append(f"{name}={path!r}: {exc.strerror}")
            return ()
        entries = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        return self.tokens(name, ",".join(entries))

    def tokens(self, name: str, raw: str | None = None) -> tuple[tuple[Scope, Secret], ...]:
        out: list[tuple[Scope, Secret]] = []
        source = self.text(name) if raw is None else raw
        for number, item in enumerate(filter(None, (p.strip() for p in source.split(","))), 1):
            scope, sep, token = item.partition(":")
            if not sep or scope not in SCOPES or len(token) < 8:
                self.problems.append(
                    f"{name}: entry #{number} must be scope:token with scope one of "
                    "read, command, admin and a token of at least 8 characters"
                )
                continue
            out.append((scope, Secret(token)))
        return tuple(out)

    def build(self) -> Settings:
        mqtt_password = self.text("MQTT_PASSWORD")
        settings = Settings(
            amqp=AmqpSettings(
                url=self.url("RABBITMQ_URL", ("amqp", "amqps")),
                heartbeat_s=self.integer("AMQP_HEARTBEAT_S", 600, 0, 3600),
                socket_timeout_s=self.number("AMQP_SOCKET_TIMEOUT_S", 10.0, 0.5, 300),
                prefetch=self.integer("PREFETCH_COUNT", AmqpSettings.prefetch, 1, 65535),
                reconnect_initial_s=self.number("AMQP_RECONNECT_INITIAL_S", 2.0, 0.05, 60),
                reconnect_max_s=self.number("AMQP_RECONNECT_MAX_S", 60.0, 0.1, 3600),
                publish_timeout_s=self.number("AMQP_PUBLISH_TIMEOUT_S", 10.0, 0.1, 300),
            ),
            mqtt=MqttSettings(
                host=self.text("MQTT_BROKER_HOST", "127.0.0.1"),
                port=self.integer("MQTT_BROKER_PORT", 1883, 1, 65535),
                username=self.text("MQTT_USERNAME") or None,
                password=Secret(mqtt_password) if mqtt_password else None,
                max_retries=self.integer("MQTT_MAX_RETRIES", 15, 0, 1_000_000),
                retry_delay_s=self.number("MQTT_RETRY_DELAY", 2.0, 0.01, 3600),
                connection_timeout_s=self.number("MQTT_CONNECTION_TIMEOUT", 10.0, 0.1, 600),
                publish_timeout_s=self.number("MQTT_PUBLISH_TIMEOUT_S", 5.0, 0.05, 600),
            ),
            db=DbSettings(
                url=self.url("DATABASE_URL", ("postgresql", "postgres")),
                pool_size=self.integer("DB_POOL_SIZE", 10, 1, 1000),
                command_timeout_s=self.number("DB_COMMAND_TIMEOUT_S", 10.0, 0.1, 600),
                retry_max_s=self.number("DB_RETRY_MAX_S", 10.0, 0.1, 600),
            ),
            ingest=IngestSettings(
                batch_max=self.integer("INGEST_BATCH_MAX", 500, 1, 100_000),
                linger_ms=self.number("INGEST_LINGER_MS", 2.0, 0, 10_000),
                writers=self.integer("INGEST_WRITERS", 1, 1, 64),
            ),
            http=HttpSettings(
                host=self.text("HTTP_HOST", "127.0.0.1"),
                port=self.integer("HTTP_PORT", 8000, 0, 65535),
                tokens=self.tokens("API_TOKENS") + self.token_file("API_TOKENS_FILE"),
                anonymous_scope=self.choice("API_ANONYMOUS_SCOPE", None, SCOPES),
                cors_origins=tuple(
                    o.strip() for o in self.text("CORS_ORIGINS").split(",") if o.strip()
                ),
                max_body_bytes=self.integer("HTTP_MAX_BODY_BYTES", 10_240, 256, 10_000_000),
                open_probes=self.flag("HTTP_OPEN_PROBES", True),
                ws_compression=self.flag("WS_COMPRESSION", False),
            ),
            presence=PresenceSettings(
                offline_threshold_s=self.number("OFFLINE_THRESHOLD_S", 15.0, 0.1, 86_400),
                status_check_interval_s=self.number("STATUS_CHECK_INTERVAL_S", 5.0, 0.05, 3600),
                new_node_threshold_s=self.number("NEW_NODE_THRESHOLD_S", 60.0, 0.1, 86_400),
            ),
            commands=CommandSettings(
                max_in_flight=self.integer("COMMAND_MAX_IN_FLIGHT", 1, 1, 100),
                ack_timeout_s=self.number("COMMAND_ACK_TIMEOUT_S", 10.0, 0.05, 3600),
                exec_timeout_s=self.number("COMMAND_EXEC_TIMEOUT_S", 60.0, 0.05, 86_400),
                default_ttl_s=self.number("COMMAND_DEFAULT_TTL_S", 300.0, 1, 7 * 86_400),
                max_bytes=self.integer("COMMAND_MAX_BYTES", 10_240, 256, 1_000_000),
                sweep_interval_s=self.number("COMMAND_SWEEP_INTERVAL_S", 1.0, 0.01, 60),
                infer_window_s=self.number("COMMAND_INFER_WINDOW_S", 30.0, 0.1, 3600),
            ),
            retention=RetentionSettings(
                days=self.number("RETENTION_DAYS", 0.0, 0, 36_500),
                interval_s=self.number("RETENTION_INTERVAL_S", 3600.0, 1, 7 * 86_400),
            ),
            log_level=self.choice(
                "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
            ),
            log_format=self.choice("LOG_FORMAT", "text", ("text", "json")),
            shutdown_timeout_s=self.number("SHUTDOWN_TIMEOUT_S", 10.0, 0.5, 600),
        )
        if settings.mqtt.username and settings.mqtt.password is None:
            self.problems.append("MQTT_PASSWORD is not set but MQTT_USERNAME is")
        if settings.amqp.reconnect_max_s < settings.amqp.reconnect_initial_s:
            self.problems.append("AMQP_RECONNECT_MAX_S must be >= AMQP_RECONNECT_INITIAL_S")
        if self.problems:
            raise ConfigError(self.problems)
        return settings
