/**
 * The QMP client (src/source/qemu/qmp.ts): its line parser fed byte fixtures split at every
 * boundary, the protocol against a scripted fake QMP server on a unix socket (id matching with
 * answers out of order, events between answers, QEMU errors, timeouts, a server that goes
 * away), and one round trip with a real qemu-storage-daemon.
 */
import t from 'tap';
import net from 'node:net';
import path from 'node:path';
import { QmpClient, QmpCommandError, QmpLineParser } from '../../../src/source/qemu/qmp.js';
import { MobilityError } from '../../../src/errors.js';
import { cleanup } from '../../cleanup.js';
import { QemuDaemon, createImage, requireQemuTools } from './qemu-daemon.js';

const GREETING = '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}\r\n';

t.test('line parser: the same messages whatever the chunking', async (t) => {
  const fixture = Buffer.from(GREETING + '{"return": {}, "id": "mob-1"}\r\n{"event": "X", "data": {"s": "a\\nb é"}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n\r\n');
  const whole = new QmpLineParser().push(fixture);
  t.equal(whole.length, 3);
  t.same((whole[2] as { data: unknown }).data, { s: 'a\nb é' }, 'escaped newline and multi-byte text');
  for (let i = 0; i <= fixture.length; i++) {
    for (const j of [i, Math.min(fixture.length, i + 1), Math.min(fixture.length, i + 7)]) {
      const p = new QmpLineParser();
      const got = [...p.push(fixture.subarray(0, i)), ...p.push(fixture.subarray(i, j)), ...p.push(fixture.subarray(j))];
      if (JSON.stringify(got) !== JSON.stringify(whole)) { t.fail(`split at ${i}/${j}`); return; }
    }
  }
  t.pass('every split gives the same messages');
  t.throws(() => new QmpLineParser(64).push(Buffer.alloc(65, 0x61)), { code: 'MOB_ERR_QMP' }, 'a line longer than the bound');
  const p = new QmpLineParser(64);
  p.push(Buffer.alloc(40, 0x61));
  t.throws(() => p.push(Buffer.alloc(40, 0x61)), { code: 'MOB_ERR_QMP' }, 'the bound holds across chunks');
  t.throws(() => new QmpLineParser().push(Buffer.from('{"return": \n')), { code: 'MOB_ERR_QMP', message: /not JSON/ });
});

type Reply = (cmd: { execute: string; arguments?: Record<string, unknown>; id?: string }, send: (o: unknown) => void, sock: net.Socket) => void;

/** A fake QMP server: greets (unless greet = false), answers qmp_capabilities, hands every other command to `reply`. */
async function fakeServer(tt: { teardown(fn: () => unknown): void }, reply: Reply, greet: string | false = GREETING): Promise<{ path: string; server: net.Server; sockets: net.Socket[] }> {
  const dir = cleanup(tt).dir('qmp-');
  const sockPath = path.join(dir, 'qmp.sock');
  const sockets: net.Socket[] = [];
  const server = net.createServer((sock) => {
    sockets.push(sock);
    if (greet !== false) sock.write(greet);
    const parser = new QmpLineParser();
    const send = (o: unknown) => sock.write(JSON.stringify(o) + '\r\n');
    sock.on('data', (chunk: Buffer) => {
      for (const m of parser.push(chunk) as { execute: string; id?: string }[]) {
        if (m.execute === 'qmp_capabilities') send({ return: {}, id: m.id });
        else reply(m, send, sock);
      }
    });
    sock.on('error', () => undefined);
  });
  await new Promise<void>((r) => server.listen(sockPath, r));
  tt.teardown(() => { for (const s of sockets) s.destroy(); server.close(); });
  return { path: sockPath, server, sockets };
}

t.test('answers are matched by id, out of order, with events in between', async (t) => {
  const held: { id?: string; execute: string }[] = [];
  const srv = await fakeServer(t, (cmd, send) => {
    held.push(cmd);
    if (held.length < 3) return;
    send({ event: 'BLOCK_EXPORT_DELETED', data: { id: 'e1' }, timestamp: { seconds: 1, microseconds: 0 } });
    for (const c of [...held].reverse()) send({ return: { echo: c.execute }, id: c.id });
    held.length = 0;
  });
  const q = await QmpClient.connect(srv.path);
  t.equal(q.version, '7.2.0');
  const ev = q.waitEvent('BLOCK_EXPORT_DELETED', (d) => d['id'] === 'e1', 5000);
  const [a, b, c] = await Promise.all([q.execute('a'), q.execute('b', { x: 1 }), q.execute('c')]);
  t.same([a, b, c], [{ echo: 'a' }, { echo: 'b' }, { echo: 'c' }]);
  t.match(await ev, { event: 'BLOCK_EXPORT_DELETED', data: { id: 'e1' }, timestamp: { seconds: 1 } });
  q.close();
  await q.closed;
  t.equal(q.isClosed, true);
  await t.rejects(q.execute('after'), { code: 'MOB_ERR_QMP' }, 'no command after close');
});

t.test('a QEMU error is a QmpCommandError with its class; a silent command times out, the connection stays usable', async (t) => {
  const srv = await fakeServer(t, (cmd, send) => {
    if (cmd.execute === 'bad') send({ error: { class: 'DeviceNotFound', desc: "Device 'x' not found" }, id: cmd.id });
    else if (cmd.execute === 'silent') { /* never answered */ } else send({ return: 42, id: cmd.id });
  });
  const q = await QmpClient.connect(srv.path);
  t.teardown(() => q.close());
  const err = await q.execute('bad').catch((e: unknown) => e);
  t.ok(err instanceof QmpCommandError && err instanceof MobilityError);
  t.match(err, { code: 'MOB_ERR_QMP', qmpClass: 'DeviceNotFound', command: 'bad', message: /QMP command bad failed: DeviceNotFound: Device 'x' not found/ });
  await t.rejects(q.execute('silent', undefined, { timeoutMs: 100 }), { code: 'MOB_ERR_QMP', retryable: true, message: /no answer .* within 100 ms/ });
  t.equal(await q.execute('ok'), 42, 'still usable');
  await t.rejects(q.waitEvent('NEVER', undefined, 50), { code: 'MOB_ERR_QMP', message: /no QMP event NEVER/ });
});

t.test('QEMU going away fails pending commands and waiters (retryable), and resolves closed', async (t) => {
  const srv = await fakeServer(t, (_cmd, _send, sock) => { sock.destroy(); });
  const q = await QmpClient.connect(srv.path);
  const waiter = q.waitEvent('SOMETHING');
  await t.rejects(q.execute('anything'), { code: 'MOB_ERR_QMP', retryable: true, message: /closed/ });
  await t.rejects(waiter, { code: 'MOB_ERR_QMP' });
  await q.closed;
  t.equal(q.isClosed, true);
});

t.test('connect: a missing socket, no greeting, or a non-QMP peer is MOB_ERR_QMP', async (t) => {
  const dir = cleanup(t).dir('qmp-');
  await t.rejects(QmpClient.connect(path.join(dir, 'absent.sock')), { code: 'MOB_ERR_QMP', retryable: true });
  const mute = await fakeServer(t, () => undefined, false);
  await t.rejects(QmpClient.connect(mute.path, { timeoutMs: 200 }), { code: 'MOB_ERR_QMP', message: /no QMP greeting .* within 200 ms/ });
  const other = await fakeServer(t, () => undefined, '{"hello": 1}\n');
  await t.rejects(QmpClient.connect(other.path), { code: 'MOB_ERR_QMP', message: /did not greet as a QMP server/ });
});

t.test('a real qemu-storage-daemon: version, a command, an unknown command', async (t) => {
  requireQemuTools();
  const c = cleanup(t);
  const dir = c.dir('qemu-');
  const image = path.join(dir, 'd.qcow2');
  createImage(image, 'qcow2', '16M');
  const d = new QemuDaemon(c, dir, [{ image, format: 'qcow2' }], false);
  await d.start();
  const q = await QmpClient.connect(d.qmpSocket);
  t.match(q.version, /^\d+\.\d+\.\d+$/);
  const nodes = await q.execute<{ 'node-name': string; drv: string }[]>('query-named-block-nodes', { flat: true });
  t.ok(nodes.some((n) => n['node-name'] === 'disk0' && n.drv === 'qcow2'), 'the qcow2 node is listed');
  await t.rejects(q.execute('no-such-command'), { code: 'MOB_ERR_QMP', qmpClass: 'CommandNotFound' });
  q.close();
  await d.stop();
});
