/**
 * Agent registration. An agent proves it holds the registration passphrase (or
 * a one-time token minted for a push install); it gets its own client
 * certificate signed by the server CA and pins the server certificate.
 *
 * Before sending its secret the agent checks the server: it sends a nonce, and
 * the server answers HMAC-SHA256(sha256(secret), nonce | fingerprint of the
 * server certificate). Only a server that knows the secret and owns that
 * certificate can answer, so the agent learns the certificate to pin without
 * being told it out of band, and a man in the middle never sees the secret.
 *
 * Secrets are compared in constant time; failures are rate limited per address.
 */
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { ID_PATTERN } from '../constants.js';
import { MobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import { signClientCert } from '../transport/tls.js';
import { writeFileDurable } from '../util/durable-file.js';
import type { ConfigDb } from './config-db.js';
import { secretKey, serverProof } from '../protocol/registration.js';

export { secretKey, serverProof } from '../protocol/registration.js';

export const TOKEN_TTL_MS = 24 * 3600_000;

const B32 = 'abcdefghijkmnpqrstuvwxyz23456789';

/** A new random passphrase: 6 groups of 5 characters (about 150 bits). */
export function newPassphrase(): string {
  const bytes = crypto.randomBytes(30);
  const chars = [...bytes].map((b) => B32[b % 32]);
  return Array.from({ length: 6 }, (_, i) => chars.slice(i * 5, i * 5 + 5).join('')).join('-');
}

export function passphraseFile(dataDir: string): string { return path.join(dataDir, 'passphrase'); }

/** Reads the registration passphrase, creating it (mode 0600) on first start. */
export async function ensurePassphrase(dataDir: string): Promise<string> {
  try {
    const p = (await fsp.readFile(passphraseFile(dataDir), 'utf8')).trim();
    if (p) return p;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const p = newPassphrase();
  await writeFileDurable(passphraseFile(dataDir), p + '\n', 0o600);
  return p;
}

/** Replaces the passphrase; a running server uses the new one at the next registration. */
export async function rotatePassphrase(dataDir: string): Promise<string> {
  const p = newPassphrase();
  await writeFileDurable(passphraseFile(dataDir), p + '\n', 0o600);
  return p;
}

function equalSecret(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

export interface RegisterRequest {
  kind: 'passphrase' | 'token';
  secret: string;
  machineId: string;
  hostname: string;
  agentId?: string;
  publicKey: string;
  /** Digest of the registering installation's state directory (16 hex). */
  installId?: string;
  /** Take over the identity even while another installation of it is connected. */
  replace?: boolean;
}

export interface RegisterReply { agentId: string; cert: string; ca: string; serverFingerprint: string; reRegistered: boolean }

const MACHINE_ID = /^[0-9a-zA-Z-]{8,64}$/;

export class Registry {
  private readonly failures = new Map<string, { count: number; since: number }>();
  private readonly challenges = new Map<string, { count: number; since: number }>();
  private lock: Promise<void> = Promise.resolve();
  /** Per-token-id keys for unknown ids, so a challenge never tells which ids exist. */
  private readonly decoyKey = crypto.randomBytes(32);

  constructor(private readonly o: {
    dataDir: string; db: ConfigDb; log: Logger; fingerprint: () => string;
    failureLimit?: number; failureWindowMs?: number;
    /** Challenges per address per window (default 60). */
    challengeLimit?: number;
    /** Called after a registration replaced an agent's certificate (its open sessions must end). */
    onReplaced?: (agentId: string) => void;
    /** Whether the agent is connected now (control channel or replication). */
    isConnected?: (agentId: string) => boolean;
  }) {}

  private get limit(): number { return this.o.failureLimit ?? 10; }
  private get windowMs(): number { return this.o.failureWindowMs ?? 60_000; }

  private checkRate(ip: string): void {
    if (this.failures.size + this.challenges.size > 10_000) {
      const now = Date.now();
      for (const m of [this.failures, this.challenges]) for (const [k, v] of m) if (now - v.since > this.windowMs) m.delete(k);
    }
    const f = this.failures.get(ip);
    if (!f) return;
    if (Date.now() - f.since > this.windowMs) { this.failures.delete(ip); return; }
    if (f.count >= this.limit) {
      throw new MobilityError('MOB_ERR_RATE_LIMITED', `${f.count} failed registration attempts from ${ip} in the last ${Math.round(this.windowMs / 1000)} s; retry in ${Math.ceil((f.since + this.windowMs - Date.now()) / 1000)} s`);
    }
  }

  private fail(ip: string, err: MobilityError): never {
    const f = this.failures.get(ip);
    if (f && Date.now() - f.since <= this.windowMs) f.count++;
    else this.failures.set(ip, { count: 1, since: Date.now() });
    this.o.log.warn('registration refused', { peer: ip, code: err.code, reason: err.message });
    throw err;
  }

  /** The key both sides derive from the secret: sha256(passphrase), or the stored hash of a token. */
  private async keyFor(kind: unknown, tokenId: unknown): Promise<Buffer> {
    if (kind === 'token') {
      const row = typeof tokenId === 'string' ? this.o.db.getToken(tokenId) : null;
      return row ? Buffer.from(row.hash, 'hex') : crypto.createHmac('sha256', this.decoyKey).update(String(tokenId)).digest();
    }
    if (kind === 'passphrase') return secretKey(await ensurePassphrase(this.o.dataDir));
    throw new MobilityError('MOB_ERR_USAGE', 'kind must be "passphrase" or "token"');
  }

  async challenge(body: Record<string, unknown>, ip: string): Promise<{ proof: string; fingerprint: string }> {
    this.checkRate(ip);
    // a proof is something to guess the secret against offline: hand out few of them per address
    const now = Date.now();
    const c = this.challenges.get(ip);
    if (c && now - c.since <= this.windowMs) {
      if (++c.count > (this.o.challengeLimit ?? 60)) throw new MobilityError('MOB_ERR_RATE_LIMITED', `too many registration challenges from ${ip}; retry in ${Math.ceil((c.since + this.windowMs - now) / 1000)} s`);
    } else {
      this.challenges.set(ip, { count: 1, since: now });
    }
    const nonce = body.nonce;
    if (typeof nonce !== 'string' || !/^[0-9a-f]{32,128}$/.test(nonce)) throw new MobilityError('MOB_ERR_USAGE', 'nonce must be 32 to 128 hex characters');
    const fp = this.o.fingerprint();
    return { proof: serverProof(await this.keyFor(body.kind, body.tokenId), nonce, fp), fingerprint: fp };
  }

  async register(body: Record<string, unknown>, ip: string): Promise<RegisterReply> {
    this.checkRate(ip);
    const r = body as Partial<RegisterRequest>;
    if (typeof r.secret !== 'string' || !r.secret || r.secret.length > 512) throw new MobilityError('MOB_ERR_USAGE', 'secret is required');
    if (typeof r.machineId !== 'string' || !MACHINE_ID.test(r.machineId)) throw new MobilityError('MOB_ERR_USAGE', 'machineId must be 8 to 64 characters [0-9a-zA-Z-]');
    if (typeof r.hostname !== 'string' || !r.hostname || r.hostname.length > 253) throw new MobilityError('MOB_ERR_USAGE', 'hostname is required');
    if (r.agentId !== undefined && (typeof r.agentId !== 'string' || !ID_PATTERN.test(r.agentId))) throw new MobilityError('MOB_ERR_BAD_DISK_ID', `agent id ${JSON.stringify(r.agentId)} is not [A-Za-z0-9._-]{1,64}`);
    if (typeof r.publicKey !== 'string' || !r.publicKey.includes('PUBLIC KEY')) throw new MobilityError('MOB_ERR_USAGE', 'publicKey (PEM) is required');
    if (r.installId !== undefined && (typeof r.installId !== 'string' || !/^[0-9a-f]{8,64}$/.test(r.installId))) throw new MobilityError('MOB_ERR_USAGE', 'installId must be 8 to 64 hex characters');
    if (r.replace !== undefined && typeof r.replace !== 'boolean') throw new MobilityError('MOB_ERR_USAGE', 'replace must be a boolean');
    const machineId = r.machineId.toLowerCase();

    let registeredWith: string;
    let tokenId: string | null = null;
    if (r.kind === 'passphrase') {
      const expected = secretKey(await ensurePassphrase(this.o.dataDir));
      if (!equalSecret(secretKey(r.secret), expected)) this.fail(ip, new MobilityError('MOB_ERR_PASSPHRASE', 'the registration passphrase is wrong (mobility passphrase show, on the server)'));
      registeredWith = 'passphrase';
    } else if (r.kind === 'token') {
      const dot = r.secret.indexOf('.');
      const id = dot > 0 ? r.secret.slice(0, dot) : '';
      const row = id ? this.o.db.getToken(id) : null;
      const given = secretKey(dot > 0 ? r.secret.slice(dot + 1) : r.secret);
      const expected = row ? Buffer.from(row.hash, 'hex') : crypto.randomBytes(32);
      if (!row || !equalSecret(given, expected)) this.fail(ip, new MobilityError('MOB_ERR_PASSPHRASE', 'the one-time registration token is wrong'));
      if (row.usedAt) this.fail(ip, new MobilityError('MOB_ERR_TOKEN_USED', `the one-time token ${row.id} was already used at ${row.usedAt} (by ${row.usedBy ?? '?'}); mint a new one`));
      if (Date.parse(row.expiresAt) < Date.now()) this.fail(ip, new MobilityError('MOB_ERR_TOKEN_USED', `the one-time token ${row.id} expired at ${row.expiresAt}; mint a new one`));
      tokenId = row.id;
      registeredWith = `token ${row.id}`;
    } else {
      throw new MobilityError('MOB_ERR_USAGE', 'kind must be "passphrase" or "token"');
    }

    // one registration at a time from here: identity resolution, signing and the write are one step
    const prev = this.lock;
    let release!: () => void;
    this.lock = new Promise<void>((r) => (release = r));
    await prev;
    try {
      return await this.registerLocked(r as RegisterRequest, machineId, registeredWith, tokenId, ip);
    } finally {
      release();
    }
  }

  private async registerLocked(r: RegisterRequest, machineId: string, registeredWith: string, tokenId: string | null, ip: string): Promise<RegisterReply> {
    // identity: the agent's claim (from its saved state), else its machine, else a new id
    let agentId: string;
    let reRegistered = false;
    if (r.agentId) {
      const existing = this.o.db.getAgent(r.agentId);
      if (existing && existing.machineId !== machineId) {
        this.fail(ip, new MobilityError('MOB_ERR_CLONE', `agent ${r.agentId} is registered for machine ${existing.machineId}, but this machine's id is ${machineId}: `
          + 'a cloned machine or copied agent state. Give the clone a new machine id (systemd-machine-id-setup after removing /etc/machine-id) and remove its agent state, then register again.'));
      }
      const byMachine = this.o.db.agentByMachine(machineId);
      if (byMachine && byMachine.id !== r.agentId) {
        this.fail(ip, new MobilityError('MOB_ERR_CLONE', `machine ${machineId} is already registered as agent ${byMachine.id}, not ${r.agentId}`));
      }
      agentId = r.agentId;
      reRegistered = existing !== null;
    } else {
      const byMachine = this.o.db.agentByMachine(machineId);
      if (byMachine) {
        agentId = byMachine.id;
        reRegistered = true;
      } else {
        const base = r.hostname.split('.')[0].replace(/[^A-Za-z0-9._-]/g, '-').slice(0, 48) || 'agent';
        agentId = this.o.db.getAgent(base) ? `${base}-${machineId.slice(0, 8)}` : base;
        if (this.o.db.getAgent(agentId)) agentId = `${base}-${crypto.randomBytes(4).toString('hex')}`;
      }
    }

    // a second installation on this machine (another state directory) must not take over the
    // identity of one that is connected and may be protecting disks: its certificate would be
    // superseded and its protection stopped. A request that names no installation (an older
    // client, a hand-made request) cannot show it is the connected one: refused the same way.
    const current = reRegistered ? this.o.db.getAgent(agentId) : null;
    if (current?.installId && current.installId !== r.installId && !r.replace && this.o.isConnected?.(agentId)) {
      throw new MobilityError('MOB_ERR_AGENT_EXISTS', `agent ${agentId} is registered for this machine by ${r.installId ? 'another installation' : 'an installation'} (${current.installId}), which is connected now${r.installId ? '' : ', and this request names no installation'}: `
        + 'registering this one would stop its protection. Uninstall or stop the other installation first, or register with --replace to take the identity over.');
    }

    let signed: { cert: string; fingerprint256: string };
    try {
      signed = await signClientCert(this.o.dataDir, r.publicKey, agentId);
    } catch (err) {
      throw new MobilityError('MOB_ERR_USAGE', `cannot sign the agent key: ${(err as Error).message}`);
    }
    // the token is spent only by a registration that succeeds, together with the agent's row
    const outcome = this.o.db.registerAgent({ id: agentId, machineId, hostname: r.hostname, certFingerprint: signed.fingerprint256, registeredWith, installId: r.installId ?? null }, tokenId, `${r.hostname} (${machineId})`);
    if (outcome === 'token-used') this.fail(ip, new MobilityError('MOB_ERR_TOKEN_USED', `the one-time token ${tokenId} was just used by another registration`));
    if (outcome === 'conflict') this.fail(ip, new MobilityError('MOB_ERR_CLONE', `agent id ${agentId} or machine ${machineId} was just registered for another machine; retry`));
    if (reRegistered) this.o.onReplaced?.(agentId);
    this.failures.delete(ip);
    this.o.log.info(reRegistered ? 'agent re-registered' : 'agent registered', { agent: agentId, hostname: r.hostname, machineId, with: registeredWith, peer: ip });
    const ca = await fsp.readFile(path.join(this.o.dataDir, 'tls', 'ca.pem'), 'utf8');
    return { agentId, cert: signed.cert, ca, serverFingerprint: this.o.fingerprint(), reRegistered };
  }
}
