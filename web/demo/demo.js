// Demo page logic shared by the user and agent pages. Options come from the URL fragment, so
// tokens never reach server logs: #token=...&simulcast=1&maxLayer=0&liftAfterFrames=90
import { MeridianClient } from "/sdk/meridian.js";

const params = new URLSearchParams(location.hash.slice(1));
const role = document.body.dataset.role;
const stateEl = document.getElementById("state");
const statsBody = document.querySelector("#stats tbody");
const remoteVideo = document.getElementById("remote");
const remoteNote = document.getElementById("remote-note");

function setState(text, cls) {
  stateEl.textContent = text;
  stateEl.className = "state " + (cls || "");
}

function log(kind, data) {
  // One machine-readable line per report: tests read these from the browser console.
  console.log(`MERIDIAN_${kind} ${JSON.stringify(data)}`);
}

async function main() {
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
  });
  client.addEventListener("edge", (e) =>
    log("EDGE", { node: e.detail.joined.node, region: e.detail.joined.region, reason: e.detail.reason }),
  );
  client.addEventListener("connectionstate", (e) => {
    log("STATE", e.detail);
    if (e.detail.state === "connected") setState("connected", "ok");
    else if (e.detail.state === "failed") setState("media failed", "bad");
  });
  client.addEventListener("sessionexpired", () => setState("session expired", "bad"));
  client.addEventListener("closed", (e) => log("CLOSED", e.detail));

  let joined;
  try {
    joined = await client.connect();
  } catch (e) {
    setState(`refused: ${e.code}`, "bad");
    log("ERROR", { code: e.code, message: e.message });
    return;
  }
  setState(`joined as ${joined.role}`);
  log("JOINED", { participantId: joined.participantId, role: joined.role });

  const remoteStream = new MediaStream();
  remoteVideo.srcObject = remoteStream;
  const maxLayer = params.has("maxLayer") ? Number(params.get("maxLayer")) : undefined;
  const liftAfter = params.has("liftAfterFrames") ? Number(params.get("liftAfterFrames")) : null;
  let lifted = false;
  const subscribed = new Set();
  async function consume(p) {
    if (subscribed.has(p.producerId)) return;
    subscribed.add(p.producerId);
    try {
      const c = await client.subscribe(p.producerId, p.kind, { maxLayer });
      remoteStream.addTrack(c.track);
      remoteNote.textContent = `Receiving ${p.kind} from ${p.userId}`;
      log("SUBSCRIBED", { consumerId: c.consumerId, producerId: p.producerId, kind: p.kind });
    } catch (e) {
      subscribed.delete(p.producerId);
      log("ERROR", { code: e.code, message: e.message });
    }
  }
  // Listen before anything is awaited so that no announcement is missed.
  client.addEventListener("produceradded", (e) => consume(e.detail));
  for (const p of joined.producers) consume(p);

  const local = await navigator.mediaDevices.getUserMedia({
    video: { width: 1280, height: 720, frameRate: 30 },
    audio: true,
  });
  document.getElementById("local").srcObject = local;
  const published = await client.publish(local, { simulcast: params.get("simulcast") === "1" });
  log("PUBLISHED", published.map((p) => ({ producerId: p.producerId, kind: p.kind })));


  setInterval(async () => {
    const stats = await client.consumerStats();
    statsBody.innerHTML = "";
    for (const [id, s] of Object.entries(stats)) {
      const row = document.createElement("tr");
      row.innerHTML = `<td>${s.kind}</td><td>${s.framesDecoded} frames</td><td>${s.frameWidth}×${s.frameHeight}</td><td>${Math.round(s.bytesReceived / 1024)} KiB</td><td>${s.packetsLost} lost</td>`;
      statsBody.appendChild(row);
      if (liftAfter !== null && !lifted && s.kind === "video" && s.framesDecoded >= liftAfter) {
        lifted = true;
        await client.setConsumerLayer(id, 2);
        log("LIFTED", { consumerId: id });
      }
    }
    log("STATS", { role, consumers: stats, publisher: await client.publisherStats() });
  }, 1000);
}

main().catch((e) => {
  setState("error", "bad");
  log("ERROR", { code: "page", message: String(e) });
});
