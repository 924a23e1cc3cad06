/**
 * uninstall.sh and the agent's kernel trace instance, against real tracefs instances: the
 * instance named in protect/<agent>/trace-instance and one named the pre-0.2 way
 * (mobility-<agent id>, agent id from identity.json) are removed with rmdir alone; one locked
 * by a live process is left in place, still enabled. Runs packaging/uninstall.sh from the
 * repository against a temporary prefix (as root; tracefs mounted: missing tracefs fails).
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { processStartTime } from '../../src/source/tracker/instance-lock.js';
import { cleanup } from '../cleanup.js';
import { tmpDir } from '../helpers.js';

// compiled to dist/test/install/: the repository is three levels up
const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const UNINSTALL = path.join(ROOT, 'packaging', 'uninstall.sh');
const INSTANCES = '/sys/kernel/tracing/instances';
const LOCKS = '/run/mobility/trace-locks';
const ENABLE = 'events/block/block_rq_complete/enable';

function run(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('bash', [UNINSTALL, ...args], { stdio: ['ignore', 'pipe', 'pipe'], cwd: os.tmpdir() });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** A prefix with an installed agent's state: identity.json and, optionally, protect/<agent>/trace-instance. */
async function prefixWith(t: Test, agentId: string, recorded?: string): Promise<string> {
  const prefix = await tmpDir(t, 'prefix-');
  const state = path.join(prefix, 'var/lib/mobility');
  fs.mkdirSync(path.join(prefix, 'opt/mobility'), { recursive: true });
  fs.mkdirSync(state, { recursive: true, mode: 0o700 });
  fs.writeFileSync(path.join(state, 'identity.json'), JSON.stringify({ agentId, server: 'wss://server.example:8443', serverFingerprint: 'AA', registeredAt: '2024-01-01T00:00:00.000Z' }, null, 1) + '\n');
  if (recorded) {
    fs.mkdirSync(path.join(state, 'protect', agentId), { recursive: true });
    fs.writeFileSync(path.join(state, 'protect', agentId, 'trace-instance'), `${recorded}\n1234\n`);
  }
  fs.writeFileSync(path.join(state, 'install-manifest'), 'tree opt/mobility\ntree var/lib/mobility\n');
  return prefix;
}


/** A real trace instance with the block event enabled (as an agent leaves it). */
function instance(t: Test, agentId: string, name: string): string {
  cleanup(t).traceInstances(agentId);
  const dir = path.join(INSTANCES, name);
  fs.mkdirSync(dir);
  fs.writeFileSync(path.join(dir, ENABLE), '1');
  return dir;
}

t.test('uninstall removes the recorded instance, its shadow and the pre-0.2 one (mobility-<agent id>)', async (t) => {
  const agentId = `uninst-${crypto.randomBytes(4).toString('hex')}`;
  const current = `mobility-${agentId}-0123abcd`;
  const legacy = `mobility-${agentId}`;
  const prefix = await prefixWith(t, agentId, current);
  const cur = instance(t, agentId, current);
  const shadow = instance(t, agentId, `${current}.shadow`);
  const old = instance(t, agentId, legacy);

  const dry = await run(['--prefix', prefix, '--dry-run']);
  t.equal(dry.code, 0, `dry run exits 0 (${dry.stderr.trim()})`);
  t.match(dry.stdout, `would remove the trace instance ${cur}\n`, 'the dry run names the recorded instance');
  t.match(dry.stdout, `would remove the trace instance ${old}\n`, 'and the pre-0.2 one');
  t.match(dry.stdout, `would remove the trace instance ${shadow}\n`, 'and the shadow of the recorded one');
  t.ok(fs.existsSync(cur) && fs.existsSync(old), 'the dry run removed nothing');
  t.equal(fs.readFileSync(path.join(old, ENABLE), 'utf8').trim(), '1', 'nor disabled anything');

  const u = await run(['--prefix', prefix]);
  t.equal(u.code, 0, `uninstall exits 0 (${u.stderr.trim()})`);
  t.match(u.stdout, `removed the trace instance ${cur}\n`);
  t.match(u.stdout, `removed the trace instance ${old}\n`);
  t.notOk(fs.existsSync(cur), 'the recorded instance is gone');
  t.notOk(fs.existsSync(old), 'the pre-0.2 instance is gone');
  t.notOk(fs.existsSync(shadow), 'the shadow instance is gone');
  t.equal(u.stdout.trimEnd().split('\n').at(-1), 'MOBILITY-UNINSTALL ok');
});

t.test('a pre-0.2 instance locked by a live process is left in place, enabled', async (t) => {
  const agentId = `uninst-${crypto.randomBytes(4).toString('hex')}`;
  const legacy = `mobility-${agentId}`;
  const prefix = await prefixWith(t, agentId);
  const dir = instance(t, agentId, legacy);
  const holder = cleanup(t).spawn('sleep', ['30']);
  await new Promise((r) => holder.once('spawn', r));
  fs.mkdirSync(LOCKS, { recursive: true });
  const lock = path.join(LOCKS, `${legacy}.lock`);
  fs.writeFileSync(lock, `${holder.pid} ${processStartTime(holder.pid!)}\n`);
  t.teardown(() => fs.rmSync(lock, { force: true }));

  const dry = await run(['--prefix', prefix, '--dry-run']);
  t.equal(dry.code, 0);
  t.notMatch(dry.stdout, /trace instance/, 'the dry run would not remove it');
  t.match(dry.stderr, `the trace instance ${legacy} is in use by process ${holder.pid} (MOB_ERR_TRACKER_BUSY)`);

  const u = await run(['--prefix', prefix]);
  t.equal(u.code, 0, `uninstall exits 0 (${u.stderr.trim()})`);
  t.match(u.stderr, `the trace instance ${legacy} is in use by process ${holder.pid} (MOB_ERR_TRACKER_BUSY): left in place`);
  t.ok(fs.existsSync(dir), 'the instance is still there');
  t.equal(fs.readFileSync(path.join(dir, ENABLE), 'utf8').trim(), '1', 'and still enabled');
});
