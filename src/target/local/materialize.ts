/**
 * Materialising a recovery point of the local store: point P of disk D = the replica
 * file of D, cloned, with the undo records of every epoch >= P (newest epoch first,
 * each file's records newest first) written back.
 */
import { spawn } from 'node:child_process';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { MobilityError } from '../../errors.js';
import { zeroBuffer } from '../../protocol/digest.js';
import type { DiskPoint } from '../replica-store.js';
import { readUndoFile } from './undo-journal.js';

export function run(cmd: string, args: string[]): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    c.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    c.once('error', reject);
    c.once('close', (code) => resolve({ code, stderr }));
  });
}

export interface MaterializedDisk { diskId: string; image: string; sizeBytes: number; method: 'reflink' | 'copy'; undoRecords: number; ms: number }

/**
 * Writes a writable image of point `p` of one disk to `out`, while replication goes on:
 * the replica is cloned (reflink where the filesystem can, else a sparse copy), then the
 * undo records of every epoch >= p are written back, newest first. Records are read after
 * the copy: any write the copy may have caught had its old bytes journaled before it was
 * applied, so reverting yields exactly the point. `epochs` must be re-read by the caller
 * after the copy (a cut may have happened meanwhile): pass a function.
 */
export async function materializeDisk(o: {
  diskId: string; replica: string; undoDir: string; out: string; sizeBytes: number; epochs: () => Promise<DiskPoint[]>;
}): Promise<MaterializedDisk> {
  const t0 = Date.now();
  await fsp.rm(o.out, { force: true });
  let method: 'reflink' | 'copy' = 'reflink';
  let r = await run('cp', ['--reflink=always', '--sparse=always', o.replica, o.out]);
  if (r.code !== 0) {
    method = 'copy';
    await fsp.rm(o.out, { force: true });
    r = await run('cp', ['--reflink=never', '--sparse=always', o.replica, o.out]);
    if (r.code !== 0) throw new MobilityError('MOB_ERR_STORAGE', `cannot copy ${o.replica} to ${o.out}: ${r.stderr.trim()}`);
  }
  const epochs = await o.epochs();
  const fh = await fsp.open(o.out, 'r+', 0o600);
  let undoRecords = 0;
  try {
    await fh.truncate(o.sizeBytes);
    for (let i = epochs.length - 1; i >= 0; i--) {
      const recs = await readUndoFile(path.join(o.undoDir, `${epochs[i].pointId}.undo`));
      for (let k = recs.length - 1; k >= 0; k--) {
        const rec = recs[k];
        if (rec.offset >= o.sizeBytes) continue;
        const len = Math.min(rec.length, o.sizeBytes - rec.offset);
        const data = rec.data ? rec.data.subarray(0, len) : zeroBuffer(len);
        await fh.write(data, 0, len, rec.offset);
        undoRecords++;
      }
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return { diskId: o.diskId, image: o.out, sizeBytes: o.sizeBytes, method, undoRecords, ms: Date.now() - t0 };
}
