/**
 * Shared by the Azure end-to-end tests: a short store retry, the disk's status row, the blobs
 * of a container, and a read-only verify that the replica blob equals the disk.
 */
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

export async function verifyEqual(t: Test, s: Setup, server: SpawnedServer): Promise<void> {
  const v = await runCli(replicateArgs({ url: server.info.url, tokenFile: server.info.tokenFile, caFile: server.info.caFile!, disk: `${s.loop}=d0`, stateDir: path.join(s.dir, 'verify-state'), agentId: s.agentId })
    .map((a) => (a === 'replicate' ? 'verify' : a))).done;
  t.equal(v.code, 0, `verify: the replica blob equals the disk ${v.stdout.slice(-500)} ${v.stderr.slice(-1500)}`);
}

