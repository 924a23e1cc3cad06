/**
 * The agent daemon's configuration file (written by install.sh, JSON) and its
 * credentials (written by `mobility register` into the state directory).
 *
 *   <stateDir>/agent.key      the agent's private key (0600, never leaves the machine)
 *   <stateDir>/agent.pem      its client certificate, signed by the server CA
 *   <stateDir>/server-ca.pem  the server CA
 *   <stateDir>/identity.json  {agentId, server, serverFingerprint, registeredAt}: the pinned server
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { MobilityError } from '../errors.js';

export interface AgentConfig {
  /** wss://host:port of the server. */
  server: string;
  stateDir: string;
  logFile?: string;
  /** Server certificate fingerprint to pin at registration (otherwise learned by the passphrase proof). */
  pin?: string;
  machineIdFile?: string;
  /** Inventory refresh interval (default 15 min). */
  inventoryIntervalMs?: number;
  tracefsRoot?: string;
  hooksDir?: string;
  logLevel?: string;
}

export interface Identity { agentId: string; server: string; serverFingerprint: string; registeredAt: string }

export interface Credentials { identity: Identity; key: string; cert: string; ca: string }

export async function loadAgentConfig(file: string): Promise<AgentConfig> {
  let raw: string;
  try {
    raw = await fsp.readFile(file, 'utf8');
  } catch (err) {
    throw new MobilityError('MOB_ERR_CONFIG', `cannot read the agent configuration ${file}: ${(err as Error).message}`);
  }
  let c: Partial<AgentConfig>;
  try {
    c = JSON.parse(raw) as Partial<AgentConfig>;
  } catch (err) {
    throw new MobilityError('MOB_ERR_CONFIG', `${file} is not JSON: ${(err as Error).message}`);
  }
  if (typeof c.server !== 'string' || !/^wss:\/\//.test(c.server)) throw new MobilityError('MOB_ERR_CONFIG', `${file}: "server" must be a wss:// URL`);
  if (typeof c.stateDir !== 'string' || !path.isAbsolute(c.stateDir)) throw new MobilityError('MOB_ERR_CONFIG', `${file}: "stateDir" must be an absolute path`);
  return c as AgentConfig;
}

export const credentialFiles = (stateDir: string) => ({
  key: path.join(stateDir, 'agent.key'),
  cert: path.join(stateDir, 'agent.pem'),
  ca: path.join(stateDir, 'server-ca.pem'),
  identity: path.join(stateDir, 'identity.json'),
});

export async function readIdentity(stateDir: string): Promise<Identity | null> {
  try {
    return JSON.parse(await fsp.readFile(credentialFiles(stateDir).identity, 'utf8')) as Identity;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new MobilityError('MOB_ERR_STATE_CORRUPT', `cannot read the agent identity: ${(err as Error).message}`);
  }
}

export async function loadCredentials(stateDir: string): Promise<Credentials> {
  const f = credentialFiles(stateDir);
  const identity = await readIdentity(stateDir);
  if (!identity) throw new MobilityError('MOB_ERR_NOT_REGISTERED', `no agent identity in ${stateDir}: run mobility register first`);
  try {
    const [key, cert, ca] = await Promise.all([fsp.readFile(f.key, 'utf8'), fsp.readFile(f.cert, 'utf8'), fsp.readFile(f.ca, 'utf8')]);
    return { identity, key, cert, ca };
  } catch (err) {
    throw new MobilityError('MOB_ERR_NOT_REGISTERED', `the agent credentials in ${stateDir} are incomplete (${(err as Error).message}): run mobility register again`);
  }
}
