/**
 * Mounting the root filesystem of a recovered disk image (a test-failover or failover image
 * file) read-write, so a recovery step (network mapping) can change the guest before it boots.
 *
 * The image holds a partition table (MBR or GPT, read with `sfdisk -J`) or a bare filesystem.
 * Each candidate (every data partition in table order, or the whole image) is mounted with a
 * loop device at its byte offset (`mount -o loop,offset=,sizelimit=`: no partition device
 * nodes needed, the loop device is released with the unmount); the first one holding an /etc
 * directory is the root. Needs root and mount(8).
 *
 * Who calls: the network mapping (network-mapping.ts), once per image, with nothing else
 * using the image (not while QEMU boots it). Always call unmount(), also after a failure of
 * what ran on the mounted tree: it unmounts (lazily if the filesystem stays busy) and removes
 * the mount directory.
 */
import { execFile } from 'node:child_process';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { MobilityError } from '../../errors.js';

export interface GuestRoot {
  /** The directory the guest's root filesystem is mounted on. */
  readonly dir: string;
  /** The partition it is (1-based, as sfdisk numbers them), or null for a bare filesystem. */
  readonly partition: number | null;
  unmount(): Promise<void>;
}

/** Bounds of the commands run here: mount replays an ext4 journal, which takes a while on a slow disk. */
const MOUNT_TIMEOUT_MS = 120_000;

/** Partition types that never hold a root filesystem: extended containers, swap, EFI system, BIOS boot. */
const NOT_ROOT_TYPES = new Set([
  '5', 'f', '85', '82', 'ef',
  '0657fd6d-a4ab-43c4-84e5-0933c84b4f4f', // Linux swap
  'c12a7328-f81f-11d2-ba4b-00a0c93ec93b', // EFI system
  '21686148-6449-6e6f-744e-656564454649', // BIOS boot
]);

export interface RunResult { code: number; stdout: string; stderr: string }

/** Runs a command with a time limit; never throws for a non-zero exit (a missing command is code 127). */
export function run(cmd: string, args: string[], timeoutMs = MOUNT_TIMEOUT_MS): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { encoding: 'utf8', timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (!err) { resolve({ code: 0, stdout, stderr }); return; }
      const e = err as NodeJS.ErrnoException & { code?: unknown; killed?: boolean };
      const code = typeof e.code === 'number' ? e.code : e.code === 'ENOENT' ? 127 : -1;
      resolve({ code, stdout: stdout ?? '', stderr: (stderr ?? '') || e.message });
    });
  });
}

interface Candidate { partition: number | null; offset: number; size: number | null }

/** The partitions of the image that may hold a root filesystem, or the whole image when it has no partition table. */
async function candidates(image: string): Promise<Candidate[]> {
  const r = await run('sfdisk', ['-J', image]);
  if (r.code === 127) throw new MobilityError('MOB_ERR_CONFIG', 'sfdisk is needed to read the partition table of a recovered image (install fdisk)');
  if (r.code !== 0) return [{ partition: null, offset: 0, size: null }];
  let table: { partitiontable?: { sectorsize?: number; partitions?: { node: string; start: number; size: number; type: string }[] } };
  try { table = JSON.parse(r.stdout) as typeof table; } catch { return [{ partition: null, offset: 0, size: null }]; }
  const pt = table.partitiontable;
  const sector = pt?.sectorsize ?? 512;
  const parts = pt?.partitions ?? [];
  if (!parts.length) return [{ partition: null, offset: 0, size: null }];
  return parts
    .map((p) => ({ p, n: Number(/(\d+)$/.exec(p.node)?.[1] ?? '0') }))
    .filter(({ p }) => !NOT_ROOT_TYPES.has(String(p.type).toLowerCase()))
    .map(({ p, n }) => ({ partition: n, offset: p.start * sector, size: p.size * sector }));
}

/** dir is the root of a mounted filesystem (its device differs from its parent's). */
async function isMountPoint(dir: string): Promise<boolean> {
  const [a, b] = await Promise.all([fsp.stat(dir).catch(() => null), fsp.stat(path.dirname(dir)).catch(() => null)]);
  return a !== null && b !== null && a.dev !== b.dev;
}

async function unmountDir(dir: string): Promise<void> {
  const r = await run('umount', [dir]);
  if (r.code !== 0) await run('umount', ['-l', dir]);
  await fsp.rmdir(dir).catch(() => undefined);
}

/**
 * Mounts the guest root of `image` read-write (see the file comment). MOB_ERR_IMAGE_MOUNT when
 * the file is missing or no candidate mounts as a filesystem with /etc (each candidate's failure
 * is in the message). `scratch` is where the mount directory is made (default the system's).
 */
export async function mountGuestRoot(image: string, o: { scratch?: string } = {}): Promise<GuestRoot> {
  const st = await fsp.stat(image).catch((err: NodeJS.ErrnoException) => {
    throw new MobilityError('MOB_ERR_IMAGE_MOUNT', `recovered image ${image} cannot be opened: ${err.code ?? err.message}`);
  });
  if (!st.isFile() && !st.isBlockDevice()) throw new MobilityError('MOB_ERR_IMAGE_MOUNT', `recovered image ${image} is not a file or block device`);
  const failures: string[] = [];
  for (const c of await candidates(image)) {
    const what = c.partition === null ? 'the whole image' : `partition ${c.partition}`;
    const dir = await fsp.mkdtemp(path.join(o.scratch ?? os.tmpdir(), 'mobility-guest-'));
    // the guest's files are data here: nothing on it runs or opens devices on the server
    const opts = ['loop', 'nosuid', 'nodev', 'noexec', `offset=${c.offset}`, ...(c.size === null ? [] : [`sizelimit=${c.size}`])].join(',');
    const m = await run('mount', ['-o', opts, image, dir]);
    if (m.code !== 0) {
      // mount(8) killed at its time limit may have mounted after all: never leave that behind
      if (await isMountPoint(dir)) await unmountDir(dir).catch(() => undefined);
      await fsp.rmdir(dir).catch(() => undefined);
      if (m.code === 127) throw new MobilityError('MOB_ERR_CONFIG', 'mount(8) is needed to change a recovered image');
      failures.push(`${what}: ${m.stderr.trim().split('\n').pop() ?? `mount exited ${m.code}`}`);
      continue;
    }
    const etc = await fsp.lstat(path.join(dir, 'etc')).catch(() => null);
    if (etc?.isDirectory()) {
      let done = false;
      return {
        dir, partition: c.partition,
        unmount: async () => { if (!done) { done = true; await unmountDir(dir); } },
      };
    }
    failures.push(`${what}: mounted, but holds no /etc (not a root filesystem)`);
    await unmountDir(dir);
  }
  throw new MobilityError('MOB_ERR_IMAGE_MOUNT', `no root filesystem found in recovered image ${image}: ${failures.join('; ') || 'no partition to try'}`);
}
