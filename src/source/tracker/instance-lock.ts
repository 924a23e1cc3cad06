/**
 * Ownership of a tracefs instance by one process at a time.
 *
 * A trace instance is machine-global kernel state: anything with root can disable or
 * remove it. The agent using an instance holds a lock file for as long as it uses it,
 * and every Mobility code path that would disable, recreate or remove an instance
 * (a second agent, `disable`, uninstall, push-upgrade, the tracker's own recreation)
 * checks the lock first and gets MOB_ERR_TRACKER_BUSY while a live process holds it.
 *
 *   <lockDir>/<instance>.lock   "<pid> <starttime>\n"
 *
 * starttime is field 22 of /proc/<pid>/stat (clock ticks since boot), so a reused pid is
 * never mistaken for the owner. A lock whose owner is gone is stale and taken over.
 * Shell scripts can apply the same rule (uninstall.sh does).
 *
 * Taking over a stale lock is "check it is stale, unlink it, create ours": not atomic. Two
 * processes doing it at once could each unlink the other's fresh lock and both end up owners.
 * So a takeover happens only under a second lock,
 *
 *   <lockDir>/<instance>.lock.takeover   "<pid> <starttime>\n", created with O_EXCL
 *
 * and only its holder unlinks the main lock (after reading it again: still stale). Creating the
 * main lock where there is none needs no takeover (O_EXCL decides). The takeover lock is held
 * for a few system calls; one whose holder died is stale and removed, but only while its
 * content still names that dead process (read again right before the unlink).
 *
 * Contract: acquire() is idempotent for the same process; release() removes the file only
 * when this process owns it. Both are synchronous (called around open/close of the tracker).
 */
import fs from 'node:fs';
import path from 'node:path';
import { MobilityError } from '../../errors.js';

export const DEFAULT_LOCK_DIR = '/run/mobility/trace-locks';

export interface LockOwner { pid: number; startTime: string }

/**
 * starttime of a live process (field 22 of /proc/PID/stat), or null when it does not exist or
 * is a zombie (dead, not yet reaped: it holds nothing any more).
 */
export function processStartTime(pid: number): string | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // comm (field 2) may hold spaces and parentheses: fields after the last ')' are fixed
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (rest[0] === 'Z' || rest[0] === 'X') return null; // field 3, the state
    return rest[19] ?? null; // field 22 = index 19 after pid, comm
  } catch {
    return null;
  }
}

function lockFile(lockDir: string, name: string): string {
  return path.join(lockDir, `${name}.lock`);
}

function readOwner(file: string): LockOwner | null {
  try {
    const m = /^(\d+) (\d+)\s*$/.exec(fs.readFileSync(file, 'utf8'));
    return m ? { pid: Number(m[1]), startTime: m[2]! } : null;
  } catch {
    return null;
  }
}

/** The live process holding the instance, or null (no lock, or a stale one). */
export function instanceOwner(name: string, lockDir = DEFAULT_LOCK_DIR): LockOwner | null {
  const o = readOwner(lockFile(lockDir, name));
  if (!o) return null;
  return processStartTime(o.pid) === o.startTime ? o : null;
}

function busy(name: string, o: LockOwner, action: string): MobilityError {
  return new MobilityError('MOB_ERR_TRACKER_BUSY', `cannot ${action} trace instance ${name}: it is in use by process ${o.pid} (a running Mobility agent); stop that agent first`);
}

/** Throws MOB_ERR_TRACKER_BUSY when another live process holds the instance. */
export function assertInstanceFree(name: string, action: string, lockDir = DEFAULT_LOCK_DIR): void {
  const o = instanceOwner(name, lockDir);
  if (o && o.pid !== process.pid) throw busy(name, o, action);
}

/** How long acquire() waits for another process's takeover of the same stale lock. */
const TAKEOVER_WAIT_MS = 5000;
/** An empty or unreadable lock file younger than this is being written by its creator. */
const WRITING_MS = 2000;

const isLive = (o: LockOwner): boolean => processStartTime(o.pid) === o.startTime;
const sameOwner = (a: LockOwner | null, b: LockOwner | null): boolean => a !== null && b !== null && a.pid === b.pid && a.startTime === b.startTime;

function takeoverFile(lockDir: string, name: string): string {
  return path.join(lockDir, `${name}.lock.takeover`);
}

/** Creates file with content, exclusively: false when it exists. */
function createExclusive(file: string, content: string): boolean {
  let fd: number;
  try {
    fd = fs.openSync(file, 'wx', 0o644);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw new MobilityError('MOB_ERR_TRACKER', `cannot create the lock ${file}: ${(err as Error).message}`);
  }
  try {
    fs.writeSync(fd, content);
  } catch (err) {
    fs.closeSync(fd);
    try { fs.unlinkSync(file); } catch { /* gone */ }
    throw new MobilityError('MOB_ERR_TRACKER', `cannot write the lock ${file}: ${(err as Error).message}`);
  }
  fs.closeSync(fd);
  return true;
}

/** The file exists, holds no owner, and is young enough to be still being written. */
function beingWritten(file: string): boolean {
  const st = fs.statSync(file, { throwIfNoEntry: false });
  return st !== undefined && Date.now() - st.mtimeMs < WRITING_MS;
}

/**
 * Takes the takeover lock, waiting while another live process holds it. False when it is still
 * held after TAKEOVER_WAIT_MS.
 */
function takeTakeover(file: string, mine: string, me: LockOwner): boolean {
  const deadline = Date.now() + TAKEOVER_WAIT_MS;
  for (;;) {
    if (createExclusive(file, mine)) return true;
    const o = readOwner(file);
    if (o && sameOwner(o, me)) return true; // ours (a release that failed earlier)
    if (o && !isLive(o)) {
      // its holder died inside a takeover: remove it, but only while it still names that process
      const again = readOwner(file);
      if (sameOwner(again, o) && !isLive(again!)) {
        try { fs.unlinkSync(file); } catch { /* someone else removed it */ }
      }
      continue;
    }
    if (!o && !beingWritten(file)) {
      // empty or garbage and old: its creator died between create and write
      const again = readOwner(file);
      if (again === null && !beingWritten(file)) {
        try { fs.unlinkSync(file); } catch { /* gone */ }
      }
      continue;
    }
    if (Date.now() >= deadline) return false;
    sleepSync(5 + Math.floor(Math.random() * 10));
  }
}

function releaseTakeover(file: string, me: LockOwner): void {
  if (sameOwner(readOwner(file), me)) {
    try { fs.unlinkSync(file); } catch { /* gone */ }
  }
}

/**
 * Replaces a stale (or dead garbage) lock with ours, under the takeover lock. 'retry' when the
 * lock changed meanwhile (someone else owns it now, or it is being written): look again.
 */
function takeOver(name: string, file: string, lockDir: string, mine: string, me: LockOwner): 'ours' | 'retry' {
  const tk = takeoverFile(lockDir, name);
  if (!takeTakeover(tk, mine, me)) {
    throw new MobilityError('MOB_ERR_TRACKER_BUSY', `cannot lock trace instance ${name}: another process has been taking over its stale lock for over ${TAKEOVER_WAIT_MS / 1000} s (${tk})`);
  }
  try {
    // read again under the takeover lock: only its holder unlinks, so what we see stays until we act
    const o = readOwner(file);
    if (o && sameOwner(o, me)) return 'ours';
    if (o && isLive(o)) throw busy(name, o, 'use');
    if (!o && beingWritten(file)) return 'retry';
    try {
      fs.unlinkSync(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new MobilityError('MOB_ERR_TRACKER', `cannot remove the stale lock ${file}: ${(err as Error).message}`);
    }
    // a process starting now may create it first (O_EXCL): then it is the owner
    return createExclusive(file, mine) ? 'ours' : 'retry';
  } finally {
    releaseTakeover(tk, me);
  }
}

/** Takes the lock for this process, or throws MOB_ERR_TRACKER_BUSY. */
export function acquireInstanceLock(name: string, lockDir = DEFAULT_LOCK_DIR): void {
  const startTime = processStartTime(process.pid);
  if (startTime === null) throw new MobilityError('MOB_ERR_TRACKER', 'cannot read /proc/self/stat to lock the trace instance');
  const me: LockOwner = { pid: process.pid, startTime };
  const mine = `${process.pid} ${startTime}\n`;
  try {
    fs.mkdirSync(lockDir, { recursive: true, mode: 0o755 });
  } catch (err) {
    throw new MobilityError('MOB_ERR_TRACKER', `cannot create the lock directory ${lockDir}: ${(err as Error).message}`);
  }
  const file = lockFile(lockDir, name);
  for (let attempt = 0; attempt < 5; attempt++) {
    if (createExclusive(file, mine)) return;
    const o = readOwner(file);
    if (o && sameOwner(o, me)) return;
    if (o && isLive(o)) throw busy(name, o, 'use');
    if (!o && beingWritten(file)) {
      // being written right now by another process, or garbage: give a writer a moment
      sleepSync(50);
      continue;
    }
    // stale: the owner is gone
    if (takeOver(name, file, lockDir, mine, me) === 'ours') return;
  }
  throw new MobilityError('MOB_ERR_TRACKER_BUSY', `cannot lock trace instance ${name}: ${file} keeps changing (another agent is starting)`);
}

/** Removes the lock if this process holds it (same pid and start time). Never throws. */
export function releaseInstanceLock(name: string, lockDir = DEFAULT_LOCK_DIR): void {
  const file = lockFile(lockDir, name);
  const o = readOwner(file);
  if (o && o.pid === process.pid && o.startTime === processStartTime(process.pid)) {
    try { fs.unlinkSync(file); } catch { /* gone */ }
  }
}

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}
