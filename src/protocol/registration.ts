/**
 * The registration proof both ends compute: the server proves it knows the passphrase (or
 * one-time token) before the agent sends it, by an HMAC over the challenge's nonce and the
 * server certificate's fingerprint, keyed with a hash of the secret. Pure, shared by the
 * agent's installer (install/register.ts) and the server's registry (server/registry.ts).
 */
import crypto from 'node:crypto';

/** The key both ends derive from the passphrase or token. */
export function secretKey(secret: string): Buffer {
  return crypto.createHash('sha256').update(secret, 'utf8').digest();
}

/** The server's proof of the secret, bound to the challenge nonce and its certificate. */
export function serverProof(key: Buffer, nonce: string, fingerprint: string): string {
  return crypto.createHmac('sha256', key).update(`mobility-register|${nonce}|${fingerprint}`).digest('hex');
}
