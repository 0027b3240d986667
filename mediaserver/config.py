"""Server configuration: read in one place, typed, validated at start.

Sources, lowest precedence first: built-in defaults, a TOML file (`serve --config`), then
the environment as `MEDIASERVER_<NAME>`. `RECORDING_RETENTION_HOURS` and
`RECORDING_BASE_URL` are honoured too, as the platforms our users come from name them.
Every error is a `ConfigError` whose message names the setting.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from mediaserver.errors import ConfigError
from mediaserver.options import OptionError, RecordingOptions

ENV_PREFIX = "MEDIASERVER_"
LEGACY_ENV = {"RECORDING_RETENTION_HOURS": "recording_retention_hours", "RECORDING_BASE_URL": "recording_base_url"}
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class App:
    """A tenant: its credentials and where its webhooks go."""

    id: str
    key: str
    webhook_url: str | None = None
    webhook_secret: str | None = None


@dataclass(frozen=True, slots=True)
class ProcessingSettings:
    """What a processing thread's loop needs: its tick and each session's turn."""

    tick_ms: int = 20
    process_ms: int = 200


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a worker process is started with (pickled to it): its loop's processing, where
    its RTP sockets bind from, and how much it logs."""

    processing: ProcessingSettings
    rtp_host: str
    rtp_port_min: int
    rtp_port_max: int
    log_level: str


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    """How every recording's encoder and silence judge are set up."""

    mp3_quality: int
    opus_complexity: int
    wav_buffer_ms: int
    silence_threshold_dbfs: float


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    """When new calls are refused (see `recorder.admission`)."""

    max_calls: int = 0  # 0: no fixed limit
    overload_lateness_ms: float = 200.0
    overload_hold_s: float = 10.0


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """What the engine needs: where sessions run and how, what recordings start from,
    where their spools and objects go, and what the archive keeps for how long."""

    workers: int
    worker: WorkerSettings
    processing: ProcessingSettings
    jitter_ms: int
    session_idle_s: float
    command_cooldown_s: float
    defaults: RecordingOptions
    spool_dir: Path
    key_template: str
    encoders: EncoderSettings
    base_url: str
    recording_base_url: str
    retention_hours: float
    sweep_every_s: float
    admission: AdmissionSettings
    node: NodeSettings


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """This node among the others of a cluster (alone when `clustered` is False)."""

    node_id: str
    node_url: str  # where the other nodes reach this node's API
    clustered: bool
    checkpoint_s: float
    timeout_s: float


@dataclass(frozen=True, slots=True)
class S3Settings:
    """Where and how recordings are stored in S3; checked with the rest of the config."""

    endpoint: str
    bucket: str
    region: str
    access_key: str
    secret_key: str
    part_size: int
    sse: str  # "none" or "AES256"
    retry_for_s: float
    key_template: str
    journal_dir: Path
    shared: bool = False  # other nodes upload under the same prefix: start() sweeps no orphans


@dataclass(frozen=True)
class Config:
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    sip_host: str = "127.0.0.1"
    sip_port: int = 5060
    sip_answer_delay_ms: int = 0  # ring (180) this long before answering an INVITE; 0 answers at once
    rtp_port_min: int = 20000
    rtp_port_max: int = 29999
    data_dir: Path = Path("./data")
    public_url: str = ""
    storage: str = "local"
    catalog: str = "sqlite"  # sqlite (one node, in data_dir) or postgres (a cluster of nodes)
    postgres_dsn: str = ""  # postgresql://user:password@host:port/database, when catalog = postgres
    node_id: str = ""  # this node's name in the cluster; the host name when empty
    node_url: str = ""  # how the other nodes reach this node's API; public_url (or http_host:http_port) when empty
    checkpoint_s: float = 5.0  # a clustered node copies the tail of each recording to S3 this often
    node_timeout_s: float = 10.0  # a node silent this long is taken for dead and its recordings settled by another
    s3_endpoint: str = ""
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_part_size: int = 8 * MiB
    s3_sse: str = "none"
    s3_retry_for_s: float = 86400.0  # how long an upload is retried through an S3 outage
    s3_key_template: str = "recordings/{app_id}/{yyyy}/{mm}/{dd}/{recording_id}.{ext}"
    apps: tuple[App, ...] = ()
    command_cooldown_s: float = 2.0
    record_policy: str = "api"
    default_format: str = "wav"
    default_channels: int = 1
    default_participant: str = "all"
    default_sample_rate: int = 8000
    default_bitrate: int = 0  # 0: the format's default (mp3 32, opus 24)
    default_silence_timeout: float = 0.0
    default_max_length: float = 14400.0
    default_finish_on_key: str = ""
    default_trim_silence: bool = False
    silence_threshold_dbfs: float = -45.0
    mp3_quality: int = 7  # LAME -q: 7 encodes 2.3x faster than 2, at a higher SNR (benchmarks/mix_encode)
    opus_complexity: int = 10
    wav_buffer_ms: int = 250  # WAV audio gathered per write; what a crash can lose at most
    recording_retention_hours: float = 720.0
    recording_base_url: str = ""
    retention_sweep_s: float = 60.0
    webhook_timeout_s: float = 10.0
    webhook_max_age_h: float = 24.0
    session_idle_s: float = 3600.0  # a session with no live leg and no recording ends after this
    max_calls: int = 0  # live sessions beyond which new ones are refused (503); 0: no fixed limit
    twilio_start_timeout_s: float = 10.0  # a Twilio stream without credentials in its request waits this long for its start
    overload_lateness_ms: float = 200.0  # processing ticks this late (over 1 % of them) refuse new calls
    overload_hold_s: float = 10.0  # and keep refusing this long after
    tick_ms: int = 20
    process_ms: int = 200  # each session is mixed and encoded this often (staggered over ticks)
    jitter_ms: int = 80
    max_body_bytes: int = 1 * MiB
    ingest_token_ttl_s: int = 3600
    log_level: str = "info"
    secret_key: str = ""  # signs local presigned URLs and ingest tokens; made and kept in data_dir when empty
    workers: int = 1

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")

    def recording_defaults(self) -> RecordingOptions:
        """The options every recording starts from before its own overrides."""
        try:
            return RecordingOptions(
                format=self.default_format,
                channels=self.default_channels,
                participant=self.default_participant,
                sample_rate=self.default_sample_rate,
                bitrate=self.default_bitrate or None,
                silence_timeout=self.default_silence_timeout,
                max_length=self.default_max_length,
                finish_on_key=self.default_finish_on_key,
                trim_silence=self.default_trim_silence,
            ).validated()
        except OptionError as exc:
            raise ConfigError(f"recording defaults: {exc}") from None

    def app(self, app_id: str) -> App | None:
        return next((app for app in self.apps if app.id == app_id), None)

    # -- each component's slice --------------------------------------------------------

    def processing(self) -> ProcessingSettings:
        return ProcessingSettings(self.tick_ms, self.process_ms)

    def worker_settings(self) -> WorkerSettings:
        return WorkerSettings(self.processing(), self.sip_host, self.rtp_port_min, self.rtp_port_max, self.log_level)

    def engine(self) -> EngineSettings:
        encoders = EncoderSettings(self.mp3_quality, self.opus_complexity, self.wav_buffer_ms, self.silence_threshold_dbfs)
        return EngineSettings(self.workers, self.worker_settings(), self.processing(), self.jitter_ms, self.session_idle_s,
                              self.command_cooldown_s, self.recording_defaults(), self.data_dir / "spool",
                              self.s3_key_template, encoders, self.base_url, self.recording_base_url,
                              self.recording_retention_hours, self.retention_sweep_s,
                              AdmissionSettings(self.max_calls, self.overload_lateness_ms, self.overload_hold_s),
                              self.node())

    def node(self) -> NodeSettings:
        return NodeSettings(self.node_id or socket.gethostname(), (self.node_url or self.base_url).rstrip("/"),
                            self.catalog == "postgres", self.checkpoint_s, self.node_timeout_s)

    def s3(self) -> S3Settings:
        return S3Settings(self.s3_endpoint, self.s3_bucket, self.s3_region, self.s3_access_key, self.s3_secret_key,
                          self.s3_part_size, self.s3_sse, self.s3_retry_for_s, self.s3_key_template,
                          self.data_dir / "journal", shared=self.catalog == "postgres")


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The configuration from defaults, an optional TOML file and the environment."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_toml(Path(path)))
    for name, raw in _from_environ(environ or {}).items():
        values[name] = raw
    converted = {name: _convert(name, value) for name, value in values.items()}
    config = Config(**converted)
    validate(config)
    return config


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    # A [server] table is allowed for readability; its keys are the same settings.
    flat = {**{k: v for k, v in data.items() if not isinstance(v, dict) or k == "apps"}, **data.get("server", {})}
    for name in flat:
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name!r} in {path}")
    return flat


def _from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    found = {}
    for key, name in LEGACY_ENV.items():
        if key in environ:
            found[name] = environ[key]
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX):].lower()
            if name not in _FIELDS:
                raise ConfigError(f"unknown setting {key}")
            found[name] = value
    return found


def _convert(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    try:
        if name == "apps":
            return _apps(value)
        if kind == "Path":
            return Path(value)
        if kind == "bool":
            return _bool(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name} must be {_kind_words(kind)}, not {value!r}") from exc


def _kind_words(kind: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "Path": "a path"}.get(kind, "a string" if kind == "str" else "a JSON list of apps")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _apps(value: Any) -> tuple[App, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"setting apps is not valid JSON: {exc}") from None
    if not isinstance(value, list) or not value:
        raise ConfigError("setting apps must be a non-empty list of {id, key, webhook_url, webhook_secret}")
    apps = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not isinstance(item.get("key"), str):
            raise ConfigError(f"setting apps[{index}] needs string fields id and key")
        extra = set(item) - {"id", "key", "webhook_url", "webhook_secret"}
        if extra:
            raise ConfigError(f"setting apps[{index}] has unknown field {sorted(extra)[0]!r}")
        apps.append(App(item["id"], item["key"], item.get("webhook_url"), item.get("webhook_secret")))
    return tuple(apps)


def validate(config: Config) -> None:
    """Raise ConfigError naming the first setting that is out of range."""
    for name in ("http_port", "sip_port", "rtp_port_min", "rtp_port_max"):
        if not 0 <= getattr(config, name) <= 65535:
            raise ConfigError(f"setting {name} must be a port number 0..65535")
    if config.rtp_port_min > config.rtp_port_max or config.rtp_port_min < 1024 and config.rtp_port_min != 0:
        raise ConfigError("settings rtp_port_min..rtp_port_max must be an increasing range above 1023")
    _one_of(config, "storage", ("local", "s3"))
    _one_of(config, "catalog", ("sqlite", "postgres"))
    if config.catalog == "postgres":
        _check_cluster(config)
    _one_of(config, "record_policy", ("api", "all"))
    _one_of(config, "s3_sse", ("none", "AES256"))
    _one_of(config, "log_level", ("debug", "info", "warning", "error"))
    if config.storage == "s3":
        for name in ("s3_endpoint", "s3_bucket", "s3_access_key", "s3_secret_key"):
            if not getattr(config, name):
                raise ConfigError(f"setting {name} is required when storage = s3")
    if config.s3_part_size < 5 * MiB:
        raise ConfigError("setting s3_part_size must be at least 5 MiB (the S3 minimum part size)")
    for name in ("public_url", "recording_base_url", "s3_endpoint"):
        url = getattr(config, name)
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
            raise ConfigError(f"setting {name} must be an http(s) URL, not {url!r}")
    _positive(config, ("command_cooldown_s", "recording_retention_hours", "webhook_timeout_s", "webhook_max_age_h",
                       "sip_answer_delay_ms", "s3_retry_for_s", "max_calls", "overload_hold_s"), allow_zero=True)
    _positive(config, ("overload_lateness_ms", "twilio_start_timeout_s", "checkpoint_s", "node_timeout_s"))
    _positive(config, ("tick_ms", "process_ms", "jitter_ms", "wav_buffer_ms", "max_body_bytes", "ingest_token_ttl_s", "workers", "retention_sweep_s", "session_idle_s"))
    if not 0 <= config.mp3_quality <= 9:
        raise ConfigError("setting mp3_quality must be 0 (best) .. 9 (fastest)")
    if not 0 <= config.opus_complexity <= 10:
        raise ConfigError("setting opus_complexity must be 0..10")
    if len({app.id for app in config.apps}) != len(config.apps):
        raise ConfigError("setting apps has two apps with the same id")
    config.recording_defaults()


def _check_cluster(config: Config) -> None:
    """What every node of a cluster must share: the catalog, the audio, the keys."""
    dsn = urlsplit(config.postgres_dsn)
    if dsn.scheme not in ("postgres", "postgresql") or not (dsn.hostname or "host=" in dsn.query):
        raise ConfigError("setting postgres_dsn must be a postgresql://user@host:port/database URL when catalog = postgres")
    if config.storage != "s3":
        raise ConfigError("catalog = postgres needs storage = s3: every node must reach every recording")
    if not config.secret_key:
        raise ConfigError("catalog = postgres needs secret_key: the nodes must sign and check the same tokens and URLs")
    if not config.apps:
        raise ConfigError("catalog = postgres needs apps: every node must know the same apps and keys")
    if config.node_url and (urlsplit(config.node_url).scheme not in ("http", "https") or not urlsplit(config.node_url).netloc):
        raise ConfigError(f"setting node_url must be an http(s) URL, not {config.node_url!r}")


def _one_of(config: Config, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(config, name) not in allowed:
        raise ConfigError(f"setting {name} must be one of {', '.join(allowed)}, not {getattr(config, name)!r}")


def _positive(config: Config, names: tuple[str, ...], allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"setting {name} must be {'zero or ' if allow_zero else ''}positive, not {value!r}")


def with_generated_secrets(config: Config) -> tuple[Config, list[str]]:
    """Fill in the secret key and the dev app, kept in data_dir so restarts reuse them.

    Returns the config and lines worth printing at start (the dev app's credentials).
    """
    notes: list[str] = []
    secret = config.secret_key or _kept_secret(config.data_dir / "secret_key")
    apps = config.apps
    if not apps:
        key = _kept_secret(config.data_dir / "dev_app_key")
        apps = (App("dev", key),)
        notes.append(f"no apps configured: using app id 'dev' with key {key}")
    return dataclasses.replace(config, secret_key=secret, apps=apps), notes


def _kept_secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(24)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return value
