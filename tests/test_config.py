"""Configuration: file, environment, precedence, validation naming the bad setting."""

import pytest

from mediaserver import config
from mediaserver.errors import ConfigError


def test_defaults_are_the_embedded_ones():
    c = config.load(environ={})
    assert (c.http_host, c.http_port, c.sip_port, c.storage, c.record_policy) == ("127.0.0.1", 8080, 5060, "local", "api")
    assert (c.rtp_port_min, c.rtp_port_max, c.command_cooldown_s) == (20000, 29999, 2.0)
    assert c.base_url == "http://127.0.0.1:8080"
    opts = c.recording_defaults()
    assert (opts.format, opts.channels, opts.sample_rate, opts.max_length) == ("wav", 1, 8000, 14400.0)


def test_environment_wins_over_the_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('http_port = 9000\ndefault_format = "mp3"\n[server]\nsip_port = 5070\n')
    c = config.load(path, {"MEDIASERVER_HTTP_PORT": "9100", "RECORDING_RETENTION_HOURS": "1.5",
                            "RECORDING_BASE_URL": "https://cdn.example.test/rec"})
    assert (c.http_port, c.sip_port, c.default_format) == (9100, 5070, "mp3")
    assert c.recording_retention_hours == 1.5 and c.recording_base_url == "https://cdn.example.test/rec"


def test_apps_from_json():
    c = config.load(environ={"MEDIASERVER_APPS": '[{"id": "a", "key": "k", "webhook_url": "http://127.0.0.1:1/h", "webhook_secret": "s"}]'})
    assert c.app("a").webhook_secret == "s" and c.app("b") is None


@pytest.mark.parametrize("env, words", [
    ({"MEDIASERVER_HTTP_PORT": "eighty"}, "http_port must be an integer"),
    ({"MEDIASERVER_HTTP_PORT": "70000"}, "http_port must be a port"),
    ({"MEDIASERVER_STORAGE": "ftp"}, "storage must be one of local, s3"),
    ({"MEDIASERVER_STORAGE": "s3"}, "s3_endpoint is required"),
    ({"MEDIASERVER_S3_PART_SIZE": "1024"}, "s3_part_size must be at least 5 MiB"),
    ({"MEDIASERVER_RTP_PORT_MIN": "3000", "MEDIASERVER_RTP_PORT_MAX": "2000"}, "rtp_port_min..rtp_port_max"),
    ({"MEDIASERVER_DEFAULT_FORMAT": "flac"}, "recording defaults: format must be one of"),
    ({"MEDIASERVER_APPS": "not json"}, "apps is not valid JSON"),
    ({"MEDIASERVER_APPS": '[{"id": "a"}]'}, "apps[0] needs string fields id and key"),
    ({"MEDIASERVER_APPS": '[{"id": "a", "key": "1"}, {"id": "a", "key": "2"}]'}, "two apps with the same id"),
    ({"MEDIASERVER_NO_SUCH_THING": "1"}, "unknown setting MEDIASERVER_NO_SUCH_THING"),
    ({"MEDIASERVER_PUBLIC_URL": "localhost:80"}, "public_url must be an http(s) URL"),
    ({"MEDIASERVER_DEFAULT_TRIM_SILENCE": "maybe"}, "default_trim_silence must be true or false"),
    ({"MEDIASERVER_MP3_QUALITY": "12"}, "mp3_quality must be 0"),
])
def test_bad_settings_are_named(env, words):
    with pytest.raises(ConfigError) as error:
        config.load(environ=env)
    assert words in str(error.value)


def test_bad_files_are_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.toml", {})
    broken = tmp_path / "broken.toml"
    broken.write_text("http_port = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(broken, {})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'")
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        config.load(unknown, {})


def test_generated_secrets_are_kept_across_starts(tmp_path):
    c = config.load(environ={"MEDIASERVER_DATA_DIR": str(tmp_path)})
    first, notes = config.with_generated_secrets(c)
    again, _ = config.with_generated_secrets(c)
    assert first.apps[0].id == "dev" and first.apps[0].key == again.apps[0].key
    assert first.secret_key == again.secret_key and first.secret_key
    assert first.apps[0].key in notes[0]
    assert (tmp_path / "dev_app_key").stat().st_mode & 0o077 == 0


def test_the_cli_reports_a_bad_setting_and_exits_2(tmp_path, capsys, monkeypatch):
    from mediaserver.cli import main

    monkeypatch.setenv("MEDIASERVER_HTTP_PORT", "nope")
    assert main(["serve"]) == 2
    assert "http_port" in capsys.readouterr().err
