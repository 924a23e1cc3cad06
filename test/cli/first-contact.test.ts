/**
 * What a new user meets first (issue 14, item 6), with real `mobility server` processes on
 * loopback and the real CLI: --help and --version of every command, one set of connection
 * options for every operator command (--data-dir | --token-file with --ca/--pin; --server)
 * and a coded hint when none is given, certificate refusals as MOB_ERR_TLS_PIN (exit 4) for
 * the operator API and the agent's WebSocket, the token kept back until the certificate
 * passed, each disk's own RPO alert threshold in status, and the header of `points`.
 * Nothing here needs root.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import WebSocket from 'ws';
import { AGENT_VERSION, PROTOCOL_VERSION } from '../../src/constants.js';
import { registerAgent } from '../../src/install/register.js';
import { digestBytes } from '../../src/protocol/digest.js';
import { Encoding, decodeMessage, encodeMessage, type CutDisk } from '../../src/protocol/frame-codec.js';
import { ensureTlsIdentity } from '../../src/transport/tls.js';
import { runCli, startServer, tmpDir } from '../helpers.js';

const cli = (args: string[]) => runCli(args).done;

/** Runs the commands a few at a time (2 cores; each is a Node process). */
async function each<T>(items: T[], fn: (x: T) => Promise<void>, parallel = 3): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: parallel }, async () => {
    while (next < items.length) await fn(items[next++]);
  }));
}

t.test('--help on every command and subcommand: its help on stdout, exit 0', async (t) => {
  const main = await cli(['--help']);
  t.equal(main.code, 0);
  // the commands the main help lists: two-space indented names in its command sections
  const commands = [...main.stdout.matchAll(/^ {2}([a-z][a-z-]+) {2,}\S/gm)].map((m) => m[1]);
  t.ok(commands.length >= 20, `the main help lists the commands (${commands.join(' ')})`);
  for (const c of ['status', 'machines', 'policy', 'passphrase', 'push-account', 'preflight']) t.ok(commands.includes(c), `${c} is listed`);
  const subcommands = [['policy', 'create'], ['policy', 'list'], ['policy', 'assign'], ['passphrase', 'show'], ['passphrase', 'rotate'],
    ['token', 'create'], ['push-account', 'add'], ['push-account', 'list'], ['push-account', 'remove'],
    ['group', 'create'], ['group', 'list'], ['group', 'delete'], ['group', 'cut']];
  const runs: string[][] = [
    ...commands.map((c) => [c, '--help']), ...subcommands.map((s) => [...s, '--help']),
    ['policy', '-h'], ['status', '--bogus', '--help'], ['help', 'policy'], ['help', 'passphrase'], ['help', 'group'], ['help'], ['-h'],
  ];
  await each(runs, async (args) => {
    const r = await cli(args);
    t.equal(r.code, 0, `mobility ${args.join(' ')}: exit 0 (${r.stderr.trim()})`);
    t.match(r.stdout, /Usage/, `mobility ${args.join(' ')}: the help on stdout`);
    t.equal(r.stderr, '', `mobility ${args.join(' ')}: nothing on stderr`);
  });
  const policy = await cli(['policy', '--help']);
  t.match(policy.stdout, /mobility policy create NAME/, 'policy --help is the policy help');
  t.match(policy.stdout, /--data-dir DIR/, 'with the connection options');
  const unknown = await cli(['help', 'no-such-command']);
  t.equal(unknown.code, 2, 'help of an unknown command is a usage error');
  const none = await cli([]);
  t.equal(none.code, 2, 'no command: the main help, exit 2 (unchanged)');

  // --help is only help: nothing is done
  const dir = await tmpDir(t, 'help-');
  const rot = await cli(['passphrase', 'rotate', '--data-dir', dir, '--help']);
  t.equal(rot.code, 0);
  t.notOk(fs.existsSync(path.join(dir, 'passphrase')), 'passphrase rotate --help rotates nothing');
});

t.test('--version and version: the package version, exit 0', async (t) => {
  const pkg = JSON.parse(fs.readFileSync(fileURLToPath(new URL('../../../package.json', import.meta.url)), 'utf8')) as { version: string };
  t.equal(AGENT_VERSION, pkg.version, 'AGENT_VERSION is the version of package.json');
  for (const args of [['--version'], ['version'], ['-V']]) {
    const r = await cli(args);
    t.equal(r.code, 0, `mobility ${args[0]}`);
    t.equal(r.stdout, `mobility ${pkg.version} (protocol ${PROTOCOL_VERSION})\n`);
    t.equal(r.stderr, '');
  }
});

/** Every operator command, with what it needs besides the connection (nothing that reaches a server before the connection is resolved). */
const OPERATOR_COMMANDS: string[][] = [
  ['status'], ['points', '--agent-id', 'web1'], ['test-failover', '--agent-id', 'web1'], ['failover', '--agent-id', 'web1'],
  ['reprotect', '--agent-id', 'web1', '--disk', '/nonexistent=d0', '--yes'], ['token', 'create'], ['machines'], ['policy', 'list'],
  ['policy', 'create', 'gold'], ['policy', 'assign', '--machine', 'm', '--policy', 'gold'], ['enable', '--machine', 'm', '--disk', '/dev/x'],
  ['disable', '--machine', 'm', '--disk', 'd0', '--keep-replica'], ['cut', '--machine', 'm'], ['push-install', '--host', 'h', '--user', 'u', '--key', 'k'],
];

t.test('every operator command takes the same connection options; none given: a coded hint', async (t) => {
  const empty = await tmpDir(t, 'not-a-data-dir-');
  // no saved profile either (test/cli/profiles.test.ts covers them)
  const env = { ...process.env, MOBILITY_CONFIG_DIR: path.join(empty, 'no-config'), MOBILITY_PROFILE: '' };
  await each(OPERATOR_COMMANDS, async (args) => {
    const none = await runCli(args, env).done;
    t.equal(none.code, 2, `${args[0]} without a connection: exit 2`);
    t.match(none.stderr, 'MOB_ERR_USAGE: no server connection given: pass --data-dir DIR (on the server) or --server URL --token-file F', `${args.join(' ')}: says what to pass`);
    t.match(none.stderr, 'mobility login', 'and how to save a connection once');
    const dd = await cli([...args, '--data-dir', empty]);
    t.equal(dd.code, 3, `${args.join(' ')} --data-dir: accepted, and a directory without a token is a configuration error`);
    t.match(dd.stderr, `MOB_ERR_CONFIG: ${empty} is not a server data directory`);
  });
  const missing = await cli(['machines', '--data-dir', path.join(empty, 'nope')]);
  t.equal(missing.code, 3);
  t.match(missing.stderr, /no server data directory at .*nope/);
});

/**
 * A token session of agent `agentId` that writes one block of a 1 MiB disk d0, ends its initial
 * pass and sends a crash-consistent cut whose sampled page matches: the server records a
 * recovery point. Resolves with its id.
 */
async function recordPoint(url: string, ca: string, token: string, agentId: string): Promise<string> {
  const ws = new WebSocket(`${url}/v1/replicate`, { ca });
  ws.on('error', () => undefined);
  const block = Buffer.alloc(65536, 0x5a);
  const answer = new Promise<string>((resolve, reject) => {
    ws.on('message', (d) => {
      const f = decodeMessage(d as Buffer);
      if (f.type === 'error') reject(new Error(`${f.error.code}: ${f.error.message}`));
      if (f.type === 'cutAck') {
        if (f.cutAck.errorCode) reject(new Error(`${f.cutAck.errorCode}: ${f.cutAck.errorMessage}`));
        else resolve(f.cutAck.pointId);
      }
    });
    ws.on('close', () => reject(new Error('closed before the cut was acknowledged')));
  });
  await new Promise<void>((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject); });
  ws.send(encodeMessage({ type: 'hello', hello: { protocolVersion: PROTOCOL_VERSION, agentId, token, agentVersion: 'test', disks: [{ diskId: 'd0', sizeBytes: 1 << 20, blockSize: 65536, pageSize: 4096 }] } }));
  ws.send(encodeMessage({ type: 'data', data: { disk: 0, seq: 1, blocks: [{ index: 0, encoding: Encoding.RAW, length: block.length, pageMask: Buffer.alloc(0), digest: digestBytes(block) }] } }, block));
  ws.send(encodeMessage({ type: 'passEnd', passEnd: { disk: 0, seq: 2, kind: 'initial' } }));
  ws.send(encodeMessage({ type: 'cut', cut: { cutId: 1, kind: 'crash', takenAtMs: Date.now(), frozenMs: 3, note: '', disks: [{ disk: 0, seq: 2, samplePages: [0], sampleDigests: digestBytes(block.subarray(0, 4096)) } as CutDisk] } }));
  try {
    return await answer;
  } finally {
    ws.close();
  }
}

t.test('status: each disk carries the RPO alert threshold of its machine\'s policy; points: a header row; --data-dir works', async (t) => {
  const dir = await tmpDir(t, 'first-contact-');
  const server = await startServer(t, path.join(dir, 'srv'));
  const { url, dataDir, caFile, tokenFile } = server.info;
  const conn = ['--data-dir', dataDir, '--server', url];
  const token = (await fsp.readFile(tokenFile, 'utf8')).trim();
  const pointId = await recordPoint(url, await fsp.readFile(caFile!, 'utf8'), token, 'web1');
  t.match(pointId, /^rp-/, 'the server recorded a recovery point');

  for (const args of [['status'], ['machines'], ['policy', 'list'], ['points', '--agent-id', 'web1']]) {
    const r = await cli([...args, ...conn]);
    t.equal(r.code, 0, `${args[0]} --data-dir: ${r.stderr}`);
  }

  type Status = { rpoAlertMs: number; disks: { agent: string; disk: string; rpoMs: number; rpoAlertMs: number; rpoAlert: boolean }[] };
  const status = async () => {
    const r = await cli(['status', ...conn, '--json']);
    t.equal(r.code, 0, r.stderr);
    return JSON.parse(r.stdout) as Status;
  };
  const before = await status();
  t.equal(before.rpoAlertMs, 15 * 60_000, 'top level: the server-wide default');
  t.equal(before.disks[0].rpoAlertMs, 15 * 60_000, 'an unregistered (token) agent: the server default');

  // the agent registers (same id), and its machine gets a policy with a 2 min threshold
  const passFile = path.join(dataDir, 'passphrase');
  const midFile = path.join(dir, 'machine-id');
  await fsp.writeFile(midFile, 'cd'.repeat(16) + '\n');
  const reg = await registerAgent({ server: url, stateDir: path.join(dir, 'agent'), kind: 'passphrase', secret: (await fsp.readFile(passFile, 'utf8')).trim(), machineIdFile: midFile, hostname: 'web1' });
  t.equal(reg.agentId, 'web1');
  for (const args of [['policy', 'create', 'gold', '--rpo', '2m'], ['policy', 'assign', '--machine', 'web1', '--policy', 'gold']]) {
    const r = await cli([...args, ...conn]);
    t.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
  }
  const after = await status();
  t.equal(after.rpoAlertMs, 15 * 60_000, 'top level: still the server-wide default');
  const disk = after.disks.find((d) => d.agent === 'web1' && d.disk === 'd0');
  t.equal(disk?.rpoAlertMs, 120_000, 'the disk: its policy\'s threshold');
  t.equal(disk?.rpoAlert, disk!.rpoMs > 120_000, 'the alert is judged against it');

  const text = await cli(['status', ...conn]);
  t.equal(text.code, 0, text.stderr);
  const [head, row] = text.stdout.split('\n');
  t.match(head, /^AGENT\s+DISK\s+STATE\s+RPO\s+RPO ALERT\s+LAG/, 'the table has an RPO ALERT column');
  const col = head.indexOf('RPO ALERT');
  t.equal(row.slice(col).split(/\s{2,}/)[0], '2.0 min', 'showing the policy threshold');

  const pts = await cli(['points', ...conn, '--agent-id', 'web1']);
  t.equal(pts.code, 0, pts.stderr);
  const lines = pts.stdout.trimEnd().split('\n');
  t.match(lines[0], /^POINT\s+TAKEN AT\s+KIND\s+FROZEN\s+DISKS\s+VERIFIED\s+GROUP POINT\s+NOTE$/, 'points: a header row');
  t.equal(lines.length, 2, 'and one row per point');
  t.match(lines[1], new RegExp(`^${pointId}\\s+\\d{4}-\\d\\d-\\d\\dT\\S+\\s+crash\\s+3 ms\\s+d0\\s+\\d+ pages\\s+-`));
  const noPoints = await cli(['points', ...conn, '--agent-id', 'nobody']);
  t.equal(noPoints.stdout, 'no recovery points for agent nobody\n');
});

/** An HTTPS server with its own (valid, unrelated) TLS identity that records the requests it gets. */
async function recordingServer(t: Test): Promise<{ port: number; fingerprint: string; authorizations: (string | undefined)[] }> {
  const id = await ensureTlsIdentity(await tmpDir(t, 'recorder-'));
  const authorizations: (string | undefined)[] = [];
  const srv = https.createServer({ key: id.key, cert: id.cert }, (req, res) => {
    authorizations.push(req.headers.authorization);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end('{"disks":[]}');
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  t.teardown(() => new Promise<void>((r) => { srv.closeAllConnections(); srv.close(() => r()); }));
  return { port: (srv.address() as AddressInfo).port, fingerprint: id.fingerprint256, authorizations };
}

t.test('certificate refusals are MOB_ERR_TLS_PIN (exit 4), not unreachable, and the token stays back', async (t) => {
  const dir = await tmpDir(t, 'tls-');
  const server = await startServer(t, path.join(dir, 'srv'));
  const { url, dataDir, tokenFile, caFile, fingerprint } = server.info;
  // another server's CA: a valid PEM, the same subject name ("Mobility CA"), another key
  const otherCa = (await ensureTlsIdentity(path.join(dir, 'other'))).caFile;
  const ops = ['--server', url, '--token-file', tokenFile];

  const wrongCa = await cli(['status', ...ops, '--ca', otherCa]);
  t.equal(wrongCa.code, 4, 'a wrong CA: exit 4');
  t.match(wrongCa.stderr, /MOB_ERR_TLS_PIN: the server certificate is not signed by the given CA/);
  t.match(wrongCa.stderr, otherCa, 'naming the CA file');
  const wrongCaDataDir = await cli(['machines', '--data-dir', dataDir, '--server', url, '--ca', otherCa]);
  t.equal(wrongCaDataDir.code, 4, '--ca given with --data-dir takes precedence, and is refused the same way');
  const wrongPin = await cli(['status', ...ops, '--pin', 'AB'.repeat(32)]);
  t.equal(wrongPin.code, 4, 'a wrong pin: exit 4');
  t.match(wrongPin.stderr, /MOB_ERR_TLS_PIN: the server certificate fingerprint .* does not match --pin/);
  const goodPin = await cli(['status', ...ops, '--pin', fingerprint!.replace(/:/g, '').toLowerCase()]);
  t.equal(goodPin.code, 0, `the right pin, any case, no colons: ${goodPin.stderr}`);
  const badPin = await cli(['status', ...ops, '--pin', 'abc']);
  t.equal(badPin.code, 2, 'a pin that is no SHA-256 fingerprint: usage');
  t.match(badPin.stderr, /MOB_ERR_USAGE: --pin wants the SHA-256 fingerprint/);
  const unpinned = await cli(['status', ...ops]);
  t.equal(unpinned.code, 4, 'no CA and no pin for wss://: refused before connecting');
  t.match(unpinned.stderr, /MOB_ERR_TLS_PIN: refusing an unpinned TLS connection/);
  const plain = await cli(['status', ...ops, '--server', url.replace('wss:', 'ws:')]);
  t.equal(plain.code, 5, 'ws:// to a TLS server: unreachable');
  t.match(plain.stderr, /use wss:\/\//);

  // the agent's WebSocket: the same refusals, the same code
  const img = path.join(dir, 'd.img');
  await fsp.writeFile(img, Buffer.alloc(65536, 1));
  const agentArgs = ['replicate', ...ops, '--disk', `${img}=d0`, '--state-dir', path.join(dir, 'agent'), '--agent-id', 'a1'];
  const agentWrongCa = await cli([...agentArgs, '--ca', otherCa]);
  t.equal(agentWrongCa.code, 4, 'replicate with a wrong CA: exit 4');
  t.match(agentWrongCa.stderr, /MOB_ERR_TLS_PIN/);
  t.notOk(fs.existsSync(path.join(dataDir, 'replicas', 'a1')), 'nothing reached the server');

  // a name the certificate does not hold: a server on 127.0.0.2 (its certificate names 127.0.0.1, localhost, ::1, the host name)
  const other = await startServer(t, path.join(dir, 'srv2'), { extraArgs: ['--listen', '127.0.0.2:0'] });
  t.match(other.info.url, /^wss:\/\/127\.0\.0\.2:/);
  const byName = await cli(['status', '--data-dir', other.info.dataDir, '--server', other.info.url]);
  t.equal(byName.code, 4, 'a host name the certificate does not hold: exit 4');
  t.match(byName.stderr, /MOB_ERR_TLS_PIN: the server certificate does not name 127\.0\.0\.2 .*--pin/);
  const byNamePinned = await cli(['status', '--token-file', other.info.tokenFile, '--pin', other.info.fingerprint!, '--server', other.info.url]);
  t.equal(byNamePinned.code, 0, `--pin checks no name: ${byNamePinned.stderr}`);
  const agentByName = await cli([...agentArgs, '--server', other.info.url, '--token-file', other.info.tokenFile, '--ca', other.info.caFile!]);
  t.equal(agentByName.code, 4, 'replicate to a name the certificate does not hold: exit 4');
  t.match(agentByName.stderr, /MOB_ERR_TLS_PIN/);

  // nothing listening: unreachable, exit 5 (distinct from the refusals)
  const down = await cli(['status', '--data-dir', dataDir, '--server', 'wss://127.0.0.1:9']);
  t.equal(down.code, 5);
  t.match(down.stderr, /MOB_ERR_UNREACHABLE/);

  // the bearer token goes out only on a connection whose certificate passed
  const rec = await recordingServer(t);
  const recUrl = `wss://127.0.0.1:${rec.port}`;
  const pinned = await cli(['status', '--server', recUrl, '--token-file', tokenFile, '--pin', fingerprint!]);
  t.equal(pinned.code, 4, 'the recorder is not the pinned server');
  const cad = await cli(['status', '--server', recUrl, '--token-file', tokenFile, '--ca', caFile!]);
  t.equal(cad.code, 4, 'nor signed by the given CA');
  t.same(rec.authorizations, [], 'no request, so no token, reached it');
  const ok = await cli(['status', '--server', recUrl, '--token-file', tokenFile, '--pin', rec.fingerprint]);
  t.equal(ok.code, 0, `pinned to the recorder itself: ${ok.stderr}`);
  t.same(rec.authorizations, [`Bearer ${(await fsp.readFile(tokenFile, 'utf8')).trim()}`], 'then the request (and the token) is sent');
});
