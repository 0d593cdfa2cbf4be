"""Every setting of the server: the `Config` it runs with, and the one table
(`SETTINGS`) that is the single source of every flag, its environment variable, its
key in the TOML file, its parser and its default.

Adding a setting is two adjacent edits here: a `Config` field (its default lives
there) and a `Setting` row naming that field. `config_from_settings` builds the
Config from the table; only settings that read files or combine values (secrets,
instructions, tools, the rate limit) are special-cased there.

Error handling: every bad value raises `ConfigError` naming the setting and where
the value came from (flag, env, config file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import ssl
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_UPSTREAM_URL = "https://api.openai.com/v1"
DEFAULT_INSTRUCTIONS = (
    "You are a helpful, friendly support agent. Answer clearly and concisely. "
    "When you need information only the user or their device has, use the tools you are given."
)

# A client gets this long to send its HTTP request head and finish the WebSocket
# handshake; slowloris peers are dropped.
HANDSHAKE_TIMEOUT_S = 10.0
# How long one frame may wait for a client that does not read before it is dropped.
SEND_TIMEOUT_S = 20.0
# Frames waiting for a slow client, in characters; past it the client is dropped (1008).
MAX_OUTBOX_CHARS = 8 * 1024 * 1024

@dataclass(frozen=True)
class Config:
    """Everything the server reads from flags and the environment."""

    host: str = "127.0.0.1"
    port: int = 8765
    db_path: str = "./chat.db"
    jwt_secret: str | None = None
    jwt_secret_generated: bool = False
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    insecure_dev: bool = False
    upstream_url: str = DEFAULT_UPSTREAM_URL
    api_key: str | None = None
    model: str = "gpt-4.1"
    instructions: str = DEFAULT_INSTRUCTIONS
    tools: list[dict[str, Any]] = field(default_factory=list)
    upstream_store: bool = True
    heartbeat_interval_s: float = 30.0
    heartbeat_timeout_s: float = 10.0
    max_frame_bytes: int = 64 * 1024
    max_content_chars: int = 10_000
    max_connections: int = 10_000
    max_connections_per_user: int = 5
    rate_limit_messages: int = 30
    rate_limit_window_s: float = 60.0
    max_queue: int = 8
    tool_timeout_s: float = 120.0
    upstream_idle_timeout_s: float = 60.0
    allowed_origins: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    shutdown_grace_s: float = 5.0
    log_content: bool = False
    detach_grace_s: float = 60.0
    retention_days: float | None = None
    redis_url: str | None = None
    fast_paths: bool = True
    # Not flags: tests and embedders lower these to exercise the slow-peer rules.
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    send_timeout_s: float = SEND_TIMEOUT_S
    max_outbox_chars: int = MAX_OUTBOX_CHARS

    @property
    def uses_demo_model(self) -> bool:
        """No key and no custom upstream: serve the offline demo model."""
        return self.api_key is None and self.upstream_url == DEFAULT_UPSTREAM_URL


class ConfigError(Exception):
    """The configuration cannot run; the message says which setting and why."""


class _ToolSpec(BaseModel):
    # Built when a tools file is read, not at import: a server without one never needs it.
    model_config = ConfigDict(extra="forbid", strict=True, defer_build=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


def load_tools(path: str) -> list[dict[str, Any]]:
    """Read a tools file: a JSON list of {name, description, parameters}. Returns them as
    Responses API function tools. Raises ConfigError naming the bad entry."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"tools file {path}: cannot read JSON ({exc})") from None
    if not isinstance(entries, list):
        raise ConfigError(f"tools file {path}: must be a JSON list of tools")
    tools: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        try:
            spec = _ToolSpec.model_validate(entry)
        except ValidationError as exc:
            problem = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(part) for part in problem["loc"]) or "entry"
            label = entry.get("name") if isinstance(entry, dict) else None
            raise ConfigError(
                f"tools file {path}: tool #{index} ({label or 'unnamed'}): "
                f"{where}: {problem['msg']}"
            ) from None
        if spec.parameters.get("type") != "object":
            raise ConfigError(
                f"tools file {path}: tool #{index} ({spec.name}): parameters must be a JSON "
                'schema with "type": "object"'
            )
        if spec.name in seen:
            raise ConfigError(f"tools file {path}: tool #{index}: duplicate name {spec.name!r}")
        seen.add(spec.name)
        tool: dict[str, Any] = {"type": "function", **spec.model_dump(exclude_none=True)}
        tools.append(tool)
    return tools

@dataclass(frozen=True)
class Setting:
    """One setting: `--flag`, the environment variable, and the key in the TOML file
    (the flag's name, with dashes or underscores). `read` turns text (flag, env) or a
    TOML value into the setting's value, raising ValueError with a reason."""

    flag: str
    env: str
    read: Callable[[Any], Any]
    help: str = ""
    # The Config field this setting fills as it is; None for the few that
    # `config_from_settings` reads or combines itself.
    config_field: str | None = None
    default: Any = None  # only for settings without a config_field
    kind: str = "value"  # "value", "switch" (--x/--no-x) or "list" (repeatable)
    secret: bool = False

    @property
    def default_value(self) -> Any:
        if self.config_field is None:
            return self.default
        config_field = _CONFIG_FIELDS[self.config_field]
        if config_field.default_factory is not dataclasses.MISSING:
            return config_field.default_factory()
        return config_field.default


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected non-empty text")
    return value


def _number(convert: Callable[[Any], Any], minimum: float) -> Callable[[Any], Any]:
    def read(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        number = convert(value)
        if not math.isfinite(number) or number < minimum:
            raise ValueError(f"must be at least {minimum:g}")
        return number

    return read


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _rate(value: Any) -> tuple[int, float]:
    count, _, window = str(value).partition("/")
    messages, seconds = int(count), float(window)
    if messages < 1 or not (0 < seconds < math.inf):
        raise ValueError("expected MESSAGES/SECONDS, both positive, e.g. 30/60")
    return messages, seconds


def _origins(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError("expected a list of origins")
    return tuple(item.strip() for item in items if item.strip())


def _one_of(*choices: str) -> Callable[[Any], str]:
    def read(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return str(value)

    return read


_positive = _number(float, 0.001)
_count = _number(int, 1)

_CONFIG_FIELDS = {config_field.name: config_field for config_field in dataclasses.fields(Config)}

SETTINGS: tuple[Setting, ...] = (
    Setting("host", "CHAT_HOST", _text, "address to listen on", "host"),
    Setting("port", "CHAT_PORT", _number(int, 0), "port (0: any free port)", "port"),
    Setting("db", "CHAT_DB", _text, "SQLite file", "db_path"),
    Setting("jwt-secret", "CHAT_JWT_SECRET", _text, "HS256 secret", secret=True),
    Setting("jwt-secret-file", "CHAT_JWT_SECRET_FILE", _text, "file holding the secret"),
    Setting("jwt-public-key", "CHAT_JWT_PUBLIC_KEY", _text, "PEM file (RS256/ES256)"),
    Setting("jwt-audience", "CHAT_JWT_AUDIENCE", _text, "required `aud`, if set", "jwt_audience"),
    Setting("jwt-issuer", "CHAT_JWT_ISSUER", _text, "required `iss`, if set", "jwt_issuer"),
    Setting(
        "insecure-dev",
        "CHAT_INSECURE_DEV",
        _switch,
        "no secret needed: a random one per run",
        "insecure_dev",
        kind="switch",
    ),
    Setting("upstream-url", "OPENAI_BASE_URL", _text, "Responses API base URL", "upstream_url"),
    Setting("api-key", "OPENAI_API_KEY", _text, "upstream API key", secret=True),
    Setting("api-key-file", "OPENAI_API_KEY_FILE", _text, "file holding the API key"),
    Setting("model", "CHAT_MODEL", _text, "model name", "model"),
    Setting("instructions-file", "CHAT_INSTRUCTIONS_FILE", _text, "system instructions"),
    Setting("tools-file", "CHAT_TOOLS_FILE", _text, "JSON list of client tools"),
    Setting(
        "store",
        "CHAT_UPSTREAM_STORE",
        _switch,
        "chain turns with previous_response_id",
        "upstream_store",
        kind="switch",
    ),
    Setting(
        "heartbeat-interval",
        "CHAT_HEARTBEAT_INTERVAL",
        _positive,
        "seconds",
        "heartbeat_interval_s",
    ),
    Setting(
        "heartbeat-timeout", "CHAT_HEARTBEAT_TIMEOUT", _positive, "seconds", "heartbeat_timeout_s"
    ),
    Setting("max-frame-bytes", "CHAT_MAX_FRAME_BYTES", _count, "bytes", "max_frame_bytes"),
    Setting(
        "max-content-chars", "CHAT_MAX_CONTENT_CHARS", _count, "characters", "max_content_chars"
    ),
    Setting("max-connections", "CHAT_MAX_CONNECTIONS", _count, "in all", "max_connections"),
    Setting(
        "max-connections-per-user",
        "CHAT_MAX_CONNECTIONS_PER_USER",
        _count,
        "per user",
        "max_connections_per_user",
    ),
    Setting("rate-limit", "CHAT_RATE_LIMIT", _rate, "MESSAGES/SECONDS", default=(30, 60.0)),
    Setting("max-queue", "CHAT_MAX_QUEUE", _number(int, 0), "turns waiting", "max_queue"),
    Setting("tool-timeout", "CHAT_TOOL_TIMEOUT", _positive, "seconds", "tool_timeout_s"),
    Setting(
        "upstream-idle-timeout",
        "CHAT_UPSTREAM_IDLE_TIMEOUT",
        _positive,
        "seconds without a byte mid-stream",
        "upstream_idle_timeout_s",
    ),
    Setting(
        "detach-grace",
        "CHAT_DETACH_GRACE",
        _number(float, 0),
        "seconds a turn goes on without a connection (0: a disconnect cancels it)",
        "detach_grace_s",
    ),
    Setting(
        "redis-url",
        "CHAT_REDIS_URL",
        _text,
        "Redis for several instances of one service (none: one instance)",
        "redis_url",
        secret=True,
    ),
    Setting(
        "retention-days",
        "CHAT_RETENTION_DAYS",
        _positive,
        "delete sessions inactive this long (checked at start, then hourly)",
        "retention_days",
    ),
    Setting(
        "allowed-origin",
        "CHAT_ALLOWED_ORIGINS",
        _origins,
        "browser origin allowed (repeatable; env: comma-separated)",
        "allowed_origins",
        kind="list",
    ),
    Setting("tls-cert", "CHAT_TLS_CERT", _text, "PEM certificate chain", "tls_cert"),
    Setting("tls-key", "CHAT_TLS_KEY", _text, "PEM private key", "tls_key"),
    Setting("shutdown-grace", "CHAT_SHUTDOWN_GRACE", _positive, "seconds", "shutdown_grace_s"),
    Setting(
        "log-level",
        "CHAT_LOG_LEVEL",
        _one_of("DEBUG", "INFO", "WARNING", "ERROR"),
        default="INFO",
    ),
    Setting("log-format", "CHAT_LOG_FORMAT", _one_of("text", "json"), default="text"),
    Setting(
        "log-content",
        "CHAT_LOG_CONTENT",
        _switch,
        "log message text (off: never)",
        "log_content",
        kind="switch",
    ),
    Setting(
        "fast-paths",
        "CHAT_FAST_PATHS",
        _switch,
        "the measured reaches beneath trio, trio-websocket and httpx (off: plain libraries)",
        "fast_paths",
        kind="switch",
    ),
)
SETTINGS_BY_KEY = {setting.flag: setting for setting in SETTINGS}


@dataclass(frozen=True)
class ResolvedSetting:
    value: Any
    source: str


def _attribute(setting: Setting) -> str:
    return setting.flag.replace("-", "_")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file with the same keys (env CHAT_CONFIG)")
    for setting in SETTINGS:
        name = f"--{setting.flag}"
        help_text = f"{setting.help} [env {setting.env}]".strip()
        if setting.kind == "switch":
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
        elif setting.kind == "list":
            parser.add_argument(name, action="append", help=help_text)
        else:
            parser.add_argument(name, help=help_text)


def _read_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        flag = key.replace("_", "-")
        if flag == "allowed-origins":
            flag = "allowed-origin"
        if flag not in SETTINGS_BY_KEY:
            raise ConfigError(f"--config: {path}: unknown key {key!r}")
        values[flag] = value
    return values


def resolve_settings(
    args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]
) -> dict[str, ResolvedSetting]:
    """Each setting's value and where it came from: flag > env > config file > default.
    Raises ConfigError naming the setting and the source of a bad value."""
    config_path = args.config or environ.get("CHAT_CONFIG")
    from_file = _read_config_file(config_path)
    resolved: dict[str, ResolvedSetting] = {}
    for setting in SETTINGS:
        from_flag = getattr(args, _attribute(setting), None)
        if from_flag is not None:
            raw, source = from_flag, "flag"
        elif environ.get(setting.env):
            raw, source = environ[setting.env], f"env {setting.env}"
        elif setting.flag in from_file:
            raw, source = from_file[setting.flag], f"config {config_path}"
        else:
            resolved[setting.flag] = ResolvedSetting(setting.default_value, "default")
            continue
        if setting.kind == "list" and isinstance(raw, list) and source == "flag":
            raw = ",".join(raw)
        try:
            resolved[setting.flag] = ResolvedSetting(setting.read(raw), source)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{setting.flag} (from {source}): {exc}") from None
    return resolved


def _read_secret(path: str, what: str) -> str:
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"{what}: {path} is empty")
    return secret


def _secret(
    values: dict[str, Any], key: str, environ: dict[str, str] | os._Environ[str]
) -> str | None:
    """A secret from its setting, else its `-file` setting, else a systemd credential
    of the same name ($CREDENTIALS_DIRECTORY/<key>). Both set is an error: one of
    them would be silently ignored (an unreadable file included)."""
    if values[key] and values[f"{key}-file"]:
        raise ConfigError(f"{key} and {key}-file are both set: keep one")
    if values[key]:
        return str(values[key])
    if values[f"{key}-file"]:
        return _read_secret(values[f"{key}-file"], f"{key}-file")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / key).is_file():
        return _read_secret(str(Path(credentials) / key), f"credential {key}")
    return None


def config_from_settings(
    resolved: dict[str, ResolvedSetting], environ: dict[str, str] | os._Environ[str]
) -> Config:
    """Build and check a Config: reads the files it names. Raises ConfigError."""
    values = {key: item.value for key, item in resolved.items()}
    public_key = None
    if values["jwt-public-key"]:
        public_key = _read_secret(values["jwt-public-key"], "jwt-public-key")
    secret = _secret(values, "jwt-secret", environ)
    generated = False
    if not secret and not public_key:
        if not values["insecure-dev"]:
            raise ConfigError(
                "no jwt-secret (CHAT_JWT_SECRET, --jwt-secret-file or a systemd credential) "
                "and no --jwt-public-key: refusing to start. "
                "Use --insecure-dev to try it out with a random secret."
            )
        secret, generated = secrets.token_urlsafe(32), True
    instructions = DEFAULT_INSTRUCTIONS
    if values["instructions-file"]:
        instructions = _read_secret(values["instructions-file"], "instructions-file")
    if bool(values["tls-cert"]) != bool(values["tls-key"]):
        raise ConfigError("tls-cert and tls-key go together")
    messages, window = values["rate-limit"]
    as_they_are = {
        setting.config_field: values[setting.flag]
        for setting in SETTINGS
        if setting.config_field is not None
    }
    as_they_are["upstream_url"] = values["upstream-url"].rstrip("/")
    return Config(
        **as_they_are,
        jwt_secret=secret,
        jwt_secret_generated=generated,
        jwt_public_key=public_key,
        api_key=_secret(values, "api-key", environ),
        instructions=instructions,
        tools=load_tools(values["tools-file"]) if values["tools-file"] else [],
        rate_limit_messages=messages,
        rate_limit_window_s=window,
    )


def check_deployment(config: Config) -> None:
    """What `check-config` adds to parsing: the files the server will open at start."""
    database = Path(config.db_path).resolve()
    if not database.parent.is_dir():
        raise ConfigError(f"db: folder {database.parent} does not exist")
    if not os.access(database.parent, os.W_OK) or (
        database.exists() and not os.access(database, os.W_OK)
    ):
        raise ConfigError(f"db: {database} is not writable")
    if config.tls_cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                config.tls_cert, config.tls_key
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls-cert/tls-key: cannot load: {exc}") from None


def print_settings(resolved: dict[str, ResolvedSetting]) -> None:
    for key, item in resolved.items():
        shown = item.value
        if SETTINGS_BY_KEY[key].secret and shown:
            shown = "********"
        elif key == "rate-limit":
            shown = f"{shown[0]}/{shown[1]:g}"
        elif isinstance(shown, tuple):
            shown = list(shown)
        print(f"{key} = {json.dumps(shown)}  # {item.source}")


