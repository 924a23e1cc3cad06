/**
 * Shared setup of the crash tests (test/e2e/crash-*.test.ts): a disk image, a real
 * `mobility server` that can be killed and restarted on the same port, `mobility replicate`
 * runs, and progress read from what is durable on either side (the agent's persisted digest
 * map, the server's committed WAL, the replica's allocated bytes), so that every bound on
 * resent blocks follows from progress, never from timing.
 */
import type { Test } from 'tap';
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { xxh64 } from '@node-rs/xxhash';
import { spawnServer, type SpawnedServer } from '../src/server/spawn.js';
import { DigestMap } from '../src/source/digest-map.js';
import { Wal } from '../src/target/local/wal.js';
import { cleanup } from './cleanup.js';
import { replicateArgs, startServer, stopGently } from './helpers.js';

export const SIZE = 64 * 1024 * 1024;
export const BS = 64 * 1024;
export const BLOCKS = SIZE / BS;
const PAGE = 4096;

/** Waits in these tests are safety nets against a hang, never speed requirements. */
export const LONG = 120_000;

export interface Result { disks: { kind: string; stats: { blocksSent: number } }[] }

export async function allocated(file: string): Promise<number> {
  try {
    return (await fsp.stat(file)).blocks * 512;
  } catch {
    return 0;
  }
}

export async function setup(t: Test, writeImage: (img: string) => Promise<unknown>) {
  const dir = cleanup(t).dir('crash-');
  const img = path.join(dir, 'disk.img');
  await writeImage(img);
  const dataDir = path.join(dir, 'srv');
  let srv: SpawnedServer = await startServer(t, dataDir);
  const port = srv.info.port;
  const replicaDir = path.join(dataDir, 'replicas', 'agent1', 'd0');
  const stateDir = path.join(dir, 'agent');
  const args = (extra: string[]) => replicateArgs({ url: srv.info.url, tokenFile: srv.info.tokenFile, caFile: srv.info.caFile!, disk: `${img}=d0`, stateDir, extra });
  return {
    dir, img, replica: path.join(replicaDir, 'replica.img'), wal: path.join(replicaDir, 'wal.log'), mapFile: path.join(stateDir, 'agent1', 'd0.map'), args,
    server: () => srv,
    async restartServer() {
      srv = await spawnServer(dataDir, { port, timeoutMs: LONG });
      cleanup(t).process(srv.child);
      const child = srv.child;
      t.teardown(() => stopGently(child));
    },
  };
}

/** An image of random bytes: every block is as large on the wire as on disk (no zero or compressible blocks). */
export async function randomImage(img: string): Promise<void> {
  const fh = await fsp.open(img, 'w');
  try {
    for (let o = 0; o < SIZE; o += 8 * 1024 * 1024) await fh.write(crypto.randomBytes(8 * 1024 * 1024), 0, 8 * 1024 * 1024, o);
  } finally {
    await fh.close();
  }
}

/** Overwrites 16 MiB (256 blocks, 128..383) at 8 MiB with random bytes. */
export const CHANGED = { first: 128, count: 256 };
export async function change16MiB(img: string): Promise<void> {
  const fh = await fsp.open(img, 'r+');
  await fh.write(crypto.randomBytes(16 * 1024 * 1024), 0, 16 * 1024 * 1024, 8 * 1024 * 1024);
  await fh.close();
}

/** Pages with a known digest in the agent's persisted map (0 when there is none yet). */
export async function knownPages(mapFile: string): Promise<number> {
  try {
    return (await DigestMap.load(mapFile))?.knownPages() ?? 0;
  } catch {
    return 0;
  }
}

/**
 * Blocks in [first, first+count) that the agent's persisted digest map records with the
 * content the image has now: the server acknowledged them as durable, so a rerun does not send them.
 */
export async function persistedBlocks(mapFile: string, img: string, first = 0, count = BLOCKS): Promise<number> {
  let map: DigestMap | null = null;
  try { map = await DigestMap.load(mapFile); } catch { return 0; }
  if (!map) return 0;
  const per = BS / PAGE;
  const fh = await fsp.open(img, 'r');
  const buf = Buffer.alloc(BS);
  let n = 0;
  try {
    for (let b = first; b < first + count; b++) {
      const { bytesRead } = await fh.read(buf, 0, BS, b * BS);
      if (bytesRead < BS) buf.fill(0, bytesRead);
      let all = true;
      for (let p = 0; p < per && all; p++) {
        const d = xxh64(buf.subarray(p * PAGE, (p + 1) * PAGE));
        all = map.digests[b * per + p] === (d === 0n ? 1n : d);
      }
      if (all) n++;
    }
  } finally {
    await fh.close();
  }
  return n;
}

/** Distinct blocks written by the committed batches of the server's WAL (what a restarted server replays and reports durable). */
export async function committedWalBlocks(walFile: string): Promise<number> {
  let wal: Wal;
  try { wal = await Wal.open(walFile); } catch { return 0; }
  try {
    const { records } = await wal.readAll();
    return new Set(records.map((r) => Math.floor(r.offset / BS))).size;
  } catch {
    return 0;
  } finally {
    await wal.close();
  }
}
