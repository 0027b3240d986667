"""Headless Chromium publishes a WAV file as its microphone through the server's own WHIP
page; the recording holds that audio. Debian's chromium, driven by Playwright; loopback."""

from __future__ import annotations

import asyncio
import io
import shutil
from urllib.parse import quote

import numpy as np
import pytest
import soundfile

from audio import silence, speech, tone, write_wav
from mediaserver.api.keys import SERVICES
from servers import Server
from whip_client import align, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CHROMIUM = "/usr/bin/chromium"
RATE = 16000
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    # Chromium leaves loopback out of ICE gathering by default; with this it also gathers
    # there, so the test still connects on a machine whose only interface is loopback.
    "--allow-loopback-in-peer-connection",
]
SELECTED_REMOTE = """async () => {
  const stats = [...(await pc.getStats()).values()];
  const pair = stats.find((s) => s.type === "candidate-pair" && s.nominated && s.state === "succeeded");
  return pair && stats.find((s) => s.id === pair.remoteCandidateId).address;
}"""


@pytest.fixture
def capture_file(tmp_path):
    """What Chromium's fake microphone plays, over and over: speech between two tones."""
    spoken = speech(tmp_path, "the browser publishes this sentence by whip", rate=RATE)
    samples = np.concatenate([tone(700, 0.25, RATE, -14), silence(0.15, RATE), spoken,
                              silence(0.15, RATE), tone(1100, 0.25, RATE, -14), silence(0.3, RATE)])
    return write_wav(tmp_path / "microphone.wav", samples, RATE), samples


@pytest.fixture
async def browser(capture_file):
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make debian-deps` installs Debian's chromium")
    from playwright.async_api import async_playwright

    path, _ = capture_file
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={path}"])
        try:
            yield chromium
        finally:
            await chromium.close()


async def test_chromium_publishes_its_microphone_through_the_page(tmp_path, browser, capture_file):
    _, samples = capture_file
    period = len(samples) / RATE
    async with Server(tmp_path) as server:
        session = await server.create_session()
        uuid = session["uuid"]
        status, started = await server.command(uuid, "start", sample_rate=RATE)
        assert status == 202, started
        page = await browser.new_page()
        page.on("console", lambda message: print("chromium:", message.text))
        await page.goto(f"{server.base_url}/whip/publish?url={quote(session['ingest']['whip']['caller'], safe='')}")
        await page.click("#publish")
        await page.wait_for_selector('body[data-state="connected"]', timeout=20000)
        # The server offers its loopback address only, so that is where the browser sends.
        assert await page.evaluate(SELECTED_REMOTE) == "127.0.0.1"
        await asyncio.sleep(2.2 * period)  # at least one whole loop of the file, wherever it started
        await page.click("#stop")
        await page.wait_for_selector('body[data-state="stopped"]', timeout=10000)
        service = server.app[SERVICES]["webrtc"]
        await wait_for(lambda: service.open_count == 0, what="the browser's peer connection to close")
        status, _ = await server.command(uuid, "stop")
        assert status == 202
        meta = await server.wait_recording(started["recording_id"])
        audio, rate = soundfile.read(io.BytesIO(await server.download(started["recording_id"])), dtype="int16")
        await page.close()

    assert rate == RATE
    lag, corr = align(audio, samples)
    (leg,) = meta["legs"]
    print(f"Chromium WHIP: correlation {corr:.4f} over one {period:.2f} s loop at lag {lag / RATE:.3f} s; "
          f"leg audio {leg['audio_ms'] / 1000:.2f} s of a {meta['duration']:.2f} s recording")
    assert lag + len(samples) <= len(audio), "a whole loop of the file must be in the recording"
    assert corr > 0.94  # 0.964-0.966 measured, idle and with a core held busy
    assert leg["audio_ms"] / 1000 >= 2 * period
