/**
 * Reading a QEMU disk's data from the host: QEMU exports the block node as a regular file
 * through its own FUSE export (`block-export-add type=fuse`), and the agent reads that file
 * with the ordinary file DiskSource (positional reads, the same coalesced read path as any
 * other source).
 *
 * Why not NBD for the data: no maintained NBD client library exists for Node; libnbd's tools
 * either copy whole disks (nbdcopy) or list extents (nbdinfo), and a process per extent read
 * (qemu-img dd, qemu-io) costs more than the read. The FUSE export needs neither: QEMU serves
 * the reads itself, and the seam stays DiskSource. QEMU (7.2) does not ask the kernel for direct
 * I/O on that file, so through a descriptor held open buffered reads return pages cached before
 * the guest's later writes (measured): the file is read with O_DIRECT (tested: a newer write is
 * seen at once). It needs /dev/fuse on the host and a QEMU
 * built with FUSE export support (Debian's is); a remote QEMU would need an NBD source instead.
 *
 * Contract: the export is read-only; close() closes the file, deletes the export (waiting for
 * QEMU's BLOCK_EXPORT_DELETED) and removes the mount point file. A QEMU that stopped takes its
 * export with it; close() then only removes the file.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { MobilityError } from '../../errors.js';
import { openDiskSource, type DiskSource } from '../disk-source.js';
import type { QmpClient } from './qmp.js';

const ID_RE = /^[A-Za-z0-9_.-]{1,128}$/;

/**
 * Exports block node `node` as the regular file `<dir>/<id>` through QEMU's FUSE export
 * (writable: reprotect writes a stopped VM's disks through it). remove() deletes the export
 * (waiting for QEMU's BLOCK_EXPORT_DELETED) and the mount point file.
 */
export async function addFuseExport(qmp: QmpClient, o: { node: string; id: string; dir: string; writable?: boolean }): Promise<{ path: string; remove(): Promise<void> }> {
  if (!ID_RE.test(o.id)) throw new MobilityError('MOB_ERR_QEMU_TRACKER', `export id ${JSON.stringify(o.id)} is not [A-Za-z0-9_.-]{1,128}`);
  const mountpoint = path.join(o.dir, o.id);
  // a QEMU killed with its export mounted leaves a dead mount here (ENOTCONN): lifted first
  unmountUnder(mountpoint);
  // QEMU mounts over an existing regular file
  fs.writeFileSync(mountpoint, '', { mode: 0o600 });
  try {
    await qmp.execute('block-export-add', { type: 'fuse', id: o.id, 'node-name': o.node, mountpoint, writable: Boolean(o.writable) });
  } catch (err) {
    fs.rmSync(mountpoint, { force: true });
    throw err;
  }
  let removed = false;
  return {
    path: mountpoint,
    async remove() {
      if (removed) return;
      removed = true;
      try {
        if (!qmp.isClosed) await removeExport(qmp, o.id);
      } finally {
        fs.rmSync(mountpoint, { force: true });
      }
    },
  };
}

export async function openFuseSource(qmp: QmpClient, o: { node: string; id: string; dir: string }): Promise<DiskSource> {
  const exp = await addFuseExport(qmp, o);
  const mountpoint = exp.path;
  let src: DiskSource;
  try {
    src = await openDiskSource(mountpoint, { directFile: true });
  } catch (err) {
    await exp.remove().catch(() => undefined);
    throw err;
  }
  let closed = false;
  return {
    path: src.path,
    size: src.size,
    read: (buf, offset, length) => src.read(buf, offset, length),
    readSync: (buf, offset, length) => src.readSync(buf, offset, length),
    async close() {
      if (closed) return;
      closed = true;
      await src.close();
      await exp.remove();
    },
  };
}

/** Mount points at `dir` or below it (from /proc/self/mountinfo), deepest first. */
export function mountsUnder(dir: string): string[] {
  const base = path.resolve(dir);
  const out: string[] = [];
  let info = '';
  try { info = fs.readFileSync('/proc/self/mountinfo', 'utf8'); } catch { return out; }
  for (const line of info.split('\n')) {
    const f = line.split(' ');
    if (f.length < 5) continue;
    const mp = f[4]!.replace(/\\(\d{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    if (mp === base || mp.startsWith(`${base}/`)) out.push(mp);
  }
  return out.sort((a, b) => b.length - a.length);
}

/**
 * Lifts every mount at `dir` or below it: the FUSE exports a QEMU that was killed (or crashed)
 * left mounted, which fail every access with ENOTCONN and keep their directory busy. A mount of
 * a live QEMU there is ours too (its export was already deleted, or is deleted next). Lazy
 * (umount -l): never blocks. Answers the mount points it could not lift.
 */
export function unmountUnder(dir: string): string[] {
  const failed: string[] = [];
  for (const mp of mountsUnder(dir)) {
    const r = spawnSync('umount', ['-l', mp], { stdio: 'ignore', timeout: 30_000 });
    if (r.status !== 0 && mountsUnder(mp).includes(mp)) failed.push(mp);
  }
  return failed;
}

async function removeExport(qmp: QmpClient, id: string): Promise<void> {
  const deleted = qmp.waitEvent('BLOCK_EXPORT_DELETED', (d) => d['id'] === id);
  deleted.catch(() => undefined);
  await qmp.execute('block-export-del', { id });
  await deleted;
}
