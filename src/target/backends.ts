/**
 * Builds the replica backend the server's `--store` option names:
 *
 *   file:DIR                          local files under DIR (default: DATA-DIR/replicas)
 *   azure:ACCOUNT-URL/CONTAINER       Azure page blobs, e.g. azure:https://acct.blob.core.windows.net/mobility;
 *                                     credentials from --store-credentials FILE (mode 0600, JSON:
 *                                     accountName+accountKey, sasToken or connectionString)
 *
 * Every backend implements target/replica-store.ts; adding one is one case here.
 */
import path from 'node:path';
import { MobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import type { ReplicaBackend } from './replica-store.js';
import { LocalBackend } from './local/local-backend.js';

export type StoreSpec = { kind: 'file'; dir: string } | { kind: 'azure'; accountUrl: string; container: string }

/** Container names: 3-63 lowercase letters, digits and single hyphens (Azure's rule). */
const CONTAINER = /^(?!-)(?!.*--)[a-z0-9-]{3,63}(?<!-)$/;

/** Parses a --store value (no I/O). MOB_ERR_USAGE naming the accepted forms when it is not one. */
export function parseStoreSpec(spec: string | undefined, dataDir: string): StoreSpec {
  if (!spec || spec === 'file') return { kind: 'file', dir: path.join(dataDir, 'replicas') };
  if (spec.startsWith('file:')) {
    const dir = spec.slice(5);
    if (!dir) throw new MobilityError('MOB_ERR_USAGE', '--store file:DIR needs a directory');
    return { kind: 'file', dir: path.resolve(dir) };
  }
  if (spec.startsWith('azure:')) {
    let u: URL;
    try {
      u = new URL(spec.slice(6));
    } catch {
      throw new MobilityError('MOB_ERR_USAGE', `--store ${JSON.stringify(spec)}: expected azure:https://ACCOUNT.blob.core.windows.net/CONTAINER`);
    }
    if (u.protocol !== 'https:' && u.protocol !== 'http:') throw new MobilityError('MOB_ERR_USAGE', `--store azure: needs an http(s) account URL, not ${u.protocol}`);
    if (u.search || u.username || u.password) {
      throw new MobilityError('MOB_ERR_USAGE', '--store azure:URL must not carry credentials (a SAS token or a user): put them in the --store-credentials file');
    }
    const parts = u.pathname.split('/').filter(Boolean);
    const container = parts.pop();
    if (!container || !CONTAINER.test(container)) {
      throw new MobilityError('MOB_ERR_USAGE', `--store azure:URL must end with a container name (3-63 lowercase letters, digits, hyphens), got ${JSON.stringify(container ?? '')}`);
    }
    const accountUrl = `${u.protocol}//${u.host}${parts.length ? '/' + parts.join('/') : ''}`;
    return { kind: 'azure', accountUrl, container };
  }
  throw new MobilityError('MOB_ERR_USAGE', `--store ${JSON.stringify(spec)}: expected file:DIR or azure:ACCOUNT-URL/CONTAINER`);
}

/** Builds (without contacting it) the backend of a spec. */
export async function createBackend(spec: StoreSpec, o: { dataDir: string; credentialsFile?: string; log?: Logger; retryMs?: number }): Promise<ReplicaBackend> {
  if (spec.kind === 'file') return new LocalBackend({ dir: spec.dir, imagesDir: o.dataDir });
  if (!o.credentialsFile) {
    throw new MobilityError('MOB_ERR_USAGE', '--store azure:... needs --store-credentials FILE (a 0600 JSON file with accountName and accountKey, sasToken, or connectionString)');
  }
  // loaded only for an azure store: the file store does not pay for the Azure SDK at start-up
  const { loadAzureCredentials } = await import('./azure/credentials.js');
  const { AzureBackend } = await import('./azure/azure-backend.js');
  return new AzureBackend({
    accountUrl: spec.accountUrl, container: spec.container, credentials: await loadAzureCredentials(o.credentialsFile), log: o.log,
    ...(o.retryMs !== undefined ? { retry: { totalBudgetMs: o.retryMs } } : {}),
  });
}
