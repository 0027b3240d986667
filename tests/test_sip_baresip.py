"""Real baresip calls the server: the recording lasts what it streamed, and the digits
sent over its control socket (RFC 4733 telephone-events) are the ones received."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from audio import best_lag, correlation, noise, write_wav
from mediaserver.api.keys import SERVICES
from mediaserver.codecs import g711
from servers import Server
from sip_peers import Baresip, LegWatcher, recordings

pytestmark = pytest.mark.skipif(shutil.which("baresip") is None, reason="baresip is not installed")

RATE = 8000


@pytest.mark.timeout(60)
async def test_baresip_call_with_rfc4733_digits(tmp_path):
    sent = noise(3.0, seed=31, dbfs=-16)
    phone = Baresip(tmp_path, write_wav(tmp_path / "in.wav", sent))
    async with Server(tmp_path, record_policy="all") as server, LegWatcher(server) as watcher:
        try:
            await phone.dial(f"sip:app1@127.0.0.1:{server.app[SERVICES]['sip'].port}")
            for _ in range(250):
                if watcher.legs and next(iter(watcher.legs.values())).receiver.counters.packets:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail(f"no call came in:\n{phone.log()}")
            for digit in "159#":
                assert (await phone.command("sndcode", digit))["ok"]
                await asyncio.sleep(0.25)
            # baresip hangs up (BYE) when its file ends.
            for _ in range(250):
                if not server.app[SERVICES]["sip"].calls:
                    break
                await asyncio.sleep(0.02)
            assert not server.app[SERVICES]["sip"].calls, phone.log()
            [recording] = await recordings(server)
        finally:
            await phone.close()
    assert watcher.key_presses() == ["1", "5", "9", "#"]
    [leg] = recording.meta["legs"]
    assert leg["lost"] == 0 and leg["malformed"] == 0
    assert leg["audio_ms"] / 1000 == pytest.approx(3.0, abs=0.06)
    assert recording.meta["duration"] == pytest.approx(leg["first_ms"] / 1000 + 3.0, abs=0.06)
    lag, score = best_lag(recording.audio[:, 0], g711.decode_ulaw(g711.encode_ulaw(sent)), RATE // 4)
    # baresip itself sends a few packets of silence while its file source starts.
    settled = RATE // 4
    assert correlation(recording.audio[lag + settled:, 0], g711.decode_ulaw(g711.encode_ulaw(sent))[settled:]) > 0.99
    assert [leg.endpoint.stats.rtcp_packets > 0 for leg in watcher.legs.values()] == [True]  # baresip sends RTCP
