"""`mediaserver serve`: load and check the configuration, then run until interrupted."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from mediaserver import config as config_module
from mediaserver.api.app import HttpServerLog, make_app
from mediaserver.recorder.processor import tune_malloc

log = logging.getLogger("mediaserver")


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # uvloop has no Windows build; asyncio's loop is fine there
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(config_path: Path | None, environ=None) -> int:
    import os

    config = config_module.load(config_path, os.environ if environ is None else environ)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, notes = config_module.with_generated_secrets(config)
    for note in notes:
        log.warning(note)
    log.info("storage %s, data in %s, API on %s", config.storage, config.data_dir.resolve(), config.base_url)
    _event_loop_policy()
    tune_malloc()
    web.run_app(make_app(config), host=config.http_host, port=config.http_port, print=None, logger=HttpServerLog(),
                access_log=None if config.log_level != "debug" else logging.getLogger("aiohttp.access"))
    return 0
