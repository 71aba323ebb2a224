// TypeScript declarations for the Meridian browser SDK (meridian.js, served beside this file
// at /sdk/meridian.js and /sdk/meridian.d.ts). The wire protocol is docs/signaling.md.

export declare const PROTOCOL_VERSION: 1;

export interface SimulcastEncoding {
  rid: string;
  scaleResolutionDownBy?: number;
  maxBitrate?: number;
}

/** Default simulcast encodings, lowest first. */
export declare const SIMULCAST_ENCODINGS: SimulcastEncoding[];

/** Every failure of the SDK: `code` is the node's error code (docs/signaling.md) or one of
 * the SDK's own: `closed`, `timeout`, `unreachable`, `unsupported_codec`, `no_picture`,
 * `migration_failed`. */
export declare class MeridianError extends Error {
  constructor(code: string, message: string);
  readonly code: string;
}

export type Role = "user" | "agent" | "observer";
export type MediaKind = "audio" | "video";
export type TransportKind = "publish" | "subscribe";

export interface ParticipantInfo {
  participantId: string;
  userId: string;
  role: Role;
  [field: string]: unknown;
}

export interface ProducerInfo {
  producerId: string;
  participantId: string;
  userId: string;
  kind: MediaKind;
  [field: string]: unknown;
}

export interface EdgeNode {
  node: string;
  region: string;
  url: string;
}

export interface Joined {
  type: "joined";
  version: number;
  participantId: string;
  sessionId: string;
  userId: string;
  role: Role;
  /** Token expiry, seconds since the Unix epoch. */
  expiresAt: number;
  node: string;
  region: string;
  recorded: boolean;
  profile?: { name: string; consent?: string; location?: boolean; questions?: boolean };
  participants: ParticipantInfo[];
  producers: ProducerInfo[];
  /** Present when the node keeps places after a lost connection. */
  resumeKey?: string;
  resumeWithinSecs: number;
  /** The region's TURN servers with credentials for this participant (empty without TURN). */
  iceServers: RTCIceServer[];
}

export interface ClientOptions {
  /** Signaling WebSocket URL; default: this page's origin, `/v1/ws`. */
  url?: string;
  /** Ask this node's `/v1/edge` for the nearest edge (`true`: this page's origin). Needed
   * for failover to another node when the node dies. */
  route?: string | true;
  regionHint?: string;
  /** The JWT the application's backend issued. */
  token: string;
  /** ICE servers of the page's own, used beside the node's TURN servers from `joined`. */
  iceServers?: RTCIceServer[];
  /** `"relay"`: media only through TURN (for networks where nothing else gets through). */
  iceTransportPolicy?: RTCIceTransportPolicy;
}

export interface PublishOptions {
  /** `true` for SIMULCAST_ENCODINGS, or your own encodings (video only). */
  simulcast?: boolean | SimulcastEncoding[];
  /** Preferred video codec's MIME subtype, e.g. "H264" or "VP9". */
  videoCodec?: string;
}

export interface Producer {
  producerId: string;
  kind: MediaKind;
  track: MediaStreamTrack;
  pause(): Promise<unknown>;
  resume(): Promise<unknown>;
  /** Stops sending the track and closes the producer on the node. */
  close(): Promise<unknown>;
}

export interface Consumer {
  consumerId: string;
  producerId: string;
  track: MediaStreamTrack;
  stream: MediaStream;
  mid: string;
  pause(): Promise<unknown>;
  resume(): Promise<unknown>;
  /** Simulcast layer cap, 0 = lowest. */
  setMaxLayer(layer: number): Promise<unknown>;
  /** Ends the consumer here (track stopped, m-line inactive) and on the node. */
  close(): Promise<unknown>;
}

export interface ConsumerStats {
  kind: MediaKind;
  framesDecoded: number;
  frameWidth: number;
  frameHeight: number;
  bytesReceived: number;
  packetsReceived: number;
  packetsLost: number;
  nackCount: number;
  pliCount: number;
  retransmittedPacketsReceived: number;
  freezeCount: number;
  totalFreezesDuration: number;
  audioLevel: number;
  totalSamplesReceived: number;
}

export interface PublisherLayerStats {
  rid: string | null;
  frameWidth: number;
  framesEncoded: number;
  bytesSent: number;
  qualityLimitationReason: string | null;
}

/** Events and their `detail`. */
export interface MeridianEvents {
  edge: { joined: EdgeNode; reason: string; edge?: EdgeNode; alternates?: EdgeNode[] };
  routingfailed: { message: string };
  connectionstate: { transport: TransportKind; state: RTCPeerConnectionState };
  transportstate: { transport: TransportKind; state: string };
  produceradded: ProducerInfo;
  producerclosed: { producerId: string };
  producerpaused: { producerId: string };
  producerresumed: { producerId: string };
  consumerclosed: { consumerId: string; reason?: "failover" | "migrated" };
  consumerlayerchanged: { consumerId: string; layer: number; reason: string; estimateBps?: number };
  participantjoined: ParticipantInfo;
  participantleft: ParticipantInfo;
  sessionexpired: { message: string };
  error: { code: string; message: string };
  closed: { code: number; reason: string };
  /** The signaling connection was lost; the SDK is taking its place back. */
  reconnecting: { url: string };
  reconnected: { url: string; failover?: boolean; republished?: Producer[] };
  disconnected: { code: string; message: string };
  /** The node died: moving to the next nearest edge. */
  failover: { from: string | null };
  icerestarted: { transport: TransportKind };
  /** The node is being drained: moving, make-before-break. */
  migrating: { to: EdgeNode; deadlineSecs: number };
  migrated: { node: string; region: string };
  migratecancelled: Record<string, never>;
}

export declare class MeridianClient extends EventTarget {
  constructor(options: ClientOptions);
  /** Milliseconds before a request fails with `timeout` (default 15000). */
  requestTimeoutMs?: number;
  /** Milliseconds before an unanswered connection attempt counts as `unreachable` (5000). */
  connectTimeoutMs?: number;
  /** Milliseconds between statistics summaries sent to the node (5000). */
  statsIntervalMs?: number;
  readonly url: string;
  readonly edge: ({ edge?: EdgeNode; alternates?: EdgeNode[]; joined?: EdgeNode; reason?: string }) | null;
  readonly joined: Joined | null;
  readonly closed: boolean;
  /** Remote producers this client may see, by id. */
  readonly producers: Map<string, ProducerInfo>;
  /** Others in the session this client may see, by id. */
  readonly participants: Map<string, ParticipantInfo>;

  connect(): Promise<Joined>;
  publish(tracks: MediaStream | MediaStreamTrack[], options?: PublishOptions): Promise<Producer[]>;
  subscribe(producerId: string, kind?: MediaKind, options?: { maxLayer?: number }): Promise<Consumer>;
  restartIce(): Promise<void>;

  setConsumerLayer(consumerId: string, maxLayer: number): Promise<unknown>;
  pauseProducer(producerId: string): Promise<unknown>;
  resumeProducer(producerId: string): Promise<unknown>;
  closeProducer(producerId: string): Promise<unknown>;
  pauseConsumer(consumerId: string): Promise<unknown>;
  resumeConsumer(consumerId: string): Promise<unknown>;
  closeConsumer(consumerId: string): Promise<unknown>;

  /** Customer, under a profile with a consent step: agrees to `joined.profile.consent`. */
  giveConsent(text: string): Promise<unknown>;
  /** Customer, under a profile that captures location. */
  shareLocation(position: GeolocationPosition): Promise<unknown>;
  /** Agent, under a profile with a question pool. */
  drawQuestion(): Promise<{ question: string; remaining: number }>;
  /** Agent, recorded session. */
  markChecklist(step: string, checked?: boolean): Promise<unknown>;
  recordOutcome(outcome: "approved" | "rejected" | "escalated", note?: string): Promise<unknown>;
  snapshot(video: HTMLVideoElement, options?: { type?: "image/png" | "image/jpeg" }): Promise<{ file: string; sha256: string }>;

  publisherStats(): Promise<PublisherLayerStats[]>;
  consumerStats(): Promise<Record<string, ConsumerStats>>;

  /** Leaves the session and closes both peer connections. */
  close(): void;

  addEventListener<K extends keyof MeridianEvents>(
    type: K,
    listener: (event: CustomEvent<MeridianEvents[K]>) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
}
