// Meridian browser SDK: a plain ES module wrapping signaling protocol v1 (docs/signaling.md).
//
//   import { MeridianClient } from "/sdk/meridian.js";
//   const client = new MeridianClient({ url: "wss://edge.example/v1/ws", token });
//   const show = async (p) => {
//     const { track } = await client.subscribe(p.producerId, p.kind);
//   };
//   client.addEventListener("produceradded", (e) => show(e.detail));
//   const joined = await client.connect();
//   joined.producers.forEach(show); // those already there when we joined
//   await client.publish(stream, { simulcast: true }); // or { videoCodec: "H264" }
//
// Events (CustomEvent, data in `detail`): produceradded / producerclosed / producerpaused /
// producerresumed, participantjoined / participantleft (detail: the participant; the current
// set is `client.participants`), consumerclosed, consumerlayerchanged, transportstate,
// connectionstate (the browser's view of a peer connection), sessionexpired, error, closed.
//
// Nearest edge: pass `route` (the base URL of any node, or `true` for the page's own origin)
// instead of `url`, and connect() first asks that node's `GET /v1/edge` where to go, then joins
// the chosen edge, trying the alternates in order if it cannot be reached:
//
//   const client = new MeridianClient({ route: "https://any-node.example", token });
//   await client.connect();            // client.edge says which node was chosen, and why
//
// Two peer connections per client, as in LiveKit: one to publish (the client offers its
// tracks), one to receive (the client offers a recvonly m-line per subscription). The node is
// ICE-lite and always answers, so no candidates need to be sent to it.

export const PROTOCOL_VERSION = 1;

/** Default simulcast encodings, lowest first (the node orders layers as listed here). */
export const SIMULCAST_ENCODINGS = [
  { rid: "l", scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: "m", scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: "h", scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];

export class MeridianError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export class MeridianClient extends EventTarget {
  constructor({ url, route, regionHint, token, iceServers = [], iceTransportPolicy = "all" }) {
    super();
    this.url = url || defaultUrl();
    this.route = route === true ? location.origin : route || null;
    this.regionHint = regionHint || null;
    this.edge = null; // the /v1/edge answer when routing was used
    this.token = token;
    this.iceServers = iceServers;
    // "relay": media only through TURN (the node's region's servers, from `joined`).
    this.iceTransportPolicy = iceTransportPolicy;
    this.nodeIceServers = [];
    this.ws = null;
    this.nextRequestId = 1;
    this.pending = new Map();
    this.publishPc = null;
    this.subscribePc = null;
    this.queue = { publish: Promise.resolve(), subscribe: Promise.resolve() };
    this.producers = new Map(); // remote producers known to this client, by id
    this.participants = new Map(); // others in the session this client may see, by id
    this.consumers = new Map(); // consumerId -> { producerId, track, transceiver }
    this.published = new Map(); // producerId -> { track, transceiver }
    this.joined = null;
    this.closed = false;
  }

  /**
   * Opens the signaling connection and joins the token's session: on the edge chosen by
   * `/v1/edge` when `route` was given (alternates tried in order), else on `url`.
   */
  async connect() {
    if (!this.route) return this._join(this.url);
    let answer = null;
    try {
      const res = await fetch(this._edgeUrl(), { cache: "no-store" });
      const body = await res.json();
      if (!res.ok) throw new MeridianError(body.error?.code || "routing", body.error?.message || `HTTP ${res.status}`);
      answer = body;
    } catch (e) {
      if (e instanceof MeridianError && e.code === "noEdge") throw e;
      // Routing unavailable: join where we were pointed.
      this._emit("routingfailed", { message: String(e.message || e) });
      return this._join(this.url);
    }
    this.edge = answer;
    const candidates = [answer.edge, ...answer.alternates];
    let lastError = null;
    for (const candidate of candidates) {
      try {
        const joined = await this._join(candidate.url);
        this.edge = { ...answer, joined: candidate };
        this._emit("edge", this.edge);
        return joined;
      } catch (e) {
        lastError = e;
        // Only an unreachable node moves us on; a refusal (bad token, full session) is final.
        if (e.code !== "unreachable") throw e;
      }
    }
    throw lastError;
  }

  _join(url, resumeKey = null) {
    this.url = url;
    this.closed = false;
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      let opened = false;
      this.ws = ws;
      let joined = false;
      // A host that is down may not refuse: give up on it after a while (unreachable).
      const connectTimer = setTimeout(() => {
        if (!opened) ws.close();
      }, this.connectTimeoutMs || 5000);
      ws.onopen = () => {
        clearTimeout(connectTimer);
        opened = true;
        const join = { type: "join", version: PROTOCOL_VERSION, token: this.token };
        if (resumeKey) join.resume = resumeKey;
        ws.send(JSON.stringify(join));
      };
      ws.onmessage = (ev) => {
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch {
          return;
        }
        if (msg.type === "resumed") {
          // Back in our place: producers, consumers and transports were kept; the events
          // of the gap follow.
          joined = true;
          this.resumeKey = msg.resumeKey;
          if (msg.iceServers) this._setNodeIceServers(msg.iceServers);
          this._startStatsReports();
          resolve(msg);
          return;
        }
        if (msg.type === "joined") {
          joined = true;
          this.joined = msg;
          this.resumeKey = msg.resumeKey || null;
          this.resumeWithinSecs = msg.resumeWithinSecs || 0;
          this._setNodeIceServers(msg.iceServers || []);
          this._startStatsReports();
          for (const p of msg.producers) this.producers.set(p.producerId, p);
          for (const p of msg.participants) this.participants.set(p.participantId, p);
          resolve(msg);
          return;
        }
        if (!joined && msg.type === "error") {
          this.refusal = msg;
          reject(new MeridianError(msg.code, msg.message));
          return;
        }
        this._onMessage(msg);
      };
      ws.onclose = (ev) => {
        if (this.ws !== ws) return; // an older connection, already replaced
        this._stopStatsReports();
        for (const { reject: rej } of this.pending.values()) {
          rej(new MeridianError("closed", `signaling closed (${ev.code})`));
        }
        this.pending.clear();
        if (!joined && !opened) {
          this.closed = true;
          // Never connected: the caller tries the next edge; this connection was never "up".
          reject(new MeridianError("unreachable", `cannot reach ${url}`));
          return;
        }
        if (!joined) {
          this.closed = true;
          reject(new MeridianError(this.refusal?.code || "closed", this.refusal?.message || `signaling closed (${ev.code} ${ev.reason})`));
          // A failed attempt to resume is reported once, by _resume.
          if (!resumeKey) this._emit("closed", { code: ev.code, reason: ev.reason });
          return;
        }
        // Lost without a close from either side (1006): the node keeps our place for
        // resumeWithinSecs while media goes on; come back to it.
        if (ev.code === 1006 && !this.leaving && (this.resumeKey || this.route)) {
          this._resume(url);
          return;
        }
        this.closed = true;
        this._emit("closed", { code: ev.code, reason: ev.reason });
      };
      ws.onerror = () => {};
    });
  }

  /**
   * Reconnects after a lost signaling connection: `reconnecting`, then `reconnected` when the
   * node took us back (nothing to redo: the other side saw no leave), or `disconnected` and
   * `closed` when the place was given up or the node stayed unreachable.
   */
  async _resume(url) {
    this._emit("reconnecting", { url });
    // The node keeps no places: join again through routing (the same node if it is alive).
    if (!this.resumeKey) {
      if (await this._failover(null)) return;
      return this._giveUp(null);
    }
    const deadline = performance.now() + (this.resumeWithinSecs || 0) * 1000;
    let delay = 200;
    let last = null;
    let unreachable = 0;
    while (performance.now() < deadline && !this.leaving) {
      await new Promise((r) => setTimeout(r, delay));
      try {
        this.refusal = null;
        await this._join(url, this.resumeKey);
        this._emit("reconnected", { url });
        return;
      } catch (e) {
        last = e;
        // The node is gone: with routing, move to the next nearest edge.
        if (e.code === "unreachable" && ++unreachable >= 2 && this.route) {
          if (await this._failover(url)) return;
          break;
        }
        // Refused (the place expired, the token no longer valid): trying again cannot help.
        if (e.code !== "unreachable" && e.code !== "closed") break;
      }
      delay = Math.min(delay * 2, 2000);
    }
    this._giveUp(last);
  }

  _giveUp(last) {
    this.closed = true;
    this._emit("disconnected", { code: last?.code || "timeout", message: last?.message || "the node did not take us back in time" });
    this._emit("closed", { code: 1006, reason: "connection lost" });
  }

  /**
   * The node is being drained: move, make-before-break. Join the session on the edge the node
   * named (or its alternates), publish the same tracks there, then let go of the old node's
   * consumers and subscribe on the new one, and only then leave the old node. The other side
   * sees our new producers before the old ones close: at most a short freeze. Emits
   * `migrating`, `edge`, `migrated`.
   */
  async _migrate(msg) {
    if (this._moving || this.leaving) return;
    this._moving = true;
    try {
      this._emit("migrating", { to: msg.edge, deadlineSecs: msg.deadlineSecs });
      const old = {
        ws: this.ws,
        publishPc: this.publishPc,
        subscribePc: this.subscribePc,
        published: [...this.published.values()],
        consumers: [...this.consumers.keys()],
        pending: this.pending,
      };
      // The old connection stays up (its media flows) but no longer speaks for us.
      old.ws.onmessage = null;
      old.ws.onclose = null;
      this.pending = new Map();
      this.publishPc = this.subscribePc = null;
      this.queue = { publish: Promise.resolve(), subscribe: Promise.resolve() };
      this.published = new Map();
      this.producers.clear();
      this.participants.clear();
      let joined = null;
      for (const candidate of [msg.edge, ...msg.alternates]) {
        try {
          joined = await this._join(candidate.url);
          this.edge = { ...(this.edge || {}), joined: candidate, reason: "migrated" };
          this._emit("edge", this.edge);
          break;
        } catch (e) {
          if (e.code !== "unreachable") throw e;
        }
      }
      if (!joined) throw new MeridianError("migration_failed", "no edge to move to took us");
      // Make: our media on the new node first.
      for (const { track, options } of old.published) {
        if (track.readyState === "live") await this.publish([track], options);
      }
      // Then what we receive: the old consumers end, the new node's producers are offered.
      for (const consumerId of old.consumers) {
        this._dropConsumer(consumerId);
        this._emit("consumerclosed", { consumerId, reason: "migrated" });
      }
      for (const p of joined.producers) this._emit("produceradded", p);
      // Break: leave the old node.
      for (const { reject } of old.pending.values()) reject(new MeridianError("closed", "moved to another node"));
      try {
        old.ws.send(JSON.stringify({ type: "leave" }));
        old.ws.close(1000);
      } catch {
        // Already gone.
      }
      for (const pc of [old.publishPc, old.subscribePc]) if (pc) pc.close();
      this._emit("migrated", { node: joined.node, region: joined.region });
    } finally {
      this._moving = false;
    }
  }

  /**
   * The node we were on is gone (its own state with it): join the session again on the next
   * nearest edge that answers, publish the same tracks again and let the application
   * subscribe again (`consumerclosed` for the old consumers, `produceradded` for what the new
   * node offers). Emits `failover`, then `edge` and `reconnected` ({ failover: true }).
   * Returns false when no edge took us.
   */
  async _failover(deadUrl) {
    this._emit("failover", { from: deadUrl });
    const published = [...this.published.values()];
    for (const pc of [this.publishPc, this.subscribePc]) if (pc) pc.close();
    this.publishPc = this.subscribePc = null;
    this.queue = { publish: Promise.resolve(), subscribe: Promise.resolve() };
    this.published.clear();
    for (const consumerId of [...this.consumers.keys()]) {
      this._dropConsumer(consumerId);
      this._emit("consumerclosed", { consumerId, reason: "failover" });
    }
    for (const p of this.participants.values()) this._emit("participantleft", p);
    this.producers.clear();
    this.participants.clear();
    this.resumeKey = null;

    let joined = null;
    for (const candidate of await this._edgeCandidates(deadUrl)) {
      try {
        joined = await this._join(candidate.url);
        this.edge = { ...(this.edge || {}), joined: candidate, reason: "failover" };
        this._emit("edge", this.edge);
        break;
      } catch (e) {
        if (e.code !== "unreachable") return false;
      }
    }
    if (!joined) return false;
    for (const p of joined.participants) this._emit("participantjoined", p);
    const republished = [];
    for (const { track, options } of published) {
      if (track.readyState !== "live") continue;
      republished.push(...(await this.publish([track], options)));
    }
    this._emit("reconnected", { url: this.url, failover: true, republished });
    for (const p of joined.producers) this._emit("produceradded", p);
    return true;
  }

  /**
   * The routing node's `/v1/edge`, with the region hint and the session (read from the token;
   * the node verifies it later) so that routing prefers a node of that region already
   * hosting the call.
   */
  _edgeUrl() {
    const q = new URLSearchParams();
    if (this.regionHint) q.set("region", this.regionHint);
    const sid = sessionOfToken(this.token);
    if (sid) q.set("session", sid);
    const query = q.toString() ? `?${q}` : "";
    return `${this.route.replace(/\/$/, "")}/v1/edge${query}`;
  }

  /** Where to go when our node is gone: routing's answer now, then its earlier alternates. */
  async _edgeCandidates(deadUrl) {
    const out = [];
    const add = (c) => {
      if (c && c.url && c.url !== deadUrl && !out.some((o) => o.url === c.url)) out.push(c);
    };
    try {
      const res = await fetch(this._edgeUrl(), { cache: "no-store" });
      if (res.ok) {
        const answer = await res.json();
        for (const c of [answer.edge, ...answer.alternates]) add(c);
      }
    } catch {
      // The routing node may be the one that died: the earlier alternates remain.
    }
    for (const c of this.edge?.alternates || []) add(c);
    return out;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _onMessage(msg) {
    if (msg.requestId !== undefined && this.pending.has(msg.requestId)) {
      const { resolve, reject } = this.pending.get(msg.requestId);
      this.pending.delete(msg.requestId);
      if (msg.type === "error") reject(new MeridianError(msg.code, msg.message));
      else resolve(msg);
      return;
    }
    switch (msg.type) {
      case "migrate":
        this._migrate(msg).catch((e) => this._emit("error", { code: e.code || "migration_failed", message: String(e.message || e) }));
        break;
      case "migrateCancelled":
        this._emit("migratecancelled", {});
        break;
      case "producerAdded":
        this.producers.set(msg.producer.producerId, msg.producer);
        this._emit("produceradded", msg.producer);
        break;
      case "producerClosed":
        this.producers.delete(msg.producerId);
        this._emit("producerclosed", msg);
        break;
      case "consumerClosed": {
        this._dropConsumer(msg.consumerId);
        this._emit("consumerclosed", msg);
        break;
      }
      case "participantJoined":
        this.participants.set(msg.participant.participantId, msg.participant);
        this._emit("participantjoined", msg.participant);
        break;
      case "participantLeft":
        this.participants.delete(msg.participant.participantId);
        this._emit("participantleft", msg.participant);
        break;
      case "sessionExpired":
        this._emit("sessionexpired", msg);
        break;
      case "error":
        this._emit("error", msg);
        break;
      default:
        // producerPaused, producerResumed, consumerLayerChanged, transportState: forwarded
        // as lower-case events with the message as detail.
        this._emit(msg.type.toLowerCase(), msg);
    }
  }

  /**
   * One request and its answer. Fails with MeridianError: the node's error code, `closed`
   * when the connection ends first, `timeout` after `requestTimeoutMs` (default 15 s).
   */
  _request(body) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new MeridianError("closed", "not connected"));
    }
    const requestId = this.nextRequestId++;
    const pending = this.pending;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        if (pending.delete(requestId)) {
          reject(new MeridianError("timeout", `no answer to ${body.type} within ${(this.requestTimeoutMs || 15000) / 1000} s`));
        }
      }, this.requestTimeoutMs || 15000);
      pending.set(requestId, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      this.ws.send(JSON.stringify({ ...body, requestId }));
    });
  }

  /** The page's ICE servers and the node's TURN servers with this participant's credentials. */
  _rtcConfiguration() {
    return {
      iceServers: [...this.iceServers, ...this.nodeIceServers],
      iceTransportPolicy: this.iceTransportPolicy,
      bundlePolicy: "max-bundle",
    };
  }

  /** New TURN credentials (a join, a resume): open transports use them from their next ICE
   * restart on. */
  _setNodeIceServers(servers) {
    this.nodeIceServers = servers;
    for (const pc of [this.publishPc, this.subscribePc]) {
      if (pc && pc.signalingState !== "closed") {
        try {
          pc.setConfiguration(this._rtcConfiguration());
        } catch (_) {
          // A browser that refuses a changed configuration keeps the old credentials.
        }
      }
    }
  }

  _pc(kind) {
    const key = kind === "publish" ? "publishPc" : "subscribePc";
    if (!this[key]) {
      const pc = new RTCPeerConnection(this._rtcConfiguration());
      pc.addEventListener("connectionstatechange", () =>
        this._emit("connectionstate", { transport: kind, state: pc.connectionState }),
      );
      // A path that failed (a network change, a NAT that forgot us): new credentials, new
      // checks, same producers and consumers.
      pc.addEventListener("iceconnectionstatechange", () => {
        if (pc.iceConnectionState === "failed" && !this.closed && this[key] === pc) {
          this._restartIce(kind, pc).catch((e) => this._emit("error", { code: e.code || "ice_restart_failed", message: String(e.message || e) }));
        }
      });
      this[key] = pc;
    }
    return this[key];
  }

  /**
   * Restarts ICE on both transports: new credentials and candidate pairs, the same producers
   * and consumers (the other side sees nothing). For a network change the application knows
   * of; done by itself when a transport's ICE fails.
   */
  async restartIce() {
    if (this.publishPc) await this._restartIce("publish", this.publishPc);
    if (this.subscribePc) await this._restartIce("subscribe", this.subscribePc);
  }

  _restartIce(kind, pc) {
    return this._serial(kind, async () => {
      await pc.setLocalDescription(await pc.createOffer({ iceRestart: true }));
      const reply = await this._request({ type: "restartIce", transport: kind, sdp: pc.localDescription.sdp });
      await pc.setRemoteDescription({ type: "answer", sdp: reply.sdp });
      this._emit("icerestarted", { transport: kind });
    });
  }

  /** Runs negotiations of one peer connection one after another. */
  _serial(kind, fn) {
    const run = this.queue[kind].then(fn, fn);
    this.queue[kind] = run.catch(() => {});
    return run;
  }

  /**
   * Publishes every track of a MediaStream (or an array of tracks).
   * Options: simulcast (true for SIMULCAST_ENCODINGS, or an encodings array) for video.
   * Resolves to [{ producerId, kind, track }].
   */
  publish(streamOrTracks, { simulcast = false, videoCodec } = {}) {
    const tracks = Array.isArray(streamOrTracks) ? streamOrTracks : streamOrTracks.getTracks();
    return this._serial("publish", async () => {
      const pc = this._pc("publish");
      const added = tracks.map((track) => {
        // A verification call is about detail (faces, documents): under CPU or bandwidth
        // pressure the browser should drop frame rate, not resolution.
        if (track.kind === "video" && "contentHint" in track && !track.contentHint) track.contentHint = "detail";
        const init = { direction: "sendonly" };
        if (track.kind === "video" && simulcast) {
          init.sendEncodings = Array.isArray(simulcast) ? simulcast : SIMULCAST_ENCODINGS;
        }
        const transceiver = pc.addTransceiver(track, init);
        if (track.kind === "video" && videoCodec) preferCodec(transceiver, videoCodec);
        return { track, transceiver };
      });
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      let reply;
      try {
        reply = await this._request({ type: "publish", sdp: pc.localDescription.sdp });
      } catch (e) {
        // Refused: take the new m-lines back so the next offer stays in step with the node.
        await pc.setLocalDescription({ type: "rollback" }).catch(() => {});
        for (const { transceiver } of added) stopTransceiver(transceiver);
        throw e;
      }
      await pc.setRemoteDescription({ type: "answer", sdp: reply.sdp });
      const out = [];
      for (const { track, transceiver } of added) {
        if (track.kind === "video") await preferResolution(transceiver.sender);
        const p = reply.producers.find((x) => x.mid === transceiver.mid);
        if (!p) throw new MeridianError("bad_sdp", `no producer for mid ${transceiver.mid}`);
        this.published.set(p.producerId, { track, transceiver, options: { simulcast, videoCodec } });
        out.push(this._producerHandle(p.producerId, track));
      }
      return out;
    });
  }

  /**
   * Receives a remote producer. `kind` is "audio" or "video" (known from producerAdded).
   * Options: maxLayer (simulcast layer cap, 0 = lowest).
   * Resolves to { consumerId, producerId, track, stream }.
   */
  subscribe(producerId, kind, { maxLayer } = {}) {
    const known = this.producers.get(producerId);
    kind = kind || (known && known.kind);
    return this._serial("subscribe", async () => {
      const pc = this._pc("subscribe");
      const transceiver = pc.addTransceiver(kind, { direction: "recvonly" });
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      let reply;
      try {
        const req = { type: "subscribe", producerId, sdp: pc.localDescription.sdp };
        if (maxLayer !== undefined) req.maxLayer = maxLayer;
        reply = await this._request(req);
      } catch (e) {
        if (!pc.remoteDescription) {
          // Never negotiated: start the next subscribe on a fresh connection (a stopped
          // transceiver in a first offer leaves Chromium's m-lines out of step).
          pc.close();
          this.subscribePc = null;
        } else {
          // Roll the unused m-line back so the next offer stays in step with the node.
          await pc.setLocalDescription({ type: "rollback" }).catch(() => {});
          transceiver.stop();
        }
        throw e;
      }
      await pc.setRemoteDescription({ type: "answer", sdp: reply.sdp });
      // The node names the m-line that carries this consumer: use that one, whatever the
      // browser did with the transceiver just added.
      const carrier = pc.getTransceivers().find((t) => t.mid === reply.mid) || transceiver;
      if (carrier !== transceiver) transceiver.direction = "inactive";
      const track = carrier.receiver.track;
      const stream = new MediaStream([track]);
      const entry = { producerId, track, transceiver: carrier, subscribedAt: performance.now(), firstFrameAt: null };
      // First frame: the track unmutes when its first frame arrives.
      if (track.kind === "video") {
        if (!track.muted) entry.firstFrameAt = entry.subscribedAt;
        else track.addEventListener("unmute", () => (entry.firstFrameAt ??= performance.now()), { once: true });
      }
      this.consumers.set(reply.consumerId, entry);
      return this._consumerHandle(reply.consumerId, producerId, track, stream, reply.mid);
    });
  }

  /**
   * Customer only, under a compliance profile with a consent step (`joined.profile.consent`):
   * agrees to that text. The node refuses the customer's media until this is recorded.
   */
  giveConsent(text) {
    return this._request({ type: "giveConsent", text });
  }
  /**
   * Customer only, under a profile that captures location (`joined.profile.location`): shares
   * a `GeolocationPosition` from `navigator.geolocation` (audited with its time).
   */
  shareLocation(position) {
    const c = position.coords;
    return this._request({
      type: "shareLocation",
      latitude: c.latitude,
      longitude: c.longitude,
      accuracy: c.accuracy,
      capturedAt: Math.round(position.timestamp),
    });
  }
  /**
   * Agent only, under a profile with a question pool (`joined.profile.questions`): the next
   * question to ask, drawn by the node in an order of its own and audited. Resolves to
   * `{ question, remaining }`.
   */
  drawQuestion() {
    return this._request({ type: "drawQuestion" });
  }
  /** Agent only, on a recorded session: marks a verification checklist step (audited). */
  markChecklist(step, checked = true) {
    return this._request({ type: "markChecklist", step, checked });
  }
  /** Agent only, on a recorded session: "approved", "rejected" or "escalated" (audited). */
  recordOutcome(outcome, note = "") {
    return this._request({ type: "recordOutcome", outcome, note });
  }
  /**
   * Agent only, on a recorded session: a still of `video` (the customer's picture) stored as
   * evidence on the node the client joined, with its hash in the audit log. Resolves to
   * `{ file, sha256 }`.
   */
  async snapshot(video, { type = "image/png" } = {}) {
    if (!video.videoWidth) throw new MeridianError("no_picture", "the video has no picture yet");
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, type));
    // The node this client joined: its signaling URL, as HTTP. A session recorded by another
    // node (its residency region's) is answered 421 with that node's URL: the still goes
    // there, and is stored nowhere else.
    const base = this.url.replace(/^ws/, "http").replace(/\/v1\/ws.*$/, "");
    const post = (url) =>
      fetch(url, {
        method: "POST",
        headers: { Authorization: `Bearer ${this.token}`, "Content-Type": type },
        body: blob,
      });
    let res = await post(`${base}/v1/snapshot`);
    let body = await res.json().catch(() => ({}));
    if (res.status === 421 && body.url) {
      res = await post(body.url);
      body = await res.json().catch(() => ({}));
    }
    if (!res.ok) throw new MeridianError(body.code || "snapshot", body.message || `HTTP ${res.status}`);
    return body;
  }

  /** A published track: `close()` stops sending it and closes the producer on the node. */
  _producerHandle(producerId, track) {
    return {
      producerId,
      kind: track.kind,
      track,
      pause: () => this.pauseProducer(producerId),
      resume: () => this.resumeProducer(producerId),
      close: () => this.closeProducer(producerId),
    };
  }

  /** A received track: `close()` ends the consumer here and on the node. */
  _consumerHandle(consumerId, producerId, track, stream, mid) {
    return {
      consumerId,
      producerId,
      track,
      stream,
      mid,
      pause: () => this.pauseConsumer(consumerId),
      resume: () => this.resumeConsumer(consumerId),
      setMaxLayer: (layer) => this.setConsumerLayer(consumerId, layer),
      close: () => this.closeConsumer(consumerId),
    };
  }

  setConsumerLayer(consumerId, maxLayer) {
    return this._request({ type: "setConsumerLayer", consumerId, maxLayer });
  }
  pauseProducer(producerId) {
    return this._request({ type: "pauseProducer", producerId });
  }
  resumeProducer(producerId) {
    return this._request({ type: "resumeProducer", producerId });
  }
  closeProducer(producerId) {
    const p = this.published.get(producerId);
    if (p) {
      // Nothing more leaves the browser for it; its m-line stays (inactive) so the next
      // offer stays in step with the node.
      p.transceiver.sender.replaceTrack(null).catch(() => {});
      try {
        p.transceiver.direction = "inactive";
      } catch {
        // The connection is closed.
      }
    }
    this.published.delete(producerId);
    return this._request({ type: "closeProducer", producerId });
  }
  pauseConsumer(consumerId) {
    return this._request({ type: "pauseConsumer", consumerId });
  }
  resumeConsumer(consumerId) {
    return this._request({ type: "resumeConsumer", consumerId });
  }
  closeConsumer(consumerId) {
    this._dropConsumer(consumerId);
    return this._request({ type: "closeConsumer", consumerId });
  }

  /**
   * Forgets a consumer. Its m-line goes inactive (the node will not use it again) rather than
   * stopped: a stopped first m-line would move the whole BUNDLE to a new transport.
   */
  _dropConsumer(consumerId) {
    const c = this.consumers.get(consumerId);
    this.consumers.delete(consumerId);
    if (!c) return;
    c.track.stop();
    try {
      if (c.transceiver.currentDirection !== "stopped") c.transceiver.direction = "inactive";
    } catch {
      // The connection is closed.
    }
  }

  /**
   * Outbound video statistics per published layer (rid): frames encoded and sent, size,
   * bytes, and why the browser limits quality ("cpu", "bandwidth", "none").
   */
  async publisherStats() {
    const out = [];
    if (!this.publishPc) return out;
    const report = await this.publishPc.getStats();
    report.forEach((s) => {
      if (s.type !== "outbound-rtp" || s.kind !== "video") return;
      out.push({
        rid: s.rid || null,
        frameWidth: s.frameWidth || 0,
        framesEncoded: s.framesEncoded || 0,
        bytesSent: s.bytesSent || 0,
        qualityLimitationReason: s.qualityLimitationReason || null,
      });
    });
    return out;
  }

  /** Inbound video/audio statistics per consumer: frames decoded, size, bytes, loss. */
  async consumerStats() {
    const out = {};
    if (!this.subscribePc) return out;
    const report = await this.subscribePc.getStats();
    const byMid = {};
    report.forEach((s) => {
      if (s.type === "inbound-rtp") byMid[s.mid] = s;
    });
    for (const [consumerId, c] of this.consumers) {
      const s = byMid[c.transceiver.mid];
      if (!s) continue;
      out[consumerId] = {
        kind: s.kind,
        framesDecoded: s.framesDecoded || 0,
        frameWidth: s.frameWidth || 0,
        frameHeight: s.frameHeight || 0,
        bytesReceived: s.bytesReceived || 0,
        packetsReceived: s.packetsReceived || 0,
        packetsLost: s.packetsLost || 0,
        nackCount: s.nackCount || 0,
        pliCount: s.pliCount || 0,
        retransmittedPacketsReceived: s.retransmittedPacketsReceived || 0,
        freezeCount: s.freezeCount || 0,
        totalFreezesDuration: s.totalFreezesDuration || 0,
        audioLevel: s.audioLevel || 0,
        totalSamplesReceived: s.totalSamplesReceived || 0,
      };
    }
    return out;
  }

  /**
   * Every `statsIntervalMs` (5 s) the node is sent a summary of getStats(): round-trip time,
   * jitter and loss of what this client receives, frames decoded, freezes, picture height,
   * and each subscription's time to its first frame. Operators see it in the node's
   * `meridian_client_*` metrics, by role; nothing identifying is sent.
   */
  _startStatsReports() {
    this._stopStatsReports();
    this._statsPrev = new Map(); // inbound-rtp id -> { packetsReceived, packetsLost, framesDecoded, freezeCount }
    this._statsTimer = setInterval(() => {
      this._reportStats().catch(() => {});
    }, this.statsIntervalMs || 5000);
  }

  _stopStatsReports() {
    if (this._statsTimer) clearInterval(this._statsTimer);
    this._statsTimer = null;
  }

  async _reportStats() {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    const summary = { type: "stats", framesDecoded: 0, freezes: 0 };
    let received = 0;
    let lost = 0;
    const firstFrames = [];
    for (const pc of [this.publishPc, this.subscribePc]) {
      if (!pc) continue;
      const report = await pc.getStats();
      report.forEach((s) => {
        if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded" && s.currentRoundTripTime !== undefined) {
          // Publish side first: its pair is measured by the client's own checks.
          if (summary.rttMs === undefined) summary.rttMs = s.currentRoundTripTime * 1000;
        }
        if (s.type !== "inbound-rtp") return;
        const prev = this._statsPrev.get(s.id) || { packetsReceived: 0, packetsLost: 0, framesDecoded: 0, freezeCount: 0 };
        received += Math.max(0, (s.packetsReceived || 0) - prev.packetsReceived);
        lost += Math.max(0, (s.packetsLost || 0) - prev.packetsLost);
        summary.framesDecoded += Math.max(0, (s.framesDecoded || 0) - prev.framesDecoded);
        summary.freezes += Math.max(0, (s.freezeCount || 0) - prev.freezeCount);
        this._statsPrev.set(s.id, {
          packetsReceived: s.packetsReceived || 0,
          packetsLost: s.packetsLost || 0,
          framesDecoded: s.framesDecoded || 0,
          freezeCount: s.freezeCount || 0,
        });
        if (s.jitter !== undefined) summary.jitterMs = Math.max(summary.jitterMs || 0, s.jitter * 1000);
        if (s.kind === "video" && s.frameHeight) summary.frameHeight = Math.max(summary.frameHeight || 0, s.frameHeight);
      });
    }
    for (const c of this.consumers.values()) {
      if (c.firstFrameReported || c.firstFrameAt === null) continue;
      c.firstFrameReported = true;
      firstFrames.push(c.firstFrameAt - c.subscribedAt);
    }
    if (received + lost > 0) summary.loss = lost / (received + lost);
    summary.framesDecoded = Math.min(summary.framesDecoded, 14400);
    summary.freezes = Math.min(summary.freezes, 100);
    if (firstFrames.length) summary.firstFrameMs = Math.min(600000, Math.max(...firstFrames));
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(summary));
  }

  /** Leaves the session and closes both peer connections. */
  close() {
    this.leaving = true;
    this._stopStatsReports();
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type: "leave" }));
    }
    if (this.publishPc) this.publishPc.close();
    if (this.subscribePc) this.subscribePc.close();
    this.publishPc = this.subscribePc = null;
  }
}

/** The `sid` claim of a JWT, unverified (only a routing preference), or null. */
function sessionOfToken(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "="))).sid || null;
  } catch {
    return null;
  }
}

/**
 * Puts the browser's codecs of MIME subtype `name` (for example "H264" or "VP9") first in
 * the transceiver's offer; the node answers with the first codec it supports. Throws a
 * MeridianError when this browser cannot send that codec.
 */
function preferCodec(transceiver, name) {
  const caps = RTCRtpSender.getCapabilities ? RTCRtpSender.getCapabilities("video") : null;
  if (!caps || !transceiver.setCodecPreferences) {
    throw new MeridianError("unsupported_codec", "this browser cannot choose its video codec");
  }
  const wanted = `video/${name}`.toLowerCase();
  const first = caps.codecs.filter((c) => c.mimeType.toLowerCase() === wanted);
  if (!first.length) throw new MeridianError("unsupported_codec", `this browser cannot send ${name}`);
  transceiver.setCodecPreferences([...first, ...caps.codecs.filter((c) => c.mimeType.toLowerCase() !== wanted)]);
}

function stopTransceiver(t) {
  try {
    if (t && !t.stopped && t.currentDirection !== "stopped") t.stop();
  } catch {
    // Already stopped or the connection is closed.
  }
}

/** Asks the browser to keep resolution and give up frame rate under pressure. */
async function preferResolution(sender) {
  try {
    const params = sender.getParameters();
    params.degradationPreference = "maintain-resolution";
    await sender.setParameters(params);
  } catch {
    // Not every browser lets the preference be set; the content hint still applies.
  }
}

function defaultUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/v1/ws`;
}
