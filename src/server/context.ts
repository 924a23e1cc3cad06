/**
 * What the operator API, failover and disable need from the server: the narrow view
 * the composition root (process-server.ts) implements. Nothing here imports the
 * server, so the HTTP handlers and failover depend on this interface, not on it.
 */
import type { MobilityError } from '../errors.js';
import type { Logger } from '../log.js';
import type { TlsIdentity } from '../transport/tls.js';
import type { PointCatalog } from '../target/catalog.js';
import type { ReplicaBackend } from '../target/replica-store.js';
import type { ConfigDb } from './config-db.js';
import type { OperatorConsole } from './console/operator-console.js';
import type { ControlHub } from './control.js';
import type { GroupCoordinator } from './group-cut.js';
import type { FailoverState } from './failover-state.js';
import type { HealthBoard } from './health.js';
import type { HistoryRecorder } from './history.js';
import type { ServerMetrics } from './metrics.js';
import type { CutNotice } from './points.js';
import type { Registry } from './registry.js';
import type { ReplicaListing } from './replica-listing.js';

export interface ServerContext {
  readonly log: Logger;
  readonly dataDir: string;
  readonly identity: TlsIdentity | null;
  /** The operator bearer token (and the legacy agents' shared token). */
  readonly token: string;
  /** The read-only token of GET /metrics. */
  readonly metricsToken: string;
  readonly metrics: ServerMetrics;
  readonly retentionMs: number;
  readonly rpoAlertMs: number;
  rpoAlertFor(agentId: string): number;
  readonly db: ConfigDb;
  readonly registry: Registry;
  readonly control: ControlHub;
  /** Consistency groups: group cuts and the group points' labels. */
  readonly groups: GroupCoordinator;
  readonly health: HealthBoard;
  /** Health samples, events and alerts (kept in the configuration database). */
  readonly history: HistoryRecorder;
  readonly backend: ReplicaBackend;
  /** The replicas as status shows them, also while the backend does not answer. */
  readonly listing: ReplicaListing;
  readonly stats: Record<string, number>;
  /** The server's metadata directory of an agent (points.json, failover.json). */
  agentDir(agentId: string): string;
  catalog(agentId: string): Promise<PointCatalog>;
  withAgentLock<T>(agentId: string, fn: () => Promise<T>): Promise<T>;
  resetCatalog(agentId: string): Promise<void>;
  watchCuts(fn: (agentId: string, n: CutNotice) => void): () => void;
  /** Asks the agent's live protect session for a cut; false when it is not connected. */
  requestCut(agentId: string, kind: 'crash' | 'app', reason: string): boolean;
  disconnectAgent(agentId: string, err: MobilityError): void;
  /** True while a replication session holds the disk. */
  diskBusy(agentId: string, diskId: string): boolean;
  failoverState(agentId: string): Promise<FailoverState | null>;
  /** The web console (login, pages, live updates) served under /console. */
  readonly operatorConsole: OperatorConsole;
}
