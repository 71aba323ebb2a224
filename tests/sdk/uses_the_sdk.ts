// An integrator's page as TypeScript would check it against meridian.d.ts.
import { MeridianClient, MeridianError, SIMULCAST_ENCODINGS, type Consumer, type Producer } from "./meridian.js";

export async function call(token: string, video: HTMLVideoElement): Promise<void> {
  const client = new MeridianClient({ route: true, token });
  client.requestTimeoutMs = 10_000;
  client.addEventListener("produceradded", async (e) => {
    const consumer: Consumer = await client.subscribe(e.detail.producerId, e.detail.kind, { maxLayer: 1 });
    video.srcObject = consumer.stream;
    await consumer.setMaxLayer(2);
  });
  client.addEventListener("migrating", (e) => console.log(`moving to ${e.detail.to.node} within ${e.detail.deadlineSecs} s`));
  client.addEventListener("reconnected", (e) => console.log(e.detail.failover ? "moved after a failure" : "back"));
  client.addEventListener("consumerclosed", (e) => console.log(e.detail.consumerId, e.detail.reason));
  const joined = await client.connect();
  if (joined.recorded) console.log(`recorded; resume within ${joined.resumeWithinSecs} s`);
  const local = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
  const producers: Producer[] = await client.publish(local, { simulcast: SIMULCAST_ENCODINGS, videoCodec: "VP8" });
  await producers[0].pause();
  await producers[0].close();
  try {
    await client.recordOutcome("approved", "documents match");
  } catch (e) {
    if (e instanceof MeridianError && e.code === "timeout") console.log("no answer");
  }
  await client.restartIce();
  client.close();
}
