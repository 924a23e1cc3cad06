/**
 * A small ext4 filesystem on a loop device, for tests that need a filesystem's limits
 * (with 1 KiB blocks ext4 holds files of at most 16 GiB without extents, about 4 TiB with
 * them). Needs root, losetup, mkfs.ext4 and mount: a missing one fails the test, never
 * skips it. The mount and the loop device are removed in t.teardown.
 */
import { execFileSync } from 'node:child_process';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { tmpDir } from './helpers.js';

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

export async function mountExt4(t: { teardown(fn: () => unknown): void }, opts: { sizeMb?: number; blockSize?: number; features?: string } = {}): Promise<string> {
  for (const tool of ['losetup', 'mkfs.ext4', 'mount', 'umount']) {
    try { sh('sh', ['-c', `command -v ${tool}`]); } catch { throw new Error(`${tool} is required for this test`); }
  }
  if (process.getuid?.() !== 0) throw new Error('this test needs root (it mounts a loop device)');
  const dir = await tmpDir(t, 'mobility-ext4-');
  const img = path.join(dir, 'fs.img');
  await fsp.writeFile(img, '');
  await fsp.truncate(img, (opts.sizeMb ?? 64) * 1024 * 1024);
  const loop = sh('losetup', ['--find', '--show', img]).trim();
  const mnt = path.join(dir, 'mnt');
  let mounted = false;
  // registered before mounting: teardowns run in reverse order, so this runs before tmpDir's rm
  t.teardown(() => {
    if (mounted) try { sh('umount', [mnt]); } catch { try { sh('umount', ['-l', mnt]); } catch { /* gone */ } }
    try { sh('losetup', ['-d', loop]); } catch { /* gone */ }
  });
  await fsp.mkdir(mnt);
  const args = ['-q', '-F', '-b', String(opts.blockSize ?? 1024)];
  if (opts.features) args.push('-O', opts.features);
  sh('mkfs.ext4', [...args, loop]);
  sh('mount', [loop, mnt]);
  mounted = true;
  return mnt;
}
