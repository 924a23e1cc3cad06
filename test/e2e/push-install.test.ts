/**
 * From a fresh server to a protected machine without editing a file, with real
 * peers: a real `mobility server`, a private sshd on 127.0.0.1, the real bundle
 * (npm run package), install.sh run over SSH into a temporary prefix, the agent
 * daemon registering with a one-time token, `mobility enable` of a loop device
 * pushed over the control channel, initial replication checked byte for byte.
 * Then an upgrade in place (same identity, no new initial copy), uninstall
 * (nothing left under the prefix, no agent process, no trace instance), and the
 * push failures that have stable codes (bad credentials, unreachable, host key,
 * not root).
 *
 * Needs root, sshd/ssh-keygen, losetup and tracefs: a missing one fails the test.
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { SpawnedServer } from '../../src/server/spawn.js';
import { SshPushInstaller, pushCodeFor } from '../../src/install/ssh-push.js';
import { cleanup, runCli, startServer, tmpDir, traceInstancesOf, waitFor } from '../helpers.js';
import { run, startSshd, type TestSshd } from '../sshd.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
/** Waits are safety nets against a hang, not speed requirements (the file's limit is 300 s). */
const LONG = 120_000;

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

async function listTree(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string) => {
    for (const e of await fsp.readdir(d, { withFileTypes: true }).catch(() => [])) {
      const p = path.join(d, e.name);
      out.push(path.relative(dir, p) + (e.isDirectory() ? '/' : ''));
      if (e.isDirectory()) await walk(p);
    }
  };
  await walk(dir);
  return out.sort();
}

function sha256(file: string, bytes: number): string {
  const fd = fs.openSync(file, 'r');
  const h = crypto.createHash('sha256');
  const buf = Buffer.alloc(1 << 20);
  let off = 0;
  while (off < bytes) {
    const n = fs.readSync(fd, buf, 0, Math.min(buf.length, bytes - off), off);
    if (n <= 0) break;
    h.update(buf.subarray(0, n));
    off += n;
  }
  fs.closeSync(fd);
  return h.digest('hex');
}

async function cli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return runCli(args).done;
}

async function bundlePath(): Promise<string> {
  // the suite runs from a fresh build (scripts/test.sh builds first); rebuilding here would rewrite files other test jobs are loading
  const r = await run('bash', [path.join(ROOT, 'scripts/package.sh'), '--skip-build']);
  if (r.code !== 0) throw new Error(`npm run package failed: ${r.stderr}\n${r.stdout}`);
  const dir = path.join(ROOT, 'dist/bundle');
  const f = (await fsp.readdir(dir)).filter((n) => n.endsWith('.tar.gz')).sort().pop();
  if (!f) throw new Error('no bundle was built');
  return path.join(dir, f);
}

t.test('push install over SSH, enable, initial replication, upgrade, uninstall', async (t) => {
  const work = await tmpDir(t, 'push-');
  const c = cleanup(t);
  const bundle = await bundlePath();
  const sshd: TestSshd = await startSshd(path.join(work, 'ssh'), c);
  t.teardown(() => sshd.stop());
  const server: SpawnedServer = await startServer(t, path.join(work, 'srv'));
  const conn = ['--server', server.info.url, '--data-dir', server.info.dataDir];
  const prefix = path.join(work, 'host-root');
  await fsp.mkdir(prefix);
  const before = await listTree(prefix);
  // install.sh starts the agent detached (setsid) with a pid file: killed with the test whatever happens
  c.pidFile(path.join(prefix, 'var/lib/mobility/agent.pid'), prefix);

  // a disk with data on it: the loop device the operator will protect
  const img = path.join(work, 'disk.img');
  sh('truncate', ['-s', '96M', img]);
  sh('dd', ['if=/dev/urandom', `of=${img}`, 'bs=1M', 'count=24', 'seek=8', 'conv=notrunc', 'status=none']);
  const loop = sh('losetup', ['--find', '--show', img]).trim();
  c.loop(loop);

  let agentId = '';
  const uninstall = async () => {
    const u = path.join(prefix, 'opt/mobility/uninstall.sh');
    if (fs.existsSync(u)) await run('bash', [u, '--prefix', prefix]);
  };
  t.teardown(uninstall);

  await t.test('push-install registers and starts the agent', async (t) => {
    const r = await cli(['push-install', ...conn, '--host', `127.0.0.1:${sshd.port}`, '--user', 'root', '--key', sshd.userKey,
      '--host-key', sshd.hostKeySha256, '--bundle', bundle, '--prefix', prefix, '--json', '--timeout', '180s']);
    t.equal(r.code, 0, `push-install exit code\n${r.stderr.slice(-4000)}`);
    const res = (JSON.parse(r.stdout) as { results: { ok: boolean; agentId?: string; code?: string; message: string }[] }).results;
    t.equal(res.length, 1);
    t.ok(res[0].ok, `host result: ${res[0].code} ${res[0].message}`);
    agentId = res[0].agentId ?? '';
    if (agentId) c.traceInstances(agentId);
    t.comment(`push install of one host took ${(res[0] as { ms?: number }).ms ?? '?'} ms (connect, preflight, upload, install, registration)`);
    t.ok(agentId, 'the agent registered and connected');
    // the install left its pieces where the layout says, secrets 0600
    const st = path.join(prefix, 'var/lib/mobility');
    for (const f of ['agent.key', 'agent.pem', 'identity.json']) t.equal(fs.statSync(path.join(st, f)).mode & 0o777, 0o600, `${f} is 0600`);
    t.ok(fs.existsSync(path.join(prefix, 'etc/systemd/system/mobility-agent.service')), 'unit written');
    t.notOk(fs.readdirSync(sshd.remoteTmp).some((n) => n.startsWith('mobility-push-') && fs.existsSync(path.join(sshd.remoteTmp, n, 'token'))), 'the uploaded token was removed');
    const m = await cli(['machines', ...conn, '--json']);
    const machines = (JSON.parse(m.stdout) as { machines: { agentId: string; connected: boolean; inventory: { os: { kernel: string } } | null; registeredWith: string }[] }).machines;
    const me = machines.find((x) => x.agentId === agentId);
    t.ok(me?.connected, 'machines shows it connected');
    t.match(me?.registeredWith ?? '', /^token /, 'registered with a one-time token');
    await waitFor(async () => {
      const j = JSON.parse((await cli(['machines', ...conn, '--json'])).stdout) as { machines: { agentId: string; inventory: unknown }[] };
      return Boolean(j.machines.find((x) => x.agentId === agentId)?.inventory);
    }, LONG, 'inventory');
  });

  await t.test('enable starts initial replication on the agent; the replica equals the disk', async (t) => {
    const e = await cli(['enable', ...conn, '--machine', agentId, '--disk', loop, '--disk-id', 'data']);
    t.equal(e.code, 0, e.stderr);
    await waitFor(async () => {
      const s = JSON.parse((await cli(['status', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--json'])).stdout) as { disks: { agent: string; disk: string; state: string; points: number }[] };
      const d = s.disks.find((x) => x.agent === agentId && x.disk === 'data');
      return d?.state === 'continuous' && d.points > 0;
    }, LONG, 'initial replication and a first recovery point');
    const size = fs.statSync(img).size;
    t.equal(sha256(path.join(server.info.dataDir, 'replicas', agentId, 'data', 'replica.img'), size), sha256(loop, size), 'replica == disk');
    // a second enable of a missing device fails its preflight with a code, nothing assigned
    const bad = await cli(['enable', ...conn, '--machine', agentId, '--disk', '/dev/mobility-no-such-disk']);
    t.equal(bad.code, 3);
    t.match(bad.stderr, /MOB_ERR_PREFLIGHT.*MOB_ERR_PRE_DISK_NOT_FOUND/);
  });

  await t.test('upgrade in place keeps identity and replication state', async (t) => {
    const gen = JSON.parse(fs.readFileSync(path.join(server.info.dataDir, 'replicas', agentId, 'data', 'state.json'), 'utf8')) as { generation: string };
    // this time through a stored push account, and with a second host that cannot be reached
    const acct = await cli(['push-account', 'add', '--data-dir', server.info.dataDir, '--name', 'lab', '--user', 'root', '--key', sshd.userKey]);
    t.equal(acct.code, 0, acct.stderr);
    const keyText = fs.readFileSync(sshd.userKey, 'utf8');
    const dbBytes = Buffer.concat(['config.db', 'config.db-wal'].map((f) => { try { return fs.readFileSync(path.join(server.info.dataDir, f)); } catch { return Buffer.alloc(0); } }));
    t.notOk(dbBytes.includes(Buffer.from(keyText.split('\n')[1])), 'the stored key is not in the database in clear');
    const r = await cli(['push-install', ...conn, '--host', `127.0.0.1:${sshd.port}`, '--host', '127.0.0.1:1', '--account', 'lab',
      '--bundle', bundle, '--prefix', prefix, '--json', '--timeout', '180s']);
    t.equal(r.code, 1, 'one host failed: exit 1');
    t.notOk(r.stderr.includes(keyText.split('\n')[1]), 'the key is not printed');
    const res = (JSON.parse(r.stdout) as { results: { host: string; ok: boolean; agentId?: string; code?: string }[] }).results;
    t.equal(res.length, 2);
    const good = res.find((x) => x.ok);
    const bad = res.find((x) => !x.ok);
    t.equal(good?.agentId, agentId, 'same agent id after the upgrade');
    t.equal(bad?.code, 'MOB_ERR_PUSH_UNREACHABLE', 'the unreachable host has its code; the other host was installed anyway');
    t.equal(fs.readdirSync(server.info.dataDir).filter((f) => f.startsWith('.push-key-')).length, 0, 'no key file left behind');
    await waitFor(async () => {
      const s = JSON.parse((await cli(['status', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--json'])).stdout) as { disks: { agent: string; disk: string; state: string; connected: boolean }[] };
      const d = s.disks.find((x) => x.agent === agentId && x.disk === 'data');
      return d?.state === 'continuous' && d.connected;
    }, LONG, 'protection resumed after the upgrade');
    const gen2 = JSON.parse(fs.readFileSync(path.join(server.info.dataDir, 'replicas', agentId, 'data', 'state.json'), 'utf8')) as { generation: string };
    t.equal(gen2.generation, gen.generation, 'the replica was kept (no new initial replication)');
    t.notOk(fs.existsSync(path.join(prefix, 'opt/mobility.new')) || fs.existsSync(path.join(prefix, 'opt/mobility.old')), 'no staging leftovers');
  });

  await t.test('disable, then uninstall leaves nothing behind', async (t) => {
    const d = await cli(['disable', ...conn, '--machine', agentId, '--disk', 'data', '--yes']);
    t.equal(d.code, 0, d.stderr);
    t.notOk(fs.existsSync(path.join(server.info.dataDir, 'replicas', agentId)), 'replica removed');
    await waitFor(() => traceInstancesOf(agentId).length === 0, LONG, 'the trace instance to go');
    const pidFile = path.join(prefix, 'var/lib/mobility/agent.pid');
    const pid = Number(fs.readFileSync(pidFile, 'utf8'));
    const u = await run('bash', [path.join(prefix, 'opt/mobility/uninstall.sh'), '--prefix', prefix]);
    t.equal(u.code, 0, u.stderr);
    t.same(await listTree(prefix), before, 'the prefix is as before the install');
    // gone, or a zombie nobody reaps (PID 1 of a container may not): either way not running
    let state = '';
    try { state = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '')[0]; } catch { state = ''; }
    t.ok(state === '' || state === 'Z', `the agent process is gone (state ${state || 'none'})`);
  });
});

t.test('push failures have stable codes and do not stop other hosts', async (t) => {
  const work = await tmpDir(t, 'pushfail-');
  const c = cleanup(t);
  // sshd reads authorized_keys as the logging-in user: a non-root account must reach it (the scratch root is 0755)
  await fsp.chmod(work, 0o755);
  // too little space under the install prefix: a 16 MiB tmpfs, mounted before the sshd so that its sessions see it
  const small = path.join(work, 'small');
  await fsp.mkdir(small);
  sh('mount', ['-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', small]);
  c.mount(small);
  const sshd = await startSshd(path.join(work, 'ssh'), c);
  t.teardown(() => sshd.stop());
  const bundle = path.join(work, 'fake-bundle.tar.gz');
  await fsp.writeFile(bundle, 'not reached');
  const req = { bundle, serverUrl: 'wss://127.0.0.1:1', token: 'abc.def', serverFingerprint: 'AA' };
  // generous: on a loaded machine a live sshd may answer slowly; the closed port is refused at once anyway
  const inst = new SshPushInstaller({ connectTimeoutMs: 60_000 });
  const otherKey = path.join(work, 'other_key');
  sh('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', otherKey]);
  const [badKey, closed, hostKey] = await Promise.all([
    inst.install({ host: '127.0.0.1', port: sshd.port, user: 'root', keyFile: otherKey }, req),
    inst.install({ host: '127.0.0.1', port: 1, user: 'root', keyFile: sshd.userKey }, req),
    inst.install({ host: '127.0.0.1', port: sshd.port, user: 'root', keyFile: sshd.userKey, hostKeySha256: 'SHA256:' + 'A'.repeat(43) }, req),
  ]);
  t.equal(badKey.code, 'MOB_ERR_PUSH_AUTH', badKey.message);
  t.equal(closed.code, 'MOB_ERR_PUSH_UNREACHABLE', closed.message);
  t.equal(hostKey.code, 'MOB_ERR_PUSH_HOST_KEY', hostKey.message);
  for (const r of [badKey, closed, hostKey]) { t.equal(r.ok, false); t.equal(r.step, 'connect'); }

  // too little space under the install prefix (the 16 MiB tmpfs), and a bundle that is not one
  const lowDisk = await inst.install({ host: '127.0.0.1', port: sshd.port, user: 'root', keyFile: sshd.userKey }, { ...req, prefix: small });
  t.equal(lowDisk.code, 'MOB_ERR_PUSH_LOW_DISK', lowDisk.message);
  t.equal(lowDisk.step, 'preflight');
  const badBundle = await inst.install({ host: '127.0.0.1', port: sshd.port, user: 'root', keyFile: sshd.userKey }, { ...req, prefix: path.join(work, 'root') });
  t.equal(badBundle.code, 'MOB_ERR_PUSH_INSTALL_FAILED', badBundle.message);
  t.equal(badBundle.step, 'install');
  t.notOk(fs.readdirSync(sshd.remoteTmp).some((n) => n.startsWith('mobility-push-') && fs.existsSync(path.join(sshd.remoteTmp, n, 'token'))), 'the uploaded token was removed after the failure');
  // what install.sh reports on the host maps to push codes
  t.equal(pushCodeFor('MOB_ERR_PRE_NOT_ROOT'), 'MOB_ERR_PUSH_NOT_ROOT');
  t.equal(pushCodeFor('MOB_ERR_PRE_NODE_VERSION'), 'MOB_ERR_PUSH_OS_UNSUPPORTED');
  t.equal(pushCodeFor('MOB_ERR_PRE_LOW_DISK'), 'MOB_ERR_PUSH_LOW_DISK');
  t.equal(pushCodeFor('MOB_ERR_PRE_NO_TRACEFS'), 'MOB_ERR_PUSH_INSTALL_FAILED');

  // a non-root account without sudo
  const user = `mobpush${process.pid % 100000}`;
  // registered first: removed (userdel -f: an sshd child of the refused login may still hold it) even on a timeout
  c.user(user);
  sh('useradd', ['-M', '-d', '/nonexistent', '-s', '/bin/sh', user]);
  sh('usermod', ['-p', '*', user]);
  const notRoot = await inst.install({ host: '127.0.0.1', port: sshd.port, user, keyFile: sshd.userKey }, req);
  t.equal(notRoot.code, 'MOB_ERR_PUSH_NOT_ROOT', notRoot.message);
  t.equal(notRoot.step, 'preflight');
});
