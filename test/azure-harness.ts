/**
 * Shared by the Azure end-to-end tests: a short store retry, the disk's status row, the blobs
 * of a container, and a read-only verify that the replica blob equals the disk.
 */
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { Test } from 'tap';
import { BlobServiceClient, StorageSharedKeyCredential } from '@azure/storage-blob';
import type { SpawnedServer } from '../src/server/spawn.js';
import { runCli, replicateArgs } from './helpers.js';
import type { Azurite } from './azurite.js';
import { statusArgs, type Setup } from './protect-harness.js';

/** Retries of a failing target end quickly here, so the pause shows within the test. */
export const RETRY = ['--store-retry', '5s'];

export async function blobNames(az: Azurite, container: string): Promise<string[] | null> {
  const svc = new BlobServiceClient(az.url, new StorageSharedKeyCredential(az.accountName, az.accountKey));
  const c = svc.getContainerClient(container);
  if (!(await c.exists())) return null;
  const names: string[] = [];
  for await (const b of c.listBlobsFlat()) names.push(b.name);
  return names;
}

export async function diskStatus(s: Pick<Setup, 'server' | 'agentId'>, server = s.server): Promise<{ state: string; reason: string } | undefined> {
  const st = await runCli(statusArgs(server)).done;
  if (st.code !== 0) return undefined;
  return (JSON.parse(st.stdout) as { disks: { agent: string; state: string; reason: string }[] }).disks.find((d) => d.agent === s.agentId);
}

export async function verifyEqual(t: Test, s: Setup, server: SpawnedServer, diag?: { az: Azurite; container: string }): Promise<void> {
  const v = await runCli(replicateArgs({ url: server.info.url, tokenFile: server.info.tokenFile, caFile: server.info.caFile!, disk: `${s.loop}=d0`, stateDir: path.join(s.dir, 'verify-state'), agentId: s.agentId })
    .map((a) => (a === 'replicate' ? 'verify' : a))).done;
  t.equal(v.code, 0, `verify: the replica blob equals the disk ${v.stdout.slice(-500)} ${v.stderr.slice(-1500)}`);
  if (v.code !== 0 && diag) await explainDifferences(t, s, diag.az, diag.container, v.stdout);
}

/**
 * After a failed verify: for each differing range (the first few), what the disk, the replica blob
 * and every snapshot of it hold there, so that a rare failure can be understood from the log.
 */
async function explainDifferences(t: Test, s: Setup, az: Azurite, container: string, verifyOut: string): Promise<void> {
  const ranges = [...verifyOut.matchAll(/differs: offset (\d+) length (\d+)/g)].slice(0, 4).map((m) => ({ offset: Number(m[1]), length: Math.min(Number(m[2]), 64 * 1024) }));
  const svc = new BlobServiceClient(az.url, new StorageSharedKeyCredential(az.accountName, az.accountKey));
  const cc = svc.getContainerClient(container);
  const name = `replicas/${s.agentId}/d0`;
  const snaps: string[] = [];
  for await (const b of cc.listBlobsFlat({ prefix: name, includeSnapshots: true })) if (b.snapshot) snaps.push(b.snapshot);
  const fh = await fsp.open(s.loop, 'r');
  try {
    for (const r of ranges) {
      const disk = Buffer.alloc(r.length);
      await fh.read(disk, 0, r.length, r.offset);
      const sum = (b: Buffer) => `${crypto.createHash('sha256').update(b).digest('hex').slice(0, 16)}${b.every((x) => x === 0) ? ' (zeros)' : ''}`;
      const lines = [`range ${r.offset}+${r.length}: disk ${sum(disk)}`];
      const blob = await cc.getPageBlobClient(name).downloadToBuffer(r.offset, r.length);
      lines.push(`  replica blob ${sum(blob)}; bytes differing from the disk: ${diffCount(disk, blob)}; first at +${firstDiff(disk, blob)}`);
      for (const sn of snaps) {
        const b = await cc.getPageBlobClient(name).withSnapshot(sn).downloadToBuffer(r.offset, r.length);
        lines.push(`  snapshot ${sn} ${sum(b)}${b.equals(blob) ? ' = replica' : ''}${b.equals(disk) ? ' = disk' : ''}`);
      }
      t.comment(lines.join('\n'));
    }
  } finally {
    await fh.close();
  }
}

function diffCount(a: Buffer, b: Buffer): number {
  let n = 0;
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) n++;
  return n;
}

function firstDiff(a: Buffer, b: Buffer): number {
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] !== b[i]) return i;
  return -1;
}

