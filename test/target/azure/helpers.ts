/**
 * Shared setup of the Azure backend tests: a backend on a fresh container of a real Azurite
 * (test/azurite.ts), built from a real 0600 credentials file, as a server would build it.
 */
import { randomBytes } from 'node:crypto';
import { AzureBackend } from '../../../src/target/azure/azure-backend.js';
import { loadAzureCredentials } from '../../../src/target/azure/credentials.js';
import type { RetryPolicy } from '../../../src/target/retry.js';
import type { PageBlobOps } from '../../../src/target/azure/page-client.js';
import { cleanup } from '../../cleanup.js';
import { writeCredentialsFile, type Azurite } from '../../azurite.js';

interface TestLike { teardown(fn: () => unknown): void }

let n = 0;
/** A container name of its own for each backend, so tests never see each other's blobs. */
export function freshContainer(prefix = 'mob'): string {
  return `${prefix}-${process.pid}-${++n}-${randomBytes(3).toString('hex')}`;
}

export async function backendOn(t: TestLike, az: Azurite, o: { container?: string; retry?: Partial<RetryPolicy>; ops?: (inner: PageBlobOps) => PageBlobOps } = {}): Promise<AzureBackend> {
  const file = await writeCredentialsFile(cleanup(t).dir('az-creds-'), az);
  const backend = new AzureBackend({
    accountUrl: az.url, container: o.container ?? freshContainer(), credentials: await loadAzureCredentials(file),
    retry: o.retry ?? { maxAttempts: 4, baseDelayMs: 20, maxDelayMs: 200, totalBudgetMs: 10_000 }, ops: o.ops,
  });
  await backend.init();
  t.teardown(() => backend.close());
  return backend;
}

/** Deterministic bytes (a simple LCG) so that failures are reproducible. */
export function pattern(len: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(len);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}
