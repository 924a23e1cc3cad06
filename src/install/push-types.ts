/**
 * The one interface every push-install path implements (SSH for Linux,
 * PowerShell remoting for Windows). A push never throws for a host's failure:
 * it reports a PushResult with a stable MOB_ERR_PUSH_* code, so one bad host
 * never stops the others.
 */
import type { ErrorCode } from '../errors.js';

export interface PushHost {
  host: string;
  port?: number;
  user: string;
  /** Exactly one of keyFile / privateKey / password. Secrets are never logged. */
  keyFile?: string;
  /** The private key itself (a stored push account): never written to disk. */
  privateKey?: Buffer;
  password?: string;
  /** Expected host key SHA-256 fingerprint (base64, as ssh-keygen -lf prints it, without "SHA256:"); absent = trust on first use. */
  hostKeySha256?: string;
}

export interface PushRequest {
  /** The bundle to install (tar.gz from `npm run package` for Linux, .zip for Windows). */
  bundle: string;
  /** URL agents use to reach the server (wss://host:port). */
  serverUrl: string;
  /** One-time registration token, minted for this host. Secret. */
  token: string;
  /** Server certificate SHA-256 fingerprint the installer pins (AA:BB:...). */
  serverFingerprint: string;
  /** Root on the target under which everything is installed ("/" by default). */
  prefix?: string;
}

export type PushStep = 'connect' | 'preflight' | 'upload' | 'install' | 'register' | 'done';

export interface PushResult {
  host: string;
  ok: boolean;
  /** Set when ok is false. */
  code?: ErrorCode;
  message: string;
  /** The step the push reached (the failing step when ok is false). */
  step: PushStep;
  /** The agent id the host registered as, once known. */
  agentId?: string;
  ms: number;
}

export interface PushInstaller {
  /** Installs on one host; progress is reported through onStep. Never throws for host failures. */
  install(host: PushHost, req: PushRequest, onStep?: (step: PushStep, detail?: string) => void): Promise<PushResult>;
}
