/**
 * Host mode against a real ProcessServer over TLS on loopback, with what a host agent sends
 * crafted by hand on its real control connection (its certificate from a real registration):
 * the inventories a broken or hostile host could send, and what enable --vm and the control
 * channel make of them. Every refusal is coded and changes nothing.
 */
import t from 'tap';
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import https from 'node:https';
import path from 'node:path';
import winston from 'winston';
import WebSocket from 'ws';
import { ProcessServer } from '../../src/server/process-server.js';
import { registerAgent } from '../../src/install/register.js';
import { credentialFiles } from '../../src/agent/config.js';
import { tmpDir, waitFor } from '../helpers.js';

interface Json { [k: string]: unknown }

t.test('enable --vm and the control channel against crafted host inventories', async (t) => {
  const dir = await tmpDir(t);
  const dataDir = path.join(dir, 'srv');
  const server = new ProcessServer({ dataDir, port: 0, logger: winston.createLogger({ silent: true }) });
  const { port } = await server.start();
  t.teardown(() => server.stop());
  const url = `wss://127.0.0.1:${port}`;
  const bearer = (await fsp.readFile(path.join(dataDir, 'token'), 'utf8')).trim();
  const ca = server.identity!.ca;
  const passphrase = (await fsp.readFile(path.join(dataDir, 'passphrase'), 'utf8')).trim();

  const http = (method: string, pathname: string, body?: unknown): Promise<{ status: number; json: Json }> => new Promise((resolve, reject) => {
    const data = body === undefined ? null : Buffer.from(JSON.stringify(body));
    const req = https.request({
      host: '127.0.0.1', port, path: pathname, method, ca, agent: false, servername: 'localhost', rejectUnauthorized: false,
      headers: { authorization: `Bearer ${bearer}`, ...(data ? { 'content-type': 'application/json', 'content-length': data.length } : {}) },
    }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (c: Buffer) => parts.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(Buffer.concat(parts).toString('utf8')) as Json }));
    });
    req.on('error', reject);
    req.end(data ?? undefined);
  });
  const register = async (name: string) => {
    const mid = crypto.randomBytes(16).toString('hex');
    const file = path.join(dir, `mid-${name}`);
    await fsp.writeFile(file, mid + '\n');
    const stateDir = path.join(dir, `state-${name}`);
    const id = await registerAgent({ server: url, stateDir, kind: 'passphrase', secret: passphrase, machineIdFile: file, hostname: name });
    const f = credentialFiles(stateDir);
    return { agentId: id.agentId, machineId: mid, cert: await fsp.readFile(f.cert, 'utf8'), key: await fsp.readFile(f.key, 'utf8') };
  };
  /** A control connection of a host agent: hello, then whatever the test sends; collects what the server sends. */
  const control = async (a: { cert: string; key: string; machineId: string }) => {
    const ws = new WebSocket(`${url}/v1/control`, { ca, cert: a.cert, key: a.key });
    const msgs: Json[] = [];
    let closed = false;
    ws.on('message', (d) => msgs.push(JSON.parse((d as Buffer).toString('utf8')) as Json));
    ws.on('close', () => { closed = true; });
    ws.on('error', () => undefined);
    await new Promise<void>((r, j) => { ws.once('open', () => r()); ws.once('error', j); });
    ws.send(JSON.stringify({ type: 'hello', machineId: a.machineId, agentVersion: 'test' }));
    await waitFor(() => msgs.some((m) => m.type === 'assignments'), 30_000, 'assignments');
    t.teardown(() => ws.close());
    return { ws, msgs, send: (m: object) => ws.send(JSON.stringify(m)), get closed() { return closed; } };
  };
  const disk = (node: string) => ({ device: node, node, file: `/img/${node}.qcow2`, format: 'qcow2', sizeBytes: 1 << 26, persistentTracking: true });

  const host = await register('kvm');
  const other = await register('other');
  const h = await control(host);
  // a hostile host names another machine's id for its VM, two VMs share a name, one could not be inspected, one has no disk
  h.send({
    type: 'inventory', inventory: {
      machineId: host.machineId, hostname: 'kvm', disks: [], nics: [],
      vms: [
        { name: 'web', machineId: other.agentId, qmpSocket: '/run/q/1.qmp', guestAgentSocket: null, status: 'running', disks: [disk('a')] },
        { name: 'twin', machineId: 'x', qmpSocket: '/run/q/2.qmp', guestAgentSocket: null, status: 'running', disks: [disk('b')] },
        { name: 'twin', machineId: 'x', qmpSocket: '/run/q/3.qmp', guestAgentSocket: null, status: 'running', disks: [disk('c')] },
        { name: 'dead', machineId: 'x', qmpSocket: '/run/q/4.qmp', guestAgentSocket: null, status: 'unreachable', disks: [], error: { code: 'MOB_ERR_QMP', message: 'ECONNREFUSED' } },
        { name: 'empty', machineId: 'x', qmpSocket: '/run/q/5.qmp', guestAgentSocket: null, status: 'running', disks: [] },
        { name: 'broken', qmpSocket: 7, disks: 'none' },
      ],
    },
  });
  let row: Json | undefined;
  await waitFor(async () => {
    row = ((await http('GET', '/v1/machines')).json.machines as Json[]).find((m) => m.agentId === host.agentId);
    return Array.isArray(row?.vms);
  }, 30_000, 'the inventory is stored');
  const vms = row!.vms as Json[];
  t.same(vms.map((v) => [v.name, v.agentId]), [['dead', `${host.agentId}.dead`], ['empty', `${host.agentId}.empty`], ['twin', `${host.agentId}.twin`], ['twin', `${host.agentId}.twin`], ['web', `${host.agentId}.web`]],
    'machine ids are the server\'s (host.name), never the host\'s claim; an entry without the needed fields is left out');

  const enable = (body: Json) => http('POST', '/v1/enable', body);
  const refusals: [string, Json, number, string, RegExp][] = [
    ['an unknown VM', { machine: host.agentId, vm: 'nope' }, 404, 'MOB_ERR_UNKNOWN_VM', /no VM named "nope"[\s\S]*its VMs: web, twin, twin, dead \(unreachable\), empty/],
    ['two VMs with one machine id', { machine: host.agentId, vm: 'twin' }, 404, 'MOB_ERR_UNKNOWN_VM', /2 VMs that map to machine .*\.twin \(twin at \/run\/q\/2\.qmp, twin at \/run\/q\/3\.qmp\)/],
    ['a VM that could not be inspected', { machine: host.agentId, vm: 'dead' }, 404, 'MOB_ERR_UNKNOWN_VM', /could not inspect VM dead[\s\S]*ECONNREFUSED/],
    ['a VM without disks', { machine: host.agentId, vm: 'empty' }, 404, 'MOB_ERR_UNKNOWN_VM', /no disk to protect/],
    ['a machine that is not a host', { machine: other.agentId, vm: 'web' }, 404, 'MOB_ERR_UNKNOWN_VM', /not a host agent/],
    ['an unknown host', { machine: 'nohost', vm: 'web' }, 404, 'MOB_ERR_UNKNOWN_MACHINE', /nohost/],
    ['a disk with --vm', { machine: host.agentId, vm: 'web', disk: '/dev/sdb' }, 400, 'MOB_ERR_USAGE', /give no disk/],
    ['profile-only with --vm', { machine: host.agentId, vm: 'web', profileOnly: true }, 400, 'MOB_ERR_USAGE', /profil/],
    ['vm not a string', { machine: host.agentId, vm: 5 }, 400, 'MOB_ERR_USAGE', /vm is required/],
    ['an unknown policy', { machine: host.agentId, vm: 'web', policy: 'nope' }, 404, 'MOB_ERR_UNKNOWN_POLICY', /nope/],
  ];
  for (const [what, body, status, code, msg] of refusals) {
    const r = await enable(body);
    t.equal(r.status, status, `${what}: HTTP ${status}`);
    t.equal(r.json.code, code, `${what}: ${code}`);
    t.match(String(r.json.message), msg, `${what}: the message`);
  }
  t.same(((await http('GET', '/v1/machines')).json.machines as Json[]).find((m) => m.agentId === host.agentId)!.vms!, vms, 'the refusals changed nothing');

  // a control message for a machine that is not a VM of this host is dropped, the connection stays
  h.send({ type: 'event', machineId: other.agentId, event: { event: 'cut-failed', code: 'MOB_ERR_CUT', message: 'forged' } });
  h.send({ type: 'event', machineId: 'nobody.at-all', event: { event: 'state', disk: 'a', state: 'continuous', reason: 'x' } });
  h.send({ type: 'inventory', inventory: { machineId: host.machineId, hostname: 'kvm', disks: [], nics: [], vms: [] } });
  await waitFor(async () => (((await http('GET', '/v1/machines')).json.machines as Json[]).find((m) => m.agentId === host.agentId)!.vms as Json[]).length === 0, 30_000, 'the next inventory is applied');
  t.notOk(h.closed, 'the connection is still open');
  // a machineId that is not a string ends it, coded
  h.send({ type: 'event', machineId: 42, event: { event: 'state' } });
  await waitFor(() => h.closed, 30_000, 'the server closes the connection');
  t.match(h.msgs.find((m) => m.type === 'error'), { code: 'MOB_ERR_FRAME_MALFORMED', message: /machineId/ });
});
