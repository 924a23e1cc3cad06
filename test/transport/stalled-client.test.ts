/**
 * A client whose process stalls (stopped with SIGSTOP, a paused VM, a long synchronous step)
 * longer than the heartbeat allows: when it runs again its heartbeat check closes the
 * connection first, and the frames the server sent meanwhile are still buffered. Those must
 * be dropped, not answered: answering a heartbeat on a closed connection threw from the
 * socket's message handler and killed the agent (found by the group cut test, where an agent
 * is stopped inside its freeze). A real WebSocket server on loopback plays the server side.
 */
import t from 'tap';
import type { AddressInfo } from 'node:net';
import { WebSocketServer } from 'ws';
import { PROTOCOL_VERSION } from '../../src/constants.js';
import { decodeMessage, encodeMessage } from '../../src/protocol/frame-codec.js';
import { Connection } from '../../src/transport/client.js';

t.test('frames buffered while the process stalled past the heartbeat are dropped once the connection closed', async (t) => {
  const heartbeatMs = 100;
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1' });
  await new Promise<void>((r) => wss.once('listening', () => r()));
  t.teardown(() => new Promise<void>((r) => { for (const c of wss.clients) c.terminate(); wss.close(() => r()); }));
  let sender: NodeJS.Timeout | null = null;
  t.teardown(() => { if (sender) clearInterval(sender); });
  wss.on('connection', (ws) => {
    ws.on('message', (data) => {
      const f = decodeMessage(data as Buffer);
      if (f.type !== 'hello') return;
      ws.send(encodeMessage({ type: 'welcome', welcome: { protocolVersion: PROTOCOL_VERSION, sessionId: 's', disks: [], creditBytes: 1 << 20, maxFrameBytes: 1 << 20, heartbeatMs } }));
      // the server keeps talking: heartbeats that ask for an answer
      sender = setInterval(() => { if (ws.readyState === ws.OPEN) ws.send(encodeMessage({ type: 'heartbeat', heartbeat: { sentAtMs: Date.now(), reply: false } })); }, 10);
    });
  });
  const uncaught: Error[] = [];
  const onUncaught = (err: Error) => { uncaught.push(err); };
  process.on('uncaughtException', onUncaught);
  t.teardown(() => { process.off('uncaughtException', onUncaught); });

  const port = (wss.address() as AddressInfo).port;
  const conn = await Connection.connect({ url: `ws://127.0.0.1:${port}/v1/replicate`, hello: { agentId: 'stall', token: 'x', disks: [], agentVersion: 'test' } });
  t.teardown(() => conn.shutdown());
  const closed = new Promise<Error>((r) => conn.once('close', (e: Error) => r(e)));
  // the process stalls: nothing of ours runs for several heartbeat periods, the server's frames pile up
  await new Promise<void>((r) => setTimeout(() => {
    const end = Date.now() + heartbeatMs * 6;
    while (Date.now() < end) { /* stalled */ }
    r();
  }, 50));
  const e = await closed;
  t.match(e, { code: 'MOB_ERR_HEARTBEAT_TIMEOUT' }, 'the stall ends the connection with the heartbeat timeout');
  // give the buffered frames time to be delivered
  await new Promise((r) => setTimeout(r, 200));
  t.same(uncaught.map((x) => x.message), [], 'nothing thrown from the socket handlers');
  t.throws(() => conn.send(encodeMessage({ type: 'heartbeat', heartbeat: { sentAtMs: 1, reply: false } })), { code: 'MOB_ERR_HEARTBEAT_TIMEOUT' }, 'an explicit send on the closed connection still throws its reason');
});
