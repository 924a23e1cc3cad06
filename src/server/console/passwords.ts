/**
 * Operator passwords of the console: salted scrypt (node:crypto), stored as one self-describing
 * string so the cost can be raised later without breaking older hashes:
 *
 *   scrypt$<log2 N>$<r>$<p>$<salt, base64>$<key, base64>
 *
 * Verification recomputes the key with the stored parameters and compares in constant time.
 * Callers: the `mobility operator` CLI (hashPassword) and the console login (verifyPassword,
 * verifyDecoy when the name is unknown, so an unknown name costs the same time as a wrong password).
 */
import crypto from 'node:crypto';
import { MobilityError } from '../../errors.js';

/** scrypt cost: N = 2^15, r = 8, p = 1 (32 MiB, tens of ms per attempt), 16-byte salt, 32-byte key. */
export const SCRYPT_DEFAULTS = { logN: 15, r: 8, p: 1, saltBytes: 16, keyBytes: 32 } as const;
export const MIN_PASSWORD_LENGTH = 10;
export const MAX_PASSWORD_LENGTH = 1024;

function scrypt(password: string, salt: Buffer, keyLen: number, o: { N: number; r: number; p: number }): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    crypto.scrypt(password, salt, keyLen, { ...o, maxmem: 256 * o.N * o.r + 1024 * 1024 }, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

/** Refuses passwords too short to resist guessing, or absurdly long (MOB_ERR_USAGE). */
export function checkPasswordRules(password: string): void {
  if (password.length < MIN_PASSWORD_LENGTH) throw new MobilityError('MOB_ERR_USAGE', `the password must have at least ${MIN_PASSWORD_LENGTH} characters`);
  if (password.length > MAX_PASSWORD_LENGTH) throw new MobilityError('MOB_ERR_USAGE', `the password must have at most ${MAX_PASSWORD_LENGTH} characters`);
}

export async function hashPassword(password: string, o: { logN?: number } = {}): Promise<string> {
  checkPasswordRules(password);
  const logN = o.logN ?? SCRYPT_DEFAULTS.logN;
  const { r, p, saltBytes, keyBytes } = SCRYPT_DEFAULTS;
  const salt = crypto.randomBytes(saltBytes);
  const key = await scrypt(password, salt, keyBytes, { N: 2 ** logN, r, p });
  return `scrypt$${logN}$${r}$${p}$${salt.toString('base64')}$${key.toString('base64')}`;
}

interface Parsed { logN: number; r: number; p: number; salt: Buffer; key: Buffer }

function parseHash(stored: string): Parsed | null {
  const m = /^scrypt\$(\d{1,2})\$(\d{1,2})\$(\d{1,2})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$/.exec(stored);
  if (!m) return null;
  const [logN, r, p] = [Number(m[1]), Number(m[2]), Number(m[3])];
  // bounds keep a tampered row from asking for gigabytes of memory
  if (logN < 10 || logN > 20 || r < 1 || r > 32 || p < 1 || p > 16) return null;
  const salt = Buffer.from(m[4], 'base64');
  const key = Buffer.from(m[5], 'base64');
  if (salt.length < 8 || key.length < 16 || key.length > 64) return null;
  return { logN, r, p, salt, key };
}

/** True when password matches the stored hash; false for a wrong password or an unreadable hash. */
export async function verifyPassword(password: string, stored: string): Promise<boolean> {
  const h = parseHash(stored);
  if (!h || password.length > MAX_PASSWORD_LENGTH) return false;
  const key = await scrypt(password, h.salt, h.key.length, { N: 2 ** h.logN, r: h.r, p: h.p });
  return crypto.timingSafeEqual(key, h.key);
}

let decoy: Promise<string> | null = null;

/** Spends the time of one verification and answers false: the login of an unknown operator. */
export async function verifyDecoy(password: string): Promise<false> {
  decoy ??= hashPassword(crypto.randomBytes(18).toString('base64'));
  await verifyPassword(password.slice(0, MAX_PASSWORD_LENGTH), await decoy);
  return false;
}
