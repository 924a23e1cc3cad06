/**
 * Capacity planning end to end, with real processes: `mobility server`, `mobility register`,
 * `mobility agent`, ext4 on a loop device, fio. The disk is enabled --profile-only; fio writes a
 * known amount with direct I/O (an overwrite of a laid-out file, rate limited), and
 * `mobility capacity --json` must report churn within 10 % of what fio wrote, with a measured
 * compression ratio; the agent is stopped, the disk written while it is down, and after its
 * restart the writes made meanwhile are counted too. No replica and no recovery point may ever
 * exist for the machine. Disabling ends profiling and removes its trace instance and state.
 *
 * Needs root, losetup, mkfs.ext4, mount, fio and tracefs: a missing one fails the test.
 */
import t from 'tap';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { CLI_PATH } from '../../src/server/spawn.js';
import type { CapacityPlan } from '../../src/server/capacity.js';
import { cleanup, runCli, startServer, stopGently, tmpDir, traceInstancesOf, waitFor } from '../helpers.js';

/** Waits are safety nets against a hang, not speed requirements. */
const LONG = 180_000;
const INTERVAL_MS = 2000;
const MiB = 1024 * 1024;

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

function fio(c: ReturnType<typeof cleanup>, args: string[]): Promise<{ writtenBytes: number; out: string }> {
  return new Promise((resolve, reject) => {
    const child = c.spawn('fio', ['--output-format=json', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    child.once('close', (code) => {
      if (code !== 0) { reject(new Error(`fio exited ${code}: ${err}`)); return; }
      try {
        const j = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: { write: { io_bytes: number } }[] };
        resolve({ writtenBytes: j.jobs.reduce((a, x) => a + x.write.io_bytes, 0), out });
      } catch (e) { reject(new Error(`fio output: ${(e as Error).message}: ${out}`)); }
    });
  });
}

t.test('profile-only: measured churn within 10 % of fio, across an agent restart, and never a replica', async (t) => {
  for (const tool of ['losetup', 'mkfs.ext4', 'mount', 'fio']) {
    try { sh('sh', ['-c', `command -v ${tool}`]); } catch { throw new Error(`${tool} is required for this test`); }
  }
  if (process.getuid?.() !== 0) throw new Error('this test needs root (loop devices, tracefs)');
  const work = await tmpDir(t, 'capacity-');
  const c = cleanup(t);
  const server = await startServer(t, path.join(work, 'srv'));
  const conn = ['--server', server.info.url, '--data-dir', server.info.dataDir];
  const cli = (args: string[]) => runCli(args).done;

  const midFile = path.join(work, 'machine-id');
  await fsp.writeFile(midFile, 'cd'.repeat(16) + '\n');
  const stateDir = path.join(work, 'agent-state');
  const config = path.join(work, 'agent.json');
  await fsp.writeFile(config, JSON.stringify({ server: server.info.url, stateDir, machineIdFile: midFile, inventoryIntervalMs: 60_000, profileIntervalMs: INTERVAL_MS }));
  const reg = await cli(['register', '--config', config, '--passphrase-file', path.join(server.info.dataDir, 'passphrase'), '--json']);
  t.equal(reg.code, 0, reg.stderr);
  const agentId = (JSON.parse(reg.stdout) as { agentId: string }).agentId;
  c.traceInstances(agentId);

  // ext4 on a loop device, every inode table written at mkfs (no lazy init writing behind our back)
  const img = path.join(work, 'disk.img');
  sh('truncate', ['-s', '256M', img]);
  const loop = sh('losetup', ['--find', '--show', img]).trim();
  c.loop(loop);
  sh('mkfs.ext4', ['-q', '-F', '-b', '4096', '-E', 'lazy_itable_init=0,lazy_journal_init=0', loop]);
  const mnt = path.join(work, 'mnt');
  await fsp.mkdir(mnt);
  sh('mount', [loop, mnt]);
  c.mount(mnt);
  const file = path.join(mnt, 'data');
  // the same compressible content (half of each 512-byte chunk zeros) for the layout and the measured writes
  const fioArgs = (size: number, rate: string) => ['--name=w', `--filename=${file}`, '--rw=write', '--bs=1M', `--size=${size}`, '--direct=1', '--ioengine=psync',
    `--rate=${rate}`, '--buffer_compress_percentage=50', '--refill_buffers', '--fallocate=none', '--overwrite=1'];
  await fio(c, fioArgs(64 * MiB, '64m'));
  sh('sync', []);

  let agentErr = '';
  const startAgent = (): { child: ChildProcess; exited: Promise<number | null> } => {
    const child = spawn(process.execPath, [CLI_PATH, 'agent', '--config', config, '--json-logs'], { stdio: ['ignore', 'ignore', 'pipe'] });
    child.stderr!.on('data', (d: Buffer) => { agentErr = (agentErr + d.toString()).slice(-400_000); });
    c.process(child);
    t.teardown(() => stopGently(child));
    return { child, exited: new Promise((r) => child.once('exit', (code) => r(code))) };
  };
  let agent = startAgent();
  await waitFor(() => agentErr.includes('"control connected"'), LONG, 'control connection');

  const en = await cli(['enable', ...conn, '--machine', agentId, '--disk', loop, '--disk-id', 'data', '--profile-only']);
  t.equal(en.code, 0, en.stderr);
  t.match(en.stdout, /profiling data/);
  const usage = await cli(['enable', ...conn, '--machine', agentId, '--disk', loop, '--profile-only', '--policy', 'default']);
  t.equal(usage.code, 2, '--profile-only with --policy is a usage error');

  const plan = async (extra: string[] = []): Promise<CapacityPlan> => {
    const r = await cli(['capacity', ...conn, '--json', ...extra]);
    if (r.code !== 0) throw new Error(`capacity failed (${r.code}): ${r.stderr}`);
    return JSON.parse(r.stdout) as CapacityPlan;
  };
  const disk = (p: CapacityPlan) => p.disks.find((d) => d.agent === agentId && d.disk === 'data');
  // a few reports of the idle disk: the baseline is taken after them (every layout write is in a report)
  await waitFor(async () => (disk(await plan())?.basis.samples ?? 0) >= 3, LONG, 'the first churn reports');
  const before = disk(await plan())!;
  t.equal(before.basis.incompleteSamples, 0, 'no trace event lost');

  const measured = await fio(c, fioArgs(64 * MiB, '16m'));
  t.equal(measured.writtenBytes, 64 * MiB, 'fio wrote 64 MiB');
  const atEnd = disk(await plan())!.basis.samples;
  await waitFor(async () => (disk(await plan())?.basis.samples ?? 0) >= atEnd + 3, LONG, 'reports after fio ended');
  const after = disk(await plan())!;
  const churn = after.totalBytes - before.totalBytes;
  t.ok(Math.abs(churn - measured.writtenBytes) <= 0.1 * measured.writtenBytes, `measured churn ${churn} B is within 10 % of what fio wrote (${measured.writtenBytes} B)`);
  t.ok(after.peakBytesPerSec! > 0 && after.p95BytesPerSec !== null, 'peak and p95 are reported');
  t.ok(after.basis.sampledBytes > 0, `blocks were read back for the ratio (${after.basis.sampledBytes} B)`);
  t.ok(after.basis.ratio > 0.2 && after.basis.ratio < 0.9, `fio's half-compressible data measures as compressible (ratio ${after.basis.ratio.toFixed(3)})`);
  t.equal(after.sizeBytes, 256 * MiB, 'the disk size');
  t.ok(after.dataBytes > 64 * MiB && after.dataBytes < 128 * MiB, `the used bytes of the mounted filesystem (${after.dataBytes})`);

  // the table, with what each answer rests on
  const table = await cli(['capacity', ...conn, '--machine', agentId, '--rpo', '1m', '--retention', '2h', '--bandwidth', '100Mbit']);
  t.equal(table.code, 0, table.stderr);
  for (const want of [/DISKS/, /MACHINES/, /ESTATE/, /bandwidth to hold the RPO/, /initial sync/, /process servers/, /measured ratio/, new RegExp(`${agentId}\\s+data\\s+\\d+`)]) {
    t.match(table.stdout, want, `the table shows ${want}`);
  }
  const withLink = await plan(['--machine', agentId, '--rpo', '1m', '--retention', '2h', '--bandwidth', '100Mbit']);
  t.equal(withLink.options.bandwidthBytesPerSec, 12_500_000);
  t.ok(withLink.estate.initialSyncSeconds !== null && withLink.estate.initialSyncSeconds > 0, 'an initial-sync time at the given link');
  t.equal(withLink.estate.processServers, 1, 'one process server for this churn');
  const bad = await cli(['capacity', ...conn, '--rpo', 'soon']);
  t.equal(bad.code, 2, 'a bad --rpo is a usage error');
  t.match(bad.stderr, /MOB_ERR_USAGE/);
  const unknown = await cli(['capacity', ...conn, '--machine', 'nosuch']);
  t.match(unknown.stderr, /MOB_ERR_UNKNOWN_MACHINE/);

  // the agent stops; the disk is written while it is down; the restarted agent counts those writes
  agent.child.kill('SIGTERM');
  t.equal(await agent.exited, 0, 'the agent stops cleanly');
  t.ok(traceInstancesOf(agentId).length === 1, 'the profiling trace instance keeps recording while the agent is down');
  const whileDown = await fio(c, fioArgs(32 * MiB, '32m'));
  const down = disk(await plan())!;
  agent = startAgent();
  await waitFor(async () => (disk(await plan())?.basis.samples ?? 0) >= down.basis.samples + 3, LONG, 'reports after the restart');
  const resumed = disk(await plan())!;
  const downChurn = resumed.totalBytes - down.totalBytes;
  t.ok(Math.abs(downChurn - whileDown.writtenBytes) <= 0.1 * whileDown.writtenBytes, `writes made while the agent was down are counted: ${downChurn} B for fio's ${whileDown.writtenBytes} B`);
  t.equal(resumed.basis.incompleteSamples, 0, 'nothing lost across the restart');

  // never a replica, never a recovery point
  t.notOk(fs.existsSync(path.join(server.info.dataDir, 'replicas', agentId)), 'no replica directory for the machine');
  const points = await cli(['points', ...conn, '--agent-id', agentId, '--json']);
  t.same((JSON.parse(points.stdout) as { points: unknown[] }).points, [], 'no recovery point');
  const status = JSON.parse((await cli(['status', ...conn, '--json'])).stdout) as { disks: unknown[] };
  t.same(status.disks, [], 'status lists no protected disk');
  const cut = await cli(['cut', ...conn, '--machine', agentId]);
  t.match(cut.stderr, /MOB_ERR_NOT_PROTECTING/, 'a cut of a profiled-only machine is refused');
  t.notOk(fs.existsSync(path.join(stateDir, 'protect', agentId)), 'no protection state on the agent');
  const machines = JSON.parse((await cli(['machines', ...conn, '--json'])).stdout) as { machines: { agentId: string; disks: unknown[]; profiled: { diskId: string }[] }[] };
  const me = machines.machines.find((m) => m.agentId === agentId)!;
  t.same(me.disks, [], 'no protected disk');
  t.same(me.profiled.map((d) => d.diskId), ['data'], 'the profiled disk is listed');
  t.match((await cli(['machines', ...conn])).stdout, new RegExp(`${agentId} profiles data \\(${loop}\\)`), 'mobility machines says the disk is profiled');

  // disable ends profiling (nothing to delete, nothing asked); the samples stay
  const dis = await cli(['disable', ...conn, '--machine', agentId, '--disk', 'data']);
  t.equal(dis.code, 0, dis.stderr);
  t.match(dis.stdout, /profiling of data .* ended/);
  await waitFor(() => traceInstancesOf(agentId).length === 0, LONG, 'the profiling trace instance removed');
  await waitFor(() => !fs.existsSync(path.join(stateDir, 'profile', agentId)), LONG, 'the profiling state removed');
  t.ok((disk(await plan())?.basis.samples ?? 0) >= resumed.basis.samples, 'the samples stay after disable');
  t.notOk(fs.existsSync(path.join(server.info.dataDir, 'replicas', agentId)), 'still no replica');

  // profiled again, then protected: protection takes the disk over, profiling ends, the samples stay
  const again = await cli(['enable', ...conn, '--machine', agentId, '--disk', loop, '--disk-id', 'data', '--profile-only']);
  t.equal(again.code, 0, again.stderr);
  await waitFor(() => traceInstancesOf(agentId).length === 1, LONG, 'profiling again');
  const protect = await cli(['enable', ...conn, '--machine', agentId, '--disk', loop, '--disk-id', 'data', '--json']);
  t.equal(protect.code, 0, protect.stderr);
  t.same((JSON.parse(protect.stdout) as { profileEnded: string[] }).profileEnded, ['data'], 'enable says the profiling of the disk ended');
  const refused = await cli(['enable', ...conn, '--machine', agentId, '--disk', loop, '--disk-id', 'data', '--profile-only']);
  t.match(refused.stderr, /MOB_ERR_CONFIG/, 'a protected disk cannot be profiled');
  await waitFor(() => fs.existsSync(path.join(server.info.dataDir, 'replicas', agentId, 'points.json')), LONG, 'a recovery point of the now protected disk');
  await waitFor(() => !fs.existsSync(path.join(stateDir, 'profile', agentId)), LONG, 'the profiling state removed once the disk is protected');
  t.same(traceInstancesOf(agentId).map((n) => (n.endsWith('.shadow') ? 'shadow' : 'instance')), ['instance', 'shadow'], 'one trace instance, protection\'s (with its shadow): the profiler\'s is gone');
  t.ok((disk(await plan())?.basis.samples ?? 0) >= resumed.basis.samples, 'the samples stay after protection started');
  const off = await cli(['disable', ...conn, '--machine', agentId, '--disk', 'data', '--yes']);
  t.equal(off.code, 0, off.stderr);
  await waitFor(() => traceInstancesOf(agentId).length === 0, LONG, 'no trace instance left');

  agent.child.kill('SIGTERM');
  t.equal(await agent.exited, 0);
});
