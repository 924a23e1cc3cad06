import t from 'tap';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import { execFileSync, spawn } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { MobilityError } from '../../src/errors.js';
import { ensureTlsIdentity } from '../../src/transport/tls.js';
import { formatPreflight, preflightError, runPreflight, type PreflightCheck } from '../../src/install/preflight.js';
import { runCli, tmpDir } from '../helpers.js';

// Runs as root against a real loop device, the real kernel tracefs and real
// loopback HTTP(S) servers. A missing losetup or tracefs fails, never skips.

const TRACEFS = '/sys/kernel/tracing';
const MiB = 1024 * 1024;
const PREFLIGHT_JS = path.join(path.dirname(fileURLToPath(import.meta.url)), '../../src/install/preflight.js');

type Teardown = { teardown(fn: () => unknown): void };

function byId(checks: PreflightCheck[], id: string): PreflightCheck {
  const c = checks.find((x) => x.id === id);
  if (!c) throw new Error(`no check '${id}' in ${JSON.stringify(checks.map((x) => x.id))}`);
  return c;
}

/** A real HTTP(S) server on an ephemeral loopback port, closed in teardown. */
async function listen(t: Teardown, handler: http.RequestListener, tls?: { key: string; cert: string }): Promise<number> {
  const srv = tls ? https.createServer(tls, handler) : http.createServer(handler);
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => { srv.closeAllConnections(); srv.close(() => resolve()); }));
  return (srv.address() as net.AddressInfo).port;
}

/** /v1/time answering the local clock shifted by offsetMs. */
const timeHandler = (offsetMs: number): http.RequestListener => (req, res) => {
  if (req.url !== '/v1/time') { res.writeHead(404).end(); return; }
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ nowMs: Date.now() + offsetMs }));
};

/** A port nothing listens on: bind one, note it, close it. */
async function closedPort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

/** A 64 MiB loop device over a sparse file, detached in teardown. */
async function loopDevice(t: Teardown): Promise<{ dev: string; img: string }> {
  const dir = await tmpDir(t, 'mobility-preflight-');
  const img = path.join(dir, 'disk.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 64 * MiB);
  const dev = execFileSync('losetup', ['--find', '--show', img], { encoding: 'utf8' }).trim();
  t.teardown(() => { try { execFileSync('losetup', ['-d', dev]); } catch { /* ignore */ } });
  return { dev, img };
}

function leftoverInstances(): string[] {
  return fs.readdirSync(path.join(TRACEFS, 'instances')).filter((n) => n.startsWith(`mobility-preflight-${process.pid}-`));
}

t.test('host checks pass on the test VM', async (t) => {
  const stateDir = await tmpDir(t);
  const checks = await runPreflight({ stateDir, only: ['root', 'os', 'node', 'disk-space'] });
  t.same(checks.map((c) => c.id), ['root', 'os', 'node', 'disk-space'], 'selected checks, in a stable order');
  for (const c of checks) {
    t.ok(c.ok, `${c.id}: ${c.message}`);
    t.equal(c.code, undefined);
    t.type(c.ms, 'number');
  }
  t.match(byId(checks, 'disk-space').message, /free at .* needed/);
});

t.test('disk-space: too little free space, a state dir that does not exist yet, an unusable one', async (t) => {
  const dir = await tmpDir(t);
  const [low] = await runPreflight({ stateDir: dir, only: ['disk-space'], minFreeBytes: Number.MAX_SAFE_INTEGER });
  t.equal(low.ok, false);
  t.equal(low.code, 'MOB_ERR_PRE_LOW_DISK');
  t.match(low.message, /free at .* needed/, 'says how much is free and how much is needed');
  t.ok(low.fix, 'has a fix');

  const missing = path.join(dir, 'not', 'yet', 'created');
  const [anc] = await runPreflight({ stateDir: missing, only: ['disk-space'] });
  t.ok(anc.ok, anc.message);
  t.match(anc.message, `${dir} (nearest existing ancestor of ${missing})`);
  t.notOk(fs.existsSync(path.join(dir, 'not')), 'nothing is created');

  // an exception inside a check (statfs: ENOTDIR) becomes a failed check with the check's code
  fs.writeFileSync(path.join(dir, 'file'), '');
  const [bad] = await runPreflight({ stateDir: path.join(dir, 'file', 'state'), only: ['disk-space'] });
  t.equal(bad.ok, false);
  t.equal(bad.code, 'MOB_ERR_PRE_LOW_DISK');
  t.match(bad.message, /ENOTDIR/);
});

t.test('tracefs: the real one passes and leaves no instance; an empty root fails', async (t) => {
  t.ok(fs.existsSync(path.join(TRACEFS, 'instances')), 'the test VM has tracefs mounted');
  const stateDir = await tmpDir(t);
  const [ok] = await runPreflight({ stateDir, only: ['tracefs'] });
  t.ok(ok.ok, ok.message);
  t.same(leftoverInstances(), [], 'the probe instance was removed');

  // concurrent calls (two disks enabled at once) do not trip over each other's probe instance
  const many = await Promise.all([1, 2, 3, 4].map(() => runPreflight({ stateDir, only: ['tracefs'], tracefsRoot: TRACEFS })));
  t.same(many.map(([c]) => c.ok), [true, true, true, true]);
  t.same(leftoverInstances(), []);

  const empty = await tmpDir(t);
  const [bad] = await runPreflight({ stateDir, only: ['tracefs'], tracefsRoot: empty });
  t.equal(bad.ok, false);
  t.equal(bad.code, 'MOB_ERR_PRE_NO_TRACEFS');
  t.match(bad.message, empty);
  t.match(bad.fix, 'mount -t tracefs nodev /sys/kernel/tracing');
  t.same(fs.readdirSync(empty), [], 'nothing created in the empty root');
});

t.test('server-port and clock against real loopback servers', async (t) => {
  const stateDir = await tmpDir(t);
  const only = ['server-port', 'clock'];

  const good = await listen(t, timeHandler(0));
  const ok = await runPreflight({ stateDir, only, serverUrl: `ws://127.0.0.1:${good}` });
  t.same(ok.map((c) => c.id), ['server-port', 'clock']);
  t.ok(byId(ok, 'server-port').ok, byId(ok, 'server-port').message);
  t.ok(byId(ok, 'clock').ok, byId(ok, 'clock').message);
  t.match(byId(ok, 'clock').message, '/v1/time');

  const off = await listen(t, timeHandler(-10 * 60_000));
  const skew = byId(await runPreflight({ stateDir, only, serverUrl: `ws://127.0.0.1:${off}` }), 'clock');
  t.equal(skew.ok, false);
  t.equal(skew.code, 'MOB_ERR_PRE_CLOCK_SKEW');
  t.match(skew.message, /behind/);
  t.match(skew.fix, /timedatectl set-ntp true|chrony/);

  // not JSON: the Date header (which Node's http server sets) is used instead
  const plain = await listen(t, (_req, res) => { res.writeHead(200, { 'content-type': 'text/plain' }); res.end('hello'); });
  const viaDate = byId(await runPreflight({ stateDir, only, serverUrl: `http://127.0.0.1:${plain}` }), 'clock');
  t.ok(viaDate.ok, viaDate.message);
  t.match(viaDate.message, 'Date header');

  // ... and a Date header 10 minutes ahead is skew too (an error status does not matter: only the time is read)
  const aheadDate = await listen(t, (_req, res) => {
    res.writeHead(401, { date: new Date(Date.now() + 10 * 60_000).toUTCString(), 'content-type': 'application/json' });
    res.end('{"code":"MOB_ERR_AUTH"}');
  });
  const ahead = byId(await runPreflight({ stateDir, only, serverUrl: `ws://127.0.0.1:${aheadDate}`, maxSkewMs: 60_000 }), 'clock');
  t.equal(ahead.code, 'MOB_ERR_PRE_CLOCK_SKEW');
  t.match(ahead.message, /ahead/);

  // wss:// probes over HTTPS and trusts any certificate (the server's own private CA here)
  const id = await ensureTlsIdentity(await tmpDir(t));
  const tlsPort = await listen(t, timeHandler(0), { key: id.key, cert: id.cert });
  const tls = await runPreflight({ stateDir, only, serverUrl: `wss://127.0.0.1:${tlsPort}` });
  t.ok(tls.every((c) => c.ok), formatPreflight(tls));

  const closed = await closedPort();
  const down = await runPreflight({ stateDir, only, serverUrl: `wss://127.0.0.1:${closed}`, timeoutMs: 2000 });
  t.same(down.map((c) => c.id), ['server-port'], 'no clock check when the port is unreachable');
  t.equal(down[0].ok, false);
  t.equal(down[0].code, 'MOB_ERR_PRE_UNREACHABLE');
  t.match(down[0].message, `127.0.0.1:${closed}`);
  t.match(down[0].fix, /firewall/);
  t.match(down[0].fix, /--listen/);

  const noServer = await runPreflight({ stateDir, only });
  t.same(noServer, [], 'no server URL: no network checks');
});

t.test('disk checks with a real loop device', async (t) => {
  const stateDir = await tmpDir(t);
  const { dev, img } = await loopDevice(t);
  const link = path.join(await tmpDir(t), 'by-id-link');
  await fsp.symlink(dev, link);
  const missing = path.join(stateDir, 'no-such-disk');

  const checks = await runPreflight({ stateDir, only: ['disk'], disks: [dev, link, img, missing] });
  t.same(checks.map((c) => c.id), [`disk:${dev}`, `disk:${link}`, `disk:${img}`, `disk:${missing}`]);
  const [loop, viaLink, file, gone] = checks;
  t.ok(loop.ok, loop.message);
  t.match(loop.message, '64.0 MiB');
  t.ok(viaLink.ok, `a symlink is resolved: ${viaLink.message}`);
  t.equal(file.code, 'MOB_ERR_PRE_DISK_NOT_FOUND');
  t.match(file.message, 'not a block device');
  t.equal(gone.code, 'MOB_ERR_PRE_DISK_NOT_FOUND');
  t.match(gone.message, 'does not exist');
  t.ok(gone.fix);

  const [big] = await runPreflight({ stateDir, only: ['disk'], disks: [dev], maxDiskBytes: 32 * MiB });
  t.equal(big.ok, false);
  t.equal(big.code, 'MOB_ERR_PRE_DISK_SIZE');
  t.match(big.message, /64\.0 MiB.*32\.0 MiB/);

  const [picked] = await runPreflight({ stateDir, only: [`disk:${dev}`], disks: [dev, img] });
  t.equal(picked.id, `disk:${dev}`, 'one disk selected by its id');
});

t.test('everything together; preflightError and formatPreflight', async (t) => {
  const stateDir = path.join(await tmpDir(t), 'state');
  const { dev } = await loopDevice(t);
  const port = await listen(t, timeHandler(0));
  const all = await runPreflight({ stateDir, disks: [dev], serverUrl: `ws://127.0.0.1:${port}` });
  t.same(all.map((c) => c.id), ['root', 'os', 'node', 'disk-space', 'tracefs', 'server-port', 'clock', `disk:${dev}`]);
  t.ok(all.every((c) => c.ok), formatPreflight(all));
  t.equal(preflightError(all), null, 'null when all ok');
  t.same(leftoverInstances(), []);
  const okText = formatPreflight(all);
  t.ok(okText.endsWith('\n'), 'every line ends with a newline, the last one too');
  const okLines = okText.slice(0, -1).split('\n');
  t.equal(okLines.length, all.length, 'one line per check');
  t.match(okLines[0], /^ok {4}root {2}\S/);

  const empty = await tmpDir(t);
  const closed = await closedPort();
  const mixed = await runPreflight({
    stateDir, disks: [dev, '/nonexistent/disk'], serverUrl: `ws://127.0.0.1:${closed}`, tracefsRoot: empty, minFreeBytes: Number.MAX_SAFE_INTEGER,
  });
  const failed = mixed.filter((c) => !c.ok).map((c) => c.code);
  t.same(failed, ['MOB_ERR_PRE_LOW_DISK', 'MOB_ERR_PRE_NO_TRACEFS', 'MOB_ERR_PRE_UNREACHABLE', 'MOB_ERR_PRE_DISK_NOT_FOUND']);
  const err = preflightError(mixed);
  t.ok(err instanceof MobilityError);
  t.equal(err?.code, 'MOB_ERR_PREFLIGHT');
  for (const c of mixed.filter((x) => !x.ok)) {
    t.match(err?.message, `${c.id}: ${c.code}: ${c.message} (fix: ${c.fix})`, `lists ${c.code}`);
  }
  const lines = formatPreflight(mixed).slice(0, -1).split('\n');
  t.equal(lines.length, mixed.length, 'one line per check');
  const tracefsLine = lines.find((l) => l.includes(' tracefs '));
  t.match(tracefsLine, /^FAIL {2}tracefs {2}MOB_ERR_PRE_NO_TRACEFS: .* \(fix: mount -t tracefs/);
  t.match(lines.find((l) => l.includes(' root ')), /^ok {4}root {2}/);
});

t.test('as root, a refusal by the kernel is not "run as root": the path, the errno and the fixes', { skip: process.geteuid?.() !== 0 ? 'needs root' : false }, async (t) => {
  // a tracefs-like root whose instances/ is sysfs: mkdir there is refused to root with EPERM,
  // as tracefs is in a container without the capability or under kernel lockdown
  const root = await tmpDir(t, 'fake-tracefs-');
  await fsp.mkdir(path.join(root, 'events', 'block', 'block_rq_complete'), { recursive: true });
  await fsp.writeFile(path.join(root, 'events', 'block', 'block_rq_complete', 'enable'), '0\n');
  await fsp.symlink('/sys/kernel', path.join(root, 'instances'));
  const [c] = await runPreflight({ stateDir: root, only: ['tracefs'], tracefsRoot: root });
  t.equal(c.ok, false);
  t.equal(c.code, 'MOB_ERR_PRE_NO_TRACEFS', 'not MOB_ERR_PRE_NOT_ROOT: the agent is root');
  t.match(c.message, /tracefs refused root: mkdir .*instances\/mobility-preflight-\d+-\d+ failed with EPERM \(operation not permitted\)/, c.message);
  t.notMatch(c.fix, /run the agent as root/);
  t.match(c.fix, /container/);
  t.match(c.fix, /CAP_SYS_ADMIN/);
  t.match(c.fix, /lockdown/);
  t.match(c.fix, /mount -t tracefs/);
});

t.test('mobility preflight: one line per check, the summary on a line of its own', async (t) => {
  const stateDir = await tmpDir(t);
  const r = await runCli(['preflight', '--state-dir', stateDir, '--disk', '/nonexistent/disk']).done;
  t.equal(r.code, 3, 'a failed check: exit 3');
  const lines = r.stdout.split('\n');
  t.equal(lines.pop(), '', 'the output ends with a newline');
  t.equal(lines.pop(), 'preflight: FAILED', 'the summary is the last line, alone');
  t.ok(lines.length >= 5, 'a line per check before it');
  for (const l of lines) t.match(l, /^(ok {4}|FAIL {2})\S+ {2}\S/, `a check line: ${l}`);
  t.match(lines.find((l) => l.includes('disk:/nonexistent/disk')), /^FAIL {2}disk:\/nonexistent\/disk {2}MOB_ERR_PRE_DISK_NOT_FOUND: .*does not exist/);
  t.match(r.stderr, /^MOBILITY-PREFLIGHT fail MOB_ERR_PRE_/m);
});

t.test('bad options throw MOB_ERR_USAGE', async (t) => {
  const stateDir = await tmpDir(t);
  await t.rejects(runPreflight({ stateDir, only: ['tracfs'] }), { code: 'MOB_ERR_USAGE' }, 'unknown check id');
  await t.rejects(runPreflight({ stateDir, serverUrl: 'ftp://server:21' }), { code: 'MOB_ERR_USAGE' }, 'unsupported scheme');
  await t.rejects(runPreflight({ stateDir, serverUrl: 'server:7443' }), { code: 'MOB_ERR_USAGE' }, 'not a URL with a scheme');
});

t.test('as an unprivileged user: root and tracefs fail with MOB_ERR_PRE_NOT_ROOT', async (t) => {
  const stateDir = await tmpDir(t);
  const script = `const m = await import(${JSON.stringify(pathToFileURL(PREFLIGHT_JS).href)});
process.stdout.write(JSON.stringify(await m.runPreflight({ stateDir: ${JSON.stringify(stateDir)}, only: ['root', 'tracefs'] })));`;
  // env -u: tap hooks every spawn with NODE_OPTIONS, whose exit hook cannot write to the root-owned .tap/ as nobody
  const child = spawn('env', ['-u', 'NODE_OPTIONS', process.execPath, '--input-type=module', '-e', script], {
    uid: 65534, gid: 65534, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let errOut = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (errOut += d.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
  t.equal(code, 0, errOut);
  const checks = JSON.parse(out) as PreflightCheck[];
  t.equal(byId(checks, 'root').code, 'MOB_ERR_PRE_NOT_ROOT');
  t.equal(byId(checks, 'tracefs').code, 'MOB_ERR_PRE_NOT_ROOT');
  t.match(byId(checks, 'tracefs').fix, 'root');
});
