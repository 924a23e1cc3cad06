/**
 * Crash-safe file replacement: write a temp file, fsync it, rename over the
 * target, fsync the directory. After a crash the target is either the old or
 * the new content, never a mix.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';

export async function fsyncDir(dir: string): Promise<void> {
  const dh = await fsp.open(dir, 'r');
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}

export async function writeFileDurable(file: string, data: Uint8Array | string, mode = 0o644): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}`;
  const fh = await fsp.open(tmp, 'w', mode);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fsp.chmod(tmp, mode);
  await fsp.rename(tmp, file);
  await fsyncDir(path.dirname(file));
}
