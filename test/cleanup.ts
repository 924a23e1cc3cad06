/**
 * Scratch root and cleanup registry for tests that start real things (servers,
 * agents, fio, sshd, loop devices, mounts, trace instances, user accounts).
 *
 * Every test process gets one scratch root, os.tmpdir()/mobility-test/<file>-<pid>-<rand>/,
 * with an `owner` file ("<pid> <starttime>") and a `registry.jsonl` that records,
 * synchronously, every resource a test registers (and its release). Cleanup runs
 *
 *   - when the test (its scope) ends: t.teardown, after the test's own teardowns;
 *   - on SIGTERM, SIGINT, SIGHUP, SIGALRM and process exit, synchronously. A tap
 *     timeout ends a file like this: tap sends the file an IPC "timeout" message,
 *     the file's tap fails the running test and sends itself SIGALRM; 500 ms
 *     after the message tap also sends SIGALRM, 500 ms later SIGKILL. Signals go to
 *     the test process only (never its process group), so without this every
 *     child it started would live on;
 *   - after the process died in any way (SIGKILL included): a detached reaper
 *     (a shell loop) watches the owner pid and then runs the sweep on its root;
 *   - at the start of a suite run: scripts/test.sh sweeps every root whose owner is dead.
 *
 * Cleanup order: SIGKILL processes (registered ones, their process groups, and in
 * the test process every remaining descendant), thaw filesystems (a writer blocked
 * on a frozen filesystem cannot die), wait for the processes to go, remove trace
 * instances, lazily unmount, detach loop devices, delete user accounts, remove dirs.
 * Mounts and loop devices are also found by path: anything mounted under, or a loop
 * device backed by a file under, a scope's directory is cleaned up too.
 *
 * Usage (one scope per tap test; repeated calls with the same t share it):
 *
 *   import { cleanup } from '../cleanup.js';
 *   const c = cleanup(t);
 *   const dir = c.dir('disk-');                  // under the scratch root, removed at the end
 *   const child = c.spawn('fio', [...]);         // own process group, killed with its children
 *   c.process(someChild);                        // a child spawned elsewhere (killed by pid)
 *   c.mount(mnt); c.loop('/dev/loop3'); c.traceInstances(agentId); c.user('mobtest1');
 *   c.pidFile(file, 'mobility');                 // a daemon that wrote a pid file (setsid'd)
 *
 * Sweep from a shell: node dist/test/cleanup.js --sweep [ROOT...]
 */
import { spawn, spawnSync, type ChildProcess, type SpawnOptions } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

export const SCRATCH_BASE = path.join(os.tmpdir(), 'mobility-test');
const TRACEFS_INSTANCES = '/sys/kernel/tracing/instances';
const TRACE_LOCK_DIR = '/run/mobility/trace-locks';
const THIS_FILE = fileURLToPath(import.meta.url);

type Resource =
  | { kind: 'process'; pid: number; start: string; group: boolean }
  | { kind: 'pidfile'; file: string; match: string }
  | { kind: 'mount'; path: string }
  | { kind: 'loop'; dev: string; backing: string }
  | { kind: 'trace'; agentId: string }
  | { kind: 'user'; name: string }
  | { kind: 'dir'; path: string };

type Entry = Resource & { id: number };

interface ProcInfo { pid: number; ppid: number; pgrp: number; state: string; start: string }

// ---------------------------------------------------------------------------------------------
// small synchronous tools

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function readProc(pid: number): ProcInfo | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return { pid, state: rest[0], ppid: Number(rest[1]), pgrp: Number(rest[2]), start: rest[19] };
  } catch {
    return null;
  }
}

function procTable(): ProcInfo[] {
  const out: ProcInfo[] = [];
  let names: string[] = [];
  try { names = fs.readdirSync('/proc'); } catch { return out; }
  for (const n of names) {
    if (!/^\d+$/.test(n)) continue;
    const p = readProc(Number(n));
    if (p) out.push(p);
  }
  return out;
}

/** starttime (field 22 of /proc/PID/stat) of a live process, or null. */
export function processStartTime(pid: number): string | null {
  return readProc(pid)?.start ?? null;
}

function alive(pid: number, start?: string): boolean {
  const p = readProc(pid);
  return p !== null && p.state !== 'Z' && (start === undefined || p.start === start);
}

function kill(pid: number, sig: NodeJS.Signals = 'SIGKILL'): void {
  try { process.kill(pid, sig); } catch { /* gone */ }
}

function run(cmd: string, args: string[]): boolean {
  const r = spawnSync(cmd, args, { stdio: 'ignore', timeout: 20_000 });
  return r.status === 0;
}

function unescapeMount(s: string): string {
  return s.replace(/\\(\d{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

interface MountInfo { path: string; fstype: string }

function mounts(): MountInfo[] {
  const out: MountInfo[] = [];
  let text = '';
  try { text = fs.readFileSync('/proc/self/mountinfo', 'utf8'); } catch { return out; }
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f.length < 10) continue;
    const sep = f.indexOf('-', 6);
    out.push({ path: unescapeMount(f[4]), fstype: sep > 0 ? f[sep + 1] : '' });
  }
  return out;
}

const under = (p: string, dir: string) => p === dir || p.startsWith(dir.endsWith('/') ? dir : dir + '/');

function loopBacking(dev: string): string | null {
  try {
    return fs.readFileSync(`/sys/block/${path.basename(dev)}/loop/backing_file`, 'utf8').trim().replace(/ \(deleted\)$/, '');
  } catch {
    return null;
  }
}

function loopsBackedUnder(dir: string): string[] {
  const out: string[] = [];
  let names: string[] = [];
  try { names = fs.readdirSync('/sys/block'); } catch { return out; }
  for (const n of names) {
    if (!n.startsWith('loop')) continue;
    const b = loopBacking(n);
    if (b && under(b, dir)) out.push(`/dev/${n}`);
  }
  return out;
}

/** Trace instances of an agent id: every instance whose name starts with mobility-<agentId>. */
export function traceInstancesOf(agentId: string): string[] {
  try {
    return fs.readdirSync(TRACEFS_INSTANCES).filter((n) => n.startsWith(`mobility-${agentId}`)).sort();
  } catch {
    return [];
  }
}

/** The live process holding an instance's lock (/run/mobility/trace-locks/<name>.lock, "pid starttime"), or null. */
function instanceOwner(name: string): number | null {
  try {
    const m = /^(\d+) (\d+)/.exec(fs.readFileSync(path.join(TRACE_LOCK_DIR, `${name}.lock`), 'utf8'));
    return m && alive(Number(m[1]), m[2]) ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/**
 * Removes the agent's trace instances (rmdir; when refused, the events are disabled and it is
 * retried) and their stale lock files. An instance whose lock is held by a live process is never
 * touched (it is not ours: our processes are killed first) and is returned as not removed.
 */
export function removeTraceInstances(agentId: string): string[] {
  const failed: string[] = [];
  for (const name of traceInstancesOf(agentId)) {
    const owner = instanceOwner(name);
    if (owner !== null) { failed.push(`${name} (in use by live process ${owner})`); continue; }
    const dir = path.join(TRACEFS_INSTANCES, name);
    let ok = false;
    for (let i = 0; i < 20 && !ok; i++) {
      try {
        fs.rmdirSync(dir);
        ok = true;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') { ok = true; break; }
        for (const f of ['tracing_on', 'events/enable']) { try { fs.writeFileSync(path.join(dir, f), '0'); } catch { /* not there */ } }
        sleepSync(50);
      }
    }
    if (!ok) failed.push(name);
  }
  try {
    for (const f of fs.readdirSync(TRACE_LOCK_DIR)) {
      if (!f.startsWith(`mobility-${agentId}`)) continue;
      const m = /^(\d+) (\d+)/.exec(fs.readFileSync(path.join(TRACE_LOCK_DIR, f), 'utf8'));
      if (!m || !alive(Number(m[1]), m[2])) fs.rmSync(path.join(TRACE_LOCK_DIR, f), { force: true });
    }
  } catch { /* no lock dir */ }
  return failed;
}

function userExists(name: string): boolean {
  try { return fs.readFileSync('/etc/passwd', 'utf8').split('\n').some((l) => l.startsWith(`${name}:`)); } catch { return false; }
}

// ---------------------------------------------------------------------------------------------
// releasing resources (shared by the test process and the sweep)

interface ReleaseContext {
  /** the test process itself: also kill its remaining descendants (never `spare`) */
  self?: { spare: Set<number> };
  /** a signal handler in a hurry (tap's SIGKILL follows within a second): wait less for processes, leave the directories (the reaper finishes) */
  hurry?: boolean;
}

/**
 * MOBILITY_TEST_CLEANUP_LOG=<file>: every cleanup that had something to do appends one line
 * (who, why, what it did, how long it took): the evidence that a timeout was cleaned up.
 */
function trace(why: string, did: string[], problems: string[], t0: number): void {
  const file = process.env.MOBILITY_TEST_CLEANUP_LOG;
  if (!file || (!did.length && !problems.length)) return;
  const line = `${new Date().toISOString()} pid ${process.pid} ${why}: ${did.join(', ') || 'nothing'}${problems.length ? `; FAILED: ${problems.join('; ')}` : ''} (${Date.now() - t0} ms)\n`;
  try { fs.appendFileSync(file, line); } catch { /* best effort */ }
}

/** Releases resources, in the safe order. Synchronous, never throws; returns what could not be cleaned. */
function releaseAll(entries: Resource[], dirs: string[], ctx: ReleaseContext = {}, why = 'cleanup'): string[] {
  const t0 = Date.now();
  const problems: string[] = [];
  const did: string[] = [];
  const table = procTable();
  const victims = new Map<number, string | undefined>(); // pid -> expected starttime
  // 1. processes: SIGKILL (no waiting yet)
  for (const e of entries) {
    if (e.kind === 'process') {
      if (e.group) {
        for (const p of table) if (p.pgrp === e.pid && Number(p.start) >= Number(e.start)) victims.set(p.pid, p.start);
      }
      if (alive(e.pid, e.start)) victims.set(e.pid, e.start);
    } else if (e.kind === 'pidfile') {
      let pid = 0;
      try { pid = Number(fs.readFileSync(e.file, 'utf8').trim()); } catch { continue; }
      const p = pid > 0 ? readProc(pid) : null;
      if (!p) continue;
      let cmd = '';
      try { cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' '); } catch { continue; }
      if (!cmd.includes(e.match)) continue;
      victims.set(pid, p.start);
      if (p.pgrp === pid) for (const q of table) if (q.pgrp === pid && Number(q.start) >= Number(p.start)) victims.set(q.pid, q.start);
    }
  }
  if (ctx.self) {
    const kids = new Map<number, ProcInfo[]>();
    for (const p of table) { const l = kids.get(p.ppid) ?? []; l.push(p); kids.set(p.ppid, l); }
    const stack = [process.pid];
    while (stack.length) {
      for (const c of kids.get(stack.pop()!) ?? []) {
        if (ctx.self.spare.has(c.pid)) continue;
        victims.set(c.pid, c.start);
        stack.push(c.pid);
      }
    }
  }
  const killed: number[] = [];
  for (const [pid, start] of victims) if (alive(pid, start)) { kill(pid); killed.push(pid); }
  if (killed.length) {
    did.push(`SIGKILL ${killed.length} processes (${killed.join(' ')}) [${Date.now() - t0} ms]`);
    trace(`${why} (started)`, did, [], t0); // evidence even if this process is killed before the end
  }
  // 2. thaw: a process blocked on a frozen filesystem does not die
  const allMounts = mounts();
  const ours = new Map<string, MountInfo>();
  for (const e of entries) if (e.kind === 'mount') for (const m of allMounts) if (m.path === e.path) ours.set(m.path, m);
  for (const d of dirs) for (const m of allMounts) if (under(m.path, d)) ours.set(m.path, m);
  const byDepth = [...ours.values()].sort((a, b) => b.path.length - a.path.length);
  for (const m of byDepth) if (!/^(tmpfs|proc|sysfs|devtmpfs|tracefs|overlay)$/.test(m.fstype)) run('fsfreeze', ['-u', m.path]);
  // 3. wait for the processes to be gone (zombies hold nothing)
  const until = Date.now() + (ctx.hurry ? 600 : 3000);
  for (;;) {
    const left = [...victims].filter(([pid, start]) => alive(pid, start));
    if (!left.length) { if (victims.size) did.push(`all gone [${Date.now() - t0} ms]`); break; }
    if (Date.now() > until) { problems.push(`processes still running: ${left.map(([p]) => p).join(' ')}`); break; }
    sleepSync(20);
  }
  // 4. trace instances
  for (const e of entries) {
    if (e.kind !== 'trace') continue;
    const had = traceInstancesOf(e.agentId);
    const failed = removeTraceInstances(e.agentId);
    for (const n of failed) problems.push(`trace instance ${n}`);
    const gone = had.filter((n) => !failed.some((f) => f === n || f.startsWith(`${n} `)));
    if (gone.length) did.push(`removed trace instances ${gone.join(' ')} [${Date.now() - t0} ms]`);
  }
  // 5. mounts, deepest first
  for (const m of byDepth) {
    if (run('umount', ['-l', m.path]) || !mounts().some((x) => x.path === m.path)) did.push(`unmounted ${m.path} [${Date.now() - t0} ms]`);
    else problems.push(`mount ${m.path}`);
  }
  // 6. loop devices: registered ones (still backed by the same file) and any backed by a file under a scope dir
  const loops = new Set<string>();
  for (const e of entries) if (e.kind === 'loop' && loopBacking(e.dev) === e.backing) loops.add(e.dev);
  for (const d of dirs) for (const l of loopsBackedUnder(d)) loops.add(l);
  for (const l of loops) {
    if (run('losetup', ['-d', l]) || loopBacking(l) === null) did.push(`detached ${l} [${Date.now() - t0} ms]`);
    else problems.push(`loop ${l}`);
  }
  // 7. accounts
  for (const e of entries) {
    if (e.kind !== 'user' || !userExists(e.name)) continue;
    if (run('userdel', ['-f', e.name])) did.push(`deleted user ${e.name} [${Date.now() - t0} ms]`);
    else problems.push(`user ${e.name}`);
  }
  if (ctx.hurry) {
    trace(why, did, problems, t0);
    return problems;
  }
  // 8. directories: only under the scratch base, and never through something still mounted
  const left = mounts();
  for (const d of dirs) {
    if (!under(d, SCRATCH_BASE) || d === SCRATCH_BASE) continue;
    if (left.some((m) => under(m.path, d))) { problems.push(`dir ${d} (still has mounts)`); continue; }
    if (!fs.existsSync(d)) continue;
    try { fs.rmSync(d, { recursive: true, force: true }); did.push(`removed ${d}`); } catch (err) { problems.push(`dir ${d}: ${(err as Error).message}`); }
  }
  trace(why, did, problems, t0);
  return problems;
}

// ---------------------------------------------------------------------------------------------
// the test process: scratch root, scopes, handlers

interface RunState {
  root: string;
  registry: string;
  nextId: number;
  scopes: Set<ScopeImpl>;
  reaperPid: number | null;
  finished: boolean;
}

let state: RunState | null = null;

function record(line: object): void {
  if (!state) return;
  try { fs.appendFileSync(state.registry, JSON.stringify(line) + '\n'); } catch { /* root removed */ }
}

/** The scratch root of this test process (created on first use). */
export function scratchRoot(): string {
  return runState().root;
}

function runState(): RunState {
  if (state) return state;
  fs.mkdirSync(SCRATCH_BASE, { recursive: true, mode: 0o755 });
  try { fs.chmodSync(SCRATCH_BASE, 0o755); } catch { /* not ours to change */ }
  const name = path.basename(process.argv[1] ?? 'node').replace(/\.test\.js$|\.js$/, '').replace(/[^A-Za-z0-9_-]/g, '_');
  const root = fs.mkdtempSync(path.join(SCRATCH_BASE, `${name}-${process.pid}-`));
  fs.chmodSync(root, 0o755); // non-root test accounts (sshd) must be able to reach files below
  fs.writeFileSync(path.join(root, 'owner'), `${process.pid} ${processStartTime(process.pid) ?? '0'}\n`);
  const registry = path.join(root, 'registry.jsonl');
  fs.writeFileSync(registry, '');
  state = { root, registry, nextId: 1, scopes: new Set(), reaperPid: null, finished: false };
  // the reaper: once this process is gone (whatever killed it), sweep its root
  try {
    const reaper = spawn('sh', ['-c', 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec "$2" "$3" --sweep "$4" >/dev/null 2>&1',
      'mobility-test-reaper', String(process.pid), process.execPath, THIS_FILE, root], { detached: true, stdio: 'ignore' });
    reaper.unref();
    state.reaperPid = reaper.pid ?? null;
  } catch { /* the next sweep cleans up */ }
  installHandlers();
  return state;
}

let handlersInstalled = false;

function installHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  process.on('exit', () => finishRun('exit'));
  for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP', 'SIGALRM'] as const) {
    const h = () => {
      finishRun(sig);
      process.removeListener(sig, h);
      // re-raise: tap's own handler (signal-exit) reports and ends the process, or the default action does
      process.kill(process.pid, sig);
    };
    process.on(sig, h);
  }
}

/** Releases everything of every scope and this process's remaining children, then removes the scratch root. */
function finishRun(why: string): void {
  if (!state || state.finished) return;
  state.finished = true;
  const entries: Resource[] = [];
  const dirs: string[] = [];
  for (const s of state.scopes) { entries.push(...s.live()); dirs.push(...s.dirs()); }
  dirs.push(state.root);
  const spare = new Set<number>(state.reaperPid ? [state.reaperPid] : []);
  // in a signal handler time is short (tap sends SIGKILL 1 s after its timeout message): the reaper removes the directories
  const problems = releaseAll(entries, dirs, { self: { spare }, hurry: why !== 'exit' }, `test process ${why}`);
  if (problems.length) {
    try { process.stderr.write(`mobility test cleanup: ${problems.join('; ')}\n`); } catch { /* closed */ }
  }
}

export interface Cleanup {
  /** A fresh directory under the scratch root (mode 0700), removed when the scope ends, after everything in it is unmounted and detached. */
  dir(prefix?: string): string;
  /** Spawns a tracked child in its own process group (detached), so that the whole group (fio jobs, shells' children) dies with it. */
  spawn(cmd: string, args: string[], opts?: SpawnOptions): ChildProcess;
  /** Tracks a child process (or a pid): SIGKILLed when the scope ends; group: kill its process group too. */
  process(child: ChildProcess | number, o?: { group?: boolean }): void;
  /** A daemon that writes its pid to `file` (e.g. started with setsid): killed, with its group, if its command line contains `match`. */
  pidFile(file: string, match: string): void;
  /** A mount point: thawed and lazily unmounted. (Anything mounted under a scope dir is found anyway.) */
  mount(mountpoint: string): void;
  /** A loop device: detached (only while it is still backed by the file it had when registered). */
  loop(device: string): void;
  /** Every trace instance named mobility-<agentId>*: removed (and its stale lock file). */
  traceInstances(agentId: string): void;
  /** A user account: userdel -f. */
  user(name: string): void;
  /** Releases this scope now (also done at the scope's end). Returns what could not be cleaned. */
  run(): string[];
}

class ScopeImpl implements Cleanup {
  private entries = new Map<number, Entry>();
  private done = false;

  constructor(private readonly st: RunState) {
    st.scopes.add(this);
  }

  live(): Resource[] { return [...this.entries.values()]; }
  dirs(): string[] { return this.live().filter((e) => e.kind === 'dir').map((e) => (e as { path: string }).path); }

  private add(r: Resource): number {
    const id = this.st.nextId++;
    this.entries.set(id, { ...r, id });
    record({ ...r, id });
    return id;
  }

  private drop(id: number): void {
    if (this.entries.delete(id)) record({ done: id });
  }

  dir(prefix = 'tmp-'): string {
    const d = fs.mkdtempSync(path.join(this.st.root, prefix));
    this.add({ kind: 'dir', path: d });
    return d;
  }

  spawn(cmd: string, args: string[], opts: SpawnOptions = {}): ChildProcess {
    const child = spawn(cmd, args, { stdio: 'ignore', ...opts, detached: true });
    this.process(child, { group: true });
    return child;
  }

  process(child: ChildProcess | number, o: { group?: boolean } = {}): void {
    const pid = typeof child === 'number' ? child : child.pid;
    if (!pid) return;
    const start = processStartTime(pid);
    if (start === null) return;
    const id = this.add({ kind: 'process', pid, start, group: o.group ?? false });
    // a plain process is forgotten once it exited; a group stays (its members may outlive the leader)
    if (typeof child !== 'number' && !o.group) child.once('exit', () => this.drop(id));
  }

  pidFile(file: string, match: string): void { this.add({ kind: 'pidfile', file, match }); }
  mount(mountpoint: string): void { this.add({ kind: 'mount', path: path.resolve(mountpoint) }); }

  loop(device: string): void {
    const backing = loopBacking(device);
    if (backing) this.add({ kind: 'loop', dev: device, backing });
  }

  traceInstances(agentId: string): void { this.add({ kind: 'trace', agentId }); }
  user(name: string): void { this.add({ kind: 'user', name }); }

  run(): string[] {
    if (this.done) return [];
    this.done = true;
    const problems = releaseAll(this.live(), this.dirs(), {}, 'test teardown');
    for (const id of [...this.entries.keys()]) this.drop(id);
    this.st.scopes.delete(this);
    return problems;
  }
}

interface Teardownable { teardown(fn: () => unknown): void; comment?(...args: unknown[]): void }
const scopes = new WeakMap<object, ScopeImpl>();
let processScope: ScopeImpl | null = null;

/**
 * The cleanup scope of a tap test (created on first call, released at the test's end, after
 * the test's own teardowns); without a test, the scope of the whole test process (released at exit).
 */
export function cleanup(t?: Teardownable): Cleanup {
  const st = runState();
  if (!t) return (processScope ??= new ScopeImpl(st));
  let s = scopes.get(t);
  if (!s) {
    const scope = new ScopeImpl(st);
    scopes.set(t, scope);
    t.teardown(() => {
      const problems = scope.run();
      if (problems.length) t.comment?.(`cleanup could not remove: ${problems.join('; ')}`);
    });
    s = scope;
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// the sweep: roots whose owner is dead

function readRegistry(file: string): Resource[] {
  const live = new Map<number, Entry>();
  let text = '';
  try { text = fs.readFileSync(file, 'utf8'); } catch { return []; }
  for (const line of text.split('\n')) {
    if (!line) continue;
    try {
      const j = JSON.parse(line) as Entry | { done: number };
      if ('done' in j) live.delete(j.done);
      else live.set(j.id, j);
    } catch { /* a torn last line */ }
  }
  return [...live.values()];
}

export interface SweepResult { root: string; action: 'cleaned' | 'owner alive' | 'too new'; problems: string[] }

/** Cleans the roots (default: every root under SCRATCH_BASE) whose owner process is dead. Never touches a live owner's root. */
export function sweep(roots?: string[]): SweepResult[] {
  const out: SweepResult[] = [];
  let list = roots;
  if (!list) {
    try { list = fs.readdirSync(SCRATCH_BASE).map((n) => path.join(SCRATCH_BASE, n)); } catch { list = []; }
  }
  for (const root of list.map((r) => path.resolve(r))) {
    if (!under(root, SCRATCH_BASE) || root === SCRATCH_BASE) continue;
    let owner = '';
    try { owner = fs.readFileSync(path.join(root, 'owner'), 'utf8'); } catch { /* being created, or broken */ }
    const m = /^(\d+) (\d+)/.exec(owner);
    if (m && alive(Number(m[1]), m[2])) { out.push({ root, action: 'owner alive', problems: [] }); continue; }
    if (!m) {
      let age = Infinity;
      try { age = Date.now() - fs.statSync(root).mtimeMs; } catch { continue; }
      if (age < 60_000) { out.push({ root, action: 'too new', problems: [] }); continue; }
    }
    const entries = readRegistry(path.join(root, 'registry.jsonl'));
    const dirs = entries.filter((e) => e.kind === 'dir').map((e) => (e as { path: string }).path);
    out.push({ root, action: 'cleaned', problems: releaseAll(entries, [...dirs, root], {}, `sweep of a dead run (owner ${m ? m[1] : 'unknown'})`) });
  }
  return out;
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  const args = process.argv.slice(2);
  if (args[0] !== '--sweep') {
    process.stderr.write('usage: node cleanup.js --sweep [ROOT...]\n');
    process.exit(2);
  }
  const res = sweep(args.length > 1 ? args.slice(1) : undefined);
  let bad = 0;
  for (const r of res) {
    if (r.action !== 'cleaned') continue;
    process.stdout.write(`swept ${r.root}${r.problems.length ? `: could not clean ${r.problems.join('; ')}` : ''}\n`);
    if (r.problems.length) bad++;
  }
  process.exit(bad ? 1 : 0);
}
