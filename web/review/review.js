// The review page: a recorded session's files side by side, played in step, beside its audit
// timeline and the verification of its seal. The token (agent or auditor of the session)
// comes in the URL fragment (#token=...&run=N), so it never reaches server logs; files play
// through short-lived links the API signs.
//
// Like the demo pages, it prints what a person sees as `MERIDIAN_<KIND> <json>` console
// lines for tests: REVIEW once loaded, PLAYBACK every second, ERROR on failure.

const params = new URLSearchParams(location.hash.slice(1));
const token = params.get("token");
const $ = (id) => document.getElementById(id);
const report = (kind, data) => console.log(`MERIDIAN_${kind} ${JSON.stringify(data)}`);

function sessionOf(jwt) {
  // The session is the token's `sid` (the server checks the signature; this only reads it).
  const part = (jwt || "").split(".")[1] || "";
  const json = atob(part.replace(/-/g, "+").replace(/_/g, "/"));
  return JSON.parse(json).sid;
}

function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function text(el, value) {
  el.textContent = value;
  return el;
}

function cell(row, value) {
  row.appendChild(text(document.createElement("td"), value));
}

async function load() {
  const session = sessionOf(token);
  const res = await fetch(`/v1/review/${encodeURIComponent(session)}`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  const body = await res.json();
  if (!res.ok) throw new Error(`${body.code}: ${body.message}`);
  const runs = body.runs;
  const run = runs[Math.min(Number(params.get("run") || runs.length - 1), runs.length - 1)];
  text($("title"), `Session ${body.session} — run ${run.run}`);
  if (runs.length > 1) text($("run-note"), `${runs.length} runs of this session; showing the last.`);
  const seal = $("seal");
  if (!run.sealed) {
    text(seal, "Not sealed yet (the session is still going on, or the node stopped in the middle of it).");
  } else if (run.verified) {
    text(seal, `✔ Sealed (${run.status}) and verified against this node's key: every file and audit entry is as sealed.`);
    seal.className = "note ok";
  } else {
    text(seal, `✘ Verification failed: ${run.faults.join("; ")}`);
    seal.className = "note bad";
  }

  // The session clock: milliseconds since the folder was created (the first entry); every
  // file is on it, so one time seeks all of them.
  const zero = run.entries.length ? Date.parse(run.entries[0].at) : 0;
  const videos = [];
  for (const f of run.files) {
    const tile = document.createElement("section");
    tile.className = "tile";
    const name = f.file.replace(/^media\//, "").replace(/\.(webm|mkv)$/, "");
    tile.appendChild(text(document.createElement("h2"), name));
    const v = document.createElement("video");
    v.src = f.url;
    v.muted = true; // autoplay policy; the person unmutes with the controls
    v.controls = true;
    v.playsInline = true;
    v.preload = "auto";
    tile.appendChild(v);
    $("players").appendChild(tile);
    videos.push(v);
  }

  const rows = $("timeline").querySelector("tbody");
  for (const e of run.entries) {
    const row = document.createElement("tr");
    const at = (Date.parse(e.at) - zero) / 1000;
    cell(row, clock(at));
    cell(row, e.event);
    cell(row, [e.role, e.user].filter(Boolean).join(" "));
    const { seq, at: _at, event, prev, user, role, participant, ...rest } = e;
    cell(row, Object.entries(rest).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", "));
    row.addEventListener("click", () => seek(at));
    rows.appendChild(row);
  }

  const lead = () => videos.find((v) => !v.ended) || videos[0];
  function seek(t) {
    for (const v of videos) v.currentTime = t;
  }
  async function play() {
    const t = lead() ? lead().currentTime : 0;
    for (const v of videos) {
      v.currentTime = t;
      await v.play().catch(() => {});
    }
    text($("play"), "Pause");
  }
  function pause() {
    for (const v of videos) v.pause();
    text($("play"), "Play");
  }
  $("play").addEventListener("click", () => (videos.some((v) => !v.paused) ? pause() : play()));
  $("back").addEventListener("click", () => seek(Math.max(0, (lead() ? lead().currentTime : 0) - 10)));

  // Keep the players in step: a player drifting from the lead is moved back to it.
  setInterval(() => {
    const l = lead();
    if (!l) return;
    text($("clock"), clock(l.currentTime));
    for (const v of videos) {
      if (v !== l && !v.paused && Math.abs(v.currentTime - l.currentTime) > 0.3) v.currentTime = l.currentTime;
    }
    report("PLAYBACK", {
      times: videos.map((v) => Math.round(v.currentTime * 1000) / 1000),
      paused: videos.map((v) => v.paused),
      errors: videos.map((v) => (v.error ? v.error.code : 0)),
    });
  }, 1000);

  text($("state"), "ready");
  report("REVIEW", { runs: runs.length, run: run.run, verified: run.verified, files: run.files.map((f) => f.file), entries: run.entries.length });
  if (params.get("autoplay") === "1") await play();
}

load().catch((e) => {
  text($("state"), "error");
  text($("seal"), String(e.message || e));
  report("ERROR", { message: String(e.message || e) });
});
