// Demo page logic shared by the user and agent pages. Options come from the URL fragment, so
// tokens never reach server logs: #token=...&simulcast=1&codec=H264&maxLayer=0&liftAfterFrames=90
//
// The pages double as test fixtures: every state a person sees is also printed as one
// `MERIDIAN_<KIND> <json>` console line (JOINED, PRESENCE, REMOTE, STATS, LAYOUT, ...), which
// the browser tests read.
import { MeridianClient } from "/sdk/meridian.js";

const params = new URLSearchParams(location.hash.slice(1));
const role = document.body.dataset.role;
const other = role === "user" ? "agent" : "customer";
const $ = (id) => document.getElementById(id);
const stateEl = $("state");
const statsBody = document.querySelector("#stats tbody");
const remoteVideo = $("remote");
const localVideo = $("local");
const presenceEl = $("presence");
const remoteNote = $("remote-note");
const levelEl = $("level");

function setState(text, cls) {
  stateEl.textContent = text;
  stateEl.className = "state " + (cls || "");
}

function log(kind, data) {
  // One machine-readable line per report: tests read these from the browser console.
  console.log(`MERIDIAN_${kind} ${JSON.stringify(data)}`);
}

/** What the page says about the other side's media: waiting, receiving, stopped or left. */
let remoteState = null;
function setRemote(state, text) {
  remoteNote.textContent = text;
  remoteNote.className = "note" + (state === "left" || state === "stalled" ? " gone" : "");
  if (state !== remoteState) {
    remoteState = state;
    log("REMOTE", { state, text });
  }
}

function logLayout() {
  const w = (el) => Math.round(el.getBoundingClientRect().width);
  log("LAYOUT", { viewport: window.innerWidth, self: w(localVideo), remote: w(remoteVideo) });
}

async function main() {
  let left = false;
  const token = params.get("token");
  if (!token) {
    setState("no token in URL", "bad");
    return;
  }
  // #route=1 asks this node's /v1/edge for the nearest edge and joins there.
  const client = new MeridianClient({
    url: params.get("ws") || undefined,
    route: params.get("route") === "1" ? true : params.get("route") || undefined,
    regionHint: params.get("region") || undefined,
    token,
    // #relay=1: media only through the region's TURN server.
    iceTransportPolicy: params.get("relay") === "1" ? "relay" : "all",
  });
  client.addEventListener("edge", (e) =>
    log("EDGE", { node: e.detail.joined.node, region: e.detail.joined.region, reason: e.detail.reason }),
  );
  client.addEventListener("connectionstate", (e) => {
    log("STATE", e.detail);
    if (e.detail.state === "connected") setState("connected", "ok");
    else if (e.detail.state === "failed") setState("media failed", "bad");
    else if (e.detail.state === "disconnected") setState("reconnecting media…");
  });
  // The node's view of each transport (the browser's own view is `connectionstate`).
  client.addEventListener("transportstate", (e) => log("TRANSPORT", { transport: e.detail.transport, state: e.detail.state }));
  client.addEventListener("sessionexpired", () => setState("session expired", "bad"));
  // Why the node let this participant go (for example `recording_failed`).
  client.addEventListener("error", (e) => {
    log("ERROR", { code: e.detail.code, message: e.detail.message });
    setState(`ended: ${e.detail.message}`, "bad");
  });
  // A lost signaling connection: the SDK takes our place back; media never stopped.
  client.addEventListener("reconnecting", () => {
    log("SIGNALING", { state: "reconnecting" });
    setState("reconnecting…");
  });
  client.addEventListener("reconnected", (e) => {
    log("SIGNALING", { state: "reconnected", failover: !!e.detail.failover, node: client.edge?.joined?.node || null });
    setState("connected", "ok");
  });
  client.addEventListener("migrating", (e) => {
    log("SIGNALING", { state: "migrating", to: e.detail.to.node });
    setState(`moving to ${e.detail.to.node}…`);
  });
  client.addEventListener("migrated", (e) => {
    log("SIGNALING", { state: "migrated", node: e.detail.node });
    setState("connected", "ok");
  });
  client.addEventListener("failover", (e) => {
    log("SIGNALING", { state: "failover", from: e.detail.from });
    setState("moving to another node…");
  });
  client.addEventListener("disconnected", (e) => log("SIGNALING", { state: "disconnected", code: e.detail.code }));
  client.addEventListener("closed", (e) => {
    log("CLOSED", e.detail);
    if (!left) setState("disconnected from the node", "bad");
    setRemote("left", "The connection to the service was lost.");
  });

  // Who else is here, as the node lets this role see them.
  const renderPresence = () => {
    const names = [...client.participants.values()].map((p) => `${p.userId} (${p.role})`);
    presenceEl.textContent = names.length ? `In the call: ${names.join(", ")}` : `The ${other} is not in the call.`;
  };
  client.addEventListener("participantjoined", (e) => {
    renderPresence();
    log("PRESENCE", { event: "joined", userId: e.detail.userId, present: presentIds() });
  });
  client.addEventListener("participantleft", (e) => {
    renderPresence();
    log("PRESENCE", { event: "left", userId: e.detail.userId, present: presentIds() });
    setRemote("left", `${e.detail.userId} left the call.`);
  });
  const presentIds = () => [...client.participants.values()].map((p) => p.userId);

  let joined;
  try {
    joined = await client.connect();
  } catch (e) {
    setState(`refused: ${e.code}`, "bad");
    log("ERROR", { code: e.code, message: e.message });
    return;
  }
  setState(`joined as ${joined.role}`);
  $("where").textContent = `Node ${joined.node}, region ${joined.region}`;
  // The participant is told the session is recorded.
  $("rec").hidden = !joined.recorded;
  if (role === "agent" && joined.recorded) verificationConsole(client, remoteVideo);
  log("JOINED", { participantId: joined.participantId, role: joined.role, node: joined.node });
  renderPresence();
  log("PRESENCE", { event: "initial", present: presentIds() });

  // A compliance profile may require the customer's consent and location before any media,
  // received or sent.
  const stepsDone = role === "user" && joined.profile ? profileSteps(client, joined.profile) : Promise.resolve();

  // The other side's media, by producer.
  const remoteStream = new MediaStream();
  remoteVideo.srcObject = remoteStream;
  const remote = new Map(); // producerId -> { consumerId, kind, track, userId }
  const maxLayer = params.has("maxLayer") ? Number(params.get("maxLayer")) : undefined;
  const liftAfter = params.has("liftAfterFrames") ? Number(params.get("liftAfterFrames")) : null;
  let lifted = false;
  const subscribing = new Set();
  async function consume(p) {
    if (subscribing.has(p.producerId) || remote.has(p.producerId)) return;
    subscribing.add(p.producerId);
    try {
      await stepsDone;
      const c = await client.subscribe(p.producerId, p.kind, { maxLayer });
      // A rejoined participant's new track replaces its old one of the same kind.
      for (const t of remoteStream.getTracks()) if (t.kind === p.kind) remoteStream.removeTrack(t);
      remoteStream.addTrack(c.track);
      remote.set(p.producerId, { consumerId: c.consumerId, kind: p.kind, track: c.track, userId: p.userId });
      setRemote("receiving", `Receiving ${p.userId}'s ${p.kind === "video" ? "camera" : "microphone"}.`);
      log("SUBSCRIBED", { consumerId: c.consumerId, producerId: p.producerId, kind: p.kind, mid: c.mid });
      playRemote();
    } catch (e) {
      log("ERROR", { code: e.code, message: e.message });
    } finally {
      subscribing.delete(p.producerId);
    }
  }
  const dropRemote = (producerId) => {
    const r = remote.get(producerId);
    if (!r) return;
    remote.delete(producerId);
    remoteStream.removeTrack(r.track);
    // A participant who moved to another node has its new camera in the stream already.
    if (r.kind === "video" && !remoteStream.getVideoTracks().length) setRemote("stopped", `${r.userId}'s camera stopped.`);
  };
  // Listen before anything is awaited so that no announcement is missed.
  client.addEventListener("produceradded", (e) => consume(e.detail));
  client.addEventListener("producerclosed", (e) => dropRemote(e.detail.producerId));
  client.addEventListener("consumerclosed", (e) => {
    for (const [id, r] of remote) if (r.consumerId === e.detail.consumerId) dropRemote(id);
  });
  client.addEventListener("producerpaused", (e) => {
    const r = remote.get(e.detail.producerId);
    if (r) setRemote("paused", `${r.userId} turned their ${r.kind === "video" ? "camera" : "microphone"} off.`);
  });
  client.addEventListener("producerresumed", (e) => {
    const r = remote.get(e.detail.producerId);
    if (r) setRemote("receiving", `Receiving ${r.userId}'s ${r.kind === "video" ? "camera" : "microphone"}.`);
  });
  for (const p of joined.producers) consume(p);

  // Sound: browsers may refuse to start audible playback without a click.
  const soundButton = $("sound");
  async function playRemote() {
    remoteVideo.muted = false;
    try {
      await remoteVideo.play();
      soundButton.hidden = true;
    } catch {
      remoteVideo.muted = true;
      soundButton.hidden = false;
      remoteVideo.play().catch(() => {});
    }
    log("AUDIO", { muted: remoteVideo.muted });
  }
  soundButton.addEventListener("click", playRemote);

  await stepsDone;
  const local = await navigator.mediaDevices.getUserMedia({
    video: { width: 1280, height: 720, frameRate: 30 },
    audio: true,
  });
  localVideo.srcObject = local;
  const published = await client.publish(local, {
    simulcast: params.get("simulcast") === "1",
    videoCodec: params.get("codec") || undefined,
  });
  log("PUBLISHED", published.map((p) => ({ producerId: p.producerId, kind: p.kind })));
  // Test hook: restart ICE after this many ms (a network change) and report the path taken
  // before and after: the selected candidate pair of the publish transport and its ICE ufrag.
  const restartAfter = Number(params.get("restartIceAfter") || 0);
  if (restartAfter > 0) {
    const path = async () => {
      const stats = await client.publishPc.getStats();
      let pair = null;
      stats.forEach((s) => {
        if (s.type === "transport" && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId) || null;
      });
      const ufrag = /a=ice-ufrag:(\S+)/.exec(client.publishPc.remoteDescription?.sdp || "")?.[1] || null;
      return { pairId: pair?.id || null, pairState: pair?.state || null, responses: pair?.responsesReceived || 0, ufrag };
    };
    setTimeout(async () => {
      const before = await path();
      try {
        await client.restartIce();
      } catch (e) {
        log("ICERESTART", { ok: false, code: e.code, message: e.message });
        return;
      }
      // Until the new credentials' checks have been answered on a new pair.
      let after = await path();
      for (let i = 0; i < 40 && (after.pairId === before.pairId || after.pairState !== "succeeded" || !after.responses); i++) {
        await new Promise((r) => setTimeout(r, 250));
        after = await path();
      }
      log("ICERESTART", { ok: true, before, after });
    }, restartAfter);
  }

  // Controls: mute, camera, leave. Muting pauses the producer on the node too, so the other
  // side is told rather than left guessing.
  const toggle = (buttonId, kind, onText, offText) => {
    const button = $(buttonId);
    const p = published.find((x) => x.kind === kind);
    if (!p) {
      button.disabled = true;
      return;
    }
    button.addEventListener("click", async () => {
      const off = p.track.enabled;
      p.track.enabled = !off;
      button.textContent = off ? offText : onText;
      button.setAttribute("aria-pressed", String(off));
      try {
        await (off ? client.pauseProducer(p.producerId) : client.resumeProducer(p.producerId));
      } catch (e) {
        log("ERROR", { code: e.code, message: e.message });
      }
    });
  };
  toggle("mic", "audio", "Mute", "Unmute");
  toggle("cam", "video", "Stop camera", "Start camera");
  $("leave").addEventListener("click", () => {
    left = true;
    client.close();
    for (const t of local.getTracks()) t.stop();
    setState("you left the call", "bad");
    log("LEFT", {});
  });

  // Once a second: statistics a person can read, stall detection, the lift used by tests.
  let previous = {};
  let lastFrames = 0;
  let stalledFor = 0;
  logLayout();
  window.addEventListener("resize", logLayout);
  setInterval(async () => {
    if (left) return;
    const stats = await client.consumerStats();
    const rtt = await roundTripTime(client.subscribePc);
    statsBody.replaceChildren();
    let frames = 0;
    for (const [id, s] of Object.entries(stats)) {
      const before = previous[id] || { bytesReceived: 0, framesDecoded: 0, at: Date.now() - 1000 };
      const seconds = Math.max((Date.now() - before.at) / 1000, 0.001);
      s.kbps = Math.round(((s.bytesReceived - before.bytesReceived) * 8) / seconds / 1000);
      s.fps = Math.round((s.framesDecoded - before.framesDecoded) / seconds);
      s.at = Date.now();
      const row = document.createElement("tr");
      const cells =
        s.kind === "video"
          ? [s.kind, `${s.frameWidth}×${s.frameHeight}`, String(s.fps), `${s.kbps} kbit/s`, String(s.packetsLost), rtt]
          : [s.kind, "", "", `${s.kbps} kbit/s`, String(s.packetsLost), rtt];
      for (const text of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        row.appendChild(td);
      }
      statsBody.appendChild(row);
      if (s.kind === "video") frames = Math.max(frames, s.framesDecoded);
      if (s.kind === "audio") levelEl.style.width = `${Math.round(Math.min(1, (s.audioLevel || 0) * 3) * 100)}%`;
      if (liftAfter !== null && !lifted && s.kind === "video" && s.framesDecoded >= liftAfter) {
        lifted = true;
        await client.setConsumerLayer(id, 2);
        log("LIFTED", { consumerId: id });
      }
    }
    previous = stats;
    // Video that stops arriving while the other side is still said to be here.
    const hasVideo = [...remote.values()].some((r) => r.kind === "video");
    stalledFor = hasVideo && frames === lastFrames ? stalledFor + 1 : 0;
    lastFrames = frames;
    if (stalledFor >= 2 && remoteState === "receiving") setRemote("stalled", `No video from the ${other} for ${stalledFor} s.`);
    else if (stalledFor === 0 && hasVideo && remoteState === "stalled") setRemote("receiving", `Receiving the ${other}'s camera.`);
    log("STATS", {
      role,
      consumers: stats,
      publisher: await client.publisherStats(),
      // The local candidate type of each transport's selected pair (host, srflx, relay).
      paths: { publish: await candidateType(client.publishPc), subscribe: await candidateType(client.subscribePc) },
      remoteMuted: remoteVideo.muted,
    });
  }, 1000);
}

/**
 * The agent's verification console (recorded sessions only): checklist, evidence snapshot and
 * outcome, each written to the session's audit log by the node. `#verifyAfterFrames=N` runs
 * all three once the customer's video has decoded N frames (the browser test uses it).
 */
function verificationConsole(client, video) {
  $("verify").hidden = false;
  const mark = async (step, checked) => {
    try {
      await client.markChecklist(step, checked);
      log("CHECKLIST", { step, checked });
    } catch (e) {
      log("ERROR", { code: e.code, message: e.message });
    }
  };
  for (const box of document.querySelectorAll("#checklist input")) {
    box.addEventListener("change", () => mark(box.value, box.checked));
  }
  const snap = async () => {
    try {
      const stored = await client.snapshot(video);
      $("snapshot-note").textContent = `Saved ${stored.file}`;
      log("SNAPSHOT", stored);
    } catch (e) {
      $("snapshot-note").textContent = `Not saved: ${e.message}`;
      log("ERROR", { code: e.code, message: e.message });
    }
  };
  $("snapshot").addEventListener("click", snap);
  // Questions from the profile's pool, drawn by the node (which records each one asked).
  const profile = client.joined.profile;
  $("questions").hidden = !(profile && profile.questions);
  const ask = async () => {
    try {
      const q = await client.drawQuestion();
      const item = document.createElement("li");
      item.textContent = q.question;
      $("asked").append(item);
      $("question-note").textContent = `${q.remaining} left`;
      if (!q.remaining) $("ask").disabled = true;
      log("QUESTION", { question: q.question, remaining: q.remaining });
    } catch (e) {
      $("question-note").textContent = e.message;
      log("ERROR", { code: e.code, message: e.message });
    }
  };
  $("ask").addEventListener("click", ask);
  const decide = async (outcome) => {
    try {
      await client.recordOutcome(outcome, $("outcome-note").value);
      $("outcome-state").textContent = `Recorded: ${outcome}`;
      log("OUTCOME", { outcome });
    } catch (e) {
      log("ERROR", { code: e.code, message: e.message });
    }
  };
  for (const b of document.querySelectorAll("button.outcome")) b.addEventListener("click", () => decide(b.value));

  const after = params.has("verifyAfterFrames") ? Number(params.get("verifyAfterFrames")) : null;
  if (after === null) return;
  const timer = setInterval(async () => {
    const stats = await client.consumerStats();
    if (!Object.values(stats).some((s) => s.kind === "video" && s.framesDecoded >= after)) return;
    clearInterval(timer);
    if (profile && profile.questions) {
      await ask();
      await ask();
    }
    const box = document.querySelector("#checklist input");
    box.checked = true;
    await mark(box.value, true);
    await snap();
    $("outcome-note").value = "document and face match";
    await decide("approved");
  }, 500);
}

/**
 * The customer's steps under a compliance profile: the consent text shown with an "I agree"
 * button (nothing starts until it is clicked), then the browser's location. Resolves once the
 * node has recorded both.
 */
async function profileSteps(client, profile) {
  if (!profile.consent && !profile.location) return;
  const panel = $("consent");
  $("consent-text").textContent = profile.consent || "";
  $("consent-location").hidden = !profile.location;
  panel.hidden = false;
  setState("waiting for your consent");
  log("CONSENT_ASKED", { profile: profile.name });
  for (;;) {
    await new Promise((resolve) => $("consent-agree").addEventListener("click", resolve, { once: true }));
    $("consent-agree").disabled = true;
    try {
      if (profile.consent) await client.giveConsent(profile.consent);
      if (profile.location) {
        const position = await new Promise((resolve, reject) =>
          navigator.geolocation.getCurrentPosition(resolve, reject, { enableHighAccuracy: true, timeout: 20000, maximumAge: 0 }),
        );
        await client.shareLocation(position);
        log("LOCATION", { latitude: position.coords.latitude, longitude: position.coords.longitude });
      }
      panel.hidden = true;
      log("CONSENTED", { profile: profile.name });
      return;
    } catch (e) {
      // A refused location (GeolocationPositionError) or a refused step: say why, let them retry.
      $("consent-note").textContent = `Not yet: ${e.message}`;
      $("consent-agree").disabled = false;
      log("ERROR", { code: e.code, message: e.message });
    }
  }
}

/** The selected candidate pair's round-trip time, as text. */
async function roundTripTime(pc) {
  if (!pc) return "";
  const report = await pc.getStats();
  let rtt = null;
  report.forEach((s) => {
    if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) rtt = s.currentRoundTripTime;
  });
  return rtt === null ? "" : `${Math.round(rtt * 1000)} ms`;
}

main().catch((e) => {
  setState("error", "bad");
  log("ERROR", { code: "page", message: String(e) });
});

/** The type of the local candidate of `pc`'s selected pair, or null. */
async function candidateType(pc) {
  if (!pc) return null;
  const report = await pc.getStats();
  let type = null;
  report.forEach((s) => {
    if (s.type !== "transport" || !s.selectedCandidatePairId) return;
    const pair = report.get(s.selectedCandidatePairId);
    const local = pair && report.get(pair.localCandidateId);
    if (local) type = local.candidateType;
  });
  return type;
}
