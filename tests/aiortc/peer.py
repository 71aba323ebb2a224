"""An independent WebRTC client (aiortc) written from docs/signaling.md alone.

Usage: peer.py WS_URL PUBLISHER_TOKEN SUBSCRIBER_TOKEN

Joins twice with `bundlePolicy: max-bundle`: the first connection publishes a generated video
track, the second subscribes to it. Prints one JSON line per step and ends with
{"result": "ok", ...} once the subscriber has decoded frames, or {"result": "failed", ...}.
"""
import asyncio
import json
import sys

import aioice.ice
import websockets
from aiortc import RTCBundlePolicy, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import VideoStreamTrack


# The tests run in a network namespace with only loopback up, and aioice never offers
# 127.0.0.1 as a host candidate (as browsers need --allow-loopback-in-peer-connection there).
aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


def say(**fields):
    print(json.dumps(fields), flush=True)


class Signal:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 1

    @classmethod
    async def join(cls, url, token):
        s = cls(await websockets.connect(url))
        await s.ws.send(json.dumps({"type": "join", "version": 1, "token": token}))
        joined = json.loads(await s.ws.recv())
        if joined["type"] != "joined":
            raise RuntimeError(f"join refused: {joined}")
        return s, joined

    async def request(self, body):
        body["requestId"] = self.next_id
        self.next_id += 1
        await self.ws.send(json.dumps(body))
        while True:
            m = json.loads(await self.ws.recv())
            if m.get("requestId") == body["requestId"]:
                if m["type"] == "error":
                    raise RuntimeError(f"{body['type']} refused: {m}")
                return m


def max_bundle():
    return RTCPeerConnection(RTCConfiguration(bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))


async def main(url, publisher_token, subscriber_token):
    pub_signal, _ = await Signal.join(url, publisher_token)
    pub = max_bundle()
    pub.addTransceiver(VideoStreamTrack(), direction="sendonly")
    await pub.setLocalDescription(await pub.createOffer())
    published = await pub_signal.request({"type": "publish", "sdp": pub.localDescription.sdp})
    await pub.setRemoteDescription(RTCSessionDescription(published["sdp"], "answer"))
    producer = published["producers"][0]["producerId"]
    say(step="published", producer=producer)

    sub_signal, joined = await Signal.join(url, subscriber_token)
    say(step="joined", producers=len(joined["producers"]))
    sub = max_bundle()
    frames = []
    done = asyncio.Event()

    @sub.on("track")
    def on_track(track):
        async def read():
            while len(frames) < 10:
                frame = await track.recv()
                frames.append((frame.width, frame.height))
            done.set()

        asyncio.ensure_future(read())

    sub.addTransceiver("video", direction="recvonly")
    await sub.setLocalDescription(await sub.createOffer())
    subscribed = await sub_signal.request(
        {"type": "subscribe", "producerId": producer, "sdp": sub.localDescription.sdp}
    )
    await sub.setRemoteDescription(RTCSessionDescription(subscribed["sdp"], "answer"))
    say(step="subscribed", mid=subscribed["mid"])
    try:
        await asyncio.wait_for(done.wait(), 20)
        say(result="ok", frames=len(frames), size=list(frames[-1]))
    except asyncio.TimeoutError:
        say(result="failed", subscriber=sub.connectionState, publisher=pub.connectionState)
    await sub.close()
    await pub.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
