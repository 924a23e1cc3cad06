/**
 * Shared setup of the continuous-protection end-to-end tests (test/e2e/protect-*.test.ts):
 * an ext4 filesystem on a loop device, a real `mobility server`, `mobility protect` as a
 * real process with a real tracefs instance, a frozen-phase hook that records file
 * checksums inside each frozen window, a fio/dd workload that runs until it is stopped,
 * and the check of a point (test-failover image fsck-clean, files equal to the cut's checksums).
 *
 * Everything is registered with the test's cleanup scope (see cleanup.ts): agents and the
 * workload run in their own process groups and are killed with their children, the loop
 * device, mounts and trace instances go even when tap kills the file on a timeout.
 *
 * Needs root, losetup, mkfs.ext4, e2fsck, fsfreeze, fio and tracefs: a missing one fails the test.
 */
import type { Test } from 'tap';
import { execFile, execFileSync, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import readline from 'node:readline';
import { CLI_PATH, type SpawnedServer } from '../src/server/spawn.js';
import { cleanup, type Cleanup } from './cleanup.js';
import { runCli, startServer, stopGently, waitFor } from './helpers.js';

/**
 * The reason the protector gives when events taken out of the tracker never reached the journal: with the shadow
 * trace instance, only two kills in a row inside reads of the trace (the second in the first drain after a restart).
 */
export const TORN_READ = 'the agent stopped while taking events out of the tracker';

/**
 * Waits in these tests are safety nets against a hang, never speed requirements: generous,
 * but each file must stay well under tap's 300 s per file.
 */
export const LONG = 150_000;

export const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });

/** A command with a generous time limit that does not block the event loop (so a tap timeout can still clean up). */
export function shAsync(cmd: string, args: string[], timeoutMs = LONG): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { encoding: 'utf8', timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

export interface Ev { event: string; [k: string]: unknown }

export class Agent {
  events: Ev[] = [];
  child: ChildProcess;
  stderr = '';
  exited: Promise<number | null>;
  constructor(c: Cleanup, args: string[]) {
    // its own process group (hook scripts die with it); killed by the cleanup scope whatever happens
    this.child = c.spawn(process.execPath, [CLI_PATH, 'protect', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    readline.createInterface({ input: this.child.stdout! }).on('line', (l) => {
      try { this.events.push(JSON.parse(l) as Ev); } catch { /* not an event */ }
    });
    this.child.stderr!.on('data', (d: Buffer) => { this.stderr = (this.stderr + d.toString()).slice(-200_000); });
    this.exited = new Promise((r) => this.child.once('exit', (code) => r(code)));
  }
  find(pred: (e: Ev) => boolean): Ev | undefined { return this.events.find(pred); }
  async waitEvent(pred: (e: Ev) => boolean, ms: number, what: string): Promise<Ev> {
    await waitFor(() => this.events.some(pred) || this.child.exitCode !== null, ms, what).catch((err: Error) => {
      throw new Error(`${err.message}\nevents: ${JSON.stringify(this.events.slice(-20))}\nstderr: ${this.stderr.slice(-3000)}`);
    });
    const e = this.events.find(pred);
    if (!e) throw new Error(`agent exited (${this.child.exitCode}) before ${what}: ${this.stderr.slice(-3000)}`);
    return e;
  }
  /** Asks for a cut and waits for its point (or its failure). */
  async cut(kind: 'app' | 'crash', ms = LONG): Promise<Ev> {
    const before = this.events.length;
    this.child.kill(kind === 'app' ? 'SIGUSR1' : 'SIGUSR2');
    return this.waitEvent((e) => this.events.indexOf(e) >= before && (e.event === 'cut' || e.event === 'cut-failed'), ms, `a ${kind} cut`);
  }
  async kill9(): Promise<void> {
    this.child.kill('SIGKILL');
    await this.exited;
  }
  async stop(): Promise<void> {
    await stopGently(this.child, 60_000);
  }
}

export interface Setup {
  c: Cleanup;
  dir: string;
  img: string;
  loop: string;
  mnt: string;
  server: SpawnedServer;
  sums: string;
  hooks: string;
  agentId: string;
  /** protect arguments; freeze-limit 60 s unless extra sets it (a loaded machine must not turn a cut into a freeze failure) */
  args: (extra?: string[]) => string[];
}

export async function setup(t: Test, sizeMb = 256, o: { serverArgs?: string[] } = {}): Promise<Setup> {
  for (const tool of ['losetup', 'mkfs.ext4', 'e2fsck', 'fsfreeze', 'fio', 'mount']) {
    try { sh('sh', ['-c', `command -v ${tool}`]); } catch { throw new Error(`${tool} is required for this test`); }
  }
  // mounted as the agent would (a fresh machine may not have it mounted yet)
  if (!fs.existsSync('/sys/kernel/tracing/instances')) { try { sh('mount', ['-t', 'tracefs', 'tracefs', '/sys/kernel/tracing']); } catch { /* reported below */ } }
  if (!fs.existsSync('/sys/kernel/tracing/instances')) throw new Error('tracefs (/sys/kernel/tracing/instances) is required for this test');
  const c = cleanup(t);
  const dir = c.dir('protect-');
  const img = path.join(dir, 'disk.img');
  await fsp.writeFile(img, '');
  await fsp.truncate(img, sizeMb * 1024 * 1024);
  const loop = sh('losetup', ['--find', '--show', img]).trim();
  c.loop(loop);
  const mnt = path.join(dir, 'mnt');
  await fsp.mkdir(mnt);
  // no lazy init: ext4lazyinit would keep writing inode tables in the background for a while after the mount,
  // a trickle of writes whose amount depends on timing (with a tiny trace buffer, an overrun after every resync)
  sh('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', loop]);
  // noatime: the checksum hook reads files while the filesystem is frozen
  sh('mount', ['-o', 'noatime', loop, mnt]);
  c.mount(mnt);
  sh('dd', ['if=/dev/urandom', `of=${mnt}/seed`, 'bs=64k', 'count=64', 'status=none']);
  sh('sync', []);
  const agentId = `e2e-${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
  c.traceInstances(agentId);
  const server = await startServer(t, path.join(dir, 'srv'), { extraArgs: o.serverArgs });
  const sums = path.join(dir, 'sums');
  const hooks = path.join(dir, 'hooks');
  await fsp.mkdir(sums);
  for (const phase of ['pre-freeze', 'frozen', 'post-thaw']) await fsp.mkdir(path.join(hooks, phase), { recursive: true });
  // inside the frozen window: checksums of every file, named by cut id
  await fsp.writeFile(path.join(hooks, 'frozen', '10-sums'), `#!/bin/sh\nset -e\ncd '${mnt}'\nfind . -type f ! -name lost+found | sort | xargs -r sha256sum > '${sums}'/$MOBILITY_CUT_ID.tmp\nmv '${sums}'/$MOBILITY_CUT_ID.tmp '${sums}'/$MOBILITY_CUT_ID\n`, { mode: 0o755 });
  for (const phase of ['pre-freeze', 'post-thaw']) {
    await fsp.writeFile(path.join(hooks, phase, '10-mark'), `#!/bin/sh\necho "$MOBILITY_PHASE $MOBILITY_CUT_ID $MOBILITY_CUT_KIND" >> '${dir}'/hooks.log\n`, { mode: 0o755 });
  }
  const args = (extra: string[] = []) => ['--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--disk', `${loop}=d0`,
    '--agent-id', agentId, '--state-dir', path.join(dir, 'agent'), '--hooks-dir', hooks, '--json-logs',
    ...(extra.includes('--freeze-limit') ? [] : ['--freeze-limit', '60s']), ...extra];
  return { c, dir, img, loop, mnt, server, sums, hooks, agentId, args };
}

/**
 * A background workload that runs until stop(): fio random writes into files plus dd file
 * copies and deletions. progress() counts the dd rounds, so a test paces itself on work
 * done, not on time.
 */
export class Workload {
  readonly child: ChildProcess;
  private readonly progressFile: string;
  private readonly stopFile: string;
  readonly exited: Promise<void>;
  constructor(c: Cleanup, s: { dir: string; mnt: string }, o: { direct?: boolean } = {}) {
    const tag = crypto.randomBytes(3).toString('hex');
    this.progressFile = path.join(s.dir, `load-${tag}.progress`);
    this.stopFile = path.join(s.dir, `load-${tag}.stop`);
    const script = `
      fio --name=churn --directory='${s.mnt}' --rw=randwrite --bs=4k --size=16M --numjobs=2 --time_based --runtime=3600 \
          --ioengine=psync ${o.direct ? '--direct=1' : '--fsync=64'} --group_reporting >/dev/null 2>&1 &
      fio=$!
      i=0
      while [ ! -e '${this.stopFile}' ]; do
        i=$((i+1)); dd if=/dev/urandom of='${s.mnt}'/copy.$i bs=64k count=$(( (i % 32) + 1 )) status=none
        [ $((i % 4)) -eq 0 ] && rm -f '${s.mnt}'/copy.$((i-2))
        echo $i > '${this.progressFile}.tmp' && mv '${this.progressFile}.tmp' '${this.progressFile}'
        sleep 0.05
      done
      kill $fio 2>/dev/null; wait`;
    this.child = c.spawn('sh', ['-c', script], { stdio: 'ignore' });
    this.exited = new Promise((r) => {
      if (this.child.exitCode !== null || this.child.signalCode !== null) r();
      else this.child.once('exit', () => r());
    });
  }
  get running(): boolean { return this.child.exitCode === null && this.child.signalCode === null; }
  /** dd rounds completed so far. */
  progress(): number {
    try { return Number(fs.readFileSync(this.progressFile, 'utf8').trim()) || 0; } catch { return 0; }
  }
  /** Waits until the workload has done `rounds` more dd rounds. */
  async advance(rounds: number, what = `${rounds} more workload rounds`): Promise<void> {
    const target = this.progress() + rounds;
    await waitFor(() => this.progress() >= target || !this.running, LONG, what);
    if (!this.running) throw new Error(`the workload ended unexpectedly while waiting for ${what}`);
  }
  /** Asks the workload to finish (fio is stopped too) and waits for it; SIGKILL to its group if it does not. */
  async stop(): Promise<void> {
    if (!this.running) return;
    fs.writeFileSync(this.stopFile, '');
    const k = setTimeout(() => { try { process.kill(-this.child.pid!, 'SIGKILL'); } catch { /* gone */ } }, 60_000);
    await this.exited;
    clearTimeout(k);
  }
}

/** test-failover of a point: the image is fsck-clean and holds exactly the files of the cut, with their checksums. */
export async function materializeAndCheck(t: Test, s: Pick<Setup, 'dir' | 'sums' | 'agentId' | 'server'>, pointId: string, cutId: string): Promise<void> {
  const r = await runCli(['test-failover', '--server', s.server.info.url, '--token-file', s.server.info.tokenFile, '--ca', s.server.info.caFile!,
    '--agent-id', s.agentId, '--point', pointId, '--download', path.join(s.dir, `tf-${pointId}`), '--json']).done;
  t.equal(r.code, 0, `test-failover ${pointId} succeeds: ${r.stderr}`);
  const j = JSON.parse(r.stdout) as { disks: { diskId: string; location: string; localPath: string | null }[]; downloads: { diskId: string; file: string }[] };
  // the image as the backend keeps it (a local file, or a blob), downloaded as a local sparse file
  t.equal(j.downloads.length, j.disks.length, 'every image of the point was downloaded');
  const image = j.downloads[0].file;
  const fsck = await shAsync('e2fsck', ['-fn', image]);
  t.equal(fsck.code, 0, `e2fsck -fn of ${pointId} is clean ${fsck.code ? fsck.stdout.slice(-1000) : ''}`);
  const m = path.join(s.dir, `check-${pointId}`);
  await fsp.mkdir(m);
  sh('mount', ['-o', 'ro,loop,noload', image, m]);
  try {
    const want = await fsp.readFile(path.join(s.sums, cutId), 'utf8');
    const nfiles = want.split('\n').filter(Boolean).length;
    const check = await new Promise<{ ok: boolean; out: string }>((resolve) => {
      execFile('sha256sum', ['-c', '--quiet', path.join(s.sums, cutId)], { cwd: m, encoding: 'utf8', timeout: LONG }, (err, stdout) => resolve({ ok: !err, out: stdout }));
    });
    t.ok(check.ok, `${pointId}: all ${nfiles} files match the checksums taken inside its frozen window ${check.out.slice(0, 500)}`);
    const have = sh('sh', ['-c', `cd '${m}' && find . -type f ! -name lost+found | sort`]).split('\n').filter(Boolean).length;
    t.equal(have, nfiles, `${pointId}: the image holds exactly the files present at the cut`);
  } finally {
    sh('umount', [m]);
  }
  const c = await runCli(['test-failover', '--server', s.server.info.url, '--token-file', s.server.info.tokenFile, '--ca', s.server.info.caFile!,
    '--agent-id', s.agentId, '--point', pointId, '--cleanup']).done;
  t.equal(c.code, 0, 'cleanup succeeds');
  const kept = j.disks[0].localPath;
  if (kept) t.notOk(fs.existsSync(path.dirname(kept)), 'cleanup removed the images');
  await fsp.rm(path.dirname(image), { recursive: true, force: true });
}

export function statusArgs(server: SpawnedServer): string[] {
  return ['status', '--server', server.info.url, '--token-file', server.info.tokenFile, '--ca', server.info.caFile!, '--json'];
}
