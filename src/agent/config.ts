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

/**
 * agent.json. docs/operations.md ("The agent's configuration file: agent.json") documents every
 * key; test/agent/config.test.ts checks that the two agree (AGENT_CONFIG_KEYS).
 */
export interface AgentConfig {
  /** wss://host:port of the server. */
  server: string;
  /** Absolute: credentials, identity, digest maps, tracking state. */
  stateDir: string;
  /** JSON log lines, rotated at 10 MiB x 5 (default: stderr only). Read at start (a reload keeps the file). */
  logFile?: string;
  /** Server certificate fingerprint to pin at registration (otherwise learned by the passphrase proof). */
  pin?: string;
  /** Where the machine id is read (default /etc/machine-id). */
  machineIdFile?: string;
  /** Inventory refresh interval (default 15 min). */
  inventoryIntervalMs?: number;
  /** tracefs mount point (default /sys/kernel/tracing, else /sys/kernel/debug/tracing). */
  tracefsRoot?: string;
  /** Hook scripts of app-consistent cuts: DIR/pre-freeze/*, DIR/frozen/*, DIR/post-thaw/* (default: none). */
  hooksDir?: string;
  /** error, warn, info (default), http, verbose, debug, silly; a reload applies it. */
  logLevel?: string;
  /** Profile-only disks (capacity planning): how often their churn is reported (default 10 s, at least 1 s). */
  profileIntervalMs?: number;
  /**
   * Host mode: a glob of the QMP unix sockets of this host's VMs (`*` within path segments), e.g.
   * /var/run/qemu-server/*.qmp (Proxmox). When set the agent is a host agent: it reports the VMs
   * in its inventory and protects those the server assigns (src/source/qemu/vm-discovery.ts).
   */
  vmSockets?: string;
}

/** Every key of agent.json and its JSON type. Other keys are ignored (install.sh keeps them on upgrade). */
export const AGENT_CONFIG_KEYS: Record<keyof AgentConfig, 'string' | 'number'> = {
  server: 'string', stateDir: 'string', logFile: 'string', pin: 'string', machineIdFile: 'string',
  inventoryIntervalMs: 'number', tracefsRoot: 'string', hooksDir: 'string', logLevel: 'string', profileIntervalMs: 'number',
  vmSockets: 'string',
};

/** The log levels logLevel may name (winston's npm levels). */
export const LOG_LEVELS = ['error', 'warn', 'info', 'http', 'verbose', 'debug', 'silly'] as const;

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
  if (c === null || typeof c !== 'object' || Array.isArray(c)) throw new MobilityError('MOB_ERR_CONFIG', `${file} is not a JSON object`);
  if (typeof c.server !== 'string' || !/^wss:\/\//.test(c.server)) throw new MobilityError('MOB_ERR_CONFIG', `${file}: "server" must be a wss:// URL`);
  if (typeof c.stateDir !== 'string' || !path.isAbsolute(c.stateDir)) throw new MobilityError('MOB_ERR_CONFIG', `${file}: "stateDir" must be an absolute path`);
  for (const [k, type] of Object.entries(AGENT_CONFIG_KEYS)) {
    const v = (c as Record<string, unknown>)[k];
    if (v !== undefined && typeof v !== type) throw new MobilityError('MOB_ERR_CONFIG', `${file}: "${k}" must be a ${type}, not ${JSON.stringify(v)}`);
  }
  // setInterval takes at most 2^31-1 ms; a wrong value would refresh the inventory every millisecond
  if (c.inventoryIntervalMs !== undefined && !(Number.isInteger(c.inventoryIntervalMs) && c.inventoryIntervalMs >= 1000 && c.inventoryIntervalMs <= 2 ** 31 - 1)) {
    throw new MobilityError('MOB_ERR_CONFIG', `${file}: "inventoryIntervalMs" must be a whole number of milliseconds from 1000 to ${2 ** 31 - 1}, not ${c.inventoryIntervalMs}`);
  }
  if (c.profileIntervalMs !== undefined && !(Number.isInteger(c.profileIntervalMs) && c.profileIntervalMs >= 1000 && c.profileIntervalMs <= 2 ** 31 - 1)) {
    throw new MobilityError('MOB_ERR_CONFIG', `${file}: "profileIntervalMs" must be a whole number of milliseconds from 1000 to ${2 ** 31 - 1}, not ${c.profileIntervalMs}`);
  }
  if (c.logLevel !== undefined && !(LOG_LEVELS as readonly string[]).includes(c.logLevel)) {
    throw new MobilityError('MOB_ERR_CONFIG', `${file}: "logLevel" must be one of ${LOG_LEVELS.join(', ')}, not ${JSON.stringify(c.logLevel)}`);
  }
  if (c.vmSockets !== undefined && (!path.isAbsolute(c.vmSockets) || c.vmSockets.includes('**'))) {
    throw new MobilityError('MOB_ERR_CONFIG', `${file}: "vmSockets" must be an absolute glob of QMP sockets with * within path segments (e.g. /var/run/qemu-server/*.qmp), not ${JSON.stringify(c.vmSockets)}`);
  }
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
