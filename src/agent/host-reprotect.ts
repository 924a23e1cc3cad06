/**
 * Reprotect in host mode: the VM is shut down, and its disk images (qcow2 or raw, the format
 * read with `qemu-img info`) are opened by a qemu-storage-daemon of our own that exports each as
 * a writable regular file (FUSE). The reprotect itself is the in-guest one
 * (src/agent/reprotect.ts) on those files; close() stops the daemon, which flushes the images
 * (and stores the dirty bitmaps host-mode protection keeps in qcow2 images: the writes of the
 * reprotect are in them, so protection resumes without a scan).
 *
 * Why not through the VM's own QEMU: a guest device attached to a node does not share write
 * access to it (unless share-rw), so QEMU refuses a second writer even with the guest paused; and
 * image locking refuses a second QEMU on an image in use, which is what tells an operator that
 * the VM still runs.
 */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MobilityError } from '../errors.js';
import { mountsUnder, unmountUnder } from '../source/qemu/fuse-source.js';

export interface HostDisks {
  /** Per image given, the file that is the disk (read and write). */
  paths: string[];
  close(): Promise<void>;
}

const START_MS = 30_000;

function imageFormat(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('qemu-img', ['info', '--output=json', '-U', file], { timeout: 30_000 }, (err, out, errOut) => {
      if (err) {
        const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
        reject(new MobilityError('MOB_ERR_SOURCE', missing ? 'qemu-img is not installed (Debian package qemu-utils)' : `cannot read the image ${file}: ${String(errOut).trim() || err.message}`));
        return;
      }
      let info: { format: string; 'backing-filename'?: string; 'format-specific'?: { data?: { 'data-file'?: string } } };
      try {
        info = JSON.parse(out) as typeof info;
      } catch {
        reject(new MobilityError('MOB_ERR_SOURCE', `qemu-img info of ${file} printed no format`));
        return;
      }
      // the format is probed from the image's content, which the guest controls on a raw disk: an
      // image that claims to refer to other files (a raw disk whose guest wrote a qcow2 header)
      // would have us write those files. VM disks here are whole images: refused.
      if (info['backing-filename'] || info['format-specific']?.data?.['data-file']) {
        reject(new MobilityError('MOB_ERR_SOURCE', `${file} refers to another file (backing file or external data file): host-mode reprotect writes whole qcow2 or raw images only`));
        return;
      }
      resolve(String(info.format));
    });
  });
}

const isMounted = (p: string): boolean => mountsUnder(p).includes(p);

/** Opens the images of a shut-down VM for writing. Refused (MOB_ERR_CONFIG) when an image is in use (the VM runs). */
export async function openHostImagesForWrite(images: string[]): Promise<HostDisks> {
  const formats: string[] = [];
  for (const f of images) {
    if (!fs.existsSync(f)) throw new MobilityError('MOB_ERR_SOURCE', `no image ${f}`);
    const fmt = await imageFormat(f);
    if (fmt !== 'qcow2' && fmt !== 'raw') throw new MobilityError('MOB_ERR_SOURCE', `${f} is a ${fmt} image: host-mode reprotect writes qcow2 and raw images`);
    formats.push(fmt);
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mobility-reprotect-'));
  const args: string[] = [];
  const paths: string[] = [];
  for (const [i, f] of images.entries()) {
    const mp = path.join(dir, `disk${i}`);
    fs.writeFileSync(mp, '', { mode: 0o600 });
    paths.push(mp);
    args.push('--blockdev', `driver=file,filename=${f.replace(/,/g, ',,')},node-name=f${i}`, '--blockdev', `driver=${formats[i]},file=f${i},node-name=d${i}`);
    args.push('--export', `type=fuse,id=e${i},node-name=d${i},mountpoint=${mp.replace(/,/g, ',,')},writable=on`);
  }
  const child = spawn('qemu-storage-daemon', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => { err = (err + d.toString()).slice(-8192); });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  let spawnError: Error | null = null;
  child.once('error', (e) => { spawnError = e; });
  const close = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 30_000);
      await exited;
      clearTimeout(t);
    }
    // a storage daemon that died leaves its exports mounted (dead): lifted before the directory goes
    unmountUnder(dir);
    try { fs.rmSync(dir, { recursive: true, force: true }); } catch { /* reported by the caller's own error, if any */ }
  };
  try {
    const end = Date.now() + START_MS;
    while (!paths.every(isMounted)) {
      if (spawnError) throw new MobilityError('MOB_ERR_SOURCE', (spawnError as NodeJS.ErrnoException).code === 'ENOENT' ? 'qemu-storage-daemon is not installed (Debian package qemu-system-common)' : `cannot start qemu-storage-daemon: ${(spawnError as Error).message}`);
      if (child.exitCode !== null || child.signalCode !== null) {
        const locked = /lock|Failed to get .* lock/i.test(err);
        throw new MobilityError(locked ? 'MOB_ERR_CONFIG' : 'MOB_ERR_SOURCE', locked ? `an image is in use (is the VM still running? shut it down first): ${err.trim()}` : `qemu-storage-daemon could not open the images: ${err.trim()}`);
      }
      if (Date.now() > end) throw new MobilityError('MOB_ERR_SOURCE', `qemu-storage-daemon did not export the images within ${START_MS / 1000} s: ${err.trim()}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    return { paths, close };
  } catch (e) {
    await close();
    throw e;
  }
}
