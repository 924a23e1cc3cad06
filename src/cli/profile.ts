/**
 * CLI profiles: what `mobility login` saves so that later operator commands need no connection
 * options. One JSON file per profile, CONFIG-DIR/profiles/NAME.json, holding the server's
 * address, the trust anchor (a copy of the CA certificate, or the certificate's SHA-256 pin) and
 * the operator credential (the server's token). CONFIG-DIR is $MOBILITY_CONFIG_DIR, else
 * $XDG_CONFIG_HOME/mobility, else ~/.config/mobility.
 *
 * The token is a secret: the profiles directory is 0700, every profile file 0600 and written
 * atomically (a temporary file, fsync, rename), a profile file readable by group or others is
 * refused (MOB_ERR_CONFIG, with the fix), and nothing here puts a profile's content (so its
 * token) in a message. Imports nothing of the CLI but args.ts.
 */
import { X509Certificate, randomBytes } from 'node:crypto';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { MobilityError } from '../errors.js';
import type { Values } from './args.js';

/** What a profile file holds. */
export interface Profile {
  name: string;
  /** wss://HOST:PORT (ws:// for a --no-tls server) */
  server: string;
  /** the server's token: the operator credential */
  token: string;
  /** the server's CA certificate (PEM), copied at login */
  ca?: string;
  /** the SHA-256 fingerprint of the server certificate (AA:BB:..., upper case) */
  pin?: string;
  /** when login saved it (ISO 8601) */
  savedAt: string;
}

const FORMAT = 'mobility-profile';
const VERSION = 1;
export const DEFAULT_PROFILE = 'default';
const NAME_RE = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/;

/** The CLI's configuration directory: $MOBILITY_CONFIG_DIR, else $XDG_CONFIG_HOME/mobility, else ~/.config/mobility. */
export function configDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.MOBILITY_CONFIG_DIR) return path.resolve(env.MOBILITY_CONFIG_DIR);
  // the XDG base directory spec: a relative $XDG_CONFIG_HOME is invalid and ignored
  const xdg = env.XDG_CONFIG_HOME;
  const base = xdg && path.isAbsolute(xdg) ? xdg : path.join(os.homedir(), '.config');
  return path.join(base, 'mobility');
}

/** The directory of the profile files. */
export function profilesDir(): string {
  return path.join(configDir(), 'profiles');
}

export function profileFile(name: string): string {
  return path.join(profilesDir(), `${name}.json`);
}

/** A profile name must be a plain file name: letters, digits, '.', '_', '-' (not starting with '.' or '-'), at most 64. */
export function checkProfileName(name: string, from: string): string {
  if (!NAME_RE.test(name)) {
    throw new MobilityError('MOB_ERR_USAGE', `${from} ${JSON.stringify(name)} is not a profile name: use letters, digits, '.', '_' and '-' (at most 64, not starting with '.' or '-')`);
  }
  return name;
}

/** Where the name of the profile a command uses came from. */
export type ProfileSource = '--profile' | 'MOBILITY_PROFILE' | 'default';

/** The profile a command uses: --profile NAME, else $MOBILITY_PROFILE, else the profile named default. */
export function selectProfile(v: Values, env: NodeJS.ProcessEnv = process.env): { name: string; from: ProfileSource } {
  if (typeof v.profile === 'string') return { name: checkProfileName(v.profile, '--profile'), from: '--profile' };
  if (env.MOBILITY_PROFILE) return { name: checkProfileName(env.MOBILITY_PROFILE, 'MOBILITY_PROFILE'), from: 'MOBILITY_PROFILE' };
  return { name: DEFAULT_PROFILE, from: 'default' };
}

const modeOf = (m: number) => (m & 0o777).toString(8).padStart(4, '0');

/**
 * The profile NAME, or null when there is none. A file that is not a regular file, is readable
 * (or writable) by group or others, or is not a profile is MOB_ERR_CONFIG; the message names the
 * file and the fix, never what the file holds.
 */
export async function readProfile(name: string): Promise<Profile | null> {
  const file = profileFile(name);
  let text: string;
  let fh: fsp.FileHandle;
  try {
    // not opened unless a regular file (a FIFO would block the open)
    if (!(await fsp.stat(file)).isFile()) throw new MobilityError('MOB_ERR_CONFIG', `the profile ${file} is not a regular file: remove it (mobility logout --profile ${name}) and log in again`);
    fh = await fsp.open(file, 'r');
  } catch (err) {
    if (err instanceof MobilityError) throw err;
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new MobilityError('MOB_ERR_CONFIG', `cannot read the profile ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw new MobilityError('MOB_ERR_CONFIG', `the profile ${file} is not a regular file: remove it (mobility logout --profile ${name}) and log in again`);
    if ((st.mode & 0o077) !== 0) {
      throw new MobilityError('MOB_ERR_CONFIG',
        `the profile ${file} is open to group or others (mode ${modeOf(st.mode)}); it holds the server's operator token, so it is not used: run chmod 600 ${file} (and consider the token exposed: rotate it on the server), or log in again`);
    }
    text = await fh.readFile('utf8');
  } catch (err) {
    if (err instanceof MobilityError) throw err;
    throw new MobilityError('MOB_ERR_CONFIG', `cannot read the profile ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  } finally {
    await fh.close();
  }
  return parseProfile(name, file, text);
}

/** The profile in a file's text; MOB_ERR_CONFIG without a word of the text (a parse error would quote it, token included). */
function parseProfile(name: string, file: string, text: string): Profile {
  const bad = (why: string) => new MobilityError('MOB_ERR_CONFIG', `the profile ${file} is not a valid profile (${why}): log in again (mobility login --profile ${name} ...)`);
  let j: unknown;
  try { j = JSON.parse(text); } catch { throw bad('not JSON'); }
  if (!j || typeof j !== 'object' || Array.isArray(j)) throw bad('not a JSON object');
  const o = j as Record<string, unknown>;
  if (o.format !== FORMAT) throw bad('not a profile file');
  if (o.version !== VERSION) throw bad(`format version ${String(o.version)}; this CLI reads version ${VERSION}`);
  if (typeof o.server !== 'string' || !/^wss?:\/\//.test(o.server)) throw bad('no server address');
  if (typeof o.token !== 'string' || !o.token) throw bad('no token');
  if (o.ca !== undefined && typeof o.ca !== 'string') throw bad('the CA is not a PEM text');
  if (o.pin !== undefined && typeof o.pin !== 'string') throw bad('the pin is not a fingerprint');
  return {
    name, server: o.server, token: o.token, ca: o.ca as string | undefined, pin: o.pin as string | undefined,
    savedAt: typeof o.savedAt === 'string' ? o.savedAt : '',
  };
}

/**
 * Saves a profile: the directories are created 0700 (the profiles directory is set to 0700 even
 * when it exists), the file is written 0600 under a temporary name, synced and renamed over the
 * old one, so a reader sees the old profile or the new one, never a part. Returns the file.
 */
export async function saveProfile(p: Profile): Promise<string> {
  checkProfileName(p.name, 'profile');
  const dir = profilesDir();
  await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
  await fsp.chmod(dir, 0o700);
  const file = profileFile(p.name);
  const tmp = path.join(dir, `.${p.name}.json.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  const body = JSON.stringify({ format: FORMAT, version: VERSION, server: p.server, ca: p.ca, pin: p.pin, savedAt: p.savedAt, token: p.token }, null, 2) + '\n';
  const fh = await fsp.open(tmp, 'wx', 0o600);
  try {
    try {
      await fh.chmod(0o600);
      await fh.writeFile(body, 'utf8');
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, file);
  } catch (err) {
    await fsp.rm(tmp, { force: true });
    throw new MobilityError('MOB_ERR_CONFIG', `cannot save the profile ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  // the rename is durable once the directory is synced (best effort: not every filesystem allows it)
  try {
    const d = await fsp.open(dir, 'r');
    try { await d.sync(); } finally { await d.close(); }
  } catch { /* best effort */ }
  return file;
}

/** Removes the profile NAME; false when there was none. */
export async function removeProfile(name: string): Promise<boolean> {
  try {
    await fsp.unlink(profileFile(name));
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw new MobilityError('MOB_ERR_CONFIG', `cannot remove the profile ${profileFile(name)}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** The names of the saved profiles, sorted. */
export async function profileNames(): Promise<string[]> {
  let entries: string[];
  try {
    entries = await fsp.readdir(profilesDir());
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new MobilityError('MOB_ERR_CONFIG', `cannot list the profiles in ${profilesDir()}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  return entries.filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -5)).filter((n) => NAME_RE.test(n)).sort();
}

/** How a profile trusts the server: the SHA-256 fingerprint of its CA certificate, or its pin. Never the token. */
export function trustOf(p: Pick<Profile, 'ca' | 'pin' | 'server'>): { ca?: string; pin?: string; text: string } {
  let ca: string | undefined;
  if (p.ca !== undefined) {
    try { ca = new X509Certificate(p.ca).fingerprint256; } catch { ca = 'unreadable'; }
  }
  const parts = [ca === undefined ? '' : `CA ${ca}`, p.pin === undefined ? '' : `pin ${p.pin}`].filter(Boolean);
  return { ca, pin: p.pin, text: parts.length ? parts.join(', ') : p.server.startsWith('ws:') ? 'none (ws://)' : '-' };
}
