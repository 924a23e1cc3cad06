/**
 * Agent side of registration (see src/server/registry.ts for the protocol).
 * The agent checks the server's proof of the secret before sending it, pins the
 * certificate it saw, and stores its key and certificate with mode 0600.
 */
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import https from 'node:https';
import os from 'node:os';
import type { TLSSocket } from 'node:tls';
import { MobilityError, isErrorCode } from '../errors.js';
import { normalizeFingerprint } from '../transport/tls.js';
import { writeFileDurable } from '../util/durable-file.js';
import { credentialFiles, readIdentity, type Identity } from '../agent/config.js';
import { readMachineId } from '../agent/inventory.js';
import { secretKey, serverProof } from '../protocol/registration.js';
import { installIdOf } from '../util/installation.js';

export interface RegisterOptions {
  server: string;
  stateDir: string;
  kind: 'passphrase' | 'token';
  secret: string;
  /** Expected server certificate fingerprint; when absent the passphrase proof authenticates the server. */
  pin?: string;
  machineIdFile?: string;
  hostname?: string;
  timeoutMs?: number;
  /** Take over the identity even while another installation of it on this machine is connected. */
  replace?: boolean;
}


/**
 * POST over TLS without a CA, returning the JSON and the server certificate's fingerprint.
 * With expectFingerprint the body (which then holds the secret) is written only after the
 * handshake presented that certificate.
 */
function post(base: URL, pathname: string, body: unknown, timeoutMs: number, expectFingerprint?: string): Promise<{ status: number; json: Record<string, unknown>; fingerprint: string }> {
  return new Promise((resolve, reject) => {
    const data = Buffer.from(JSON.stringify(body));
    const req = https.request({
      host: base.hostname, port: base.port || 443, path: pathname, method: 'POST', rejectUnauthorized: false, agent: false, timeout: timeoutMs,
      headers: { 'content-type': 'application/json', 'content-length': data.length },
    }, (res) => {
      const fingerprint = (res.socket as TLSSocket).getPeerCertificate?.()?.fingerprint256 ?? '';
      const parts: Buffer[] = [];
      res.on('data', (c: Buffer) => parts.push(c));
      res.on('end', () => {
        try {
          resolve({ status: res.statusCode ?? 0, json: JSON.parse(Buffer.concat(parts).toString('utf8')) as Record<string, unknown>, fingerprint });
        } catch {
          reject(new MobilityError('MOB_ERR_UNREACHABLE', `${base.host} did not answer JSON on ${pathname} (HTTP ${res.statusCode}); is it a Mobility server?`));
        }
      });
    });
    req.on('timeout', () => req.destroy(new MobilityError('MOB_ERR_UNREACHABLE', `${base.host} did not answer within ${timeoutMs} ms`)));
    req.on('error', (err) => reject(err instanceof MobilityError ? err : new MobilityError('MOB_ERR_UNREACHABLE', `cannot reach ${base.host}: ${err.message}`, { cause: err })));
    if (expectFingerprint === undefined) {
      req.end(data);
      return;
    }
    req.once('socket', (sock) => {
      (sock as TLSSocket).once('secureConnect', () => {
        const fp = (sock as TLSSocket).getPeerCertificate()?.fingerprint256 ?? '';
        if (fp !== expectFingerprint) {
          req.destroy(new MobilityError('MOB_ERR_TLS_PIN', `the server certificate changed between the two registration requests (${fp}, expected ${expectFingerprint}); the secret was not sent`));
        } else {
          req.end(data);
        }
      });
    });
  });
}

function serverError(json: Record<string, unknown>, status: number): MobilityError {
  const code = typeof json.code === 'string' && isErrorCode(json.code) ? json.code : 'MOB_ERR_INTERNAL';
  return new MobilityError(code, `server: ${typeof json.message === 'string' ? json.message : `HTTP ${status}`}`);
}

export async function registerAgent(o: RegisterOptions): Promise<Identity & { reRegistered: boolean }> {
  const url = new URL(o.server);
  if (url.protocol !== 'wss:' && url.protocol !== 'https:') throw new MobilityError('MOB_ERR_USAGE', '--server must be wss://HOST:PORT');
  const timeoutMs = o.timeoutMs ?? 15_000;
  const machineId = await readMachineId(o.machineIdFile);
  const previous = await readIdentity(o.stateDir).catch(() => null);
  const tokenId = o.kind === 'token' ? o.secret.split('.')[0] : undefined;
  const tokenSecret = o.kind === 'token' ? o.secret.slice(o.secret.indexOf('.') + 1) : o.secret;

  // 1. the server proves it knows the secret, bound to the certificate we see
  const nonce = crypto.randomBytes(32).toString('hex');
  const ch = await post(url, '/v1/register/challenge', { kind: o.kind, tokenId, nonce }, timeoutMs);
  if (ch.status !== 200) throw serverError(ch.json, ch.status);
  if (o.pin && ch.fingerprint !== normalizeFingerprint(o.pin)) {
    throw new MobilityError('MOB_ERR_TLS_PIN', `the server certificate ${ch.fingerprint} is not the pinned ${normalizeFingerprint(o.pin)}`);
  }
  const expected = serverProof(secretKey(tokenSecret), nonce, ch.fingerprint);
  const proof = typeof ch.json.proof === 'string' ? ch.json.proof : '';
  if (proof.length !== expected.length || !crypto.timingSafeEqual(Buffer.from(proof), Buffer.from(expected))) {
    throw new MobilityError('MOB_ERR_PASSPHRASE', `the server at ${url.host} could not prove it knows this ${o.kind === 'token' ? 'token' : 'passphrase'}: `
      + 'either the secret is wrong or another machine answers at this address (certificate ' + ch.fingerprint + ')');
  }

  // 2. our key pair; only the public key leaves the machine
  const { privateKey, publicKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const keyPem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
  const pubPem = publicKey.export({ type: 'spki', format: 'pem' }).toString();
  const reg = await post(url, '/v1/register', {
    kind: o.kind, secret: o.secret, machineId, hostname: o.hostname ?? os.hostname(), publicKey: pubPem,
    ...(previous ? { agentId: previous.agentId } : {}),
    installId: installIdOf(o.stateDir), ...(o.replace ? { replace: true } : {}),
  }, timeoutMs, ch.fingerprint);
  if (reg.fingerprint !== ch.fingerprint) throw new MobilityError('MOB_ERR_TLS_PIN', 'the server certificate changed between the two registration requests');
  if (reg.status !== 200) throw serverError(reg.json, reg.status);
  const r = reg.json as { agentId: string; cert: string; ca: string; serverFingerprint: string; reRegistered: boolean };

  // 3. credentials, 0600, identity last (its presence means "registered")
  await fsp.mkdir(o.stateDir, { recursive: true, mode: 0o700 });
  const f = credentialFiles(o.stateDir);
  await writeFileDurable(f.key, keyPem, 0o600);
  await writeFileDurable(f.cert, r.cert, 0o600);
  await writeFileDurable(f.ca, r.ca, 0o600);
  const identity: Identity = { agentId: r.agentId, server: o.server, serverFingerprint: ch.fingerprint, registeredAt: new Date().toISOString() };
  await writeFileDurable(f.identity, JSON.stringify(identity, null, 1) + '\n', 0o600);
  return { ...identity, reRegistered: r.reRegistered };
}
