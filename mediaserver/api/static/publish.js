// Publishes the browser's microphone to a mediaserver leg by WHIP (RFC 9725):
// POST the SDP offer, apply the answer, DELETE the Location to stop.
"use strict";

const $ = (id) => document.getElementById(id);
let pc = null;
let stream = null;
let resource = null;
let auth = {};
let meter = null;

function setState(state, detail) {
  document.body.dataset.state = state;
  $("status").textContent = detail ? `${state}: ${detail}` : state;
}

// No trickle ICE on the server side (PATCH answers 501): the offer carries every candidate.
function gatheringComplete(peer, timeoutMs) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === "complete") resolve(); };
    peer.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? `${body.error.code}: ${body.error.message}` : JSON.stringify(body);
  } catch {
    return response.statusText;
  }
}

function showLevel(track) {
  const context = new AudioContext();
  const analyser = context.createAnalyser();
  context.createMediaStreamSource(new MediaStream([track])).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  const timer = setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    const rms = Math.sqrt(samples.reduce((sum, x) => sum + x * x, 0) / samples.length);
    $("level").value = Math.min(1, rms * 4);
  }, 100);
  return () => { clearInterval(timer); context.close(); $("level").value = 0; };
}

async function publish(url, key) {
  auth = key ? { Authorization: `Bearer ${key}` } : {};
  setState("starting", "asking for the microphone");
  // A recording wants the voice as spoken: no echo cancellation, noise suppression or gain control.
  stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false }, video: false,
  });
  const track = stream.getAudioTracks()[0];
  meter = showLevel(track);
  pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver(track, { direction: "sendonly", streams: [stream] });
  pc.addEventListener("connectionstatechange", () => {
    setState(pc.connectionState);
    if (pc.connectionState === "failed") stop();
  });
  await pc.setLocalDescription(await pc.createOffer());
  await gatheringComplete(pc, 3000);
  const response = await fetch(url, {
    method: "POST", headers: { ...auth, "Content-Type": "application/sdp" }, body: pc.localDescription.sdp,
  });
  if (response.status !== 201) throw new Error(`${response.status} ${await errorMessage(response)}`);
  resource = new URL(response.headers.get("Location"), url).href;
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  setState("connecting", resource);
}

async function stop() {
  const leg = resource;
  resource = null;
  if (leg) {
    try {
      await fetch(leg, { method: "DELETE", headers: auth });
    } catch (error) {
      console.warn("ending the WHIP leg failed", error);
    }
  }
  if (pc) pc.close();
  if (stream) stream.getTracks().forEach((t) => t.stop());
  if (meter) meter();
  pc = stream = meter = null;
  $("publish").disabled = false;
  $("stop").disabled = true;
  if (document.body.dataset.state !== "failed") setState("stopped");
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("publish").disabled = true;
  $("stop").disabled = false;
  try {
    await publish($("url").value.trim(), $("key").value.trim());
  } catch (error) {
    await stop();
    setState("failed", error.message);
  }
});
$("stop").addEventListener("click", stop);

// ?url=<WHIP URL> fills the form, so an ingest URL can be opened directly.
const given = new URLSearchParams(location.search).get("url");
if (given) $("url").value = given;
