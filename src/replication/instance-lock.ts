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
 * Contract: acquire() is idempotent for the same process; release() removes the file only
 * when this process owns it. Both are synchronous (called around open/close of the tracker).
 */
import fs from 'node:fs';
import path from 'node:path';
import { MobilityError } from '../errors.js';

export const DEFAULT_LOCK_DIR = '/run/mobility/trace-locks';

export interface LockOwner { pid: number; startTime: string }

/** starttime of a live process (field 22 of /proc/PID/stat), or null when it does not exist. */
export function processStartTime(pid: number): string | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // comm (field 2) may hold spaces and parentheses: fields after the last ')' are fixed
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
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

/** Takes the lock for this process, or throws MOB_ERR_TRACKER_BUSY. */
export function acquireInstanceLock(name: string, lockDir = DEFAULT_LOCK_DIR): void {
  const me = processStartTime(process.pid);
  if (me === null) throw new MobilityError('MOB_ERR_TRACKER', 'cannot read /proc/self/stat to lock the trace instance');
  try {
    fs.mkdirSync(lockDir, { recursive: true, mode: 0o755 });
  } catch (err) {
    throw new MobilityError('MOB_ERR_TRACKER', `cannot create the lock directory ${lockDir}: ${(err as Error).message}`);
  }
  const file = lockFile(lockDir, name);
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      const fd = fs.openSync(file, 'wx', 0o644);
      try { fs.writeSync(fd, `${process.pid} ${me}\n`); } finally { fs.closeSync(fd); }
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw new MobilityError('MOB_ERR_TRACKER', `cannot create the lock ${file}: ${(err as Error).message}`);
      }
    }
    const o = readOwner(file);
    if (o && o.pid === process.pid && o.startTime === me) return;
    if (o && processStartTime(o.pid) === o.startTime) throw busy(name, o, 'use');
    if (!o) {
      // being written right now by another process, or garbage: give a writer a moment
      const st = fs.statSync(file, { throwIfNoEntry: false });
      if (st && Date.now() - st.mtimeMs < 2000) { sleepSync(50); continue; }
    }
    // stale: the owner is gone. Remove it only if it is still the same stale file.
    try {
      const again = readOwner(file);
      if (JSON.stringify(again) === JSON.stringify(o)) fs.unlinkSync(file);
    } catch { /* someone else removed it */ }
  }
  throw new MobilityError('MOB_ERR_TRACKER_BUSY', `cannot lock trace instance ${name}: ${file} keeps changing (another agent is starting)`);
}

/** Removes the lock if this process holds it. Never throws. */
export function releaseInstanceLock(name: string, lockDir = DEFAULT_LOCK_DIR): void {
  const file = lockFile(lockDir, name);
  const o = readOwner(file);
  if (o && o.pid === process.pid) {
    try { fs.unlinkSync(file); } catch { /* gone */ }
  }
}

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}
