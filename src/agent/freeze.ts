/**
 * Consistency helpers for cuts: which filesystems live on the protected disks,
 * freezing and thawing them (fsfreeze, i.e. FIFREEZE/FITHAW), and hook scripts.
 *
 * Hooks live in a hooks directory, one sub-directory per phase, run in name order
 * (like run-parts), each with a timeout:
 *   pre-freeze/   app-consistent cuts only, before the freeze (quiesce applications)
 *   frozen/       every cut, while the filesystems are frozen (observers; their
 *                 time counts against the freeze bound: keep them short and read-only)
 *   post-thaw/    app-consistent cuts only, after the thaw (always runs when pre-freeze ran)
 * Environment: MOBILITY_CUT_ID, MOBILITY_CUT_KIND, MOBILITY_MOUNTS (newline-separated),
 * MOBILITY_PHASE.
 */
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { MobilityError } from '../errors.js';

export interface DevNum { major: number; minor: number }

export function devOf(rdev: number): DevNum {
  return { major: Math.floor(rdev / 256) & 0xfff | ((rdev >>> 20) & ~0xfff), minor: (rdev & 0xff) | ((rdev >>> 12) & ~0xff) };
}

/** major:minor of a block device and of its partitions. */
export function deviceFamily(devPath: string): string[] {
  const st = fs.statSync(devPath);
  if (!st.isBlockDevice()) return [];
  const { major, minor } = devOf(st.rdev);
  const out = [`${major}:${minor}`];
  try {
    const sys = fs.realpathSync(`/sys/dev/block/${major}:${minor}`);
    for (const e of fs.readdirSync(sys)) {
      const devFile = path.join(sys, e, 'dev');
      if (fs.existsSync(path.join(sys, e, 'partition')) && fs.existsSync(devFile)) out.push(fs.readFileSync(devFile, 'utf8').trim());
    }
  } catch { /* no sysfs entry: the device alone */ }
  return out;
}

/** Mount points whose source device is one of devs (major:minor), from /proc/self/mountinfo, deepest last. */
export function mountsOn(devs: Set<string>, mountinfo = '/proc/self/mountinfo'): string[] {
  const out: string[] = [];
  for (const line of fs.readFileSync(mountinfo, 'utf8').split('\n')) {
    const f = line.split(' ');
    if (f.length < 5) continue;
    if (devs.has(f[2])) out.push(f[4].replace(/\\(\d{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))));
  }
  return [...new Set(out)].sort((a, b) => a.length - b.length);
}

/** After the timeout's SIGKILL, how long run() waits for the process itself to be reaped before resolving anyway. */
const KILL_GRACE_MS = 500;

interface RunResult {
  code: number | null; out: string; timedOut: boolean;
  /** The process itself had exited (with code) when the timeout fired: something it started still held its output. */
  exitedBeforeTimeout: boolean;
}

/**
 * Runs cmd with a bound: resolves within timeoutMs + KILL_GRACE_MS whatever the process and
 * its children do. The process runs in its own process group; at the timeout the whole group
 * is killed and the output pipes are closed on our side, so neither a hung command nor a child
 * that left the group (setsid, a daemon) holding stdout/stderr can keep the caller waiting.
 */
function run(cmd: string, args: string[], timeoutMs: number, env?: NodeJS.ProcessEnv): Promise<RunResult> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: env ?? process.env, detached: true });
    let out = '';
    let timedOut = false;
    let exited = false;
    let exitedBeforeTimeout = false;
    let exitCode: number | null = null;
    let done = false;
    let grace: NodeJS.Timeout | undefined;
    const finish = (code: number | null, text: string) => {
      if (done) return;
      done = true;
      clearTimeout(t);
      clearTimeout(grace);
      // whoever still holds the other ends of the pipes no longer keeps anything of ours alive
      p.stdout.destroy();
      p.stderr.destroy();
      resolve({ code, out: text, timedOut, exitedBeforeTimeout });
    };
    p.stdout.on('data', (d: Buffer) => { if (out.length < 4096) out += d.toString(); });
    p.stderr.on('data', (d: Buffer) => { if (out.length < 4096) out += d.toString(); });
    const t = setTimeout(() => {
      timedOut = true;
      exitedBeforeTimeout = exited;
      // the group: the process and whatever it started that stayed in it (a child that left the
      // group with setsid survives, but its hold on the pipes ends with finish())
      try { process.kill(-p.pid!, 'SIGKILL'); } catch { if (!exited) p.kill('SIGKILL'); }
      if (exited) finish(exitCode, out.trim());
      else grace = setTimeout(() => finish(null, out.trim()), KILL_GRACE_MS);
    }, timeoutMs);
    p.on('error', (err) => finish(-1, err.message));
    p.on('exit', (code) => {
      exited = true;
      exitCode = code;
      if (timedOut) finish(code, out.trim());
      // otherwise 'close' follows once every holder of the pipes is gone, or the timeout does
    });
    p.on('close', (code) => finish(code, out.trim()));
  });
}

/** Freezes each mount (in order); on any failure thaws what it froze and throws MOB_ERR_FREEZE. */
export async function freezeAll(mounts: string[], timeoutMs: number): Promise<void> {
  const done: string[] = [];
  for (const m of mounts) {
    const r = await run('fsfreeze', ['-f', m], timeoutMs);
    if (r.code !== 0) {
      await thawAll(done);
      throw new MobilityError('MOB_ERR_FREEZE', `cannot freeze ${m}: ${r.timedOut ? `fsfreeze did not return within ${timeoutMs} ms` : r.out || `exit ${r.code}`}`);
    }
    done.push(m);
  }
}

/** Thaws every mount (reverse order), never throws; returns the failures. */
export async function thawAll(mounts: string[]): Promise<string[]> {
  const failed: string[] = [];
  for (const m of [...mounts].reverse()) {
    // a filesystem that is not frozen answers EINVAL: that is fine
    const r = await run('fsfreeze', ['-u', m], 30_000);
    if (r.code !== 0 && !/Invalid argument/i.test(r.out)) failed.push(`${m}: ${r.out || `exit ${r.code}`}`);
  }
  return failed;
}

export type HookPhase = 'pre-freeze' | 'frozen' | 'post-thaw';
export interface HookResult { phase: HookPhase; hook: string; ok: boolean; ms: number; output: string }

/** Runs the phase's hooks in name order; returns their results (failures are reported, not thrown). */
export async function runHooks(hooksDir: string | undefined, phase: HookPhase, env: Record<string, string>, timeoutMs: number): Promise<HookResult[]> {
  if (!hooksDir) return [];
  const dir = path.join(hooksDir, phase);
  let names: string[];
  try {
    names = fs.readdirSync(dir).filter((n) => !n.startsWith('.')).sort();
  } catch {
    return [];
  }
  const results: HookResult[] = [];
  for (const n of names) {
    const file = path.join(dir, n);
    const st = fs.statSync(file);
    if (!st.isFile()) continue;
    const t0 = Date.now();
    if (!(st.mode & 0o111)) {
      results.push({ phase, hook: file, ok: false, ms: 0, output: 'not executable' });
      continue;
    }
    const r = await run(file, [], timeoutMs, { ...process.env, ...env, MOBILITY_PHASE: phase });
    // a hook that exited 0 but left a process holding its output did not finish in time either
    const output = !r.timedOut ? r.out.slice(0, 1000)
      : r.exitedBeforeTimeout ? `timed out after ${timeoutMs} ms: the hook exited (${r.code === null ? 'killed' : `exit ${r.code}`}) but a process it started still held its output${r.out ? `; output: ${r.out.slice(0, 900)}` : ''}`
        : `timed out after ${timeoutMs} ms${r.out ? `; output: ${r.out.slice(0, 900)}` : ''}`;
    results.push({ phase, hook: file, ok: r.code === 0 && !r.timedOut, ms: Date.now() - t0, output });
  }
  return results;
}
