/**
 * Argument parsing and exit codes of the `mobility` command, shared by every
 * command module (main.ts, admin.ts, push-cli.ts). Exit codes come from one
 * switch (exitCodeFor). Imports nothing of the CLI, so no module here depends
 * on main.ts.
 */
import fsp from 'node:fs/promises';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { MobilityError, type ErrorCode } from '../errors.js';
import { parseCompressMode, type CompressMode } from '../protocol/block-codec.js';

export const EXIT = { OK: 0, ERROR: 1, USAGE: 2, CONFIG: 3, AUTH: 4, UNREACHABLE: 5, MISMATCH: 6, INTERRUPTED: 130 } as const;

export function exitCodeFor(code: ErrorCode): number {
  switch (code) {
    case 'MOB_ERR_USAGE': return EXIT.USAGE;
    case 'MOB_ERR_CONFIG':
    case 'MOB_ERR_SOURCE':
    case 'MOB_ERR_STATE_CORRUPT':
    case 'MOB_ERR_DISK_SIZE_CHANGED':
    case 'MOB_ERR_TRACKER':
    case 'MOB_ERR_UNKNOWN_POINT':
    case 'MOB_ERR_UNKNOWN_MACHINE':
    case 'MOB_ERR_UNKNOWN_VM':
    case 'MOB_ERR_UNKNOWN_POLICY':
    case 'MOB_ERR_UNKNOWN_GROUP':
    case 'MOB_ERR_GROUP_TOO_LARGE':
    case 'MOB_ERR_NOT_PROTECTING':
    case 'MOB_ERR_NETWORK_MAP':
    case 'MOB_ERR_PLAN':
    case 'MOB_ERR_UNKNOWN_PLAN':
    case 'MOB_ERR_PREFLIGHT': return EXIT.CONFIG;
    case 'MOB_ERR_AUTH':
    case 'MOB_ERR_PASSPHRASE':
    case 'MOB_ERR_TOKEN_USED':
    case 'MOB_ERR_CLONE':
    case 'MOB_ERR_FORBIDDEN':
    case 'MOB_ERR_NOT_REGISTERED':
    case 'MOB_ERR_TLS_PIN': return EXIT.AUTH;
    case 'MOB_ERR_UNREACHABLE':
    case 'MOB_ERR_RETRY_EXHAUSTED':
    case 'MOB_ERR_HEARTBEAT_TIMEOUT':
    case 'MOB_ERR_CUT_TIMEOUT':
    case 'MOB_ERR_AGENT_OFFLINE': return EXIT.UNREACHABLE;
    default: return EXIT.ERROR;
  }
}

export function parseDuration(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/.exec(s.trim());
  if (!m) throw new MobilityError('MOB_ERR_USAGE', `not a duration: ${s} (e.g. 30s, 5m, 1h)`);
  return Math.round(Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h']);
}

export function parseSize(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?$/i.exec(s.trim());
  if (!m) throw new MobilityError('MOB_ERR_USAGE', `not a size: ${s}`);
  const mult = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[m[2].toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  return Math.round(Number(m[1]) * mult);
}

export type Values = Record<string, string | boolean | string[] | undefined>;

/** node:util parseArgs, strict, with -h/--help added; its errors become MOB_ERR_USAGE. */
export function parse(argv: string[], options: ParseArgsConfig['options'], allowPositionals = false): { values: Values; positionals: string[] } {
  try {
    const r = parseArgs({ args: argv, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals, strict: true });
    return { values: r.values as Values, positionals: r.positionals };
  } catch (err) {
    throw new MobilityError('MOB_ERR_USAGE', (err as Error).message);
  }
}

/** The trimmed content of a secret file (token, passphrase, password); `what` names the option for the usage error. */
export async function readSecretFile(file: string | undefined, what: string): Promise<string> {
  if (!file) throw new MobilityError('MOB_ERR_USAGE', `--${what} is required`);
  try {
    const t = (await fsp.readFile(file, 'utf8')).trim();
    if (!t) throw new MobilityError('MOB_ERR_CONFIG', `${file} is empty`);
    return t;
  } catch (err) {
    if (err instanceof MobilityError) throw err;
    throw new MobilityError('MOB_ERR_CONFIG', `cannot read ${file}: ${(err as Error).message}`);
  }
}

/** --compress MODE / --no-compress (= never); `fallback` when neither is given. */
export function compressMode(v: Values): CompressMode;
export function compressMode(v: Values, fallback: undefined): CompressMode | undefined;
export function compressMode(v: Values, fallback: CompressMode | undefined = 'auto'): CompressMode | undefined {
  if (v['no-compress'] && v.compress !== undefined && v.compress !== 'never') throw new MobilityError('MOB_ERR_USAGE', '--no-compress contradicts --compress ' + String(v.compress));
  return v['no-compress'] ? 'never' : v.compress === undefined ? fallback : parseCompressMode(v.compress as string);
}
