/**
 * Writers that show whether a filesystem is frozen: a child writing with fsync sleeps in the
 * kernel on a frozen filesystem (its wchan says so) and finishes after the thaw. Progress
 * decides, never a wall-clock bound: a writer either blocks on the freeze or finishes. The
 * writers are killed by the test's cleanup scope (after which the filesystems are thawed).
 */
import fs from 'node:fs';
import type { ChildProcess } from 'node:child_process';
import { cleanup } from './cleanup.js';
import { sleep } from './helpers.js';

interface TestLike { teardown(fn: () => unknown): void }

export interface Writer { child: ChildProcess; pid: number; done: Promise<number | null> }

/** A child writing `file` with fsync (dd conv=fsync): blocks while the filesystem is frozen. */
export function startWriter(t: TestLike, file: string): Writer {
  const child = cleanup(t).spawn('dd', ['if=/dev/urandom', `of=${file}`, 'bs=4k', 'count=4', 'conv=fsync', 'status=none']);
  const done = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  return { child, pid: child.pid!, done };
}

/** The process sleeps in the kernel waiting for a frozen filesystem (sb_start_write / mnt_want_write). */
export function blockedOnFreeze(pid: number): boolean {
  try {
    return /^percpu_rwsem_wait|sb_start_write|freeze/.test(fs.readFileSync(`/proc/${pid}/wchan`, 'utf8'));
  } catch {
    return false;
  }
}

/**
 * Waits until the writer is blocked on the frozen filesystem (answers true) or has finished
 * (answers false: the filesystem was not frozen). No time bound decides: only a generous limit
 * against a hang.
 */
export async function writerBlocks(w: Writer): Promise<boolean> {
  let finished = false;
  void w.done.then(() => { finished = true; });
  for (let i = 0; i < 3000; i++) {
    if (finished) return false;
    if (blockedOnFreeze(w.pid)) return true;
    await sleep(20);
  }
  throw new Error(`writer ${w.pid} neither finished nor blocked on a frozen filesystem within 60 s`);
}
