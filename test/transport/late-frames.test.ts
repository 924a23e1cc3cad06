/**
 * Frames that arrive after the client shut its connection down must be dropped, not handled:
 * answering a heartbeat on a closed connection threw from the socket's message handler, an
 * uncaught exception that killed the agent. It happened to an agent stopped (SIGSTOP) inside a
 * group cut's freeze: while it was stopped the server timed its session out and sent an Error
 * frame; on SIGCONT the Error frame shut the connection, and the heartbeats read in the same
 * chunk were then answered on it. A real WebSocket server on loopback sends exactly that: an
 * Error frame followed at once by a heartbeat that asks for an answer.
 */
import t from 'tap';
import type { AddressInfo } from 'node:net';
import { WebSocketServer } from 'ws';
import { PROTOCOL_VERSION } from '../../src/constants.js';
import { decodeMessage, encodeMessage } from '../../src/protocol/frame-codec.js';
import { Connection } from '../../src/transport/client.js';

t.test('frames after the connection was shut down are dropped, not answered', async (t) => {
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1' });
  await new Promise<void>((r) => wss.once('listening', () => r()));
  t.teardown(() => new Promise<void>((r) => { for (const c of wss.clients) c.terminate(); wss.close(() => r()); }));
  let go: () => void = () => undefined;
  const ready = new Promise<void>((r) => { go = r; });
  let serverSide: import('ws').WebSocket | null = null;
  wss.on('connection', (ws) => {
    serverSide = ws;
    ws.on('message', (data) => {
      const f = decodeMessage(data as Buffer);
      if (f.type !== 'hello') return;
      ws.send(encodeMessage({ type: 'welcome', welcome: { protocolVersion: PROTOCOL_VERSION, sessionId: 's', disks: [], creditBytes: 1 << 20, maxFrameBytes: 1 << 20, heartbeatMs: 60_000 } }));
      go();
    });
  });
  const uncaught: Error[] = [];
  const onUncaught = (err: Error) => { uncaught.push(err); };
  process.on('uncaughtException', onUncaught);
  t.teardown(() => { process.off('uncaughtException', onUncaught); });

  const port = (wss.address() as AddressInfo).port;
  const conn = await Connection.connect({ url: `ws://127.0.0.1:${port}/v1/replicate`, hello: { agentId: 'late-frames', token: 'x', disks: [], agentVersion: 'test' } });
  t.teardown(() => conn.shutdown());
  await ready;
  const closed = new Promise<Error>((r) => conn.once('close', (e: Error) => r(e)));
  // the server gives up on the session, and frames it had queued follow the Error frame
  serverSide!.send(encodeMessage({ type: 'error', error: { code: 'MOB_ERR_HEARTBEAT_TIMEOUT', message: 'no frame from the agent', retryable: true } }));
  for (let i = 0; i < 3; i++) serverSide!.send(encodeMessage({ type: 'heartbeat', heartbeat: { sentAtMs: Date.now(), reply: false } }));
  const e = await closed;
  t.match(e, { code: 'MOB_ERR_HEARTBEAT_TIMEOUT' }, 'the Error frame ends the connection with its code');
  // the heartbeats behind it are delivered in the same or the next turns of the loop
  await new Promise((r) => setTimeout(r, 300));
  t.same(uncaught.map((x) => x.message), [], 'nothing thrown from the socket handlers');
  t.throws(() => conn.send(encodeMessage({ type: 'heartbeat', heartbeat: { sentAtMs: 1, reply: false } })), { code: 'MOB_ERR_HEARTBEAT_TIMEOUT' }, 'an explicit send on the closed connection still throws its reason');
});
