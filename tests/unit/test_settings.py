"""Settings from the environment and env files (PROTOCOL §8): defaults, every bad value at
once, secrets that never show, API tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from rnr_gateway.errors import ConfigError
from rnr_gateway.settings import AmqpSettings, Secret, Settings, read_env_file, redact_url

AMQP = "amqp://rnr:amqp-pass-4711@127.0.0.1:5672/rnr_iot_vhost"
PG = "postgresql://rnr:pg-pass-4711@127.0.0.1:5432/rnr"
REQUIRED = {"RABBITMQ_URL": AMQP, "DATABASE_URL": PG}


def build(**env: str) -> Settings:
    return Settings.from_env(REQUIRED | env)


def problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(**env)
    return info.value.problems


# -- defaults -----------------------------------------------------------------------------
def test_seed_defaults_of_protocol_section_8() -> None:
    s = build()
    assert s.amqp.heartbeat_s == 600 and s.amqp.socket_timeout_s == 10
    assert (s.amqp.reconnect_initial_s, s.amqp.reconnect_max_s) == (2, 60)
    assert (s.mqtt.host, s.mqtt.username, s.mqtt.password) == ("127.0.0.1", None, None)
    assert (s.mqtt.max_retries, s.mqtt.retry_delay_s, s.mqtt.connection_timeout_s) == (15, 2, 10)
    assert (s.http.host, s.http.port, s.http.tokens) == ("127.0.0.1", 8000, ())
    assert (s.http.anonymous_scope, s.http.cors_origins) == (None, ())
    assert (s.presence.offline_threshold_s, s.presence.status_check_interval_s) == (15, 5)
    assert s.db.pool_size == 10
    assert (s.log_level, s.log_format) == ("INFO", "text")
    assert s.amqp.url.value == AMQP and s.db.url.value == PG
    assert s.amqp.vhost == "rnr_iot_vhost"
    assert s.retention.days == 0  # nothing is deleted unless asked


def test_values_read_from_an_empty_environment_are_the_dataclass_defaults() -> None:
    """The reader's fallbacks and the dataclasses' own defaults never drift apart."""
    s = build()
    sections = (s.amqp, s.mqtt, s.db, s.ingest, s.http, s.presence, s.commands, s.retention)
    for section in sections:
        for f in dataclasses.fields(section):
            if f.default is not dataclasses.MISSING:
                got = getattr(section, f.name)
                assert got == f.default, f"{type(section).__name__}.{f.name}: {got!r}"
    for f in dataclasses.fields(Settings):
        if f.default is not dataclasses.MISSING:
            assert getattr(s, f.name) == f.default, f.name


def test_blank_values_mean_the_default() -> None:
    s = build(PREFETCH_COUNT="  ", HTTP_PORT="", LOG_LEVEL=" ", API_TOKENS=" , ,")
    assert s.amqp.prefetch == AmqpSettings.prefetch
    assert (s.http.port, s.log_level, s.http.tokens) == (8000, "INFO", ())


def test_values_are_parsed() -> None:
    s = build(
        PREFETCH_COUNT=" 50 ",
        MQTT_BROKER_PORT="1884",
        MQTT_USERNAME="dev",
        MQTT_PASSWORD="mqtt-pass",
        OFFLINE_THRESHOLD_S="2.5",
        LOG_LEVEL="debug",
        LOG_FORMAT="JSON",
        API_ANONYMOUS_SCOPE="Read",
        CORS_ORIGINS=" http://a.example , ,http://b.example:3000",
        HTTP_PORT="0",
    )
    assert (s.amqp.prefetch, s.mqtt.port, s.mqtt.username) == (50, 1884, "dev")
    assert s.mqtt.password == Secret("mqtt-pass")
    assert s.presence.offline_threshold_s == 2.5
    assert (s.log_level, s.log_format, s.http.anonymous_scope) == ("DEBUG", "json", "read")
    assert s.http.cors_origins == ("http://a.example", "http://b.example:3000")
    assert s.http.port == 0  # an ephemeral port is allowed


def test_settings_are_frozen() -> None:
    s = build()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.log_level = "DEBUG"  # type: ignore[misc]


# -- every bad value at once --------------------------------------------------------------
BAD: dict[str, str] = {
    "PREFETCH_COUNT": "lots",
    "MQTT_BROKER_PORT": "0",
    "HTTP_PORT": "70000",
    "OFFLINE_THRESHOLD_S": "-1",
    "STATUS_CHECK_INTERVAL_S": "nan",
    "DB_POOL_SIZE": "2.5",
    "LOG_LEVEL": "verbose",
    "LOG_FORMAT": "xml",
    "API_ANONYMOUS_SCOPE": "root",
    "SHUTDOWN_TIMEOUT_S": "soon",
    "MQTT_RETRY_DELAY": "inf",
    "RETENTION_DAYS": "-7",
}


def test_every_bad_value_is_reported_at_once_one_line_each() -> None:
    found = problems(**BAD)
    assert len(found) == len(BAD), found
    for name, value in BAD.items():
        lines = [p for p in found if p.startswith(f"{name}=")]
        assert len(lines) == 1, (name, found)
        assert value in lines[0], lines[0]
        assert "\n" not in lines[0]


def test_the_error_lists_the_problems_one_per_line() -> None:
    with pytest.raises(ConfigError) as info:
        build(**BAD)
    text = str(info.value).splitlines()
    assert text[0] == "invalid settings:"
    assert [line.strip() for line in text[1:]] == info.value.problems


def test_missing_urls_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"LOG_FORMAT": "xml"})
    found = info.value.problems
    assert len(found) == 3
    assert any(p.startswith("RABBITMQ_URL is not set") for p in found)
    assert any(p.startswith("DATABASE_URL is not set") for p in found)


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("RABBITMQ_URL", "http://u:hunter2-pw@host/v"),
        ("RABBITMQ_URL", "amqp://u:hunter2-pw@/vhost"),  # no host
        ("RABBITMQ_URL", "amqp://u:hunter2-pw@host:abc/v"),  # port not a number
        ("RABBITMQ_URL", "amqp://u:hunter2-pw@host:70000/v"),
        ("RABBITMQ_URL", "amqp://u:hunter2-pw@host:0/v"),
        ("RABBITMQ_URL", "amqp://u:hunter2-pw@[::1/v"),  # unparseable
        ("DATABASE_URL", "mysql://u:hunter2-pw@host/db"),
        ("DATABASE_URL", "127.0.0.1:5432"),
    ],
)
def test_bad_urls_are_one_problem_each_without_the_password(name: str, url: str) -> None:
    found = problems(**{name: url})
    assert len(found) == 1 and found[0].startswith(f"{name}="), found
    assert "hunter2-pw" not in found[0]


@pytest.mark.parametrize("url", ["amqps://u:p@broker.example/v", "amqp://[::1]:5672/%2F"])
def test_other_good_broker_urls(url: str) -> None:
    assert build(RABBITMQ_URL=url).amqp.url.value == url


def test_mqtt_username_needs_a_password() -> None:
    assert problems(MQTT_USERNAME="dev") == ["MQTT_PASSWORD is not set but MQTT_USERNAME is"]


def test_reconnect_bounds_must_be_ordered() -> None:
    found = problems(AMQP_RECONNECT_INITIAL_S="10", AMQP_RECONNECT_MAX_S="5")
    assert found == ["AMQP_RECONNECT_MAX_S must be >= AMQP_RECONNECT_INITIAL_S"]


# -- secrets ------------------------------------------------------------------------------
def test_secrets_never_show_in_repr_or_str() -> None:
    s = build(
        MQTT_USERNAME="dev",
        MQTT_PASSWORD="mqtt-pass-4711",
        API_TOKENS="read:read-token-4711,admin:admin-token-4711",
    )
    for text in (repr(s), str(s), repr(s.http), repr(s.amqp), repr(s.db), repr(s.mqtt)):
        for secret in ("amqp-pass", "pg-pass", "mqtt-pass", "read-token", "admin-token"):
            assert secret not in text, (secret, text)
    assert repr(Secret("x")) == str(Secret("x")) == "Secret('***')"
    assert f"{Secret('value')}" == "Secret('***')"


def test_display_urls_hide_the_password() -> None:
    s = build()
    assert s.amqp.display == "amqp://rnr:***@127.0.0.1:5672/rnr_iot_vhost"
    assert s.db.display == "postgresql://rnr:***@127.0.0.1:5432/rnr"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://u:p@h:5672/v", "amqp://u:***@h:5672/v"),
        ("amqp://u:p@ss@Host/v", "amqp://u:***@Host/v"),  # '@' in the password
        ("amqp://u:p@[::1]:5672/v", "amqp://u:***@[::1]:5672/v"),
        ("postgresql://u:p@h/db?sslmode=require", "postgresql://u:***@h/db?sslmode=require"),
        ("amqp://h/v", "amqp://h/v"),
        ("amqp://u:secret@[::1/v", "(malformed URL)"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# -- API tokens ---------------------------------------------------------------------------
def test_api_tokens_are_parsed_with_their_scopes() -> None:
    s = build(API_TOKENS=" read:reader-0001 , command:commander1,admin:admin:with:colons ,")
    assert [(scope, token.value) for scope, token in s.http.tokens] == [
        ("read", "reader-0001"),
        ("command", "commander1"),
        ("admin", "admin:with:colons"),
    ]


def test_each_bad_token_entry_is_reported_by_its_own_position() -> None:
    found = problems(API_TOKENS="read:good-token-1,nocolon,root:long-enough-1,read:short")
    assert [p.split(" must")[0] for p in found] == [
        "API_TOKENS: entry #2",
        "API_TOKENS: entry #3",
        "API_TOKENS: entry #4",
    ]
    assert not any("long-enough" in p or "good-token" in p for p in found)  # no token shown


@pytest.mark.parametrize("entry", ["READ:uppercase-scope", ":no-scope-token", "read:", "read"])
def test_malformed_token_entries(entry: str) -> None:
    assert len(problems(API_TOKENS=entry)) == 1


def test_tokens_can_come_from_a_file_too(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# operators\nadmin:file-admin-01\n\nread:file-reader-1\n")
    s = build(API_TOKENS="command:env-command-1", API_TOKENS_FILE=str(path))
    assert [scope for scope, _ in s.http.tokens] == ["command", "admin", "read"]
    missing = problems(API_TOKENS_FILE=str(tmp_path / "absent"))
    assert len(missing) == 1 and missing[0].startswith("API_TOKENS_FILE=")


# -- env files ----------------------------------------------------------------------------
def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.env"
    path.write_text(text)
    return path


def test_env_file_syntax(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# a comment\n"
        "\n"
        "PLAIN=value\n"
        "  SPACED = padded  \n"
        "export EXPORTED=yes\n"
        'DOUBLE="quoted value"\n'
        "SINGLE='single # not a comment'\n"
        "EQUALS=a=b=c\n"
        "EMPTY=\n"
        'LONELY_QUOTE="\n',
    )
    assert read_env_file(path) == {
        "PLAIN": "value",
        "SPACED": "padded",
        "EXPORTED": "yes",
        "DOUBLE": "quoted value",
        "SINGLE": "single # not a comment",
        "EQUALS": "a=b=c",
        "EMPTY": "",
        "LONELY_QUOTE": '"',
    }


def test_env_file_line_without_equals_is_an_error_with_its_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "A=1\n\nNOT A SETTING\n")
    with pytest.raises(ConfigError) as info:
        read_env_file(path)
    assert info.value.problems == [f"env file {path}:3: expected NAME=value, got 'NOT A SETTING'"]


def test_missing_env_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(REQUIRED, env_file=tmp_path / "nope.env")
    assert info.value.problems == [f"env file {tmp_path / 'nope.env'}: No such file or directory"]


def test_environment_wins_over_the_file_and_the_file_over_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path, f"RABBITMQ_URL={AMQP}\nDATABASE_URL={PG}\nHTTP_PORT=9000\nLOG_LEVEL=DEBUG\n"
    )
    s = Settings.from_env({"LOG_LEVEL": "WARNING"}, env_file=path)
    assert (s.http.port, s.log_level, s.amqp.url.value) == (9000, "WARNING", AMQP)


def test_the_deploy_example_parses(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "rnr-gateway.env.example"
    values: dict[str, Any] = read_env_file(example)
    assert {"RABBITMQ_URL", "DATABASE_URL", "MQTT_BROKER_HOST"} <= set(values)
    Settings.from_env({}, env_file=example)  # valid as shipped
