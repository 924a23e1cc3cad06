/**
 * The real QEMU guest agent (`qemu-ga`, Debian package qemu-guest-agent) run on this host for
 * tests, listening on a unix socket as a VM's agent channel would; and a socket that accepts and
 * never answers (a VM without an agent).
 *
 * Safety: a guest agent freezes and thaws every filesystem it sees. Run here, it would see this
 * machine's: `guest-fsfreeze-freeze` (no list) would freeze / and hang the machine, and
 * `guest-fsfreeze-thaw` would thaw filesystems other tests froze in parallel. So qemu-ga runs
 * in a private mount namespace that keeps only /, /proc, /dev, the mounts holding its directory
 * and the test filesystems it is given (everything else is lazily unmounted in that namespace
 * only), and `guest-fsfreeze-freeze` is blocked (-b): only guest-fsfreeze-freeze-list with the
 * test's mount points can freeze anything.
 *
 * Needs root, qemu-ga and unshare: a missing one fails the test, never skips it. Teardown
 * (registered after the mounts, so it runs before they are unmounted): SIGKILL qemu-ga, thaw the
 * test filesystems. The cleanup scope kills it too when the test process is killed.
 */
import { execFileSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { cleanup } from './cleanup.js';
import { sleep } from './helpers.js';

/** Lazily unmounts, in this (private) namespace, every mount not in $KEEP, deepest first; then runs qemu-ga. */
const NS_SCRIPT = `
awk '{print length($5), $5}' /proc/self/mountinfo | sort -rn | cut -d' ' -f2- | while read -r m; do
  case "$KEEP" in *" $m "*) ;; *) umount -l "$m" 2>/dev/null ;; esac
done
exec qemu-ga "$@"
`;

function need(tool: string): void {
  try { execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' }); } catch { throw new Error(`${tool} is required for this test (Debian: apt-get install qemu-guest-agent / util-linux)`); }
}

function mountPoints(): string[] {
  return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').map((l) => l.split(' ')[4]).filter((m): m is string => !!m);
}

export interface QemuGa {
  socket: string;
  stateDir: string;
  child: ChildProcess;
  /** SIGKILLs the agent and waits for it to be gone (whatever it froze stays frozen). */
  kill(): Promise<void>;
}

interface TestLike { teardown(fn: () => unknown): void }

/**
 * Starts qemu-ga on `dir/qga.sock` (state in `dir/state`, kept across restarts with the same
 * dir: a restarted agent knows it left the guest frozen) seeing only `mounts` besides /.
 * Resolves once it answers connections.
 */
export async function startQemuGa(t: TestLike, o: { dir: string; mounts: string[]; block?: string[] }): Promise<QemuGa> {
  if (process.getuid?.() !== 0) throw new Error('this test needs root (qemu-ga freezes a loop filesystem)');
  need('qemu-ga');
  need('unshare');
  const socket = path.join(o.dir, 'qga.sock');
  const stateDir = path.join(o.dir, 'state');
  fs.mkdirSync(stateDir, { recursive: true });
  fs.rmSync(socket, { force: true });
  const under = (p: string, m: string) => p === m || m === '/' || p.startsWith(m + '/');
  const keep = new Set(['/', '/proc', '/dev', ...o.mounts.map((m) => path.resolve(m))]);
  for (const m of mountPoints()) if (under(o.dir, m)) keep.add(m);
  const block = ['guest-fsfreeze-freeze', ...(o.block ?? [])];
  const c = cleanup(t);
  const child = c.spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', NS_SCRIPT, 'qemu-ga-ns',
    '-m', 'unix-listen', '-p', socket, '-t', stateDir, '-f', path.join(o.dir, 'qga.pid'), '-l', path.join(o.dir, 'qga.log'), '-b', block.join(',')],
  { env: { ...process.env, KEEP: ` ${[...keep].join(' ')} ` }, stdio: 'ignore' });
  let exited = false;
  const gone = new Promise<void>((r) => child.once('exit', () => { exited = true; r(); }));
  const kill = async () => {
    if (!exited) { try { process.kill(-child.pid!, 'SIGKILL'); } catch { /* gone */ } }
    await gone;
  };
  t.teardown(async () => {
    await kill();
    for (const m of o.mounts) { try { execFileSync('fsfreeze', ['-u', m], { stdio: 'ignore' }); } catch { /* not frozen */ } }
  });
  // ready when it accepts a connection (progress, not time: a generous limit only against a hang)
  for (let i = 0; ; i++) {
    if (exited) throw new Error(`qemu-ga exited at start: ${readLog(o.dir)}`);
    if (fs.existsSync(socket) && await canConnect(socket)) break;
    if (i > 600) throw new Error(`qemu-ga did not listen on ${socket} within 60 s: ${readLog(o.dir)}`);
    await sleep(100);
  }
  return { socket, stateDir, child, kill };
}

function readLog(dir: string): string {
  try { return fs.readFileSync(path.join(dir, 'qga.log'), 'utf8').slice(-2000); } catch { return '(no log)'; }
}

function canConnect(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection({ path: socket });
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
}

/** A unix socket that accepts connections and never answers (a VM whose guest has no agent). */
export async function silentSocket(t: TestLike, file: string): Promise<net.Server> {
  const conns = new Set<net.Socket>();
  const srv = net.createServer((s) => { conns.add(s); s.on('error', () => undefined); s.on('close', () => conns.delete(s)); });
  await new Promise<void>((resolve, reject) => { srv.once('error', reject); srv.listen(file, resolve); });
  t.teardown(() => new Promise<void>((r) => { for (const s of conns) s.destroy(); srv.close(() => r()); }));
  return srv;
}
