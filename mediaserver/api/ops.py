"""Operations: liveness, Prometheus metrics and the OpenAPI document."""

from __future__ import annotations

from aiohttp import web

from mediaserver import __version__
from mediaserver.api.keys import CATALOG, CONFIG, ENGINE, SERVICES
from mediaserver.api.openapi import spec


async def healthz(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    engine = request.app[ENGINE]
    body = {
        "status": "ok",
        "version": __version__,
        "storage": config.storage,
        "catalog": config.catalog,
        "sessions": len(engine.sessions),
        "admission": engine.admission.state(len(engine.sessions)),  # "open", "full" or "overloaded"
        "services": sorted(request.app[SERVICES]),
    }
    if engine.membership is not None:
        body["node"] = {"node_id": engine.settings.node.node_id, "isolated": engine.membership.isolated,
                        "catalog_writes_pending": engine.catalog.writes_pending,
                        "settled_from_lost_nodes": engine.membership.settled}
    return web.json_response(body)


def _lateness(histogram) -> list[str]:
    lines = [
        "# HELP mediaserver_tick_lateness_seconds How late each processing tick started.",
        "# TYPE mediaserver_tick_lateness_seconds histogram",
    ]
    cumulative = 0
    for bound, count in zip(histogram.BOUNDS + (float("inf"),), histogram.buckets):
        cumulative += count
        le = "+Inf" if bound == float("inf") else f"{bound:g}"
        lines.append(f'mediaserver_tick_lateness_seconds_bucket{{le="{le}"}} {cumulative}')
    lines += [
        f"mediaserver_tick_lateness_seconds_sum {histogram.sum:.6f}",
        f"mediaserver_tick_lateness_seconds_count {histogram.count}",
        "# HELP mediaserver_tick_lateness_max_seconds The latest tick ever started.",
        "# TYPE mediaserver_tick_lateness_max_seconds gauge",
        f"mediaserver_tick_lateness_max_seconds {histogram.max:.6f}",
    ]
    return lines


async def metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    catalog = request.app[CATALOG]
    lines = [
        "# HELP mediaserver_sessions_active Sessions live in this process.",
        "# TYPE mediaserver_sessions_active gauge",
        f"mediaserver_sessions_active {len(engine.sessions)}",
        "# HELP mediaserver_recordings Recordings in the catalog by state.",
        "# TYPE mediaserver_recordings gauge",
    ]
    for state, count in sorted((await catalog.count_recordings_by_state()).items()):
        lines.append(f'mediaserver_recordings{{state="{state}"}} {count}')
    counters = engine.counters
    lines += [
        "# HELP mediaserver_frames_received_total Audio frames received from every ingest.",
        "# TYPE mediaserver_frames_received_total counter",
        f"mediaserver_frames_received_total {counters['frames_in']}",
        "# HELP mediaserver_samples_received_total Audio samples received from every ingest.",
        "# TYPE mediaserver_samples_received_total counter",
        f"mediaserver_samples_received_total {counters['samples_in']}",
        "# HELP mediaserver_input_dropped_total Input refused or dropped, by reason.",
        "# TYPE mediaserver_input_dropped_total counter",
    ]
    for reason, count in sorted(engine.dropped_totals().items()):
        lines.append(f'mediaserver_input_dropped_total{{reason="{reason}"}} {count}')
    lines += [
        "# HELP mediaserver_processing_errors_total Sessions whose processing raised.",
        "# TYPE mediaserver_processing_errors_total counter",
        f"mediaserver_processing_errors_total {engine.processing_errors}",
        "# HELP mediaserver_webhook_backlog Webhook events not yet delivered.",
        "# TYPE mediaserver_webhook_backlog gauge",
        f"mediaserver_webhook_backlog {await catalog.outbox_backlog()}",
        "# HELP mediaserver_catalog_writes_pending Catalog writes made and not yet committed (PostgreSQL away, or busy).",
        "# TYPE mediaserver_catalog_writes_pending gauge",
        f"mediaserver_catalog_writes_pending {catalog.writes_pending}",
    ]
    stats = getattr(catalog, "stats", None)  # the PostgreSQL catalog counts its round trips; SQLite has none
    if stats is not None:
        for name, text in (("reads", "Catalog reads (queries) made."), ("writes", "Catalog writes committed."),
                           ("transactions", "Transactions the catalog's writes were committed in (batches)."),
                           ("retries", "Catalog attempts that failed on a transient error and were tried again.")):
            lines += [f"# HELP mediaserver_catalog_{name}_total {text}",
                      f"# TYPE mediaserver_catalog_{name}_total counter", f"mediaserver_catalog_{name}_total {stats[name]}"]
    lines += [
        "# HELP mediaserver_admission_open 1 while new calls are taken, 0 while they are refused (full or overloaded).",
        "# TYPE mediaserver_admission_open gauge",
        f"mediaserver_admission_open {int(engine.admission.closed_by(len(engine.sessions)) is None)}",
        "# HELP mediaserver_calls_refused_total New calls refused past capacity, by reason.",
        "# TYPE mediaserver_calls_refused_total counter",
    ]
    for code, count in sorted(engine.admission.refused.items()):
        lines.append(f'mediaserver_calls_refused_total{{reason="{code}"}} {count}')
    lines += _lateness(engine.lateness)
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(spec(request.app[CONFIG].base_url))


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
