/**
 * The process server's Azure storage credentials, read from a JSON file that only its owner
 * can read. One of:
 *
 *   { "accountName": "...", "accountKey": "<base64>" }          shared key
 *   { "sasToken": "sv=...&sig=...", "accountName"?: "..." }      SAS token (leading '?' allowed)
 *   { "connectionString": "AccountName=...;AccountKey=...;..." } or with SharedAccessSignature=...
 *
 * Contract:
 *   - the file must be a regular file of mode 0600 or stricter: one readable by its group or by
 *     others is refused (MOB_ERR_CONFIG naming the chmod that fixes it), as is a missing file,
 *     one that is not JSON, or one that holds none (or more than one) of the forms above;
 *   - a secret (account key, SAS signature, connection string) never appears in an error message,
 *     a log line, a `location`, JSON.stringify, String() or util.inspect of the credentials: it
 *     is kept in private fields and handed out only to the SDK (sharedKey(), sasQuery());
 *   - error messages name the file and the fix, never its content (JSON.parse's own message
 *     quotes the text, so it is not passed on).
 *
 * Why a file: the key must not sit on a command line (ps) or in the environment of every child;
 * the mode check catches the common mistake of a world-readable copy.
 */
import fsp from 'node:fs/promises';
import { inspect } from 'node:util';
import { MobilityError } from '../../errors.js';

/** The published key of the Azure storage emulator's development account (not a secret). */
export const DEV_ACCOUNT_NAME = 'devstoreaccount1';
export const DEV_ACCOUNT_KEY = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';

const FORMS = '{"accountName": ..., "accountKey": ...}, {"sasToken": ...} or {"connectionString": ...}';

export class AzureCredentials {
  /** 'sharedKey' (account name + key) or 'sas' (a SAS token). */
  readonly kind: 'sharedKey' | 'sas';
  /** The storage account's name, when the credentials name it (always for a shared key). */
  readonly accountName: string | null;
  /** A blob endpoint given by a connection string (no secret), else null. */
  readonly blobEndpoint: string | null;
  /** Where the credentials came from (a file path, or "inline"): safe to show. */
  readonly source: string;
  readonly #accountKey: string | null;
  readonly #sas: string | null;

  constructor(o: { accountName?: string | null; accountKey?: string | null; sasToken?: string | null; blobEndpoint?: string | null; source?: string }) {
    this.source = o.source ?? 'inline';
    this.accountName = o.accountName ?? null;
    this.blobEndpoint = o.blobEndpoint ?? null;
    if (o.accountKey) {
      if (!this.accountName) throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials (${this.source}): an account key needs "accountName" too`);
      if (!isBase64(o.accountKey)) throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials (${this.source}): "accountKey" is not base64 (copy the storage account's access key as shown)`);
      this.kind = 'sharedKey';
      this.#accountKey = o.accountKey;
      this.#sas = null;
    } else if (o.sasToken) {
      const sas = o.sasToken.replace(/^\?/, '');
      if (!/(^|&)sig=[^&]+/.test(sas)) throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials (${this.source}): "sasToken" has no sig= parameter (paste the whole SAS query string)`);
      this.kind = 'sas';
      this.#sas = sas;
      this.#accountKey = null;
    } else {
      throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials (${this.source}): expected ${FORMS}`);
    }
  }

  /** The account key (for the SDK's shared-key credential only); null for a SAS. */
  sharedKey(): { accountName: string; accountKey: string } | null {
    return this.#accountKey && this.accountName ? { accountName: this.accountName, accountKey: this.#accountKey } : null;
  }

  /** The SAS query string without '?' (for the SDK only); null for a shared key. */
  sasQuery(): string | null {
    return this.#sas;
  }

  /** What can be shown: the kind, the account and where they came from. */
  describe(): string {
    return `${this.kind === 'sas' ? 'SAS token' : 'account key'}${this.accountName ? ` of account ${this.accountName}` : ''} from ${this.source}`;
  }

  toString(): string { return `AzureCredentials(${this.describe()})`; }
  toJSON(): Record<string, string | null> { return { kind: this.kind, accountName: this.accountName, source: this.source }; }
  [inspect.custom](): string { return this.toString(); }
}

function isBase64(s: string): boolean {
  return s.length >= 4 && s.length % 4 === 0 && /^[A-Za-z0-9+/]+={0,2}$/.test(s);
}

/** Parses an Azure storage connection string (Key=Value;...); values may contain '='. */
export function parseConnectionString(cs: string, source = 'inline'): AzureCredentials {
  const kv = new Map<string, string>();
  for (const part of cs.split(';')) {
    const p = part.trim();
    if (!p) continue;
    const i = p.indexOf('=');
    if (i <= 0) throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials (${source}): "connectionString" is not of the form Key=Value;Key=Value`);
    kv.set(p.slice(0, i).toLowerCase(), p.slice(i + 1));
  }
  if (kv.get('usedevelopmentstorage')?.toLowerCase() === 'true') {
    return new AzureCredentials({ accountName: DEV_ACCOUNT_NAME, accountKey: DEV_ACCOUNT_KEY, blobEndpoint: `http://127.0.0.1:10000/${DEV_ACCOUNT_NAME}`, source });
  }
  const accountName = kv.get('accountname') ?? null;
  let blobEndpoint = kv.get('blobendpoint') ?? null;
  if (!blobEndpoint && accountName) {
    const proto = kv.get('defaultendpointsprotocol') ?? 'https';
    const suffix = kv.get('endpointsuffix') ?? 'core.windows.net';
    blobEndpoint = `${proto}://${accountName}.blob.${suffix}`;
  }
  const accountKey = kv.get('accountkey') ?? null;
  const sasToken = kv.get('sharedaccesssignature') ?? null;
  if (!accountKey && !sasToken) {
    throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials (${source}): "connectionString" has neither AccountKey nor SharedAccessSignature`);
  }
  return new AzureCredentials({ accountName, accountKey, sasToken: accountKey ? null : sasToken, blobEndpoint, source });
}

/**
 * Reads the credentials file. MOB_ERR_CONFIG (naming the file and the fix, never its content)
 * when it is missing, not a regular file, readable by group or others, or malformed.
 */
export async function loadAzureCredentials(file: string): Promise<AzureCredentials> {
  let text: string;
  try {
    const fh = await fsp.open(file, 'r');
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials file ${file} is not a regular file`);
      if ((st.mode & 0o077) !== 0) {
        throw new MobilityError('MOB_ERR_CONFIG',
          `Azure credentials file ${file} is readable by group or others (mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}); it holds a storage secret: run chmod 600 ${file}`);
      }
      text = await fh.readFile('utf8');
    } finally {
      await fh.close();
    }
  } catch (err) {
    if (err instanceof MobilityError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') {
      throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials file ${file} does not exist: create it (mode 0600) with ${FORMS}`);
    }
    throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials file ${file} cannot be read (${code ?? 'error'}): check its path and permissions`);
  }
  let j: unknown;
  try {
    j = JSON.parse(text);
  } catch {
    throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials file ${file} is not valid JSON: it must hold ${FORMS}`);
  }
  if (j === null || typeof j !== 'object' || Array.isArray(j)) {
    throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials file ${file} must hold a JSON object: ${FORMS}`);
  }
  const o = j as Record<string, unknown>;
  const str = (k: string): string | null => {
    const v = o[k];
    if (v === undefined || v === null) return null;
    if (typeof v !== 'string' || !v.trim()) throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials file ${file}: "${k}" must be a non-empty string`);
    return v.trim();
  };
  const accountName = str('accountName');
  const accountKey = str('accountKey');
  const sasToken = str('sasToken');
  const connectionString = str('connectionString');
  const forms = [accountKey, sasToken, connectionString].filter((v) => v !== null).length;
  if (forms !== 1) {
    throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials file ${file} must hold exactly one of "accountKey" (with "accountName"), "sasToken" or "connectionString"`);
  }
  if (accountName !== null && !/^[a-z0-9]{3,24}$/.test(accountName)) {
    throw new MobilityError('MOB_ERR_CONFIG', `Azure credentials file ${file}: "accountName" must be 3-24 lowercase letters and digits`);
  }
  if (connectionString) return parseConnectionString(connectionString, file);
  return new AzureCredentials({ accountName, accountKey, sasToken, source: file });
}
