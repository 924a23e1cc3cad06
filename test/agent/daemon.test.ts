/**
 * The agent daemon's reconcile step when its last disk is unassigned: it removes the trace
 * instance and forgets the protection state. When the instance cannot be removed (another live
 * process holds it: MOB_ERR_TRACKER_BUSY), the file naming the instance must stay, or uninstall
 * can no longer find the instance. The daemon is driven directly (no server); the trace
 * instance lives under a fake tracefs root, so no kernel state is touched.
 */
import t, { type Test } from 'tap';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { AgentDaemon } from '../../src/agent/daemon.js';
import type { AgentConfig, Credentials } from '../../src/agent/config.js';
import { createLogger, type Logger } from '../../src/log.js';
import { DEFAULT_LOCK_DIR, processStartTime } from '../../src/source/tracker/instance-lock.js';
import { traceInstanceName } from '../../src/source/tracker/tracefs.js';
import { cleanup } from '../cleanup.js';
import { tmpDir } from '../helpers.js';

interface DaemonInternals {
  cfg: AgentConfig; creds: Credentials; log: Logger; applied: string;
  status: { connected: boolean; disks: string[] };
  desired: { agentId: string; policy: unknown; disks: { diskId: string; device: string }[] } | null;
  reconcile(): Promise<void>;
}

/** A daemon that protected disk d0 and is now told to protect nothing. */
async function unassigned(t: Test): Promise<{ d: DaemonInternals; agentDir: string; instanceDir: string; name: string }> {
  const dir = await tmpDir(t, 'daemon-');
  const agentId = `unassign-${crypto.randomBytes(4).toString('hex')}`;
  const stateDir = path.join(dir, 'state');
  const protectDir = path.join(stateDir, 'protect');
  const agentDir = path.join(protectDir, agentId);
  const name = traceInstanceName(agentId, protectDir);
  const tracefsRoot = path.join(dir, 'tracefs');
  const instanceDir = path.join(tracefsRoot, 'instances', name);
  fs.mkdirSync(instanceDir, { recursive: true });
  fs.mkdirSync(agentDir, { recursive: true });
  fs.writeFileSync(path.join(agentDir, 'trace-instance'), `${name}\n1234\n`);
  fs.writeFileSync(path.join(agentDir, 'd0.map'), 'map');
  fs.writeFileSync(path.join(agentDir, 'd0.journal'), 'journal');
  fs.mkdirSync(path.join(agentDir, 'spool'));
  fs.writeFileSync(path.join(agentDir, 'spool', 'x'), 'x');

  const d = new AgentDaemon(path.join(dir, 'agent.json')) as unknown as DaemonInternals;
  d.log = createLogger({ silent: true });
  d.cfg = { server: 'wss://127.0.0.1:1', stateDir, tracefsRoot };
  d.creds = { identity: { agentId, server: 'wss://127.0.0.1:1', serverFingerprint: 'AA', registeredAt: new Date().toISOString() }, key: '', cert: '', ca: '' };
  d.status.disks = ['d0'];
  d.applied = JSON.stringify([[['d0', '/dev/null']]]);
  d.desired = { agentId, policy: { name: 'default', crashIntervalMs: 1000, appIntervalMs: 0, compress: false, bandwidthBytes: 0 }, disks: [] };
  return { d, agentDir, instanceDir, name };
}

t.test('the trace instance removed: the whole protection state goes', async (t) => {
  const { d, agentDir, instanceDir } = await unassigned(t);
  await d.reconcile();
  t.notOk(fs.existsSync(instanceDir), 'the instance was removed');
  t.notOk(fs.existsSync(agentDir), 'protect/<agent>/ was removed');
});

t.test('the trace instance in use by another process: the file naming it stays', async (t) => {
  const { d, agentDir, instanceDir, name } = await unassigned(t);
  // a live process holds the instance's lock
  const holder = cleanup(t).spawn('sleep', ['30']);
  await new Promise((r) => holder.once('spawn', r));
  fs.mkdirSync(DEFAULT_LOCK_DIR, { recursive: true });
  const lock = path.join(DEFAULT_LOCK_DIR, `${name}.lock`);
  fs.writeFileSync(lock, `${holder.pid} ${processStartTime(holder.pid!)}\n`);
  t.teardown(() => fs.rmSync(lock, { force: true }));

  await d.reconcile();
  t.ok(fs.existsSync(instanceDir), 'the instance is left to its user');
  t.same(fs.readdirSync(agentDir), ['trace-instance'], 'only the trace-instance file is left in protect/<agent>/');
  t.equal(fs.readFileSync(path.join(agentDir, 'trace-instance'), 'utf8').split('\n')[0], name, 'and it still names the instance');
});
